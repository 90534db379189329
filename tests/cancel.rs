//! Cancelling jobs with `DELETE` on the status URL (§2.7 CANCEL, §7 scenarios 15 and 16), over a
//! real socket unless a test says otherwise.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, SystemTime};

use axum::routing::post;
use axum::{Extension, Router};
use http::{Method, StatusCode};
use support::{BOUND, TestClient, assert_not_found, serve, within};
use tokio::sync::{Notify, mpsc, oneshot};
use tower_fhir_async::store::conformance::Transitions;
use tower_fhir_async::store::{DelegateStore, Transition};
use tower_fhir_async::{
    AsyncLayer, JobContext, JobId, JobKind, JobOutcome, JobRecord, JobStore, MemoryStore,
    StoreError, StoredResponse,
};

/// Sends a drop notice when the handler future that owns it is dropped.
struct DropGuard(Option<oneshot::Sender<()>>);

impl Drop for DropGuard {
    fn drop(&mut self) {
        if let Some(tx) = self.0.take() {
            let _ = tx.send(());
        }
    }
}

/// KICK-2, KICK-3: kicks off `POST {base}/$reindex` with a Parameters body; the status URL.
async fn reindex(client: &TestClient, base: &str) -> String {
    client
        .kick_off(
            Method::POST,
            &format!("{base}/$reindex"),
            &[("content-type", "application/fhir+json")],
            r#"{"resourceType":"Parameters"}"#,
        )
        .await
}

/// A handler that reports it started, then never finishes; its future owns a [`DropGuard`].
fn never_finishing(
    started: mpsc::UnboundedSender<()>,
    dropped: Arc<std::sync::Mutex<Option<oneshot::Sender<()>>>>,
) -> Router {
    Router::new().route(
        "/fhir/$reindex",
        post(move || {
            let started = started.clone();
            let guard = DropGuard(dropped.lock().unwrap().take());
            async move {
                let _guard = guard;
                let _ = started.send(());
                std::future::pending::<()>().await;
                "unreachable"
            }
        }),
    )
}

// CANCEL-1, CANCEL-2, CANCEL-3, CANCEL-7 (scenario 15): DELETE while running → 202; then GET →
// 404 + OO; DELETE again → 404 + OO; the record is gone from the store.
#[tokio::test]
async fn cancel_1_cancel_2_cancel_3_cancel_7_delete_while_running_then_404() {
    let store = MemoryStore::default();
    let (started_tx, mut started) = mpsc::unbounded_channel();
    let (dropped_tx, _dropped) = oneshot::channel();
    let app = never_finishing(started_tx, Arc::new(Some(dropped_tx).into()))
        .layer(AsyncLayer::builder(store.clone()).build());
    let base = format!("http://{}/fhir", serve(app).await);
    let client = TestClient::default();

    let status_url = reindex(&client, &base).await;
    within("the handler starting", started.recv()).await;
    let running = client.get(&status_url).await;
    assert_eq!(running.status, StatusCode::ACCEPTED, "{running:?}");
    assert_eq!(store.len(), 1);

    let cancelled = client.delete(&status_url).await;
    assert_eq!(cancelled.status, StatusCode::ACCEPTED, "{cancelled:?}");
    assert_eq!(store.len(), 0, "the cancelled job's record is removed");

    assert_not_found(&client.get(&status_url).await, "GET after DELETE");
    assert_not_found(&client.delete(&status_url).await, "second DELETE");
    assert_not_found(
        &client.get(&status_url).await,
        "GET after the second DELETE",
    );
}

// CANCEL-6 (design: cancels really stop work): after DELETE, the inner handler's future is
// dropped — the handler would otherwise wait forever.
#[tokio::test]
async fn cancel_6_delete_drops_the_running_handler_future() {
    let (started_tx, mut started) = mpsc::unbounded_channel();
    let (dropped_tx, mut dropped) = oneshot::channel();
    let app = never_finishing(started_tx, Arc::new(Some(dropped_tx).into()))
        .layer(AsyncLayer::new(MemoryStore::default()));
    let base = format!("http://{}/fhir", serve(app).await);
    let client = TestClient::default();

    let status_url = reindex(&client, &base).await;
    within("the handler starting", started.recv()).await;
    assert_eq!(client.get(&status_url).await.status, StatusCode::ACCEPTED);
    assert!(
        dropped.try_recv().is_err(),
        "the handler runs until the job is cancelled"
    );

    assert_eq!(
        client.delete(&status_url).await.status,
        StatusCode::ACCEPTED
    );
    within("the handler future being dropped", &mut dropped)
        .await
        .expect("the drop guard reported its drop");
}

// CANCEL-6: a handler that watches `JobContext::cancelled()` (here from work it moved to a task
// of its own) sees the cancellation of its job.
#[tokio::test]
async fn cancel_6_work_watching_job_context_sees_cancellation() {
    let (context_tx, mut contexts) = mpsc::unbounded_channel::<Option<JobContext>>();
    let (seen_tx, seen) = oneshot::channel::<()>();
    let seen_tx = Arc::new(std::sync::Mutex::new(Some(seen_tx)));
    let handler = move |job: Option<Extension<JobContext>>| {
        let context_tx = context_tx.clone();
        let seen_tx = seen_tx.lock().unwrap().take();
        async move {
            let job = job.map(|Extension(job)| job);
            if let (Some(job), Some(seen_tx)) = (job.clone(), seen_tx) {
                tokio::spawn(async move {
                    job.cancelled().await;
                    let _ = seen_tx.send(());
                });
            }
            let _ = context_tx.send(job);
            std::future::pending::<()>().await;
            "unreachable"
        }
    };
    let app = Router::new()
        .route("/fhir/$reindex", post(handler))
        .layer(AsyncLayer::new(MemoryStore::default()));
    let base = format!("http://{}/fhir", serve(app).await);
    let client = TestClient::default();

    let status_url = reindex(&client, &base).await;
    let job = within("the handler starting", contexts.recv())
        .await
        .expect("the channel is open")
        .expect("a replayed request carries a JobContext");
    assert_eq!(
        status_url.rsplit('/').next(),
        Some(job.id().to_string().as_str()),
        "the context names the job of this status URL"
    );
    assert!(!job.is_cancelled(), "not cancelled before the DELETE");

    assert_eq!(
        client.delete(&status_url).await.status,
        StatusCode::ACCEPTED
    );
    within("the watcher seeing the cancellation", seen)
        .await
        .expect("the watcher reported the cancellation");
    assert!(job.is_cancelled());
    within("JobContext::cancelled resolving", job.cancelled()).await;
}

// CANCEL-6: at the store, a job that finishes after its cancel stays cancelled: `finish` is
// refused and the record stays absent (first committed transition wins).
#[tokio::test]
async fn cancel_6_finish_after_cancel_is_refused_by_the_store() {
    let store = MemoryStore::default();
    let now = SystemTime::now();
    let record = JobRecord::new(
        JobId::new(),
        JobKind::Interaction,
        "POST",
        "/fhir/$reindex",
        now,
    );
    let id = record.id;
    store.create(record).await.unwrap();
    assert!(store.start(&id, "here", now + BOUND).await.unwrap());
    assert!(
        store.cancel(&id, now).await.unwrap(),
        "cancel of a running job"
    );

    let done = StoredResponse {
        status: StatusCode::OK,
        headers: Vec::new(),
        body: bytes::Bytes::from_static(b"{}"),
    };
    let finished = store
        .finish(
            &id,
            JobOutcome::Completed(done),
            now,
            now + Duration::from_secs(60),
        )
        .await
        .unwrap();
    assert!(!finished, "finish after cancel must be refused");
    assert_eq!(store.get(&id, now).await.unwrap(), None);
    assert_eq!(store.len(), 0, "nothing was resurrected");
}

// CANCEL-3, CANCEL-6: a DELETE racing the handler's completion: whichever commits first, once the
// DELETE answered 202 the job stays gone (404) on every later poll.
#[tokio::test]
async fn cancel_3_cancel_6_cancel_racing_completion_never_resurrects_the_job() {
    let store = MemoryStore::default();
    let (started_tx, mut started) = mpsc::unbounded_channel();
    let release = Arc::new(Notify::new());
    let handler = {
        let release = release.clone();
        move || {
            let (started_tx, release) = (started_tx.clone(), release.clone());
            async move {
                let _ = started_tx.send(());
                release.notified().await;
                (StatusCode::CREATED, r#"{"resourceType":"Parameters"}"#)
            }
        }
    };
    let app = Router::new()
        .route("/fhir/$reindex", post(handler))
        .layer(AsyncLayer::new(store.clone()));
    let base = format!("http://{}/fhir", serve(app).await);
    let client = TestClient::default();

    let status_url = reindex(&client, &base).await;
    within("the handler starting", started.recv()).await;
    release.notify_one();
    let cancelled = client.delete(&status_url).await;
    assert_eq!(cancelled.status, StatusCode::ACCEPTED, "{cancelled:?}");

    for poll in 0..10 {
        assert_not_found(&client.get(&status_url).await, &format!("poll {poll}"));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(store.len(), 0, "no record came back");
}

// CANCEL-5 (scenario 16): DELETE after completion → 202; the result is gone (404) and its record
// is deleted from the store.
#[tokio::test]
async fn cancel_5_delete_after_completion_removes_the_result() {
    let store = MemoryStore::default();
    let app = Router::new()
        .route(
            "/fhir/$reindex",
            post(|| async { (StatusCode::CREATED, r#"{"resourceType":"Parameters"}"#) }),
        )
        .layer(AsyncLayer::new(store.clone()));
    let base = format!("http://{}/fhir", serve(app).await);
    let client = TestClient::default();

    let status_url = reindex(&client, &base).await;
    let done = client.poll_until_done(&status_url, 250).await;
    assert_eq!(done.status, StatusCode::OK, "{done:?}");
    assert_eq!(done.json()["entry"][0]["response"]["status"], "201 Created");
    assert_eq!(store.len(), 1, "the result is held");

    let deleted = client.delete(&status_url).await;
    assert_eq!(deleted.status, StatusCode::ACCEPTED, "{deleted:?}");
    assert_eq!(store.len(), 0, "the result's record is deleted");
    assert_not_found(&client.get(&status_url).await, "GET after DELETE");
    assert_not_found(&client.delete(&status_url).await, "second DELETE");
}

// CANCEL-7, STATUS-15: DELETE of an unknown or malformed job id → 404 + OO `not-found`, and it
// touches no real job.
#[tokio::test]
async fn cancel_7_delete_of_unknown_or_malformed_id_is_404() {
    let store = MemoryStore::default();
    let app = Router::new()
        .route("/fhir/$reindex", post(|| async { "{}" }))
        .layer(AsyncLayer::new(store.clone()));
    let base = format!("http://{}/fhir", serve(app).await);
    let client = TestClient::default();

    let status_url = reindex(&client, &base).await;
    let (status_prefix, real_id) = status_url.rsplit_once('/').unwrap();
    let real_id = real_id.to_owned();
    for id in [
        JobId::new().to_string(),
        "not-a-job".to_owned(),
        real_id.to_uppercase(),
        real_id[..31].to_owned(),
        format!("{real_id}0"),
        format!("{real_id}/extra"),
        "..%2F..%2Fetc%2Fpasswd".to_owned(),
    ] {
        let url = format!("{status_prefix}/{id}");
        assert_not_found(&client.delete(&url).await, &format!("DELETE {url}"));
    }
    assert_eq!(store.len(), 1, "the real job was not touched");
    let done = client.poll_until_done(&status_url, 250).await;
    assert_eq!(done.status, StatusCode::OK, "{done:?}");
}

// CANCEL-6: a job cancelled before it started never reaches the inner service. A kick-off
// with an Idempotency-Key (of a known caller) is recorded, answered, and only then started (others are created
// running; for those, cancelling a job that waits for a place to run is `tests/job_queue.rs`).
// The store holds the job between being recorded and being started until the DELETE has been
// answered.
#[tokio::test]
async fn cancel_6_cancel_before_start_never_calls_the_inner_service() {
    let store = GatedStore::default();
    let (reached, open, mut started) = (
        store.reached.clone(),
        store.open.clone(),
        store.take_started(),
    );
    let calls = Arc::new(AtomicUsize::new(0));
    let handler = {
        let calls = calls.clone();
        move || {
            calls.fetch_add(1, Ordering::SeqCst);
            async { "{}" }
        }
    };
    let app = Router::new().route("/fhir/$reindex", post(handler)).layer(
        AsyncLayer::builder(store.clone())
            .caller_from_header(http::HeaderName::from_static("x-client"))
            .build(),
    );
    let base = format!("http://{}/fhir", serve(app).await);
    let client = TestClient::default();

    let status_url = client
        .kick_off(
            Method::POST,
            &format!("{base}/$reindex"),
            &[
                ("content-type", "application/fhir+json"),
                ("idempotency-key", "cancel-before-start"),
                ("x-client", "client-1"),
            ],
            r#"{"resourceType":"Parameters"}"#,
        )
        .await;
    within("the job reaching its start", reached.notified()).await;
    let cancelled = client
        .send(Method::DELETE, &status_url, &[("x-client", "client-1")], "")
        .await;
    assert_eq!(cancelled.status, StatusCode::ACCEPTED, "{cancelled:?}");

    open.notify_one();
    let was_started = within("the job's start", started.recv())
        .await
        .expect("the store reports the start");
    assert!(!was_started, "a cancelled job must not start");
    for poll in 0..5 {
        let polled = client
            .send(Method::GET, &status_url, &[("x-client", "client-1")], "")
            .await;
        assert_not_found(&polled, &format!("poll {poll}"));
    }
    assert_eq!(
        calls.load(Ordering::SeqCst),
        0,
        "the inner service was never called"
    );
    assert_eq!(store.memory.len(), 0);
}

/// A `MemoryStore` whose `start` waits until the test opens the gate, and reports its answer.
#[derive(Clone)]
struct GatedStore {
    memory: MemoryStore,
    reached: Arc<Notify>,
    open: Arc<Notify>,
    started_tx: mpsc::UnboundedSender<bool>,
    started_rx: Arc<std::sync::Mutex<Option<mpsc::UnboundedReceiver<bool>>>>,
}

impl Default for GatedStore {
    fn default() -> Self {
        let (started_tx, started_rx) = mpsc::unbounded_channel();
        Self {
            memory: MemoryStore::default(),
            reached: Arc::default(),
            open: Arc::default(),
            started_tx,
            started_rx: Arc::new(Some(started_rx).into()),
        }
    }
}

impl GatedStore {
    fn take_started(&self) -> mpsc::UnboundedReceiver<bool> {
        self.started_rx.lock().unwrap().take().expect("taken once")
    }
}

impl DelegateStore for GatedStore {
    type Inner = MemoryStore;

    fn inner(&self) -> &MemoryStore {
        &self.memory
    }

    async fn transition(&self, id: &JobId, transition: Transition<'_>) -> Result<bool, StoreError> {
        if !matches!(transition, Transition::Start { .. }) {
            return self.memory.transition(id, transition).await;
        }
        self.reached.notify_one();
        self.open.notified().await;
        let started = self.memory.transition(id, transition).await;
        if let Ok(started) = &started {
            let _ = self.started_tx.send(*started);
        }
        started
    }
}
