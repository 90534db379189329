//! One log line per request (method, path, status, time), so the demo shows what the layer
//! answered itself and what reached the FHIR server. The path only: a query string can carry an
//! `access_token` or patient data (a search by name), and logs are no place for either (SEC-11,
//! SEC-12).

use std::time::Instant;

use axum::extract::Request;
use axum::middleware::Next;
use axum::response::Response;

pub(crate) async fn log(request: Request, next: Next) -> Response {
    let started = Instant::now();
    let method = request.method().clone();
    let path = request.uri().path().to_owned();
    let response = next.run(request).await;
    tracing::info!(
        %method,
        %path,
        status = response.status().as_u16(),
        elapsed_ms = started.elapsed().as_millis() as u64,
        "request"
    );
    response
}
