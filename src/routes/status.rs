//! A job's status URL and result URL: `GET`/`HEAD` polls (STATUS-3…7, STATUS-17), the long
//! poll (`Prefer: wait`), the weak `ETag` and `304`, the completion (a `batch-response` Bundle,
//! a bulk manifest or failure, or `303` to the result in redirect mode), and `{id}/result`
//! (FUT-2).

use std::time::Duration;

use bytes::Bytes;
use http::header::{
    CACHE_CONTROL, CONTENT_TYPE, ETAG, EXPIRES, IF_NONE_MATCH, LOCATION, RETRY_AFTER,
};
use http::request::Parts;
use http::{HeaderName, HeaderValue, Method, Response, StatusCode};

use super::lookup::{foreign, read};
use crate::audit::{self, Action};
use crate::bulk;
use crate::bundle;
use crate::config::{CompletionMode, RequestHead};
use crate::context::X_PROGRESS;
use crate::job::{JobId, JobKind, JobRecord, JobState};
use crate::outcome::{self, FHIR_JSON, NO_STORE, delta_seconds, job_not_found};
use crate::prefer;
use crate::state::Shared;

/// The `X-Export-Status` response header (STATUS-17).
const X_EXPORT_STATUS: HeaderName = HeaderName::from_static("x-export-status");

/// How often a long poll of a job running on another instance reads the store again, when the
/// store does not push changes.
const REMOTE_RECHECK: Duration = Duration::from_millis(250);

/// How often a long poll woken by pushed changes reads the store anyway, in case a notice was
/// lost (a dropped pub/sub connection).
const PUSH_BACKSTOP: Duration = Duration::from_secs(5);

/// `GET` on a status URL: 202 while running, 200 + Bundle when done (STATUS-3…5, BUNDLE-1),
/// the manifest or the failure of a bulk job (BULK-5…8), `303` to the result in redirect mode
/// (FUT-1); `304` when `If-None-Match` names the current state, and a long poll with
/// `Prefer: wait=N`. With the outcome for the audit trail.
pub(super) async fn status(
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
        .registry
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
    let local = runner.registry.changes(&id);
    let before = etag(
        &record,
        runner
            .registry
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
        None if runner.registry.has_change_push() => {
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
        let changes = runner.registry.remote_changes(&id);
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
        self.runner.registry.forget_remote(&self.id);
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
pub(super) async fn result(shared: &Shared, parts: &Parts, id: Option<JobId>) -> Response<Bytes> {
    let caller = shared.config.caller_of(&RequestHead::of(parts));
    let (reply, outcome) = match id {
        _ if shared.config.completion != CompletionMode::Redirect => (job_not_found(), "not-found"),
        None => (job_not_found(), "malformed-id"),
        Some(_) if !matches!(parts.method, Method::GET | Method::HEAD) => {
            let reply =
                outcome::method_not_allowed(&parts.method, "a job's result URL", "GET, HEAD");
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

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use http::header::{ALLOW, CONTENT_TYPE};

    use super::super::fixture::{self, ID};
    use super::*;
    use crate::job::StoredResponse;

    fn id() -> JobId {
        JobId::parse(ID).unwrap()
    }

    fn get() -> Parts {
        fixture::parts(Method::GET, ID)
    }

    /// A layer holding the test job in `state`.
    async fn with_job(
        configure: impl FnOnce(crate::AsyncLayerBuilder) -> crate::AsyncLayerBuilder,
        kind: JobKind,
        state: JobState,
        progress: Option<&str>,
    ) -> Arc<Shared> {
        let shared = fixture::shared(configure);
        let mut record = fixture::record(&shared, kind, state);
        record.progress = progress.map(str::to_owned);
        fixture::put(&shared, record).await;
        shared
    }

    fn json(reply: &Response<Bytes>) -> serde_json::Value {
        serde_json::from_slice(reply.body()).unwrap()
    }

    fn done() -> JobState {
        JobState::Completed(fixture::stored(
            StatusCode::CREATED,
            r#"{"resourceType":"Patient","id":"1"}"#,
        ))
    }

    fn failed_export(status: StatusCode) -> JobState {
        JobState::Failed(fixture::stored(
            status,
            r#"{"resourceType":"OperationOutcome","issue":[{"severity":"error","code":"transient"}]}"#,
        ))
    }

    // STATUS-3…5, STATUS-16: an unfinished job is `202`, no body, `Retry-After` in delta
    // seconds, its progress in `X-Progress`, `no-store`.
    #[tokio::test]
    async fn status_3_an_unfinished_job_is_202_with_hints() {
        let shared = with_job(|b| b, JobKind::Interaction, JobState::Accepted, Some("40%")).await;
        let (reply, outcome) = status(&shared, id(), &get(), None).await;
        assert_eq!(reply.status(), StatusCode::ACCEPTED);
        assert_eq!(outcome, "in-progress");
        assert!(reply.body().is_empty());
        assert_eq!(reply.headers()[RETRY_AFTER], "1");
        assert_eq!(reply.headers()[X_PROGRESS], "40%");
        assert_eq!(reply.headers()[CACHE_CONTROL], "no-store");
        assert!(reply.headers()[ETAG].to_str().unwrap().starts_with("W/\""));
    }

    // BUNDLE-1, STATUS-14: a finished interaction is `200` + a `batch-response` Bundle wrapping
    // the inner response, with `Expires`; the same answer on every poll.
    #[tokio::test]
    async fn bundle_1_a_finished_job_is_a_batch_response() {
        let shared = with_job(|b| b, JobKind::Interaction, done(), None).await;
        let (reply, outcome) = status(&shared, id(), &get(), None).await;
        assert_eq!(reply.status(), StatusCode::OK);
        assert_eq!(outcome, "completed");
        assert_eq!(reply.headers()[CONTENT_TYPE], "application/fhir+json");
        assert!(reply.headers().contains_key(EXPIRES));
        let bundle = json(&reply);
        assert_eq!(bundle["resourceType"], "Bundle");
        assert_eq!(bundle["type"], "batch-response");
        assert_eq!(bundle["entry"][0]["response"]["status"], "201 Created");
        let (again, _) = status(&shared, id(), &get(), None).await;
        assert_eq!(again.body(), reply.body());
        assert_eq!(again.headers()[ETAG], reply.headers()[ETAG]);
    }

    // A poll naming the current state in `If-None-Match` is `304`, no body, the same `ETag`;
    // another tag (or a changed progress) gets the full answer.
    #[tokio::test]
    async fn if_none_match_of_the_current_state_is_304() {
        let shared = with_job(|b| b, JobKind::Interaction, JobState::Accepted, Some("1")).await;
        let (first, _) = status(&shared, id(), &get(), None).await;
        let tag = first.headers()[ETAG].clone();
        let mut parts = get();
        parts.headers.insert(IF_NONE_MATCH, tag.clone());
        let (reply, outcome) = status(&shared, id(), &parts, None).await;
        assert_eq!(reply.status(), StatusCode::NOT_MODIFIED);
        assert_eq!(outcome, "not-modified");
        assert!(reply.body().is_empty());
        assert_eq!(reply.headers()[ETAG], tag);
        assert_eq!(reply.headers()[X_PROGRESS], "1");
        parts.headers.insert(
            IF_NONE_MATCH,
            HeaderValue::from_static("W/\"0000000000000000\""),
        );
        let (reply, _) = status(&shared, id(), &parts, None).await;
        assert_eq!(reply.status(), StatusCode::ACCEPTED);

        let record = fixture::record(&shared, JobKind::Interaction, JobState::Accepted);
        let other = etag(&record, Some("2"));
        assert_ne!(other, tag);
        assert_eq!(etag(&record, Some("1")), tag);
    }

    // STATUS-15: a job nobody has is `404` + OperationOutcome `not-found`.
    #[tokio::test]
    async fn status_15_an_unknown_job_is_404() {
        let shared = fixture::shared(|b| b);
        let (reply, outcome) = status(&shared, id(), &get(), None).await;
        assert_eq!(reply.status(), StatusCode::NOT_FOUND);
        assert_eq!(outcome, "not-found");
        assert_eq!(json(&reply)["issue"][0]["code"], "not-found");
    }

    // BULK-8: a finished export's status is its manifest, `application/json`, with `Expires`.
    #[tokio::test]
    async fn bulk_8_a_finished_export_is_its_manifest() {
        let manifest = JobState::Completed(StoredResponse {
            status: StatusCode::OK,
            headers: Vec::new(),
            body: Bytes::from_static(br#"{"output":[]}"#),
        });
        let shared = with_job(|b| b, JobKind::Bulk, manifest, None).await;
        let (reply, _) = status(&shared, id(), &get(), None).await;
        assert_eq!(reply.status(), StatusCode::OK);
        assert_eq!(reply.headers()[CONTENT_TYPE], "application/json");
        assert!(reply.headers().contains_key(EXPIRES));
        assert_eq!(reply.body().as_ref(), br#"{"output":[]}"#);
    }

    // BULK-6, STATUS-11: a failed export answers with its failure's status and a final
    // (non-transient) OperationOutcome.
    #[tokio::test]
    async fn bulk_6_a_failed_export_answers_its_failure() {
        let state = failed_export(StatusCode::SERVICE_UNAVAILABLE);
        let shared = with_job(|b| b, JobKind::Bulk, state, None).await;
        let (reply, outcome) = status(&shared, id(), &get(), None).await;
        assert_eq!(reply.status(), StatusCode::INTERNAL_SERVER_ERROR);
        assert_eq!(outcome, "failed");
        assert_eq!(reply.headers()[CONTENT_TYPE], "application/fhir+json");
        assert_ne!(json(&reply)["issue"][0]["code"], "transient");
    }

    // STATUS-17: with `separate-export-status` the poll itself is `200`; the job's status is in
    // `X-Export-Status`.
    #[tokio::test]
    async fn status_17_separate_export_status_moves_the_status_to_a_header() {
        let state = failed_export(StatusCode::BAD_REQUEST);
        let shared = with_job(|b| b, JobKind::BulkSeparateStatus, state, None).await;
        let (reply, _) = status(&shared, id(), &get(), None).await;
        assert_eq!(reply.status(), StatusCode::OK);
        assert_eq!(reply.headers()[X_EXPORT_STATUS], "400 Bad Request");
    }

    // SEC-10: another caller's job is no job at all.
    #[tokio::test]
    async fn sec_10_another_callers_job_is_not_found() {
        let shared = fixture::shared(|b| b.caller_from_header(http::header::AUTHORIZATION));
        let owner = shared.config.caller_key.digest("alice");
        let record = fixture::record(&shared, JobKind::Interaction, done()).with_owner(Some(owner));
        fixture::put(&shared, record).await;
        let stranger = shared.config.caller_key.digest("mallory");
        let (reply, outcome) = status(&shared, id(), &get(), Some(&stranger)).await;
        assert_eq!(reply.status(), StatusCode::NOT_FOUND);
        assert_eq!(outcome, "denied");
    }

    // STATUS-6: a second poll inside `min_poll_interval` is `429` + `Retry-After` in delta
    // seconds; the first is answered.
    #[tokio::test]
    async fn status_6_too_fast_a_poll_is_429() {
        let shared = with_job(
            |b| b.min_poll_interval(Duration::from_secs(30)),
            JobKind::Interaction,
            JobState::Accepted,
            None,
        )
        .await;
        assert_eq!(
            status(&shared, id(), &get(), None).await.0.status(),
            StatusCode::ACCEPTED
        );
        let (reply, outcome) = status(&shared, id(), &get(), None).await;
        assert_eq!(reply.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(outcome, "throttled");
        let seconds: u64 = reply.headers()[RETRY_AFTER]
            .to_str()
            .unwrap()
            .parse()
            .unwrap();
        assert!((1..=30).contains(&seconds), "{seconds}");
    }

    // PREFER-8: a long poll waits as long as asked, at most `max_wait`, and only when asked.
    #[test]
    fn prefer_8_a_long_poll_is_capped_by_max_wait() {
        let shared = fixture::shared(|b| b.max_wait(Duration::from_secs(3)));
        let mut headers = http::HeaderMap::new();
        assert_eq!(long_poll(&shared, &headers), None);
        headers.insert(
            http::header::HeaderName::from_static("prefer"),
            HeaderValue::from_static("wait=2"),
        );
        assert_eq!(long_poll(&shared, &headers), Some(Duration::from_secs(2)));
        headers.insert(
            http::header::HeaderName::from_static("prefer"),
            HeaderValue::from_static("wait=60"),
        );
        assert_eq!(long_poll(&shared, &headers), Some(Duration::from_secs(3)));
        let off = fixture::shared(|b| b.max_wait(Duration::ZERO));
        assert_eq!(long_poll(&off, &headers), None);
    }

    // FUT-1: in redirect mode a finished job's status is `303` to `{status URL}/result`.
    #[tokio::test]
    async fn fut_1_redirect_mode_answers_303_to_the_result() {
        let shared = with_job(
            |b| b.completion(CompletionMode::Redirect),
            JobKind::Interaction,
            done(),
            None,
        )
        .await;
        let (reply, _) = status(&shared, id(), &get(), None).await;
        assert_eq!(reply.status(), StatusCode::SEE_OTHER);
        assert_eq!(
            reply.headers()[LOCATION],
            format!("https://fhir.example.org/fhir/_async/{ID}/result").as_str()
        );
        assert!(reply.body().is_empty());
    }

    // FUT-2: the result URL answers exactly the inner response, as often as asked; only in
    // redirect mode, only `GET`/`HEAD`.
    #[tokio::test]
    async fn fut_2_the_result_is_the_inner_response() {
        let shared = with_job(
            |b| b.completion(CompletionMode::Redirect),
            JobKind::Interaction,
            done(),
            None,
        )
        .await;
        for _ in 0..2 {
            let reply = result(&shared, &get(), Some(id())).await;
            assert_eq!(reply.status(), StatusCode::CREATED);
            assert_eq!(
                reply.body().as_ref(),
                br#"{"resourceType":"Patient","id":"1"}"#
            );
        }
        let reply = result(&shared, &fixture::parts(Method::POST, ID), Some(id())).await;
        assert_eq!(reply.status(), StatusCode::METHOD_NOT_ALLOWED);
        assert_eq!(reply.headers()[ALLOW], "GET, HEAD");
        let reply = result(&shared, &get(), None).await;
        assert_eq!(reply.status(), StatusCode::NOT_FOUND);

        let bundled = with_job(|b| b, JobKind::Interaction, done(), None).await;
        let reply = result(&bundled, &get(), Some(id())).await;
        assert_eq!(reply.status(), StatusCode::NOT_FOUND);
    }
}
