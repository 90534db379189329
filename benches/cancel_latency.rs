//! Cross-instance cancel latency (issue #6 item 5): two instances A and B of the layer share a
//! Redis or PostgreSQL store; a job kicked off through A runs an inner future that never
//! finishes; a DELETE goes through B. Measures the time until A drops that inner future, from the
//! moment the DELETE is sent and from B's `202`, with cancels pushed (Redis pub/sub, PostgreSQL
//! `NOTIFY`) and poll-only (A's lease checks, every third of the lease). Reports p50, p99 and
//! max against issue #4's target: within 100 ms through push, within the check interval without.
//!
//! `cargo bench --bench cancel_latency --features redis,postgres`. Connects to `REDIS_URL`
//! (default `redis://127.0.0.1:6379`) and `DATABASE_URL` (default
//! `postgres://postgres@127.0.0.1:5432/test`), loopback addresses only; each mode works under a
//! Redis key prefix or in a PostgreSQL table of its own, removed afterwards.
//! `CANCEL_BENCH_PUSH_TRIALS` (default 200) and `CANCEL_BENCH_POLL_TRIALS` (default 20) change
//! the number of trials; `CANCEL_BENCH_PUSH_LEASE` (seconds, default 30) the push modes' lease,
//! to see pushes arriving while lease checks run.
//!
//! Both instances live in one process and are called with `oneshot`, so the figures leave out
//! HTTP and the network between instances, and count only the store's round trips.

use std::convert::Infallible;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use futures_util::FutureExt;
use http::{Request, Response, StatusCode, header};
use http_body_util::Full;
use tokio::sync::mpsc;
use tower::{Layer, Service, ServiceExt, service_fn};
use tower_fhir_async::redis::aio::{ConnectionManager, MultiplexedConnection};
use tower_fhir_async::redis::{self, Client};
use tower_fhir_async::store::sqlx::postgres::PgPoolOptions;
use tower_fhir_async::store::sqlx::{self, AssertSqlSafe, PgPool};
use tower_fhir_async::store::{Changes, DelegateStore};
use tower_fhir_async::{
    AsyncLayer, JobId, JobStore, PostgresStore, RedisStore, RequestBody, StoreError,
};

/// The public base both instances share, as behind one load balancer.
const BASE: &str = "http://fhir.test/fhir";
/// The push modes' lease unless `CANCEL_BENCH_PUSH_LEASE` says otherwise: the default, as
/// deployed. Lease checks come every 10 s, so hardly any falls within a push trial and every
/// cancel measured is the pushed one.
const PUSH_LEASE: Duration = Duration::from_secs(30);
/// Poll-only modes run with the shortest lease: checks every 333 ms.
const POLL_LEASE: Duration = Duration::from_secs(1);
const PUSH_TARGET: Duration = Duration::from_millis(100);
/// Uncounted trials first: Lua scripts loaded, statements prepared, pools filled.
const WARM_UP: usize = 3;
/// Connecting, subscribing, a job getting under way.
const SETUP_WAIT: Duration = Duration::from_secs(10);
/// A mode takes no new trial after this, so the whole bench stays within about two minutes.
const MODE_BUDGET: Duration = Duration::from_secs(25);
/// Carries the trial number from the kick-off to the inner service.
const TRIAL: &str = "x-bench-trial";

fn main() {
    let push_trials = trials("CANCEL_BENCH_PUSH_TRIALS", 200);
    let poll_trials = trials("CANCEL_BENCH_POLL_TRIALS", 20);
    let push_lease = match std::env::var("CANCEL_BENCH_PUSH_LEASE") {
        Ok(text) => text
            .parse()
            .ok()
            .filter(|secs| (1..=3600).contains(secs))
            .map(Duration::from_secs)
            .unwrap_or_else(|| {
                panic!("CANCEL_BENCH_PUSH_LEASE={text:?} is not a lease from 1 to 3600 seconds")
            }),
        Err(_) => PUSH_LEASE,
    };
    let servers = Servers {
        redis: server_url("REDIS_URL", "redis://127.0.0.1:6379"),
        postgres: server_url("DATABASE_URL", "postgres://postgres@127.0.0.1:5432/test"),
    };
    // The job tasks and both watchers run on worker threads, as in a server.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    println!(
        "cross-instance cancel latency: DELETE through B until A drops the job's inner future \
         (ms; two instances in one process; \"after 202\" is negative when A dropped the future \
         before B answered)"
    );
    println!(
        "{:<18} {:>5} {:>6} | {:>27} | {:>27} | {:>6} | target",
        "mode", "lease", "trials", "after DELETE sent", "after B's 202", "checks"
    );
    println!(
        "{:<18} {:>5} {:>6} | {:>8} {:>8} {:>9} | {:>8} {:>8} {:>9} | {:>6} |",
        "", "", "", "p50", "p99", "max", "p50", "p99", "max", ""
    );
    let modes = [
        Mode::push(Backend::Redis, push_lease),
        Mode::poll_only(Backend::Redis),
        Mode::push(Backend::Postgres, push_lease),
        Mode::poll_only(Backend::Postgres),
    ];
    let started = Instant::now();
    for mode in modes {
        let trials = if mode.push { push_trials } else { poll_trials };
        let samples = runtime.block_on(run(mode, trials, &servers));
        report(mode, &samples);
    }
    println!(
        "checks: cancelled jobs that A's lease checks reported gone (poll-only: every one; push: \
         none expected). Whole bench: {:.1} s",
        started.elapsed().as_secs_f64()
    );
}

fn trials(variable: &str, default: usize) -> usize {
    match std::env::var(variable) {
        Ok(text) => text
            .parse()
            .ok()
            .filter(|&n| n > 0)
            .unwrap_or_else(|| panic!("{variable}={text:?} is not a positive number of trials")),
        Err(_) => default,
    }
}

// ---------------------------------------------------------------------------------------------
// Modes and their results

#[derive(Clone, Copy)]
enum Backend {
    Redis,
    Postgres,
}

#[derive(Clone, Copy)]
struct Mode {
    backend: Backend,
    /// Cancels pushed through the store; otherwise found by lease checks only.
    push: bool,
    lease: Duration,
}

impl Mode {
    fn push(backend: Backend, lease: Duration) -> Self {
        Self {
            backend,
            push: true,
            lease,
        }
    }

    fn poll_only(backend: Backend) -> Self {
        Self {
            backend,
            push: false,
            lease: POLL_LEASE,
        }
    }

    fn label(self) -> &'static str {
        match (self.backend, self.push) {
            (Backend::Redis, true) => "redis push",
            (Backend::Redis, false) => "redis poll-only",
            (Backend::Postgres, true) => "postgres push",
            (Backend::Postgres, false) => "postgres poll-only",
        }
    }

    fn lease(self) -> Duration {
        self.lease
    }

    /// How often the watcher checks leases (a third of the lease, as `src/watcher.rs` has it).
    fn check_interval(self) -> Duration {
        self.lease() / 3
    }

    fn target(self) -> Duration {
        if self.push {
            PUSH_TARGET
        } else {
            self.check_interval()
        }
    }
}

#[derive(Default)]
struct Samples {
    /// From sending the DELETE through B to the drop on A, in ms.
    after_sent: Vec<f64>,
    /// From B's `202` to the drop on A, in ms; negative when the drop came first.
    after_answer: Vec<f64>,
    /// Cancelled jobs that A's lease checks found gone (counted trials only).
    found_by_checks: usize,
    /// Trials left out because the mode ran out of time.
    skipped: usize,
}

fn report(mode: Mode, samples: &Samples) {
    let sent = Summary::of(&samples.after_sent);
    let answer = Summary::of(&samples.after_answer);
    let target = mode.target().as_secs_f64() * 1000.0;
    let verdict = if sent.max <= target {
        "met"
    } else if sent.p99 <= target {
        "p99 met, max over"
    } else {
        "MISSED"
    };
    let what = if mode.push { "push" } else { "check interval" };
    println!(
        "{:<18} {:>4}s {:>6} | {:>8.2} {:>8.2} {:>9.2} | {:>8.2} {:>8.2} {:>9.2} | {:>6} | \
         {what} {target:.0} ms: {verdict}",
        mode.label(),
        mode.lease().as_secs(),
        samples.after_sent.len(),
        sent.p50,
        sent.p99,
        sent.max,
        answer.p50,
        answer.p99,
        answer.max,
        samples.found_by_checks,
    );
    if samples.skipped > 0 {
        println!(
            "  ({} trials skipped: the mode ran longer than {MODE_BUDGET:?})",
            samples.skipped
        );
    }
}

struct Summary {
    p50: f64,
    p99: f64,
    max: f64,
}

impl Summary {
    /// Nearest-rank percentiles: with 20 trials, p99 is the maximum.
    fn of(values: &[f64]) -> Self {
        let mut sorted = values.to_vec();
        sorted.sort_by(f64::total_cmp);
        let rank = |q: f64| {
            let n = sorted.len();
            sorted[((q * n as f64).ceil() as usize).clamp(1, n) - 1]
        };
        Self {
            p50: rank(0.50),
            p99: rank(0.99),
            max: rank(1.0),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The measurement

/// One mode on a place of its own, removed afterwards, also when the measurement panics.
async fn run(mode: Mode, trials: usize, servers: &Servers) -> Samples {
    match mode.backend {
        Backend::Redis => {
            let prefix = format!("cancel-latency-{}:", JobId::new());
            let outcome = AssertUnwindSafe(async {
                let a = redis_store(&servers.redis, &prefix, mode.push).await;
                let b = redis_store(&servers.redis, &prefix, mode.push).await;
                // A store without pub/sub is the library's own poll-only set-up.
                measure(mode, trials, Observed::new(a, true), Observed::new(b, true)).await
            })
            .catch_unwind()
            .await;
            delete_keys(&mut redis_connection(&servers.redis).await, &prefix).await;
            outcome.unwrap_or_else(|panic| std::panic::resume_unwind(panic))
        }
        Backend::Postgres => {
            let admin = pg_pool(&servers.postgres).await;
            let table = format!("cancel_latency_{}", JobId::new());
            let outcome = AssertUnwindSafe(async {
                PostgresStore::new(admin.clone())
                    .with_table(&table)
                    .migrate()
                    .await
                    .unwrap_or_else(|err| panic!("creating table {table}: {err}"));
                // A pool per instance, as each process would have.
                let a = PostgresStore::new(pg_pool(&servers.postgres).await).with_table(&table);
                let b = PostgresStore::new(pg_pool(&servers.postgres).await).with_table(&table);
                // `PostgresStore` always listens: poll-only hides its stream from the layer.
                measure(
                    mode,
                    trials,
                    Observed::new(a, mode.push),
                    Observed::new(b, mode.push),
                )
                .await
            })
            .catch_unwind()
            .await;
            sqlx::query(AssertSqlSafe(format!("DROP TABLE IF EXISTS \"{table}\"")))
                .execute(&admin)
                .await
                .unwrap_or_else(|err| panic!("dropping table {table}: {err}"));
            admin.close().await;
            outcome.unwrap_or_else(|panic| std::panic::resume_unwind(panic))
        }
    }
}

/// Trials of: kick-off through A, wait until its inner future runs, DELETE through B, wait until
/// A drops the inner future.
async fn measure<S: JobStore + Clone>(
    mode: Mode,
    trials: usize,
    a: Observed<S>,
    b: Observed<S>,
) -> Samples {
    let label = mode.label();
    let (started_tx, mut started) = mpsc::unbounded_channel();
    let (dropped_tx, mut dropped) = mpsc::unbounded_channel();
    let instance_a =
        instance(a.clone(), "a", mode.lease()).layer(hold(started_tx.clone(), dropped_tx.clone()));
    let instance_b = instance(b.clone(), "b", mode.lease()).layer(hold(started_tx, dropped_tx));

    // A status request starts an instance's watcher, which subscribes to cancels (push modes);
    // a cancel sent before A's subscription is in place would only be found by a lease check.
    for (name, service) in [("A", &instance_a), ("B", &instance_b)] {
        let path = format!("/fhir/_async/{}", JobId::new());
        let reply = service
            .clone()
            .oneshot(request(http::Method::GET, &path, None))
            .await
            .expect("a status answer");
        assert_eq!(
            reply.status(),
            StatusCode::NOT_FOUND,
            "{label}: {name} answers an unknown job's status"
        );
    }
    if mode.push {
        let waiting = Instant::now();
        while a.counts.subscriptions.load(Ordering::Acquire) == 0
            || b.counts.subscriptions.load(Ordering::Acquire) == 0
        {
            assert!(
                waiting.elapsed() < SETUP_WAIT,
                "{label}: the instances did not subscribe to cancels within {SETUP_WAIT:?}; is \
                 the store's pub/sub (Redis) or LISTEN (PostgreSQL) reachable?"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    let drop_wait = mode.check_interval() + 5 * Duration::from_secs(1);
    let begun = Instant::now();
    let mut samples = Samples::default();
    let mut found_before = 0;
    for trial in 0..WARM_UP + trials {
        let counted = trial >= WARM_UP;
        if counted && begun.elapsed() > MODE_BUDGET {
            samples.skipped = WARM_UP + trials - trial;
            break;
        }
        if trial == WARM_UP {
            found_before = a.counts.found_by_checks.load(Ordering::Acquire);
        }
        let kicked = instance_a
            .clone()
            .oneshot(request(http::Method::POST, "/fhir/$hold", Some(trial)))
            .await
            .expect("a kick-off answer");
        assert_eq!(
            kicked.status(),
            StatusCode::ACCEPTED,
            "{label}: kick-off through A"
        );
        let location = kicked
            .headers()
            .get(header::CONTENT_LOCATION)
            .and_then(|v| v.to_str().ok())
            .expect("a Content-Location on the 202");
        let path = location
            .strip_prefix(BASE)
            .map(|rest| format!("/fhir{rest}"))
            .unwrap_or_else(|| panic!("Content-Location {location:?} is not under {BASE}"));
        let running = tokio::time::timeout(SETUP_WAIT, started.recv())
            .await
            .unwrap_or_else(|_| panic!("{label}: A did not run job {trial} within {SETUP_WAIT:?}"))
            .expect("the inner services hold the sender");
        assert_eq!(running, trial, "{label}: the job that runs on A");
        if !mode.push {
            // The DELETE must land at any point between two lease checks, not in step with them
            // (each trial ends just after a check): spread evenly over one interval.
            tokio::time::sleep(mode.check_interval().mul_f64(spread(trial))).await;
        }

        let sent = Instant::now();
        let deleted = instance_b
            .clone()
            .oneshot(request(http::Method::DELETE, &path, None))
            .await
            .expect("a cancel answer");
        let answered = Instant::now();
        assert_eq!(
            deleted.status(),
            StatusCode::ACCEPTED,
            "{label}: DELETE through B"
        );
        let (which, at) = tokio::time::timeout(drop_wait, dropped.recv())
            .await
            .unwrap_or_else(|_| {
                panic!("{label}: A did not drop job {trial} within {drop_wait:?} of the DELETE")
            })
            .expect("the inner services hold the sender");
        assert_eq!(which, trial, "{label}: the job dropped on A");
        if counted {
            samples
                .after_sent
                .push(at.saturating_duration_since(sent).as_secs_f64() * 1000.0);
            samples.after_answer.push(signed_ms(at, answered));
        }
    }
    samples.found_by_checks = a.counts.found_by_checks.load(Ordering::Acquire) - found_before;
    samples
}

/// `at - from` in ms, negative when `at` came first.
fn signed_ms(at: Instant, from: Instant) -> f64 {
    match at.checked_duration_since(from) {
        Some(after) => after.as_secs_f64() * 1000.0,
        None => -(from.duration_since(at).as_secs_f64() * 1000.0),
    }
}

/// The fractional parts of `n` times the golden ratio: evenly spread over [0, 1) for any
/// number of trials, and the same on every run.
fn spread(n: usize) -> f64 {
    (n as f64 * 0.618_033_988_749_895).fract()
}

fn instance<S: JobStore>(store: S, name: &str, lease: Duration) -> AsyncLayer {
    AsyncLayer::builder(store)
        .base_url(BASE)
        .instance_id(format!("cancel-latency-{name}-{}", JobId::new()))
        .lease(lease)
        .build()
}

fn request(method: http::Method, path: &str, trial: Option<usize>) -> Request<Full<Bytes>> {
    let mut builder = Request::builder()
        .method(method)
        .uri(path)
        .header(header::HOST, "fhir.test");
    if let Some(trial) = trial {
        builder = builder
            .header("prefer", "respond-async")
            .header(TRIAL, trial);
    }
    builder.body(Full::new(Bytes::new())).expect("a request")
}

type Body = RequestBody<Full<Bytes>>;

/// The inner service: says which trial it runs, then never finishes; what it holds says when it
/// is dropped.
fn hold(
    started: mpsc::UnboundedSender<usize>,
    dropped: mpsc::UnboundedSender<(usize, Instant)>,
) -> impl Service<Request<Body>, Response = Response<Full<Bytes>>, Error = Infallible, Future: Send>
+ Clone
+ Send
+ 'static {
    service_fn(move |request: Request<Body>| {
        let trial = request
            .headers()
            .get(TRIAL)
            .and_then(|v| v.to_str().ok()?.parse().ok())
            .unwrap_or(usize::MAX);
        let started = started.clone();
        let guard = DropGuard {
            trial,
            dropped: dropped.clone(),
        };
        async move {
            let _guard = guard;
            let _ = started.send(trial);
            std::future::pending::<()>().await;
            Ok(Response::new(Full::new(Bytes::new())))
        }
    })
}

/// Sends its trial and the time when dropped: the moment A stopped the work.
struct DropGuard {
    trial: usize,
    dropped: mpsc::UnboundedSender<(usize, Instant)>,
}

impl Drop for DropGuard {
    fn drop(&mut self) {
        let _ = self.dropped.send((self.trial, Instant::now()));
    }
}

// ---------------------------------------------------------------------------------------------
// A store as the layer sees it

/// What the watcher of an instance did through its store.
#[derive(Default)]
struct Counts {
    /// Cancellation streams handed to the watcher.
    subscriptions: AtomicUsize,
    /// Jobs a lease renewal reported as no longer running here.
    found_by_checks: AtomicUsize,
}

/// A store passed through, counting subscriptions and lease checks; with `push` false, its
/// cancellation stream is hidden (the trait's default: no push), so cancels through another
/// instance are found by lease checks only.
#[derive(Clone)]
struct Observed<S> {
    store: S,
    push: bool,
    counts: Arc<Counts>,
}

impl<S> Observed<S> {
    fn new(store: S, push: bool) -> Self {
        Self {
            store,
            push,
            counts: Arc::default(),
        }
    }
}

impl<S: JobStore> DelegateStore for Observed<S> {
    type Inner = S;

    fn inner(&self) -> &S {
        &self.store
    }

    async fn renew_leases(
        &self,
        instance: &str,
        ids: &[JobId],
        lease_until: SystemTime,
    ) -> Result<Vec<JobId>, StoreError> {
        let gone = self.store.renew_leases(instance, ids, lease_until).await?;
        self.counts
            .found_by_checks
            .fetch_add(gone.len(), Ordering::AcqRel);
        Ok(gone)
    }

    async fn changes(&self) -> Result<Option<Changes>, StoreError> {
        if !self.push {
            return Ok(None);
        }
        let stream = self.store.changes().await?;
        if stream.is_some() {
            self.counts.subscriptions.fetch_add(1, Ordering::AcqRel);
        }
        Ok(stream)
    }
}

// ---------------------------------------------------------------------------------------------
// The servers

struct Servers {
    redis: String,
    postgres: String,
}

/// `variable`'s URL, or `default`; only ever a server on this machine, since the bench creates
/// and removes keys and tables.
fn server_url(variable: &str, default: &str) -> String {
    let url = std::env::var(variable).unwrap_or_else(|_| default.into());
    let authority = url
        .split_once("://")
        .map_or("", |(_, rest)| rest)
        .split(['/', '?', '#'])
        .next()
        .unwrap_or_default();
    let host_port = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    let host = if let Some(bracketed) = host_port.strip_prefix('[') {
        bracketed.split(']').next().unwrap_or_default()
    } else {
        host_port.split(':').next().unwrap_or_default()
    };
    let loopback = host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback());
    assert!(
        loopback,
        "{variable}={url} names the host {host:?}; benches/cancel_latency.rs runs only against a \
         server on this machine (127.0.0.1)"
    );
    url
}

fn no_redis(url: &str, why: impl std::fmt::Display) -> ! {
    panic!(
        "cannot reach Redis at {url}: {why}. This bench needs a Redis server: start one with \
         `redis-server --daemonize yes --port 6379 --save '' --appendonly no`, or set REDIS_URL"
    )
}

fn no_postgres(url: &str, why: impl std::fmt::Display) -> ! {
    panic!(
        "cannot connect to PostgreSQL at {url}: {why}. This bench needs a running server: start \
         it (e.g. `pg_ctlcluster --skip-systemctl-redirect <version> main start`) or set \
         DATABASE_URL"
    )
}

/// An instance's store on `prefix`: with pub/sub (`connect`), or without (`new`), so that
/// cancels are found by lease checks only.
async fn redis_store(url: &str, prefix: &str, push: bool) -> RedisStore {
    let connect = async {
        if push {
            RedisStore::connect(url).await
        } else {
            let client = Client::open(url).map_err(|err| StoreError::Unavailable(err.into()))?;
            ConnectionManager::new_with_config(client, RedisStore::manager_config())
                .await
                .map(RedisStore::new)
                .map_err(|err| StoreError::Unavailable(err.into()))
        }
    };
    match tokio::time::timeout(SETUP_WAIT, connect).await {
        Ok(Ok(store)) => store.with_prefix(prefix),
        Ok(Err(err)) => no_redis(url, err),
        Err(_) => no_redis(url, "no connection within 10 s"),
    }
}

async fn redis_connection(url: &str) -> MultiplexedConnection {
    let client = Client::open(url).unwrap_or_else(|err| no_redis(url, err));
    match tokio::time::timeout(SETUP_WAIT, client.get_multiplexed_async_connection()).await {
        Ok(Ok(connection)) => connection,
        Ok(Err(err)) => no_redis(url, err),
        Err(_) => no_redis(url, "no connection within 10 s"),
    }
}

async fn delete_keys(connection: &mut MultiplexedConnection, prefix: &str) {
    let mut cursor = 0u64;
    loop {
        let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(format!("{prefix}*"))
            .arg("COUNT")
            .arg(1000)
            .query_async(connection)
            .await
            .expect("SCAN for the bench's keys");
        if !keys.is_empty() {
            let _: i64 = redis::cmd("DEL")
                .arg(&keys)
                .query_async(connection)
                .await
                .expect("DEL the bench's keys");
        }
        if next == 0 {
            return;
        }
        cursor = next;
    }
}

async fn pg_pool(url: &str) -> PgPool {
    let connect = PgPoolOptions::new()
        .max_connections(4)
        .acquire_timeout(SETUP_WAIT)
        .connect(url);
    match tokio::time::timeout(2 * SETUP_WAIT, connect).await {
        Ok(Ok(pool)) => pool,
        Ok(Err(err)) => no_postgres(url, err),
        Err(_) => no_postgres(url, "no connection within 20 s"),
    }
}
