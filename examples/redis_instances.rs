//! Several instances of one FHIR server sharing their jobs through Redis, as behind a load
//! balancer: a job kicked off on one instance is polled (or cancelled) on any other.
//!
//! ```sh
//! cargo run --example redis_instances --features redis   # --instances 2 --addr 127.0.0.1:8080
//! # listening on http://127.0.0.1:8080/fhir
//! # listening on http://127.0.0.1:8081/fhir
//! curl -si -H 'Prefer: respond-async' http://127.0.0.1:8080/fhir/Patient   # 202, _async/ID
//! curl -si http://127.0.0.1:8081/fhir/_async/ID                            # the other one answers
//! ```
//!
//! `--redis URL` (default `$REDIS_URL`, else `redis://127.0.0.1:6379`), `--prefix P`.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{Path, Query, State};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use http::StatusCode;
use http::header::CONTENT_TYPE;
use serde_json::{Value, json};
use tower_fhir_async::{AsyncLayer, RedisStore};

/// The server's data: the id and family name of each Patient.
const PATIENTS: [(&str, &str); 3] = [("1", "Chalmers"), ("2", "Windsor"), ("3", "Levin")];

/// The public FHIR base, for the `fullUrl`s of search results.
type Base = Arc<str>;

fn patient((id, family): (&str, &str)) -> Value {
    json!({"resourceType": "Patient", "id": id, "name": [{"family": family}]})
}

/// A FHIR JSON answer. Never `text/plain`: the layer keeps a non-FHIR answer as a base64 `Binary`.
fn fhir(status: StatusCode, body: Value) -> Response {
    let content_type = [(CONTENT_TYPE, "application/fhir+json")];
    (status, content_type, body.to_string()).into_response()
}

fn outcome(code: &str, diagnostics: &str) -> Value {
    let issue = json!({"severity": "error", "code": code, "diagnostics": diagnostics});
    json!({"resourceType": "OperationOutcome", "issue": [issue]})
}

/// `GET /fhir/Patient[?family=…]`: a searchset Bundle.
async fn search(State(base): State<Base>, Query(q): Query<HashMap<String, String>>) -> Response {
    let entry: Vec<Value> = PATIENTS
        .into_iter()
        .filter(|p| q.get("family").is_none_or(|f| p.1.eq_ignore_ascii_case(f)))
        .map(|p| json!({"fullUrl": format!("{base}/Patient/{}", p.0), "resource": patient(p)}))
        .collect();
    let bundle = json!({"resourceType": "Bundle", "type": "searchset", "entry": entry});
    fhir(StatusCode::OK, bundle)
}

/// `GET /fhir/Patient/{id}`: the Patient, or `404` with an OperationOutcome.
async fn read(Path(id): Path<String>) -> Response {
    match PATIENTS.into_iter().find(|p| p.0 == id) {
        Some(p) => fhir(StatusCode::OK, patient(p)),
        None => {
            let why = format!("there is no Patient/{id}");
            fhir(StatusCode::NOT_FOUND, outcome("not-found", &why))
        }
    }
}

#[tokio::main]
async fn main() {
    if let Err(why) = run().await {
        eprintln!("error: {why}");
        std::process::exit(1);
    }
}

async fn run() -> Result<(), String> {
    let mut addr = SocketAddr::from(([127, 0, 0, 1], 8080));
    let mut instances = 2u16;
    let mut redis = std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    let mut prefix = "fhir-example:".to_owned();
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let value = args.next().ok_or(format!("{flag} needs a value"))?;
        let bad = |what: &str| format!("{flag} {value:?}: expected {what}");
        match flag.as_str() {
            "--addr" => addr = value.parse().map_err(|_| bad("IP:PORT"))?,
            "--instances" => instances = value.parse().map_err(|_| bad("a number"))?,
            "--redis" => redis = value,
            "--prefix" => prefix = value,
            _ => return Err(format!("unknown flag {flag}")),
        }
    }

    // One store for every instance. The prefix starts all its keys and its pub/sub channel:
    // applications (or test runs) that share a Redis server keep their jobs apart by it, and
    // instances that share jobs must use the same one.
    let store = RedisStore::connect(&redis)
        .await
        .map_err(|err| format!("--redis {redis}: {err}; is Redis running?"))?
        .with_prefix(prefix);

    let mut shutdowns = Vec::new();
    for n in 0..instances {
        // The next port for each instance, or a free one each with port 0.
        let port = if addr.port() == 0 {
            0
        } else {
            addr.port().saturating_add(n)
        };
        let listener = tokio::net::TcpListener::bind((addr.ip(), port))
            .await
            .map_err(|err| format!("cannot listen on {}:{port}: {err}", addr.ip()))?;
        let local = listener.local_addr().map_err(|err| err.to_string())?;
        let base = format!("http://{local}/fhir");
        // Each instance is its own layer (its own random `instance_id`), as in separate
        // processes. Behind a load balancer every instance's `base_url` is the balancer's; with
        // caller binding every instance must also set the same `caller_key`.
        let layer = AsyncLayer::builder(store.clone()).base_url(&base).build();
        tokio::spawn(layer.sweeper(Duration::from_secs(60)));
        shutdowns.push(layer.shutdown_handle());
        let app = Router::new()
            .route("/fhir/Patient", get(search))
            .route("/fhir/Patient/{id}", get(read))
            .with_state(Base::from(base.as_str()))
            .layer(layer);
        println!("listening on {base}");
        tokio::spawn(async move { axum::serve(listener, app).await });
    }
    let _ = tokio::signal::ctrl_c().await;
    // Jobs still running after 10 s are recorded as failed, so no poller (anywhere) waits forever.
    let grace = Duration::from_secs(10);
    futures_util::future::join_all(shutdowns.iter().map(|s| s.shutdown(grace))).await;
    Ok(())
}
