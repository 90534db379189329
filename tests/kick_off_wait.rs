//! `Prefer: respond-async, wait=N` at kick-off (PREFER-8), over a real socket: a job that ends
//! within the wait is answered synchronously, one that does not gets the usual 202 when the wait
//! runs out. Paused time: the wait is counted in the layer's timers, never in machine speed.

mod support;

use std::sync::Arc;
use std::time::Duration;

use http::header::{CONTENT_LOCATION, VARY};
use http::{Method, StatusCode};
use support::gated::{
    DESCRIBING, FHIR, PATIENT, assert_at_once, assert_held_for, invalid_observation, only_entry,
    start, timed, tokens, with_max_wait,
};
use support::within;

// PREFER-8, AMB-22: a job that ends within `wait` is answered with the inner response itself —
// status, the headers that describe it, body — as the synchronous call would have been; no
// status URL (`Content-Location`), no `Preference-Applied`, and no job left in the store.
#[tokio::test(start_paused = true)]
async fn prefer_8_wait_job_finishing_in_time_answers_synchronously() {
    let server = start(with_max_wait(10)).await;
    let synchronous = server.send(Method::POST, "/Patient", &[]).await;
    assert_eq!(synchronous.status, StatusCode::CREATED, "{synchronous:?}");

    let (reply, took) = timed(server.send(
        Method::POST,
        "/Patient",
        &[("prefer", "respond-async, wait=10")],
    ))
    .await;
    assert_at_once(took, "answered when the job ended");
    assert_eq!(reply.status, StatusCode::CREATED, "{reply:?}");
    for name in DESCRIBING {
        assert_eq!(
            reply.headers.get(&name),
            synchronous.headers.get(&name),
            "{name}: {reply:?}"
        );
    }
    assert_eq!(reply.body, synchronous.body);
    assert!(reply.headers.get(CONTENT_LOCATION).is_none(), "{reply:?}");
    assert!(
        reply.headers.get("preference-applied").is_none(),
        "{reply:?}"
    );
    assert_eq!(server.jobs.len(), 0, "the job is forgotten");
}

// PREFER-8, AMB-5: a failed inner request that ends in time is answered synchronously too:
// its own `422` + OperationOutcome.
#[tokio::test(start_paused = true)]
async fn prefer_8_wait_failed_request_in_time_answers_its_failure() {
    let server = start(with_max_wait(10)).await;
    let (reply, took) = timed(server.send(
        Method::POST,
        "/Observation",
        &[("prefer", "respond-async, wait=10")],
    ))
    .await;
    assert_at_once(took, "answered when the job failed");
    assert_eq!(reply.status, StatusCode::UNPROCESSABLE_ENTITY, "{reply:?}");
    assert_eq!(reply.header("content-type"), FHIR);
    assert_eq!(reply.json(), invalid_observation());
    assert!(reply.headers.get(CONTENT_LOCATION).is_none(), "{reply:?}");
    assert_eq!(server.jobs.len(), 0);
}

// PREFER-8, PREFER-11: a `GET` answered synchronously through `wait` varies with `Prefer`.
#[tokio::test(start_paused = true)]
async fn prefer_8_prefer_11_wait_get_answer_carries_vary_prefer() {
    let server = start(with_max_wait(10)).await;
    let reply = server
        .send(
            Method::GET,
            "/Patient/new",
            &[("prefer", "respond-async, wait=10")],
        )
        .await;
    assert_eq!(reply.status, StatusCode::OK, "{reply:?}");
    assert_eq!(reply.body, PATIENT.as_bytes());
    assert!(
        tokens(&reply, "vary")
            .iter()
            .any(|t| t.eq_ignore_ascii_case("prefer")),
        "{:?}",
        reply.headers.get_all(VARY)
    );
}

// PREFER-8: a job still running when `wait` (1 s) runs out gets the usual 202 — not before the
// second is up — and keeps running: once released, its status URL completes as always.
#[tokio::test(start_paused = true)]
async fn prefer_8_wait_job_not_finishing_in_time_gets_202() {
    let server = start(with_max_wait(10)).await;
    let (reply, took) = timed(server.send(
        Method::POST,
        "/$slow",
        &[("prefer", "respond-async, wait=1")],
    ))
    .await;
    assert_eq!(reply.status, StatusCode::ACCEPTED, "{reply:?}");
    assert_held_for(took, 1, "the kick-off of a job still running");
    let status_url = reply.header("content-location").to_owned();
    assert!(
        status_url.starts_with(&format!("{}/_async/", server.base)),
        "{status_url}"
    );
    assert_eq!(reply.header("preference-applied"), "respond-async");
    assert_eq!(
        server.poll(&status_url, &[]).await.status,
        StatusCode::ACCEPTED
    );

    server.gate.notify_one();
    let done = server.finished(&status_url).await;
    assert_eq!(only_entry(&done)["response"]["status"], "200 OK");
}

// PREFER-8, STATUS-4: progress reported while the kick-off waits is not the job's end: the
// kick-off keeps waiting, and answers the job's own response when it does end.
#[tokio::test(start_paused = true)]
async fn prefer_8_wait_outlasts_progress_reports() {
    let server = Arc::new(start(with_max_wait(10)).await);
    let kick_off = tokio::spawn({
        let server = server.clone();
        async move {
            server
                .send(
                    Method::POST,
                    "/$stepped",
                    &[("prefer", "respond-async, wait=10")],
                )
                .await
        }
    });
    server.handler_started().await;
    server.gate.notify_one();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!kick_off.is_finished(), "answered on a progress report");
    server.gate.notify_one();
    let reply = within("the kick-off", kick_off)
        .await
        .expect("the kick-off task");
    assert_eq!(reply.status, StatusCode::OK, "{reply:?}");
    assert_eq!(reply.json()["resourceType"], "Parameters");
    assert!(reply.headers.get(CONTENT_LOCATION).is_none(), "{reply:?}");
    assert_eq!(server.jobs.len(), 0);
}

// PREFER-8: the wait is `min(N, max_wait)`: `wait=10` under a 1 s cap answers 202 after about
// a second, well before ten.
#[tokio::test(start_paused = true)]
async fn prefer_8_wait_is_capped_by_max_wait() {
    let server = start(with_max_wait(1)).await;
    let (reply, took) = timed(server.send(
        Method::POST,
        "/$slow",
        &[("prefer", "respond-async, wait=10")],
    ))
    .await;
    assert_eq!(reply.status, StatusCode::ACCEPTED, "{reply:?}");
    assert_held_for(took, 1, "the cap of 1 s");
}

// PREFER-8, PREFER-4: with `max_wait` zero (the default) `wait` is ignored: 202 at once, even for
// a job that would end at once.
#[tokio::test(start_paused = true)]
async fn prefer_8_wait_is_ignored_without_max_wait() {
    let server = start(|b| b).await;
    let (reply, took) = timed(server.send(
        Method::POST,
        "/$slow",
        &[("prefer", "respond-async, wait=10")],
    ))
    .await;
    assert_eq!(reply.status, StatusCode::ACCEPTED, "{reply:?}");
    assert_at_once(took, "`wait` without max_wait");
    assert_eq!(reply.header("preference-applied"), "respond-async");

    let reply = server
        .send(
            Method::POST,
            "/Patient",
            &[("prefer", "respond-async, wait=10")],
        )
        .await;
    assert_eq!(reply.status, StatusCode::ACCEPTED, "{reply:?}");
    let done = server.finished(reply.header("content-location")).await;
    assert_eq!(only_entry(&done)["response"]["status"], "201 Created");
}

// PREFER-8: bulk kick-offs are always 202, even when the export would end within `wait`.
#[tokio::test(start_paused = true)]
async fn prefer_8_bulk_kick_off_with_wait_is_always_202() {
    let server = start(with_max_wait(10)).await;
    let (reply, took) = timed(server.send(
        Method::GET,
        "/Patient/$export",
        &[("prefer", "respond-async, wait=10")],
    ))
    .await;
    assert_eq!(reply.status, StatusCode::ACCEPTED, "{reply:?}");
    assert_at_once(took, "a bulk kick-off with `wait`");
    let done = server.finished(reply.header("content-location")).await;
    assert_eq!(done.status, StatusCode::OK, "{done:?}");
    assert_eq!(done.header("content-type"), "application/json");
    assert_eq!(done.json()["output"][0]["type"], "Patient");
}

// PREFER-5, PREFER-8: of two `wait` tokens the first counts: `wait=1, wait=100` answers 202
// after about a second.
#[tokio::test(start_paused = true)]
async fn prefer_5_prefer_8_first_wait_wins() {
    let server = start(with_max_wait(10)).await;
    let (reply, took) = timed(server.send(
        Method::POST,
        "/$slow",
        &[("prefer", "respond-async, wait=1, wait=100")],
    ))
    .await;
    assert_eq!(reply.status, StatusCode::ACCEPTED, "{reply:?}");
    assert_held_for(took, 1, "the first of two waits");
}
