//! The layer's own routes under `{base}{status path}/`: status (`GET`/`HEAD`), cancel
//! (`DELETE`) and bulk data files (`GET`/`HEAD {id}/file/{name}`).

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{
    ALLOW, CACHE_CONTROL, CONTENT_LENGTH, CONTENT_TYPE, ETAG, EXPIRES, IF_NONE_MATCH, LOCATION,
    RETRY_AFTER,
};
use http::request::Parts;
use http::{HeaderName, HeaderValue, Method, Response, StatusCode};

use crate::audit::{self, Action};
use crate::body::OwnBody;
use crate::bulk::{self, files};
use crate::bundle;
use crate::config::{CompletionMode, RequestHead};
use crate::job::{JobId, JobKind, JobRecord, JobState};
use crate::outcome::{
    self, FHIR_JSON, IssueCode, NO_STORE, delta_seconds, error_response, job_not_found,
};
use crate::prefer;
use crate::state::Shared;
use crate::watcher;

/// The `X-Progress` response header (STATUS-4).
pub(crate) const X_PROGRESS: HeaderName = HeaderName::from_static("x-progress");

/// The `X-Export-Status` response header (STATUS-17).
const X_EXPORT_STATUS: HeaderName = HeaderName::from_static("x-export-status");

/// How often a long poll of a job running on another instance reads the store again, when the
/// store does not push changes.
const REMOTE_RECHECK: Duration = Duration::from_millis(250);

/// How often a long poll woken by pushed changes reads the store anyway, in case a notice was
/// lost (a dropped pub/sub connection).
const PUSH_BACKSTOP: Duration = Duration::from_secs(5);

/// How long a client should wait before retrying when the store is unavailable.
const STORE_RETRY: Duration = Duration::from_secs(5);

/// Answers a request under the layer's route prefix. A `HEAD` gets the headers of the `GET`
/// answer, with no body.
pub(crate) async fn handle(shared: Arc<Shared>, parts: Parts) -> Response<OwnBody> {
    // An instance that only answers polls must still notice jobs of lost instances.
    watcher::ensure(&shared);
    let rest = shared
        .config
        .own_route(parts.uri.path())
        .unwrap_or_default();
    if let Some((id, name)) = file_route(rest) {
        return file(&shared, &parts, id, name).await;
    }
    let mut response = route(&shared, &parts).await;
    if parts.method == Method::HEAD {
        let length = response.body().len();
        response
            .headers_mut()
            .insert(CONTENT_LENGTH, HeaderValue::from(length));
        *response.body_mut() = Bytes::new();
    }
    response.map(OwnBody::from)
}

/// `/{id}/file/{name}`: the job id and file name of a file request.
fn file_route(rest: &str) -> Option<(&str, &str)> {
    let (id, tail) = rest.strip_prefix('/')?.split_once('/')?;
    Some((id, tail.strip_prefix("file/")?))
}

/// `GET`/`HEAD` of a bulk data file (BULK-13…15, BULK-18): streamed, gzip when asked; the
/// caller checks of the status route apply when `requiresAccessToken` is true (BULK-14).
async fn file(shared: &Shared, parts: &Parts, id: &str, name: &str) -> Response<OwnBody> {
    let caller = shared.config.caller_of(&RequestHead::of(parts));
    let parsed = JobId::parse(id);
    let (mut response, outcome) = serve_file(shared, parts, parsed, name, caller.as_deref()).await;
    audit::event(Action::File, parsed, caller.as_deref(), outcome);
    // A served file's HEAD already has its headers and no body; errors lose their body here.
    if parts.method == Method::HEAD && response.status() != StatusCode::OK {
        if let OwnBody::Full(body) = response.body_mut() {
            let length = body.len();
            *body = Bytes::new();
            response
                .headers_mut()
                .insert(CONTENT_LENGTH, HeaderValue::from(length));
        }
    }
    response
}

async fn serve_file(
    shared: &Shared,
    parts: &Parts,
    id: Option<JobId>,
    name: &str,
    caller: Option<&str>,
) -> (Response<OwnBody>, &'static str) {
    let bytes = |response: Response<Bytes>| response.map(OwnBody::from);
    if !matches!(parts.method, Method::GET | Method::HEAD) {
        let response = not_allowed(&parts.method, "a bulk data file", "GET, HEAD");
        return (bytes(response), "method-not-allowed");
    }
    // Only names this layer writes reach the store: no `..`, no slashes, no encodings.
    let Some(id) = id.filter(|_| files::is_file_name(name)) else {
        return (bytes(file_not_found()), "not-found");
    };
    let record = match read(shared, id, "request the file").await {
        Ok(Some(record)) => record,
        Ok(None) => return (bytes(file_not_found()), "not-found"),
        Err(reply) => return (bytes(reply), "store-unavailable"),
    };
    let bulk = &shared.config.bulk;
    if bulk.requires_access_token && !shared.config.may_access(record.owner.as_deref(), caller) {
        return (bytes(foreign(shared)), "denied");
    }
    if !record.kind.is_bulk() || !matches!(record.state, JobState::Completed(_)) {
        return (bytes(file_not_found()), "not-found");
    }
    let head_only = parts.method == Method::HEAD;
    match files::serve(bulk, &id, name, &parts.headers, head_only).await {
        Ok(Some(response)) => (response, "served"),
        Ok(None) => (bytes(file_not_found()), "not-found"),
        Err(error) => {
            tracing::warn!(job.id = %id, %error, "reading a bulk data file failed");
            let reply = outcome::unavailable(
                "The file store is temporarily unavailable; request the file again later.",
                STORE_RETRY,
            );
            (bytes(reply), "file-store-unavailable")
        }
    }
}

/// STATUS-15, AMB-31: `405` + `Allow` for a method `route` does not take.
fn not_allowed(method: &Method, route: &str, allow: &'static str) -> Response<Bytes> {
    let mut response = error_response(
        StatusCode::METHOD_NOT_ALLOWED,
        IssueCode::NotSupported,
        &format!("{method} is not supported on {route}; use one of {allow}."),
    );
    response
        .headers_mut()
        .insert(ALLOW, HeaderValue::from_static(allow));
    response
}

/// CANCEL-7, EXPIRE-3: no such file, or no longer.
fn file_not_found() -> Response<Bytes> {
    error_response(
        StatusCode::NOT_FOUND,
        IssueCode::NotFound,
        "No such bulk data file: the job is unknown, not complete, expired or deleted, or the file is not one of \
         its files.",
    )
}

async fn route(shared: &Shared, parts: &Parts) -> Response<Bytes> {
    let rest = shared
        .config
        .own_route(parts.uri.path())
        .unwrap_or_default();
    let Some(rest) = rest.strip_prefix('/').filter(|r| !r.is_empty()) else {
        return error_response(
            StatusCode::NOT_FOUND,
            IssueCode::NotFound,
            "This is the prefix of asynchronous job status URLs; use the full URL from `Content-Location`.",
        );
    };
    if let Some(id) = rest.strip_suffix("/result") {
        return result(shared, parts, id).await;
    }
    if !matches!(parts.method, Method::GET | Method::HEAD | Method::DELETE) {
        return not_allowed(&parts.method, "a job status URL", "GET, HEAD, DELETE");
    }
    let action = if parts.method == Method::DELETE {
        Action::Cancel
    } else {
        Action::Status
    };
    let caller = shared.config.caller_of(&RequestHead::of(parts));
    // A malformed id, or anything below an id, never reaches the store.
    let Some(id) = JobId::parse(rest) else {
        audit::event(action, None, caller.as_deref(), "malformed-id");
        return job_not_found();
    };
    let (response, outcome) = match action {
        Action::Cancel => cancel(shared, id, caller.as_deref()).await,
        _ => status(shared, id, parts, caller.as_deref()).await,
    };
    audit::event(action, Some(id), caller.as_deref(), outcome);
    response
}

/// `GET` on a status URL: 202 while running, 200 + Bundle when done (STATUS-3…5, BUNDLE-1),
/// the manifest or the failure of a bulk job (BULK-5…8), `303` to the result in redirect mode
/// (FUT-1); `304` when `If-None-Match` names the current state, and a long poll with
/// `Prefer: wait=N`. With the outcome for the audit trail.
async fn status(
    shared: &Shared,
    id: JobId,
    parts: &Parts,
    caller: Option<&str>,
) -> (Response<Bytes>, &'static str) {
    let mut record = match read(shared, id, "poll").await {
        Ok(Some(record)) => record,
        Ok(None) => return (job_not_found(), "not-found"),
        Err(reply) => return (reply, "store-unavailable"),
    };
    // SEC-10: another caller's job looks like no job at all (or 403, if so configured).
    if !shared.config.may_access(record.owner.as_deref(), caller) {
        return (foreign(shared), "denied");
    }
    // STATUS-6/7: too fast a poll is told how long to wait; the job goes on.
    if let Some(Err(wait)) = shared.polls.as_ref().map(|polls| polls.check(id)) {
        return (too_fast(wait), "throttled");
    }
    if !record.state.is_finished() {
        if let Some(wait) = long_poll(shared, &parts.headers) {
            record = match wait_for_change(shared, record, parts, wait).await {
                Ok(Some(record)) => record,
                Ok(None) => return (job_not_found(), "not-found"),
                Err(reply) => return (reply, "store-unavailable"),
            };
        }
    }
    let progress = shared
        .runner
        .local_progress(&record.id)
        .or_else(|| record.progress.as_deref().map(Box::from));
    let tag = etag(&record, progress.as_deref());
    if not_modified(&parts.headers, &tag) {
        return (
            unchanged(shared, &record, progress.as_deref(), tag),
            "not-modified",
        );
    }
    let (mut reply, outcome) = render(shared, &record, progress.as_deref(), parts);
    reply.headers_mut().insert(ETAG, tag);
    (reply, outcome)
}

/// Reads a job; `Err` is the answer when the store is unavailable, telling the client to
/// `retry` (e.g. "poll") later.
async fn read(
    shared: &Shared,
    id: JobId,
    retry: &str,
) -> Result<Option<JobRecord>, Response<Bytes>> {
    let runner = &shared.runner;
    runner
        .store
        .get(&id, runner.clock.now())
        .await
        .map_err(|error| {
            tracing::warn!(%error, "reading a job failed");
            store_unavailable(retry)
        })
}

/// `503` + `transient` + `Retry-After`: the job store cannot be reached; `retry` later.
fn store_unavailable(retry: &str) -> Response<Bytes> {
    outcome::unavailable(
        &format!("The job store is temporarily unavailable; {retry} again later."),
        STORE_RETRY,
    )
}

/// A status response for the job as it is now.
fn render(
    shared: &Shared,
    record: &JobRecord,
    progress: Option<&str>,
    parts: &Parts,
) -> (Response<Bytes>, &'static str) {
    let now = shared.runner.clock.now();
    let separate = record.kind == JobKind::BulkSeparateStatus;
    let (mut reply, outcome) = match &record.state {
        JobState::Accepted | JobState::Running { .. } => {
            (in_progress(shared, record, progress, now), "in-progress")
        }
        JobState::Completed(manifest) if record.kind.is_bulk() => {
            // BULK-8: the manifest, `application/json`, with `Expires` (EXPIRE-2).
            let mut reply = Response::new(manifest.body.clone());
            let headers = reply.headers_mut();
            headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
            headers.insert(CACHE_CONTROL, NO_STORE);
            insert_expires(headers, record.expires_at);
            (reply, "completed")
        }
        JobState::Failed(failure) if record.kind.is_bulk() => {
            // BULK-6: the failure's own status + OperationOutcome, with final issue codes.
            let mut reply = Response::new(bulk::status::final_outcome(&failure.body));
            *reply.status_mut() = bulk::status::final_status(failure.status);
            let headers = reply.headers_mut();
            headers.insert(CONTENT_TYPE, FHIR_JSON);
            headers.insert(CACHE_CONTROL, NO_STORE);
            (reply, "failed")
        }
        JobState::Completed(_) | JobState::Failed(_)
            if shared.config.completion == CompletionMode::Redirect =>
        {
            // FUT-1: `303` to the result URL, empty body.
            let base = shared.config.public_base(&parts.uri, &parts.headers);
            let mut reply = Response::new(Bytes::new());
            *reply.status_mut() = StatusCode::SEE_OTHER;
            let headers = reply.headers_mut();
            headers.insert(CACHE_CONTROL, NO_STORE);
            let location = match base {
                Some(base) => format!("{}/result", shared.config.status_url(&base, &record.id)),
                None => format!("{}/result", parts.uri.path()),
            };
            if let Ok(location) = HeaderValue::from_str(&location) {
                headers.insert(LOCATION, location);
            }
            (reply, "completed")
        }
        JobState::Completed(response) | JobState::Failed(response) => {
            // Without a usable base (no configured URL, no Host on this poll) only `fullUrl` is lost.
            let base = shared.config.public_base(&parts.uri, &parts.headers);
            let body = bundle::render(&record.id, response, record.finished_at, base.as_deref());
            let mut reply = Response::new(body);
            let headers = reply.headers_mut();
            headers.insert(CONTENT_TYPE, FHIR_JSON);
            headers.insert(CACHE_CONTROL, NO_STORE);
            insert_expires(headers, record.expires_at);
            (reply, "completed")
        }
    };
    if separate {
        // STATUS-17: the status of the poll itself is `200`; the job's is in `X-Export-Status`.
        if let Ok(value) = HeaderValue::from_str(&bundle::status_line(reply.status())) {
            reply.headers_mut().insert(X_EXPORT_STATUS, value);
        }
        *reply.status_mut() = StatusCode::OK;
    }
    (reply, outcome)
}

/// The wait a status poll asks for with `Prefer: wait=N`, capped by `max_wait`; `None` when
/// long polls are off or not asked for.
fn long_poll(shared: &Shared, headers: &http::HeaderMap) -> Option<Duration> {
    if shared.config.max_wait.is_zero() || !prefer::has_prefer(headers) {
        return None;
    }
    let seconds = prefer::AsyncPreferences::from_headers(headers).wait?;
    Some(Duration::from_secs(seconds).min(shared.config.max_wait)).filter(|w| !w.is_zero())
}

/// Holds a poll of an unfinished job until its progress or state changes, or `wait` passes.
/// A job running here wakes the poll itself; for a job running on another instance the store
/// is read again every [`REMOTE_RECHECK`].
async fn wait_for_change(
    shared: &Shared,
    record: JobRecord,
    parts: &Parts,
    wait: Duration,
) -> Result<Option<JobRecord>, Response<Bytes>> {
    let id = record.id;
    let runner = &shared.runner;
    // Subscribed before the state is looked at, so no change falls between the two.
    let local = runner.changes(&id);
    let before = etag(
        &record,
        runner
            .local_progress(&id)
            .or_else(|| record.progress.as_deref().map(Box::from))
            .as_deref(),
    );
    // A poll that already has what it would wait for: `If-None-Match` names another state.
    if parts.headers.contains_key(IF_NONE_MATCH) && !not_modified(&parts.headers, &before) {
        return Ok(Some(record));
    }
    let deadline = tokio::time::Instant::now() + wait;
    match local {
        Some(mut changes) => {
            let _ = tokio::time::timeout_at(deadline, changes.changed()).await;
        }
        // Running on another instance, and the store pushes changes: wait for its news, and
        // read the store now and then in case a notice was lost.
        None if runner.has_change_push() => {
            let wait = RemoteWait::new(runner, id);
            let mut changes = wait.changes.clone();
            // A change may have landed between the first read and the subscription.
            let mut current = read(shared, id, "poll").await?;
            loop {
                match &current {
                    None => return Ok(None),
                    Some(now) if changed(now, &before) => return Ok(current),
                    Some(_) if tokio::time::Instant::now() >= deadline => return Ok(current),
                    Some(_) => {}
                }
                let until = (tokio::time::Instant::now() + PUSH_BACKSTOP).min(deadline);
                let _ = tokio::time::timeout_at(until, changes.changed()).await;
                current = read(shared, id, "poll").await?;
            }
        }
        // No push: read the store every `REMOTE_RECHECK`.
        None => loop {
            let next = (tokio::time::Instant::now() + REMOTE_RECHECK).min(deadline);
            tokio::time::sleep_until(next).await;
            match read(shared, id, "poll").await? {
                Some(now) => {
                    if changed(&now, &before) || next >= deadline {
                        return Ok(Some(now));
                    }
                }
                None => return Ok(None),
            }
        },
    }
    read(shared, id, "poll").await
}

/// Whether `record` differs from what a poll saw as `before`.
fn changed(record: &JobRecord, before: &HeaderValue) -> bool {
    record.state.is_finished() || etag(record, record.progress.as_deref()) != *before
}

/// A long poll's interest in a job running on another instance; forgotten when dropped (also
/// when the client goes away mid-wait).
struct RemoteWait<'a> {
    runner: &'a crate::runner::Runner,
    id: JobId,
    changes: tokio::sync::watch::Receiver<u64>,
}

impl<'a> RemoteWait<'a> {
    fn new(runner: &'a crate::runner::Runner, id: JobId) -> Self {
        let changes = runner.remote_changes(&id);
        Self {
            runner,
            id,
            changes,
        }
    }
}

impl Drop for RemoteWait<'_> {
    fn drop(&mut self) {
        // The receivers go first, so the entry is seen unused.
        let (_, placeholder) = tokio::sync::watch::channel(0);
        drop(std::mem::replace(&mut self.changes, placeholder));
        self.runner.forget_remote(&self.id);
    }
}

/// A weak validator of what a poll would show: the state, the progress, when it ended. The same
/// on every instance (a fixed hash), so a client that reaches another instance still gets `304`.
fn etag(record: &JobRecord, progress: Option<&str>) -> HeaderValue {
    const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const FNV_PRIME: u64 = 0x0100_0000_01b3;
    let state = match &record.state {
        // One state to a poller: both answer `202`.
        JobState::Accepted | JobState::Running { .. } => "in-progress",
        JobState::Completed(_) => "completed",
        JobState::Failed(_) => "failed",
    };
    let finished = record
        .finished_at
        .and_then(|at| at.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_millis());
    let bytes = state
        .bytes()
        .chain(*b"|")
        .chain(progress.unwrap_or_default().bytes())
        .chain(*b"|")
        .chain(finished.to_le_bytes());
    let hash = bytes.fold(FNV_OFFSET, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(FNV_PRIME)
    });
    HeaderValue::from_str(&format!("W/\"{hash:016x}\""))
        .unwrap_or(HeaderValue::from_static("W/\"0\""))
}

/// Whether `If-None-Match` names `tag` (weak comparison) or is `*`.
fn not_modified(headers: &http::HeaderMap, tag: &HeaderValue) -> bool {
    let tag = tag.to_str().unwrap_or_default();
    fn opaque(tag: &str) -> &str {
        tag.trim().trim_start_matches("W/")
    }
    headers
        .get_all(IF_NONE_MATCH)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|candidate| candidate.trim() == "*" || opaque(candidate) == opaque(tag))
}

/// `304 Not Modified`: the headers the full answer would have carried that describe it, no body.
fn unchanged(
    shared: &Shared,
    record: &JobRecord,
    progress: Option<&str>,
    tag: HeaderValue,
) -> Response<Bytes> {
    let mut reply = Response::new(Bytes::new());
    *reply.status_mut() = StatusCode::NOT_MODIFIED;
    let headers = reply.headers_mut();
    headers.insert(ETAG, tag);
    headers.insert(CACHE_CONTROL, NO_STORE);
    if !record.state.is_finished() {
        insert_poll_hints(shared, headers, record, progress, shared.runner.clock.now());
    } else {
        insert_expires(headers, record.expires_at);
    }
    reply
}

/// `GET {status URL}/result` in redirect mode (FUT-2): exactly what the synchronous call would
/// have answered, as often as asked until the job expires.
async fn result(shared: &Shared, parts: &Parts, id: &str) -> Response<Bytes> {
    let caller = shared.config.caller_of(&RequestHead::of(parts));
    let id = JobId::parse(id);
    let (reply, outcome) = match id {
        _ if shared.config.completion != CompletionMode::Redirect => (job_not_found(), "not-found"),
        None => (job_not_found(), "malformed-id"),
        Some(_) if !matches!(parts.method, Method::GET | Method::HEAD) => {
            let reply = not_allowed(&parts.method, "a job's result URL", "GET, HEAD");
            (reply, "method-not-allowed")
        }
        Some(id) => match read(shared, id, "request the result").await {
            Err(reply) => (reply, "store-unavailable"),
            Ok(None) => (job_not_found(), "not-found"),
            Ok(Some(record))
                if !shared
                    .config
                    .may_access(record.owner.as_deref(), caller.as_deref()) =>
            {
                (foreign(shared), "denied")
            }
            Ok(Some(record)) => match record.state {
                JobState::Completed(response) | JobState::Failed(response)
                    if !record.kind.is_bulk() =>
                {
                    (response.into_response(), "result")
                }
                _ => (job_not_found(), "not-found"),
            },
        },
    };
    audit::event(Action::Status, id, caller.as_deref(), outcome);
    reply
}

fn insert_expires(headers: &mut http::HeaderMap, expires_at: Option<std::time::SystemTime>) {
    if let Some(expires) = expires_at {
        if let Ok(value) = HeaderValue::from_str(&httpdate::fmt_http_date(expires)) {
            headers.insert(EXPIRES, value);
        }
    }
}

/// The answer to another caller's request for a job (SEC-10).
fn foreign(shared: &Shared) -> Response<Bytes> {
    if shared.config.foreign_status == StatusCode::FORBIDDEN {
        error_response(
            StatusCode::FORBIDDEN,
            IssueCode::Forbidden,
            "This asynchronous job belongs to another caller.",
        )
    } else {
        job_not_found()
    }
}

/// `429` + `throttled` + the delta seconds left to wait (STATUS-6; never an absolute time).
fn too_fast(wait: Duration) -> Response<Bytes> {
    let seconds = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
    outcome::throttled(
        &format!(
            "This job's status was polled too often; poll again in {seconds} s. The job goes on."
        ),
        Duration::from_secs(seconds),
    )
}

/// `202 Accepted` with `Retry-After` growing with the job's age, and `X-Progress` when known.
fn in_progress(
    shared: &Shared,
    record: &JobRecord,
    progress: Option<&str>,
    now: std::time::SystemTime,
) -> Response<Bytes> {
    let mut reply = Response::new(Bytes::new());
    *reply.status_mut() = StatusCode::ACCEPTED;
    let headers = reply.headers_mut();
    headers.insert(CACHE_CONTROL, NO_STORE);
    insert_poll_hints(shared, headers, record, progress, now);
    reply
}

/// `Retry-After`, growing with the job's age, and `X-Progress` when known (STATUS-4, STATUS-5).
fn insert_poll_hints(
    shared: &Shared,
    headers: &mut http::HeaderMap,
    record: &JobRecord,
    progress: Option<&str>,
    now: std::time::SystemTime,
) {
    let age = now.duration_since(record.created_at).unwrap_or_default();
    let retry = Duration::from_secs(age.as_secs() / 10)
        .clamp(Duration::from_secs(1), shared.config.max_retry_after);
    headers.insert(RETRY_AFTER, delta_seconds(retry));
    if let Some(value) = progress.and_then(|p| HeaderValue::from_str(p).ok()) {
        headers.insert(X_PROGRESS, value);
    }
}

/// `DELETE` on a status URL: 202, and the job is gone (CANCEL-1…7); with the outcome for the
/// audit trail.
async fn cancel(
    shared: &Shared,
    id: JobId,
    caller: Option<&str>,
) -> (Response<Bytes>, &'static str) {
    const RETRY: &str = "send the DELETE";
    let runner = &shared.runner;
    if shared.config.caller.is_some() {
        // The owner never changes, so reading it first leaves no window to exploit.
        match read(shared, id, RETRY).await {
            Ok(Some(record)) if shared.config.may_access(record.owner.as_deref(), caller) => {}
            Ok(Some(_)) => return (foreign(shared), "denied"),
            Ok(None) => return (job_not_found(), "not-found"),
            Err(reply) => return (reply, "store-unavailable"),
        }
    }
    match runner.store.cancel(&id, runner.clock.now()).await {
        Ok(true) => {
            let stopped = runner.cancel_local(&id);
            // CANCEL-5: a bulk job's files go with it.
            files::remove_job(&shared.config.bulk, &id).await;
            if let Some(polls) = &shared.polls {
                polls.forget(&id);
            }
            tracing::info!(job.id = %id, stopped, "asynchronous job cancelled");
            let mut reply = Response::new(Bytes::new());
            *reply.status_mut() = StatusCode::ACCEPTED;
            reply.headers_mut().insert(CACHE_CONTROL, NO_STORE);
            (reply, "cancelled")
        }
        Ok(false) => (job_not_found(), "not-found"),
        Err(error) => {
            tracing::warn!(%error, "cancelling a job failed");
            (store_unavailable(RETRY), "store-unavailable")
        }
    }
}
