//! `GET`/`HEAD {id}/file/{name}`: a completed bulk job's files (BULK-13…15, BULK-18).

use bytes::Bytes;
use http::request::Parts;
use http::{Method, Response};

use super::lookup::{foreign, read};
use crate::audit::{self, Action};
use crate::body::OwnBody;
use crate::bulk::files;
use crate::config::RequestHead;
use crate::job::{JobId, JobState};
use crate::outcome::{self, file_not_found};
use crate::state::Shared;

/// `GET`/`HEAD` of a bulk data file: streamed, gzip when asked; the caller checks of the status
/// route apply when `requiresAccessToken` is true (BULK-14). One audit event.
pub(super) async fn file(
    shared: &Shared,
    parts: &Parts,
    id: Option<JobId>,
    name: &str,
) -> Response<OwnBody> {
    let caller = shared.config.caller_of(&RequestHead::of(parts));
    let (response, outcome) = match serve(shared, parts, id, name, caller.as_deref()).await {
        Ok(answer) => answer,
        Err(NotHeld) => (file_not_found().map(OwnBody::from), "not-found"),
    };
    audit::event(Action::File, id, caller.as_deref(), outcome);
    response
}

/// [`file`] where exports the wrapped service runs itself are linked (`UpstreamFiles::Link`):
/// `None` for a path of no job the layer holds (a malformed id, a name the layer never writes,
/// an unknown job), which is the upstream's own file URL mapped onto the public base, for the
/// wrapped service to answer.
pub(super) async fn file_or_upstream(
    shared: &Shared,
    parts: &Parts,
    id: Option<JobId>,
    name: &str,
) -> Option<Response<OwnBody>> {
    let caller = shared.config.caller_of(&RequestHead::of(parts));
    let (response, outcome) = match serve(shared, parts, id, name, caller.as_deref()).await {
        Ok(answer) => (Some(answer.0), answer.1),
        Err(NotHeld) => (None, "passed-upstream"),
    };
    audit::event(Action::File, id, caller.as_deref(), outcome);
    response
}

/// The path names no job the layer holds.
struct NotHeld;

/// The file's answer, and the outcome for the audit trail; [`NotHeld`] when the layer holds no
/// job of that path.
async fn serve(
    shared: &Shared,
    parts: &Parts,
    id: Option<JobId>,
    name: &str,
    caller: Option<&str>,
) -> Result<(Response<OwnBody>, &'static str), NotHeld> {
    let bytes = |response: Response<Bytes>| response.map(OwnBody::from);
    if !matches!(parts.method, Method::GET | Method::HEAD) {
        let response = outcome::method_not_allowed(&parts.method, "a bulk data file", "GET, HEAD");
        return Ok((bytes(response), "method-not-allowed"));
    }
    // Only names this layer writes reach the store: no `..`, no slashes, no encodings.
    let Some(id) = id.filter(|_| files::is_file_name(name)) else {
        return Err(NotHeld);
    };
    let record = match read(shared, id, "request the file").await {
        Ok(Some(record)) => record,
        Ok(None) => return Err(NotHeld),
        Err(reply) => return Ok((bytes(reply), "store-unavailable")),
    };
    let bulk = &shared.config.bulk;
    if bulk.requires_access_token && !shared.config.may_access(record.owner.as_deref(), caller) {
        return Ok((bytes(foreign(shared)), "denied"));
    }
    if !record.kind.is_bulk() || !matches!(record.state, JobState::Completed(_)) {
        return Ok((bytes(file_not_found()), "not-found"));
    }
    let head_only = parts.method == Method::HEAD;
    Ok(
        match files::serve(bulk, &id, name, &parts.headers, head_only).await {
            Ok(Some(response)) => (response, "served"),
            Ok(None) => (bytes(file_not_found()), "not-found"),
            Err(error) => {
                tracing::warn!(job.id = %id, %error, "reading a bulk data file failed");
                (
                    bytes(outcome::file_store_unavailable()),
                    "file-store-unavailable",
                )
            }
        },
    )
}

#[cfg(all(test, feature = "bulk"))]
mod tests {
    use http::StatusCode;
    use http::header::{ALLOW, CACHE_CONTROL, CONTENT_LENGTH, CONTENT_TYPE};
    use object_store::{ObjectStoreExt, PutPayload};

    use super::super::fixture::{self, ID};
    use super::super::{OwnRoute, handle};
    use super::*;
    use crate::job::JobKind;

    const NAME: &str = "Patient-1.ndjson";
    const LINES: &str = "{\"resourceType\":\"Patient\",\"id\":\"1\"}\n";

    fn id() -> Option<JobId> {
        JobId::parse(ID)
    }

    /// A layer with a completed bulk job of `kind` whose one file is [`NAME`].
    async fn with_file(kind: JobKind) -> std::sync::Arc<Shared> {
        let shared = fixture::shared(|b| b);
        let manifest = fixture::stored(StatusCode::OK, "{}");
        let record = fixture::record(&shared, kind, JobState::Completed(manifest));
        fixture::put(&shared, record).await;
        let bulk = &shared.config.bulk;
        let path = bulk.job_dir(&id().unwrap()).join(NAME);
        bulk.files
            .put(&path, PutPayload::from_static(LINES.as_bytes()))
            .await
            .unwrap();
        shared
    }

    // BULK-13, STATUS-16: a completed bulk job's file is served as NDJSON, `no-store`.
    #[tokio::test]
    async fn bulk_13_a_completed_jobs_file_is_served() {
        let shared = with_file(JobKind::Bulk).await;
        let response = file(&shared, &fixture::parts(Method::GET, ""), id(), NAME).await;
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(response.headers()[CONTENT_TYPE], "application/fhir+ndjson");
        assert_eq!(response.headers()[CACHE_CONTROL], "no-store");
        assert_eq!(fixture::bytes(response).await, LINES.as_bytes());
    }

    // BULK-13: a HEAD has the file's length and no body, through the dispatch too.
    #[tokio::test]
    async fn bulk_13_head_has_the_files_length_and_no_body() {
        let shared = with_file(JobKind::Bulk).await;
        let route = OwnRoute::File {
            id: id(),
            name: NAME.into(),
        };
        let response = handle(shared, route, fixture::parts(Method::HEAD, "")).await;
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(
            response.headers()[CONTENT_LENGTH],
            LINES.len().to_string().as_str()
        );
        assert!(fixture::bytes(response).await.is_empty());
    }

    // CANCEL-7, EXPIRE-3: names the layer never writes, unknown jobs, and jobs that are not
    // completed bulk jobs have no files; none of them is read from the file store.
    #[tokio::test]
    async fn cancel_7_no_file_outside_a_completed_bulk_job() {
        let shared = with_file(JobKind::Bulk).await;
        let get = fixture::parts(Method::GET, "");
        for (id, name) in [
            (id(), "../Patient-1.ndjson"),
            (id(), "Patient-1.json"),
            (id(), "Patient-2.ndjson"),
            (id(), ""),
            (None, NAME),
        ] {
            let response = file(&shared, &get, id, name).await;
            assert_eq!(response.status(), StatusCode::NOT_FOUND, "{name}");
            let body = fixture::json(response).await;
            assert_eq!(body["issue"][0]["code"], "not-found");
        }
        let interaction = with_file(JobKind::Interaction).await;
        let response = file(&interaction, &get, id(), NAME).await;
        assert_eq!(response.status(), StatusCode::NOT_FOUND);
    }

    // A HEAD of a missing file is the 404's headers without its body.
    #[tokio::test]
    async fn head_of_a_missing_file_has_no_body() {
        let shared = fixture::shared(|b| b);
        let route = OwnRoute::File {
            id: id(),
            name: NAME.into(),
        };
        let response = handle(shared, route, fixture::parts(Method::HEAD, "")).await;
        assert_eq!(response.status(), StatusCode::NOT_FOUND);
        assert_ne!(response.headers()[CONTENT_LENGTH], "0");
        assert!(fixture::bytes(response).await.is_empty());
    }

    // STATUS-15, AMB-31: files take GET and HEAD only.
    #[tokio::test]
    async fn status_15_files_take_get_and_head_only() {
        let shared = with_file(JobKind::Bulk).await;
        let response = file(&shared, &fixture::parts(Method::DELETE, ""), id(), NAME).await;
        assert_eq!(response.status(), StatusCode::METHOD_NOT_ALLOWED);
        assert_eq!(response.headers()[ALLOW], "GET, HEAD");
    }
}
