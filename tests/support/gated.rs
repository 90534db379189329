//! A FHIR server whose slow handlers finish only when the test says so, behind the layer on a
//! real socket: the harness of the tests of `Prefer: wait` at kick-off, the redirect completion
//! mode, status validators and long polls, and bulk `separate-export-status`.
//!
//! Inner handlers that must not finish before the test says so wait on a `Notify` the test
//! triggers, so "finishes in time" and "does not" never depend on scheduling.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use super::{Reply, TestClient, fhir_json, serve_behind, within};
use axum::body::Body;
use axum::response::Response;
use axum::routing::{get, post};
use axum::{Extension, Router};
use http::header::{CONTENT_TYPE, ETAG, LAST_MODIFIED, LOCATION};
use http::{HeaderName, Method, StatusCode};
use serde_json::{Value, json};
use tokio::sync::Notify;
use tower_fhir_async::{AsyncLayer, AsyncLayerBuilder, JobContext, MemoryStore};

pub const FHIR: &str = "application/fhir+json";
pub const NDJSON: &str = "application/fhir+ndjson";

/// What the inner server creates at `POST /fhir/Patient`: always the same, so a synchronous
/// call and a replayed result can be compared byte for byte.
pub const PATIENT: &str = r#"{"resourceType":"Patient","id":"new","meta":{"versionId":"1"}}"#;
pub const PATIENT_LOCATION: &str = "http://fhir.example.org/fhir/Patient/new/_history/1";
pub const PATIENT_MODIFIED: &str = "Tue, 01 Jul 2025 10:00:00 GMT";

/// The inner headers a replayed result must carry as the synchronous call did.
pub const DESCRIBING: [HeaderName; 4] = [CONTENT_TYPE, LOCATION, ETAG, LAST_MODIFIED];

/// Runs `fut` and says how long it took on tokio's clock. Under paused time (the tests that
/// look at it use `start_paused`) that clock moves only when every task waits, straight to the
/// next timer, so the duration counts the layer's timers that fired, not machine speed.
pub async fn timed<T>(fut: impl Future<Output = T>) -> (T, Duration) {
    let started = tokio::time::Instant::now();
    let value = fut.await;
    (value, started.elapsed())
}

pub fn header<'r>(reply: &'r Reply, name: &str) -> Option<&'r str> {
    reply.headers.get(name).and_then(|v| v.to_str().ok())
}

/// The comma-separated tokens of every line of a header, trimmed.
pub fn tokens(reply: &Reply, name: &str) -> Vec<String> {
    reply
        .headers
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|t| t.trim().to_owned())
        .filter(|t| !t.is_empty())
        .collect()
}

// ---------------------------------------------------------------------------------------------
// The wrapped FHIR server.

/// `POST /fhir/Patient`: `201` with the headers a FHIR create answers with.
pub async fn create_patient() -> Response {
    Response::builder()
        .status(StatusCode::CREATED)
        .header(CONTENT_TYPE, FHIR)
        .header(LOCATION, PATIENT_LOCATION)
        .header(ETAG, "W/\"1\"")
        .header(LAST_MODIFIED, PATIENT_MODIFIED)
        .body(Body::from(PATIENT))
        .unwrap()
}

/// `GET /fhir/Patient/new`: the resource.
pub async fn read_patient() -> Response {
    Response::builder()
        .header(CONTENT_TYPE, FHIR)
        .header(ETAG, "W/\"1\"")
        .body(Body::from(PATIENT))
        .unwrap()
}

/// The OperationOutcome of the failed create at `POST /fhir/Observation`.
pub fn invalid_observation() -> Value {
    json!({"resourceType": "OperationOutcome", "issue": [
        {"severity": "error", "code": "invariant", "diagnostics": "obs-7: value[x] or component required"}]})
}

/// `POST /fhir/Observation`: the server refuses the resource (`422`).
pub async fn create_observation() -> Response {
    fhir_json(StatusCode::UNPROCESSABLE_ENTITY, &invalid_observation())
}

pub fn parameters() -> Response {
    fhir_json(StatusCode::OK, &json!({"resourceType": "Parameters"}))
}

/// `$export` output: one Patient, as NDJSON.
pub fn small_export() -> Response {
    Response::builder()
        .header(CONTENT_TYPE, NDJSON)
        .body(Body::from("{\"resourceType\":\"Patient\",\"id\":\"p1\"}\n"))
        .unwrap()
}

/// The OperationOutcome of a bulk kick-off for an unknown Group.
pub fn unknown_group() -> Value {
    json!({"resourceType": "OperationOutcome", "issue": [
        {"severity": "error", "code": "not-found", "diagnostics": "Group g-404 is unknown"}]})
}

/// The routes every test gets. `gate` holds back the handlers that finish only when the test
/// says so (`gate.notify_one()` releases one step); `$slow` and `$stepped` notify `started` when
/// they begin, i.e. once their job is recorded as running:
///
/// - `POST /fhir/Patient` → `201` at once; `GET /fhir/Patient/new` → `200` at once;
/// - `POST /fhir/Observation` → `422` + OperationOutcome at once;
/// - `POST /fhir/$slow` → waits for the gate, then `200` Parameters;
/// - `POST /fhir/$stepped` → waits for the gate, reports `50% complete`, waits again, `200`;
/// - `GET /fhir/$export` → waits for the gate, then NDJSON; `GET /fhir/Patient/$export` → NDJSON
///   at once; `GET /fhir/Group/{id}/$export` → `404` + OperationOutcome;
/// - `GET /fhir/Observation` → a one-entry searchset (for `_outputFormat`).
pub fn routes(gate: Arc<Notify>, started: Arc<Notify>) -> Router {
    let slow_gate = gate.clone();
    let stepped_gate = gate.clone();
    let slow_started = started.clone();
    let stepped_started = started;
    let export_gate = gate;
    Router::new()
        .route("/fhir/Patient", post(create_patient))
        .route("/fhir/Patient/new", get(read_patient))
        .route(
            "/fhir/Observation",
            post(create_observation).get(|| async {
                fhir_json(
                    StatusCode::OK,
                    &json!({"resourceType": "Bundle", "type": "searchset", "entry": [
                        {"resource": {"resourceType": "Observation", "id": "o1"}}]}),
                )
            }),
        )
        .route(
            "/fhir/$slow",
            post(move || {
                let gate = slow_gate.clone();
                let started = slow_started.clone();
                async move {
                    started.notify_one();
                    gate.notified().await;
                    parameters()
                }
            }),
        )
        .route(
            "/fhir/$stepped",
            post(move |job: Option<Extension<JobContext>>| {
                let gate = stepped_gate.clone();
                let started = stepped_started.clone();
                async move {
                    let Extension(job) = job.expect("a replayed request carries its JobContext");
                    started.notify_one();
                    gate.notified().await;
                    job.set_percent(50);
                    gate.notified().await;
                    parameters()
                }
            }),
        )
        .route(
            "/fhir/$export",
            get(move || {
                let gate = export_gate.clone();
                async move {
                    gate.notified().await;
                    small_export()
                }
            }),
        )
        .route("/fhir/Patient/$export", get(|| async { small_export() }))
        .route(
            "/fhir/Group/{id}/$export",
            get(|| async { fhir_json(StatusCode::NOT_FOUND, &unknown_group()) }),
        )
}

pub struct Server {
    /// `http://127.0.0.1:{port}/fhir`
    pub base: String,
    pub client: TestClient,
    pub jobs: MemoryStore,
    pub gate: Arc<Notify>,
    pub started: Arc<Notify>,
}

/// Serves [`routes`] behind a layer with base path `/fhir`, configured further by `configure`.
pub async fn start(configure: impl FnOnce(AsyncLayerBuilder) -> AsyncLayerBuilder) -> Server {
    let jobs = MemoryStore::default();
    let gate = Arc::new(Notify::new());
    let started = Arc::new(Notify::new());
    let layer = configure(AsyncLayer::builder(jobs.clone()).base_path("/fhir")).build();
    let addr = serve_behind(layer, routes(gate.clone(), started.clone())).await;
    Server {
        base: format!("http://{addr}/fhir"),
        client: TestClient::default(),
        jobs,
        gate,
        started,
    }
}

impl Server {
    /// Waits (bounded) until the `$slow` or `$stepped` handler has begun: from then on the job
    /// is running, and its status changes only when the test makes it.
    pub async fn handler_started(&self) {
        within("the handler starting", self.started.notified()).await;
    }

    /// `method {base}{target}` with `headers`; a POST gets a FHIR JSON body.
    pub async fn send(&self, method: Method, target: &str, headers: &[(&str, &str)]) -> Reply {
        let mut all = headers.to_vec();
        let body = if method == Method::POST {
            all.push(("content-type", FHIR));
            r#"{"resourceType":"Patient"}"#
        } else {
            ""
        };
        self.client
            .send(method, &format!("{}{target}", self.base), &all, body)
            .await
    }

    /// A kick-off with `Prefer: {prefer}` that must be accepted; returns the status URL.
    pub async fn kick_off(&self, method: Method, target: &str, prefer: &str) -> String {
        let reply = self.send(method, target, &[("prefer", prefer)]).await;
        assert_eq!(
            reply.status,
            StatusCode::ACCEPTED,
            "kick-off {target}: {reply:?}"
        );
        reply.header("content-location").to_owned()
    }

    /// `GET status_url` with `headers`.
    pub async fn poll(&self, status_url: &str, headers: &[(&str, &str)]) -> Reply {
        self.client.send(Method::GET, status_url, headers, "").await
    }

    /// Starts a poll in the background (a long poll to be woken); its reply and how long it
    /// took.
    pub fn spawn_poll(
        self: &Arc<Self>,
        status_url: &str,
        headers: Vec<(&'static str, String)>,
    ) -> tokio::task::JoinHandle<(Reply, Duration)> {
        let server = self.clone();
        let status_url = status_url.to_owned();
        tokio::spawn(async move {
            let headers: Vec<(&str, &str)> = headers
                .iter()
                .map(|(name, value)| (*name, value.as_str()))
                .collect();
            timed(server.poll(&status_url, &headers)).await
        })
    }

    /// Polls (bounded) until `done` holds for a reply; returns that reply.
    pub async fn poll_until(
        &self,
        status_url: &str,
        headers: &[(&str, &str)],
        what: &str,
        done: impl Fn(&Reply) -> bool,
    ) -> Reply {
        for _ in 0..250 {
            let reply = self.poll(status_url, headers).await;
            if done(&reply) {
                return reply;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("{what}: not seen at {status_url} after 250 polls");
    }

    /// Polls (bounded) until the job stops answering `202`.
    pub async fn finished(&self, status_url: &str) -> Reply {
        self.poll_until(status_url, &[], "the job's end", |r| {
            r.status != StatusCode::ACCEPTED
        })
        .await
    }
}

/// The one entry of a completed interaction job's `batch-response` Bundle.
pub fn only_entry(reply: &Reply) -> Value {
    assert_eq!(reply.status, StatusCode::OK, "{reply:?}");
    let bundle = reply.json();
    assert_eq!(bundle["type"], "batch-response", "{bundle}");
    assert_eq!(
        bundle["entry"].as_array().map(Vec::len),
        Some(1),
        "{bundle}"
    );
    bundle["entry"][0].clone()
}

pub fn with_max_wait(seconds: u64) -> impl FnOnce(AsyncLayerBuilder) -> AsyncLayerBuilder {
    move |b| b.max_wait(Duration::from_secs(seconds))
}

/// BULK-8: a completion manifest with the one Patient file.
pub fn assert_manifest(reply: &Reply, what: &str) {
    assert_eq!(reply.header("content-type"), "application/json", "{what}");
    let manifest = reply.json();
    assert!(manifest.get("resourceType").is_none(), "{what}: {manifest}");
    assert!(
        manifest["output"].as_array().is_some_and(|o| !o.is_empty()),
        "{what}: {manifest}"
    );
}

// PREFER-13, STATUS-17 (in progress, complete): with the token every status answer is 200 and
// `X-Export-Status` carries the job's status (`202 Accepted`, then `200 OK` + manifest);

/// On the paused clock: the answer came before any wait of a second or more ran out (a request
/// held for its `wait` would show that whole wait here).
pub fn assert_at_once(took: Duration, what: &str) {
    assert!(
        took < Duration::from_secs(1),
        "{what}: held for {took:?} of paused time"
    );
}

/// On the paused clock: the answer came when a wait of `seconds` ran out — not before, and not
/// at any later timer (such as a longer `wait` the layer should not have used).
pub fn assert_held_for(took: Duration, seconds: u64, what: &str) {
    let wait = Duration::from_secs(seconds);
    assert!(
        took >= wait && took < wait + Duration::from_secs(1),
        "{what}: held for {took:?} of paused time, not {wait:?}"
    );
}
