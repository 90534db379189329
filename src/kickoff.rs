//! Kick-off: check the request, buffer its body, record the job, spawn it, answer `202`.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, CACHE_CONTROL, CONTENT_LOCATION, RETRY_AFTER};
use http::request::Parts;
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode, Uri};
use http_body_util::{BodyExt, LengthLimitError, Limited};
use tokio::sync::oneshot;

use crate::admission::Refusal;
use crate::audit::{self, Action};
use crate::body::RequestBody;
use crate::bulk::{self, export::ExportSpec};
use crate::config::RequestHead;
use crate::context::{JobContext, JobShared};
use crate::encoding;
use crate::future::add_vary_prefer;
use crate::inner::{BytesBody, Inner};
use crate::job::{JobId, JobKind, JobRecord, JobState};
use crate::media;
use crate::outcome::{self, IssueCode, NO_STORE, error_response};
use crate::prefer::{self, AsyncPreferences, PREFERENCE_APPLIED};
use crate::redact::carries_access_token;
use crate::runner::{self, NewJob, Work};
use crate::state::Shared;
use crate::store::{Created, FullScope, MAX_IDEMPOTENCY_KEY_LEN, StoreError};
use crate::watcher;

/// How long a client should wait before retrying a refused kick-off.
const KICK_OFF_RETRY: Duration = Duration::from_secs(5);

/// Takes an eligible `respond-async` request: either `202` with a status URL, or a synchronous
/// refusal with an OperationOutcome (KICK-5). Either way, one audit event.
pub(crate) async fn kick_off<S, ReqB>(
    shared: Arc<Shared>,
    inner: S,
    request: Request<ReqB>,
    preferences: AsyncPreferences,
) -> Response<Bytes>
where
    S: Inner<ReqB>,
    ReqB: BytesBody,
{
    watcher::ensure(&shared);
    let (parts, body) = request.into_parts();
    let caller = shared.config.caller_of(&RequestHead::of(&parts));
    let (response, id, outcome) =
        match start(&shared, inner, parts, body, caller.clone(), preferences).await {
            Ok((response, id)) => (response, Some(id), "accepted"),
            Err(Refused { response, why }) => (response, None, why),
        };
    audit::event(Action::KickOff, id, caller.as_deref(), outcome);
    response
}

/// A kick-off refused synchronously, and the reason given to the audit trail.
struct Refused {
    response: Response<Bytes>,
    why: &'static str,
}

fn refuse(response: Response<Bytes>, why: &'static str) -> Refused {
    Refused { response, why }
}

async fn start<S, ReqB>(
    shared: &Arc<Shared>,
    inner: S,
    mut parts: Parts,
    body: ReqB,
    caller: Option<String>,
    preferences: AsyncPreferences,
) -> Result<(Response<Bytes>, JobId), Refused>
where
    S: Inner<ReqB>,
    ReqB: BytesBody,
{
    let config = &shared.config;
    let runner = &shared.runner;
    if runner.registry.is_shutting_down() {
        return Err(refuse(shutting_down(), "shutting-down"));
    }
    if config.caller.is_some() && caller.is_none() {
        return Err(refuse(anonymous(), "no-caller"));
    }
    // Idempotent kick-offs are scoped to the caller, so without caller binding the header is
    // ignored: anyone could otherwise learn another client's status URL by guessing its key.
    let once = match idempotency_key(&parts.headers) {
        Err(refusal) => return Err(refuse(*refusal, "bad-idempotency-key")),
        Ok(key) => key.filter(|_| caller.is_some()),
    };
    let bulk_hint = config.bulk.enabled && bulk::may_be_bulk(&config.bulk, &parts.uri);
    if let Some(refusal) = check_format(&parts.uri, &parts.headers, bulk_hint) {
        return Err(refuse(refusal, "not-acceptable"));
    }
    let Some(base) = config.public_base(&parts.uri, &parts.headers) else {
        return Err(refuse(no_host(), "no-host"));
    };
    shared.check_under_base(parts.uri.path());
    // Quotas before the body is read: a refused kick-off costs nothing (KICK-8, SEC-13).
    let admission = shared.quotas.admit(caller.as_deref()).map_err(|refusal| match refusal {
        Refusal::Busy => refuse(throttled("This server runs as many asynchronous jobs as it may; try again shortly."), "quota-instance"),
        Refusal::CallerBusy => refuse(
            throttled("You have as many unfinished asynchronous jobs as this server allows; wait for one to finish, or cancel one."),
            "quota-caller",
        ),
    })?;
    let body = match tokio::time::timeout(
        config.body_timeout,
        buffer(body, &parts.headers, config.body_limit),
    )
    .await
    {
        Ok(Ok(body)) => body,
        Ok(Err(refused)) => return Err(refused),
        Err(_) => {
            let why = format!(
                "The request body did not arrive within {}; send it again.",
                humantime::format_duration(config.body_timeout)
            );
            return Err(refuse(
                error_response(StatusCode::REQUEST_TIMEOUT, IssueCode::Timeout, &why),
                "body-timeout",
            ));
        }
    };
    // SEL-3…6: `_outputFormat` (query, form or Parameters body) or a bulk operation.
    let export = bulk::select(&config.bulk, &parts, &body)
        .map_err(|refusal| refuse(refusal.response(), "bulk-refused"))?;

    let id = JobId::new();
    let target = recorded_target(&parts.uri);
    let status_url = config.status_url(&base, &id);
    let (kind, work, body) = match export {
        None => (JobKind::Interaction, Work::Interaction, body),
        Some(params) => {
            // The manifest's `request`: the kick-off's public URL (BULK-9).
            let relative = target
                .strip_prefix(config.base_path.as_str())
                .unwrap_or(&target);
            let spec = ExportSpec {
                params,
                status_url: status_url.clone(),
                request_url: format!("{base}{relative}"),
                public_base: base.clone(),
            };
            let body = bulk::inner_request(&config.bulk, &mut parts, body);
            // PREFER-13: every status response is then `200` + `X-Export-Status`.
            let kind = if preferences.separate_export_status {
                JobKind::BulkSeparateStatus
            } else {
                JobKind::Bulk
            };
            (kind, Work::Bulk(spec), body)
        }
    };
    let record = JobRecord::new(id, kind, parts.method.as_str(), target, runner.clock.now())
        .with_owner(caller);
    let is_get_or_head = matches!(parts.method, Method::GET | Method::HEAD);
    // PREFER-9: the inner service never sees `respond-async` or `wait`; the rest is forwarded.
    prefer::strip_async_preferences(&mut parts.headers);
    // GATEWAY-4: the job's answer is kept or exported, never sent on as it comes.
    encoding::ask_for_identity(&mut parts.headers);
    parts.headers.remove(header::TRANSFER_ENCODING);
    parts.headers.remove(header::EXPECT);
    if !body.is_empty() || parts.headers.contains_key(header::CONTENT_LENGTH) {
        parts
            .headers
            .insert(header::CONTENT_LENGTH, HeaderValue::from(body.len()));
    }
    let Some(job) = runner.registry.register(id) else {
        return Err(refuse(shutting_down(), "shutting-down"));
    };
    parts.extensions.insert(JobContext::new(job.clone()));
    let replay = Request::from_parts(parts, RequestBody::buffered(body));
    // PREFER-8: with `wait=N`, the answer may be the job's own, if it ends in time.
    let wait = preferences
        .wait
        .map(|seconds| Duration::from_secs(seconds).min(config.max_wait))
        .filter(|wait| !wait.is_zero() && !kind.is_bulk());
    // BULK-1, KICK-5: errors the inner service reports at once are the kick-off's answer.
    // Only for the bulk pattern: the interaction pattern reports every inner answer, errors
    // included, in its completion Bundle (BUNDLE-4).
    let kickoff_wait = if kind.is_bulk() {
        config.kickoff_wait
    } else {
        Duration::ZERO
    };
    let answer_within = wait.unwrap_or_default().max(kickoff_wait);
    let waiting = (!answer_within.is_zero()).then(|| (job.clone(), job.changes()));
    let applied = if kind == JobKind::BulkSeparateStatus {
        HeaderValue::from_static("respond-async, separate-export-status")
    } else {
        HeaderValue::from_static("respond-async")
    };

    // KICK-9: the job is recorded before the 202, so the first poll can never 404.
    let (recorded, was_recorded) = oneshot::channel();
    runner::spawn(
        shared.runner.clone(),
        job,
        NewJob {
            record,
            work,
            once,
            admission,
        },
        recorded,
        inner,
        replay,
    );
    match was_recorded.await {
        Ok(Ok(Created::New)) => {}
        Ok(Ok(Created::Existing(existing))) => {
            // A repeat (same caller, same `Idempotency-Key`) of a live job: its status URL —
            // unless that job may never run (see `will_run`).
            if !will_run(shared, &existing).await {
                let unavailable = outcome::unavailable(
                    "The earlier request with this Idempotency-Key has not started, and may never start; send the \
                     request again shortly.",
                    KICK_OFF_RETRY,
                );
                return Err(refuse(unavailable, "idempotent-unstarted"));
            }
            let url = config.status_url(&base, &existing);
            return Ok((accepted(&url, is_get_or_head, applied), existing));
        }
        Ok(Err(StoreError::Full { scope, retry_after })) => {
            return Err(results_full(scope, retry_after));
        }
        _ => {
            let unavailable = outcome::unavailable(
                "The job store is temporarily unavailable; send the request again later.",
                KICK_OFF_RETRY,
            );
            return Err(refuse(unavailable, "store-unavailable"));
        }
    }
    if let Some((waiting, changes)) = waiting {
        let awaited = if wait.is_some() {
            Awaited::End
        } else {
            Awaited::ClientError
        };
        if let Some(mut answer) =
            answer_in_time(shared, &waiting, answer_within, changes, awaited).await
        {
            if is_get_or_head {
                add_vary_prefer(answer.headers_mut());
            }
            return Ok((answer, id));
        }
    }
    Ok((accepted(&status_url, is_get_or_head, applied), id))
}

/// Whether a job named by a repeated idempotent kick-off is sure to run: it started, or it was
/// accepted moments ago (a concurrent repeat). One accepted for longer than a store operation
/// takes is likely the record of a kick-off that was answered `503` and will be taken back.
async fn will_run(shared: &Shared, id: &JobId) -> bool {
    let runner = &shared.runner;
    let now = runner.clock.now();
    match runner.store.get(id, now).await {
        Ok(Some(record)) => match record.state {
            JobState::Accepted => now
                .duration_since(record.created_at)
                .is_ok_and(|age| age < shared.config.store_timeout),
            _ => true,
        },
        _ => false,
    }
}

/// What a kick-off waits for before its `202`.
#[derive(Clone, Copy)]
enum Awaited {
    /// PREFER-8 (`Prefer: wait`): the job's end, whatever its answer.
    End,
    /// BULK-1, KICK-5 (`kickoff_wait`): the inner service's response head, and then the end
    /// only when the head is a client error.
    ClientError,
}

/// Waits up to `wait` for what `awaited` names. When the job ended with an answer that is the
/// kick-off's (any, or a client error), that answer is returned, as a synchronous call's would
/// have been, and the job is forgotten (no status URL was given out).
async fn answer_in_time(
    shared: &Shared,
    job: &JobShared,
    wait: Duration,
    mut changes: tokio::sync::watch::Receiver<u64>,
    awaited: Awaited,
) -> Option<Response<Bytes>> {
    let runner = &shared.runner;
    let id = job.id;
    let deadline = tokio::time::Instant::now() + wait;
    let ended = async {
        loop {
            if runner.registry.changes(&id).is_none() {
                return true;
            }
            // A queued job has no answer to wait for yet: the kick-off answers `202` now.
            if matches!(awaited, Awaited::ClientError) && job.is_queued() {
                return false;
            }
            if let (Awaited::ClientError, Some(head)) = (awaited, job.head()) {
                if !head.is_client_error() {
                    return false;
                }
            }
            // The job's end is its last change; a progress report is not the end.
            if changes.changed().await.is_err() {
                return true;
            }
        }
    };
    match tokio::time::timeout_at(deadline, ended).await {
        Ok(true) => {}
        Ok(false) => return None,
        // A client error's body is still arriving: it is short, and worth the wait.
        Err(_)
            if matches!(awaited, Awaited::ClientError)
                && job.head().is_some_and(|head| head.is_client_error()) =>
        {
            let rest = async {
                while runner.registry.changes(&id).is_some() && changes.changed().await.is_ok() {}
            };
            tokio::time::timeout(shared.config.store_timeout, rest)
                .await
                .ok()?;
        }
        Err(_) => return None,
    }
    let now = runner.clock.now();
    let record = runner.store.get(&id, now).await.ok().flatten()?;
    let (JobState::Completed(response) | JobState::Failed(response)) = record.state else {
        return None;
    };
    if matches!(awaited, Awaited::ClientError) && !response.status.is_client_error() {
        return None;
    }
    // Taken back: nobody has this job's status URL.
    let _ = runner.store.cancel(&id, now).await;
    Some(response.into_response())
}

/// The `Idempotency-Key` request header.
const IDEMPOTENCY_KEY: header::HeaderName = header::HeaderName::from_static("idempotency-key");

/// The kick-off's `Idempotency-Key`: one value, 1 to 255 visible characters (quotes, as the
/// IETF draft writes keys, are part of the key); `400` otherwise.
fn idempotency_key(headers: &HeaderMap) -> Result<Option<String>, Box<Response<Bytes>>> {
    let mut values = headers.get_all(IDEMPOTENCY_KEY).iter();
    let Some(value) = values.next() else {
        return Ok(None);
    };
    let invalid = |why: &str| {
        Box::new(error_response(
            StatusCode::BAD_REQUEST,
            IssueCode::Invalid,
            why,
        ))
    };
    if values.next().is_some() {
        return Err(invalid(
            "Idempotency-Key is given more than once; send one key.",
        ));
    }
    let key = value.to_str().map(str::trim).unwrap_or_default();
    if key.is_empty()
        || key.len() > MAX_IDEMPOTENCY_KEY_LEN
        || !key.bytes().all(|b| b.is_ascii_graphic())
    {
        return Err(invalid(&format!(
            "Idempotency-Key must be 1 to {MAX_IDEMPOTENCY_KEY_LEN} visible ASCII characters without spaces."
        )));
    }
    Ok(Some(key.to_owned()))
}

/// No configured base URL and no usable `Host`: absolute URLs cannot be built.
fn no_host() -> Response<Bytes> {
    error_response(
        StatusCode::BAD_REQUEST,
        IssueCode::Invalid,
        "The request has no usable Host header, so no absolute URL can be built; send Host, or configure \
         the layer's base_url.",
    )
}

/// `429` + `throttled` + delta-seconds `Retry-After` (KICK-8; never an absolute time).
fn throttled(diagnostics: &str) -> Response<Bytes> {
    outcome::throttled(diagnostics, KICK_OFF_RETRY)
}

/// The store keeps as many finished results as it may (SEC-13, KICK-8): `429` `throttled` for
/// the caller's own cap, `503` `transient` for the whole store's; `Retry-After` as the store
/// says. No kept result is evicted to make room, so the client must wait or cancel.
fn results_full(scope: FullScope, retry_after: Duration) -> Refused {
    match scope {
        FullScope::Caller => refuse(
            outcome::throttled(
                "You have as many finished asynchronous results kept on this server as it allows; cancel (DELETE) \
                 the ones you have read, or try again when one expires.",
                retry_after,
            ),
            "quota-results-caller",
        ),
        FullScope::Store => refuse(
            outcome::unavailable(
                "This server keeps as many asynchronous results as it can hold; try again later.",
                retry_after,
            ),
            "results-full",
        ),
    }
}

/// A kick-off without a caller identity, where jobs are bound to callers (SEC-10).
fn anonymous() -> Response<Bytes> {
    error_response(
        StatusCode::FORBIDDEN,
        IssueCode::Forbidden,
        "Asynchronous requests on this server are bound to the caller that starts them, and this request \
         identifies no caller; authenticate first.",
    )
}

fn shutting_down() -> Response<Bytes> {
    outcome::unavailable(
        "The server is shutting down and accepts no new asynchronous requests; try again shortly.",
        KICK_OFF_RETRY,
    )
}

/// The kick-off's path and query as recorded with the job, with every `access_token` parameter
/// removed (RFC 6750 allows a bearer token in the query; no credential may reach the store,
/// SEC-11). Names are compared decoded, so `access%5Ftoken` and other spellings are caught too;
/// the pairs kept stay byte for byte as sent.
fn recorded_target(uri: &Uri) -> String {
    let path = uri.path();
    let Some(query) = uri.query() else {
        return path.to_owned();
    };
    let kept: Vec<&str> = query
        .split('&')
        .filter(|pair| !pair.is_empty() && !carries_access_token(pair))
        .collect();
    if kept.is_empty() {
        path.to_owned()
    } else {
        format!("{path}?{}", kept.join("&"))
    }
}

/// `202 Accepted` + absolute `Content-Location` (KICK-2, KICK-3, KICK-10, PREFER-10).
fn accepted(status_url: &str, vary: bool, applied: HeaderValue) -> Response<Bytes> {
    let mut response = Response::new(Bytes::new());
    *response.status_mut() = StatusCode::ACCEPTED;
    let headers = response.headers_mut();
    if let Ok(location) = HeaderValue::from_str(status_url) {
        headers.insert(CONTENT_LOCATION, location);
    }
    headers.insert(PREFERENCE_APPLIED, applied);
    headers.insert(RETRY_AFTER, HeaderValue::from_static("1"));
    headers.insert(CACHE_CONTROL, NO_STORE);
    if vary {
        add_vary_prefer(headers);
    }
    response
}

/// KICK-7: the Bundle and OperationOutcomes are JSON; a request that accepts no JSON (or asks for
/// another `_format`) is refused now rather than failed at completion.
/// A bulk kick-off may also accept NDJSON, the format of its files.
fn check_format(uri: &Uri, headers: &HeaderMap, bulk: bool) -> Option<Response<Bytes>> {
    if let Some(format) = query_values(uri, "_format").next() {
        // An unescaped `+` in the query decodes as a space; clients send it, servers accept it.
        let format = format.trim().to_ascii_lowercase().replace(' ', "+");
        if format != "json" && !media::is_json(&media::essence(&format)) {
            return Some(not_acceptable(&format!(
                "_format={format} cannot be produced for an asynchronous request; only JSON (application/fhir+json) is \
                 supported."
            )));
        }
        return None;
    }
    let mut ranges = headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter(|range| !range.trim().is_empty())
        .peekable();
    ranges.peek()?;
    if ranges.any(|range| accepts(range, bulk)) {
        return None;
    }
    Some(not_acceptable(
        "The Accept header allows no JSON; the results of asynchronous requests are application/fhir+json. Send \
         Accept: application/fhir+json.",
    ))
}

/// Whether one media range of `Accept` admits JSON (or, for a bulk kick-off, NDJSON) with a
/// quality that is not zero.
fn accepts(range: &str, bulk: bool) -> bool {
    let (media, quality) = media::weighted(range);
    let admitted = media::is_json(&media)
        || media == "application/*"
        || media == "*/*"
        || (bulk && media::is_ndjson(&media));
    admitted && !quality.is_some_and(|q| q <= 0.0)
}

fn not_acceptable(diagnostics: &str) -> Response<Bytes> {
    error_response(
        StatusCode::NOT_ACCEPTABLE,
        IssueCode::NotSupported,
        diagnostics,
    )
}

/// The decoded values of query parameter `name`.
fn query_values<'a>(uri: &'a Uri, name: &'a str) -> impl Iterator<Item = String> + 'a {
    form_urlencoded::parse(uri.query().unwrap_or_default().as_bytes())
        .filter(move |(key, _)| key == name)
        .map(|(_, value)| value.into_owned())
}

/// Reads the whole request body under `limit` bytes; `413` over it, `400` if reading fails.
async fn buffer<B: BytesBody>(
    body: B,
    headers: &HeaderMap,
    limit: usize,
) -> Result<Bytes, Refused> {
    let too_large = || {
        let why = format!(
            "The request body is larger than the {limit} bytes accepted for asynchronous requests."
        );
        refuse(
            error_response(StatusCode::PAYLOAD_TOO_LARGE, IssueCode::TooCostly, &why),
            "too-large",
        )
    };
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|length| length > limit as u64)
        || body.size_hint().lower() > limit as u64
    {
        return Err(too_large());
    }
    match Limited::new(body, limit).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(error) if error.is::<LengthLimitError>() => Err(too_large()),
        Err(error) => {
            let why = format!("The request body could not be read: {error}");
            Err(refuse(
                error_response(StatusCode::BAD_REQUEST, IssueCode::Invalid, &why),
                "unreadable-body",
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn accept(values: &[&str]) -> Option<u16> {
        let mut headers = HeaderMap::new();
        for v in values {
            headers.append(header::ACCEPT, HeaderValue::from_str(v).unwrap());
        }
        check_format(&"/fhir/Patient".parse().unwrap(), &headers, false)
            .map(|r| r.status().as_u16())
    }

    // KICK-7 and interop.md: accept lists and q values, never an exact string.
    #[test]
    fn kick_7_accept_negotiation() {
        assert_eq!(accept(&[]), None);
        assert_eq!(accept(&["application/fhir+json"]), None);
        assert_eq!(accept(&["application/fhir+json, */*; q=0.1"]), None);
        assert_eq!(accept(&["application/json"]), None);
        assert_eq!(accept(&["*/*"]), None);
        assert_eq!(accept(&["text/html", "application/fhir+json;q=0.5"]), None);
        assert_eq!(accept(&["application/fhir+xml"]), Some(406));
        assert_eq!(
            accept(&["application/fhir+json;q=0, application/fhir+xml"]),
            Some(406)
        );
        assert_eq!(accept(&["text/csv"]), Some(406));
    }

    #[test]
    fn kick_7_format_parameter_overrides_accept() {
        let check = |uri: &str| {
            check_format(&uri.parse().unwrap(), &HeaderMap::new(), false)
                .map(|r| r.status().as_u16())
        };
        assert_eq!(check("/fhir/Patient?_format=json"), None);
        assert_eq!(
            check("/fhir/Patient?_format=application%2Ffhir%2Bjson"),
            None
        );
        assert_eq!(check("/fhir/Patient?_format=xml"), Some(406));
    }

    // SEC-11: a bearer token in the query never reaches the store.
    #[test]
    fn sec_11_access_token_is_not_recorded() {
        let target = |uri: &str| recorded_target(&uri.parse().unwrap());
        assert_eq!(target("/fhir/Patient"), "/fhir/Patient");
        assert_eq!(
            target("/fhir/Patient?name=x&_count=5"),
            "/fhir/Patient?name=x&_count=5"
        );
        assert_eq!(
            target("/fhir/Patient?access_token=abc&name=x"),
            "/fhir/Patient?name=x"
        );
        assert_eq!(target("/fhir/Patient?access_token=abc"), "/fhir/Patient");
    }

    // SEC-11, issue 11 item 5: the name is compared decoded, so no spelling of `access_token`
    // slips through; the pairs kept are recorded exactly as sent.
    #[test]
    fn sec_11_encoded_access_token_names_are_not_recorded() {
        let target = |uri: &str| recorded_target(&uri.parse().unwrap());
        for name in [
            "access%5Ftoken",
            "access%5ftoken",
            "%61ccess_token",
            "%61%63%63%65%73%73%5F%74%6F%6B%65%6E",
            "ACCESS_TOKEN",
            "Access%5FToken",
            "access_token%20",
        ] {
            assert_eq!(
                target(&format!("/fhir/Patient?{name}=SECRET&name=x")),
                "/fhir/Patient?name=x",
                "{name}"
            );
            assert_eq!(
                target(&format!("/fhir/Patient?{name}=SECRET")),
                "/fhir/Patient",
                "{name}"
            );
        }
        assert_eq!(
            target("/fhir/Patient?name=x;access%5Ftoken=SECRET&_count=5"),
            "/fhir/Patient?_count=5",
            "a `;`-separated pair"
        );
        assert_eq!(
            target("/fhir/Patient?access_token&name=x"),
            "/fhir/Patient?name=x",
            "a name without a value"
        );
        // Encodings of the kept pairs are not normalised: `%2C` and `,` stay what they were.
        assert_eq!(
            target(
                "/fhir/$export?_type=Patient,Observation&_typeFilter=Observation%3Fcode%3D1%2C2&access%5Ftoken=S"
            ),
            "/fhir/$export?_type=Patient,Observation&_typeFilter=Observation%3Fcode%3D1%2C2"
        );
        assert_eq!(
            target("/fhir/Patient?my_access_token=x&access_tokens=y"),
            "/fhir/Patient?my_access_token=x&access_tokens=y",
            "other names are kept"
        );
    }
}
