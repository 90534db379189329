//! A gateway: any FHIR server (HAPI, Firely, Medplum, a cloud FHIR service) behind the
//! asynchronous layer over HTTP.
//!
//! ```sh
//! cargo run --example gateway --features upstream -- --upstream http://127.0.0.1:8103/fhir/R4
//! # listening on http://127.0.0.1:8080/fhir/R4
//! curl -i -H 'Prefer: respond-async' http://127.0.0.1:8080/fhir/R4/Patient?_count=5
//! ```
//!
//! Every request goes to the upstream; with `Prefer: respond-async` the layer answers `202` and
//! runs it in the background; the upstream's URLs in answers become the gateway's.
//!
//! An `https` upstream needs the feature `upstream-tls`; `--ca-file` trusts a private CA:
//!
//! ```sh
//! cargo run --example gateway --features upstream-tls -- \
//!     --upstream https://fhir.internal:8443/fhir/R4 --ca-file internal-ca.pem
//! ```

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::extract::{ConnectInfo, Request};
use http::{HeaderName, HeaderValue, Uri};
use tower::ServiceBuilder;
use tower_fhir_async::upstream::Upstream;
use tower_fhir_async::{AsyncLayer, MemoryStore, UpstreamFiles};

const USAGE: &str = "\
A FHIR server behind the asynchronous request patterns, over HTTP.

USAGE:
    cargo run --example gateway --features upstream -- --upstream URL [FLAGS]

FLAGS:
    --upstream URL        the FHIR server's base URL, e.g. http://127.0.0.1:8103/fhir/R4; an
                          https URL needs --features upstream-tls
    --ca-file PATH        trust the certificate authorities in this PEM file for an https
                          upstream, besides the system's (--features upstream-tls)
    --addr HOST:PORT      address to listen on (default 127.0.0.1:8080; port 0 picks a free one)
    --base-url URL        the public base clients use (default http://ADDR + the upstream's path)
    --store BACKEND       job store: `memory` (default), `redis://HOST:PORT` (--features redis)
                          or `postgres://USER@HOST/DB` (--features postgres)
    --files DIR           keep bulk export files in folder DIR instead of memory
    --export-files MODE   an export the upstream runs itself (its own `$export`): `copy`
                          (default) copies its files into the gateway's file store, which
                          serves them for the gateway's retention; `link` lists the upstream's
                          own files, fetched through the gateway, for as long as the upstream
                          keeps them
    --header 'Name: value'
                          send this header with every request to the upstream (a fixed
                          credential); repeatable. Otherwise the caller's Authorization is sent.
    -h, --help            print this help and exit
";

struct Options {
    upstream: String,
    addr: SocketAddr,
    base_url: Option<String>,
    store: String,
    files: Option<std::path::PathBuf>,
    export_files: UpstreamFiles,
    headers: Vec<(HeaderName, HeaderValue)>,
    ca_file: Option<std::path::PathBuf>,
}

fn parse(mut args: impl Iterator<Item = String>) -> Result<Option<Options>, String> {
    let mut upstream = None;
    let mut addr: SocketAddr = "127.0.0.1:8080".parse().expect("a socket address");
    let mut base_url = None;
    let mut store = "memory".to_owned();
    let mut files = None;
    let mut export_files = UpstreamFiles::Copy;
    let mut headers = Vec::new();
    let mut ca_file = None;
    while let Some(arg) = args.next() {
        let (flag, inline) = match arg.split_once('=') {
            Some((flag, value)) if flag.starts_with("--") => {
                (flag.to_owned(), Some(value.to_owned()))
            }
            _ => (arg.clone(), None),
        };
        let mut value = || {
            inline
                .clone()
                .or_else(|| args.next())
                .ok_or_else(|| format!("{flag} needs a value"))
        };
        match flag.as_str() {
            "-h" | "--help" => return Ok(None),
            "--upstream" => upstream = Some(value()?),
            "--addr" => {
                let raw = value()?;
                addr = raw
                    .parse()
                    .map_err(|_| format!("--addr {raw:?} is not IP:PORT, e.g. 127.0.0.1:8080"))?;
            }
            "--base-url" => base_url = Some(value()?),
            "--store" => store = value()?,
            "--files" => files = Some(value()?.into()),
            "--ca-file" => ca_file = Some(value()?.into()),
            "--export-files" => {
                export_files = match value()?.as_str() {
                    "copy" => UpstreamFiles::Copy,
                    "link" => UpstreamFiles::Link,
                    other => {
                        return Err(format!(
                            "--export-files {other:?}: use `copy` or `link`; see --help"
                        ));
                    }
                }
            }
            "--header" => {
                let raw = value()?;
                let (name, val) = raw
                    .split_once(':')
                    .ok_or_else(|| format!("--header {raw:?} is not 'Name: value'"))?;
                let name = HeaderName::from_bytes(name.trim().as_bytes())
                    .map_err(|_| format!("--header {raw:?}: {name:?} is not a header name"))?;
                let val = HeaderValue::from_str(val.trim())
                    .map_err(|_| format!("--header {raw:?}: the value is not a header value"))?;
                headers.push((name, val));
            }
            other => return Err(format!("unknown flag {other}; see --help")),
        }
    }
    let upstream = upstream.ok_or("--upstream URL is required; see --help")?;
    Ok(Some(Options {
        upstream,
        addr,
        base_url,
        store,
        files,
        export_files,
        headers,
        ca_file,
    }))
}

#[tokio::main]
async fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let options = match parse(std::env::args().skip(1)) {
        Ok(Some(options)) => options,
        Ok(None) => {
            print!("{USAGE}");
            return;
        }
        Err(why) => {
            eprintln!("error: {why}");
            std::process::exit(2);
        }
    };
    if let Err(why) = run(options).await {
        eprintln!("error: {why}");
        std::process::exit(1);
    }
}

async fn run(options: Options) -> Result<(), String> {
    let listener = tokio::net::TcpListener::bind(options.addr)
        .await
        .map_err(|err| format!("cannot listen on {}: {err}", options.addr))?;
    let addr = listener.local_addr().map_err(|err| err.to_string())?;
    let upstream_path = options
        .upstream
        .parse::<Uri>()
        .map(|uri| uri.path().trim_end_matches('/').to_owned())
        .map_err(|_| format!("--upstream {:?} is not a URL", options.upstream))?;
    let public = options
        .base_url
        .clone()
        .unwrap_or_else(|| format!("http://{addr}{upstream_path}"));

    let mut forwarder = Upstream::builder(&options.upstream).public_base(&public);
    for (name, value) in options.headers {
        forwarder = forwarder.header(name, value);
    }
    if let Some(path) = &options.ca_file {
        #[cfg(feature = "upstream-tls")]
        {
            let pem = std::fs::read(path)
                .map_err(|err| format!("--ca-file {}: {err}", path.display()))?;
            forwarder = forwarder.root_certificate_pem(pem);
        }
        #[cfg(not(feature = "upstream-tls"))]
        return Err(format!(
            "--ca-file {}: TLS needs the example built with --features upstream-tls",
            path.display()
        ));
    }
    let forwarder = forwarder.build().map_err(|err| match &options.ca_file {
        // The builder names its setting; the example's user set the flag.
        Some(path) if err.to_string().starts_with("root_certificate_pem") => {
            format!("--ca-file {}: {err}", path.display())
        }
        _ => err.to_string(),
    })?;

    let builder = match options.store.as_str() {
        "memory" => AsyncLayer::builder(MemoryStore::new()),
        #[cfg(feature = "redis")]
        url if url.starts_with("redis://") => AsyncLayer::builder(
            tower_fhir_async::RedisStore::connect(url)
                .await
                .map_err(|err| format!("--store {url}: {err}"))?,
        ),
        #[cfg(feature = "postgres")]
        url if url.starts_with("postgres://") || url.starts_with("postgresql://") => {
            let pool = tower_fhir_async::store::sqlx::postgres::PgPoolOptions::new()
                .connect(url)
                .await
                .map_err(|err| format!("--store {url}: {err}"))?;
            let store = tower_fhir_async::PostgresStore::new(pool);
            store
                .migrate()
                .await
                .map_err(|err| format!("--store {url}: {err}"))?;
            AsyncLayer::builder(store)
        }
        other => {
            return Err(format!(
                "--store {other:?}: use `memory`, or a redis:// or postgres:// URL with the matching feature"
            ));
        }
    };
    let mut builder = builder
        .base_url(&public)
        // Links the upstream writes on its own address are followed too (an export's pages).
        .follow_links_on(&options.upstream)
        .upstream_export_files(options.export_files);
    if let Some(dir) = &options.files {
        std::fs::create_dir_all(dir).map_err(|err| format!("--files {}: {err}", dir.display()))?;
        let files = tower_fhir_async::object_store::local::LocalFileSystem::new_with_prefix(dir)
            .map_err(|err| format!("--files {}: {err}", dir.display()))?
            .with_automatic_cleanup(true);
        builder = builder.file_store(Arc::new(files));
    }
    let layer = builder.build();

    let service = ServiceBuilder::new()
        // The caller's address, for `Forwarded: for=` and `X-Forwarded-For`.
        .map_request(|mut request: Request| {
            if let Some(ConnectInfo(peer)) = request
                .extensions()
                .get::<ConnectInfo<SocketAddr>>()
                .copied()
            {
                request.extensions_mut().insert(peer);
            }
            request
        })
        .layer(layer)
        .service(forwarder);
    let app = Router::new().fallback_service(service);
    println!("listening on {public}");
    axum::serve(
        listener,
        app.into_make_service_with_connect_info::<SocketAddr>(),
    )
    .with_graceful_shutdown(async {
        let _ = tokio::signal::ctrl_c().await;
    })
    .await
    .map_err(|err| err.to_string())
}
