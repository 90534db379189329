//! Over the wire: a hyper server on 127.0.0.1:0 and a load generator in the same process, each on
//! a single-threaded tokio runtime in its own OS thread (server pinned to core 0, load generator
//! to core 1, with `taskset`, where possible). Each scenario gets a freshly built server:
//!
//! - bare hello: an axum `Router` answering `GET /fhir/Patient/1` with a small JSON body;
//! - pass-through: the same `Router` behind `AsyncLayer` (memory store), a `GET` without `Prefer`;
//! - kick-off: `POST /fhir/$instant` with `Prefer: respond-async`, answered at once inside;
//! - polls of a running job (`202`) and of a completed one (`200` + Bundle).
//!
//! Reports requests/s, p50 and p99 latency, and each rate as a ratio to bare hello against the
//! targets of the issue (pass-through ≥ 99 %, kick-off ≥ 50 %, polls ≥ 80 %). Every response's
//! status is checked; any error makes the bench fail. Rounds interleave the scenarios and each
//! keeps its best round, since load from elsewhere on the machine only slows a run down. Beside
//! the rates: each thread's share of CPU time, the server's CPU time per request (the layer's
//! cost, even when the load generator is the bottleneck), and the cores other processes kept busy.
//!
//! With `--features redis` and `REDIS_URL`, or `--features postgres` and `DATABASE_URL` (loopback
//! servers only), kick-off and completed polls also run against `RedisStore` and `PostgresStore`,
//! as a ratio to the server's own raw rate measured in the same run (`redis-benchmark`,
//! `pgbench -N` for kick-offs and `pgbench -S` for polls, on a throwaway database). What the bench writes to either store is removed.
//!
//! `cargo bench --bench wire`;
//! `REDIS_URL=redis://127.0.0.1:6379 DATABASE_URL=postgres://postgres@127.0.0.1:5432/test
//! cargo bench --bench wire --features redis,postgres`. `WIRE_BENCH_ROUNDS` (default 3) sets the
//! rounds, `WIRE_BENCH_SECS` (default 2) the measured seconds per scenario and round,
//! `WIRE_BENCH_WARMUP_MS` (default 500) the unmeasured warm-up before them, and
//! `WIRE_BENCH_CONNECTIONS` (default 32) the keep-alive HTTP/1.1 connections,
//! `WIRE_BENCH_MAX_CONCURRENT_JOBS` the layer's `max_concurrent_jobs` (default: the layer's),
//! `WIRE_BENCH_ONLY` (parts of scenario names, comma-separated) the memory-store scenarios that
//! run besides bare hello. Linux only: threads
//! are found and measured through `/proc`.

use std::net::SocketAddr;
use std::process::{Command, ExitCode};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::routing::{get, post};
use bytes::Bytes;
use http::header::{CONTENT_LOCATION, CONTENT_TYPE, HOST};
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, StatusCode, Uri};
use http_body_util::{BodyExt, Empty};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;
use tokio::net::{TcpListener, TcpStream};
use tower_fhir_async::{AsyncLayer, JobStore, MemoryStore};

const SECS_VAR: &str = "WIRE_BENCH_SECS";
const WARMUP_VAR: &str = "WIRE_BENCH_WARMUP_MS";
const CONNECTIONS_VAR: &str = "WIRE_BENCH_CONNECTIONS";
const ROUNDS_VAR: &str = "WIRE_BENCH_ROUNDS";
const ONLY_VAR: &str = "WIRE_BENCH_ONLY";

/// Below this share of the window on a CPU, neither thread of a memory scenario was the
/// bottleneck: the machine was busy with something else.
const BUSY: f64 = 0.8;

const SERVER_CORE: usize = 0;
const LOAD_CORE: usize = 1;

const PREFER: HeaderName = HeaderName::from_static("prefer");
const FHIR_JSON: [(HeaderName, &str); 1] = [(CONTENT_TYPE, "application/fhir+json")];
const PATIENT: &str = r#"{"resourceType":"Patient","id":"1","active":true,"name":[{"family":"Chalmers","given":["Peter","James"]}],"gender":"male","birthDate":"1974-12-25"}"#;

fn main() -> ExitCode {
    let Some(settings) = Settings::from_env() else {
        return ExitCode::FAILURE;
    };
    let started = Instant::now();
    println!(
        "over the wire: {} keep-alive HTTP/1.1 connections ({CONNECTIONS_VAR}); {} rounds \
         ({ROUNDS_VAR}) of {} s per scenario ({SECS_VAR}) after {} ms of warm-up ({WARMUP_VAR}); \
         server and load generator on a single-threaded tokio runtime each",
        settings.connections,
        settings.rounds,
        settings.secs,
        settings.warmup.as_millis(),
    );
    let mut report = Report::default();

    // Rounds interleave the scenarios, so that load from elsewhere on the machine touches all of
    // them; each scenario keeps its best round (other load only ever slows a run down).
    let mut runs: Vec<Vec<Run>> = Scenario::ALL.iter().map(|_| Vec::new()).collect();
    for round in 1..=settings.rounds {
        println!("round {round}:");
        for (scenario, runs) in Scenario::ALL.into_iter().zip(&mut runs) {
            if !scenario.selected() {
                continue;
            }
            runs.extend(report.measure(scenario, &Backend::Memory, settings));
        }
    }
    let best: Vec<Option<Run>> = runs.into_iter().map(best).collect();
    let bare = best[0].as_ref().map(Run::rate);

    println!();
    println!(
        "{:<30}{:>9}{:>10}{:>10}{:>9}{:>8}{:>8}{:>9}{:>12}{:>10}{:>8}",
        "scenario (memory store)",
        "req/s",
        "p50",
        "p99",
        "vs bare",
        "target",
        "",
        "srv CPU",
        "srv µs/req",
        "load CPU",
        "others"
    );
    let mut missed = Vec::new();
    for (scenario, run) in Scenario::ALL.into_iter().zip(&best) {
        let Some(run) = run else {
            let why = if scenario.selected() {
                "failed"
            } else {
                "skipped"
            };
            println!("{:<30}{:>9}", scenario.name(), why);
            continue;
        };
        let ratio = bare.map(|bare| run.rate() / bare);
        let (target, verdict) = match (scenario.target(), ratio) {
            (Some(target), Some(ratio)) => {
                let met = ratio >= target;
                if !met {
                    missed.push(scenario.name());
                }
                (
                    format!("{:.0} %", target * 100.0),
                    if met { "met" } else { "MISSED" },
                )
            }
            _ => ("-".to_owned(), ""),
        };
        println!(
            "{:<30}{:>9.0}{:>10}{:>10}{:>9}{:>8}{:>8}{:>9}{:>12}{:>10}{:>8}{}",
            scenario.name(),
            run.rate(),
            latency(run.p50),
            latency(run.p99),
            ratio.map_or("-".to_owned(), |r| format!("{:.1} %", r * 100.0)),
            target,
            verdict,
            percent(run.cpu.server),
            run.server_micros()
                .map_or("-".to_owned(), |us| format!("{us:.2}")),
            percent(run.cpu.load),
            run.cpu
                .others
                .map_or("-".to_owned(), |cores| format!("{cores:.2}")),
            if run.disturbed() { "  *" } else { "" },
        );
    }
    println!(
        "best of {} rounds each; srv CPU / load CPU: share of the window the server / load \
         generator thread was on a CPU; srv µs/req: server thread CPU time per request; others: \
         CPU cores busy with other processes meanwhile (from /proc/stat)",
        settings.rounds
    );
    if best.iter().flatten().any(Run::disturbed) {
        println!(
            "* in every round, neither thread was on a CPU {:.0} % of the window: the machine was \
             busy elsewhere, so the rate is too low and its ratio to bare hello unreliable; rerun \
             on a quiet machine, or with more rounds",
            BUSY * 100.0
        );
    }

    stores(&mut report, settings, bare);

    println!();
    report.print_pinning();
    if missed.is_empty() {
        println!("targets: all met");
    } else {
        println!("targets missed: {}", missed.join(", "));
    }
    println!("whole run: {:.0} s", started.elapsed().as_secs_f64());
    if report.failed {
        eprintln!("the bench failed: see the errors above");
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}

/// The run with the highest rate.
fn best(runs: Vec<Run>) -> Option<Run> {
    runs.into_iter()
        .max_by(|a, b| a.rate().total_cmp(&b.rate()))
}

// ---- settings ----------------------------------------------------------------------------------

#[derive(Debug, Clone, Copy)]
struct Settings {
    rounds: u64,
    secs: u64,
    warmup: Duration,
    connections: usize,
}

impl Settings {
    fn from_env() -> Option<Self> {
        Some(Self {
            rounds: positive(ROUNDS_VAR, 3)?,
            secs: positive(SECS_VAR, 2)?,
            warmup: Duration::from_millis(positive(WARMUP_VAR, 500)?),
            connections: usize::try_from(positive(CONNECTIONS_VAR, 32)?).ok()?,
        })
    }

    fn window(&self) -> Duration {
        Duration::from_secs(self.secs)
    }
}

/// The positive whole number in the environment variable `name`, else `default`.
fn positive(name: &str, default: u64) -> Option<u64> {
    let Ok(text) = std::env::var(name) else {
        return Some(default);
    };
    match text.trim().parse::<u64>() {
        Ok(n) if n > 0 => Some(n),
        _ => {
            eprintln!("{name}={text} is not a positive whole number; unset it or give one.");
            None
        }
    }
}

// ---- scenarios and stores ----------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Scenario {
    Bare,
    PassThrough,
    KickOff,
    PollRunning,
    PollCompleted,
    /// A bulk kick-off (`$export`), with the default `kickoff_wait`.
    BulkKickOff,
    /// The same with `kickoff_wait(ZERO)`: what the wait for the inner answer's head costs.
    BulkKickOffNoWait,
}

impl Scenario {
    const ALL: [Self; 7] = [
        Self::Bare,
        Self::PassThrough,
        Self::KickOff,
        Self::PollRunning,
        Self::PollCompleted,
        Self::BulkKickOff,
        Self::BulkKickOffNoWait,
    ];

    /// Whether this scenario runs: all do, unless `WIRE_BENCH_ONLY` names some (any part of
    /// their names, comma-separated); bare hello, the baseline, always runs.
    fn selected(self) -> bool {
        let Ok(only) = std::env::var(ONLY_VAR) else {
            return true;
        };
        self == Self::Bare
            || only
                .split(',')
                .any(|part| self.name().contains(part.trim()))
    }

    fn name(self) -> &'static str {
        match self {
            Self::Bare => "bare hello",
            Self::PassThrough => "hello behind the layer",
            Self::KickOff => "kick-off (instant inner)",
            Self::PollRunning => "poll, running job (202)",
            Self::PollCompleted => "poll, completed job (200)",
            Self::BulkKickOff => "bulk kick-off (kickoff_wait default)",
            Self::BulkKickOffNoWait => "bulk kick-off (kickoff_wait 0)",
        }
    }

    /// The issue's target, as a fraction of bare hello's rate.
    fn target(self) -> Option<f64> {
        match self {
            Self::Bare => None,
            Self::PassThrough => Some(0.99),
            Self::KickOff => Some(0.50),
            Self::PollRunning | Self::PollCompleted => Some(0.80),
            // Informational: the two side by side show what the kick-off's wait costs.
            Self::BulkKickOff | Self::BulkKickOffNoWait => None,
        }
    }
}

/// Where the layer keeps its jobs.
#[derive(Debug, Clone)]
enum Backend {
    Memory,
    #[cfg(feature = "redis")]
    Redis(String),
    #[cfg(feature = "postgres")]
    Postgres(String),
}

impl Backend {
    fn name(&self) -> &'static str {
        match self {
            Self::Memory => "memory",
            #[cfg(feature = "redis")]
            Self::Redis(_) => "redis",
            #[cfg(feature = "postgres")]
            Self::Postgres(_) => "postgres",
        }
    }
}

/// What a server removes from its store when it stops.
enum Cleanup {
    Nothing,
    #[cfg(feature = "redis")]
    RedisKeys {
        url: String,
        prefix: String,
    },
    #[cfg(feature = "postgres")]
    PostgresTable {
        pool: tower_fhir_async::store::sqlx::PgPool,
        table: String,
    },
}

impl Cleanup {
    async fn run(self) -> Result<(), String> {
        match self {
            Self::Nothing => Ok(()),
            #[cfg(feature = "redis")]
            Self::RedisKeys { url, prefix } => delete_redis_keys(&url, &prefix).await,
            #[cfg(feature = "postgres")]
            Self::PostgresTable { pool, table } => {
                use tower_fhir_async::store::sqlx::{self, AssertSqlSafe};
                let dropped =
                    sqlx::query(AssertSqlSafe(format!("DROP TABLE IF EXISTS \"{table}\"")))
                        .execute(&pool)
                        .await
                        .map(drop)
                        .map_err(|e| format!("dropping the table {table} failed: {e}"));
                pool.close().await;
                dropped
            }
        }
    }
}

/// The FHIR server the layer wraps: a resource read, an operation that answers at once, and one
/// that never answers.
fn fhir_routes() -> Router {
    Router::new()
        .route("/fhir/Patient/1", get(|| async { (FHIR_JSON, PATIENT) }))
        .route(
            "/fhir/$instant",
            post(|| async { (FHIR_JSON, r#"{"resourceType":"Parameters"}"#) }),
        )
        .route("/fhir/$never", post(std::future::pending::<StatusCode>))
        .route(
            "/fhir/$export",
            get(|| async {
                (
                    [(CONTENT_TYPE, "application/fhir+ndjson")],
                    "{\"resourceType\":\"Patient\",\"id\":\"1\"}\n",
                )
            }),
        )
}

fn layered(store: impl JobStore, scenario: Scenario) -> Router {
    let mut builder = AsyncLayer::builder(store).base_path("/fhir");
    if let Some(limit) = std::env::var("WIRE_BENCH_MAX_CONCURRENT_JOBS")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        builder = builder.max_concurrent_jobs(limit);
    }
    if scenario == Scenario::BulkKickOffNoWait {
        builder = builder.kickoff_wait(Duration::ZERO);
    }
    fhir_routes().layer(builder.build())
}

/// The application of `scenario`, built on the server's runtime (store clients spawn tasks).
async fn app(scenario: Scenario, backend: &Backend) -> Result<(Router, Cleanup), String> {
    if scenario == Scenario::Bare {
        return Ok((fhir_routes(), Cleanup::Nothing));
    }
    match backend {
        Backend::Memory => Ok((layered(MemoryStore::default(), scenario), Cleanup::Nothing)),
        #[cfg(feature = "redis")]
        Backend::Redis(url) => {
            // A prefix of its own, so the keys can be found and deleted afterwards.
            let prefix = format!(
                "tower-fhir-async-wire-bench-{}:",
                tower_fhir_async::JobId::new()
            );
            let store = tower_fhir_async::RedisStore::connect(url)
                .await
                .map_err(|e| format!("connecting to Redis at {url} failed: {e}"))?
                .with_prefix(prefix.clone());
            let cleanup = Cleanup::RedisKeys {
                url: url.clone(),
                prefix,
            };
            Ok((layered(store, scenario), cleanup))
        }
        #[cfg(feature = "postgres")]
        Backend::Postgres(url) => {
            use tower_fhir_async::PostgresStore;
            use tower_fhir_async::store::sqlx::postgres::PgPoolOptions;
            // As many connections as `pgbench` gets clients, so the raw rate is comparable.
            let pool = PgPoolOptions::new()
                .max_connections(PGBENCH_CLIENTS)
                .acquire_timeout(Duration::from_secs(10))
                .connect(url)
                .await
                .map_err(|e| format!("connecting to PostgreSQL at {url} failed: {e}"))?;
            let table = format!("bench_jobs_{}", tower_fhir_async::JobId::new());
            let store = PostgresStore::new(pool.clone()).with_table(&table);
            let cleanup = Cleanup::PostgresTable { pool, table };
            if let Err(error) = store.migrate().await {
                let _ = cleanup.run().await;
                return Err(format!("creating the jobs table failed: {error}"));
            }
            Ok((layered(store, scenario), cleanup))
        }
    }
}

// ---- one measurement ---------------------------------------------------------------------------

/// What one scenario measured.
struct Run {
    /// Requests answered as expected in the measured window.
    requests: usize,
    secs: f64,
    p50: u64,
    p99: u64,
    cpu: CpuUse,
}

impl Run {
    fn rate(&self) -> f64 {
        self.requests as f64 / self.secs
    }

    /// Whether neither thread kept its CPU busy: in a scenario answered from memory one of them
    /// is the bottleneck, unless something else takes their cores.
    fn disturbed(&self) -> bool {
        let (Some(server), Some(load)) = (self.cpu.server, self.cpu.load) else {
            return false;
        };
        server.max(load) < BUSY
    }

    /// The server thread's CPU time per request, in microseconds.
    fn server_micros(&self) -> Option<f64> {
        self.cpu
            .server
            .map(|share| share * self.secs / self.requests as f64 * 1e6)
    }
}

/// Where the CPU time of a measured window went.
#[derive(Debug, Clone, Copy, Default)]
struct CpuUse {
    /// Share of the window the server thread was on a CPU.
    server: Option<f64>,
    /// Share of the window the load generator's thread was on a CPU.
    load: Option<f64>,
    /// CPU cores kept busy by other processes.
    others: Option<f64>,
}

/// The errors and pinning notes of the whole run.
#[derive(Default)]
struct Report {
    failed: bool,
    pinning: Vec<String>,
}

impl Report {
    /// Runs `scenario` against a fresh server; `None` (and the run fails) on any error.
    fn measure(
        &mut self,
        scenario: Scenario,
        backend: &Backend,
        settings: Settings,
    ) -> Option<Run> {
        let label = format!("{} / {}", backend.name(), scenario.name());
        match measure(scenario, backend, settings) {
            Ok(Measured {
                run,
                errors,
                first_error,
                pinning,
            }) => {
                for note in pinning {
                    if !self.pinning.contains(&note) {
                        self.pinning.push(note);
                    }
                }
                if errors > 0 {
                    eprintln!(
                        "{label}: {errors} requests failed; the first: {}",
                        first_error.unwrap_or_default()
                    );
                    self.failed = true;
                }
                println!(
                    "  {label}: {:.0} req/s, p99 {}{}",
                    run.rate(),
                    latency(run.p99),
                    if errors > 0 {
                        format!(", {errors} ERRORS")
                    } else {
                        String::new()
                    }
                );
                Some(run)
            }
            Err(why) => {
                eprintln!("{label}: {why}");
                self.failed = true;
                None
            }
        }
    }

    /// Runs `scenario` once per round, one round after the other, and keeps the best.
    #[cfg(any(feature = "redis", feature = "postgres"))]
    fn best_of_rounds(
        &mut self,
        scenario: Scenario,
        backend: &Backend,
        settings: Settings,
    ) -> Option<Run> {
        let runs = (0..settings.rounds)
            .filter_map(|_| self.measure(scenario, backend, settings))
            .collect();
        best(runs)
    }

    fn print_pinning(&self) {
        if self.pinning.is_empty() {
            println!(
                "pinning: server thread on core {SERVER_CORE}, load generator on core {LOAD_CORE} \
                 (taskset)"
            );
        }
        for note in &self.pinning {
            println!("pinning: {note}; that thread was left to the scheduler");
        }
    }
}

struct Measured {
    run: Run,
    errors: u64,
    first_error: Option<String>,
    /// Why a thread could not be pinned, if it could not.
    pinning: Vec<String>,
}

fn measure(scenario: Scenario, backend: &Backend, settings: Settings) -> Result<Measured, String> {
    let server = Server::start(scenario, backend.clone())?;
    let addr = server.addr;
    let server_tid = server.tid;
    let load = std::thread::Builder::new()
        .name("wire-load".into())
        .spawn(move || {
            let tid = thread_id();
            let pinned = pin(tid, LOAD_CORE);
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| format!("building the load generator's runtime failed: {e}"))?;
            let tids = [server_tid, tid];
            runtime
                .block_on(drive(addr, scenario, settings, tids))
                .map(|load| (load, pinned))
        })
        .map_err(|e| format!("starting the load generator's thread failed: {e}"))?;
    let load = load
        .join()
        .unwrap_or_else(|_| Err("the load generator panicked".into()));
    let server_pinned = server.pinned.clone();
    let stopped = server.stop();
    let (load, load_pinned) = load?;
    stopped?;
    let pinning = [server_pinned, load_pinned]
        .into_iter()
        .filter_map(Result::err)
        .collect();
    Ok(Measured {
        run: load.run,
        errors: load.errors,
        first_error: load.first_error,
        pinning,
    })
}

// ---- the server --------------------------------------------------------------------------------

struct Server {
    addr: SocketAddr,
    tid: Option<u32>,
    pinned: Result<(), String>,
    stop: tokio::sync::oneshot::Sender<()>,
    thread: std::thread::JoinHandle<Result<(), String>>,
}

impl Server {
    /// Builds the application of `scenario` and serves it on 127.0.0.1:0 from a thread of its own.
    fn start(scenario: Scenario, backend: Backend) -> Result<Self, String> {
        let (ready, is_ready) = std::sync::mpsc::channel();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("wire-server".into())
            .spawn(move || {
                let tid = thread_id();
                let pinned = pin(tid, SERVER_CORE);
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .map_err(|e| format!("building the server's runtime failed: {e}"))?;
                runtime.block_on(async move {
                    let (app, cleanup) = match app(scenario, &backend).await {
                        Ok(built) => built,
                        Err(why) => {
                            let _ = ready.send(Err(why));
                            return Ok(());
                        }
                    };
                    let listener = match TcpListener::bind("127.0.0.1:0").await {
                        Ok(listener) => listener,
                        Err(e) => {
                            let _ = ready.send(Err(format!("binding 127.0.0.1:0 failed: {e}")));
                            return cleanup.run().await;
                        }
                    };
                    let addr = listener.local_addr().map_err(|e| e.to_string());
                    let _ = ready.send(addr.map(|addr| (addr, tid, pinned)));
                    serve(listener, app, stopped).await;
                    cleanup.run().await
                })
            })
            .map_err(|e| format!("starting the server's thread failed: {e}"))?;
        match is_ready.recv() {
            Ok(Ok((addr, tid, pinned))) => Ok(Self {
                addr,
                tid,
                pinned,
                stop,
                thread,
            }),
            Ok(Err(why)) => {
                let _ = thread.join();
                Err(why)
            }
            Err(_) => Err(match thread.join() {
                Ok(Err(why)) => why,
                _ => "the server thread ended before serving".into(),
            }),
        }
    }

    /// Stops accepting, drops the open connections with the runtime, and cleans the store up.
    fn stop(self) -> Result<(), String> {
        let _ = self.stop.send(());
        self.thread
            .join()
            .unwrap_or_else(|_| Err("the server panicked".into()))
    }
}

/// Serves HTTP/1.1 with hyper until `stopped` fires.
async fn serve(
    listener: TcpListener,
    app: Router,
    mut stopped: tokio::sync::oneshot::Receiver<()>,
) {
    loop {
        let stream = tokio::select! {
            _ = &mut stopped => return,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(_) => continue,
            },
        };
        // Small answers on keep-alive connections: Nagle would only add delay.
        let _ = stream.set_nodelay(true);
        let service = TowerToHyperService::new(app.clone());
        tokio::spawn(async move {
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

// ---- the load generator ------------------------------------------------------------------------

/// The request every connection sends over and over, and what its answer must be.
struct Probe {
    method: Method,
    uri: Uri,
    host: HeaderValue,
    respond_async: bool,
    expect: StatusCode,
    check: Check,
}

#[derive(Clone, Copy)]
enum Check {
    Status,
    /// A kick-off's answer names its status URL.
    ContentLocation,
    /// A completed job's status is a Bundle.
    Bundle,
}

impl Probe {
    fn request(&self) -> Request<Empty<Bytes>> {
        let mut request = Request::new(Empty::new());
        *request.method_mut() = self.method.clone();
        *request.uri_mut() = self.uri.clone();
        let headers = request.headers_mut();
        headers.insert(HOST, self.host.clone());
        if self.respond_async {
            headers.insert(PREFER, HeaderValue::from_static("respond-async"));
        }
        request
    }
}

/// What the connections of one scenario measured together.
struct Load {
    run: Run,
    errors: u64,
    first_error: Option<String>,
}

/// What one connection measured.
#[derive(Default)]
struct Tally {
    latencies: Vec<u64>,
    errors: u64,
    first_error: Option<String>,
}

impl Tally {
    fn error(&mut self, why: String) {
        self.errors += 1;
        self.first_error.get_or_insert(why);
    }
}

/// Sets up `scenario`, then loops its request on every connection for the warm-up and the
/// measured window. `tids`: the server's and this thread's ids, for their CPU time.
async fn drive(
    addr: SocketAddr,
    scenario: Scenario,
    settings: Settings,
    tids: [Option<u32>; 2],
) -> Result<Load, String> {
    let host = HeaderValue::from_str(&addr.to_string()).map_err(|e| e.to_string())?;
    let mut connections = Vec::with_capacity(settings.connections);
    for _ in 0..settings.connections {
        connections.push(connect(addr).await?);
    }
    let probe = Arc::new(setup(&mut connections[0], scenario, host).await?);

    let from = Instant::now() + settings.warmup;
    let until = from + settings.window();
    let cpu = tokio::spawn(cpu_use(from, until, tids));
    let tasks: Vec<_> = connections
        .into_iter()
        .map(|sender| tokio::spawn(hammer(sender, probe.clone(), from, until)))
        .collect();
    let mut total = Tally::default();
    for task in tasks {
        let tally = task
            .await
            .map_err(|e| format!("a connection's task failed: {e}"))?;
        total.latencies.extend(tally.latencies);
        total.errors += tally.errors;
        if total.first_error.is_none() {
            total.first_error = tally.first_error;
        }
    }
    let cpu = cpu.await.map_err(|e| e.to_string())?;
    if total.latencies.is_empty() {
        return Err(format!(
            "no request was answered in the window ({} errors; the first: {})",
            total.errors,
            total.first_error.unwrap_or_default()
        ));
    }
    let mut latencies = total.latencies;
    latencies.sort_unstable();
    let run = Run {
        requests: latencies.len(),
        secs: settings.window().as_secs_f64(),
        p50: percentile(&latencies, 0.50),
        p99: percentile(&latencies, 0.99),
        cpu,
    };
    Ok(Load {
        run,
        errors: total.errors,
        first_error: total.first_error,
    })
}

/// A keep-alive HTTP/1.1 connection to `addr`.
async fn connect(addr: SocketAddr) -> Result<SendRequest<Empty<Bytes>>, String> {
    let stream = TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connecting to {addr} failed: {e}"))?;
    let _ = stream.set_nodelay(true);
    let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| format!("the HTTP/1.1 handshake with {addr} failed: {e}"))?;
    tokio::spawn(connection);
    Ok(sender)
}

/// The request of `scenario`; for polls, kicks off the job (and waits for it to complete).
async fn setup(
    sender: &mut SendRequest<Empty<Bytes>>,
    scenario: Scenario,
    host: HeaderValue,
) -> Result<Probe, String> {
    let probe = |method, uri: &str, respond_async, expect, check| -> Result<Probe, String> {
        Ok(Probe {
            method,
            uri: uri.parse().map_err(|e| format!("{uri}: {e}"))?,
            host: host.clone(),
            respond_async,
            expect,
            check,
        })
    };
    let hello = |expect| probe(Method::GET, "/fhir/Patient/1", false, expect, Check::Status);
    match scenario {
        Scenario::Bare | Scenario::PassThrough => hello(StatusCode::OK),
        Scenario::KickOff => probe(
            Method::POST,
            "/fhir/$instant",
            true,
            StatusCode::ACCEPTED,
            Check::ContentLocation,
        ),
        Scenario::BulkKickOff | Scenario::BulkKickOffNoWait => probe(
            Method::GET,
            "/fhir/$export",
            true,
            StatusCode::ACCEPTED,
            Check::ContentLocation,
        ),
        Scenario::PollRunning | Scenario::PollCompleted => {
            let operation = if scenario == Scenario::PollRunning {
                "/fhir/$never"
            } else {
                "/fhir/$instant"
            };
            let kick = probe(
                Method::POST,
                operation,
                true,
                StatusCode::ACCEPTED,
                Check::Status,
            )?;
            let (status, headers, body) = send(sender, kick.request()).await?;
            if status != StatusCode::ACCEPTED {
                return Err(format!(
                    "the kick-off answered {status}, not 202: {}",
                    String::from_utf8_lossy(&body)
                ));
            }
            let location = headers
                .get(CONTENT_LOCATION)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<Uri>().ok())
                .ok_or("the kick-off's answer has no Content-Location URL")?;
            let path = location.path().to_owned();
            if scenario == Scenario::PollRunning {
                return probe(
                    Method::GET,
                    &path,
                    false,
                    StatusCode::ACCEPTED,
                    Check::Status,
                );
            }
            let poll = probe(Method::GET, &path, false, StatusCode::OK, Check::Bundle)?;
            for _ in 0..500 {
                let (status, _, body) = send(sender, poll.request()).await?;
                match status {
                    StatusCode::OK => return Ok(poll),
                    StatusCode::ACCEPTED => tokio::time::sleep(Duration::from_millis(10)).await,
                    other => {
                        return Err(format!(
                            "polling the job answered {other}: {}",
                            String::from_utf8_lossy(&body)
                        ));
                    }
                }
            }
            Err("the instant job did not complete within 5 s".into())
        }
    }
}

/// One exchange, the body read in full.
async fn send(
    sender: &mut SendRequest<Empty<Bytes>>,
    request: Request<Empty<Bytes>>,
) -> Result<(StatusCode, HeaderMap, Bytes), String> {
    sender
        .ready()
        .await
        .map_err(|e| format!("the connection closed: {e}"))?;
    let response = sender
        .send_request(request)
        .await
        .map_err(|e| format!("the request failed: {e}"))?;
    let (parts, body) = response.into_parts();
    let body = body
        .collect()
        .await
        .map_err(|e| format!("reading the response body failed: {e}"))?
        .to_bytes();
    Ok((parts.status, parts.headers, body))
}

/// Sends `probe`'s request until `until`, recording the latency of those sent from `from` on.
async fn hammer(
    mut sender: SendRequest<Empty<Bytes>>,
    probe: Arc<Probe>,
    from: Instant,
    until: Instant,
) -> Tally {
    let mut tally = Tally::default();
    loop {
        let began = Instant::now();
        if began >= until {
            return tally;
        }
        let answer = send(&mut sender, probe.request()).await;
        let took = began.elapsed();
        let (status, headers, body) = match answer {
            Ok(answer) => answer,
            Err(why) => {
                // The connection is gone: its part of the load ends here.
                tally.error(why);
                return tally;
            }
        };
        let fine = status == probe.expect
            && match probe.check {
                Check::Status => true,
                Check::ContentLocation => headers.contains_key(CONTENT_LOCATION),
                Check::Bundle => memchr::memmem::find(&body, br#""Bundle""#).is_some(),
            };
        if !fine {
            tally.error(format!(
                "{} {} answered {status} (expected {}): {headers:?} {}",
                probe.method,
                probe.uri,
                probe.expect,
                String::from_utf8_lossy(&body)
            ));
        } else if began >= from {
            tally
                .latencies
                .push(u64::try_from(took.as_nanos()).unwrap_or(u64::MAX));
        }
    }
}

/// Where the CPU time of `from..until` went; `tids`: the server's and the load generator's
/// threads.
async fn cpu_use(from: Instant, until: Instant, tids: [Option<u32>; 2]) -> CpuUse {
    let sample = || {
        (
            tids.map(|tid| tid.and_then(thread_cpu_ns)),
            machine_ticks(),
            process_ticks(),
        )
    };
    tokio::time::sleep_until(from.into()).await;
    let started = Instant::now();
    let (threads_before, machine_before, process_before) = sample();
    tokio::time::sleep_until(until.into()).await;
    let (threads_after, machine_after, process_after) = sample();
    let wall = started.elapsed().as_nanos() as f64;
    let share = |i: usize| match (threads_before[i], threads_after[i]) {
        (Some(before), Some(after)) => Some(after.saturating_sub(before) as f64 / wall),
        _ => None,
    };
    let others = match (machine_before, machine_after, process_before, process_after) {
        (Some((busy0, all0)), Some((busy1, all1)), Some(own0), Some(own1)) if all1 > all0 => {
            let cores = std::thread::available_parallelism().map_or(1, usize::from) as f64;
            let others = (busy1 - busy0).saturating_sub(own1.saturating_sub(own0));
            Some(others as f64 / (all1 - all0) as f64 * cores)
        }
        _ => None,
    };
    CpuUse {
        server: share(0),
        load: share(1),
        others,
    }
}

/// The nearest-rank percentile `p` of sorted `values`.
fn percentile(values: &[u64], p: f64) -> u64 {
    let rank = (p * values.len() as f64).ceil() as usize;
    values[rank.clamp(1, values.len()) - 1]
}

fn latency(nanos: u64) -> String {
    let micros = nanos as f64 / 1e3;
    if micros < 10_000.0 {
        format!("{micros:.0} µs")
    } else {
        format!("{:.1} ms", micros / 1e3)
    }
}

fn percent(share: Option<f64>) -> String {
    share.map_or("-".to_owned(), |s| format!("{:.0} %", s * 100.0))
}

// ---- threads -----------------------------------------------------------------------------------

/// This OS thread's id: `/proc/thread-self` links to `<pid>/task/<tid>`.
fn thread_id() -> Option<u32> {
    std::fs::read_link("/proc/thread-self")
        .ok()?
        .file_name()?
        .to_str()?
        .parse()
        .ok()
}

/// Pins thread `tid` to `core` with `taskset`; why not, when that cannot be done.
fn pin(tid: Option<u32>, core: usize) -> Result<(), String> {
    let cores = std::thread::available_parallelism().map_or(1, usize::from);
    if cores <= core {
        return Err(format!("only {cores} core(s) available, no core {core}"));
    }
    let Some(tid) = tid else {
        return Err("no thread id (/proc/thread-self unreadable)".into());
    };
    let output = Command::new("taskset")
        .args(["-cp", &core.to_string(), &tid.to_string()])
        .output()
        .map_err(|e| format!("taskset could not be run: {e}"))?;
    if output.status.success() {
        Ok(())
    } else {
        Err(format!(
            "taskset -cp {core} {tid} failed: {}",
            String::from_utf8_lossy(&output.stderr).trim()
        ))
    }
}

/// Nanoseconds thread `tid` of this process has spent on a CPU.
fn thread_cpu_ns(tid: u32) -> Option<u64> {
    std::fs::read_to_string(format!("/proc/self/task/{tid}/schedstat"))
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// The machine's busy and total CPU time so far, in clock ticks (`/proc/stat`).
fn machine_ticks() -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let ticks: Vec<u64> = stat
        .lines()
        .next()?
        .strip_prefix("cpu ")?
        .split_whitespace()
        .map(|n| n.parse().ok())
        .collect::<Option<_>>()?;
    // user nice system idle iowait irq softirq steal (guest time is counted in user already).
    let all: u64 = ticks.iter().take(8).sum();
    let idle = ticks.get(3)? + ticks.get(4)?;
    Some((all - idle, all))
}

/// This process's user and system CPU time so far, in clock ticks (`/proc/self/stat`).
fn process_ticks() -> Option<u64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // The command name, in parentheses, may hold spaces; the fields after it do not.
    let mut fields = stat.rsplit_once(')')?.1.split_whitespace();
    // utime and stime are fields 14 and 15; the rest starts at field 3.
    let utime: u64 = fields.nth(11)?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(utime + stime)
}

// ---- the shared stores -------------------------------------------------------------------------

/// Without the store features: only says so when a store's URL is set.
#[cfg(not(any(feature = "redis", feature = "postgres")))]
fn stores(_: &mut Report, _: Settings, _: Option<f64>) {
    for (var, feature) in [("REDIS_URL", "redis"), ("DATABASE_URL", "postgres")] {
        if std::env::var_os(var).is_some() {
            println!("{var} is set, but the bench was built without `--features {feature}`");
        }
    }
}

/// Clients of `pgbench`, and connections of the `PostgresStore` pool.
#[cfg(feature = "postgres")]
const PGBENCH_CLIENTS: u32 = 8;
/// How long each `pgbench` run takes.
#[cfg(feature = "postgres")]
const PGBENCH_SECS: u64 = 5;

/// A store's own rate, measured by its own tool.
#[cfg(any(feature = "redis", feature = "postgres"))]
#[derive(Clone)]
struct RawRate {
    what: String,
    per_sec: f64,
}

/// A scenario run against a shared store, and the rate it is compared with.
#[cfg(any(feature = "redis", feature = "postgres"))]
struct StoreRow {
    store: &'static str,
    scenario: Scenario,
    run: Run,
    raw: Result<RawRate, String>,
}

/// Kick-off and completed polls with `RedisStore` and `PostgresStore`, against the stores' own
/// rates, when the URLs are set.
#[cfg(any(feature = "redis", feature = "postgres"))]
fn stores(report: &mut Report, settings: Settings, bare: Option<f64>) {
    let mut rows = Vec::new();
    redis_rows(report, settings, &mut rows);
    postgres_rows(report, settings, &mut rows);
    if rows.is_empty() {
        return;
    }
    println!();
    println!(
        "{:<10}{:<27}{:>9}{:>10}{:>10}{:>9}{:>36}{:>8}{:>9}{:>12}{:>8}",
        "store",
        "scenario",
        "req/s",
        "p50",
        "p99",
        "vs bare",
        "the store's raw rate",
        "vs raw",
        "srv CPU",
        "srv µs/req",
        "others"
    );
    for row in &rows {
        let rate = row.run.rate();
        let (raw, vs_raw) = match &row.raw {
            Ok(raw) => (
                format!("{} {:.0}/s", raw.what, raw.per_sec),
                format!("{:.1} %", rate / raw.per_sec * 100.0),
            ),
            Err(_) => ("not measured".to_owned(), "-".to_owned()),
        };
        println!(
            "{:<10}{:<27}{:>9.0}{:>10}{:>10}{:>9}{:>36}{:>8}{:>9}{:>12}{:>8}",
            row.store,
            row.scenario.name(),
            rate,
            latency(row.run.p50),
            latency(row.run.p99),
            bare.map_or("-".to_owned(), |b| format!("{:.1} %", rate / b * 100.0)),
            raw,
            vs_raw,
            percent(row.run.cpu.server),
            row.run
                .server_micros()
                .map_or("-".to_owned(), |us| format!("{us:.2}")),
            row.run
                .cpu
                .others
                .map_or("-".to_owned(), |cores| format!("{cores:.2}")),
        );
    }
    let mut notes: Vec<&String> = rows
        .iter()
        .filter_map(|row| row.raw.as_ref().err())
        .collect();
    notes.dedup();
    for why in notes {
        println!("raw rate not measured: {why}");
    }
    println!(
        "the store servers share the machine's two cores with the bench's threads, unpinned, both \
         for their raw rates and under the layer; their CPU time is part of `others`"
    );
}

#[cfg(feature = "redis")]
fn redis_rows(report: &mut Report, settings: Settings, rows: &mut Vec<StoreRow>) {
    let Some(url) = store_url("REDIS_URL") else {
        return;
    };
    let [set, get] = redis_raw(&url, settings);
    let backend = Backend::Redis(url);
    for (scenario, raw) in [(Scenario::KickOff, set), (Scenario::PollCompleted, get)] {
        if let Some(run) = report.best_of_rounds(scenario, &backend, settings) {
            rows.push(StoreRow {
                store: "redis",
                scenario,
                run,
                raw,
            });
        }
    }
}

#[cfg(all(feature = "postgres", not(feature = "redis")))]
fn redis_rows(_: &mut Report, _: Settings, _: &mut Vec<StoreRow>) {
    if std::env::var_os("REDIS_URL").is_some() {
        println!("REDIS_URL is set, but the bench was built without `--features redis`");
    }
}

#[cfg(feature = "postgres")]
fn postgres_rows(report: &mut Report, settings: Settings, rows: &mut Vec<StoreRow>) {
    let Some(url) = store_url("DATABASE_URL") else {
        return;
    };
    // A kick-off writes (one committed transaction of `pgbench -N`); a poll reads (`-S`).
    let raws = pgbench_raw(&url);
    let (writes, reads) = match raws {
        Ok((writes, reads)) => (Ok(writes), Ok(reads)),
        Err(why) => (Err(why.clone()), Err(why)),
    };
    let backend = Backend::Postgres(url);
    for (scenario, raw) in [
        (Scenario::KickOff, writes),
        (Scenario::PollCompleted, reads),
    ] {
        if let Some(run) = report.best_of_rounds(scenario, &backend, settings) {
            rows.push(StoreRow {
                store: "postgres",
                scenario,
                run,
                raw,
            });
        }
    }
}

#[cfg(all(feature = "redis", not(feature = "postgres")))]
fn postgres_rows(_: &mut Report, _: Settings, _: &mut Vec<StoreRow>) {
    if std::env::var_os("DATABASE_URL").is_some() {
        println!("DATABASE_URL is set, but the bench was built without `--features postgres`");
    }
}

/// The URL in `var`, if set and naming a loopback host: the bench loads only this machine.
#[cfg(any(feature = "redis", feature = "postgres"))]
fn store_url(var: &str) -> Option<String> {
    let url = std::env::var(var)
        .ok()
        .filter(|url| !url.trim().is_empty())?;
    if loopback(&url) {
        Some(url)
    } else {
        println!("{var}={url} names no loopback host; its scenarios are skipped");
        None
    }
}

/// Whether `url` (`scheme://[user[:password]@]host[:port][/…]`) names a loopback host.
#[cfg(any(feature = "redis", feature = "postgres"))]
fn loopback(url: &str) -> bool {
    let Some((_, rest)) = url.split_once("://") else {
        return false;
    };
    let authority = rest.split(['/', '?']).next().unwrap_or_default();
    let host_port = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    let host = match host_port.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or_default(),
        None => host_port.split(':').next().unwrap_or_default(),
    };
    matches!(host, "127.0.0.1" | "localhost" | "::1")
}

/// Runs `program` and returns its standard output, or why it failed.
#[cfg(any(feature = "redis", feature = "postgres"))]
fn run_tool(program: &str, args: &[&str]) -> Result<String, String> {
    let output = Command::new(program)
        .args(args)
        .output()
        .map_err(|e| format!("{program} could not be run: {e}"))?;
    if !output.status.success() {
        return Err(format!(
            "{program} {} failed ({}): {}",
            args.join(" "),
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// `redis-benchmark -t set,get`: the server's own SET and GET rates, with as many clients as the
/// bench has connections.
#[cfg(feature = "redis")]
fn redis_raw(url: &str, settings: Settings) -> [Result<RawRate, String>; 2] {
    let clients = settings.connections.to_string();
    let args = [
        "-u", url, "-q", "-t", "set,get", "-n", "100000", "-c", &clients,
    ];
    let output = match run_tool("redis-benchmark", &args) {
        Ok(output) => output,
        Err(why) => return [Err(why.clone()), Err(why)],
    };
    // `-q` prints progress lines ending in `\r`, then `SET: 53908.36 requests per second, …`.
    let rate = |test: &str| {
        output
            .split(['\r', '\n'])
            .filter_map(|line| line.trim().strip_prefix(test)?.strip_prefix(": "))
            .find_map(|rest| {
                let (number, rest) = rest.split_once(' ')?;
                rest.starts_with("requests per second")
                    .then(|| number.parse().ok())?
            })
            .map(|per_sec| RawRate {
                what: format!("redis-benchmark {test} -c {clients}"),
                per_sec,
            })
            .ok_or_else(|| format!("no {test} rate in redis-benchmark's output: {output:?}"))
    };
    [rate("SET"), rate("GET")]
}

/// Deletes every key under `prefix`.
#[cfg(feature = "redis")]
async fn delete_redis_keys(url: &str, prefix: &str) -> Result<(), String> {
    use tower_fhir_async::redis;
    let failed = |e: redis::RedisError| format!("deleting the bench's Redis keys failed: {e}");
    let client = redis::Client::open(url).map_err(failed)?;
    let mut connection = client
        .get_multiplexed_async_connection()
        .await
        .map_err(failed)?;
    let mut cursor = 0u64;
    loop {
        let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(format!("{prefix}*"))
            .arg("COUNT")
            .arg(1000)
            .query_async(&mut connection)
            .await
            .map_err(failed)?;
        if !keys.is_empty() {
            let _: i64 = redis::cmd("DEL")
                .arg(&keys)
                .query_async(&mut connection)
                .await
                .map_err(failed)?;
        }
        if next == 0 {
            return Ok(());
        }
        cursor = next;
    }
}

/// `pgbench -N` (one write transaction each: updates and an insert, no contended branch rows)
/// and `pgbench -S` (select only), scale 1, with as many clients as the store's pool has
/// connections, on a throwaway database created next to the one in `url` and dropped
/// afterwards: (writes, reads).
#[cfg(feature = "postgres")]
fn pgbench_raw(url: &str) -> Result<(RawRate, RawRate), String> {
    let name = format!("bench_pgbench_{}", std::process::id());
    let scratch = with_database(url, &name)
        .ok_or_else(|| format!("DATABASE_URL={url} is not postgres://…/database"))?;
    let maintenance = format!("--maintenance-db={url}");
    run_tool("createdb", &[&maintenance, &name])?;
    let clients = PGBENCH_CLIENTS.to_string();
    let secs = PGBENCH_SECS.to_string();
    let rate = |mode: &str| -> Result<RawRate, String> {
        let output = run_tool(
            "pgbench",
            &[mode, "-c", &clients, "-j", "1", "-T", &secs, &scratch],
        )?;
        // `tps = 12345.678901 (without initial connection time)`
        output
            .lines()
            .filter_map(|line| line.trim().strip_prefix("tps = "))
            .find_map(|rest| rest.split_whitespace().next()?.parse().ok())
            .map(|per_sec| RawRate {
                what: format!("pgbench {mode} -c {clients}"),
                per_sec,
            })
            .ok_or_else(|| format!("no tps in pgbench's output: {output:?}"))
    };
    let measured = run_tool("pgbench", &["-i", "-s", "1", "-q", &scratch])
        .and_then(|_| Ok((rate("-N")?, rate("-S")?)));
    let dropped = run_tool("dropdb", &[&maintenance, "--if-exists", &name]);
    let measured = measured?;
    dropped.map_err(|why| format!("measured, but the scratch database was not dropped: {why}"))?;
    Ok(measured)
}

/// `url` with its database replaced by `database`.
#[cfg(feature = "postgres")]
fn with_database(url: &str, database: &str) -> Option<String> {
    let (scheme, rest) = url.split_once("://")?;
    let (authority, path) = rest.split_at(rest.find('/')?);
    let query = path.find('?').map_or("", |at| &path[at..]);
    Some(format!("{scheme}://{authority}/{database}{query}"))
}
