//! The layer's own routes under `{base}{status path}/`: status (`GET`/`HEAD`) and cancel
//! (`DELETE`).

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{ALLOW, CACHE_CONTROL, CONTENT_LENGTH, CONTENT_TYPE, EXPIRES, RETRY_AFTER};
use http::request::Parts;
use http::{HeaderName, HeaderValue, Method, Response, StatusCode};

use crate::bundle;
use crate::job::{JobId, JobRecord, JobState};
use crate::layer::Shared;
use crate::outcome::{
    self, FHIR_JSON, IssueCode, NO_STORE, delta_seconds, error_response, job_not_found,
};

/// The `X-Progress` response header (STATUS-4).
pub(crate) const X_PROGRESS: HeaderName = HeaderName::from_static("x-progress");

/// How long a client should wait before retrying when the store is unavailable.
const STORE_RETRY: Duration = Duration::from_secs(5);

/// Answers a request under the layer's route prefix.
pub(crate) async fn handle(shared: Arc<Shared>, parts: Parts) -> Response<Bytes> {
    let rest = shared
        .config
        .own_route(parts.uri.path())
        .unwrap_or_default();
    let Some(rest) = rest.strip_prefix('/').filter(|r| !r.is_empty()) else {
        return error_response(
            StatusCode::NOT_FOUND,
            IssueCode::NotFound,
            "This is the prefix of asynchronous job status URLs; use the full URL from `Content-Location`.",
        );
    };
    if !matches!(parts.method, Method::GET | Method::HEAD | Method::DELETE) {
        let mut response = error_response(
            StatusCode::METHOD_NOT_ALLOWED,
            IssueCode::NotSupported,
            &format!(
                "{} is not supported on a job status URL; use GET, HEAD or DELETE.",
                parts.method
            ),
        );
        response
            .headers_mut()
            .insert(ALLOW, HeaderValue::from_static("GET, HEAD, DELETE"));
        return response;
    }
    // A malformed id, or anything below an id, never reaches the store.
    let Some(id) = JobId::parse(rest) else {
        return job_not_found();
    };
    if parts.method == Method::DELETE {
        cancel(&shared, id).await
    } else {
        let mut response = status(&shared, id, &parts).await;
        if parts.method == Method::HEAD {
            let length = response.body().len();
            response
                .headers_mut()
                .insert(CONTENT_LENGTH, HeaderValue::from(length));
            *response.body_mut() = Bytes::new();
        }
        response
    }
}

/// `GET` on a status URL: 202 while running, 200 + Bundle when done (STATUS-3…5, BUNDLE-1).
async fn status(shared: &Shared, id: JobId, parts: &Parts) -> Response<Bytes> {
    let runner = &shared.runner;
    let now = runner.clock.now();
    let record = match runner.store.get(&id, now).await {
        Ok(Some(record)) => record,
        Ok(None) => return job_not_found(),
        Err(error) => {
            tracing::warn!(%error, "reading a job's status failed");
            return outcome::unavailable(
                "The job store is temporarily unavailable; poll again later.",
                STORE_RETRY,
            );
        }
    };
    match &record.state {
        JobState::Accepted | JobState::Running { .. } => in_progress(shared, &record, now),
        JobState::Completed(response) | JobState::Failed(response) => {
            // Without a usable base (no configured URL, no Host on this poll) only `fullUrl` is lost.
            let base = shared.config.public_base(&parts.uri, &parts.headers);
            let body = bundle::render(&id, response, record.finished_at, base.as_deref());
            let mut reply = Response::new(body);
            let headers = reply.headers_mut();
            headers.insert(CONTENT_TYPE, FHIR_JSON);
            headers.insert(CACHE_CONTROL, NO_STORE);
            if let Some(expires) = record.expires_at {
                if let Ok(value) = HeaderValue::from_str(&httpdate::fmt_http_date(expires)) {
                    headers.insert(EXPIRES, value);
                }
            }
            reply
        }
    }
}

/// `202 Accepted` with `Retry-After` growing with the job's age, and `X-Progress` when known.
fn in_progress(shared: &Shared, record: &JobRecord, now: std::time::SystemTime) -> Response<Bytes> {
    let age = now.duration_since(record.created_at).unwrap_or_default();
    let retry = Duration::from_secs(age.as_secs() / 10)
        .clamp(Duration::from_secs(1), shared.config.max_retry_after);
    let mut reply = Response::new(Bytes::new());
    *reply.status_mut() = StatusCode::ACCEPTED;
    let headers = reply.headers_mut();
    headers.insert(RETRY_AFTER, delta_seconds(retry));
    headers.insert(CACHE_CONTROL, NO_STORE);
    let progress = shared
        .runner
        .local_progress(&record.id)
        .or_else(|| record.progress.as_deref().map(Box::from));
    if let Some(value) = progress.and_then(|p| HeaderValue::from_str(&p).ok()) {
        headers.insert(X_PROGRESS, value);
    }
    reply
}

/// `DELETE` on a status URL: 202, and the job is gone (CANCEL-1…7).
async fn cancel(shared: &Shared, id: JobId) -> Response<Bytes> {
    let runner = &shared.runner;
    match runner.store.cancel(&id, runner.clock.now()).await {
        Ok(true) => {
            let stopped = runner.cancel_local(&id);
            tracing::info!(job.id = %id, stopped, "asynchronous job cancelled");
            let mut reply = Response::new(Bytes::new());
            *reply.status_mut() = StatusCode::ACCEPTED;
            reply.headers_mut().insert(CACHE_CONTROL, NO_STORE);
            reply
        }
        Ok(false) => job_not_found(),
        Err(error) => {
            tracing::warn!(%error, "cancelling a job failed");
            outcome::unavailable(
                "The job store is temporarily unavailable; send the DELETE again later.",
                STORE_RETRY,
            )
        }
    }
}

/// No configured base URL and no usable `Host`: absolute URLs cannot be built.
pub(crate) fn no_host() -> Response<Bytes> {
    error_response(
        StatusCode::BAD_REQUEST,
        IssueCode::Invalid,
        "The request has no usable Host header, so no absolute URL can be built; send Host, or configure \
         the layer's base_url.",
    )
}
