//! The embedded store: one process, no setup.

use std::future::{Future, ready};
use std::sync::Arc;
use std::time::SystemTime;

use dashmap::DashMap;
use dashmap::mapref::entry::Entry;

use super::{Changes, Created, JobStore, StoreError, once_owner};
use crate::job::{JobId, JobKind, JobOutcome, JobRecord, JobState};

/// Jobs in this process's memory, in a concurrent hash map.
///
/// The default store: nothing to set up, and the fastest. Jobs are lost when the process stops,
/// and several instances behind a load balancer cannot see each other's jobs; use a shared
/// backend for that. Clones share the same jobs.
///
/// Expired records stay in memory until [`sweep`](JobStore::sweep) runs (the layer's
/// [`sweeper`](crate::AsyncLayer::sweeper) calls it periodically), but are never served.
///
/// ```
/// use tower_fhir_async::{AsyncLayer, MemoryStore};
///
/// let store = MemoryStore::default();
/// let layer = AsyncLayer::builder(store.clone()).build();
/// assert_eq!(store.len(), 0);
/// # drop(layer);
/// ```
#[derive(Debug, Clone, Default)]
pub struct MemoryStore {
    jobs: Arc<DashMap<JobId, Slot>>,
    /// The job each `(owner, idempotency key)` was last kicked off as, for
    /// [`create_once`](JobStore::create_once). An entry whose job was cancelled, failed or
    /// expired is ignored and overwritten; [`sweep`](JobStore::sweep) drops such entries.
    ///
    /// Lock order: an entry here, then `jobs`; never the other way round.
    once: Arc<DashMap<OnceKey, JobId>>,
    /// Announces changed jobs to [`changes`](JobStore::changes) streams (layers sharing this
    /// store in one process).
    changed: Announcer,
    /// Ids taken back by [`abandon`](JobStore::abandon), until when no record may take them.
    abandoned: Arc<DashMap<JobId, SystemTime>>,
}

/// The sending side of [`JobStore::changes`]: a broadcast channel; nobody listening costs
/// nothing but a check.
#[derive(Debug, Clone)]
struct Announcer(tokio::sync::broadcast::Sender<JobId>);

impl Default for Announcer {
    fn default() -> Self {
        Self(tokio::sync::broadcast::Sender::new(1024))
    }
}

impl Announcer {
    fn announce(&self, id: JobId) {
        if self.0.receiver_count() > 0 {
            let _ = self.0.send(id);
        }
    }
}

/// An owner and an idempotency key.
type OnceKey = (Box<str>, Box<str>);

/// A record as kept here, for the job's whole retention: the same fields as [`JobRecord`]
/// without spare capacity (boxed strings, the method inline rather than on the heap).
#[derive(Debug)]
struct Slot {
    kind: JobKind,
    state: JobState,
    owner: Option<Box<str>>,
    method: Method,
    target: Box<str>,
    progress: Option<Box<str>>,
    created_at: SystemTime,
    finished_at: Option<SystemTime>,
    expires_at: Option<SystemTime>,
}

/// A request method: inline for the standard ones (and short extensions).
#[derive(Debug)]
enum Method {
    Http(http::Method),
    Other(Box<str>),
}

impl Slot {
    fn new(record: JobRecord) -> Self {
        let method = match http::Method::from_bytes(record.method.as_bytes()) {
            Ok(method) if method.as_str() == record.method => Method::Http(method),
            _ => Method::Other(record.method.into_boxed_str()),
        };
        Self {
            kind: record.kind,
            state: compact(record.state),
            owner: record.owner.map(String::into_boxed_str),
            method,
            target: record.target.into_boxed_str(),
            progress: record.progress.map(String::into_boxed_str),
            created_at: record.created_at,
            finished_at: record.finished_at,
            expires_at: record.expires_at,
        }
    }

    fn record(&self, id: JobId) -> JobRecord {
        let method = match &self.method {
            Method::Http(method) => method.as_str(),
            Method::Other(method) => method,
        };
        let mut record = JobRecord::new(id, self.kind, method, &*self.target, self.created_at)
            .with_owner(self.owner.as_deref().map(str::to_owned));
        record.state = self.state.clone();
        record.progress = self.progress.as_deref().map(str::to_owned);
        record.finished_at = self.finished_at;
        record.expires_at = self.expires_at;
        record
    }

    fn is_expired(&self, now: SystemTime) -> bool {
        self.expires_at.is_some_and(|at| at <= now)
    }

    /// Whether a repeated kick-off by `owner` should be answered with this job.
    fn counts_for(&self, owner: &str, now: SystemTime) -> bool {
        !matches!(self.state, JobState::Failed(_))
            && !self.is_expired(now)
            && self.owner.as_deref() == Some(owner)
    }

    fn end(&mut self, state: JobState, finished_at: SystemTime, expires_at: SystemTime) {
        self.state = compact(state);
        self.progress = None;
        self.finished_at = Some(finished_at);
        self.expires_at = Some(expires_at);
    }
}

/// A state without spare capacity in its kept headers.
fn compact(mut state: JobState) -> JobState {
    if let JobState::Completed(response) | JobState::Failed(response) = &mut state {
        response.headers.shrink_to_fit();
    }
    state
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    /// How many records are held, expired ones included.
    pub fn len(&self) -> usize {
        self.jobs.len()
    }

    /// Whether no records are held.
    pub fn is_empty(&self) -> bool {
        self.jobs.is_empty()
    }

    fn insert(&self, record: JobRecord) -> Result<(), StoreError> {
        if self.abandoned.contains_key(&record.id) {
            return Err(StoreError::Conflict(record.id));
        }
        match self.jobs.entry(record.id) {
            Entry::Occupied(_) => Err(StoreError::Conflict(record.id)),
            Entry::Vacant(slot) => {
                slot.insert(Slot::new(record));
                Ok(())
            }
        }
    }

    /// Whether job `id` should answer a repeated kick-off by `owner` at `now`.
    fn counts(&self, id: &JobId, owner: &str, now: SystemTime) -> bool {
        self.jobs
            .get(id)
            .is_some_and(|slot| slot.counts_for(owner, now))
    }
}

impl JobStore for MemoryStore {
    fn create(&self, record: JobRecord) -> impl Future<Output = Result<(), StoreError>> + Send {
        ready(self.insert(record))
    }

    fn create_once(
        &self,
        record: JobRecord,
        key: &str,
        now: SystemTime,
    ) -> impl Future<Output = Result<Created, StoreError>> + Send {
        let Some(owner) = once_owner(&record) else {
            return ready(self.insert(record).map(|()| Created::New));
        };
        let id = record.id;
        // The entry stays locked until the job is recorded, so concurrent kick-offs with the
        // same owner and key take turns: the first creates, the others find its job.
        let result = match self.once.entry((owner.into(), key.into())) {
            Entry::Occupied(mut mapped) => {
                let existing = *mapped.get();
                if self.counts(&existing, owner, now) {
                    Ok(Created::Existing(existing))
                } else {
                    self.insert(record).map(|()| {
                        *mapped.get_mut() = id;
                        Created::New
                    })
                }
            }
            Entry::Vacant(slot) => self.insert(record).map(|()| {
                slot.insert(id);
                Created::New
            }),
        };
        ready(result)
    }

    fn get(
        &self,
        id: &JobId,
        now: SystemTime,
    ) -> impl Future<Output = Result<Option<JobRecord>, StoreError>> + Send {
        let record = self
            .jobs
            .get(id)
            .filter(|slot| !slot.is_expired(now))
            .map(|slot| slot.record(*id));
        ready(Ok(record))
    }

    fn start(
        &self,
        id: &JobId,
        instance: &str,
        lease_until: SystemTime,
    ) -> impl Future<Output = Result<bool, StoreError>> + Send {
        let started = self.jobs.get_mut(id).is_some_and(|mut record| {
            if record.state != JobState::Accepted {
                return false;
            }
            record.state = JobState::Running {
                instance: instance.to_owned(),
                lease_until,
            };
            true
        });
        ready(Ok(started))
    }

    fn finish(
        &self,
        id: &JobId,
        outcome: JobOutcome,
        finished_at: SystemTime,
        expires_at: SystemTime,
    ) -> impl Future<Output = Result<bool, StoreError>> + Send {
        let finished = self.jobs.get_mut(id).is_some_and(|mut record| {
            if record.state.is_finished() {
                return false;
            }
            record.end(outcome.into(), finished_at, expires_at);
            true
        });
        if finished {
            self.changed.announce(*id);
        }
        ready(Ok(finished))
    }

    fn cancel(
        &self,
        id: &JobId,
        now: SystemTime,
    ) -> impl Future<Output = Result<bool, StoreError>> + Send {
        let removed = self
            .jobs
            .remove(id)
            .is_some_and(|(_, record)| !record.is_expired(now));
        if removed {
            self.changed.announce(*id);
        }
        ready(Ok(removed))
    }

    fn abandon(
        &self,
        id: &JobId,
        now: SystemTime,
        until: SystemTime,
    ) -> impl Future<Output = Result<(), StoreError>> + Send {
        // Writes here cannot arrive late, but the marker keeps every backend's contract alike.
        self.abandoned.insert(*id, until);
        let removed = self
            .jobs
            .remove(id)
            .is_some_and(|(_, record)| !record.is_expired(now));
        if removed {
            self.changed.announce(*id);
        }
        ready(Ok(()))
    }

    fn set_progress(
        &self,
        id: &JobId,
        progress: &str,
    ) -> impl Future<Output = Result<(), StoreError>> + Send {
        let changed = self.jobs.get_mut(id).is_some_and(|mut record| {
            let changed =
                !record.state.is_finished() && record.progress.as_deref() != Some(progress);
            if changed {
                record.progress = Some(progress.into());
            }
            changed
        });
        if changed {
            self.changed.announce(*id);
        }
        ready(Ok(()))
    }

    fn renew_leases(
        &self,
        instance: &str,
        ids: &[JobId],
        lease_until: SystemTime,
    ) -> impl Future<Output = Result<Vec<JobId>, StoreError>> + Send {
        let mut gone = Vec::new();
        for id in ids {
            let renewed = self
                .jobs
                .get_mut(id)
                .is_some_and(|mut record| match &mut record.state {
                    JobState::Running {
                        instance: owner,
                        lease_until: until,
                    } if owner == instance => {
                        *until = lease_until;
                        true
                    }
                    _ => false,
                });
            if !renewed {
                gone.push(*id);
            }
        }
        ready(Ok(gone))
    }

    fn fail_lapsed(
        &self,
        now: SystemTime,
        unstarted_before: SystemTime,
        outcome: JobOutcome,
        expires_at: SystemTime,
    ) -> impl Future<Output = Result<Vec<JobId>, StoreError>> + Send {
        let mut failed = Vec::new();
        for mut entry in self.jobs.iter_mut() {
            let lapsed = match entry.state {
                JobState::Running { lease_until, .. } => lease_until <= now,
                JobState::Accepted => entry.created_at <= unstarted_before,
                _ => false,
            };
            if lapsed {
                entry.end(outcome.clone().into(), now, expires_at);
                failed.push(*entry.key());
            }
        }
        for id in &failed {
            self.changed.announce(*id);
        }
        ready(Ok(failed))
    }

    fn sweep(&self, now: SystemTime) -> impl Future<Output = Result<usize, StoreError>> + Send {
        let before = self.jobs.len();
        self.jobs.retain(|_, record| !record.is_expired(now));
        let swept = before.saturating_sub(self.jobs.len());
        // Keys of cancelled, failed and expired jobs no longer count; without this, those of
        // cancelled jobs would stay forever. `jobs` is no longer locked here (see `once`).
        self.once
            .retain(|(owner, _), id| self.counts(id, owner, now));
        self.abandoned.retain(|_, until| *until > now);
        ready(Ok(swept))
    }

    fn changes(&self) -> impl Future<Output = Result<Option<Changes>, StoreError>> + Send {
        let receiver = self.changed.0.subscribe();
        let ids = futures_util::stream::unfold(receiver, |mut receiver| async move {
            loop {
                match receiver.recv().await {
                    Ok(id) => return Some((id, receiver)),
                    // Missed announcements only delay long polls to their next store read.
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return None,
                }
            }
        });
        ready(Ok(Some(Box::pin(ids) as Changes)))
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::job::StoredResponse;

    fn owned(at: SystemTime) -> JobRecord {
        JobRecord::new(JobId::new(), JobKind::Interaction, "POST", "/fhir/x", at)
            .with_owner(Some("alice".into()))
    }

    // KICK-9, issue #7 item 6: idempotency keys of cancelled, failed and expired jobs are dropped
    // by the sweep, so they do not pile up; keys of jobs that count are kept.
    #[tokio::test]
    async fn kick_9_sweep_drops_keys_that_no_longer_count() {
        let store = MemoryStore::new();
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000);
        let later = now + Duration::from_secs(60);
        let [cancelled, failed, expired, running, completed] =
            [owned(now), owned(now), owned(now), owned(now), owned(now)];
        for (rec, key) in [
            (&cancelled, "cancelled"),
            (&failed, "failed"),
            (&expired, "expired"),
            (&running, "running"),
            (&completed, "completed"),
        ] {
            store.create_once(rec.clone(), key, now).await.unwrap();
        }
        assert_eq!(store.once.len(), 5);
        store.cancel(&cancelled.id, now).await.unwrap();
        let response = StoredResponse {
            status: http::StatusCode::OK,
            headers: vec![],
            body: bytes::Bytes::new(),
        };
        let outcome = JobOutcome::Failed(response.clone());
        store.finish(&failed.id, outcome, now, later).await.unwrap();
        let outcome = JobOutcome::Completed(response.clone());
        store.finish(&expired.id, outcome, now, now).await.unwrap();
        let outcome = JobOutcome::Completed(response);
        store
            .finish(&completed.id, outcome, now, later)
            .await
            .unwrap();
        store.start(&running.id, "a", later).await.unwrap();

        assert_eq!(store.sweep(now).await.unwrap(), 1, "the expired job");
        let mut kept: Vec<String> = store.once.iter().map(|e| e.key().1.to_string()).collect();
        kept.sort_unstable();
        assert_eq!(kept, ["completed", "running"]);
    }

    // KICK-9, issue #7 item 6: kick-offs racing on many threads, with cancels and sweeps
    // running alongside, create one job per key and never deadlock.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn kick_9_kick_offs_racing_on_threads_have_one_winner() {
        let store = MemoryStore::new();
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000);
        for round in 0..50 {
            let key = format!("k{round}");
            let records: Vec<JobRecord> = (0..16).map(|_| owned(now)).collect();
            let kick_offs = records.iter().map(|rec| {
                let (store, rec, key) = (store.clone(), rec.clone(), key.clone());
                tokio::spawn(async move { store.create_once(rec, &key, now).await })
            });
            let sweeper = tokio::spawn({
                let store = store.clone();
                async move { store.sweep(now).await }
            });
            let results: Vec<Created> = futures_util::future::join_all(kick_offs)
                .await
                .into_iter()
                .map(|joined| joined.unwrap().unwrap())
                .collect();
            sweeper.await.unwrap().unwrap();
            let winners: Vec<JobId> = records
                .iter()
                .zip(&results)
                .filter(|(_, created)| **created == Created::New)
                .map(|(rec, _)| rec.id)
                .collect();
            assert_eq!(winners.len(), 1, "{results:?}");
            assert!(
                results
                    .iter()
                    .all(|c| *c == Created::New || *c == Created::Existing(winners[0]))
            );
            let cancel = tokio::spawn({
                let (store, id) = (store.clone(), winners[0]);
                async move { store.cancel(&id, now).await }
            });
            let repeat = store.create_once(owned(now), &key, now).await.unwrap();
            cancel.await.unwrap().unwrap();
            assert!(matches!(repeat, Created::New) || repeat == Created::Existing(winners[0]));
        }
    }
}
