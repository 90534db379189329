//! [`Upstream`]: a FHIR server that is not a tower service (HAPI, Firely, Medplum, a cloud FHIR
//! service), behind the layer over HTTP (feature `upstream`).
//!
//! `Upstream` is a [`tower::Service`](tower_service::Service) that sends every request to an
//! upstream base URL over hyper-util's pooled client, streaming bodies both ways. It maps URLs
//! both ways: a request under the public base path goes to the same path under the upstream's,
//! and the upstream's base in `Location`, `Content-Location`, `Link` and in FHIR JSON and NDJSON
//! bodies (`fullUrl`, `link.url`, `response.location`, references) becomes the public base, so
//! clients never see an address they cannot reach. Wrap it in [`AsyncLayer`](crate::AsyncLayer)
//! and the upstream gets the asynchronous patterns:
//!
//! ```no_run
//! use tower::ServiceBuilder;
//! use tower_fhir_async::upstream::Upstream;
//! use tower_fhir_async::{AsyncLayer, MemoryStore};
//!
//! # fn main() -> Result<(), tower_fhir_async::BuildError> {
//! let upstream = Upstream::builder("http://hapi.internal:8080/fhir")
//!     .public_base("https://fhir.example.org/fhir")
//!     .build()?;
//! let gateway = ServiceBuilder::new()
//!     .layer(
//!         AsyncLayer::builder(MemoryStore::new())
//!             .base_url("https://fhir.example.org/fhir")
//!             .build(),
//!     )
//!     .service(upstream);
//! # drop(gateway);
//! # Ok(())
//! # }
//! ```
//!
//! Failures of the upstream are answers, never errors: `502` with an OperationOutcome when it
//! cannot be reached or breaks off, `504` when its response head does not come within
//! [`response_timeout`](UpstreamBuilder::response_timeout).

mod rewrite;

use std::convert::Infallible;
use std::fmt;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::header::{
    ACCEPT_ENCODING, CONNECTION, CONTENT_LENGTH, CONTENT_LOCATION, CONTENT_TYPE, HOST, LINK,
    LOCATION,
};
use http::uri::Scheme;
use http::{HeaderMap, HeaderName, HeaderValue, Request, Response, StatusCode, Uri};
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use http_body_util::combinators::UnsyncBoxBody;
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use pin_project_lite::pin_project;
use tower_service::Service;

use crate::BoxError;
use crate::config::BuildError;
use crate::encoding::{self, Decoding};
use crate::media;
use crate::outcome::{self, IssueCode};
use rewrite::Rewriter;

/// Forwards every request to a FHIR server over HTTP; see the [module](self) documentation.
///
/// Cheap to clone: clones share the connection pool.
#[derive(Clone)]
pub struct Upstream {
    shared: Arc<Shared>,
}

struct Shared {
    client: Client<HttpConnector, UnsyncBoxBody<Bytes, BoxError>>,
    /// The upstream's base path, without a trailing `/` (`/fhir/R4`, or empty).
    path: String,
    /// The whole upstream base (`origin` + `path`).
    base: Arc<str>,
    /// The public base, when fixed; otherwise `http(s)://{Host}{path}` of each request.
    public: Option<PublicBase>,
    response_timeout: Duration,
    headers: Vec<(HeaderName, HeaderValue)>,
}

struct PublicBase {
    base: Arc<str>,
    scheme: String,
    path: String,
}

impl fmt::Debug for Upstream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Upstream")
            .field("base", &self.shared.base)
            .field("public_base", &self.shared.public.as_ref().map(|p| &p.base))
            .finish_non_exhaustive()
    }
}

impl Upstream {
    /// A forwarder to the FHIR server at `base` (`http://hapi.internal:8080/fhir`).
    pub fn builder(base: impl Into<String>) -> UpstreamBuilder {
        UpstreamBuilder {
            base: base.into(),
            public_base: None,
            connect_timeout: Duration::from_secs(5),
            response_timeout: Duration::from_secs(60),
            headers: Vec::new(),
            pool_idle_timeout: Duration::from_secs(90),
            http2: false,
        }
    }

    /// The upstream's base URL, without a trailing `/`.
    pub fn base(&self) -> &str {
        &self.shared.base
    }
}

/// Settings of an [`Upstream`].
#[derive(Debug, Clone)]
#[must_use]
pub struct UpstreamBuilder {
    base: String,
    public_base: Option<String>,
    connect_timeout: Duration,
    response_timeout: Duration,
    headers: Vec<(HeaderName, HeaderValue)>,
    pool_idle_timeout: Duration,
    http2: bool,
}

impl UpstreamBuilder {
    /// The base URL clients use (`https://fhir.example.org/fhir`): requests under its path go
    /// to the same path under the upstream's, and the upstream's base in answers becomes this
    /// one. Set the same on the [`AsyncLayer`](crate::AsyncLayer) (`base_url`).
    ///
    /// Default: none; each request's `Host` (over `http`) with the upstream's base path.
    pub fn public_base(mut self, url: impl Into<String>) -> Self {
        self.public_base = Some(url.into());
        self
    }

    /// How long connecting to the upstream may take. Default 5 s.
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// How long the upstream may take to send its response head; then the answer is `504`.
    /// The body may take longer (an export's pages are streamed). Default 60 s.
    pub fn response_timeout(mut self, timeout: Duration) -> Self {
        self.response_timeout = timeout;
        self
    }

    /// Sends `name: value` with every request, in place of the caller's (a fixed credential for
    /// an upstream behind client credentials, say). Without it the caller's `Authorization` is
    /// forwarded as it came.
    pub fn header(mut self, name: HeaderName, value: HeaderValue) -> Self {
        self.headers.push((name, value));
        self
    }

    /// Speaks HTTP/2 to the upstream (cleartext, with prior knowledge: the upstream must accept
    /// HTTP/2 without an upgrade), every request multiplexed on few connections. Default:
    /// HTTP/1.1.
    pub fn http2(mut self, on: bool) -> Self {
        self.http2 = on;
        self
    }

    /// How long an idle pooled connection is kept. Default 90 s.
    pub fn pool_idle_timeout(mut self, timeout: Duration) -> Self {
        self.pool_idle_timeout = timeout;
        self
    }

    /// Checks the settings and builds the forwarder.
    ///
    /// # Errors
    ///
    /// When the upstream base or the public base is not an absolute `http` URL without a
    /// query (`https` upstreams need TLS, which this build does not have), or a timeout is
    /// zero.
    pub fn build(self) -> Result<Upstream, BuildError> {
        let uri: Uri = self
            .base
            .parse()
            .map_err(|_| BuildError(format!("upstream must be a URL, not {:?}", self.base)))?;
        let (Some(scheme), Some(authority)) = (uri.scheme(), uri.authority()) else {
            return Err(BuildError(format!(
                "upstream must be an absolute URL, not {:?}",
                self.base
            )));
        };
        if scheme != &Scheme::HTTP {
            return Err(BuildError(format!(
                "upstream must be an http URL (https upstreams need TLS, not built in): {:?}",
                self.base
            )));
        }
        if uri.query().is_some() {
            return Err(BuildError(format!(
                "upstream must not have a query: {:?}",
                self.base
            )));
        }
        let path = uri.path().trim_end_matches('/').to_owned();
        let origin = format!("{scheme}://{authority}");
        let public = match self.public_base {
            None => None,
            Some(public) => {
                let parsed: Uri = public.parse().map_err(|_| {
                    BuildError(format!("public_base must be a URL, not {public:?}"))
                })?;
                let scheme = match parsed.scheme_str() {
                    Some(s @ ("http" | "https")) => s.to_owned(),
                    _ => {
                        return Err(BuildError(format!(
                            "public_base must be an absolute http(s) URL, not {public:?}"
                        )));
                    }
                };
                if parsed.authority().is_none() || parsed.query().is_some() {
                    return Err(BuildError(format!(
                        "public_base must be an absolute http(s) URL without a query, not {public:?}"
                    )));
                }
                Some(PublicBase {
                    base: public.trim_end_matches('/').into(),
                    scheme,
                    path: parsed.path().trim_end_matches('/').to_owned(),
                })
            }
        };
        for (name, timeout) in [
            ("connect_timeout", self.connect_timeout),
            ("response_timeout", self.response_timeout),
        ] {
            if timeout.is_zero() {
                return Err(BuildError(format!("{name} must be longer than zero")));
            }
        }
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(self.connect_timeout));
        connector.set_nodelay(true);
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(self.pool_idle_timeout)
            .http2_only(self.http2)
            .build(connector);
        Ok(Upstream {
            shared: Arc::new(Shared {
                client,
                base: format!("{origin}{path}").into(),
                path,
                public,
                response_timeout: self.response_timeout,
                headers: self.headers,
            }),
        })
    }
}

impl<B> Service<Request<B>> for Upstream
where
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    type Response = Response<UpstreamBody>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response<UpstreamBody>, Infallible>> + Send>>;

    /// Always ready: the pool opens connections as requests need them.
    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        let shared = self.shared.clone();
        Box::pin(async move { Ok(shared.forward(request).await) })
    }
}

/// Mapped answers up to this size (by their `Content-Length`) are mapped whole and keep a
/// `Content-Length`; larger ones, and those without a length, are mapped as they stream.
const WHOLE_BODY: usize = 64 * 1024;

/// The headers that belong to one connection, never forwarded (RFC 9110 §7.6.1), besides those
/// a `Connection` header names.
const HOP_BY_HOP: [&str; 9] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// Removes the hop-by-hop headers of `headers`, those its `Connection` names first.
fn remove_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    for name in named {
        headers.remove(name);
    }
    for name in HOP_BY_HOP {
        headers.remove(name);
    }
}

impl Shared {
    async fn forward<B>(&self, request: Request<B>) -> Response<UpstreamBody>
    where
        B: Body<Data = Bytes> + Send + 'static,
        B::Error: Into<BoxError>,
    {
        let (mut parts, body) = request.into_parts();
        let host = parts
            .headers
            .get(HOST)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
            .or_else(|| parts.uri.authority().map(|a| a.as_str().to_owned()));
        let (public_base, public_path, proto) = match &self.public {
            Some(public) => (
                Arc::clone(&public.base),
                public.path.as_str(),
                public.scheme.as_str(),
            ),
            None => match &host {
                Some(host) => (
                    Arc::from(format!("http://{host}{}", self.path)),
                    self.path.as_str(),
                    "http",
                ),
                None => {
                    return synthesized(
                        StatusCode::BAD_REQUEST,
                        IssueCode::Invalid,
                        "The request names no host (no Host header).",
                    );
                }
            },
        };
        // The path below the public base, under the upstream's.
        let path = parts.uri.path();
        let Some(rest) = path
            .strip_prefix(public_path)
            .filter(|rest| rest.is_empty() || rest.starts_with('/'))
        else {
            return synthesized(
                StatusCode::NOT_FOUND,
                IssueCode::NotFound,
                &format!("{path} is not under this FHIR server's base path {public_path:?}."),
            );
        };
        let query = parts.uri.query();
        let mut target =
            String::with_capacity(self.base.len() + rest.len() + query.map_or(0, |q| q.len() + 1));
        target.push_str(&self.base);
        target.push_str(rest);
        if let Some(query) = query {
            target.push('?');
            target.push_str(query);
        }
        let Ok(uri) = target.parse::<Uri>() else {
            return synthesized(
                StatusCode::BAD_REQUEST,
                IssueCode::Invalid,
                "The request's path cannot be forwarded.",
            );
        };
        parts.uri = uri;
        // The client picks the version it speaks to the upstream.
        parts.version = http::Version::HTTP_11;
        let headers = &mut parts.headers;
        remove_hop_by_hop(headers);
        headers.remove(HOST);
        forwarded(
            headers,
            parts.extensions.get::<SocketAddr>(),
            host.as_deref(),
            proto,
        );
        // Bodies are mapped, so they must come uncompressed; compress outside the layer.
        headers.insert(ACCEPT_ENCODING, HeaderValue::from_static("identity"));
        for (name, value) in &self.headers {
            headers.insert(name.clone(), value.clone());
        }
        let request = Request::from_parts(parts, body.map_err(Into::into).boxed_unsync());
        let answer = tokio::time::timeout(self.response_timeout, self.client.request(request));
        match answer.await {
            Ok(Ok(response)) => self.answer(response, public_base).await,
            Ok(Err(error)) => {
                let why = if error.is_connect() {
                    format!(
                        "The FHIR server at {} could not be reached: {}",
                        self.base,
                        source_chain(&error)
                    )
                } else {
                    format!(
                        "The FHIR server at {} broke off: {}",
                        self.base,
                        source_chain(&error)
                    )
                };
                tracing::warn!(upstream = %self.base, %why, "forwarding failed");
                synthesized(StatusCode::BAD_GATEWAY, IssueCode::Exception, &why)
            }
            Err(_) => synthesized(
                StatusCode::GATEWAY_TIMEOUT,
                IssueCode::Timeout,
                &format!(
                    "The FHIR server at {} did not answer within {}.",
                    self.base,
                    humantime::format_duration(self.response_timeout)
                ),
            ),
        }
    }

    /// The upstream's answer, its URLs on the public base.
    async fn answer(
        &self,
        response: Response<Incoming>,
        public: Arc<str>,
    ) -> Response<UpstreamBody> {
        let (mut parts, body) = response.into_parts();
        remove_hop_by_hop(&mut parts.headers);
        for name in [LOCATION, CONTENT_LOCATION] {
            let mapped = parts
                .headers
                .get(&name)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| {
                    rewrite::map_url(v, &self.base, &public)
                        .or_else(|| rewrite::map_path(v, &self.path, &public))
                })
                .and_then(|v| HeaderValue::from_str(&v).ok());
            if let Some(mapped) = mapped {
                parts.headers.insert(name, mapped);
            }
        }
        let links: Vec<HeaderValue> = parts
            .headers
            .get_all(LINK)
            .iter()
            .map(|value| {
                value
                    .to_str()
                    .ok()
                    .and_then(|v| rewrite::map_link(v, &self.base, &public))
                    .and_then(|v| HeaderValue::from_str(&v).ok())
                    .unwrap_or_else(|| value.clone())
            })
            .collect();
        if !links.is_empty() {
            parts.headers.remove(LINK);
            for link in links {
                parts.headers.append(LINK, link);
            }
        }
        let mapped = parts
            .headers
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(media::essence)
            .is_some_and(|essence| media::is_json(&essence) || media::is_ndjson(&essence));
        if !mapped {
            return Response::from_parts(parts, UpstreamBody::plain(body));
        }
        match encoding::decoded(&mut parts.headers, body) {
            Ok(decoded) => {
                let declared = parts
                    .headers
                    .get(CONTENT_LENGTH)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse::<usize>().ok());
                parts.headers.remove(CONTENT_LENGTH);
                let mut rewriter = Rewriter::new(Arc::clone(&self.base), Arc::clone(&public));
                // A small body is mapped whole, so the client still gets a Content-Length (no
                // chunked framing); a large one streams, its memory bounded.
                if let Some(declared) = declared.filter(|length| *length <= WHOLE_BODY) {
                    let limited = http_body_util::Limited::new(decoded, WHOLE_BODY.max(declared));
                    return match limited.collect().await {
                        Ok(collected) => {
                            let plain = collected.to_bytes();
                            let mut out = Vec::with_capacity(plain.len() + 64);
                            rewriter.push(&plain, &mut out);
                            rewriter.finish(&mut out);
                            parts
                                .headers
                                .insert(CONTENT_LENGTH, HeaderValue::from(out.len()));
                            Response::from_parts(parts, UpstreamBody::full(Bytes::from(out)))
                        }
                        Err(error) => synthesized(
                            StatusCode::BAD_GATEWAY,
                            IssueCode::Exception,
                            &format!(
                                "Reading the answer of the FHIR server at {} failed: {error}",
                                self.base
                            ),
                        ),
                    };
                }
                Response::from_parts(parts, UpstreamBody::mapped(decoded, rewriter))
            }
            Err(why) => synthesized(
                StatusCode::BAD_GATEWAY,
                IssueCode::NotSupported,
                &format!(
                    "The FHIR server at {} answered in a form this gateway cannot read: {why}.",
                    self.base
                ),
            ),
        }
    }
}

/// Adds `Forwarded` (RFC 7239) and the `X-Forwarded-*` headers proxies commonly set.
fn forwarded(headers: &mut HeaderMap, peer: Option<&SocketAddr>, host: Option<&str>, proto: &str) {
    use std::fmt::Write as _;

    let mut element = String::with_capacity(64);
    if let Some(peer) = peer {
        let ip = peer.ip();
        let _ = if ip.is_ipv6() {
            write!(element, "for=\"[{ip}]\";")
        } else {
            write!(element, "for={ip};")
        };
        let prior = headers
            .get("x-forwarded-for")
            .and_then(|v| v.to_str().ok())
            .map(|v| format!("{v}, {ip}"))
            .unwrap_or_else(|| ip.to_string());
        if let Ok(value) = HeaderValue::from_str(&prior) {
            headers.insert("x-forwarded-for", value);
        }
    }
    if let Some(host) = host {
        let _ = write!(element, "host=\"{host}\";");
        if let Ok(value) = HeaderValue::from_str(host) {
            headers.insert("x-forwarded-host", value);
        }
    }
    element.push_str("proto=");
    element.push_str(proto);
    headers.insert(
        "x-forwarded-proto",
        HeaderValue::from_static(if proto == "https" { "https" } else { "http" }),
    );
    if let Ok(value) = HeaderValue::from_str(&element) {
        headers.append("forwarded", value);
    }
}

/// An error with its causes, for a diagnostics text.
fn source_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

fn synthesized(status: StatusCode, code: IssueCode, diagnostics: &str) -> Response<UpstreamBody> {
    outcome::error_response(status, code, diagnostics).map(UpstreamBody::full)
}

pin_project! {
    /// The body of an [`Upstream`] answer: the upstream's, streamed (its URLs mapped when it is
    /// FHIR JSON or NDJSON), or one the forwarder wrote (an error).
    pub struct UpstreamBody {
        #[pin]
        kind: Kind,
    }
}

pin_project! {
    #[project = KindProjection]
    enum Kind {
        Plain { #[pin] body: Incoming },
        Mapped {
            #[pin]
            body: Decoding<Incoming>,
            rewriter: Rewriter,
            ended: bool,
        },
        Full { body: Option<Bytes> },
    }
}

impl UpstreamBody {
    fn plain(body: Incoming) -> Self {
        Self {
            kind: Kind::Plain { body },
        }
    }

    fn mapped(body: Decoding<Incoming>, rewriter: Rewriter) -> Self {
        Self {
            kind: Kind::Mapped {
                body,
                rewriter,
                ended: false,
            },
        }
    }

    fn full(body: Bytes) -> Self {
        Self {
            kind: Kind::Full {
                body: (!body.is_empty()).then_some(body),
            },
        }
    }
}

impl fmt::Debug for UpstreamBody {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UpstreamBody").finish_non_exhaustive()
    }
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.project().kind.project() {
            KindProjection::Plain { body } => body
                .poll_frame(cx)
                .map(|frame| frame.map(|frame| frame.map_err(BoxError::from))),
            KindProjection::Full { body } => Poll::Ready(body.take().map(|b| Ok(Frame::data(b)))),
            KindProjection::Mapped {
                mut body,
                rewriter,
                ended,
            } => loop {
                if *ended {
                    return Poll::Ready(None);
                }
                match std::task::ready!(body.as_mut().poll_frame(cx)) {
                    Some(Ok(frame)) => match frame.into_data() {
                        Ok(data) => {
                            let mut out = Vec::new();
                            rewriter.push(&data, &mut out);
                            if !out.is_empty() {
                                return Poll::Ready(Some(Ok(Frame::data(Bytes::from(out)))));
                            }
                        }
                        Err(frame) => return Poll::Ready(Some(Ok(frame))),
                    },
                    Some(Err(error)) => return Poll::Ready(Some(Err(error))),
                    None => {
                        *ended = true;
                        let mut out = Vec::new();
                        rewriter.finish(&mut out);
                        if !out.is_empty() {
                            return Poll::Ready(Some(Ok(Frame::data(Bytes::from(out)))));
                        }
                    }
                }
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Plain { body } => body.is_end_stream(),
            Kind::Full { body } => body.is_none(),
            Kind::Mapped { ended, .. } => *ended,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Plain { body } => body.size_hint(),
            Kind::Full { body } => {
                SizeHint::with_exact(body.as_ref().map_or(0, |b| b.len() as u64))
            }
            Kind::Mapped { .. } => SizeHint::default(),
        }
    }
}
