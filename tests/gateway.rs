//! Issue #13 (GATEWAY-1…4): a FHIR server that is not a tower service, behind the layer over
//! HTTP through `upstream::Upstream`. The upstream here is a real HTTP server on its own port and
//! base path (`/fhir/R4`), which writes absolute URLs on its own address, pages its searches with
//! absolute `next` links, answers creates with `201` + `Location`, compresses when asked, and
//! echoes the headers it received. Clients reach it only through the gateway's public base.

#![cfg(all(feature = "upstream", feature = "bulk"))]

mod support;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::extract::{Query, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use http::header::{HeaderName, HeaderValue};
use http::{Method, StatusCode};
use serde_json::{Value, json};
use support::{TestClient, serve};
use tower_fhir_async::upstream::Upstream;
use tower_fhir_async::{AsyncLayer, MemoryStore};

/// What the upstream saw of each request: method, path and query, headers.
#[derive(Clone, Default)]
struct Seen(Arc<Mutex<Vec<(String, HeaderMap)>>>);

impl Seen {
    fn push(&self, what: String, headers: &HeaderMap) {
        self.0.lock().unwrap().push((what, headers.clone()));
    }

    fn all(&self) -> Vec<(String, HeaderMap)> {
        self.0.lock().unwrap().clone()
    }
}

#[derive(Clone)]
struct Upstreamed {
    /// `http://127.0.0.1:PORT/fhir/R4`: the upstream's own base, in every URL it writes.
    base: Arc<Mutex<String>>,
    seen: Seen,
}

impl Upstreamed {
    fn base(&self) -> String {
        self.base.lock().unwrap().clone()
    }
}

fn fhir(status: StatusCode, body: &Value) -> Response {
    (
        status,
        [("content-type", "application/fhir+json")],
        body.to_string(),
    )
        .into_response()
}

/// `GET /fhir/R4/Observation?page=N`: 210 Observations, 20 a page, absolute `next` links.
async fn search(
    State(up): State<Upstreamed>,
    headers: HeaderMap,
    Query(query): Query<Vec<(String, String)>>,
) -> Response {
    let page: usize = query
        .iter()
        .find(|(k, _)| k == "page")
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(1);
    up.seen
        .push(format!("GET /Observation?page={page}"), &headers);
    let base = up.base();
    let first = (page - 1) * 20;
    let entries: Vec<Value> = (first..(first + 20).min(210))
        .map(|n| {
            json!({
                "fullUrl": format!("{base}/Observation/o{n}"),
                "resource": {"resourceType": "Observation", "id": format!("o{n}"),
                             "subject": {"reference": format!("{base}/Patient/p{n}")},
                             "valueQuantity": {"value": 1.50e1, "unit": "mg"}},
                "search": {"mode": "match"}
            })
        })
        .collect();
    let mut links =
        vec![json!({"relation": "self", "url": format!("{base}/Observation?page={page}")})];
    if first + 20 < 210 {
        links.push(
            json!({"relation": "next", "url": format!("{base}/Observation?page={}", page + 1)}),
        );
    }
    fhir(
        StatusCode::OK,
        &json!({"resourceType": "Bundle", "type": "searchset", "total": 210, "link": links, "entry": entries}),
    )
}

/// `POST /fhir/R4/Patient`: `201` with `Location` on the upstream.
async fn create(State(up): State<Upstreamed>, headers: HeaderMap, body: String) -> Response {
    up.seen.push("POST /Patient".into(), &headers);
    let base = up.base();
    let mut patient: Value = serde_json::from_str(&body).unwrap_or_else(|_| json!({}));
    patient["id"] = json!("new1");
    let mut response = fhir(StatusCode::CREATED, &patient);
    let location = format!("{base}/Patient/new1/_history/1");
    response
        .headers_mut()
        .insert("location", HeaderValue::from_str(&location).unwrap());
    response.headers_mut().insert(
        "link",
        HeaderValue::from_str(&format!("<{base}/Patient/new1>; rel=\"canonical\"")).unwrap(),
    );
    response
}

/// `GET /fhir/R4/slow`: never answers within the gateway's response timeout.
async fn slow() -> Response {
    tokio::time::sleep(Duration::from_secs(30)).await;
    fhir(StatusCode::OK, &json!({}))
}

/// `GET /fhir/R4/echo`: the headers it received, as a Parameters resource.
async fn echo(State(up): State<Upstreamed>, headers: HeaderMap) -> Response {
    up.seen.push("GET /echo".into(), &headers);
    let seen: Vec<Value> = headers
        .iter()
        .map(|(n, v)| json!({"name": n.as_str(), "valueString": v.to_str().unwrap_or("?")}))
        .collect();
    fhir(
        StatusCode::OK,
        &json!({"resourceType": "Parameters", "parameter": seen}),
    )
}

/// `POST /fhir/R4/$long-op` and `$hang-op`: the upstream runs them asynchronously itself,
/// `202` + `Content-Location` on its own base.
async fn native_kick_off(
    State(up): State<Upstreamed>,
    headers: HeaderMap,
    uri: http::Uri,
) -> Response {
    let job = if uri.path().ends_with("$long-op") {
        "op1"
    } else {
        "hang"
    };
    up.seen.push(format!("POST {}", uri.path()), &headers);
    let mut response = fhir(
        StatusCode::ACCEPTED,
        &json!({"resourceType": "OperationOutcome", "issue": [{"severity": "information", "code": "informational"}]}),
    );
    response.headers_mut().insert(
        "content-location",
        HeaderValue::from_str(&format!("{}/_jobs/{job}", up.base())).unwrap(),
    );
    response
}

/// `GET /fhir/R4/_jobs/{id}`: `op1` is running for two polls, then done; `hang` never ends.
async fn native_status(
    State(up): State<Upstreamed>,
    headers: HeaderMap,
    axum::extract::Path(id): axum::extract::Path<String>,
) -> Response {
    up.seen.push(format!("GET /_jobs/{id}"), &headers);
    let polls = up
        .seen
        .all()
        .iter()
        .filter(|(what, _)| *what == format!("GET /_jobs/{id}"))
        .count();
    if id == "hang" || polls <= 2 {
        let mut response = StatusCode::ACCEPTED.into_response();
        response.headers_mut().insert(
            "x-progress",
            HeaderValue::from_str(&format!("step {polls}")).unwrap(),
        );
        response
            .headers_mut()
            .insert("retry-after", HeaderValue::from_static("0"));
        return response;
    }
    fhir(
        StatusCode::OK,
        &json!({"resourceType": "Bundle", "type": "batch-response", "entry": [{
            "resource": {"resourceType": "Parameters", "parameter": [{"name": "done", "valueBoolean": true}]},
            "response": {"status": "200 OK"}
        }]}),
    )
}

/// `DELETE /fhir/R4/_jobs/{id}`: the upstream's own cancel.
async fn native_cancel(
    State(up): State<Upstreamed>,
    headers: HeaderMap,
    axum::extract::Path(id): axum::extract::Path<String>,
) -> Response {
    up.seen.push(format!("DELETE /_jobs/{id}"), &headers);
    StatusCode::ACCEPTED.into_response()
}

/// The upstream on a port of its own; its base.
async fn start_upstream() -> (String, Seen) {
    let up = Upstreamed {
        base: Arc::default(),
        seen: Seen::default(),
    };
    let app = Router::new()
        .route("/fhir/R4/Observation", get(search))
        .route("/fhir/R4/Patient", post(create))
        .route("/fhir/R4/slow", get(slow))
        .route("/fhir/R4/echo", get(echo))
        .route("/fhir/R4/$long-op", post(native_kick_off))
        .route("/fhir/R4/$hang-op", post(native_kick_off))
        .route(
            "/fhir/R4/_jobs/{id}",
            get(native_status).delete(native_cancel),
        )
        .with_state(up.clone());
    let addr = serve(app).await;
    let base = format!("http://{addr}/fhir/R4");
    *up.base.lock().unwrap() = base.clone();
    (base, up.seen)
}

/// The gateway: the layer over an `Upstream`, on its own port, public base `/fhir`.
async fn start_gateway(upstream: &str, response_timeout: Duration) -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr: SocketAddr = listener.local_addr().unwrap();
    drop(listener);
    let public = format!("http://{addr}/fhir");
    let forwarder = Upstream::builder(upstream)
        .public_base(&public)
        .response_timeout(response_timeout)
        .header(
            HeaderName::from_static("x-api-key"),
            HeaderValue::from_static("fixed-upstream-credential"),
        )
        .build()
        .expect("a valid upstream");
    let layer = AsyncLayer::builder(MemoryStore::new())
        .base_url(&public)
        .follow_links_on(upstream)
        .build();
    let service = tower::ServiceBuilder::new().layer(layer).service(forwarder);
    let app = Router::new().fallback_service(service);
    let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
    tokio::spawn(async move {
        axum::serve(listener, app).await.unwrap();
    });
    public
}

async fn setup() -> (String, String, Seen) {
    let (upstream, seen) = start_upstream().await;
    let public = start_gateway(&upstream, Duration::from_secs(10)).await;
    (upstream, public, seen)
}

// GATEWAY-1, GATEWAY-2: a search passed through the gateway names the public base everywhere
// the upstream named its own — `fullUrl`, `link.url`, references — and nothing else changed.
#[tokio::test]
async fn gateway_2_a_passed_through_search_names_only_the_public_base() {
    let (upstream, public, _) = setup().await;
    let client = TestClient::default();
    let reply = client.get(&format!("{public}/Observation?page=1")).await;
    assert_eq!(reply.status, StatusCode::OK, "{reply:?}");
    let text = String::from_utf8(reply.body.to_vec()).unwrap();
    assert!(
        !text.contains(&upstream),
        "the upstream's address leaked: {text}"
    );
    let bundle: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(
        bundle["entry"][0]["fullUrl"],
        format!("{public}/Observation/o0")
    );
    assert_eq!(
        bundle["entry"][0]["resource"]["subject"]["reference"],
        format!("{public}/Patient/p0")
    );
    assert_eq!(
        bundle["link"][1]["url"],
        format!("{public}/Observation?page=2")
    );
    // Byte-exact elsewhere: the upstream's own answer, with only its base replaced.
    let direct = client.get(&format!("{upstream}/Observation?page=1")).await;
    let direct = String::from_utf8(direct.body.to_vec()).unwrap();
    assert_eq!(text, direct.replace(&upstream, &public));
}

// GATEWAY-1, GATEWAY-2: an async search completes with a batch-response Bundle whose resource
// names the public base; an async create's `response.location` is on the public base too.
#[tokio::test]
async fn gateway_2_async_results_name_only_the_public_base() {
    let (upstream, public, _) = setup().await;
    let client = TestClient::default();
    let status = client
        .kick_off(
            Method::GET,
            &format!("{public}/Observation?page=1"),
            &[],
            "",
        )
        .await;
    let done = client.poll_until_done(&status, 500).await;
    assert_eq!(done.status, StatusCode::OK, "{done:?}");
    let text = String::from_utf8(done.body.to_vec()).unwrap();
    assert!(
        !text.contains(&upstream),
        "the upstream's address leaked: {text}"
    );
    let result = &done.json()["entry"][0]["resource"];
    assert_eq!(
        result["entry"][0]["fullUrl"],
        format!("{public}/Observation/o0")
    );

    let status = client
        .kick_off(
            Method::POST,
            &format!("{public}/Patient"),
            &[("content-type", "application/fhir+json")],
            r#"{"resourceType":"Patient"}"#,
        )
        .await;
    let done = client.poll_until_done(&status, 500).await;
    let entry = &done.json()["entry"][0];
    assert_eq!(entry["response"]["status"], "201 Created", "{entry}");
    assert_eq!(
        entry["response"]["location"],
        format!("{public}/Patient/new1/_history/1")
    );
}

// GATEWAY-1, GATEWAY-3, BULK-6: a bulk export of a paged 210-resource search through the gateway
// follows every `next` link and exports all 210, with no error file.
#[tokio::test]
async fn gateway_3_an_export_of_a_paged_search_exports_everything() {
    let (upstream, public, seen) = setup().await;
    let client = TestClient::default();
    let status = client
        .kick_off(
            Method::GET,
            &format!("{public}/Observation?_outputFormat=application/fhir%2Bndjson"),
            &[],
            "",
        )
        .await;
    let done = client.poll_until_done(&status, 1000).await;
    assert_eq!(done.status, StatusCode::OK, "{done:?}");
    let manifest = done.json();
    assert_eq!(manifest["error"], json!([]), "{manifest}");
    assert_eq!(manifest["output"][0]["count"], 210, "{manifest}");
    let file = client
        .get(manifest["output"][0]["url"].as_str().unwrap())
        .await;
    let text = String::from_utf8(file.body.to_vec()).unwrap();
    assert_eq!(text.lines().count(), 210);
    assert!(
        !text.contains(&upstream),
        "the upstream's address leaked into the files"
    );
    let pages: Vec<String> = seen
        .all()
        .into_iter()
        .map(|(what, _)| what)
        .filter(|what| what.starts_with("GET /Observation"))
        .collect();
    assert_eq!(pages.len(), 11, "every page once: {pages:?}");
}

// GATEWAY-1: hop-by-hop headers stay on their hop; `Forwarded`/`X-Forwarded-*` say where the
// request came in; a fixed upstream credential replaces the caller's; the caller's other
// headers (its `Authorization`) are forwarded.
#[tokio::test]
async fn gateway_1_headers_are_forwarded_as_a_proxy_forwards_them() {
    let (_, public, seen) = setup().await;
    let client = TestClient::default();
    let host = public
        .strip_prefix("http://")
        .and_then(|rest| rest.split('/').next())
        .unwrap()
        .to_owned();
    let reply = client
        .send(
            Method::GET,
            &format!("{public}/echo"),
            &[
                ("connection", "keep-alive, x-hop"),
                ("x-hop", "only this hop"),
                ("authorization", "Bearer caller-token"),
                ("x-api-key", "the caller's own"),
                ("accept-encoding", "gzip"),
            ],
            "",
        )
        .await;
    assert_eq!(reply.status, StatusCode::OK, "{reply:?}");
    let (_, headers) = seen.all().pop().expect("the upstream saw the request");
    assert!(
        !headers.contains_key("x-hop"),
        "a header named by Connection was dropped"
    );
    assert!(!headers.contains_key("keep-alive"));
    assert_eq!(headers["authorization"], "Bearer caller-token");
    assert_eq!(headers["x-api-key"], "fixed-upstream-credential");
    assert_eq!(headers["x-forwarded-host"], host.as_str());
    assert_eq!(headers["x-forwarded-proto"], "http");
    let forwarded = headers["forwarded"].to_str().unwrap();
    assert!(
        forwarded.contains(&format!("host=\"{host}\"")),
        "{forwarded}"
    );
    assert!(forwarded.contains("proto=http"), "{forwarded}");
    assert_eq!(
        headers["accept-encoding"], "identity",
        "bodies are mapped, so uncompressed"
    );
}

// GATEWAY-1: `Location` and `Link` headers of a passed-through answer are on the public base.
#[tokio::test]
async fn gateway_2_location_and_link_headers_are_mapped() {
    let (_, public, _) = setup().await;
    let client = TestClient::default();
    let reply = client
        .send(
            Method::POST,
            &format!("{public}/Patient"),
            &[("content-type", "application/fhir+json")],
            r#"{"resourceType":"Patient"}"#,
        )
        .await;
    assert_eq!(reply.status, StatusCode::CREATED);
    assert_eq!(
        reply.header("location"),
        format!("{public}/Patient/new1/_history/1")
    );
    assert_eq!(
        reply.header("link"),
        format!("<{public}/Patient/new1>; rel=\"canonical\"")
    );
}

// GATEWAY-1: an upstream that is down is a 502 OperationOutcome naming it; one that does not
// answer in time is a 504; a path outside the public base is a 404. Never a hang, never a
// dropped connection.
#[tokio::test]
async fn gateway_1_upstream_failures_are_answers() {
    let (upstream, _) = start_upstream().await;
    let public = start_gateway(&upstream, Duration::from_millis(300)).await;
    let client = TestClient::default();
    let reply = client.get(&format!("{public}/slow")).await;
    assert_eq!(reply.status, StatusCode::GATEWAY_TIMEOUT, "{reply:?}");
    reply.assert_outcome("timeout");

    let closed = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap()
    };
    let down = start_gateway(&format!("http://{closed}/fhir"), Duration::from_secs(5)).await;
    let reply = client.get(&format!("{down}/Patient/1")).await;
    assert_eq!(reply.status, StatusCode::BAD_GATEWAY, "{reply:?}");
    reply.assert_outcome("exception");
    assert!(
        String::from_utf8_lossy(&reply.body).contains(&closed.to_string()),
        "names the upstream: {reply:?}"
    );

    let outside = public.replace("/fhir", "/other");
    let reply = client.get(&format!("{outside}/Patient/1")).await;
    assert_eq!(reply.status, StatusCode::NOT_FOUND, "{reply:?}");
    reply.assert_outcome("not-found");
}

// GATEWAY-1: settings that cannot work are refused when built, naming the setting.
#[test]
fn gateway_1_bad_settings_are_named() {
    let mut cases = vec![
        (Upstream::builder("hapi.internal/fhir"), "upstream"),
        (Upstream::builder("http://h/fhir?x=1"), "query"),
        (
            Upstream::builder("http://h/fhir").public_base("/fhir"),
            "public_base",
        ),
        (
            Upstream::builder("http://h/fhir").response_timeout(Duration::ZERO),
            "response_timeout",
        ),
    ];
    // With TLS built in, https upstreams are accepted (tests/gateway_tls.rs); without it they
    // are refused, naming the feature that adds it.
    #[cfg(not(feature = "upstream-tls"))]
    cases.push((
        Upstream::builder("https://hapi.internal/fhir"),
        "upstream-tls",
    ));
    #[cfg(feature = "upstream-tls")]
    cases.push((
        Upstream::builder("ftp://hapi.internal/fhir"),
        "http or https",
    ));
    for (builder, setting) in cases {
        let error = builder.build().expect_err(setting).to_string();
        assert!(error.contains(setting), "{setting}: {error}");
    }
}

// GATEWAY-5, BUNDLE-1: an upstream that answers a job's request with `202` + `Content-Location`
// is followed: the job polls its status URL (its X-Progress shown, its Retry-After obeyed), and
// adopts its final answer, whose batch-response is unwrapped so the client's Bundle wraps the
// answer once.
#[tokio::test]
async fn gateway_5_an_upstreams_own_async_job_is_followed_to_its_answer() {
    let (_, public, seen) = setup().await;
    let client = TestClient::default();
    let status = client
        .kick_off(Method::POST, &format!("{public}/$long-op"), &[], "")
        .await;
    let done = client.poll_until_done(&status, 1000).await;
    assert_eq!(done.status, StatusCode::OK, "{done:?}");
    let entry = &done.json()["entry"][0];
    assert_eq!(entry["response"]["status"], "200 OK", "{entry}");
    assert_eq!(
        entry["resource"],
        json!({"resourceType": "Parameters", "parameter": [{"name": "done", "valueBoolean": true}]}),
        "the upstream's answer, unwrapped once: {entry}"
    );
    let polls = seen
        .all()
        .iter()
        .filter(|(what, _)| what == "GET /_jobs/op1")
        .count();
    assert_eq!(polls, 3, "two 202s, then the answer");
}

// GATEWAY-5, CANCEL-3: cancelling a job that follows an upstream's own job cancels that one too
// (a `DELETE` of its status URL); meanwhile its `X-Progress` is the job's.
#[tokio::test]
async fn gateway_5_a_cancel_reaches_the_upstreams_own_job() {
    let (_, public, seen) = setup().await;
    let client = TestClient::default();
    let status = client
        .kick_off(Method::POST, &format!("{public}/$hang-op"), &[], "")
        .await;
    let polled = |seen: &Seen| {
        seen.all()
            .iter()
            .filter(|(w, _)| w == "GET /_jobs/hang")
            .count()
    };
    support::within("the upstream's status URL is polled twice", async {
        while polled(&seen) < 2 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    let running = client.get(&status).await;
    assert_eq!(running.status, StatusCode::ACCEPTED);
    assert!(
        running.header("x-progress").starts_with("step "),
        "the upstream's progress: {running:?}"
    );
    let cancelled = client.delete(&status).await;
    assert_eq!(cancelled.status, StatusCode::ACCEPTED, "{cancelled:?}");
    support::within("the upstream's job is cancelled", async {
        while !seen.all().iter().any(|(w, _)| w == "DELETE /_jobs/hang") {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    support::assert_not_found(&client.get(&status).await, "the cancelled job");
}

// GATEWAY-1: with `http2(true)` the forwarder speaks HTTP/2 (prior knowledge) to an upstream that
// speaks only HTTP/2; answers are mapped as over HTTP/1.1.
#[tokio::test]
async fn gateway_1_http2_upstreams_are_spoken_to_in_http2() {
    use hyper_util::rt::{TokioExecutor, TokioIo};

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let base = format!("http://{addr}/fhir");
    let versions: Arc<Mutex<Vec<http::Version>>> = Arc::default();
    {
        let (base, versions) = (base.clone(), versions.clone());
        tokio::spawn(async move {
            loop {
                let (stream, _) = listener.accept().await.unwrap();
                let (base, versions) = (base.clone(), versions.clone());
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(
                        move |request: http::Request<hyper::body::Incoming>| {
                            versions.lock().unwrap().push(request.version());
                            let body = json!({"resourceType": "Patient", "id": "1",
                                          "link": [{"other": {"reference": format!("{base}/Patient/2")}}]});
                            async move {
                                let mut response = http::Response::new(http_body_util::Full::new(
                                    bytes::Bytes::from(body.to_string()),
                                ));
                                response.headers_mut().insert(
                                    "content-type",
                                    HeaderValue::from_static("application/fhir+json"),
                                );
                                Ok::<_, std::convert::Infallible>(response)
                            }
                        },
                    );
                    let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
    }
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let public = format!("http://{}/fhir", listener.local_addr().unwrap());
    let forwarder = Upstream::builder(&base)
        .public_base(&public)
        .http2(true)
        .build()
        .unwrap();
    let service = tower::ServiceBuilder::new()
        .layer(
            AsyncLayer::builder(MemoryStore::new())
                .base_url(&public)
                .build(),
        )
        .service(forwarder);
    tokio::spawn(async move {
        axum::serve(listener, Router::new().fallback_service(service))
            .await
            .unwrap()
    });
    let client = TestClient::default();
    let reply = client.get(&format!("{public}/Patient/1")).await;
    assert_eq!(reply.status, StatusCode::OK, "{reply:?}");
    assert_eq!(
        reply.json()["link"][0]["other"]["reference"],
        format!("{public}/Patient/2")
    );
    assert_eq!(*versions.lock().unwrap(), [http::Version::HTTP_2]);
}

// GATEWAY-1: the version spoken with the upstream stays on that hop: an HTTP/1.0 upstream's
// answer reaches an HTTP/1.1 client as HTTP/1.1 (RFC 9110 §6.2: a proxy answers in its own
// version), its body whole.
#[tokio::test]
async fn gateway_1_an_http_1_0_upstream_is_answered_in_http_1_1() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let upstream = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let upstream_addr = upstream.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = upstream.accept().await {
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut byte = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") && stream.read(&mut byte).await.unwrap_or(0) == 1
                {
                    head.push(byte[0]);
                }
                let body = r#"{"resourceType":"Patient","id":"1"}"#;
                let answer = format!(
                    "HTTP/1.0 200 OK\r\nContent-Type: application/fhir+json\r\nContent-Length: {}\r\n\r\n{body}",
                    body.len()
                );
                let _ = stream.write_all(answer.as_bytes()).await;
            });
        }
    });
    let public = start_gateway(
        &format!("http://{upstream_addr}/fhir/R4"),
        Duration::from_secs(5),
    )
    .await;
    let authority = public
        .trim_start_matches("http://")
        .trim_end_matches("/fhir");
    let mut client = tokio::net::TcpStream::connect(authority).await.unwrap();
    client
        .write_all(
            format!(
                "GET /fhir/Patient/1 HTTP/1.1\r\nHost: {authority}\r\nConnection: close\r\n\r\n"
            )
            .as_bytes(),
        )
        .await
        .unwrap();
    let mut answer = String::new();
    client.read_to_string(&mut answer).await.unwrap();
    assert!(answer.starts_with("HTTP/1.1 200 OK\r\n"), "{answer}");
    assert!(
        answer.ends_with(r#"{"resourceType":"Patient","id":"1"}"#),
        "{answer}"
    );
}
