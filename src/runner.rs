//! Running jobs: executing the inner call in the background, recording its outcome, and
//! draining on shutdown. The table of running jobs is the [`Registry`].

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::Bytes;
use futures_util::FutureExt;
use futures_util::future::Either;
use http::{HeaderName, Request, Response, StatusCode, header};
use http_body::Body;
use http_body_util::{BodyExt, LengthLimitError, Limited};
use std::future::Future;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, oneshot};
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::BoxError;
use crate::admission::Admission;
use crate::body::RequestBody;
use crate::bulk::{self, export::ExportSpec};
use crate::clock::{Clock, later};
use crate::config::Config;
use crate::context::JobShared;
use crate::encoding;
use crate::follow;
use crate::inner::{self, Inner};
use crate::job::{JobId, JobOutcome, JobRecord, JobState, StoredResponse};
use crate::meters;
use crate::origins::Origins;
use crate::outcome::{IssueCode, synthesized};
use crate::registry::Registry;
use crate::store::{Created, DynStore, StoreError};

/// Inner response headers worth keeping with a result; the rest are hop-by-hop, recomputed,
/// or (like `Set-Cookie`) must not be stored.
const KEPT_HEADERS: [HeaderName; 8] = [
    header::CONTENT_TYPE,
    header::CONTENT_LANGUAGE,
    header::CONTENT_LOCATION,
    header::LOCATION,
    header::ETAG,
    header::LAST_MODIFIED,
    header::LINK,
    header::WARNING,
];

/// How often taking back a refused kick-off's record is tried: with the delay doubling from
/// 50 ms to at most 500 ms, for about two minutes, so a store that comes back is cleaned at once.
const ABANDON_ATTEMPTS: u32 = 240;

/// How often recording a finished job is tried before its outcome is given up: with the delay
/// doubling from 100 ms (capped at 10 s), about a minute, enough to ride out a store restart.
const RECORD_ATTEMPTS: u32 = 12;

pub(crate) struct Runner {
    pub(crate) config: Arc<Config>,
    pub(crate) store: Arc<dyn DynStore>,
    pub(crate) clock: Clock,
    pub(crate) instance: Box<str>,
    pub(crate) lease: Duration,
    /// The jobs running here, and long polls of jobs running elsewhere.
    pub(crate) registry: Registry,
    tracker: TaskTracker,
    watcher: AtomicBool,
    /// Places to run: at most `max_concurrent_jobs` jobs execute at once; the rest wait for a
    /// place in the order they were accepted (the semaphore is fair).
    slots: Arc<Semaphore>,
}

impl Runner {
    pub(crate) fn new(
        config: Arc<Config>,
        store: Arc<dyn DynStore>,
        clock: Clock,
        instance: String,
        lease: Duration,
        max_concurrent_jobs: usize,
    ) -> Self {
        Self {
            config,
            store,
            clock,
            instance: instance.into_boxed_str(),
            lease,
            registry: Registry::default(),
            tracker: TaskTracker::new(),
            watcher: AtomicBool::new(false),
            slots: Arc::new(Semaphore::new(max_concurrent_jobs)),
        }
    }

    /// `true` for the one caller that should start the watcher.
    pub(crate) fn claim_watcher(&self) -> bool {
        // A plain load first: after the first call, polls only read this flag.
        !self.watcher.load(Ordering::Acquire) && !self.watcher.swap(true, Ordering::AcqRel)
    }

    /// Refuses new jobs from now on.
    pub(crate) fn begin_shutdown(&self) {
        self.registry.begin_shutdown();
        self.tracker.close();
    }

    /// Waits until every spawned job has ended.
    pub(crate) async fn wait_idle(&self) {
        self.tracker.wait().await;
    }
}

/// What a job does with the inner service's answer.
pub(crate) enum Work {
    /// Keeps it, for a `batch-response` Bundle.
    Interaction,
    /// Exports it into bulk data files.
    Bulk(ExportSpec),
}

/// What a kick-off hands the runner besides the request: the record to create, the work to do,
/// the idempotency key it is created under, and its place under the quotas.
pub(crate) struct NewJob {
    pub(crate) record: JobRecord,
    pub(crate) work: Work,
    pub(crate) once: Option<String>,
    pub(crate) admission: Admission,
}

/// Spawns a registered job: the task records it, reports the store's answer on `recorded`, and
/// runs it only if recording succeeded. Recording inside the task means a kick-off that is dropped
/// (the client went away) can never leave a recorded job that nobody runs.
pub(crate) fn spawn<S, ReqB>(
    runner: Arc<Runner>,
    job: Arc<JobShared>,
    new: NewJob,
    recorded: oneshot::Sender<Result<Created, StoreError>>,
    inner: S,
    request: Request<RequestBody<ReqB>>,
) where
    S: Inner<ReqB>,
    ReqB: Send + 'static,
{
    let NewJob {
        mut record,
        work,
        once,
        admission,
    } = new;
    // One store write accepts and starts the job: it is created running here, under this
    // instance's lease (renewed while it waits in the queue and while it runs). Not so with an
    // Idempotency-Key: a repeat of a kick-off that was refused (its record landing late) must
    // not be given that record before the record is taken back, and only a job started after
    // its `202` tells the two apart (see `kickoff`).
    let created_running = once.is_none();
    if created_running {
        record.state = JobState::Running {
            instance: runner.instance.to_string(),
            lease_until: later(runner.clock.now(), runner.lease),
        };
    }
    // The path only: queries can carry patient data, and logs are no place for it.
    let path = record.target.split('?').next().unwrap_or_default();
    let span = tracing::info_span!("fhir_async_job", job.id = %job.id, http.method = %record.method, http.path = %path);
    let tracker = runner.tracker.clone();
    let task = async move {
        // However the task ends (even by a panic), the job leaves the registry.
        job.hold(admission);
        let _registered = Registered {
            runner: runner.clone(),
            job: job.clone(),
        };
        let store = &runner.store;
        let created = match &once {
            // Idempotent kick-off: a repeat of a live job names that job instead.
            Some(key) => store.create_once(record, key, runner.clock.now()).await,
            None => store.create(record).await.map(|()| Created::New),
        };
        let created = match created {
            Ok(created) => created,
            Err(error @ StoreError::Unavailable(_)) => {
                tracing::warn!(%error, "recording a new job failed; the kick-off is refused and the job taken back");
                let _ = recorded.send(Err(error));
                // The write may still land (a stalled store answers later): take it back, so
                // that a kick-off answered with an error leaves no job behind.
                abandon(&runner, &job.id).await;
                return;
            }
            // Refused by the store itself (a cap, a taken id): nothing was written.
            Err(error) => {
                tracing::debug!(%error, "the store refused a new job");
                let _ = recorded.send(Err(error));
                return;
            }
        };
        if let Created::Existing(existing) = created {
            tracing::info!(%existing, "repeated kick-off (same Idempotency-Key); not run again");
            let _ = recorded.send(Ok(created));
            return;
        }
        if recorded.send(Ok(Created::New)).is_err() {
            // The kick-off was dropped before it could answer (the client went away, or a
            // timeout fired): nobody has the status URL, and a retry must not run the work twice.
            abandon(&runner, &job.id).await;
            tracing::info!("kick-off abandoned before its answer; the job was dropped");
            return;
        }
        if created_running {
            job.mark_started();
        }
        tracing::info!("asynchronous job accepted");
        run(runner.clone(), job, inner, request, work).await;
    };
    tracker.spawn(task.instrument(span));
}

/// Removes a job from the registry when its task ends.
struct Registered {
    runner: Arc<Runner>,
    job: Arc<JobShared>,
}

impl Drop for Registered {
    fn drop(&mut self) {
        self.job.release();
        self.runner.registry.unregister(&self.job.id);
        self.job.mark_changed();
    }
}

/// One job, from start to its recorded outcome.
async fn run<S, ReqB>(
    runner: Arc<Runner>,
    job: Arc<JobShared>,
    inner: S,
    request: Request<RequestBody<ReqB>>,
    work: Work,
) where
    S: Inner<ReqB>,
    ReqB: Send + 'static,
{
    let config = &runner.config;
    let id = job.id;
    if !job.is_started() {
        // A job created running (most) started with its creation; others start here.
        match Box::pin(start(&runner, &job)).await {
            Start::Started => job.mark_started(),
            Start::Gone => {
                tracing::info!("asynchronous job cancelled before it started");
                return;
            }
            Start::Unrecorded => {
                // Running it unrecorded would let the watcher of any instance declare it lost while
                // it runs, and a client obeying "start it again" would run the work twice.
                tracing::error!(
                    "the job store did not record the job's start in time; the request was not run"
                );
                let outcome = JobOutcome::Failed(synthesized(
                    StatusCode::SERVICE_UNAVAILABLE,
                    IssueCode::Transient,
                    "The job store was unavailable when this job was to start, so the request was not run. Send it \
                     again.",
                ));
                Box::pin(record(&runner, id, outcome)).await;
                metrics::counter!(meters::FINISHED, "outcome" => "not-started").increment(1);
                return;
            }
        }
    }

    let is_bulk = matches!(work, Work::Bulk(_));
    // Started in the store before it waits, so its lease is renewed while it is queued (a
    // killed instance's queue is failed as lost, not stuck); cancellable while it waits. The
    // work's future is made (boxed) only once there is a place: a queued job holds its request
    // and little else.
    let slot = tokio::select! {
        biased;
        () = job.cancel.cancelled() => None,
        slot = take_slot(&runner, &job) => Some(slot),
    };
    let started = tokio::time::Instant::now();
    let outcome = match slot {
        None => None,
        Some(slot) => {
            let outcome = Box::pin(execute_unless_cancelled(
                &runner, &job, inner, request, work,
            ))
            .await;
            drop(slot);
            outcome
        }
    };
    let outcome = match outcome {
        Some(outcome) => outcome,
        None if runner.registry.is_stopping() => JobOutcome::Failed(synthesized(
            StatusCode::SERVICE_UNAVAILABLE,
            IssueCode::Transient,
            "The server shut down before this job finished; the work was stopped. Start the request again.",
        )),
        None => {
            // The store already dropped the job; dropping `execution` stopped the inner future.
            tracing::info!("asynchronous job cancelled; its work was stopped");
            finished("cancelled", started);
            return;
        }
    };
    let failed = matches!(outcome, JobOutcome::Failed(_));
    // Boxed: recording (with its retries) happens once, at the end; running jobs need not carry it.
    let recorded = Box::pin(record(&runner, id, outcome)).await;
    finished(
        match (recorded, failed) {
            (false, _) => "lost",
            (true, false) => "completed",
            (true, true) => "failed",
        },
        started,
    );
    if !recorded && is_bulk {
        // Cancelled meanwhile, or the outcome is lost: its files must not outlive it.
        bulk::files::remove_job(&config.bulk, &id).await;
    }
}

/// The job's work, under `max_run_time`; `None` when it was cancelled (or stopped by shutdown)
/// first, which drops the inner future.
async fn execute_unless_cancelled<S, ReqB>(
    runner: &Runner,
    job: &JobShared,
    inner: S,
    request: Request<RequestBody<ReqB>>,
    work: Work,
) -> Option<JobOutcome>
where
    S: Inner<ReqB>,
    ReqB: Send + 'static,
{
    let config = &runner.config;
    let execution = match work {
        Work::Interaction => Either::Left(execute(config, job, inner, request)),
        // Boxed: an export's state is large, and an interaction job should not carry its size.
        Work::Bulk(spec) => Either::Right(Box::pin(bulk::export::execute(
            config,
            runner.clock,
            job,
            spec,
            inner,
            request,
        ))),
    };
    tokio::select! {
        biased;
        () = job.cancel.cancelled() => None,
        outcome = guarded(execution, config.max_run_time) => Some(outcome),
    }
}

/// A place to run: at once when one is free, else after the jobs accepted before it (the job
/// shows `queued` meanwhile).
async fn take_slot(runner: &Runner, job: &JobShared) -> Option<OwnedSemaphorePermit> {
    if let Ok(slot) = runner.slots.clone().try_acquire_owned() {
        return Some(slot);
    }
    job.mark_queued();
    metrics::gauge!(meters::QUEUED).increment(1.0);
    // Decremented however the wait ends (the job may be cancelled while it waits).
    let _queued = scopeguard(|| metrics::gauge!(meters::QUEUED).decrement(1.0));
    // The semaphore is never closed.
    let slot = runner.slots.clone().acquire_owned().await.ok();
    job.mark_dequeued();
    slot
}

/// Runs `f` when dropped.
fn scopeguard(f: impl FnOnce()) -> impl Drop {
    struct Guard<F: FnOnce()>(Option<F>);
    impl<F: FnOnce()> Drop for Guard<F> {
        fn drop(&mut self) {
            if let Some(f) = self.0.take() {
                f();
            }
        }
    }
    Guard(Some(f))
}

/// How recording a job's start ended.
enum Start {
    /// The store has it running here, under a lease: run it.
    Started,
    /// Cancelled (or taken by another instance) before it started: do not run it.
    Gone,
    /// The store did not answer in time: do not run it.
    Unrecorded,
}

/// Records `Accepted → Running` here, trying again while the store is unavailable, for at most
/// half a lease from now: past the lease, other instances would take an unstarted job for one
/// whose instance died, and fail it.
async fn start(runner: &Runner, job: &JobShared) -> Start {
    let give_up = tokio::time::Instant::now() + runner.lease / 2;
    let mut delay = Duration::from_millis(50);
    let mut failed_before = false;
    loop {
        let lease_until = later(runner.clock.now(), runner.lease);
        match runner
            .store
            .start(&job.id, &runner.instance, lease_until)
            .await
        {
            Ok(true) => return Start::Started,
            // An earlier attempt may have landed after all: then the job runs here already.
            Ok(false) if failed_before => {
                return match runner.store.get(&job.id, runner.clock.now()).await {
                    Ok(Some(JobRecord {
                        state: JobState::Running { instance, .. },
                        ..
                    })) if *instance == *runner.instance => Start::Started,
                    Ok(_) => Start::Gone,
                    Err(_) => Start::Unrecorded,
                };
            }
            Ok(false) => return Start::Gone,
            Err(error) => {
                failed_before = true;
                if tokio::time::Instant::now() + delay >= give_up {
                    tracing::warn!(%error, "recording the job's start failed; giving up");
                    return Start::Unrecorded;
                }
                tracing::warn!(%error, "recording the job's start failed; trying again");
                tokio::select! {
                    () = job.cancel.cancelled() => return Start::Gone,
                    () = tokio::time::sleep(delay) => {}
                }
                delay = (delay * 2).min(Duration::from_secs(1));
            }
        }
    }
}

/// Takes back a job whose kick-off was not answered `202`, trying again while the store is
/// unavailable (see [`JobStore::abandon`](crate::store::JobStore::abandon)).
async fn abandon(runner: &Runner, id: &JobId) {
    // The marker must outlive any write still in flight; a day (or the retention) is ample.
    let keep = runner.config.retention.max(Duration::from_secs(3600));
    // Short delays: the record may be visible (and its idempotency key taken) until this lands,
    // so it should land as soon as the store answers again.
    let mut delay = Duration::from_millis(50);
    for attempt in 1..=ABANDON_ATTEMPTS {
        let now = runner.clock.now();
        match runner.store.abandon(id, now, later(now, keep)).await {
            Ok(()) => {
                tracing::info!(attempt, "the refused kick-off's job was taken back");
                return;
            }
            Err(error) if attempt < ABANDON_ATTEMPTS => {
                tracing::warn!(%error, attempt, "taking back a refused kick-off's job failed; trying again");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_millis(500));
            }
            Err(error) => {
                // Left to the watchers: an unstarted job is failed once a lease has passed.
                tracing::error!(%error, "taking back a refused kick-off's job failed; it is left to lapse");
                metrics::counter!(meters::FINISHED, "outcome" => "orphaned").increment(1);
            }
        }
    }
}

/// Counts a job's end and its duration.
fn finished(outcome: &'static str, started: tokio::time::Instant) {
    metrics::counter!(meters::FINISHED, "outcome" => outcome).increment(1);
    metrics::histogram!(meters::DURATION, "outcome" => outcome).record(started.elapsed());
}

/// Calls the inner service and keeps its response; every failure becomes a [`JobOutcome`]. An
/// answer the inner service runs asynchronously itself is followed to its end (GATEWAY-5).
async fn execute<S, ReqB>(
    config: &Config,
    job: &JobShared,
    mut inner: S,
    request: Request<RequestBody<ReqB>>,
) -> JobOutcome
where
    S: Inner<ReqB>,
    ReqB: Send + 'static,
{
    let result_limit = config.result_limit;
    let public_base = config
        .public_base(request.uri(), request.headers())
        .unwrap_or_default();
    let (headers, extensions) = (request.headers().clone(), request.extensions().clone());
    let result = async move {
        let response = inner::call(&mut inner, request)
            .await
            .map_err(Failure::Service)?;
        let origins = Origins::new(config, &public_base);
        let native = match follow::Native::of(&response, &headers, &extensions, &origins) {
            None => None,
            Some(Ok(native)) => Some(native),
            Some(Err(why)) => return Err(Failure::Service(BoxError::from(why))),
        };
        let Some(native) = native else {
            job.set_head(response.status());
            return keep(response, result_limit).await;
        };
        drop(response);
        let cancel = native.cancel_on_drop(inner.clone());
        let last = native
            .poll(&mut inner, job)
            .await
            .map_err(Failure::Service)?;
        cancel.disarm();
        job.set_head(last.status());
        keep(last, result_limit).await.map(follow::adopt)
    }
    .await;
    match result {
        Ok(stored) => JobOutcome::Completed(stored),
        Err(failure) => JobOutcome::Failed(failure.into_response(result_limit)),
    }
}

/// A job's work under its time limit, with a panic in the inner service caught.
async fn guarded(
    work: impl Future<Output = JobOutcome>,
    max_run_time: Option<Duration>,
) -> JobOutcome {
    let work = AssertUnwindSafe(work).catch_unwind();
    let result = match max_run_time {
        Some(limit) => match tokio::time::timeout(limit, work).await {
            Ok(result) => result,
            Err(_) => {
                let why = format!(
                    "The request did not finish within the limit of {}; it was stopped.",
                    humantime::format_duration(limit)
                );
                return JobOutcome::Failed(synthesized(
                    StatusCode::GATEWAY_TIMEOUT,
                    IssueCode::Timeout,
                    &why,
                ));
            }
        },
        None => work.await,
    };
    result.unwrap_or_else(|_panic| {
        tracing::error!("the inner service panicked while running an asynchronous job");
        JobOutcome::Failed(synthesized(
            StatusCode::INTERNAL_SERVER_ERROR,
            IssueCode::Exception,
            "The server failed while processing the request (it panicked); the request may or may not have taken effect.",
        ))
    })
}

enum Failure {
    Service(BoxError),
    Body(BoxError),
    TooLarge,
}

impl Failure {
    fn into_response(self, limit: usize) -> StoredResponse {
        match self {
            Self::Service(error) => synthesized(
                StatusCode::BAD_GATEWAY,
                IssueCode::Exception,
                &format!("The FHIR server could not process the request: {error}"),
            ),
            Self::Body(error) => synthesized(
                StatusCode::BAD_GATEWAY,
                IssueCode::Exception,
                &format!("Reading the FHIR server's response failed: {error}"),
            ),
            Self::TooLarge => synthesized(
                StatusCode::INTERNAL_SERVER_ERROR,
                IssueCode::TooCostly,
                &format!(
                    "The result was larger than this server keeps for asynchronous requests ({limit} bytes) and was \
                     discarded. Narrow the request (e.g. with _count or _elements) or use the bulk pattern."
                ),
            ),
        }
    }
}

/// Buffers the inner response under the result limit, keeping the headers that matter.
async fn keep<B>(response: Response<B>, limit: usize) -> Result<StoredResponse, Failure>
where
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    let (mut parts, body) = response.into_parts();
    if body.size_hint().lower() > limit as u64 {
        return Err(Failure::TooLarge);
    }
    // GATEWAY-4: the limit applies to the decoded bytes.
    let body = match encoding::decoded(&mut parts.headers, body) {
        Ok(body) => body,
        Err(why) => return Err(Failure::Body(BoxError::from(why))),
    };
    let body = match Limited::new(body, limit).collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(error) if error.is::<LengthLimitError>() => return Err(Failure::TooLarge),
        Err(error) => return Err(Failure::Body(error)),
    };
    let headers = parts
        .headers
        .iter()
        .filter(|(name, _)| KEPT_HEADERS.contains(name))
        .map(|(name, value)| (name.clone(), value.clone()))
        .collect();
    Ok(StoredResponse {
        status: parts.status,
        headers,
        body,
    })
}

/// Whether the job's record holds `outcome` already: an earlier attempt that seemed to fail
/// (the store applied it, then its answer was lost to a timeout or a dropped connection)
/// recorded it after all, so the refusal of a later attempt is no refusal.
async fn landed_earlier(runner: &Runner, id: &JobId, outcome: &JobOutcome) -> bool {
    let Ok(Some(record)) = runner.store.get(id, runner.clock.now()).await else {
        return false;
    };
    match (&record.state, outcome) {
        (JobState::Completed(kept), JobOutcome::Completed(ours))
        | (JobState::Failed(kept), JobOutcome::Failed(ours)) => kept == ours,
        _ => false,
    }
}

/// Says why the store refused a job's result: cancelled (expected), or fenced, because another
/// instance took the job for lost and failed it (a defect to look into: logged at error level
/// and counted).
async fn refused(runner: &Runner, id: &JobId) {
    match runner.store.get(id, runner.clock.now()).await {
        Ok(Some(record)) if record.state.is_finished() => {
            tracing::error!(
                "the job store refused this job's result: the job had already been recorded as failed (its lease \
                 lapsed, and an instance took it for lost); the result was discarded"
            );
            metrics::counter!(meters::REFUSED).increment(1);
        }
        _ => tracing::info!(
            "asynchronous job finished after it was cancelled; its result was dropped"
        ),
    }
}

/// When a result says what it stands for stops existing (`Expires`: a linked export's files
/// live as long as the upstream keeps them, EXPIRE-2), it is kept no longer. Interaction
/// results never keep an `Expires` (see [`KEPT_HEADERS`]).
fn expiry_bound(outcome: &JobOutcome) -> Option<std::time::SystemTime> {
    let JobOutcome::Completed(result) = outcome else {
        return None;
    };
    let value = result.header(&header::EXPIRES)?.to_str().ok()?;
    httpdate::parse_http_date(value).ok()
}

/// Records a job's outcome, trying again a few times while the store is unavailable; `false`
/// when it was not recorded (cancelled meanwhile, or the store kept failing).
async fn record(runner: &Runner, id: JobId, outcome: JobOutcome) -> bool {
    let status = match &outcome {
        JobOutcome::Completed(r) | JobOutcome::Failed(r) => r.status.as_u16(),
    };
    let mut delay = Duration::from_millis(100);
    let bound = expiry_bound(&outcome);
    for attempt in 1..=RECORD_ATTEMPTS {
        let now = runner.clock.now();
        let expires_at = later(now, runner.config.retention);
        let expires_at = bound.map_or(expires_at, |bound| bound.min(expires_at));
        match runner
            .store
            .finish(&id, outcome.clone(), now, expires_at)
            .await
        {
            Ok(true) => {
                tracing::info!(
                    status,
                    failed = matches!(outcome, JobOutcome::Failed(_)),
                    "asynchronous job finished"
                );
                return true;
            }
            Ok(false) if attempt > 1 && landed_earlier(runner, &id, &outcome).await => {
                tracing::info!(
                    status,
                    failed = matches!(outcome, JobOutcome::Failed(_)),
                    "asynchronous job finished (recorded by an attempt whose answer was lost)"
                );
                return true;
            }
            Ok(false) => {
                refused(runner, &id).await;
                return false;
            }
            Err(StoreError::Unavailable(error)) if attempt < RECORD_ATTEMPTS => {
                tracing::warn!(%error, attempt, "recording the job's outcome failed; trying again");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(10));
            }
            Err(error) => {
                tracing::error!(%error, "recording the job's outcome failed; the result is lost");
                return false;
            }
        }
    }
    false
}
