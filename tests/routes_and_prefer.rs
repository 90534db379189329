//! Which requests go asynchronous, how `Prefer` is read, and the layer's own routes, over a real
//! socket (§7 scenarios 7, 9–12 and 17; §4 E1; §5 AMB-31).

mod support;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, StatusCode};
use http_body_util::BodyExt;
use support::{Reply, TestClient, send_chunked, send_header_map, serve};
use tokio::sync::Semaphore;
use tower::ServiceExt;
use tower_fhir_async::{AsyncLayer, AsyncLayerBuilder, MemoryStore};

const FHIR_JSON: &str = "application/fhir+json";

const POLLS: usize = 250;

/// `Prefer` lines as raw bytes, as sent or as seen.
type Lines = &'static [&'static [u8]];
/// Extra request headers of a table row.
type Headers = &'static [(&'static str, &'static str)];

// ---------------------------------------------------------------------------------------------
// The wrapped FHIR service: it records every request it receives.

/// One request the wrapped service received.
#[derive(Debug, Clone)]
struct Call {
    method: Method,
    target: String,
    prefer: Vec<Vec<u8>>,
    body_len: usize,
}

/// What the wrapped service saw, and the gate `/fhir/slow` waits on before answering.
#[derive(Clone)]
struct Inner {
    calls: Arc<Mutex<Vec<Call>>>,
    gate: Arc<Semaphore>,
}

impl Inner {
    fn new() -> Self {
        Self {
            calls: Arc::default(),
            gate: Arc::new(Semaphore::new(0)),
        }
    }

    /// Records the request and returns its body.
    async fn record(&self, request: Request) -> (Method, Bytes) {
        let (parts, body) = request.into_parts();
        let body = body.collect().await.expect("request body").to_bytes();
        let call = Call {
            method: parts.method.clone(),
            target: parts
                .uri
                .path_and_query()
                .map_or_else(String::new, |pq| pq.to_string()),
            prefer: parts
                .headers
                .get_all("prefer")
                .iter()
                .map(|v| v.as_bytes().to_vec())
                .collect(),
            body_len: body.len(),
        };
        self.calls.lock().unwrap().push(call);
        (parts.method, body)
    }

    fn calls(&self) -> Vec<Call> {
        self.calls.lock().unwrap().clone()
    }

    fn count(&self) -> usize {
        self.calls.lock().unwrap().len()
    }
}

/// Any FHIR interaction: 201 for POST, else 200, with headers a pass-through must keep.
async fn echo(State(inner): State<Inner>, request: Request) -> Response {
    let (method, body) = inner.record(request).await;
    let status = if method == Method::POST {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    let resource = serde_json::json!({
        "resourceType": "Parameters",
        "parameter": [{"name": "echo", "valueString": String::from_utf8_lossy(&body)}],
    });
    let headers = [
        ("content-type", FHIR_JSON),
        ("x-custom", "kept as sent"),
        ("etag", "W/\"7\""),
        ("set-cookie", "session=1; HttpOnly"),
    ];
    (status, headers, resource.to_string()).into_response()
}

async fn metadata(State(inner): State<Inner>, request: Request) -> Response {
    inner.record(request).await;
    let body = r#"{"resourceType":"CapabilityStatement","status":"active","kind":"instance"}"#;
    ([("content-type", FHIR_JSON)], body).into_response()
}

/// A search whose response already varies on `Accept-Encoding`.
async fn observations(State(inner): State<Inner>, request: Request) -> Response {
    inner.record(request).await;
    let headers = [("content-type", FHIR_JSON), ("vary", "Accept-Encoding")];
    (
        headers,
        r#"{"resourceType":"Bundle","type":"searchset","total":0}"#,
    )
        .into_response()
}

/// Answers only once the test adds a permit to the gate, so the job stays running until then.
async fn slow(State(inner): State<Inner>, request: Request) -> Response {
    inner.record(request).await;
    inner.gate.acquire().await.expect("gate open").forget();
    let headers = [("content-type", FHIR_JSON)];
    (
        StatusCode::CREATED,
        headers,
        r#"{"resourceType":"Patient","id":"slow"}"#,
    )
        .into_response()
}

async fn fallback(State(inner): State<Inner>, request: Request) -> Response {
    inner.record(request).await;
    (StatusCode::IM_A_TEAPOT, "inner fallback").into_response()
}

fn inner_app(inner: Inner) -> Router {
    Router::new()
        .route("/fhir/metadata", get(metadata))
        .route("/fhir/Patient", get(echo).post(echo).put(echo).delete(echo))
        .route("/fhir/Patient/_search", post(echo))
        .route("/fhir/Observation", get(observations))
        .route("/fhir/$export", get(echo).post(echo))
        .route("/fhir/slow", post(slow))
        .fallback(fallback)
        .with_state(inner)
}

// ---------------------------------------------------------------------------------------------
// The server under test and assertions shared by the tests.

/// The default configuration of these tests: the FHIR base is `/fhir`, status URLs are derived
/// from `Host`.
fn layer() -> AsyncLayerBuilder {
    AsyncLayer::builder(MemoryStore::default()).base_path("/fhir")
}

struct Server {
    origin: String,
    inner: Inner,
    client: TestClient,
}

async fn start(builder: AsyncLayerBuilder) -> Server {
    let inner = Inner::new();
    let addr = serve(inner_app(inner.clone()).layer(builder.build())).await;
    Server {
        origin: format!("http://{addr}"),
        inner,
        client: TestClient::default(),
    }
}

impl Server {
    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.origin)
    }

    async fn send(
        &self,
        method: Method,
        path: &str,
        headers: &[(&str, &str)],
        body: &str,
    ) -> Reply {
        self.client
            .send(method, &self.url(path), headers, body)
            .await
    }

    /// Asserts `reply` is a kick-off's `202` and returns its absolute status URL.
    fn assert_accepted(&self, reply: &Reply) -> String {
        assert_eq!(reply.status, StatusCode::ACCEPTED, "{reply:?}");
        let location = reply.header("content-location").to_owned();
        let prefix = self.url("/fhir/_async/");
        let id = location
            .strip_prefix(&prefix)
            .unwrap_or_else(|| panic!("{location} is not under {prefix}"));
        assert!(
            id.len() == 32 && id.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')),
            "{location}"
        );
        assert_eq!(
            reply.header("preference-applied"),
            "respond-async",
            "{reply:?}"
        );
        location
    }

    /// Kicks off a job that stays running until `self.inner.gate` gets a permit.
    async fn start_slow_job(&self) -> String {
        let reply = self
            .send(
                Method::POST,
                "/fhir/slow",
                &[("prefer", "respond-async")],
                "{}",
            )
            .await;
        self.assert_accepted(&reply)
    }

    async fn finish(&self, status_url: &str) -> Reply {
        let done = self.client.poll_until_done(status_url, POLLS).await;
        assert_eq!(done.status, StatusCode::OK, "{done:?}");
        done
    }
}

/// A response the wrapped service gave directly: no status URL, no applied preference.
fn assert_synchronous(reply: &Reply, status: StatusCode) {
    assert_eq!(reply.status, status, "{reply:?}");
    assert!(reply.headers.get("content-location").is_none(), "{reply:?}");
    assert!(
        reply.headers.get("preference-applied").is_none(),
        "{reply:?}"
    );
}

fn assert_no_store(reply: &Reply) {
    assert_eq!(reply.header("cache-control"), "no-store", "{reply:?}");
}

/// The lowercase field names of every `Vary` line.
fn vary_names(reply: &Reply) -> Vec<String> {
    reply
        .headers
        .get_all("vary")
        .iter()
        .flat_map(|v| v.to_str().expect("Vary is text").split(','))
        .map(|name| name.trim().to_ascii_lowercase())
        .filter(|name| !name.is_empty())
        .collect()
}

fn prefer_lines(lines: &[&[u8]]) -> HeaderMap {
    let mut headers = HeaderMap::new();
    for line in lines {
        headers.append(
            "prefer",
            HeaderValue::from_bytes(line).expect("valid header bytes"),
        );
    }
    headers
}

fn owned(lines: &[&[u8]]) -> Vec<Vec<u8>> {
    lines.iter().map(|line| line.to_vec()).collect()
}

/// Kicks off `POST /fhir/Patient` with these `Prefer` lines, asserts `202`, waits for the job and
/// returns the `Prefer` lines the wrapped service saw when the job replayed the request.
async fn prefer_seen_by_inner_after_kick_off(lines: &[&[u8]]) -> Vec<Vec<u8>> {
    let server = start(layer()).await;
    let mut headers = prefer_lines(lines);
    headers.insert("content-type", HeaderValue::from_static(FHIR_JSON));
    let body = Bytes::from_static(br#"{"resourceType":"Patient"}"#);
    let reply = send_header_map(Method::POST, &server.url("/fhir/Patient"), headers, body).await;
    let status_url = server.assert_accepted(&reply);
    server.finish(&status_url).await;
    let calls = server.inner.calls();
    assert_eq!(calls.len(), 1, "{calls:?}");
    calls[0].prefer.clone()
}

// ---------------------------------------------------------------------------------------------
// §7 scenario 7: Prefer parsing over the wire.

// PREFER-2, PREFER-9: two `Prefer` lines are one list; the job forwards only `return=minimal`.
#[tokio::test]
async fn prefer_2_two_prefer_lines_are_one_list_and_go_async() {
    let seen = prefer_seen_by_inner_after_kick_off(&[b"return=minimal", b"respond-async"]).await;
    assert_eq!(seen, owned(&[b"return=minimal"]));
}

// PREFER-3: preference names compare case-insensitively.
#[tokio::test]
async fn prefer_3_upper_case_respond_async_goes_async() {
    let seen = prefer_seen_by_inner_after_kick_off(&[b"RESPOND-ASYNC"]).await;
    assert_eq!(seen, Vec::<Vec<u8>>::new());
}

// PREFER-4, PREFER-9: an unknown preference with a parameter is no error and is forwarded as sent.
#[tokio::test]
async fn prefer_4_unknown_preferences_are_ignored_and_forwarded() {
    let seen = prefer_seen_by_inner_after_kick_off(&[b"respond-async, x-foo=bar; baz"]).await;
    assert_eq!(seen, owned(&[b"x-foo=bar; baz"]));
}

// PREFER-4: `Prefer` bytes that are not UTF-8 neither hide `respond-async` nor get mangled.
#[tokio::test]
async fn prefer_4_non_utf8_prefer_bytes_still_go_async() {
    let cases: [(Lines, Lines); 2] = [
        (&[b"x=\"\xff\xfe\", respond-async"], &[b"x=\"\xff\xfe\""]),
        (
            &[b"x=\"caf\xe9\"", b"respond-async; \xa0"],
            &[b"x=\"caf\xe9\""],
        ),
    ];
    for (sent, forwarded) in cases {
        let seen = prefer_seen_by_inner_after_kick_off(sent).await;
        assert_eq!(seen, owned(forwarded), "sent {sent:?}");
    }
}

// PREFER-6: `respond-async=""` is `respond-async`.
#[tokio::test]
async fn prefer_6_empty_quoted_value_is_still_respond_async() {
    let seen = prefer_seen_by_inner_after_kick_off(&[b"respond-async=\"\""]).await;
    assert_eq!(seen, Vec::<Vec<u8>>::new());
}

// PREFER-7, PREFER-9: a quoted value may hold `,` `;` `=`; the inner service gets it unsplit.
#[tokio::test]
async fn prefer_7_quoted_separators_do_not_split_a_preference() {
    let seen = prefer_seen_by_inner_after_kick_off(&[b"respond-async, foo=\"a,b;c\""]).await;
    assert_eq!(seen, owned(&[b"foo=\"a,b;c\""]));
}

// PREFER-5, SEL-2: repeated `wait` without `respond-async` is no trigger: the request passes
// through synchronously and the wrapped service sees its `Prefer` lines untouched.
#[tokio::test]
async fn prefer_5_repeated_wait_without_respond_async_passes_through() {
    let cases: [&[&[u8]]; 2] = [&[b"wait=2, wait=100"], &[b"wait=2", b"wait=100"]];
    for lines in cases {
        let server = start(layer()).await;
        let reply = send_header_map(
            Method::GET,
            &server.url("/fhir/Patient?name=x"),
            prefer_lines(lines),
            Bytes::new(),
        )
        .await;
        assert_synchronous(&reply, StatusCode::OK);
        assert_eq!(reply.json()["resourceType"], "Parameters", "{reply:?}");
        let calls = server.inner.calls();
        assert_eq!(calls.len(), 1, "{calls:?}");
        assert_eq!(calls[0].prefer, owned(lines));
    }
}

// SEL-2, PREFER-7: only a preference *named* `respond-async` triggers async; the text inside a
// quoted value, as a parameter, or inside a longer name does not, and such `Prefer` lines reach
// the wrapped service untouched.
#[tokio::test]
async fn sel_2_respond_async_counts_only_as_a_preference_name() {
    let server = start(layer()).await;
    let cases: [&[u8]; 5] = [
        b"foo=\"x, respond-async\"",
        b"foo=\"respond-async\"",
        b"return=minimal; respond-async",
        b"respond-asynchronously",
        b"x-respond-async, wait=1",
    ];
    for line in cases {
        let url = server.url("/fhir/Patient?name=x");
        let reply = send_header_map(Method::GET, &url, prefer_lines(&[line]), Bytes::new()).await;
        assert_synchronous(&reply, StatusCode::OK);
        let calls = server.inner.calls();
        assert_eq!(calls.last().map(|c| c.prefer.clone()), Some(owned(&[line])));
    }
    assert_eq!(server.inner.count(), cases.len());
}

// ---------------------------------------------------------------------------------------------
// §7 scenario 9: ineligible routes.

// SEL-1, PREFER-4: `GET`/`HEAD [base]/metadata` is ineligible by default and answered by the
// wrapped service at once, without a status URL.
#[tokio::test]
async fn sel_1_metadata_with_respond_async_is_answered_synchronously() {
    let server = start(layer()).await;
    for method in [Method::GET, Method::HEAD] {
        let reply = server
            .send(
                method.clone(),
                "/fhir/metadata",
                &[("prefer", "respond-async")],
                "",
            )
            .await;
        assert_synchronous(&reply, StatusCode::OK);
        if method == Method::GET {
            assert_eq!(reply.json()["resourceType"], "CapabilityStatement");
        } else {
            assert!(reply.body.is_empty(), "{reply:?}");
        }
    }
    let targets: Vec<_> = server
        .inner
        .calls()
        .into_iter()
        .map(|c| (c.method, c.target))
        .collect();
    assert_eq!(
        targets,
        [
            (Method::GET, "/fhir/metadata".to_owned()),
            (Method::HEAD, "/fhir/metadata".to_owned())
        ]
    );
}

// SEL-1: a custom predicate (seeing method, URI and headers) decides which requests go async.
#[tokio::test]
async fn sel_1_custom_eligible_predicate_decides_per_request() {
    let server = start(layer().eligible(|head| {
        head.uri.path().contains("/$") || head.headers.contains_key("x-async-tenant")
    }))
    .await;
    let cases: [(Method, &str, Headers, Option<StatusCode>); 5] = [
        (
            Method::POST,
            "/fhir/Patient",
            &[],
            Some(StatusCode::CREATED),
        ),
        (
            Method::GET,
            "/fhir/Patient?name=x",
            &[],
            Some(StatusCode::OK),
        ),
        (Method::GET, "/fhir/metadata", &[], Some(StatusCode::OK)),
        (Method::POST, "/fhir/$export", &[], None),
        (
            Method::POST,
            "/fhir/Patient",
            &[("x-async-tenant", "1")],
            None,
        ),
    ];
    let mut jobs = Vec::new();
    for (method, path, extra, synchronous) in cases {
        let mut headers = vec![("prefer", "respond-async")];
        headers.extend_from_slice(extra);
        let reply = server.send(method.clone(), path, &headers, "").await;
        match synchronous {
            Some(status) => assert_synchronous(&reply, status),
            None => jobs.push(server.assert_accepted(&reply)),
        }
    }
    for status_url in jobs {
        server.finish(&status_url).await;
    }
    assert_eq!(server.inner.count(), 5);
}

// SEL-7, PREFER-9: the wrapped service of an ineligible route never sees `respond-async`; the
// other preferences reach it unchanged.
#[tokio::test]
async fn sel_7_inner_service_of_ineligible_route_never_sees_respond_async() {
    let cases: [(Lines, Lines); 5] = [
        (&[b"respond-async"], &[]),
        (&[b"respond-async, x=\"\xff\""], &[b"x=\"\xff\""]),
        (&[b"RESPOND-ASYNC; x=1"], &[]),
        (
            &[b"respond-async, return=minimal", b"handling=lenient"],
            &[b"return=minimal, handling=lenient"],
        ),
        (
            &[b"return=representation", b"respond-async=\"\""],
            &[b"return=representation"],
        ),
    ];
    for (sent, forwarded) in cases {
        let server = start(layer()).await;
        let reply = send_header_map(
            Method::GET,
            &server.url("/fhir/metadata"),
            prefer_lines(sent),
            Bytes::new(),
        )
        .await;
        assert_synchronous(&reply, StatusCode::OK);
        let calls = server.inner.calls();
        assert_eq!(calls.len(), 1, "{calls:?}");
        assert_eq!(calls[0].prefer, owned(forwarded), "sent {sent:?}");
    }
}

// SEL-7, STATUS-15: the layer's own routes are never eligible, even for a predicate that allows
// everything, and `Prefer` on a status request is ignored (no second job, no new status URL).
#[tokio::test]
async fn sel_7_status_routes_are_never_eligible_even_for_a_permissive_predicate() {
    let server = start(layer().eligible(|_| true)).await;
    let status_url = server.start_slow_job().await;
    let prefer = [("prefer", "respond-async")];

    let running = server
        .client
        .send(Method::GET, &status_url, &prefer, "")
        .await;
    assert_eq!(running.status, StatusCode::ACCEPTED, "{running:?}");
    assert!(
        running.headers.get("content-location").is_none(),
        "{running:?}"
    );
    assert!(
        running.headers.get("preference-applied").is_none(),
        "{running:?}"
    );

    let unknown = server
        .send(
            Method::GET,
            &format!("/fhir/_async/{}", "0".repeat(32)),
            &prefer,
            "",
        )
        .await;
    assert_eq!(unknown.status, StatusCode::NOT_FOUND, "{unknown:?}");
    unknown.assert_outcome("not-found");

    server.inner.gate.add_permits(1);
    let done = server
        .client
        .send(Method::GET, &status_url, &prefer, "")
        .await;
    let done = if done.status == StatusCode::ACCEPTED {
        server.finish(&status_url).await
    } else {
        done
    };
    assert_eq!(done.status, StatusCode::OK, "{done:?}");
    assert_eq!(done.json()["type"], "batch-response");
    let targets: Vec<_> = server.inner.calls().into_iter().map(|c| c.target).collect();
    assert_eq!(targets, ["/fhir/slow"]);
}

// ---------------------------------------------------------------------------------------------
// §7 scenario 10: pass-through and `Vary`.

// SEL-2, PREFER-11: without `Prefer` the wrapped service's response arrives byte for byte (status,
// body, headers); the only change is `Vary: Prefer` on GET/HEAD of eligible routes.
#[tokio::test]
async fn sel_2_without_prefer_the_inner_response_passes_through_byte_for_byte() {
    let layered = start(layer()).await;
    let plain_inner = Inner::new();
    let plain = format!("http://{}", serve(inner_app(plain_inner.clone())).await);
    const FORM: Headers = &[("content-type", "application/x-www-form-urlencoded")];
    const JSON: Headers = &[("content-type", FHIR_JSON)];
    let cases: [(Method, &str, Headers, &str, bool); 9] = [
        (
            Method::POST,
            "/fhir/Patient",
            JSON,
            r#"{"resourceType":"Patient","name":[{"text":"ü"}]}"#,
            false,
        ),
        (
            Method::PUT,
            "/fhir/Patient",
            JSON,
            r#"{"resourceType":"Patient","id":"p"}"#,
            false,
        ),
        (Method::DELETE, "/fhir/Patient", &[], "", false),
        (
            Method::POST,
            "/fhir/Patient/_search",
            FORM,
            "name=x&_count=1",
            false,
        ),
        (Method::GET, "/fhir/metadata", &[], "", false),
        // Outside the FHIR base, but eligible by default (every request but metadata).
        (Method::GET, "/not/fhir?x=1", &[], "", true),
        (
            Method::GET,
            "/fhir/Patient?name=x",
            &[("accept", FHIR_JSON)],
            "",
            true,
        ),
        (Method::HEAD, "/fhir/Patient?name=x", &[], "", true),
        (Method::GET, "/fhir/Observation?code=x", &[], "", true),
    ];
    for (method, path, headers, body, adds_vary) in cases {
        let mut got = layered.send(method.clone(), path, headers, body).await;
        let mut want = layered
            .client
            .send(method.clone(), &format!("{plain}{path}"), headers, body)
            .await;
        let case = format!("{method} {path}");
        let mut want_vary = vary_names(&want);
        if adds_vary {
            want_vary.push("prefer".to_owned());
        }
        assert_eq!(vary_names(&got), want_vary, "{case}: {got:?}");
        for reply in [&mut got, &mut want] {
            reply.headers.remove("date");
            reply.headers.remove("vary");
        }
        assert_eq!(got.status, want.status, "{case}");
        assert_eq!(got.headers, want.headers, "{case}");
        assert_eq!(got.body, want.body, "{case}");
    }
    let seen: Vec<_> = layered
        .inner
        .calls()
        .into_iter()
        .map(|c| (c.method, c.target, c.prefer, c.body_len))
        .collect();
    let sent: Vec<_> = plain_inner
        .calls()
        .into_iter()
        .map(|c| (c.method, c.target, c.prefer, c.body_len))
        .collect();
    assert_eq!(seen, sent);
}

// PREFER-11, KICK-10: `Vary: Prefer` on GET/HEAD of eligible routes (pass-through and the 202),
// merged with the wrapped service's own `Vary`; none on POST or on ineligible metadata.
#[tokio::test]
async fn prefer_11_vary_prefer_on_get_and_head_of_eligible_routes_only() {
    let server = start(layer()).await;
    const ASYNC: Headers = &[("prefer", "respond-async")];
    let cases: [(Method, &str, Headers, StatusCode, &[&str]); 9] = [
        (
            Method::GET,
            "/fhir/Patient?name=x",
            &[],
            StatusCode::OK,
            &["prefer"],
        ),
        (
            Method::HEAD,
            "/fhir/Patient?name=x",
            &[],
            StatusCode::OK,
            &["prefer"],
        ),
        (
            Method::GET,
            "/fhir/Observation",
            &[],
            StatusCode::OK,
            &["accept-encoding", "prefer"],
        ),
        (
            Method::GET,
            "/fhir/Observation",
            &[("prefer", "return=minimal")],
            StatusCode::OK,
            &["accept-encoding", "prefer"],
        ),
        (Method::POST, "/fhir/Patient", &[], StatusCode::CREATED, &[]),
        (Method::GET, "/fhir/metadata", &[], StatusCode::OK, &[]),
        (Method::GET, "/fhir/metadata", ASYNC, StatusCode::OK, &[]),
        (
            Method::GET,
            "/fhir/Patient?name=x",
            ASYNC,
            StatusCode::ACCEPTED,
            &["prefer"],
        ),
        (
            Method::POST,
            "/fhir/Patient",
            ASYNC,
            StatusCode::ACCEPTED,
            &[],
        ),
    ];
    for (method, path, headers, status, vary) in cases {
        let reply = server.send(method.clone(), path, headers, "").await;
        assert_eq!(
            reply.status, status,
            "{method} {path} {headers:?}: {reply:?}"
        );
        assert_eq!(
            vary_names(&reply),
            vary,
            "{method} {path} {headers:?}: {reply:?}"
        );
    }
    // Merged, not overwritten: the wrapped service's own line is still there as it sent it.
    let reply = server.send(Method::GET, "/fhir/Observation", &[], "").await;
    let lines: Vec<_> = reply
        .headers
        .get_all("vary")
        .iter()
        .map(|v| v.to_str().unwrap().to_owned())
        .collect();
    assert!(
        lines.iter().any(|line| line == "Accept-Encoding"),
        "{lines:?}"
    );
}

// ---------------------------------------------------------------------------------------------
// §7 scenario 11: `_outputFormat` on a Bundle-only deployment.

// SEL-4, SEL-6, KICK-5: with the bulk pattern turned off, `_outputFormat` in the query, a form body
// or a `Parameters` body is refused with 400 + `not-supported` before any job exists; the wrapped
// service is never called.
#[tokio::test]
async fn sel_4_output_format_is_refused_with_400_when_bulk_is_off() {
    let server = start(layer().bulk(false)).await;
    let form = "application/x-www-form-urlencoded";
    let parameters = r#"{"resourceType":"Parameters","parameter":[{"name":"_type","valueString":"Patient"},{"name":"_outputFormat","valueString":"application/fhir+ndjson"}]}"#;
    let cases: [(Method, &str, Option<&str>, &str); 7] = [
        (Method::GET, "/fhir/Patient?_outputFormat=ndjson", None, ""),
        (
            Method::GET,
            "/fhir/$export?_type=Patient,Observation&_outputFormat=application%2Ffhir%2Bndjson",
            None,
            "",
        ),
        (Method::POST, "/fhir/$export?_outputFormat=ndjson", None, ""),
        (
            Method::POST,
            "/fhir/Patient/_search",
            Some(form),
            "name=x&_outputFormat=ndjson",
        ),
        (
            Method::POST,
            "/fhir/Patient/_search",
            Some("application/x-www-form-urlencoded; charset=utf-8"),
            "_outputFormat=ndjson",
        ),
        (
            Method::POST,
            "/fhir/$export",
            Some("application/json"),
            parameters,
        ),
        (Method::POST, "/fhir/$export", Some(FHIR_JSON), parameters),
    ];
    for (method, path, content_type, body) in cases {
        let mut headers = vec![("prefer", "respond-async"), ("accept", FHIR_JSON)];
        headers.extend(content_type.map(|ct| ("content-type", ct)));
        let reply = server.send(method.clone(), path, &headers, body).await;
        assert_synchronous(&reply, StatusCode::BAD_REQUEST);
        reply.assert_outcome("not-supported");
    }
    // A legitimate job afterwards: when it is done, it is the only call the wrapped service got.
    let reply = server
        .send(
            Method::GET,
            "/fhir/Patient?name=x",
            &[("prefer", "respond-async")],
            "",
        )
        .await;
    server.finish(&server.assert_accepted(&reply)).await;
    let targets: Vec<_> = server.inner.calls().into_iter().map(|c| c.target).collect();
    assert_eq!(targets, ["/fhir/Patient?name=x"]);
}

// SEL-6: only a parameter *named* `_outputFormat` asks for bulk; the text elsewhere does not.
#[tokio::test]
async fn sel_6_output_format_counts_only_as_a_parameter_name() {
    let server = start(layer()).await;
    let cases: [(Method, &str, Option<&str>, &str); 4] = [
        (Method::GET, "/fhir/Patient?name=_outputFormat", None, ""),
        (
            Method::POST,
            "/fhir/Patient/_search",
            Some("application/x-www-form-urlencoded"),
            "name=_outputFormat",
        ),
        (
            Method::POST,
            "/fhir/Patient",
            Some(FHIR_JSON),
            r#"{"resourceType":"Patient","name":[{"text":"_outputFormat"}]}"#,
        ),
        (
            Method::POST,
            "/fhir/$export",
            Some("application/json"),
            r#"{"resourceType":"Parameters","parameter":[{"name":"_type","valueString":"_outputFormat"}]}"#,
        ),
    ];
    for (method, path, content_type, body) in cases {
        let mut headers = vec![("prefer", "respond-async")];
        headers.extend(content_type.map(|ct| ("content-type", ct)));
        let reply = server.send(method.clone(), path, &headers, body).await;
        let status_url = server.assert_accepted(&reply);
        server.finish(&status_url).await;
    }
    assert_eq!(server.inner.count(), 4);
}

// SEL-2: without `respond-async`, `_outputFormat` is the wrapped service's business.
#[tokio::test]
async fn sel_2_output_format_without_respond_async_passes_through() {
    let server = start(layer()).await;
    let reply = server
        .send(Method::GET, "/fhir/Patient?_outputFormat=ndjson", &[], "")
        .await;
    assert_synchronous(&reply, StatusCode::OK);
    assert_eq!(server.inner.count(), 1);
}

// ---------------------------------------------------------------------------------------------
// §7 scenario 12: kick-off content negotiation.

// KICK-7, KICK-5: a kick-off whose `Accept`/`_format` allows no JSON is refused with 406 +
// `not-supported` (the wrapped service never runs); accept lists, `q` values, `application/json`
// and no `Accept` at all go async.
#[tokio::test]
async fn kick_7_kick_off_accept_negotiation() {
    let server = start(layer()).await;
    let cases: [(Option<&str>, &str, StatusCode); 10] = [
        (Some("application/fhir+xml"), "", StatusCode::NOT_ACCEPTABLE),
        (
            Some("application/xml, text/xml"),
            "",
            StatusCode::NOT_ACCEPTABLE,
        ),
        (None, "&_format=xml", StatusCode::NOT_ACCEPTABLE),
        (
            Some(FHIR_JSON),
            "&_format=application/fhir%2Bxml",
            StatusCode::NOT_ACCEPTABLE,
        ),
        (
            Some("application/fhir+json;q=0, application/fhir+xml"),
            "",
            StatusCode::NOT_ACCEPTABLE,
        ),
        (
            Some("application/fhir+json, */*; q=0.1"),
            "",
            StatusCode::ACCEPTED,
        ),
        (Some("application/json"), "", StatusCode::ACCEPTED),
        (None, "", StatusCode::ACCEPTED),
        (
            Some("text/html, application/fhir+json;q=0.5"),
            "",
            StatusCode::ACCEPTED,
        ),
        (
            Some("application/fhir+xml"),
            "&_format=json",
            StatusCode::ACCEPTED,
        ),
    ];
    let mut jobs = Vec::new();
    for (accept, query, status) in cases {
        let mut headers = vec![("prefer", "respond-async")];
        headers.extend(accept.map(|a| ("accept", a)));
        let path = format!("/fhir/Patient?name=x{query}");
        let reply = server.send(Method::GET, &path, &headers, "").await;
        if status == StatusCode::ACCEPTED {
            jobs.push(server.assert_accepted(&reply));
        } else {
            assert_synchronous(&reply, status);
            reply.assert_outcome("not-supported");
        }
    }
    for status_url in &jobs {
        server.finish(status_url).await;
    }
    assert_eq!(server.inner.count(), jobs.len());
}

// KICK-7: `_format=application/fhir+json` with the `+` unescaped, as clients type it, asks for
// JSON. Form decoding reads the `+` as a space; FHIR servers (HAPI's `EncodingEnum`, the Firely
// SDK) accept `application/fhir json` for exactly that reason, so the layer must not refuse it.
#[tokio::test]
async fn kick_7_unescaped_plus_in_format_still_means_json() {
    let server = start(layer()).await;
    for format in [
        "application/fhir+json",
        "application/json+fhir",
        "application/fhir+json;fhirVersion=4.0",
    ] {
        let path = format!("/fhir/Patient?name=x&_format={format}");
        let reply = server
            .send(Method::GET, &path, &[("prefer", "respond-async")], "")
            .await;
        let status_url = server.assert_accepted(&reply);
        server.finish(&status_url).await;
    }
    assert_eq!(server.inner.count(), 3);
}

// ---------------------------------------------------------------------------------------------
// §7 scenario 17 and the status route's edges.

// STATUS-15, STATUS-16, E6: an unknown, well-formed id is 404 + `not-found` for GET, HEAD and
// DELETE; the wrapped service never sees the request.
#[tokio::test]
async fn status_15_unknown_well_formed_id_is_404_not_found() {
    let server = start(layer()).await;
    let path = format!("/fhir/_async/{}", "0123456789abcdef".repeat(2));
    for method in [Method::GET, Method::DELETE] {
        let reply = server.send(method.clone(), &path, &[], "").await;
        assert_eq!(reply.status, StatusCode::NOT_FOUND, "{method}: {reply:?}");
        reply.assert_outcome("not-found");
        assert_no_store(&reply);
    }
    let get = server.send(Method::GET, &path, &[], "").await;
    let head = server.send(Method::HEAD, &path, &[], "").await;
    assert_eq!(head.status, StatusCode::NOT_FOUND, "{head:?}");
    assert_eq!(headers_but_date(&head), headers_but_date(&get));
    assert!(head.body.is_empty());
    assert_eq!(server.inner.count(), 0);
}

// STATUS-15: malformed ids (wrong length, case, dots, encodings, unicode, trailing
// segments) are 404 + `not-found` from the layer itself, never the wrapped service's answer.
#[tokio::test]
async fn status_15_malformed_ids_are_404_not_found() {
    let server = start(layer()).await;
    let reply = server
        .send(
            Method::POST,
            "/fhir/Patient",
            &[("prefer", "respond-async")],
            "{}",
        )
        .await;
    let status_url = server.assert_accepted(&reply);
    server.finish(&status_url).await;
    let id = status_url.rsplit('/').next().unwrap().to_owned();
    let malformed = [
        "abc".to_owned(),
        id[..31].to_owned(),
        format!("{id}0"),
        id.to_uppercase(),
        format!("{}G", &id[..31]),
        "..".to_owned(),
        "%2e%2e".to_owned(),
        "%2E%2E/%2E%2E/metadata".to_owned(),
        "%C3%A9".repeat(16),
        "é".repeat(16),
        format!("{id}/extra"),
        format!("{id}/"),
        format!("{id}%2Fextra"),
        format!("{id};x=1"),
        format!("/{id}"),
    ];
    for rest in &malformed {
        // DELETE too: a lenient parser here would cancel the real job.
        for method in [Method::GET, Method::DELETE] {
            let reply = server
                .send(method.clone(), &format!("/fhir/_async/{rest}"), &[], "")
                .await;
            assert_eq!(
                reply.status,
                StatusCode::NOT_FOUND,
                "{method} {rest}: {reply:?}"
            );
            reply.assert_outcome("not-found");
        }
    }
    // The real id still answers, so the 404s above are about the ids, not the job.
    let again = server.client.get(&status_url).await;
    assert_eq!(again.status, StatusCode::OK, "{again:?}");
    assert_eq!(server.inner.count(), 1);
}

// STATUS-15, AMB-31, E13: other methods on a status URL are 405 + `Allow: GET, HEAD, DELETE` + OO,
// for live and unknown ids alike; they neither start a job nor touch the existing one.
#[tokio::test]
async fn status_15_put_post_patch_on_status_url_is_405_with_allow() {
    let server = start(layer()).await;
    let live = server.start_slow_job().await;
    let unknown = server.url(&format!("/fhir/_async/{}", "f".repeat(32)));
    let headers = [("prefer", "respond-async"), ("content-type", FHIR_JSON)];
    for url in [&live, &unknown] {
        for method in [Method::PUT, Method::POST, Method::PATCH, Method::OPTIONS] {
            let reply = server
                .client
                .send(
                    method.clone(),
                    url,
                    &headers,
                    r#"{"resourceType":"Patient"}"#,
                )
                .await;
            assert_eq!(
                reply.status,
                StatusCode::METHOD_NOT_ALLOWED,
                "{method} {url}: {reply:?}"
            );
            assert_eq!(reply.header("allow"), "GET, HEAD, DELETE");
            assert!(reply.headers.get("content-location").is_none(), "{reply:?}");
            reply.assert_outcome("not-supported");
            assert_no_store(&reply);
        }
    }
    let running = server.client.get(&live).await;
    assert_eq!(running.status, StatusCode::ACCEPTED, "{running:?}");
    server.inner.gate.add_permits(1);
    server.finish(&live).await;
    let targets: Vec<_> = server.inner.calls().into_iter().map(|c| c.target).collect();
    assert_eq!(targets, ["/fhir/slow"]);
}

// AMB-31, STATUS-15: the bare prefix of status URLs is no status URL.
#[tokio::test]
async fn amb_31_bare_status_prefix_is_404_not_found() {
    let server = start(layer()).await;
    for path in ["/fhir/_async", "/fhir/_async/", "/fhir/_async?id=x"] {
        for method in [Method::GET, Method::DELETE] {
            let reply = server.send(method.clone(), path, &[], "").await;
            assert_eq!(
                reply.status,
                StatusCode::NOT_FOUND,
                "{method} {path}: {reply:?}"
            );
            reply.assert_outcome("not-found");
            assert_no_store(&reply);
        }
    }
    assert_eq!(server.inner.count(), 0);
}

// SEL-7: only `{base}/_async` and what lies below it is the layer's; look-alike paths reach the
// wrapped service.
#[tokio::test]
async fn sel_7_look_alike_paths_reach_the_inner_service() {
    let server = start(layer()).await;
    let id = "0".repeat(32);
    let paths = [
        format!("/fhir/_asyncx/{id}"),
        "/fhir/_asyncx".to_owned(),
        "/fhir/_async.json".to_owned(),
        format!("/_async/{id}"),
        format!("/fhir/x/_async/{id}"),
        format!("/fhir/%5Fasync/{id}"),
    ];
    for path in &paths {
        let reply = server.send(Method::GET, path, &[], "").await;
        assert_eq!(reply.status, StatusCode::IM_A_TEAPOT, "{path}: {reply:?}");
        assert_eq!(reply.body, "inner fallback", "{path}");
    }
    let targets: Vec<_> = server.inner.calls().into_iter().map(|c| c.target).collect();
    assert_eq!(targets, paths);
}

/// The headers of `reply` but `Date`, which may tick between two requests.
fn headers_but_date(reply: &Reply) -> HeaderMap {
    let mut headers = reply.headers.clone();
    headers.remove("date");
    headers
}

// AMB-31, STATUS-3, STATUS-14: HEAD on a running and on a completed job answers what GET answers,
// headers included, with an empty body.
#[tokio::test]
async fn amb_31_head_matches_get_on_running_and_completed_jobs() {
    let server = start(layer()).await;
    let status_url = server.start_slow_job().await;

    let get = server.client.get(&status_url).await;
    let head = server.client.send(Method::HEAD, &status_url, &[], "").await;
    assert_eq!(get.status, StatusCode::ACCEPTED, "{get:?}");
    assert_eq!(head.status, get.status, "{head:?}");
    assert_eq!(headers_but_date(&head), headers_but_date(&get));
    assert!(head.body.is_empty(), "{head:?}");

    server.inner.gate.add_permits(1);
    let get = server.finish(&status_url).await;
    let head = server.client.send(Method::HEAD, &status_url, &[], "").await;
    assert_eq!(head.status, StatusCode::OK, "{head:?}");
    assert_eq!(headers_but_date(&head), headers_but_date(&get));
    assert_eq!(head.header("content-length"), get.body.len().to_string());
    assert!(head.body.is_empty(), "{head:?}");
    assert!(!get.body.is_empty());
}

// STATUS-13, AMB-7: the status route never answers 406, whatever the poll's `Accept`; the
// completion keeps the kick-off's format.
#[tokio::test]
async fn status_13_status_route_never_answers_406() {
    let server = start(layer()).await;
    let status_url = server.start_slow_job().await;
    let accepts = [
        "application/fhir+xml",
        "text/html",
        "application/json",
        "image/png;q=0",
    ];
    for accept in accepts {
        let reply = server
            .client
            .send(Method::GET, &status_url, &[("accept", accept)], "")
            .await;
        assert_eq!(
            reply.status,
            StatusCode::ACCEPTED,
            "Accept: {accept}: {reply:?}"
        );
    }
    let reply = server
        .client
        .get(&format!("{status_url}?_format=xml"))
        .await;
    assert_eq!(reply.status, StatusCode::ACCEPTED, "_format=xml: {reply:?}");
    let unknown = format!("/fhir/_async/{}", "2".repeat(32));
    let reply = server
        .send(
            Method::GET,
            &unknown,
            &[("accept", "application/fhir+xml")],
            "",
        )
        .await;
    assert_eq!(reply.status, StatusCode::NOT_FOUND, "{reply:?}");
    reply.assert_outcome("not-found");
    server.inner.gate.add_permits(1);
    server.finish(&status_url).await;
    for accept in accepts {
        let reply = server
            .client
            .send(Method::GET, &status_url, &[("accept", accept)], "")
            .await;
        assert_eq!(reply.status, StatusCode::OK, "Accept: {accept}: {reply:?}");
        assert_eq!(reply.header("content-type"), FHIR_JSON);
        assert_eq!(reply.json()["resourceType"], "Bundle");
    }
    let reply = server
        .client
        .get(&format!("{status_url}?_format=xml"))
        .await;
    assert_eq!(reply.status, StatusCode::OK, "_format=xml: {reply:?}");
    assert_eq!(reply.header("content-type"), FHIR_JSON);
}

// STATUS-16: `Cache-Control: no-store` on the status route's 202, 200 and 404 answers.
#[tokio::test]
async fn status_16_status_route_responses_are_no_store() {
    let server = start(layer()).await;
    let status_url = server.start_slow_job().await;
    let running = server.client.get(&status_url).await;
    assert_eq!(running.status, StatusCode::ACCEPTED, "{running:?}");
    assert_no_store(&running);

    server.inner.gate.add_permits(1);
    let done = server.finish(&status_url).await;
    assert_no_store(&done);

    for path in [
        format!("/fhir/_async/{}", "1".repeat(32)),
        "/fhir/_async/nope".to_owned(),
    ] {
        let missing = server.send(Method::GET, &path, &[], "").await;
        assert_eq!(missing.status, StatusCode::NOT_FOUND, "{missing:?}");
        assert_no_store(&missing);
    }
}

// ---------------------------------------------------------------------------------------------
// §4 E1: oversized kick-off bodies.

fn patient_of_size(len: usize) -> String {
    let head = r#"{"resourceType":"Patient","text":""#;
    let tail = r#""}"#;
    format!("{head}{}{tail}", "x".repeat(len - head.len() - tail.len()))
}

// KICK-5, E1: a body over `body_limit` with `Content-Length` is 413 + `too-costly`, before any
// job; a body of exactly the limit is accepted.
#[tokio::test]
async fn kick_5_body_over_limit_with_content_length_is_413_too_costly() {
    let server = start(layer().body_limit(1024)).await;
    let headers = [("prefer", "respond-async"), ("content-type", FHIR_JSON)];
    let reply = server
        .send(
            Method::POST,
            "/fhir/Patient",
            &headers,
            &patient_of_size(4096),
        )
        .await;
    assert_synchronous(&reply, StatusCode::PAYLOAD_TOO_LARGE);
    reply.assert_outcome("too-costly");

    let reply = server
        .send(
            Method::POST,
            "/fhir/Patient",
            &headers,
            &patient_of_size(1024),
        )
        .await;
    server.finish(&server.assert_accepted(&reply)).await;
    let sizes: Vec<_> = server
        .inner
        .calls()
        .into_iter()
        .map(|c| c.body_len)
        .collect();
    assert_eq!(sizes, [1024]);
}

// KICK-5, SEL-1, SEL-2: the body limit is the kick-off's; requests without `respond-async` and
// ineligible ones stream to the wrapped service whatever their size.
#[tokio::test]
async fn kick_5_body_limit_applies_only_to_kick_offs() {
    let server = start(
        layer()
            .body_limit(1024)
            .eligible(|head| head.uri.path() != "/fhir/Patient/_search"),
    )
    .await;
    let body = patient_of_size(4096);
    let cases: [(&str, &[(&str, &str)]); 2] = [
        ("/fhir/Patient", &[]),
        ("/fhir/Patient/_search", &[("prefer", "respond-async")]),
    ];
    for (path, headers) in cases {
        let reply = server.send(Method::POST, path, headers, &body).await;
        assert_synchronous(&reply, StatusCode::CREATED);
    }
    let sizes: Vec<_> = server
        .inner
        .calls()
        .into_iter()
        .map(|c| c.body_len)
        .collect();
    assert_eq!(sizes, [4096, 4096]);
}

// KICK-5, E1: the same limit holds for a chunked body without `Content-Length`.
#[tokio::test]
async fn kick_5_chunked_body_over_limit_is_413_too_costly() {
    let server = start(layer().body_limit(1024)).await;
    let mut headers = HeaderMap::new();
    headers.insert("prefer", HeaderValue::from_static("respond-async"));
    headers.insert("content-type", HeaderValue::from_static(FHIR_JSON));
    let body = Bytes::from(patient_of_size(4096));
    let chunks: Vec<Bytes> = body.chunks(512).map(Bytes::copy_from_slice).collect();
    let reply = send_chunked(
        Method::POST,
        &server.url("/fhir/Patient"),
        headers.clone(),
        chunks,
    )
    .await;
    assert_synchronous(&reply, StatusCode::PAYLOAD_TOO_LARGE);
    reply.assert_outcome("too-costly");

    let body = Bytes::from(patient_of_size(1000));
    let chunks: Vec<Bytes> = body.chunks(300).map(Bytes::copy_from_slice).collect();
    let reply = send_chunked(Method::POST, &server.url("/fhir/Patient"), headers, chunks).await;
    server.finish(&server.assert_accepted(&reply)).await;
    let sizes: Vec<_> = server
        .inner
        .calls()
        .into_iter()
        .map(|c| c.body_len)
        .collect();
    assert_eq!(sizes, [1000]);
}

// ---------------------------------------------------------------------------------------------
// KICK-3: absolute status URLs need a host.

async fn oneshot(app: &Router, request: http::Request<Body>) -> Reply {
    let response = app.clone().oneshot(request).await.expect("infallible");
    let (parts, body) = response.into_parts();
    let body = body.collect().await.expect("body").to_bytes();
    Reply {
        status: parts.status,
        headers: parts.headers,
        body,
    }
}

fn kick_off_without_host() -> http::Request<Body> {
    http::Request::builder()
        .method(Method::POST)
        .uri("/fhir/Patient")
        .header("prefer", "respond-async")
        .header("content-type", FHIR_JSON)
        .body(Body::from(r#"{"resourceType":"Patient"}"#))
        .unwrap()
}

// KICK-3, KICK-5: without `base_url` and without a usable `Host` no absolute status URL can be
// built, so the kick-off is refused with 400 + `invalid` and nothing runs.
#[tokio::test]
async fn kick_3_kick_off_without_host_or_base_url_is_400_invalid() {
    let inner = Inner::new();
    let app = inner_app(inner.clone()).layer(layer().build());
    let request = kick_off_without_host();
    assert!(request.headers().get("host").is_none() && request.uri().authority().is_none());
    let reply = oneshot(&app, request).await;
    assert_synchronous(&reply, StatusCode::BAD_REQUEST);
    reply.assert_outcome("invalid");

    // Over the wire, a `Host` that is no plain authority is as good as none.
    let server = start(layer()).await;
    for host in ["user@evil.example", "evil.example/x?", "bad host"] {
        let headers = [("host", host), ("prefer", "respond-async")];
        let reply = server
            .send(Method::POST, "/fhir/Patient", &headers, "{}")
            .await;
        assert_synchronous(&reply, StatusCode::BAD_REQUEST);
        reply.assert_outcome("invalid");
    }
    assert_eq!(inner.count() + server.inner.count(), 0);
}

// KICK-3: with `base_url` configured, the same request is accepted with an absolute
// `Content-Location` under that base, and the job can be polled without `Host` too.
#[tokio::test]
async fn kick_3_configured_base_url_needs_no_host() {
    let inner = Inner::new();
    let layer = AsyncLayer::builder(MemoryStore::default())
        .base_url("https://fhir.example.org/fhir")
        .build();
    let app = inner_app(inner.clone()).layer(layer);
    let reply = oneshot(&app, kick_off_without_host()).await;
    assert_eq!(reply.status, StatusCode::ACCEPTED, "{reply:?}");
    let location = reply.header("content-location").to_owned();
    let path = location
        .strip_prefix("https://fhir.example.org")
        .filter(|path| path.starts_with("/fhir/_async/"))
        .unwrap_or_else(|| panic!("{location}"))
        .to_owned();
    let poll = || {
        http::Request::get(path.as_str())
            .body(Body::empty())
            .unwrap()
    };
    let mut done = oneshot(&app, poll()).await;
    for _ in 0..POLLS {
        if done.status != StatusCode::ACCEPTED {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        done = oneshot(&app, poll()).await;
    }
    assert_eq!(done.status, StatusCode::OK, "{done:?}");
    assert_eq!(done.json()["entry"][0]["response"]["status"], "201 Created");
    assert_eq!(inner.count(), 1);
}
