//! Memory per job: 100 000 completed jobs in a `MemoryStore` with 0 B, 1 KiB and 64 KiB
//! results, and 100 000 jobs running behind the layer. Reports the resident memory each job adds
//! beyond its result (target: at most 512 B for a completed job).
//!
//! `cargo bench --bench memory` (Linux: reads `/proc/self/statm`). `MEMORY_BENCH_JOBS` changes
//! the number of jobs.

use std::convert::Infallible;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::{HeaderValue, Request, Response, StatusCode, header};
use http_body_util::Full;
use tower::{Layer, Service, ServiceExt, service_fn};
use tower_fhir_async::store::conformance::Transitions;
use tower_fhir_async::{
    AsyncLayer, JobId, JobKind, JobOutcome, JobRecord, JobStore, MemoryStore, RequestBody,
    StoredResponse,
};

fn main() {
    let jobs: usize = std::env::var("MEMORY_BENCH_JOBS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(100_000);
    // Each case runs in a fresh process: memory freed by one case and kept by the allocator
    // would otherwise hide the next one's growth.
    if let Ok(case) = std::env::var("MEMORY_BENCH_CASE") {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a runtime");
        let per_job = match case.as_str() {
            "running" => runtime.block_on(running(jobs)),
            size => runtime.block_on(completed(jobs, size.parse().expect("a result size"))),
        };
        println!("{per_job}");
        return;
    }
    println!("memory per job, {jobs} jobs (resident set growth / jobs, one process per case)");
    println!("{:<34} {:>12} {:>15}", "case", "bytes/job", "beyond result");
    let me = std::env::current_exe().expect("the bench's own path");
    for case in ["0", "1024", "65536", "running"] {
        let output = std::process::Command::new(&me)
            .env("MEMORY_BENCH_CASE", case)
            .env("MEMORY_BENCH_JOBS", jobs.to_string())
            .output()
            .expect("the case runs");
        assert!(output.status.success(), "case {case} failed: {output:?}");
        let per_job: f64 = String::from_utf8_lossy(&output.stdout)
            .trim()
            .parse()
            .expect("a number");
        match case.parse::<usize>() {
            Ok(size) => println!(
                "{:<34} {:>12.0} {:>15.0}",
                format!("completed, {size} B result"),
                per_job,
                per_job - size as f64
            ),
            Err(_) => println!(
                "{:<34} {:>12.0} {:>15}",
                "running (layer, task, store)", per_job, "-"
            ),
        }
    }
}

/// Resident memory in bytes.
fn resident() -> f64 {
    let statm = std::fs::read_to_string("/proc/self/statm").expect("Linux /proc/self/statm");
    let pages: f64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .expect("a resident page count");
    pages * 4096.0
}

/// A job as the layer records it: a search with a query, finished with a FHIR JSON result of
/// its own (not shared with other jobs).
async fn completed(jobs: usize, size: usize) -> f64 {
    // Measures what each kept result costs, beyond the default cap on their bytes.
    let store = MemoryStore::new().with_max_retained_bytes(usize::MAX);
    let now = SystemTime::now();
    let expires = now + Duration::from_secs(3600);
    let before = resident();
    for i in 0..jobs {
        let id = JobId::new();
        let record = JobRecord::new(
            id,
            JobKind::Interaction,
            "GET",
            format!("/fhir/Observation?patient=p-{i}&code=8867-4"),
            now,
        );
        store.create(record).await.expect("created");
        let response = StoredResponse {
            status: StatusCode::OK,
            headers: vec![(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/fhir+json"),
            )],
            body: Bytes::from(vec![b'x'; size]),
        };
        store
            .finish(&id, JobOutcome::Completed(response), now, expires)
            .await
            .expect("finished");
    }
    let grown = resident() - before;
    assert_eq!(store.len(), jobs);
    drop(store);
    grown / jobs as f64
}

/// Jobs kicked off through the layer whose inner call never finishes: the running-job registry,
/// the cancel token, the spawned task, the replayed request and the store record.
async fn running(jobs: usize) -> f64 {
    let store = MemoryStore::new();
    let layer = AsyncLayer::builder(store.clone())
        .base_url("https://fhir.example.org/fhir")
        .build();
    let inner = service_fn(|_: Request<RequestBody<Full<Bytes>>>| async {
        std::future::pending::<()>().await;
        Ok::<_, Infallible>(Response::new(Full::new(Bytes::new())))
    });
    let mut service = layer.layer(inner);
    let before = resident();
    for i in 0..jobs {
        let request = Request::get(format!("/fhir/Observation?patient=p-{i}"))
            .header("host", "fhir.example.org")
            .header("prefer", "respond-async")
            .header("authorization", "Bearer 0123456789abcdef0123456789abcdef")
            .body(Full::new(Bytes::new()))
            .expect("a request");
        let response = service
            .ready()
            .await
            .expect("ready")
            .call(request)
            .await
            .expect("answered");
        assert_eq!(response.status(), StatusCode::ACCEPTED);
    }
    // Let every job task reach its inner call.
    for _ in 0..8 {
        tokio::task::yield_now().await;
    }
    let grown = resident() - before;
    assert_eq!(store.len(), jobs);
    layer
        .shutdown_handle()
        .shutdown(Duration::from_millis(10))
        .await;
    grown / jobs as f64
}
