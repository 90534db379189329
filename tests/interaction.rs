//! The asynchronous interaction pattern end to end over a real socket (§7 scenarios 1–6, 8, 19, 20).

mod support;

use std::collections::HashSet;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::Path;
use axum::http::header::{CONTENT_TYPE, ETAG, LAST_MODIFIED, LOCATION};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post, put};
use axum::{Extension, Router};
use base64::Engine;
use bytes::Bytes;
use http::{Method, Request, Uri};
use http_body_util::Full;
use hyper::body::Incoming;
use serde_json::{Value, json};
use support::{Reply, TestClient, job_id, serve, serve_hyper};
use tokio::sync::Notify;
use tower::{ServiceBuilder, ServiceExt};
use tower_fhir_async::{AsyncLayer, JobContext, MemoryStore, RequestBody, ResponseBody};

async fn create(headers: HeaderMap, body: String) -> (StatusCode, HeaderMap, String) {
    let mut out = HeaderMap::new();
    out.insert("content-type", "application/fhir+json".parse().unwrap());
    out.insert(
        "location",
        "http://x/fhir/Observation/obs-1/_history/1"
            .parse()
            .unwrap(),
    );
    out.insert("etag", "W/\"1\"".parse().unwrap());
    out.insert(
        "x-seen-prefer",
        headers
            .get("prefer")
            .cloned()
            .unwrap_or("".parse().unwrap()),
    );
    let mut resource: serde_json::Value = serde_json::from_str(&body).unwrap();
    resource["id"] = "obs-1".into();
    (StatusCode::CREATED, out, resource.to_string())
}

// KICK-2, KICK-3, PREFER-10, STATUS-3, BUNDLE-1…9: scenario 1 and 3.
#[tokio::test]
async fn kick_2_kick_off_then_poll_to_a_bundle() {
    let layer = AsyncLayer::builder(MemoryStore::default()).build();
    let app = Router::new()
        .route("/fhir/Observation", post(create))
        .layer(layer);
    let addr = serve(app).await;
    let client = TestClient::default();
    let reply = client
        .send(
            Method::POST,
            &format!("http://{addr}/fhir/Observation"),
            &[
                ("prefer", "respond-async, return=representation"),
                ("content-type", "application/fhir+json"),
            ],
            r#"{"resourceType":"Observation","status":"final"}"#,
        )
        .await;
    assert_eq!(reply.status, StatusCode::ACCEPTED, "{reply:?}");
    let location = reply.header("content-location").to_owned();
    assert!(
        location.starts_with(&format!("http://{addr}/_async/")),
        "{location}"
    );
    assert_eq!(reply.header("preference-applied"), "respond-async");
    let done = client.poll_until_done(&location, 100).await;
    assert_eq!(done.status, StatusCode::OK);
    let bundle = done.json();
    assert_eq!(bundle["type"], "batch-response");
    assert_eq!(bundle["entry"][0]["response"]["status"], "201 Created");
    assert_eq!(bundle["entry"][0]["resource"]["id"], "obs-1");
}

// ---------------------------------------------------------------------------------------------
// Helpers for the tests below: tiny inner handlers and the kick-off / poll steps every test takes.
// ---------------------------------------------------------------------------------------------

const FHIR: &str = "application/fhir+json";

/// An inner FHIR response: `status` with a JSON body.
fn fhir(status: StatusCode, body: &Value) -> Response {
    (status, [(CONTENT_TYPE, FHIR)], body.to_string()).into_response()
}

/// A layer with the default configuration (status URLs derived from `Host`).
fn default_layer() -> AsyncLayer {
    AsyncLayer::builder(MemoryStore::default()).build()
}

/// Kicks off `method url` with only `Prefer: respond-async` and polls it to the end.
async fn run_to_completion(client: &TestClient, method: Method, url: &str) -> Reply {
    let location = client
        .kick_off(method, url, &[("prefer", "respond-async")], "")
        .await;
    let done = client.poll_until_done(&location, 150).await;
    assert_eq!(done.status, StatusCode::OK, "completion of {url}: {done:?}");
    done
}

/// The one entry of a completed job's `batch-response` Bundle (BUNDLE-2, BUNDLE-3).
fn only_entry(done: &Reply) -> Value {
    let bundle = done.json();
    assert_eq!(bundle["resourceType"], "Bundle", "{bundle}");
    assert_eq!(bundle["type"], "batch-response", "{bundle}");
    let entries = bundle["entry"]
        .as_array()
        .unwrap_or_else(|| panic!("no entry array: {bundle}"));
    assert_eq!(entries.len(), 1, "{bundle}");
    entries[0].clone()
}

/// A `Retry-After` value in delta seconds (STATUS-5 also allows an HTTP-date, which this layer does
/// not use; the assertion says so when it fails).
fn retry_after_seconds(reply: &Reply) -> u64 {
    let value = reply.header("retry-after");
    value
        .parse()
        .unwrap_or_else(|_| panic!("Retry-After is not delta-seconds: {value:?}"))
}

fn media_type(reply: &Reply) -> String {
    reply
        .header("content-type")
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase()
}

// KICK-2, KICK-3, KICK-10, PREFER-10: §7 scenario 1 with a configured public base URL.
#[tokio::test]
async fn kick_3_content_location_is_absolute_under_the_configured_base_url() {
    let layer = AsyncLayer::builder(MemoryStore::default())
        .base_url("https://fhir.example.org/fhir")
        .build();
    let app = Router::new()
        .route("/fhir/Observation", post(create))
        .layer(layer);
    let addr = serve(app).await;
    let client = TestClient::default();
    let reply = client
        .send(
            Method::POST,
            &format!("http://{addr}/fhir/Observation"),
            &[
                ("prefer", "respond-async"),
                ("content-type", FHIR),
                ("accept", FHIR),
            ],
            r#"{"resourceType":"Observation","status":"final"}"#,
        )
        .await;
    assert_eq!(reply.status, StatusCode::ACCEPTED, "{reply:?}");
    let location = reply.header("content-location").to_owned();
    let uri: Uri = location
        .parse()
        .unwrap_or_else(|e| panic!("Content-Location {location:?} is no URI: {e}"));
    assert_eq!(uri.scheme_str(), Some("https"), "{location}");
    assert_eq!(uri.host(), Some("fhir.example.org"), "{location}");
    assert!(
        location.starts_with("https://fhir.example.org/fhir/_async/"),
        "{location}"
    );
    assert_eq!(reply.header("preference-applied"), "respond-async");
    assert!(retry_after_seconds(&reply) >= 1);
    assert_eq!(reply.header("cache-control"), "no-store");
    assert!(
        reply.body.is_empty(),
        "KICK-4: the 202 body is empty here: {reply:?}"
    );

    // The layer matches on the path `/fhir/_async/{id}`, so the real address serves it too.
    let local = location.replacen("https://fhir.example.org", &format!("http://{addr}"), 1);
    let done = client.poll_until_done(&local, 150).await;
    assert_eq!(done.status, StatusCode::OK, "{done:?}");
    assert_eq!(only_entry(&done)["response"]["status"], "201 Created");
}

// STATUS-3, STATUS-4, STATUS-5, STATUS-16: §7 scenario 2, polling a job that is still running.
#[tokio::test]
async fn status_4_poll_while_running_gives_202_with_progress_and_retry_after() {
    let progress_set = Arc::new(Notify::new());
    let release = Arc::new(Notify::new());
    let handler = {
        let (progress_set, release) = (progress_set.clone(), release.clone());
        move |job: Option<Extension<JobContext>>| async move {
            // Without a JobContext no progress is set, and the X-Progress assertion says so.
            if let Some(Extension(job)) = job {
                job.set_percent(40);
            }
            progress_set.notify_one();
            release.notified().await;
            fhir(StatusCode::OK, &json!({"resourceType": "Parameters"}))
        }
    };
    let app = Router::new()
        .route("/fhir/$reindex", post(handler))
        .layer(default_layer());
    let addr = serve(app).await;
    let client = TestClient::default();
    let location = client
        .kick_off(
            Method::POST,
            &format!("http://{addr}/fhir/$reindex"),
            &[("prefer", "respond-async")],
            "",
        )
        .await;
    tokio::time::timeout(Duration::from_secs(10), progress_set.notified())
        .await
        .expect("the inner handler ran within 10 s");

    let running = client.get(&location).await;
    assert_eq!(running.status, StatusCode::ACCEPTED, "{running:?}");
    assert!(retry_after_seconds(&running) >= 1, "{running:?}");
    let progress = running.header("x-progress");
    assert_eq!(progress, "40% complete");
    assert!(progress.chars().count() < 100);
    assert_eq!(running.header("cache-control"), "no-store");
    assert!(
        running.body.is_empty(),
        "STATUS-3: no body while running: {running:?}"
    );

    release.notify_one();
    let done = client.poll_until_done(&location, 150).await;
    assert_eq!(done.status, StatusCode::OK, "{done:?}");
    assert_eq!(only_entry(&done)["resource"]["resourceType"], "Parameters");
}

/// `POST /fhir/Observation` answering `201 Created` with `Location`, `ETag` and `Last-Modified`,
/// and a body unless the forwarded `Prefer` asks for `return=minimal`.
async fn create_with_validators(headers: HeaderMap, body: String) -> Response {
    let minimal = headers
        .get_all("prefer")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.contains("return=minimal"));
    let mut resource: Value = serde_json::from_str(&body).unwrap_or_else(|_| json!({}));
    resource["id"] = "obs-901".into();
    let validators = [
        (CONTENT_TYPE, FHIR),
        (LOCATION, "Observation/obs-901/_history/1"),
        (ETAG, "W/\"1\""),
        (LAST_MODIFIED, "Mon, 02 Mar 2026 09:41:06 GMT"),
    ];
    let body = if minimal {
        String::new()
    } else {
        resource.to_string()
    };
    (StatusCode::CREATED, validators, body).into_response()
}

// BUNDLE-1, BUNDLE-2, BUNDLE-3, BUNDLE-5, BUNDLE-7, BUNDLE-8, BUNDLE-9, BUNDLE-12, STATUS-16:
// §7 scenario 3 with `return=representation`.
#[tokio::test]
async fn bundle_9_created_resource_with_location_etag_and_last_modified() {
    let app = Router::new()
        .route("/fhir/Observation", post(create_with_validators))
        .layer(default_layer());
    let addr = serve(app).await;
    let client = TestClient::default();
    let sent =
        json!({"resourceType": "Observation", "status": "final", "code": {"text": "Body weight"}});
    let location = client
        .kick_off(
            Method::POST,
            &format!("http://{addr}/fhir/Observation"),
            &[
                ("prefer", "respond-async, return=representation"),
                ("content-type", FHIR),
            ],
            &sent.to_string(),
        )
        .await;
    let done = client.poll_until_done(&location, 150).await;
    assert_eq!(done.status, StatusCode::OK, "{done:?}");
    assert_eq!(media_type(&done), FHIR);
    assert_eq!(done.header("cache-control"), "no-store");
    let expires = done.header("expires");
    assert!(
        httpdate::parse_http_date(expires).is_ok(),
        "Expires is no HTTP-date: {expires:?}"
    );
    let bundle = done.json();
    assert!(bundle.get("total").is_none(), "{bundle}");
    let entry = only_entry(&done);
    assert!(entry.get("request").is_none(), "{entry}");
    let response = &entry["response"];
    assert_eq!(response["status"], "201 Created", "{entry}");
    assert_eq!(response["location"], "Observation/obs-901/_history/1");
    assert_eq!(response["etag"], "W/\"1\"");
    assert_eq!(
        response["lastModified"], "2026-03-02T09:41:06Z",
        "a FHIR instant, in UTC"
    );
    assert!(response.get("outcome").is_none(), "{entry}");
    let mut expected = sent.clone();
    expected["id"] = "obs-901".into();
    assert_eq!(entry["resource"], expected);
}

// PREFER-9, PREFER-12, BUNDLE-9: §7 scenario 3 with `return=minimal` — the inner server decides,
// and with no body there is no `entry.resource`.
#[tokio::test]
async fn prefer_9_return_minimal_reaches_the_server_and_leaves_no_resource() {
    let app = Router::new()
        .route("/fhir/Observation", post(create_with_validators))
        .layer(default_layer());
    let addr = serve(app).await;
    let client = TestClient::default();
    let location = client
        .kick_off(
            Method::POST,
            &format!("http://{addr}/fhir/Observation"),
            &[
                ("prefer", "respond-async, return=minimal"),
                ("content-type", FHIR),
            ],
            r#"{"resourceType":"Observation","status":"final"}"#,
        )
        .await;
    let done = client.poll_until_done(&location, 150).await;
    assert_eq!(done.status, StatusCode::OK, "{done:?}");
    let entry = only_entry(&done);
    assert!(entry.get("resource").is_none(), "{entry}");
    assert!(entry["response"].get("outcome").is_none(), "{entry}");
    assert_eq!(entry["response"]["status"], "201 Created");
    assert_eq!(
        entry["response"]["location"],
        "Observation/obs-901/_history/1"
    );
}

// BUNDLE-4, BUNDLE-6, BUNDLE-11 row 4: §7 scenario 4, an inner 4xx with an OperationOutcome.
#[tokio::test]
async fn bundle_6_inner_422_operation_outcome_is_the_entry_outcome() {
    let outcome = json!({
        "resourceType": "OperationOutcome",
        "issue": [{"severity": "error", "code": "invariant",
                   "diagnostics": "Observation.value[x] or component must be present"}]
    });
    let handler = {
        let outcome = outcome.clone();
        move || async move { fhir(StatusCode::UNPROCESSABLE_ENTITY, &outcome) }
    };
    let app = Router::new()
        .route("/fhir/Observation", post(handler))
        .layer(default_layer());
    let addr = serve(app).await;
    let client = TestClient::default();
    let done = run_to_completion(
        &client,
        Method::POST,
        &format!("http://{addr}/fhir/Observation"),
    )
    .await;
    let entry = only_entry(&done);
    assert_eq!(
        entry["response"]["status"], "422 Unprocessable Entity",
        "{entry}"
    );
    assert_eq!(entry["response"]["outcome"], outcome);
    assert!(entry.get("resource").is_none(), "{entry}");
}

// BUNDLE-10: §7 scenario 5, a search result nested whole as `entry[0].resource`.
#[tokio::test]
async fn bundle_10_search_result_is_the_entry_resource() {
    async fn search(uri: Uri) -> Response {
        fhir(
            StatusCode::OK,
            &json!({
                "resourceType": "Bundle",
                "type": "searchset",
                "total": 2,
                "link": [{"relation": "self", "url": format!("https://fhir.example.org{uri}")}],
                "entry": [
                    {"fullUrl": "https://fhir.example.org/fhir/Condition/c-1",
                     "resource": {"resourceType": "Condition", "id": "c-1"}, "search": {"mode": "match"}},
                    {"fullUrl": "https://fhir.example.org/fhir/Condition/c-2",
                     "resource": {"resourceType": "Condition", "id": "c-2"}, "search": {"mode": "match"}}
                ]
            }),
        )
    }
    let app = Router::new()
        .route("/fhir/Condition", get(search))
        .layer(default_layer());
    let addr = serve(app).await;
    let client = TestClient::default();
    let done = run_to_completion(
        &client,
        Method::GET,
        &format!("http://{addr}/fhir/Condition?patient=p-7"),
    )
    .await;
    let entry = only_entry(&done);
    assert_eq!(entry["response"]["status"], "200 OK", "{entry}");
    let resource = &entry["resource"];
    assert_eq!(resource["resourceType"], "Bundle", "{entry}");
    assert_eq!(resource["type"], "searchset");
    assert_eq!(resource["total"], 2);
    assert_eq!(resource["entry"].as_array().map(Vec::len), Some(2));
    assert_eq!(
        resource["link"][0]["url"],
        "https://fhir.example.org/fhir/Condition?patient=p-7"
    );
}

// BUNDLE-11 last row (upstream unreachable → 502 `exception`), STATUS-10: §7 scenario 6. The
// inner service fails with an error instead of a response.
#[tokio::test]
async fn bundle_11_inner_service_error_becomes_502_exception_entry() {
    let failing = tower::service_fn(|_request: Request<RequestBody<Incoming>>| async {
        Err::<http::Response<Full<Bytes>>, _>(std::io::Error::new(
            std::io::ErrorKind::ConnectionRefused,
            "upstream FHIR server refused the connection",
        ))
    });
    let layered = ServiceBuilder::new()
        .layer(default_layer())
        .service(failing);
    // The server needs an infallible service; a pass-through error would become a plain 500.
    let service = tower::service_fn(move |request: Request<Incoming>| {
        let layered = layered.clone();
        async move {
            Ok::<_, Infallible>(layered.oneshot(request).await.unwrap_or_else(|_| {
                let mut response = http::Response::new(ResponseBody::inner(Full::default()));
                *response.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
                response
            }))
        }
    });
    let addr = serve_hyper(service).await;
    let client = TestClient::default();
    let done = run_to_completion(&client, Method::POST, &format!("http://{addr}/Patient")).await;
    let entry = only_entry(&done);
    assert_eq!(entry["response"]["status"], "502 Bad Gateway", "{entry}");
    assert_eq!(
        entry["response"]["outcome"]["issue"][0]["code"], "exception",
        "{entry}"
    );
    assert!(entry.get("resource").is_none(), "{entry}");
}

// BUNDLE-11 last row (AsyncLayer crash mid-job → 500 `exception`), BUNDLE-4, E5: §7 scenario 6.
#[tokio::test]
async fn bundle_11_panicking_handler_becomes_500_exception_entry() {
    async fn explode() -> Response {
        panic!("deliberate panic in the inner handler (test)");
    }
    let app = Router::new()
        .route("/fhir/$explode", post(explode))
        .layer(default_layer());
    let addr = serve(app).await;
    let client = TestClient::default();
    let done = run_to_completion(
        &client,
        Method::POST,
        &format!("http://{addr}/fhir/$explode"),
    )
    .await;
    let entry = only_entry(&done);
    assert_eq!(
        entry["response"]["status"], "500 Internal Server Error",
        "{entry}"
    );
    assert_eq!(
        entry["response"]["outcome"]["issue"][0]["code"], "exception",
        "{entry}"
    );
}

// BUNDLE-11 last row (timeout → 504 `timeout`), BUNDLE-4, E5: §7 scenario 6 with `max_run_time`.
#[tokio::test]
async fn bundle_11_job_over_max_run_time_becomes_504_timeout_entry() {
    async fn never() -> Response {
        std::future::pending().await
    }
    let layer = AsyncLayer::builder(MemoryStore::default())
        .max_run_time(Duration::from_millis(200))
        .build();
    let app = Router::new().route("/fhir/$slow", post(never)).layer(layer);
    let addr = serve(app).await;
    let client = TestClient::default();
    let done = run_to_completion(&client, Method::POST, &format!("http://{addr}/fhir/$slow")).await;
    let entry = only_entry(&done);
    assert_eq!(
        entry["response"]["status"], "504 Gateway Timeout",
        "{entry}"
    );
    assert_eq!(
        entry["response"]["outcome"]["issue"][0]["code"], "timeout",
        "{entry}"
    );
    assert!(entry.get("resource").is_none(), "{entry}");
}

// BUNDLE-4, SEC-13 (hard cap on stored result size): a result over `result_limit` becomes a
// failed entry with a `too-costly` outcome, still behind a `200`.
#[tokio::test]
async fn bundle_4_result_over_result_limit_becomes_too_costly_entry() {
    async fn big() -> Response {
        let padding = "x".repeat(10 * 1024);
        fhir(
            StatusCode::OK,
            &json!({"resourceType": "Binary", "data": padding}),
        )
    }
    let layer = AsyncLayer::builder(MemoryStore::default())
        .result_limit(1024)
        .build();
    let app = Router::new().route("/fhir/$big", post(big)).layer(layer);
    let addr = serve(app).await;
    let client = TestClient::default();
    let done = run_to_completion(&client, Method::POST, &format!("http://{addr}/fhir/$big")).await;
    let entry = only_entry(&done);
    let status = entry["response"]["status"].as_str().unwrap_or_default();
    assert!(
        status.starts_with('4') || status.starts_with('5'),
        "an error status, not the inner 200: {entry}"
    );
    assert_eq!(
        entry["response"]["outcome"]["issue"][0]["code"], "too-costly",
        "{entry}"
    );
    assert!(
        entry.get("resource").is_none(),
        "the oversized result is not served: {entry}"
    );
}

// BUNDLE-11 row 5, BUNDLE-4, BUNDLE-5: non-FHIR error bodies get a synthesized OperationOutcome
// whose code follows the status and whose diagnostics quote the inner text.
#[tokio::test]
async fn bundle_11_non_fhir_error_body_gets_synthesized_outcome() {
    async fn fail(Path(code): Path<u16>) -> Response {
        let status = StatusCode::from_u16(code).expect("a valid status in the test's path");
        (
            status,
            [(CONTENT_TYPE, "text/plain")],
            format!("inner server says {code}"),
        )
            .into_response()
    }
    let app = Router::new()
        .route("/fhir/Fail/{code}", post(fail))
        .layer(default_layer());
    let addr = serve(app).await;
    let client = TestClient::default();
    let cases = [
        (400, "400 Bad Request", "invalid"),
        (401, "401 Unauthorized", "login"),
        (403, "403 Forbidden", "forbidden"),
        (404, "404 Not Found", "not-found"),
        (409, "409 Conflict", "conflict"),
        (412, "412 Precondition Failed", "conflict"),
        (422, "422 Unprocessable Entity", "processing"),
        (500, "500 Internal Server Error", "exception"),
    ];
    for (code, status, issue) in cases {
        let done = run_to_completion(
            &client,
            Method::POST,
            &format!("http://{addr}/fhir/Fail/{code}"),
        )
        .await;
        let entry = only_entry(&done);
        assert_eq!(entry["response"]["status"], status, "{entry}");
        let outcome = &entry["response"]["outcome"];
        assert_eq!(outcome["resourceType"], "OperationOutcome", "{entry}");
        assert_eq!(outcome["issue"][0]["code"], issue, "inner {code}: {entry}");
        let diagnostics = outcome["issue"][0]["diagnostics"]
            .as_str()
            .unwrap_or_default();
        assert!(
            diagnostics.contains(&format!("inner server says {code}")),
            "{entry}"
        );
        assert!(entry.get("resource").is_none(), "{entry}");
    }
}

// BUNDLE-11 row 6 (AMB-4): a non-FHIR success body becomes a Binary resource.
#[tokio::test]
async fn bundle_11_non_fhir_success_body_becomes_binary() {
    const CSV: &str = "id,name\np-1,Ann\np-2,Bo\n";
    async fn export() -> Response {
        (StatusCode::OK, [(CONTENT_TYPE, "text/csv")], CSV).into_response()
    }
    let app = Router::new()
        .route("/fhir/$csv", post(export))
        .layer(default_layer());
    let addr = serve(app).await;
    let client = TestClient::default();
    let done = run_to_completion(&client, Method::POST, &format!("http://{addr}/fhir/$csv")).await;
    let entry = only_entry(&done);
    assert_eq!(entry["response"]["status"], "200 OK", "{entry}");
    assert!(entry["response"].get("outcome").is_none(), "{entry}");
    let binary = &entry["resource"];
    assert_eq!(binary["resourceType"], "Binary", "{entry}");
    assert_eq!(binary["contentType"], "text/csv");
    let data = binary["data"]
        .as_str()
        .unwrap_or_else(|| panic!("no data: {entry}"));
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(data)
        .expect("data is base64");
    assert_eq!(decoded, CSV.as_bytes());
}

// BUNDLE-11 row 3, BUNDLE-9: a 204 without body has neither resource nor outcome.
#[tokio::test]
async fn bundle_11_no_content_has_no_resource_and_no_outcome() {
    async fn remove() -> StatusCode {
        StatusCode::NO_CONTENT
    }
    let app = Router::new()
        .route("/fhir/Patient/{id}", delete(remove))
        .layer(default_layer());
    let addr = serve(app).await;
    let client = TestClient::default();
    let done = run_to_completion(
        &client,
        Method::DELETE,
        &format!("http://{addr}/fhir/Patient/p-1"),
    )
    .await;
    let entry = only_entry(&done);
    assert_eq!(entry["response"]["status"], "204 No Content", "{entry}");
    assert!(entry.get("resource").is_none(), "{entry}");
    assert!(entry["response"].get("outcome").is_none(), "{entry}");
}

/// The names of the preferences in some `Prefer` text, lower-cased.
fn preference_names(prefer: &str) -> Vec<String> {
    prefer
        .split(',')
        .filter_map(|element| element.split(';').next())
        .map(|head| {
            head.split('=')
                .next()
                .unwrap_or_default()
                .trim()
                .to_ascii_lowercase()
        })
        .filter(|name| !name.is_empty())
        .collect()
}

// PREFER-9, PREFER-12, SEL-7 (and PREFER-2/3 on the way): §7 scenario 8, the replayed request
// carries no `respond-async` or `wait`, and every other preference unchanged.
#[tokio::test]
async fn prefer_9_forwarded_prefer_drops_only_respond_async_and_wait() {
    async fn echo_prefer(headers: HeaderMap) -> Response {
        let lines: Vec<&str> = headers
            .get_all("prefer")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .collect();
        fhir(
            StatusCode::OK,
            &json!({"resourceType": "Basic", "prefer": lines.join(", ")}),
        )
    }
    let app = Router::new()
        .route("/fhir/Observation", post(echo_prefer))
        .layer(default_layer());
    let addr = serve(app).await;
    let client = TestClient::default();
    let location = client
        .kick_off(
            Method::POST,
            &format!("http://{addr}/fhir/Observation"),
            // Two lines (PREFER-2), mixed case (PREFER-3).
            &[
                ("prefer", "respond-async, wait=10, return=minimal"),
                ("prefer", "handling=lenient, Respond-Async"),
            ],
            "",
        )
        .await;
    let done = client.poll_until_done(&location, 150).await;
    let entry = only_entry(&done);
    let seen = entry["resource"]["prefer"]
        .as_str()
        .unwrap_or_else(|| panic!("no echo: {entry}"))
        .to_owned();
    let names = preference_names(&seen);
    assert!(
        !names.iter().any(|n| n == "respond-async" || n == "wait"),
        "forwarded Prefer: {seen:?}"
    );
    assert!(
        seen.contains("return=minimal"),
        "forwarded Prefer: {seen:?}"
    );
    assert!(
        seen.contains("handling=lenient"),
        "forwarded Prefer: {seen:?}"
    );
    assert_eq!(names, ["return", "handling"], "forwarded Prefer: {seen:?}");
}

/// Set by a middleware outside the async layer; must reach the replayed request.
#[derive(Clone)]
struct OuterMarker(&'static str);

async fn mark(mut request: axum::extract::Request) -> axum::extract::Request {
    request
        .extensions_mut()
        .insert(OuterMarker("set-by-outer-layer"));
    request
}

// KICK-1, SEC-14: the replayed request keeps method, path and query, headers, body, and the
// extensions an outer layer inserted.
#[tokio::test]
async fn kick_1_replayed_request_arrives_unchanged() {
    async fn echo(
        method: Method,
        uri: Uri,
        headers: HeaderMap,
        marker: Option<Extension<OuterMarker>>,
        body: Bytes,
    ) -> Response {
        let header = |name: &str| {
            headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("<absent>")
                .to_owned()
        };
        fhir(
            StatusCode::OK,
            &json!({
                "resourceType": "Basic",
                "method": method.as_str(),
                "target": uri.path_and_query().map(|pq| pq.as_str()),
                "x-custom": header("x-custom"),
                "content-type": header("content-type"),
                "authorization": header("authorization"),
                "accept": header("accept"),
                "if-match": header("if-match"),
                "marker": marker.map(|Extension(OuterMarker(m))| m),
                "body": String::from_utf8_lossy(&body),
            }),
        )
    }
    let app = Router::new()
        .route("/fhir/Patient/{id}", put(echo))
        .layer(default_layer())
        .layer(axum::middleware::map_request(mark));
    let addr = serve(app).await;
    let client = TestClient::default();
    let body = r#"{"resourceType":"Patient","id":"p-1","active":true}"#;
    let location = client
        .kick_off(
            Method::PUT,
            &format!("http://{addr}/fhir/Patient/p-1?_pretty=true&name=a%20b"),
            &[
                ("prefer", "respond-async"),
                ("x-custom", "kept as is"),
                ("content-type", "application/fhir+json; charset=utf-8"),
                ("authorization", "Bearer eyJ.test.token"),
                ("accept", FHIR),
                ("if-match", "W/\"3\""),
            ],
            body,
        )
        .await;
    let done = client.poll_until_done(&location, 150).await;
    let seen = only_entry(&done)["resource"].clone();
    assert_eq!(seen["method"], "PUT", "{seen}");
    assert_eq!(
        seen["target"], "/fhir/Patient/p-1?_pretty=true&name=a%20b",
        "{seen}"
    );
    assert_eq!(seen["x-custom"], "kept as is", "{seen}");
    assert_eq!(
        seen["content-type"], "application/fhir+json; charset=utf-8",
        "{seen}"
    );
    assert_eq!(seen["authorization"], "Bearer eyJ.test.token", "{seen}");
    assert_eq!(seen["accept"], FHIR, "{seen}");
    assert_eq!(seen["if-match"], "W/\"3\"", "{seen}");
    assert_eq!(seen["marker"], "set-by-outer-layer", "{seen}");
    assert_eq!(seen["body"], body, "{seen}");
}

// STATUS-14: §7 scenario 19, a completed job answers the same bytes every time.
#[tokio::test]
async fn status_14_repeated_polls_of_a_completed_job_are_identical() {
    let app = Router::new()
        .route("/fhir/Observation", post(create_with_validators))
        .layer(default_layer());
    let addr = serve(app).await;
    let client = TestClient::default();
    let location = client
        .kick_off(
            Method::POST,
            &format!("http://{addr}/fhir/Observation"),
            &[("prefer", "respond-async"), ("content-type", FHIR)],
            r#"{"resourceType":"Observation","status":"final"}"#,
        )
        .await;
    let first = client.poll_until_done(&location, 150).await;
    assert_eq!(first.status, StatusCode::OK, "{first:?}");
    assert!(!first.body.is_empty());
    for round in 0..3 {
        if round == 2 {
            // Let the wall clock pass a whole second, so that a Bundle `timestamp` or `Expires`
            // computed at poll time (instead of kept from completion) would differ.
            tokio::time::sleep(Duration::from_millis(1100)).await;
        }
        let again = client.get(&location).await;
        assert_eq!(again.status, StatusCode::OK, "{again:?}");
        assert_eq!(again.body, first.body);
        assert_eq!(again.headers.get("expires"), first.headers.get("expires"));
    }
}

// SEC-9: §7 scenario 20, status ids are distinct, 128-bit, lowercase hex, and reveal nothing.
#[tokio::test]
async fn sec_9_fifty_kick_offs_give_fifty_distinct_opaque_ids() {
    async fn ok() -> Response {
        fhir(
            StatusCode::OK,
            &json!({"resourceType": "Patient", "id": "p-1"}),
        )
    }
    let app = Router::new()
        .route("/fhir/Patient/{id}", get(ok))
        .layer(default_layer());
    let addr = serve(app).await;
    let client = TestClient::default();
    let mut ids = HashSet::new();
    for _ in 0..50 {
        let location = client
            .kick_off(
                Method::GET,
                &format!("http://{addr}/fhir/Patient/p-1"),
                &[("prefer", "respond-async")],
                "",
            )
            .await;
        assert!(
            location.starts_with(&format!("http://{addr}/_async/")),
            "{location}"
        );
        let id = job_id(&location).to_owned();
        assert_eq!(id.len(), 32, "{location}");
        assert!(
            id.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)),
            "{location}"
        );
        assert!(
            !location.contains("p-1") && !location.contains("Patient"),
            "{location}"
        );
        ids.insert(id);
    }
    assert_eq!(ids.len(), 50);
}

// KICK-9: the job is recorded before the 202 leaves, so an immediate poll never 404s. Multi-thread,
// so that jobs really run in parallel with the polls.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kick_9_first_poll_right_after_the_202_never_404s() {
    async fn instant() -> Response {
        fhir(StatusCode::OK, &json!({"resourceType": "Parameters"}))
    }
    let app = Router::new()
        .route("/fhir/$instant", post(instant))
        .layer(default_layer());
    let addr = serve(app).await;
    let client = TestClient::default();
    for _ in 0..20 {
        let location = client
            .kick_off(
                Method::POST,
                &format!("http://{addr}/fhir/$instant"),
                &[("prefer", "respond-async")],
                "",
            )
            .await;
        let first = client.get(&location).await;
        assert!(
            first.status == StatusCode::ACCEPTED || first.status == StatusCode::OK,
            "first poll of {location}: {first:?}"
        );
    }
}

// BUNDLE-1, BUNDLE-4 (B3 SHALL): whatever the inner status, the status URL answers 200.
#[tokio::test]
async fn bundle_4_status_url_answers_200_whatever_the_inner_status() {
    async fn answer(Path(code): Path<u16>) -> Response {
        let status = StatusCode::from_u16(code).expect("a valid status in the test's path");
        if status.is_success() {
            fhir(status, &json!({"resourceType": "Patient", "id": "p-1"}))
        } else {
            fhir(
                status,
                &json!({"resourceType": "OperationOutcome", "issue": [{"severity": "error", "code": "processing"}]}),
            )
        }
    }
    let app = Router::new()
        .route("/fhir/Answer/{code}", post(answer))
        .layer(default_layer());
    let addr = serve(app).await;
    let client = TestClient::default();
    for code in [201u16, 400, 500] {
        let location = client
            .kick_off(
                Method::POST,
                &format!("http://{addr}/fhir/Answer/{code}"),
                &[("prefer", "respond-async")],
                "",
            )
            .await;
        let done = client.poll_until_done(&location, 150).await;
        assert_eq!(done.status, StatusCode::OK, "inner {code}: {done:?}");
        let entry = only_entry(&done);
        let status = entry["response"]["status"].as_str().unwrap_or_default();
        assert!(
            status.starts_with(&code.to_string()),
            "inner {code}: {entry}"
        );
    }
}
