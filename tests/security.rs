//! Security (§6 SEC): jobs bound to their callers (SEC-10), the caller's own credentials on the
//! replayed request (SEC-14), quotas on kick-off (KICK-8, SEC-13), poll throttling (STATUS-6,
//! STATUS-7), no credential at rest (SEC-11), `Cache-Control: no-store` (SEC-12), the audit
//! trail, and a bounded wait for kick-off bodies (SEC-7). Over a real socket unless a test says
//! otherwise.

mod support;

use support::Captured;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use axum::extract::Request;
use axum::middleware::{self, Next};
use axum::response::Response;
use axum::routing::{get, post};
use axum::{Extension, Router};
use bytes::Bytes;
use http::header::{AUTHORIZATION, HeaderName};
use http::{HeaderMap, Method, StatusCode};
use http_body_util::BodyExt;
use support::{Reply, TestClient, parse_job_id, send_stalling, serve, within};
use tokio::sync::Semaphore;
use tower::ServiceExt;
use tower_fhir_async::{AsyncLayer, AsyncLayerBuilder, JobContext, JobId, JobStore, MemoryStore};

const FHIR_JSON: [(HeaderName, &str); 1] = [(http::header::CONTENT_TYPE, "application/fhir+json")];

/// What the authentication middleware puts into each request's extensions.
#[derive(Debug, Clone)]
struct CallerId(String);

/// A stand-in authentication layer. `Authorization: Bearer <id>` or `Bearer <id>.<signature>`
/// names the caller `<id>`; the signature plays the secret part of a real token, which must never
/// reach the store or the logs. Requests without a token go through anonymous, so that the async
/// layer's own answer to them can be observed.
async fn authenticate(mut request: Request, next: Next) -> Response {
    let caller = request
        .headers()
        .get(AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.strip_prefix("Bearer "))
        .and_then(|token| token.split('.').next())
        .filter(|id| !id.is_empty())
        .map(str::to_owned);
    if let Some(id) = caller {
        request.extensions_mut().insert(CallerId(id));
    }
    next.run(request).await
}

/// What `$whoami` saw of a replayed request (SEC-14).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Seen {
    authorization: Option<String>,
    caller: Option<String>,
    in_job: bool,
}

/// A server under test: the FHIR routes, the async layer, the authentication middleware outside
/// it, and handles on what the routes and the store see.
struct Server {
    base: String,
    store: MemoryStore,
    /// `$hold` waits for a permit of this before answering; `release` hands one out.
    gate: Arc<Semaphore>,
    /// How many times any FHIR route was entered.
    calls: Arc<AtomicUsize>,
    seen: Arc<Mutex<Vec<Seen>>>,
    client: TestClient,
}

/// The FHIR routes: `POST $hold` (answers once released), `POST $quick`, `POST $whoami`
/// (records what it sees) and `GET Patient` (a searchset).
fn fhir_routes(
    gate: Arc<Semaphore>,
    calls: Arc<AtomicUsize>,
    seen: Arc<Mutex<Vec<Seen>>>,
) -> Router {
    let count = |calls: &Arc<AtomicUsize>| {
        calls.fetch_add(1, Ordering::SeqCst);
    };
    let (c1, c2, c3, c4) = (calls.clone(), calls.clone(), calls.clone(), calls);
    Router::new()
        .route(
            "/fhir/$hold",
            post(move || {
                count(&c1);
                let gate = gate.clone();
                async move {
                    gate.acquire().await.expect("gate open").forget();
                    (FHIR_JSON, r#"{"resourceType":"Parameters"}"#)
                }
            }),
        )
        .route(
            "/fhir/$quick",
            post(move || {
                count(&c2);
                async { (FHIR_JSON, r#"{"resourceType":"Parameters"}"#) }
            }),
        )
        .route(
            "/fhir/$whoami",
            post(
                move |headers: HeaderMap,
                      caller: Option<Extension<CallerId>>,
                      job: Option<Extension<JobContext>>| {
                    count(&c3);
                    seen.lock().unwrap().push(Seen {
                        authorization: headers
                            .get(AUTHORIZATION)
                            .map(|v| v.to_str().unwrap().to_owned()),
                        caller: caller.map(|Extension(c)| c.0),
                        in_job: job.is_some(),
                    });
                    async { (FHIR_JSON, r#"{"resourceType":"Parameters"}"#) }
                },
            ),
        )
        .route(
            "/fhir/Patient",
            get(move || {
                count(&c4);
                async {
                    (
                        FHIR_JSON,
                        r#"{"resourceType":"Bundle","type":"searchset","total":0}"#,
                    )
                }
            }),
        )
}

impl Server {
    /// Serves the FHIR routes behind a layer built by `configure`, with the authentication
    /// middleware added after (outside) it.
    async fn start(configure: impl FnOnce(AsyncLayerBuilder) -> AsyncLayerBuilder) -> Self {
        let store = MemoryStore::default();
        let gate = Arc::new(Semaphore::new(0));
        let calls = Arc::new(AtomicUsize::new(0));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let layer = configure(AsyncLayer::builder(store.clone()).base_path("/fhir")).build();
        let app = fhir_routes(gate.clone(), calls.clone(), seen.clone())
            .layer(layer)
            .layer(middleware::from_fn(authenticate));
        let base = format!("http://{}/fhir", serve(app).await);
        Self {
            base,
            store,
            gate,
            calls,
            seen,
            client: TestClient::default(),
        }
    }

    /// Lets one `$hold` job answer.
    fn release(&self) {
        self.gate.add_permits(1);
    }

    fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }

    /// The status URL of a job that does not exist.
    fn unknown_job(&self) -> String {
        format!("{}/_async/{}", self.base, JobId::new())
    }

    async fn send(
        &self,
        method: Method,
        url: &str,
        token: Option<&str>,
        extra: &[(&str, &str)],
    ) -> Reply {
        let bearer = token.map(|t| format!("Bearer {t}"));
        let mut headers: Vec<(&str, &str)> = extra.to_vec();
        if let Some(bearer) = &bearer {
            headers.push(("authorization", bearer.as_str()));
        }
        self.client.send(method, url, &headers, "").await
    }

    /// `POST {base}{op}` with `Prefer: respond-async`, as `token` (anonymous when `None`).
    async fn kick(&self, op: &str, token: Option<&str>) -> Reply {
        let url = format!("{}{op}", self.base);
        self.send(Method::POST, &url, token, &[("prefer", "respond-async")])
            .await
    }

    /// Kicks off `op` as `token`, asserts `202`, and returns the status URL.
    async fn kick_accepted(&self, op: &str, token: Option<&str>) -> String {
        let reply = self.kick(op, token).await;
        assert_eq!(
            reply.status,
            StatusCode::ACCEPTED,
            "kick-off of {op}: {reply:?}"
        );
        reply.header("content-location").to_owned()
    }

    async fn get(&self, url: &str, token: Option<&str>) -> Reply {
        self.send(Method::GET, url, token, &[]).await
    }

    async fn delete(&self, url: &str, token: Option<&str>) -> Reply {
        self.send(Method::DELETE, url, token, &[]).await
    }

    /// Polls as `token` until the job stops answering `202` (at most 200 polls, 20 ms apart).
    async fn poll_until_done(&self, url: &str, token: Option<&str>) -> Reply {
        for _ in 0..200 {
            let reply = self.get(url, token).await;
            if reply.status != StatusCode::ACCEPTED {
                return reply;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("job at {url} still running after 200 polls");
    }
}

fn bound_to_callers(builder: AsyncLayerBuilder) -> AsyncLayerBuilder {
    builder.caller_from_extension(|caller: &CallerId| caller.0.clone())
}

fn assert_status(reply: &Reply, status: StatusCode, what: &str) {
    assert_eq!(reply.status, status, "{what}: {reply:?}");
}

/// `Retry-After` in delta seconds: digits only (KICK-8, STATUS-6 — never an HTTP date).
fn retry_after_seconds(reply: &Reply) -> u64 {
    let value = reply.header("retry-after");
    assert!(
        !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit()),
        "Retry-After is not delta seconds: {value:?}"
    );
    value.parse().unwrap()
}

// SEC-10: the caller that started a job polls it — 202 while it runs, then 200.
#[tokio::test]
async fn sec_10_owner_polls_its_own_job() {
    let server = Server::start(bound_to_callers).await;
    let url = server.kick_accepted("/$hold", Some("alice")).await;
    assert_status(
        &server.get(&url, Some("alice")).await,
        StatusCode::ACCEPTED,
        "owner's poll",
    );
    server.release();
    let done = server.poll_until_done(&url, Some("alice")).await;
    assert_status(&done, StatusCode::OK, "owner's poll after completion");
    assert_eq!(done.json()["type"], "batch-response");
}

// SEC-10: another caller's poll — and an anonymous one — gets the very 404 an unknown id gets,
// byte for byte, whether the job runs or has finished: the job's existence is not confirmed.
#[tokio::test]
async fn sec_10_another_callers_poll_gets_the_same_404_as_an_unknown_job() {
    let server = Server::start(bound_to_callers).await;
    let unknown = server.get(&server.unknown_job(), Some("bob")).await;
    assert_status(&unknown, StatusCode::NOT_FOUND, "unknown job");
    unknown.assert_outcome("not-found");

    let url = server.kick_accepted("/$hold", Some("alice")).await;
    for (token, state) in [(Some("bob"), "running"), (None, "running")] {
        let foreign = server.get(&url, token).await;
        assert_status(
            &foreign,
            StatusCode::NOT_FOUND,
            &format!("{token:?} polls a {state} job"),
        );
        foreign.assert_outcome("not-found");
        assert_eq!(
            foreign.body, unknown.body,
            "{token:?}: the 404 body differs from an unknown job's"
        );
        assert_eq!(
            foreign.headers.get("content-type"),
            unknown.headers.get("content-type")
        );
    }

    server.release();
    assert_status(
        &server.poll_until_done(&url, Some("alice")).await,
        StatusCode::OK,
        "owner after completion",
    );
    let foreign = server.get(&url, Some("bob")).await;
    assert_status(&foreign, StatusCode::NOT_FOUND, "bob polls a finished job");
    assert_eq!(
        foreign.body, unknown.body,
        "the 404 body differs from an unknown job's"
    );
}

// SEC-10, CANCEL: another caller's DELETE gets the unknown-job 404 and cancels nothing; the owner
// still sees the job, and it runs to completion.
#[tokio::test]
async fn sec_10_another_callers_delete_is_404_and_leaves_the_job_alone() {
    let server = Server::start(bound_to_callers).await;
    let unknown = server.delete(&server.unknown_job(), Some("bob")).await;
    assert_status(&unknown, StatusCode::NOT_FOUND, "DELETE of an unknown job");

    let url = server.kick_accepted("/$hold", Some("alice")).await;
    for token in [Some("bob"), None] {
        let foreign = server.delete(&url, token).await;
        assert_status(
            &foreign,
            StatusCode::NOT_FOUND,
            &format!("{token:?} deletes alice's job"),
        );
        foreign.assert_outcome("not-found");
        assert_eq!(
            foreign.body, unknown.body,
            "the 404 body differs from an unknown job's"
        );
    }
    assert_eq!(server.store.len(), 1, "the job is still recorded");
    assert_status(
        &server.get(&url, Some("alice")).await,
        StatusCode::ACCEPTED,
        "owner's poll after the foreign DELETE",
    );
    server.release();
    assert_status(
        &server.poll_until_done(&url, Some("alice")).await,
        StatusCode::OK,
        "the job ran to completion",
    );
}

// SEC-10: with `foreign_job_status(403)`, another caller's poll and DELETE get 403 `forbidden`;
// an unknown id is still 404, and the owner is unaffected.
#[tokio::test]
async fn sec_10_foreign_job_status_403_when_configured() {
    let server =
        Server::start(|b| bound_to_callers(b).foreign_job_status(StatusCode::FORBIDDEN)).await;
    let url = server.kick_accepted("/$hold", Some("alice")).await;

    let poll = server.get(&url, Some("bob")).await;
    assert_status(&poll, StatusCode::FORBIDDEN, "bob polls alice's job");
    poll.assert_outcome("forbidden");
    let cancel = server.delete(&url, Some("bob")).await;
    assert_status(&cancel, StatusCode::FORBIDDEN, "bob deletes alice's job");
    cancel.assert_outcome("forbidden");

    let unknown = server.get(&server.unknown_job(), Some("bob")).await;
    assert_status(&unknown, StatusCode::NOT_FOUND, "unknown job");
    unknown.assert_outcome("not-found");
    assert_status(
        &server.get(&url, Some("alice")).await,
        StatusCode::ACCEPTED,
        "owner's poll",
    );
    assert_eq!(server.store.len(), 1, "bob's DELETE cancelled nothing");
}

// SEC-10: where jobs are bound to callers, a kick-off that names no caller is refused with 403
// `forbidden`; nothing is recorded and the FHIR service is never called.
#[tokio::test]
async fn sec_10_anonymous_kick_off_is_refused_403() {
    let server = Server::start(bound_to_callers).await;
    let reply = server.kick("/$quick", None).await;
    assert_status(&reply, StatusCode::FORBIDDEN, "anonymous kick-off");
    reply.assert_outcome("forbidden");
    assert!(reply.headers.get("content-location").is_none(), "{reply:?}");
    assert_eq!(server.store.len(), 0, "nothing recorded");
    assert_eq!(server.calls(), 0, "the FHIR service was never called");
}

// SEC-10: `caller_from_header` binds jobs to a header a trusted gateway sets.
#[tokio::test]
async fn sec_10_caller_from_header_binds_jobs_to_the_header_value() {
    let server = Server::start(|b| {
        b.caller_from_header(HeaderName::from_static("x-client"))
            .caller_key(CALLER_KEY)
    })
    .await;
    let hold = format!("{}/$hold", server.base);
    let prefer = ("prefer", "respond-async");
    let as_client = |client: &'static str| [("x-client", client)];

    let anonymous = server.send(Method::POST, &hold, None, &[prefer]).await;
    assert_status(
        &anonymous,
        StatusCode::FORBIDDEN,
        "kick-off without x-client",
    );
    anonymous.assert_outcome("forbidden");

    let accepted = server
        .send(
            Method::POST,
            &hold,
            None,
            &[prefer, ("x-client", "gateway-client-1")],
        )
        .await;
    assert_status(&accepted, StatusCode::ACCEPTED, "kick-off with x-client");
    let url = accepted.header("content-location").to_owned();
    assert_eq!(
        server
            .store
            .get(&parse_job_id(&url), SystemTime::now())
            .await
            .unwrap()
            .unwrap()
            .owner,
        Some(digest("gateway-client-1")),
        "the header value's keyed digest, never the value itself"
    );

    let other = server
        .send(Method::GET, &url, None, &as_client("gateway-client-2"))
        .await;
    assert_status(&other, StatusCode::NOT_FOUND, "another x-client polls");
    other.assert_outcome("not-found");
    assert_status(
        &server.get(&url, None).await,
        StatusCode::NOT_FOUND,
        "poll without x-client",
    );
    let other_delete = server
        .send(Method::DELETE, &url, None, &as_client("gateway-client-2"))
        .await;
    assert_status(
        &other_delete,
        StatusCode::NOT_FOUND,
        "another x-client deletes",
    );

    let owner = server
        .send(Method::GET, &url, None, &as_client("gateway-client-1"))
        .await;
    assert_status(&owner, StatusCode::ACCEPTED, "owner's poll");
    let cancel = server
        .send(Method::DELETE, &url, None, &as_client("gateway-client-1"))
        .await;
    assert_status(&cancel, StatusCode::ACCEPTED, "owner's DELETE");
    assert_eq!(server.store.len(), 0);
}

// SEC-14: the replayed request reaches the FHIR service with the caller's own `Authorization`
// and the caller identity the authentication layer left — each job its own caller's.
#[tokio::test]
async fn sec_14_replayed_request_carries_the_callers_own_credentials() {
    let server = Server::start(bound_to_callers).await;
    let alice = server.kick_accepted("/$whoami", Some("alice.sig-1")).await;
    let bob = server.kick_accepted("/$whoami", Some("bob.sig-2")).await;
    assert_status(
        &server.poll_until_done(&alice, Some("alice.sig-1")).await,
        StatusCode::OK,
        "alice",
    );
    assert_status(
        &server.poll_until_done(&bob, Some("bob.sig-2")).await,
        StatusCode::OK,
        "bob",
    );

    let mut seen = server.seen.lock().unwrap().clone();
    seen.sort_by(|a, b| a.authorization.cmp(&b.authorization));
    assert_eq!(
        seen,
        [
            Seen {
                authorization: Some("Bearer alice.sig-1".into()),
                caller: Some("alice".into()),
                in_job: true,
            },
            Seen {
                authorization: Some("Bearer bob.sig-2".into()),
                caller: Some("bob".into()),
                in_job: true,
            },
        ]
    );
}

// KICK-8, SEC-13: with `max_running_jobs(1)` and one job running, a kick-off gets 429
// `throttled` with delta-seconds `Retry-After`, is not recorded and never reaches the FHIR
// service; once the running job finishes, a kick-off is accepted again. A multi-threaded
// runtime, as servers use.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kick_8_max_running_jobs_refuses_with_429_until_a_job_finishes() {
    let server = Server::start(|b| b.max_running_jobs(1)).await;
    let held = server.kick_accepted("/$hold", None).await;
    assert_eq!(server.store.len(), 1);
    within("the held job starting", async {
        while server.calls() == 0 {
            tokio::task::yield_now().await;
        }
    })
    .await;

    let refused = server.kick("/$quick", None).await;
    assert_status(&refused, StatusCode::TOO_MANY_REQUESTS, "second kick-off");
    refused.assert_outcome("throttled");
    assert!(retry_after_seconds(&refused) >= 1);
    assert!(
        refused.headers.get("content-location").is_none(),
        "{refused:?}"
    );
    assert_eq!(server.store.len(), 1, "the refused kick-off was recorded");
    assert_eq!(
        server.calls(),
        1,
        "the refused kick-off reached the FHIR service"
    );

    server.release();
    assert_status(
        &server.poll_until_done(&held, None).await,
        StatusCode::OK,
        "held job",
    );
    let again = server.kick_accepted("/$quick", None).await;
    assert_status(
        &server.poll_until_done(&again, None).await,
        StatusCode::OK,
        "the next job",
    );
}

// KICK-8, SEC-13: with `max_jobs_per_caller(1)`, alice's second kick-off gets 429 `throttled`
// and is not recorded, while bob's is accepted. A multi-threaded runtime, as servers use.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sec_13_max_jobs_per_caller_limits_each_caller_apart() {
    let server = Server::start(|b| bound_to_callers(b).max_jobs_per_caller(1)).await;
    let alice = server.kick_accepted("/$hold", Some("alice")).await;

    let refused = server.kick("/$quick", Some("alice")).await;
    assert_status(
        &refused,
        StatusCode::TOO_MANY_REQUESTS,
        "alice's second kick-off",
    );
    refused.assert_outcome("throttled");
    retry_after_seconds(&refused);
    assert_eq!(server.store.len(), 1, "the refused kick-off was recorded");

    let bob = server.kick_accepted("/$hold", Some("bob")).await;
    assert_eq!(server.store.len(), 2);
    for (url, token) in [(&alice, "alice"), (&bob, "bob")] {
        assert_status(
            &server.get(url, Some(token)).await,
            StatusCode::ACCEPTED,
            &format!("{token}'s job runs"),
        );
    }
}

// KICK-8, SEC-13: a cancelled job gives its caller's place back by the time the DELETE is
// answered, so the caller may start another job at once. The place is returned by the job's own
// task, so the cycle is repeated on a multi-threaded runtime, where that task runs in parallel.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sec_13_cancel_gives_the_callers_place_back_at_once() {
    let server = Server::start(|b| bound_to_callers(b).max_jobs_per_caller(1)).await;
    let mut current = server.kick_accepted("/$hold", Some("alice")).await;
    for round in 1..=100 {
        assert_status(
            &server.delete(&current, Some("alice")).await,
            StatusCode::ACCEPTED,
            &format!("round {round}: alice cancels"),
        );
        let again = server.kick("/$hold", Some("alice")).await;
        assert_status(
            &again,
            StatusCode::ACCEPTED,
            &format!("round {round}: alice's kick-off right after her cancel was answered"),
        );
        current = again.header("content-location").to_owned();
    }
}

// STATUS-6: with `min_poll_interval(2 s)`, a second poll right after the first gets 429
// `throttled`, `Retry-After` of 1 or 2 delta seconds and `Cache-Control: no-store`.
#[tokio::test]
async fn status_6_poll_within_the_interval_gets_429() {
    let server = Server::start(|b| b.min_poll_interval(Duration::from_secs(2))).await;
    let url = server.kick_accepted("/$hold", None).await;
    assert_status(
        &server.get(&url, None).await,
        StatusCode::ACCEPTED,
        "first poll",
    );

    let fast = server.get(&url, None).await;
    assert_status(
        &fast,
        StatusCode::TOO_MANY_REQUESTS,
        "immediate second poll",
    );
    fast.assert_outcome("throttled");
    let wait = retry_after_seconds(&fast);
    assert!(
        (1..=2).contains(&wait),
        "Retry-After {wait}, expected 1 or 2"
    );
    assert_eq!(fast.header("cache-control"), "no-store");
    assert_eq!(server.store.len(), 1, "the job is not abandoned");
}

// STATUS-6: throttling counts polls per job: polling one job does not throttle another's.
#[tokio::test]
async fn status_6_throttling_is_per_job() {
    let server = Server::start(|b| b.min_poll_interval(Duration::from_secs(2))).await;
    let first = server.kick_accepted("/$hold", None).await;
    let second = server.kick_accepted("/$hold", None).await;
    assert_status(
        &server.get(&first, None).await,
        StatusCode::ACCEPTED,
        "first job",
    );
    assert_status(
        &server.get(&first, None).await,
        StatusCode::TOO_MANY_REQUESTS,
        "first job again",
    );
    assert_status(
        &server.get(&second, None).await,
        StatusCode::ACCEPTED,
        "second job",
    );
}

/// One request to `app`, in process.
async fn send_in_process(app: &Router, method: Method, uri: &str, prefer: bool) -> Reply {
    let mut request = http::Request::builder().method(method).uri(uri);
    if prefer {
        request = request.header("prefer", "respond-async");
    }
    let request = request.body(axum::body::Body::empty()).unwrap();
    let response = app.clone().oneshot(request).await.unwrap();
    let (parts, body) = response.into_parts();
    Reply {
        status: parts.status,
        headers: parts.headers,
        body: body.collect().await.unwrap().to_bytes(),
    }
}

// STATUS-6, STATUS-7: a throttled job goes on and completes; polls stay refused, with the time
// left counting down, until the interval has passed, and then the result is served. In process,
// with paused time.
#[tokio::test(start_paused = true)]
async fn status_7_throttled_job_goes_on_and_answers_after_the_interval() {
    let store = MemoryStore::default();
    let gate = Arc::new(Semaphore::new(0));
    let layer = AsyncLayer::builder(store.clone())
        .base_url("http://fhir.test/fhir")
        .min_poll_interval(Duration::from_secs(2))
        .build();
    let app = fhir_routes(gate.clone(), Arc::default(), Arc::default()).layer(layer);

    let kick = send_in_process(&app, Method::POST, "/fhir/$hold", true).await;
    assert_status(&kick, StatusCode::ACCEPTED, "kick-off");
    let url = kick
        .header("content-location")
        .strip_prefix("http://fhir.test")
        .unwrap()
        .to_owned();
    let id = parse_job_id(&url);

    let first = send_in_process(&app, Method::GET, &url, false).await;
    assert_status(&first, StatusCode::ACCEPTED, "first poll");
    let fast = send_in_process(&app, Method::GET, &url, false).await;
    assert_status(
        &fast,
        StatusCode::TOO_MANY_REQUESTS,
        "immediate second poll",
    );
    assert_eq!(retry_after_seconds(&fast), 2);

    // The job finishes while its polls are throttled.
    gate.add_permits(1);
    let mut finished = false;
    for _ in 0..100 {
        let record = store.get(&id, SystemTime::now()).await.unwrap();
        if record
            .expect("the job is still recorded")
            .state
            .is_finished()
        {
            finished = true;
            break;
        }
        tokio::task::yield_now().await;
    }
    assert!(finished, "the job did not finish while throttled");

    tokio::time::advance(Duration::from_millis(1500)).await;
    let still = send_in_process(&app, Method::GET, &url, false).await;
    assert_status(
        &still,
        StatusCode::TOO_MANY_REQUESTS,
        "poll 1.5 s after the first",
    );
    assert_eq!(retry_after_seconds(&still), 1, "the wait counts down");

    tokio::time::advance(Duration::from_millis(500)).await;
    let done = send_in_process(&app, Method::GET, &url, false).await;
    assert_status(&done, StatusCode::OK, "poll once the interval has passed");
    assert_eq!(done.json()["type"], "batch-response");
}

const SECRET: &str = "secret-xyz";

/// The caller key of the layers whose stored owners and audit lines are checked.
const CALLER_KEY: &str = "test-caller-key-0123456789abcdef";

/// What a layer with [`CALLER_KEY`] keeps and logs for caller `id` (SEC-10, SEC-11).
fn digest(id: &str) -> String {
    tower_fhir_async::caller_digest(CALLER_KEY.as_bytes(), id).expect("a long enough key")
}

// SEC-11: a kick-off carrying credentials in `Authorization`, `Cookie` and an `access_token`
// query parameter leaves none of them in the job record; the record keeps the caller's principal
// and the target without `access_token`.
#[tokio::test]
async fn sec_11_no_credential_reaches_the_job_record() {
    let server = Server::start(|b| bound_to_callers(b).caller_key(CALLER_KEY)).await;
    let token = format!("alice.{SECRET}");
    let url = format!("{}/Patient?access_token={SECRET}&name=x", server.base);
    let cookie = format!("s={SECRET}");
    let kick = server
        .send(
            Method::GET,
            &url,
            Some(&token),
            &[("prefer", "respond-async"), ("cookie", &cookie)],
        )
        .await;
    assert_status(&kick, StatusCode::ACCEPTED, "kick-off");
    let status_url = kick.header("content-location").to_owned();
    let id = parse_job_id(&status_url);

    let running = server
        .store
        .get(&id, SystemTime::now())
        .await
        .unwrap()
        .expect("recorded");
    assert!(
        !format!("{running:?}").contains(SECRET),
        "a credential reached the store: {running:?}"
    );

    let done = server.poll_until_done(&status_url, Some(&token)).await;
    assert_status(&done, StatusCode::OK, "completion");
    assert!(
        !String::from_utf8_lossy(&done.body).contains(SECRET),
        "a credential reached the result: {}",
        String::from_utf8_lossy(&done.body)
    );
    let record = server
        .store
        .get(&id, SystemTime::now())
        .await
        .unwrap()
        .expect("recorded");
    assert!(
        !format!("{record:?}").contains(SECRET),
        "a credential reached the store: {record:?}"
    );
    assert_eq!(record.target, "/fhir/Patient?name=x");
    assert_eq!(record.method, "GET");
    assert_eq!(
        record.owner,
        Some(digest("alice")),
        "the principal's keyed digest, not the token"
    );
}

// SEC-11, issue 11 item 5: an `access_token` whose name is percent-encoded (`access%5Ftoken`,
// `%5f`, any other spelling) is dropped like a plain one: a bulk kick-off carrying it leaves it
// neither in the stored target nor in the manifest's `request`, while the other parameters stay
// as sent.
#[tokio::test]
async fn sec_11_percent_encoded_access_token_reaches_neither_the_store_nor_the_manifest() {
    let server = Server::start(|b| b).await;
    for name in ["access%5Ftoken", "access%5ftoken", "%61ccess_token"] {
        let url = format!(
            "{}/Patient?_outputFormat=application%2Ffhir%2Bndjson&{name}={SECRET}&name=x",
            server.base
        );
        let kick = server
            .send(Method::GET, &url, None, &[("prefer", "respond-async")])
            .await;
        assert_status(&kick, StatusCode::ACCEPTED, name);
        let status_url = kick.header("content-location").to_owned();
        let record = server
            .store
            .get(&parse_job_id(&status_url), SystemTime::now())
            .await
            .unwrap()
            .expect("recorded");
        assert_eq!(
            record.target, "/fhir/Patient?_outputFormat=application%2Ffhir%2Bndjson&name=x",
            "{name}: the stored target"
        );
        let done = server.poll_until_done(&status_url, None).await;
        assert_status(&done, StatusCode::OK, name);
        let manifest = done.json();
        let request = manifest["request"].as_str().expect("a manifest `request`");
        assert_eq!(
            request,
            format!(
                "{}/Patient?_outputFormat=application%2Ffhir%2Bndjson&name=x",
                server.base
            ),
            "{name}: the manifest's request"
        );
        assert!(
            !String::from_utf8_lossy(&done.body).contains(SECRET),
            "{name}: the token reached the manifest: {}",
            String::from_utf8_lossy(&done.body)
        );
    }
}

// SEC-12, STATUS-16, KICK-10: every status, result and cancel response — and every refusal on a
// status URL — carries `Cache-Control: no-store`.
#[tokio::test]
async fn sec_12_status_and_result_responses_are_no_store() {
    let server = Server::start(bound_to_callers).await;
    let held = server.kick_accepted("/$hold", Some("alice")).await;
    let quick = server.kick_accepted("/$quick", Some("alice")).await;
    let done = server.poll_until_done(&quick, Some("alice")).await;
    assert_status(&done, StatusCode::OK, "completed job");
    let malformed = format!("{}/_async/not-a-job-id", server.base);

    let mut replies = vec![
        ("kick-off", server.kick("/$quick", Some("alice")).await),
        ("in progress", server.get(&held, Some("alice")).await),
        (
            "HEAD in progress",
            server.send(Method::HEAD, &held, Some("alice"), &[]).await,
        ),
        ("completed", done),
        ("completed again", server.get(&quick, Some("alice")).await),
        (
            "HEAD completed",
            server.send(Method::HEAD, &quick, Some("alice"), &[]).await,
        ),
        ("another caller", server.get(&held, Some("bob")).await),
        (
            "unknown",
            server.get(&server.unknown_job(), Some("alice")).await,
        ),
        ("malformed", server.get(&malformed, Some("alice")).await),
        (
            "PUT",
            server.send(Method::PUT, &held, Some("alice"), &[]).await,
        ),
        ("DELETE", server.delete(&held, Some("alice")).await),
    ];
    replies.push(("after DELETE", server.get(&held, Some("alice")).await));
    for (what, reply) in &replies {
        assert_eq!(
            reply
                .headers
                .get("cache-control")
                .map(|v| v.to_str().unwrap()),
            Some("no-store"),
            "{what}: {reply:?}"
        );
    }
    let statuses: Vec<u16> = replies.iter().map(|(_, r)| r.status.as_u16()).collect();
    assert_eq!(
        statuses,
        [202, 202, 202, 200, 200, 200, 404, 404, 404, 405, 202, 404]
    );
}

/// Asserts that exactly one audit line holds every one of `fields`.
fn assert_audited(audit: &[&str], fields: &[&str]) {
    let matching = audit
        .iter()
        .filter(|line| fields.iter().all(|field| line.contains(field)))
        .count();
    assert_eq!(
        matching,
        1,
        "expected one audit event with {fields:?}, found {matching} in:\n{}",
        audit.join("\n")
    );
}

// SEC-12, SEC-13, SEC-10: the audit trail (target `tower_fhir_async::audit`) has one event per
// kick-off, status and cancel request — refusals and denials included — naming the action, the
// job, the caller and the outcome; no log line carries a credential.
#[tokio::test(flavor = "current_thread")]
async fn audit_trail_records_kick_offs_polls_and_cancels_without_credentials() {
    let captured = Captured::default();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(captured.clone())
        .with_ansi(false)
        .with_max_level(tracing::Level::DEBUG)
        .finish();
    // The current-thread runtime runs the server and the jobs on this thread, under this subscriber.
    let _guard = tracing::subscriber::set_default(subscriber);
    // With a single dispatcher registered, tracing-core caches each callsite's interest from the
    // default of whichever thread hits it first: a callsite first hit by a test on another thread
    // (no subscriber there) would stay disabled here too. A second, silent dispatcher makes it
    // ask every registered dispatcher instead.
    let _second = tracing::Dispatch::new(tracing::subscriber::NoSubscriber::default());

    let server = Server::start(|b| {
        bound_to_callers(b)
            .caller_key(CALLER_KEY)
            .max_jobs_per_caller(1)
    })
    .await;
    let alice = format!("alice.{SECRET}");
    let bob = format!("bob.{SECRET}");
    let cookie = format!("s={SECRET}");
    let alice = Some(alice.as_str());
    let bob = Some(bob.as_str());

    let held = server
        .send(
            Method::POST,
            &format!("{}/$hold?access_token={SECRET}", server.base),
            alice,
            &[("prefer", "respond-async"), ("cookie", &cookie)],
        )
        .await;
    assert_status(&held, StatusCode::ACCEPTED, "alice's kick-off");
    let held = held.header("content-location").to_owned();
    let held_id = parse_job_id(&held).to_string();
    assert_status(
        &server.kick("/$quick", alice).await,
        StatusCode::TOO_MANY_REQUESTS,
        "over quota",
    );
    assert_status(
        &server.kick("/$quick", None).await,
        StatusCode::FORBIDDEN,
        "anonymous",
    );
    assert_status(
        &server.get(&held, alice).await,
        StatusCode::ACCEPTED,
        "alice polls",
    );
    assert_status(
        &server.get(&held, bob).await,
        StatusCode::NOT_FOUND,
        "bob polls",
    );
    assert_status(
        &server.delete(&held, bob).await,
        StatusCode::NOT_FOUND,
        "bob cancels",
    );
    assert_status(
        &server.delete(&held, alice).await,
        StatusCode::ACCEPTED,
        "alice cancels",
    );
    let quick = server.kick_accepted("/$quick", alice).await;
    let quick_id = parse_job_id(&quick).to_string();
    assert_status(
        &server.poll_until_done(&quick, alice).await,
        StatusCode::OK,
        "alice's result",
    );

    let logs = captured.text();
    let audit: Vec<&str> = logs
        .lines()
        .filter(|line| line.contains("tower_fhir_async::audit"))
        .collect();
    let held_job = format!("job.id={held_id}");
    let quick_job = format!("job.id={quick_id}");
    // The audit trail names callers by their keyed digest (SEC-11), never as they identified.
    let (by_alice, by_bob) = (
        format!(r#"caller="{}""#, digest("alice")),
        format!(r#"caller="{}""#, digest("bob")),
    );
    let (by_alice, by_bob) = (by_alice.as_str(), by_bob.as_str());
    let kick_off = r#"action="kick-off""#;
    let status = r#"action="status""#;
    let cancel = r#"action="cancel""#;
    assert_audited(
        &audit,
        &[kick_off, &held_job, by_alice, r#"outcome="accepted""#],
    );
    assert_audited(&audit, &[kick_off, by_alice, r#"outcome="quota-caller""#]);
    assert_audited(&audit, &[kick_off, r#"outcome="no-caller""#]);
    assert_audited(
        &audit,
        &[status, &held_job, by_alice, r#"outcome="in-progress""#],
    );
    assert_audited(&audit, &[status, &held_job, by_bob, r#"outcome="denied""#]);
    assert_audited(&audit, &[cancel, &held_job, by_bob, r#"outcome="denied""#]);
    assert_audited(
        &audit,
        &[cancel, &held_job, by_alice, r#"outcome="cancelled""#],
    );
    assert_audited(
        &audit,
        &[kick_off, &quick_job, by_alice, r#"outcome="accepted""#],
    );
    assert_audited(
        &audit,
        &[status, &quick_job, by_alice, r#"outcome="completed""#],
    );
    for raw in [r#"caller="alice""#, r#"caller="bob""#] {
        assert!(
            !logs.contains(raw),
            "a raw caller id reached the logs:\n{logs}"
        );
    }
    assert!(
        !logs.contains(SECRET),
        "a credential reached the logs:\n{}",
        logs.lines()
            .filter(|l| l.contains(SECRET))
            .collect::<Vec<_>>()
            .join("\n")
    );
}

// SEC-7: a kick-off whose body stalls is answered 408 `timeout` once `body_timeout` has passed;
// nothing is recorded and the FHIR service is never called.
#[tokio::test]
async fn sec_7_stalled_kick_off_body_gets_408_timeout() {
    let server = Server::start(|b| b.body_timeout(Duration::from_millis(300))).await;
    let mut headers = HeaderMap::new();
    headers.insert("prefer", "respond-async".parse().unwrap());
    headers.insert("content-type", "application/fhir+json".parse().unwrap());
    let reply = send_stalling(
        Method::POST,
        &format!("{}/$quick", server.base),
        headers,
        Bytes::from_static(br#"{"resourceType":"Para"#),
    )
    .await;
    assert_status(&reply, StatusCode::REQUEST_TIMEOUT, "stalled body");
    reply.assert_outcome("timeout");
    assert!(reply.headers.get("content-location").is_none(), "{reply:?}");
    assert_eq!(server.store.len(), 0, "nothing recorded");
    assert_eq!(server.calls(), 0, "the FHIR service was never called");
}
