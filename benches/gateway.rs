//! What the gateway costs on pass-through requests (issue #13 item 8): the layer over
//! `upstream::Upstream` against a plain hyper reverse proxy, both in front of the same upstream,
//! in the same run. Reports requests per second of each and their ratio (target ≥ 95 %); it
//! asserts nothing about speed.
//!
//! Everything runs on 127.0.0.1 in this process: an upstream answering a small FHIR JSON
//! resource, the plain proxy, the gateway, and a load generator with `GATEWAY_CONNECTIONS`
//! (default 32) keep-alive connections. Rounds of `GATEWAY_ROUND_MS` (default 1000) alternate
//! between the two, `GATEWAY_ROUNDS` (default 9) each. Each gateway round is compared with the
//! proxy round just before it and the median of those ratios is the result (a shared machine
//! drifts between rounds; pairs see the same drift). The process's CPU time per request of each
//! (Linux) is reported too: client and upstream are the same in both, so the difference is what
//! the gateway costs over the plain proxy.
//!
//! ```sh
//! cargo bench --features upstream --bench gateway
//! ```
//!
//! `GATEWAY_BODY=bundle` makes the upstream answer a searchset Bundle of three Patients whose
//! URLs name the upstream (about 1 KiB), which the gateway maps to its own base on every answer;
//! by default it answers a Patient that names no URL (passed on unchanged).
//!
//! For a profile of one side alone, `GATEWAY_ONLY=proxy` or `GATEWAY_ONLY=gateway` loads only
//! that one (and reports no ratio), e.g. under `perf stat` to count instructions per request.

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
    serve_on(listener, service)
}

/// Serves `service` on `listener`.
fn serve_on<S, B>(listener: tokio::net::TcpListener, service: S) -> SocketAddr
where
    S: Service<Request<Incoming>, Response = Response<B>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
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

/// The upstream: every GET answers the Patient, or with `bundle` a searchset of three Patients
/// whose `fullUrl`s and `self` link name the upstream (so the gateway maps them).
async fn upstream(bundle: bool) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let body = if bundle {
        let entries: Vec<String> = (1..=3)
            .map(|id| {
                format!(
                    r#"{{"fullUrl":"http://{addr}/fhir/Patient/{id}","resource":{}}}"#,
                    PATIENT.replace(r#""id":"1""#, &format!(r#""id":"{id}""#))
                )
            })
            .collect();
        Bytes::from(format!(
            r#"{{"resourceType":"Bundle","type":"searchset","total":3,"link":[{{"relation":"self","url":"http://{addr}/fhir/Patient?_count=3"}}],"entry":[{}]}}"#,
            entries.join(",")
        ))
    } else {
        Bytes::from_static(PATIENT.as_bytes())
    };
    serve_on(
        listener,
        tower::service_fn(move |_request: Request<Incoming>| {
            let mut response = Response::new(Full::new(body.clone()));
            response.headers_mut().insert(
                http::header::CONTENT_TYPE,
                http::HeaderValue::from_static("application/fhir+json"),
            );
            async { Ok::<_, Infallible>(response) }
        }),
    )
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

/// Requests per second through `addr` over `connections` connections for `round`, and every
/// request answered, the warm-up's included.
async fn load_counted(addr: SocketAddr, connections: u64, round: Duration) -> (f64, u64) {
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
    (
        counted as f64 / elapsed.as_secs_f64(),
        done.load(Ordering::Relaxed),
    )
}

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let connections = setting("GATEWAY_CONNECTIONS", 32);
        let round = Duration::from_millis(setting("GATEWAY_ROUND_MS", 1000));
        let rounds = setting("GATEWAY_ROUNDS", 9);
        let bundle = std::env::var("GATEWAY_BODY").is_ok_and(|b| b == "bundle");
        let upstream = upstream(bundle).await;
        let proxy = plain_proxy(upstream).await;
        let gateway = gateway(upstream).await;
        let only = std::env::var("GATEWAY_ONLY").ok();
        if let Some(only) = only {
            let addr = if only == "proxy" { proxy } else { gateway };
            let mut total = 0;
            for _ in 0..rounds {
                let (rate, done) = load_counted(addr, connections, round).await;
                total += done;
                println!("{only}: {rate:.0} req/s");
            }
            println!("{only}: {total} requests in all");
            return;
        }
        let (mut proxied, mut gated) = (Vec::new(), Vec::new());
        let (mut proxy_cpu, mut gateway_cpu) = (Vec::new(), Vec::new());
        for _ in 0..rounds {
            let (rate, cpu) = measured(proxy, connections, round).await;
            proxied.push(rate);
            proxy_cpu.extend(cpu);
            let (rate, cpu) = measured(gateway, connections, round).await;
            gated.push(rate);
            gateway_cpu.extend(cpu);
        }
        println!("gateway pass-through vs plain hyper reverse proxy, {connections} connections, {rounds} rounds of {round:?} each, alternating, {} answers", if bundle { "Bundle (URLs mapped)" } else { "Patient" });
        println!("plain proxy   req/s per round: {}", rates(&proxied));
        println!("gateway       req/s per round: {}", rates(&gated));
        // Each gateway round against the proxy round just before it: drift of the machine
        // between rounds (other load, frequency) affects both alike.
        let pairs: Vec<f64> = gated.iter().zip(&proxied).map(|(g, p)| g / p * 100.0).collect();
        let ratio = median(&pairs);
        println!(
            "throughput: median of paired rounds {ratio:.1} % (rounds {}); best vs best {:.1} % (target >= 95 %: {})",
            rates(&pairs),
            best(&gated) / best(&proxied) * 100.0,
            if ratio >= 95.0 { "met" } else { "missed" }
        );
        if !proxy_cpu.is_empty() && !gateway_cpu.is_empty() {
            // CPU time of the whole process (client, proxy or gateway, upstream) per request.
            let (p, g) = (median(&proxy_cpu), median(&gateway_cpu));
            println!(
                "CPU per request (whole process, median of rounds): proxy {p:.1} us, gateway {g:.1} us = {:.1} %",
                g / p * 100.0
            );
        }
    });
}

fn best(rates: &[f64]) -> f64 {
    rates.iter().copied().fold(0.0, f64::max)
}

fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    match sorted.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => sorted[n / 2],
        n => (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0,
    }
}

/// [`load_counted`], and the process's CPU time per request in the round (microseconds), where
/// the platform tells it.
async fn measured(addr: SocketAddr, connections: u64, round: Duration) -> (f64, Option<f64>) {
    let before = cpu_time();
    let (rate, done) = load_counted(addr, connections, round).await;
    let cpu = match (before, cpu_time()) {
        (Some(before), Some(after)) if done > 0 => {
            Some((after - before).as_secs_f64() * 1e6 / done as f64)
        }
        _ => None,
    };
    (rate, cpu)
}

/// The process's user and system CPU time so far (Linux, from `/proc/self/stat`, in clock ticks
/// of 10 ms).
fn cpu_time() -> Option<Duration> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    // After the command name: state is field 3, utime 14, stime 15 (proc(5)).
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    Some(Duration::from_millis(ticks * 10))
}

fn rates(rates: &[f64]) -> String {
    rates
        .iter()
        .map(|r| format!("{r:.0}"))
        .collect::<Vec<_>>()
        .join(", ")
}
