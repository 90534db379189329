//! How a FHIR interaction answers: status, resource or OperationOutcome body, `Location`,
//! `ETag` and `Last-Modified`. Kept apart from HTTP so a `batch` can turn the same answer into a
//! `Bundle.entry.response` instead of a response.

use std::sync::Arc;

use axum::body::Body;
use axum::response::{IntoResponse, Response};
use http::StatusCode;
use http::header::{CONTENT_TYPE, ETAG, HeaderValue, LAST_MODIFIED, LOCATION};
use serde_json::{Value, json};

use crate::db::Stored;
use crate::instant::{self, Millis};

pub(crate) const FHIR_JSON: &str = "application/fhir+json";

/// The body of an answer.
#[derive(Debug)]
pub(crate) enum Payload {
    Empty,
    Json(Value),
    /// A stored resource, serialised straight from the shared copy.
    Resource(Arc<Stored>),
}

/// One interaction's answer, success or failure alike.
#[derive(Debug)]
pub(crate) struct FhirResponse {
    pub(crate) status: StatusCode,
    pub(crate) payload: Payload,
    pub(crate) location: Option<String>,
    /// `(versionId, lastUpdated)`, rendered as `ETag` and `Last-Modified`.
    pub(crate) version: Option<(u64, Millis)>,
}

impl FhirResponse {
    pub(crate) fn json(status: StatusCode, body: Value) -> Self {
        Self {
            status,
            payload: Payload::Json(body),
            location: None,
            version: None,
        }
    }

    /// A resource with its version headers.
    pub(crate) fn resource(status: StatusCode, stored: Arc<Stored>) -> Self {
        Self {
            status,
            version: Some((stored.version, stored.updated)),
            payload: Payload::Resource(stored),
            location: None,
        }
    }

    pub(crate) fn empty(status: StatusCode) -> Self {
        Self {
            status,
            payload: Payload::Empty,
            location: None,
            version: None,
        }
    }

    /// An error: `code` is a FHIR IssueType (`invalid`, `not-found`, `login`, ...) and
    /// `diagnostics` tells the caller what was wrong and what to do.
    pub(crate) fn error(status: StatusCode, code: &str, diagnostics: impl Into<String>) -> Self {
        Self::json(status, outcome("error", code, &diagnostics.into()))
    }

    pub(crate) fn with_location(mut self, location: String) -> Self {
        self.location = Some(location);
        self
    }

    pub(crate) fn etag(&self) -> Option<String> {
        self.version.map(|(v, _)| format!("W/\"{v}\""))
    }

    pub(crate) fn last_modified(&self) -> Option<Millis> {
        self.version.map(|(_, t)| t)
    }

    /// The body as JSON (a batch embeds it in `entry.resource` or `entry.response.outcome`).
    pub(crate) fn into_body_json(self) -> Option<Value> {
        match self.payload {
            Payload::Empty => None,
            Payload::Json(value) => Some(value),
            Payload::Resource(stored) => Some(stored.resource.clone()),
        }
    }
}

/// An OperationOutcome with one issue.
pub(crate) fn outcome(severity: &str, code: &str, diagnostics: &str) -> Value {
    json!({
        "resourceType": "OperationOutcome",
        "issue": [{ "severity": severity, "code": code, "diagnostics": diagnostics }],
    })
}

impl IntoResponse for FhirResponse {
    fn into_response(self) -> Response {
        let bytes = match &self.payload {
            Payload::Empty => None,
            Payload::Json(value) => Some(serde_json::to_vec(value)),
            Payload::Resource(stored) => Some(serde_json::to_vec(&stored.resource)),
        };
        let mut response = match bytes {
            None => Response::new(Body::empty()),
            Some(Ok(bytes)) => {
                let mut response = Response::new(Body::from(bytes));
                response
                    .headers_mut()
                    .insert(CONTENT_TYPE, HeaderValue::from_static(FHIR_JSON));
                response
            }
            // A `Value` always serialises; this arm only keeps the type honest.
            Some(Err(err)) => {
                return FhirResponse::error(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "exception",
                    format!("could not serialise the response: {err}"),
                )
                .into_response();
            }
        };
        *response.status_mut() = self.status;
        let headers = response.headers_mut();
        let mut set = |name, value: Option<String>| {
            if let Some(value) = value.and_then(|v| HeaderValue::try_from(v).ok()) {
                headers.insert(name, value);
            }
        };
        set(ETAG, self.etag());
        set(LAST_MODIFIED, self.last_modified().map(instant::http_date));
        set(LOCATION, self.location);
        response
    }
}
