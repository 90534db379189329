//! The bulk pattern's own answers outside its files and manifest: `400` for a bulk operation
//! sent without `Prefer: respond-async` where that is refused (BULK-1), and the final status
//! and OperationOutcome of a failed bulk job (BULK-6).

use bytes::Bytes;
use http::{Response, StatusCode, Uri};

use crate::outcome::{IssueCode, error_response};

/// `400` for a bulk operation sent without `Prefer: respond-async`, where the layer is set to
/// refuse those (BULK-1).
pub(crate) fn prefer_required(uri: &Uri) -> Response<Bytes> {
    let operation = uri.path().rsplit('/').next().unwrap_or_default();
    error_response(
        StatusCode::BAD_REQUEST,
        IssueCode::Invalid,
        &format!(
            "{operation} is an asynchronous operation on this server: send it with the header \
             Prefer: respond-async."
        ),
    )
}

/// Used by the status route: a failed bulk job is final, so a status that tells a client to
/// poll again (`429`, `503`, e.g. for a job whose instance was lost) becomes `500` (BULK-6).
pub(crate) fn final_status(status: StatusCode) -> StatusCode {
    match status {
        StatusCode::TOO_MANY_REQUESTS | StatusCode::SERVICE_UNAVAILABLE => {
            StatusCode::INTERNAL_SERVER_ERROR
        }
        other => other,
    }
}

/// Used by the status route: a failed bulk job is final, so issue codes that tell a client to
/// poll again (`transient` and its children, STATUS-11) become `processing` (BULK-6).
pub(crate) fn final_outcome(body: &Bytes) -> Bytes {
    const TRANSIENT: [&str; 7] = [
        "transient",
        "lock-error",
        "no-store",
        "exception",
        "timeout",
        "incomplete",
        "throttled",
    ];
    let Ok(mut outcome) = serde_json::from_slice::<serde_json::Value>(body) else {
        return body.clone();
    };
    let mut changed = false;
    if let Some(issues) = outcome.get_mut("issue").and_then(|i| i.as_array_mut()) {
        for issue in issues {
            if let Some(code) = issue.get_mut("code") {
                if code.as_str().is_some_and(|c| TRANSIENT.contains(&c)) {
                    *code = "processing".into();
                    changed = true;
                }
            }
        }
    }
    if changed {
        Bytes::from(outcome.to_string())
    } else {
        body.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bulk_6_failed_jobs_carry_final_statuses() {
        assert_eq!(
            final_status(StatusCode::SERVICE_UNAVAILABLE),
            StatusCode::INTERNAL_SERVER_ERROR
        );
        assert_eq!(
            final_status(StatusCode::TOO_MANY_REQUESTS),
            StatusCode::INTERNAL_SERVER_ERROR
        );
        assert_eq!(
            final_status(StatusCode::BAD_GATEWAY),
            StatusCode::BAD_GATEWAY
        );
        assert_eq!(final_status(StatusCode::NOT_FOUND), StatusCode::NOT_FOUND);
    }

    #[test]
    fn bulk_6_failed_jobs_carry_final_codes() {
        let body = Bytes::from(
            r#"{"resourceType":"OperationOutcome","issue":[{"severity":"error","code":"transient"},{"severity":"error","code":"not-found"}]}"#,
        );
        let out: serde_json::Value = serde_json::from_slice(&final_outcome(&body)).unwrap();
        assert_eq!(out["issue"][0]["code"], "processing");
        assert_eq!(out["issue"][1]["code"], "not-found");
    }
}
