//! Issue #14 item 5: the small examples as shipped, each run as its own process on 127.0.0.1:0
//! (`--addr 127.0.0.1:0`) and driven as a client would: kick-off, polls, the result, and what
//! each example is about (bulk files in a folder, instances sharing Redis, PostgreSQL,
//! authentication and compression around the layer, Prometheus metrics).
//!
//! `cargo test` builds the examples first; `cargo test --test examples` alone does not: run
//! `cargo build --examples --all-features` before it. The Redis and PostgreSQL tests read
//! `REDIS_URL` and `DATABASE_URL`; without them they fail in CI (`CI=true`) and are skipped, with
//! a message, elsewhere.

#[path = "support/example_process.rs"]
mod example_process;
mod support;

use std::time::Duration;

use example_process::Example;
use http::{Method, StatusCode};
use serde_json::Value;
use support::{Reply, TestClient, within};

/// Polls `status_url` with `headers` until it stops answering `202` (STATUS-1, STATUS-3).
async fn poll(client: &TestClient, status_url: &str, headers: &[(&str, &str)]) -> Reply {
    within("the job's completion", async {
        loop {
            let reply = client.send(Method::GET, status_url, headers, "").await;
            if reply.status != StatusCode::ACCEPTED {
                return reply;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
}

/// BUNDLE-1, BUNDLE-2, BUNDLE-3, BUNDLE-10: a completed search is `200` with a `batch-response`
/// Bundle whose first entry holds the searchset as FHIR JSON (a text answer would be a `Binary`);
/// returns that searchset.
fn searchset_of(done: &Reply) -> Value {
    assert_eq!(done.status, StatusCode::OK, "{done:?}");
    assert_eq!(done.header("content-type"), "application/fhir+json");
    let bundle = done.json();
    assert_eq!(bundle["resourceType"], "Bundle", "{bundle}");
    assert_eq!(bundle["type"], "batch-response", "{bundle}");
    let entry = &bundle["entry"][0];
    assert_eq!(entry["response"]["status"], "200 OK", "{bundle}");
    assert_eq!(
        entry["resource"]["resourceType"], "Bundle",
        "not a Binary: {bundle}"
    );
    assert_eq!(entry["resource"]["type"], "searchset", "{bundle}");
    entry["resource"].clone()
}

/// The family names of the Patients in a searchset.
fn families(searchset: &Value) -> Vec<&str> {
    let entries = searchset["entry"].as_array().expect("entries");
    entries
        .iter()
        .map(|e| {
            e["resource"]["name"][0]["family"]
                .as_str()
                .expect("a family name")
        })
        .collect()
}

/// KICK-2, KICK-3, BUNDLE-1…3, BUNDLE-10: `Prefer: respond-async` on a search of `base` gets
/// `202` with an absolute `Content-Location` on `base`, and polling it the searchset.
async fn search_asynchronously(base: &str) {
    let client = TestClient::default();
    let status_url = client
        .kick_off(
            Method::GET,
            &format!("{base}/Patient?family=levin"),
            &[],
            "",
        )
        .await;
    assert!(
        status_url.starts_with(&format!("{base}/_async/")),
        "{status_url}"
    );
    let searchset = searchset_of(&poll(&client, &status_url, &[]).await);
    assert_eq!(families(&searchset), ["Levin"]);
}

/// KICK-2, BUNDLE-4, BUNDLE-6, BUNDLE-9: a read answers synchronously without `Prefer`, and a
/// read of an unknown Patient kicked off asynchronously completes `200` with the inner `404` and
/// its OperationOutcome in the entry.
async fn read_both_ways(base: &str) {
    let client = TestClient::default();
    let read = client.get(&format!("{base}/Patient/1")).await;
    assert_eq!(read.status, StatusCode::OK, "{read:?}");
    assert_eq!(read.header("content-type"), "application/fhir+json");
    assert_eq!(read.json()["resourceType"], "Patient");
    let status_url = client
        .kick_off(Method::GET, &format!("{base}/Patient/9"), &[], "")
        .await;
    let done = poll(&client, &status_url, &[]).await;
    assert_eq!(done.status, StatusCode::OK, "{done:?}");
    let entry = &done.json()["entry"][0];
    assert_eq!(entry["response"]["status"], "404 Not Found", "{entry}");
    assert_eq!(
        entry["response"]["outcome"]["resourceType"],
        "OperationOutcome"
    );
}

// KICK-2, KICK-3, BUNDLE-1, BUNDLE-2, BUNDLE-4, BUNDLE-10, SEL-7: axum_minimal, the layer around
// the whole Router: kick-offs and polls of its own status URLs work.
#[tokio::test]
async fn kick_2_axum_minimal_runs_searches_and_reads_asynchronously() {
    let example = Example::start("axum_minimal", &[], 1);
    search_asynchronously(example.base()).await;
    read_both_ways(example.base()).await;
}

// KICK-2, KICK-3, BUNDLE-1, BUNDLE-2, BUNDLE-4, BUNDLE-10: hyper_only, a `service_fn` served by
// hyper without axum.
#[tokio::test]
async fn kick_2_hyper_only_runs_searches_and_reads_asynchronously() {
    let example = Example::start("hyper_only", &[], 1);
    search_asynchronously(example.base()).await;
    read_both_ways(example.base()).await;
}

// KICK-2, KICK-3, BUNDLE-1, BUNDLE-10, SEC-2, SEC-3, CANCEL-1: middleware_order. Authentication
// is outside the layer, so its status URL (poll and cancel) needs the token like the kick-off;
// compression is outside it too, so a gzip-accepting client gets a gzip result that is the FHIR
// Bundle, and the job never recorded compressed bytes.
#[tokio::test]
async fn sec_2_middleware_order_protects_status_urls_and_compresses_results() {
    let example = Example::start("middleware_order", &["--token", "t0ken"], 1);
    let client = TestClient::default();
    let search = format!("{}/Patient", example.base());
    let refused = client.send_async(Method::GET, &search, &[], "").await;
    assert_eq!(refused.status, StatusCode::UNAUTHORIZED, "{refused:?}");
    assert_eq!(refused.header("www-authenticate"), "Bearer");
    refused.assert_outcome("login");

    let auth = ("authorization", "Bearer t0ken");
    let gzip = ("accept-encoding", "gzip");
    let status_url = client
        .kick_off(Method::GET, &search, &[auth, gzip], "")
        .await;
    for method in [Method::GET, Method::DELETE] {
        let anonymous = client.send(method.clone(), &status_url, &[gzip], "").await;
        assert_eq!(
            anonymous.status,
            StatusCode::UNAUTHORIZED,
            "{method}: {anonymous:?}"
        );
        let wrong = ("authorization", "Bearer guess");
        let guessed = client.send(method.clone(), &status_url, &[wrong], "").await;
        assert_eq!(
            guessed.status,
            StatusCode::UNAUTHORIZED,
            "{method}: {guessed:?}"
        );
    }

    // The refused DELETE left the job alone.
    let done = poll(&client, &status_url, &[auth, gzip]).await;
    assert_eq!(done.status, StatusCode::OK, "{done:?}");
    assert_eq!(done.header("content-encoding"), "gzip");
    let plain = Reply {
        status: done.status,
        headers: done.headers.clone(),
        body: gunzip(&done.body).await.into(),
    };
    let searchset = searchset_of(&plain);
    assert_eq!(families(&searchset), ["Chalmers", "Windsor", "Levin"]);

    let cancelled = client.send(Method::DELETE, &status_url, &[auth], "").await;
    assert_eq!(cancelled.status, StatusCode::ACCEPTED, "{cancelled:?}");
}

async fn gunzip(body: &[u8]) -> Vec<u8> {
    use tokio::io::AsyncReadExt;
    let mut decoder = async_compression::tokio::bufread::GzipDecoder::new(body);
    let mut plain = Vec::new();
    decoder.read_to_end(&mut plain).await.expect("valid gzip");
    plain
}

/// A folder under the system's temporary one, removed when dropped.
struct TempDir(std::path::PathBuf);

impl TempDir {
    fn new() -> Self {
        let id = tower_fhir_async::JobId::new();
        let dir = std::env::temp_dir().join(format!("tower-fhir-async-examples-{id}"));
        std::fs::create_dir_all(&dir).expect("a temporary folder");
        Self(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

// KICK-5, BULK-1, BULK-5, BULK-8, BULK-9, BULK-13, BULK-15, CANCEL-5: bulk_files. An unknown
// `_type` is the kick-off's `400`; an `$export` completes with a manifest whose files download
// as NDJSON (gzip when asked), each the same bytes as the file in the `--files` folder, and a
// DELETE removes them from the folder.
#[tokio::test]
async fn bulk_9_bulk_files_exports_ndjson_files_into_the_folder() {
    let dir = TempDir::new();
    let example = Example::start("bulk_files", &["--files", dir.0.to_str().unwrap()], 1);
    let client = TestClient::default();
    let accept = ("accept", "application/fhir+json");
    let unknown = format!("{}/$export?_type=Medication", example.base());
    let refused = client
        .send_async(Method::GET, &unknown, &[accept], "")
        .await;
    assert_eq!(refused.status, StatusCode::BAD_REQUEST, "{refused:?}");
    refused.assert_outcome("not-supported");

    let export = format!("{}/$export?_type=Patient,Observation", example.base());
    let status_url = client.kick_off(Method::GET, &export, &[accept], "").await;
    let done = poll(&client, &status_url, &[]).await;
    assert_eq!(done.status, StatusCode::OK, "{done:?}");
    assert_eq!(done.header("content-type"), "application/json");
    let manifest = done.json();
    assert_eq!(manifest["request"], export.as_str(), "{manifest}");
    assert_eq!(manifest["requiresAccessToken"], true, "{manifest}");
    assert_eq!(manifest["error"], serde_json::json!([]), "{manifest}");
    let mut counts = Vec::new();
    let job_folder = dir.0.join("exports").join(support::job_id(&status_url));
    for item in manifest["output"].as_array().expect("output") {
        let (kind, url) = (
            item["type"].as_str().unwrap(),
            item["url"].as_str().unwrap(),
        );
        assert!(url.starts_with(&format!("{status_url}/file/")), "{url}");
        let file = client.get(url).await;
        assert_eq!(file.status, StatusCode::OK, "{file:?}");
        assert_eq!(file.header("content-type"), "application/fhir+ndjson");
        let text = std::str::from_utf8(&file.body).expect("UTF-8");
        for line in text.lines() {
            let resource: Value = serde_json::from_str(line).expect("one resource per line");
            assert_eq!(resource["resourceType"], kind, "{line}");
        }
        assert_eq!(item["count"], text.lines().count(), "{item}");
        counts.push((kind.to_owned(), text.lines().count()));

        let name = url.rsplit('/').next().unwrap();
        let on_disk = std::fs::read(job_folder.join(name)).expect("the file in --files");
        assert_eq!(on_disk, file.body, "{name}");
        let zipped = client
            .send(Method::GET, url, &[("accept-encoding", "gzip")], "")
            .await;
        assert_eq!(zipped.header("content-encoding"), "gzip");
        assert_eq!(gunzip(&zipped.body).await, file.body, "{name}");
    }
    counts.sort();
    let expected = [("Observation".to_owned(), 6), ("Patient".to_owned(), 3)];
    assert_eq!(counts, expected);

    let deleted = client.delete(&status_url).await;
    assert_eq!(deleted.status, StatusCode::ACCEPTED, "{deleted:?}");
    within("the export's folder removed", async {
        while job_folder.exists() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    support::assert_not_found(&client.get(&status_url).await, "after DELETE");
}

// KICK-2, BUNDLE-1: metrics. After a job, its own `/metrics` (the layer's counters through
// `metrics-exporter-prometheus`) counts the accepted kick-off, the completed job and the poll.
#[tokio::test]
async fn kick_2_metrics_counts_the_kick_off_and_the_job() {
    let example = Example::start("metrics", &[], 1);
    let client = TestClient::default();
    let scrape = client.get(&example.url("/metrics")).await;
    assert_eq!(scrape.status, StatusCode::OK, "{scrape:?}");
    let before = String::from_utf8(scrape.body.to_vec()).unwrap();
    let kick_offs = sample(
        &before,
        "fhir_async_requests_total",
        &["kick-off", "accepted"],
    );
    assert!(matches!(kick_offs, None | Some(0.0)), "{before}");

    search_asynchronously(example.base()).await;
    let scrape = client.get(&example.url("/metrics")).await;
    assert!(
        scrape.header("content-type").starts_with("text/plain"),
        "{scrape:?}"
    );
    let after = String::from_utf8(scrape.body.to_vec()).unwrap();
    let kick_offs = sample(
        &after,
        "fhir_async_requests_total",
        &["kick-off", "accepted"],
    );
    assert_eq!(kick_offs, Some(1.0), "{after}");
    let completed = sample(
        &after,
        "fhir_async_requests_total",
        &["status", "completed"],
    );
    assert_eq!(completed, Some(1.0), "{after}");
    let finished = sample(&after, "fhir_async_jobs_finished_total", &["completed"]);
    assert_eq!(finished, Some(1.0), "{after}");
}

/// The value of the Prometheus sample `name{…}` whose label values are exactly `labels`.
fn sample(text: &str, name: &str, labels: &[&str]) -> Option<f64> {
    text.lines().find_map(|line| {
        let (series, value) = line.rsplit_once(' ')?;
        let rest = series.strip_prefix(name)?;
        let values: Vec<&str> = match rest.strip_prefix('{') {
            Some(inner) => inner
                .trim_end_matches('}')
                .split(',')
                .map(|pair| {
                    pair.split_once('=')
                        .map_or("", |(_, v)| v.trim_matches('"'))
                })
                .collect(),
            None if rest.is_empty() => Vec::new(),
            None => return None,
        };
        (values == labels).then(|| value.parse().expect("a number"))
    })
}

/// The URL in env `var`; `None` (after saying so) when it is not set outside CI, where the test
/// is skipped; a failure when it is not set in CI (`CI=true`), where every test must run.
#[cfg(any(feature = "redis", feature = "postgres"))]
fn service_url(var: &str, test: &str) -> Option<String> {
    match std::env::var(var) {
        Ok(url) => Some(url),
        Err(_) if std::env::var("CI").is_ok_and(|ci| ci == "true") => {
            panic!("{test}: {var} is not set; CI must run it against a server (see .ci/run)")
        }
        Err(_) => {
            eprintln!("skipped {test}: set {var} to run it (e.g. as .ci/run does)");
            None
        }
    }
}

/// Deletes the Redis keys under `prefix` when dropped, so a test leaves nothing behind, passed
/// or failed.
#[cfg(feature = "redis")]
struct RedisKeys {
    url: String,
    prefix: String,
}

#[cfg(feature = "redis")]
impl Drop for RedisKeys {
    fn drop(&mut self) {
        use tower_fhir_async::redis;
        let Ok(mut connection) = redis::Client::open(self.url.as_str())
            .and_then(|client| client.get_connection_with_timeout(Duration::from_secs(5)))
        else {
            return;
        };
        let pattern = format!("{}*", self.prefix);
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg(&pattern)
            .query(&mut connection)
            .unwrap_or_default();
        if !keys.is_empty() {
            let _: redis::RedisResult<()> = redis::cmd("DEL").arg(keys).query(&mut connection);
        }
    }
}

// KICK-2, KICK-3, BUNDLE-1, BUNDLE-10, STATUS-1: redis_instances. A job kicked off on one
// instance is polled to completion on the other, through the shared RedisStore.
#[cfg(feature = "redis")]
#[tokio::test]
async fn kick_2_redis_instances_poll_a_job_of_the_other_instance() {
    let Some(url) = service_url("REDIS_URL", "redis_instances") else {
        return;
    };
    let prefix = format!("test-examples-{}:", tower_fhir_async::JobId::new());
    let _keys = RedisKeys {
        url: url.clone(),
        prefix: prefix.clone(),
    };
    let args = ["--redis", &url, "--prefix", &prefix, "--instances", "2"];
    let example = Example::start("redis_instances", &args, 2);
    let [first, second] = [&example.bases[0], &example.bases[1]];
    assert_ne!(first, second);
    let client = TestClient::default();
    let search = format!("{first}/Patient?family=Windsor");
    let status_url = client.kick_off(Method::GET, &search, &[], "").await;
    let on_second = status_url.replacen(first.as_str(), second, 1);
    assert_ne!(on_second, status_url);
    let searchset = searchset_of(&poll(&client, &on_second, &[]).await);
    assert_eq!(families(&searchset), ["Windsor"]);
    // The same result on the instance that ran it (STATUS-14).
    let on_first = client.get(&status_url).await;
    assert_eq!(searchset_of(&on_first), searchset);
}

// KICK-2, KICK-3, BUNDLE-1, BUNDLE-4, BUNDLE-10, KICK-9: postgres. The same app on
// PostgresStore, in a table of the test's own (`--table`), dropped afterwards.
#[cfg(feature = "postgres")]
#[tokio::test]
async fn kick_2_postgres_runs_searches_and_reads_asynchronously() {
    use futures_util::FutureExt;
    use tower_fhir_async::store::sqlx::{self, AssertSqlSafe};

    let Some(url) = service_url("DATABASE_URL", "postgres") else {
        return;
    };
    let table = format!("examples_test_{}", tower_fhir_async::JobId::new());
    let outcome = std::panic::AssertUnwindSafe(async {
        let example = Example::start("postgres", &["--database", &url, "--table", &table], 1);
        search_asynchronously(example.base()).await;
        read_both_ways(example.base()).await;
    })
    .catch_unwind()
    .await;
    let pool = sqlx::PgPool::connect(&url).await.expect("PostgreSQL");
    let drop_table = format!("DROP TABLE IF EXISTS \"{table}\"");
    sqlx::query(AssertSqlSafe(drop_table))
        .execute(&pool)
        .await
        .expect("dropping the test's table");
    if let Err(panic) = outcome {
        std::panic::resume_unwind(panic);
    }
}

// Every example names a flag it does not know, and exits with an error instead of serving.
#[test]
fn examples_refuse_unknown_flags() {
    let mut names = vec![
        "axum_minimal",
        "hyper_only",
        "middleware_order",
        "bulk_files",
        "metrics",
    ];
    if cfg!(feature = "redis") {
        names.push("redis_instances");
    }
    if cfg!(feature = "postgres") {
        names.push("postgres");
    }
    for name in names {
        let output = std::process::Command::new(example_process::binary(name))
            .args(["--colour", "blue"])
            .output()
            .expect("the example runs");
        assert!(!output.status.success(), "{name} accepted --colour");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains("--colour"), "{name}: {stderr}");
    }
    // A table name that is not a plain SQL name is refused with a message, not a panic.
    if cfg!(feature = "postgres") {
        let output = std::process::Command::new(example_process::binary("postgres"))
            .args(["--table", "jobs; drop table x"])
            .output()
            .expect("the example runs");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{stderr}");
        assert!(stderr.contains("--table"), "{stderr}");
        assert!(!stderr.contains("panicked"), "{stderr}");
    }
}
