//! Graceful shutdown: stop new kick-offs, let running jobs finish, stop the rest.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use crate::state::Shared;

/// Shuts an [`AsyncLayer`](crate::AsyncLayer) down gracefully. Cheap to clone.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// use std::time::Duration;
/// use tower_fhir_async::{AsyncLayer, MemoryStore};
///
/// let layer = AsyncLayer::new(MemoryStore::default());
/// let shutdown = layer.shutdown_handle();
/// // ... serve until a signal arrives, then:
/// let report = shutdown.shutdown(Duration::from_secs(10)).await;
/// assert_eq!(report.stopped, 0);
/// # }
/// ```
#[derive(Clone)]
pub struct ShutdownHandle {
    shared: Arc<Shared>,
}

/// What [`ShutdownHandle::shutdown`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct ShutdownReport {
    /// Jobs that were running when shutdown began and ended within the grace period (finished,
    /// or cancelled by their callers).
    pub finished: usize,
    /// Jobs still running when the grace period ended: stopped and recorded as failed.
    pub stopped: usize,
}

impl ShutdownHandle {
    pub(crate) fn new(shared: Arc<Shared>) -> Self {
        Self { shared }
    }

    /// Refuses new kick-offs from now on (`503` + OperationOutcome + `Retry-After`), waits up to
    /// `grace` for running jobs to end, then stops the rest and records them as failed (`503`,
    /// `transient`), so that their pollers learn the job will not complete.
    ///
    /// Status and cancel requests keep working throughout, so call this while the server still
    /// accepts connections (e.g. inside axum's `with_graceful_shutdown` future). Recording the
    /// stopped jobs waits at most `grace` again (at least 5 s) for the store.
    pub async fn shutdown(&self, grace: Duration) -> ShutdownReport {
        let runner = &self.shared.runner;
        runner.begin_shutdown();
        let running = runner.registry.running_count();
        tracing::info!(
            running,
            grace_secs = grace.as_secs_f64(),
            "asynchronous layer shutting down"
        );
        if tokio::time::timeout(grace, runner.wait_idle())
            .await
            .is_ok()
        {
            return ShutdownReport {
                finished: running,
                stopped: 0,
            };
        }
        // No job registers after `begin_shutdown`, so this counts exactly the ones left.
        let stopped = runner.registry.stop_all();
        let recording = grace.max(Duration::from_secs(5));
        if tokio::time::timeout(recording, runner.wait_idle())
            .await
            .is_err()
        {
            tracing::warn!("stopped jobs could not all record their failure in time");
        }
        tracing::info!(stopped, "asynchronous jobs stopped at shutdown");
        ShutdownReport {
            finished: running.saturating_sub(stopped),
            stopped,
        }
    }

    /// Whether shutdown has begun.
    pub fn is_shutting_down(&self) -> bool {
        self.shared.runner.registry.is_shutting_down()
    }
}

impl fmt::Debug for ShutdownHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ShutdownHandle")
            .field("shutting_down", &self.is_shutting_down())
            .finish()
    }
}
