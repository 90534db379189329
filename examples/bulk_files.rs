//! Bulk data export into NDJSON files in a folder. The server answers `$export` with one NDJSON
//! body, as if synchronously; the layer runs it in the background, splits it into files per
//! resource type in the folder, answers with a manifest and serves the files (gzip when asked).
//!
//! ```sh
//! cargo run --example bulk_files -- --files /tmp/fhir-files    # --addr 127.0.0.1:8080
//! # listening on http://127.0.0.1:8080/fhir
//! curl -si -H 'Prefer: respond-async' 'http://127.0.0.1:8080/fhir/$export?_type=Patient'
//! curl -s http://127.0.0.1:8080/fhir/_async/ID       # 202 while running, then the manifest
//! curl -s --compressed http://127.0.0.1:8080/fhir/_async/ID/file/Patient-1.ndjson
//! ```

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::Query;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use http::StatusCode;
use http::header::CONTENT_TYPE;
use serde_json::{Value, json};
use tower_fhir_async::object_store::local::LocalFileSystem;
use tower_fhir_async::{AsyncLayer, BulkWithoutPrefer, ManifestFormat, MemoryStore};

/// The server's data: the id and family name of each Patient, and two heart rates of each.
const PATIENTS: [(&str, &str); 3] = [("1", "Chalmers"), ("2", "Windsor"), ("3", "Levin")];
const HEART_RATES: [u32; 2] = [64, 71];

fn patient((id, family): (&str, &str)) -> Value {
    json!({"resourceType": "Patient", "id": id, "name": [{"family": family}]})
}

fn heart_rates((id, _): (&str, &str)) -> impl Iterator<Item = Value> {
    HEART_RATES.into_iter().enumerate().map(move |(n, rate)| {
        json!({"resourceType": "Observation", "id": format!("{id}-{n}"), "status": "final",
            "code": {"text": "Heart rate"}, "subject": {"reference": format!("Patient/{id}")},
            "valueQuantity": {"value": rate, "unit": "/min"}})
    })
}

/// `GET /fhir/$export[?_type=…]` and `GET /fhir/Patient/$export`: the resources as NDJSON, one
/// per line.
async fn export(Query(q): Query<HashMap<String, String>>) -> Response {
    let types = q.get("_type").map_or("Patient,Observation", String::as_str);
    let mut ndjson = String::new();
    for kind in types.split(',') {
        let found: Vec<Value> = match kind {
            "Patient" => PATIENTS.into_iter().map(patient).collect(),
            "Observation" => PATIENTS.into_iter().flat_map(heart_rates).collect(),
            _ => return not_exported(kind),
        };
        ndjson.extend(found.iter().map(|resource| format!("{resource}\n")));
    }
    ([(CONTENT_TYPE, "application/fhir+ndjson")], ndjson).into_response()
}

/// `400` for an unknown `_type`: answered within `kickoff_wait`, it is the kick-off's answer.
fn not_exported(kind: &str) -> Response {
    let why = format!("_type {kind} is not exported here; try Patient,Observation");
    let issue = json!({"severity": "error", "code": "not-supported", "diagnostics": why});
    let outcome = json!({"resourceType": "OperationOutcome", "issue": [issue]}).to_string();
    let content_type = [(CONTENT_TYPE, "application/fhir+json")];
    (StatusCode::BAD_REQUEST, content_type, outcome).into_response()
}

#[tokio::main]
async fn main() {
    if let Err(why) = run().await {
        eprintln!("error: {why}");
        std::process::exit(1);
    }
}

async fn run() -> Result<(), String> {
    let mut addr = "127.0.0.1:8080".to_owned();
    let mut files = std::env::temp_dir().join("tower-fhir-async-bulk-files");
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let value = args.next().ok_or(format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--addr" => addr = value,
            "--files" => files = PathBuf::from(value),
            _ => return Err(format!("unknown flag {flag}")),
        }
    }
    let listener = tokio::net::TcpListener::bind(&addr)
        .await
        .map_err(|err| format!("cannot listen on {addr}: {err} (port 0 picks a free one)"))?;
    let addr = listener.local_addr().map_err(|err| err.to_string())?;
    let base = format!("http://{addr}/fhir");

    std::fs::create_dir_all(&files).map_err(|err| format!("--files {}: {err}", files.display()))?;
    // Automatic cleanup: exports removed by DELETE or expiry leave no empty folders behind.
    // For S3 or an S3-compatible store (MinIO, Ceph, R2), turn on this crate's `s3` feature and
    // pass instead `tower_fhir_async::s3::file_store("s3://fhir-exports/files")?`: region and
    // credentials from the AWS_* environment variables, with AWS_ENDPOINT=http://minio:9000
    // and AWS_ALLOW_HTTP=true for a local one.
    let folder = LocalFileSystem::new_with_prefix(&files)
        .map_err(|err| format!("--files {}: {err}", files.display()))?
        .with_automatic_cleanup(true);
    let layer = AsyncLayer::builder(MemoryStore::new())
        .base_url(&base)
        .file_store(Arc::new(folder))
        // Files are `{files}/exports/{job id}/{type}-{n}.ndjson`; the rest of the store is yours.
        .file_prefix("exports")
        // A file ends at 16 MiB (or a client's smaller `_maximumFileSize`) or 50 000 resources.
        .max_file_size(16 * 1024 * 1024)
        .max_file_resources(50_000)
        // Files are uploaded in parts of 5 MiB (S3's least), at most 4 files of an export open
        // at once: an export holds about 4 × 3 parts in memory at most.
        .file_part_size(5 * 1024 * 1024)
        .max_open_files(4)
        // The manifest every published bulk data client reads; `Stu4Ballot` for the new form.
        .manifest_format(ManifestFormat::Stu2)
        // File downloads need the credentials the API needs (put authentication in front, see
        // middleware_order.rs); `false` makes file URLs capability URLs: keep retention short.
        .requires_access_token(true)
        // Operations that are exports, and what one sent without `Prefer: respond-async` gets.
        .bulk_operations(["$export"])
        .bulk_without_prefer(BulkWithoutPrefer::RunAsync)
        // The kick-off waits this long for the server's first answer: a `400` by then (an
        // unknown `_type`) is the kick-off's answer instead of a job that fails.
        .kickoff_wait(Duration::from_millis(50))
        // Manifests and files stay for an hour after the export ends (`Expires`).
        .retention(Duration::from_secs(3600))
        .build();
    // Also removes the files of expired, failed and cancelled exports.
    tokio::spawn(layer.sweeper(Duration::from_secs(60)));
    let app = Router::new()
        .route("/fhir/$export", get(export))
        .route("/fhir/Patient/$export", get(export))
        .layer(layer);

    println!("listening on {base}");
    axum::serve(listener, app)
        .await
        .map_err(|err| err.to_string())
}
