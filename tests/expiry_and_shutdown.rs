//! Retention and expiry of results (§2.8 EXPIRE, §7 scenario 19) and graceful shutdown, driven
//! in process with paused tokio time: the layer's clock follows tokio's, so `advance` moves it.
//!
//! Under paused time, spawned jobs run only when the test task yields, so the tests yield (in
//! bounded loops) wherever a job has to make progress.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::Router;
use axum::routing::post;
use http::{Method, Request, StatusCode};
use http_body_util::BodyExt;
use support::{Reply, assert_not_found};
use tokio::sync::{Notify, oneshot};
use tower::ServiceExt;
use tower_fhir_async::{AsyncLayer, AsyncLayerBuilder, MemoryStore};

const BASE: &str = "http://fhir.test/fhir";
const HOUR: Duration = Duration::from_secs(3600);

fn builder(store: &MemoryStore) -> AsyncLayerBuilder {
    AsyncLayer::builder(store.clone()).base_url(BASE)
}

/// Sends one request to a clone of `app`, in process.
async fn send(app: &Router, method: Method, uri: &str, prefer: Option<&str>) -> Reply {
    let mut request = Request::builder().method(method).uri(uri);
    if let Some(prefer) = prefer {
        request = request.header("prefer", prefer);
    }
    let request = request.body(axum::body::Body::empty()).unwrap();
    let response = app.clone().oneshot(request).await.unwrap();
    let (parts, body) = response.into_parts();
    let body = body.collect().await.unwrap().to_bytes();
    Reply {
        status: parts.status,
        headers: parts.headers,
        body,
    }
}

async fn get(app: &Router, uri: &str) -> Reply {
    send(app, Method::GET, uri, None).await
}

/// Kicks off `POST {BASE}{op}` and returns the status URL's path.
async fn kick_off(app: &Router, op: &str) -> String {
    let reply = send(
        app,
        Method::POST,
        &format!("/fhir{op}"),
        Some("respond-async"),
    )
    .await;
    assert_eq!(reply.status, StatusCode::ACCEPTED, "kick-off: {reply:?}");
    reply
        .header("content-location")
        .strip_prefix("http://fhir.test")
        .expect("the status URL is under the base URL")
        .to_owned()
}

/// Lets spawned tasks run without moving the clock.
async fn settle() {
    for _ in 0..20 {
        tokio::task::yield_now().await;
    }
}

/// Polls until the job is no longer running (at most 100 polls, yielding in between).
async fn poll_until_done(app: &Router, uri: &str) -> Reply {
    for _ in 0..100 {
        let reply = get(app, uri).await;
        if reply.status != StatusCode::ACCEPTED {
            return reply;
        }
        settle().await;
    }
    panic!("job at {uri} still running after 100 polls");
}

/// Yields until `count` reaches `at_least` (bounded).
async fn until_count(count: &AtomicUsize, at_least: usize, what: &str) {
    for _ in 0..100 {
        if count.load(Ordering::SeqCst) >= at_least {
            return;
        }
        tokio::task::yield_now().await;
    }
    panic!("{what}: count stayed at {}", count.load(Ordering::SeqCst));
}

/// Awaits `fut` for at most a day of paused time. A future that can never finish leaves the
/// runtime idle, so the bound elapses at once instead of hanging the test.
async fn bounded<T>(what: &str, fut: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(24 * HOUR, fut)
        .await
        .unwrap_or_else(|_| panic!("{what} never finished"))
}

/// An app whose `$create` answers 201 with a resource at once.
fn instant_app(layer: AsyncLayer) -> Router {
    Router::new()
        .route(
            "/fhir/$create",
            post(|| async {
                (
                    StatusCode::CREATED,
                    [("content-type", "application/fhir+json")],
                    r#"{"resourceType":"Observation","id":"obs-1"}"#,
                )
            }),
        )
        .layer(layer)
}

/// Sends a drop notice when the handler future that owns it is dropped.
struct DropGuard(Option<oneshot::Sender<()>>);

impl Drop for DropGuard {
    fn drop(&mut self) {
        if let Some(tx) = self.0.take() {
            let _ = tx.send(());
        }
    }
}

// EXPIRE-1, EXPIRE-3, STATUS-14 (scenario 19): with 60 s retention the result is served, byte for
// byte, until it expires; then 404 + OO `not-found` although the record is still held (reads
// ignore expired records, no sweep needed); the sweeper then reclaims it.
#[tokio::test(start_paused = true)]
async fn expire_1_expire_3_status_14_result_served_until_retention_then_404() {
    let store = MemoryStore::default();
    let layer = builder(&store).retention(Duration::from_secs(60)).build();
    let app = instant_app(layer.clone());

    let status = kick_off(&app, "/$create").await;
    let first = poll_until_done(&app, &status).await;
    assert_eq!(first.status, StatusCode::OK, "{first:?}");
    assert_eq!(
        first.json()["entry"][0]["response"]["status"],
        "201 Created"
    );
    assert!(first.headers.contains_key("expires"), "{first:?}");

    tokio::time::advance(Duration::from_secs(59)).await;
    let later = get(&app, &status).await;
    assert_eq!(later.status, StatusCode::OK, "59 s after completion");
    assert_eq!(later.body, first.body, "the same body on every poll");
    assert_eq!(later.headers.get("expires"), first.headers.get("expires"));

    tokio::time::advance(Duration::from_secs(2)).await;
    assert_not_found(&get(&app, &status).await, "61 s after completion");
    assert_eq!(store.len(), 1, "expired, but not swept yet");

    let sweeper = tokio::spawn(layer.sweeper(Duration::from_secs(10)));
    for _ in 0..10 {
        if store.is_empty() {
            break;
        }
        tokio::time::advance(Duration::from_secs(10)).await;
        settle().await;
    }
    sweeper.abort();
    assert_eq!(store.len(), 0, "the sweeper reclaimed the expired record");
    assert_not_found(&get(&app, &status).await, "after the sweep");
}

// EXPIRE-1: the sweeper deletes expired records only; a job still within its retention stays
// readable while an older one is reclaimed.
#[tokio::test(start_paused = true)]
async fn expire_1_sweeper_reclaims_only_expired_jobs() {
    let store = MemoryStore::default();
    let layer = builder(&store).retention(Duration::from_secs(60)).build();
    let app = instant_app(layer.clone());

    let old = kick_off(&app, "/$create").await;
    assert_eq!(poll_until_done(&app, &old).await.status, StatusCode::OK);
    tokio::time::advance(Duration::from_secs(30)).await;
    let young = kick_off(&app, "/$create").await;
    assert_eq!(poll_until_done(&app, &young).await.status, StatusCode::OK);
    assert_eq!(store.len(), 2);

    // Expiries: old at +60 s, young at +90 s. Step 10 s at a time from +30 s; stop before +90 s.
    let sweeper = tokio::spawn(layer.sweeper(Duration::from_secs(10)));
    settle().await;
    for _ in 0..5 {
        if store.len() == 1 {
            break;
        }
        tokio::time::advance(Duration::from_secs(10)).await;
        settle().await;
    }
    assert_eq!(store.len(), 1, "only the expired job was reclaimed");
    assert_not_found(&get(&app, &old).await, "the old job");
    assert_eq!(
        get(&app, &young).await.status,
        StatusCode::OK,
        "the young job"
    );
    sweeper.abort();
}

// EXPIRE-4: the default retention is 24 hours after completion.
#[tokio::test(start_paused = true)]
async fn expire_4_default_retention_is_24_hours() {
    let store = MemoryStore::default();
    let app = instant_app(builder(&store).build());

    let status = kick_off(&app, "/$create").await;
    assert_eq!(poll_until_done(&app, &status).await.status, StatusCode::OK);

    tokio::time::advance(23 * HOUR).await;
    assert_eq!(
        get(&app, &status).await.status,
        StatusCode::OK,
        "after 23 h"
    );

    tokio::time::advance(HOUR + Duration::from_secs(1)).await;
    assert_not_found(&get(&app, &status).await, "after 24 h + 1 s");
}

// CANCEL-7, EXPIRE-3: DELETE of an expired job → 404 + OO, like an unknown one.
#[tokio::test(start_paused = true)]
async fn cancel_7_expire_3_delete_of_an_expired_job_is_404() {
    let store = MemoryStore::default();
    let app = instant_app(builder(&store).retention(Duration::from_secs(60)).build());

    let status = kick_off(&app, "/$create").await;
    assert_eq!(poll_until_done(&app, &status).await.status, StatusCode::OK);
    tokio::time::advance(Duration::from_secs(61)).await;
    assert_not_found(
        &send(&app, Method::DELETE, &status, None).await,
        "DELETE after expiry",
    );
}

// [DESIGN] shutdown (issue item 11), STATUS-10: once shutdown begins a new kick-off → 503 +
// `transient` + delta-seconds `Retry-After` and nothing is recorded; a job that finishes within
// the grace period is recorded as completed; status and cancel routes keep answering during and
// after shutdown.
#[tokio::test(start_paused = true)]
async fn design_shutdown_refuses_new_jobs_and_lets_running_ones_finish() {
    let store = MemoryStore::default();
    let layer = builder(&store).build();
    let started = Arc::new(AtomicUsize::new(0));
    let release = Arc::new(Notify::new());
    let handler = {
        let (started, release) = (started.clone(), release.clone());
        move || {
            let (started, release) = (started.clone(), release.clone());
            async move {
                started.fetch_add(1, Ordering::SeqCst);
                release.notified().await;
                (
                    StatusCode::CREATED,
                    [("content-type", "application/fhir+json")],
                    r#"{"resourceType":"Observation","id":"obs-1"}"#,
                )
            }
        }
    };
    let app = Router::new()
        .route("/fhir/$slow", post(handler))
        .layer(layer.clone());

    let running = kick_off(&app, "/$slow").await;
    until_count(&started, 1, "the job starting").await;

    let handle = layer.shutdown_handle();
    assert!(!handle.is_shutting_down());
    let shutdown = tokio::spawn({
        let handle = handle.clone();
        async move { handle.shutdown(Duration::from_secs(30)).await }
    });
    for _ in 0..100 {
        if handle.is_shutting_down() {
            break;
        }
        tokio::task::yield_now().await;
    }
    assert!(handle.is_shutting_down(), "shutdown began");

    let refused = send(&app, Method::POST, "/fhir/$slow", Some("respond-async")).await;
    assert_eq!(
        refused.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "{refused:?}"
    );
    refused.assert_outcome("transient");
    let retry: u64 = refused
        .header("retry-after")
        .parse()
        .expect("Retry-After in delta seconds");
    assert!(retry >= 1);
    assert_eq!(store.len(), 1, "the refused kick-off recorded nothing");
    assert_eq!(started.load(Ordering::SeqCst), 1, "nor reached the handler");

    let polled = get(&app, &running).await;
    assert_eq!(
        polled.status,
        StatusCode::ACCEPTED,
        "polls during shutdown: {polled:?}"
    );
    assert!(
        !shutdown.is_finished(),
        "shutdown waits for the running job"
    );

    release.notify_one();
    let report = bounded("shutdown", shutdown).await.expect("shutdown task");
    assert_eq!(report.finished, 1, "{report:?}");
    assert_eq!(report.stopped, 0, "{report:?}");

    let done = get(&app, &running).await;
    assert_eq!(done.status, StatusCode::OK, "{done:?}");
    let bundle = done.json();
    assert_eq!(bundle["type"], "batch-response");
    assert_eq!(bundle["entry"][0]["response"]["status"], "201 Created");

    let after = send(&app, Method::POST, "/fhir/$slow", Some("respond-async")).await;
    assert_eq!(after.status, StatusCode::SERVICE_UNAVAILABLE, "{after:?}");
    after.assert_outcome("transient");
    let deleted = send(&app, Method::DELETE, &running, None).await;
    assert_eq!(
        deleted.status,
        StatusCode::ACCEPTED,
        "cancel after shutdown: {deleted:?}"
    );
    assert_not_found(&get(&app, &running).await, "after the DELETE");
}

// [DESIGN] shutdown, E5, STATUS-10: a job still running when the grace period ends is stopped
// (its future dropped) and recorded as failed: 200 + Bundle whose entry is `503 Service
// Unavailable` with a `transient` outcome. A job that finishes within the grace period completes.
#[tokio::test(start_paused = true)]
async fn design_shutdown_stops_jobs_still_running_when_grace_ends() {
    let store = MemoryStore::default();
    let layer = builder(&store).build();
    let started = Arc::new(AtomicUsize::new(0));
    let (dropped_tx, mut dropped) = oneshot::channel();
    let dropped_tx = Arc::new(std::sync::Mutex::new(Some(dropped_tx)));
    let stuck = {
        let started = started.clone();
        move || {
            let started = started.clone();
            let guard = DropGuard(dropped_tx.lock().unwrap().take());
            async move {
                let _guard = guard;
                started.fetch_add(1, Ordering::SeqCst);
                std::future::pending::<()>().await;
                "unreachable"
            }
        }
    };
    let quick = {
        let started = started.clone();
        move || {
            let started = started.clone();
            async move {
                started.fetch_add(1, Ordering::SeqCst);
                // Within the grace period below.
                tokio::time::sleep(Duration::from_secs(5)).await;
                (
                    StatusCode::CREATED,
                    [("content-type", "application/fhir+json")],
                    r#"{"resourceType":"Observation","id":"obs-1"}"#,
                )
            }
        }
    };
    let app = Router::new()
        .route("/fhir/$stuck", post(stuck))
        .route("/fhir/$quick", post(quick))
        .layer(layer.clone());

    let stuck_job = kick_off(&app, "/$stuck").await;
    let quick_job = kick_off(&app, "/$quick").await;
    until_count(&started, 2, "both jobs starting").await;

    let handle = layer.shutdown_handle();
    let report = bounded("shutdown", handle.shutdown(Duration::from_secs(10))).await;
    assert_eq!(report.stopped, 1, "{report:?}");
    assert_eq!(report.finished, 1, "{report:?}");
    assert!(
        dropped.try_recv().is_ok(),
        "the stuck handler's future was dropped"
    );

    let failed = get(&app, &stuck_job).await;
    assert_eq!(failed.status, StatusCode::OK, "{failed:?}");
    let bundle = failed.json();
    assert_eq!(bundle["type"], "batch-response");
    let response = &bundle["entry"][0]["response"];
    assert_eq!(response["status"], "503 Service Unavailable", "{bundle}");
    assert_eq!(response["outcome"]["resourceType"], "OperationOutcome");
    assert_eq!(response["outcome"]["issue"][0]["code"], "transient");

    let completed = get(&app, &quick_job).await;
    assert_eq!(completed.status, StatusCode::OK, "{completed:?}");
    assert_eq!(
        completed.json()["entry"][0]["response"]["status"],
        "201 Created"
    );

    // The cancel route still answers after shutdown.
    let deleted = send(&app, Method::DELETE, &stuck_job, None).await;
    assert_eq!(deleted.status, StatusCode::ACCEPTED, "{deleted:?}");
    assert_not_found(&get(&app, &stuck_job).await, "after the DELETE");
}
