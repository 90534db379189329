//! The audit trail: one `tracing` event per kick-off, status, cancel and file request, with
//! target `tower_fhir_async::audit`, the job id, the caller and the outcome — denials included.
//! Never a credential: the caller is the keyed digest `Config::caller_of` made of its identity.

use crate::job::JobId;

/// What was asked of the layer.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Action {
    KickOff,
    Status,
    Cancel,
    File,
}

impl Action {
    const fn as_str(self) -> &'static str {
        match self {
            Self::KickOff => "kick-off",
            Self::Status => "status",
            Self::Cancel => "cancel",
            Self::File => "file",
        }
    }
}

/// Records one audit event, and counts it in `fhir_async_requests_total` (labels `action`,
/// `outcome`).
pub(crate) fn event(
    action: Action,
    id: Option<JobId>,
    caller: Option<&str>,
    outcome: &'static str,
) {
    metrics::counter!(
        crate::meters::REQUESTS,
        "action" => action.as_str(),
        "outcome" => outcome,
    )
    .increment(1);
    tracing::info!(
        target: "tower_fhir_async::audit",
        action = action.as_str(),
        job.id = id.map(tracing::field::display),
        caller,
        outcome,
    );
}
