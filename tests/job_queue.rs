//! Bounded job concurrency (issue #15): at most `max_concurrent_jobs` jobs execute at once on an
//! instance; the rest wait in the order they were accepted, shown as `X-Progress: queued`,
//! cancellable, drained or failed at shutdown, and covered by their instance's lease.
//!
//! The jobs are `POST /fhir/$hold?n=N` calls whose handler reports that it started (with its
//! `n`) and then waits until the test releases one job, so which job runs when never depends on
//! scheduling.

mod support;

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use axum::Router;
use axum::extract::Query;
use axum::routing::post;
use http::{Method, StatusCode};
use serde_json::Value;
use support::{TestClient, serve, within};
use tokio::sync::{Semaphore, mpsc};
use tower_fhir_async::{AsyncLayer, AsyncLayerBuilder, JobStore, MemoryStore, ShutdownHandle};

#[derive(serde::Deserialize)]
struct Hold {
    n: u32,
}

/// Jobs that report their start on `started` and end, one per permit, as `release` gets them.
fn holding(started: mpsc::UnboundedSender<u32>, release: Arc<Semaphore>) -> Router {
    Router::new().route(
        "/fhir/$hold",
        post(move |Query(hold): Query<Hold>| {
            let (started, release) = (started.clone(), release.clone());
            async move {
                let _ = started.send(hold.n);
                release.acquire().await.expect("never closed").forget();
                support::fhir_json(
                    StatusCode::OK,
                    &serde_json::json!({"resourceType": "Parameters", "id": hold.n.to_string()}),
                )
            }
        }),
    )
}

struct Harness {
    client: TestClient,
    base: String,
    started: mpsc::UnboundedReceiver<u32>,
    release: Arc<Semaphore>,
    shutdown: ShutdownHandle,
}

impl Harness {
    async fn new(layer: AsyncLayerBuilder) -> Self {
        let (started_tx, started) = mpsc::unbounded_channel();
        let release = Arc::new(Semaphore::new(0));
        let layer = layer.build();
        let shutdown = layer.shutdown_handle();
        let app = holding(started_tx, release.clone()).layer(layer);
        Self {
            client: TestClient::default(),
            base: format!("http://{}/fhir", serve(app).await),
            started,
            release,
            shutdown,
        }
    }

    async fn kick_off(&self, n: u32) -> String {
        self.client
            .kick_off(Method::POST, &format!("{}/$hold?n={n}", self.base), &[], "")
            .await
    }

    async fn next_started(&mut self) -> u32 {
        within("a job starting", self.started.recv())
            .await
            .expect("the server is up")
    }

    /// The `X-Progress` of a job still in progress.
    async fn progress(&self, status_url: &str) -> String {
        let reply = self.client.get(status_url).await;
        assert_eq!(reply.status, StatusCode::ACCEPTED, "{reply:?}");
        reply
            .headers
            .get("x-progress")
            .map(|v| v.to_str().unwrap().to_owned())
            .unwrap_or_default()
    }

    /// Polls until the job ended; its Bundle's only entry.
    async fn result(&self, status_url: &str) -> Value {
        let reply = self.client.poll_until_done(status_url, 500).await;
        assert_eq!(reply.status, StatusCode::OK, "{reply:?}");
        reply.json()["entry"][0].clone()
    }

    /// No job starts while every other task gets to run for a while.
    async fn assert_none_started(&mut self) {
        for _ in 0..20 {
            tokio::time::sleep(Duration::from_millis(5)).await;
            if let Ok(n) = self.started.try_recv() {
                panic!("job {n} started although no place was free");
            }
        }
    }
}

fn limited(limit: usize) -> AsyncLayerBuilder {
    AsyncLayer::builder(MemoryStore::new())
        .base_path("/fhir")
        .max_concurrent_jobs(limit)
}

// Issue #15, STATUS-3, STATUS-4: with one place, the second and third jobs wait (202,
// `X-Progress: queued`) without reaching the inner service, then run one by one in the order
// they were accepted; a job that waited shows `running` once it runs.
#[tokio::test]
async fn status_3_status_4_jobs_beyond_the_limit_wait_in_order_as_queued() {
    let mut harness = Harness::new(limited(1)).await;
    let first = harness.kick_off(1).await;
    assert_eq!(harness.next_started().await, 1);
    let second = harness.kick_off(2).await;
    let third = harness.kick_off(3).await;
    harness.assert_none_started().await;
    assert_eq!(harness.progress(&second).await, "queued");
    assert_eq!(harness.progress(&third).await, "queued");
    assert_eq!(
        harness.progress(&first).await,
        "",
        "the running job shows no queue"
    );

    harness.release.add_permits(1);
    assert_eq!(harness.result(&first).await["resource"]["id"], "1");
    assert_eq!(
        harness.next_started().await,
        2,
        "accepted second, runs second"
    );
    assert_eq!(harness.progress(&second).await, "running");
    assert_eq!(harness.progress(&third).await, "queued");
    harness.assert_none_started().await;

    harness.release.add_permits(1);
    assert_eq!(harness.result(&second).await["resource"]["id"], "2");
    assert_eq!(harness.next_started().await, 3);
    harness.release.add_permits(1);
    assert_eq!(harness.result(&third).await["resource"]["id"], "3");
}

// Issue #15: with two places, two jobs run at once and the third waits.
#[tokio::test]
async fn as_many_jobs_run_at_once_as_there_are_places() {
    let mut harness = Harness::new(limited(2)).await;
    let first = harness.kick_off(1).await;
    let second = harness.kick_off(2).await;
    let mut running = [harness.next_started().await, harness.next_started().await];
    running.sort_unstable();
    assert_eq!(running, [1, 2]);
    let third = harness.kick_off(3).await;
    harness.assert_none_started().await;
    assert_eq!(harness.progress(&third).await, "queued");
    harness.release.add_permits(1);
    assert_eq!(harness.next_started().await, 3);
    harness.release.add_permits(2);
    for url in [first, second, third] {
        harness.result(&url).await;
    }
}

// Issue #15, CANCEL-1, CANCEL-2, CANCEL-6: a queued job can be cancelled: DELETE → 202, then 404; it never
// reaches the inner service, and the jobs behind it move up.
#[tokio::test]
async fn cancel_1_cancel_2_cancel_6_a_queued_job_is_cancelled_and_never_runs() {
    let mut harness = Harness::new(limited(1)).await;
    let first = harness.kick_off(1).await;
    assert_eq!(harness.next_started().await, 1);
    let second = harness.kick_off(2).await;
    let third = harness.kick_off(3).await;
    assert_eq!(harness.progress(&second).await, "queued");

    let deleted = harness.client.delete(&second).await;
    assert_eq!(deleted.status, StatusCode::ACCEPTED, "{deleted:?}");
    support::assert_not_found(&harness.client.get(&second).await, "a cancelled queued job");

    harness.release.add_permits(1);
    harness.result(&first).await;
    assert_eq!(
        harness.next_started().await,
        3,
        "the cancelled job was skipped"
    );
    harness.release.add_permits(1);
    harness.result(&third).await;
    harness.assert_none_started().await;
}

// Issue #15, KICK-5: a bulk kick-off whose job has to wait answers 202 at once instead of
// waiting `kickoff_wait` for an inner answer that cannot come before the job runs.
#[cfg(feature = "bulk")]
#[tokio::test]
async fn kick_5_a_queued_bulk_kick_off_answers_202_without_waiting_for_the_inner_service() {
    let (started_tx, mut started) = mpsc::unbounded_channel();
    let release = Arc::new(Semaphore::new(0));
    let holding = holding(started_tx, release.clone());
    let exporting = holding.route(
        "/fhir/Patient",
        axum::routing::get(|| async {
            support::fhir_json(
                StatusCode::OK,
                &serde_json::json!({"resourceType": "Bundle", "type": "searchset", "entry": []}),
            )
        }),
    );
    let layer = limited(1).kickoff_wait(Duration::from_secs(10)).build();
    let base = format!("http://{}/fhir", serve(exporting.layer(layer)).await);
    let client = TestClient::default();
    let held = client
        .kick_off(Method::POST, &format!("{base}/$hold?n=1"), &[], "")
        .await;
    within("the held job starting", started.recv()).await;
    // `within` allows far less than the 10 s kick-off wait.
    let export = within(
        "a queued bulk kick-off's answer",
        client.kick_off(
            Method::GET,
            &format!("{base}/Patient?_outputFormat=application/fhir%2Bndjson"),
            &[],
            "",
        ),
    )
    .await;
    assert_eq!(
        client.get(&export).await.headers["x-progress"],
        "queued",
        "the export waits for the held job"
    );
    release.add_permits(1);
    assert_eq!(
        client.poll_until_done(&held, 500).await.status,
        StatusCode::OK
    );
    let manifest = client.poll_until_done(&export, 500).await;
    assert_eq!(manifest.status, StatusCode::OK, "{manifest:?}");
    assert!(manifest.json()["output"].is_array(), "{manifest:?}");
}

// Issue #15, STATUS-10: shutdown drains the queue within its grace period: the running job and
// the queued one both finish when released in time.
#[tokio::test]
async fn status_10_shutdown_drains_queued_jobs_within_the_grace_period() {
    let mut harness = Harness::new(limited(1)).await;
    let first = harness.kick_off(1).await;
    assert_eq!(harness.next_started().await, 1);
    let second = harness.kick_off(2).await;
    let handle = harness.shutdown.clone();
    let shutdown = tokio::spawn(async move { handle.shutdown(Duration::from_secs(30)).await });
    harness.release.add_permits(2);
    let report = within("shutdown", shutdown).await.expect("shutdown task");
    assert_eq!(report.stopped, 0, "{report:?}");
    for url in [first, second] {
        let done = harness.client.get(&url).await;
        assert_eq!(done.status, StatusCode::OK, "{done:?}");
        assert_eq!(done.json()["entry"][0]["response"]["status"], "200 OK");
    }
}

// Issue #15, STATUS-10, E5: a job still queued when the grace period ends never runs; it is
// recorded as failed (503 `transient`), like a running job that was stopped.
#[tokio::test]
async fn status_10_jobs_still_queued_when_grace_ends_are_failed() {
    let mut harness = Harness::new(limited(1)).await;
    let first = harness.kick_off(1).await;
    assert_eq!(harness.next_started().await, 1);
    let second = harness.kick_off(2).await;
    let report = within(
        "shutdown",
        harness.shutdown.shutdown(Duration::from_millis(200)),
    )
    .await;
    assert_eq!(
        report.stopped, 2,
        "the running and the queued job: {report:?}"
    );
    for url in [first, second] {
        let done = harness.client.get(&url).await;
        assert_eq!(done.status, StatusCode::OK, "{done:?}");
        let entry = &done.json()["entry"][0];
        assert_eq!(
            entry["response"]["status"], "503 Service Unavailable",
            "{entry}"
        );
        assert_eq!(
            entry["response"]["outcome"]["issue"][0]["code"],
            "transient"
        );
    }
    assert!(
        harness.started.try_recv().is_err(),
        "the queued job never reached the inner service"
    );
}

const LEASE: Duration = Duration::from_secs(1);

/// An instance on `store` with a one-second lease and one place to run.
fn instance(store: &MemoryStore, name: &str) -> AsyncLayerBuilder {
    AsyncLayer::builder(store.clone())
        .base_path("/fhir")
        .instance_id(name)
        .lease(LEASE)
        .max_concurrent_jobs(1)
}

// Issue #15, STATUS-10 (several instances): a queued job is under its instance's lease. While
// the instance lives, another instance's watcher leaves it alone however long it waits; once
// the instance dies (its runtime gone, nothing renews), its queued job is failed as lost like
// its running one, never left at 202.
#[test]
fn status_10_leases_cover_queued_jobs_and_a_dead_instance_queue_is_failed() {
    let store = MemoryStore::new();
    // Instance "a" lives on a runtime of its own, dropped to kill it.
    let dying = tokio::runtime::Runtime::new().unwrap();
    let (started_tx, mut started) = mpsc::unbounded_channel();
    let (base_a, running, queued) = dying.block_on(async {
        let app =
            holding(started_tx, Arc::new(Semaphore::new(0))).layer(instance(&store, "a").build());
        let base = format!("http://{}/fhir", serve(app).await);
        let client = TestClient::default();
        let running = client
            .kick_off(Method::POST, &format!("{base}/$hold?n=1"), &[], "")
            .await;
        within("the first job starting", started.recv()).await;
        let queued = client
            .kick_off(Method::POST, &format!("{base}/$hold?n=2"), &[], "")
            .await;
        (base, running, queued)
    });
    let living = tokio::runtime::Runtime::new().unwrap();
    let base_b = living.block_on(async {
        let app = holding(mpsc::unbounded_channel().0, Arc::new(Semaphore::new(0)))
            .layer(instance(&store, "b").build());
        let base_b = format!("http://{}/fhir", serve(app).await);
        let client = TestClient::default();
        let through_b = |url: &str| {
            assert!(url.starts_with(&base_a), "{url} is on a");
            url.replace(&base_a, &base_b)
        };
        // Three leases pass while "a" lives: b's watcher runs, and the queued job stays queued.
        for _ in 0..6 {
            tokio::time::sleep(LEASE / 2).await;
            let reply = client.get(&through_b(&queued)).await;
            assert_eq!(reply.status, StatusCode::ACCEPTED, "{reply:?}");
        }
        // The progress reached the store with one of a's lease renewals.
        assert_eq!(
            client.get(&through_b(&queued)).await.headers["x-progress"],
            "queued",
            "a's queue is visible through b"
        );
        base_b
    });
    // "a" dies: its tasks are gone, nothing renews its leases.
    dying.shutdown_background();
    living.block_on(async {
        let client = TestClient::default();
        for url in [&running, &queued] {
            let url = url.replace(&base_a, &base_b);
            let reply = within("the dead instance's job failed", async {
                loop {
                    let reply = client.get(&url).await;
                    if reply.status != StatusCode::ACCEPTED {
                        return reply;
                    }
                    tokio::time::sleep(LEASE / 4).await;
                }
            })
            .await;
            assert_eq!(reply.status, StatusCode::OK, "{reply:?}");
            let entry = &reply.json()["entry"][0];
            assert_eq!(
                entry["response"]["status"], "503 Service Unavailable",
                "{entry}"
            );
        }
        let id = support::parse_job_id(&queued);
        let record = store.get(&id, SystemTime::now()).await.unwrap();
        assert!(
            record.is_some_and(|r| r.state.is_finished()),
            "the queued job is recorded as ended"
        );
    });
}
