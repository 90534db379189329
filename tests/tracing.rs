//! Tracing: a span per job carrying its id, method and path, events for kick-off, completion
//! and cancel, and never a credential or a query string (SEC-11, SEC-12).

mod support;

use support::Captured;

use axum::Router;
use axum::routing::post;
use http::{Method, StatusCode};
use support::{TestClient, serve};
use tower_fhir_async::{AsyncLayer, MemoryStore};

const SECRET: &str = "s3cr3t-token-value";

// SEC-11, SEC-12, issue item 12: span fields and events; no credentials, no query in logs.
#[tokio::test(flavor = "current_thread")]
async fn sec_11_job_span_and_events_carry_no_credentials() {
    let captured = Captured::default();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(captured.clone())
        .with_ansi(false)
        .with_max_level(tracing::Level::DEBUG)
        .finish();
    // The current-thread runtime runs the spawned jobs on this thread, under this subscriber.
    let _guard = tracing::subscriber::set_default(subscriber);

    let layer = AsyncLayer::builder(MemoryStore::default()).build();
    let app = Router::new()
        .route(
            "/fhir/Observation",
            post(|| async { (StatusCode::CREATED, "") }),
        )
        .route("/fhir/$slow", post(std::future::pending::<&'static str>))
        .layer(layer);
    let addr = serve(app).await;
    let client = TestClient::default();
    let auth = format!("Bearer {SECRET}");
    let headers = [
        ("prefer", "respond-async"),
        ("authorization", auth.as_str()),
        ("cookie", "session=s3cr3t-token-value"),
    ];

    let url = format!("http://{addr}/fhir/Observation?patient=Zo%C3%AB-{SECRET}");
    let kick = client.send(Method::POST, &url, &headers, "{}").await;
    assert_eq!(kick.status, StatusCode::ACCEPTED);
    let status_url = kick.header("content-location").to_owned();
    assert_eq!(
        client.poll_until_done(&status_url, 100).await.status,
        StatusCode::OK
    );

    let slow = client
        .send(
            Method::POST,
            &format!("http://{addr}/fhir/$slow"),
            &headers,
            "",
        )
        .await;
    let slow_url = slow.header("content-location").to_owned();
    assert_eq!(client.delete(&slow_url).await.status, StatusCode::ACCEPTED);

    let logs = captured.text();
    let id = status_url.rsplit('/').next().unwrap();
    let slow_id = slow_url.rsplit('/').next().unwrap();
    assert!(logs.contains(&format!("job.id={id}")), "{logs}");
    assert!(logs.contains("http.method=POST"), "{logs}");
    assert!(logs.contains("http.path=/fhir/Observation"), "{logs}");
    assert!(logs.contains("asynchronous job accepted"), "{logs}");
    assert!(
        logs.contains("asynchronous job finished") && logs.contains("status=201"),
        "{logs}"
    );
    assert!(
        logs.contains(&format!("job.id={slow_id}")) && logs.contains("asynchronous job cancelled"),
        "{logs}"
    );
    assert!(
        !logs.contains(SECRET),
        "a credential or query value reached the logs:\n{logs}"
    );
    assert!(
        !logs.contains("patient="),
        "the query string reached the logs:\n{logs}"
    );
}
