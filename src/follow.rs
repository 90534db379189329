//! Following a wrapped service that answers a job's request asynchronously itself (GATEWAY-5):
//! an upstream FHIR server with its own async support answers `202 Accepted` with a
//! `Content-Location`. The job then polls that status URL through the wrapped service (at the
//! pace of its `Retry-After`, capped), shows its `X-Progress` as the job's own, sends it a
//! `DELETE` when the job is cancelled, and adopts its final answer.

use std::time::Duration;

use bytes::Bytes;
use http::header::{CONTENT_LENGTH, CONTENT_LOCATION, CONTENT_TYPE, HOST, LOCATION, RETRY_AFTER};
use http::{
    Extensions, HeaderMap, HeaderName, HeaderValue, Method, Request, Response, StatusCode, Uri,
};
use serde::Deserialize;

use crate::BoxError;
use crate::body::RequestBody;
use crate::context::{JobShared, X_PROGRESS};
use crate::inner::{self, Inner};
use crate::job::{JobRecord, JobState, StoredResponse};
use crate::media;
use crate::origins::Origins;

/// The longest wait between two polls, whatever `Retry-After` says.
const MAX_INTERVAL: Duration = Duration::from_secs(10);

/// The wait between two polls when the upstream names none.
const DEFAULT_INTERVAL: Duration = Duration::from_secs(1);

/// The shortest wait between two polls.
const MIN_INTERVAL: Duration = Duration::from_millis(100);

/// Where a completed bulk job whose manifest is the upstream's own (a linked export, see
/// `UpstreamFiles::Link`) keeps the upstream's status URL, as the wrapped service is asked for
/// it: among the headers of its stored completion, which bulk status polls never serve. A
/// `DELETE` of the job deletes the upstream's job too.
pub(crate) const UPSTREAM_JOB: HeaderName = HeaderName::from_static("x-fhir-async-upstream-job");

/// An upstream's asynchronous job, as the layer follows it.
pub(crate) struct Native {
    /// Its status URL, as the wrapped service is asked for it.
    status: Uri,
    /// The job's request headers (its credentials) for every poll.
    headers: HeaderMap,
    extensions: Extensions,
}

impl Native {
    /// The upstream job `response` accepted, when it is an asynchronous acceptance (`202` with
    /// a `Content-Location`): `Ok` when the status URL may be followed, `Err` (why) when it
    /// names another server. `None` for any other answer.
    pub(crate) fn of<B>(
        response: &Response<B>,
        request_headers: &HeaderMap,
        extensions: &Extensions,
        origins: &Origins<'_>,
    ) -> Option<Result<Self, String>> {
        if response.status() != StatusCode::ACCEPTED {
            return None;
        }
        let location = response.headers().get(CONTENT_LOCATION)?.to_str().ok()?;
        let host = request_headers.get(HOST).and_then(|v| v.to_str().ok());
        let status = match origins.inner_uri(location, host) {
            Ok(status) => status,
            Err(why) => {
                return Some(Err(format!(
                    "The FHIR server accepted the request to run it asynchronously, but its status URL cannot \
                     be followed: {why}."
                )));
            }
        };
        Some(Ok(Self::at(status, request_headers, extensions)))
    }

    /// The upstream job at `status` (as the wrapped service is asked for it), asked with the
    /// credentials of a request with `request_headers` and `extensions`.
    fn at(status: Uri, request_headers: &HeaderMap, extensions: &Extensions) -> Self {
        let mut headers = request_headers.clone();
        for name in [CONTENT_TYPE, CONTENT_LENGTH] {
            headers.remove(name);
        }
        Self {
            status,
            headers,
            extensions: extensions.clone(),
        }
    }

    /// The upstream job a completed linked export recorded ([`UPSTREAM_JOB`]), to be asked with
    /// the credentials of the request with `request_headers` and `extensions` (the caller's
    /// `DELETE`). `None` for any other job.
    pub(crate) fn recorded(
        record: &JobRecord,
        request_headers: &HeaderMap,
        extensions: &Extensions,
    ) -> Option<Self> {
        let JobState::Completed(result) = &record.state else {
            return None;
        };
        if !record.kind.is_bulk() {
            return None;
        }
        let status = result.header(&UPSTREAM_JOB)?.to_str().ok()?.parse().ok()?;
        Some(Self::at(status, request_headers, extensions))
    }

    /// Its status URL, as the wrapped service is asked for it.
    #[cfg(any(test, feature = "bulk"))]
    pub(crate) fn status(&self) -> &Uri {
        &self.status
    }

    fn request<ReqB>(&self, method: Method) -> Request<RequestBody<ReqB>> {
        let mut request = Request::new(RequestBody::buffered(Bytes::new()));
        *request.method_mut() = method;
        *request.uri_mut() = self.status.clone();
        *request.headers_mut() = self.headers.clone();
        *request.extensions_mut() = self.extensions.clone();
        request
    }

    /// Polls the status URL through `inner` until it answers anything but `202`, and returns
    /// that answer. Its `X-Progress` becomes the job's progress meanwhile.
    pub(crate) async fn poll<S, ReqB>(
        &self,
        inner: &mut S,
        job: &JobShared,
    ) -> Result<Response<S::ResBody>, BoxError>
    where
        S: Inner<ReqB>,
    {
        loop {
            let response = inner::call(inner, self.request(Method::GET)).await?;
            if response.status() != StatusCode::ACCEPTED {
                return Ok(response);
            }
            if let Some(progress) = response
                .headers()
                .get(X_PROGRESS)
                .and_then(|v| v.to_str().ok())
            {
                job.set_progress(progress);
            }
            let wait = retry_after(response.headers());
            drop(response);
            tokio::time::sleep(wait).await;
        }
    }

    /// Sends the upstream a `DELETE` of its job through `inner`, in the background, best effort
    /// (bounded by the longest poll interval; the outcome is logged): a deleted linked export
    /// releases the upstream's files.
    pub(crate) fn delete<S, ReqB>(&self, inner: S)
    where
        S: Inner<ReqB>,
        ReqB: Send + 'static,
    {
        drop(self.cancel_on_drop(inner));
    }

    /// A guard that sends the upstream a `DELETE` of its job when dropped before
    /// [`Cancel::disarm`]: a cancelled (or stopped) job stops the upstream's work too.
    pub(crate) fn cancel_on_drop<S, ReqB>(&self, inner: S) -> Cancel<S, ReqB>
    where
        S: Inner<ReqB>,
        ReqB: Send + 'static,
    {
        Cancel {
            inner: Some(inner),
            request: Some(self.request(Method::DELETE)),
        }
    }
}

/// See [`Native::cancel_on_drop`].
pub(crate) struct Cancel<S, ReqB>
where
    S: Inner<ReqB>,
    ReqB: Send + 'static,
{
    inner: Option<S>,
    request: Option<Request<RequestBody<ReqB>>>,
}

impl<S, ReqB> Cancel<S, ReqB>
where
    S: Inner<ReqB>,
    ReqB: Send + 'static,
{
    /// The upstream's job ended by itself: nothing to cancel.
    pub(crate) fn disarm(mut self) {
        self.inner = None;
    }
}

impl<S, ReqB> Drop for Cancel<S, ReqB>
where
    S: Inner<ReqB>,
    ReqB: Send + 'static,
{
    fn drop(&mut self) {
        let (Some(mut inner), Some(request)) = (self.inner.take(), self.request.take()) else {
            return;
        };
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let target = request.uri().clone();
        runtime.spawn(async move {
            match tokio::time::timeout(MAX_INTERVAL, inner::call(&mut inner, request)).await {
                Ok(Ok(response)) => tracing::info!(
                    status = response.status().as_u16(),
                    upstream = %target,
                    "the upstream's asynchronous job was cancelled with its job here"
                ),
                Ok(Err(error)) => {
                    tracing::warn!(%error, upstream = %target, "cancelling the upstream's asynchronous job failed");
                }
                Err(_) => tracing::warn!(
                    upstream = %target,
                    "cancelling the upstream's asynchronous job did not finish in time"
                ),
            }
        });
    }
}

/// How long to wait before the next poll: the upstream's `Retry-After` (delta seconds or an
/// HTTP date), between [`MIN_INTERVAL`] and [`MAX_INTERVAL`].
fn retry_after(headers: &HeaderMap) -> Duration {
    let Some(value) = headers.get(RETRY_AFTER).and_then(|v| v.to_str().ok()) else {
        return DEFAULT_INTERVAL;
    };
    let value = value.trim();
    let wait = match value.parse::<u64>() {
        Ok(seconds) => Duration::from_secs(seconds),
        Err(_) => match httpdate::parse_http_date(value) {
            Ok(at) => at
                .duration_since(std::time::SystemTime::now())
                .unwrap_or_default(),
            Err(_) => DEFAULT_INTERVAL,
        },
    };
    wait.clamp(MIN_INTERVAL, MAX_INTERVAL)
}

#[derive(Deserialize)]
struct BatchResponse {
    #[serde(rename = "resourceType")]
    resource_type: String,
    #[serde(rename = "type")]
    kind: Option<String>,
    #[serde(default)]
    entry: Vec<Entry>,
}

#[derive(Deserialize)]
struct Entry {
    resource: Option<Box<serde_json::value::RawValue>>,
    response: Option<EntryResponse>,
}

#[derive(Deserialize)]
struct EntryResponse {
    status: String,
    location: Option<String>,
    etag: Option<String>,
    #[serde(rename = "lastModified")]
    last_modified: Option<String>,
    outcome: Option<Box<serde_json::value::RawValue>>,
}

/// The answer an upstream's completed asynchronous interaction stands for: its final answer is
/// a `batch-response` Bundle of one entry (the FHIR asynchronous interaction pattern), which is
/// unwrapped into that entry's response, so the layer's own Bundle wraps the answer once, as if
/// the upstream had answered at once. Any other final answer is the result as it is.
pub(crate) fn adopt(result: StoredResponse) -> StoredResponse {
    let is_json = result
        .headers
        .iter()
        .find(|(name, _)| name == CONTENT_TYPE)
        .and_then(|(_, value)| value.to_str().ok())
        .is_some_and(|value| media::is_json(&media::essence(value)));
    if result.status != StatusCode::OK || !is_json {
        return result;
    }
    let Ok(bundle) = serde_json::from_slice::<BatchResponse>(&result.body) else {
        return result;
    };
    let [entry] = bundle.entry.as_slice() else {
        return result;
    };
    let (Some(response), true) = (
        &entry.response,
        bundle.resource_type == "Bundle" && bundle.kind.as_deref() == Some("batch-response"),
    ) else {
        return result;
    };
    let Some(status) = response
        .status
        .split_whitespace()
        .next()
        .and_then(|code| code.parse::<u16>().ok())
        .and_then(|code| StatusCode::from_u16(code).ok())
    else {
        return result;
    };
    let body = entry
        .resource
        .as_ref()
        .or(response.outcome.as_ref())
        .map(|raw| Bytes::copy_from_slice(raw.get().as_bytes()))
        .unwrap_or_default();
    let mut headers = Vec::new();
    if !body.is_empty() {
        headers.push((
            CONTENT_TYPE,
            HeaderValue::from_static("application/fhir+json"),
        ));
    }
    for (name, value) in [
        (LOCATION, &response.location),
        (http::header::ETAG, &response.etag),
        (http::header::LAST_MODIFIED, &response.last_modified),
    ] {
        if let Some(value) = value.as_deref().and_then(|v| HeaderValue::from_str(v).ok()) {
            headers.push((name, value));
        }
    }
    StoredResponse {
        status,
        headers,
        body,
    }
}

#[cfg(test)]
mod tests {
    use http::HeaderName;

    use super::*;

    fn stored(status: StatusCode, body: &str) -> StoredResponse {
        StoredResponse {
            status,
            headers: vec![(
                CONTENT_TYPE,
                HeaderValue::from_static("application/fhir+json"),
            )],
            body: Bytes::from(body.to_owned()),
        }
    }

    // GATEWAY-5, BUNDLE-1: an upstream's batch-response of one entry is unwrapped into the answer
    // it stands for; anything else is kept as it is.
    #[test]
    fn a_batch_response_of_one_entry_is_the_answer() {
        let adopted = adopt(stored(
            StatusCode::OK,
            r#"{"resourceType":"Bundle","type":"batch-response","entry":[{"resource":{"resourceType":"Patient","id":"7"},
               "response":{"status":"201 Created","location":"http://gw/fhir/Patient/7/_history/1","etag":"W/\"1\""}}]}"#,
        ));
        assert_eq!(adopted.status, StatusCode::CREATED);
        assert_eq!(&adopted.body[..], br#"{"resourceType":"Patient","id":"7"}"#);
        let header = |name: HeaderName| {
            adopted
                .headers
                .iter()
                .find(|(n, _)| *n == name)
                .map(|(_, v)| v.to_str().unwrap().to_owned())
        };
        assert_eq!(
            header(LOCATION).as_deref(),
            Some("http://gw/fhir/Patient/7/_history/1")
        );
        assert_eq!(header(http::header::ETAG).as_deref(), Some("W/\"1\""));

        let failed = adopt(stored(
            StatusCode::OK,
            r#"{"resourceType":"Bundle","type":"batch-response","entry":[{"response":{"status":"422","outcome":{"resourceType":"OperationOutcome"}}}]}"#,
        ));
        assert_eq!(failed.status, StatusCode::UNPROCESSABLE_ENTITY);
        assert_eq!(&failed.body[..], br#"{"resourceType":"OperationOutcome"}"#);

        for kept in [
            stored(
                StatusCode::OK,
                r#"{"resourceType":"Bundle","type":"searchset","entry":[]}"#,
            ),
            stored(
                StatusCode::OK,
                r#"{"resourceType":"Bundle","type":"batch-response","entry":[{"response":{"status":"200"}},{"response":{"status":"200"}}]}"#,
            ),
            stored(
                StatusCode::INTERNAL_SERVER_ERROR,
                r#"{"resourceType":"OperationOutcome"}"#,
            ),
            stored(StatusCode::OK, "not json"),
        ] {
            let before = kept.body.clone();
            let after = adopt(kept);
            assert_eq!(after.body, before);
        }
    }

    // GATEWAY-5: the upstream's Retry-After paces the polls, within bounds.
    #[test]
    fn retry_after_is_obeyed_within_bounds() {
        let wait = |value: Option<&str>| {
            let mut headers = HeaderMap::new();
            if let Some(value) = value {
                headers.insert(RETRY_AFTER, HeaderValue::from_str(value).unwrap());
            }
            retry_after(&headers)
        };
        assert_eq!(wait(None), DEFAULT_INTERVAL);
        assert_eq!(wait(Some("3")), Duration::from_secs(3));
        assert_eq!(wait(Some("0")), MIN_INTERVAL);
        assert_eq!(wait(Some("3600")), MAX_INTERVAL);
        assert_eq!(wait(Some("soon")), DEFAULT_INTERVAL);
        assert_eq!(wait(Some("Thu, 01 Jan 1970 00:00:00 GMT")), MIN_INTERVAL);
    }
}
