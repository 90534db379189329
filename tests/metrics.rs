//! Metrics through the `metrics` facade (issue #7 item 7): requests by action and outcome, jobs
//! running, jobs finished by outcome, job duration. One test: the recorder is process-global.

mod support;

use std::time::Duration;

use axum::Router;
use axum::routing::post;
use http::{Method, StatusCode};
use std::collections::HashMap;

use metrics_util::debugging::{DebugValue, DebuggingRecorder, Snapshotter};
use support::{TestClient, serve};
use tokio::sync::Notify;
use tower_fhir_async::{AsyncLayer, MemoryStore};

/// What the recorder saw. Its snapshots reset every value to zero, so they are added up here:
/// counters and histograms accumulate, and the gauges (only ever incremented and decremented)
/// are the sums of their deltas.
#[derive(Default)]
struct Seen {
    counters: HashMap<Name, u64>,
    gauges: HashMap<String, f64>,
    histograms: HashMap<Name, Vec<f64>>,
}

/// A metric's name and its sorted labels.
type Name = (String, Vec<(String, String)>);

impl Seen {
    fn take(&mut self, snapshotter: &Snapshotter) {
        for (key, _, _, value) in snapshotter.snapshot().into_vec() {
            let key = key.key();
            let name = key.name().to_owned();
            let mut labels: Vec<(String, String)> = key
                .labels()
                .map(|l| (l.key().to_owned(), l.value().to_owned()))
                .collect();
            labels.sort();
            match value {
                DebugValue::Counter(n) => *self.counters.entry((name, labels)).or_default() += n,
                DebugValue::Gauge(g) => *self.gauges.entry(name).or_default() += g.into_inner(),
                DebugValue::Histogram(samples) => self
                    .histograms
                    .entry((name, labels))
                    .or_default()
                    .extend(samples.into_iter().map(|s| s.into_inner())),
            }
        }
    }

    fn counter(&self, name: &str, labels: &[(&str, &str)]) -> u64 {
        self.counters
            .iter()
            .filter(|((n, l), _)| n == name && labels_match(l, labels))
            .map(|(_, v)| *v)
            .sum()
    }

    fn gauge(&self, name: &str) -> f64 {
        self.gauges.get(name).copied().unwrap_or_default()
    }

    fn histogram(&self, name: &str, labels: &[(&str, &str)]) -> Vec<f64> {
        self.histograms
            .iter()
            .filter(|((n, l), _)| n == name && labels_match(l, labels))
            .flat_map(|(_, v)| v.iter().copied())
            .collect()
    }
}

fn labels_match(have: &[(String, String)], want: &[(&str, &str)]) -> bool {
    want.iter()
        .all(|(k, v)| have.iter().any(|(hk, hv)| hk == k && hv == v))
}

/// Polls `check` every 10 ms until it holds; panics after 10 s.
async fn eventually(
    what: &str,
    seen: &mut Seen,
    snapshotter: &Snapshotter,
    check: impl Fn(&Seen) -> bool,
) {
    for _ in 0..1000 {
        seen.take(snapshotter);
        if check(seen) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("{what} did not happen within 10 s");
}

// Issue #7 item 7: kick-offs, polls, cancels, the running gauge, completions and durations are
// recorded under the documented names and labels.
#[tokio::test(flavor = "multi_thread")]
async fn metrics_count_requests_jobs_and_durations() {
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    recorder
        .install()
        .expect("the only recorder of this test binary");
    let mut seen = Seen::default();

    let release = std::sync::Arc::new(Notify::new());
    let held = release.clone();
    let app = Router::new()
        .route(
            "/fhir/$held",
            post(move || {
                let held = held.clone();
                async move {
                    held.notified().await;
                    "{}"
                }
            }),
        )
        .route("/fhir/$instant", post(|| async { "{}" }))
        .layer(
            AsyncLayer::builder(MemoryStore::default())
                .base_path("/fhir")
                .build(),
        );
    let base = format!("http://{}", serve(app).await);
    let client = TestClient::default();
    let kick = |path: &'static str| {
        let client = client.clone();
        let url = format!("{base}{path}");
        async move {
            let reply = client
                .send(Method::POST, &url, &[("prefer", "respond-async")], "")
                .await;
            assert_eq!(reply.status, StatusCode::ACCEPTED, "{reply:?}");
            reply.header("content-location").to_owned()
        }
    };

    let held = kick("/fhir/$held").await;
    let cancelled = kick("/fhir/$held").await;
    eventually("two jobs running", &mut seen, &snapshotter, |seen| {
        seen.gauge("fhir_async_jobs_running") == 2.0
    })
    .await;
    let poll = client.get(&held).await;
    assert_eq!(poll.status, StatusCode::ACCEPTED);
    let delete = client.delete(&cancelled).await;
    assert_eq!(delete.status, StatusCode::ACCEPTED);
    let instant = kick("/fhir/$instant").await;
    let done = client.poll_until_done(&instant, 500).await;
    assert_eq!(done.status, StatusCode::OK);
    release.notify_one();
    let done = client.poll_until_done(&held, 500).await;
    assert_eq!(done.status, StatusCode::OK);
    let refused = client
        .send(
            Method::POST,
            &format!("{base}/fhir/$instant"),
            &[
                ("prefer", "respond-async"),
                ("accept", "application/fhir+xml"),
            ],
            "",
        )
        .await;
    assert_eq!(refused.status, StatusCode::NOT_ACCEPTABLE);

    let requests = "fhir_async_requests_total";
    eventually("every job ended", &mut seen, &snapshotter, |seen| {
        seen.gauge("fhir_async_jobs_running") == 0.0
    })
    .await;
    let kick_off =
        |outcome| seen.counter(requests, &[("action", "kick-off"), ("outcome", outcome)]);
    assert_eq!(kick_off("accepted"), 3);
    assert_eq!(kick_off("not-acceptable"), 1);
    assert!(
        seen.counter(
            requests,
            &[("action", "status"), ("outcome", "in-progress")]
        ) >= 1
    );
    assert!(seen.counter(requests, &[("action", "status"), ("outcome", "completed")]) >= 2);
    assert_eq!(
        seen.counter(requests, &[("action", "cancel"), ("outcome", "cancelled")]),
        1
    );
    let finished = "fhir_async_jobs_finished_total";
    assert_eq!(seen.counter(finished, &[("outcome", "completed")]), 2);
    assert_eq!(seen.counter(finished, &[("outcome", "cancelled")]), 1);
    let durations = seen.histogram(
        "fhir_async_job_duration_seconds",
        &[("outcome", "completed")],
    );
    assert_eq!(durations.len(), 2, "one duration per completed job");
    assert!(durations.iter().all(|s| *s >= 0.0), "{durations:?}");
}
