//! Idempotent kick-off (issue #7 item 6): an `Idempotency-Key`, scoped to the caller, names the
//! job a repeated kick-off already started; never across callers, never a cancelled or failed
//! job; ignored without caller binding. Over a real socket.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::Router;
use axum::routing::post;
use http::{HeaderName, Method, StatusCode};
use support::{Reply, TestClient, serve, within};
use tower_fhir_async::{AsyncLayer, AsyncLayerBuilder, MemoryStore};

/// How long (on the paused clock) the layer is left to run once the expected work has started.
const SETTLE: Duration = Duration::from_secs(60);

/// A server whose `$count` answers at once and `$hang` never does; `calls` counts both.
async fn start(layer: AsyncLayerBuilder) -> (String, Arc<AtomicUsize>) {
    let calls = Arc::new(AtomicUsize::new(0));
    let (counted, hung) = (calls.clone(), calls.clone());
    let app = Router::new()
        .route(
            "/fhir/$count",
            post(move || {
                counted.fetch_add(1, Ordering::SeqCst);
                async {
                    (
                        [("content-type", "application/fhir+json")],
                        "{\"resourceType\":\"Parameters\"}",
                    )
                }
            }),
        )
        .route(
            "/fhir/$hang",
            post(move || {
                hung.fetch_add(1, Ordering::SeqCst);
                async {
                    std::future::pending::<()>().await;
                    ""
                }
            }),
        )
        .layer(layer.build());
    (format!("http://{}", serve(app).await), calls)
}

fn layer() -> AsyncLayerBuilder {
    AsyncLayer::builder(MemoryStore::default())
        .base_path("/fhir")
        .caller_from_header(HeaderName::from_static("x-client"))
}

async fn kick(client: &TestClient, url: &str, caller: Option<&str>, key: Option<&str>) -> Reply {
    let mut headers = vec![("prefer", "respond-async")];
    headers.extend(caller.map(|c| ("x-client", c)));
    headers.extend(key.map(|k| ("idempotency-key", k)));
    client.send(Method::POST, url, &headers, "").await
}

fn location(reply: &Reply) -> String {
    assert_eq!(reply.status, StatusCode::ACCEPTED, "{reply:?}");
    reply.header("content-location").to_owned()
}

/// Waits (bounded) until the work ran `want` times, then checks that it ran no more often.
///
/// The tests run on tokio's paused clock: a sleep ends only when no task can make progress, and
/// then jumps to the next timer. So once the count is reached, a long sleep lets every job the
/// kick-offs spawned — and every timer of the layer within a minute — run to where it waits;
/// a second run of any job's work would have been counted by then, whatever the machine's speed.
async fn ran(calls: &AtomicUsize, want: usize) {
    within("the jobs' work starting", async {
        while calls.load(Ordering::SeqCst) < want {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    tokio::time::sleep(SETTLE).await;
    assert_eq!(
        calls.load(Ordering::SeqCst),
        want,
        "each job's work ran once"
    );
}

async fn poll(client: &TestClient, url: &str, caller: &str) -> Reply {
    for _ in 0..500 {
        let reply = client
            .send(Method::GET, url, &[("x-client", caller)], "")
            .await;
        if reply.status != StatusCode::ACCEPTED {
            return reply;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("{url} did not finish");
}

// KICK-9, issue #7 item 6: a repeated kick-off with the same key and caller names the first job,
// running or completed, and the work runs once; another caller's same key is its own job.
#[tokio::test(start_paused = true)]
async fn idempotency_key_is_scoped_to_the_caller() {
    let (base, calls) = start(layer()).await;
    let client = TestClient::default();
    let url = format!("{base}/fhir/$hang");
    let first = location(&kick(&client, &url, Some("alice"), Some("k-1")).await);
    let again = location(&kick(&client, &url, Some("alice"), Some("k-1")).await);
    assert_eq!(first, again, "a repeat names the running job");
    let bob = location(&kick(&client, &url, Some("bob"), Some("k-1")).await);
    assert_ne!(first, bob, "never across callers");
    let other_key = location(&kick(&client, &url, Some("alice"), Some("k-2")).await);
    assert_ne!(first, other_key);
    let plain = location(&kick(&client, &url, Some("alice"), None).await);
    assert_ne!(first, plain, "no key, no idempotency");
    // Bob's view of Alice's job stays a 404 (SEC-10), whatever key he uses.
    let peek = client
        .send(Method::GET, &first, &[("x-client", "bob")], "")
        .await;
    assert_eq!(peek.status, StatusCode::NOT_FOUND, "{peek:?}");

    let url = format!("{base}/fhir/$count");
    let done = location(&kick(&client, &url, Some("alice"), Some("once")).await);
    assert_eq!(poll(&client, &done, "alice").await.status, StatusCode::OK);
    let repeat = location(&kick(&client, &url, Some("alice"), Some("once")).await);
    assert_eq!(done, repeat, "a repeat names the completed job");
    assert_eq!(poll(&client, &repeat, "alice").await.status, StatusCode::OK);

    // Four `$hang` jobs were started (first, bob, other_key, plain) and one `$count`.
    ran(&calls, 5).await;
}

// CANCEL-3, issue #7 item 6: a cancelled job is never named again; the key starts a new one.
#[tokio::test(start_paused = true)]
async fn a_cancelled_job_is_not_reused() {
    let (base, _) = start(layer()).await;
    let client = TestClient::default();
    let url = format!("{base}/fhir/$hang");
    let first = location(&kick(&client, &url, Some("alice"), Some("k")).await);
    let deleted = client
        .send(Method::DELETE, &first, &[("x-client", "alice")], "")
        .await;
    assert_eq!(deleted.status, StatusCode::ACCEPTED, "{deleted:?}");
    let second = location(&kick(&client, &url, Some("alice"), Some("k")).await);
    assert_ne!(first, second);
    let gone = client
        .send(Method::GET, &first, &[("x-client", "alice")], "")
        .await;
    assert_eq!(gone.status, StatusCode::NOT_FOUND, "{gone:?}");
}

// Issue #7 item 6: a failed job (here: stopped at its run-time limit) is never named again.
#[tokio::test(start_paused = true)]
async fn a_failed_job_is_not_reused() {
    let (base, calls) = start(layer().max_run_time(Duration::from_millis(100))).await;
    let client = TestClient::default();
    let url = format!("{base}/fhir/$hang");
    let first = location(&kick(&client, &url, Some("alice"), Some("k")).await);
    let failed = poll(&client, &first, "alice").await;
    assert_eq!(failed.status, StatusCode::OK, "{failed:?}");
    assert_eq!(
        failed.json()["entry"][0]["response"]["status"],
        "504 Gateway Timeout"
    );
    let second = location(&kick(&client, &url, Some("alice"), Some("k")).await);
    assert_ne!(first, second, "a failed job is not reused");
    ran(&calls, 2).await;
}

// SEC-10: without caller binding the key is ignored (a guessed key would otherwise reveal
// another client's status URL).
#[tokio::test(start_paused = true)]
async fn without_caller_binding_the_key_is_ignored() {
    let (base, calls) = start(AsyncLayer::builder(MemoryStore::default()).base_path("/fhir")).await;
    let client = TestClient::default();
    let url = format!("{base}/fhir/$hang");
    let first = location(&kick(&client, &url, None, Some("k")).await);
    let second = location(&kick(&client, &url, None, Some("k")).await);
    assert_ne!(first, second);
    ran(&calls, 2).await;
}

// KICK-5: an unusable key is refused at kick-off with 400 + OperationOutcome, and no job runs.
#[tokio::test(start_paused = true)]
async fn bad_keys_are_refused() {
    let (base, calls) = start(layer()).await;
    let client = TestClient::default();
    let url = format!("{base}/fhir/$count");
    let long = "k".repeat(256);
    for key in ["", "two words", long.as_str()] {
        let reply = kick(&client, &url, Some("alice"), Some(key)).await;
        assert_eq!(reply.status, StatusCode::BAD_REQUEST, "{key:?}: {reply:?}");
        reply.assert_outcome("invalid");
    }
    let twice = client
        .send(
            Method::POST,
            &url,
            &[
                ("prefer", "respond-async"),
                ("x-client", "alice"),
                ("idempotency-key", "a"),
                ("idempotency-key", "b"),
            ],
            "",
        )
        .await;
    assert_eq!(twice.status, StatusCode::BAD_REQUEST, "{twice:?}");
    let ok = kick(&client, &url, Some("alice"), Some(&"k".repeat(255))).await;
    assert_eq!(ok.status, StatusCode::ACCEPTED, "{ok:?}");
    ran(&calls, 1).await;
}
