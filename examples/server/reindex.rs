//! `POST [base]/$reindex`: a deliberately slow operation (`--reindex-secs`, default 10 s) that
//! shows what a cooperating handler gets from the AsyncLayer: it reports progress through the
//! `JobContext` and stops as soon as the job is cancelled. Called synchronously (no `JobContext`)
//! it simply runs to the end.

use axum::Extension;
use axum::extract::State;
use http::StatusCode;
use serde_json::{Value, json};
use tokio::time::Instant;
use tower_fhir_async::JobContext;

use crate::app::SharedApp;
use crate::auth::CallerId;
use crate::db::ResourceType;
use crate::response::FhirResponse;

/// Progress moves in 1 % steps; each step also checks for cancellation.
const STEPS: usize = 100;

pub(crate) async fn reindex(
    State(app): State<SharedApp>,
    job: Option<Extension<JobContext>>,
    caller: Option<Extension<CallerId>>,
) -> FhirResponse {
    let job = job.map(|Extension(job)| job);
    // A snapshot of every resource; "reindexing" checks that each patient reference resolves.
    let resources: Vec<_> = ResourceType::ALL
        .into_iter()
        .flat_map(|kind| app.db.scan(kind, |_| true))
        .collect();
    let total = resources.len();
    // Deadlines from the start, not fixed pauses, so the total stays close to --reindex-secs.
    let started = tokio::time::Instant::now();
    tracing::info!(
        total,
        caller = caller.as_ref().map(|Extension(c)| c.0.as_str()),
        background = job.is_some(),
        "reindex started"
    );

    let (mut visited, mut dangling) = (0, 0);
    for step in 1..=STEPS {
        let deadline = started + app.reindex_duration * step as u32 / STEPS as u32;
        if !wait_or_cancel(job.as_ref(), deadline).await {
            tracing::info!(visited, total, "reindex cancelled");
            return answer(visited, dangling, true);
        }
        let end = total * step / STEPS;
        for stored in &resources[visited..end] {
            let resolves = match (stored.kind, stored.patient_id()) {
                (ResourceType::Observation | ResourceType::Condition, Some(patient)) => {
                    app.db.get(ResourceType::Patient, patient).is_some()
                }
                (ResourceType::Observation | ResourceType::Condition, None) => false,
                _ => true,
            };
            dangling += usize::from(!resolves);
        }
        visited = end;
        if let Some(job) = &job {
            job.set_percent(step as u8);
        }
    }
    tracing::info!(visited, dangling, "reindex finished");
    answer(visited, dangling, false)
}

/// Sleeps until `deadline`; `false` when the job was cancelled first.
async fn wait_or_cancel(job: Option<&JobContext>, deadline: Instant) -> bool {
    let Some(job) = job else {
        tokio::time::sleep_until(deadline).await;
        return true;
    };
    if job.is_cancelled() {
        return false;
    }
    tokio::select! {
        () = job.cancelled() => false,
        () = tokio::time::sleep_until(deadline) => true,
    }
}

fn answer(reindexed: usize, dangling: usize, cancelled: bool) -> FhirResponse {
    let mut parameter = vec![
        json!({ "name": "reindexed", "valueInteger": reindexed }),
        json!({ "name": "unresolvedReferences", "valueInteger": dangling }),
    ];
    // Only the layer sees a cancelled job's answer (and discards it), but it should still say
    // truthfully that the walk stopped early.
    if cancelled {
        parameter.push(json!({ "name": "cancelled", "valueBoolean": true }));
    }
    FhirResponse::json(
        StatusCode::OK,
        json!({ "resourceType": "Parameters", "parameter": Value::Array(parameter) }),
    )
}
