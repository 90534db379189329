//! `DELETE` on a status URL: the job is gone and its work stopped (CANCEL-1…7).

use bytes::Bytes;
use http::header::CACHE_CONTROL;
use http::request::Parts;
use http::{Response, StatusCode};

use super::lookup::{foreign, read};
use crate::bulk::files;
use crate::follow::Native;
use crate::job::JobId;
use crate::outcome::{self, NO_STORE, job_not_found};
use crate::state::Shared;

/// `DELETE` on a status URL: `202`, and the job is gone (CANCEL-1…7); with the outcome for the
/// audit trail.
pub(super) async fn cancel(
    shared: &Shared,
    id: JobId,
    caller: Option<&str>,
) -> (Response<Bytes>, &'static str) {
    let (reply, outcome, _) = cancel_job(shared, id, caller, None).await;
    (reply, outcome)
}

/// [`cancel`] where exports the wrapped service runs itself are linked (`UpstreamFiles::Link`):
/// also the upstream's job a deleted linked export recorded, to be sent a `DELETE` with the
/// caller's credentials (`parts`) so that its files are released (CANCEL-5).
pub(super) async fn cancel_linked(
    shared: &Shared,
    id: JobId,
    caller: Option<&str>,
    parts: &Parts,
) -> (Response<Bytes>, &'static str, Option<Native>) {
    cancel_job(shared, id, caller, Some(parts)).await
}

async fn cancel_job(
    shared: &Shared,
    id: JobId,
    caller: Option<&str>,
    linked: Option<&Parts>,
) -> (Response<Bytes>, &'static str, Option<Native>) {
    const RETRY: &str = "send the DELETE";
    let runner = &shared.runner;
    let mut upstream = None;
    if shared.config.caller.is_some() || linked.is_some() {
        // The owner never changes, so reading it first leaves no window to exploit. A job that
        // completes between this read and the cancel keeps its upstream job (best effort).
        match read(shared, id, RETRY).await {
            Ok(Some(record)) if shared.config.may_access(record.owner.as_deref(), caller) => {
                upstream = linked
                    .and_then(|parts| Native::recorded(&record, &parts.headers, &parts.extensions));
            }
            Ok(Some(_)) => return (foreign(shared), "denied", None),
            Ok(None) => return (job_not_found(), "not-found", None),
            Err(reply) => return (reply, "store-unavailable", None),
        }
    }
    match runner.store.cancel(&id, runner.clock.now()).await {
        Ok(true) => {
            let stopped = runner.registry.cancel_local(&id);
            // CANCEL-5: a bulk job's files go with it.
            files::remove_job(&shared.config.bulk, &id).await;
            if let Some(polls) = &shared.polls {
                polls.forget(&id);
            }
            tracing::info!(job.id = %id, stopped, linked = upstream.is_some(), "asynchronous job cancelled");
            let mut reply = Response::new(Bytes::new());
            *reply.status_mut() = StatusCode::ACCEPTED;
            reply.headers_mut().insert(CACHE_CONTROL, NO_STORE);
            (reply, "cancelled", upstream)
        }
        Ok(false) => (job_not_found(), "not-found", None),
        Err(error) => {
            tracing::warn!(%error, "cancelling a job failed");
            (
                outcome::job_store_unavailable(RETRY),
                "store-unavailable",
                None,
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::fixture::{self, ID};
    use super::super::lookup;
    use super::*;
    use crate::job::{JobKind, JobState};

    fn id() -> JobId {
        JobId::parse(ID).unwrap()
    }

    // CANCEL-1, CANCEL-2, STATUS-16: `202`, `no-store`, and the job is gone from the store.
    #[tokio::test]
    async fn cancel_2_an_unfinished_job_answers_202_and_is_gone() {
        let shared = fixture::shared(|b| b);
        let record = fixture::record(&shared, JobKind::Interaction, JobState::Accepted);
        fixture::put(&shared, record).await;
        let (reply, outcome) = cancel(&shared, id(), None).await;
        assert_eq!(reply.status(), StatusCode::ACCEPTED);
        assert_eq!(reply.headers()[CACHE_CONTROL], "no-store");
        assert!(reply.body().is_empty());
        assert_eq!(outcome, "cancelled");
        assert!(lookup::read(&shared, id(), "poll").await.unwrap().is_none());
    }

    // CANCEL-3, CANCEL-7: a second DELETE, or one for a job nobody has, is `404` + OperationOutcome.
    #[tokio::test]
    async fn cancel_7_an_unknown_or_cancelled_job_is_404() {
        let shared = fixture::shared(|b| b);
        let (reply, outcome) = cancel(&shared, id(), None).await;
        assert_eq!(reply.status(), StatusCode::NOT_FOUND);
        assert_eq!(outcome, "not-found");
        let record = fixture::record(&shared, JobKind::Interaction, JobState::Accepted);
        fixture::put(&shared, record).await;
        assert_eq!(
            cancel(&shared, id(), None).await.0.status(),
            StatusCode::ACCEPTED
        );
        let (again, _) = cancel(&shared, id(), None).await;
        assert_eq!(again.status(), StatusCode::NOT_FOUND);
        let body: serde_json::Value = serde_json::from_slice(again.body()).unwrap();
        assert_eq!(body["issue"][0]["code"], "not-found");
    }

    // CANCEL-5: a finished job can be deleted too; its kept result goes with it.
    #[tokio::test]
    async fn cancel_5_a_finished_jobs_result_is_deleted() {
        let shared = fixture::shared(|b| b);
        let done = JobState::Completed(fixture::stored(StatusCode::OK, "{}"));
        fixture::put(
            &shared,
            fixture::record(&shared, JobKind::Interaction, done),
        )
        .await;
        assert_eq!(
            cancel(&shared, id(), None).await.0.status(),
            StatusCode::ACCEPTED
        );
        assert!(lookup::read(&shared, id(), "poll").await.unwrap().is_none());
    }

    // CANCEL-5, GATEWAY-5: deleting a completed linked export names the upstream's job it
    // recorded, to be deleted with the credentials of the caller's DELETE; any other job
    // (unfinished, an interaction, no upstream job) names none.
    #[tokio::test]
    async fn cancel_5_a_linked_export_names_its_upstream_job() {
        let linked = || {
            let mut manifest = fixture::stored(StatusCode::OK, "{}");
            manifest.headers.push((
                crate::follow::UPSTREAM_JOB,
                http::HeaderValue::from_static("/fhir/_async/upstream-job"),
            ));
            manifest
        };
        let mut parts = fixture::parts(http::Method::DELETE, ID);
        parts.headers.insert(
            http::header::AUTHORIZATION,
            http::HeaderValue::from_static("Bearer deleter"),
        );
        let shared = fixture::shared(|b| b);
        for (kind, state, names) in [
            (JobKind::Bulk, JobState::Completed(linked()), true),
            (
                JobKind::BulkSeparateStatus,
                JobState::Completed(linked()),
                true,
            ),
            (JobKind::Interaction, JobState::Completed(linked()), false),
            (
                JobKind::Bulk,
                JobState::Completed(fixture::stored(StatusCode::OK, "{}")),
                false,
            ),
            (JobKind::Bulk, JobState::Accepted, false),
        ] {
            fixture::put(&shared, fixture::record(&shared, kind, state)).await;
            let (reply, outcome, upstream) = cancel_linked(&shared, id(), None, &parts).await;
            assert_eq!(reply.status(), StatusCode::ACCEPTED);
            assert_eq!(outcome, "cancelled");
            assert_eq!(
                upstream.as_ref().map(|job| job.status().to_string()),
                names.then(|| "/fhir/_async/upstream-job".to_owned()),
                "{kind:?}"
            );
        }
        let (reply, _, upstream) = cancel_linked(&shared, id(), None, &parts).await;
        assert_eq!(reply.status(), StatusCode::NOT_FOUND);
        assert!(upstream.is_none());
    }

    // SEC-10: with caller binding, another caller's DELETE neither cancels nor reveals the job.
    #[tokio::test]
    async fn sec_10_another_callers_delete_changes_nothing() {
        let shared = fixture::shared(|b| b.caller_from_header(http::header::AUTHORIZATION));
        let owner = shared.config.caller_key.digest("alice");
        let record = fixture::record(&shared, JobKind::Interaction, JobState::Accepted)
            .with_owner(Some(owner.clone()));
        fixture::put(&shared, record).await;
        let stranger = shared.config.caller_key.digest("mallory");
        let (reply, outcome) = cancel(&shared, id(), Some(&stranger)).await;
        assert_eq!(reply.status(), StatusCode::NOT_FOUND);
        assert_eq!(outcome, "denied");
        assert!(lookup::read(&shared, id(), "poll").await.unwrap().is_some());
        let (reply, _) = cancel(&shared, id(), Some(&owner)).await;
        assert_eq!(reply.status(), StatusCode::ACCEPTED);
    }
}
