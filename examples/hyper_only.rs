//! A FHIR server without axum: a `tower::service_fn` behind `AsyncLayer`, served by hyper 1 and
//! hyper-util directly.
//!
//! ```sh
//! cargo run --example hyper_only -- --addr 127.0.0.1:8080
//! # listening on http://127.0.0.1:8080/fhir
//! curl -si -H 'Prefer: respond-async' http://127.0.0.1:8080/fhir/Patient/1
//! ```
//!
//! Besides this crate and tokio it needs `hyper` 1 with features `server` and `http1`,
//! `hyper-util` 0.1 with `tokio` (`TokioIo`) and `service` (`TowerToHyperService`), `tower` 0.5
//! with `util` (`service_fn`), `http-body-util` (`Full`), `bytes`, `serde_json`, `form_urlencoded`.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::CONTENT_TYPE;
use http::{HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;
use serde_json::{Value, json};
use tower::ServiceBuilder;
use tower_fhir_async::{AsyncLayer, MemoryStore, RequestBody};

/// The server's data: the id and family name of each Patient.
const PATIENTS: [(&str, &str); 3] = [("1", "Chalmers"), ("2", "Windsor"), ("3", "Levin")];

fn patient((id, family): (&str, &str)) -> Value {
    json!({"resourceType": "Patient", "id": id, "name": [{"family": family}]})
}

/// The FHIR server: `GET /fhir/Patient[?family=…]` and `GET /fhir/Patient/{id}`. The layer hands
/// it `RequestBody<Incoming>`: the caller's body as it streams in, or a job's buffered copy.
async fn fhir(
    base: Arc<str>,
    request: Request<RequestBody<Incoming>>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let (uri, get) = (request.uri(), request.method() == Method::GET);
    let query = form_urlencoded::parse(uri.query().unwrap_or_default().as_bytes());
    let family = query
        .into_iter()
        .find_map(|(k, v)| (k == "family").then_some(v));
    let (status, body) = match uri.path().strip_prefix("/fhir/Patient") {
        Some("") if get => search(&base, family.as_deref()),
        Some(id) if get && id.starts_with('/') => read(&id[1..]),
        _ => not_found(format!("{} is not served here", uri.path())),
    };
    // FHIR JSON, never `text/plain`: the layer keeps a non-FHIR answer as a base64 `Binary`.
    let mut response = Response::new(Full::from(body.to_string()));
    *response.status_mut() = status;
    let fhir_json = HeaderValue::from_static("application/fhir+json");
    response.headers_mut().insert(CONTENT_TYPE, fhir_json);
    Ok(response)
}

/// A searchset Bundle of the Patients named `family`, or of all.
fn search(base: &str, family: Option<&str>) -> (StatusCode, Value) {
    let entry: Vec<Value> = PATIENTS
        .into_iter()
        .filter(|p| family.is_none_or(|f| p.1.eq_ignore_ascii_case(f)))
        .map(|p| json!({"fullUrl": format!("{base}/Patient/{}", p.0), "resource": patient(p)}))
        .collect();
    let bundle = json!({"resourceType": "Bundle", "type": "searchset", "entry": entry});
    (StatusCode::OK, bundle)
}

/// The Patient, or `404` with an OperationOutcome.
fn read(id: &str) -> (StatusCode, Value) {
    match PATIENTS.into_iter().find(|p| p.0 == id) {
        Some(p) => (StatusCode::OK, patient(p)),
        None => not_found(format!("there is no Patient/{id}")),
    }
}

fn not_found(diagnostics: String) -> (StatusCode, Value) {
    let issue = json!({"severity": "error", "code": "not-found", "diagnostics": diagnostics});
    let outcome = json!({"resourceType": "OperationOutcome", "issue": [issue]});
    (StatusCode::NOT_FOUND, outcome)
}

#[tokio::main]
async fn main() {
    if let Err(why) = run().await {
        eprintln!("error: {why}");
        std::process::exit(1);
    }
}

async fn run() -> Result<(), String> {
    let addr = match std::env::args().skip(1).collect::<Vec<_>>().as_slice() {
        [] => "127.0.0.1:8080".to_owned(),
        [flag, addr] if flag == "--addr" => addr.clone(),
        args => return Err(format!("{args:?}: the one flag is --addr HOST:PORT")),
    };
    let listener = tokio::net::TcpListener::bind(&addr)
        .await
        .map_err(|err| format!("cannot listen on {addr}: {err} (port 0 picks a free one)"))?;
    let addr = listener.local_addr().map_err(|err| err.to_string())?;
    let base: Arc<str> = Arc::from(format!("http://{addr}/fhir"));

    let layer = AsyncLayer::builder(MemoryStore::new())
        .base_url(&*base)
        .build();
    tokio::spawn(layer.sweeper(Duration::from_secs(60)));
    let shutdown = layer.shutdown_handle();
    // One service for the whole server; each connection gets a clone (they share the jobs).
    let service = ServiceBuilder::new()
        .layer(layer)
        .service_fn(move |request| fhir(base.clone(), request));

    println!("listening on http://{addr}/fhir");
    tokio::spawn(async move {
        loop {
            let (stream, _) = match listener.accept().await {
                Ok(accepted) => accepted,
                // Out of file descriptors, say: wait a little rather than spin or stop serving.
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let service = TowerToHyperService::new(service.clone());
            let connection = http1::Builder::new().serve_connection(TokioIo::new(stream), service);
            tokio::spawn(connection);
        }
    });
    let _ = tokio::signal::ctrl_c().await;
    // Running jobs get 10 s to finish; the rest are recorded as failed, so no poller waits forever.
    shutdown.shutdown(Duration::from_secs(10)).await;
    Ok(())
}
