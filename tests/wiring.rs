//! Issue #14 item 3: the wrong wiring is hard to miss. A layer placed where it sees paths without
//! the prefix its status URLs carry (inside `Router::nest`) still answers `202`, but those URLs
//! never reach it; the layer says so, once, at warn level. The right wiring works and says nothing.

mod support;

use axum::Router;
use axum::routing::get;
use http::{Method, StatusCode};
use support::{Captured, TestClient, serve};
use tower_fhir_async::{AsyncLayer, MemoryStore};

fn capture() -> (Captured, tracing::subscriber::DefaultGuard) {
    let captured = Captured::default();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(captured.clone())
        .with_ansi(false)
        .with_max_level(tracing::Level::WARN)
        .finish();
    (captured, tracing::subscriber::set_default(subscriber))
}

fn patients() -> Router {
    Router::new().route(
        "/Patient",
        get(|| async {
            (
                [("content-type", "application/fhir+json")],
                r#"{"resourceType":"Bundle","type":"searchset","total":0}"#,
            )
        }),
    )
}

const WARNING: &str = "outside the layer's base path";

// KICK-2, STATUS-1: inside `Router::nest` the layer sees `/Patient`, not `/fhir/Patient`; its
// status URL (under `/fhir`) answers 404, and the layer reports the wiring once at warn level.
#[tokio::test(flavor = "current_thread")]
async fn kick_2_a_layer_inside_nest_is_reported_once() {
    let (captured, _guard) = capture();
    let addr = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap()
    };
    let layer = AsyncLayer::builder(MemoryStore::new())
        .base_url(format!("http://{addr}/fhir"))
        .build();
    // The wrong wiring: the layer inside the nested router.
    let app = Router::new().nest("/fhir", patients().layer(layer));
    let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    let client = TestClient::default();
    let url = format!("http://{addr}/fhir/Patient");
    let headers = [("prefer", "respond-async")];
    for _ in 0..2 {
        let kick = client.send(Method::GET, &url, &headers, "").await;
        assert_eq!(kick.status, StatusCode::ACCEPTED, "{kick:?}");
        let status = client.get(kick.header("content-location")).await;
        assert_eq!(
            status.status,
            StatusCode::NOT_FOUND,
            "the trap itself: {status:?}"
        );
    }
    let logged = captured.text();
    assert_eq!(logged.matches(WARNING).count(), 1, "{logged}");
    assert!(logged.contains("Router::nest"), "{logged}");
    assert!(logged.contains(r#"path="/Patient""#), "{logged}");
}

// KICK-2, STATUS-1: the layer around the router that holds the whole paths: the status URL
// works, and nothing is reported.
#[tokio::test(flavor = "current_thread")]
async fn kick_2_the_right_wiring_works_and_is_not_reported() {
    let (captured, _guard) = capture();
    let layer = AsyncLayer::builder(MemoryStore::new()).build();
    let app = Router::new().nest("/fhir", patients()).layer(layer);
    let addr = serve(app).await;
    let client = TestClient::default();
    let kick = client
        .send(
            Method::GET,
            &format!("http://{addr}/fhir/Patient"),
            &[("prefer", "respond-async")],
            "",
        )
        .await;
    assert_eq!(kick.status, StatusCode::ACCEPTED, "{kick:?}");
    let done = client
        .poll_until_done(kick.header("content-location"), 100)
        .await;
    assert_eq!(done.status, StatusCode::OK, "{done:?}");
    let logged = captured.text();
    assert!(!logged.contains(WARNING), "{logged}");
}
