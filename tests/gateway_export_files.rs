//! Issue #13 item 5 (GATEWAY-5): an export the upstream runs itself, behind a gateway set to
//! link its files (`UpstreamFiles::Link`) rather than copy them. The job's manifest is the
//! upstream's own, on the gateway's public base; the files are fetched through the gateway from
//! the upstream, with the caller's credentials; the gateway's file store stays empty; a `DELETE`
//! of the job deletes the upstream's job; the job's result expires no later than the upstream's.
//!
//! The demo server is the upstream in the first tests (run as a separate process, its own port
//! and base path `/fhir`, the same status path `/_async` as the gateway's), a small upstream
//! written here in the others. `cargo test` builds the demo first; `cargo test --test
//! gateway_export_files` alone does not, so run `cargo build --example server` before it.

#[path = "support/demo.rs"]
mod demo;
mod support;

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use demo::Demo;
use futures_util::TryStreamExt;
use http::header::HeaderValue;
use http::{Method, StatusCode};
use serde_json::{Value, json};
use support::TestClient;
use tower_fhir_async::UpstreamFiles;
use tower_fhir_async::object_store::ObjectStore;
use tower_fhir_async::object_store::memory::InMemory;

/// The lines of every file of a completed export's manifest, sorted; each file fetched with
/// `headers`.
async fn exported(client: &TestClient, manifest: &Value) -> BTreeSet<String> {
    assert_eq!(manifest["error"], json!([]), "{manifest}");
    let mut lines = BTreeSet::new();
    for file in manifest["output"].as_array().expect("output") {
        let reply = client.get(file["url"].as_str().expect("url")).await;
        assert_eq!(reply.status, StatusCode::OK, "{reply:?}");
        lines.extend(
            String::from_utf8(reply.body.to_vec())
                .unwrap()
                .lines()
                .map(str::to_owned),
        );
    }
    lines
}

/// Kicks off the export `query` under `base` and polls it to its end; its status URL and its
/// completion.
async fn export(
    client: &TestClient,
    base: &str,
    query: &str,
    demo: &Demo,
) -> (String, support::Reply) {
    let status = client
        .kick_off(Method::GET, &format!("{base}/{query}"), &[], "")
        .await;
    assert!(status.starts_with(base), "{status}");
    let done = client.poll_until_done(&status, 2000).await;
    assert_eq!(done.status, StatusCode::OK, "{done:?}\n{}", demo.log_tail());
    (status, done)
}

/// The demo's own status URL of the job whose file a linked manifest lists first: the file URL
/// is `{public}/_async/{id}/file/{name}` on the gateway, the job's `{demo}/_async/{id}`.
fn demo_status(manifest: &Value, public: &str, demo: &Demo) -> String {
    let url = manifest["output"][0]["url"].as_str().expect("a file URL");
    let below = url
        .strip_prefix(public)
        .and_then(|rest| rest.split("/file/").next())
        .unwrap_or_else(|| panic!("{url} is not a file URL on {public}"));
    format!("{}{below}", demo.base)
}

/// Every object in `files`.
async fn objects(files: &InMemory) -> Vec<String> {
    files
        .list(None)
        .map_ok(|meta| meta.location.to_string())
        .try_collect()
        .await
        .expect("the in-memory store lists")
}

fn http_date(reply: &support::Reply, name: &str) -> std::time::SystemTime {
    httpdate::parse_http_date(reply.header(name)).expect("an HTTP date")
}

// GATEWAY-5, BULK-8, BULK-13, EXPIRE-2: with `UpstreamFiles::Link`, the demo's own `$export`
// through the gateway completes with the demo's manifest, byte for byte but for the base (every
// file on the gateway's public base, none on the demo's); its files, fetched through the gateway
// from the demo, hold exactly what the demo's own export holds; the gateway's file store stays
// empty (where a gateway that copies holds the files); the manifest expires no later than the
// demo's, though the gateway keeps results twice as long.
#[tokio::test]
async fn gateway_5_a_linked_export_lists_the_upstreams_files_through_the_gateway() {
    let demo = Demo::start(&["--patients", "40", "--min-poll-interval", "off"]);
    let linked_files = Arc::new(InMemory::new());
    let public = support::gateway::start_with(&demo.base, "/api", |layer| {
        layer
            .upstream_export_files(UpstreamFiles::Link)
            .file_store(linked_files.clone())
            .retention(Duration::from_secs(48 * 3600))
    })
    .await;
    let copied_files = Arc::new(InMemory::new());
    let copying = support::gateway::start_with(&demo.base, "/api", |layer| {
        layer.file_store(copied_files.clone())
    })
    .await;
    let client = TestClient::default();
    let query = "Patient/$export?_type=Patient";

    let (_, direct) = export(&client, &demo.base, query, &demo).await;
    let direct = exported(&client, &direct.json()).await;
    assert_eq!(direct.len(), 40, "the demo's own export");

    let (_, done) = export(&client, &public, query, &demo).await;
    let manifest = done.json();
    let text = String::from_utf8(done.body.to_vec()).unwrap();
    assert!(
        !text.contains(&demo.base),
        "the demo's address leaked: {text}"
    );
    let files = manifest["output"].as_array().expect("output files");
    assert!(!files.is_empty(), "{manifest}");
    for file in files {
        let url = file["url"].as_str().expect("a file URL");
        assert!(url.starts_with(&format!("{public}/")), "{manifest}");
    }
    // The demo's manifest of the job the gateway followed, as the demo serves it.
    let upstream_status = demo_status(&manifest, &public, &demo);
    let upstream = client.get(&upstream_status).await;
    assert_eq!(upstream.status, StatusCode::OK, "{upstream:?}");
    let upstream_text = String::from_utf8(upstream.body.to_vec()).unwrap();
    assert_eq!(
        text,
        upstream_text.replace(&demo.base, &public),
        "the demo's manifest, byte for byte but for the base"
    );
    // Fetched through the gateway, from the demo.
    let through = exported(&client, &manifest).await;
    assert_eq!(through, direct, "the same resources, byte for byte");
    assert_eq!(
        objects(&linked_files).await,
        Vec::<String>::new(),
        "nothing copied"
    );
    // EXPIRE-2: no longer than the demo keeps its files (the gateway would keep it 48 h).
    assert!(
        http_date(&done, "expires") <= http_date(&upstream, "expires"),
        "the gateway's manifest expires {} and the demo's {}",
        done.header("expires"),
        upstream.header("expires")
    );

    // The default copies: the same export fills the copying gateway's file store, and its
    // manifest lists its own files.
    let (copied_status, copied) = export(&client, &copying, query, &demo).await;
    let copied = copied.json();
    assert!(
        copied["output"][0]["url"]
            .as_str()
            .is_some_and(|url| url.starts_with(&format!("{copied_status}/file/"))),
        "{copied}"
    );
    assert!(!objects(&copied_files).await.is_empty(), "copied files");
    assert_eq!(exported(&client, &copied).await, direct);
}

// CANCEL-5, GATEWAY-5: a `DELETE` of a completed linked export is `202`, and the demo's job is
// deleted too, so its files are released: the demo's status URL answers `404`, and so does a
// file URL of the manifest (through the gateway, from the demo).
#[tokio::test]
async fn cancel_5_deleting_a_linked_export_deletes_the_upstreams_job() {
    let demo = Demo::start(&["--patients", "10", "--min-poll-interval", "off"]);
    let public = support::gateway::start_with(&demo.base, "/api", |layer| {
        layer.upstream_export_files(UpstreamFiles::Link)
    })
    .await;
    let client = TestClient::default();
    let (status, done) = export(&client, &public, "Patient/$export?_type=Patient", &demo).await;
    let manifest = done.json();
    let file = manifest["output"][0]["url"].as_str().expect("a file URL");
    assert_eq!(client.get(file).await.status, StatusCode::OK);
    let upstream_status = demo_status(&manifest, &public, &demo);
    assert_eq!(client.get(&upstream_status).await.status, StatusCode::OK);

    let deleted = client.delete(&status).await;
    assert_eq!(deleted.status, StatusCode::ACCEPTED, "{deleted:?}");
    support::within("the demo's job is deleted", async {
        while client.get(&upstream_status).await.status != StatusCode::NOT_FOUND {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    support::assert_not_found(&client.get(&status).await, "the deleted job");
    assert_eq!(client.get(file).await.status, StatusCode::NOT_FOUND);
}

/// A job id of the upstream below, of the same form as the layer's own.
const UPSTREAM_JOB: &str = "00112233445566778899aabbccddeeff";

/// One request the upstream below saw: what it asked (method and path), and its
/// `Authorization`.
type Request = (String, Option<String>);

/// What the upstream below saw, in order.
#[derive(Clone, Default)]
struct Seen(Arc<Mutex<Vec<Request>>>);

impl Seen {
    fn push(&self, what: String, headers: &HeaderMap) {
        let authorization = headers
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        self.0.lock().unwrap().push((what, authorization));
    }

    fn all(&self) -> Vec<Request> {
        self.0.lock().unwrap().clone()
    }
}

#[derive(Clone)]
struct Exporting {
    /// `http://127.0.0.1:PORT/fhir/R4`, in every URL it writes.
    base: Arc<Mutex<String>>,
    /// Its manifest, `{base}` standing for its base.
    manifest: Arc<Value>,
    seen: Seen,
}

impl Exporting {
    fn base(&self) -> String {
        self.base.lock().unwrap().clone()
    }
}

/// `GET /fhir/R4/Patient/$export`: run asynchronously, `202` + `Content-Location` on its own
/// base, under the same status path as the gateway's.
async fn kick_off(State(up): State<Exporting>, headers: HeaderMap) -> Response {
    up.seen.push("GET /Patient/$export".into(), &headers);
    let mut response = StatusCode::ACCEPTED.into_response();
    let location = format!("{}/_async/{UPSTREAM_JOB}", up.base());
    response.headers_mut().insert(
        "content-location",
        HeaderValue::from_str(&location).unwrap(),
    );
    response
}

/// `GET /fhir/R4/_async/{job}`: done, its manifest (`404` once deleted).
async fn job_status(State(up): State<Exporting>, headers: HeaderMap) -> Response {
    up.seen.push("GET /_async/job".into(), &headers);
    if up
        .seen
        .all()
        .iter()
        .any(|(what, _)| what == "DELETE /_async/job")
    {
        return StatusCode::NOT_FOUND.into_response();
    }
    let manifest = up.manifest.to_string().replace("{base}", &up.base());
    let mut response = (
        StatusCode::OK,
        [("content-type", "application/json")],
        manifest,
    )
        .into_response();
    response.headers_mut().insert(
        "expires",
        HeaderValue::from_static("Fri, 01 Jan 2100 00:00:00 GMT"),
    );
    response
}

/// `DELETE /fhir/R4/_async/{job}`: the upstream's own delete.
async fn job_delete(State(up): State<Exporting>, headers: HeaderMap) -> Response {
    up.seen.push("DELETE /_async/job".into(), &headers);
    StatusCode::ACCEPTED.into_response()
}

/// `GET /fhir/R4/_async/{job}/file/Patient-1.ndjson`: its one file.
async fn job_file(State(up): State<Exporting>, headers: HeaderMap) -> Response {
    up.seen.push("GET /_async/job/file".into(), &headers);
    (
        StatusCode::OK,
        [("content-type", "application/fhir+ndjson")],
        "{\"resourceType\":\"Patient\",\"id\":\"p1\"}\n",
    )
        .into_response()
}

/// The upstream on a port of its own, exporting with `manifest`; its base.
async fn start_exporting(manifest: Value) -> (String, Seen) {
    let up = Exporting {
        base: Arc::default(),
        manifest: Arc::new(manifest),
        seen: Seen::default(),
    };
    let job = format!("/fhir/R4/_async/{UPSTREAM_JOB}");
    let app = Router::new()
        .route("/fhir/R4/Patient/$export", get(kick_off))
        .route(&job, get(job_status).delete(job_delete))
        .route(&format!("{job}/file/Patient-1.ndjson"), get(job_file))
        .with_state(up.clone());
    let addr = support::serve(app).await;
    let base = format!("http://{addr}/fhir/R4");
    *up.base.lock().unwrap() = base.clone();
    (base, up.seen)
}

/// A manifest of one file on the upstream and one on an object store's host.
fn manifest() -> Value {
    json!({
        "transactionTime": "2026-03-02T08:59:58.123Z",
        "request": "{base}/Patient/$export",
        "requiresAccessToken": false,
        "output": [
            {"type": "Patient", "url": format!("{{base}}/_async/{UPSTREAM_JOB}/file/Patient-1.ndjson"), "count": 1},
            {"type": "Observation", "url": "https://bucket.files.example/o1.ndjson?X-Amz-Signature=abc", "count": 2}
        ],
        "error": []
    })
}

// BULK-13, BULK-14, GATEWAY-5, CANCEL-5: a linked manifest keeps what the upstream said
// (`requiresAccessToken: false`, a file on another host as it is); a file URL under the
// gateway's own route prefix (the upstream uses the same status path) reaches the upstream with
// the caller's `Authorization`, and its answer is the client's; the `DELETE` of the job reaches
// the upstream's job with the caller's `Authorization` too.
#[tokio::test]
async fn bulk_14_linked_files_are_fetched_through_the_gateway_as_the_caller() {
    let (upstream, seen) = start_exporting(manifest()).await;
    let public = support::gateway::start_with(&upstream, "/fhir", |layer| {
        layer.upstream_export_files(UpstreamFiles::Link)
    })
    .await;
    let client = TestClient::default();
    let caller = [("authorization", "Bearer caller-token")];
    let status = client
        .kick_off(
            Method::GET,
            &format!("{public}/Patient/$export"),
            &caller,
            "",
        )
        .await;
    let done = client.poll_until_done(&status, 1000).await;
    assert_eq!(done.status, StatusCode::OK, "{done:?}");
    assert_eq!(done.header("content-type"), "application/json");
    let expected = manifest().to_string().replace("{base}", &public);
    assert_eq!(
        String::from_utf8(done.body.to_vec()).unwrap(),
        expected,
        "the upstream's manifest, its base mapped, nothing else changed"
    );
    let file = format!("{public}/_async/{UPSTREAM_JOB}/file/Patient-1.ndjson");
    let reply = client.send(Method::GET, &file, &caller, "").await;
    assert_eq!(reply.status, StatusCode::OK, "{reply:?}");
    assert_eq!(reply.header("content-type"), "application/fhir+ndjson");
    assert_eq!(
        &reply.body[..],
        b"{\"resourceType\":\"Patient\",\"id\":\"p1\"}\n"
    );
    let fetched = seen
        .all()
        .into_iter()
        .find(|(what, _)| what == "GET /_async/job/file")
        .expect("the file request reached the upstream");
    assert_eq!(fetched.1.as_deref(), Some("Bearer caller-token"));

    let deleted = client
        .send(
            Method::DELETE,
            &status,
            &[("authorization", "Bearer deleter")],
            "",
        )
        .await;
    assert_eq!(deleted.status, StatusCode::ACCEPTED, "{deleted:?}");
    support::within("the upstream's job is deleted", async {
        while !seen
            .all()
            .iter()
            .any(|(what, _)| what == "DELETE /_async/job")
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    let delete = seen
        .all()
        .into_iter()
        .find(|(what, _)| what == "DELETE /_async/job")
        .unwrap();
    assert_eq!(delete.1.as_deref(), Some("Bearer deleter"));
    support::assert_not_found(&client.get(&status).await, "the deleted job");
}

// SEL-7, BULK-13: without `Link` (the default) the layer's route prefix stays its own: the same
// file URL is the layer's `404`, and never reaches the upstream.
#[tokio::test]
async fn sel_7_by_default_files_under_the_prefix_are_the_layers_own() {
    let (upstream, seen) = start_exporting(manifest()).await;
    let public = support::gateway::start(&upstream, "/fhir").await;
    let client = TestClient::default();
    let file = format!("{public}/_async/{UPSTREAM_JOB}/file/Patient-1.ndjson");
    let reply = client.get(&file).await;
    support::assert_not_found(&reply, "a file of no job of the layer's");
    assert!(seen.all().is_empty(), "{:?}", seen.all());
}

// BULK-6, BULK-8, BULK-9: an upstream whose export ends with something that is not a bulk data
// manifest (here without `requiresAccessToken`) fails the linked job: `502` and an
// OperationOutcome that says what is missing.
#[tokio::test]
async fn bulk_8_a_linked_export_without_a_manifest_fails_with_an_outcome() {
    let mut bad = manifest();
    bad.as_object_mut().unwrap().remove("requiresAccessToken");
    let (upstream, _) = start_exporting(bad).await;
    let public = support::gateway::start_with(&upstream, "/fhir", |layer| {
        layer.upstream_export_files(UpstreamFiles::Link)
    })
    .await;
    let client = TestClient::default();
    let status = client
        .kick_off(Method::GET, &format!("{public}/Patient/$export"), &[], "")
        .await;
    let done = client.poll_until_done(&status, 1000).await;
    assert_eq!(done.status, StatusCode::BAD_GATEWAY, "{done:?}");
    done.assert_outcome("processing");
    let diagnostics = done.json()["issue"][0]["diagnostics"].to_string();
    assert!(diagnostics.contains("requiresAccessToken"), "{diagnostics}");
}
