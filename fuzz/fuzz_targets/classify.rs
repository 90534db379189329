//! Request classification and the layer's own routes never panic on any method, path, query and
//! headers: every request gets a response (pass-through, refusal, status or kick-off).

#![no_main]

use std::convert::Infallible;
use std::future::{Ready, ready};
use std::sync::OnceLock;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{HeaderName, HeaderValue, Method, Request, Response};
use http_body_util::Full;
use libfuzzer_sys::fuzz_target;
use tower_fhir_async::{AsyncLayer, AsyncService, MemoryStore, RequestBody};
use tower_layer::Layer;
use tower_service::Service;

/// Answers every request at once.
#[derive(Clone)]
struct Instant;

impl Service<Request<RequestBody<Full<Bytes>>>> for Instant {
    type Response = Response<Full<Bytes>>;
    type Error = Infallible;
    type Future = Ready<Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: Request<RequestBody<Full<Bytes>>>) -> Self::Future {
        ready(Ok(Response::new(Full::new(Bytes::from_static(b"{}")))))
    }
}

fn runtime() -> &'static tokio::runtime::Runtime {
    static RUNTIME: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RUNTIME.get_or_init(|| tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap())
}

fn service() -> AsyncService<Instant> {
    static LAYER: OnceLock<AsyncLayer> = OnceLock::new();
    let layer = LAYER.get_or_init(|| {
        AsyncLayer::builder(MemoryStore::default())
            .base_path("/fhir")
            .caller_from_header(HeaderName::from_static("x-caller"))
            .min_poll_interval(std::time::Duration::from_millis(1))
            .build()
    });
    layer.layer(Instant)
}

fuzz_target!(|data: &[u8]| {
    // Layout: method \n target \n (name: value \n)* \n body — each part may be anything.
    let mut parts = data.splitn(3, |&b| b == b'\n');
    let method = parts.next().unwrap_or_default();
    let target = parts.next().unwrap_or_default();
    let rest = parts.next().unwrap_or_default();
    let Ok(method) = Method::from_bytes(method) else { return };
    let Ok(target) = std::str::from_utf8(target) else { return };
    let Ok(uri) = format!("/fhir{target}").parse::<http::Uri>() else { return };
    let (head, body) = match rest.windows(2).position(|w| w == b"\n\n") {
        Some(at) => (&rest[..at], &rest[at + 2..]),
        None => (rest, &[][..]),
    };
    let mut request = Request::new(Full::new(Bytes::copy_from_slice(body)));
    *request.method_mut() = method;
    *request.uri_mut() = uri;
    request.headers_mut().insert(http::header::HOST, HeaderValue::from_static("fuzz.test"));
    for line in head.split(|&b| b == b'\n') {
        let Some(colon) = line.iter().position(|&b| b == b':') else { continue };
        if let (Ok(name), Ok(value)) =
            (HeaderName::from_bytes(&line[..colon]), HeaderValue::from_bytes(line[colon + 1..].trim_ascii()))
        {
            request.headers_mut().append(name, value);
        }
    }
    runtime().block_on(async {
        let mut service = service();
        let response = service.call(request).await;
        assert!(response.is_ok());
        // Let a spawned job run, so its code is fuzzed too.
        tokio::task::yield_now().await;
    });
});
