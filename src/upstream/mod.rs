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
//! cannot be reached, its TLS handshake fails, or it breaks off, `504` when its response head
//! does not come within [`response_timeout`](UpstreamBuilder::response_timeout).
//!
//! # `https` upstreams
//!
//! With the feature `upstream-tls`, the upstream may be an `https` URL: TLS by
//! [rustls](https://docs.rs/rustls) (with the `ring` provider, or the process-wide one the
//! application installed), HTTP/2 negotiated by ALPN when the upstream offers it, HTTP/1.1
//! otherwise. The upstream's certificate must chain to a certificate authority of the platform's
//! trust store (read when the forwarder is built; `SSL_CERT_FILE` and `SSL_CERT_DIR` override
//! where it is read from) or to one given with `root_certificate_pem`. When that store is empty
//! or cannot be read and no certificate authority is given, `build` fails saying so.
//! `tls_config` takes a whole rustls configuration instead (client certificates for mutual TLS).
//! Without the feature, `build` refuses `https` upstreams, naming the feature.

mod rewrite;
#[cfg(feature = "upstream-tls")]
mod tls;

/// The rustls crate `https` upstreams are built on (feature `upstream-tls`), so that a
/// [`ClientConfig`](rustls::ClientConfig) for `tls_config` is of the matching version.
#[cfg(feature = "upstream-tls")]
pub use rustls;

use std::convert::Infallible;
use std::fmt;
use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::header::Entry;
use http::header::{
    ACCEPT_ENCODING, CONNECTION, CONTENT_ENCODING, CONTENT_LENGTH, CONTENT_LOCATION, CONTENT_TYPE,
    FORWARDED, HOST, LINK, LOCATION, PROXY_AUTHENTICATE, PROXY_AUTHORIZATION, TE, TRAILER,
    TRANSFER_ENCODING, UPGRADE,
};
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{HeaderMap, HeaderName, HeaderValue, Request, Response, StatusCode, Uri};
use http_body::{Body, Frame, SizeHint};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Either, Empty};
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

/// How the forwarder connects: plain TCP, and TLS for `https` upstreams with `upstream-tls`.
#[cfg(feature = "upstream-tls")]
type Connector = tls::Connector;
#[cfg(not(feature = "upstream-tls"))]
type Connector = HttpConnector;

/// A forwarded request's body: none (most requests: GET, DELETE), without an allocation, or the
/// caller's, streamed.
type Outgoing = Either<Empty<Bytes>, UnsyncBoxBody<Bytes, BoxError>>;

/// Forwards every request to a FHIR server over HTTP; see the [module](self) documentation.
///
/// Cheap to clone: clones share the connection pool.
#[derive(Clone)]
pub struct Upstream {
    shared: Arc<Shared>,
}

struct Shared {
    client: Client<Connector, Outgoing>,
    /// The upstream's base path, without a trailing `/` (`/fhir/R4`, or empty).
    path: String,
    /// The whole upstream base (`origin` + `path`).
    base: Arc<str>,
    /// The upstream's scheme and authority, for each forwarded request's URI.
    scheme: Scheme,
    authority: Authority,
    /// The upstream's authority as the `Host` of forwarded requests.
    host: HeaderValue,
    /// Finds the upstream's authority in a body: a body without it has nothing to map.
    mentions: memchr::memmem::Finder<'static>,
    /// The public base, when fixed; otherwise `http(s)://{Host}{path}` of each request.
    public: Option<PublicBase>,
    response_timeout: Duration,
    headers: Vec<(HeaderName, HeaderValue)>,
}

struct PublicBase {
    base: Arc<str>,
    scheme: &'static str,
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
    /// A forwarder to the FHIR server at `base` (`http://hapi.internal:8080/fhir`; an `https`
    /// URL with the feature `upstream-tls`).
    pub fn builder(base: impl Into<String>) -> UpstreamBuilder {
        UpstreamBuilder {
            base: base.into(),
            public_base: None,
            connect_timeout: Duration::from_secs(5),
            response_timeout: Duration::from_secs(60),
            headers: Vec::new(),
            pool_idle_timeout: Duration::from_secs(90),
            http2: false,
            #[cfg(feature = "upstream-tls")]
            tls: tls::TlsSettings::default(),
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
    #[cfg(feature = "upstream-tls")]
    tls: tls::TlsSettings,
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

    /// How long connecting to the upstream may take (the TCP connection; a TLS handshake counts
    /// against [`response_timeout`](Self::response_timeout)). Default 5 s.
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

    /// Speaks only HTTP/2 to the upstream, every request multiplexed on few connections: over
    /// `http` with prior knowledge (the upstream must accept HTTP/2 without an upgrade), over
    /// `https` offering only `h2` by ALPN. Default: HTTP/1.1 over `http`; over `https`, HTTP/2
    /// when the upstream picks `h2` by ALPN, else HTTP/1.1.
    pub fn http2(mut self, on: bool) -> Self {
        self.http2 = on;
        self
    }

    /// Trusts the certificate authorities in the PEM text `pem` (one or more
    /// `-----BEGIN CERTIFICATE-----` blocks) for an `https` upstream, besides those of the
    /// platform's trust store: a private CA, or the upstream's self-signed certificate's.
    /// Repeatable. A text that holds no certificate, or one that cannot be read, is an error of
    /// [`build`](Self::build). Feature `upstream-tls`.
    ///
    /// ```no_run
    /// # fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// use tower_fhir_async::upstream::Upstream;
    ///
    /// let upstream = Upstream::builder("https://hapi.internal:8443/fhir")
    ///     .root_certificate_pem(std::fs::read("/etc/fhir/internal-ca.pem")?)
    ///     .build()?;
    /// # drop(upstream);
    /// # Ok(())
    /// # }
    /// ```
    #[cfg(feature = "upstream-tls")]
    pub fn root_certificate_pem(mut self, pem: impl AsRef<[u8]>) -> Self {
        self.tls.add_root_pem(pem.as_ref());
        self
    }

    /// The whole TLS configuration for an `https` upstream (its trusted roots, a client
    /// certificate for mutual TLS, protocol versions), used as it is but for ALPN, which the
    /// forwarder sets (see [`http2`](Self::http2)). The platform's trust store is not read then,
    /// and [`root_certificate_pem`](Self::root_certificate_pem) cannot be combined with it: put
    /// those roots into the configuration's root store. Build it with the re-exported
    /// [`rustls`]. Feature `upstream-tls`.
    #[cfg(feature = "upstream-tls")]
    pub fn tls_config(mut self, config: rustls::ClientConfig) -> Self {
        self.tls.set_config(config);
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
    /// When the upstream base is not an absolute `http` URL without a query (or `https`, with
    /// the feature `upstream-tls`), the public base not an absolute `http(s)` URL without a
    /// query, or a timeout is zero. With `upstream-tls`: when a `root_certificate_pem` holds no
    /// readable certificate, it is combined with `tls_config`, or an `https` upstream has no
    /// certificate authority to be trusted by (the platform's trust store is empty or unreadable
    /// and none was given).
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
        let https = scheme == &Scheme::HTTPS;
        #[cfg(not(feature = "upstream-tls"))]
        if https {
            return Err(BuildError(format!(
                "upstream {:?} is https: https upstreams need the cargo feature `upstream-tls` of \
                 tower-fhir-async",
                self.base
            )));
        }
        if scheme != &Scheme::HTTP && !https {
            return Err(BuildError(format!(
                "upstream must be an http or https URL, not {:?}",
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
                    Some("http") => "http",
                    Some("https") => "https",
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
        #[cfg(feature = "upstream-tls")]
        let connector = self
            .tls
            .connector(connector, &self.base, https, self.http2)?;
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(self.pool_idle_timeout)
            .http2_only(self.http2)
            .build(connector);
        let mentions =
            memchr::memmem::Finder::new(rewrite::authority(&origin).as_bytes()).into_owned();
        let (scheme, authority) = (scheme.clone(), authority.clone());
        // As hyper would write it: no user information, no default port.
        let default_port = if https { 443 } else { 80 };
        let host = match authority.port_u16().filter(|port| *port != default_port) {
            Some(port) => format!("{}:{port}", authority.host()),
            None => authority.host().to_owned(),
        };
        let host = HeaderValue::from_str(&host).map_err(|_| {
            BuildError(format!(
                "the upstream's host {host:?} is not a valid header"
            ))
        })?;
        Ok(Upstream {
            shared: Arc::new(Shared {
                client,
                mentions,
                scheme,
                authority,
                host,
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

/// `Keep-Alive`, a hop-by-hop header `http` has no constant for.
const KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
/// `Proxy-Connection`, an old hop-by-hop header.
const PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");
const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");

/// The headers that belong to one connection, never forwarded (RFC 9110 §7.6.1), besides those
/// a `Connection` header names.
const HOP_BY_HOP: [HeaderName; 9] = [
    CONNECTION,
    KEEP_ALIVE,
    PROXY_CONNECTION,
    PROXY_AUTHENTICATE,
    PROXY_AUTHORIZATION,
    TE,
    TRAILER,
    TRANSFER_ENCODING,
    UPGRADE,
];

/// Removes the hop-by-hop headers of `headers`, those its `Connection` names first.
///
/// Most messages carry none: one pass over the (few) names finds that, without hashing each
/// hop-by-hop name for a lookup.
fn remove_hop_by_hop(headers: &mut HeaderMap) {
    if !headers.keys().any(|name| HOP_BY_HOP.contains(name)) {
        return;
    }
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
        // The upstream's host in place of the caller's (one lookup; hyper then leaves it), and
        // the caller's kept for the `Forwarded` headers and the public base.
        let host_value = match parts.headers.insert(HOST, self.host.clone()) {
            Some(host) => host.to_str().is_ok().then_some(host),
            None => parts
                .uri
                .authority()
                .and_then(|a| HeaderValue::from_str(a.as_str()).ok()),
        };
        let host = host_value.as_ref().and_then(|v| v.to_str().ok());
        let (public_base, public_path, proto) = match &self.public {
            Some(public) => (
                Arc::clone(&public.base),
                public.path.as_str(),
                public.scheme,
            ),
            None => match host {
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
        let path_and_query = if public_path == self.path {
            // The same path on both sides (the common case): the request's own, not copied.
            parts.uri.path_and_query().cloned()
        } else {
            let query = parts.uri.query();
            let mut target = String::with_capacity(
                self.path.len() + rest.len() + query.map_or(0, |q| q.len() + 1),
            );
            target.push_str(&self.path);
            target.push_str(rest);
            if let Some(query) = query {
                target.push('?');
                target.push_str(query);
            }
            http::uri::PathAndQuery::try_from(target).ok()
        };
        let mut target = http::uri::Parts::default();
        target.scheme = Some(self.scheme.clone());
        target.authority = Some(self.authority.clone());
        target.path_and_query = path_and_query.or_else(|| Some(PathAndQuery::from_static("/")));
        let Ok(uri) = Uri::from_parts(target) else {
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
        // Room for the headers added below at once, not one growth of the map after another.
        headers.reserve(4 + self.headers.len());
        forwarded(
            headers,
            parts.extensions.get::<SocketAddr>(),
            host_value.as_ref(),
            proto,
        );
        // Bodies are mapped, so they should come uncompressed (compress outside the layer): a
        // client's codings are replaced by identity. Without the header a server sends
        // identity in practice, and whatever it sends is decoded before mapping.
        if let Some(codings) = headers.get_mut(ACCEPT_ENCODING) {
            *codings = HeaderValue::from_static("identity");
        }
        for (name, value) in &self.headers {
            headers.insert(name.clone(), value.clone());
        }
        let body = if body.is_end_stream() {
            Either::Left(Empty::new())
        } else {
            Either::Right(body.map_err(Into::into).boxed_unsync())
        };
        let request = Request::from_parts(parts, body);
        let answer = tokio::time::timeout(self.response_timeout, self.client.request(request));
        match answer.await {
            Ok(Ok(response)) => self.answer(response, public_base).await,
            Ok(Err(error)) => {
                let handshake = error.is_connect().then(|| handshake_failure(&error));
                let why = if let Some(tls) = handshake.flatten() {
                    format!(
                        "The TLS handshake with the FHIR server at {} failed: {tls}",
                        self.base
                    )
                } else if error.is_connect() {
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

    /// `Location`, `Content-Location` and `Link` on the public base.
    fn map_url_headers(&self, headers: &mut HeaderMap, public: &str) {
        for name in [LOCATION, CONTENT_LOCATION] {
            let mapped = headers
                .get(&name)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| {
                    rewrite::map_url(v, &self.base, public)
                        .or_else(|| rewrite::map_path(v, &self.path, public))
                })
                .and_then(|v| HeaderValue::from_str(&v).ok());
            if let Some(mapped) = mapped {
                headers.insert(name, mapped);
            }
        }
        let links: Vec<HeaderValue> = headers
            .get_all(LINK)
            .iter()
            .map(|value| {
                value
                    .to_str()
                    .ok()
                    .and_then(|v| rewrite::map_link(v, &self.base, public))
                    .and_then(|v| HeaderValue::from_str(&v).ok())
                    .unwrap_or_else(|| value.clone())
            })
            .collect();
        if !links.is_empty() {
            headers.remove(LINK);
            for link in links {
                headers.append(LINK, link);
            }
        }
    }

    /// The upstream's answer, its URLs on the public base.
    async fn answer(
        &self,
        response: Response<Incoming>,
        public: Arc<str>,
    ) -> Response<UpstreamBody> {
        let (mut parts, body) = response.into_parts();
        // The version spoken with the upstream is not the client's: the server answers in its own.
        parts.version = http::Version::default();
        let seen = Seen::of(&parts.headers);
        if seen.hop_by_hop {
            remove_hop_by_hop(&mut parts.headers);
        }
        if seen.urls {
            self.map_url_headers(&mut parts.headers, &public);
        }
        if !seen.json {
            return Response::from_parts(parts, UpstreamBody::plain(body));
        }
        let decoded = if seen.encoded {
            encoding::decoded(&mut parts.headers, body)
        } else {
            Ok(Decoding::Plain { body })
        };
        match decoded {
            Ok(decoded) => {
                // A small body is mapped whole, so the client still gets a Content-Length (no
                // chunked framing); a large one streams, its memory bounded.
                if let Some(declared) = seen.length.filter(|length| {
                    // An encoded answer's length is not the decoded one's.
                    matches!(decoded, Decoding::Plain { .. }) && *length <= WHOLE_BODY
                }) {
                    return match read_small(decoded, WHOLE_BODY.max(declared)).await {
                        Ok(plain) => {
                            // Most answers name no URL on the upstream: passed on as they are.
                            let out = if self.mentions.find(&plain).is_none() {
                                plain
                            } else {
                                let mut rewriter =
                                    Rewriter::new(Arc::clone(&self.base), Arc::clone(&public));
                                let mut out = Vec::with_capacity(plain.len() + 64);
                                rewriter.push(&plain, &mut out);
                                rewriter.finish(&mut out);
                                Bytes::from(out)
                            };
                            if out.len() != declared {
                                parts
                                    .headers
                                    .insert(CONTENT_LENGTH, HeaderValue::from(out.len()));
                            }
                            Response::from_parts(parts, UpstreamBody::full(out))
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
                let rewriter = Rewriter::new(Arc::clone(&self.base), Arc::clone(&public));
                // Mapped as it streams: its length is not known beforehand.
                parts.headers.remove(CONTENT_LENGTH);
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

/// What an answer's headers hold, found in one pass over them (most answers have a few
/// headers; a lookup per name would hash each name the forwarder asks about).
#[derive(Default)]
struct Seen {
    /// `Content-Type` is FHIR JSON or NDJSON: the body is mapped.
    json: bool,
    /// `Content-Length`, when readable.
    length: Option<usize>,
    /// `Location`, `Content-Location` or `Link`: headers to map.
    urls: bool,
    /// `Content-Encoding`: decoded before mapping.
    encoded: bool,
    /// A hop-by-hop header.
    hop_by_hop: bool,
}

impl Seen {
    fn of(headers: &HeaderMap) -> Self {
        let mut seen = Self::default();
        for (name, value) in headers {
            if name == CONTENT_TYPE {
                seen.json = value.to_str().is_ok_and(media::is_json_or_ndjson);
            } else if name == CONTENT_LENGTH {
                seen.length = value.to_str().ok().and_then(|v| v.parse().ok());
            } else if name == LOCATION || name == CONTENT_LOCATION || name == LINK {
                seen.urls = true;
            } else if name == CONTENT_ENCODING {
                seen.encoded = true;
            } else if HOP_BY_HOP.contains(name) {
                seen.hop_by_hop = true;
            }
        }
        seen
    }
}

/// The whole of a small answer's `body`, at most `limit` bytes.
///
/// Not `Limited` and `collect`: the common case, one frame holding all of it (the body then
/// ends, by its length), is taken as it is, without a copy or a buffer list.
async fn read_small<B>(body: B, limit: usize) -> Result<Bytes, BoxError>
where
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    let mut body = std::pin::pin!(body);
    let mut first: Option<Bytes> = None;
    let mut joined: Vec<u8> = Vec::new();
    let mut length = 0;
    while !body.is_end_stream() {
        let Some(frame) = body.frame().await else {
            break;
        };
        // Trailers, if any, carry no part of the resource.
        let Ok(data) = frame.map_err(Into::into)?.into_data() else {
            continue;
        };
        length += data.len();
        if length > limit {
            return Err(format!("the answer is longer than {limit} bytes").into());
        }
        match first.take() {
            None if joined.is_empty() => first = Some(data),
            earlier => {
                if let Some(earlier) = earlier {
                    joined.reserve(limit.min(64 * 1024));
                    joined.extend_from_slice(&earlier);
                }
                joined.extend_from_slice(&data);
            }
        }
    }
    Ok(if joined.is_empty() {
        first.unwrap_or_default()
    } else {
        Bytes::from(joined)
    })
}

/// Adds `Forwarded` (RFC 7239) and the `X-Forwarded-*` headers proxies commonly set.
///
/// On every forwarded request, so written for speed: the client's address is written once,
/// without `fmt`, into one buffer that both values share (one allocation), and `X-Forwarded-For`
/// is looked up and set with one hash of its name.
fn forwarded(
    headers: &mut HeaderMap,
    peer: Option<&SocketAddr>,
    host: Option<&HeaderValue>,
    proto: &'static str,
) {
    let host = host.filter(|h| h.to_str().is_ok());
    let mut buffer = BytesMut::with_capacity(96 + host.map_or(0, |h| h.len()));
    // `Forwarded`: `for=…;host="…";proto=…` (an IPv6 address quoted, in brackets).
    if let Some(peer) = peer {
        buffer.extend_from_slice(b"for=");
        match peer.ip() {
            IpAddr::V4(ip) => write_ipv4(&mut buffer, ip),
            IpAddr::V6(ip) => {
                buffer.extend_from_slice(b"\"[");
                buffer.extend_from_slice(ip.to_string().as_bytes());
                buffer.extend_from_slice(b"]\"");
            }
        }
        buffer.extend_from_slice(b";");
    }
    if let Some(host) = host {
        buffer.extend_from_slice(b"host=\"");
        buffer.extend_from_slice(host.as_bytes());
        buffer.extend_from_slice(b"\";");
    }
    buffer.extend_from_slice(b"proto=");
    buffer.extend_from_slice(proto.as_bytes());
    let element = buffer.split().freeze();
    if let Some(peer) = peer {
        // `X-Forwarded-For`: the address as written above, after any earlier proxies'.
        let address = match peer.ip() {
            IpAddr::V4(_) => {
                let end = element.iter().position(|&b| b == b';').unwrap_or(4);
                element.slice(4..end)
            }
            IpAddr::V6(ip) => Bytes::from(ip.to_string()),
        };
        match headers.entry(X_FORWARDED_FOR) {
            Entry::Vacant(slot) => {
                if let Ok(value) = HeaderValue::from_maybe_shared(address) {
                    slot.insert(value);
                }
            }
            Entry::Occupied(mut slot) => {
                let mut chain = BytesMut::from(slot.get().as_bytes());
                chain.extend_from_slice(b", ");
                chain.extend_from_slice(&address);
                if let Ok(value) = HeaderValue::from_maybe_shared(chain.freeze()) {
                    slot.insert(value);
                }
            }
        }
    }
    if let Some(host) = host {
        headers.insert(X_FORWARDED_HOST, host.clone());
    }
    headers.insert(
        X_FORWARDED_PROTO,
        HeaderValue::from_static(if proto == "https" { "https" } else { "http" }),
    );
    if let Ok(value) = HeaderValue::from_maybe_shared(element) {
        headers.append(FORWARDED, value);
    }
}

/// Writes `ip` in dotted decimal.
fn write_ipv4(buffer: &mut BytesMut, ip: Ipv4Addr) {
    for (i, octet) in ip.octets().into_iter().enumerate() {
        if i > 0 {
            buffer.extend_from_slice(b".");
        }
        if octet >= 100 {
            buffer.extend_from_slice(&[b'0' + octet / 100]);
        }
        if octet >= 10 {
            buffer.extend_from_slice(&[b'0' + octet / 10 % 10]);
        }
        buffer.extend_from_slice(&[b'0' + octet % 10]);
    }
}

/// What failed the TLS handshake of a connection that failed, when that was it.
#[cfg(feature = "upstream-tls")]
fn handshake_failure(error: &hyper_util::client::legacy::Error) -> Option<String> {
    tls::handshake_failure(error)
}

/// Without TLS no handshake fails.
#[cfg(not(feature = "upstream-tls"))]
fn handshake_failure(_: &hyper_util::client::legacy::Error) -> Option<String> {
    None
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
        // Boxed: rare (large or unsized FHIR JSON answers) and large; every answer is moved
        // several times on its way out, so the common kinds stay small.
        Mapped { mapped: Pin<Box<Mapped>> },
        Full { body: Option<Bytes> },
    }
}

pin_project! {
    /// A FHIR JSON or NDJSON answer mapped as it streams.
    struct Mapped {
        #[pin]
        body: Decoding<Incoming>,
        rewriter: Rewriter,
        ended: bool,
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
                mapped: Box::pin(Mapped {
                    body,
                    rewriter,
                    ended: false,
                }),
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

/// The next frame of a mapped answer: its URLs on the public base.
fn poll_mapped(
    mut body: Pin<&mut Decoding<Incoming>>,
    rewriter: &mut Rewriter,
    ended: &mut bool,
    cx: &mut Context<'_>,
) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
    loop {
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
            KindProjection::Mapped { mapped } => {
                let this = mapped.as_mut().project();
                poll_mapped(this.body, this.rewriter, this.ended, cx)
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Plain { body } => body.is_end_stream(),
            Kind::Full { body } => body.is_none(),
            Kind::Mapped { mapped } => mapped.ended,
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

#[cfg(test)]
mod tests {
    use super::*;

    // GATEWAY-1: `Forwarded` and `X-Forwarded-*` name the client's address (IPv4 written by
    // hand, every octet width; IPv6 quoted in brackets), the host and the scheme, and a client
    // behind earlier proxies keeps their `X-Forwarded-For` entries.
    #[test]
    fn gateway_1_forwarded_headers_name_the_client() {
        let host = HeaderValue::from_static("fhir.example.org:8080");
        for (peer, for_element, xff) in [
            ("127.0.0.1:4000", "for=127.0.0.1", "127.0.0.1"),
            ("0.0.0.0:1", "for=0.0.0.0", "0.0.0.0"),
            ("255.10.100.9:1", "for=255.10.100.9", "255.10.100.9"),
            ("[2001:db8::1]:443", "for=\"[2001:db8::1]\"", "2001:db8::1"),
        ] {
            let peer: SocketAddr = peer.parse().unwrap();
            let mut headers = HeaderMap::new();
            forwarded(&mut headers, Some(&peer), Some(&host), "https");
            assert_eq!(
                headers[FORWARDED],
                format!("{for_element};host=\"fhir.example.org:8080\";proto=https").as_str()
            );
            assert_eq!(headers[X_FORWARDED_FOR], xff);
            assert_eq!(headers[X_FORWARDED_HOST], "fhir.example.org:8080");
            assert_eq!(headers[X_FORWARDED_PROTO], "https");
        }
        let mut headers = HeaderMap::new();
        headers.insert(X_FORWARDED_FOR, HeaderValue::from_static("203.0.113.7"));
        let peer: SocketAddr = "10.1.2.3:5".parse().unwrap();
        forwarded(&mut headers, Some(&peer), None, "http");
        assert_eq!(headers[X_FORWARDED_FOR], "203.0.113.7, 10.1.2.3");
        assert_eq!(headers[FORWARDED], "for=10.1.2.3;proto=http");
        assert!(!headers.contains_key(X_FORWARDED_HOST));
        let mut headers = HeaderMap::new();
        forwarded(&mut headers, None, None, "http");
        assert_eq!(headers[FORWARDED], "proto=http");
        assert!(!headers.contains_key(X_FORWARDED_FOR));
    }

    // GATEWAY-1: without TLS built in, an https upstream is refused, naming the feature that
    // adds it.
    #[cfg(not(feature = "upstream-tls"))]
    #[test]
    fn https_upstreams_need_the_tls_feature() {
        let error = Upstream::builder("https://hapi.internal/fhir")
            .build()
            .expect_err("https without TLS")
            .to_string();
        assert!(error.contains("`upstream-tls`"), "{error}");
    }

    #[cfg(feature = "upstream-tls")]
    fn ca_pem() -> String {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.self_signed(&key).unwrap().pem()
    }

    // GATEWAY-1: with TLS built in, https upstreams are accepted (http ones still are); other
    // schemes are not.
    #[cfg(feature = "upstream-tls")]
    #[test]
    fn https_upstreams_are_accepted_with_the_tls_feature() {
        let upstream = Upstream::builder("https://hapi.internal:8443/fhir/")
            .root_certificate_pem(ca_pem())
            .build()
            .expect("an https upstream");
        assert_eq!(upstream.base(), "https://hapi.internal:8443/fhir");
        Upstream::builder("http://hapi.internal/fhir")
            .build()
            .expect("an http upstream");
        let error = Upstream::builder("ftp://hapi.internal/fhir")
            .build()
            .expect_err("ftp")
            .to_string();
        assert!(error.contains("http or https"), "{error}");
    }

    // GATEWAY-1: a malformed PEM is refused by build(), not a panic and not a failure later.
    #[cfg(feature = "upstream-tls")]
    #[test]
    fn a_malformed_pem_is_a_build_error() {
        let broken = ca_pem().replacen("MII", "M!I", 1);
        let error = Upstream::builder("https://hapi.internal/fhir")
            .root_certificate_pem(broken)
            .build()
            .expect_err("a malformed PEM")
            .to_string();
        assert!(error.contains("root_certificate_pem"), "{error}");
    }
}
