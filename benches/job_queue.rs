//! A burst of bulk kick-offs with and without the job queue (issue #15): `QUEUE_BENCH_JOBS`
//! (default 10 000) `$export` kick-offs sent at once through `AsyncLayer`, whose wrapped server
//! answers each with `QUEUE_BENCH_LINES` (default 200) lines of NDJSON, written into a
//! `LocalFileSystem` in a temporary folder on tmpfs (`/dev/shm`; `QUEUE_BENCH_DIR` elsewhere):
//! file contents there are not the process's resident memory, and no disk's metadata work is
//! measured. For each `max_concurrent_jobs` setting it reports the
//! kick-off rate, the time until the last export completed, and peak resident memory above the
//! idle process. "unbounded" is a limit higher than the number of jobs: every export runs at
//! once, as before the queue.
//!
//! `cargo bench --bench job_queue` (Linux: memory is read from `/proc/self/status`);
//! `QUEUE_BENCH_LIMITS=unbounded,16` picks the settings. Each setting runs in a child process of
//! its own (an allocator keeps what a run freed), in the same run, one after the other.

use std::convert::Infallible;
use std::process::{Command, ExitCode};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{CONTENT_LOCATION, CONTENT_TYPE, HOST};
use http::{Request, Response, StatusCode};
use http_body_util::{Empty, Full};
use tower::{Layer, ServiceExt, service_fn};
use tower_fhir_async::object_store::local::LocalFileSystem;
use tower_fhir_async::{AsyncLayer, MemoryStore, RequestBody};

/// Set in a child process: the `max_concurrent_jobs` it runs with.
const CASE_VAR: &str = "QUEUE_BENCH_CASE";
/// Kick-offs in flight at once while the burst is sent.
const SENDERS: usize = 64;
const HOST_NAME: &str = "fhir.example.org";
/// Stands for "no queue": more places than jobs.
const UNBOUNDED: usize = 1 << 24;

fn setting(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() -> ExitCode {
    let jobs = setting("QUEUE_BENCH_JOBS", 10_000);
    let lines = setting("QUEUE_BENCH_LINES", 200);
    if let Ok(case) = std::env::var(CASE_VAR) {
        let limit = case.parse().expect("a limit");
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .expect("a runtime");
        return match runtime.block_on(burst(jobs, lines, limit)) {
            Ok(figures) => {
                println!("{figures}");
                ExitCode::SUCCESS
            }
            Err(why) => {
                eprintln!("{why}");
                ExitCode::FAILURE
            }
        };
    }
    let cores = std::thread::available_parallelism().map_or(1, usize::from);
    let limits = std::env::var("QUEUE_BENCH_LIMITS").unwrap_or_else(|_| {
        format!(
            "unbounded,{},{},{},{}",
            cores,
            4 * cores,
            8 * cores,
            32 * cores
        )
    });
    println!(
        "burst of {jobs} bulk kick-offs, {lines} NDJSON lines each, {cores} cores, one process per setting"
    );
    println!(
        "{:<22} {:>14} {:>20} {:>16}",
        "max_concurrent_jobs", "kick-offs/s", "last completion (s)", "peak RSS (MiB)"
    );
    let me = std::env::current_exe().expect("the bench's own path");
    for label in limits.split(',') {
        let limit = if label == "unbounded" {
            UNBOUNDED
        } else {
            label.parse().expect("a limit or `unbounded`")
        };
        let output = Command::new(&me)
            .env(CASE_VAR, limit.to_string())
            .output()
            .expect("the setting runs");
        if !output.status.success() {
            eprintln!(
                "{label}: failed: {}",
                String::from_utf8_lossy(&output.stderr)
            );
            return ExitCode::FAILURE;
        }
        let figures = String::from_utf8_lossy(&output.stdout);
        let mut fields = figures.split_whitespace();
        let mut next = || fields.next().unwrap_or("?").to_owned();
        let (rate, last, rss) = (next(), next(), next());
        let label = if limit == 8 * cores {
            format!("{label} (default)")
        } else {
            label.to_owned()
        };
        println!("{label:<22} {rate:>14} {last:>20} {rss:>16}");
    }
    ExitCode::SUCCESS
}

/// One setting: the burst, then polls until every export completed. "rate last rss".
async fn burst(jobs: usize, lines: usize, limit: usize) -> Result<String, String> {
    // On tmpfs where there is one: a disk file system's metadata work (creating 10 000 job
    // folders after the last setting deleted as many) would be measured instead of the layer.
    let under = std::env::var_os("QUEUE_BENCH_DIR")
        .map(std::path::PathBuf::from)
        .or_else(|| {
            let shm = std::path::Path::new("/dev/shm");
            shm.is_dir().then(|| shm.to_path_buf())
        })
        .unwrap_or_else(std::env::temp_dir);
    let dir = tempfile::tempdir_in(&under)
        .map_err(|e| format!("a temporary folder in {}: {e}", under.display()))?;
    let files = LocalFileSystem::new_with_prefix(dir.path())
        .map_err(|e| format!("a LocalFileSystem: {e}"))?;
    let ndjson: Bytes = (0..lines)
        .map(|n| {
            format!(
                "{{\"resourceType\":\"Patient\",\"id\":\"{n}\",\"name\":[{{\"family\":\"Chalmers\",\"given\":[\"Peter\",\"James\"]}}],\"birthDate\":\"1974-12-25\"}}\n"
            )
        })
        .collect::<String>()
        .into();
    let layer = AsyncLayer::builder(MemoryStore::default())
        .base_path("/fhir")
        .file_store(Arc::new(files))
        .max_concurrent_jobs(limit)
        .build();
    let service = layer.layer(service_fn(
        move |_request: Request<RequestBody<Empty<Bytes>>>| {
            let body = Full::new(ndjson.clone());
            async move {
                let mut response = Response::new(body);
                response.headers_mut().insert(
                    CONTENT_TYPE,
                    http::HeaderValue::from_static("application/fhir+ndjson"),
                );
                Ok::<_, Infallible>(response)
            }
        },
    ));
    let idle = resident_kib("VmRSS")?;

    let started = Instant::now();
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut senders = Vec::new();
    for _ in 0..SENDERS {
        let (service, next) = (service.clone(), next.clone());
        senders.push(tokio::spawn(async move {
            let mut accepted = Vec::new();
            while next.fetch_add(1, std::sync::atomic::Ordering::Relaxed) < jobs {
                let request = Request::get("/fhir/$export")
                    .header(HOST, HOST_NAME)
                    .header("prefer", "respond-async")
                    .body(Empty::new())
                    .expect("a valid request");
                let Ok(response) = service.clone().oneshot(request).await;
                if response.status() != StatusCode::ACCEPTED {
                    return Err(format!("a kick-off got {}", response.status()));
                }
                let location = response.headers()[CONTENT_LOCATION]
                    .to_str()
                    .map_err(|e| e.to_string())?
                    .to_owned();
                accepted.push(location);
            }
            Ok(accepted)
        }));
    }
    let mut status_urls = Vec::with_capacity(jobs);
    for sender in senders {
        status_urls.extend(sender.await.map_err(|e| e.to_string())??);
    }
    let rate = jobs as f64 / started.elapsed().as_secs_f64();

    // Each job until it completed, in the order they were accepted.
    for url in &status_urls {
        let path = url
            .strip_prefix(&format!("http://{HOST_NAME}"))
            .ok_or("a status URL on another host")?
            .to_owned();
        loop {
            let poll = Request::get(&path)
                .header(HOST, HOST_NAME)
                .body(Empty::new())
                .expect("a valid request");
            let Ok(response) = service.clone().oneshot(poll).await;
            match response.status() {
                StatusCode::OK => break,
                StatusCode::ACCEPTED => tokio::time::sleep(Duration::from_millis(5)).await,
                other => return Err(format!("polling {path} got {other}")),
            }
        }
    }
    let last = started.elapsed().as_secs_f64();
    let peak = resident_kib("VmHWM")?;
    Ok(format!(
        "{rate:.0} {last:.2} {:.1}",
        peak.saturating_sub(idle) as f64 / 1024.0
    ))
}

/// A figure of `/proc/self/status` in KiB: `VmRSS` (now) or `VmHWM` (the peak).
fn resident_kib(field: &str) -> Result<u64, String> {
    let status = std::fs::read_to_string("/proc/self/status")
        .map_err(|e| format!("/proc/self/status (Linux only): {e}"))?;
    status
        .lines()
        .find_map(|line| line.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
        .ok_or_else(|| format!("no {field} in /proc/self/status"))
}
