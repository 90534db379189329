//! `--compress`: gzip for clients that accept it, around the FHIR routes (inside the async
//! layer). Answers are small here, so each is compressed whole.

use async_compression::tokio::bufread::GzipEncoder;
use axum::body::Body;
use axum::extract::Request;
use axum::middleware::Next;
use axum::response::Response;
use http::HeaderValue;
use http::header::{ACCEPT_ENCODING, CONTENT_ENCODING, CONTENT_LENGTH, VARY};
use http_body_util::BodyExt;
use tokio::io::AsyncReadExt;

/// Whether `Accept-Encoding` names gzip (or `*`) with a quality above zero.
fn accepts_gzip(request: &Request) -> bool {
    request
        .headers()
        .get_all(ACCEPT_ENCODING)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|item| {
            let mut parts = item.split(';');
            let coding = parts.next().unwrap_or_default().trim();
            let zero = parts.any(|p| {
                p.trim()
                    .strip_prefix("q=")
                    .and_then(|q| q.trim().parse::<f32>().ok())
                    == Some(0.0)
            });
            (coding.eq_ignore_ascii_case("gzip") || coding == "*") && !zero
        })
}

pub(crate) async fn gzip(request: Request, next: Next) -> Response {
    let gzip = accepts_gzip(&request);
    let response = next.run(request).await;
    if !gzip || response.headers().contains_key(CONTENT_ENCODING) {
        return response;
    }
    let (mut parts, body) = response.into_parts();
    let Ok(collected) = body.collect().await else {
        return Response::from_parts(parts, Body::empty());
    };
    let plain = collected.to_bytes();
    let mut zipped = Vec::new();
    if GzipEncoder::new(&plain[..])
        .read_to_end(&mut zipped)
        .await
        .is_err()
    {
        return Response::from_parts(parts, Body::from(plain));
    }
    parts
        .headers
        .insert(CONTENT_ENCODING, HeaderValue::from_static("gzip"));
    parts.headers.remove(CONTENT_LENGTH);
    parts
        .headers
        .append(VARY, HeaderValue::from_static("Accept-Encoding"));
    Response::from_parts(parts, Body::from(zipped))
}
