//! A result the store recorded although its answer was lost (issue #16, seen in the Redis
//! Cluster failover test: a write applied on the new master, its answer cut off by the store
//! timeout). The retry finds the job finished; that is the job's own result, not a refusal: no
//! "refused … discarded" error, no `fhir_async_results_refused_total`, the job counts as
//! completed (not lost: a lost bulk job's files would be removed under its recorded manifest),
//! and the result is served.
//! One test: the metrics recorder is process-global.

mod support;

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use axum::Router;
use axum::routing::post;
use http::{Method, StatusCode};
use metrics_util::debugging::{DebugValue, DebuggingRecorder};
use support::{TestClient, serve};
use tower_fhir_async::store::{DelegateStore, Transition};
use tower_fhir_async::{AsyncLayer, JobId, JobStore, MemoryStore, StoreError};

/// A store whose first recorded result lands but is answered `Unavailable`.
struct LostAnswer {
    inner: MemoryStore,
    lost: AtomicBool,
}

impl DelegateStore for LostAnswer {
    type Inner = MemoryStore;

    fn inner(&self) -> &MemoryStore {
        &self.inner
    }

    async fn transition(&self, id: &JobId, transition: Transition<'_>) -> Result<bool, StoreError> {
        let finishing = matches!(transition, Transition::Finish { .. });
        let applied = self.inner.transition(id, transition).await?;
        if finishing && applied && !self.lost.swap(true, Ordering::SeqCst) {
            return Err(StoreError::Unavailable(
                "the answer to a write that was applied was lost".into(),
            ));
        }
        Ok(applied)
    }
}

// STATUS-14 (issue #16): the result recorded by an attempt whose answer was lost is served, and
// the retry's "already finished" is not counted or logged as a refused result.
#[tokio::test(flavor = "multi_thread")]
async fn status_14_a_result_whose_answer_was_lost_is_not_refused() {
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    recorder
        .install()
        .expect("the only recorder of this test binary");
    let store = LostAnswer {
        inner: MemoryStore::default(),
        lost: AtomicBool::new(false),
    };
    let app = Router::new()
        .route(
            "/fhir/$instant",
            post(|| async {
                (
                    [(http::header::CONTENT_TYPE, "application/fhir+json")],
                    r#"{"resourceType":"Parameters"}"#,
                )
            }),
        )
        .layer(AsyncLayer::builder(store).base_path("/fhir").build());
    let base = format!("http://{}", serve(app).await);
    let client = TestClient::default();
    let kick = client
        .send(
            Method::POST,
            &format!("{base}/fhir/$instant"),
            &[("prefer", "respond-async")],
            "",
        )
        .await;
    assert_eq!(kick.status, StatusCode::ACCEPTED, "{kick:?}");
    let status_url = kick.header("content-location").to_owned();
    let deadline = Instant::now() + Duration::from_secs(10);
    let done = loop {
        let reply = client.get(&status_url).await;
        if reply.status != StatusCode::ACCEPTED {
            break reply;
        }
        assert!(Instant::now() < deadline, "still 202 after 10 s");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(done.status, StatusCode::OK, "{done:?}");
    assert_eq!(
        done.json()["entry"][0]["resource"]["resourceType"],
        "Parameters"
    );
    // The retry has happened by the time the result is readable (the first write landed, its
    // answer was an error, and the retry's answer decides what is logged and counted); give
    // the job's task a moment to finish its bookkeeping after the store answered.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut finished = 0;
    for (key, _, _, value) in snapshotter.snapshot().into_vec() {
        let name = key.key().name().to_owned();
        if name == "fhir_async_results_refused_total" {
            panic!("the job's own result was counted as refused: {value:?}");
        }
        if name == "fhir_async_jobs_finished_total" {
            let outcome = key
                .key()
                .labels()
                .find(|label| label.key() == "outcome")
                .map(|label| label.value().to_owned());
            assert_eq!(
                outcome.as_deref(),
                Some("completed"),
                "the job counts as completed, not lost"
            );
            if let DebugValue::Counter(n) = value {
                finished += n;
            }
        }
    }
    assert_eq!(finished, 1, "the job counts as finished once");
}
