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

#[cfg(feature = "bulk")]
pub mod bulk;
pub mod gated;
#[cfg(feature = "upstream")]
pub mod gateway;
pub mod private_postgres;
pub mod private_redis;

/// The bound on waiting for something a test expects to happen; never a timing assertion.
pub const BOUND: Duration = Duration::from_secs(10);

/// Awaits `fut`, panicking with `what` if it has not happened within [`BOUND`].
pub async fn within<T>(what: &str, fut: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(BOUND, fut)
        .await
        .unwrap_or_else(|_| panic!("{what} did not happen within {BOUND:?}"))
}

/// STATUS-15, CANCEL-3, EXPIRE-3: `404` with an OperationOutcome `not-found`.
pub fn assert_not_found(reply: &Reply, what: &str) {
    assert_eq!(reply.status, StatusCode::NOT_FOUND, "{what}: {reply:?}");
    reply.assert_outcome("not-found");
}

/// The job id: the last segment of a status URL (or path).
pub fn job_id(status_url: &str) -> &str {
    status_url.rsplit('/').next().unwrap_or_default()
}

/// The job id at the end of a status URL (or path), parsed; panics when there is none.
pub fn parse_job_id(status_url: &str) -> tower_fhir_async::JobId {
    tower_fhir_async::JobId::parse(job_id(status_url))
        .unwrap_or_else(|| panic!("no job id at the end of {status_url:?}"))
}

/// A response of `status` with `body` as `application/fhir+json`, as a FHIR server answers.
pub fn fhir_json(status: StatusCode, body: &Value) -> axum::response::Response {
    axum::response::Response::builder()
        .status(status)
        .header(http::header::CONTENT_TYPE, "application/fhir+json")
        .body(axum::body::Body::from(body.to_string()))
        .expect("a response")
}

/// Serves `inner` behind `layer` as one tower service (`ServiceBuilder`, the way a whole FHIR
/// server is wrapped) on 127.0.0.1:0; the address.
pub async fn serve_behind(layer: tower_fhir_async::AsyncLayer, inner: Router) -> SocketAddr {
    let service = tower::ServiceBuilder::new().layer(layer).service(inner);
    // `axum::serve` wants `Response<axum::body::Body>`; an outer Router takes any body.
    serve(Router::new().fallback_service(service)).await
}

/// A port on 127.0.0.1 that was free a moment ago.
pub fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    listener.local_addr().expect("local addr").port()
}

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
    serve_hyper_with(service, None).await
}

/// [`serve_hyper`], with hyper's limit on header lines set to `max_headers` when given.
async fn serve_hyper_with<S, B>(service: S, max_headers: Option<usize>) -> SocketAddr
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
                let mut builder =
                    hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                if let Some(max) = max_headers {
                    builder.http1().max_headers(max);
                }
                let _ = builder
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

    /// [`send`](Self::send) with `Prefer: respond-async` added, unless `headers` has a `Prefer`.
    pub async fn send_async(
        &self,
        method: Method,
        url: &str,
        headers: &[(&str, &str)],
        body: &str,
    ) -> Reply {
        let mut all = headers.to_vec();
        if !headers
            .iter()
            .any(|(name, _)| name.eq_ignore_ascii_case("prefer"))
        {
            all.push(("prefer", "respond-async"));
        }
        self.send(method, url, &all, body).await
    }

    /// KICK-2, KICK-3: a kick-off ([`send_async`](Self::send_async)) that must be accepted:
    /// `202` with an absolute `Content-Location`; returns that status URL.
    pub async fn kick_off(
        &self,
        method: Method,
        url: &str,
        headers: &[(&str, &str)],
        body: &str,
    ) -> String {
        let reply = self.send_async(method.clone(), url, headers, body).await;
        assert_eq!(
            reply.status,
            StatusCode::ACCEPTED,
            "kick-off {method} {url}: {reply:?}"
        );
        let location = reply.header("content-location").to_owned();
        assert!(
            location.starts_with("http://") || location.starts_with("https://"),
            "Content-Location {location} is not absolute"
        );
        location
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

// Added for tests/security.rs: a kick-off body that never finishes arriving.

/// Sends `first` as the only chunk of a chunked body that then stalls: the body stays open until
/// the reply has been read; waits at most 30 s.
pub async fn send_stalling(method: Method, url: &str, headers: HeaderMap, first: Bytes) -> Reply {
    use http_body_util::combinators::BoxBody;

    let (chunks, stalled) = tokio::sync::mpsc::channel::<Bytes>(1);
    chunks.send(first).await.expect("the body is open");
    let frames = futures_util::stream::unfold(stalled, |mut stalled| async move {
        let chunk = stalled.recv().await?;
        Some((Ok::<_, Infallible>(http_body::Frame::data(chunk)), stalled))
    });
    let client: Client<HttpConnector, BoxBody<Bytes, Infallible>> =
        Client::builder(TokioExecutor::new()).build_http();
    let mut request = Request::builder()
        .method(method)
        .uri(url)
        .body(http_body_util::StreamBody::new(frames).boxed())
        .expect("request");
    *request.headers_mut() = headers;
    let reply = read_whole_reply(client.request(request)).await;
    // Only now may the body end.
    drop(chunks);
    reply
}

// Added for tests/hostile_input.rs: a server that takes more header lines than hyper's default
// 100, and sends that report failures instead of panicking, so a table can list every failed row.

/// Serves `app` on 127.0.0.1:0 like [`serve`], but accepts up to `max_headers` header lines per
/// request (hyper's default of 100 answers `431` itself, before any layer sees the request).
pub async fn serve_with_max_headers(app: Router, max_headers: usize) -> SocketAddr {
    serve_hyper_with(app, Some(max_headers)).await
}

/// [`send_header_map`], but a request that gets no response within 30 s is an `Err` naming
/// what went wrong.
pub async fn try_send_header_map(
    method: Method,
    url: &str,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Reply, String> {
    let client: Client<HttpConnector, Full<Bytes>> =
        Client::builder(TokioExecutor::new()).build_http();
    let mut request = Request::builder()
        .method(method)
        .uri(url)
        .body(Full::new(body))
        .map_err(|e| format!("request not built: {e}"))?;
    *request.headers_mut() = headers;
    let response = tokio::time::timeout(Duration::from_secs(30), client.request(request))
        .await
        .map_err(|_| "no response within 30 s".to_owned())?
        .map_err(|e| format!("request failed: {e:?}"))?;
    let (parts, body) = response.into_parts();
    let body = tokio::time::timeout(Duration::from_secs(30), body.collect())
        .await
        .map_err(|_| "response body not read within 30 s".to_owned())?
        .map_err(|e| format!("response body failed: {e}"))?
        .to_bytes();
    Ok(Reply {
        status: parts.status,
        headers: parts.headers,
        body,
    })
}

/// Writes `request` byte for byte on a new connection to `addr` and reads one response (interim
/// `1xx` answers are skipped). The connection stays open meanwhile, so a request body that stops
/// half-way is, for the server, a body that never ends. The response must carry
/// `Content-Length` or end with the connection. Waits at most 30 s.
pub async fn send_raw(addr: SocketAddr, request: &[u8]) -> Result<Reply, String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|e| format!("connect: {e}"))?;
        stream
            .write_all(request)
            .await
            .map_err(|e| format!("write: {e}"))?;
        let mut received = Vec::new();
        let mut chunk = [0u8; 8192];
        loop {
            if let Some(reply) = parse_raw_reply(&mut received)? {
                // `stream` is dropped only now: until the reply, the request stays unfinished.
                return Ok(reply);
            }
            let read = stream
                .read(&mut chunk)
                .await
                .map_err(|e| format!("read: {e}"))?;
            if read == 0 {
                return match parse_raw_reply_at_eof(&received)? {
                    Some(reply) => Ok(reply),
                    None => Err(format!(
                        "connection closed after {} bytes of response: {:?}",
                        received.len(),
                        String::from_utf8_lossy(&received)
                    )),
                };
            }
            received.extend_from_slice(&chunk[..read]);
        }
    };
    tokio::time::timeout(Duration::from_secs(30), exchange)
        .await
        .map_err(|_| "no response within 30 s".to_owned())?
}

/// The status and headers of one raw response head, and where its body starts.
fn parse_raw_head(received: &[u8]) -> Result<Option<(StatusCode, HeaderMap, usize)>, String> {
    let Some(end) = received.windows(4).position(|w| w == b"\r\n\r\n") else {
        return Ok(None);
    };
    let head = std::str::from_utf8(&received[..end]).map_err(|e| format!("response head: {e}"))?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status = status_line
        .split(' ')
        .nth(1)
        .and_then(|code| StatusCode::from_bytes(code.as_bytes()).ok())
        .ok_or_else(|| format!("bad status line {status_line:?}"))?;
    let mut headers = HeaderMap::new();
    for line in lines {
        let (name, value) = line
            .split_once(':')
            .ok_or_else(|| format!("bad header line {line:?}"))?;
        let name = http::HeaderName::from_bytes(name.trim().as_bytes())
            .map_err(|e| format!("header name {name:?}: {e}"))?;
        let value = http::HeaderValue::from_str(value.trim())
            .map_err(|e| format!("header value {value:?}: {e}"))?;
        headers.append(name, value);
    }
    Ok(Some((status, headers, end + 4)))
}

/// One complete response from the front of `received` (interim `1xx` ones are dropped from it),
/// or `None` while more bytes are needed.
fn parse_raw_reply(received: &mut Vec<u8>) -> Result<Option<Reply>, String> {
    loop {
        let Some((status, headers, body_start)) = parse_raw_head(received)? else {
            return Ok(None);
        };
        if status.is_informational() {
            received.drain(..body_start);
            continue;
        }
        if headers.contains_key(http::header::TRANSFER_ENCODING) {
            return Err(format!("send_raw reads no chunked responses: {headers:?}"));
        }
        let Some(length) = headers.get(http::header::CONTENT_LENGTH) else {
            // Delimited by the end of the connection.
            return Ok(None);
        };
        let length: usize = length
            .to_str()
            .ok()
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| format!("bad Content-Length {length:?}"))?;
        if received.len() < body_start + length {
            return Ok(None);
        }
        let body = Bytes::copy_from_slice(&received[body_start..body_start + length]);
        return Ok(Some(Reply {
            status,
            headers,
            body,
        }));
    }
}

/// The response in `received` once the server closed the connection: its body is the rest.
fn parse_raw_reply_at_eof(received: &[u8]) -> Result<Option<Reply>, String> {
    let mut received = received.to_vec();
    if let Some(reply) = parse_raw_reply(&mut received)? {
        return Ok(Some(reply));
    }
    Ok(
        parse_raw_head(&received)?.and_then(|(status, headers, body_start)| {
            (!headers.contains_key(http::header::CONTENT_LENGTH)).then(|| Reply {
                status,
                headers,
                body: Bytes::copy_from_slice(&received[body_start..]),
            })
        }),
    )
}

/// Collects everything a tracing subscriber writes (`tracing_subscriber::fmt().with_writer(..)`).
#[derive(Clone, Default)]
pub struct Captured(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl Captured {
    /// Everything written so far.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

impl std::io::Write for Captured {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Captured {
    type Writer = Captured;

    fn make_writer(&'a self) -> Self::Writer {
        self.clone()
    }
}
