//! How the layer uses the service it wraps, observed with `tower_test::mock`: one inner call per
//! job, none for the layer's own routes, readiness left for the requests that need it, and
//! pass-through requests delivered unchanged.

mod support;

use std::task::Poll;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use support::within;
use tower::{Layer, Service, ServiceExt};
use tower_fhir_async::{AsyncLayer, AsyncService, JobContext, JobId, MemoryStore, RequestBody};
use tower_test::mock;

type InnerRequest = Request<RequestBody<Full<Bytes>>>;
type InnerResponse = Response<Full<Bytes>>;
type Mock = mock::Mock<InnerRequest, InnerResponse>;
type Handle = mock::Handle<InnerRequest, InnerResponse>;

const BASE: &str = "http://fhir.test/fhir";
fn layered() -> (AsyncService<Mock>, Handle) {
    let (inner, handle) = mock::pair::<InnerRequest, InnerResponse>();
    let layer = AsyncLayer::builder(MemoryStore::default())
        .base_url(BASE)
        .build();
    (Layer::layer(&layer, inner), handle)
}

fn request(method: Method, uri: &str) -> http::request::Builder {
    Request::builder().method(method).uri(uri)
}

/// Drives `svc` to readiness, calls it, reads the whole response.
async fn send(svc: &mut AsyncService<Mock>, request: Request<Full<Bytes>>) -> (StatusCode, Bytes) {
    let response = within("the layer's response", async {
        svc.ready().await.expect("ready").call(request).await
    })
    .await
    .expect("the layer answers");
    let status = response.status();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    (status, body)
}

async fn get(svc: &mut AsyncService<Mock>, uri: &str) -> (StatusCode, Bytes) {
    let empty = Full::new(Bytes::new());
    send(svc, request(Method::GET, uri).body(empty).unwrap()).await
}

/// Whether the mock has received a request that nobody took yet (checked without waiting).
fn has_pending_request(handle: &mut Handle) -> bool {
    matches!(handle.poll_request(), Poll::Ready(Some(_)))
}

/// The path of an absolute status URL under [`BASE`].
fn status_path(location: &str) -> String {
    location
        .strip_prefix("http://fhir.test")
        .expect("status URL under the base URL")
        .to_owned()
}

// PREFER-9, SEL-7, KICK-2, [DESIGN] one inner call per job: the kick-off reaches the inner service
// exactly once, with `respond-async` and `wait` stripped from `Prefer` and everything else kept;
// the job's response becomes the completion; polling never calls the inner service again.
#[tokio::test]
async fn prefer_9_sel_7_inner_service_is_called_exactly_once_per_job() {
    let (mut svc, mut handle) = layered();
    handle.allow(1);
    let body = r#"{"resourceType":"Observation","status":"final"}"#;
    let kick_off = request(Method::POST, "/fhir/Observation?x=1")
        .header("prefer", "respond-async, return=representation, wait=10")
        .header("content-type", "application/fhir+json")
        .header("authorization", "Bearer abc")
        .header("x-custom", "kept")
        .body(Full::new(Bytes::from_static(body.as_bytes())))
        .unwrap();
    let response = within("the kick-off", async {
        svc.ready().await.expect("ready").call(kick_off).await
    })
    .await
    .expect("the layer answers");
    assert_eq!(response.status(), StatusCode::ACCEPTED);
    let status = status_path(response.headers()["content-location"].to_str().unwrap());

    let (replayed, reply) = within("the job's inner call", handle.next_request())
        .await
        .expect("the mock is open");
    assert!(!has_pending_request(&mut handle), "one inner call per job");
    assert_eq!(replayed.method(), Method::POST);
    assert_eq!(replayed.uri(), "/fhir/Observation?x=1");
    let prefer: Vec<_> = replayed
        .headers()
        .get_all("prefer")
        .iter()
        .map(|v| v.to_str().unwrap().to_owned())
        .collect();
    assert_eq!(prefer, ["return=representation"], "only other preferences");
    assert_eq!(replayed.headers()["authorization"], "Bearer abc");
    assert_eq!(replayed.headers()["x-custom"], "kept");
    assert_eq!(replayed.headers()["content-type"], "application/fhir+json");
    let context = replayed
        .extensions()
        .get::<JobContext>()
        .expect("a JobContext in the replayed request");
    assert_eq!(
        Some(context.id()),
        JobId::parse(status.rsplit('/').next().unwrap())
    );
    let replayed_body = replayed.into_body();
    assert!(
        replayed_body.is_buffered(),
        "a job replays the buffered body"
    );
    let replayed_body = replayed_body.collect().await.unwrap().to_bytes();
    assert_eq!(replayed_body, body.as_bytes());

    // The mock's one permit went to the job. `ready()` on the layer asks the mock, so allow one
    // more for the polls below; they never spend it.
    handle.allow(1);
    let (code, _) = get(&mut svc, &status).await;
    assert_eq!(
        code,
        StatusCode::ACCEPTED,
        "running until the inner answers"
    );

    let created = Response::builder()
        .status(StatusCode::CREATED)
        .header("content-type", "application/fhir+json")
        .body(Full::new(Bytes::from_static(
            br#"{"resourceType":"Observation","id":"obs-1"}"#,
        )))
        .unwrap();
    reply.send_response(created);
    let mut done = None;
    for _ in 0..100 {
        let (code, body) = get(&mut svc, &status).await;
        if code != StatusCode::ACCEPTED {
            done = Some((code, body));
            break;
        }
        tokio::task::yield_now().await;
    }
    let (code, body) = done.expect("the job completed within 100 polls");
    assert_eq!(code, StatusCode::OK);
    let bundle: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(bundle["entry"][0]["response"]["status"], "201 Created");
    assert_eq!(bundle["entry"][0]["resource"]["id"], "obs-1");

    for _ in 0..3 {
        assert_eq!(get(&mut svc, &status).await.0, StatusCode::OK);
    }
    assert!(
        !has_pending_request(&mut handle),
        "polling never calls the inner service"
    );
}

// SEL-7, STATUS-15, CANCEL-7, [DESIGN] readiness: status (`GET`) and cancel (`DELETE`) requests
// never call the inner service and never use up its readiness: after `allow(1)` and several own
// requests, a pass-through request still gets the one permitted call.
#[tokio::test]
async fn sel_7_own_routes_neither_call_the_inner_service_nor_use_its_readiness() {
    let (mut svc, mut handle) = layered();
    handle.allow(1);
    let unknown = format!("/fhir/_async/{}", JobId::new());
    let empty = || Full::new(Bytes::new());

    assert_eq!(get(&mut svc, &unknown).await.0, StatusCode::NOT_FOUND);
    assert_eq!(
        get(&mut svc, "/fhir/_async/not-a-job").await.0,
        StatusCode::NOT_FOUND
    );
    let head = request(Method::HEAD, &unknown).body(empty()).unwrap();
    assert_eq!(send(&mut svc, head).await.0, StatusCode::NOT_FOUND);
    let delete = request(Method::DELETE, &unknown).body(empty()).unwrap();
    assert_eq!(send(&mut svc, delete).await.0, StatusCode::NOT_FOUND);
    let put = request(Method::PUT, &unknown).body(empty()).unwrap();
    assert_eq!(send(&mut svc, put).await.0, StatusCode::METHOD_NOT_ALLOWED);
    assert!(
        !has_pending_request(&mut handle),
        "the layer's own routes never reach the inner service"
    );

    let pass = request(Method::GET, "/fhir/Patient/1")
        .body(empty())
        .unwrap();
    let ready = within("readiness for the pass-through request", svc.ready())
        .await
        .expect("ready");
    // Tower futures are lazy: the inner call happens when the response future is polled.
    let pending = tokio::spawn(ready.call(pass));
    let (seen, reply) = within("the pass-through call", handle.next_request())
        .await
        .expect("the mock is open");
    assert_eq!(seen.uri(), "/fhir/Patient/1");
    reply.send_response(Response::new(Full::new(Bytes::from_static(b"{}"))));
    let response = within("the pass-through response", pending)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert!(!has_pending_request(&mut handle), "exactly one inner call");
}

// SEL-7 (the cancel route of a real job), CANCEL-2: cancelling a running job does not call the
// inner service or use its readiness either.
#[tokio::test]
async fn cancel_2_cancel_of_a_running_job_leaves_the_inner_readiness_alone() {
    let (mut svc, mut handle) = layered();
    handle.allow(1);
    let kick_off = request(Method::POST, "/fhir/$reindex")
        .header("prefer", "respond-async")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let (code, _) = send(&mut svc, kick_off).await;
    assert_eq!(code, StatusCode::ACCEPTED);
    let (job_request, _job_reply) = within("the job's inner call", handle.next_request())
        .await
        .expect("the mock is open");
    let job = job_request
        .extensions()
        .get::<JobContext>()
        .cloned()
        .expect("a JobContext");
    let status = format!("/fhir/_async/{}", job.id());

    handle.allow(1);
    let delete = request(Method::DELETE, &status)
        .body(Full::new(Bytes::new()))
        .unwrap();
    assert_eq!(send(&mut svc, delete).await.0, StatusCode::ACCEPTED);
    assert_eq!(get(&mut svc, &status).await.0, StatusCode::NOT_FOUND);
    assert!(job.is_cancelled(), "the job was cancelled");
    assert!(!has_pending_request(&mut handle));

    let pass = request(Method::GET, "/fhir/Patient/1")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let ready = within("readiness for the pass-through request", svc.ready())
        .await
        .expect("ready");
    let _pending = tokio::spawn(ready.call(pass));
    within("the pass-through call", handle.next_request())
        .await
        .expect("the one permitted call was still available");
}

// SEL-2, PREFER-11, [DESIGN] pass-through: a request without `respond-async` reaches the inner
// service unchanged (method, URI, headers, streaming body, no JobContext) and its response comes
// back unchanged.
#[tokio::test]
async fn sel_2_pass_through_reaches_the_inner_service_unchanged() {
    let (mut svc, mut handle) = layered();
    handle.allow(1);
    let original = request(Method::POST, "/fhir/Patient?_pretty=true")
        .header("prefer", "return=minimal")
        .header("content-type", "application/fhir+json")
        .header("x-custom", "one")
        .header("x-custom", "two")
        .body(Full::new(Bytes::from_static(
            b"{\"resourceType\":\"Patient\"}",
        )))
        .unwrap();
    let expected_headers = original.headers().clone();
    let ready = within("readiness", svc.ready()).await.expect("ready");
    let pending = tokio::spawn(ready.call(original));

    let (seen, reply) = within("the pass-through call", handle.next_request())
        .await
        .expect("the mock is open");
    assert_eq!(seen.method(), Method::POST);
    assert_eq!(seen.uri(), "/fhir/Patient?_pretty=true");
    assert_eq!(seen.headers(), &expected_headers);
    assert!(seen.extensions().get::<JobContext>().is_none());
    let body = seen.into_body();
    assert!(
        !body.is_buffered(),
        "pass-through keeps the caller's streaming body"
    );
    assert_eq!(
        body.collect().await.unwrap().to_bytes(),
        &b"{\"resourceType\":\"Patient\"}"[..]
    );

    reply.send_response(
        Response::builder()
            .status(StatusCode::CREATED)
            .header("location", "http://fhir.test/fhir/Patient/p1/_history/1")
            .body(Full::new(Bytes::from_static(b"created")))
            .unwrap(),
    );
    let response = within("the pass-through response", pending)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(response.status(), StatusCode::CREATED);
    assert_eq!(
        response.headers()["location"],
        "http://fhir.test/fhir/Patient/p1/_history/1"
    );
    assert!(
        response.headers().get("vary").is_none(),
        "POST gets no Vary"
    );
    assert!(response.headers().get("content-location").is_none());
    let body = response.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(body, &b"created"[..]);
    assert!(!has_pending_request(&mut handle), "exactly one call");
}

/// The layer over a `ConcurrencyLimit` of 1 over the mock, with one job kicked off that holds
/// the limit's only permit (its inner call is never answered). Returns the status URL's path.
async fn limited_with_a_running_job() -> (
    AsyncService<tower::limit::ConcurrencyLimit<Mock>>,
    Handle,
    String,
    mock::SendResponse<InnerResponse>,
) {
    let (inner, mut handle) = mock::pair::<InnerRequest, InnerResponse>();
    let layer = AsyncLayer::builder(MemoryStore::default())
        .base_url(BASE)
        .build();
    let mut svc = tower::ServiceBuilder::new()
        .layer(layer)
        .concurrency_limit(1)
        .service(inner);
    let kick_off = request(Method::POST, "/fhir/$reindex")
        .header("prefer", "respond-async")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let response = within("the kick-off", async {
        svc.ready().await.expect("ready").call(kick_off).await
    })
    .await
    .expect("the layer answers");
    assert_eq!(response.status(), StatusCode::ACCEPTED);
    let status = status_path(response.headers()["content-location"].to_str().unwrap());
    let (_job, reply) = within("the job's inner call", handle.next_request())
        .await
        .expect("the mock is open");
    (svc, handle, status, reply)
}

/// Sends `method status` with a bound of 60 s of paused time: a request that cannot be answered
/// makes the runtime idle and the bound elapses at once, so nothing depends on wall-clock speed.
async fn send_bounded(
    svc: &mut AsyncService<tower::limit::ConcurrencyLimit<Mock>>,
    method: Method,
    status: &str,
) -> Option<StatusCode> {
    let request = request(method, status)
        .body(Full::new(Bytes::new()))
        .unwrap();
    tokio::time::timeout(Duration::from_secs(60), async {
        svc.ready().await.expect("ready").call(request).await
    })
    .await
    .ok()
    .map(|response| response.expect("the layer answers").status())
}

// STATUS-3, [DESIGN] readiness: a job that holds the wrapped service's only capacity (a
// `ConcurrencyLimit` of 1 inside the layer, a natural way to bound concurrent jobs) must not block
// status polls, which never use the wrapped service: a poll answers 202 while the job runs.
#[tokio::test(start_paused = true)]
async fn status_3_status_polls_are_answered_while_a_job_holds_the_inner_capacity() {
    let (mut svc, _handle, status, _reply) = limited_with_a_running_job().await;
    assert_eq!(
        send_bounded(&mut svc, Method::GET, &status).await,
        Some(StatusCode::ACCEPTED),
        "a status poll must not wait for the running job to release the wrapped service"
    );
}

// CANCEL-1, CANCEL-2, [DESIGN] readiness: likewise a DELETE must reach the cancel route while the
// job holds the wrapped service's only capacity; otherwise the job cannot be cancelled at all
// (the cancel waits for the very job it is meant to stop).
#[tokio::test(start_paused = true)]
async fn cancel_2_cancel_is_answered_while_the_job_holds_the_inner_capacity() {
    let (mut svc, _handle, status, _reply) = limited_with_a_running_job().await;
    assert_eq!(
        send_bounded(&mut svc, Method::DELETE, &status).await,
        Some(StatusCode::ACCEPTED),
        "a cancel must not wait for the job it cancels to release the wrapped service"
    );
}
