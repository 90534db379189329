//! Bulk `separate-export-status` (PREFER-13, STATUS-17), over a real socket: with the token,
//! every status answer is `200` and `X-Export-Status` carries the job's own status.

mod support;

use std::time::Duration;

use http::header::{CACHE_CONTROL, RETRY_AFTER};
use http::{Method, StatusCode};
use support::gated::{FHIR, Server, assert_manifest, header, only_entry, start, tokens};

// 4. PREFER-13, STATUS-17: `separate-export-status`.

const SEPARATE: &str = "respond-async, separate-export-status";

/// PREFER-10, PREFER-13: a bulk kick-off with `prefer`: 202, and `Preference-Applied` lists
/// exactly the honoured tokens. Returns the status URL.
async fn bulk_kick_off(server: &Server, target: &str, prefer: &str) -> String {
    let reply = server
        .send(Method::GET, target, &[("prefer", prefer)])
        .await;
    assert_eq!(reply.status, StatusCode::ACCEPTED, "{target}: {reply:?}");
    let applied = tokens(&reply, "preference-applied");
    let expected: &[&str] = if prefer == SEPARATE {
        &["respond-async", "separate-export-status"]
    } else {
        &["respond-async"]
    };
    assert_eq!(applied, expected, "{target} with Prefer: {prefer}");
    reply.header("content-location").to_owned()
}

// `Retry-After` works as without it. Without the token: plain 202, then 200 + manifest, and
// never `X-Export-Status`.
#[tokio::test]
async fn prefer_13_status_17_running_and_complete_with_and_without_the_token() {
    let server = start(|b| b).await;
    for prefer in [SEPARATE, "respond-async"] {
        let separate = prefer == SEPARATE;
        let status_url = bulk_kick_off(&server, "/$export", prefer).await;

        let running = server.poll(&status_url, &[]).await;
        if separate {
            assert_eq!(running.status, StatusCode::OK, "{running:?}");
            assert_eq!(running.header("x-export-status"), "202 Accepted");
        } else {
            assert_eq!(running.status, StatusCode::ACCEPTED, "{running:?}");
            assert!(
                running.headers.get("x-export-status").is_none(),
                "{running:?}"
            );
        }
        assert!(running.headers.get(RETRY_AFTER).is_some(), "{running:?}");
        assert!(running.body.is_empty(), "{prefer}: {running:?}");

        server.gate.notify_one();
        let done = server
            .poll_until(&status_url, &[], "the export's end", |r| {
                r.status != StatusCode::ACCEPTED
                    && header(r, "x-export-status") != Some("202 Accepted")
            })
            .await;
        assert_eq!(done.status, StatusCode::OK, "{prefer}: {done:?}");
        if separate {
            assert_eq!(done.header("x-export-status"), "200 OK");
        } else {
            assert!(done.headers.get("x-export-status").is_none(), "{done:?}");
        }
        assert_manifest(&done, prefer);
        assert_eq!(done.headers.get(CACHE_CONTROL).unwrap(), "no-store");
    }
}

// PREFER-13, STATUS-17 (failed), BULK-6: an export whose first request the server refuses
// (404 + OperationOutcome): with the token, 200 + `X-Export-Status: 404 Not Found` + the
// OperationOutcome; without it, 404 + the OperationOutcome and no `X-Export-Status`.
#[tokio::test]
async fn prefer_13_status_17_failed_export_with_and_without_the_token() {
    // Without the kick-off's wait, so that the 404 reaches the status URL.
    let server = start(|b| b.kickoff_wait(Duration::ZERO)).await;
    for prefer in [SEPARATE, "respond-async"] {
        let status_url = bulk_kick_off(&server, "/Group/g-404/$export", prefer).await;
        let failed = server
            .poll_until(&status_url, &[], "the export's failure", |r| {
                r.status != StatusCode::ACCEPTED
                    && header(r, "x-export-status") != Some("202 Accepted")
            })
            .await;
        if prefer == SEPARATE {
            assert_eq!(failed.status, StatusCode::OK, "{failed:?}");
            assert_eq!(failed.header("x-export-status"), "404 Not Found");
        } else {
            assert_eq!(failed.status, StatusCode::NOT_FOUND, "{failed:?}");
            assert!(
                failed.headers.get("x-export-status").is_none(),
                "{failed:?}"
            );
        }
        assert_eq!(failed.header("content-type"), FHIR, "{prefer}");
        let outcome = failed.json();
        assert_eq!(outcome["resourceType"], "OperationOutcome", "{outcome}");
        assert_eq!(
            outcome["issue"][0]["diagnostics"], "Group g-404 is unknown",
            "{prefer}: the server's own outcome"
        );
        // STATUS-14: the answer is the same on the next poll.
        let again = server.poll(&status_url, &[]).await;
        assert_eq!((again.status, again.body), (failed.status, failed.body));
    }
}

// PREFER-13, SEL-3: the `_outputFormat` form of a bulk kick-off honours the token the same way.
#[tokio::test]
async fn prefer_13_output_format_kick_off_with_separate_export_status() {
    let server = start(|b| b).await;
    let status_url = bulk_kick_off(
        &server,
        "/Observation?_outputFormat=application%2Ffhir%2Bndjson",
        SEPARATE,
    )
    .await;
    let done = server
        .poll_until(&status_url, &[], "the export's end", |r| {
            header(r, "x-export-status") != Some("202 Accepted")
        })
        .await;
    assert_eq!(done.status, StatusCode::OK, "{done:?}");
    assert_eq!(done.header("x-export-status"), "200 OK");
    assert_eq!(done.header("content-type"), "application/json");
    assert_eq!(done.json()["output"][0]["type"], "Observation");
}

// PREFER-13, PREFER-4, AMB-24: the token is not defined for the interaction pattern: it is
// ignored (not in `Preference-Applied`), and status answers are the usual 202 / 200 Bundle
// with no `X-Export-Status`.
#[tokio::test]
async fn prefer_13_interaction_pattern_ignores_separate_export_status() {
    let server = start(|b| b).await;
    let reply = server
        .send(Method::POST, "/$slow", &[("prefer", SEPARATE)])
        .await;
    assert_eq!(reply.status, StatusCode::ACCEPTED, "{reply:?}");
    assert_eq!(tokens(&reply, "preference-applied"), ["respond-async"]);
    let status_url = reply.header("content-location").to_owned();
    let running = server.poll(&status_url, &[]).await;
    assert_eq!(running.status, StatusCode::ACCEPTED, "{running:?}");
    assert!(
        running.headers.get("x-export-status").is_none(),
        "{running:?}"
    );
    server.gate.notify_one();
    let done = server.finished(&status_url).await;
    assert_eq!(only_entry(&done)["response"]["status"], "200 OK");
    assert!(done.headers.get("x-export-status").is_none(), "{done:?}");
}
