//! The harness of the bulk tests (`tests/bulk_*.rs`): a whole axum `Router` (the "FHIR server")
//! wrapped in the layer and served on a real socket, recording every request the wrapped service
//! sees, with an in-memory file store the test can list; the handlers of the routes a bulk-data
//! client meets; and checks of manifests and NDJSON files.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::{Reply, TestClient, fhir_json, job_id, serve_behind};
use axum::Router;
use axum::body::Body;
use axum::extract::State;
use axum::middleware::{self, Next};
use axum::response::Response;
use axum::routing::{get, post};
use bytes::Bytes;
use futures_util::TryStreamExt;
use http::{HeaderMap, Method, StatusCode, Uri};
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tower_fhir_async::object_store::ObjectStore;
use tower_fhir_async::object_store::memory::InMemory;
use tower_fhir_async::object_store::path::Path as StorePath;
use tower_fhir_async::{AsyncLayer, AsyncLayerBuilder, MemoryStore};

/// `Accept: application/fhir+json`, as bulk clients send at kick-off.
pub const FHIR_JSON_ACCEPT: (&str, &str) = ("accept", "application/fhir+json");

pub const NDJSON: &str = "application/fhir+ndjson";

/// Issue codes that tell a client to poll again (`transient` and its children, STATUS-11).
pub const TRANSIENT: [&str; 7] = [
    "transient",
    "lock-error",
    "no-store",
    "exception",
    "timeout",
    "incomplete",
    "throttled",
];

// ---------------------------------------------------------------------------------------------
// The server under test.

/// A request as the wrapped service saw it.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: Method,
    pub uri: Uri,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Seen {
    pub fn target(&self) -> &str {
        self.uri.path_and_query().map_or("", |p| p.as_str())
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

/// Every request that reached the wrapped service, in order.
#[derive(Clone, Default)]
pub struct Recorder(Arc<Mutex<Vec<Seen>>>);

impl Recorder {
    pub fn take(&self) -> Vec<Seen> {
        std::mem::take(&mut *self.0.lock().unwrap())
    }
}

pub async fn record(
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

pub struct Server {
    /// `http://127.0.0.1:{port}/fhir`
    pub base: String,
    pub client: TestClient,
    pub files: Arc<dyn ObjectStore>,
    pub jobs: MemoryStore,
    pub seen: Recorder,
    pub layer: AsyncLayer,
}

/// Serves `routes` behind the layer, configured by `configure` on top of: base path `/fhir`, an
/// in-memory file store the test can list.
pub async fn start(
    routes: Router,
    configure: impl FnOnce(AsyncLayerBuilder) -> AsyncLayerBuilder,
) -> Server {
    start_with_files(routes, Arc::new(InMemory::new()), configure).await
}

/// [`start`] with `files` as the file store.
pub async fn start_with_files(
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
    let addr = serve_behind(layer.clone(), inner).await;
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
    pub async fn send(
        &self,
        method: Method,
        target: &str,
        headers: &[(&str, &str)],
        body: &str,
    ) -> Reply {
        self.client
            .send_async(method, &format!("{}{target}", self.base), headers, body)
            .await
    }

    /// A kick-off that must be accepted (KICK-2, KICK-3): `202` + an absolute `Content-Location`
    /// `{base}/_async/{32 hex}`; returns it.
    pub async fn kick_off(
        &self,
        method: Method,
        target: &str,
        headers: &[(&str, &str)],
        body: &str,
    ) -> String {
        let location = self
            .client
            .kick_off(method, &format!("{}{target}", self.base), headers, body)
            .await;
        let id = location
            .strip_prefix(&format!("{}/_async/", self.base))
            .unwrap_or_else(|| panic!("{location} is not an absolute URL under {}", self.base));
        assert!(
            id.len() == 32 && id.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')),
            "{location}"
        );
        location
    }

    pub async fn export(&self, target: &str) -> String {
        self.kick_off(Method::GET, target, &[], "").await
    }

    /// Polls `status_url` (with `headers`) until it stops answering 202; at most 500 polls.
    pub async fn finished_with(&self, status_url: &str, headers: &[(&str, &str)]) -> Reply {
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

    pub async fn finished(&self, status_url: &str) -> Reply {
        self.finished_with(status_url, &[]).await
    }

    /// BULK-8: the completed job's manifest; `200`, `application/json`.
    pub async fn manifest(&self, status_url: &str) -> Value {
        let reply = self.finished(status_url).await;
        manifest_of(&reply, status_url)
    }

    /// The job's objects in the file store: name → size.
    pub async fn stored(&self, status_url: &str) -> BTreeMap<String, u64> {
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
    pub async fn wait_until_no_files(&self, status_url: &str, what: &str) {
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

/// Full paths and sizes of the objects in `files` under `dir` (everything for `None`).
pub async fn stored(files: &dyn ObjectStore, dir: Option<&str>) -> BTreeMap<String, u64> {
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
pub fn manifest_of(reply: &Reply, status_url: &str) -> Value {
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

pub fn items(manifest: &Value, key: &str) -> Vec<Value> {
    manifest
        .get(key)
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default()
}

/// One downloaded file.
#[derive(Debug)]
pub struct Fetched {
    pub name: String,
    pub kind: String,
    pub lines: Vec<String>,
    pub bytes: Bytes,
}

/// Downloads every file of `key` (`output` or `error`) the way clients do (no `Accept` at all),
/// and checks BULK-13 and the rules clients rely on: `200`, `application/fhir+ndjson`, one JSON
/// resource per line whose `resourceType` is the entry's `type`, `count` = lines.
pub async fn fetch(client: &TestClient, manifest: &Value, key: &str) -> Vec<Fetched> {
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
pub fn lines_by_type(files: &[Fetched]) -> BTreeMap<String, Vec<String>> {
    let mut by_type: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for file in files {
        by_type
            .entry(file.kind.clone())
            .or_default()
            .extend(file.lines.iter().cloned());
    }
    by_type
}

pub fn ids(lines: &[String]) -> Vec<String> {
    lines
        .iter()
        .map(|line| {
            let resource: Value = serde_json::from_str(line).expect("JSON");
            resource["id"].as_str().expect("id").to_owned()
        })
        .collect()
}

/// BULK-6: a failed export's OperationOutcome carries no code that tells a client to poll again.
pub fn assert_final_codes(outcome: &Value, what: &str) {
    for issue in outcome["issue"].as_array().expect("issues") {
        let code = issue["code"].as_str().expect("code");
        assert!(
            !TRANSIENT.contains(&code),
            "{what}: transient code {code} in {outcome}"
        );
    }
}

pub fn query_value(uri: &Uri, name: &str) -> Option<String> {
    form_urlencoded::parse(uri.query().unwrap_or_default().as_bytes())
        .find(|(key, _)| key == name)
        .map(|(_, value)| value.into_owned())
}

// ---------------------------------------------------------------------------------------------
// The wrapped FHIR server's handlers.

pub fn ndjson(body: impl Into<Body>) -> Response {
    Response::builder()
        .header("content-type", NDJSON)
        .body(body.into())
        .unwrap()
}

/// A streamed NDJSON body of `chunks`, as a real server's export would send it.
pub fn streamed(chunks: Vec<Bytes>) -> Body {
    Body::from_stream(futures_util::stream::iter(
        chunks.into_iter().map(Ok::<_, Infallible>),
    ))
}

/// An NDJSON body fed from a channel the test controls; dropping the body closes the channel.
pub fn channel_body(lines: mpsc::Receiver<Bytes>) -> Body {
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
pub async fn small_export() -> Response {
    ndjson(concat!(
        r#"{"resourceType":"Patient","id":"p1"}"#,
        "\n",
        r#"{"resourceType":"Observation","id":"o1","subject":{"reference":"Patient/p1"}}"#,
        "\n",
    ))
}

/// A one-page searchset of one Observation.
pub async fn one_page() -> Response {
    fhir_json(
        StatusCode::OK,
        &json!({
            "resourceType": "Bundle", "type": "searchset", "total": 1,
            "entry": [{"resource": {"resourceType": "Observation", "id": "o1"}, "search": {"mode": "match"}}],
        }),
    )
}

/// `$everything`: a searchset of a Patient and an Observation.
pub async fn everything() -> Response {
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
pub async fn created() -> Response {
    fhir_json(
        StatusCode::CREATED,
        &json!({"resourceType": "Patient", "id": "new"}),
    )
}

/// The routes a bulk-data client meets: `$export` at three levels, searches, `$everything`.
pub fn fhir_routes() -> Router {
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

/// `GET /fhir/Group/{case}/$export`: the ways a server refuses or fails an export's first request
/// (`forbidden`, `unavailable`, `busy`, `crash`, `missing`, `slow`; anything else answers CSV).
pub async fn failure(axum::extract::Path(case): axum::extract::Path<String>) -> Response {
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

/// `count` Patients, each line a short JSON resource.
pub fn patients(count: usize, marker: &str) -> String {
    (0..count)
        .map(|i| format!("{{\"resourceType\":\"Patient\",\"id\":\"{marker}-{i:05}\"}}\n"))
        .collect()
}
