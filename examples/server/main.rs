//! A small FHIR R4 server (JSON only) on synthetic in-memory data, wrapped by
//! [`tower_fhir_async::AsyncLayer`] so that any request sent with `Prefer: respond-async` is
//! answered `202 Accepted` with a status URL to poll.
//!
//! ```text
//! cargo run --example server -- --help
//! cargo run --example server -- --addr 127.0.0.1:0 --patients 200
//! ```
//!
//! The FHIR server itself knows nothing about the async pattern: it answers every request
//! synchronously. Only `$reindex` cooperates, reading the layer's `JobContext` to report progress
//! and notice cancellation.

mod access_log;
mod app;
mod auth;
mod batch;
mod capability;
mod cli;
mod compress;
mod connections;
mod data;
mod db;
mod export;
mod extract;
mod instant;
mod interaction;
mod prefer;
mod prng;
mod query;
mod reindex;
mod response;
mod routes;
mod search;

use std::io::Write;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use axum::middleware;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tower_fhir_async::{AsyncLayer, MemoryStore};
use tracing_subscriber::EnvFilter;

use crate::app::App;
use crate::cli::Command;
use crate::db::Db;

/// How long open connections may keep running after a shutdown signal; the layer's jobs get
/// the same grace afterwards.
const GRACE: Duration = Duration::from_secs(10);

/// The longest a job may run; a job still running then fails with `504` `timeout`.
const MAX_RUN_TIME: Duration = Duration::from_secs(3600);

/// The environment variable that may hold the layer's caller key (`--caller-key` wins).
const CALLER_KEY_VAR: &str = "FHIR_ASYNC_CALLER_KEY";

#[tokio::main]
async fn main() -> ExitCode {
    let options = match cli::parse(std::env::args().skip(1)) {
        Ok(Command::Run(options)) => *options,
        Ok(Command::Help) => {
            println!("{}", cli::USAGE);
            return ExitCode::SUCCESS;
        }
        Err(err) => {
            eprintln!("error: {err}\nRun with --help to see the flags.");
            return ExitCode::from(2);
        }
    };
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        // Its default reports a failed log write with `eprintln!`, which panics when stderr is
        // a closed pipe; the panicking task could be the one that handles SIGTERM.
        .log_internal_errors(false)
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .init();

    let listener = match TcpListener::bind(options.addr).await {
        Ok(listener) => listener,
        Err(err) => {
            eprintln!(
                "error: cannot listen on {}: {err}; pick another --addr (port 0 finds a free one)",
                options.addr
            );
            return ExitCode::FAILURE;
        }
    };
    let addr = match listener.local_addr() {
        Ok(addr) => addr,
        Err(err) => {
            eprintln!("error: cannot read the bound address: {err}");
            return ExitCode::FAILURE;
        }
    };
    let local_base = format!("http://{addr}/fhir");
    let public_base = options
        .base_url
        .clone()
        .unwrap_or_else(|| local_base.clone());

    let builder = match &options.store {
        cli::StoreChoice::Memory => AsyncLayer::builder(MemoryStore::default()),
        #[cfg(feature = "redis")]
        cli::StoreChoice::Redis(url) => match tower_fhir_async::RedisStore::connect(url).await {
            Ok(store) => AsyncLayer::builder(store),
            Err(err) => {
                eprintln!("error: cannot use Redis at {url}: {err}");
                return ExitCode::from(2);
            }
        },
        #[cfg(feature = "redis-cluster")]
        cli::StoreChoice::RedisCluster(nodes) => {
            match tower_fhir_async::RedisClusterStore::connect(nodes).await {
                Ok(store) => AsyncLayer::builder(store),
                Err(err) => {
                    eprintln!("error: cannot use the Redis Cluster at {nodes:?}: {err}");
                    return ExitCode::from(2);
                }
            }
        }
        #[cfg(feature = "postgres")]
        cli::StoreChoice::Postgres(url) => match postgres_store(url).await {
            Ok(store) => AsyncLayer::builder(store),
            Err(err) => {
                eprintln!("error: cannot use PostgreSQL at {url}: {err}");
                return ExitCode::from(2);
            }
        },
    };
    // `Prefer: respond-async, wait=N` answers at once when the job ends within N s (at most
    // 10), and status polls may long-poll with `Prefer: wait=N`.
    let mut builder = builder
        .base_url(&public_base)
        .max_wait(Duration::from_secs(10))
        .max_run_time(MAX_RUN_TIME);
    if let Some(url) = options
        .files
        .as_ref()
        .and_then(|f| f.to_str())
        .filter(|f| f.starts_with("s3://"))
    {
        // Bulk files in S3 or an S3-compatible store (feature `s3`): bucket and prefix from the
        // URL, region, credentials and endpoint from the `AWS_*` environment variables.
        #[cfg(feature = "s3")]
        match tower_fhir_async::s3::file_store(url) {
            Ok(files) => builder = builder.file_store(files),
            Err(err) => {
                eprintln!("error: cannot keep bulk files in {url}: {err}");
                return ExitCode::from(2);
            }
        }
        #[cfg(not(feature = "s3"))]
        {
            eprintln!(
                "error: --files {url} needs the s3 feature: cargo run --example server --features s3 -- …"
            );
            return ExitCode::from(2);
        }
    } else if let Some(dir) = &options.files {
        // Bulk files in a folder: servers sharing a job store and this folder serve each
        // other's exports.
        let files = std::fs::create_dir_all(dir)
            .map_err(|err| err.to_string())
            .and_then(|()| {
                tower_fhir_async::object_store::local::LocalFileSystem::new_with_prefix(dir)
                    .map(|files| files.with_automatic_cleanup(true))
                    .map_err(|err| err.to_string())
            });
        match files {
            Ok(files) => builder = builder.file_store(std::sync::Arc::new(files)),
            Err(err) => {
                eprintln!("error: cannot keep bulk files in {}: {err}", dir.display());
                return ExitCode::from(2);
            }
        }
    }
    if options.auth {
        // SEC-10: each job belongs to the client that started it; another client's poll or
        // cancel gets the same 404 as a job that does not exist. The layer keeps only a keyed
        // digest of the subject; servers sharing a store need the same key.
        builder = builder.caller_from_extension(|caller: &auth::CallerId| caller.0.clone());
        let key = options
            .caller_key
            .clone()
            .or_else(|| std::env::var(CALLER_KEY_VAR).ok());
        if let Some(key) = key {
            builder = builder.caller_key(key);
        }
    }
    // SEC-7, SEC-13, STATUS-6: limits on by default (see --help); `off` lifts one.
    if let Some(limit) = options.max_running_jobs {
        builder = builder.max_running_jobs(limit);
    }
    if let Some(limit) = options.max_concurrent_jobs {
        builder = builder.max_concurrent_jobs(limit);
    }
    if let Some(limit) = options.max_jobs_per_caller {
        builder = builder.max_jobs_per_caller(limit);
    }
    if let Some(interval) = options.min_poll_interval {
        builder = builder.min_poll_interval(interval);
    }
    // CAP-4: GET /fhir/metadata says which interactions may be asynchronous.
    builder = builder
        .declare_async(options.declare_async)
        .retention(options.retention);
    if options.redirect {
        builder = builder.completion(tower_fhir_async::CompletionMode::Redirect);
    }
    let layer = match builder.try_build() {
        Ok(layer) => layer,
        Err(err) => {
            eprintln!("error: cannot configure the async layer with base {public_base}: {err}");
            return ExitCode::from(2);
        }
    };
    let shutdown = layer.shutdown_handle();
    tokio::spawn(layer.sweeper(Duration::from_secs(60)));

    let db = Db::new();
    let summary = data::generate(&db, options.patients);
    tracing::info!(
        patients = summary.patients,
        observations = summary.observations,
        conditions = summary.conditions,
        groups = summary.groups,
        "synthetic data generated"
    );
    let app = Arc::new(App {
        db,
        public_base: options.base_url.clone(),
        fallback_base: local_base,
        auth: options.auth,
        reindex_duration: options.reindex,
    });

    // Layers added later wrap the earlier ones: the async layer sits directly around the FHIR
    // routes, authentication outside it (so polls and cancels are authenticated too, and the
    // caller id reaches replayed requests), and the access log outermost.
    let router = routes::router(app);
    // Compression inside the async layer, as a FHIR server with its own would have it: jobs
    // still get plain JSON (the layer asks for identity).
    let router = if options.compress {
        router.layer(middleware::from_fn(compress::gzip))
    } else {
        router
    };
    let router = router.layer(layer);
    let router = if options.auth {
        router.layer(middleware::from_fn(auth::require_bearer))
    } else {
        router
    };
    let router = router.layer(middleware::from_fn(access_log::log));

    print_banner(addr, options.auth);

    let stop = CancellationToken::new();
    tokio::spawn(wait_for_signal(stop.clone()));
    // On a signal the layer drains first, while the server still answers: polls and cancels keep
    // working and new kick-offs get 503. Only then does the server stop accepting connections.
    let drain = {
        let stop = stop.clone();
        async move {
            stop.cancelled().await;
            let report = shutdown.shutdown(GRACE).await;
            tracing::info!(?report, "asynchronous jobs drained");
        }
    };
    let limits = connections::Limits {
        header_timeout: options.header_timeout,
        idle_timeout: options.idle_timeout,
    };
    let server = connections::serve(listener, router, limits, drain);
    // Graceful shutdown then waits for every open connection; a stalled client must not hold the
    // process forever.
    tokio::select! {
        () = server => {}
        () = async {
            stop.cancelled().await;
            tokio::time::sleep(GRACE * 2).await;
        } => {
            tracing::warn!("connections still open {}s after the signal; closing them", (GRACE * 2).as_secs());
        }
    }
    tracing::info!("stopped");
    ExitCode::SUCCESS
}

/// A PostgreSQL job store on `url`, its table created if missing.
#[cfg(feature = "postgres")]
async fn postgres_store(url: &str) -> Result<tower_fhir_async::PostgresStore, String> {
    let pool = tower_fhir_async::store::sqlx::postgres::PgPoolOptions::new()
        .max_connections(8)
        .acquire_timeout(Duration::from_secs(5))
        .connect(url)
        .await
        .map_err(|err| err.to_string())?;
    let store = tower_fhir_async::PostgresStore::new(pool);
    store.migrate().await.map_err(|err| err.to_string())?;
    Ok(store)
}

/// The start-up banner: the address (the real port when `--addr` asked for port 0) and a few
/// commands to try the async pattern.
fn print_banner(addr: SocketAddr, auth: bool) {
    let base = format!("http://{addr}/fhir");
    let auth_header = if auth {
        " -H 'Authorization: Bearer demo-token'"
    } else {
        ""
    };
    let mut out = std::io::stdout().lock();
    // Ignoring write errors: a closed stdout must not stop the server.
    let _ = writeln!(out, "listening on {base}");
    if auth {
        let _ = writeln!(
            out,
            "auth: every request needs `Authorization: Bearer <token>` (any token; the client is named \
             client-<first 16 hex digits of SHA-256(token)>); a job's status URL answers only the client that \
             started it (others get 404)"
        );
    }
    let _ = writeln!(
        out,
        "
Try it (single quotes keep the shell away from `$`):

  # 1. kick off a slow operation asynchronously: 202 Accepted + Content-Location
  curl -si -X POST{auth_header} -H 'Prefer: respond-async' -H 'Content-Type: application/fhir+json' '{base}/$reindex'

  # 2. poll the Content-Location from step 1: 202 + X-Progress while it runs
  STATUS_URL='<paste the Content-Location here>'
  curl -si{auth_header} \"$STATUS_URL\"

  # 3. once polling answers 200, the body is the batch-response Bundle
  curl -s{auth_header} \"$STATUS_URL\"

  # 4. or cancel the job while it runs
  curl -si -X DELETE{auth_header} \"$STATUS_URL\"

  # 5. any request can go async, e.g. a search
  curl -si{auth_header} -H 'Prefer: respond-async' '{base}/Patient?name=smi&_count=5'
"
    );
    let _ = out.flush();
}

/// Resolves on Ctrl-C or SIGTERM, then cancels `stop`.
async fn wait_for_signal(stop: CancellationToken) {
    let ctrl_c = async {
        if let Err(err) = tokio::signal::ctrl_c().await {
            tracing::error!(%err, "cannot listen for Ctrl-C");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(err) => {
                tracing::error!(%err, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    let signal = tokio::select! {
        () = ctrl_c => "Ctrl-C",
        () = terminate => "SIGTERM",
    };
    // Cancel first: nothing after this point may keep the server from stopping.
    stop.cancel();
    tracing::info!("{signal} received; shutting down");
}
