//! Where the usual middleware goes around `AsyncLayer`: tracing, compression and authentication
//! outside it, a concurrency limit inside it.
//!
//! ```sh
//! cargo run --example middleware_order -- --token s3cret    # --addr 127.0.0.1:8080
//! # listening on http://127.0.0.1:8080/fhir
//! curl -si --compressed -H 'Authorization: Bearer s3cret' -H 'Prefer: respond-async' \
//!     http://127.0.0.1:8080/fhir/Patient                   # 202, _async/ID
//! curl -si http://127.0.0.1:8080/fhir/_async/ID           # 401: status URLs need the token too
//! ```

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{Query, Request, State};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use http::StatusCode;
use http::header::{AUTHORIZATION, CONTENT_TYPE, WWW_AUTHENTICATE};
use serde_json::{Value, json};
use tower::ServiceBuilder;
use tower::limit::ConcurrencyLimitLayer;
use tower_fhir_async::{AsyncLayer, MemoryStore};
use tower_http::compression::CompressionLayer;
use tower_http::trace::TraceLayer;

/// The server's data: the id and family name of each Patient.
const PATIENTS: [(&str, &str); 3] = [("1", "Chalmers"), ("2", "Windsor"), ("3", "Levin")];

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

/// `GET /fhir/Patient[?family=…]`: a searchset Bundle, the one route of this server.
async fn search(Query(q): Query<HashMap<String, String>>) -> Response {
    let entry: Vec<Value> = PATIENTS
        .into_iter()
        .filter(|p| q.get("family").is_none_or(|f| p.1.eq_ignore_ascii_case(f)))
        .map(|p| json!({"resource": patient(p)}))
        .collect();
    let bundle = json!({"resourceType": "Bundle", "type": "searchset", "entry": entry});
    fhir(StatusCode::OK, bundle)
}

/// Lets through requests with `Authorization: Bearer {token}`, answers `401` to the others. It
/// stands in for real authentication (OAuth 2.0, SMART Backend Services).
async fn authenticate(State(token): State<Arc<str>>, request: Request, next: Next) -> Response {
    let presented = request.headers().get(AUTHORIZATION).map(|v| v.as_bytes());
    if presented.and_then(|v| v.strip_prefix(b"Bearer ")) == Some(token.as_bytes()) {
        return next.run(request).await;
    }
    let why = "send Authorization: Bearer <token>";
    let mut refused = fhir(StatusCode::UNAUTHORIZED, outcome("login", why));
    (refused.headers_mut()).insert(WWW_AUTHENTICATE, "Bearer".parse().expect("a header value"));
    refused
}

#[tokio::main]
async fn main() {
    if let Err(why) = run().await {
        eprintln!("error: {why}");
        std::process::exit(1);
    }
}

async fn run() -> Result<(), String> {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| "info,tower_http=debug".into());
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    let (mut addr, mut token) = ("127.0.0.1:8080".to_owned(), None);
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let value = args.next().ok_or(format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--addr" => addr = value,
            "--token" => token = Some(value),
            _ => return Err(format!("unknown flag {flag}")),
        }
    }
    let token = token.ok_or("--token TOKEN is required: the bearer token clients must send")?;
    let listener = tokio::net::TcpListener::bind(&addr)
        .await
        .map_err(|err| format!("cannot listen on {addr}: {err} (port 0 picks a free one)"))?;
    let addr = listener.local_addr().map_err(|err| err.to_string())?;
    let base = format!("http://{addr}/fhir");

    let layer = AsyncLayer::builder(MemoryStore::new())
        .base_url(&base)
        .build();
    tokio::spawn(layer.sweeper(Duration::from_secs(60)));
    let fhir_routes = Router::new().route("/fhir/Patient", get(search));
    // Outermost first: each layer wraps everything listed below it.
    let service = ServiceBuilder::new()
        // Outermost: every request gets a span and log lines, refused ones included. Its path
        // only: a query string can carry search terms about patients (or an `access_token`).
        .layer(TraceLayer::new_for_http().make_span_with(|request: &Request| {
            tracing::info_span!("request", method = %request.method(), path = request.uri().path())
        }))
        // Outside the layer: it compresses what the client gets (the status answers and the
        // result Bundle), while the layer reads the plain FHIR JSON of the routes.
        .layer(CompressionLayer::new())
        // Outside the layer: status, cancel and file URLs carry patient data; the layer answers
        // them itself, so only a check in front of it protects them. With several clients, put
        // the client's id into an extension here and bind jobs to it (`caller_from_extension`).
        .layer(middleware::from_fn_with_state(token.into(), authenticate))
        .layer(layer)
        // Inside the layer: it holds back the jobs (and synchronous requests) beyond 4 at once,
        // never a poll or a cancel, which the layer answers without the routes.
        .layer(ConcurrencyLimitLayer::new(4))
        .service(fhir_routes);
    // `axum::serve` takes a Router; an outer one passes every request on, paths unchanged.
    let app = Router::new().fallback_service(service);

    println!("listening on {base}");
    axum::serve(listener, app)
        .await
        .map_err(|err| err.to_string())
}
