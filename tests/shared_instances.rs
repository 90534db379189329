#![cfg(all(feature = "redis", feature = "postgres"))]
//! Several instances sharing a real Redis or PostgreSQL store, each behind its own HTTP server
//! (issue #4 items 4 and 5): polls and cancels through any instance, cancels pushed through the
//! store (Redis pub/sub, PostgreSQL `NOTIFY`), results that outlive the instance that made them,
//! and the jobs of an instance whose process was killed. `tests/instances.rs` runs the in-process
//! scenarios on a shared `MemoryStore`; here every scenario is written once, generic over a
//! [`Backend`], and run against both servers.
//!
//! Connects to `REDIS_URL` (default `redis://127.0.0.1:6379`) and `DATABASE_URL` (default
//! `postgres://postgres@127.0.0.1:5432/test`), loopback addresses only, and fails, never skips,
//! when a server cannot be reached. Each test works under a Redis key prefix or in a PostgreSQL
//! table of its own, removed when the test ends, passed or failed.
//!
//! The lost-instance tests run the demo server (`examples/server`) as a child process and kill
//! it with SIGKILL. `cargo test --features redis,postgres` builds it with the right features;
//! `cargo test --test shared_instances` alone does not, so build it first with
//! `cargo build --example server --features redis,postgres`.
//!
//! Every wait is bounded, and nothing asserts how fast anything happened: the times measured are
//! printed (run with `--nocapture` to see them).

#[path = "support/demo.rs"]
mod demo;
#[path = "support/long_poll.rs"]
mod long_poll;
mod support;

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use axum::Router;
use axum::routing::post;
use futures_util::FutureExt;
use http::{Method, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::{JoinHandle, JoinSet};
use tower_fhir_async::redis::aio::MultiplexedConnection;
use tower_fhir_async::redis::{self, Client};
use tower_fhir_async::store::sqlx::postgres::PgPoolOptions;
use tower_fhir_async::store::sqlx::{self, AssertSqlSafe, PgPool};
use tower_fhir_async::{
    AsyncLayer, JobContext, JobId, JobState, JobStore, PostgresStore, RedisStore,
};

use demo::Demo;
use support::{Reply, TestClient, parse_job_id};

/// The public base every instance shares, as behind one load balancer.
const BASE: &str = "http://fhir.test/fhir";
const SECOND: Duration = Duration::from_secs(1);
/// Connecting to a server, starting the demo, a job getting under way.
const SETUP_WAIT: Duration = Duration::from_secs(10);
/// For progress to be shared through the store (issue #11 item 9): the watcher writes changed
/// progress every 500 ms, whatever the lease, and the change feed wakes the other instance. The
/// push variants run with hour-long leases (lease checks every 20 minutes), so progress that
/// arrives within this bound came through the progress flush, not a lease check.
const PROGRESS_WAIT: Duration = Duration::from_secs(5);
/// For a cancel through another instance to stop the work.
const DROP_WAIT: Duration = Duration::from_secs(10);
/// For the job of a killed instance to be recorded as failed: its lease (the demo's default,
/// 10 s) must lapse first, then B's next check (every second here) fails it. Issue #11 item 8
/// asks for 15 s by default; the bound here leaves room for a loaded CI machine, and the
/// measured time is printed.
const LOST_WAIT: Duration = Duration::from_secs(45);
const LOST_POLL_EVERY: Duration = Duration::from_millis(500);

// ---------------------------------------------------------------------------------------------
// The servers

fn redis_url() -> String {
    let url = std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    require_loopback("REDIS_URL", &url);
    url
}

fn database_url() -> String {
    let url = std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into());
    require_loopback("DATABASE_URL", &url);
    url
}

/// These tests create and drop tables and keys: they only ever talk to this machine.
fn require_loopback(variable: &str, url: &str) {
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
        "{variable}={url} names the host {host:?}; tests/shared_instances.rs runs only against a \
         server on this machine (127.0.0.1)"
    );
}

fn no_redis(url: &str, why: impl std::fmt::Display) -> ! {
    panic!(
        "cannot reach Redis at {url}: {why}. These tests need a Redis server: start one with \
         `redis-server --daemonize yes --port 6379 --save '' --appendonly no`, or set REDIS_URL"
    )
}

fn no_postgres(url: &str, why: impl std::fmt::Display) -> ! {
    panic!(
        "cannot connect to PostgreSQL at {url}: {why}. These tests need a running server: start \
         it (e.g. `pg_ctlcluster --skip-systemctl-redirect <version> main start`) or set \
         DATABASE_URL"
    )
}

async fn redis_connection(url: &str) -> MultiplexedConnection {
    let client = Client::open(url).unwrap_or_else(|err| no_redis(url, err));
    match tokio::time::timeout(SETUP_WAIT, client.get_multiplexed_async_connection()).await {
        Ok(Ok(connection)) => connection,
        Ok(Err(err)) => no_redis(url, err),
        Err(_) => no_redis(url, "no connection within 10 s"),
    }
}

/// A pool of its own, as each instance (process) would have.
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

// ---------------------------------------------------------------------------------------------
// Backends: one store server, and the part of it one test uses

/// A shared store server, and the place in it that one test uses.
trait Backend: Sized {
    type Store: JobStore + Clone;

    /// A place of the test's own: a random key prefix or table.
    async fn open(test: &str) -> Self;

    /// The place the demo server uses (its `--store` takes a URL only, so it uses the default
    /// prefix or table), kept apart from other tests where the backend allows it.
    async fn open_for_demo() -> Self;

    /// The demo's `--store` argument for this place.
    fn demo_store_url(&self) -> String;

    /// A new store on this place with connections of its own, as another process would have.
    async fn connect(&self) -> Self::Store;

    /// How many connections listen on this place's cancel channel.
    async fn cancel_listeners(&self) -> usize;

    /// Remembers a job that cleanup must remove (where the place is not the test's alone).
    fn track(&self, id: JobId);

    /// Removes everything the test left.
    async fn cleanup(&self);
}

struct RedisBackend {
    url: String,
    prefix: String,
    /// The demo's place is the default prefix, shared: only these jobs are the test's.
    shared: Option<Mutex<Vec<JobId>>>,
}

impl Backend for RedisBackend {
    type Store = RedisStore;

    async fn open(test: &str) -> Self {
        let url = redis_url();
        // Fails with the reason now, rather than in the middle of a scenario.
        drop(redis_connection(&url).await);
        Self {
            url,
            prefix: format!("shared-instances-{}:{test}:", JobId::new()),
            shared: None,
        }
    }

    async fn open_for_demo() -> Self {
        let url = redis_url();
        drop(redis_connection(&url).await);
        Self {
            url,
            prefix: RedisStore::DEFAULT_PREFIX.to_owned(),
            shared: Some(Mutex::new(Vec::new())),
        }
    }

    fn demo_store_url(&self) -> String {
        assert_eq!(self.prefix, RedisStore::DEFAULT_PREFIX);
        self.url.clone()
    }

    async fn connect(&self) -> RedisStore {
        match tokio::time::timeout(SETUP_WAIT, RedisStore::connect(&self.url)).await {
            // `connect` gives the store a client for pub/sub: it pushes cancels to the layer.
            Ok(Ok(store)) => store.with_prefix(self.prefix.clone()),
            Ok(Err(err)) => no_redis(&self.url, err),
            Err(_) => no_redis(&self.url, "no connection within 10 s"),
        }
    }

    async fn cancel_listeners(&self) -> usize {
        let channel = format!("{}changed", self.prefix);
        let counts: Vec<(String, usize)> = redis::cmd("PUBSUB")
            .arg("NUMSUB")
            .arg(&channel)
            .query_async(&mut redis_connection(&self.url).await)
            .await
            .expect("PUBSUB NUMSUB");
        counts.into_iter().map(|(_, count)| count).sum()
    }

    fn track(&self, id: JobId) {
        if let Some(jobs) = &self.shared {
            jobs.lock().unwrap().push(id);
        }
    }

    async fn cleanup(&self) {
        let mut connection = redis_connection(&self.url).await;
        let Some(jobs) = &self.shared else {
            delete_keys(&mut connection, &self.prefix).await;
            return;
        };
        let jobs = std::mem::take(&mut *jobs.lock().unwrap());
        for id in jobs {
            let mut pipe = redis::pipe();
            pipe.cmd("DEL")
                .arg(format!("{}job:{id}", self.prefix))
                .ignore();
            for index in ["accepted", "running", "expiring"] {
                pipe.cmd("ZREM")
                    .arg(format!("{}{index}", self.prefix))
                    .arg(id.to_string())
                    .ignore();
            }
            let () = pipe
                .query_async(&mut connection)
                .await
                .expect("deleting the test's job");
        }
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
            .expect("SCAN for the test's keys");
        if !keys.is_empty() {
            let _: i64 = redis::cmd("DEL")
                .arg(&keys)
                .query_async(connection)
                .await
                .expect("DEL the test's keys");
        }
        if next == 0 {
            return;
        }
        cursor = next;
    }
}

struct PostgresBackend {
    /// The URL the test's stores connect with (with the demo: its schema on the search path).
    url: String,
    /// For looking behind the stores' backs, and for cleanup.
    admin: PgPool,
    table: String,
    /// The demo's place: the default table, in a schema of the test's own.
    schema: Option<String>,
}

impl Backend for PostgresBackend {
    type Store = PostgresStore;

    async fn open(_test: &str) -> Self {
        let url = database_url();
        let admin = pg_pool(&url).await;
        let table = format!("jobs_shared_{}", JobId::new());
        PostgresStore::new(admin.clone())
            .with_table(&table)
            .migrate()
            .await
            .unwrap_or_else(|err| panic!("migrating table {table}: {err}"));
        Self {
            url,
            admin,
            table,
            schema: None,
        }
    }

    async fn open_for_demo() -> Self {
        let base = database_url();
        let admin = pg_pool(&base).await;
        let schema = format!("shared_{}", JobId::new());
        sqlx::query(AssertSqlSafe(format!("CREATE SCHEMA \"{schema}\"")))
            .execute(&admin)
            .await
            .unwrap_or_else(|err| panic!("creating schema {schema}: {err}"));
        // The demo and the test's stores find the default table in this schema only.
        let separator = if base.contains('?') { '&' } else { '?' };
        let url = format!("{base}{separator}options=-c%20search_path%3D{schema}");
        Self {
            url,
            admin,
            table: PostgresStore::DEFAULT_TABLE.to_owned(),
            schema: Some(schema),
        }
    }

    fn demo_store_url(&self) -> String {
        assert!(self.schema.is_some());
        self.url.clone()
    }

    async fn connect(&self) -> PostgresStore {
        let store = PostgresStore::new(pg_pool(&self.url).await).with_table(&self.table);
        store
            .migrate()
            .await
            .unwrap_or_else(|err| panic!("migrating table {}: {err}", self.table));
        store
    }

    async fn cancel_listeners(&self) -> usize {
        // A listener's connection runs nothing after its `LISTEN`, so that stays its last query.
        let count: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity \
             WHERE datname = current_database() AND query = $1",
        )
        .bind(format!("LISTEN \"{}_changed\"", self.table))
        .fetch_one(&self.admin)
        .await
        .expect("reading pg_stat_activity");
        usize::try_from(count).unwrap_or_default()
    }

    fn track(&self, _id: JobId) {}

    async fn cleanup(&self) {
        let sql = match &self.schema {
            Some(schema) => format!("DROP SCHEMA IF EXISTS \"{schema}\" CASCADE"),
            None => format!("DROP TABLE IF EXISTS \"{}\"", self.table),
        };
        sqlx::query(AssertSqlSafe(sql))
            .execute(&self.admin)
            .await
            .expect("dropping the test's table");
        self.admin.close().await;
    }
}

// ---------------------------------------------------------------------------------------------
// A Redis Cluster (feature `redis-cluster`): the same scenarios on `RedisClusterStore`

#[cfg(feature = "redis-cluster")]
mod cluster {
    use super::*;
    use tower_fhir_async::RedisClusterStore;

    /// `REDIS_CLUSTER_URLS` (default the three masters `.ci/run` starts).
    use support::private_redis::no_cluster;

    /// The cluster's node URLs, which must be on this machine.
    pub(super) fn cluster_urls() -> Vec<String> {
        let urls = support::private_redis::cluster_urls();
        for url in &urls {
            require_loopback("REDIS_CLUSTER_URLS", url);
        }
        urls
    }

    async fn masters() -> Vec<MultiplexedConnection> {
        support::private_redis::cluster_masters(&cluster_urls()[0]).await
    }

    pub(super) struct ClusterBackend {
        prefix: String,
        /// The demo's place is the default prefix, shared: only these jobs are the test's.
        shared: Option<Mutex<Vec<JobId>>>,
    }

    impl Backend for ClusterBackend {
        type Store = RedisClusterStore;

        async fn open(test: &str) -> Self {
            drop(masters().await);
            Self {
                prefix: format!("shared-instances-{}:{test}:", JobId::new()),
                shared: None,
            }
        }

        async fn open_for_demo() -> Self {
            drop(masters().await);
            Self {
                prefix: RedisClusterStore::DEFAULT_PREFIX.to_owned(),
                shared: Some(Mutex::new(Vec::new())),
            }
        }

        fn demo_store_url(&self) -> String {
            assert_eq!(self.prefix, RedisClusterStore::DEFAULT_PREFIX);
            let nodes: Vec<String> = cluster_urls()
                .iter()
                .map(|url| url.trim_start_matches("redis://").to_owned())
                .collect();
            format!("redis-cluster://{}", nodes.join(","))
        }

        async fn connect(&self) -> RedisClusterStore {
            match tokio::time::timeout(SETUP_WAIT, RedisClusterStore::connect(cluster_urls())).await
            {
                Ok(Ok(store)) => store.with_prefix(self.prefix.clone()),
                Ok(Err(err)) => no_cluster(err),
                Err(_) => no_cluster("no connection within 10 s"),
            }
        }

        async fn cancel_listeners(&self) -> usize {
            // A store subscribes to its partitions' channels in order: the last one counts
            // stores that subscribed to all. Only the master serving its slot knows them.
            let last = RedisClusterStore::DEFAULT_PARTITIONS - 1;
            let channel = format!("{}{{{last}}}changed", self.prefix);
            let mut listeners = 0;
            for mut master in masters().await {
                let counts: Vec<(String, usize)> = redis::cmd("PUBSUB")
                    .arg("SHARDNUMSUB")
                    .arg(&channel)
                    .query_async(&mut master)
                    .await
                    .expect("PUBSUB SHARDNUMSUB");
                listeners += counts.into_iter().map(|(_, count)| count).sum::<usize>();
            }
            listeners
        }

        fn track(&self, id: JobId) {
            if let Some(jobs) = &self.shared {
                jobs.lock().unwrap().push(id);
            }
        }

        async fn cleanup(&self) {
            let store = self.connect().await;
            if let Some(jobs) = &self.shared {
                let jobs = std::mem::take(&mut *jobs.lock().unwrap());
                for id in jobs {
                    // A cancel removes the job and its index entries wherever they are.
                    store
                        .cancel(&id, SystemTime::now())
                        .await
                        .expect("deleting the test's job");
                }
                return;
            }
            support::private_redis::delete_cluster_keys(&cluster_urls()[0], &self.prefix).await;
        }
    }
}

#[cfg(feature = "redis-cluster")]
use cluster::ClusterBackend;

/// Runs `scenario` with `backend`, then cleans up, also when the scenario panics.
async fn run<B, F, Fut>(backend: B, scenario: F)
where
    B: Backend,
    F: FnOnce(Arc<B>) -> Fut,
    Fut: Future<Output = ()>,
{
    let backend = Arc::new(backend);
    let outcome = AssertUnwindSafe(scenario(backend.clone()))
        .catch_unwind()
        .await;
    backend.cleanup().await;
    if let Err(panic) = outcome {
        std::panic::resume_unwind(panic);
    }
}

// ---------------------------------------------------------------------------------------------
// Instances: a layer in front of an axum Router, served on 127.0.0.1:0

/// A served instance; dropping it stops the server and every connection it holds, so the
/// Router and its layer go away.
struct Server {
    addr: SocketAddr,
    task: JoinHandle<()>,
}

impl Server {
    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Like `support::serve`, but the connections belong to the server task: aborting it ends them.
async fn serve(app: Router) -> Server {
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind 127.0.0.1:0");
    let addr = listener.local_addr().expect("local addr");
    let task = tokio::spawn(async move {
        let mut connections = JoinSet::new();
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            while connections.try_join_next().is_some() {}
            let service = hyper_util::service::TowerToHyperService::new(app.clone());
            connections.spawn(async move {
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    Server { addr, task }
}

fn layer<S: JobStore>(store: S, name: &str, lease: Option<Duration>) -> AsyncLayer {
    let mut builder = AsyncLayer::builder(store)
        .base_url(BASE)
        .instance_id(format!("{name}-{}", JobId::new()));
    if let Some(lease) = lease {
        builder = builder.lease(lease);
    }
    builder.build()
}

/// Sends `()` when dropped: proof that a job's work was stopped.
struct DropGuard(Option<oneshot::Sender<()>>);

impl Drop for DropGuard {
    fn drop(&mut self) {
        if let Some(tx) = self.0.take() {
            let _ = tx.send(());
        }
    }
}

/// A router whose `$hold` reports 40 % and then runs until dropped, signalling `dropped` then.
fn hold_app(layer: AsyncLayer, dropped: Option<oneshot::Sender<()>>) -> Router {
    let dropped = Arc::new(Mutex::new(dropped));
    Router::new()
        .route(
            "/fhir/$hold",
            post(move |job: Option<axum::Extension<JobContext>>| {
                let guard = DropGuard(dropped.lock().unwrap().take());
                async move {
                    if let Some(axum::Extension(job)) = job {
                        job.set_percent(40);
                    }
                    let _guard = guard;
                    std::future::pending::<()>().await;
                    Ok::<_, Infallible>("")
                }
            }),
        )
        .layer(layer)
}

const INSTANT_BODY: &str =
    r#"{"resourceType":"Parameters","parameter":[{"name":"answer","valueString":"forty-two"}]}"#;

/// A router whose `$instant` answers at once.
fn instant_app(layer: AsyncLayer) -> Router {
    Router::new()
        .route(
            "/fhir/$instant",
            post(|| async {
                (
                    [(http::header::CONTENT_TYPE, "application/fhir+json")],
                    INSTANT_BODY,
                )
            }),
        )
        .layer(layer)
}

/// The path of a status URL (`Content-Location`), to send to any instance.
fn status_path(reply: &Reply) -> String {
    assert_eq!(reply.status, StatusCode::ACCEPTED, "kick-off: {reply:?}");
    let location = reply.header("content-location");
    let path = location
        .split_once("://")
        .and_then(|(_, rest)| rest.find('/').map(|at| &rest[at..]))
        .unwrap_or_else(|| panic!("Content-Location {location:?} is not an absolute URL"));
    assert!(path.starts_with("/fhir/_async/"), "{location}");
    path.to_owned()
}

/// Polls `url` every `every` until it answers `202` with `X-Progress: {progress}`; every poll
/// meanwhile must be `202`. Panics after `limit`.
async fn wait_for_progress(
    client: &TestClient,
    url: &str,
    progress: &str,
    limit: Duration,
    every: Duration,
) -> Duration {
    let started = Instant::now();
    loop {
        let reply = client.get(url).await;
        assert_eq!(
            reply.status,
            StatusCode::ACCEPTED,
            "the job runs while waiting for its progress: {reply:?}"
        );
        let seen = reply.headers.get("x-progress").map(|v| v.to_str().unwrap());
        if seen == Some(progress) {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < limit,
            "no `X-Progress: {progress}` at {url} within {limit:?}; last answer {reply:?}"
        );
        tokio::time::sleep(every).await;
    }
}

/// Waits until at least `count` connections listen on the backend's changes channel (cancels come
/// through it).
async fn wait_for_listeners(backend: &impl Backend, count: usize, who: &str) {
    let started = Instant::now();
    loop {
        let listening = backend.cancel_listeners().await;
        if listening >= count {
            return;
        }
        assert!(
            started.elapsed() < SETUP_WAIT,
            "{who}: {listening} of {count} cancel listeners within {SETUP_WAIT:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

// ---------------------------------------------------------------------------------------------
// Scenarios, each written once for every backend

/// Two instances A and B on one store: a job kicked off through A runs on A; B answers its
/// polls (with A's progress once A's watcher shared it, if `shared_progress`) and takes its
/// DELETE, which stops the work on A; then neither knows the job.
///
/// With a `lease` of an hour, lease checks run every 20 minutes, so a stop within `DROP_WAIT`
/// can only come through the store's push channel.
async fn cancel_through_another_instance<B: Backend>(
    backend: Arc<B>,
    label: &str,
    lease: Option<Duration>,
    shared_progress: bool,
) {
    let client = TestClient::default();
    let (dropped_tx, dropped_rx) = oneshot::channel();
    let a = serve(hold_app(
        layer(backend.connect().await, "a", lease),
        Some(dropped_tx),
    ))
    .await;
    let b = serve(hold_app(layer(backend.connect().await, "b", lease), None)).await;

    let path = status_path(
        &client
            .send_async(Method::POST, &a.url("/fhir/$hold"), &[], "")
            .await,
    );
    // A's watcher (started by the kick-off) subscribes to cancels; B's has not started yet, so
    // this is A's subscription, and no cancel can be sent before it is in place.
    wait_for_listeners(&*backend, 1, "instance A subscribed to cancels").await;
    // The handler runs on A: A reports its progress from memory.
    wait_for_progress(
        &client,
        &a.url(&path),
        "40% complete",
        SETUP_WAIT,
        Duration::from_millis(50),
    )
    .await;

    let through_b = client.get(&b.url(&path)).await;
    assert_eq!(
        through_b.status,
        StatusCode::ACCEPTED,
        "B answers a poll of A's job: {through_b:?}"
    );
    if shared_progress {
        // STATUS-4 across instances: A's watcher writes the progress, B reads it.
        let took = wait_for_progress(
            &client,
            &b.url(&path),
            "40% complete",
            PROGRESS_WAIT,
            Duration::from_millis(250),
        )
        .await;
        eprintln!("[{label}] progress shared through the store, seen through B after {took:?}");
    }

    let sent = Instant::now();
    let cancelled = client.delete(&b.url(&path)).await;
    let answered = sent.elapsed();
    assert_eq!(
        cancelled.status,
        StatusCode::ACCEPTED,
        "DELETE through B: {cancelled:?}"
    );
    tokio::time::timeout(DROP_WAIT, dropped_rx)
        .await
        .unwrap_or_else(|_| {
            panic!("A did not stop the job within {DROP_WAIT:?} of the DELETE through B")
        })
        .expect("the handler's guard was dropped, not leaked");
    eprintln!(
        "[{label}] A dropped the job's future {:?} after the DELETE was sent through B (B \
         answered it in {answered:?})",
        sent.elapsed()
    );

    for (name, server) in [("A", &a), ("B", &b)] {
        let gone = client.get(&server.url(&path)).await;
        assert_eq!(
            gone.status,
            StatusCode::NOT_FOUND,
            "a cancelled job is unknown to {name}: {gone:?}"
        );
        gone.assert_outcome("not-found");
    }
}

/// A result outlives the instance that made it: C, started after A is gone, serves the same
/// Bundle.
async fn results_survive_a_restart<B: Backend>(backend: Arc<B>) {
    let client = TestClient::default();
    let a = serve(instant_app(layer(backend.connect().await, "a", None))).await;
    let path = status_path(
        &client
            .send_async(Method::POST, &a.url("/fhir/$instant"), &[], "")
            .await,
    );
    let done = client.poll_until_done(&a.url(&path), 500).await;
    assert_eq!(done.status, StatusCode::OK, "{done:?}");
    let bundle = done.json();
    assert_eq!(bundle["type"], "batch-response", "{bundle}");
    assert_eq!(
        bundle["entry"][0]["response"]["status"], "200 OK",
        "{bundle}"
    );
    assert_eq!(
        bundle["entry"][0]["resource"]["parameter"][0]["valueString"], "forty-two",
        "{bundle}"
    );

    // A goes away entirely: its server, connections, Router, layer and store.
    let a_addr = a.addr;
    drop(a);
    let started = Instant::now();
    while tokio::net::TcpStream::connect(a_addr).await.is_ok() {
        assert!(
            started.elapsed() < SETUP_WAIT,
            "A still accepts connections {SETUP_WAIT:?} after it was stopped"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let c = serve(instant_app(layer(backend.connect().await, "c", None))).await;
    let again = client.get(&c.url(&path)).await;
    assert_eq!(again.status, StatusCode::OK, "{again:?}");
    assert_eq!(
        again.header("content-type"),
        "application/fhir+json",
        "{again:?}"
    );
    assert_eq!(
        again.body,
        done.body,
        "C serves the Bundle A served, byte for byte:\nA: {}\nC: {}",
        String::from_utf8_lossy(&done.body),
        String::from_utf8_lossy(&again.body)
    );
}

/// Resources per type that `export_app`'s `$export` streams.
const EXPORTED: [(&str, usize); 3] = [("Patient", 120), ("Observation", 300), ("Encounter", 45)];

/// A router whose `GET /fhir/$export` streams NDJSON, type after type.
fn export_app(layer: AsyncLayer) -> Router {
    Router::new()
        .route(
            "/fhir/$export",
            axum::routing::get(|| async {
                let mut body = String::new();
                for (kind, count) in EXPORTED {
                    for i in 0..count {
                        body.push_str(&format!(r#"{{"resourceType":"{kind}","id":"{kind}-{i}"}}"#));
                        body.push('\n');
                    }
                }
                (
                    [(http::header::CONTENT_TYPE, "application/fhir+ndjson")],
                    body,
                )
            }),
        )
        .layer(layer)
}

/// Every file under `dir`, recursively.
fn files_under(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    entries
        .flatten()
        .flat_map(|entry| {
            let path = entry.path();
            if path.is_dir() {
                files_under(&path)
            } else {
                vec![path]
            }
        })
        .collect()
}

/// Issue #4 items 7 and 8, BULK-8, BULK-13, CANCEL-5: a bulk export run on A, with its files in a
/// folder both instances share, is polled, downloaded and deleted through B.
async fn bulk_files_through_another_instance<B: Backend>(backend: Arc<B>) {
    let client = TestClient::default();
    let dir = std::env::temp_dir().join(format!("tower-fhir-async-shared-{}", JobId::new()));
    std::fs::create_dir_all(&dir).expect("a temporary folder");
    let files: Arc<dyn tower_fhir_async::object_store::ObjectStore> = Arc::new(
        tower_fhir_async::object_store::local::LocalFileSystem::new_with_prefix(&dir)
            .expect("a local file store")
            .with_automatic_cleanup(true),
    );
    let instance = |name: &str, store| {
        AsyncLayer::builder(store)
            .base_url(BASE)
            .instance_id(format!("{name}-{}", JobId::new()))
            .file_store(files.clone())
            .build()
    };
    let a = serve(export_app(instance("a", backend.connect().await))).await;
    let b = serve(export_app(instance("b", backend.connect().await))).await;

    let kicked = client
        .send(
            Method::GET,
            &a.url("/fhir/$export"),
            &[("prefer", "respond-async")],
            "",
        )
        .await;
    let path = status_path(&kicked);
    backend.track(parse_job_id(&path));
    let done = client.poll_until_done(&b.url(&path), 500).await;
    assert_eq!(
        done.status,
        StatusCode::OK,
        "the manifest through B: {done:?}"
    );
    assert_eq!(done.header("content-type"), "application/json", "{done:?}");
    let manifest = done.json();
    let output = manifest["output"].as_array().expect("output[]").clone();
    let mut seen = std::collections::BTreeMap::new();
    for file in &output {
        let url = file["url"].as_str().expect("a file url");
        let file_path = &url[url.find("/fhir/").expect("a path under the base")..];
        let reply = client.get(&b.url(file_path)).await;
        assert_eq!(
            reply.status,
            StatusCode::OK,
            "{file_path} through B: {reply:?}"
        );
        let text = String::from_utf8_lossy(&reply.body).into_owned();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            Some(lines.len() as u64),
            file["count"].as_u64(),
            "count of {file_path}"
        );
        for line in lines {
            let resource: serde_json::Value = serde_json::from_str(line).expect("a JSON line");
            assert_eq!(resource["resourceType"], file["type"], "{line}");
        }
        *seen
            .entry(file["type"].as_str().unwrap_or_default().to_owned())
            .or_insert(0) += file["count"].as_u64().unwrap_or_default() as usize;
    }
    for (kind, count) in EXPORTED {
        assert_eq!(
            seen.get(kind),
            Some(&count),
            "{kind} resources in {manifest}"
        );
    }
    assert!(
        !files_under(&dir).is_empty(),
        "the files are in the shared folder"
    );

    let deleted = client.delete(&b.url(&path)).await;
    assert_eq!(
        deleted.status,
        StatusCode::ACCEPTED,
        "DELETE through B: {deleted:?}"
    );
    let started = Instant::now();
    while !files_under(&dir).is_empty() {
        assert!(
            started.elapsed() < SETUP_WAIT,
            "files left after the DELETE: {:?}",
            files_under(&dir)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let first = output[0]["url"].as_str().unwrap_or_default();
    let gone = client
        .get(&a.url(&first[first.find("/fhir/").unwrap_or(0)..]))
        .await;
    assert_eq!(
        gone.status,
        StatusCode::NOT_FOUND,
        "a deleted job's file on A: {gone:?}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// The instance running a job dies (SIGKILL, so no shutdown and no lease given back): once its
/// lease lapses, another instance records the job as failed with a `503` `transient` entry, so
/// the poller is not left waiting forever.
async fn jobs_of_a_killed_instance_fail<B: Backend>(backend: Arc<B>, label: &str) {
    let store_url = backend.demo_store_url();
    let mut demo = Demo::start(&[
        "--patients",
        "20",
        "--reindex-secs",
        "600",
        "--store",
        &store_url,
    ]);
    let client = TestClient::default();
    let kicked = client
        .send(
            Method::POST,
            &demo.url("/fhir/$reindex"),
            &[
                ("prefer", "respond-async"),
                ("content-type", "application/fhir+json"),
            ],
            "",
        )
        .await;
    let path = status_path(&kicked);
    let id = parse_job_id(&path);
    backend.track(id);
    let running = client.get(&demo.url(&path)).await;
    assert_eq!(
        running.status,
        StatusCode::ACCEPTED,
        "the demo runs its $reindex: {running:?}"
    );

    // Instance B. Its own lease does not matter for the lost job (that is the demo's 10 s); a
    // short one makes its watcher check for lapsed leases every second.
    let store = backend.connect().await;
    let b = serve(hold_app(layer(store.clone(), "b", Some(3 * SECOND)), None)).await;
    let started = Instant::now();
    let runner = loop {
        let record = store
            .get(&id, SystemTime::now())
            .await
            .expect("reading the job")
            .expect("the job is recorded");
        if let JobState::Running { instance, .. } = record.state {
            break instance;
        }
        assert!(
            started.elapsed() < SETUP_WAIT,
            "the demo did not start the job within {SETUP_WAIT:?}: {record:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let polled = client.get(&b.url(&path)).await;
    assert_eq!(
        polled.status,
        StatusCode::ACCEPTED,
        "B answers a poll of the demo's job: {polled:?}"
    );

    demo.kill();
    let killed = Instant::now();
    let done = loop {
        let reply = client.get(&b.url(&path)).await;
        match reply.status {
            StatusCode::OK => break reply,
            StatusCode::ACCEPTED => {}
            _ => panic!("polling the lost job through B: {reply:?}"),
        }
        assert!(
            killed.elapsed() < LOST_WAIT,
            "the job of the killed instance {runner:?} was not recorded as failed within \
             {LOST_WAIT:?}; last answer {reply:?}"
        );
        tokio::time::sleep(LOST_POLL_EVERY).await;
    };
    eprintln!(
        "[{label}] the killed instance's job answered 200 through B {:?} after SIGKILL",
        killed.elapsed()
    );
    let bundle = done.json();
    assert_eq!(bundle["resourceType"], "Bundle", "{bundle}");
    assert_eq!(bundle["type"], "batch-response", "{bundle}");
    assert_eq!(
        bundle["entry"][0]["response"]["status"], "503 Service Unavailable",
        "{bundle}"
    );
    let outcome = &bundle["entry"][0]["response"]["outcome"];
    assert_eq!(outcome["resourceType"], "OperationOutcome", "{bundle}");
    assert_eq!(outcome["issue"][0]["code"], "transient", "{bundle}");
}

// ---------------------------------------------------------------------------------------------
// The tests: every scenario against Redis and against PostgreSQL

// Issue #4 item 5, CANCEL-1, CANCEL-3, STATUS-4: polls and a DELETE through B reach the job
// running on A; A's progress is seen through B; A's work stops.
#[tokio::test(flavor = "multi_thread")]
async fn item_5_cancel_3_status_4_redis_delete_through_another_instance_stops_the_work() {
    run(RedisBackend::open("cancel").await, |backend| {
        cancel_through_another_instance(backend, "redis", None, true)
    })
    .await;
}

// Issue #4 item 5, CANCEL-1, CANCEL-3, STATUS-4 on PostgreSQL.
#[tokio::test(flavor = "multi_thread")]
async fn item_5_cancel_3_status_4_postgres_delete_through_another_instance_stops_the_work() {
    run(PostgresBackend::open("cancel").await, |backend| {
        cancel_through_another_instance(backend, "postgres", None, true)
    })
    .await;
}

// Issue #4 item 5, CANCEL-3: the cancel is pushed (Redis pub/sub): with hour-long leases no lease
// check runs in time, yet A stops the work. Issue #11 item 9, STATUS-4: and A's progress reaches
// B through the progress flush and the change feed, not a lease check.
#[tokio::test(flavor = "multi_thread")]
async fn item_5_cancel_3_redis_cancel_is_pushed_not_polled() {
    run(RedisBackend::open("push").await, |backend| {
        cancel_through_another_instance(backend, "redis push", Some(3600 * SECOND), true)
    })
    .await;
}

// Issue #4 item 5, CANCEL-3, issue #11 item 9: the cancel is pushed (PostgreSQL NOTIFY), and
// progress shared, as above.
#[tokio::test(flavor = "multi_thread")]
async fn item_5_cancel_3_postgres_cancel_is_pushed_not_polled() {
    run(PostgresBackend::open("push").await, |backend| {
        cancel_through_another_instance(backend, "postgres push", Some(3600 * SECOND), true)
    })
    .await;
}

// STATUS-5, STATUS-14: a completed result outlives the instance (process) that produced it.
#[tokio::test(flavor = "multi_thread")]
async fn status_5_status_14_redis_results_survive_a_restart() {
    run(
        RedisBackend::open("restart").await,
        results_survive_a_restart,
    )
    .await;
}

// STATUS-5, STATUS-14 on PostgreSQL.
#[tokio::test(flavor = "multi_thread")]
async fn status_5_status_14_postgres_results_survive_a_restart() {
    run(
        PostgresBackend::open("restart").await,
        results_survive_a_restart,
    )
    .await;
}

// Issue #4 item 4, STATUS-10: the demo server, killed with SIGKILL while running a job on Redis;
// another instance records the job as failed (503, transient).
#[tokio::test(flavor = "multi_thread")]
async fn item_4_status_10_redis_jobs_of_a_killed_process_fail_as_transient() {
    run(RedisBackend::open_for_demo().await, |backend| {
        jobs_of_a_killed_instance_fail(backend, "redis")
    })
    .await;
}

// Issue #4 item 4, STATUS-10 on PostgreSQL.
#[tokio::test(flavor = "multi_thread")]
async fn item_4_status_10_postgres_jobs_of_a_killed_process_fail_as_transient() {
    run(PostgresBackend::open_for_demo().await, |backend| {
        jobs_of_a_killed_instance_fail(backend, "postgres")
    })
    .await;
}

// Issue #4 item 7, BULK-13, CANCEL-5: an export run on A is served and deleted by B (Redis).
#[tokio::test(flavor = "multi_thread")]
async fn item_7_bulk_13_redis_bulk_files_through_another_instance() {
    run(
        RedisBackend::open("bulk").await,
        bulk_files_through_another_instance,
    )
    .await;
}

// Issue #4 item 7, BULK-13, CANCEL-5 on PostgreSQL.
#[tokio::test(flavor = "multi_thread")]
async fn item_7_bulk_13_postgres_bulk_files_through_another_instance() {
    run(
        PostgresBackend::open("bulk").await,
        bulk_files_through_another_instance,
    )
    .await;
}

// Issue #7 item 3, STATUS-3: a long poll held by B wakes when A's job ends, through Redis
// pub/sub, not by reading the store every 250 ms.
#[tokio::test(flavor = "multi_thread")]
async fn status_3_redis_long_poll_wakes_across_instances() {
    run(RedisBackend::open("longpoll").await, |backend| async move {
        let first = backend.connect().await;
        let second = backend.connect().await;
        let stores = std::sync::Mutex::new(vec![second, first]);
        long_poll::long_poll_wakes_across_instances(
            || stores.lock().unwrap().pop().expect("two stores"),
            false,
        )
        .await;
    })
    .await;
}

// Issue #7 item 3, STATUS-3 on PostgreSQL (`NOTIFY`).
#[tokio::test(flavor = "multi_thread")]
async fn status_3_postgres_long_poll_wakes_across_instances() {
    run(
        PostgresBackend::open("longpoll").await,
        |backend| async move {
            let first = backend.connect().await;
            let second = backend.connect().await;
            let stores = std::sync::Mutex::new(vec![second, first]);
            long_poll::long_poll_wakes_across_instances(
                || stores.lock().unwrap().pop().expect("two stores"),
                false,
            )
            .await;
        },
    )
    .await;
}

// The same scenarios on a Redis Cluster (`RedisClusterStore`: sharded pub/sub, partitions).

// Issue #16 item 1, CANCEL-1, CANCEL-3, STATUS-4 on a Redis Cluster.
#[cfg(feature = "redis-cluster")]
#[tokio::test(flavor = "multi_thread")]
async fn item_16_cancel_3_status_4_cluster_delete_through_another_instance_stops_the_work() {
    run(ClusterBackend::open("cancel").await, |backend| {
        cancel_through_another_instance(backend, "redis cluster", None, true)
    })
    .await;
}

// Issue #16 item 1, CANCEL-3: the cancel and progress are pushed through sharded pub/sub.
#[cfg(feature = "redis-cluster")]
#[tokio::test(flavor = "multi_thread")]
async fn item_16_cancel_3_cluster_cancel_is_pushed_not_polled() {
    run(ClusterBackend::open("push").await, |backend| {
        cancel_through_another_instance(backend, "redis cluster push", Some(3600 * SECOND), true)
    })
    .await;
}

// Issue #16 item 1, STATUS-5, STATUS-14 on a Redis Cluster.
#[cfg(feature = "redis-cluster")]
#[tokio::test(flavor = "multi_thread")]
async fn item_16_status_5_cluster_results_survive_a_restart() {
    run(
        ClusterBackend::open("restart").await,
        results_survive_a_restart,
    )
    .await;
}

// Issue #16 item 1, STATUS-10: the demo on `--store redis-cluster://…`, killed with SIGKILL.
#[cfg(feature = "redis-cluster")]
#[tokio::test(flavor = "multi_thread")]
async fn item_16_status_10_cluster_jobs_of_a_killed_process_fail_as_transient() {
    run(ClusterBackend::open_for_demo().await, |backend| {
        jobs_of_a_killed_instance_fail(backend, "redis cluster")
    })
    .await;
}

// Issue #16 item 1, BULK-13, CANCEL-5 on a Redis Cluster.
#[cfg(feature = "redis-cluster")]
#[tokio::test(flavor = "multi_thread")]
async fn item_16_bulk_13_cluster_bulk_files_through_another_instance() {
    run(
        ClusterBackend::open("bulk").await,
        bulk_files_through_another_instance,
    )
    .await;
}

// Issue #16 item 1, STATUS-3: a long poll wakes across instances through sharded pub/sub.
#[cfg(feature = "redis-cluster")]
#[tokio::test(flavor = "multi_thread")]
async fn item_16_status_3_cluster_long_poll_wakes_across_instances() {
    run(
        ClusterBackend::open("longpoll").await,
        |backend| async move {
            let first = backend.connect().await;
            let second = backend.connect().await;
            let stores = std::sync::Mutex::new(vec![second, first]);
            long_poll::long_poll_wakes_across_instances(
                || stores.lock().unwrap().pop().expect("two stores"),
                false,
            )
            .await;
        },
    )
    .await;
}
