//! The asynchronous bulk data pattern end to end over a real socket (§2.6 BULK, with SEL, CANCEL
//! and EXPIRE as they apply to bulk jobs): the kick-off forms real clients send, NDJSON files and
//! their manifest, paging through searches, partial and whole-job failures, compression,
//! cancellation, expiry, caller binding and the defences of the file route.
//!
//! Every test wraps a whole axum `Router` (the "FHIR server") in the layer, so `next` links to
//! other paths reach their own handlers, and records every request the wrapped service sees.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::convert::Infallible;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use axum::Router;
use axum::body::Body;
use axum::extract::State;
use axum::middleware::{self, Next};
use axum::response::Response;
use axum::routing::{get, post};
use bytes::Bytes;
use futures_util::TryStreamExt;
use http::{HeaderMap, HeaderName, Method, StatusCode, Uri};
use serde_json::{Value, json};
use support::{Reply, TestClient};
use tokio::sync::{Notify, mpsc};
use tower::ServiceBuilder;
use tower_fhir_async::object_store::ObjectStore;
use tower_fhir_async::object_store::local::LocalFileSystem;
use tower_fhir_async::object_store::memory::InMemory;
use tower_fhir_async::object_store::path::Path as StorePath;
use tower_fhir_async::{
    AsyncLayer, AsyncLayerBuilder, BulkWithoutPrefer, ManifestFormat, MemoryStore,
};

/// The bound on waiting for something a test expects to happen; never a timing assertion.
const BOUND: Duration = Duration::from_secs(10);

const NDJSON: &str = "application/fhir+ndjson";

/// Issue codes that tell a client to poll again (`transient` and its children, STATUS-11).
const TRANSIENT: [&str; 7] = [
    "transient",
    "lock-error",
    "no-store",
    "exception",
    "timeout",
    "incomplete",
    "throttled",
];

async fn within<T>(what: &str, fut: impl Future<Output = T>) -> T {
    tokio::time::timeout(BOUND, fut)
        .await
        .unwrap_or_else(|_| panic!("{what} did not happen within {BOUND:?}"))
}

// ---------------------------------------------------------------------------------------------
// The server under test.

/// A request as the wrapped service saw it.
#[derive(Debug, Clone)]
struct Seen {
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
}

impl Seen {
    fn target(&self) -> &str {
        self.uri.path_and_query().map_or("", |p| p.as_str())
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

/// Every request that reached the wrapped service, in order.
#[derive(Clone, Default)]
struct Recorder(Arc<Mutex<Vec<Seen>>>);

impl Recorder {
    fn take(&self) -> Vec<Seen> {
        std::mem::take(&mut *self.0.lock().unwrap())
    }
}

async fn record(
    State(recorder): State<Recorder>,
    request: axum::extract::Request,
    next: Next,
) -> Response {
    let (parts, body) = request.into_parts();
    let body = axum::body::to_bytes(body, usize::MAX)
        .await
        .expect("the request body is readable");
    recorder.0.lock().unwrap().push(Seen {
        method: parts.method.clone(),
        uri: parts.uri.clone(),
        headers: parts.headers.clone(),
        body: body.clone(),
    });
    next.run(axum::extract::Request::from_parts(parts, Body::from(body)))
        .await
}

struct Server {
    /// `http://127.0.0.1:{port}/fhir`
    base: String,
    client: TestClient,
    files: Arc<dyn ObjectStore>,
    jobs: MemoryStore,
    seen: Recorder,
    layer: AsyncLayer,
}

/// Serves `routes` behind the layer, configured by `configure` on top of: base path `/fhir`, an
/// in-memory file store the test can list.
async fn start(
    routes: Router,
    configure: impl FnOnce(AsyncLayerBuilder) -> AsyncLayerBuilder,
) -> Server {
    start_with_files(routes, Arc::new(InMemory::new()), configure).await
}

/// [`start`] with `files` as the file store.
async fn start_with_files(
    routes: Router,
    files: Arc<dyn ObjectStore>,
    configure: impl FnOnce(AsyncLayerBuilder) -> AsyncLayerBuilder,
) -> Server {
    let jobs = MemoryStore::default();
    let seen = Recorder::default();
    let builder = AsyncLayer::builder(jobs.clone())
        .base_path("/fhir")
        .file_store(files.clone());
    let layer = configure(builder).build();
    let inner = routes.layer(middleware::from_fn_with_state(seen.clone(), record));
    let service = ServiceBuilder::new().layer(layer.clone()).service(inner);
    // `axum::serve` wants `Response<axum::body::Body>`; an outer Router takes any body.
    let addr = support::serve(Router::new().fallback_service(service)).await;
    Server {
        base: format!("http://{addr}/fhir"),
        client: TestClient::default(),
        files,
        jobs,
        seen,
        layer,
    }
}

impl Server {
    /// Sends `method {base}{target}`, with `Prefer: respond-async` unless `headers` has a Prefer.
    async fn send(
        &self,
        method: Method,
        target: &str,
        headers: &[(&str, &str)],
        body: &str,
    ) -> Reply {
        let mut all = headers.to_vec();
        if !headers
            .iter()
            .any(|(name, _)| name.eq_ignore_ascii_case("prefer"))
        {
            all.push(("prefer", "respond-async"));
        }
        self.client
            .send(method, &format!("{}{target}", self.base), &all, body)
            .await
    }

    /// A kick-off that must be accepted (KICK-2, KICK-3): `202` + an absolute `Content-Location`
    /// `{base}/_async/{32 hex}`; returns it.
    async fn kick_off(
        &self,
        method: Method,
        target: &str,
        headers: &[(&str, &str)],
        body: &str,
    ) -> String {
        let reply = self.send(method.clone(), target, headers, body).await;
        assert_eq!(
            reply.status,
            StatusCode::ACCEPTED,
            "kick-off {method} {target}: {reply:?}"
        );
        let location = reply.header("content-location").to_owned();
        let id = location
            .strip_prefix(&format!("{}/_async/", self.base))
            .unwrap_or_else(|| panic!("{location} is not an absolute URL under {}", self.base));
        assert!(
            id.len() == 32 && id.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')),
            "{location}"
        );
        location
    }

    async fn export(&self, target: &str) -> String {
        self.kick_off(Method::GET, target, &[], "").await
    }

    /// Polls `status_url` (with `headers`) until it stops answering 202; at most 500 polls.
    async fn finished_with(&self, status_url: &str, headers: &[(&str, &str)]) -> Reply {
        for _ in 0..500 {
            let reply = self.client.send(Method::GET, status_url, headers, "").await;
            if reply.status != StatusCode::ACCEPTED {
                return reply;
            }
            // BULK-5: in progress is 202 with an empty body (a non-JSON body breaks clients).
            assert!(reply.body.is_empty(), "{reply:?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("job at {status_url} still running after 500 polls");
    }

    async fn finished(&self, status_url: &str) -> Reply {
        self.finished_with(status_url, &[]).await
    }

    /// BULK-8: the completed job's manifest; `200`, `application/json`.
    async fn manifest(&self, status_url: &str) -> Value {
        let reply = self.finished(status_url).await;
        manifest_of(&reply, status_url)
    }

    /// The job's objects in the file store: name → size.
    async fn stored(&self, status_url: &str) -> BTreeMap<String, u64> {
        let dir = format!("fhir-async/{}", job_id(status_url));
        stored(&*self.files, Some(&dir))
            .await
            .into_iter()
            .map(|(path, size)| {
                let name = path
                    .strip_prefix(&format!("{dir}/"))
                    .unwrap_or_else(|| panic!("{path} is not under {dir}"))
                    .to_owned();
                (name, size)
            })
            .collect()
    }

    /// Polls the file store (bounded) until the job has no objects left.
    async fn wait_until_no_files(&self, status_url: &str, what: &str) {
        for _ in 0..200 {
            if self.stored(status_url).await.is_empty() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!(
            "{what}: files left behind: {:?}",
            self.stored(status_url).await
        );
    }
}

fn job_id(status_url: &str) -> &str {
    status_url.rsplit('/').next().unwrap_or_default()
}

/// Full paths and sizes of the objects in `files` under `dir` (everything for `None`).
async fn stored(files: &dyn ObjectStore, dir: Option<&str>) -> BTreeMap<String, u64> {
    let prefix = dir.map(StorePath::from);
    files
        .list(prefix.as_ref())
        .map_ok(|meta| (meta.location.to_string(), meta.size))
        .try_collect::<Vec<_>>()
        .await
        .expect("the file store lists")
        .into_iter()
        .collect()
}

/// BULK-8, BULK-9: a completed manifest: `200`, `Content-Type: application/json`, a JSON object
/// with no `resourceType` whose file URLs are absolute and under the status URL.
fn manifest_of(reply: &Reply, status_url: &str) -> Value {
    assert_eq!(reply.status, StatusCode::OK, "{reply:?}");
    assert_eq!(
        reply.header("content-type"),
        "application/json",
        "{reply:?}"
    );
    let manifest = reply.json();
    assert!(manifest.get("resourceType").is_none(), "{manifest}");
    for item in items(&manifest, "output")
        .iter()
        .chain(items(&manifest, "error").iter())
    {
        let url = item["url"].as_str().expect("url");
        assert!(
            url.starts_with(&format!("{status_url}/file/")),
            "{url} is not under {status_url}"
        );
    }
    manifest
}

fn items(manifest: &Value, key: &str) -> Vec<Value> {
    manifest
        .get(key)
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default()
}

/// One downloaded file.
#[derive(Debug)]
struct Fetched {
    name: String,
    kind: String,
    lines: Vec<String>,
    bytes: Bytes,
}

/// Downloads every file of `key` (`output` or `error`) the way clients do (no `Accept` at all),
/// and checks BULK-13 and the rules clients rely on: `200`, `application/fhir+ndjson`, one JSON
/// resource per line whose `resourceType` is the entry's `type`, `count` = lines.
async fn fetch(client: &TestClient, manifest: &Value, key: &str) -> Vec<Fetched> {
    let mut fetched = Vec::new();
    for item in items(manifest, key) {
        let url = item["url"].as_str().expect("url");
        let kind = item["type"].as_str().expect("type").to_owned();
        if key == "error" {
            assert_eq!(kind, "OperationOutcome", "{item}");
        }
        let reply = client.get(url).await;
        assert_eq!(reply.status, StatusCode::OK, "{url}: {reply:?}");
        assert_eq!(reply.header("content-type"), NDJSON, "{url}");
        assert!(reply.headers.get("content-encoding").is_none(), "{url}");
        let text = std::str::from_utf8(&reply.body).expect("NDJSON is UTF-8");
        assert!(
            text.ends_with('\n'),
            "{url}: every line ends with a newline"
        );
        let lines: Vec<String> = text.lines().map(str::to_owned).collect();
        assert_eq!(
            item["count"].as_u64(),
            Some(lines.len() as u64),
            "{url}: manifest count must equal the file's lines"
        );
        for line in &lines {
            let resource: Value =
                serde_json::from_str(line).unwrap_or_else(|e| panic!("{url}: {e}: {line}"));
            assert_eq!(resource["resourceType"], kind.as_str(), "{url}: {line}");
        }
        fetched.push(Fetched {
            name: url.rsplit('/').next().unwrap_or_default().to_owned(),
            kind,
            lines,
            bytes: reply.body,
        });
    }
    fetched
}

/// The NDJSON lines of every output file of each type, files in manifest order.
fn lines_by_type(files: &[Fetched]) -> BTreeMap<String, Vec<String>> {
    let mut by_type: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for file in files {
        by_type
            .entry(file.kind.clone())
            .or_default()
            .extend(file.lines.iter().cloned());
    }
    by_type
}

fn ids(lines: &[String]) -> Vec<String> {
    lines
        .iter()
        .map(|line| {
            let resource: Value = serde_json::from_str(line).expect("JSON");
            resource["id"].as_str().expect("id").to_owned()
        })
        .collect()
}

fn assert_not_found(reply: &Reply, what: &str) {
    assert_eq!(reply.status, StatusCode::NOT_FOUND, "{what}: {reply:?}");
    reply.assert_outcome("not-found");
}

/// BULK-6: a failed export's OperationOutcome carries no code that tells a client to poll again.
fn assert_final_codes(outcome: &Value, what: &str) {
    for issue in outcome["issue"].as_array().expect("issues") {
        let code = issue["code"].as_str().expect("code");
        assert!(
            !TRANSIENT.contains(&code),
            "{what}: transient code {code} in {outcome}"
        );
    }
}

fn query_value(uri: &Uri, name: &str) -> Option<String> {
    form_urlencoded::parse(uri.query().unwrap_or_default().as_bytes())
        .find(|(key, _)| key == name)
        .map(|(_, value)| value.into_owned())
}

// ---------------------------------------------------------------------------------------------
// The wrapped FHIR server's handlers.

fn ndjson(body: impl Into<Body>) -> Response {
    Response::builder()
        .header("content-type", NDJSON)
        .body(body.into())
        .unwrap()
}

fn fhir_json(status: StatusCode, body: &Value) -> Response {
    Response::builder()
        .status(status)
        .header("content-type", "application/fhir+json")
        .body(Body::from(body.to_string()))
        .unwrap()
}

/// A streamed NDJSON body of `chunks`, as a real server's export would send it.
fn streamed(chunks: Vec<Bytes>) -> Body {
    Body::from_stream(futures_util::stream::iter(
        chunks.into_iter().map(Ok::<_, Infallible>),
    ))
}

/// An NDJSON body fed from a channel the test controls; dropping the body closes the channel.
fn channel_body(lines: mpsc::Receiver<Bytes>) -> Body {
    Body::from_stream(futures_util::stream::unfold(
        lines,
        |mut lines| async move {
            lines
                .recv()
                .await
                .map(|chunk| (Ok::<_, Infallible>(chunk), lines))
        },
    ))
}

/// `$export`: one Patient and one Observation, as NDJSON.
async fn small_export() -> Response {
    ndjson(concat!(
        r#"{"resourceType":"Patient","id":"p1"}"#,
        "\n",
        r#"{"resourceType":"Observation","id":"o1","subject":{"reference":"Patient/p1"}}"#,
        "\n",
    ))
}

/// A one-page searchset of one Observation.
async fn one_page() -> Response {
    fhir_json(
        StatusCode::OK,
        &json!({
            "resourceType": "Bundle", "type": "searchset", "total": 1,
            "entry": [{"resource": {"resourceType": "Observation", "id": "o1"}, "search": {"mode": "match"}}],
        }),
    )
}

/// `$everything`: a searchset of a Patient and an Observation.
async fn everything() -> Response {
    fhir_json(
        StatusCode::OK,
        &json!({
            "resourceType": "Bundle", "type": "searchset",
            "entry": [
                {"resource": {"resourceType": "Patient", "id": "p1"}},
                {"resource": {"resourceType": "Observation", "id": "o1"}},
            ],
        }),
    )
}

/// An interaction: a created Patient.
async fn created() -> Response {
    fhir_json(
        StatusCode::CREATED,
        &json!({"resourceType": "Patient", "id": "new"}),
    )
}

/// The routes a bulk-data client meets: `$export` at three levels, searches, `$everything`.
fn fhir_routes() -> Router {
    Router::new()
        .route("/fhir/$export", get(small_export).post(small_export))
        .route(
            "/fhir/Patient/$export",
            get(small_export).post(small_export),
        )
        .route(
            "/fhir/Group/{id}/$export",
            get(small_export).post(small_export),
        )
        .route("/fhir/Observation", get(one_page))
        .route("/fhir/Observation/_search", post(one_page))
        .route("/fhir/Patient/{id}/$everything", post(everything))
        .route("/fhir/Patient", post(created))
}

/// `count` Patients, each line a short JSON resource.
fn patients(count: usize, marker: &str) -> String {
    (0..count)
        .map(|i| format!("{{\"resourceType\":\"Patient\",\"id\":\"{marker}-{i:05}\"}}\n"))
        .collect()
}

// ---------------------------------------------------------------------------------------------
// 1. Kick-off forms.

/// One kick-off form and what the wrapped service must see of it.
struct Form {
    method: Method,
    target: &'static str,
    headers: &'static [(&'static str, &'static str)],
    body: &'static str,
    /// The path and query the wrapped service gets: the layer's own parameters removed,
    /// everything else as written.
    inner_target: &'static str,
    /// The parameters left in the body the wrapped service gets (form or Parameters).
    inner_params: &'static [&'static str],
    types: &'static [&'static str],
}

const FHIR_JSON_ACCEPT: (&str, &str) = ("accept", "application/fhir+json");

/// Request headers as name/value pairs.
type Headers<'a> = &'a [(&'a str, &'a str)];

// SEL-2, SEL-3, SEL-5, SEL-6, BULK-1, BULK-2, BULK-3, BULK-8, BULK-9, KICK-2, KICK-3 (interop.md
// "Kick-off"): GET with a query, POST with no body and the parameters in the query, and POST with
// a Parameters body as `application/json` (and `application/fhir+json`), at system, type and
// Group level; `_outputFormat` on a plain search (query and form body) and on a non-bulk
// operation. Each is accepted with an absolute status URL, completes with a manifest whose
// `request` is the kick-off URL, and the wrapped service never sees `respond-async`,
// `_maximumFileSize`/`_minimumFileSize`, nor `_outputFormat` outside a bulk operation.
#[tokio::test]
async fn sel_3_sel_6_bulk_1_kick_off_forms_at_three_levels() {
    let server = start(fhir_routes(), |b| b).await;
    const BOTH: &[&str] = &["Observation", "Patient"];
    const OBSERVATION: &[&str] = &["Observation"];
    let forms = [
        Form {
            method: Method::GET,
            target: "/$export?_type=Patient,Observation&_outputFormat=application%2Ffhir%2Bndjson",
            headers: &[FHIR_JSON_ACCEPT],
            body: "",
            inner_target: "/fhir/$export?_type=Patient,Observation&_outputFormat=application%2Ffhir%2Bndjson",
            inner_params: &[],
            types: BOTH,
        },
        Form {
            method: Method::GET,
            target: "/Patient/$export?_typeFilter=Observation%3Fcode%3Da%2Cb&_since=2024-01-01T00:00:00Z",
            headers: &[
                ("accept", "application/fhir+json, */*; q=0.1"),
                ("prefer", "respond-async, handling=lenient"),
            ],
            body: "",
            inner_target: "/fhir/Patient/$export?_typeFilter=Observation%3Fcode%3Da%2Cb&_since=2024-01-01T00:00:00Z",
            inner_params: &[],
            types: BOTH,
        },
        Form {
            method: Method::GET,
            target: "/Group/g1/$export?_outputFormat=ndjson&_maximumFileSize=1000000",
            headers: &[FHIR_JSON_ACCEPT],
            body: "",
            inner_target: "/fhir/Group/g1/$export?_outputFormat=ndjson",
            inner_params: &[],
            types: BOTH,
        },
        Form {
            method: Method::POST,
            target: "/$export?_type=Patient&_outputFormat=application/fhir+ndjson",
            headers: &[FHIR_JSON_ACCEPT],
            body: "",
            inner_target: "/fhir/$export?_type=Patient&_outputFormat=application/fhir+ndjson",
            inner_params: &[],
            types: BOTH,
        },
        Form {
            method: Method::POST,
            target: "/Patient/$export?_type=Observation",
            headers: &[],
            body: "",
            inner_target: "/fhir/Patient/$export?_type=Observation",
            inner_params: &[],
            types: BOTH,
        },
        Form {
            method: Method::POST,
            target: "/Group/g1/$export?_maximumFileSize=500000&_minimumFileSize=1000",
            headers: &[FHIR_JSON_ACCEPT],
            body: "",
            inner_target: "/fhir/Group/g1/$export",
            inner_params: &[],
            types: BOTH,
        },
        Form {
            method: Method::POST,
            target: "/$export",
            headers: &[("content-type", "application/json"), FHIR_JSON_ACCEPT],
            body: r#"{"resourceType":"Parameters","parameter":[
                {"name":"_outputFormat","valueString":"application/fhir+ndjson"},
                {"name":"_type","valueString":"Patient,Observation"},
                {"name":"_maximumFileSize","valueInteger":1000000}]}"#,
            inner_target: "/fhir/$export",
            inner_params: &["_outputFormat", "_type"],
            types: BOTH,
        },
        Form {
            method: Method::POST,
            target: "/Patient/$export",
            headers: &[("content-type", "application/json")],
            body: r#"{"resourceType":"Parameters","parameter":[{"name":"_type","valueString":"Patient"}]}"#,
            inner_target: "/fhir/Patient/$export",
            inner_params: &["_type"],
            types: BOTH,
        },
        Form {
            method: Method::POST,
            target: "/Group/g1/$export",
            headers: &[("content-type", "application/fhir+json"), FHIR_JSON_ACCEPT],
            body: r#"{"resourceType":"Parameters","parameter":[
                {"name":"_outputFormat","valueString":"application/ndjson"},
                {"name":"_minimumFileSize","valueInteger":10},
                {"name":"_type","valueString":"Patient"}]}"#,
            inner_target: "/fhir/Group/g1/$export",
            inner_params: &["_outputFormat", "_type"],
            types: BOTH,
        },
        Form {
            method: Method::GET,
            target: "/Observation?code=x&_outputFormat=ndjson",
            headers: &[FHIR_JSON_ACCEPT],
            body: "",
            inner_target: "/fhir/Observation?code=x",
            inner_params: &[],
            types: OBSERVATION,
        },
        Form {
            method: Method::GET,
            target: "/Observation?_outputFormat=application/fhir+ndjson",
            headers: &[],
            body: "",
            inner_target: "/fhir/Observation",
            inner_params: &[],
            types: OBSERVATION,
        },
        Form {
            method: Method::POST,
            target: "/Observation/_search",
            headers: &[("content-type", "application/x-www-form-urlencoded")],
            body: "code=x&_outputFormat=application%2Ffhir%2Bndjson",
            inner_target: "/fhir/Observation/_search",
            inner_params: &["code"],
            types: OBSERVATION,
        },
        Form {
            method: Method::POST,
            target: "/Patient/p1/$everything",
            headers: &[("content-type", "application/json")],
            body: r#"{"resourceType":"Parameters","parameter":[
                {"name":"_outputFormat","valueString":"ndjson"},
                {"name":"start","valueDate":"2024-01-01"}]}"#,
            inner_target: "/fhir/Patient/p1/$everything",
            inner_params: &["start"],
            types: BOTH,
        },
    ];
    for form in &forms {
        let what = format!("{} {}", form.method, form.target);
        let status_url = server
            .kick_off(form.method.clone(), form.target, form.headers, form.body)
            .await;
        let manifest = server.manifest(&status_url).await;
        assert_eq!(
            manifest["request"],
            format!("{}{}", server.base, form.target),
            "{what}: BULK-9 request is the kick-off URL"
        );
        assert_eq!(manifest["requiresAccessToken"], true, "{what}");
        assert_eq!(manifest["error"], json!([]), "{what}");
        let output = fetch(&server.client, &manifest, "output").await;
        let types: BTreeSet<&str> = output.iter().map(|f| f.kind.as_str()).collect();
        assert_eq!(types, form.types.iter().copied().collect(), "{what}");

        let seen = server.seen.take();
        assert_eq!(seen.len(), 1, "{what}: one inner request: {seen:?}");
        let inner = &seen[0];
        assert_eq!(inner.method, form.method, "{what}");
        assert_eq!(inner.target(), form.inner_target, "{what}");
        assert!(
            !inner
                .header("prefer")
                .unwrap_or_default()
                .contains("respond-async"),
            "{what}: PREFER-9 {:?}",
            inner.headers
        );
        let params: Vec<String> = if inner.body.is_empty() {
            Vec::new()
        } else if form
            .headers
            .iter()
            .any(|(_, v)| v.contains("form-urlencoded"))
        {
            form_urlencoded::parse(&inner.body)
                .map(|(name, _)| name.into_owned())
                .collect()
        } else {
            let body: Value = serde_json::from_slice(&inner.body).expect("a Parameters body");
            assert_eq!(body["resourceType"], "Parameters", "{what}");
            items(&body, "parameter")
                .iter()
                .map(|p| p["name"].as_str().unwrap().to_owned())
                .collect()
        };
        assert_eq!(
            params, form.inner_params,
            "{what}: inner body {:?}",
            inner.body
        );
        if let Some(length) = inner.header("content-length") {
            assert_eq!(
                length,
                inner.body.len().to_string(),
                "{what}: Content-Length of the rewritten body"
            );
        }
    }
}

// BULK-2, SEL-4, KICK-5: an `_outputFormat` other than NDJSON — in the query, a Parameters body or
// a form body, on an operation or a search — is refused at kick-off: `400` + OperationOutcome
// `not-supported`, no job recorded, the wrapped service never called.
#[tokio::test]
async fn bulk_2_unsupported_output_format_is_refused_at_kick_off() {
    let server = start(fhir_routes(), |b| b).await;
    let refused: [(Method, &str, Headers<'_>, &str); 6] = [
        (Method::GET, "/$export?_outputFormat=text%2Fcsv", &[], ""),
        (
            Method::GET,
            "/Observation?_outputFormat=application%2Ffhir%2Bjson",
            &[],
            "",
        ),
        (
            Method::GET,
            "/Patient/$export?_outputFormat=application/fhir+xml",
            &[],
            "",
        ),
        (
            Method::POST,
            "/Group/g1/$export?_outputFormat=ndjson2",
            &[],
            "",
        ),
        (
            Method::POST,
            "/Group/g1/$export",
            &[("content-type", "application/json")],
            r#"{"resourceType":"Parameters","parameter":[{"name":"_outputFormat","valueString":"text/csv"}]}"#,
        ),
        (
            Method::POST,
            "/Observation/_search",
            &[("content-type", "application/x-www-form-urlencoded")],
            "code=x&_outputFormat=parquet",
        ),
    ];
    for (method, target, headers, body) in refused {
        let reply = server.send(method.clone(), target, headers, body).await;
        assert_eq!(
            reply.status,
            StatusCode::BAD_REQUEST,
            "{method} {target}: {reply:?}"
        );
        reply.assert_outcome("not-supported");
        assert!(reply.headers.get("content-location").is_none(), "{target}");
    }
    assert_eq!(server.jobs.len(), 0, "no job was recorded");
    assert!(
        server.seen.take().is_empty(),
        "the wrapped service was never called"
    );
}

// SEL-4, SEL-1: with `.bulk(false)`, `_outputFormat` is refused with `400` `not-supported` and
// `$export` runs as an interaction (a batch-response Bundle); with `.bulk_operations(..)` another
// operation takes the bulk pattern without `_outputFormat`.
#[tokio::test]
async fn sel_4_bulk_off_and_configured_bulk_operations() {
    let off = start(fhir_routes(), |b| b.bulk(false)).await;
    let reply = off
        .send(Method::GET, "/Observation?_outputFormat=ndjson", &[], "")
        .await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST, "{reply:?}");
    reply.assert_outcome("not-supported");
    let status_url = off.export("/$export").await;
    let done = off.finished(&status_url).await;
    assert_eq!(done.status, StatusCode::OK, "{done:?}");
    assert_eq!(done.json()["type"], "batch-response");

    let routes = Router::new().route("/fhir/Patient/$extract", get(small_export));
    let custom = start(routes, |b| b.bulk_operations(["$extract"])).await;
    let status_url = custom.export("/Patient/$extract").await;
    let manifest = custom.manifest(&status_url).await;
    assert_eq!(items(&manifest, "output").len(), 2, "{manifest}");
}

// ---------------------------------------------------------------------------------------------
// 2. A large export.

const TYPES: [&str; 4] = ["Patient", "Observation", "Encounter", "Condition"];
const LARGE: usize = 100_000;
const PER_FILE: usize = 9_000;

/// 100 000 small resources: 60 000 of four types interleaved irregularly, then four blocks of
/// 10 000; a few `\r\n` line ends and blank lines, no newline after the last line; sent in
/// 8191-byte chunks that split lines anywhere. Returns the chunks and each type's lines.
fn large_export() -> (Vec<Bytes>, BTreeMap<String, Vec<String>>) {
    let mut text = String::with_capacity(LARGE * 48);
    let mut expected: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for i in 0..LARGE {
        let kind = if i < 60_000 {
            TYPES[(i * 7 + i / 3) % 4]
        } else {
            TYPES[(i - 60_000) / 10_000]
        };
        let line = format!("{{\"resourceType\":\"{kind}\",\"id\":\"r{i}\"}}");
        text.push_str(&line);
        expected.entry(kind.to_owned()).or_default().push(line);
        if i + 1 == LARGE {
            break;
        }
        text.push_str(if i % 997 == 0 { "\r\n" } else { "\n" });
        if i % 4999 == 0 {
            text.push('\n');
        }
    }
    let bytes = Bytes::from(text);
    let chunks = (0..bytes.len())
        .step_by(8191)
        .map(|at| bytes.slice(at..(at + 8191).min(bytes.len())))
        .collect();
    (chunks, expected)
}

// BULK-9, BULK-10, BULK-13, BULK-3 (interop.md "Completion", "Files"): a 100 000-resource NDJSON
// export is split per resource type and at `max_file_resources`; every file holds only its type,
// the manifest `count` equals each file's lines, the files hold exactly the data sent (in order,
// none lost or duplicated), and the object store holds exactly the listed files.
#[tokio::test]
async fn bulk_9_bulk_10_hundred_thousand_resources_into_exact_files() {
    let (chunks, expected) = large_export();
    let chunks = Arc::new(chunks);
    let routes = Router::new().route(
        "/fhir/$export",
        get(move || {
            let chunks = chunks.clone();
            async move { ndjson(streamed(chunks.to_vec())) }
        }),
    );
    let server = start(routes, |b| b.max_file_resources(PER_FILE as u64)).await;
    let status_url = server
        .kick_off(Method::GET, "/$export", &[FHIR_JSON_ACCEPT], "")
        .await;
    let manifest = server.manifest(&status_url).await;
    assert_eq!(manifest["error"], json!([]), "nothing went wrong");

    let output = fetch(&server.client, &manifest, "output").await;
    let total: u64 = items(&manifest, "output")
        .iter()
        .map(|item| item["count"].as_u64().unwrap())
        .sum();
    assert_eq!(total, LARGE as u64);
    for kind in TYPES {
        let names: Vec<&str> = output
            .iter()
            .filter(|f| f.kind == kind)
            .map(|f| f.name.as_str())
            .collect();
        let files = expected[kind].len().div_ceil(PER_FILE);
        assert!(files >= 2, "several files of {kind}");
        let numbered: Vec<String> = (1..=files).map(|n| format!("{kind}-{n}.ndjson")).collect();
        assert_eq!(
            names, numbered,
            "{kind}: files filled to max_file_resources, in order"
        );
    }
    for file in &output {
        assert!(
            file.lines.len() <= PER_FILE,
            "{}: {} lines",
            file.name,
            file.lines.len()
        );
    }
    assert_eq!(
        lines_by_type(&output),
        expected,
        "the files hold exactly the data sent"
    );

    let stored = server.stored(&status_url).await;
    let listed: BTreeMap<String, u64> = output
        .iter()
        .map(|f| (f.name.clone(), f.bytes.len() as u64))
        .collect();
    assert_eq!(stored, listed, "the store holds exactly the listed files");
}

// ---------------------------------------------------------------------------------------------
// 3. Paging through a search.

const SECRET: &str = "Bearer s3cr3t-token";

fn observation(page: u32, i: u32) -> Value {
    let mut resource = json!({
        "resourceType": "Observation", "id": format!("obs-{page}-{i}"), "status": "final",
        "code": {"text": "x"},
    });
    if page == 3 && i == 0 {
        resource["note"] =
            json!([{"text": "two  spaces,\n a newline, \"quotes\" and { } : , [ ]"}]);
    }
    resource
}

/// A search of four 30-Observation pages (`total` 120), pretty-printed. Page 1 includes two
/// Patients (`search.mode = include`), page 2 an OperationOutcome (`search.mode = outcome`).
/// `next` links: absolute, then an absolute path, then absolute to another path.
async fn search_page(headers: HeaderMap, uri: Uri) -> Response {
    let host = headers["host"].to_str().unwrap().to_owned();
    let page: u32 = query_value(&uri, "page").map_or(1, |p| p.parse().unwrap());
    let mut entry: Vec<Value> = (0..30)
        .map(|i| {
            json!({"fullUrl": format!("http://{host}/fhir/Observation/obs-{page}-{i}"),
                        "resource": observation(page, i), "search": {"mode": "match"}})
        })
        .collect();
    if page == 1 {
        for id in ["p1", "p2"] {
            entry.push(json!({"resource": {"resourceType": "Patient", "id": id}, "search": {"mode": "include"}}));
        }
    }
    if page == 2 {
        entry.push(json!({"resource": {"resourceType": "OperationOutcome", "issue": [
            {"severity": "warning", "code": "informational", "diagnostics": "code x is deprecated"}]},
            "search": {"mode": "outcome"}}));
    }
    let mut link = vec![json!({"relation": "self", "url": format!("http://{host}{uri}")})];
    let next = match page {
        1 => Some(format!("http://{host}/fhir/Observation?code=x&page=2")),
        2 => Some("/fhir/Observation?code=x&page=3".to_owned()),
        3 => Some(format!("http://{host}/fhir/_page?token=abc&page=4")),
        _ => None,
    };
    if let Some(next) = next {
        link.push(json!({"relation": "next", "url": next}));
    }
    let bundle = json!({"resourceType": "Bundle", "type": "searchset", "total": 120, "link": link, "entry": entry});
    Response::builder()
        .header("content-type", "application/fhir+json; charset=utf-8")
        .body(Body::from(serde_json::to_string_pretty(&bundle).unwrap()))
        .unwrap()
}

// BULK-10, BULK-7, BULK-9, SEC-14, SEL-6, PREFER-9: a paged search is followed through its `next`
// links (absolute, absolute path, another path); every resource arrives exactly once, pretty
// JSON becomes one compact line with strings intact, included resources get their own file, an
// `outcome` entry goes to the error file; every page request carried the kick-off's credentials
// and none carried `_outputFormat`, `_maximumFileSize` or `respond-async`.
#[tokio::test]
async fn bulk_10_paged_search_every_resource_once_with_credentials() {
    let routes = Router::new()
        .route("/fhir/Observation", get(search_page))
        .route("/fhir/_page", get(search_page));
    let server = start(routes, |b| b).await;
    let status_url = server
        .kick_off(
            Method::GET,
            "/Observation?code=x&_outputFormat=application%2Ffhir%2Bndjson&_maximumFileSize=1048576",
            &[("authorization", SECRET), FHIR_JSON_ACCEPT],
            "",
        )
        .await;
    let manifest = server.manifest(&status_url).await;

    let seen = server.seen.take();
    let targets: Vec<&str> = seen.iter().map(Seen::target).collect();
    assert_eq!(
        targets,
        [
            "/fhir/Observation?code=x",
            "/fhir/Observation?code=x&page=2",
            "/fhir/Observation?code=x&page=3",
            "/fhir/_page?token=abc&page=4",
        ]
    );
    for request in &seen {
        assert_eq!(request.method, Method::GET);
        assert_eq!(request.header("authorization"), Some(SECRET), "{request:?}");
        let target = request.target();
        assert!(
            !target.contains("_outputFormat") && !target.contains("_maximumFileSize"),
            "{target}"
        );
        assert!(
            !request
                .header("prefer")
                .unwrap_or_default()
                .contains("respond-async"),
            "{request:?}"
        );
    }

    let output = fetch(&server.client, &manifest, "output").await;
    let by_type = lines_by_type(&output);
    let mut observations = ids(&by_type["Observation"]);
    let count = observations.len();
    observations.sort();
    observations.dedup();
    assert_eq!(count, observations.len(), "no Observation twice");
    let mut wanted: Vec<String> = (1..=4)
        .flat_map(|page| (0..30).map(move |i| format!("obs-{page}-{i}")))
        .collect();
    wanted.sort();
    assert_eq!(observations, wanted, "every Observation once");
    assert_eq!(ids(&by_type["Patient"]), ["p1", "p2"]);
    let noted = by_type["Observation"]
        .iter()
        .find(|line| line.contains("obs-3-0"))
        .unwrap();
    assert_eq!(
        noted,
        &serde_json::to_string(&observation(3, 0)).unwrap(),
        "compact, strings intact"
    );

    let errors = fetch(&server.client, &manifest, "error").await;
    assert_eq!(errors.len(), 1, "{manifest}");
    assert_eq!(errors[0].lines.len(), 1);
    let outcome: Value = serde_json::from_str(&errors[0].lines[0]).unwrap();
    assert_eq!(outcome["issue"][0]["diagnostics"], "code x is deprecated");
}

// STATUS-4, BULK-5: while a paged export runs, the status is `202` with `X-Progress` as a
// percentage of the first page's `Bundle.total`, which clients parse as a number.
#[tokio::test]
async fn status_4_progress_is_a_percentage_of_bundle_total() {
    let gate = Arc::new(Notify::new());
    let page = {
        let gate = gate.clone();
        move |headers: HeaderMap, uri: Uri| {
            let gate = gate.clone();
            async move {
                let host = headers["host"].to_str().unwrap().to_owned();
                let second = query_value(&uri, "page").is_some();
                if second {
                    gate.notified().await;
                }
                let (from, to) = if second { (1000, 3000) } else { (0, 1000) };
                let entry: Vec<Value> = (from..to)
                    .map(|i| json!({"resource": {"resourceType": "Observation", "id": format!("o{i}")}}))
                    .collect();
                let mut bundle = json!({"resourceType": "Bundle", "type": "searchset", "total": 3000, "entry": entry});
                if !second {
                    bundle["link"] = json!([{"relation": "next", "url": format!("http://{host}/fhir/Observation?page=2")}]);
                }
                fhir_json(StatusCode::OK, &bundle)
            }
        }
    };
    let server = start(Router::new().route("/fhir/Observation", get(page)), |b| b).await;
    let status_url = server.export("/Observation?_outputFormat=ndjson").await;
    let mut progress = String::new();
    for _ in 0..500 {
        let reply = server.client.get(&status_url).await;
        assert_eq!(
            reply.status,
            StatusCode::ACCEPTED,
            "page 2 is held back: {reply:?}"
        );
        assert!(reply.headers.contains_key("retry-after"), "{reply:?}");
        progress = reply
            .headers
            .get("x-progress")
            .map(|v| v.to_str().unwrap().to_owned())
            .unwrap_or_default();
        if !progress.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(progress, "33% complete (1000 of 3000 resources)");
    gate.notify_one();
    let manifest = server.manifest(&status_url).await;
    assert_eq!(manifest["output"][0]["count"], 3000, "{manifest}");
}

// BULK-10, BULK-7: a server whose `next` links go round in a circle (page 1 → page 2 → the very
// URL of page 1 → …) must not make the export run forever, writing the same resources again and
// again: it should end with each resource once and an error entry. (The handler breaks the
// circle itself after `CIRCLE_CAP` pages, so that a layer that follows it still finishes.)
#[tokio::test]
async fn bulk_10_next_links_in_a_circle_end_the_export() {
    const CIRCLE_CAP: usize = 1000;
    let calls = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let circle = {
        let calls = calls.clone();
        move |uri: Uri| {
            let call = calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
            async move {
                let second = query_value(&uri, "page").is_some();
                let (id, next) = if second {
                    ("o2", "/fhir/Observation")
                } else {
                    ("o1", "/fhir/Observation?page=2")
                };
                let mut bundle = json!({"resourceType": "Bundle", "type": "searchset",
                    "entry": [{"resource": {"resourceType": "Observation", "id": id}}]});
                if call < CIRCLE_CAP {
                    bundle["link"] = json!([{"relation": "next", "url": next}]);
                }
                fhir_json(StatusCode::OK, &bundle)
            }
        }
    };
    let server = start(Router::new().route("/fhir/Observation", get(circle)), |b| b).await;
    let status_url = server.export("/Observation?_outputFormat=ndjson").await;
    let manifest = server.manifest(&status_url).await;
    let output = fetch(&server.client, &manifest, "output").await;
    let observations = ids(&lines_by_type(&output)["Observation"]);
    let requests: Vec<String> = server
        .seen
        .take()
        .iter()
        .map(|seen| seen.target().to_owned())
        .collect();
    assert_eq!(
        &requests[..2],
        ["/fhir/Observation", "/fhir/Observation?page=2"]
    );
    assert!(
        observations == ["o1", "o2"],
        "the export followed a circle of two next links: {} page requests, {} Observations \
         written (2 distinct)",
        requests.len(),
        observations.len()
    );
    assert_eq!(items(&manifest, "error").len(), 1, "{manifest}");
}

// ---------------------------------------------------------------------------------------------
// 4. Partial failure.

// BULK-7: a later page answering 500, and a `next` link to another server, end the export but not
// the job: `200` + manifest with the resources read so far and an error file of
// OperationOutcomes saying what happened. The foreign server is never asked.
#[tokio::test]
async fn bulk_7_later_page_failure_and_foreign_link_are_error_entries() {
    async fn failing(headers: HeaderMap, uri: Uri) -> Response {
        let host = headers["host"].to_str().unwrap();
        if query_value(&uri, "page").is_some() {
            return Response::builder()
                .status(StatusCode::INTERNAL_SERVER_ERROR)
                .header("content-type", "text/plain")
                .body(Body::from("database on fire"))
                .unwrap();
        }
        let entry: Vec<Value> = (0..10)
            .map(|i| json!({"resource": {"resourceType": "Observation", "id": format!("o{i}")}}))
            .collect();
        fhir_json(
            StatusCode::OK,
            &json!({"resourceType": "Bundle", "type": "searchset", "entry": entry,
                    "link": [{"relation": "next", "url": format!("http://{host}/fhir/Observation?page=2")}]}),
        )
    }
    async fn foreign() -> Response {
        fhir_json(
            StatusCode::OK,
            &json!({"resourceType": "Bundle", "type": "searchset",
                    "entry": [{"resource": {"resourceType": "Encounter", "id": "e1"}}],
                    "link": [{"relation": "next", "url": "http://elsewhere.example/fhir/Encounter?page=2"}]}),
        )
    }
    let routes = Router::new()
        .route("/fhir/Observation", get(failing))
        .route("/fhir/Encounter", get(foreign));
    let server = start(routes, |b| b).await;

    let cases = [
        (
            "/Observation?_outputFormat=ndjson",
            "Observation",
            10,
            2,
            ["Page 2", "500"],
        ),
        (
            "/Encounter?_outputFormat=ndjson",
            "Encounter",
            1,
            1,
            ["another server", "elsewhere.example"],
        ),
    ];
    for (target, kind, count, requests, words) in cases {
        let status_url = server.export(target).await;
        let manifest = server.manifest(&status_url).await;
        let output = fetch(&server.client, &manifest, "output").await;
        assert_eq!(output.len(), 1, "{target}: {manifest}");
        assert_eq!(
            (output[0].kind.as_str(), output[0].lines.len()),
            (kind, count),
            "{target}"
        );
        let errors = fetch(&server.client, &manifest, "error").await;
        assert_eq!(errors.len(), 1, "{target}: {manifest}");
        assert_eq!(errors[0].lines.len(), 1, "{target}");
        let outcome: Value = serde_json::from_str(&errors[0].lines[0]).unwrap();
        let diagnostics = outcome["issue"][0]["diagnostics"]
            .as_str()
            .unwrap_or_default();
        for word in words {
            assert!(
                diagnostics.contains(word),
                "{target}: {diagnostics:?} should mention {word:?}"
            );
        }
        assert_eq!(server.seen.take().len(), requests, "{target}");
    }
}

// BULK-7, BULK-9, BULK-10: bad NDJSON lines (not JSON, no `resourceType`, an invalid one) become
// OperationOutcomes in the error file, OperationOutcome lines from the server go there too, and
// every other line — the last one without a newline included — is kept.
#[tokio::test]
async fn bulk_7_invalid_ndjson_lines_go_to_the_error_file() {
    async fn messy() -> Response {
        ndjson(concat!(
            "{\"resourceType\":\"Patient\",\"id\":\"a\"}\n",
            "this is not json\n",
            "{\"resourceType\":\"Observation\",\"id\":\"b\"}\n",
            "{\"id\":\"no-type\"}\n",
            "{\"resourceType\":\"../../etc\",\"id\":\"c\"}\n",
            "{\"resourceType\":\"OperationOutcome\",\"issue\":[{\"severity\":\"warning\",\"code\":\"informational\",\"diagnostics\":\"partial\"}]}\n",
            "   \n",
            "{\"resourceType\":\"Patient\",\"id\":\"d\"}",
        ))
    }
    let routes = Router::new().route("/fhir/$export", get(messy));
    let server = start(routes, |b| b).await;
    let status_url = server.export("/$export").await;
    let manifest = server.manifest(&status_url).await;
    let by_type = lines_by_type(&fetch(&server.client, &manifest, "output").await);
    assert_eq!(
        by_type.keys().collect::<Vec<_>>(),
        ["Observation", "Patient"]
    );
    assert_eq!(ids(&by_type["Patient"]), ["a", "d"]);
    assert_eq!(ids(&by_type["Observation"]), ["b"]);
    let errors = fetch(&server.client, &manifest, "error").await;
    let lines: Vec<&String> = errors.iter().flat_map(|f| &f.lines).collect();
    assert_eq!(
        lines.len(),
        4,
        "three bad lines and the server's outcome: {lines:?}"
    );
    assert!(lines.iter().any(|l| l.contains("\"partial\"")), "{lines:?}");
    assert!(
        !lines.iter().any(|l| l.contains("this is not json")),
        "bad input is described, not copied"
    );
}

// BULK-7: an NDJSON stream that breaks off half-way keeps the lines read so far and says so in
// the error file; the job completes.
#[tokio::test]
async fn bulk_7_broken_ndjson_stream_keeps_what_arrived() {
    async fn broken() -> Response {
        let chunks = futures_util::stream::iter([
            Ok(Bytes::from(patients(5, "before-the-break"))),
            Ok(Bytes::from_static(
                b"{\"resourceType\":\"Patient\",\"id\":\"half",
            )),
            Err(std::io::Error::other("connection reset by peer")),
        ]);
        ndjson(Body::from_stream(chunks))
    }
    let server = start(Router::new().route("/fhir/$export", get(broken)), |b| b).await;
    let status_url = server.export("/$export").await;
    let manifest = server.manifest(&status_url).await;
    let output = fetch(&server.client, &manifest, "output").await;
    assert_eq!(
        ids(&lines_by_type(&output)["Patient"]).len(),
        5,
        "{manifest}"
    );
    let errors = fetch(&server.client, &manifest, "error").await;
    assert_eq!(errors.len(), 1, "{manifest}");
    assert!(
        errors[0].lines[0].contains("broke off"),
        "{:?}",
        errors[0].lines
    );
}

// BULK-7, BULK-3: a line longer than the layer's `result_limit` is left out with an error entry
// (in the middle of the stream, and as its unterminated last line); the lines around it are kept.
#[tokio::test]
async fn bulk_7_overlong_lines_are_error_entries() {
    async fn long_lines() -> Response {
        let long = format!(
            "{{\"resourceType\":\"Patient\",\"id\":\"long\",\"text\":\"{}\"}}",
            "x".repeat(5000)
        );
        let body = format!("{}{long}\n{}{long}", patients(2, "a"), patients(2, "b"));
        let bytes = Bytes::from(body);
        // Small chunks, so the long lines arrive in pieces.
        let chunks = (0..bytes.len())
            .step_by(700)
            .map(|at| bytes.slice(at..(at + 700).min(bytes.len())))
            .collect();
        ndjson(streamed(chunks))
    }
    let routes = Router::new().route("/fhir/$export", get(long_lines));
    let server = start(routes, |b| b.result_limit(2048)).await;
    let status_url = server.export("/$export").await;
    let manifest = server.manifest(&status_url).await;
    let output = fetch(&server.client, &manifest, "output").await;
    assert_eq!(
        ids(&lines_by_type(&output)["Patient"]),
        ["a-00000", "a-00001", "b-00000", "b-00001"]
    );
    let errors = fetch(&server.client, &manifest, "error").await;
    let lines: Vec<&String> = errors.iter().flat_map(|f| &f.lines).collect();
    assert_eq!(lines.len(), 2, "one entry per long line: {lines:?}");
    assert!(lines.iter().all(|l| l.len() < 2048), "{lines:?}");
}

// BULK-9, BULK-10: with more resource types interleaved than files kept open
// (`max_open_files(2)`), files are closed and reopened as new numbers, and still every file holds
// one type, every `count` is exact and no resource is lost or repeated.
#[tokio::test]
async fn bulk_9_more_types_than_open_files_keeps_counts_exact() {
    const KINDS: [&str; 6] = [
        "Patient",
        "Observation",
        "Encounter",
        "Condition",
        "Procedure",
        "Immunization",
    ];
    let mut body = String::new();
    let mut expected: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for i in 0..600 {
        let kind = KINDS[(i / 7) % KINDS.len()];
        let line = format!("{{\"resourceType\":\"{kind}\",\"id\":\"x{i}\"}}");
        body.push_str(&line);
        body.push('\n');
        expected.entry(kind.to_owned()).or_default().push(line);
    }
    let routes = Router::new().route(
        "/fhir/$export",
        get(move || {
            let body = body.clone();
            async move { ndjson(body) }
        }),
    );
    let server = start(routes, |b| b.max_open_files(2)).await;
    let status_url = server.export("/$export").await;
    let manifest = server.manifest(&status_url).await;
    let output = fetch(&server.client, &manifest, "output").await;
    assert!(
        output.len() > KINDS.len(),
        "files were reopened: {manifest}"
    );
    assert_eq!(lines_by_type(&output), expected);
    assert_eq!(server.stored(&status_url).await.len(), output.len());
}

// BULK-9 (interop.md "Completion"): an export with nothing in it completes with empty `output`
// and `error` arrays, and leaves no files.
#[tokio::test]
async fn bulk_9_empty_export_has_empty_arrays() {
    let routes = Router::new()
        .route("/fhir/$export", get(|| async { StatusCode::NO_CONTENT }))
        .route("/fhir/Patient/$export", get(|| async { ndjson("") }))
        .route(
            "/fhir/Observation",
            get(|| async {
                fhir_json(
                    StatusCode::OK,
                    &json!({"resourceType": "Bundle", "type": "searchset", "total": 0}),
                )
            }),
        );
    let server = start(routes, |b| b).await;
    for target in [
        "/$export",
        "/Patient/$export",
        "/Observation?_outputFormat=ndjson",
    ] {
        let status_url = server.export(target).await;
        let manifest = server.manifest(&status_url).await;
        assert_eq!(manifest["output"], json!([]), "{target}: {manifest}");
        assert_eq!(manifest["error"], json!([]), "{target}: {manifest}");
        assert!(server.stored(&status_url).await.is_empty(), "{target}");
    }
}

// ---------------------------------------------------------------------------------------------
// 5. Whole-job failure.

async fn failure(axum::extract::Path(case): axum::extract::Path<String>) -> Response {
    let outcome = |code: &str, diagnostics: &str| json!({"resourceType": "OperationOutcome", "issue": [{"severity": "error", "code": code, "diagnostics": diagnostics}]});
    match case.as_str() {
        "forbidden" => fhir_json(
            StatusCode::FORBIDDEN,
            &outcome("forbidden", "Group g is not yours"),
        ),
        "unavailable" => fhir_json(
            StatusCode::SERVICE_UNAVAILABLE,
            &json!({"resourceType": "OperationOutcome", "issue": [
                {"severity": "error", "code": "transient", "diagnostics": "index rebuilding"},
                {"severity": "error", "code": "throttled", "diagnostics": "too busy"}]}),
        ),
        "busy" => Response::builder()
            .status(StatusCode::TOO_MANY_REQUESTS)
            .header("retry-after", "30")
            .body(Body::empty())
            .unwrap(),
        "crash" => Response::builder()
            .status(StatusCode::INTERNAL_SERVER_ERROR)
            .header("content-type", "text/plain")
            .body(Body::from("NullPointerException at line 42"))
            .unwrap(),
        "missing" => Response::builder()
            .status(StatusCode::NOT_FOUND)
            .body(Body::empty())
            .unwrap(),
        "slow" => Response::builder()
            .status(StatusCode::GATEWAY_TIMEOUT)
            .header("content-type", "application/json")
            .body(Body::from(r#"{"error":"upstream timed out"}"#))
            .unwrap(),
        _ => Response::builder()
            .header("content-type", "text/csv")
            .body(Body::from("id,name\n1,x\n"))
            .unwrap(),
    }
}

// BULK-6, STATUS-11, CANCEL-3: when the first request fails, the job fails: the status URL
// answers that 4xx/5xx (502 for an answer that cannot be exported; 500 for the inner 429/503,
// which would tell a client to poll again — a failed job is final) with an OperationOutcome —
// the server's own when it sent one — as `application/fhir+json`, with no transient issue code
// (clients would poll forever); no files are left; the job can still be deleted.
#[tokio::test]
async fn bulk_6_failed_first_request_fails_the_job_with_its_status() {
    // Without the kick-off's wait, so that client errors too reach the status URL (with it,
    // they are the kick-off's answer: `kick_5_client_errors_reported_at_once_answer_the_kick_off`).
    let server = start(
        Router::new().route("/fhir/Group/{case}/$export", get(failure)),
        |b| b.kickoff_wait(Duration::ZERO),
    )
    .await;
    let cases = [
        (
            "forbidden",
            StatusCode::FORBIDDEN,
            Some("Group g is not yours"),
        ),
        (
            "unavailable",
            StatusCode::INTERNAL_SERVER_ERROR,
            Some("index rebuilding"),
        ),
        ("busy", StatusCode::INTERNAL_SERVER_ERROR, None),
        ("crash", StatusCode::INTERNAL_SERVER_ERROR, None),
        ("missing", StatusCode::NOT_FOUND, None),
        ("slow", StatusCode::GATEWAY_TIMEOUT, None),
        ("csv", StatusCode::BAD_GATEWAY, None),
    ];
    for (case, status, diagnostics) in cases {
        let status_url = server.export(&format!("/Group/{case}/$export")).await;
        let reply = server.finished(&status_url).await;
        assert_eq!(reply.status, status, "{case}: {reply:?}");
        assert_eq!(
            reply.header("content-type"),
            "application/fhir+json",
            "{case}"
        );
        let outcome = reply.json();
        assert_eq!(
            outcome["resourceType"], "OperationOutcome",
            "{case}: {outcome}"
        );
        assert!(
            outcome["issue"][0]["diagnostics"]
                .as_str()
                .is_some_and(|d| !d.is_empty()),
            "{case}: {outcome}"
        );
        if let Some(diagnostics) = diagnostics {
            assert_eq!(
                outcome["issue"][0]["diagnostics"], diagnostics,
                "{case}: the server's own outcome"
            );
        }
        assert_final_codes(&outcome, case);
        if case == "forbidden" {
            assert_eq!(
                outcome["issue"][0]["code"], "forbidden",
                "a final code is kept"
            );
        }
        assert!(
            !reply.body.windows(12).any(|w| w == b"NullPointerE"),
            "{case}: inner text not leaked as JSON"
        );
        let again = server.client.get(&status_url).await;
        assert_eq!(
            (again.status, again.body.clone()),
            (reply.status, reply.body.clone()),
            "{case}: stable"
        );
        assert!(
            server.stored(&status_url).await.is_empty(),
            "{case}: no files"
        );
        assert_eq!(
            server.client.delete(&status_url).await.status,
            StatusCode::ACCEPTED,
            "{case}"
        );
        assert_not_found(&server.client.get(&status_url).await, case);
    }
}

// ---------------------------------------------------------------------------------------------
// 6. Compression, 13. HEAD.

/// Decompresses a gzip body.
async fn gunzip(body: &[u8]) -> Vec<u8> {
    use tokio::io::AsyncReadExt;
    let mut decoder = async_compression::tokio::bufread::GzipDecoder::new(body);
    let mut plain = Vec::new();
    decoder.read_to_end(&mut plain).await.expect("valid gzip");
    plain
}

// BULK-13, BULK-15 (interop.md "Files"): with `Accept-Encoding` admitting gzip (as clients send
// it, or `*`) the file is gzip with `Content-Encoding: gzip` and decompresses to exactly the plain
// bytes; without `Accept-Encoding`, with `identity` only or with `gzip;q=0` it is plain, with
// `Content-Length`; `Accept` is optional.
#[tokio::test]
async fn bulk_15_gzip_when_asked_same_bytes() {
    let body = patients(3000, "gzip-test-patient-with-a-longer-id");
    let routes = Router::new().route(
        "/fhir/$export",
        get(move || {
            let body = body.clone();
            async move { ndjson(body) }
        }),
    );
    let server = start(routes, |b| b).await;
    let status_url = server.export("/$export").await;
    let manifest = server.manifest(&status_url).await;
    let url = manifest["output"][0]["url"].as_str().unwrap().to_owned();

    let plain = server.client.get(&url).await;
    assert_eq!(plain.status, StatusCode::OK);
    assert_eq!(plain.header("content-type"), NDJSON);
    assert!(plain.headers.get("content-encoding").is_none());
    assert_eq!(plain.header("content-length"), plain.body.len().to_string());
    assert_eq!(
        plain.body,
        patients(3000, "gzip-test-patient-with-a-longer-id")
    );

    for accept_encoding in [
        "gzip, deflate, br, identity",
        "gzip",
        "br;q=1.0, GZIP;q=0.5",
        "*",
    ] {
        let reply = server
            .client
            .send(
                Method::GET,
                &url,
                &[("accept", NDJSON), ("accept-encoding", accept_encoding)],
                "",
            )
            .await;
        assert_eq!(reply.status, StatusCode::OK, "{accept_encoding}");
        assert_eq!(reply.header("content-type"), NDJSON, "{accept_encoding}");
        assert_eq!(
            reply.header("content-encoding"),
            "gzip",
            "{accept_encoding}"
        );
        assert!(
            reply
                .header("vary")
                .to_ascii_lowercase()
                .contains("accept-encoding")
        );
        assert_eq!(
            &reply.body[..2],
            [0x1f, 0x8b],
            "{accept_encoding}: gzip magic"
        );
        assert!(
            reply.body.len() < plain.body.len(),
            "{accept_encoding}: compressed"
        );
        assert_eq!(
            gunzip(&reply.body).await,
            plain.body,
            "{accept_encoding}: same bytes"
        );
    }
    for accept_encoding in ["identity", "gzip;q=0, identity", "br"] {
        let reply = server
            .client
            .send(
                Method::GET,
                &url,
                &[("accept-encoding", accept_encoding)],
                "",
            )
            .await;
        assert_eq!(reply.status, StatusCode::OK, "{accept_encoding}");
        assert!(
            reply.headers.get("content-encoding").is_none(),
            "{accept_encoding}"
        );
        assert_eq!(reply.body, plain.body, "{accept_encoding}");
    }
}

// BULK-13: `HEAD` on a file gives the `GET` headers (type, length; encoding when gzip is asked)
// and no body.
#[tokio::test]
async fn bulk_13_head_on_a_file() {
    let server = start(fhir_routes(), |b| b).await;
    let status_url = server.export("/$export").await;
    let manifest = server.manifest(&status_url).await;
    let url = manifest["output"][0]["url"].as_str().unwrap().to_owned();
    let get = server.client.get(&url).await;

    let head = server.client.send(Method::HEAD, &url, &[], "").await;
    assert_eq!(head.status, StatusCode::OK, "{head:?}");
    assert_eq!(head.header("content-type"), NDJSON);
    assert_eq!(head.header("content-length"), get.body.len().to_string());
    assert!(head.body.is_empty());

    let head = server
        .client
        .send(Method::HEAD, &url, &[("accept-encoding", "gzip")], "")
        .await;
    assert_eq!(head.status, StatusCode::OK, "{head:?}");
    assert_eq!(head.header("content-encoding"), "gzip");
    assert!(head.body.is_empty());

    let missing = server
        .client
        .send(
            Method::HEAD,
            &format!("{status_url}/file/Encounter-1.ndjson"),
            &[],
            "",
        )
        .await;
    assert_eq!(missing.status, StatusCode::NOT_FOUND);
    assert!(missing.body.is_empty(), "HEAD has no body");
}

// ---------------------------------------------------------------------------------------------
// 7. Cancel.

// CANCEL-1, CANCEL-2, CANCEL-3, CANCEL-5, CANCEL-6, CANCEL-7, STATUS-4, BULK-13: while an export
// streams (its NDJSON producer under the test's control), the status is 202 with `X-Progress`
// counting resources (not starting with a number, which clients read as a percentage) and its already-written files are not served (not complete); DELETE → 202;
// the producer sees its stream dropped; every file of the job leaves the store; status, file
// and a second DELETE → 404 + OperationOutcome.
#[tokio::test]
async fn cancel_6_delete_stops_a_running_export_and_removes_its_files() {
    let (lines_tx, lines_rx) = mpsc::channel::<Bytes>(4);
    let lines_rx = Arc::new(Mutex::new(Some(lines_rx)));
    let routes = Router::new().route(
        "/fhir/Patient/$export",
        get(move || {
            let lines = lines_rx.lock().unwrap().take().expect("one export");
            async move { ndjson(channel_body(lines)) }
        }),
    );
    let server = start(routes, |b| b.max_file_resources(100)).await;
    let status_url = server.export("/Patient/$export").await;
    lines_tx
        .send(Bytes::from(patients(1050, "cancelled")))
        .await
        .expect("the export reads");

    let mut progress = String::new();
    for _ in 0..500 {
        let reply = server.client.get(&status_url).await;
        assert_eq!(
            reply.status,
            StatusCode::ACCEPTED,
            "the stream is still open: {reply:?}"
        );
        if let Some(value) = reply.headers.get("x-progress") {
            progress = value.to_str().unwrap().to_owned();
            if progress == "exported 1000 resources" && server.stored(&status_url).await.len() >= 10
            {
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(progress, "exported 1000 resources");
    let written = server.stored(&status_url).await;
    assert!(written.contains_key("Patient-1.ndjson"), "{written:?}");
    let file_url = format!("{status_url}/file/Patient-1.ndjson");
    assert_not_found(
        &server.client.get(&file_url).await,
        "a file of a running job",
    );

    let cancelled = server.client.delete(&status_url).await;
    assert_eq!(cancelled.status, StatusCode::ACCEPTED, "{cancelled:?}");
    within(
        "the export's NDJSON stream being dropped",
        lines_tx.closed(),
    )
    .await;
    server
        .wait_until_no_files(&status_url, "after DELETE of a running export")
        .await;
    assert_eq!(server.jobs.len(), 0);
    assert_not_found(&server.client.get(&status_url).await, "status after DELETE");
    assert_not_found(&server.client.get(&file_url).await, "file after DELETE");
    assert_not_found(&server.client.delete(&status_url).await, "second DELETE");
    // Nothing shows up once pending tasks have run either (a late upload of the stopped export).
    tokio::task::yield_now().await;
    assert!(stored(&*server.files, None).await.is_empty());
}

/// Reports, when dropped, how many lines its stream had produced.
struct Produced {
    count: usize,
    report: Option<tokio::sync::oneshot::Sender<usize>>,
}

impl Drop for Produced {
    fn drop(&mut self) {
        if let Some(report) = self.report.take() {
            let _ = report.send(self.count);
        }
    }
}

// CANCEL-6: an export whose NDJSON source is always ready (an in-process server streaming from
// memory, files in memory) is still stopped by DELETE. The stream produces `LINES` lines at once,
// then waits forever, so the job cannot finish by itself: a cancel that works drops the stream
// before its last line; one that waits for the export to yield drops it only there.
// Multi-thread runtime, so the DELETE is served while the export runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_6_delete_stops_an_always_ready_export() {
    const LINES: usize = 300_000;
    let (report_tx, report) = tokio::sync::oneshot::channel();
    let report_tx = Arc::new(Mutex::new(Some(report_tx)));
    let routes = Router::new().route(
        "/fhir/$export",
        get(move || {
            let produced = Produced {
                count: 0,
                report: report_tx.lock().unwrap().take(),
            };
            async move {
                let lines = futures_util::stream::unfold(produced, |mut produced| async move {
                    if produced.count == LINES {
                        std::future::pending::<()>().await;
                    }
                    produced.count += 1;
                    let line = format!(
                        "{{\"resourceType\":\"Patient\",\"id\":\"p{}\"}}\n",
                        produced.count
                    );
                    Some((Ok::<_, Infallible>(Bytes::from(line)), produced))
                });
                ndjson(Body::from_stream(lines))
            }
        }),
    );
    let server = start(routes, |b| b).await;
    let status_url = server.export("/$export").await;
    let mut running = None;
    for _ in 0..500 {
        let reply = server.client.get(&status_url).await;
        assert_eq!(
            reply.status,
            StatusCode::ACCEPTED,
            "the export never ends by itself"
        );
        if reply.headers.contains_key("x-progress") {
            running = Some(reply);
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let running = running.expect("the export reports progress");
    let cancelled = server.client.delete(&status_url).await;
    assert_eq!(cancelled.status, StatusCode::ACCEPTED, "{cancelled:?}");
    let produced = within("the export's stream being dropped", report)
        .await
        .expect("reported");
    assert!(
        produced < LINES,
        "DELETE (sent at {:?}) did not stop the export: its stream was dropped only when it \
         stopped being ready, after all {produced} lines",
        running.header("x-progress")
    );
    server
        .wait_until_no_files(&status_url, "after DELETE")
        .await;
}

/// A fresh folder under the system's temporary folder, removed when dropped.
struct TempDir(std::path::PathBuf);

impl TempDir {
    fn new(name: &str) -> Self {
        let path = std::env::temp_dir().join(format!(
            "tower-fhir-async-{name}-{}-{}",
            std::process::id(),
            tower_fhir_async::JobId::new()
        ));
        std::fs::create_dir_all(&path).expect("a temporary folder");
        Self(path)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

// CANCEL-5, CANCEL-6, CANCEL-7 with a file store on disk (`LocalFileSystem`, whose `delete` of
// an object that is already gone is an error, unlike `InMemory`'s): DELETE of a running export
// that has written many files leaves none of them behind, with no sweeper running. On the
// multi-thread runtime servers use, where the job's own clean-up and the DELETE's run at once;
// repeated, because how the two interleave varies from run to run.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cancel_5_running_export_on_local_file_system_leaves_no_files() {
    const ROUNDS: usize = 20;
    let dir = TempDir::new("cancel");
    let files = LocalFileSystem::new_with_prefix(&dir.0).expect("the folder exists");
    let exports: Arc<Mutex<Vec<mpsc::Receiver<Bytes>>>> = Arc::default();
    let routes = Router::new().route(
        "/fhir/$export",
        get({
            let exports = exports.clone();
            move || {
                let lines = exports.lock().unwrap().pop().expect("an export's lines");
                async move { ndjson(channel_body(lines)) }
            }
        }),
    );
    let server = start_with_files(routes, Arc::new(files), |b| b.max_file_resources(1)).await;
    for round in 1..=ROUNDS {
        let (lines_tx, lines_rx) = mpsc::channel::<Bytes>(4);
        exports.lock().unwrap().push(lines_rx);
        let status_url = server.export("/$export").await;
        lines_tx
            .send(Bytes::from(patients(200, "on-disk")))
            .await
            .expect("the export reads");
        // Every line but the last is a closed file of its own; the last is not uploaded yet.
        for _ in 0..400 {
            if server.stored(&status_url).await.len() >= 199 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        assert_eq!(server.stored(&status_url).await.len(), 199, "round {round}");

        assert_eq!(
            server.client.delete(&status_url).await.status,
            StatusCode::ACCEPTED,
            "round {round}"
        );
        within(
            "the export's NDJSON stream being dropped",
            lines_tx.closed(),
        )
        .await;
        let mut left = BTreeMap::new();
        for _ in 0..80 {
            left = server.stored(&status_url).await;
            if left.is_empty() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        assert!(
            left.is_empty(),
            "round {round} of {ROUNDS}: {} of the cancelled export's 199 files left behind: {:?}",
            left.len(),
            left.keys().take(5).collect::<Vec<_>>()
        );
        assert_not_found(&server.client.get(&status_url).await, "status after DELETE");
    }
}

// CANCEL-5, CANCEL-7: DELETE after completion ("client has finished downloading") removes the
// job and its files; the file URLs answer 404 + OperationOutcome.
#[tokio::test]
async fn cancel_5_delete_after_completion_removes_the_files() {
    let server = start(fhir_routes(), |b| b).await;
    let status_url = server.export("/$export").await;
    let manifest = server.manifest(&status_url).await;
    let output = fetch(&server.client, &manifest, "output").await;
    assert_eq!(server.stored(&status_url).await.len(), output.len());

    assert_eq!(
        server.client.delete(&status_url).await.status,
        StatusCode::ACCEPTED
    );
    server
        .wait_until_no_files(&status_url, "after DELETE")
        .await;
    for item in items(&manifest, "output") {
        assert_not_found(
            &server.client.get(item["url"].as_str().unwrap()).await,
            "file after DELETE",
        );
    }
    assert_not_found(&server.client.get(&status_url).await, "status after DELETE");
}

// ---------------------------------------------------------------------------------------------
// 8. Expiry.

// EXPIRE-2, EXPIRE-3, BULK-8: files are served until the manifest's `Expires`; afterwards the
// status and file URLs answer 404 + OperationOutcome and the sweeper removes the files from the
// store (and the job from the job store). Real time, 3 s retention; every wait is bounded.
#[tokio::test]
async fn expire_2_expire_3_expired_export_and_its_files_are_gone() {
    let server = start(fhir_routes(), |b| b.retention(Duration::from_secs(3))).await;
    let sweeper = tokio::spawn(server.layer.sweeper(Duration::from_millis(50)));
    let status_url = server.export("/$export").await;
    let done = server.finished(&status_url).await;
    let manifest = manifest_of(&done, &status_url);
    let expires =
        httpdate::parse_http_date(done.header("expires")).expect("Expires is an HTTP date");
    let file_url = manifest["output"][0]["url"].as_str().unwrap().to_owned();
    let before = server.client.get(&file_url).await;
    if SystemTime::now() < expires {
        assert_eq!(
            before.status,
            StatusCode::OK,
            "served before Expires: {before:?}"
        );
        assert!(
            !server.stored(&status_url).await.is_empty(),
            "the sweeper keeps a live job's files"
        );
    }

    let mut gone = None;
    for _ in 0..400 {
        let reply = server.client.get(&status_url).await;
        if reply.status != StatusCode::OK {
            gone = Some(reply);
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let gone = gone.expect("the job expires");
    assert!(SystemTime::now() >= expires, "not before Expires");
    assert_not_found(&gone, "status after expiry");
    assert_not_found(&server.client.get(&file_url).await, "file after expiry");
    server
        .wait_until_no_files(&status_url, "the sweeper after expiry")
        .await;
    for _ in 0..400 {
        if server.jobs.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert!(server.jobs.is_empty(), "the sweeper reclaims the record");
    sweeper.abort();
}

// ---------------------------------------------------------------------------------------------
// 9. The file route's defences.

/// What a file request must get.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Expect {
    NotFound,
    NotAllowed,
    /// Job A's own `Patient-1.ndjson` (the query string is not part of the name).
    OwnFile,
}

// BULK-13, CANCEL-7, SEC-9, SEL-7: table-driven tricks on the file route of job A (`..` plain and
// encoded, encoded slashes, double slashes, another job's path and id, names of files that were
// never written, malformed and overlong names, unknown, interaction and failed jobs, query
// strings, methods other than GET/HEAD): always 404 (or 405 with `Allow: GET, HEAD`) with an
// OperationOutcome, never job B's file; afterwards both jobs' files are intact.
#[tokio::test]
async fn bulk_13_file_route_path_tricks_never_serve_another_jobs_file() {
    async fn marked(uri: Uri) -> Response {
        // `/fhir/Group/{marker}/$export`: the marker is in every line.
        let marker = uri.path().split('/').nth(3).unwrap().to_owned();
        if marker == "broken" {
            return Response::builder().status(500).body(Body::empty()).unwrap();
        }
        ndjson(patients(3, &marker))
    }
    let routes = Router::new()
        .route("/fhir/Group/{id}/$export", get(marked))
        .route("/fhir/Patient", post(created));
    let server = start(routes, |b| b).await;
    let a_url = server.export("/Group/job-a/$export").await;
    let b_url = server.export("/Group/job-b-secret/$export").await;
    let f_url = server.export("/Group/broken/$export").await;
    let i_url = server
        .kick_off(
            Method::POST,
            "/Patient",
            &[("content-type", "application/fhir+json")],
            "{}",
        )
        .await;
    server.manifest(&a_url).await;
    server.manifest(&b_url).await;
    assert_eq!(
        server.finished(&f_url).await.status,
        StatusCode::INTERNAL_SERVER_ERROR
    );
    assert_eq!(server.finished(&i_url).await.status, StatusCode::OK);
    let a_file = server
        .client
        .get(&format!("{a_url}/file/Patient-1.ndjson"))
        .await;
    let b_file = server
        .client
        .get(&format!("{b_url}/file/Patient-1.ndjson"))
        .await;
    assert_eq!(a_file.status, StatusCode::OK);
    assert_eq!(b_file.status, StatusCode::OK);
    assert!(String::from_utf8_lossy(&b_file.body).contains("job-b-secret"));

    let prefix = format!("{}/_async/", server.base);
    let a = job_id(&a_url).to_owned();
    let b = job_id(&b_url).to_owned();
    let f = job_id(&f_url);
    let i = job_id(&i_url);
    let unknown = "0123456789abcdef0123456789abcdef";
    let b_upper = b.to_ascii_uppercase();
    let long_type = "A".repeat(70);
    let long_number = "1".repeat(20);
    let huge = "x".repeat(8000);
    use Expect::{NotAllowed, NotFound, OwnFile};
    let get = Method::GET;
    let rows: Vec<(Method, String, Expect)> = vec![
        (
            get.clone(),
            format!("{a}/file/../../_async/{b}/file/Patient-1.ndjson"),
            NotFound,
        ),
        (
            get.clone(),
            format!("{a}/file/..%2F..%2F{b}%2Ffile%2FPatient-1.ndjson"),
            NotFound,
        ),
        (
            get.clone(),
            format!("{a}/file/%2e%2e/%2e%2e/{b}/file/Patient-1.ndjson"),
            NotFound,
        ),
        (
            get.clone(),
            format!("{a}/file/%2E%2E%2F%2E%2E%2F{b}%2Ffile%2FPatient-1.ndjson"),
            NotFound,
        ),
        (
            get.clone(),
            format!("{a}/file/Patient-1.ndjson%2F..%2F..%2F{b}%2FPatient-1.ndjson"),
            NotFound,
        ),
        (
            get.clone(),
            format!("{a}/file/Patient-1.ndjson/../../../{b}/file/Patient-1.ndjson"),
            NotFound,
        ),
        (
            get.clone(),
            format!("{a}/file/{b}/Patient-1.ndjson"),
            NotFound,
        ),
        (
            get.clone(),
            format!("{a}/file/..%2F{b}%2FPatient-1.ndjson"),
            NotFound,
        ),
        (
            get.clone(),
            format!("{a}/file/fhir-async/{b}/Patient-1.ndjson"),
            NotFound,
        ),
        (
            get.clone(),
            format!("{a}/file/%2Ffhir-async%2F{b}%2FPatient-1.ndjson"),
            NotFound,
        ),
        (
            get.clone(),
            format!("{a}/../{b}/file/Patient-1.ndjson"),
            NotFound,
        ),
        (
            get.clone(),
            format!("{a}%2F..%2F{b}/file/Patient-1.ndjson"),
            NotFound,
        ),
        (get.clone(), format!("{a}//file/Patient-1.ndjson"), NotFound),
        (get.clone(), format!("{a}/file//Patient-1.ndjson"), NotFound),
        (get.clone(), format!("/{a}/file/Patient-1.ndjson"), NotFound),
        (get.clone(), format!("{a}/file/Patient-1.ndjson/"), NotFound),
        (
            get.clone(),
            format!("{a}/./file/Patient-1.ndjson"),
            NotFound,
        ),
        (
            get.clone(),
            format!("{a}/file/./Patient-1.ndjson"),
            NotFound,
        ),
        (
            get.clone(),
            format!("{a}%2Ffile%2FPatient-1.ndjson"),
            NotFound,
        ),
        (
            get.clone(),
            format!("{a}/file%2FPatient-1.ndjson"),
            NotFound,
        ),
        (
            get.clone(),
            format!("{b_upper}/file/Patient-1.ndjson"),
            NotFound,
        ),
        (
            get.clone(),
            format!("{a}{b}/file/Patient-1.ndjson"),
            NotFound,
        ),
        (
            get.clone(),
            format!("{}/file/Patient-1.ndjson", &b[..31]),
            NotFound,
        ),
        (
            get.clone(),
            format!("{unknown}/file/Patient-1.ndjson"),
            NotFound,
        ),
        (get.clone(), format!("{i}/file/Patient-1.ndjson"), NotFound),
        (get.clone(), format!("{f}/file/Patient-1.ndjson"), NotFound),
        (
            get.clone(),
            format!("{a}/file/Observation-1.ndjson"),
            NotFound,
        ),
        (get.clone(), format!("{a}/file/Patient-2.ndjson"), NotFound),
        (get.clone(), format!("{a}/file/errors-1.ndjson"), NotFound),
        (get.clone(), format!("{a}/file/Patient-0.ndjson"), NotFound),
        (get.clone(), format!("{a}/file/Patient-01.ndjson"), NotFound),
        (get.clone(), format!("{a}/file/patient-1.ndjson"), NotFound),
        (get.clone(), format!("{a}/file/Patient-1.NDJSON"), NotFound),
        (get.clone(), format!("{a}/file/Patient-1.json"), NotFound),
        (
            get.clone(),
            format!("{a}/file/Patient-1.ndjson%00"),
            NotFound,
        ),
        (
            get.clone(),
            format!("{a}/file/Patient-1.ndjson%00.png"),
            NotFound,
        ),
        (
            get.clone(),
            format!("{a}/file/Patient%2D1.ndjson"),
            NotFound,
        ),
        (
            get.clone(),
            format!("{a}/file/Patient-1.ndjson;{b}"),
            NotFound,
        ),
        (
            get.clone(),
            format!("{a}/file/Patient-1.ndjson.."),
            NotFound,
        ),
        (get.clone(), format!("{a}/file/.ndjson"), NotFound),
        (get.clone(), format!("{a}/file/-1.ndjson"), NotFound),
        (get.clone(), format!("{a}/file/"), NotFound),
        (get.clone(), format!("{a}/file"), NotFound),
        (get.clone(), format!("{a}/files/Patient-1.ndjson"), NotFound),
        (
            get.clone(),
            format!("{a}/file/{long_type}-1.ndjson"),
            NotFound,
        ),
        (
            get.clone(),
            format!("{a}/file/Patient-{long_number}.ndjson"),
            NotFound,
        ),
        (get.clone(), format!("{a}/file/{huge}"), NotFound),
        (
            get.clone(),
            format!("{a}/file/?../../{b}/file/Patient-1.ndjson"),
            NotFound,
        ),
        (
            get.clone(),
            format!("{a}/file/Patient-1.ndjson?name=../../{b}/file/Patient-1.ndjson"),
            OwnFile,
        ),
        (get.clone(), format!("{a}/file/Patient-1.ndjson?"), OwnFile),
        (
            Method::OPTIONS,
            format!("{a}/file/Patient-1.ndjson"),
            NotAllowed,
        ),
        (
            Method::DELETE,
            format!("{a}/file/Patient-1.ndjson"),
            NotAllowed,
        ),
        (
            Method::POST,
            format!("{a}/file/Patient-1.ndjson"),
            NotAllowed,
        ),
        (
            Method::PUT,
            format!("{a}/file/Patient-1.ndjson"),
            NotAllowed,
        ),
        (
            Method::PATCH,
            format!("{a}/file/Patient-1.ndjson"),
            NotAllowed,
        ),
        (
            Method::DELETE,
            format!("{a}/file/../../{b}/file/Patient-1.ndjson"),
            NotAllowed,
        ),
    ];
    let mut failures = Vec::new();
    for (method, path, expect) in &rows {
        let url = format!("{prefix}{path}");
        let shown: String = url.chars().take(160).collect();
        let reply = server.client.send(method.clone(), &url, &[], "").await;
        if String::from_utf8_lossy(&reply.body).contains("job-b-secret") {
            failures.push(format!("{method} {shown}: served job B's data: {reply:?}"));
            continue;
        }
        let outcome = || -> Result<(), String> {
            let want = match expect {
                OwnFile => {
                    if reply.status != StatusCode::OK || reply.body != a_file.body {
                        return Err(format!("expected job A's file, got {reply:?}"));
                    }
                    return Ok(());
                }
                NotFound => (StatusCode::NOT_FOUND, "not-found"),
                NotAllowed => (StatusCode::METHOD_NOT_ALLOWED, "not-supported"),
            };
            if reply.status != want.0 {
                return Err(format!("expected {}, got {reply:?}", want.0));
            }
            if *expect == NotAllowed
                && reply.headers.get("allow").and_then(|v| v.to_str().ok()) != Some("GET, HEAD")
            {
                return Err(format!("no `Allow: GET, HEAD`: {reply:?}"));
            }
            let is_outcome = reply
                .headers
                .get("content-type")
                .and_then(|v| v.to_str().ok())
                == Some("application/fhir+json")
                && serde_json::from_slice::<Value>(&reply.body).is_ok_and(|o| {
                    o["resourceType"] == "OperationOutcome" && o["issue"][0]["code"] == want.1
                });
            if !is_outcome {
                return Err(format!("no OperationOutcome `{}`: {reply:?}", want.1));
            }
            Ok(())
        };
        if let Err(why) = outcome() {
            failures.push(format!("{method} {shown}: {why}"));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} rows failed:\n{}",
        failures.len(),
        rows.len(),
        failures.join("\n")
    );

    // Nothing above changed anything: both jobs' files are served as before.
    let a_again = server
        .client
        .get(&format!("{a_url}/file/Patient-1.ndjson"))
        .await;
    let b_again = server
        .client
        .get(&format!("{b_url}/file/Patient-1.ndjson"))
        .await;
    assert_eq!(
        (a_again.status, a_again.body),
        (StatusCode::OK, a_file.body)
    );
    assert_eq!(
        (b_again.status, b_again.body),
        (StatusCode::OK, b_file.body)
    );
}

// ---------------------------------------------------------------------------------------------
// 10. File sizes.

// BULK-3: `_maximumFileSize` splits files so none exceeds it (every line here has the same
// length, so a file holds `limit / line` of them); it never raises the server's own
// `max_file_size`; the wrapped service never sees it; `_minimumFileSize` below it is accepted.
#[tokio::test]
async fn bulk_3_maximum_file_size_splits_files() {
    let routes = Router::new().route(
        "/fhir/$export",
        get(|| async { ndjson(patients(40, "sized")) }),
    );
    let server = start(routes, |b| b.max_file_size(300)).await;
    let line = patients(1, "sized").len();
    for (target, limit) in [
        ("/$export?_maximumFileSize=200&_minimumFileSize=38", 200),
        ("/$export?_maximumFileSize=100000", 300),
        ("/$export", 300),
    ] {
        let status_url = server.export(target).await;
        let manifest = server.manifest(&status_url).await;
        let output = fetch(&server.client, &manifest, "output").await;
        assert_eq!(
            output.len(),
            40usize.div_ceil(limit / line),
            "{target}: {manifest}"
        );
        assert!(
            output.iter().all(|f| f.bytes.len() <= limit),
            "{target}: a file over {limit} bytes"
        );
        assert_eq!(
            ids(&lines_by_type(&output)["Patient"]),
            ids(&patients(40, "sized")
                .lines()
                .map(str::to_owned)
                .collect::<Vec<_>>()),
            "{target}"
        );
        for seen in server.seen.take() {
            assert!(
                !seen.target().contains("FileSize"),
                "{target}: inner saw {}",
                seen.target()
            );
        }
    }
}

// BULK-3, KICK-5: a file size that is not a positive whole number, a maximum not above the
// minimum, or a size given twice is refused at kick-off with `400` + `invalid`; no job is made.
#[tokio::test]
async fn bulk_3_invalid_file_sizes_are_refused() {
    let server = start(fhir_routes(), |b| b).await;
    let queries = [
        "_maximumFileSize=0",
        "_maximumFileSize=-1",
        "_maximumFileSize=abc",
        "_maximumFileSize=1.5",
        "_maximumFileSize=",
        "_maximumFileSize=100&_minimumFileSize=100",
        "_maximumFileSize=100&_minimumFileSize=200",
        "_maximumFileSize=100&_maximumFileSize=200",
        "_minimumFileSize=0",
        "_minimumFileSize=-5",
    ];
    for query in queries {
        for target in [
            format!("/$export?{query}"),
            format!("/Observation?_outputFormat=ndjson&{query}"),
        ] {
            let reply = server.send(Method::GET, &target, &[], "").await;
            assert_eq!(reply.status, StatusCode::BAD_REQUEST, "{target}: {reply:?}");
            reply.assert_outcome("invalid");
        }
    }
    for value in [
        r#""valueInteger":0"#,
        r#""valueString":"big""#,
        r#""valueDecimal":1.5"#,
    ] {
        let body = format!(
            r#"{{"resourceType":"Parameters","parameter":[{{"name":"_maximumFileSize",{value}}}]}}"#
        );
        let reply = server
            .send(
                Method::POST,
                "/$export",
                &[("content-type", "application/json")],
                &body,
            )
            .await;
        assert_eq!(reply.status, StatusCode::BAD_REQUEST, "{body}: {reply:?}");
        reply.assert_outcome("invalid");
    }
    assert_eq!(server.jobs.len(), 0);
    assert!(server.seen.take().is_empty());
}

// ---------------------------------------------------------------------------------------------
// 11. Files bound to the caller.

// BULK-14, SEC-3, SEC-10: with caller binding and `requiresAccessToken` true (the default), only
// the kick-off's caller gets the status and the files; another caller, or none, gets 404 + OO.
// With `requires_access_token(false)` the file URLs are capability URLs: anyone holding one gets
// the file (the status stays bound), and the manifest says `requiresAccessToken: false`.
// Another caller's DELETE is refused the same way and removes nothing (CANCEL-7).
#[tokio::test]
async fn bulk_14_files_bound_to_the_caller_unless_capability_urls() {
    let caller = HeaderName::from_static("x-caller");
    let alice = [("x-caller", "alice")];
    let bob = [("x-caller", "bob")];
    for requires_token in [true, false] {
        let caller = caller.clone();
        let server = start(fhir_routes(), move |b| {
            b.caller_from_header(caller)
                .requires_access_token(requires_token)
        })
        .await;
        let status_url = server.kick_off(Method::GET, "/$export", &alice, "").await;
        let done = server.finished_with(&status_url, &alice).await;
        let manifest = manifest_of(&done, &status_url);
        assert_eq!(manifest["requiresAccessToken"], requires_token);
        assert_not_found(
            &server.client.send(Method::GET, &status_url, &bob, "").await,
            "another caller's status",
        );
        let refused = server
            .client
            .send(Method::DELETE, &status_url, &bob, "")
            .await;
        assert_not_found(&refused, "another caller's DELETE");
        for item in items(&manifest, "output") {
            let url = item["url"].as_str().unwrap();
            let own = server.client.send(Method::GET, url, &alice, "").await;
            assert_eq!(own.status, StatusCode::OK, "{url}: {own:?}");
            for (who, headers) in [("bob", &bob[..]), ("nobody", &[][..])] {
                let reply = server.client.send(Method::GET, url, headers, "").await;
                if requires_token {
                    assert_not_found(&reply, &format!("{who} asking for alice's file"));
                } else {
                    assert_eq!(
                        reply.status,
                        StatusCode::OK,
                        "{who}: capability URL: {reply:?}"
                    );
                    assert_eq!(reply.body, own.body, "{who}");
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// 12. The manifest.

// BULK-8, BULK-9, EXPIRE-2 (interop.md "Completion"): the completed status is `200`,
// `Content-Type: application/json`, `Expires` an HTTP date after completion (about the
// retention ahead), `Cache-Control: no-store`; the manifest has `transactionTime` (an instant
// from when the export ran), `request`, `requiresAccessToken`, `output` and `error`, no
// `resourceType`.
#[tokio::test]
async fn bulk_8_bulk_9_manifest_headers_and_fields() {
    let server = start(fhir_routes(), |b| {
        b.retention(Duration::from_secs(2 * 3600))
    })
    .await;
    let before = SystemTime::now() - Duration::from_secs(1);
    let status_url = server.export("/$export?_type=Patient").await;
    let done = server.finished(&status_url).await;
    let after = SystemTime::now() + Duration::from_secs(1);
    let manifest = manifest_of(&done, &status_url);
    assert!(done.header("cache-control").contains("no-store"));
    let expires =
        httpdate::parse_http_date(done.header("expires")).expect("Expires is an HTTP date");
    assert!(
        expires > before + Duration::from_secs(3600)
            && expires < after + Duration::from_secs(2 * 3600),
        "Expires {:?} is about two hours ahead",
        done.header("expires")
    );
    let time = humantime::parse_rfc3339(
        manifest["transactionTime"]
            .as_str()
            .expect("transactionTime"),
    )
    .expect("transactionTime is an instant");
    assert!(time >= before && time <= after, "{manifest}");
    assert_eq!(
        manifest["request"],
        format!("{}/$export?_type=Patient", server.base)
    );
    assert_eq!(manifest["requiresAccessToken"], true);
    assert_eq!(manifest["error"], json!([]));
    let mut keys: Vec<&str> = manifest
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    keys.sort_unstable();
    assert_eq!(
        keys,
        [
            "error",
            "output",
            "request",
            "requiresAccessToken",
            "transactionTime"
        ]
    );
    for item in items(&manifest, "output") {
        assert!(item["count"].is_u64(), "{item}");
    }
    // STATUS-14: the manifest can be fetched again, unchanged.
    let again = server.client.get(&status_url).await;
    assert_eq!(again.body, done.body);
}

// BULK-9 (BD4 `BulkDataManifest`): with `ManifestFormat::Stu4Ballot`, the manifest has
// `manifestType`, `outputFormat`, `output[].fileSize` equal to each file's bytes, and `outcome[]`
// with `count`, `fileSize` and `countSeverity` instead of `error[]`; no `request`.
#[tokio::test]
async fn bulk_9_stu4_ballot_manifest() {
    async fn export() -> Response {
        ndjson(concat!(
            "{\"resourceType\":\"OperationOutcome\",\"issue\":[{\"severity\":\"warning\",\"code\":\"informational\"}]}\n",
            "{\"resourceType\":\"Patient\",\"id\":\"p1\"}\n",
            "not a resource\n",
            "{\"resourceType\":\"Patient\",\"id\":\"p2\"}\n",
        ))
    }
    let routes = Router::new().route("/fhir/$export", get(export));
    let server = start(routes, |b| b.manifest_format(ManifestFormat::Stu4Ballot)).await;
    let status_url = server.export("/$export").await;
    let manifest = server.manifest(&status_url).await;
    assert_eq!(
        manifest["manifestType"],
        "http://hl7.org/fhir/uv/bulkdata/StructureDefinition/BulkDataManifest"
    );
    assert_eq!(manifest["outputFormat"], NDJSON);
    assert_eq!(manifest["requiresAccessToken"], true);
    assert!(manifest["transactionTime"].is_string());
    assert!(manifest.get("request").is_none(), "{manifest}");
    assert!(manifest.get("error").is_none(), "{manifest}");
    let output = fetch(&server.client, &manifest, "output").await;
    assert_eq!(output.len(), 1);
    assert_eq!(manifest["output"][0]["fileSize"], output[0].bytes.len());

    let outcome = items(&manifest, "outcome");
    assert_eq!(outcome.len(), 1, "{manifest}");
    let url = outcome[0]["url"].as_str().unwrap();
    assert!(url.starts_with(&format!("{status_url}/file/")), "{url}");
    let file = server.client.get(url).await;
    assert_eq!(file.status, StatusCode::OK);
    assert_eq!(outcome[0]["count"], 2);
    assert_eq!(outcome[0]["fileSize"], file.body.len());
    let mut severities: Vec<(String, u64)> = items(&outcome[0], "countSeverity")
        .iter()
        .map(|s| {
            (
                s["code"].as_str().unwrap().to_owned(),
                s["count"].as_u64().unwrap(),
            )
        })
        .collect();
    severities.sort();
    assert_eq!(
        severities,
        [("error".to_owned(), 1), ("warning".to_owned(), 1)]
    );
}

// ---------------------------------------------------------------------------------------------
// Issue #11 item 10: bulk-data conformance at kick-off.

// BULK-1 (issue #11 item 10a): `$export` without `Prefer: respond-async` is never streamed back
// synchronously: by default it is processed as if `respond-async` had been sent.
#[tokio::test]
async fn bulk_1_export_without_prefer_runs_asynchronously_by_default() {
    let server = start(fhir_routes(), |b| b).await;
    for target in ["/$export", "/Patient/$export", "/Group/g1/$export"] {
        let reply = server
            .client
            .send(Method::GET, &format!("{}{target}", server.base), &[], "")
            .await;
        assert_eq!(reply.status, StatusCode::ACCEPTED, "{target}: {reply:?}");
        let status_url = reply.header("content-location").to_owned();
        assert!(
            status_url.starts_with(&format!("{}/_async/", server.base)),
            "{target}: {reply:?}"
        );
        let manifest = server.manifest(&status_url).await;
        assert!(
            manifest["output"].as_array().is_some_and(|o| !o.is_empty()),
            "{target}: {manifest}"
        );
    }
    // The wrapped service saw each export once, without `respond-async`.
    let seen = server.seen.take();
    assert_eq!(seen.len(), 3, "{seen:?}");
    assert!(
        seen.iter().all(|s| s.header("prefer").is_none()),
        "{seen:?}"
    );
}

// BULK-1 (issue #11 item 10a): set to refuse, `$export` without `Prefer: respond-async` gets
// `400` + OperationOutcome, and the wrapped service sees nothing.
#[tokio::test]
async fn bulk_1_export_without_prefer_can_be_refused() {
    let server = start(fhir_routes(), |b| {
        b.bulk_without_prefer(BulkWithoutPrefer::Refuse)
    })
    .await;
    for method in [Method::GET, Method::POST] {
        let reply = server
            .client
            .send(
                method.clone(),
                &format!("{}/Patient/$export", server.base),
                &[],
                "",
            )
            .await;
        assert_eq!(reply.status, StatusCode::BAD_REQUEST, "{method}: {reply:?}");
        reply.assert_outcome("invalid");
        assert!(
            String::from_utf8_lossy(&reply.body).contains("Prefer: respond-async"),
            "the outcome says what to send: {reply:?}"
        );
    }
    assert!(server.seen.take().is_empty());
    assert_eq!(server.jobs.len(), 0, "a refused kick-off keeps no job");
    // With the preference, the same export is accepted.
    let status_url = server.export("/Patient/$export").await;
    server.manifest(&status_url).await;
}

// KICK-5, BULK-6 (issue #11 item 10b): a client error the wrapped service reports at once (an
// unknown Group, a forbidden one) is the kick-off's own answer — its status and
// OperationOutcome — and no job is kept; other answers still give `202`.
#[tokio::test]
async fn kick_5_client_errors_reported_at_once_answer_the_kick_off() {
    // A long wait, so that "at once" holds on a loaded machine; the default is 50 ms.
    let server = start(
        Router::new().route("/fhir/Group/{case}/$export", get(failure)),
        |b| b.kickoff_wait(BOUND),
    )
    .await;
    for (case, status) in [
        ("forbidden", StatusCode::FORBIDDEN),
        ("missing", StatusCode::NOT_FOUND),
    ] {
        let reply = server
            .send(Method::GET, &format!("/Group/{case}/$export"), &[], "")
            .await;
        assert_eq!(reply.status, status, "{case}: {reply:?}");
        assert!(reply.headers.get("content-location").is_none(), "{reply:?}");
        let outcome = reply.json();
        assert_eq!(
            outcome["resourceType"], "OperationOutcome",
            "{case}: {outcome}"
        );
        assert_eq!(server.jobs.len(), 0, "{case}: no job is kept");
    }
    assert_eq!(
        server.seen.take().len(),
        2,
        "each kick-off reached the service once"
    );
    // A server error, or a success, is the job's: 202, and the status URL reports it.
    for (case, status) in [
        ("crash", StatusCode::INTERNAL_SERVER_ERROR),
        ("csv", StatusCode::BAD_GATEWAY),
    ] {
        let status_url = server.export(&format!("/Group/{case}/$export")).await;
        let reply = server.finished(&status_url).await;
        assert_eq!(reply.status, status, "{case}: {reply:?}");
    }
}

// KICK-5 (issue #11 item 10b): a client error that comes after the kick-off's wait is the
// job's, reported at the status URL as before.
#[tokio::test]
async fn kick_5_a_late_client_error_is_the_jobs() {
    let release = Arc::new(Notify::new());
    let held = release.clone();
    let routes = Router::new().route(
        "/fhir/$export",
        get(move || {
            let held = held.clone();
            async move {
                held.notified().await;
                failure(axum::extract::Path("missing".to_owned())).await
            }
        }),
    );
    let server = start(routes, |b| b.kickoff_wait(Duration::from_millis(20))).await;
    // Released only after the 202: the answer cannot have come within the wait.
    let status_url = server.export("/$export").await;
    release.notify_one();
    let reply = server.finished(&status_url).await;
    assert_eq!(reply.status, StatusCode::NOT_FOUND, "{reply:?}");
}
