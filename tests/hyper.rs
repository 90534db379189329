//! The layer as plain tower middleware on hyper 1 + hyper-util, without axum:
//! `ServiceBuilder::new().layer(layer).service_fn(..)` with `RequestBody<Incoming>` requests and
//! `Full<Bytes>` responses.

mod support;

use std::convert::Infallible;

use bytes::Bytes;
use http::header::CONTENT_TYPE;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use serde_json::json;
use support::{TestClient, serve_hyper};
use tower::ServiceBuilder;
use tower_fhir_async::{AsyncLayer, MemoryStore, RequestBody};

const FHIR: &str = "application/fhir+json";

/// The wrapped FHIR service: echoes what it received, including which kind of body it was given
/// (also as the `x-request-body` header, for pass-through requests).
async fn echo(
    request: Request<RequestBody<Incoming>>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let kind = if request.body().is_buffered() {
        "buffered"
    } else {
        "streaming"
    };
    let (parts, body) = request.into_parts();
    let body = match body.collect().await {
        Ok(collected) => String::from_utf8_lossy(&collected.to_bytes()).into_owned(),
        Err(error) => format!("<body read failed: {error}>"),
    };
    let resource = json!({
        "resourceType": "Basic",
        "id": "echo",
        "method": parts.method.as_str(),
        "target": parts.uri.path_and_query().map(|pq| pq.as_str()),
        "requestBody": kind,
        "body": body,
    });
    let response = Response::builder()
        .status(StatusCode::OK)
        .header(CONTENT_TYPE, FHIR)
        .header("x-request-body", kind)
        .body(Full::new(Bytes::from(resource.to_string())))
        .expect("a valid response");
    Ok(response)
}

/// Serves `echo` behind the layer, with hyper.
async fn serve_echo() -> std::net::SocketAddr {
    let layer = AsyncLayer::builder(MemoryStore::default()).build();
    serve_hyper(ServiceBuilder::new().layer(layer).service_fn(echo)).await
}

// KICK-2, KICK-3, BUNDLE-1, BUNDLE-2, BUNDLE-9: kick-off → poll → Bundle through a hyper service.
#[tokio::test]
async fn kick_2_service_fn_on_hyper_kicks_off_and_completes_with_a_bundle() {
    let addr = serve_echo().await;
    let client = TestClient::default();
    let reply = client
        .send(
            Method::GET,
            &format!("http://{addr}/Patient?name=smith"),
            &[("prefer", "respond-async")],
            "",
        )
        .await;
    assert_eq!(reply.status, StatusCode::ACCEPTED, "{reply:?}");
    assert_eq!(reply.header("preference-applied"), "respond-async");
    let location = reply.header("content-location").to_owned();
    assert!(
        location.starts_with(&format!("http://{addr}/_async/")),
        "{location}"
    );

    let done = client.poll_until_done(&location, 150).await;
    assert_eq!(done.status, StatusCode::OK, "{done:?}");
    assert_eq!(done.header("content-type"), FHIR);
    let bundle = done.json();
    assert_eq!(bundle["resourceType"], "Bundle", "{bundle}");
    assert_eq!(bundle["type"], "batch-response", "{bundle}");
    assert_eq!(
        bundle["entry"].as_array().map(Vec::len),
        Some(1),
        "{bundle}"
    );
    let entry = &bundle["entry"][0];
    assert_eq!(entry["response"]["status"], "200 OK", "{bundle}");
    assert_eq!(entry["resource"]["method"], "GET", "{bundle}");
    assert_eq!(
        entry["resource"]["target"], "/Patient?name=smith",
        "{bundle}"
    );
}

// SEL-2, KICK-1 ([DESIGN] pass-through is untouched): without `respond-async` the inner service
// gets the caller's body as a stream, and its answer comes back as is.
#[tokio::test]
async fn sel_2_pass_through_request_body_streams_to_the_inner_service() {
    let addr = serve_echo().await;
    let client = TestClient::default();
    // Large enough to arrive in several reads.
    let body = "0123456789abcdef".repeat(16 * 1024);
    let reply = client
        .send(
            Method::POST,
            &format!("http://{addr}/Observation"),
            &[("content-type", FHIR), ("prefer", "return=minimal")],
            &body,
        )
        .await;
    assert_eq!(reply.status, StatusCode::OK, "{:?}", reply.headers);
    assert!(
        reply.headers.get("content-location").is_none(),
        "{:?}",
        reply.headers
    );
    assert_eq!(reply.header("x-request-body"), "streaming");
    let echoed = reply.json();
    assert_eq!(echoed["resourceType"], "Basic");
    assert_eq!(echoed["requestBody"], "streaming");
    assert_eq!(echoed["method"], "POST");
    assert!(
        echoed["body"] == body.as_str(),
        "the streamed body arrived changed ({} bytes sent)",
        body.len()
    );
}

// KICK-1, KICK-9: a POST kick-off's body is buffered and arrives whole in the replayed request.
#[tokio::test]
async fn kick_1_post_kick_off_body_arrives_in_the_replayed_request() {
    let addr = serve_echo().await;
    let client = TestClient::default();
    let body = r#"{"resourceType":"Parameters","parameter":[{"name":"count","valueInteger":3}]}"#;
    let reply = client
        .send(
            Method::POST,
            &format!("http://{addr}/$reindex"),
            &[("prefer", "respond-async"), ("content-type", FHIR)],
            body,
        )
        .await;
    assert_eq!(reply.status, StatusCode::ACCEPTED, "{reply:?}");
    let done = client
        .poll_until_done(reply.header("content-location"), 150)
        .await;
    assert_eq!(done.status, StatusCode::OK, "{done:?}");
    let bundle = done.json();
    let seen = &bundle["entry"][0]["resource"];
    assert_eq!(seen["method"], "POST", "{bundle}");
    assert_eq!(seen["target"], "/$reindex", "{bundle}");
    assert_eq!(seen["requestBody"], "buffered", "{bundle}");
    assert_eq!(seen["body"], body, "{bundle}");
}
