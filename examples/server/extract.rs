//! Extractors whose rejections are OperationOutcomes: axum's own answer bad paths and oversized
//! bodies in plain text, and every error from a FHIR server must be FHIR.

use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, PathRejection};
use axum::extract::{FromRequest, FromRequestParts, Path, Request};
use http::request::Parts;
use serde::de::DeserializeOwned;

use crate::response::FhirResponse;

/// `axum::extract::Path`, rejecting with an OperationOutcome.
pub(crate) struct FhirPath<T>(pub T);

impl<T, S> FromRequestParts<S> for FhirPath<T>
where
    T: DeserializeOwned + Send,
    S: Send + Sync,
{
    type Rejection = FhirResponse;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        match Path::<T>::from_request_parts(parts, state).await {
            Ok(Path(value)) => Ok(FhirPath(value)),
            Err(rejection) => Err(from_path(rejection)),
        }
    }
}

fn from_path(rejection: PathRejection) -> FhirResponse {
    FhirResponse::error(
        rejection.status(),
        "invalid",
        format!("the URL path is not usable: {}", rejection.body_text()),
    )
}

/// The whole request body as bytes, rejecting with an OperationOutcome (e.g. 413 `too-costly`
/// past axum's default 2 MB limit).
pub(crate) struct FhirBody(pub Bytes);

impl<S> FromRequest<S> for FhirBody
where
    S: Send + Sync,
{
    type Rejection = FhirResponse;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        match Bytes::from_request(req, state).await {
            Ok(bytes) => Ok(FhirBody(bytes)),
            Err(rejection) => Err(from_body(rejection)),
        }
    }
}

fn from_body(rejection: BytesRejection) -> FhirResponse {
    let status = rejection.status();
    let code = if status == http::StatusCode::PAYLOAD_TOO_LARGE {
        "too-costly"
    } else {
        "exception"
    };
    FhirResponse::error(
        status,
        code,
        format!("could not read the request body: {}", rejection.body_text()),
    )
}
