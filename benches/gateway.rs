//! What the gateway costs on pass-through requests (issue #13 item 8): the layer over
//! `upstream::Upstream` against a plain hyper reverse proxy, both in front of the same upstream,
//! in the same run. Reports requests per second of each and their ratio (target ≥ 95 %); it
//! asserts nothing about speed.
//!
//! Everything runs on 127.0.0.1 in this process: an upstream answering a small FHIR JSON
//! resource, the plain proxy, the gateway, and a load generator with `GATEWAY_CONNECTIONS`
//! (default 32) keep-alive connections. Rounds of `GATEWAY_ROUND_MS` (default 2000) alternate
//! between the two, `GATEWAY_ROUNDS` (default 3) each; the best round of each is compared.
//!
//! ```sh
//! cargo bench --features upstream --bench gateway
//! ```

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response, Uri};
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tower::{Service, ServiceBuilder};
use tower_fhir_async::upstream::Upstream;
use tower_fhir_async::{AsyncLayer, MemoryStore};

const PATIENT: &str = r#"{"resourceType":"Patient","id":"1","meta":{"versionId":"1"},"name":[{"family":"Chalmers","given":["Peter","James"]}],"gender":"male","birthDate":"1974-12-25","managingOrganization":{"reference":"Organization/1"}}"#;

fn setting(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Serves `service` (a tower service over hyper's `Incoming` bodies) on 127.0.0.1:0.
async fn serve<S, B>(service: S) -> SocketAddr
where
    S: Service<Request<Incoming>, Response = Response<B>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let _ = stream.set_nodelay(true);
            let service = service.clone();
            tokio::spawn(async move {
                let service =
                    hyper::service::service_fn(move |request| service.clone().call(request));
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    addr
}

/// The upstream: every GET answers the Patient.
async fn upstream() -> SocketAddr {
    serve(tower::service_fn(|_request: Request<Incoming>| async {
        let mut response = Response::new(Full::new(Bytes::from_static(PATIENT.as_bytes())));
        response.headers_mut().insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static("application/fhir+json"),
        );
        Ok::<_, Infallible>(response)
    }))
    .await
}

/// A plain reverse proxy: the request's path and query to the upstream, the answer back.
async fn plain_proxy(upstream: SocketAddr) -> SocketAddr {
    let client: Client<HttpConnector, Incoming> =
        Client::builder(TokioExecutor::new()).build_http();
    serve(tower::service_fn(move |mut request: Request<Incoming>| {
        let client = client.clone();
        async move {
            let path = request
                .uri()
                .path_and_query()
                .map_or("/", |p| p.as_str())
                .to_owned();
            *request.uri_mut() = format!("http://{upstream}{path}").parse::<Uri>().unwrap();
            request.headers_mut().remove(http::header::HOST);
            let response = match client.request(request).await {
                Ok(response) => response.map(|b| {
                    b.map_err(|e| Box::new(e) as Box<dyn std::error::Error + Send + Sync>)
                        .boxed()
                }),
                Err(_) => Response::builder()
                    .status(502)
                    .body(Empty::new().map_err(|e: Infallible| match e {}).boxed())
                    .unwrap(),
            };
            Ok::<_, Infallible>(response)
        }
    }))
    .await
}

/// The gateway: the layer over `Upstream`.
async fn gateway(upstream: SocketAddr) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    let public = format!("http://{addr}/fhir");
    let forwarder = Upstream::builder(format!("http://{upstream}/fhir"))
        .public_base(&public)
        .build()
        .unwrap();
    let service = ServiceBuilder::new()
        .layer(
            AsyncLayer::builder(MemoryStore::new())
                .base_url(&public)
                .build(),
        )
        .service(forwarder);
    let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let _ = stream.set_nodelay(true);
            let service = service.clone();
            tokio::spawn(async move {
                let service = service_fn(move |request: Request<Incoming>| {
                    let mut service = service.clone();
                    async move { service.call(request).await }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    addr
}

/// Requests per second through `addr` over `connections` connections for `round`.
async fn load(addr: SocketAddr, connections: u64, round: Duration) -> f64 {
    let done = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let url: Uri = format!("http://{addr}/fhir/Patient/1").parse().unwrap();
    let mut tasks = Vec::new();
    for _ in 0..connections {
        let (done, stop, url) = (done.clone(), stop.clone(), url.clone());
        tasks.push(tokio::spawn(async move {
            let client: Client<HttpConnector, Empty<Bytes>> = Client::builder(TokioExecutor::new())
                .pool_max_idle_per_host(1)
                .build_http();
            while !stop.load(Ordering::Relaxed) {
                let response = client.get(url.clone()).await.expect("an answer");
                assert!(response.status().is_success(), "{}", response.status());
                let body = response.into_body().collect().await.expect("a body");
                assert!(!body.to_bytes().is_empty());
                done.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    // Warm-up: connections open, pools fill.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let before = done.load(Ordering::Relaxed);
    let started = Instant::now();
    tokio::time::sleep(round).await;
    let counted = done.load(Ordering::Relaxed) - before;
    let elapsed = started.elapsed();
    stop.store(true, Ordering::Relaxed);
    for task in tasks {
        task.await.expect("a load task");
    }
    counted as f64 / elapsed.as_secs_f64()
}

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let connections = setting("GATEWAY_CONNECTIONS", 32);
        let round = Duration::from_millis(setting("GATEWAY_ROUND_MS", 2000));
        let rounds = setting("GATEWAY_ROUNDS", 3);
        let upstream = upstream().await;
        let proxy = plain_proxy(upstream).await;
        let gateway = gateway(upstream).await;
        let (mut proxied, mut gated) = (Vec::new(), Vec::new());
        for _ in 0..rounds {
            proxied.push(load(proxy, connections, round).await);
            gated.push(load(gateway, connections, round).await);
        }
        let best = |rates: &[f64]| rates.iter().copied().fold(0.0, f64::max);
        println!("gateway pass-through vs plain hyper reverse proxy, {connections} connections, {rounds} rounds of {round:?} each, alternating");
        println!("plain proxy   req/s per round: {}", rates(&proxied));
        println!("gateway       req/s per round: {}", rates(&gated));
        let ratio = best(&gated) / best(&proxied) * 100.0;
        println!(
            "best rounds: gateway {:.0} req/s vs proxy {:.0} req/s = {ratio:.1} % (target >= 95 %: {})",
            best(&gated),
            best(&proxied),
            if ratio >= 95.0 { "met" } else { "missed" }
        );
    });
}

fn rates(rates: &[f64]) -> String {
    rates
        .iter()
        .map(|r| format!("{r:.0}"))
        .collect::<Vec<_>>()
        .join(", ")
}
