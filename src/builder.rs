//! [`AsyncLayerBuilder`]: every setting, its default and its check.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use http::{StatusCode, Uri};
#[cfg(feature = "bulk")]
use object_store::ObjectStore;

use crate::admission::Quotas;
use crate::bulk::BulkSettings;
#[cfg(feature = "bulk")]
use crate::bulk::{ManifestFormat, UpstreamFiles};
use crate::caller::{self, CallerKey};
use crate::clock::Clock;
use crate::config::{
    BuildError, BulkWithoutPrefer, CompletionMode, Config, Identify, Predicate, RequestHead,
};
use crate::job::JobId;
use crate::runner::Runner;
use crate::state::Shared;
use crate::store::DynStore;
use crate::throttle::PollThrottle;

/// The longest retention accepted: results are kept in memory or a store, not archived, and
/// `Expires` must stay a valid HTTP date.
const MAX_RETENTION: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

/// How long a running job's lease lasts by default: renewed every third of it, so the jobs of a
/// killed instance are failed within about 1⅓ leases (≈ 13 s).
const LEASE: Duration = Duration::from_secs(10);

/// How long one store operation may take by default before it counts as unavailable. A healthy
/// Redis or PostgreSQL answers in milliseconds even under load (see BENCHMARKS.md); a second is
/// a stall, not load.
const STORE_TIMEOUT: Duration = Duration::from_secs(1);

/// How long a kick-off waits by default for the inner service's answer before its `202`, so
/// that an error the service reports at once (an unknown `_type`, a bad `_since`) is the
/// kick-off's answer (BULK-1, KICK-5). Chosen from the wire bench (BENCHMARKS.md).
const KICKOFF_WAIT: Duration = Duration::from_millis(50);

/// Erases the store once its operation deadline is known.
pub(crate) type MakeStore = Box<dyn FnOnce(Duration) -> Arc<dyn DynStore> + Send>;

/// Configures an [`AsyncLayer`](crate::AsyncLayer). Setters consume and return the builder.
///
/// | setting | default |
/// |---|---|
/// | [`base_url`](Self::base_url) | derived from each request's `Host` and [`scheme`](Self::scheme) |
/// | [`base_path`](Self::base_path) | the path of `base_url`, else `""` |
/// | [`status_path`](Self::status_path) | `/_async` |
/// | [`retention`](Self::retention) | 24 hours after completion |
/// | [`body_limit`](Self::body_limit) | 16 MiB |
/// | [`result_limit`](Self::result_limit) | 64 MiB |
/// | [`max_retry_after`](Self::max_retry_after) | 30 s |
/// | [`max_run_time`](Self::max_run_time) | none |
/// | [`eligible`](Self::eligible) | every request but `GET [base]/metadata` |
/// | [`declare_async`](Self::declare_async) | off: `GET [base]/metadata` passes unchanged |
/// | [`caller`](Self::caller) | jobs not bound to callers |
/// | [`caller_key`](Self::caller_key) | random per layer: set it when instances share a store |
/// | [`foreign_job_status`](Self::foreign_job_status) | 404 |
/// | [`max_running_jobs`](Self::max_running_jobs) | no limit |
/// | [`max_concurrent_jobs`](Self::max_concurrent_jobs) | 8 per core |
/// | [`max_jobs_per_caller`](Self::max_jobs_per_caller) | no limit |
/// | [`min_poll_interval`](Self::min_poll_interval) | no limit |
/// | [`body_timeout`](Self::body_timeout) | 60 s |
/// | [`lease`](Self::lease) | 10 s |
/// | [`store_timeout`](Self::store_timeout) | 1 s |
/// | [`kickoff_wait`](Self::kickoff_wait) | 50 ms (bulk kick-offs only) |
/// | [`bulk_without_prefer`](Self::bulk_without_prefer) | [`BulkWithoutPrefer::RunAsync`] |
/// | [`instance_id`](Self::instance_id) | random |
/// | [`max_wait`](Self::max_wait) | zero: `Prefer: wait` is not honoured |
/// | [`completion`](Self::completion) | [`CompletionMode::Bundle`] |
/// | [`bulk`](Self::bulk) | on |
/// | [`bulk_operations`](Self::bulk_operations) | `$export` |
/// | [`file_store`](Self::file_store) | an in-memory store per layer |
/// | [`file_prefix`](Self::file_prefix) | `fhir-async` |
/// | [`max_file_size`](Self::max_file_size) | 64 MiB |
/// | [`max_file_resources`](Self::max_file_resources) | 100 000 |
/// | [`file_part_size`](Self::file_part_size) | 5 MiB |
/// | [`max_open_files`](Self::max_open_files) | 4 |
/// | [`manifest_format`](Self::manifest_format) | [`ManifestFormat::Stu2`] |
/// | [`requires_access_token`](Self::requires_access_token) | `true` |
/// | [`upstream_export_files`](Self::upstream_export_files) | [`UpstreamFiles::Copy`] |
///
/// [`kickoff_wait`](Self::kickoff_wait), [`bulk_without_prefer`](Self::bulk_without_prefer) and
/// the settings from [`bulk`](Self::bulk) on belong to the bulk data pattern: they exist with
/// the `bulk` feature, which is on by default.
///
/// [`try_build`](Self::try_build) says which setting is invalid; [`build`](Self::build) panics
/// with the same message.
#[must_use]
pub struct AsyncLayerBuilder {
    store: MakeStore,
    base_url: Option<String>,
    scheme: String,
    base_path: Option<String>,
    status_path: String,
    retention: Duration,
    body_limit: usize,
    result_limit: usize,
    max_retry_after: Duration,
    max_run_time: Option<Duration>,
    eligible: Option<Arc<Predicate>>,
    declare_async: bool,
    lease: Duration,
    instance_id: Option<String>,
    caller: Option<Arc<Identify>>,
    caller_key: Option<Vec<u8>>,
    foreign_status: StatusCode,
    max_running_jobs: Option<usize>,
    max_concurrent_jobs: Option<usize>,
    max_jobs_per_caller: Option<usize>,
    min_poll_interval: Option<Duration>,
    body_timeout: Duration,
    max_wait: Duration,
    completion: CompletionMode,
    bulk: BulkSettings,
    store_timeout: Duration,
    trusted_bases: Vec<String>,
    kickoff_wait: Duration,
    bulk_without_prefer: BulkWithoutPrefer,
}

impl AsyncLayerBuilder {
    /// Follows links the wrapped service writes on `base` too, as those on the public base: a
    /// bulk export's `next` links, and the status URL of an upstream that answers a job's
    /// request asynchronously itself. The link's path below `base` is asked of the wrapped
    /// service under its own base path. For a FHIR server behind a proxy that writes links on
    /// its own address (GATEWAY-3). Links to any other server are never followed (the caller's
    /// credentials would go there); each call adds a base. `base` must be an absolute `http(s)`
    /// URL without a query.
    ///
    /// ```
    /// let layer = tower_fhir_async::AsyncLayer::builder(tower_fhir_async::MemoryStore::new())
    ///     .base_url("https://fhir.example.org/fhir")
    ///     .follow_links_on("http://hapi.internal:8080/fhir")
    ///     .build();
    /// # drop(layer);
    /// ```
    pub fn follow_links_on(mut self, base: impl Into<String>) -> Self {
        self.trusted_bases.push(base.into());
        self
    }

    pub(crate) fn new(store: MakeStore) -> Self {
        Self {
            store,
            base_url: None,
            scheme: "http".to_owned(),
            base_path: None,
            status_path: "/_async".to_owned(),
            retention: Duration::from_secs(24 * 3600),
            body_limit: 16 * 1024 * 1024,
            result_limit: 64 * 1024 * 1024,
            max_retry_after: Duration::from_secs(30),
            max_run_time: None,
            eligible: None,
            declare_async: false,
            lease: LEASE,
            instance_id: None,
            caller: None,
            caller_key: None,
            foreign_status: StatusCode::NOT_FOUND,
            max_running_jobs: None,
            max_concurrent_jobs: None,
            max_jobs_per_caller: None,
            min_poll_interval: None,
            body_timeout: Duration::from_secs(60),
            max_wait: Duration::ZERO,
            completion: CompletionMode::Bundle,
            bulk: BulkSettings::default(),
            store_timeout: STORE_TIMEOUT,
            trusted_bases: Vec::new(),
            kickoff_wait: KICKOFF_WAIT,
            bulk_without_prefer: BulkWithoutPrefer::RunAsync,
        }
    }

    /// The public, absolute base URL of the FHIR server, e.g. `https://fhir.example.org/fhir`.
    /// Status URLs are built from it (KICK-3). Its path is also taken as the base path the
    /// wrapped service sees, unless [`base_path`](Self::base_path) says otherwise.
    pub fn base_url(mut self, url: impl Into<String>) -> Self {
        self.base_url = Some(url.into());
        self
    }

    /// The scheme (`http` or `https`) of status URLs derived from the request's `Host` when no
    /// [`base_url`](Self::base_url) is set. Default `http`.
    pub fn scheme(mut self, scheme: impl Into<String>) -> Self {
        self.scheme = scheme.into();
        self
    }

    /// The path of the FHIR base as the wrapped service sees it (e.g. `/fhir`, or `""` for the
    /// root). Set it when a proxy in front rewrites paths so that it differs from the path of
    /// [`base_url`](Self::base_url).
    pub fn base_path(mut self, path: impl Into<String>) -> Self {
        self.base_path = Some(path.into());
        self
    }

    /// Where the layer's own routes live, under the base path. Default `/_async`.
    pub fn status_path(mut self, path: impl Into<String>) -> Self {
        self.status_path = path.into();
        self
    }

    /// How long a finished job's result stays available (EXPIRE-1, EXPIRE-4), from 1 second to
    /// 10 years. Default 24 hours.
    pub fn retention(mut self, retention: Duration) -> Self {
        self.retention = retention;
        self
    }

    /// The largest kick-off request body buffered, in bytes; larger ones get `413`. Default 16 MiB.
    pub fn body_limit(mut self, bytes: usize) -> Self {
        self.body_limit = bytes;
        self
    }

    /// The largest inner response body kept as a result, in bytes; a larger result fails the job
    /// with a `too-costly` outcome. Default 64 MiB.
    pub fn result_limit(mut self, bytes: usize) -> Self {
        self.result_limit = bytes;
        self
    }

    /// The largest `Retry-After` sent while a job runs. It starts at 1 s and grows with the job's
    /// age up to this cap. Default 30 s.
    pub fn max_retry_after(mut self, cap: Duration) -> Self {
        self.max_retry_after = cap;
        self
    }

    /// The longest a job may run; a job that takes longer is stopped and fails with a `504`
    /// `timeout` outcome. Default: no limit.
    pub fn max_run_time(mut self, limit: Duration) -> Self {
        self.max_run_time = Some(limit);
        self
    }

    /// How long a running job's lease lasts. The instance running a job renews its lease every
    /// third of this; when an instance dies, its jobs are recorded as failed once their leases
    /// lapse, and a cancel through another instance reaches the job within a third of this even
    /// if its push notification is lost. From 1 second to 1 hour; default 10 s, so the jobs of
    /// a killed instance are reported failed within about 13 s.
    ///
    /// The trade-off: a store that stalls for longer than the lease makes the jobs running
    /// through the stall look lost to other instances, which then fail them; their results are
    /// refused by the store (logged at error level, counted as `refused`). A longer lease
    /// rides out longer stalls and reports dead instances later.
    pub fn lease(mut self, lease: Duration) -> Self {
        self.lease = lease;
        self
    }

    /// How long one store operation (a read, a transition, a lease renewal) may take before it
    /// counts as failed: a kick-off then answers `503` with `Retry-After`, a poll `503`, and a
    /// job retries its start or its result. Applies to every backend. From 10 ms to 1 minute;
    /// default 1 s — healthy stores answer within milliseconds (see BENCHMARKS.md), and a
    /// client should not wait through a stall to learn it should come back later.
    pub fn store_timeout(mut self, timeout: Duration) -> Self {
        self.store_timeout = timeout;
        self
    }

    /// This instance's id, recorded with the jobs it runs (for logs and lease checks across
    /// instances). Default: random per layer. Two instances must never share one.
    pub fn instance_id(mut self, id: impl Into<String>) -> Self {
        self.instance_id = Some(id.into());
        self
    }

    /// Decides which requests with `Prefer: respond-async` run asynchronously (SEL-1). Others
    /// are processed synchronously, as RFC 7240 allows. The layer's own routes are never
    /// eligible. Default: every request except `GET`/`HEAD [base]/metadata`.
    ///
    /// It is also asked about every `GET` and `HEAD` without `respond-async`, to decide whether
    /// the response varies with `Prefer` (PREFER-11), so keep it cheap.
    ///
    /// ```
    /// use http::Method;
    /// use tower_fhir_async::{AsyncLayer, MemoryStore};
    ///
    /// // Only operations (`$name`) and writes may run asynchronously.
    /// let layer = AsyncLayer::builder(MemoryStore::default())
    ///     .eligible(|head| head.uri.path().contains("/$") || head.method != Method::GET)
    ///     .build();
    /// # drop(layer);
    /// ```
    pub fn eligible<F>(mut self, predicate: F) -> Self
    where
        F: Fn(&RequestHead<'_>) -> bool + Send + Sync + 'static,
    {
        self.eligible = Some(Arc::new(predicate));
        self
    }

    /// Declares the layer in the wrapped server's CapabilityStatement (CAP-1, CAP-4): the
    /// answer to `GET [base]/metadata` gets the `synchronicity-control` extension with
    /// `valueUri` `either` on every `rest.resource.interaction`, `rest.resource.operation` and
    /// `rest.operation` of a `server` entry that the layer would make asynchronous. With an
    /// [`eligible`](Self::eligible) predicate, the predicate is asked about a request standing
    /// for each entry (`read` is `GET [base]/{type}/x`, `create` is `POST [base]/{type}`, a type
    /// operation `POST [base]/{type}/$name`, a system operation `POST [base]/$name`, …).
    ///
    /// Everything else in the statement stays byte for byte: the extension is spliced into the
    /// original text, and an existing `synchronicity-control` extension is replaced rather than
    /// repeated. `Content-Length` is set to the new length; `ETag` and digest headers, which
    /// named the original bytes, are dropped; every other header stays. A statement that is not
    /// JSON, compressed, over 8 MiB, not a `CapabilityStatement` or not readable passes through
    /// unchanged, headers included. A `HEAD` answered with the body (as axum's handlers are,
    /// before axum drops it) is rewritten like a `GET`; one answered without it loses
    /// `Content-Length` and `ETag`, which the rewritten `GET` would not match. Default: off.
    ///
    /// ```
    /// use tower_fhir_async::{AsyncLayer, MemoryStore};
    ///
    /// let layer = AsyncLayer::builder(MemoryStore::default())
    ///     .base_url("https://fhir.example.org/fhir")
    ///     .declare_async(true)
    ///     .build();
    /// # drop(layer);
    /// ```
    pub fn declare_async(mut self, declare: bool) -> Self {
        self.declare_async = declare;
        self
    }

    /// Binds each job to its caller (SEC-10): `identify` names the caller of a request, usually
    /// from what an authentication layer outside this one left in the request extensions. A
    /// keyed digest of the identity (see [`caller_key`](Self::caller_key)) is recorded with the
    /// job, never the identity itself; status, cancel and file requests from another caller,
    /// or from none, get the same `404` as an unknown job (or `403`, see
    /// [`foreign_job_status`](Self::foreign_job_status)). A kick-off without an identity is
    /// refused with `403`. Default: jobs are not bound, and the status URL's 128 random bits are
    /// the only key to the job.
    ///
    /// Name the principal (a token's `sub` or `client_id`, a certificate subject), not the
    /// credential: tokens rotate, and a caller whose token was renewed would lose its jobs.
    ///
    /// ```
    /// use tower_fhir_async::{AsyncLayer, MemoryStore};
    ///
    /// let layer = AsyncLayer::builder(MemoryStore::default())
    ///     .caller(|head| head.headers.get("x-client-id")?.to_str().ok().map(str::to_owned))
    ///     .build();
    /// # drop(layer);
    /// ```
    pub fn caller<F>(mut self, identify: F) -> Self
    where
        F: Fn(&RequestHead<'_>) -> Option<String> + Send + Sync + 'static,
    {
        self.caller = Some(Arc::new(identify));
        self
    }

    /// Binds each job to its caller, named by `name` from the request extension `T` that an
    /// authentication layer inserted (the axum/tower way). See [`caller`](Self::caller).
    ///
    /// ```
    /// use tower_fhir_async::{AsyncLayer, MemoryStore};
    ///
    /// /// What the authentication layer puts into each request's extensions.
    /// #[derive(Clone)]
    /// struct ClientId(String);
    ///
    /// let layer = AsyncLayer::builder(MemoryStore::default())
    ///     .caller_from_extension(|client: &ClientId| client.0.clone())
    ///     .build();
    /// # drop(layer);
    /// ```
    pub fn caller_from_extension<T, F>(self, name: F) -> Self
    where
        T: Send + Sync + 'static,
        F: Fn(&T) -> String + Send + Sync + 'static,
    {
        self.caller(move |head| head.extensions.get::<T>().map(&name))
    }

    /// Binds each job to its caller, named by the value of header `header` (e.g. one a trusted
    /// gateway sets after authenticating; never one a client could set itself). A request with
    /// several values of the header has no identity: a gateway that appends its line instead of
    /// replacing the client's must not let the client's line count. See [`caller`](Self::caller).
    pub fn caller_from_header(self, header: http::HeaderName) -> Self {
        self.caller(move |head| {
            let mut values = head.headers.get_all(&header).iter();
            let value = values.next()?.to_str().ok()?.trim();
            (values.next().is_none() && !value.is_empty()).then(|| value.to_owned())
        })
    }

    /// The key of the HMAC-SHA-256 digest that the layer keeps and logs instead of each caller
    /// identity (SEC-10, SEC-11): the `owner` of stored jobs, the names of idempotency keys, the
    /// audit trail's `caller` and the quotas all see only the digest, so even a
    /// [`caller`](Self::caller) function that returns a credential leaks nothing at rest or in
    /// logs. At least 16 bytes; use 32 random bytes, kept as secret as any other server key.
    /// [`caller_digest`](crate::caller_digest) computes the digest of a known caller.
    ///
    /// **Instances that share a job store (Redis, PostgreSQL, one `MemoryStore`) must all set
    /// the same key**: the default, a random key per layer, gives the same caller another digest
    /// on each instance, so a poll, cancel or idempotent retry through another instance would
    /// answer `404` as for another caller's job. The layer logs a warning at build when callers
    /// are bound and no key is set. Changing the key has the same effect on jobs already stored.
    ///
    /// ```
    /// use tower_fhir_async::{AsyncLayer, MemoryStore};
    ///
    /// // 32 random bytes from the deployment's secrets, the same on every instance.
    /// let key = std::env::var("FHIR_ASYNC_CALLER_KEY")
    ///     .unwrap_or_else(|_| "a-key-for-this-example-only-0123".to_owned());
    /// let layer = AsyncLayer::builder(MemoryStore::default())
    ///     .caller(|head| head.headers.get("x-client-id")?.to_str().ok().map(str::to_owned))
    ///     .caller_key(key)
    ///     .build();
    /// # drop(layer);
    /// ```
    pub fn caller_key(mut self, key: impl AsRef<[u8]>) -> Self {
        self.caller_key = Some(key.as_ref().to_vec());
        self
    }

    /// The status of the answer to another caller's status, cancel or file request: `404` (the
    /// default, indistinguishable from an unknown job) or `403`.
    pub fn foreign_job_status(mut self, status: StatusCode) -> Self {
        self.foreign_status = status;
        self
    }

    /// The most unfinished jobs this instance accepts (queued or running); further kick-offs
    /// get `429` with a `throttled` OperationOutcome and `Retry-After` (KICK-8, SEC-13).
    /// Default: no limit.
    pub fn max_running_jobs(mut self, limit: usize) -> Self {
        self.max_running_jobs = Some(limit);
        self
    }

    /// The most jobs this instance executes at once. Jobs accepted beyond it wait their turn,
    /// in the order they were accepted: their polls answer `202` with `X-Progress: queued`, a
    /// `DELETE` cancels them, shutdown drains them within its grace period (then records them
    /// as failed), and in a shared store their instance's lease covers them, so a killed
    /// instance's queued jobs are reported lost like its running ones, never stuck.
    ///
    /// A burst of bulk exports then runs a few at a time instead of all at once, each at full
    /// speed, with memory bounded by this number (see `BENCHMARKS.md`). Jobs that mostly wait
    /// for a slow upstream need a higher number than jobs that compute. Default: 8 per core
    /// (`std::thread::available_parallelism`). To refuse rather than queue, set
    /// [`max_running_jobs`](Self::max_running_jobs) too.
    pub fn max_concurrent_jobs(mut self, limit: usize) -> Self {
        self.max_concurrent_jobs = Some(limit);
        self
    }

    /// The most unfinished jobs one caller may have on this instance; further kick-offs get
    /// `429` (KICK-8, SEC-13). Needs [`caller`](Self::caller) (or one of its variants) to know
    /// who is calling. Default: no limit.
    pub fn max_jobs_per_caller(mut self, limit: usize) -> Self {
        self.max_jobs_per_caller = Some(limit);
        self
    }

    /// The shortest time between two polls of one job; a faster poll gets `429` with
    /// `Retry-After` saying how long to wait, and the job goes on (STATUS-6, STATUS-7).
    /// Default: no limit.
    pub fn min_poll_interval(mut self, interval: Duration) -> Self {
        self.min_poll_interval = Some(interval);
        self
    }

    /// How long reading a kick-off's body may take; a body that is still arriving then gets
    /// `408` with a `timeout` OperationOutcome. Default 60 s.
    pub fn body_timeout(mut self, timeout: Duration) -> Self {
        self.body_timeout = timeout;
        self
    }

    /// The longest the layer holds a request for `Prefer: wait=N` (capped at this; zero, the
    /// default, ignores `wait`):
    ///
    /// - a kick-off with `Prefer: respond-async, wait=N` (PREFER-8) waits up to `N` seconds for
    ///   its job; if the job ends in time, the client gets the inner response itself, as a
    ///   synchronous call would have (no status URL), else the usual `202`. Bulk kick-offs are
    ///   always `202`.
    /// - a status poll with `Prefer: wait=N` (a long poll) of an unfinished job is answered when
    ///   the job's progress or state changes, or after `N` seconds.
    ///
    /// ```
    /// use std::time::Duration;
    /// use tower_fhir_async::{AsyncLayer, MemoryStore};
    ///
    /// let layer = AsyncLayer::builder(MemoryStore::default())
    ///     .max_wait(Duration::from_secs(10))
    ///     .build();
    /// # drop(layer);
    /// ```
    pub fn max_wait(mut self, cap: Duration) -> Self {
        self.max_wait = cap;
        self
    }

    /// How a finished interaction job is delivered: as a `batch-response` Bundle at the status
    /// URL (the default, FHIR R5), or by `303 See Other` to a result URL that answers exactly
    /// what the synchronous call would have (the API Incubator's newer design, FUT-1…7).
    pub fn completion(mut self, mode: CompletionMode) -> Self {
        self.completion = mode;
        self
    }

    /// The settings that stand alone: each within its range.
    fn check_limits(&self) -> Result<(), BuildError> {
        if self.scheme != "http" && self.scheme != "https" {
            return Err(BuildError(format!(
                "scheme must be `http` or `https`, not {:?}",
                self.scheme
            )));
        }
        for (name, value) in [
            ("body_limit", self.body_limit),
            ("result_limit", self.result_limit),
        ] {
            if value == 0 {
                return Err(BuildError(format!("{name} must be at least one byte")));
            }
        }
        if self.retention < Duration::from_secs(1) || self.retention > MAX_RETENTION {
            return Err(BuildError(format!(
                "retention must be between 1 second and 10 years, not {}",
                humantime::format_duration(self.retention)
            )));
        }
        if self.foreign_status != StatusCode::NOT_FOUND
            && self.foreign_status != StatusCode::FORBIDDEN
        {
            return Err(BuildError(format!(
                "foreign_job_status must be 404 or 403, not {}",
                self.foreign_status.as_u16()
            )));
        }
        for (name, limit) in [
            ("max_running_jobs", self.max_running_jobs),
            ("max_concurrent_jobs", self.max_concurrent_jobs),
            ("max_jobs_per_caller", self.max_jobs_per_caller),
        ] {
            if limit == Some(0) {
                return Err(BuildError(format!("{name} must be at least 1")));
            }
        }
        if self.body_timeout.is_zero() {
            return Err(BuildError(
                "body_timeout must be longer than zero".to_owned(),
            ));
        }
        if self.max_run_time.is_some_and(|limit| limit.is_zero()) {
            return Err(BuildError(
                "max_run_time must be longer than zero".to_owned(),
            ));
        }
        if self.store_timeout < Duration::from_millis(10)
            || self.store_timeout > Duration::from_secs(60)
        {
            return Err(BuildError(format!(
                "store_timeout must be between 10 ms and 1 minute, not {}",
                humantime::format_duration(self.store_timeout)
            )));
        }
        if self.kickoff_wait > Duration::from_secs(10) {
            return Err(BuildError(format!(
                "kickoff_wait must be at most 10 s, not {}",
                humantime::format_duration(self.kickoff_wait)
            )));
        }
        if self.lease < Duration::from_secs(1) || self.lease > Duration::from_secs(3600) {
            return Err(BuildError(format!(
                "lease must be between 1 second and 1 hour, not {}",
                humantime::format_duration(self.lease)
            )));
        }
        Ok(())
    }

    /// Checks every setting and assembles the parts the layer shares (see
    /// [`try_build`](Self::try_build), in `layer`, which wraps them).
    pub(crate) fn assemble(self) -> Result<Arc<Shared>, BuildError> {
        self.check_limits()?;
        let (public_base, url_path) = match &self.base_url {
            Some(url) => {
                let (base, path) = parse_base_url(url)?;
                (Some(base), path)
            }
            None => (None, String::new()),
        };
        let base_path = match self.base_path {
            Some(path) => check_path(&path, "base_path", true)?,
            None => url_path,
        };
        let status_path = check_path(&self.status_path, "status_path", false)?;
        let bulk = self.bulk.check().map_err(BuildError)?;
        let trusted_bases = check_trusted_bases(self.trusted_bases)?;
        let instance = match self.instance_id {
            Some(id) if id.trim().is_empty() => {
                return Err(BuildError("instance_id must not be empty".to_owned()));
            }
            Some(id) => id,
            None => JobId::new().to_string(),
        };
        let caller_key = match &self.caller_key {
            Some(key) => CallerKey::new(key).ok_or_else(|| {
                BuildError(format!(
                    "caller_key must be at least {} bytes, not {}; use 32 random bytes",
                    caller::MIN_KEY_LEN,
                    key.len()
                ))
            })?,
            None => {
                if self.caller.is_some() {
                    tracing::warn!(
                        "jobs are bound to callers but no caller_key is set: a random key is used, \
                         right for one instance only; instances sharing a job store must all set \
                         the same caller_key, or their callers' jobs answer 404 on the others"
                    );
                }
                CallerKey::random()
            }
        };
        let config = Arc::new(Config {
            public_base,
            scheme: self.scheme,
            route_prefix: format!("{base_path}{status_path}"),
            metadata_path: format!("{base_path}/metadata"),
            base_path,
            status_path,
            retention: self.retention,
            body_limit: self.body_limit,
            result_limit: self.result_limit,
            max_retry_after: self.max_retry_after.max(Duration::from_secs(1)),
            max_run_time: self.max_run_time,
            eligible: self.eligible,
            declare_async: self.declare_async,
            caller: self.caller,
            caller_key,
            foreign_status: self.foreign_status,
            body_timeout: self.body_timeout,
            bulk,
            max_wait: self.max_wait,
            completion: self.completion,
            kickoff_wait: self.kickoff_wait,
            bulk_without_prefer: self.bulk_without_prefer,
            store_timeout: self.store_timeout,
            trusted_bases,
        });
        let store = (self.store)(self.store_timeout);
        let runner = Arc::new(Runner::new(
            config.clone(),
            store,
            Clock::new(),
            instance,
            self.lease,
            self.max_concurrent_jobs
                .unwrap_or_else(default_concurrent_jobs)
                .min(MAX_CONCURRENT_JOBS),
        ));
        let quotas = Quotas::new(self.max_running_jobs, self.max_jobs_per_caller);
        let polls = self.min_poll_interval.map(PollThrottle::new);
        Ok(Arc::new(Shared {
            config,
            runner,
            quotas,
            polls,
            outside_base_reported: Default::default(),
        }))
    }
}

/// Jobs executed at once per core by default (`max_concurrent_jobs`).
const CONCURRENT_JOBS_PER_CORE: usize = 8;

/// More places to run than any instance has jobs: the semaphore's own limit is far higher.
const MAX_CONCURRENT_JOBS: usize = 1 << 24;

/// The default of `max_concurrent_jobs`: [`CONCURRENT_JOBS_PER_CORE`] per core.
fn default_concurrent_jobs() -> usize {
    std::thread::available_parallelism().map_or(1, usize::from) * CONCURRENT_JOBS_PER_CORE
}

/// The bases of `follow_links_on`, checked, without trailing `/`.
fn check_trusted_bases(bases: Vec<String>) -> Result<Vec<String>, BuildError> {
    bases
        .into_iter()
        .map(|base| {
            let absolute = base.parse::<http::Uri>().is_ok_and(|uri| {
                matches!(uri.scheme_str(), Some("http" | "https"))
                    && uri.authority().is_some()
                    && uri.query().is_none()
            });
            if absolute {
                Ok(base.trim_end_matches('/').to_owned())
            } else {
                Err(BuildError(format!(
                    "follow_links_on must be absolute http(s) URLs without a query, not {base:?}"
                )))
            }
        })
        .collect()
}

/// The settings of the bulk data pattern, with the `bulk` feature (on by default). Without
/// it the layer has no bulk pattern: `$export` and requests with `_outputFormat` are ordinary
/// requests, passed through or run as interaction jobs.
#[cfg(feature = "bulk")]
impl AsyncLayerBuilder {
    /// How long a bulk kick-off waits for the wrapped service's first response head before it
    /// answers `202`. When the service has answered `4xx` by then (an unknown `_type`, a bad
    /// `_since`, a parameter it refuses under `handling=strict`), that answer is the kick-off's,
    /// and no job is kept: a client learns of the mistake at once rather than at its first poll
    /// (KICK-5). Every other answer, and one that comes later, is the job's as usual.
    ///
    /// Interaction-pattern kick-offs never wait: their completion Bundle carries the inner
    /// answer, errors included (BUNDLE-4).
    ///
    /// Default 50 ms: a kick-off whose first page takes longer is answered that much later,
    /// and errors a service reports before doing any work are caught (see BENCHMARKS.md).
    /// [`Duration::ZERO`] turns it off. At most 10 s.
    pub fn kickoff_wait(mut self, wait: Duration) -> Self {
        self.kickoff_wait = wait;
        self
    }

    /// What a bulk operation (one of [`bulk_operations`](Self::bulk_operations), e.g.
    /// `$export`) sent without `Prefer: respond-async` gets. The Bulk Data IG allows two
    /// answers: process it as if `respond-async` had been sent (the default,
    /// [`BulkWithoutPrefer::RunAsync`]), or refuse it with `400` ([`BulkWithoutPrefer::Refuse`]).
    pub fn bulk_without_prefer(mut self, answer: BulkWithoutPrefer) -> Self {
        self.bulk_without_prefer = answer;
        self
    }

    /// Whether the bulk data pattern is offered (SEL-3). When it is not, a kick-off with
    /// `_outputFormat` is refused with `400` + `not-supported` (SEL-4), and bulk operations such
    /// as `$export` run as interaction requests. Default: on.
    pub fn bulk(mut self, enabled: bool) -> Self {
        self.bulk.enabled = enabled;
        self
    }

    /// The operations that take the bulk pattern even without `_outputFormat`, by name as the
    /// last path segment (`$export` matches `[base]/$export`, `[base]/Patient/$export` and
    /// `[base]/Group/{id}/$export`). Default: `$export`.
    ///
    /// ```
    /// use tower_fhir_async::{AsyncLayer, MemoryStore};
    ///
    /// let layer = AsyncLayer::builder(MemoryStore::default())
    ///     .bulk_operations(["$export", "$everything"])
    ///     .build();
    /// # drop(layer);
    /// ```
    pub fn bulk_operations<I, N>(mut self, names: I) -> Self
    where
        I: IntoIterator<Item = N>,
        N: Into<String>,
    {
        self.bulk.operations = names.into_iter().map(Into::into).collect();
        self
    }

    /// Where bulk data files are kept: any [`object_store::ObjectStore`] — a
    /// `LocalFileSystem`, S3, Azure, GCS… Default: an in-memory store of this layer's own,
    /// which keeps whole exports in memory and is not shared between instances; give every
    /// instance behind a load balancer the same store.
    ///
    /// ```
    /// use std::sync::Arc;
    /// use tower_fhir_async::object_store::local::LocalFileSystem;
    /// use tower_fhir_async::{AsyncLayer, MemoryStore};
    ///
    /// # let dir = std::env::temp_dir();
    /// // Automatic cleanup: removed exports leave no empty folders behind.
    /// let files = LocalFileSystem::new_with_prefix(&dir)
    ///     .expect("an existing folder")
    ///     .with_automatic_cleanup(true);
    /// let layer = AsyncLayer::builder(MemoryStore::default())
    ///     .file_store(Arc::new(files))
    ///     .build();
    /// # drop(layer);
    /// ```
    pub fn file_store(mut self, store: Arc<dyn ObjectStore>) -> Self {
        self.bulk.file_store = Some(store);
        self
    }

    /// The folder in the [`file_store`](Self::file_store) that the layer keeps to itself:
    /// files are `{prefix}/{job id}/{name}`, and the sweeper removes folders of jobs that no
    /// longer exist. Default `fhir-async`.
    pub fn file_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.bulk.file_prefix = prefix.into();
        self
    }

    /// The largest bulk data file, in bytes; a client's `_maximumFileSize` can only lower it
    /// (BULK-3). A single resource larger than this gets a file of its own. Default 64 MiB.
    pub fn max_file_size(mut self, bytes: u64) -> Self {
        self.bulk.max_file_size = bytes;
        self
    }

    /// The most resources in one bulk data file. Default 100 000.
    pub fn max_file_resources(mut self, count: u64) -> Self {
        self.bulk.max_file_resources = count;
        self
    }

    /// The size of the parts files are uploaded in (multipart uploads, so no file is ever held
    /// whole in memory). At least 5 MiB, the smallest part S3 accepts
    /// ([`try_build`](Self::try_build) refuses less). Default 5 MiB.
    pub fn file_part_size(mut self, bytes: usize) -> Self {
        self.bulk.file_part_size = bytes;
        self
    }

    /// The most files one export writes at once. When a result interleaves more resource types
    /// than this, the least recently written file is closed and a later one of its type begun.
    /// Memory per export is about this × 3 × [`file_part_size`](Self::file_part_size) at most.
    /// Default 4.
    pub fn max_open_files(mut self, count: usize) -> Self {
        self.bulk.max_open_files = count;
        self
    }

    /// The form of the completion manifest (BULK-9). Default [`ManifestFormat::Stu2`], the form
    /// every published bulk data client reads.
    pub fn manifest_format(mut self, format: ManifestFormat) -> Self {
        self.bulk.manifest_format = format;
        self
    }

    /// The manifest's `requiresAccessToken` (BULK-14). With `true` (the default) file requests
    /// pass the same authentication as any other request, and with [`caller`](Self::caller)
    /// only the job's caller gets its files. With `false` the file URLs are capability URLs:
    /// their 128 random bits are the key, no caller check applies, and the
    /// [`retention`](Self::retention) should be short.
    pub fn requires_access_token(mut self, required: bool) -> Self {
        self.bulk.requires_access_token = required;
        self
    }

    /// What becomes of the files of an export that the wrapped service runs itself (it answers
    /// the job's request with `202` + `Content-Location`, as a FHIR server behind
    /// `upstream::Upstream` does for its own `$export`). Default [`UpstreamFiles::Copy`]: every
    /// file is copied into the [`file_store`](Self::file_store) and outlives the upstream's job.
    /// [`UpstreamFiles::Link`]: the job's manifest is the upstream's own, its files served by the
    /// upstream through the layer for as long as the upstream keeps them; see [`UpstreamFiles`].
    ///
    /// ```
    /// use tower_fhir_async::{AsyncLayer, MemoryStore, UpstreamFiles};
    ///
    /// let layer = AsyncLayer::builder(MemoryStore::new())
    ///     .base_url("https://fhir.example.org/fhir")
    ///     .upstream_export_files(UpstreamFiles::Link)
    ///     .build();
    /// # drop(layer);
    /// ```
    pub fn upstream_export_files(mut self, files: UpstreamFiles) -> Self {
        self.bulk.upstream_files = files;
        self
    }
}

impl fmt::Debug for AsyncLayerBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AsyncLayerBuilder")
            .field("base_url", &self.base_url)
            .field("status_path", &self.status_path)
            .finish_non_exhaustive()
    }
}

/// Splits an absolute `http(s)` base URL into its text without a trailing slash and its path.
fn parse_base_url(url: &str) -> Result<(String, String), BuildError> {
    let bad = |why: &str| BuildError(format!("base_url {url:?} {why}"));
    let uri: Uri = url.parse().map_err(|_| bad("is not a valid URL"))?;
    match uri.scheme_str() {
        Some("http" | "https") => {}
        _ => return Err(bad("must start with http:// or https://")),
    }
    let authority = uri.authority().ok_or_else(|| bad("has no host"))?;
    if authority.as_str().contains('@') {
        return Err(bad("must not carry credentials"));
    }
    if uri.query().is_some() || url.contains('#') {
        return Err(bad("must not have a query or fragment"));
    }
    let path = uri.path().trim_end_matches('/').to_owned();
    let path = check_path(&path, "the path of base_url", true)?;
    Ok((url.trim_end_matches('/').to_owned(), path))
}

/// A path of `/`-separated segments of unreserved characters, no trailing slash.
fn check_path(path: &str, name: &str, may_be_empty: bool) -> Result<String, BuildError> {
    if path.is_empty() && may_be_empty {
        return Ok(String::new());
    }
    let segments_ok = path.strip_prefix('/').is_some_and(|rest| {
        rest.split('/').all(|segment| {
            !segment.is_empty()
                && segment != "."
                && segment != ".."
                && segment
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-._~$".contains(&b))
        })
    });
    if segments_ok {
        Ok(path.to_owned())
    } else {
        Err(BuildError(format!(
            "{name} must look like `/segment` or `/a/b` (letters, digits, `-._~$`, no trailing slash), not {path:?}"
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::MemoryStore;
    use http::{Extensions, HeaderMap, Method};

    fn builder() -> AsyncLayerBuilder {
        AsyncLayerBuilder::new(Box::new(|limit| {
            Arc::new(crate::store::Bounded {
                store: MemoryStore::default(),
                limit,
            })
        }))
    }

    #[test]
    fn base_url_sets_the_base_path() {
        let layer = builder()
            .base_url("https://fhir.example.org/fhir/")
            .assemble()
            .unwrap();
        let config = &layer.config;
        assert_eq!(
            config.public_base.as_deref(),
            Some("https://fhir.example.org/fhir")
        );
        assert_eq!(config.route_prefix, "/fhir/_async");
        assert_eq!(config.own_route("/fhir/_async/abc"), Some("/abc"));
        assert_eq!(config.own_route("/fhir/_async"), Some(""));
        assert_eq!(config.own_route("/fhir/_asyncx"), None);
        assert_eq!(config.own_route("/_async/abc"), None);
    }

    #[test]
    fn bad_settings_are_named() {
        for (b, setting) in [
            (builder().base_url("fhir.example.org"), "base_url"),
            (builder().base_url("ftp://x/fhir"), "base_url"),
            (builder().base_url("https://u:p@x/fhir"), "base_url"),
            (builder().base_url("https://x/fhir?a=1"), "base_url"),
            (builder().status_path("_async"), "status_path"),
            (builder().status_path("/_async/"), "status_path"),
            (builder().status_path("/a/../b"), "status_path"),
            (builder().status_path(""), "status_path"),
            (builder().scheme("gopher"), "scheme"),
            (builder().body_limit(0), "body_limit"),
            (builder().retention(Duration::ZERO), "retention"),
            (builder().retention(Duration::MAX), "retention"),
            (builder().max_run_time(Duration::ZERO), "max_run_time"),
            (
                builder().foreign_job_status(StatusCode::GONE),
                "foreign_job_status",
            ),
            (builder().max_running_jobs(0), "max_running_jobs"),
            (builder().max_concurrent_jobs(0), "max_concurrent_jobs"),
            (builder().max_jobs_per_caller(0), "max_jobs_per_caller"),
            (builder().body_timeout(Duration::ZERO), "body_timeout"),
            (builder().lease(Duration::from_millis(10)), "lease"),
            (builder().instance_id(" "), "instance_id"),
            (builder().caller_key("too short"), "caller_key"),
        ] {
            let Err(error) = b.assemble() else {
                panic!("{setting}: an invalid setting was accepted");
            };
            let error = error.to_string();
            assert!(error.contains(setting), "{error}");
        }
    }

    // Issue #14: parts smaller than S3 accepts are refused when built, not when an export of a
    // large file fails to complete; 5 MiB itself is fine.
    #[cfg(feature = "bulk")]
    #[test]
    fn file_parts_are_at_least_five_mebibytes() {
        for small in [1, 1024, 5 * 1024 * 1024 - 1] {
            let Err(error) = builder().file_part_size(small).assemble() else {
                panic!("{small}: a part size S3 refuses was accepted");
            };
            assert!(error.to_string().contains("file_part_size"), "{error}");
        }
        for fine in [5 * 1024 * 1024, 16 * 1024 * 1024] {
            assert!(builder().file_part_size(fine).assemble().is_ok(), "{fine}");
        }
    }

    // GATEWAY-3: a trusted next-link base must be an absolute http(s) URL.
    #[cfg(feature = "bulk")]
    #[test]
    fn bad_next_link_bases_are_named() {
        for base in [
            "hapi.internal/fhir",
            "/fhir",
            "ftp://h/fhir",
            "http://h/fhir?x=1",
        ] {
            let Err(error) = builder().follow_links_on(base).assemble() else {
                panic!("{base}: an invalid base was accepted");
            };
            assert!(error.to_string().contains("follow_links_on"), "{error}");
        }
        let layer = builder()
            .follow_links_on("http://hapi.internal:8080/fhir/")
            .assemble()
            .unwrap();
        assert_eq!(
            layer.config.trusted_bases,
            ["http://hapi.internal:8080/fhir"]
        );
    }

    #[test]
    fn a_lease_over_an_hour_is_named() {
        let Err(error) = builder().lease(Duration::from_secs(7200)).assemble() else {
            panic!("a lease of two hours was accepted");
        };
        assert!(error.to_string().contains("lease"), "{error}");
    }

    // SEC-10, SEC-11: the caller identity is digested under the configured key before anything
    // keeps it; the same identity under another key (another layer's random one) differs.
    #[test]
    fn sec_10_caller_of_is_the_keyed_digest() {
        let key = "0123456789abcdef0123456789abcdef";
        let bound = |b: AsyncLayerBuilder| {
            b.caller(|head| {
                head.headers
                    .get("x-client")?
                    .to_str()
                    .ok()
                    .map(str::to_owned)
            })
        };
        let keyed = bound(builder()).caller_key(key).assemble().unwrap();
        let random = bound(builder()).assemble().unwrap();
        let mut headers = HeaderMap::new();
        headers.insert("x-client", "Bearer secret-token".parse().unwrap());
        let (method, uri, extensions) = (Method::GET, Uri::from_static("/x"), Extensions::new());
        let head = RequestHead {
            method: &method,
            uri: &uri,
            headers: &headers,
            extensions: &extensions,
        };
        let digest = keyed.config.caller_of(&head).unwrap();
        assert_eq!(
            Some(digest.clone()),
            crate::caller_digest(key.as_bytes(), "Bearer secret-token")
        );
        assert!(!digest.contains("secret-token"));
        assert_ne!(random.config.caller_of(&head), Some(digest));
        assert_eq!(builder().assemble().unwrap().config.caller_of(&head), None);
    }

    #[test]
    fn derived_base_uses_host_and_scheme() {
        let layer = builder()
            .scheme("https")
            .base_path("/fhir")
            .assemble()
            .unwrap();
        let config = &layer.config;
        let mut headers = HeaderMap::new();
        headers.insert(http::header::HOST, "example.org:8443".parse().unwrap());
        let uri: Uri = "/fhir/Patient".parse().unwrap();
        assert_eq!(
            config.public_base(&uri, &headers).unwrap(),
            "https://example.org:8443/fhir"
        );
        headers.insert(http::header::HOST, "evil.org/x?".parse().unwrap());
        assert_eq!(config.public_base(&uri, &headers), None);
        headers.insert(http::header::HOST, "user@evil.org".parse().unwrap());
        assert_eq!(config.public_base(&uri, &headers), None);
    }

    #[test]
    fn sel_1_metadata_is_not_eligible_by_default() {
        let layer = builder().base_url("http://x/fhir").assemble().unwrap();
        let config = &layer.config;
        let headers = HeaderMap::new();
        let extensions = Extensions::new();
        let check = |method: Method, uri: &str| {
            let uri: Uri = uri.parse().unwrap();
            config.is_eligible(&RequestHead {
                method: &method,
                uri: &uri,
                headers: &headers,
                extensions: &extensions,
            })
        };
        assert!(!check(Method::GET, "/fhir/metadata"));
        assert!(check(Method::GET, "/fhir/Patient"));
        assert!(check(Method::POST, "/fhir/metadata"));
    }
}
