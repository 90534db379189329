//! OperationOutcome bodies and the layer's own error responses: one place for every error body.

use std::time::Duration;

use bytes::Bytes;
use http::header::{ALLOW, CACHE_CONTROL, CONTENT_TYPE, RETRY_AFTER};
use http::{HeaderValue, Method, Response, StatusCode};
use serde_json::json;

pub(crate) const FHIR_JSON: HeaderValue = HeaderValue::from_static("application/fhir+json");
pub(crate) const NO_STORE: HeaderValue = HeaderValue::from_static("no-store");

/// How long a client should wait before retrying when the job store or the file store is
/// unavailable.
pub(crate) const STORE_RETRY: Duration = Duration::from_secs(5);

/// FHIR `IssueType` codes the layer uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum IssueCode {
    Invalid,
    Login,
    Forbidden,
    NotFound,
    NotSupported,
    Conflict,
    TooCostly,
    Processing,
    Throttled,
    Transient,
    Exception,
    Timeout,
}

impl IssueCode {
    pub(crate) const fn as_str(self) -> &'static str {
        match self {
            Self::Invalid => "invalid",
            Self::Login => "login",
            Self::Forbidden => "forbidden",
            Self::NotFound => "not-found",
            Self::NotSupported => "not-supported",
            Self::Conflict => "conflict",
            Self::TooCostly => "too-costly",
            Self::Processing => "processing",
            Self::Throttled => "throttled",
            Self::Transient => "transient",
            Self::Exception => "exception",
            Self::Timeout => "timeout",
        }
    }

    /// The code that best describes an HTTP error status without a FHIR body (BUNDLE-11).
    pub(crate) fn for_status(status: StatusCode) -> Self {
        match status.as_u16() {
            400 => Self::Invalid,
            401 => Self::Login,
            403 => Self::Forbidden,
            404 | 410 => Self::NotFound,
            405 | 406 | 415 | 501 => Self::NotSupported,
            409 | 412 => Self::Conflict,
            413 => Self::TooCostly,
            429 => Self::Throttled,
            504 => Self::Timeout,
            500..=599 => Self::Exception,
            _ => Self::Processing,
        }
    }
}

/// An OperationOutcome with one `error` issue, as a JSON value.
pub(crate) fn operation_outcome(code: IssueCode, diagnostics: &str) -> serde_json::Value {
    json!({
        "resourceType": "OperationOutcome",
        "issue": [{ "severity": "error", "code": code.as_str(), "diagnostics": diagnostics }],
    })
}

/// The same, serialized.
pub(crate) fn operation_outcome_bytes(code: IssueCode, diagnostics: &str) -> Bytes {
    Bytes::from(operation_outcome(code, diagnostics).to_string())
}

/// A response of the layer's own: `status` + OperationOutcome, `application/fhir+json`,
/// `Cache-Control: no-store`.
pub(crate) fn error_response(
    status: StatusCode,
    code: IssueCode,
    diagnostics: &str,
) -> Response<Bytes> {
    let mut response = Response::new(operation_outcome_bytes(code, diagnostics));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(CONTENT_TYPE, FHIR_JSON);
    headers.insert(CACHE_CONTROL, NO_STORE);
    response
}

/// `404 Not Found` for a job that does not exist (any more): the one answer for unknown,
/// malformed, cancelled and expired ids (CANCEL-3, EXPIRE-3, STATUS-15).
pub(crate) fn job_not_found() -> Response<Bytes> {
    error_response(
        StatusCode::NOT_FOUND,
        IssueCode::NotFound,
        "No asynchronous job at this URL: it was cancelled, it expired, or it never existed. \
         Start the request again with `Prefer: respond-async`.",
    )
}

/// The answer to another caller's request for a job (SEC-10): `403` when the layer is configured
/// so (`foreign_status`), else the same `404` as for no job at all.
pub(crate) fn foreign_job(foreign_status: StatusCode) -> Response<Bytes> {
    if foreign_status == StatusCode::FORBIDDEN {
        error_response(
            StatusCode::FORBIDDEN,
            IssueCode::Forbidden,
            "This asynchronous job belongs to another caller.",
        )
    } else {
        job_not_found()
    }
}

/// `404` for the route prefix itself, which names no job.
pub(crate) fn no_job_named() -> Response<Bytes> {
    error_response(
        StatusCode::NOT_FOUND,
        IssueCode::NotFound,
        "This is the prefix of asynchronous job status URLs; use the full URL from `Content-Location`.",
    )
}

/// `404` for a bulk data file that does not exist, or no longer (CANCEL-7, EXPIRE-3).
pub(crate) fn file_not_found() -> Response<Bytes> {
    error_response(
        StatusCode::NOT_FOUND,
        IssueCode::NotFound,
        "No such bulk data file: the job is unknown, not complete, expired or deleted, or the file is not one of \
         its files.",
    )
}

/// `405` + `Allow` for a method `target` (e.g. "a job status URL") does not take (STATUS-15,
/// AMB-31).
pub(crate) fn method_not_allowed(
    method: &Method,
    target: &str,
    allow: &'static str,
) -> Response<Bytes> {
    let mut response = error_response(
        StatusCode::METHOD_NOT_ALLOWED,
        IssueCode::NotSupported,
        &format!("{method} is not supported on {target}; use one of {allow}."),
    );
    response
        .headers_mut()
        .insert(ALLOW, HeaderValue::from_static(allow));
    response
}

/// `503` + `transient` + `Retry-After`: the job store cannot be reached; the client should
/// `retry` (e.g. "poll") again later.
pub(crate) fn job_store_unavailable(retry: &str) -> Response<Bytes> {
    unavailable(
        &format!("The job store is temporarily unavailable; {retry} again later."),
        STORE_RETRY,
    )
}

/// `503` + `transient` + `Retry-After`: the store of bulk data files cannot be read.
pub(crate) fn file_store_unavailable() -> Response<Bytes> {
    unavailable(
        "The file store is temporarily unavailable; request the file again later.",
        STORE_RETRY,
    )
}

/// `503 Service Unavailable` with a `transient` issue and `Retry-After` in delta seconds.
pub(crate) fn unavailable(diagnostics: &str, retry_after: Duration) -> Response<Bytes> {
    let mut response = error_response(
        StatusCode::SERVICE_UNAVAILABLE,
        IssueCode::Transient,
        diagnostics,
    );
    response
        .headers_mut()
        .insert(RETRY_AFTER, delta_seconds(retry_after));
    response
}

/// `429` + `throttled` OperationOutcome + delta-seconds `Retry-After` (KICK-8, STATUS-6; never an
/// absolute time).
pub(crate) fn throttled(diagnostics: &str, retry_after: Duration) -> Response<Bytes> {
    let mut response = error_response(
        StatusCode::TOO_MANY_REQUESTS,
        IssueCode::Throttled,
        diagnostics,
    );
    response
        .headers_mut()
        .insert(RETRY_AFTER, delta_seconds(retry_after));
    response
}

/// A `Retry-After` value in delta seconds (never an absolute time), at least 1.
pub(crate) fn delta_seconds(after: Duration) -> HeaderValue {
    HeaderValue::from(after.as_secs().max(1))
}

/// A response the layer writes itself: `status` + OperationOutcome.
pub(crate) fn synthesized(
    status: StatusCode,
    code: IssueCode,
    diagnostics: &str,
) -> crate::job::StoredResponse {
    crate::job::StoredResponse {
        status,
        headers: vec![(http::header::CONTENT_TYPE, FHIR_JSON)],
        body: operation_outcome_bytes(code, diagnostics),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_bodies_are_operation_outcomes() {
        let response = error_response(StatusCode::BAD_REQUEST, IssueCode::Invalid, "bad \"thing\"");
        assert_eq!(response.headers()[CONTENT_TYPE], "application/fhir+json");
        let body: serde_json::Value = serde_json::from_slice(response.body()).unwrap();
        assert_eq!(body["resourceType"], "OperationOutcome");
        assert_eq!(body["issue"][0]["code"], "invalid");
        assert_eq!(body["issue"][0]["diagnostics"], "bad \"thing\"");
    }

    // BUNDLE-11: the synthesized issue code follows the inner status.
    #[test]
    fn bundle_11_issue_code_for_status() {
        let cases = [
            (400, "invalid"),
            (401, "login"),
            (403, "forbidden"),
            (404, "not-found"),
            (409, "conflict"),
            (412, "conflict"),
            (422, "processing"),
            (500, "exception"),
            (502, "exception"),
            (504, "timeout"),
        ];
        for (status, code) in cases {
            let status = StatusCode::from_u16(status).unwrap();
            assert_eq!(IssueCode::for_status(status).as_str(), code, "{status}");
        }
    }

    // STATUS-15, AMB-31: `405` names the methods the route takes, in the body and in `Allow`.
    #[test]
    fn status_15_method_not_allowed_names_the_allowed_methods() {
        let response = method_not_allowed(&Method::PUT, "a job status URL", "GET, HEAD, DELETE");
        assert_eq!(response.status(), StatusCode::METHOD_NOT_ALLOWED);
        assert_eq!(response.headers()[ALLOW], "GET, HEAD, DELETE");
        let body: serde_json::Value = serde_json::from_slice(response.body()).unwrap();
        assert_eq!(body["issue"][0]["code"], "not-supported");
        assert_eq!(
            body["issue"][0]["diagnostics"],
            "PUT is not supported on a job status URL; use one of GET, HEAD, DELETE."
        );
    }

    // SEC-10: another caller's job is the very `404` of no job, unless `403` is configured.
    #[test]
    fn sec_10_a_foreign_job_looks_like_no_job() {
        let hidden = foreign_job(StatusCode::NOT_FOUND);
        assert_eq!(hidden.status(), StatusCode::NOT_FOUND);
        assert_eq!(hidden.body(), job_not_found().body());
        assert_eq!(
            foreign_job(StatusCode::FORBIDDEN).status(),
            StatusCode::FORBIDDEN
        );
    }

    // STATUS-11: a store outage is `503` + `transient` + `Retry-After`, never the job's failure.
    #[test]
    fn status_11_store_outages_are_transient_with_retry_after() {
        for response in [job_store_unavailable("poll"), file_store_unavailable()] {
            assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
            assert_eq!(response.headers()[RETRY_AFTER], "5");
            let body: serde_json::Value = serde_json::from_slice(response.body()).unwrap();
            assert_eq!(body["issue"][0]["code"], "transient");
        }
    }

    #[test]
    fn retry_after_is_delta_seconds_at_least_one() {
        assert_eq!(delta_seconds(Duration::ZERO), "1");
        assert_eq!(delta_seconds(Duration::from_millis(2500)), "2");
    }
}
