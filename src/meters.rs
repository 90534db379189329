//! Metrics through the [`metrics`](https://docs.rs/metrics) facade: install any recorder
//! (Prometheus, StatsD, …) in the application and these appear; without one they cost an
//! atomic load each.

/// Counter: requests the layer answered itself, by `action` (`kick-off`, `status`, `cancel`,
/// `file`) and `outcome` (`accepted`, `in-progress`, `completed`, `cancelled`, `not-found`,
/// `throttled`, …, the same words as the audit trail).
pub(crate) const REQUESTS: &str = "fhir_async_requests_total";

/// Gauge: jobs registered to run in this process (queued, waiting for the inner service, or
/// running).
pub(crate) const RUNNING: &str = "fhir_async_jobs_running";

/// Gauge: jobs accepted here that wait for a place to run (`max_concurrent_jobs`).
pub(crate) const QUEUED: &str = "fhir_async_jobs_queued";

/// Counter: jobs that ended here, by `outcome` (`completed`, `failed`, `cancelled`, `lost`: the
/// outcome could not be recorded; `not-started`: the store did not record the start of a job
/// with an Idempotency-Key in time, so it was not run; `orphaned`: a refused kick-off's record
/// could not be taken back).
pub(crate) const FINISHED: &str = "fhir_async_jobs_finished_total";

/// Counter: results the store refused because another instance had already failed the job as
/// lost (its lease lapsed while it ran here). Each is also logged at error level; more than
/// zero means leases are too short for the store's stalls.
pub(crate) const REFUSED: &str = "fhir_async_results_refused_total";

/// Histogram: seconds from a job's start to its end, by `outcome` as in [`FINISHED`].
pub(crate) const DURATION: &str = "fhir_async_job_duration_seconds";
