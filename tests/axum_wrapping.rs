//! The ways an axum user applies the layer: `Router::layer`, and around a whole `Router` with
//! `ServiceBuilder` (served by `axum::serve` through an outer `Router::fallback_service`) (issue: "works as Router::layer … around a whole
//! axum Router, in ServiceBuilder").

mod support;

use axum::Router;
use axum::routing::{get, post};
use http::{Method, StatusCode};
use support::TestClient;
use tokio::net::TcpListener;
use tower::ServiceBuilder;
use tower_fhir_async::{AsyncLayer, MemoryStore};

const FHIR_JSON: [(http::header::HeaderName, &str); 1] =
    [(http::header::CONTENT_TYPE, "application/fhir+json")];

fn fhir_routes() -> Router {
    Router::new()
        .route(
            "/fhir/metadata",
            get(|| async { (FHIR_JSON, r#"{"resourceType":"CapabilityStatement"}"#) }),
        )
        .route(
            "/fhir/$reindex",
            post(|| async { (FHIR_JSON, r#"{"resourceType":"Parameters"}"#) }),
        )
}

// KICK-2, KICK-3, BUNDLE-1, SEL-1: the whole Router wrapped with ServiceBuilder.
#[tokio::test]
async fn kick_2_whole_router_wrapped_with_service_builder() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let layer = AsyncLayer::builder(MemoryStore::default())
        .base_url(format!("http://{addr}/fhir"))
        .build();
    let service = ServiceBuilder::new().layer(layer).service(fhir_routes());
    // `axum::serve` wants `Response<axum::body::Body>`; an outer Router takes any response body
    // and leaves paths as they are.
    let app = Router::new().fallback_service(service);
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    let client = TestClient::default();

    let kick = client
        .send(
            Method::POST,
            &format!("http://{addr}/fhir/$reindex"),
            &[("prefer", "respond-async")],
            "",
        )
        .await;
    assert_eq!(kick.status, StatusCode::ACCEPTED);
    let status_url = kick.header("content-location").to_owned();
    assert!(
        status_url.starts_with(&format!("http://{addr}/fhir/_async/")),
        "{status_url}"
    );
    let done = client.poll_until_done(&status_url, 100).await;
    assert_eq!(done.status, StatusCode::OK);
    assert_eq!(
        done.json()["entry"][0]["resource"]["resourceType"],
        "Parameters"
    );

    // SEL-1: metadata stays synchronous even with respond-async.
    let metadata = client
        .send(
            Method::GET,
            &format!("http://{addr}/fhir/metadata"),
            &[("prefer", "respond-async")],
            "",
        )
        .await;
    assert_eq!(metadata.status, StatusCode::OK);
    assert_eq!(metadata.json()["resourceType"], "CapabilityStatement");

    // Unknown paths still reach the Router's own fallback.
    assert_eq!(
        client
            .get(&format!("http://{addr}/fhir/nowhere"))
            .await
            .status,
        StatusCode::NOT_FOUND
    );
}

// STATUS-15, CANCEL-3: with `Router::layer`, the status routes are answered even though the Router
// has no such route (its default fallback is wrapped too).
#[tokio::test]
async fn status_15_router_layer_serves_status_routes_without_a_route() {
    let layer = AsyncLayer::builder(MemoryStore::default())
        .base_path("/fhir")
        .build();
    let addr = support::serve(fhir_routes().layer(layer)).await;
    let client = TestClient::default();
    let kick = client
        .send(
            Method::POST,
            &format!("http://{addr}/fhir/$reindex"),
            &[("prefer", "respond-async")],
            "",
        )
        .await;
    let status_url = kick.header("content-location").to_owned();
    assert!(
        status_url.starts_with(&format!("http://{addr}/fhir/_async/")),
        "{status_url}"
    );
    assert_eq!(
        client.poll_until_done(&status_url, 100).await.status,
        StatusCode::OK
    );
    assert_eq!(
        client.delete(&status_url).await.status,
        StatusCode::ACCEPTED
    );
    let gone = client.get(&status_url).await;
    assert_eq!(gone.status, StatusCode::NOT_FOUND);
    gone.assert_outcome("not-found");
}
