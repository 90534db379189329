//! Hostile input, table-driven (issue #5): malformed `Prefer` values, mangled ids and paths,
//! unknown methods, HEAD, oversized and never-ending bodies, and other callers' jobs, over a real
//! socket. Every row asserts the exact status and OperationOutcome code (§2.2–2.4, §2.7, §6 SEC);
//! each group runs all its rows and reports every failing one at once.

mod support;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::extract::{Request, State};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing;
use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode};
use support::{Reply, send_raw, serve, serve_with_max_headers, try_send_header_map};
use tower_fhir_async::{AsyncLayer, AsyncLayerBuilder, JobId, JobStore, MemoryStore};

const FHIR_JSON: &str = "application/fhir+json";

/// The header a trusted gateway would set to name the caller (SEC-10).
const CALLER: HeaderName = HeaderName::from_static("x-caller");

/// How many 20 ms polls a fast job may take to finish; a bound, never a timing assertion.
const POLLS: usize = 250;

/// The answer of a row that is no OperationOutcome: a `202`, or the wrapped service's own answer.
const NO_OUTCOME: Option<&str> = None;

/// The answer of a HEAD row: no body, so no OperationOutcome code to read. Checked instead: the
/// body is empty and, for an error status, `Content-Type: application/fhir+json` with the
/// non-zero `Content-Length` of the OperationOutcome a GET would carry.
const NO_BODY: Option<&str> = None;

// ---------------------------------------------------------------------------------------------
// The wrapped FHIR service: a fast create, a search, a job that never ends, and metadata.

/// What the wrapped service was asked, as `METHOD /path` lines.
#[derive(Clone, Default)]
struct Inner {
    seen: Arc<Mutex<Vec<String>>>,
}

impl Inner {
    fn seen(&self) -> Vec<String> {
        self.seen.lock().unwrap().clone()
    }
}

async fn record(State(inner): State<Inner>, request: Request, next: Next) -> Response {
    let line = format!("{} {}", request.method(), request.uri().path());
    inner.seen.lock().unwrap().push(line);
    next.run(request).await
}

async fn metadata() -> Response {
    let body = r#"{"resourceType":"CapabilityStatement","status":"active","kind":"instance"}"#;
    ([("content-type", FHIR_JSON)], body).into_response()
}

async fn search() -> Response {
    let body = r#"{"resourceType":"Bundle","type":"searchset","total":0}"#;
    ([("content-type", FHIR_JSON)], body).into_response()
}

async fn create() -> Response {
    let body = r#"{"resourceType":"Patient","id":"p1"}"#;
    (StatusCode::CREATED, [("content-type", FHIR_JSON)], body).into_response()
}

/// Never answers, so its job stays running for the whole test.
async fn slow() -> Response {
    std::future::pending().await
}

async fn fallback() -> Response {
    (StatusCode::IM_A_TEAPOT, "inner fallback").into_response()
}

fn app(inner: &Inner, builder: AsyncLayerBuilder) -> Router {
    Router::new()
        .route("/fhir/metadata", routing::get(metadata))
        .route("/fhir/Patient", routing::get(search).post(create))
        .route("/fhir/slow", routing::post(slow))
        .fallback(fallback)
        .layer(middleware::from_fn_with_state(inner.clone(), record))
        .layer(builder.build())
}

fn layer() -> AsyncLayerBuilder {
    AsyncLayer::builder(MemoryStore::default()).base_path("/fhir")
}

/// Jobs bound to the caller named by `x-caller`.
fn bound_layer() -> AsyncLayerBuilder {
    layer().caller_from_header(CALLER)
}

// ---------------------------------------------------------------------------------------------
// The table: rows, requests, and the checks every row gets.

/// One row: what is sent, and the exact answer expected.
struct Case {
    /// The requirement id and what the row sends.
    name: &'static str,
    request: Req,
    status: StatusCode,
    /// The OperationOutcome's `issue[0].code`; [`NO_OUTCOME`] or [`NO_BODY`] when there is none.
    outcome: Option<&'static str>,
}

fn case(name: &'static str, request: Req, status: u16, outcome: Option<&'static str>) -> Case {
    Case {
        name,
        request,
        status: StatusCode::from_u16(status).expect("a status code"),
        outcome,
    }
}

/// A request of a row.
enum Req {
    /// Sent with the hyper client: these exact header lines (raw bytes allowed) and a body with
    /// `Content-Length`.
    Http {
        method: Method,
        path: String,
        headers: HeaderMap,
        body: Bytes,
    },
    /// Written byte for byte on a connection that stays open: for bodies that lie about their
    /// length or never end.
    Raw(Vec<u8>),
}

fn request(method: &str, path: impl Into<String>) -> Req {
    Req::Http {
        method: Method::from_bytes(method.as_bytes()).expect("a method"),
        path: path.into(),
        headers: HeaderMap::new(),
        body: Bytes::new(),
    }
}

fn get(path: impl Into<String>) -> Req {
    request("GET", path)
}

fn head(path: impl Into<String>) -> Req {
    request("HEAD", path)
}

fn delete(path: impl Into<String>) -> Req {
    request("DELETE", path)
}

/// `POST` with `Prefer: respond-async`: a kick-off.
fn kick_off(path: impl Into<String>) -> Req {
    request("POST", path)
        .prefer(b"respond-async")
        .header("content-type", FHIR_JSON.as_bytes())
        .body(r#"{"resourceType":"Patient"}"#)
}

impl Req {
    /// Appends a header line; its value may be any bytes a header value may hold.
    fn header(mut self, name: &str, value: &[u8]) -> Self {
        let Req::Http { headers, .. } = &mut self else {
            panic!("a raw request carries its own header lines");
        };
        let name = HeaderName::from_bytes(name.as_bytes()).expect("a header name");
        headers.append(
            name,
            HeaderValue::from_bytes(value).expect("a header value"),
        );
        self
    }

    fn prefer(self, value: &[u8]) -> Self {
        self.header("prefer", value)
    }

    fn prefer_lines(self, lines: impl IntoIterator<Item = Vec<u8>>) -> Self {
        lines.into_iter().fold(self, |req, line| req.prefer(&line))
    }

    fn caller(self, name: &[u8]) -> Self {
        self.header(CALLER.as_str(), name)
    }

    fn body(mut self, text: &'static str) -> Self {
        let Req::Http { body, .. } = &mut self else {
            panic!("a raw request carries its own body");
        };
        *body = Bytes::from_static(text.as_bytes());
        self
    }

    fn method(&self) -> Method {
        match self {
            Req::Http { method, .. } => method.clone(),
            Req::Raw(bytes) => {
                let word = bytes.split(|&b| b == b' ').next().unwrap_or_default();
                Method::from_bytes(word).expect("a raw request starts with a method")
            }
        }
    }
}

/// A raw kick-off `POST /fhir/Patient` to `addr` with `extra` header lines and `body` as sent.
fn raw_kick_off(addr: SocketAddr, extra: &[&str], body: &[u8]) -> Req {
    let mut head = format!(
        "POST /fhir/Patient HTTP/1.1\r\nHost: {addr}\r\nPrefer: respond-async\r\n\
         Content-Type: {FHIR_JSON}\r\n"
    );
    for line in extra {
        head.push_str(line);
        head.push_str("\r\n");
    }
    head.push_str("\r\n");
    let mut bytes = head.into_bytes();
    bytes.extend_from_slice(body);
    Req::Raw(bytes)
}

/// One chunk of the chunked transfer coding.
fn chunk(data: &[u8]) -> Vec<u8> {
    let mut bytes = format!("{:x}\r\n", data.len()).into_bytes();
    bytes.extend_from_slice(data);
    bytes.extend_from_slice(b"\r\n");
    bytes
}

/// The chunk that ends a chunked body.
const LAST_CHUNK: &[u8] = b"0\r\n\r\n";

/// Checks `reply` against the row; `Err` lists every mismatch.
fn check(case: &Case, reply: &Reply) -> Result<(), String> {
    let mut problems = Vec::new();
    if reply.status != case.status {
        problems.push(format!("status {}", reply.status.as_u16()));
    }
    if case.request.method() == Method::HEAD {
        assert!(
            case.outcome.is_none(),
            "{}: a HEAD row reads no body",
            case.name
        );
        if !reply.body.is_empty() {
            problems.push("HEAD answer with a body".to_owned());
        }
        if reply.status.is_client_error() || reply.status.is_server_error() {
            if header(reply, "content-type") != Some(FHIR_JSON) {
                problems.push("HEAD error without Content-Type: application/fhir+json".to_owned());
            }
            let length = header(reply, "content-length").and_then(|v| v.parse::<u64>().ok());
            if length.unwrap_or(0) == 0 {
                problems
                    .push("HEAD error without the OperationOutcome's Content-Length".to_owned());
            }
        }
    } else {
        match (case.outcome, issue_code(reply)) {
            (Some(want), Some(got)) if want == got => {
                if header(reply, "content-type") != Some(FHIR_JSON) {
                    problems.push("OperationOutcome not application/fhir+json".to_owned());
                }
                if header(reply, "cache-control") != Some("no-store") {
                    problems.push("OperationOutcome without Cache-Control: no-store".to_owned());
                }
                let diagnostics = reply.json()["issue"][0]["diagnostics"].clone();
                if diagnostics.as_str().unwrap_or_default().is_empty() {
                    problems.push("OperationOutcome without diagnostics".to_owned());
                }
            }
            (Some(want), got) => problems.push(format!("issue code {got:?}, want {want:?}")),
            (None, Some(got)) => problems.push(format!("unexpected OperationOutcome {got:?}")),
            (None, None) => {}
        }
    }
    if reply.status == case.status
        && reply.status == StatusCode::METHOD_NOT_ALLOWED
        && case.outcome.is_some()
    {
        // STATUS-15, AMB-31: the layer's own 405 (file routes take no DELETE).
        if !matches!(
            header(reply, "allow"),
            Some("GET, HEAD, DELETE" | "GET, HEAD")
        ) {
            problems.push(format!("Allow {:?}", header(reply, "allow")));
        }
    }
    if reply.status == case.status && reply.status == StatusCode::TOO_MANY_REQUESTS {
        // KICK-8, STATUS-6: delta seconds, never an HTTP date.
        let retry = header(reply, "retry-after");
        let seconds = retry
            .filter(|v| v.bytes().all(|b| b.is_ascii_digit()))
            .and_then(|v| v.parse::<u64>().ok());
        if seconds.unwrap_or(0) == 0 {
            problems.push(format!("Retry-After {retry:?} is no delta-seconds ≥ 1"));
        }
    }
    if problems.is_empty() {
        return Ok(());
    }
    let body = String::from_utf8_lossy(&reply.body);
    let body: String = body.chars().take(300).collect();
    Err(format!(
        "{}; got {} {body:?} with {:?}",
        problems.join("; "),
        reply.status.as_u16(),
        reply.headers
    ))
}

fn header<'r>(reply: &'r Reply, name: &str) -> Option<&'r str> {
    reply.headers.get(name).and_then(|v| v.to_str().ok())
}

/// The first issue code when the body is an OperationOutcome.
fn issue_code(reply: &Reply) -> Option<String> {
    let body: serde_json::Value = serde_json::from_slice(&reply.body).ok()?;
    (body["resourceType"] == "OperationOutcome").then(|| {
        body["issue"][0]["code"]
            .as_str()
            .unwrap_or_default()
            .to_owned()
    })
}

// ---------------------------------------------------------------------------------------------
// The server under test.

struct Server {
    addr: SocketAddr,
    inner: Inner,
}

async fn start(builder: AsyncLayerBuilder) -> Server {
    let inner = Inner::default();
    let addr = serve(app(&inner, builder)).await;
    Server { addr, inner }
}

/// A server whose HTTP stack takes 256 header lines, so that 100 `Prefer` lines reach the layer.
async fn start_accepting_many_headers(builder: AsyncLayerBuilder) -> Server {
    let inner = Inner::default();
    let addr = serve_with_max_headers(app(&inner, builder), 256).await;
    Server { addr, inner }
}

impl Server {
    async fn send(&self, request: &Req) -> Result<Reply, String> {
        match request {
            Req::Http {
                method,
                path,
                headers,
                body,
            } => {
                let url = format!("http://{}{path}", self.addr);
                try_send_header_map(method.clone(), &url, headers.clone(), body.clone()).await
            }
            Req::Raw(bytes) => send_raw(self.addr, bytes).await,
        }
    }

    /// Kicks off `POST {path}` (as `caller`, if any); returns the job's id.
    async fn start_job(&self, path: &str, caller: Option<&str>) -> String {
        let mut request = kick_off(path);
        if let Some(caller) = caller {
            request = request.caller(caller.as_bytes());
        }
        let reply = self.send(&request).await.expect("kick-off answered");
        assert_eq!(
            reply.status,
            StatusCode::ACCEPTED,
            "kick-off {path}: {reply:?}"
        );
        let location = reply.header("content-location");
        let prefix = format!("http://{}/fhir/_async/", self.addr);
        let id = location
            .strip_prefix(&prefix)
            .unwrap_or_else(|| panic!("{location} is not under {prefix}"));
        assert_eq!(id.len(), 32, "{location}");
        id.to_owned()
    }

    /// Polls job `id` (as `caller`, if any) until it is done; at most [`POLLS`] polls.
    async fn finish(&self, id: &str, caller: Option<&str>) {
        let mut poll = get(format!("/fhir/_async/{id}"));
        if let Some(caller) = caller {
            poll = poll.caller(caller.as_bytes());
        }
        for _ in 0..POLLS {
            let reply = self.send(&poll).await.expect("poll answered");
            if reply.status == StatusCode::OK {
                return;
            }
            assert_eq!(reply.status, StatusCode::ACCEPTED, "poll {id}: {reply:?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("job {id} still running after {POLLS} polls");
    }

    /// Sends every row in order (later rows may depend on earlier ones); returns one line per
    /// failed row.
    async fn run(&self, cases: &[Case]) -> Vec<String> {
        let mut failures = Vec::new();
        for case in cases {
            let outcome = self.send(&case.request).await;
            if let Err(why) = outcome.and_then(|reply| check(case, &reply)) {
                let want = case.outcome.unwrap_or("none");
                failures.push(format!(
                    "[{}] want {} / {want}: {why}",
                    case.name,
                    case.status.as_u16()
                ));
            }
        }
        failures
    }

    /// SEL-7: nothing under the status prefix ever reaches the wrapped service.
    fn check_own_routes_never_reached_inner(&self, failures: &mut Vec<String>) {
        for line in self.inner.seen() {
            let path = line.split_once(' ').map_or("", |(_, path)| path);
            if path == "/fhir/_async" || path.starts_with("/fhir/_async/") {
                failures.push(format!("[SEL-7] the wrapped service got {line}"));
            }
        }
    }
}

fn report(group: &str, rows: usize, failures: &[String]) {
    assert!(
        failures.is_empty(),
        "{group}: {} of {rows} rows failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

// ---------------------------------------------------------------------------------------------
// PREFER-2…8, SEL-2: no `Prefer` value is an error. A parseable `respond-async` goes async (202);
// anything else is ignored and the wrapped service answers (200).

#[tokio::test]
async fn prefer_2_to_8_hostile_prefer_values_never_cause_an_error() {
    let server = start_accepting_many_headers(layer()).await;
    let search = || get("/fhir/Patient?name=x");
    let thousand = |last: &str| {
        let mut line: Vec<String> = (1..1000).map(|i| format!("x-{i}=\"{i};{i}\"")).collect();
        line.push(last.to_owned());
        line.join(", ").into_bytes()
    };
    let hundred_lines = |last: &[u8]| {
        let mut lines: Vec<Vec<u8>> = (1..100)
            .map(|i| format!("x-{i}={i}").into_bytes())
            .collect();
        lines.push(last.to_vec());
        lines
    };
    let cases = [
        case(
            "PREFER-4 non-UTF-8 bytes before respond-async go async",
            search().prefer(b"x=\"\xff\xfe\", respond-async"),
            202,
            NO_OUTCOME,
        ),
        case(
            "PREFER-4 obs-text glued to respond-async makes another name: pass-through",
            search().prefer(b"respond-async\xe9"),
            200,
            NO_OUTCOME,
        ),
        case(
            "PREFER-2 an empty Prefer line and a respond-async line go async",
            search().prefer(b"").prefer(b"respond-async"),
            202,
            NO_OUTCOME,
        ),
        case(
            "PREFER-7 an unterminated quote swallows respond-async: pass-through",
            search().prefer(b"x=\"a, respond-async"),
            200,
            NO_OUTCOME,
        ),
        case(
            "PREFER-7 an escaped backslash closes the quote before respond-async: async",
            search().prefer(b"x=\"a\\\\\", respond-async"),
            202,
            NO_OUTCOME,
        ),
        case(
            "PREFER-6 respond-async with a stray value and broken parameters goes async",
            search().prefer(b"respond-async=maybe;;=;\"x"),
            202,
            NO_OUTCOME,
        ),
        case(
            "PREFER-5 1 000 preferences in one line, respond-async last, go async",
            search().prefer(&thousand("respond-async")),
            202,
            NO_OUTCOME,
        ),
        case(
            "PREFER-5 1 000 unknown preferences in one line pass through",
            search().prefer(&thousand("x-last")),
            200,
            NO_OUTCOME,
        ),
        case(
            "PREFER-2 100 Prefer lines, respond-async on the last, go async",
            search().prefer_lines(hundred_lines(b"respond-async")),
            202,
            NO_OUTCOME,
        ),
        case(
            "PREFER-2 100 Prefer lines without respond-async pass through",
            search().prefer_lines(hundred_lines(b"x-last")),
            200,
            NO_OUTCOME,
        ),
        case(
            "PREFER-8 respond-async, wait=-1 goes async",
            search().prefer(b"respond-async, wait=-1"),
            202,
            NO_OUTCOME,
        ),
        case(
            "PREFER-8 respond-async, wait=99999999999999999999 goes async",
            search().prefer(b"respond-async, wait=99999999999999999999"),
            202,
            NO_OUTCOME,
        ),
    ];
    let failures = server.run(&cases).await;
    report("Prefer", cases.len(), &failures);
}

// ---------------------------------------------------------------------------------------------
// STATUS-15, AMB-31, CANCEL-7: the status routes take exactly `{base}/_async/{32 lowercase hex}`;
// everything else under the prefix is 404 `not-found`, other methods 405 `not-supported`. Bulk
// file paths (`{id}/file/{name}`) take GET and HEAD only, and are 404 for names the layer never
// writes, `..` and encoded separators, and for jobs that are not completed bulk jobs.

#[tokio::test]
async fn status_15_mangled_ids_paths_methods_and_head_on_the_status_routes() {
    let server = start(layer()).await;
    let live = server.start_job("/fhir/slow", None).await;
    let done = server.start_job("/fhir/Patient", None).await;
    server.finish(&done, None).await;
    let unknown = "f".repeat(32);
    let at = |rest: &str| format!("/fhir/_async/{rest}");
    let cases = [
        case(
            "STATUS-15 id one digit short",
            get(at(&live[..31])),
            404,
            Some("not-found"),
        ),
        case(
            "STATUS-15 upper-case id",
            get(at(&live.to_uppercase())),
            404,
            Some("not-found"),
        ),
        case(
            "STATUS-15 unicode id: 16 × é, 32 bytes",
            get(at(&"é".repeat(16))),
            404,
            Some("not-found"),
        ),
        case(
            "STATUS-15 percent-encoded slash after a live id",
            get(at(&format!("{live}%2Ffile%2Fx"))),
            404,
            Some("not-found"),
        ),
        case(
            "CANCEL-7 DELETE through x/../{live} cancels nothing",
            delete(at(&format!("x/../{live}"))),
            404,
            Some("not-found"),
        ),
        case(
            "STATUS-15 trailing slash after a live id",
            get(at(&format!("{live}/"))),
            404,
            Some("not-found"),
        ),
        case(
            "STATUS-15 status path prefix without an id",
            get("/fhir/_async"),
            404,
            Some("not-found"),
        ),
        case(
            "AMB-31 PUT on a live id",
            request("PUT", at(&live)).body("{}"),
            405,
            Some("not-supported"),
        ),
        case(
            "AMB-31 POST with respond-async on a live id is no kick-off",
            kick_off(at(&live)),
            405,
            Some("not-supported"),
        ),
        case(
            "AMB-31 unknown method BREW on a live id",
            request("BREW", at(&live)),
            405,
            Some("not-supported"),
        ),
        case(
            "AMB-31 unknown method on the status path prefix",
            request("BREW", "/fhir/_async/"),
            404,
            Some("not-found"),
        ),
        case(
            "AMB-31 OPTIONS on a file path",
            request("OPTIONS", at(&format!("{done}/file/output.ndjson"))),
            405,
            Some("not-supported"),
        ),
        case(
            "BULK-13 a file of a completed interaction job (it has none)",
            get(at(&format!("{done}/file/output.ndjson"))),
            404,
            Some("not-found"),
        ),
        case(
            "BULK-13 .. in a file name climbing back to the status URL",
            get(at(&format!("{done}/file/../../{done}"))),
            404,
            Some("not-found"),
        ),
        case(
            "BULK-13 encoded dots and slashes in a file name",
            get(at(&format!("{done}/file/%2e%2e%2F%2e%2e%2Fmetadata"))),
            404,
            Some("not-found"),
        ),
        case(
            "CANCEL-7 DELETE of a file path cancels nothing",
            delete(at(&format!("{live}/file/output.ndjson"))),
            405,
            Some("not-supported"),
        ),
        case(
            "AMB-31 HEAD on a running job",
            head(at(&live)),
            202,
            NO_BODY,
        ),
        case(
            "AMB-31 HEAD on an unknown id",
            head(at(&unknown)),
            404,
            NO_BODY,
        ),
        case(
            "AMB-31 HEAD on the status path prefix with a trailing slash",
            head("/fhir/_async/"),
            404,
            NO_BODY,
        ),
        case(
            "AMB-31 HEAD on a file path",
            head(at(&format!("{done}/file/output.ndjson"))),
            404,
            NO_BODY,
        ),
        case(
            "CANCEL-7 the live job survived every row above",
            get(at(&live)),
            202,
            NO_OUTCOME,
        ),
    ];
    let mut failures = server.run(&cases).await;
    server.check_own_routes_never_reached_inner(&mut failures);
    report("status routes", cases.len(), &failures);
}

// ---------------------------------------------------------------------------------------------
// KICK-5, §4 E1: a kick-off body over `body_limit` is 413 `too-costly`, with or without
// `Content-Length`; one that stops arriving is 408 `timeout` after `body_timeout`. Neither starts
// a job.

#[tokio::test]
async fn kick_5_oversized_and_never_ending_bodies() {
    let server = start(
        layer()
            .body_limit(1024)
            .body_timeout(Duration::from_millis(300)),
    )
    .await;
    let addr = server.addr;
    let over = vec![b'x'; 4096];
    let at_limit = {
        let mut body = br#"{"resourceType":"Patient","text":""#.to_vec();
        body.resize(1024 - 2, b'x');
        body.extend_from_slice(br#""}"#);
        body
    };
    let chunked = |chunks: &[&[u8]]| chunks.iter().flat_map(|c| chunk(c)).collect::<Vec<u8>>();
    let over_in_chunks = {
        let mut body = chunked(&[&over[..1000], &over[1000..2000], &over[2000..]]);
        body.extend_from_slice(LAST_CHUNK);
        body
    };
    let cases = [
        case(
            "KICK-5 body over the limit with Content-Length",
            raw_kick_off(addr, &["Content-Length: 4096"], &over),
            413,
            Some("too-costly"),
        ),
        case(
            "KICK-5 body of exactly the limit is accepted",
            raw_kick_off(addr, &["Content-Length: 1024"], &at_limit),
            202,
            NO_OUTCOME,
        ),
        case(
            "KICK-5 chunked body over the limit, no Content-Length",
            raw_kick_off(addr, &["Transfer-Encoding: chunked"], &over_in_chunks),
            413,
            Some("too-costly"),
        ),
        case(
            "KICK-5 Content-Length of 10 GiB with Expect: 100-continue and no body",
            raw_kick_off(
                addr,
                &["Content-Length: 10737418240", "Expect: 100-continue"],
                b"",
            ),
            413,
            Some("too-costly"),
        ),
        case(
            "KICK-5 chunked body that never ends (one chunk, then silence)",
            raw_kick_off(
                addr,
                &["Transfer-Encoding: chunked"],
                &chunk(b"{\"resource"),
            ),
            408,
            Some("timeout"),
        ),
        case(
            "KICK-5 Content-Length body that stops half-way",
            raw_kick_off(addr, &["Content-Length: 100"], b"{\"resourceType\""),
            408,
            Some("timeout"),
        ),
        case(
            "KICK-5 chunked body with a chunk size that is no hex number",
            raw_kick_off(
                addr,
                &["Transfer-Encoding: chunked"],
                b"zz\r\n{}\r\n0\r\n\r\n",
            ),
            400,
            Some("invalid"),
        ),
    ];
    let mut failures = server.run(&cases).await;
    // Only the row accepted above may have reached the wrapped service.
    let seen = server.inner.seen();
    if seen.iter().any(|line| line != "POST /fhir/Patient") || seen.len() > 1 {
        failures.push(format!(
            "[KICK-5] refused kick-offs reached the wrapped service: {seen:?}"
        ));
    }
    report("bodies", cases.len(), &failures);
}

// ---------------------------------------------------------------------------------------------
// SEC-10, SEC-3, CANCEL-2/3/7: jobs bound to callers (`x-caller`). Another caller's or an
// anonymous status, cancel or file request gets the 404 an unknown job gets; a kick-off without
// identity is 403 `forbidden`. Rows run in order: the DELETE rows change state.

#[tokio::test]
async fn sec_10_jobs_are_bound_to_their_callers() {
    let server = start(bound_layer()).await;
    let alice = Some("alice");
    let live = server.start_job("/fhir/slow", alice).await;
    let victim = server.start_job("/fhir/slow", alice).await;
    let done = server.start_job("/fhir/Patient", alice).await;
    server.finish(&done, alice).await;
    let bobs = server.start_job("/fhir/slow", Some("bob")).await;
    let at = |rest: &str| format!("/fhir/_async/{rest}");
    let cases = [
        case(
            "SEC-10 kick-off with no identity at all",
            kick_off("/fhir/Patient"),
            403,
            Some("forbidden"),
        ),
        case(
            "SEC-10 kick-off with a non-UTF-8 identity",
            kick_off("/fhir/Patient").caller(b"\xff\xfe"),
            403,
            Some("forbidden"),
        ),
        case(
            "SEC-10 poll of another caller's completed job",
            get(at(&done)).caller(b"bob"),
            404,
            Some("not-found"),
        ),
        case(
            "SEC-10 poll with no identity at all",
            get(at(&live)),
            404,
            Some("not-found"),
        ),
        case(
            "SEC-10 poll by an identity differing only in case",
            get(at(&done)).caller(b"Alice"),
            404,
            Some("not-found"),
        ),
        // A gateway that appends its identity line instead of replacing the client's leaves two;
        // which one is true cannot be known, so neither may open a job.
        case(
            "SEC-10 two identity lines, a forged owner's first, are no identity",
            get(at(&done)).caller(b"alice").caller(b"mallory"),
            404,
            Some("not-found"),
        ),
        case(
            "SEC-10 HEAD of another caller's job",
            head(at(&done)).caller(b"bob"),
            404,
            NO_BODY,
        ),
        case(
            "SEC-10 another caller's file",
            get(at(&format!("{done}/file/output.ndjson"))).caller(b"bob"),
            404,
            Some("not-found"),
        ),
        case(
            "SEC-10 .. from one's own job's file to another caller's job",
            get(at(&format!("{bobs}/file/../../{done}"))).caller(b"bob"),
            404,
            Some("not-found"),
        ),
        case(
            "SEC-10 DELETE of another caller's job",
            delete(at(&victim)).caller(b"bob"),
            404,
            Some("not-found"),
        ),
        case(
            "CANCEL-2 the owner's DELETE",
            delete(at(&victim)).caller(b"alice"),
            202,
            NO_OUTCOME,
        ),
        case(
            "CANCEL-7 a second DELETE",
            delete(at(&victim)).caller(b"alice"),
            404,
            Some("not-found"),
        ),
        case(
            "SEC-10 the owner polls the completed job",
            get(at(&done)).caller(b"alice"),
            200,
            NO_OUTCOME,
        ),
    ];
    let mut failures = server.run(&cases).await;
    server.check_own_routes_never_reached_inner(&mut failures);
    report("callers", cases.len(), &failures);
}

// SEC-10: with `foreign_job_status(403)`, another caller's (or an anonymous) status or cancel
// request is 403 `forbidden`; an unknown job is still 404.
#[tokio::test]
async fn sec_10_foreign_jobs_answer_403_when_configured() {
    let server = start(bound_layer().foreign_job_status(StatusCode::FORBIDDEN)).await;
    let live = server.start_job("/fhir/slow", Some("alice")).await;
    let at = |rest: &str| format!("/fhir/_async/{rest}");
    let cases = [
        case(
            "SEC-10 (403 mode) poll of another caller's job",
            get(at(&live)).caller(b"bob"),
            403,
            Some("forbidden"),
        ),
        case(
            "SEC-10 (403 mode) DELETE with no identity at all",
            delete(at(&live)),
            403,
            Some("forbidden"),
        ),
        case(
            "SEC-10 (403 mode) an unknown job is still 404",
            get(at(&"0".repeat(32))).caller(b"bob"),
            404,
            Some("not-found"),
        ),
        case(
            "SEC-10 (403 mode) the owner's job survived",
            get(at(&live)).caller(b"alice"),
            202,
            NO_OUTCOME,
        ),
    ];
    let failures = server.run(&cases).await;
    report("callers, 403 mode", cases.len(), &failures);
}

// ---------------------------------------------------------------------------------------------
// SEC-13, KICK-8, STATUS-6: quotas refuse kick-offs with 429 `throttled`; a poll faster than
// `min_poll_interval` is 429 `throttled`; both with delta-seconds `Retry-After`. Another caller
// learns nothing from throttling: it gets 404. Rows run in order.

#[tokio::test]
async fn sec_13_quotas_and_poll_throttling() {
    let server = start(
        bound_layer()
            .max_jobs_per_caller(1)
            .max_running_jobs(2)
            .min_poll_interval(Duration::from_secs(3600)),
    )
    .await;
    let live = server.start_job("/fhir/slow", Some("alice")).await;
    let poll = || get(format!("/fhir/_async/{live}"));
    let cases = [
        case(
            "SEC-13 a second unfinished job of one caller",
            kick_off("/fhir/slow").caller(b"alice"),
            429,
            Some("throttled"),
        ),
        case(
            "KICK-8 another caller is still admitted",
            kick_off("/fhir/slow").caller(b"bob"),
            202,
            NO_OUTCOME,
        ),
        case(
            "KICK-8 a kick-off past max_running_jobs",
            kick_off("/fhir/slow").caller(b"carol"),
            429,
            Some("throttled"),
        ),
        case(
            "STATUS-6 the owner's first poll",
            poll().caller(b"alice"),
            202,
            NO_OUTCOME,
        ),
        case(
            "STATUS-6 the owner's second poll at once",
            poll().caller(b"alice"),
            429,
            Some("throttled"),
        ),
        case(
            "SEC-10 another caller polling as fast learns nothing",
            poll().caller(b"bob"),
            404,
            Some("not-found"),
        ),
    ];
    let failures = server.run(&cases).await;
    report("quotas", cases.len(), &failures);
}

// ---------------------------------------------------------------------------------------------
// SEC-13, KICK-8 (issue #11 item 4): finished results kept per caller are capped; past the cap a
// kick-off is 429 `throttled` with delta-seconds `Retry-After`, the kept result is not evicted,
// and a cancel frees the place. Rows run in order.

#[tokio::test]
async fn sec_13_kept_results_per_caller() {
    let store = MemoryStore::new().with_max_results_per_caller(1);
    let server = start(
        AsyncLayer::builder(store)
            .base_path("/fhir")
            .caller_from_header(CALLER),
    )
    .await;
    let kept = server.start_job("/fhir/Patient", Some("alice")).await;
    server.finish(&kept, Some("alice")).await;
    let status = || format!("/fhir/_async/{kept}");
    let cases = [
        case(
            "SEC-13 a kick-off past the caller's kept results",
            kick_off("/fhir/Patient").caller(b"alice"),
            429,
            Some("throttled"),
        ),
        case(
            "SEC-13 the kept result is not evicted",
            get(status()).caller(b"alice"),
            200,
            NO_OUTCOME,
        ),
        case(
            "KICK-8 another caller is still admitted",
            kick_off("/fhir/Patient").caller(b"bob"),
            202,
            NO_OUTCOME,
        ),
        case(
            "CANCEL-1 the owner cancels the kept result",
            delete(status()).caller(b"alice"),
            202,
            NO_OUTCOME,
        ),
        case(
            "SEC-13 the cancel freed the caller's place",
            kick_off("/fhir/Patient").caller(b"alice"),
            202,
            NO_OUTCOME,
        ),
    ];
    let failures = server.run(&cases).await;
    report("kept results", cases.len(), &failures);
}

// ---------------------------------------------------------------------------------------------
// SEC-11, issue 11 item 5: every spelling of an `access_token` query parameter — percent-encoded
// name, other case, `;`-separated — is kicked off like any request (202) and dropped from the
// recorded target; the other parameters are kept as sent.

#[tokio::test]
async fn sec_11_encoded_access_token_names_never_reach_the_store() {
    let store = MemoryStore::default();
    let server = start(AsyncLayer::builder(store.clone()).base_path("/fhir")).await;
    let mut failures = Vec::new();
    let rows = [
        "access_token=SECRET",
        "access%5Ftoken=SECRET",
        "access%5ftoken=SECRET",
        "%61ccess_token=SECRET",
        "%61%63%63%65%73%73%5F%74%6F%6B%65%6E=SECRET",
        "ACCESS_TOKEN=SECRET",
        "access_token=SECRET&access%5Ftoken=SECRET",
        "x=1;access%5Ftoken=SECRET",
    ];
    for query in rows {
        let id = server
            .start_job(&format!("/fhir/Patient?{query}&name=x"), None)
            .await;
        let record = store
            .get(
                &JobId::parse(&id).expect("a job id"),
                std::time::SystemTime::now(),
            )
            .await
            .expect("the store answers")
            .expect("the job is recorded");
        if record.target != "/fhir/Patient?name=x" {
            failures.push(format!(
                "[SEC-11 {query}] recorded target {:?}",
                record.target
            ));
        }
    }
    report("access_token spellings", rows.len(), &failures);
}
