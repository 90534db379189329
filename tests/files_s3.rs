//! Bulk data files in an S3-compatible object store (feature `s3`), over real sockets on both
//! sides: exports written as multipart uploads, served back, removed by DELETE, and an
//! unreachable store reported as the job's failure.
//!
//! Runs against the S3-compatible server at `S3_ENDPOINT` (default `http://127.0.0.1:9000`;
//! `.ci/run` starts moto's server there) and fails, never skips, when none answers. Each test
//! makes a bucket of its own.

#![cfg(feature = "s3")]

mod support;

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::routing::get;
use futures_util::TryStreamExt;
use http::{Method, StatusCode};
use support::bulk::{fetch, ids, lines_by_type, ndjson, start_with_files};
use support::{TestClient, assert_not_found};
use tower_fhir_async::object_store::aws::AmazonS3Builder;
use tower_fhir_async::object_store::{ClientOptions, ObjectStore, RetryConfig};
use tower_fhir_async::s3;

fn endpoint() -> String {
    std::env::var("S3_ENDPOINT").unwrap_or_else(|_| "http://127.0.0.1:9000".to_owned())
}

/// A builder for `bucket` on the test server (any credentials: the server does not check them).
fn builder(endpoint: &str, bucket: &str) -> AmazonS3Builder {
    AmazonS3Builder::new()
        .with_endpoint(endpoint)
        .with_allow_http(true)
        .with_region("us-east-1")
        .with_bucket_name(bucket)
        .with_access_key_id("test")
        .with_secret_access_key("test")
}

/// A new bucket on the test server; its name.
async fn new_bucket() -> String {
    let bucket = format!("tfa-{}", tower_fhir_async::JobId::new());
    let url = format!("{}/{bucket}", endpoint());
    let reply = TestClient::default().send(Method::PUT, &url, &[], "").await;
    assert_eq!(
        reply.status,
        StatusCode::OK,
        "creating bucket {bucket} at {url} (is the S3-compatible server running? see .ci/run): {reply:?}"
    );
    bucket
}

/// Every object in `store` (path → size).
async fn objects(store: &dyn ObjectStore) -> Vec<(String, u64)> {
    let mut found: Vec<(String, u64)> = store
        .list(None)
        .map_ok(|meta| (meta.location.to_string(), meta.size))
        .try_collect()
        .await
        .expect("listing the bucket");
    found.sort();
    found
}

/// `count` Observations of about 1 KiB each, ids `obs-00000` …
fn observations(count: usize) -> String {
    let note = "x".repeat(1000);
    (0..count)
        .map(|i| {
            format!(
                "{{\"resourceType\":\"Observation\",\"id\":\"obs-{i:05}\",\"status\":\"final\",\"note\":[{{\"text\":\"{note}\"}}]}}\n"
            )
        })
        .collect()
}

// BULK-3, BULK-9, BULK-13: a 12 MiB export goes to S3 in 5 MiB parts, under the configured
// prefix; the manifest lists it, and the files served back hold every resource once, in order.
// CANCEL-5: a DELETE removes the files from the bucket.
#[tokio::test]
async fn bulk_3_export_to_s3_in_parts_served_back_and_removed() {
    const COUNT: usize = 12_000;
    let bucket = new_bucket().await;
    let files =
        s3::file_store_with(builder(&endpoint(), &bucket), "exports/").expect("an S3 file store");
    let raw = builder(&endpoint(), &bucket)
        .with_http_connector(s3::HyperConnector)
        .build()
        .expect("a raw S3 client");

    let body = observations(COUNT) + &support::bulk::patients(3, "p");
    assert!(body.len() > 2 * 5 * 1024 * 1024, "more than two parts");
    let routes = Router::new().route(
        "/fhir/$export",
        get(move || {
            let body = body.clone();
            async move { ndjson(body) }
        }),
    );
    let server = start_with_files(routes, files, |b| b).await;
    let status_url = server.export("/$export").await;
    let manifest = server.manifest(&status_url).await;

    let output = fetch(&server.client, &manifest, "output").await;
    let by_type = lines_by_type(&output);
    let expected: Vec<String> = (0..COUNT).map(|i| format!("obs-{i:05}")).collect();
    assert_eq!(ids(&by_type["Observation"]), expected);
    assert_eq!(ids(&by_type["Patient"]), ["p-00000", "p-00001", "p-00002"]);

    // The objects are in the bucket, under the prefix and the job's folder.
    let stored = objects(&raw).await;
    assert_eq!(stored.len(), 2, "{stored:?}");
    for (path, size) in &stored {
        assert!(path.starts_with("exports/fhir-async/"), "{path}");
        assert!(*size > 0, "{path}");
    }
    let largest = stored.iter().map(|(_, size)| *size).max().unwrap_or(0);
    assert!(
        largest > 10 * 1024 * 1024,
        "one file of ~12 MiB: {stored:?}"
    );

    let deleted = server.client.delete(&status_url).await;
    assert_eq!(deleted.status, StatusCode::ACCEPTED, "{deleted:?}");
    let mut left = objects(&raw).await;
    for _ in 0..200 {
        if left.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
        left = objects(&raw).await;
    }
    assert!(left.is_empty(), "files left after DELETE: {left:?}");
    assert_not_found(&server.client.get(&status_url).await, "status after DELETE");
}

/// Runs an export into the store `builder` makes (without retries, so a failure comes at
/// once) and checks BULK-6: the job fails with `500` and an OperationOutcome saying the files
/// could not be written.
async fn assert_export_cannot_write(builder: AmazonS3Builder) {
    let builder = builder.with_retry(RetryConfig {
        max_retries: 0,
        retry_timeout: Duration::from_secs(1),
        ..RetryConfig::default()
    });
    let files: Arc<dyn ObjectStore> = s3::file_store_with(builder, "").expect("an S3 file store");
    let routes = Router::new().route(
        "/fhir/$export",
        get(|| async { ndjson(observations(6_000)) }),
    );
    let server = start_with_files(routes, files, |b| b).await;
    let status_url = server.export("/$export").await;
    let reply = server.finished(&status_url).await;
    assert_eq!(reply.status, StatusCode::INTERNAL_SERVER_ERROR, "{reply:?}");
    let outcome: serde_json::Value = serde_json::from_slice(&reply.body).expect("JSON");
    assert_eq!(outcome["resourceType"], "OperationOutcome", "{outcome}");
    let diagnostics = outcome["issue"][0]["diagnostics"]
        .as_str()
        .unwrap_or_default();
    assert!(
        diagnostics.contains("could not be written"),
        "{diagnostics}"
    );
}

// BULK-6: an object store that cannot be reached fails the export with 500 and an
// OperationOutcome that says the files could not be written; the job does not hang.
#[tokio::test]
async fn bulk_6_unreachable_s3_fails_the_export() {
    // A port nothing listens on.
    assert_export_cannot_write(builder("http://127.0.0.1:1", "nowhere")).await;
}

// BULK-6: an object store that accepts connections but never answers fails the export once the
// builder's `ClientOptions` timeout passes; the job does not hang.
#[tokio::test]
async fn bulk_6_stalled_s3_fails_the_export_after_the_timeout() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("a port");
    let address = listener.local_addr().expect("its address");
    // Accepts, reads nothing, answers nothing; holds the connections until the test ends.
    let stalled = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = listener.accept().await {
            held.push(socket);
        }
    });
    let stalling = builder(&format!("http://{address}"), "stalled")
        .with_client_options(ClientOptions::new().with_timeout(Duration::from_millis(500)));
    assert_export_cannot_write(stalling).await;
    stalled.abort();
}

// The URL form of `s3::file_store`: a bucket and an optional prefix, anything else refused with
// a message that shows the form.
#[test]
fn file_store_urls() {
    for bad in ["exports", "s3://", "https://bucket/prefix"] {
        let error = s3::file_store(bad).expect_err("refused").to_string();
        assert!(error.contains("s3://BUCKET"), "{bad}: {error}");
    }
    // A well-formed URL makes a store without contacting anyone.
    assert!(s3::file_store("s3://some-bucket/some/prefix").is_ok());
}
