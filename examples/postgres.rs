//! The same small FHIR server with its jobs in PostgreSQL (`PostgresStore`): they outlive a
//! restart, and every instance given the same database and table answers every job's polls.
//!
//! ```sh
//! cargo run --example postgres --features postgres   # --database URL, else $DATABASE_URL
//! # listening on http://127.0.0.1:8080/fhir
//! curl -si -H 'Prefer: respond-async' http://127.0.0.1:8080/fhir/Patient  # 202, _async/ID
//! ```
//!
//! `--addr` (127.0.0.1:8080), `--database URL` (default `$DATABASE_URL`, else
//! `postgres://postgres@127.0.0.1:5432/test`), `--table NAME` (`tower_fhir_async_jobs`).

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
use tower_fhir_async::store::sqlx::postgres::PgPoolOptions;
use tower_fhir_async::{AsyncLayer, PostgresStore};

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
    let mut addr = "127.0.0.1:8080".to_owned();
    let mut database = std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into());
    let mut table = PostgresStore::DEFAULT_TABLE.to_owned();
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let value = args.next().ok_or(format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--addr" => addr = value,
            "--database" => database = value,
            // `with_table` takes 1 to 53 ASCII letters, digits and `_`, not starting with a
            // digit (the name is part of SQL text); refuse anything else here, not by a panic.
            "--table" => {
                let plain = value.len() <= 53
                    && value.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_')
                    && value.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
                if !plain {
                    return Err(format!(
                        "--table {value:?}: use 1 to 53 letters, digits or _"
                    ));
                }
                table = value;
            }
            _ => return Err(format!("unknown flag {flag}")),
        }
    }

    // A bounded pool: every store operation takes a connection; one that none is free for
    // within the layer's `store_timeout` (1 s) gets `503` + `Retry-After` instead of waiting.
    let pool = PgPoolOptions::new()
        .max_connections(8)
        .acquire_timeout(Duration::from_secs(5))
        .connect(&database)
        .await
        .map_err(|err| format!("--database {database}: {err}; is PostgreSQL running?"))?;
    // Separate deployments sharing a database keep their jobs apart in tables of their own.
    let store = PostgresStore::new(pool).with_table(&table);
    // Creates the table and its indexes when missing; safe on every start of every instance.
    store
        .migrate()
        .await
        .map_err(|err| format!("migrating {table}: {err}"))?;

    let listener = tokio::net::TcpListener::bind(&addr)
        .await
        .map_err(|err| format!("cannot listen on {addr}: {err} (port 0 picks a free one)"))?;
    let addr = listener.local_addr().map_err(|err| err.to_string())?;
    let base = format!("http://{addr}/fhir");
    let layer = AsyncLayer::builder(store).base_url(&base).build();
    // Deletes expired jobs from the table (expired ones are never served, swept or not).
    tokio::spawn(layer.sweeper(Duration::from_secs(60)));
    let shutdown = layer.shutdown_handle();
    let app = Router::new()
        .route("/fhir/Patient", get(search))
        .route("/fhir/Patient/{id}", get(read))
        .with_state(Base::from(base.as_str()))
        .layer(layer);

    println!("listening on {base}");
    axum::serve(listener, app)
        .with_graceful_shutdown(async move {
            let _ = tokio::signal::ctrl_c().await;
            // Jobs still running after 10 s are recorded as failed: no poller waits forever.
            shutdown.shutdown(Duration::from_secs(10)).await;
        })
        .await
        .map_err(|err| err.to_string())
}
