//! The watcher: one background task per layer that keeps this instance's jobs and the store in
//! step, for stores shared by several instances.
//!
//! - Renews the leases of the jobs running here, and stops those the store says are no longer
//!   running here (cancelled through another instance, or failed as lost) — the backstop for
//!   missed cancel notifications.
//! - Stops jobs at once when the store pushes their cancellation, and wakes long polls held
//!   here when it pushes a change of a job running elsewhere.
//! - Fails jobs whose instance is gone (lease lapsed, or recorded and never started), so no
//!   poller waits forever.
//! - Writes running jobs' progress to the store, so polls through any instance see it.

use std::sync::{Arc, Weak};
use std::time::Duration;

use futures_util::StreamExt;
use http::StatusCode;
use tokio::time::{Instant, MissedTickBehavior};

use crate::clock::later;
use crate::job::JobOutcome;
use crate::outcome::IssueCode;
use crate::outcome::synthesized;
use crate::state::Shared;
use crate::store::{Change, Changes, StoreError};

/// Starts the watcher of `shared` unless it runs already. Needs a tokio runtime.
pub(crate) fn ensure(shared: &Arc<Shared>) {
    if shared.runner.claim_watcher() {
        tokio::spawn(run(Arc::downgrade(shared)));
    }
}

/// Runs until the layer is dropped.
async fn run(shared: Weak<Shared>) {
    let Some((store, every)) = shared
        .upgrade()
        .map(|s| (s.runner.store.clone(), s.runner.lease / 3))
    else {
        return;
    };
    let mut ticks = tokio::time::interval(every.max(Duration::from_millis(100)));
    ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut progress_ticks = tokio::time::interval(PROGRESS_EVERY);
    progress_ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
    // One feed: cancels stop jobs running here at once, every change wakes the long polls held
    // here for jobs running elsewhere.
    let mut changes = Feed::new();
    loop {
        if changes.due() {
            match changes.subscribe(store.changes().await, every) {
                Some(Ok(())) => {
                    if let Some(shared) = shared.upgrade() {
                        shared.runner.registry.set_change_push(true);
                    }
                }
                Some(Err(error)) => tracing::warn!(
                    %error,
                    "subscribing to job changes failed; relying on lease checks and store reads"
                ),
                None => {}
            }
        }
        tokio::select! {
            change = changes.next() => {
                let Some(shared) = shared.upgrade() else { return };
                match change {
                    Some(Change::Cancelled(id)) => {
                        if shared.runner.registry.cancel_local(&id) {
                            tracing::info!(job.id = %id, "asynchronous job cancelled through another instance; its work was stopped");
                        }
                        shared.runner.registry.notify_remote(&id);
                    }
                    Some(change) => shared.runner.registry.notify_remote(&change.id()),
                    None => {
                        shared.runner.registry.set_change_push(false);
                        changes.lost(every);
                    }
                }
            }
            _ = ticks.tick() => {
                let Some(shared) = shared.upgrade() else { return };
                check(&shared).await;
            }
            _ = progress_ticks.tick() => {
                let Some(shared) = shared.upgrade() else { return };
                share_progress(&shared).await;
            }
        }
    }
}

/// The store's change feed, asked for again when it ends.
struct Feed {
    stream: Option<Changes>,
    /// When to ask the store again; `None`: it has no such stream.
    retry_at: Option<Instant>,
}

impl Feed {
    fn new() -> Self {
        Self {
            stream: None,
            retry_at: Some(Instant::now()),
        }
    }

    /// Whether the store should be asked for the stream now.
    fn due(&self) -> bool {
        self.stream.is_none() && self.retry_at.is_some_and(|at| at <= Instant::now())
    }

    /// Takes the store's answer: `Some(Ok)` for a new stream, `Some(Err)` for a failure (asked
    /// again after `every`), `None` when the store has no such stream.
    fn subscribe(
        &mut self,
        answer: Result<Option<Changes>, StoreError>,
        every: Duration,
    ) -> Option<Result<(), StoreError>> {
        match answer {
            Ok(Some(stream)) => {
                self.stream = Some(stream);
                Some(Ok(()))
            }
            Ok(None) => {
                self.retry_at = None;
                None
            }
            Err(error) => {
                self.retry_at = Some(Instant::now() + every);
                Some(Err(error))
            }
        }
    }

    /// The next change; never, without a stream; `None` when the stream ended.
    async fn next(&mut self) -> Option<Change> {
        match self.stream.as_mut() {
            Some(stream) => stream.next().await,
            None => std::future::pending().await,
        }
    }

    /// The stream ended (its connection dropped): ask again after `every`.
    fn lost(&mut self, every: Duration) {
        self.stream = None;
        self.retry_at = Some(Instant::now() + every);
    }
}

/// How often the progress of jobs running here is written to the store: each write is
/// announced on the store's change feed, so a poll through another instance is at most about
/// this far behind. Only changed progress is written, the latest text of each job.
const PROGRESS_EVERY: Duration = Duration::from_millis(500);

/// Writes the changed progress of the jobs running here to the store, all at once.
async fn share_progress(shared: &Shared) {
    let runner = &shared.runner;
    let changed: Vec<_> = runner
        .registry
        .started_jobs()
        .into_iter()
        .filter_map(|job| job.take_changed_progress().map(|text| (job, text)))
        .collect();
    let writes = changed.iter().map(|(job, text)| async move {
        if let Err(error) = runner.store.set_progress(&job.id, text).await {
            // Written again at the next round, unless newer progress replaces it.
            job.progress_unshared();
            tracing::debug!(%error, "sharing a job's progress failed");
        }
    });
    futures_util::future::join_all(writes).await;
}

/// One round of lease renewal and lost-job detection.
async fn check(shared: &Shared) {
    let runner = &shared.runner;
    let now = runner.clock.now();
    let started = runner.registry.started_jobs();
    if !started.is_empty() {
        let ids: Vec<_> = started.iter().map(|job| job.id).collect();
        match runner
            .store
            .renew_leases(&runner.instance, &ids, later(now, runner.lease))
            .await
        {
            Ok(gone) => {
                for id in gone {
                    if runner.registry.cancel_local(&id) {
                        tracing::info!(job.id = %id, "asynchronous job no longer running here (cancelled or failed elsewhere); its work was stopped");
                    }
                }
            }
            Err(error) => tracing::warn!(%error, "renewing job leases failed"),
        }
    }
    let unstarted_before = now.checked_sub(runner.lease).unwrap_or(now);
    let lost = JobOutcome::Failed(synthesized(
        StatusCode::SERVICE_UNAVAILABLE,
        IssueCode::Transient,
        "The server instance running this job stopped before the job finished; the request may or may not have \
         taken effect. Start it again.",
    ));
    match runner
        .store
        .fail_lapsed(
            now,
            unstarted_before,
            lost,
            later(now, shared.config.retention),
        )
        .await
    {
        Ok(failed) if !failed.is_empty() => {
            tracing::warn!(
                count = failed.len(),
                "asynchronous jobs of a lost instance recorded as failed"
            );
        }
        Ok(_) => {}
        Err(error) => tracing::warn!(%error, "checking for jobs of lost instances failed"),
    }
}
