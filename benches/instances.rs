//! Ten instances with failures (issue #16): ten demo servers (`examples/server`) on loopback
//! share one Redis job store and one S3-compatible file store; clients spread kick-offs (quick
//! searches, slow `$reindex` operations, bulk `$export`s), polls, cancels and file downloads
//! over them at random for a bounded time; three instances are killed (SIGKILL) half-way. Then
//! every job is polled through a surviving instance until it ends, and sorted:
//!
//! - completed; cancelled (by the bench's own `DELETE`);
//! - failed as lost: the job ran on a killed instance and was reported failed (`503`
//!   `transient`) once its lease lapsed — expected, and only for those;
//! - **lost** (must be 0): gone (`404`) without a `DELETE`, or failed as lost on a live instance;
//! - **stuck** (must be 0): still `202` well after the lease.
//!
//! Before that, the same traffic against one instance alone (no kills) gives the rates the ten
//! are compared with, in the same run.
//!
//! `REDIS_URL=redis://127.0.0.1:6379 S3_ENDPOINT=http://127.0.0.1:9000 cargo bench --features
//! redis,s3 --bench instances` (as `.ci/run` starts them: Redis, and moto's S3 server).
//! `INSTANCES_STORE=redis-cluster://127.0.0.1:7000,127.0.0.1:7001,127.0.0.1:7002` runs the same
//! on a Redis Cluster (the three masters `.ci/run` starts). `INSTANCES_SECS` (default 20) sets the seconds of traffic with ten instances,
//! `INSTANCES_CLIENTS` (default 32) the concurrent clients. The bench builds the demo itself
//! (`cargo build --release --example server --features redis,redis-cluster,s3`) and makes an S3 bucket of its
//! own; its jobs' Redis keys expire with the demo's retention.

use std::collections::HashMap;
use std::io::BufRead;
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

/// The layer's default lease, which the demo keeps: how long a killed instance's jobs stay
/// running.
const LEASE: Duration = Duration::from_secs(10);
const KILLED: usize = 3;
const INSTANCES: usize = 10;

fn main() -> ExitCode {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a tokio runtime");
    match runtime.block_on(run()) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(error) => {
            eprintln!("error: {error}");
            ExitCode::FAILURE
        }
    }
}

fn number(name: &str, default: u64) -> Result<u64, String> {
    match std::env::var(name) {
        Err(_) => Ok(default),
        Ok(text) => text
            .trim()
            .parse::<u64>()
            .ok()
            .filter(|n| *n > 0)
            .ok_or_else(|| format!("{name}={text} is not a positive whole number")),
    }
}

async fn run() -> Result<bool, String> {
    // The demo's `--store`: one Redis, or a Redis Cluster (`redis-cluster://HOST:PORT,…`).
    let redis = std::env::var("INSTANCES_STORE")
        .or_else(|_| std::env::var("REDIS_URL"))
        .unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    let s3 = std::env::var("S3_ENDPOINT").unwrap_or_else(|_| "http://127.0.0.1:9000".into());
    let secs = number("INSTANCES_SECS", 20)?;
    let clients = number("INSTANCES_CLIENTS", 32)? as usize;
    let demo = build_demo()?;
    let http = Http::new();
    let bucket = format!("tfa-instances-{}", std::process::id());
    let made = http.send(Method::PUT, &format!("{s3}/{bucket}")).await?;
    if made.0 != StatusCode::OK {
        return Err(format!("making bucket {bucket} at {s3}: {}", made.0));
    }
    let spawn = |count: usize| -> Result<Vec<Instance>, String> {
        (0..count)
            .map(|_| Instance::start(&demo, &redis, &s3, &bucket))
            .collect()
    };
    println!(
        "{INSTANCES} demo instances on 127.0.0.1 sharing the job store {redis} and S3 ({s3}, bucket \
         {bucket}); {clients} clients; {secs} s of traffic, {KILLED} instances killed half-way"
    );

    // One instance alone, no failures: the rates to compare with.
    let mut one = spawn(1)?;
    let alone = traffic(&http, &one, clients, Duration::from_secs(secs / 2), None).await;
    for instance in &mut one {
        instance.kill();
    }

    let mut ten = spawn(INSTANCES)?;
    let victims: Vec<usize> = (0..KILLED).map(|i| 1 + i * 3).collect();
    let run = traffic(
        &http,
        &ten,
        clients,
        Duration::from_secs(secs),
        Some(victims.clone()),
    )
    .await;
    let mut killed_addrs = Vec::new();
    for &victim in &victims {
        ten[victim].kill();
        killed_addrs.push(ten[victim].addr.clone());
    }
    let live: Vec<String> = ten
        .iter()
        .filter(|i| !killed_addrs.contains(&i.addr))
        .map(|i| i.addr.clone())
        .collect();

    // Every job to its end, through the live instances.
    let deadline = Instant::now() + 3 * LEASE + Duration::from_secs(10);
    let jobs = run.jobs.lock().expect("jobs").clone();
    let mut tally: HashMap<&'static str, u64> = HashMap::new();
    let mut problems = Vec::new();
    let mut others = Vec::new();
    for (i, job) in jobs.iter().enumerate() {
        let on_killed = killed_addrs.iter().any(|a| job.url.contains(a.as_str()));
        let mut last: Option<String>;
        let verdict = loop {
            let via = rewrite(&job.url, &live[i % live.len()]);
            let (status, body) = http.send(Method::GET, &via).await.unwrap_or_default();
            let shown: String = String::from_utf8_lossy(&body).chars().take(200).collect();
            last = Some(format!("{status}: {shown}"));
            match status {
                StatusCode::ACCEPTED if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
                StatusCode::ACCEPTED => break "stuck",
                StatusCode::NOT_FOUND if job.cancelled => break "cancelled",
                // A DELETE whose answer never came (its instance was killed, or it timed out)
                // may have cancelled the job all the same.
                StatusCode::NOT_FOUND if job.delete_sent => break "cancelled, unconfirmed",
                StatusCode::NOT_FOUND => break "lost",
                _ if is_lost_failure(status, &body) => {
                    break if on_killed { "failed as lost" } else { "lost" };
                }
                s if s.is_success() => break "completed",
                _ => {
                    others.push(format!("{status} {}", String::from_utf8_lossy(&body)));
                    break "failed otherwise";
                }
            }
        };
        if matches!(verdict, "lost" | "stuck") {
            problems.push(format!(
                "{verdict}: {} (accepted by a killed instance: {on_killed}; last answer {})",
                job.url,
                last.as_deref().unwrap_or("none")
            ));
        }
        *tally.entry(verdict).or_default() += 1;
    }
    drop(ten);

    println!();
    println!(
        "{:<28}{:>12}{:>12}{:>12}",
        "", "kick-offs/s", "polls/s", "downloads"
    );
    for (name, stats) in [("one instance", &alone), ("ten instances, 3 killed", &run)] {
        println!(
            "{name:<28}{:>12.0}{:>12.0}{:>12}",
            stats.kick_offs as f64 / stats.secs,
            stats.polls as f64 / stats.secs,
            stats.downloads
        );
    }
    for (name, stats) in [("one instance", &alone), ("ten instances", &run)] {
        let answers: Vec<String> = stats
            .answers
            .iter()
            .map(|(k, n)| format!("{k}: {n}"))
            .collect();
        println!("answers, {name}: {}", answers.join(", "));
    }
    println!(
        "ten / one: kick-offs {:.2}×, polls {:.2}× (all on this machine's two cores)",
        (run.kick_offs as f64 / run.secs) / (alone.kick_offs as f64 / alone.secs).max(1e-9),
        (run.polls as f64 / run.secs) / (alone.polls as f64 / alone.secs).max(1e-9),
    );
    println!();
    println!("jobs accepted by the ten: {}", jobs.len());
    for verdict in [
        "completed",
        "cancelled",
        "cancelled, unconfirmed",
        "failed as lost",
        "failed otherwise",
        "lost",
        "stuck",
    ] {
        println!(
            "  {verdict:<18}{:>8}",
            tally.get(verdict).copied().unwrap_or(0)
        );
    }
    for problem in problems.iter().take(20) {
        println!("  {problem}");
    }
    for other in others.iter().take(5) {
        let shown: String = other.chars().take(300).collect();
        println!("  failed otherwise: {shown}");
    }
    let ok = problems.is_empty();
    println!(
        "lost and stuck: {}",
        if ok {
            "none (target: 0)"
        } else {
            "SOME (target: 0)"
        }
    );
    Ok(ok)
}

/// How a job whose instance died is reported: an interaction job's Bundle entry `503` +
/// `transient`, a bulk job's status `500` saying the instance stopped.
fn is_lost_failure(status: StatusCode, body: &[u8]) -> bool {
    let text = String::from_utf8_lossy(body);
    ((status == StatusCode::SERVICE_UNAVAILABLE || text.contains("\"503"))
        && text.contains("transient"))
        || text.contains("stopped before the job finished")
}

/// `url` with its host and port replaced by `addr`.
fn rewrite(url: &str, addr: &str) -> String {
    let rest = url.strip_prefix("http://").unwrap_or(url);
    let path = rest.find('/').map_or("", |at| &rest[at..]);
    format!("http://{addr}{path}")
}

#[derive(Clone)]
struct Job {
    url: String,
    /// A `DELETE` was answered `202`.
    cancelled: bool,
    /// A `DELETE` was sent, answered or not.
    delete_sent: bool,
}

#[derive(Default)]
struct Stats {
    kick_offs: u64,
    polls: u64,
    downloads: u64,
    secs: f64,
    jobs: Arc<Mutex<Vec<Job>>>,
    /// Answers by request kind and status ("kick-off 202", "poll error" …).
    answers: std::collections::BTreeMap<String, u64>,
}

/// Counts one answer of `kind`: its status, or "error" when none came.
fn tally(answers: &mut HashMap<String, u64>, kind: &str, status: Result<StatusCode, &String>) {
    let key = match status {
        Ok(status) => format!("{kind} {}", status.as_u16()),
        Err(_) => format!("{kind} error"),
    };
    *answers.entry(key).or_default() += 1;
}

/// `clients` clients against `instances` for `length`; with `victims`, those instances are
/// killed half-way (by the caller, afterwards: here they only stop being used).
async fn traffic(
    http: &Http,
    instances: &[Instance],
    clients: usize,
    length: Duration,
    victims: Option<Vec<usize>>,
) -> Stats {
    let addrs: Vec<String> = instances.iter().map(|i| i.addr.clone()).collect();
    let jobs: Arc<Mutex<Vec<Job>>> = Arc::default();
    let started = Instant::now();
    let kill_at = started + length / 2;
    let pids: Vec<u32> = instances.iter().map(|i| i.child.id()).collect();
    let killer = victims.map(|victims| {
        tokio::spawn(async move {
            tokio::time::sleep_until(kill_at.into()).await;
            for victim in victims {
                // SIGKILL now; the caller reaps the process.
                let _ = Command::new("kill")
                    .args(["-9", &pids[victim].to_string()])
                    .status();
            }
        })
    });
    let mut tasks = Vec::new();
    for client in 0..clients {
        let http = http.clone();
        let addrs = addrs.clone();
        let jobs = jobs.clone();
        tasks.push(tokio::spawn(async move {
            let mut seed = 0x2545_f491_4f6c_dd1d_u64 ^ (client as u64 + 1);
            let mut next = move |n: u64| {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                seed % n
            };
            let (mut kick_offs, mut polls, mut downloads) = (0u64, 0u64, 0u64);
            let mut mine: Vec<Job> = Vec::new();
            let mut answers: HashMap<String, u64> = HashMap::new();
            while started.elapsed() < length {
                let addr = &addrs[next(addrs.len() as u64) as usize];
                let roll = next(100);
                if roll < 40 || mine.is_empty() {
                    let (method, path) = match roll % 10 {
                        0 => (Method::POST, "/fhir/$reindex"),
                        1 => (Method::GET, "/fhir/$export?_type=Patient"),
                        _ => (Method::GET, "/fhir/Patient?_count=5"),
                    };
                    let url = format!("http://{addr}{path}");
                    let answer = http.kick_off(method, &url).await;
                    tally(&mut answers, "kick-off", answer.as_ref().map(|(s, _)| *s));
                    if let Ok((_, Some(location))) = answer {
                        kick_offs += 1;
                        mine.push(Job {
                            url: location,
                            cancelled: false,
                            delete_sent: false,
                        });
                    }
                } else if roll < 90 {
                    let job = &mine[next(mine.len() as u64) as usize];
                    if job.cancelled {
                        // Gone: polls go to jobs that may still answer.
                        continue;
                    }
                    let via = rewrite(&job.url, addr);
                    let answer = http.send(Method::GET, &via).await;
                    tally(&mut answers, "poll", answer.as_ref().map(|(s, _)| *s));
                    if let Ok((status, body)) = answer {
                        polls += 1;
                        // A finished export: download one of its files through another instance.
                        if status == StatusCode::OK && body.starts_with(b"{\"error\"") {
                            if let Some(file) = first_file(&body) {
                                let other = &addrs[next(addrs.len() as u64) as usize];
                                if let Ok((StatusCode::OK, _)) =
                                    http.send(Method::GET, &rewrite(&file, other)).await
                                {
                                    downloads += 1;
                                }
                            }
                        }
                    }
                } else {
                    let at = next(mine.len() as u64) as usize;
                    let via = rewrite(&mine[at].url, addr);
                    mine[at].delete_sent = true;
                    if let Ok((StatusCode::ACCEPTED, _)) = http.send(Method::DELETE, &via).await {
                        mine[at].cancelled = true;
                    }
                }
            }
            jobs.lock().expect("jobs").extend(mine);
            (kick_offs, polls, downloads, answers)
        }));
    }
    let mut stats = Stats::default();
    for task in tasks {
        if let Ok((k, p, d, answers)) = task.await {
            stats.kick_offs += k;
            stats.polls += p;
            stats.downloads += d;
            for (answer, n) in answers {
                *stats.answers.entry(answer).or_default() += n;
            }
        }
    }
    stats.secs = started.elapsed().as_secs_f64();
    if let Some(killer) = killer {
        let _ = killer.await;
    }
    stats.jobs = jobs;
    stats
}

/// The first `"url"` of a manifest.
fn first_file(manifest: &[u8]) -> Option<String> {
    let value: serde_json::Value = serde_json::from_slice(manifest).ok()?;
    value["output"][0]["url"].as_str().map(str::to_owned)
}

#[derive(Clone)]
struct Http {
    client: Client<HttpConnector, Full<Bytes>>,
}

impl Http {
    fn new() -> Self {
        Self {
            client: Client::builder(TokioExecutor::new()).build_http(),
        }
    }

    async fn send(&self, method: Method, url: &str) -> Result<(StatusCode, Bytes), String> {
        self.request(method, url, false)
            .await
            .map(|(s, _, b)| (s, b))
    }

    /// A kick-off with `Prefer: respond-async`: its status, and its status URL when accepted.
    async fn kick_off(
        &self,
        method: Method,
        url: &str,
    ) -> Result<(StatusCode, Option<String>), String> {
        let (status, location, _) = self.request(method, url, true).await?;
        Ok((status, location.filter(|_| status == StatusCode::ACCEPTED)))
    }

    async fn request(
        &self,
        method: Method,
        url: &str,
        respond_async: bool,
    ) -> Result<(StatusCode, Option<String>, Bytes), String> {
        let mut request = Request::builder()
            .method(method)
            .uri(url)
            .header("accept", "application/fhir+json");
        if respond_async {
            request = request.header("prefer", "respond-async");
        }
        let request = request
            .body(Full::new(Bytes::new()))
            .map_err(|e| e.to_string())?;
        let response = tokio::time::timeout(Duration::from_secs(10), self.client.request(request))
            .await
            .map_err(|_| "no answer within 10 s".to_owned())?
            .map_err(|e| e.to_string())?;
        let status = response.status();
        let location = response
            .headers()
            .get("content-location")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(|e| e.to_string())?
            .to_bytes();
        Ok((status, location, body))
    }
}

/// One demo server.
struct Instance {
    child: Child,
    addr: String,
}

impl Instance {
    fn start(demo: &std::path::Path, redis: &str, s3: &str, bucket: &str) -> Result<Self, String> {
        let mut child = Command::new(demo)
            .args([
                "--addr",
                "127.0.0.1:0",
                "--store",
                redis,
                "--patients",
                "200",
            ])
            .args([
                "--reindex-secs",
                "4",
                "--files",
                &format!("s3://{bucket}/files"),
            ])
            // All the bench's clients are one caller: the demo's per-caller limits off.
            .args(["--max-jobs-per-caller", "off", "--min-poll-interval", "off"])
            .args(["--max-running-jobs", "off"])
            .env("AWS_ENDPOINT", s3)
            .env("AWS_ALLOW_HTTP", "true")
            .env("AWS_ACCESS_KEY_ID", "bench")
            .env("AWS_SECRET_ACCESS_KEY", "bench")
            .env("AWS_DEFAULT_REGION", "us-east-1")
            .env("RUST_LOG", "error")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("starting {}: {e}", demo.display()))?;
        let stdout = child.stdout.take().ok_or("no stdout")?;
        let mut lines = std::io::BufReader::new(stdout).lines();
        let addr = loop {
            match lines.next() {
                Some(Ok(line)) => {
                    if let Some(base) = line.strip_prefix("listening on http://") {
                        break base.trim_end_matches("/fhir").to_owned();
                    }
                }
                _ => {
                    let _ = child.kill();
                    return Err("the demo exited before it listened".into());
                }
            }
        };
        // Keep reading its stdout, so that it never blocks on a full pipe.
        std::thread::spawn(move || for _ in lines {});
        Ok(Self { child, addr })
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Instance {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Builds the demo with the features it needs here; its path.
fn build_demo() -> Result<std::path::PathBuf, String> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let status = Command::new(cargo)
        .args([
            "build",
            "--release",
            "--example",
            "server",
            "--features",
            "redis,redis-cluster,s3",
        ])
        .status()
        .map_err(|e| format!("running cargo: {e}"))?;
    if !status.success() {
        return Err("building the demo failed".into());
    }
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    Ok(root.join("target/release/examples/server"))
}
