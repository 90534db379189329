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
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::header::{
    ACCEPT_ENCODING, CONNECTION, CONTENT_LENGTH, CONTENT_LOCATION, CONTENT_TYPE, FORWARDED, HOST,
    LINK, LOCATION, PROXY_AUTHENTICATE, PROXY_AUTHORIZATION, TE, TRAILER, TRANSFER_ENCODING,
    UPGRADE,
};
use http::uri::{Authority, PathAndQuery, Scheme};
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

/// How the forwarder connects: plain TCP, and TLS for `https` upstreams with `upstream-tls`.
#[cfg(feature = "upstream-tls")]
type Connector = tls::Connector;
#[cfg(not(feature = "upstream-tls"))]
type Connector = HttpConnector;

/// Forwards every request to a FHIR server over HTTP; see the [module](self) documentation.
///
/// Cheap to clone: clones share the connection pool.
#[derive(Clone)]
pub struct Upstream {
    shared: Arc<Shared>,
}

struct Shared {
    client: Client<Connector, UnsyncBoxBody<Bytes, BoxError>>,
    /// The upstream's base path, without a trailing `/` (`/fhir/R4`, or empty).
    path: String,
    /// The whole upstream base (`origin` + `path`).
    base: Arc<str>,
    /// The upstream's scheme and authority, for each forwarded request's URI.
    scheme: Scheme,
    authority: Authority,
    /// Finds the upstream's authority in a body: a body without it has nothing to map.
    mentions: memchr::memmem::Finder<'static>,
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
        Ok(Upstream {
            shared: Arc::new(Shared {
                client,
                mentions,
                scheme,
                authority,
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
        // The caller's host, as a header value (a cheap clone, no copy of the text).
        let host_value = match parts.headers.get(HOST) {
            Some(host) => host.to_str().is_ok().then(|| host.clone()),
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
                public.scheme.as_str(),
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
        headers.remove(HOST);
        forwarded(
            headers,
            parts.extensions.get::<SocketAddr>(),
            host_value.as_ref(),
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

    /// The upstream's answer, its URLs on the public base.
    async fn answer(
        &self,
        response: Response<Incoming>,
        public: Arc<str>,
    ) -> Response<UpstreamBody> {
        let (mut parts, body) = response.into_parts();
        // The version spoken with the upstream is not the client's: the server answers in its own.
        parts.version = http::Version::default();
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
            .is_some_and(media::is_json_or_ndjson);
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
                let mut rewriter = Rewriter::new(Arc::clone(&self.base), Arc::clone(&public));
                // A small body is mapped whole, so the client still gets a Content-Length (no
                // chunked framing); a large one streams, its memory bounded.
                if let Some(declared) = declared.filter(|length| *length <= WHOLE_BODY) {
                    let limited = http_body_util::Limited::new(decoded, WHOLE_BODY.max(declared));
                    return match limited.collect().await {
                        Ok(collected) => {
                            let plain = collected.to_bytes();
                            // Most answers name no URL on the upstream: passed on as they are.
                            let out = if self.mentions.find(&plain).is_none() {
                                plain
                            } else {
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

/// Adds `Forwarded` (RFC 7239) and the `X-Forwarded-*` headers proxies commonly set.
fn forwarded(
    headers: &mut HeaderMap,
    peer: Option<&SocketAddr>,
    host: Option<&HeaderValue>,
    proto: &str,
) {
    use std::fmt::Write as _;

    let mut element = String::with_capacity(64);
    if let Some(peer) = peer {
        let ip = peer.ip();
        // The address is written once; both headers take it from there.
        let mut prior = match headers.get(&X_FORWARDED_FOR).and_then(|v| v.to_str().ok()) {
            Some(prior) => format!("{prior}, "),
            None => String::with_capacity(40),
        };
        let start = prior.len();
        let _ = write!(prior, "{ip}");
        let text = &prior[start..];
        if ip.is_ipv6() {
            let _ = write!(element, "for=\"[{text}]\";");
        } else {
            element.push_str("for=");
            element.push_str(text);
            element.push(';');
        }
        if let Ok(value) = HeaderValue::try_from(prior) {
            headers.insert(X_FORWARDED_FOR, value);
        }
    }
    if let Some((value, text)) = host.and_then(|h| Some((h, h.to_str().ok()?))) {
        let _ = write!(element, "host=\"{text}\";");
        headers.insert(X_FORWARDED_HOST, value.clone());
    }
    element.push_str("proto=");
    element.push_str(proto);
    headers.insert(
        X_FORWARDED_PROTO,
        HeaderValue::from_static(if proto == "https" { "https" } else { "http" }),
    );
    if let Ok(value) = HeaderValue::from_str(&element) {
        headers.append(FORWARDED, value);
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

#[cfg(test)]
mod tests {
    use super::*;

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
