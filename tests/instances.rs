//! Several instances sharing one store: polls and cancels through any instance, leases, and
//! jobs of a lost instance (issue #4 items 4 and 5). Two layers with their own instance ids
//! share one `MemoryStore` (clones share jobs); the shared backends run the same scenarios in
//! their own test files.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use axum::Router;
use axum::body::Body;
use axum::routing::post;
use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::BodyExt;
use tokio::sync::oneshot;
use tower::ServiceExt;
use tower_fhir_async::store::conformance::Transitions;
use tower_fhir_async::{AsyncLayer, JobContext, JobId, JobKind, JobRecord, JobStore, MemoryStore};

const BASE: &str = "http://fhir.test/fhir";
const LEASE: Duration = Duration::from_secs(3);

/// Sends `guard` when dropped: proof that a job's work was stopped.
struct DropGuard(Option<oneshot::Sender<()>>);

impl Drop for DropGuard {
    fn drop(&mut self) {
        if let Some(tx) = self.0.take() {
            let _ = tx.send(());
        }
    }
}

fn instance(store: &MemoryStore, name: &str) -> AsyncLayer {
    AsyncLayer::builder(store.clone())
        .base_url(BASE)
        .instance_id(name)
        .lease(LEASE)
        .build()
}

/// A router whose `$hold` runs until dropped, reporting 40 % and signalling its drop.
fn app(layer: AsyncLayer, dropped: Arc<std::sync::Mutex<Option<oneshot::Sender<()>>>>) -> Router {
    Router::new()
        .route(
            "/fhir/$hold",
            post(move |job: Option<axum::Extension<JobContext>>| {
                let guard = DropGuard(dropped.lock().unwrap().take());
                async move {
                    if let Some(axum::Extension(job)) = job {
                        job.set_percent(40);
                    }
                    let _guard = guard;
                    std::future::pending::<()>().await;
                    Ok::<_, Infallible>("")
                }
            }),
        )
        .layer(layer)
}

async fn send(
    app: &Router,
    method: Method,
    uri: &str,
    prefer: bool,
) -> (StatusCode, http::HeaderMap, Bytes) {
    let mut request = Request::builder().method(method).uri(uri);
    if prefer {
        request = request.header("prefer", "respond-async");
    }
    let response = app
        .clone()
        .oneshot(request.body(Body::empty()).unwrap())
        .await
        .unwrap();
    let (parts, body) = response.into_parts();
    (
        parts.status,
        parts.headers,
        body.collect().await.unwrap().to_bytes(),
    )
}

fn path_of(location: &str) -> String {
    location
        .strip_prefix("http://fhir.test")
        .expect("a status URL under the base")
        .to_owned()
}

/// Lets spawned tasks run and the paused clock move on by `by`.
async fn pass(by: Duration) {
    tokio::time::sleep(by).await;
    for _ in 0..10 {
        tokio::task::yield_now().await;
    }
}

// CANCEL-1…3, issue #4 item 5: a DELETE through instance B stops the work running on A, within
// a third of the lease even without a push channel; A's progress is visible through B.
#[tokio::test(start_paused = true)]
async fn cancel_3_delete_through_another_instance_stops_the_work() {
    let store = MemoryStore::default();
    let (dropped_tx, dropped_rx) = oneshot::channel();
    let a = app(
        instance(&store, "a"),
        Arc::new(std::sync::Mutex::new(Some(dropped_tx))),
    );
    let b = app(instance(&store, "b"), Arc::new(std::sync::Mutex::new(None)));

    let (status, headers, _) = send(&a, Method::POST, "/fhir/$hold", true).await;
    assert_eq!(status, StatusCode::ACCEPTED);
    let location = path_of(headers["content-location"].to_str().unwrap());
    pass(LEASE / 3 + Duration::from_millis(100)).await;

    // STATUS-4 across instances: progress written by A's watcher, read through B.
    let (status, headers, _) = send(&b, Method::GET, &location, false).await;
    assert_eq!(status, StatusCode::ACCEPTED);
    assert_eq!(headers["x-progress"], "40% complete");

    let (status, _, _) = send(&b, Method::DELETE, &location, false).await;
    assert_eq!(status, StatusCode::ACCEPTED);
    pass(LEASE / 3 + Duration::from_millis(100)).await;
    tokio::time::timeout(Duration::from_secs(1), dropped_rx)
        .await
        .expect("A stopped the job within a third of the lease")
        .expect("the guard was dropped");
    assert_eq!(
        send(&a, Method::GET, &location, false).await.0,
        StatusCode::NOT_FOUND
    );
}

// Issue #4 item 4, STATUS-10: a job whose instance died (its lease lapsed) is recorded as failed
// by any other instance, with a 503 `transient` entry, so no poller waits forever.
#[tokio::test(start_paused = true)]
async fn lost_instance_jobs_fail_once_their_lease_lapses() {
    let store = MemoryStore::default();
    let b = app(instance(&store, "b"), Arc::new(std::sync::Mutex::new(None)));
    // What instance "dead" left behind: a running job it will never renew or finish.
    let id = JobId::new();
    let now = SystemTime::now();
    store
        .create(JobRecord::new(
            id,
            JobKind::Interaction,
            "POST",
            "/fhir/$hold",
            now,
        ))
        .await
        .unwrap();
    assert!(store.start(&id, "dead", now + LEASE).await.unwrap());
    let location = format!("/fhir/_async/{id}");

    let (status, _, _) = send(&b, Method::GET, &location, false).await;
    assert_eq!(
        status,
        StatusCode::ACCEPTED,
        "still running before the lease lapses"
    );
    let mut answer = None;
    for _ in 0..10 {
        pass(LEASE / 3).await;
        let (status, _, body) = send(&b, Method::GET, &location, false).await;
        if status == StatusCode::OK {
            answer = Some(body);
            break;
        }
        assert_eq!(status, StatusCode::ACCEPTED);
    }
    let body = answer.expect("the job was recorded as failed within a few lease periods");
    let bundle: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(
        bundle["entry"][0]["response"]["status"], "503 Service Unavailable",
        "{bundle}"
    );
    assert_eq!(
        bundle["entry"][0]["response"]["outcome"]["issue"][0]["code"],
        "transient"
    );
}

// Issue #4 item 4: a live instance keeps its job's lease, however long the job runs.
#[tokio::test(start_paused = true)]
async fn leases_of_running_jobs_are_renewed() {
    let store = MemoryStore::default();
    let a = app(instance(&store, "a"), Arc::new(std::sync::Mutex::new(None)));
    let b = app(instance(&store, "b"), Arc::new(std::sync::Mutex::new(None)));
    let (_, headers, _) = send(&a, Method::POST, "/fhir/$hold", true).await;
    let location = path_of(headers["content-location"].to_str().unwrap());
    // B polls (and so watches for lost instances) while ten leases' worth of time passes.
    for _ in 0..30 {
        pass(LEASE / 3).await;
        assert_eq!(
            send(&b, Method::GET, &location, false).await.0,
            StatusCode::ACCEPTED
        );
    }
}
