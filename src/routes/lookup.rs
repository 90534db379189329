//! The job a route names: read from the store, with the answer for when the store cannot be
//! reached, and the answer another caller gets for it (SEC-10).

use bytes::Bytes;
use http::Response;

use crate::job::{JobId, JobRecord};
use crate::outcome;
use crate::state::Shared;

/// Reads a job; `Err` is the answer when the store is unavailable, telling the client to
/// `retry` (e.g. "poll") later.
pub(super) async fn read(
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
            outcome::job_store_unavailable(retry)
        })
}

/// The answer to another caller's request for a job (SEC-10): like no job at all, or `403`
/// when the layer is configured so.
pub(super) fn foreign(shared: &Shared) -> Response<Bytes> {
    outcome::foreign_job(shared.config.foreign_status)
}

#[cfg(test)]
mod tests {
    use http::StatusCode;

    use super::super::fixture::{self, ID};
    use super::*;
    use crate::job::{JobKind, JobState};

    #[tokio::test]
    async fn reads_a_recorded_job_and_no_other() {
        let shared = fixture::shared(|b| b);
        let id = JobId::parse(ID).unwrap();
        assert!(read(&shared, id, "poll").await.unwrap().is_none());
        let record = fixture::record(&shared, JobKind::Interaction, JobState::Accepted);
        fixture::put(&shared, record).await;
        let read = read(&shared, id, "poll").await.unwrap().unwrap();
        assert_eq!(read.id, id);
        assert_eq!(read.state, JobState::Accepted);
    }

    // SEC-10: another caller's job is a 404 by default, a 403 when configured.
    #[test]
    fn sec_10_foreign_is_404_unless_403_is_configured() {
        let hidden = foreign(&fixture::shared(|b| b));
        assert_eq!(hidden.status(), StatusCode::NOT_FOUND);
        let told = foreign(&fixture::shared(|b| {
            b.foreign_job_status(StatusCode::FORBIDDEN)
        }));
        assert_eq!(told.status(), StatusCode::FORBIDDEN);
        let body: serde_json::Value = serde_json::from_slice(told.body()).unwrap();
        assert_eq!(body["issue"][0]["code"], "forbidden");
    }
}
