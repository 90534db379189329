//! Issue #13 item 4 (GATEWAY-4): a job's answer is read as the JSON it is, whatever the client's
//! `Accept-Encoding` and whether the wrapped service compresses: the layer asks for `identity`,
//! and decodes `gzip`, `deflate` and `br` when the service compresses anyway. Over a real
//! socket, with a client that asks for gzip (as curl `--compressed`, Python requests and
//! browsers do).

#[path = "support/demo.rs"]
mod demo;
mod support;

use std::sync::{Arc, Mutex};

use async_compression::tokio::bufread::{BrotliEncoder, GzipEncoder, ZlibEncoder};
use axum::Router;
use axum::extract::Query;
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use http::{Method, StatusCode};
use serde_json::{Value, json};
use support::{TestClient, serve_behind};
use tokio::io::AsyncReadExt;
use tower_fhir_async::AsyncLayer;

/// What the wrapped service saw as `Accept-Encoding`, per request.
type Seen = Arc<Mutex<Vec<String>>>;

async fn encode(coding: &str, text: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    match coding {
        "gzip" => GzipEncoder::new(text).read_to_end(&mut out).await,
        "deflate" => ZlibEncoder::new(text).read_to_end(&mut out).await,
        "br" => BrotliEncoder::new(text).read_to_end(&mut out).await,
        other => panic!("no encoder for {other}"),
    }
    .expect("encoded");
    out
}

/// `body` encoded as `coding` (ignoring what the request asked for, as a misbehaving service or
/// proxy would), labelled FHIR JSON or NDJSON.
async fn compressed(coding: &str, content_type: &str, body: String) -> Response {
    let bytes = encode(coding, body.as_bytes()).await;
    (
        [("content-type", content_type), ("content-encoding", coding)],
        bytes,
    )
        .into_response()
}

/// A FHIR server that compresses every answer with the coding named by `?coding=`: a Patient
/// read, and an Observation search of two pages (the `next` link on the public base).
fn compressing_server(seen: Seen) -> Router {
    let (on_read, on_search) = (seen.clone(), seen);
    Router::new()
        .route(
            "/fhir/Patient/1",
            get(
                move |headers: HeaderMap, Query(query): Query<Vec<(String, String)>>| {
                    record(&on_read, &headers);
                    let coding = coding_of(&query);
                    async move {
                        let patient = json!({"resourceType": "Patient", "id": "1", "name": [{"family": "Zoë"}]});
                        compressed(&coding, "application/fhir+json", patient.to_string()).await
                    }
                },
            ),
        )
        .route(
            "/fhir/Observation",
            get(
                move |headers: HeaderMap, Query(query): Query<Vec<(String, String)>>| {
                    record(&on_search, &headers);
                    let coding = coding_of(&query);
                    let page: u32 = query
                        .iter()
                        .find(|(k, _)| k == "page")
                        .and_then(|(_, v)| v.parse().ok())
                        .unwrap_or(1);
                    let host = headers
                        .get("host")
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or_default()
                        .to_owned();
                    async move {
                        let mut bundle = json!({
                            "resourceType": "Bundle",
                            "type": "searchset",
                            "entry": [{"resource": {"resourceType": "Observation", "id": format!("o{page}")}}],
                        });
                        if page == 1 {
                            bundle["link"] = json!([{
                                "relation": "next",
                                "url": format!("http://{host}/fhir/Observation?coding={coding}&page=2"),
                            }]);
                        }
                        compressed(&coding, "application/fhir+json", bundle.to_string()).await
                    }
                },
            ),
        )
}

fn record(seen: &Seen, headers: &HeaderMap) {
    let value = headers
        .get("accept-encoding")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("(none)");
    seen.lock().unwrap().push(value.to_owned());
}

fn coding_of(query: &[(String, String)]) -> String {
    query
        .iter()
        .find(|(k, _)| k == "coding")
        .map_or_else(|| "gzip".to_owned(), |(_, v)| v.clone())
}

async fn start() -> (String, Seen) {
    let seen = Seen::default();
    let addr = serve_behind(
        AsyncLayer::builder(tower_fhir_async::MemoryStore::new()).build(),
        compressing_server(seen.clone()),
    )
    .await;
    (format!("http://{addr}/fhir"), seen)
}

const GZIP_CLIENT: (&str, &str) = ("accept-encoding", "gzip, deflate, br");

// GATEWAY-4, BUNDLE-1: an async read of a service that compresses (gzip, deflate, br) completes
// with a batch-response Bundle holding the Patient as JSON, not base64 of compressed bytes; the
// service was asked for `identity`, not for what the client accepts.
#[tokio::test]
async fn gateway_4_compressed_answers_become_json_in_the_bundle() {
    let (base, seen) = start().await;
    let client = TestClient::default();
    for coding in ["gzip", "deflate", "br"] {
        let status = client
            .kick_off(
                Method::GET,
                &format!("{base}/Patient/1?coding={coding}"),
                &[GZIP_CLIENT],
                "",
            )
            .await;
        let done = client.poll_until_done(&status, 500).await;
        assert_eq!(done.status, StatusCode::OK, "{coding}: {done:?}");
        let bundle = done.json();
        let entry = &bundle["entry"][0];
        assert_eq!(entry["response"]["status"], "200 OK", "{coding}: {bundle}");
        assert_eq!(
            entry["resource"],
            json!({"resourceType": "Patient", "id": "1", "name": [{"family": "Zoë"}]}),
            "{coding}: the resource is the decoded JSON"
        );
    }
    let seen = seen.lock().unwrap().clone();
    assert_eq!(
        seen,
        vec!["identity"; 3],
        "the service was asked for identity"
    );
}

// GATEWAY-4, BULK-6: a bulk export of a compressed, paged search exports both pages' resources;
// every page was asked for `identity`.
#[tokio::test]
async fn gateway_4_a_compressed_paged_search_exports_whole() {
    let (base, seen) = start().await;
    let client = TestClient::default();
    let status = client
        .kick_off(
            Method::GET,
            &format!("{base}/Observation?coding=br&_outputFormat=application/fhir%2Bndjson"),
            &[GZIP_CLIENT],
            "",
        )
        .await;
    let done = client.poll_until_done(&status, 500).await;
    assert_eq!(done.status, StatusCode::OK, "{done:?}");
    let manifest: Value = done.json();
    assert_eq!(manifest["error"], json!([]), "{manifest}");
    let output = manifest["output"].as_array().expect("output files");
    assert_eq!(output.len(), 1, "{manifest}");
    assert_eq!(output[0]["count"], 2, "both pages' resources: {manifest}");
    let file = client
        .get(output[0]["url"].as_str().expect("a file URL"))
        .await;
    assert_eq!(file.status, StatusCode::OK);
    let ids: Vec<String> = String::from_utf8(file.body.to_vec())
        .unwrap()
        .lines()
        .map(|line| serde_json::from_str::<Value>(line).unwrap()["id"].to_string())
        .collect();
    assert_eq!(ids, ["\"o1\"", "\"o2\""]);
    let seen = seen.lock().unwrap().clone();
    assert_eq!(
        seen,
        vec!["identity"; 2],
        "both pages were asked for identity"
    );
}

// GATEWAY-4: an encoding the layer cannot decode fails the job with a 502 OperationOutcome that
// names it, never a result of undecodable bytes.
#[tokio::test]
async fn gateway_4_an_unknown_encoding_fails_the_job_clearly() {
    let seen = Seen::default();
    let app = Router::new().route(
        "/fhir/Patient/1",
        get(|| async {
            (
                [
                    ("content-type", "application/fhir+json"),
                    ("content-encoding", "zstd"),
                ],
                vec![0x28u8, 0xb5, 0x2f, 0xfd],
            )
        }),
    );
    drop(seen);
    let addr = serve_behind(
        AsyncLayer::builder(tower_fhir_async::MemoryStore::new()).build(),
        app,
    )
    .await;
    let client = TestClient::default();
    let status = client
        .kick_off(
            Method::GET,
            &format!("http://{addr}/fhir/Patient/1"),
            &[GZIP_CLIENT],
            "",
        )
        .await;
    let done = client.poll_until_done(&status, 500).await;
    assert_eq!(done.status, StatusCode::OK, "the job ended: {done:?}");
    let entry = &done.json()["entry"][0];
    assert_eq!(entry["response"]["status"], "502 Bad Gateway", "{entry}");
    let diagnostics = entry["response"]["outcome"]["issue"][0]["diagnostics"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert!(diagnostics.contains("zstd"), "{diagnostics}");
}

// GATEWAY-4: the demo run with `--compress` (gzip inside its async layer, as a FHIR server with
// its own compression has it) compresses a gzip client's synchronous answers, while that client's
// async read and bulk export still complete with plain JSON and NDJSON.
#[tokio::test]
async fn gateway_4_a_server_compressing_inside_the_layer_still_gives_json_results() {
    let demo = demo::Demo::start(&[
        "--compress",
        "--patients",
        "12",
        "--min-poll-interval",
        "off",
    ]);
    let client = TestClient::default();
    let direct = client
        .send(
            Method::GET,
            &format!("{}/Patient?_count=5", demo.base),
            &[GZIP_CLIENT],
            "",
        )
        .await;
    assert_eq!(direct.status, StatusCode::OK, "{direct:?}");
    assert_eq!(
        direct.header("content-encoding"),
        "gzip",
        "the flag compresses"
    );

    let status = client
        .kick_off(
            Method::GET,
            &format!("{}/Patient?_count=5", demo.base),
            &[GZIP_CLIENT],
            "",
        )
        .await;
    let done = client.poll_until_done(&status, 2000).await;
    assert_eq!(done.status, StatusCode::OK, "{done:?}");
    let search = &done.json()["entry"][0]["resource"];
    assert_eq!(
        search["resourceType"], "Bundle",
        "plain JSON, not compressed bytes: {search}"
    );
    assert_eq!(search["entry"].as_array().map(Vec::len), Some(5));

    let status = client
        .kick_off(
            Method::GET,
            &format!(
                "{}/Patient?_outputFormat=application/fhir%2Bndjson",
                demo.base
            ),
            &[GZIP_CLIENT],
            "",
        )
        .await;
    let done = client.poll_until_done(&status, 2000).await;
    assert_eq!(done.status, StatusCode::OK, "{done:?}");
    let manifest = done.json();
    assert_eq!(manifest["error"], json!([]), "{manifest}");
    assert_eq!(manifest["output"][0]["count"], 12, "{manifest}");
}
