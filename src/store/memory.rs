//! The embedded store: one process, no setup.

use std::future::{Future, ready};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::SystemTime;

use dashmap::DashMap;
use dashmap::mapref::entry::Entry;

use super::retained::{Caps, Kept, Ledger};
use super::{Change, Changes, Created, JobStore, StoreError, Transition, once_owner};
use crate::job::{JobId, JobKind, JobOutcome, JobRecord, JobState};

/// What a kept result's record costs beyond its response, for the byte cap: the record and its
/// place in the map, rounded up from the about 470 B that `benches/memory.rs` measures.
const RECORD_BYTES: usize = 512;

/// What one kept response header costs beyond the text of its name and value.
const HEADER_BYTES: usize = std::mem::size_of::<(http::HeaderName, http::HeaderValue)>();

/// Jobs in this process's memory, in a concurrent hash map.
///
/// The default store: nothing to set up, and the fastest. Jobs are lost when the process stops,
/// and several instances behind a load balancer cannot see each other's jobs; use a shared
/// backend for that. Clones share the same jobs.
///
/// Expired records stay in memory until [`sweep`](JobStore::sweep) runs (the layer's
/// [`sweeper`](crate::AsyncLayer::sweeper) calls it periodically), but are never served.
///
/// # Caps on kept results
///
/// Finished results stay in memory until they expire or are cancelled, so the store caps them
/// (SEC-13), and refuses new jobs at a cap rather than evict a result someone may still fetch:
///
/// - **bytes in all**, 256 MiB by default ([`with_max_retained_bytes`](Self::with_max_retained_bytes)):
///   a kick-off then gets `503` with a `transient` OperationOutcome;
/// - **results per caller** (per [`JobRecord::owner`]), 1000 by default
///   ([`with_max_results_per_caller`](Self::with_max_results_per_caller)): that caller's
///   kick-off then gets `429` with a `throttled` OperationOutcome, while other callers go on.
///
/// Both answers carry `Retry-After` in delta seconds: the time until the earliest kept result in
/// question expires, at most 5 minutes (a cancel, `DELETE`, frees a place at once). The store
/// returns [`StoreError::Full`] from [`create`](JobStore::create) and
/// [`create_once`](JobStore::create_once); nothing runs for a refused kick-off. Jobs without an
/// owner (no caller binding) count only against the byte cap.
///
/// A result counts from when its job finishes until it is cancelled or removed after expiry
/// (by the sweeper, or by a kick-off that meets a cap while expired results still count). Its
/// bytes are estimated as the response body, each kept header's name and value plus the size
/// of the pair in memory, the job's target and owner, and 512 bytes for the record itself. Recording a
/// result never fails because of a cap: the caps bound admission, so the total can exceed the
/// byte cap by the results of jobs still running when it was reached, at most their number times
/// the layer's [`result_limit`](crate::AsyncLayerBuilder::result_limit) (bound their number with
/// [`max_running_jobs`](crate::AsyncLayerBuilder::max_running_jobs)). Unfinished jobs count
/// against neither cap; the layer's quotas bound those.
///
/// ```
/// use tower_fhir_async::{AsyncLayer, MemoryStore};
///
/// // At most 64 MiB of results, and 50 kept results per caller.
/// let store = MemoryStore::new()
///     .with_max_retained_bytes(64 * 1024 * 1024)
///     .with_max_results_per_caller(50);
/// let layer = AsyncLayer::builder(store.clone()).build();
/// assert_eq!(store.len(), 0);
/// assert_eq!(store.retained_bytes(), 0);
/// # drop(layer);
/// ```
#[derive(Debug, Clone, Default)]
pub struct MemoryStore {
    jobs: Arc<DashMap<JobId, Slot>>,
    /// The finished results kept in `jobs`, for the caps: an entry goes in when a job finishes
    /// (or is created finished) and out when its record is removed.
    ///
    /// Lock order: `jobs`, then this; never the other way round.
    retained: Arc<Mutex<Ledger>>,
    caps: Caps,
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
struct Announcer(tokio::sync::broadcast::Sender<Change>);

impl Default for Announcer {
    fn default() -> Self {
        Self(tokio::sync::broadcast::Sender::new(1024))
    }
}

impl Announcer {
    fn announce(&self, change: Change) {
        if self.0.receiver_count() > 0 {
            let _ = self.0.send(change);
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

    /// The result this record keeps, as the caps count it; `None` until the job has finished.
    /// Nothing in a finished record changes, so it counts the same when it leaves.
    fn kept(&self) -> Option<Kept<'_>> {
        let (JobState::Completed(response) | JobState::Failed(response)) = &self.state else {
            return None;
        };
        let headers: usize = response
            .headers
            .iter()
            .map(|(name, value)| HEADER_BYTES + name.as_str().len() + value.len())
            .sum();
        let bytes = RECORD_BYTES
            + response.body.len()
            + headers
            + self.target.len()
            + self.owner.as_deref().map_or(0, str::len);
        Some(Kept {
            bytes: bytes as u64,
            expires_at: self.expires_at?,
            owner: self.owner.as_deref(),
        })
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

    /// Caps the bytes of finished results kept, in all (default 256 MiB); at the cap, kick-offs
    /// get `503` + `Retry-After` until results expire or are cancelled. See
    /// [the caps](Self#caps-on-kept-results) for what counts.
    ///
    /// Set the caps before cloning: clones share the jobs and their count, and each applies the
    /// caps it was cloned with.
    ///
    /// # Panics
    ///
    /// If `bytes` is 0: no result could ever be kept.
    pub fn with_max_retained_bytes(mut self, bytes: usize) -> Self {
        assert!(
            bytes > 0,
            "MemoryStore::with_max_retained_bytes(0) would refuse every job once one result is kept; \
             give at least the size of one result"
        );
        self.caps.bytes = bytes as u64;
        self
    }

    /// Caps the finished, unexpired results kept per caller ([`JobRecord::owner`]; default 1000);
    /// at the cap, that caller's kick-offs get `429` + `Retry-After` until one of its results
    /// expires or is cancelled. Jobs without an owner are not counted.
    ///
    /// Set the caps before cloning, as for [`with_max_retained_bytes`](Self::with_max_retained_bytes).
    ///
    /// # Panics
    ///
    /// If `count` is 0: no caller could ever keep a result.
    pub fn with_max_results_per_caller(mut self, count: usize) -> Self {
        assert!(
            count > 0,
            "MemoryStore::with_max_results_per_caller(0) would refuse every caller once it has one result; \
             give at least 1"
        );
        self.caps.per_owner = count;
        self
    }

    /// The bytes of finished results counted against
    /// [`with_max_retained_bytes`](Self::with_max_retained_bytes) now, expired ones included
    /// until they are removed.
    pub fn retained_bytes(&self) -> u64 {
        self.ledger().bytes()
    }

    fn ledger(&self) -> MutexGuard<'_, Ledger> {
        // The account is plain counts, updated in one step each: still right after a panic.
        self.retained.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Removes job `id` and its kept result; whether it was there, unexpired at `now`.
    fn remove(&self, id: &JobId, now: SystemTime) -> bool {
        let removed = self.jobs.remove(id).is_some_and(|(_, record)| {
            if let Some(kept) = record.kept() {
                self.ledger().forget(kept);
            }
            !record.is_expired(now)
        });
        if removed {
            self.changed.announce(Change::Cancelled(*id));
        }
        removed
    }

    /// Records a new job, unless a cap on kept results is reached at `now`.
    fn insert(&self, record: JobRecord, now: SystemTime) -> Result<(), StoreError> {
        if self.abandoned.contains_key(&record.id) {
            return Err(StoreError::Conflict(record.id));
        }
        self.admit(record.owner.as_deref(), now)?;
        match self.jobs.entry(record.id) {
            Entry::Occupied(_) => Err(StoreError::Conflict(record.id)),
            Entry::Vacant(slot) => {
                let slot = slot.insert(Slot::new(record));
                if let Some(kept) = slot.kept() {
                    self.ledger().keep(kept);
                }
                Ok(())
            }
        }
    }

    /// Whether a new job of `owner` may be recorded at `now`: [`StoreError::Full`] at a cap.
    /// Never evicts a result that has not expired.
    fn admit(&self, owner: Option<&str>, now: SystemTime) -> Result<(), StoreError> {
        let refusal = self.ledger().refusal(self.caps, owner);
        let Some(refusal) = refusal else {
            return Ok(());
        };
        if !refusal.expired_results_wait(now) {
            return Err(refusal.into_error(now));
        }
        // Expired results count until they are removed; remove them now rather than refuse
        // until the sweeper runs (or forever, without one), and look again.
        self.remove_expired(now);
        let refusal = self.ledger().refusal(self.caps, owner);
        refusal.map_or(Ok(()), |refusal| Err(refusal.into_error(now)))
    }

    /// Removes the records expired at `now`; returns how many.
    fn remove_expired(&self, now: SystemTime) -> usize {
        let before = self.jobs.len();
        self.jobs.retain(|_, slot| {
            if !slot.is_expired(now) {
                return true;
            }
            if let Some(kept) = slot.kept() {
                self.ledger().forget(kept);
            }
            false
        });
        before.saturating_sub(self.jobs.len())
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
        // The record's creation time is the caller's `now`.
        let now = record.created_at;
        ready(self.insert(record, now))
    }

    fn create_once(
        &self,
        record: JobRecord,
        key: &str,
        now: SystemTime,
    ) -> impl Future<Output = Result<Created, StoreError>> + Send {
        let Some(owner) = once_owner(&record) else {
            return ready(self.insert(record, now).map(|()| Created::New));
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
                    self.insert(record, now).map(|()| {
                        *mapped.get_mut() = id;
                        Created::New
                    })
                }
            }
            Entry::Vacant(slot) => self.insert(record, now).map(|()| {
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

    fn transition(
        &self,
        id: &JobId,
        transition: Transition<'_>,
    ) -> impl Future<Output = Result<bool, StoreError>> + Send {
        // A start is nobody's news: pollers see `Running` as they saw `Accepted`.
        let news = !matches!(transition, Transition::Start { .. });
        let applied = self
            .jobs
            .get_mut(id)
            .is_some_and(|mut record| match transition {
                Transition::Start {
                    instance,
                    lease_until,
                } => {
                    if record.state != JobState::Accepted {
                        return false;
                    }
                    record.state = JobState::Running {
                        instance: instance.to_owned(),
                        lease_until,
                    };
                    true
                }
                Transition::Finish {
                    outcome,
                    finished_at,
                    expires_at,
                } => {
                    if record.state.is_finished() {
                        return false;
                    }
                    record.end(outcome.into(), finished_at, expires_at);
                    // Never refused: the caps bound admission, and this result is already computed.
                    if let Some(kept) = record.kept() {
                        self.ledger().keep(kept);
                    }
                    true
                }
                Transition::Progress(progress) => {
                    let changed =
                        !record.state.is_finished() && record.progress.as_deref() != Some(progress);
                    if changed {
                        record.progress = Some(progress.into());
                    }
                    changed
                }
            });
        if applied && news {
            self.changed.announce(Change::Updated(*id));
        }
        ready(Ok(applied))
    }

    fn cancel(
        &self,
        id: &JobId,
        now: SystemTime,
    ) -> impl Future<Output = Result<bool, StoreError>> + Send {
        ready(Ok(self.remove(id, now)))
    }

    fn abandon(
        &self,
        id: &JobId,
        now: SystemTime,
        until: SystemTime,
    ) -> impl Future<Output = Result<(), StoreError>> + Send {
        // Writes here cannot arrive late, but the marker keeps every backend's contract alike.
        self.abandoned.insert(*id, until);
        self.remove(id, now);
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
                if let Some(kept) = entry.kept() {
                    self.ledger().keep(kept);
                }
                failed.push(*entry.key());
            }
        }
        for id in &failed {
            self.changed.announce(Change::Updated(*id));
        }
        ready(Ok(failed))
    }

    fn sweep(&self, now: SystemTime) -> impl Future<Output = Result<usize, StoreError>> + Send {
        let swept = self.remove_expired(now);
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

    use super::super::FullScope;
    use super::super::retained::MAX_RETRY_AFTER;
    use super::*;
    use crate::job::StoredResponse;
    use crate::store::conformance::Transitions;

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

    /// A finished result: `body` bytes of FHIR JSON.
    fn result(body: usize) -> JobOutcome {
        JobOutcome::Completed(StoredResponse {
            status: http::StatusCode::OK,
            headers: vec![(
                http::header::CONTENT_TYPE,
                http::HeaderValue::from_static("application/fhir+json"),
            )],
            body: bytes::Bytes::from(vec![b'x'; body]),
        })
    }

    /// What `result(body)` of a job of `owned(..)` counts against the byte cap, computed from
    /// the documented estimate rather than by the code under test.
    fn counted(body: usize) -> u64 {
        let header = "content-type".len() + "application/fhir+json".len() + HEADER_BYTES;
        (512 + body + header + "/fhir/x".len() + "alice".len()) as u64
    }

    fn owned_by(owner: &str, at: SystemTime) -> JobRecord {
        JobRecord::new(JobId::new(), JobKind::Interaction, "POST", "/fhir/x", at)
            .with_owner(Some(owner.into()))
    }

    /// Creates a job of `rec`'s owner and finishes it at `now`, readable until `expires_at`.
    async fn kept(store: &MemoryStore, rec: &JobRecord, body: usize, expires_at: SystemTime) {
        store.create(rec.clone()).await.unwrap();
        let finished_at = rec.created_at;
        assert!(
            store
                .finish(&rec.id, result(body), finished_at, expires_at)
                .await
                .unwrap()
        );
    }

    fn full(error: StoreError) -> (FullScope, Duration) {
        match error {
            StoreError::Full { scope, retry_after } => (scope, retry_after),
            other => panic!("expected StoreError::Full, got {other:?}"),
        }
    }

    // SEC-13, issue #11 item 4: a finished result's bytes are counted when it finishes (or
    // fails as lapsed), and given back when it is cancelled, swept, or cancelled after expiry;
    // unfinished jobs count nothing.
    #[tokio::test]
    async fn sec_13_result_bytes_are_counted_in_and_out() {
        let store = MemoryStore::new();
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000);
        let later = now + Duration::from_secs(60);
        let [cancelled, swept, expired_cancelled, lapsed] =
            [owned(now), owned(now), owned(now), owned(now)];
        store.create(lapsed.clone()).await.unwrap();
        assert_eq!(
            store.retained_bytes(),
            0,
            "an unfinished job keeps no result"
        );

        kept(&store, &cancelled, 1_000, later).await;
        assert_eq!(store.retained_bytes(), counted(1_000));
        kept(&store, &swept, 2_000, now + Duration::from_secs(10)).await;
        kept(
            &store,
            &expired_cancelled,
            3_000,
            now + Duration::from_secs(10),
        )
        .await;
        let all = counted(1_000) + counted(2_000) + counted(3_000);
        assert_eq!(store.retained_bytes(), all);
        assert!(
            !store
                .finish(&cancelled.id, result(50_000), now, later)
                .await
                .unwrap(),
            "a second finish changes nothing"
        );
        assert_eq!(store.retained_bytes(), all);

        assert!(store.cancel(&cancelled.id, now).await.unwrap());
        assert_eq!(store.retained_bytes(), counted(2_000) + counted(3_000));
        let at_expiry = now + Duration::from_secs(10);
        assert!(
            !store
                .cancel(&expired_cancelled.id, at_expiry)
                .await
                .unwrap()
        );
        assert_eq!(store.retained_bytes(), counted(2_000));
        assert_eq!(store.sweep(at_expiry).await.unwrap(), 1);
        assert_eq!(store.retained_bytes(), 0);

        let failed = store
            .fail_lapsed(later, later, result(10), later + Duration::from_secs(60))
            .await
            .unwrap();
        assert_eq!(failed, [lapsed.id]);
        assert_eq!(store.retained_bytes(), counted(10));
        store.cancel(&lapsed.id, later).await.unwrap();
        assert!(store.ledger().is_empty(), "{:?}", store.ledger());
    }

    // SEC-13, KICK-8, issue #11 item 4: at the per-caller cap, that caller's new job is refused
    // (Full, scope Caller) with the time until its earliest result expires; nothing is recorded;
    // other callers, jobs without an owner and unfinished jobs are not held back; a repeated
    // idempotent kick-off still names its job; a cancel frees a place at once.
    #[tokio::test]
    async fn sec_13_caller_cap_refuses_that_caller_until_a_cancel() {
        let store = MemoryStore::new().with_max_results_per_caller(2);
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000);
        let first = owned_by("alice", now);
        kept(&store, &first, 10, now + Duration::from_secs(100)).await;
        let running = owned_by("alice", now);
        store.create(running.clone()).await.unwrap();
        let second = owned_by("alice", now);
        store.create_once(second.clone(), "k", now).await.unwrap();
        store
            .finish(&second.id, result(10), now, now + Duration::from_secs(200))
            .await
            .unwrap();
        assert_eq!(store.ledger().owned("alice"), 2);

        let held = store.len();
        let refused = store.create(owned_by("alice", now)).await.unwrap_err();
        assert_eq!(
            full(refused),
            (FullScope::Caller, Duration::from_secs(100)),
            "the earliest of alice's results expires in 100 s"
        );
        let refused = store
            .create_once(owned_by("alice", now), "other", now)
            .await
            .unwrap_err();
        assert_eq!(full(refused).0, FullScope::Caller);
        assert_eq!(store.len(), held, "a refused job is not recorded");
        assert_eq!(
            store
                .create_once(owned_by("alice", now), "k", now)
                .await
                .unwrap(),
            Created::Existing(second.id),
            "a repeat creates nothing, so the cap does not apply"
        );
        store.create(owned_by("bob", now)).await.unwrap();
        store.create(owned(now).with_owner(None)).await.unwrap();
        // The running job finishes past the cap: recording a result is never refused.
        assert!(
            store
                .finish(&running.id, result(10), now, now + Duration::from_secs(300))
                .await
                .unwrap()
        );
        assert_eq!(store.ledger().owned("alice"), 3);

        store.cancel(&first.id, now).await.unwrap();
        store.cancel(&second.id, now).await.unwrap();
        store.create(owned_by("alice", now)).await.unwrap();
    }

    // SEC-13, issue #11 item 4: at the byte cap every new job is refused (Full, scope Store),
    // every kept result stays readable (none is evicted), and results of jobs already running
    // are still recorded past the cap. `Retry-After` is capped at 5 minutes.
    #[tokio::test]
    async fn sec_13_byte_cap_refuses_and_never_evicts() {
        let cap = counted(1_000) * 2;
        let store = MemoryStore::new().with_max_retained_bytes(cap as usize);
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000);
        let day = now + Duration::from_secs(24 * 3600);
        let running = owned(now);
        store.create(running.clone()).await.unwrap();
        let results = [owned(now), owned(now)];
        for rec in &results {
            kept(&store, rec, 1_000, day).await;
        }
        assert_eq!(store.retained_bytes(), cap);

        for refused in [owned(now), owned(now).with_owner(None)] {
            let error = store.create(refused).await.unwrap_err();
            assert_eq!(full(error), (FullScope::Store, MAX_RETRY_AFTER));
        }
        for rec in &results {
            let record = store.get(&rec.id, now).await.unwrap().expect("kept");
            assert!(matches!(record.state, JobState::Completed(_)));
        }
        assert!(
            store
                .finish(&running.id, result(1_000), now, day)
                .await
                .unwrap()
        );
        assert_eq!(store.retained_bytes(), cap + counted(1_000));
        assert_eq!(store.len(), 3);
    }

    // SEC-13, EXPIRE-3, issue #11 item 4: results that expired count until removed; a job
    // refused at a cap makes the store remove them, so kick-offs are accepted again once the
    // earliest result has expired, even without a sweeper. Before that, the refusal names the
    // seconds left.
    #[tokio::test]
    async fn sec_13_expired_results_free_their_place_without_a_sweep() {
        let store = MemoryStore::new()
            .with_max_results_per_caller(1)
            .with_max_retained_bytes(counted(10) as usize + 1);
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000);
        let expires = now + Duration::from_millis(9_500);
        kept(&store, &owned_by("alice", now), 10, expires).await;
        kept(&store, &owned_by("carol", now), 10, expires).await;

        let soon = now + Duration::from_secs(5);
        let error = store.create(owned_by("alice", soon)).await.unwrap_err();
        assert_eq!(full(error), (FullScope::Caller, Duration::from_secs(5)));
        let error = store.create(owned_by("bob", soon)).await.unwrap_err();
        assert_eq!(full(error), (FullScope::Store, Duration::from_secs(5)));
        let error = store
            .create(owned_by("bob", soon + Duration::from_millis(500)))
            .await
            .unwrap_err();
        assert_eq!(
            full(error).1,
            Duration::from_secs(5),
            "4.5 s are rounded up, so a client waiting that long finds the results expired"
        );
        assert_eq!(store.len(), 2);

        let after = now + Duration::from_secs(10);
        store.create(owned_by("alice", after)).await.unwrap();
        assert_eq!(store.len(), 1, "both expired results were removed");
        assert_eq!(store.retained_bytes(), 0);
        store.create(owned_by("bob", after)).await.unwrap();
    }

    #[test]
    #[should_panic(expected = "with_max_retained_bytes(0)")]
    fn a_byte_cap_of_zero_is_refused() {
        let _ = MemoryStore::new().with_max_retained_bytes(0);
    }

    #[test]
    #[should_panic(expected = "with_max_results_per_caller(0)")]
    fn a_caller_cap_of_zero_is_refused() {
        let _ = MemoryStore::new().with_max_results_per_caller(0);
    }

    // SEC-13, issue #11 item 4: kick-offs, finishes, cancels and sweeps racing on threads keep
    // the account exact and never deadlock: once every job is gone, nothing is counted.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn sec_13_the_account_stays_exact_under_races() {
        let store = MemoryStore::new()
            .with_max_results_per_caller(8)
            .with_max_retained_bytes(counted(100) as usize * 20);
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000);
        let tasks = (0..8).map(|task| {
            let store = store.clone();
            tokio::spawn(async move {
                let owner = format!("caller-{}", task % 3);
                let mut accepted = Vec::new();
                for round in 0..200u64 {
                    let at = now + Duration::from_millis(round * 10);
                    let rec = owned_by(&owner, at);
                    match store.create(rec.clone()).await {
                        Ok(()) => accepted.push(rec.id),
                        Err(StoreError::Full { .. }) => {}
                        Err(other) => panic!("{other}"),
                    }
                    if let Some(id) = accepted.last() {
                        let expires = at + Duration::from_millis(500);
                        store.finish(id, result(100), at, expires).await.unwrap();
                    }
                    if round % 3 == 0 {
                        if let Some(id) = accepted.pop() {
                            store.cancel(&id, at).await.unwrap();
                        }
                    }
                    if round % 50 == 0 {
                        store.sweep(at).await.unwrap();
                    }
                }
                accepted
            })
        });
        let left: Vec<JobId> = futures_util::future::join_all(tasks)
            .await
            .into_iter()
            .flat_map(|joined| joined.unwrap())
            .collect();
        assert!(!left.is_empty());
        for id in &left {
            store.cancel(id, now).await.unwrap();
        }
        store.sweep(now + Duration::from_secs(3_600)).await.unwrap();
        assert!(store.is_empty());
        assert!(store.ledger().is_empty(), "{:?}", store.ledger());
    }
}
