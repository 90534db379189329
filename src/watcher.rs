//! The watcher: one background task per layer that keeps this instance's jobs and the store in
//! step, for stores shared by several instances.
//!
//! - Renews the leases of the jobs running here, and stops those the store says are no longer
//!   running here (cancelled through another instance, or failed as lost) — the backstop for
//!   missed cancel notifications.
//! - Stops jobs at once when the store pushes their cancellation.
//! - Fails jobs whose instance is gone (lease lapsed, or recorded and never started), so no
//!   poller waits forever.
//! - Writes running jobs' progress to the store, so polls through any instance see it.

use std::sync::{Arc, Weak};
use std::time::Duration;

use futures_util::StreamExt;
use http::StatusCode;
use tokio::time::{Instant, MissedTickBehavior};

use crate::job::JobOutcome;
use crate::layer::Shared;
use crate::outcome::IssueCode;
use crate::runner::{later, synthesized};
use crate::store::{Cancellations, Changes};

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
    let mut pushes: Option<Cancellations> = None;
    // When to ask the store for its cancellation stream again; `None`: it has none.
    let mut subscribe_at = Some(Instant::now());
    let mut changes: Option<Changes> = None;
    // The same for the stream of changed jobs, which wakes long polls.
    let mut changes_at = Some(Instant::now());
    loop {
        if changes.is_none() && changes_at.is_some_and(|at| at <= Instant::now()) {
            match store.changes().await {
                Ok(Some(stream)) => {
                    changes = Some(stream);
                    if let Some(shared) = shared.upgrade() {
                        shared.runner.set_change_push(true);
                    }
                }
                Ok(None) => changes_at = None,
                Err(error) => {
                    tracing::warn!(%error, "subscribing to job changes failed; long polls read the store instead");
                    changes_at = Some(Instant::now() + every);
                }
            }
        }
        if pushes.is_none() && subscribe_at.is_some_and(|at| at <= Instant::now()) {
            match store.cancellations().await {
                Ok(Some(stream)) => pushes = Some(stream),
                Ok(None) => subscribe_at = None,
                Err(error) => {
                    tracing::warn!(%error, "subscribing to cancellations failed; relying on lease checks");
                    subscribe_at = Some(Instant::now() + every);
                }
            }
        }
        let pushed = async {
            match pushes.as_mut() {
                Some(stream) => stream.next().await,
                None => std::future::pending().await,
            }
        };
        let changed = async {
            match changes.as_mut() {
                Some(stream) => stream.next().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            id = changed => {
                let Some(shared) = shared.upgrade() else { return };
                match id {
                    Some(id) => shared.runner.notify_remote(&id),
                    None => {
                        shared.runner.set_change_push(false);
                        changes = None;
                        changes_at = Some(Instant::now() + every);
                    }
                }
            }
            _ = ticks.tick() => {
                let Some(shared) = shared.upgrade() else { return };
                check(&shared).await;
            }
            id = pushed => match id {
                Some(id) => {
                    let Some(shared) = shared.upgrade() else { return };
                    if shared.runner.cancel_local(&id) {
                        tracing::info!(job.id = %id, "asynchronous job cancelled through another instance; its work was stopped");
                    }
                }
                None => {
                    pushes = None;
                    subscribe_at = Some(Instant::now() + every);
                }
            },
        }
    }
}

/// One round of lease renewal, progress sharing and lost-job detection.
async fn check(shared: &Shared) {
    let runner = &shared.runner;
    let now = runner.clock.now();
    let started = runner.started_jobs();
    if !started.is_empty() {
        let ids: Vec<_> = started.iter().map(|job| job.id).collect();
        match runner
            .store
            .renew_leases(&runner.instance, &ids, later(now, runner.lease))
            .await
        {
            Ok(gone) => {
                for id in gone {
                    if runner.cancel_local(&id) {
                        tracing::info!(job.id = %id, "asynchronous job no longer running here (cancelled or failed elsewhere); its work was stopped");
                    }
                }
            }
            Err(error) => tracing::warn!(%error, "renewing job leases failed"),
        }
        for job in &started {
            if let Some(progress) = job.take_changed_progress() {
                if let Err(error) = runner.store.set_progress(&job.id, &progress).await {
                    tracing::debug!(%error, "sharing a job's progress failed");
                }
            }
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
