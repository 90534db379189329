//! [`JobContext`]: what a cooperating inner service can see of the job it is running in.

use std::fmt;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU16, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::admission::Admission;
use crate::job::JobId;

/// The `X-Progress` header a job's progress is shown in (STATUS-4), and read from an upstream
/// that runs the job itself.
pub(crate) const X_PROGRESS: http::HeaderName = http::HeaderName::from_static("x-progress");

/// The longest `X-Progress` text sent, in characters (STATUS-4: under 100).
const MAX_PROGRESS_CHARS: usize = 99;

/// The progress of a job waiting for a place to run (`max_concurrent_jobs`).
pub(crate) const QUEUED: &str = "queued";

/// The progress of a job that waited and now runs, until its handler reports its own.
pub(crate) const RUNNING: &str = "running";

/// Inserted into the extensions of every request a job replays to the inner service.
///
/// A handler that finds it can report progress, which pollers see as `X-Progress`, and watch for
/// cancellation to stop early. Handlers that ignore it still work: a cancelled job's inner future
/// is dropped either way.
///
/// ```
/// use axum::{Extension, Json};
/// use tower_fhir_async::JobContext;
///
/// async fn reindex(job: Option<Extension<JobContext>>) -> Json<serde_json::Value> {
///     for step in 0..10u8 {
///         if let Some(Extension(job)) = &job {
///             if job.is_cancelled() {
///                 break;
///             }
///             job.set_percent(step * 10);
///         }
///         // ... one step of work ...
///     }
///     Json(serde_json::json!({"resourceType": "Parameters"}))
/// }
/// # let _ = axum::Router::<()>::new().route("/$reindex", axum::routing::post(reindex));
/// ```
#[derive(Clone)]
pub struct JobContext {
    shared: Arc<JobShared>,
}

/// State shared between a running job, its context and the layer's registry.
pub(crate) struct JobShared {
    pub(crate) id: JobId,
    /// Cancelled by the job's caller (DELETE), or with every other job at shutdown.
    pub(crate) cancel: CancellationToken,
    progress: Mutex<Option<Box<str>>>,
    /// The job's place under the quotas, given back as soon as the job ends or is cancelled.
    admission: Mutex<Option<Admission>>,
    /// Set once the store has it running here: only then are its leases renewed.
    started: AtomicBool,
    /// Set while it waits for a place to run (`max_concurrent_jobs`).
    queued: AtomicBool,
    /// Set when progress changed since it was last written to the store.
    progress_changed: AtomicBool,
    /// The status of the inner service's first response, once its head arrived (0 before).
    head: AtomicU16,
    /// Counts changes a poller can see (progress, the end of the job), for long polls.
    changes: watch::Sender<u64>,
}

impl JobShared {
    pub(crate) fn new(id: JobId, cancel: CancellationToken) -> Arc<Self> {
        Arc::new(Self {
            id,
            cancel,
            progress: Mutex::new(None),
            admission: Mutex::new(None),
            started: AtomicBool::new(false),
            queued: AtomicBool::new(false),
            progress_changed: AtomicBool::new(false),
            head: AtomicU16::new(0),
            changes: watch::Sender::new(0),
        })
    }

    /// Keeps the job's place under the quotas until [`release`](Self::release).
    pub(crate) fn hold(&self, admission: Admission) {
        if let Ok(mut held) = self.admission.lock() {
            *held = Some(admission);
        }
    }

    /// Gives the job's place back (idempotent).
    pub(crate) fn release(&self) {
        let admission = self.admission.lock().ok().and_then(|mut held| held.take());
        drop(admission);
    }

    /// Wakes long polls: the job has ended (its outcome is recorded, or it was dropped).
    pub(crate) fn mark_changed(&self) {
        self.changes.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// A receiver that sees every later change of progress or state.
    pub(crate) fn changes(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }

    /// Records the status of the inner service's first response head, and wakes whoever waits
    /// for it (a kick-off deciding between its own answer and `202`).
    pub(crate) fn set_head(&self, status: http::StatusCode) {
        if self.head.swap(status.as_u16(), Ordering::AcqRel) == 0 {
            self.mark_changed();
        }
    }

    /// The status of the inner service's first response head, once it arrived.
    pub(crate) fn head(&self) -> Option<http::StatusCode> {
        http::StatusCode::from_u16(self.head.load(Ordering::Acquire)).ok()
    }

    pub(crate) fn mark_started(&self) {
        self.started.store(true, Ordering::Release);
    }

    pub(crate) fn is_started(&self) -> bool {
        self.started.load(Ordering::Acquire)
    }

    /// The job waits for a place to run: pollers see `X-Progress: queued`, and a bulk kick-off
    /// waiting for the inner service's first answer answers `202` at once.
    pub(crate) fn mark_queued(&self) {
        self.queued.store(true, Ordering::Release);
        // Wakes whoever waits on the job's changes (the progress is new).
        self.set_progress(QUEUED);
    }

    /// The job left the queue and runs.
    pub(crate) fn mark_dequeued(&self) {
        self.queued.store(false, Ordering::Release);
        self.set_progress(RUNNING);
    }

    pub(crate) fn is_queued(&self) -> bool {
        self.queued.load(Ordering::Acquire)
    }

    /// The progress, if it changed since the last call.
    pub(crate) fn take_changed_progress(&self) -> Option<Box<str>> {
        if self.progress_changed.swap(false, Ordering::AcqRel) {
            self.progress()
        } else {
            None
        }
    }

    /// Marks the progress as not yet written to the store, after a failed write.
    pub(crate) fn progress_unshared(&self) {
        self.progress_changed.store(true, Ordering::Release);
    }

    /// Sets the progress text, kept to printable ASCII under 100 characters (STATUS-4).
    pub(crate) fn set_progress(&self, text: &str) {
        let clean: Box<str> = text
            .chars()
            .take(MAX_PROGRESS_CHARS)
            .map(|c| {
                if c.is_ascii_graphic() || c == ' ' {
                    c
                } else {
                    '?'
                }
            })
            .collect();
        let changed = match self.progress.lock() {
            Ok(mut progress) if progress.as_deref() != Some(&*clean) => {
                *progress = Some(clean);
                self.progress_changed.store(true, Ordering::Release);
                true
            }
            _ => false,
        };
        if changed {
            self.mark_changed();
        }
    }

    pub(crate) fn progress(&self) -> Option<Box<str>> {
        self.progress.lock().map_or(None, |p| p.clone())
    }
}

impl JobContext {
    pub(crate) fn new(shared: Arc<JobShared>) -> Self {
        Self { shared }
    }

    /// The job's id.
    pub fn id(&self) -> JobId {
        self.shared.id
    }

    /// Reports progress as free text, sent as `X-Progress` on status polls. Kept to printable
    /// ASCII and under 100 characters (STATUS-4); other characters become `?`.
    pub fn set_progress(&self, text: impl AsRef<str>) {
        self.shared.set_progress(text.as_ref());
    }

    /// Reports progress as a percentage, sent as `X-Progress: 42% complete` (clamped to 100).
    pub fn set_percent(&self, percent: u8) {
        self.set_progress(format!("{}% complete", percent.min(100)));
    }

    /// Whether the job has been cancelled (by its caller, or by shutdown).
    pub fn is_cancelled(&self) -> bool {
        self.shared.cancel.is_cancelled()
    }

    /// Resolves when the job is cancelled.
    pub fn cancelled(&self) -> impl Future<Output = ()> + Send + 'static {
        self.shared.cancel.clone().cancelled_owned()
    }
}

impl fmt::Debug for JobContext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JobContext")
            .field("id", &self.shared.id)
            .field("cancelled", &self.is_cancelled())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // STATUS-4: progress text is printable ASCII under 100 characters.
    #[test]
    fn status_4_progress_is_short_ascii() {
        let ctx = JobContext::new(JobShared::new(JobId::new(), CancellationToken::new()));
        ctx.set_progress(format!("ünï\r\n{}", "x".repeat(500)));
        let progress = ctx.shared.progress().unwrap();
        assert_eq!(progress.chars().count(), 99);
        assert!(progress.starts_with("?n??"));
        assert!(
            progress
                .bytes()
                .all(|b| b.is_ascii_graphic() || b == b' ' || b == b'?')
        );
        ctx.set_percent(250);
        assert_eq!(&*ctx.shared.progress().unwrap(), "100% complete");
    }

    #[tokio::test]
    async fn cancellation_is_visible() {
        let shared = JobShared::new(JobId::new(), CancellationToken::new());
        let ctx = JobContext::new(shared.clone());
        assert!(!ctx.is_cancelled());
        let waiter = tokio::spawn(ctx.cancelled());
        shared.cancel.cancel();
        waiter.await.unwrap();
        assert!(ctx.is_cancelled());
    }
}
