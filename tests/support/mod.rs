//! Shared by the integration tests: a real server on 127.0.0.1:0 and a small HTTP client.

#![allow(dead_code, unreachable_pub)]

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::Duration;

use axum::Router;
use bytes::Bytes;
use http::{HeaderMap, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde_json::Value;
use tokio::net::TcpListener;

/// Serves `app` (an axum Router, already layered) on 127.0.0.1:0 until the test ends.
pub async fn serve(app: Router) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind 127.0.0.1:0");
    let addr = listener.local_addr().expect("local addr");
    tokio::spawn(async move {
        axum::serve(listener, app).await.expect("server");
    });
    addr
}

/// Serves any tower service of `http::Request<hyper::body::Incoming>` with hyper 1 + hyper-util.
pub async fn serve_hyper<S, B>(service: S) -> SocketAddr
where
    S: tower::Service<
            Request<hyper::body::Incoming>,
            Response = http::Response<B>,
            Error = Infallible,
        > + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind 127.0.0.1:0");
    let addr = listener.local_addr().expect("local addr");
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let service = hyper_util::service::TowerToHyperService::new(service.clone());
            tokio::spawn(async move {
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    addr
}

/// A response, fully read.
#[derive(Debug)]
pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Reply {
    /// The body as JSON; panics with the body text when it is not.
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "body is not JSON ({e}): {}",
                String::from_utf8_lossy(&self.body)
            )
        })
    }

    /// A header as text; panics when absent.
    pub fn header(&self, name: &str) -> &str {
        self.headers
            .get(name)
            .unwrap_or_else(|| panic!("no {name} header in {:?}", self.headers))
            .to_str()
            .expect("header is text")
    }

    /// Asserts the body is an OperationOutcome whose first issue has `code`.
    pub fn assert_outcome(&self, code: &str) {
        assert_eq!(
            self.header("content-type"),
            "application/fhir+json",
            "{self:?}"
        );
        let body = self.json();
        assert_eq!(body["resourceType"], "OperationOutcome", "{body}");
        assert_eq!(body["issue"][0]["code"], code, "{body}");
        assert!(
            body["issue"][0]["diagnostics"]
                .as_str()
                .is_some_and(|d| !d.is_empty()),
            "{body}"
        );
    }
}

/// A plain HTTP/1.1 client.
#[derive(Clone)]
pub struct TestClient {
    client: Client<HttpConnector, Full<Bytes>>,
}

impl Default for TestClient {
    fn default() -> Self {
        Self {
            client: Client::builder(TokioExecutor::new()).build_http(),
        }
    }
}

impl TestClient {
    /// Sends a request with the given headers and body; waits at most 30 s.
    pub async fn send(
        &self,
        method: Method,
        url: &str,
        headers: &[(&str, &str)],
        body: &str,
    ) -> Reply {
        let mut request = Request::builder().method(method).uri(url);
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let request = request
            .body(Full::new(Bytes::from(body.to_owned())))
            .expect("request");
        let response = tokio::time::timeout(Duration::from_secs(30), self.client.request(request))
            .await
            .expect("response within 30 s")
            .expect("request sent");
        let (parts, body) = response.into_parts();
        let body = body.collect().await.expect("body read").to_bytes();
        Reply {
            status: parts.status,
            headers: parts.headers,
            body,
        }
    }

    pub async fn get(&self, url: &str) -> Reply {
        self.send(Method::GET, url, &[], "").await
    }

    pub async fn delete(&self, url: &str) -> Reply {
        self.send(Method::DELETE, url, &[], "").await
    }

    /// Polls `url` until it stops answering 202; at most `limit` polls, 20 ms apart.
    pub async fn poll_until_done(&self, url: &str, limit: usize) -> Reply {
        for _ in 0..limit {
            let reply = self.get(url).await;
            if reply.status != StatusCode::ACCEPTED {
                return reply;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("job at {url} still running after {limit} polls");
    }
}

// Added for tests/routes_and_prefer.rs: requests `TestClient::send` cannot express.

/// Sends a request with exactly `headers` (repeated lines, raw non-UTF-8 values) and a body with
/// `Content-Length`; waits at most 30 s.
pub async fn send_header_map(method: Method, url: &str, headers: HeaderMap, body: Bytes) -> Reply {
    let client: Client<HttpConnector, Full<Bytes>> =
        Client::builder(TokioExecutor::new()).build_http();
    let mut request = Request::builder()
        .method(method)
        .uri(url)
        .body(Full::new(body))
        .expect("request");
    *request.headers_mut() = headers;
    read_whole_reply(client.request(request)).await
}

/// Sends `chunks` as a streaming body: chunked transfer coding, no `Content-Length`; waits at
/// most 30 s.
pub async fn send_chunked(
    method: Method,
    url: &str,
    headers: HeaderMap,
    chunks: Vec<Bytes>,
) -> Reply {
    type Frames =
        futures_util::stream::Iter<std::vec::IntoIter<Result<http_body::Frame<Bytes>, Infallible>>>;
    let client: Client<HttpConnector, http_body_util::StreamBody<Frames>> =
        Client::builder(TokioExecutor::new()).build_http();
    let frames: Vec<_> = chunks
        .into_iter()
        .map(|chunk| Ok(http_body::Frame::data(chunk)))
        .collect();
    let body = http_body_util::StreamBody::new(futures_util::stream::iter(frames));
    let mut request = Request::builder()
        .method(method)
        .uri(url)
        .body(body)
        .expect("request");
    *request.headers_mut() = headers;
    read_whole_reply(client.request(request)).await
}

async fn read_whole_reply<F, E>(response: F) -> Reply
where
    F: std::future::Future<Output = Result<http::Response<hyper::body::Incoming>, E>>,
    E: std::fmt::Debug,
{
    let response = tokio::time::timeout(Duration::from_secs(30), response)
        .await
        .expect("response within 30 s")
        .expect("request sent");
    let (parts, body) = response.into_parts();
    let body = body.collect().await.expect("body read").to_bytes();
    Reply {
        status: parts.status,
        headers: parts.headers,
        body,
    }
}
