//! The settings every part of the layer reads, fixed at build time, and the request view the
//! user's predicates see. No behaviour beyond answering questions about the settings.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use http::{Extensions, HeaderMap, Method, StatusCode, Uri};

use crate::bulk::BulkConfig;
use crate::caller::CallerKey;
use crate::job::JobId;

/// The method, URI and headers of a request, as the eligibility predicate sees them.
#[derive(Debug, Clone, Copy)]
#[non_exhaustive]
pub struct RequestHead<'a> {
    /// The request method.
    pub method: &'a Method,
    /// The request URI (path and query as the wrapped service sees them).
    pub uri: &'a Uri,
    /// The request headers.
    pub headers: &'a HeaderMap,
    /// The request extensions (e.g. claims an authentication layer inserted).
    pub extensions: &'a Extensions,
}

impl<'a> RequestHead<'a> {
    pub(crate) fn of(parts: &'a http::request::Parts) -> Self {
        Self {
            method: &parts.method,
            uri: &parts.uri,
            headers: &parts.headers,
            extensions: &parts.extensions,
        }
    }
}

pub(crate) type Predicate = dyn Fn(&RequestHead<'_>) -> bool + Send + Sync;
pub(crate) type Identify = dyn Fn(&RequestHead<'_>) -> Option<String> + Send + Sync;

/// The layer's configuration, fixed at build time.
pub(crate) struct Config {
    /// The public FHIR base URL without a trailing slash, when configured.
    pub(crate) public_base: Option<String>,
    /// The scheme of status URLs derived from `Host` when no base URL is configured.
    pub(crate) scheme: String,
    /// The FHIR base's path as the wrapped service sees it ("" or "/fhir").
    pub(crate) base_path: String,
    /// The status routes' path under the base ("/_async").
    pub(crate) status_path: String,
    /// `base_path + status_path`: requests under it are the layer's own.
    pub(crate) route_prefix: String,
    /// `GET [base]/metadata`, never asynchronous by default.
    pub(crate) metadata_path: String,
    pub(crate) retention: Duration,
    pub(crate) body_limit: usize,
    pub(crate) result_limit: usize,
    pub(crate) max_retry_after: Duration,
    pub(crate) max_run_time: Option<Duration>,
    pub(crate) eligible: Option<Arc<Predicate>>,
    /// Declare asynchronous support in `GET [base]/metadata` (CAP-4).
    pub(crate) declare_async: bool,
    /// Who is calling, when jobs are bound to their callers (SEC-10).
    pub(crate) caller: Option<Arc<Identify>>,
    /// The key caller identities are digested with before anything keeps or logs them.
    pub(crate) caller_key: CallerKey,
    /// The answer to another caller's status, cancel or file request: 404 (default) or 403.
    pub(crate) foreign_status: StatusCode,
    pub(crate) body_timeout: Duration,
    pub(crate) bulk: BulkConfig,
    /// The longest a kick-off (`Prefer: wait`) or a status poll (long poll) is held.
    pub(crate) max_wait: Duration,
    pub(crate) completion: CompletionMode,
    /// How long a kick-off waits for the inner service's response head before answering `202`.
    pub(crate) kickoff_wait: Duration,
    /// What a bulk operation (`$export`) without `Prefer: respond-async` gets.
    pub(crate) bulk_without_prefer: BulkWithoutPrefer,
    /// The deadline of one store operation.
    pub(crate) store_timeout: Duration,
    /// Bases whose links the layer follows like the public base's (`follow_links_on`).
    pub(crate) trusted_bases: Vec<String>,
}

impl Config {
    /// Whether a request may go asynchronous (SEL-1): never the layer's own routes (checked
    /// before this), by default not `GET [base]/metadata`, else the user's predicate.
    pub(crate) fn is_eligible(&self, head: &RequestHead<'_>) -> bool {
        match &self.eligible {
            Some(predicate) => predicate(head),
            None => {
                !(matches!(*head.method, Method::GET | Method::HEAD)
                    && head.uri.path() == self.metadata_path)
            }
        }
    }

    /// For one of the layer's own routes, the path after the route prefix (`""` or `/…`).
    pub(crate) fn own_route<'p>(&self, path: &'p str) -> Option<&'p str> {
        path.strip_prefix(self.route_prefix.as_str())
            .filter(|rest| rest.is_empty() || rest.starts_with('/'))
    }

    /// The absolute FHIR base URL for a request: the configured one, else derived from `Host`
    /// (or the URI's authority). `None` when neither gives a usable host.
    pub(crate) fn public_base(&self, uri: &Uri, headers: &HeaderMap) -> Option<String> {
        if let Some(base) = &self.public_base {
            return Some(base.clone());
        }
        let authority = match headers.get(http::header::HOST) {
            Some(host) => host.to_str().ok()?.parse::<http::uri::Authority>().ok()?,
            None => uri.authority()?.clone(),
        };
        if authority.as_str().contains('@') {
            return None;
        }
        Some(format!("{}://{}{}", self.scheme, authority, self.base_path))
    }

    /// The keyed digest of the caller identity of a request; `None` when jobs are not bound to
    /// callers, or the request carries none. Digested here, once, so that the store, the audit
    /// trail and the quotas never see the raw identity (SEC-10, SEC-11).
    pub(crate) fn caller_of(&self, head: &RequestHead<'_>) -> Option<String> {
        let identity = self.caller.as_ref().and_then(|identify| identify(head))?;
        Some(self.caller_key.digest(&identity))
    }

    /// Whether `caller` may see or change a job owned by `owner` (SEC-10). Without caller
    /// binding, anyone holding the status URL may.
    pub(crate) fn may_access(&self, owner: Option<&str>, caller: Option<&str>) -> bool {
        self.caller.is_none() || (caller.is_some() && caller == owner)
    }

    /// The absolute status URL of a job.
    pub(crate) fn status_url(&self, base: &str, id: &JobId) -> String {
        format!("{base}{}/{id}", self.status_path)
    }
}

impl fmt::Debug for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Config")
            .field("public_base", &self.public_base)
            .field("scheme", &self.scheme)
            .field("base_path", &self.base_path)
            .field("status_path", &self.status_path)
            .field("retention", &self.retention)
            .field("body_limit", &self.body_limit)
            .field("result_limit", &self.result_limit)
            .field("max_retry_after", &self.max_retry_after)
            .field("max_run_time", &self.max_run_time)
            .field("eligible", &self.eligible.as_ref().map(|_| "custom"))
            .field("declare_async", &self.declare_async)
            .field("bulk", &self.bulk)
            .finish()
    }
}

/// How a finished interaction job is delivered to its poller.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum CompletionMode {
    /// `200` at the status URL with a `batch-response` Bundle whose entry wraps the inner
    /// response (FHIR R5's asynchronous interaction pattern).
    #[default]
    Bundle,
    /// `303 See Other` from the status URL to `{status URL}/result`, which answers exactly what
    /// the synchronous call would have (status, the kept headers, body), as often as asked
    /// until the job expires (the FHIR API Incubator's redirect design, FUT-1…7).
    Redirect,
}

/// What a bulk operation sent without `Prefer: respond-async` gets (see
/// `AsyncLayerBuilder::bulk_without_prefer`, with the `bulk` feature).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum BulkWithoutPrefer {
    /// Processed as if `Prefer: respond-async` had been sent: `202` and a status URL.
    #[default]
    RunAsync,
    /// `400` with an OperationOutcome saying to send `Prefer: respond-async`.
    Refuse,
}

/// An invalid configuration of [`AsyncLayer`](crate::AsyncLayer) (or of the `upstream`
/// forwarder); the message names the setting.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuildError(pub(crate) String);

impl fmt::Display for BuildError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for BuildError {}
