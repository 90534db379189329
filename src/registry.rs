//! The registry: the jobs running in this process (their cancel tokens, progress and change
//! signals), the long polls held here for jobs running on other instances, and whether new jobs
//! may still start. No behaviour of its own beyond keeping these tables consistent.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use dashmap::DashMap;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::context::JobShared;
use crate::job::JobId;
use crate::meters;

#[derive(Default)]
pub(crate) struct Registry {
    running: DashMap<JobId, Arc<JobShared>>,
    /// Long polls of jobs running on other instances, woken by the store's change stream.
    remote: DashMap<JobId, watch::Sender<u64>>,
    /// Whether the watcher holds the store's change stream now.
    change_push: AtomicBool,
    shutting_down: AtomicBool,
    /// Parent of every job's cancel token: cancelled once, when shutdown stops what is left.
    stop_all: CancellationToken,
}

impl Registry {
    /// Registers a job about to run, so a cancel arriving at any point after this finds it.
    /// `None` once shutdown has begun: no job may start after that.
    pub(crate) fn register(&self, id: JobId) -> Option<Arc<JobShared>> {
        let job = JobShared::new(id, self.stop_all.child_token());
        self.running.insert(id, job.clone());
        // Checked after inserting, so a shutdown that begins meanwhile either sees this job or
        // is seen here.
        if self.is_shutting_down() {
            self.running.remove(&id);
            return None;
        }
        metrics::gauge!(meters::RUNNING).increment(1.0);
        Some(job)
    }

    pub(crate) fn unregister(&self, id: &JobId) {
        if self.running.remove(id).is_some() {
            metrics::gauge!(meters::RUNNING).decrement(1.0);
        }
    }

    /// Changes of a job running on another instance, as the store announces them; the
    /// receiver is forgotten with [`forget_remote`](Self::forget_remote).
    pub(crate) fn remote_changes(&self, id: &JobId) -> watch::Receiver<u64> {
        self.remote
            .entry(*id)
            .or_insert_with(|| watch::Sender::new(0))
            .subscribe()
    }

    /// Drops the entry of a remote job nobody waits for any more.
    pub(crate) fn forget_remote(&self, id: &JobId) {
        self.remote
            .remove_if(id, |_, sender| sender.receiver_count() == 0);
    }

    /// Wakes the long polls of a job the store announced as changed.
    pub(crate) fn notify_remote(&self, id: &JobId) {
        if let Some(sender) = self.remote.get(id) {
            sender.send_modify(|n| *n = n.wrapping_add(1));
        }
    }

    pub(crate) fn set_change_push(&self, on: bool) {
        self.change_push.store(on, Ordering::Release);
    }

    /// Whether changes of jobs on other instances are pushed to this one now.
    pub(crate) fn has_change_push(&self) -> bool {
        self.change_push.load(Ordering::Acquire)
    }

    /// Changes of a job running in this process (progress, its end), for long polls.
    pub(crate) fn changes(&self, id: &JobId) -> Option<watch::Receiver<u64>> {
        self.running.get(id).map(|job| job.changes())
    }

    /// The live progress of a job running in this process.
    pub(crate) fn local_progress(&self, id: &JobId) -> Option<Box<str>> {
        self.running.get(id).and_then(|job| job.progress())
    }

    /// Stops a job running in this process; its inner future is dropped, and its place under
    /// the quotas is given back at once. `false` if it is not running here.
    pub(crate) fn cancel_local(&self, id: &JobId) -> bool {
        match self.running.get(id) {
            Some(job) => {
                job.release();
                job.cancel.cancel();
                true
            }
            None => false,
        }
    }

    /// The jobs running here that the store knows as running here.
    pub(crate) fn started_jobs(&self) -> Vec<Arc<JobShared>> {
        self.running
            .iter()
            .filter(|job| job.is_started())
            .map(|job| job.clone())
            .collect()
    }

    pub(crate) fn is_shutting_down(&self) -> bool {
        self.shutting_down.load(Ordering::Acquire)
    }

    pub(crate) fn running_count(&self) -> usize {
        self.running.len()
    }

    /// Refuses new jobs from now on.
    pub(crate) fn begin_shutdown(&self) {
        self.shutting_down.store(true, Ordering::Release);
    }

    /// Stops every running job; each then records itself as failed. Returns how many there were.
    pub(crate) fn stop_all(&self) -> usize {
        let running = self.running.len();
        self.stop_all.cancel();
        running
    }

    /// Whether running jobs are being stopped by shutdown (rather than by their callers).
    pub(crate) fn is_stopping(&self) -> bool {
        self.stop_all.is_cancelled()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // CANCEL-2, CANCEL-3: a registered job is found and stopped; an unknown one is not; after
    // shutdown begins, nothing registers.
    #[test]
    fn registered_jobs_are_stopped_and_shutdown_refuses_new_ones() {
        let registry = Registry::default();
        let id = JobId::new();
        let job = registry.register(id).expect("registered before shutdown");
        assert_eq!(registry.running_count(), 1);
        assert!(registry.cancel_local(&id), "a running job is stopped");
        assert!(job.cancel.is_cancelled());
        assert!(
            !registry.cancel_local(&JobId::new()),
            "an unknown job is not"
        );
        registry.unregister(&id);
        assert_eq!(registry.running_count(), 0);

        registry.begin_shutdown();
        assert!(registry.register(JobId::new()).is_none());
        assert_eq!(registry.running_count(), 0, "a refused job leaves no entry");
    }

    // STATUS-3: a long poll of a job elsewhere is woken by its announcement, and its entry goes
    // when nobody waits for it any more.
    #[test]
    fn remote_polls_are_woken_and_forgotten() {
        let registry = Registry::default();
        let id = JobId::new();
        let mut waiting = registry.remote_changes(&id);
        registry.notify_remote(&JobId::new());
        assert!(!waiting.has_changed().unwrap(), "another job's news");
        registry.notify_remote(&id);
        assert!(waiting.has_changed().unwrap(), "this job's news wakes it");
        waiting.mark_unchanged();
        registry.forget_remote(&id);
        registry.notify_remote(&id);
        assert!(waiting.has_changed().unwrap(), "kept while a poll waits");
        drop(waiting);
        registry.forget_remote(&id);
        assert!(registry.remote.is_empty(), "forgotten when nobody waits");
    }

    // [DESIGN] stop_all stops every job registered before it, through their parent token.
    #[test]
    fn stop_all_stops_every_job() {
        let registry = Registry::default();
        let jobs: Vec<_> = (0..3)
            .map(|_| registry.register(JobId::new()).unwrap())
            .collect();
        assert!(!registry.is_stopping());
        assert_eq!(registry.stop_all(), 3);
        assert!(registry.is_stopping());
        assert!(jobs.iter().all(|job| job.cancel.is_cancelled()));
    }
}
