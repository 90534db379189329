//! Command-line flags, parsed by hand: there are few of them and the example should not pull in
//! an argument-parsing crate just for that.

use std::net::SocketAddr;
use std::time::Duration;

/// The usage text printed by `--help`.
pub(crate) const USAGE: &str = "\
A small FHIR R4 server (JSON only) on synthetic data, wrapped by tower-fhir-async's AsyncLayer.

USAGE:
    cargo run --example server -- [FLAGS]

FLAGS:
    --addr HOST:PORT      address to listen on (default 127.0.0.1:8080; port 0 picks a free one)
    --base-url URL        public FHIR base used in Content-Location and Bundle links
                          (default http://ADDR/fhir, ADDR being the bound address)
    --patients N          number of synthetic patients to generate (default 1000)
    --store BACKEND       job store for the async layer: `memory` (default), or, to share
                          jobs between several servers, `redis://HOST:PORT` (build with
                          --features redis), `redis-cluster://HOST:PORT,HOST:PORT,...` (a
                          Redis Cluster, any of its nodes; --features redis-cluster) or
                          `postgres://USER@HOST/DB` (--features postgres)
    --files DIR           keep bulk export files in folder DIR (created if missing) instead of
                          memory; give servers that share a --store the same DIR. Or
                          s3://BUCKET/PREFIX (build with --features s3): files in S3 or an
                          S3-compatible store, configured by the AWS_* environment variables
    --compress            gzip the FHIR answers for clients that accept gzip, with the
                          compression inside the async layer (as a server with its own
                          compression would have it)
    --auth                require `Authorization: Bearer <token>` on every request (any token;
                          a stand-in for real verification), and bind each async job to the
                          client that started it (another client polling or cancelling it
                          gets 404). The client is named by its subject, `client-` and the
                          first 16 hex digits of SHA-256(token), never by the token itself
    --caller-key KEY      the async layer's caller key (16 bytes or more): only an HMAC of
                          each client's subject under it is stored and logged. Prefer the
                          FHIR_ASYNC_CALLER_KEY environment variable (a flag shows in `ps`).
                          Give every server sharing a --store the same key (default: random
                          per process, so another server would not know the client's jobs)
    --reindex-secs N      how long POST /fhir/$reindex takes, in seconds (default 10)
    --completion MODE     how a finished job is collected: `bundle` (default; the status URL
                          answers 200 with a batch-response Bundle) or `redirect` (303 to
                          {status URL}/result, which answers as the synchronous call would)
    --retention D         how long a finished job's result stays available (default 24h)
    --no-declare-async    leave GET /fhir/metadata as the server wrote it; by default the layer
                          adds the synchronicity-control extension (`either`) to what it makes
                          asynchronous
    -h, --help            print this help and exit

LIMITS (durations as 250ms, 10s, 2m; a bare number is seconds):
    --header-timeout D    close a connection that has not sent a whole request head within D
                          of the server starting to wait for it; so also how long an idle
                          keep-alive connection stays open (default 10s)
    --idle-timeout D      close a connection on which nothing was read or written for D, e.g.
                          a stalled upload or a client that stopped reading (default 60s;
                          keep it above --reindex-secs for synchronous calls)
    --max-running-jobs N  unfinished jobs (queued or running); more kick-offs get 429
                          (default 64; `off`)
    --max-concurrent-jobs N
                          jobs executed at once; later ones wait in order as `queued`
                          (default: the layer's, 8 per core)
    --max-jobs-per-caller N
                          unfinished jobs per client with --auth; more get 429 (default 10;
                          `off`)
    --min-poll-interval D faster polls of one job get 429 + Retry-After (default 250ms, so
                          clients polling each second or following Retry-After never see
                          it; `off`)

Logs go to stderr; set RUST_LOG (default `info`) to change the level. They carry paths, never
query strings or credentials.";

/// The settings the server runs with.
#[derive(Debug, Clone)]
pub(crate) struct Options {
    pub(crate) addr: SocketAddr,
    pub(crate) base_url: Option<String>,
    pub(crate) patients: usize,
    pub(crate) auth: bool,
    /// Gzip the FHIR routes' answers for clients that accept it, inside the async layer.
    pub(crate) compress: bool,
    pub(crate) reindex: Duration,
    pub(crate) store: StoreChoice,
    /// Where bulk export files go; `None`: in memory.
    pub(crate) files: Option<std::path::PathBuf>,
    /// The layer's caller key from `--caller-key`; `main` falls back to the environment.
    pub(crate) caller_key: Option<String>,
    /// How long a client may take to send a request head (and an idle keep-alive may last).
    pub(crate) header_timeout: Duration,
    /// How long a connection may go without a byte read or written.
    pub(crate) idle_timeout: Duration,
    pub(crate) max_running_jobs: Option<usize>,
    pub(crate) max_concurrent_jobs: Option<usize>,
    pub(crate) max_jobs_per_caller: Option<usize>,
    pub(crate) min_poll_interval: Option<Duration>,
    /// `--completion redirect`: finished jobs answer `303` to their result.
    pub(crate) redirect: bool,
    pub(crate) retention: Duration,
    /// Declare the layer in the CapabilityStatement (`--no-declare-async` turns it off).
    pub(crate) declare_async: bool,
}

/// Where the async layer keeps its jobs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum StoreChoice {
    Memory,
    #[cfg(feature = "redis")]
    Redis(String),
    /// The `redis://HOST:PORT` URLs of some nodes of a Redis Cluster.
    #[cfg(feature = "redis-cluster")]
    RedisCluster(Vec<String>),
    #[cfg(feature = "postgres")]
    Postgres(String),
}

/// A backend this build was compiled without.
#[cfg(not(all(feature = "redis", feature = "redis-cluster", feature = "postgres")))]
fn needs_feature(raw: &str, feature: &str) -> UsageError {
    UsageError(format!(
        "store backend {raw} needs the `{feature}` feature: cargo run --example server --features {feature} -- --store {raw}"
    ))
}

/// The store a `--store` value names, or why it cannot be used in this build.
fn store_choice(raw: &str) -> Result<StoreChoice, UsageError> {
    if raw == "memory" {
        Ok(StoreChoice::Memory)
    } else if let Some(nodes) = raw.strip_prefix("redis-cluster://") {
        let nodes: Vec<String> = nodes
            .split(',')
            .map(str::trim)
            .filter(|node| !node.is_empty())
            .map(|node| format!("redis://{node}"))
            .collect();
        if nodes.is_empty() {
            return Err(UsageError(format!(
                "{raw:?} names no node; use redis-cluster://HOST:PORT,HOST:PORT,..."
            )));
        }
        #[cfg(feature = "redis-cluster")]
        return Ok(StoreChoice::RedisCluster(nodes));
        #[cfg(not(feature = "redis-cluster"))]
        return Err(needs_feature(raw, "redis-cluster"));
    } else if raw.starts_with("redis://") || raw.starts_with("rediss://") {
        #[cfg(feature = "redis")]
        return Ok(StoreChoice::Redis(raw.to_owned()));
        #[cfg(not(feature = "redis"))]
        return Err(needs_feature(raw, "redis"));
    } else if raw.starts_with("postgres://") || raw.starts_with("postgresql://") {
        #[cfg(feature = "postgres")]
        return Ok(StoreChoice::Postgres(raw.to_owned()));
        #[cfg(not(feature = "postgres"))]
        return Err(needs_feature(raw, "postgres"));
    } else {
        Err(UsageError(format!(
            "unknown store backend {raw:?}; use memory, redis://HOST:PORT, \
             redis-cluster://HOST:PORT,HOST:PORT,... or postgres://USER@HOST/DB"
        )))
    }
}

/// What the command line asks for.
#[derive(Debug)]
pub(crate) enum Command {
    Run(Box<Options>),
    Help,
}

/// A command-line mistake: the message says what was wrong and what to do instead.
#[derive(Debug)]
pub(crate) struct UsageError(pub(crate) String);

impl std::fmt::Display for UsageError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// Parses the flags (without the program name).
pub(crate) fn parse(args: impl IntoIterator<Item = String>) -> Result<Command, UsageError> {
    let mut options = Options {
        addr: SocketAddr::from(([127, 0, 0, 1], 8080)),
        base_url: None,
        patients: 1000,
        auth: false,
        compress: false,
        reindex: Duration::from_secs(10),
        store: StoreChoice::Memory,
        files: None,
        caller_key: None,
        header_timeout: Duration::from_secs(10),
        idle_timeout: Duration::from_secs(60),
        max_running_jobs: Some(64),
        max_concurrent_jobs: None,
        max_jobs_per_caller: Some(10),
        min_poll_interval: Some(Duration::from_millis(250)),
        redirect: false,
        retention: Duration::from_secs(24 * 3600),
        declare_async: true,
    };
    let mut args = args.into_iter();
    while let Some(arg) = args.next() {
        // Accept `--flag=value` as well as `--flag value`, as most CLIs do.
        let (flag, inline) = match arg.split_once('=') {
            Some((flag, value)) if flag.starts_with("--") => {
                (flag.to_owned(), Some(value.to_owned()))
            }
            _ => (arg.clone(), None),
        };
        let mut value = |what: &str| -> Result<String, UsageError> {
            inline
                .clone()
                .or_else(|| args.next())
                .ok_or_else(|| UsageError(format!("{flag} needs a value: {flag} {what}")))
        };
        match flag.as_str() {
            "-h" | "--help" => return Ok(Command::Help),
            "--addr" => {
                let raw = value("HOST:PORT")?;
                options.addr = raw.parse().map_err(|_| {
                    UsageError(format!(
                        "--addr {raw:?} is not a socket address; write it as IP:PORT, e.g. 127.0.0.1:8080"
                    ))
                })?;
            }
            "--base-url" => {
                let raw = value("URL")?;
                options.base_url = Some(parse_base_url(&raw)?);
            }
            "--patients" => {
                let raw = value("N")?;
                options.patients = raw.parse().map_err(|_| {
                    UsageError(format!(
                        "--patients {raw:?} is not a number; give a count such as 1000"
                    ))
                })?;
            }
            "--store" => {
                options.store = store_choice(&value("BACKEND")?)?;
            }
            "--files" => {
                let raw = value("DIR")?;
                if raw.trim().is_empty() {
                    return Err(UsageError(
                        "--files needs a folder or an S3 URL: --files DIR or --files s3://BUCKET/PREFIX"
                            .into(),
                    ));
                }
                options.files = Some(raw.into());
            }
            "--auth" => {
                if inline.is_some() {
                    return Err(UsageError("--auth takes no value".into()));
                }
                options.auth = true;
            }
            "--compress" => {
                if inline.is_some() {
                    return Err(UsageError("--compress takes no value".into()));
                }
                options.compress = true;
            }
            "--reindex-secs" => {
                let raw = value("N")?;
                let secs: u64 = raw.parse().map_err(|_| {
                    UsageError(format!(
                        "--reindex-secs {raw:?} is not a whole number of seconds; try 10"
                    ))
                })?;
                options.reindex = Duration::from_secs(secs);
            }
            "--caller-key" => {
                let raw = value("KEY")?;
                if raw.len() < 16 {
                    return Err(UsageError(format!(
                        "--caller-key is {} bytes long; give at least 16 (32 random bytes, e.g. \
                         `openssl rand -hex 32`)",
                        raw.len()
                    )));
                }
                options.caller_key = Some(raw);
            }
            "--completion" => {
                options.redirect = match value("MODE")?.as_str() {
                    "bundle" => false,
                    "redirect" => true,
                    other => {
                        return Err(UsageError(format!(
                            "--completion {other:?} is not a completion mode; use bundle or redirect"
                        )));
                    }
                };
            }
            "--retention" => {
                options.retention = duration(&flag, &value("DURATION")?)?;
            }
            "--no-declare-async" => {
                if inline.is_some() {
                    return Err(UsageError("--no-declare-async takes no value".into()));
                }
                options.declare_async = false;
            }
            "--header-timeout" => {
                options.header_timeout = duration(&flag, &value("DURATION")?)?;
            }
            "--idle-timeout" => {
                options.idle_timeout = duration(&flag, &value("DURATION")?)?;
            }
            "--max-running-jobs" => {
                options.max_running_jobs = off_or(&value("N")?, |raw| count(&flag, raw))?;
            }
            "--max-concurrent-jobs" => {
                options.max_concurrent_jobs = Some(count(&flag, &value("N")?)?);
            }
            "--max-jobs-per-caller" => {
                options.max_jobs_per_caller = off_or(&value("N")?, |raw| count(&flag, raw))?;
            }
            "--min-poll-interval" => {
                options.min_poll_interval =
                    off_or(&value("DURATION")?, |raw| duration(&flag, raw))?;
            }
            other => {
                return Err(UsageError(format!("unknown flag {other:?}")));
            }
        }
    }
    Ok(Command::Run(Box::new(options)))
}

/// `None` for `off`, else what `parse` makes of the value.
fn off_or<T>(
    raw: &str,
    parse: impl FnOnce(&str) -> Result<T, UsageError>,
) -> Result<Option<T>, UsageError> {
    if raw.eq_ignore_ascii_case("off") {
        Ok(None)
    } else {
        parse(raw).map(Some)
    }
}

/// A duration longer than zero: `250ms`, `10s`, `2m`, or a bare number of seconds.
fn duration(flag: &str, raw: &str) -> Result<Duration, UsageError> {
    let parsed = match raw.parse::<u64>() {
        Ok(secs) => Some(Duration::from_secs(secs)),
        Err(_) => humantime::parse_duration(raw).ok(),
    };
    parsed.filter(|d| !d.is_zero()).ok_or_else(|| {
        UsageError(format!(
            "{flag} {raw:?} is not a duration longer than zero; write e.g. 250ms, 10s or 2m"
        ))
    })
}

/// A whole number of at least 1.
fn count(flag: &str, raw: &str) -> Result<usize, UsageError> {
    raw.parse::<usize>().ok().filter(|n| *n > 0).ok_or_else(|| {
        UsageError(format!(
            "{flag} {raw:?} is not a whole number of at least 1; give e.g. 10, or `off`"
        ))
    })
}

/// Checks that the public base is an absolute http(s) URL and drops a trailing slash, so that
/// `{base}/Patient/1` never holds a double slash.
fn parse_base_url(raw: &str) -> Result<String, UsageError> {
    let trimmed = raw.trim_end_matches('/');
    let rest = trimmed
        .strip_prefix("http://")
        .or_else(|| trimmed.strip_prefix("https://"));
    match rest {
        Some(rest) if !rest.is_empty() && !rest.starts_with('/') => Ok(trimmed.to_owned()),
        _ => Err(UsageError(format!(
            "--base-url {raw:?} is not an absolute http(s) URL; write e.g. https://fhir.example.org/fhir"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(args: &[&str]) -> Result<Command, UsageError> {
        parse(args.iter().map(|s| s.to_string()))
    }

    #[test]
    fn defaults_and_flags() {
        let Ok(Command::Run(o)) = run(&["--addr=127.0.0.1:0", "--patients", "5", "--auth"]) else {
            panic!("expected options");
        };
        assert_eq!(o.addr.port(), 0);
        assert_eq!(o.patients, 5);
        assert!(o.auth);
        assert!(matches!(run(&["--help"]), Ok(Command::Help)));
        let err = run(&["--store", "redis"]).unwrap_err();
        assert!(err.0.starts_with("unknown store backend"), "{}", err.0);
        assert!(
            matches!(run(&["--store", "memory"]), Ok(Command::Run(o)) if o.store == StoreChoice::Memory)
        );
        let err = run(&["--store", "redis-cluster://,"]).unwrap_err();
        assert!(err.0.contains("names no node"), "{}", err.0);
        #[cfg(feature = "redis-cluster")]
        assert!(matches!(
            run(&["--store", "redis-cluster://127.0.0.1:7000, 127.0.0.1:7001"]),
            Ok(Command::Run(o)) if o.store == StoreChoice::RedisCluster(vec![
                "redis://127.0.0.1:7000".into(),
                "redis://127.0.0.1:7001".into(),
            ])
        ));
        #[cfg(not(feature = "redis-cluster"))]
        assert!(
            run(&["--store", "redis-cluster://127.0.0.1:7000"])
                .unwrap_err()
                .0
                .contains("--features redis-cluster")
        );
        assert!(run(&["--base-url", "fhir.example.org"]).is_err());
        assert!(run(&["--patients"]).is_err());
        assert!(o.declare_async && !o.redirect);
        assert_eq!(o.retention, Duration::from_secs(24 * 3600));
        let Ok(Command::Run(o)) = run(&[
            "--completion",
            "redirect",
            "--retention=2s",
            "--no-declare-async",
        ]) else {
            panic!("expected options");
        };
        assert!(o.redirect && !o.declare_async);
        assert_eq!(o.retention, Duration::from_secs(2));
        let err = run(&["--completion", "later"]).unwrap_err();
        assert!(err.0.contains("--completion"), "{}", err.0);
        assert!(run(&["--retention", "0"]).is_err());
    }

    // SEC-7, SEC-13, STATUS-6: the limits are on by default, and each can be changed or (the
    // layer's) turned off; nonsense is refused with the flag's name.
    #[test]
    fn sec_7_limits_default_on_and_change() {
        let Ok(Command::Run(o)) = run(&[]) else {
            panic!("expected options");
        };
        assert_eq!(o.header_timeout, Duration::from_secs(10));
        assert_eq!(o.idle_timeout, Duration::from_secs(60));
        assert_eq!(o.max_running_jobs, Some(64));
        assert_eq!(o.max_jobs_per_caller, Some(10));
        assert_eq!(o.min_poll_interval, Some(Duration::from_millis(250)));
        assert_eq!(o.caller_key, None);
        let Ok(Command::Run(o)) = run(&[
            "--header-timeout=500ms",
            "--idle-timeout",
            "5",
            "--max-running-jobs",
            "off",
            "--max-jobs-per-caller=3",
            "--max-concurrent-jobs",
            "2",
            "--min-poll-interval",
            "OFF",
            "--caller-key",
            "0123456789abcdef",
        ]) else {
            panic!("expected options");
        };
        assert_eq!(o.header_timeout, Duration::from_millis(500));
        assert_eq!(o.idle_timeout, Duration::from_secs(5));
        assert_eq!(o.max_running_jobs, None);
        assert_eq!(o.max_jobs_per_caller, Some(3));
        assert_eq!(o.max_concurrent_jobs, Some(2));
        assert_eq!(o.min_poll_interval, None);
        assert_eq!(o.caller_key.as_deref(), Some("0123456789abcdef"));
        for bad in [
            &["--header-timeout", "0"][..],
            &["--header-timeout", "off"],
            &["--idle-timeout", "soon"],
            &["--max-running-jobs", "0"],
            &["--max-concurrent-jobs", "0"],
            &["--min-poll-interval", "-1"],
            &["--caller-key", "short"],
        ] {
            let err = run(bad).unwrap_err();
            assert!(err.0.contains(bad[0]), "{}", err.0);
        }
    }
}
