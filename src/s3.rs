//! Bulk data files in Amazon S3 or an S3-compatible object store (feature `s3`).
//!
//! A folder binds exports to one machine's disk; with the files in S3 every instance behind a
//! load balancer writes and serves the same files. [`file_store`] builds the store from an
//! `s3://BUCKET/PREFIX` URL and the usual `AWS_*` environment variables (`AWS_ACCESS_KEY_ID`,
//! `AWS_SECRET_ACCESS_KEY`, `AWS_DEFAULT_REGION`, `AWS_ENDPOINT` for an S3-compatible server,
//! `AWS_ALLOW_HTTP=true` for one without TLS); [`file_store_with`] takes a builder you
//! configured yourself.
//!
//! The store talks HTTP through [`HyperConnector`]: hyper and rustls (the `ring` provider,
//! trusting the platform's certificate authorities), the stack the gateway uses, rather than
//! `object_store`'s own `reqwest` client and its C-built cryptography. Files are written in
//! multipart uploads of [`AsyncLayerBuilder::file_part_size`](crate::AsyncLayerBuilder::file_part_size)
//! (5 MiB at least, as S3 requires of every part but the last).
//!
//! ```no_run
//! use tower_fhir_async::{AsyncLayer, MemoryStore};
//!
//! # fn main() -> Result<(), tower_fhir_async::BuildError> {
//! // AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_DEFAULT_REGION from the environment.
//! let files = tower_fhir_async::s3::file_store("s3://exports-bucket/fhir")?;
//! let layer = AsyncLayer::builder(MemoryStore::default())
//!     .file_store(files)
//!     .build();
//! # drop(layer);
//! # Ok(())
//! # }
//! ```

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::BodyExt;
use hyper_rustls::{HttpsConnector, HttpsConnectorBuilder};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector as TcpConnector;
use hyper_util::rt::TokioExecutor;
use object_store::aws::AmazonS3Builder;
use object_store::client::{
    HttpClient, HttpConnector, HttpError, HttpErrorKind, HttpRequest, HttpRequestBody,
    HttpResponse, HttpResponseBody, HttpService,
};
use object_store::prefix::PrefixStore;
use object_store::{ClientConfigKey, ClientOptions, ObjectStore};
use rustls::{ClientConfig, RootCertStore};

use crate::config::BuildError;

/// How long a connection to the object store may take to open, unless the builder's
/// `ClientOptions` say otherwise (`object_store`'s own default).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// The bulk data file store for `url`, `s3://BUCKET` or `s3://BUCKET/PREFIX`, configured from
/// the `AWS_*` environment variables ([`AmazonS3Builder::from_env`]). Files go under `PREFIX`
/// (the job's folder below it).
pub fn file_store(url: &str) -> Result<Arc<dyn ObjectStore>, BuildError> {
    let (bucket, prefix) = parse(url)?;
    file_store_with(AmazonS3Builder::from_env().with_bucket_name(bucket), prefix)
}

/// The bulk data file store from a builder you configured (bucket, region, endpoint,
/// credentials …), under `prefix` (`""`: the bucket's root). The builder's HTTP client is
/// replaced by [`HyperConnector`].
pub fn file_store_with(
    builder: AmazonS3Builder,
    prefix: &str,
) -> Result<Arc<dyn ObjectStore>, BuildError> {
    let store = builder
        .with_http_connector(HyperConnector)
        .build()
        .map_err(|error| BuildError(format!("the S3 file store cannot be made: {error}")))?;
    let prefix = prefix.trim_matches('/');
    Ok(if prefix.is_empty() {
        Arc::new(store)
    } else {
        Arc::new(PrefixStore::new(store, prefix))
    })
}

/// `s3://BUCKET/PREFIX` → (`BUCKET`, `PREFIX`).
fn parse(url: &str) -> Result<(&str, &str), BuildError> {
    let rest = url.strip_prefix("s3://").ok_or_else(|| {
        BuildError(format!(
            "{url:?} is not an S3 URL; write s3://BUCKET or s3://BUCKET/PREFIX"
        ))
    })?;
    let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
    if bucket.is_empty() {
        return Err(BuildError(format!(
            "{url:?} names no bucket; write s3://BUCKET or s3://BUCKET/PREFIX"
        )));
    }
    Ok((bucket, prefix))
}

/// An [`HttpConnector`] for `object_store` made of hyper, hyper-util's pooled client and
/// rustls: `https` with the platform's certificate authorities, `http` when the store allows it
/// (`AWS_ALLOW_HTTP`). Connection errors, broken requests and timeouts are reported as
/// retryable, as `object_store` expects. Of the builder's `ClientOptions` it applies `timeout`
/// (until the answer's head; 30 s by default) and `connect_timeout` (5 s by default); proxies
/// and the other HTTP settings are not supported.
#[derive(Debug, Default, Clone, Copy)]
pub struct HyperConnector;

impl HttpConnector for HyperConnector {
    fn connect(&self, options: &ClientOptions) -> object_store::Result<HttpClient> {
        let timeout = setting(options, ClientConfigKey::Timeout)?;
        let connect_timeout =
            setting(options, ClientConfigKey::ConnectTimeout)?.unwrap_or(CONNECT_TIMEOUT);
        let mut roots = RootCertStore::empty();
        let native = rustls_native_certs::load_native_certs();
        let (added, _) = roots.add_parsable_certificates(native.certs);
        if added == 0 {
            // An `http` endpoint needs none; an `https` one fails its handshake, saying so.
            tracing::debug!(
                "no certificate authority found in the platform's store for the S3 file store"
            );
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|error| object_store::Error::Generic {
                store: "S3",
                source: Box::new(error),
            })?
            .with_root_certificates(roots)
            .with_no_client_auth();
        let mut tcp = TcpConnector::new();
        tcp.enforce_http(false);
        tcp.set_connect_timeout(Some(connect_timeout));
        tcp.set_nodelay(true);
        let connector = HttpsConnectorBuilder::new()
            .with_tls_config(config)
            .https_or_http()
            .enable_http1()
            .wrap_connector(tcp);
        let client = Client::builder(TokioExecutor::new()).build(connector);
        Ok(HttpClient::new(Hyper { client, timeout }))
    }
}

/// A duration of `options`, as `object_store` writes it (`30s`, `5 seconds` …).
fn setting(
    options: &ClientOptions,
    key: ClientConfigKey,
) -> object_store::Result<Option<Duration>> {
    let Some(text) = options.get_config_value(&key) else {
        return Ok(None);
    };
    humantime::parse_duration(&text)
        .map(Some)
        .map_err(|error| object_store::Error::Generic {
            store: "S3",
            source: format!("{key:?} {text:?} is not a duration: {error}").into(),
        })
}

#[derive(Debug)]
struct Hyper {
    client: Client<HttpsConnector<TcpConnector>, HttpRequestBody>,
    /// Until the answer's head.
    timeout: Option<Duration>,
}

type Call<'a> = Pin<Box<dyn Future<Output = Result<HttpResponse, HttpError>> + Send + 'a>>;

impl HttpService for Hyper {
    // The trait is declared with `async_trait`; this is its signature written out.
    fn call<'s, 'a>(&'s self, request: HttpRequest) -> Call<'a>
    where
        's: 'a,
        Self: 'a,
    {
        Box::pin(async move {
            let answer = self.client.request(request);
            let answer = match self.timeout {
                Some(timeout) => tokio::time::timeout(timeout, answer)
                    .await
                    .map_err(|elapsed| HttpError::new(HttpErrorKind::Timeout, elapsed))?,
                None => answer.await,
            };
            let response = answer.map_err(|error| {
                let kind = if error.is_connect() {
                    HttpErrorKind::Connect
                } else {
                    HttpErrorKind::Request
                };
                HttpError::new(kind, error)
            })?;
            Ok(response.map(|body| {
                HttpResponseBody::new(
                    body.map_err(|error| HttpError::new(HttpErrorKind::Interrupted, error)),
                )
            }))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        assert_eq!(parse("s3://bucket").unwrap(), ("bucket", ""));
        assert_eq!(parse("s3://bucket/").unwrap(), ("bucket", ""));
        assert_eq!(parse("s3://bucket/a/b").unwrap(), ("bucket", "a/b"));
        for bad in ["bucket", "s3://", "s3:///prefix", "https://bucket/x"] {
            let error = parse(bad).unwrap_err().to_string();
            assert!(error.contains("s3://BUCKET"), "{bad}: {error}");
        }
    }
}
