//! Caps on the results a `MemoryStore` keeps (issue #11 item 4; SEC-13, KICK-8, EXPIRE-3): at the
//! per-caller cap a kick-off gets `429` `throttled`, at the byte cap `503` `transient`, both with
//! delta-seconds `Retry-After`; a kept result is never evicted to make room, and a place frees up
//! when a result is cancelled or expires. Over a real socket.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::Router;
use axum::routing::{get, post};
use http::{HeaderName, Method, StatusCode};
use support::{Reply, TestClient, serve};
use tower_fhir_async::{AsyncLayer, AsyncLayerBuilder, MemoryStore};

/// The size of the body `GET /fhir/Patient` answers.
const SEARCH_BYTES: usize = 10_000;

/// A server under test: `POST /fhir/$quick` answers a small Parameters resource and
/// `GET /fhir/Patient` a searchset of [`SEARCH_BYTES`]; `calls` counts both.
struct Server {
    base: String,
    store: MemoryStore,
    calls: Arc<AtomicUsize>,
    client: TestClient,
}

impl Server {
    async fn start(
        store: MemoryStore,
        layer: impl FnOnce(AsyncLayerBuilder) -> AsyncLayerBuilder,
    ) -> Self {
        let calls = Arc::new(AtomicUsize::new(0));
        let (quick, search) = (calls.clone(), calls.clone());
        let builder = AsyncLayer::builder(store.clone())
            .base_path("/fhir")
            .caller_from_header(HeaderName::from_static("x-client"));
        let app = Router::new()
            .route(
                "/fhir/$quick",
                post(move || {
                    quick.fetch_add(1, Ordering::SeqCst);
                    async {
                        (
                            [("content-type", "application/fhir+json")],
                            r#"{"resourceType":"Parameters"}"#,
                        )
                    }
                }),
            )
            .route(
                "/fhir/Patient",
                get(move || {
                    search.fetch_add(1, Ordering::SeqCst);
                    async { ([("content-type", "application/fhir+json")], searchset()) }
                }),
            )
            .layer(layer(builder).build());
        Self {
            base: format!("http://{}", serve(app).await),
            store,
            calls,
            client: TestClient::default(),
        }
    }

    fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }

    async fn send(&self, method: Method, url: &str, caller: &str, prefer: bool) -> Reply {
        let mut headers = vec![("x-client", caller)];
        if prefer {
            headers.push(("prefer", "respond-async"));
        }
        self.client.send(method, url, &headers, "").await
    }

    /// Kicks off `method {base}/fhir{path}` as `caller`.
    async fn kick(&self, method: Method, path: &str, caller: &str) -> Reply {
        let url = format!("{}/fhir{path}", self.base);
        self.send(method, &url, caller, true).await
    }

    /// Kicks off, expects `202`, and returns the status URL.
    async fn accepted(&self, method: Method, path: &str, caller: &str) -> String {
        let reply = self.kick(method, path, caller).await;
        assert_eq!(
            reply.status,
            StatusCode::ACCEPTED,
            "{caller}'s kick-off: {reply:?}"
        );
        reply.header("content-location").to_owned()
    }

    /// Polls as `caller` until the job stops answering `202` (at most 500 polls, 10 ms apart).
    async fn done(&self, url: &str, caller: &str) -> Reply {
        for _ in 0..500 {
            let reply = self.send(Method::GET, url, caller, false).await;
            if reply.status != StatusCode::ACCEPTED {
                return reply;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("{url} did not finish");
    }

    /// A finished search of `caller`: its status URL, after checking its result is served.
    async fn finished_search(&self, caller: &str) -> String {
        let url = self.accepted(Method::GET, "/Patient", caller).await;
        assert_search_served(&self.done(&url, caller).await);
        url
    }
}

/// The start and end of the searchset `GET /fhir/Patient` answers; its id fills the rest.
const SEARCH_HEAD: &str = r#"{"resourceType":"Bundle","type":"searchset","id":""#;
const SEARCH_TAIL: &str = r#""}"#;

/// A searchset Bundle of exactly [`SEARCH_BYTES`].
fn searchset() -> String {
    let id = "x".repeat(SEARCH_BYTES - SEARCH_HEAD.len() - SEARCH_TAIL.len());
    format!("{SEARCH_HEAD}{id}{SEARCH_TAIL}")
}

/// The completed job's Bundle carries the whole search result.
fn assert_search_served(reply: &Reply) {
    assert_eq!(reply.status, StatusCode::OK, "{:?}", reply.headers);
    let bundle = reply.json();
    let entry = &bundle["entry"][0];
    assert_eq!(bundle["type"], "batch-response");
    assert_eq!(
        entry["response"]["status"], "200 OK",
        "{}",
        entry["response"]
    );
    let id = entry["resource"]["id"].as_str().unwrap_or_default();
    assert_eq!(
        id.len(),
        SEARCH_BYTES - SEARCH_HEAD.len() - SEARCH_TAIL.len(),
        "the whole search result is kept"
    );
}

/// `Retry-After` in delta seconds (an integer, never a date), at least 1.
fn retry_after_seconds(reply: &Reply) -> u64 {
    let seconds: u64 = reply
        .header("retry-after")
        .parse()
        .unwrap_or_else(|_| panic!("Retry-After is not delta seconds: {reply:?}"));
    assert!(seconds >= 1, "{reply:?}");
    seconds
}

/// A refused kick-off: `status`, an OperationOutcome with `code`, `Retry-After`, no status URL.
fn assert_refused(reply: &Reply, status: StatusCode, code: &str) -> u64 {
    assert_eq!(reply.status, status, "{reply:?}");
    reply.assert_outcome(code);
    assert!(reply.headers.get("content-location").is_none(), "{reply:?}");
    assert_eq!(reply.header("cache-control"), "no-store");
    retry_after_seconds(reply)
}

// KICK-8, SEC-13: with two kept results per caller, alice's third kick-off gets 429 `throttled`
// with delta-seconds `Retry-After` (the 24-hour retention capped to 5 minutes), is not recorded
// and never reaches the FHIR service; bob is unaffected; alice's results stay readable; a
// DELETE of one of her finished jobs frees a place at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kick_8_sec_13_caller_cap_answers_429_until_a_result_is_cancelled() {
    let server = Server::start(MemoryStore::new().with_max_results_per_caller(2), |b| b).await;
    let first = server.finished_search("alice").await;
    let second = server.finished_search("alice").await;
    let (records, calls) = (server.store.len(), server.calls());

    let refused = server.kick(Method::POST, "/$quick", "alice").await;
    let wait = assert_refused(&refused, StatusCode::TOO_MANY_REQUESTS, "throttled");
    assert_eq!(
        wait, 300,
        "the earliest result expires in 24 h; Retry-After is capped at 5 min"
    );
    assert_eq!(
        server.store.len(),
        records,
        "the refused kick-off was recorded"
    );
    assert_eq!(
        server.calls(),
        calls,
        "the refused kick-off reached the FHIR service"
    );

    let bobs = server.accepted(Method::POST, "/$quick", "bob").await;
    assert_eq!(server.done(&bobs, "bob").await.status, StatusCode::OK);
    for url in [&first, &second] {
        assert_search_served(&server.done(url, "alice").await);
    }

    let cancelled = server.send(Method::DELETE, &first, "alice", false).await;
    assert_eq!(cancelled.status, StatusCode::ACCEPTED, "{cancelled:?}");
    let third = server.accepted(Method::POST, "/$quick", "alice").await;
    assert_eq!(server.done(&third, "alice").await.status, StatusCode::OK);
    let refused = server.kick(Method::POST, "/$quick", "alice").await;
    assert_refused(&refused, StatusCode::TOO_MANY_REQUESTS, "throttled");
}

// SEC-13: when the results kept for everyone reach the byte cap, every kick-off gets 503
// `transient` with delta-seconds `Retry-After`, whoever sends it; no kept result is evicted to
// make room (each is still served whole); a cancel frees room again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sec_13_byte_cap_answers_503_and_never_evicts_a_result() {
    // Room for two searches and not three: each counts its body plus under 1 kB of record.
    let store = MemoryStore::new().with_max_retained_bytes(2 * SEARCH_BYTES + 1_000);
    let server = Server::start(store, |b| b.max_jobs_per_caller(5)).await;
    let alices = server.finished_search("alice").await;
    let bobs = server.finished_search("bob").await;
    assert!(server.store.retained_bytes() >= 2 * SEARCH_BYTES as u64);
    let (records, calls) = (server.store.len(), server.calls());

    for caller in ["carol", "alice"] {
        let refused = server.kick(Method::POST, "/$quick", caller).await;
        let wait = assert_refused(&refused, StatusCode::SERVICE_UNAVAILABLE, "transient");
        assert_eq!(
            wait, 300,
            "the earliest result expires in 24 h; Retry-After is capped at 5 min"
        );
    }
    assert_eq!(
        server.store.len(),
        records,
        "a refused kick-off was recorded"
    );
    assert_eq!(
        server.calls(),
        calls,
        "a refused kick-off reached the FHIR service"
    );
    for (url, caller) in [(&alices, "alice"), (&bobs, "bob")] {
        assert_search_served(&server.done(url, caller).await);
    }

    let cancelled = server.send(Method::DELETE, &bobs, "bob", false).await;
    assert_eq!(cancelled.status, StatusCode::ACCEPTED, "{cancelled:?}");
    let carols = server.accepted(Method::POST, "/$quick", "carol").await;
    assert_eq!(server.done(&carols, "carol").await.status, StatusCode::OK);
    assert_search_served(&server.done(&alices, "alice").await);
}

// SEC-13, EXPIRE-3: with one kept result per caller and a retention of 2 s, alice's second
// kick-off is refused with the seconds until her result expires; a client that waits that long
// is accepted, without any sweeper running (the store removes the expired result itself), and
// the expired job answers 404.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sec_13_expire_3_a_place_frees_up_when_the_result_expires() {
    let store = MemoryStore::new().with_max_results_per_caller(1);
    let server = Server::start(store, |b| b.retention(Duration::from_secs(2))).await;
    let expiring = server.accepted(Method::POST, "/$quick", "alice").await;
    assert_eq!(server.done(&expiring, "alice").await.status, StatusCode::OK);

    let refused = server.kick(Method::POST, "/$quick", "alice").await;
    let wait = assert_refused(&refused, StatusCode::TOO_MANY_REQUESTS, "throttled");
    assert!(
        wait <= 3,
        "the result expires within 2 s of its end: {refused:?}"
    );
    assert_eq!(server.store.len(), 1);

    tokio::time::sleep(Duration::from_secs(wait)).await;
    let next = server.accepted(Method::POST, "/$quick", "alice").await;
    let gone = server.send(Method::GET, &expiring, "alice", false).await;
    assert_eq!(gone.status, StatusCode::NOT_FOUND, "{gone:?}");
    assert_eq!(server.done(&next, "alice").await.status, StatusCode::OK);
    assert_eq!(
        server.store.len(),
        1,
        "the expired record was removed at the kick-off"
    );
}
