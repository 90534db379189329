//! The embedded store: one process, no setup.

use std::future::{Future, ready};
use std::sync::Arc;
use std::time::SystemTime;

use dashmap::DashMap;
use dashmap::mapref::entry::Entry;

use super::{JobStore, StoreError};
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
}

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
}

impl JobStore for MemoryStore {
    fn create(&self, record: JobRecord) -> impl Future<Output = Result<(), StoreError>> + Send {
        let result = match self.jobs.entry(record.id) {
            Entry::Occupied(_) => Err(StoreError::Conflict(record.id)),
            Entry::Vacant(slot) => {
                slot.insert(Slot::new(record));
                Ok(())
            }
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
        ready(Ok(removed))
    }

    fn set_progress(
        &self,
        id: &JobId,
        progress: &str,
    ) -> impl Future<Output = Result<(), StoreError>> + Send {
        if let Some(mut record) = self.jobs.get_mut(id) {
            if !record.state.is_finished() && record.progress.as_deref() != Some(progress) {
                record.progress = Some(progress.into());
            }
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
        ready(Ok(failed))
    }

    fn sweep(&self, now: SystemTime) -> impl Future<Output = Result<usize, StoreError>> + Send {
        let before = self.jobs.len();
        self.jobs.retain(|_, record| !record.is_expired(now));
        ready(Ok(before.saturating_sub(self.jobs.len())))
    }
}
