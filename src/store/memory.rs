//! The embedded store: one process, no setup.

use std::future::{Future, ready};
use std::sync::Arc;
use std::time::SystemTime;

use dashmap::DashMap;
use dashmap::mapref::entry::Entry;

use super::{JobStore, StoreError};
use crate::job::{JobId, JobOutcome, JobRecord, JobState};

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
    jobs: Arc<DashMap<JobId, JobRecord>>,
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
                slot.insert(record);
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
            .filter(|r| !r.is_expired(now))
            .map(|r| r.clone());
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
            record.state = outcome.into();
            record.progress = None;
            record.finished_at = Some(finished_at);
            record.expires_at = Some(expires_at);
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
                record.progress = Some(progress.to_owned());
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
        for mut record in self.jobs.iter_mut() {
            let lapsed = match record.state {
                JobState::Running { lease_until, .. } => lease_until <= now,
                JobState::Accepted => record.created_at <= unstarted_before,
                _ => false,
            };
            if lapsed {
                record.state = outcome.clone().into();
                record.progress = None;
                record.finished_at = Some(now);
                record.expires_at = Some(expires_at);
                failed.push(record.id);
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
