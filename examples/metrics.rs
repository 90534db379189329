//! The layer's metrics (`fhir_async_*`, through the `metrics` facade) for Prometheus: a small
//! FHIR server that serves them itself at `GET /metrics`.
//!
//! ```sh
//! cargo run --example metrics
//! # listening on http://127.0.0.1:8080/fhir
//! curl -si -H 'Prefer: respond-async' http://127.0.0.1:8080/fhir/Patient
//! curl -s http://127.0.0.1:8080/metrics
//! # fhir_async_requests_total{action="kick-off",outcome="accepted"} 1
//! ```
//!
//! It needs `metrics-exporter-prometheus` 0.18 (built on `metrics` 0.24, as this crate is) with
//! `default-features = false`: no HTTP listener or push gateway of its own, no TLS stack.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{Path, Query, State};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use http::StatusCode;
use http::header::CONTENT_TYPE;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder};
use serde_json::{Value, json};
use tower_fhir_async::{AsyncLayer, MemoryStore};

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
    let addr = match std::env::args().skip(1).collect::<Vec<_>>().as_slice() {
        [] => "127.0.0.1:8080".to_owned(),
        [flag, addr] if flag == "--addr" => addr.clone(),
        args => return Err(format!("{args:?}: the one flag is --addr HOST:PORT")),
    };
    // Installed before the layer is built, so that no early count is lost. Job durations become
    // Prometheus histograms with these buckets (seconds), rather than summaries.
    let buckets = [0.01, 0.1, 0.5, 1.0, 5.0, 30.0, 120.0, 600.0];
    let prometheus = PrometheusBuilder::new()
        .set_buckets_for_metric(
            Matcher::Full("fhir_async_job_duration_seconds".into()),
            &buckets,
        )
        .map_err(|err| format!("the job duration buckets: {err}"))?
        .install_recorder()
        .map_err(|err| format!("cannot install the metrics recorder: {err}"))?;
    // Without the exporter's HTTP listener, its upkeep (draining histograms) is ours to run.
    let upkeep = prometheus.clone();
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_secs(5)).await;
            upkeep.run_upkeep();
        }
    });

    let listener = tokio::net::TcpListener::bind(&addr)
        .await
        .map_err(|err| format!("cannot listen on {addr}: {err} (port 0 picks a free one)"))?;
    let addr = listener.local_addr().map_err(|err| err.to_string())?;
    let base = format!("http://{addr}/fhir");
    let layer = AsyncLayer::builder(MemoryStore::new())
        .base_url(&base)
        .build();
    tokio::spawn(layer.sweeper(Duration::from_secs(60)));
    let app = Router::new()
        .route("/fhir/Patient", get(search))
        .route("/fhir/Patient/{id}", get(read))
        .with_state(Base::from(base.as_str()))
        .layer(layer)
        // Added after `.layer(layer)`, so not wrapped: a scrape is no FHIR request, and the layer
        // neither sees nor counts it. Keep it off the public network.
        .route(
            "/metrics",
            get(move || async move {
                let text = [(CONTENT_TYPE, "text/plain; version=0.0.4")];
                (text, prometheus.render())
            }),
        );

    println!("listening on {base}");
    axum::serve(listener, app)
        .await
        .map_err(|err| err.to_string())
}
