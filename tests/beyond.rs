//! Beyond the published patterns, over a real socket: the `Prefer: wait` shortcut at kick-off
//! (PREFER-8), the redirect completion mode (§2.10 FUT-1…7), validators and long polls on the
//! status URL (STATUS-3…7), and bulk `separate-export-status` (PREFER-13, STATUS-17).
//!
//! Inner handlers that must not finish before the test says so wait on a `Notify` the test
//! triggers, so "finishes in time" and "does not" never depend on scheduling. Elapsed time is
//! only ever checked against generous bounds ("well before N", "not before N").

mod support;

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::response::Response;
use axum::routing::{get, post};
use axum::{Extension, Router};
use http::header::{
    ALLOW, CACHE_CONTROL, CONTENT_LOCATION, CONTENT_TYPE, ETAG, LAST_MODIFIED, LOCATION,
    RETRY_AFTER, VARY,
};
use http::{HeaderName, Method, StatusCode};
use serde_json::{Value, json};
use support::{Reply, TestClient};
use tokio::sync::Notify;
use tower::ServiceBuilder;
use tower_fhir_async::{AsyncLayer, AsyncLayerBuilder, CompletionMode, JobContext, MemoryStore};

/// The bound on waiting for something a test expects to happen; never a timing assertion.
const BOUND: Duration = Duration::from_secs(10);

/// "Well before N": a held request that should have been answered early returns within this.
const EARLY: Duration = Duration::from_secs(5);

/// "Not before N = 1 s", with room for coarse timers.
const NOT_BEFORE_ONE_SECOND: Duration = Duration::from_millis(900);

const FHIR: &str = "application/fhir+json";
const NDJSON: &str = "application/fhir+ndjson";

/// What the inner server creates at `POST /fhir/Patient`: always the same, so a synchronous
/// call and a replayed result can be compared byte for byte.
const PATIENT: &str = r#"{"resourceType":"Patient","id":"new","meta":{"versionId":"1"}}"#;
const PATIENT_LOCATION: &str = "http://fhir.example.org/fhir/Patient/new/_history/1";
const PATIENT_MODIFIED: &str = "Tue, 01 Jul 2025 10:00:00 GMT";

/// The inner headers a replayed result must carry as the synchronous call did.
const DESCRIBING: [HeaderName; 4] = [CONTENT_TYPE, LOCATION, ETAG, LAST_MODIFIED];

async fn within<T>(what: &str, fut: impl Future<Output = T>) -> T {
    tokio::time::timeout(BOUND, fut)
        .await
        .unwrap_or_else(|_| panic!("{what} did not happen within {BOUND:?}"))
}

/// Runs `fut` and says how long it took.
async fn timed<T>(fut: impl Future<Output = T>) -> (T, Duration) {
    let started = Instant::now();
    let value = fut.await;
    (value, started.elapsed())
}

fn header<'r>(reply: &'r Reply, name: &str) -> Option<&'r str> {
    reply.headers.get(name).and_then(|v| v.to_str().ok())
}

/// The comma-separated tokens of every line of a header, trimmed.
fn tokens(reply: &Reply, name: &str) -> Vec<String> {
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

fn fhir_json(status: StatusCode, body: &Value) -> Response {
    Response::builder()
        .status(status)
        .header(CONTENT_TYPE, FHIR)
        .body(Body::from(body.to_string()))
        .unwrap()
}

/// `POST /fhir/Patient`: `201` with the headers a FHIR create answers with.
async fn create_patient() -> Response {
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
async fn read_patient() -> Response {
    Response::builder()
        .header(CONTENT_TYPE, FHIR)
        .header(ETAG, "W/\"1\"")
        .body(Body::from(PATIENT))
        .unwrap()
}

/// The OperationOutcome of the failed create at `POST /fhir/Observation`.
fn invalid_observation() -> Value {
    json!({"resourceType": "OperationOutcome", "issue": [
        {"severity": "error", "code": "invariant", "diagnostics": "obs-7: value[x] or component required"}]})
}

/// `POST /fhir/Observation`: the server refuses the resource (`422`).
async fn create_observation() -> Response {
    fhir_json(StatusCode::UNPROCESSABLE_ENTITY, &invalid_observation())
}

fn parameters() -> Response {
    fhir_json(StatusCode::OK, &json!({"resourceType": "Parameters"}))
}

/// `$export` output: one Patient, as NDJSON.
fn small_export() -> Response {
    Response::builder()
        .header(CONTENT_TYPE, NDJSON)
        .body(Body::from("{\"resourceType\":\"Patient\",\"id\":\"p1\"}\n"))
        .unwrap()
}

/// The OperationOutcome of a bulk kick-off for an unknown Group.
fn unknown_group() -> Value {
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
fn routes(gate: Arc<Notify>, started: Arc<Notify>) -> Router {
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

struct Server {
    /// `http://127.0.0.1:{port}/fhir`
    base: String,
    client: TestClient,
    jobs: MemoryStore,
    gate: Arc<Notify>,
    started: Arc<Notify>,
}

/// Serves [`routes`] behind a layer with base path `/fhir`, configured further by `configure`.
async fn start(configure: impl FnOnce(AsyncLayerBuilder) -> AsyncLayerBuilder) -> Server {
    let jobs = MemoryStore::default();
    let gate = Arc::new(Notify::new());
    let started = Arc::new(Notify::new());
    let layer = configure(AsyncLayer::builder(jobs.clone()).base_path("/fhir")).build();
    let service = ServiceBuilder::new()
        .layer(layer)
        .service(routes(gate.clone(), started.clone()));
    let addr = support::serve(Router::new().fallback_service(service)).await;
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
    async fn handler_started(&self) {
        within("the handler starting", self.started.notified()).await;
    }

    /// `method {base}{target}` with `headers`; a POST gets a FHIR JSON body.
    async fn send(&self, method: Method, target: &str, headers: &[(&str, &str)]) -> Reply {
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
    async fn kick_off(&self, method: Method, target: &str, prefer: &str) -> String {
        let reply = self.send(method, target, &[("prefer", prefer)]).await;
        assert_eq!(
            reply.status,
            StatusCode::ACCEPTED,
            "kick-off {target}: {reply:?}"
        );
        reply.header("content-location").to_owned()
    }

    /// `GET status_url` with `headers`.
    async fn poll(&self, status_url: &str, headers: &[(&str, &str)]) -> Reply {
        self.client.send(Method::GET, status_url, headers, "").await
    }

    /// Starts a poll in the background (a long poll to be woken); its reply and how long it
    /// took.
    fn spawn_poll(
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
    async fn poll_until(
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
    async fn finished(&self, status_url: &str) -> Reply {
        self.poll_until(status_url, &[], "the job's end", |r| {
            r.status != StatusCode::ACCEPTED
        })
        .await
    }
}

fn assert_not_found(reply: &Reply, what: &str) {
    assert_eq!(reply.status, StatusCode::NOT_FOUND, "{what}: {reply:?}");
    reply.assert_outcome("not-found");
}

/// The one entry of a completed interaction job's `batch-response` Bundle.
fn only_entry(reply: &Reply) -> Value {
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

// ---------------------------------------------------------------------------------------------
// 1. PREFER-8: `Prefer: respond-async, wait=N` at kick-off.

fn with_max_wait(seconds: u64) -> impl FnOnce(AsyncLayerBuilder) -> AsyncLayerBuilder {
    move |b| b.max_wait(Duration::from_secs(seconds))
}

// PREFER-8, AMB-22: a job that ends within `wait` is answered with the inner response itself —
// status, the headers that describe it, body — as the synchronous call would have been; no
// status URL (`Content-Location`), no `Preference-Applied`, and no job left in the store.
#[tokio::test]
async fn prefer_8_wait_job_finishing_in_time_answers_synchronously() {
    let server = start(with_max_wait(10)).await;
    let synchronous = server.send(Method::POST, "/Patient", &[]).await;
    assert_eq!(synchronous.status, StatusCode::CREATED, "{synchronous:?}");

    let (reply, took) = timed(server.send(
        Method::POST,
        "/Patient",
        &[("prefer", "respond-async, wait=10")],
    ))
    .await;
    assert!(took < EARLY, "answered when the job ended, took {took:?}");
    assert_eq!(reply.status, StatusCode::CREATED, "{reply:?}");
    for name in DESCRIBING {
        assert_eq!(
            reply.headers.get(&name),
            synchronous.headers.get(&name),
            "{name}: {reply:?}"
        );
    }
    assert_eq!(reply.body, synchronous.body);
    assert!(reply.headers.get(CONTENT_LOCATION).is_none(), "{reply:?}");
    assert!(
        reply.headers.get("preference-applied").is_none(),
        "{reply:?}"
    );
    assert_eq!(server.jobs.len(), 0, "the job is forgotten");
}

// PREFER-8, AMB-5: a failed inner request that ends in time is answered synchronously too:
// its own `422` + OperationOutcome.
#[tokio::test]
async fn prefer_8_wait_failed_request_in_time_answers_its_failure() {
    let server = start(with_max_wait(10)).await;
    let (reply, took) = timed(server.send(
        Method::POST,
        "/Observation",
        &[("prefer", "respond-async, wait=10")],
    ))
    .await;
    assert!(took < EARLY, "took {took:?}");
    assert_eq!(reply.status, StatusCode::UNPROCESSABLE_ENTITY, "{reply:?}");
    assert_eq!(reply.header("content-type"), FHIR);
    assert_eq!(reply.json(), invalid_observation());
    assert!(reply.headers.get(CONTENT_LOCATION).is_none(), "{reply:?}");
    assert_eq!(server.jobs.len(), 0);
}

// PREFER-8, PREFER-11: a `GET` answered synchronously through `wait` varies with `Prefer`.
#[tokio::test]
async fn prefer_8_prefer_11_wait_get_answer_carries_vary_prefer() {
    let server = start(with_max_wait(10)).await;
    let reply = server
        .send(
            Method::GET,
            "/Patient/new",
            &[("prefer", "respond-async, wait=10")],
        )
        .await;
    assert_eq!(reply.status, StatusCode::OK, "{reply:?}");
    assert_eq!(reply.body, PATIENT.as_bytes());
    assert!(
        tokens(&reply, "vary")
            .iter()
            .any(|t| t.eq_ignore_ascii_case("prefer")),
        "{:?}",
        reply.headers.get_all(VARY)
    );
}

// PREFER-8: a job still running when `wait` (1 s) runs out gets the usual 202 — not before the
// second is up — and keeps running: once released, its status URL completes as always.
#[tokio::test]
async fn prefer_8_wait_job_not_finishing_in_time_gets_202() {
    let server = start(with_max_wait(10)).await;
    let (reply, took) = timed(server.send(
        Method::POST,
        "/$slow",
        &[("prefer", "respond-async, wait=1")],
    ))
    .await;
    assert_eq!(reply.status, StatusCode::ACCEPTED, "{reply:?}");
    assert!(took >= NOT_BEFORE_ONE_SECOND, "waited only {took:?}");
    assert!(took < EARLY, "took {took:?}");
    let status_url = reply.header("content-location").to_owned();
    assert!(
        status_url.starts_with(&format!("{}/_async/", server.base)),
        "{status_url}"
    );
    assert_eq!(reply.header("preference-applied"), "respond-async");
    assert_eq!(
        server.poll(&status_url, &[]).await.status,
        StatusCode::ACCEPTED
    );

    server.gate.notify_one();
    let done = server.finished(&status_url).await;
    assert_eq!(only_entry(&done)["response"]["status"], "200 OK");
}

// PREFER-8, STATUS-4: progress reported while the kick-off waits is not the job's end: the
// kick-off keeps waiting, and answers the job's own response when it does end.
#[tokio::test]
async fn prefer_8_wait_outlasts_progress_reports() {
    let server = Arc::new(start(with_max_wait(10)).await);
    let kick_off = tokio::spawn({
        let server = server.clone();
        async move {
            server
                .send(
                    Method::POST,
                    "/$stepped",
                    &[("prefer", "respond-async, wait=10")],
                )
                .await
        }
    });
    server.handler_started().await;
    server.gate.notify_one();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!kick_off.is_finished(), "answered on a progress report");
    server.gate.notify_one();
    let reply = within("the kick-off", kick_off)
        .await
        .expect("the kick-off task");
    assert_eq!(reply.status, StatusCode::OK, "{reply:?}");
    assert_eq!(reply.json()["resourceType"], "Parameters");
    assert!(reply.headers.get(CONTENT_LOCATION).is_none(), "{reply:?}");
    assert_eq!(server.jobs.len(), 0);
}

// PREFER-8: the wait is `min(N, max_wait)`: `wait=10` under a 1 s cap answers 202 after about
// a second, well before ten.
#[tokio::test]
async fn prefer_8_wait_is_capped_by_max_wait() {
    let server = start(with_max_wait(1)).await;
    let (reply, took) = timed(server.send(
        Method::POST,
        "/$slow",
        &[("prefer", "respond-async, wait=10")],
    ))
    .await;
    assert_eq!(reply.status, StatusCode::ACCEPTED, "{reply:?}");
    assert!(took >= NOT_BEFORE_ONE_SECOND, "waited only {took:?}");
    assert!(took < EARLY, "the cap of 1 s was not applied: {took:?}");
}

// PREFER-8, PREFER-4: with `max_wait` zero (the default) `wait` is ignored: 202 at once, even for
// a job that would end at once.
#[tokio::test]
async fn prefer_8_wait_is_ignored_without_max_wait() {
    let server = start(|b| b).await;
    let (reply, took) = timed(server.send(
        Method::POST,
        "/$slow",
        &[("prefer", "respond-async, wait=10")],
    ))
    .await;
    assert_eq!(reply.status, StatusCode::ACCEPTED, "{reply:?}");
    assert!(took < EARLY, "took {took:?}");
    assert_eq!(reply.header("preference-applied"), "respond-async");

    let reply = server
        .send(
            Method::POST,
            "/Patient",
            &[("prefer", "respond-async, wait=10")],
        )
        .await;
    assert_eq!(reply.status, StatusCode::ACCEPTED, "{reply:?}");
    let done = server.finished(reply.header("content-location")).await;
    assert_eq!(only_entry(&done)["response"]["status"], "201 Created");
}

// PREFER-8: bulk kick-offs are always 202, even when the export would end within `wait`.
#[tokio::test]
async fn prefer_8_bulk_kick_off_with_wait_is_always_202() {
    let server = start(with_max_wait(10)).await;
    let (reply, took) = timed(server.send(
        Method::GET,
        "/Patient/$export",
        &[("prefer", "respond-async, wait=10")],
    ))
    .await;
    assert_eq!(reply.status, StatusCode::ACCEPTED, "{reply:?}");
    assert!(took < EARLY, "a bulk kick-off was held: {took:?}");
    let done = server.finished(reply.header("content-location")).await;
    assert_eq!(done.status, StatusCode::OK, "{done:?}");
    assert_eq!(done.header("content-type"), "application/json");
    assert_eq!(done.json()["output"][0]["type"], "Patient");
}

// PREFER-5, PREFER-8: of two `wait` tokens the first counts: `wait=1, wait=100` answers 202
// after about a second.
#[tokio::test]
async fn prefer_5_prefer_8_first_wait_wins() {
    let server = start(with_max_wait(10)).await;
    let (reply, took) = timed(server.send(
        Method::POST,
        "/$slow",
        &[("prefer", "respond-async, wait=1, wait=100")],
    ))
    .await;
    assert_eq!(reply.status, StatusCode::ACCEPTED, "{reply:?}");
    assert!(took >= NOT_BEFORE_ONE_SECOND, "waited only {took:?}");
    assert!(took < EARLY, "the second wait counted: {took:?}");
}

// ---------------------------------------------------------------------------------------------
// 2. FUT-1…7: `CompletionMode::Redirect`.

fn redirect(b: AsyncLayerBuilder) -> AsyncLayerBuilder {
    b.completion(CompletionMode::Redirect)
}

/// FUT-1: a finished job's status answer: `303`, absolute `Location: {status URL}/result`,
/// empty body, `Cache-Control: no-store`. Returns the result URL.
async fn see_other(server: &Server, status_url: &str) -> String {
    let reply = server.finished(status_url).await;
    assert_eq!(reply.status, StatusCode::SEE_OTHER, "{reply:?}");
    assert_eq!(reply.header("location"), format!("{status_url}/result"));
    assert!(reply.body.is_empty(), "{reply:?}");
    assert_eq!(reply.header("cache-control"), "no-store");
    reply.header("location").to_owned()
}

// FUT-1, FUT-2, FUT-7, STATUS-14: a created resource: the status URL redirects to the result,
// which answers exactly what the synchronous create answered (201, Location, ETag,
// Last-Modified, Content-Type, the resource), as often as asked; HEAD gets the same head.
#[tokio::test]
async fn fut_1_fut_2_redirect_then_replay_of_a_created_resource() {
    let server = start(redirect).await;
    let synchronous = server.send(Method::POST, "/Patient", &[]).await;
    assert_eq!(synchronous.status, StatusCode::CREATED);

    let status_url = server
        .kick_off(Method::POST, "/Patient", "respond-async")
        .await;
    let result_url = see_other(&server, &status_url).await;
    for attempt in 0..2 {
        let result = server.client.get(&result_url).await;
        assert_eq!(result.status, StatusCode::CREATED, "#{attempt}: {result:?}");
        for name in DESCRIBING {
            assert_eq!(
                result.headers.get(&name),
                synchronous.headers.get(&name),
                "#{attempt} {name}: {result:?}"
            );
        }
        assert_eq!(result.body, synchronous.body, "#{attempt}");
        assert!(
            result.headers.get(CONTENT_LOCATION).is_none(),
            "#{attempt}: {result:?}"
        );
    }
    let head = server.client.send(Method::HEAD, &result_url, &[], "").await;
    assert_eq!(head.status, StatusCode::CREATED, "{head:?}");
    assert_eq!(head.header("location"), PATIENT_LOCATION);
    assert!(head.body.is_empty(), "{head:?}");

    // The status URL keeps redirecting (STATUS-14).
    let again = server.poll(&status_url, &[]).await;
    assert_eq!(again.status, StatusCode::SEE_OTHER, "{again:?}");
    assert_eq!(again.header("location"), result_url);
}

// FUT-1, FUT-2: a failed inner request completes the same way (303, not an error at the
// status URL); the result is the server's own `422` + OperationOutcome.
#[tokio::test]
async fn fut_1_fut_2_redirect_then_replay_of_a_failed_request() {
    let server = start(redirect).await;
    let status_url = server
        .kick_off(Method::POST, "/Observation", "respond-async")
        .await;
    let result_url = see_other(&server, &status_url).await;
    for attempt in 0..2 {
        let result = server.client.get(&result_url).await;
        assert_eq!(
            result.status,
            StatusCode::UNPROCESSABLE_ENTITY,
            "#{attempt}: {result:?}"
        );
        assert_eq!(result.header("content-type"), FHIR);
        assert_eq!(result.json(), invalid_observation(), "#{attempt}");
    }
}

// FUT-2, FUT-3: while the job runs, the status URL answers 202 (no redirect yet) and the
// result URL has nothing to show.
#[tokio::test]
async fn fut_3_running_job_polls_202_and_has_no_result_yet() {
    let server = start(redirect).await;
    let status_url = server
        .kick_off(Method::POST, "/$slow", "respond-async")
        .await;
    let running = server.poll(&status_url, &[]).await;
    assert_eq!(running.status, StatusCode::ACCEPTED, "{running:?}");
    assert!(running.headers.get(LOCATION).is_none(), "{running:?}");
    assert_not_found(
        &server.client.get(&format!("{status_url}/result")).await,
        "result of a running job",
    );

    server.gate.notify_one();
    let result_url = see_other(&server, &status_url).await;
    let result = server.client.get(&result_url).await;
    assert_eq!(result.status, StatusCode::OK, "{result:?}");
    assert_eq!(result.json()["resourceType"], "Parameters");
}

// FUT-7, CANCEL-3, EXPIRE-3: the result stays until the job is deleted; then 404 + OO.
#[tokio::test]
async fn fut_7_result_is_gone_after_delete() {
    let server = start(redirect).await;
    let status_url = server
        .kick_off(Method::POST, "/Patient", "respond-async")
        .await;
    let result_url = see_other(&server, &status_url).await;
    assert_eq!(
        server.client.get(&result_url).await.status,
        StatusCode::CREATED
    );
    let deleted = server.client.delete(&status_url).await;
    assert_eq!(deleted.status, StatusCode::ACCEPTED, "{deleted:?}");
    assert_not_found(&server.client.get(&result_url).await, "result after DELETE");
    assert_not_found(&server.client.get(&status_url).await, "status after DELETE");
}

// FUT-7, EXPIRE-3: the result stays until the job expires (retention 1 s here); then 404 + OO.
#[tokio::test]
async fn fut_7_result_is_gone_after_expiry() {
    let server = start(|b| redirect(b).retention(Duration::from_secs(1))).await;
    let status_url = server
        .kick_off(Method::POST, "/Patient", "respond-async")
        .await;
    let result_url = see_other(&server, &status_url).await;
    assert_eq!(
        server.client.get(&result_url).await.status,
        StatusCode::CREATED
    );
    let gone = within("the result's expiry", async {
        loop {
            let reply = server.client.get(&result_url).await;
            if reply.status != StatusCode::CREATED {
                return reply;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    assert_not_found(&gone, "result after expiry");
    assert_not_found(&server.client.get(&status_url).await, "status after expiry");
}

// FUT-2, STATUS-15: the result URL is read-only: other methods get 405 + `Allow: GET, HEAD`
// + OperationOutcome, and change nothing (a DELETE there cancels nothing).
#[tokio::test]
async fn fut_2_other_methods_on_the_result_get_405() {
    let server = start(redirect).await;
    let status_url = server
        .kick_off(Method::POST, "/Patient", "respond-async")
        .await;
    let result_url = see_other(&server, &status_url).await;
    for method in [Method::POST, Method::PUT, Method::PATCH, Method::DELETE] {
        let reply = server
            .client
            .send(method.clone(), &result_url, &[("content-type", FHIR)], "{}")
            .await;
        assert_eq!(
            reply.status,
            StatusCode::METHOD_NOT_ALLOWED,
            "{method}: {reply:?}"
        );
        assert_eq!(reply.header("allow"), "GET, HEAD", "{method}");
        reply.assert_outcome("not-supported");
    }
    assert_eq!(
        server.poll(&status_url, &[]).await.status,
        StatusCode::SEE_OTHER
    );
    assert_eq!(
        server.client.get(&result_url).await.status,
        StatusCode::CREATED
    );
}

// FUT-1, BUNDLE-1: in the default `CompletionMode::Bundle` there is no result route: the status
// URL answers the 200 batch-response Bundle and `{status URL}/result` is 404 + OO.
#[tokio::test]
async fn fut_1_bundle_mode_has_no_result_route() {
    let server = start(|b| b).await;
    let status_url = server
        .kick_off(Method::POST, "/Patient", "respond-async")
        .await;
    let done = server.finished(&status_url).await;
    assert_eq!(done.header("content-type"), FHIR);
    let entry = only_entry(&done);
    assert_eq!(entry["response"]["status"], "201 Created");
    assert_eq!(entry["response"]["location"], PATIENT_LOCATION);
    assert_not_found(
        &server.client.get(&format!("{status_url}/result")).await,
        "result in Bundle mode",
    );
    let post = server
        .client
        .send(Method::POST, &format!("{status_url}/result"), &[], "")
        .await;
    assert_eq!(post.status, StatusCode::NOT_FOUND, "{post:?}");
}

// FUT-1, BULK-8: the redirect mode is for the interaction pattern: a bulk job still completes
// with its 200 manifest at the status URL, and has no `/result`.
#[tokio::test]
async fn fut_1_redirect_mode_leaves_bulk_completion_alone() {
    let server = start(redirect).await;
    let status_url = server
        .kick_off(Method::GET, "/Patient/$export", "respond-async")
        .await;
    let done = server.finished(&status_url).await;
    assert_eq!(done.status, StatusCode::OK, "{done:?}");
    assert_manifest(&done, "a bulk job in redirect mode");
    assert_not_found(
        &server.client.get(&format!("{status_url}/result")).await,
        "a bulk job's result URL",
    );
}

// FUT-5, STATUS-15: result URLs of unknown or malformed job ids are 404 + OO.
#[tokio::test]
async fn fut_2_unknown_or_malformed_result_urls_are_404() {
    let server = start(redirect).await;
    for target in [
        "/_async/0123456789abcdef0123456789abcdef/result",
        "/_async/not-a-job/result",
        "/_async/../result",
        "/_async//result",
    ] {
        let reply = server.send(Method::GET, target, &[]).await;
        assert_not_found(&reply, target);
    }
}

// FUT-6, SEC-10: with `caller_from_header`, only the kick-off's caller gets the result; another
// caller, or none, gets the same 404 as an unknown job.
#[tokio::test]
async fn fut_6_result_is_bound_to_the_caller() {
    let server =
        start(|b| redirect(b).caller_from_header(HeaderName::from_static("x-client-id"))).await;
    let kicked = server
        .send(
            Method::POST,
            "/Patient",
            &[("prefer", "respond-async"), ("x-client-id", "alice")],
        )
        .await;
    assert_eq!(kicked.status, StatusCode::ACCEPTED, "{kicked:?}");
    let status_url = kicked.header("content-location").to_owned();
    let alice = [("x-client-id", "alice")];
    let done = server
        .poll_until(&status_url, &alice, "the job's end", |r| {
            r.status != StatusCode::ACCEPTED
        })
        .await;
    assert_eq!(done.status, StatusCode::SEE_OTHER, "{done:?}");
    let result_url = done.header("location").to_owned();

    let bob = server
        .client
        .send(Method::GET, &result_url, &[("x-client-id", "bob")], "")
        .await;
    assert_not_found(&bob, "another caller's result");
    assert_not_found(&server.client.get(&result_url).await, "an anonymous result");
    let bob_status = server.poll(&status_url, &[("x-client-id", "bob")]).await;
    assert_not_found(&bob_status, "another caller's status");

    let result = server
        .client
        .send(Method::GET, &result_url, &alice, "")
        .await;
    assert_eq!(result.status, StatusCode::CREATED, "{result:?}");
    assert_eq!(result.body, PATIENT.as_bytes());
}

// ---------------------------------------------------------------------------------------------
// 3. STATUS-3…5: validators (`ETag`, `If-None-Match` → 304) and long polls.

fn etag(reply: &Reply) -> String {
    let tag = reply.header("etag").to_owned();
    assert!(tag.starts_with("W/\""), "a weak validator: {tag}");
    tag
}

// STATUS-3, STATUS-4, STATUS-14: every status answer carries a weak ETag; `If-None-Match` with
// the current one is 304 with no body and the same ETag; a change of progress or state changes
// the tag, and the old one then gets the full answer.
#[tokio::test]
async fn status_3_etag_304_on_an_unchanged_status() {
    let server = start(|b| b).await;
    let status_url = server
        .kick_off(Method::POST, "/$stepped", "respond-async")
        .await;
    server.handler_started().await;
    let running = server.poll(&status_url, &[]).await;
    assert_eq!(running.status, StatusCode::ACCEPTED, "{running:?}");
    let started = etag(&running);

    let unchanged = server
        .poll(&status_url, &[("if-none-match", started.as_str())])
        .await;
    assert_eq!(unchanged.status, StatusCode::NOT_MODIFIED, "{unchanged:?}");
    assert!(unchanged.body.is_empty(), "{unchanged:?}");
    assert_eq!(unchanged.header("etag"), started);
    assert!(
        unchanged.headers.get(RETRY_AFTER).is_some(),
        "{unchanged:?}"
    );
    // A list of candidates that contains the current tag is a match too.
    let listed = format!("W/\"0000\", {started}");
    let unchanged = server
        .poll(&status_url, &[("if-none-match", listed.as_str())])
        .await;
    assert_eq!(unchanged.status, StatusCode::NOT_MODIFIED, "{unchanged:?}");

    // Progress changes the tag (STATUS-4).
    server.gate.notify_one();
    let halfway = server
        .poll_until(&status_url, &[], "X-Progress", |r| {
            header(r, "x-progress") == Some("50% complete")
        })
        .await;
    assert_eq!(halfway.status, StatusCode::ACCEPTED);
    let progressed = etag(&halfway);
    assert_ne!(progressed, started, "progress changes the ETag");
    let full = server
        .poll(&status_url, &[("if-none-match", started.as_str())])
        .await;
    assert_eq!(full.status, StatusCode::ACCEPTED, "{full:?}");
    assert_eq!(full.header("x-progress"), "50% complete");
    assert_eq!(full.header("etag"), progressed);
    let unchanged = server
        .poll(&status_url, &[("if-none-match", progressed.as_str())])
        .await;
    assert_eq!(unchanged.status, StatusCode::NOT_MODIFIED, "{unchanged:?}");
    assert_eq!(unchanged.header("etag"), progressed);

    // The end changes it again; the finished answer is then stable.
    server.gate.notify_one();
    let done = server
        .poll_until(
            &status_url,
            &[("if-none-match", progressed.as_str())],
            "the job's end",
            |r| r.status != StatusCode::ACCEPTED,
        )
        .await;
    assert_eq!(only_entry(&done)["response"]["status"], "200 OK");
    let finished = etag(&done);
    assert_ne!(finished, progressed);
    assert_ne!(finished, started);
    let unchanged = server
        .poll(&status_url, &[("if-none-match", finished.as_str())])
        .await;
    assert_eq!(unchanged.status, StatusCode::NOT_MODIFIED, "{unchanged:?}");
    assert!(unchanged.body.is_empty(), "{unchanged:?}");
    assert_eq!(unchanged.header("etag"), finished);
    let again = server.poll(&status_url, &[]).await;
    assert_eq!(
        again.header("etag"),
        finished,
        "the same state, the same tag"
    );
    assert_eq!(again.body, done.body);
}

// STATUS-3, STATUS-5: a long poll (`Prefer: wait=10`) of a running job is answered when the
// job finishes (released ~200 ms after the poll was sent), well before the ten seconds.
#[tokio::test]
async fn status_3_long_poll_returns_when_the_job_finishes() {
    let server = Arc::new(start(with_max_wait(10)).await);
    let status_url = server
        .kick_off(Method::POST, "/$slow", "respond-async")
        .await;
    let poll = server.spawn_poll(&status_url, vec![("prefer", "wait=10".to_owned())]);
    tokio::time::sleep(Duration::from_millis(200)).await;
    server.gate.notify_one();
    let (reply, took) = within("the long poll", poll).await.expect("the poll task");
    assert!(
        took < EARLY,
        "the long poll was not woken by the job's end: {took:?}"
    );
    assert_eq!(only_entry(&reply)["response"]["status"], "200 OK");
}

// STATUS-4: a long poll is also answered when the job reports progress. The poll names the tag
// it has; if the progress came first, the tag already differs and it is answered at once.
#[tokio::test]
async fn status_4_long_poll_returns_on_progress() {
    let server = Arc::new(start(with_max_wait(10)).await);
    let status_url = server
        .kick_off(Method::POST, "/$stepped", "respond-async")
        .await;
    server.handler_started().await;
    let running = server.poll(&status_url, &[]).await;
    assert_eq!(running.status, StatusCode::ACCEPTED, "{running:?}");
    assert!(running.headers.get("x-progress").is_none(), "{running:?}");
    let before = etag(&running);
    let poll = server.spawn_poll(
        &status_url,
        vec![("prefer", "wait=10".to_owned()), ("if-none-match", before)],
    );
    tokio::time::sleep(Duration::from_millis(200)).await;
    server.gate.notify_one();
    let (reply, took) = within("the long poll", poll).await.expect("the poll task");
    assert!(
        took < EARLY,
        "the long poll was not woken by progress: {took:?}"
    );
    assert_eq!(reply.status, StatusCode::ACCEPTED, "{reply:?}");
    assert_eq!(reply.header("x-progress"), "50% complete");
    assert_ne!(etag(&reply), etag(&running));
}

// STATUS-3, STATUS-5: a long poll of a job that does not change answers the usual 202 (with
// Retry-After) when `wait` (1 s) runs out — not before.
#[tokio::test]
async fn status_3_long_poll_times_out_with_202() {
    let server = start(with_max_wait(10)).await;
    let status_url = server
        .kick_off(Method::POST, "/$slow", "respond-async")
        .await;
    let (reply, took) = timed(server.poll(&status_url, &[("prefer", "wait=1")])).await;
    assert_eq!(reply.status, StatusCode::ACCEPTED, "{reply:?}");
    assert!(took >= NOT_BEFORE_ONE_SECOND, "held only {took:?}");
    assert!(took < EARLY, "took {took:?}");
    assert!(reply.headers.get(RETRY_AFTER).is_some(), "{reply:?}");
    assert_eq!(reply.header("cache-control"), "no-store");
    etag(&reply);
}

// STATUS-3: a long poll is held at most `max_wait` (1 s here), whatever `wait` asks.
#[tokio::test]
async fn status_3_long_poll_is_capped_by_max_wait() {
    let server = start(with_max_wait(1)).await;
    let status_url = server
        .kick_off(Method::POST, "/$slow", "respond-async")
        .await;
    let (reply, took) = timed(server.poll(&status_url, &[("prefer", "wait=10")])).await;
    assert_eq!(reply.status, StatusCode::ACCEPTED, "{reply:?}");
    assert!(took >= NOT_BEFORE_ONE_SECOND, "held only {took:?}");
    assert!(took < EARLY, "the cap of 1 s was not applied: {took:?}");
}

// STATUS-3, STATUS-15: with `max_wait` zero (the default), `Prefer: wait` on a poll is ignored.
#[tokio::test]
async fn status_3_long_poll_is_off_without_max_wait() {
    let server = start(|b| b).await;
    let status_url = server
        .kick_off(Method::POST, "/$slow", "respond-async")
        .await;
    let (reply, took) = timed(server.poll(&status_url, &[("prefer", "wait=10")])).await;
    assert_eq!(reply.status, StatusCode::ACCEPTED, "{reply:?}");
    assert!(took < EARLY, "a poll was held without max_wait: {took:?}");
}

// STATUS-3, CANCEL-3: a job deleted while a long poll waits on it wakes the poll, which then
// answers 404 + OperationOutcome, well before `wait` runs out.
#[tokio::test]
async fn status_3_long_poll_of_a_job_deleted_meanwhile_answers_404() {
    let server = Arc::new(start(with_max_wait(10)).await);
    let status_url = server
        .kick_off(Method::POST, "/$slow", "respond-async")
        .await;
    server.handler_started().await;
    let running = server.poll(&status_url, &[]).await;
    assert_eq!(running.status, StatusCode::ACCEPTED, "{running:?}");
    let tag = etag(&running);
    let poll = server.spawn_poll(
        &status_url,
        vec![("prefer", "wait=10".to_owned()), ("if-none-match", tag)],
    );
    tokio::time::sleep(Duration::from_millis(200)).await;
    let deleted = server.client.delete(&status_url).await;
    assert_eq!(deleted.status, StatusCode::ACCEPTED, "{deleted:?}");
    let (reply, took) = within("the long poll", poll).await.expect("the poll task");
    assert!(
        took < EARLY,
        "the long poll was not woken by the DELETE: {took:?}"
    );
    assert_not_found(&reply, "a long poll of a deleted job");
}

// STATUS-3: a long poll whose `If-None-Match` already differs from the current tag has news
// to tell, and is answered at once.
#[tokio::test]
async fn status_3_long_poll_with_a_stale_tag_answers_at_once() {
    let server = start(with_max_wait(10)).await;
    let status_url = server
        .kick_off(Method::POST, "/$slow", "respond-async")
        .await;
    let (reply, took) = timed(server.poll(
        &status_url,
        &[("prefer", "wait=10"), ("if-none-match", "W/\"stale\"")],
    ))
    .await;
    assert!(took < EARLY, "a stale tag was held: {took:?}");
    assert_eq!(reply.status, StatusCode::ACCEPTED, "{reply:?}");
    etag(&reply);
}

// STATUS-3: a long poll of a finished job is answered at once with the completion.
#[tokio::test]
async fn status_3_long_poll_of_a_finished_job_answers_at_once() {
    let server = start(with_max_wait(10)).await;
    let status_url = server
        .kick_off(Method::POST, "/Patient", "respond-async")
        .await;
    server.finished(&status_url).await;
    let (reply, took) = timed(server.poll(&status_url, &[("prefer", "wait=10")])).await;
    assert!(took < EARLY, "a finished job's poll was held: {took:?}");
    assert_eq!(only_entry(&reply)["response"]["status"], "201 Created");
}

// ---------------------------------------------------------------------------------------------
// 4. PREFER-13, STATUS-17: `separate-export-status`.

const SEPARATE: &str = "respond-async, separate-export-status";

/// PREFER-10, PREFER-13: a bulk kick-off with `prefer`: 202, and `Preference-Applied` lists
/// exactly the honoured tokens. Returns the status URL.
async fn bulk_kick_off(server: &Server, target: &str, prefer: &str) -> String {
    let reply = server
        .send(Method::GET, target, &[("prefer", prefer)])
        .await;
    assert_eq!(reply.status, StatusCode::ACCEPTED, "{target}: {reply:?}");
    let applied = tokens(&reply, "preference-applied");
    let expected: &[&str] = if prefer == SEPARATE {
        &["respond-async", "separate-export-status"]
    } else {
        &["respond-async"]
    };
    assert_eq!(applied, expected, "{target} with Prefer: {prefer}");
    reply.header("content-location").to_owned()
}

/// BULK-8: a completion manifest with the one Patient file.
fn assert_manifest(reply: &Reply, what: &str) {
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
// `Retry-After` works as without it. Without the token: plain 202, then 200 + manifest, and
// never `X-Export-Status`.
#[tokio::test]
async fn prefer_13_status_17_running_and_complete_with_and_without_the_token() {
    let server = start(|b| b).await;
    for prefer in [SEPARATE, "respond-async"] {
        let separate = prefer == SEPARATE;
        let status_url = bulk_kick_off(&server, "/$export", prefer).await;

        let running = server.poll(&status_url, &[]).await;
        if separate {
            assert_eq!(running.status, StatusCode::OK, "{running:?}");
            assert_eq!(running.header("x-export-status"), "202 Accepted");
        } else {
            assert_eq!(running.status, StatusCode::ACCEPTED, "{running:?}");
            assert!(
                running.headers.get("x-export-status").is_none(),
                "{running:?}"
            );
        }
        assert!(running.headers.get(RETRY_AFTER).is_some(), "{running:?}");
        assert!(running.body.is_empty(), "{prefer}: {running:?}");

        server.gate.notify_one();
        let done = server
            .poll_until(&status_url, &[], "the export's end", |r| {
                r.status != StatusCode::ACCEPTED
                    && header(r, "x-export-status") != Some("202 Accepted")
            })
            .await;
        assert_eq!(done.status, StatusCode::OK, "{prefer}: {done:?}");
        if separate {
            assert_eq!(done.header("x-export-status"), "200 OK");
        } else {
            assert!(done.headers.get("x-export-status").is_none(), "{done:?}");
        }
        assert_manifest(&done, prefer);
        assert_eq!(done.headers.get(CACHE_CONTROL).unwrap(), "no-store");
    }
}

// PREFER-13, STATUS-17 (failed), BULK-6: an export whose first request the server refuses
// (404 + OperationOutcome): with the token, 200 + `X-Export-Status: 404 Not Found` + the
// OperationOutcome; without it, 404 + the OperationOutcome and no `X-Export-Status`.
#[tokio::test]
async fn prefer_13_status_17_failed_export_with_and_without_the_token() {
    // Without the kick-off's wait, so that the 404 reaches the status URL.
    let server = start(|b| b.kickoff_wait(Duration::ZERO)).await;
    for prefer in [SEPARATE, "respond-async"] {
        let status_url = bulk_kick_off(&server, "/Group/g-404/$export", prefer).await;
        let failed = server
            .poll_until(&status_url, &[], "the export's failure", |r| {
                r.status != StatusCode::ACCEPTED
                    && header(r, "x-export-status") != Some("202 Accepted")
            })
            .await;
        if prefer == SEPARATE {
            assert_eq!(failed.status, StatusCode::OK, "{failed:?}");
            assert_eq!(failed.header("x-export-status"), "404 Not Found");
        } else {
            assert_eq!(failed.status, StatusCode::NOT_FOUND, "{failed:?}");
            assert!(
                failed.headers.get("x-export-status").is_none(),
                "{failed:?}"
            );
        }
        assert_eq!(failed.header("content-type"), FHIR, "{prefer}");
        let outcome = failed.json();
        assert_eq!(outcome["resourceType"], "OperationOutcome", "{outcome}");
        assert_eq!(
            outcome["issue"][0]["diagnostics"], "Group g-404 is unknown",
            "{prefer}: the server's own outcome"
        );
        // STATUS-14: the answer is the same on the next poll.
        let again = server.poll(&status_url, &[]).await;
        assert_eq!((again.status, again.body), (failed.status, failed.body));
    }
}

// PREFER-13, SEL-3: the `_outputFormat` form of a bulk kick-off honours the token the same way.
#[tokio::test]
async fn prefer_13_output_format_kick_off_with_separate_export_status() {
    let server = start(|b| b).await;
    let status_url = bulk_kick_off(
        &server,
        "/Observation?_outputFormat=application%2Ffhir%2Bndjson",
        SEPARATE,
    )
    .await;
    let done = server
        .poll_until(&status_url, &[], "the export's end", |r| {
            header(r, "x-export-status") != Some("202 Accepted")
        })
        .await;
    assert_eq!(done.status, StatusCode::OK, "{done:?}");
    assert_eq!(done.header("x-export-status"), "200 OK");
    assert_eq!(done.header("content-type"), "application/json");
    assert_eq!(done.json()["output"][0]["type"], "Observation");
}

// PREFER-13, PREFER-4, AMB-24: the token is not defined for the interaction pattern: it is
// ignored (not in `Preference-Applied`), and status answers are the usual 202 / 200 Bundle
// with no `X-Export-Status`.
#[tokio::test]
async fn prefer_13_interaction_pattern_ignores_separate_export_status() {
    let server = start(|b| b).await;
    let reply = server
        .send(Method::POST, "/$slow", &[("prefer", SEPARATE)])
        .await;
    assert_eq!(reply.status, StatusCode::ACCEPTED, "{reply:?}");
    assert_eq!(tokens(&reply, "preference-applied"), ["respond-async"]);
    let status_url = reply.header("content-location").to_owned();
    let running = server.poll(&status_url, &[]).await;
    assert_eq!(running.status, StatusCode::ACCEPTED, "{running:?}");
    assert!(
        running.headers.get("x-export-status").is_none(),
        "{running:?}"
    );
    server.gate.notify_one();
    let done = server.finished(&status_url).await;
    assert_eq!(only_entry(&done)["response"]["status"], "200 OK");
    assert!(done.headers.get("x-export-status").is_none(), "{done:?}");
}

// STATUS-15: the 405 on a status URL still lists the status URL's own methods (the result
// route's `Allow` is only for `/result`).
#[tokio::test]
async fn status_15_status_url_allow_is_unchanged_in_redirect_mode() {
    let server = start(redirect).await;
    let status_url = server
        .kick_off(Method::POST, "/Patient", "respond-async")
        .await;
    let reply = server.client.send(Method::PUT, &status_url, &[], "").await;
    assert_eq!(reply.status, StatusCode::METHOD_NOT_ALLOWED, "{reply:?}");
    assert_eq!(reply.headers.get(ALLOW).unwrap(), "GET, HEAD, DELETE");
}
