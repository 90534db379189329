//! The smallest complete FHIR server with the asynchronous request patterns: an axum `Router` with
//! two Patient routes, wrapped by `AsyncLayer` on a `MemoryStore`.
//!
//! ```sh
//! cargo run --example axum_minimal -- --addr 127.0.0.1:8080
//! # listening on http://127.0.0.1:8080/fhir
//! curl -si -H 'Prefer: respond-async' http://127.0.0.1:8080/fhir/Patient  # 202, _async/ID
//! curl -si http://127.0.0.1:8080/fhir/_async/ID         # 200, a batch-response Bundle
//! ```

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{Path, Query, State};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use http::StatusCode;
use http::header::CONTENT_TYPE;
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
    let listener = tokio::net::TcpListener::bind(&addr)
        .await
        .map_err(|err| format!("cannot listen on {addr}: {err} (port 0 picks a free one)"))?;
    let addr = listener.local_addr().map_err(|err| err.to_string())?;
    let base = format!("http://{addr}/fhir");

    let layer = AsyncLayer::builder(MemoryStore::new())
        // Status URLs are absolute, built on the public base; its path (`/fhir`) is where the
        // layer expects requests and serves its own routes (`/fhir/_async/…`).
        .base_url(&base)
        .build();
    tokio::spawn(layer.sweeper(Duration::from_secs(60)));
    let shutdown = layer.shutdown_handle();

    // The layer wraps the whole Router, whose routes keep the `/fhir` prefix, so it sees every
    // request as the client sent it, its status URLs too (they match no route: axum wraps the
    // fallback as well). Two wirings that look right still answer kick-offs `202`, but every
    // poll `404`:
    // - `Router::new().nest("/fhir", routes.layer(layer))`: `nest` strips `/fhir` before the
    //   layer sees the path, so it no longer matches the base path of `base_url`;
    // - `routes.route_layer(layer)`: wraps matched routes only, never the status URLs.
    // Routes added after `.layer(layer)` are not wrapped: add them before.
    let app = Router::new()
        .route("/fhir/Patient", get(search))
        .route("/fhir/Patient/{id}", get(read))
        .with_state(Base::from(base.as_str()))
        .layer(layer);

    println!("listening on {base}");
    axum::serve(listener, app)
        .with_graceful_shutdown(async move {
            let _ = tokio::signal::ctrl_c().await;
            // Running jobs get 10 s to finish while polls and cancels are still answered.
            shutdown.shutdown(Duration::from_secs(10)).await;
        })
        .await
        .map_err(|err| err.to_string())
}
