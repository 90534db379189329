//! Validators and long polls on the status URL (STATUS-3…5), over a real socket: weak `ETag`s,
//! `If-None-Match` → `304`, and `Prefer: wait=N` polls held until the job changes or the wait
//! runs out. Paused time: a poll "answered at once" and one "held until the wait ran out" differ
//! by the layer's timers that fired, never by machine speed.

mod support;

use std::sync::Arc;
use std::time::Duration;

use http::header::RETRY_AFTER;
use http::{Method, StatusCode};
use support::gated::{
    assert_at_once, assert_held_for, header, only_entry, start, timed, with_max_wait,
};
use support::{Reply, assert_not_found, within};

/// How long a spawned long poll is left waiting before the test changes the job.
const HELD: Duration = Duration::from_millis(200);

// 3. STATUS-3…5: validators (`ETag`, `If-None-Match` → 304) and long polls.

fn etag(reply: &Reply) -> String {
    let tag = reply.header("etag").to_owned();
    assert!(tag.starts_with("W/\""), "a weak validator: {tag}");
    tag
}

// STATUS-3, STATUS-4, STATUS-14: every status answer carries a weak ETag; `If-None-Match` with
// the current one is 304 with no body and the same ETag; a change of progress or state changes
// the tag, and the old one then gets the full answer.
#[tokio::test(start_paused = true)]
async fn status_3_etag_304_on_an_unchanged_status() {
    let server = start(|b| b).await;
    let status_url = server
        .kick_off(Method::POST, "/$stepped", "respond-async")
        .await;
    server.handler_started().await;
    let running = server.poll(&status_url, &[]).await;
    assert_eq!(running.status, StatusCode::ACCEPTED, "{running:?}");
    let started = etag(&running);

    let unchanged = server
        .poll(&status_url, &[("if-none-match", started.as_str())])
        .await;
    assert_eq!(unchanged.status, StatusCode::NOT_MODIFIED, "{unchanged:?}");
    assert!(unchanged.body.is_empty(), "{unchanged:?}");
    assert_eq!(unchanged.header("etag"), started);
    assert!(
        unchanged.headers.get(RETRY_AFTER).is_some(),
        "{unchanged:?}"
    );
    // A list of candidates that contains the current tag is a match too.
    let listed = format!("W/\"0000\", {started}");
    let unchanged = server
        .poll(&status_url, &[("if-none-match", listed.as_str())])
        .await;
    assert_eq!(unchanged.status, StatusCode::NOT_MODIFIED, "{unchanged:?}");

    // Progress changes the tag (STATUS-4).
    server.gate.notify_one();
    let halfway = server
        .poll_until(&status_url, &[], "X-Progress", |r| {
            header(r, "x-progress") == Some("50% complete")
        })
        .await;
    assert_eq!(halfway.status, StatusCode::ACCEPTED);
    let progressed = etag(&halfway);
    assert_ne!(progressed, started, "progress changes the ETag");
    let full = server
        .poll(&status_url, &[("if-none-match", started.as_str())])
        .await;
    assert_eq!(full.status, StatusCode::ACCEPTED, "{full:?}");
    assert_eq!(full.header("x-progress"), "50% complete");
    assert_eq!(full.header("etag"), progressed);
    let unchanged = server
        .poll(&status_url, &[("if-none-match", progressed.as_str())])
        .await;
    assert_eq!(unchanged.status, StatusCode::NOT_MODIFIED, "{unchanged:?}");
    assert_eq!(unchanged.header("etag"), progressed);

    // The end changes it again; the finished answer is then stable.
    server.gate.notify_one();
    let done = server
        .poll_until(
            &status_url,
            &[("if-none-match", progressed.as_str())],
            "the job's end",
            |r| r.status != StatusCode::ACCEPTED,
        )
        .await;
    assert_eq!(only_entry(&done)["response"]["status"], "200 OK");
    let finished = etag(&done);
    assert_ne!(finished, progressed);
    assert_ne!(finished, started);
    let unchanged = server
        .poll(&status_url, &[("if-none-match", finished.as_str())])
        .await;
    assert_eq!(unchanged.status, StatusCode::NOT_MODIFIED, "{unchanged:?}");
    assert!(unchanged.body.is_empty(), "{unchanged:?}");
    assert_eq!(unchanged.header("etag"), finished);
    let again = server.poll(&status_url, &[]).await;
    assert_eq!(
        again.header("etag"),
        finished,
        "the same state, the same tag"
    );
    assert_eq!(again.body, done.body);
}

// STATUS-3, STATUS-5: a long poll (`Prefer: wait=10`) of a running job is answered when the
// job finishes (released 200 ms after the poll was sent): held until then, answered at once then.
#[tokio::test(start_paused = true)]
async fn status_3_long_poll_returns_when_the_job_finishes() {
    let server = Arc::new(start(with_max_wait(10)).await);
    let status_url = server
        .kick_off(Method::POST, "/$slow", "respond-async")
        .await;
    let poll = server.spawn_poll(&status_url, vec![("prefer", "wait=10".to_owned())]);
    tokio::time::sleep(HELD).await;
    assert!(
        !poll.is_finished(),
        "the long poll is held while the job runs"
    );
    server.gate.notify_one();
    let (reply, took) = within("the long poll", poll).await.expect("the poll task");
    assert_at_once(took - HELD, "the long poll woken by the job's end");
    assert_eq!(only_entry(&reply)["response"]["status"], "200 OK");
}

// STATUS-4: a long poll is also answered when the job reports progress. The poll names the tag
// it has; if the progress came first, the tag already differs and it is answered at once.
#[tokio::test(start_paused = true)]
async fn status_4_long_poll_returns_on_progress() {
    let server = Arc::new(start(with_max_wait(10)).await);
    let status_url = server
        .kick_off(Method::POST, "/$stepped", "respond-async")
        .await;
    server.handler_started().await;
    let running = server.poll(&status_url, &[]).await;
    assert_eq!(running.status, StatusCode::ACCEPTED, "{running:?}");
    assert!(running.headers.get("x-progress").is_none(), "{running:?}");
    let before = etag(&running);
    let poll = server.spawn_poll(
        &status_url,
        vec![("prefer", "wait=10".to_owned()), ("if-none-match", before)],
    );
    tokio::time::sleep(HELD).await;
    assert!(
        !poll.is_finished(),
        "the long poll is held while nothing changes"
    );
    server.gate.notify_one();
    let (reply, took) = within("the long poll", poll).await.expect("the poll task");
    assert_at_once(took - HELD, "the long poll woken by progress");
    assert_eq!(reply.status, StatusCode::ACCEPTED, "{reply:?}");
    assert_eq!(reply.header("x-progress"), "50% complete");
    assert_ne!(etag(&reply), etag(&running));
}

// STATUS-3, STATUS-5: a long poll of a job that does not change answers the usual 202 (with
// Retry-After) when `wait` (1 s) runs out — not before.
#[tokio::test(start_paused = true)]
async fn status_3_long_poll_times_out_with_202() {
    let server = start(with_max_wait(10)).await;
    let status_url = server
        .kick_off(Method::POST, "/$slow", "respond-async")
        .await;
    let (reply, took) = timed(server.poll(&status_url, &[("prefer", "wait=1")])).await;
    assert_eq!(reply.status, StatusCode::ACCEPTED, "{reply:?}");
    assert_held_for(took, 1, "a long poll of an unchanged job");
    assert!(reply.headers.get(RETRY_AFTER).is_some(), "{reply:?}");
    assert_eq!(reply.header("cache-control"), "no-store");
    etag(&reply);
}

// STATUS-3: a long poll is held at most `max_wait` (1 s here), whatever `wait` asks.
#[tokio::test(start_paused = true)]
async fn status_3_long_poll_is_capped_by_max_wait() {
    let server = start(with_max_wait(1)).await;
    let status_url = server
        .kick_off(Method::POST, "/$slow", "respond-async")
        .await;
    let (reply, took) = timed(server.poll(&status_url, &[("prefer", "wait=10")])).await;
    assert_eq!(reply.status, StatusCode::ACCEPTED, "{reply:?}");
    assert_held_for(took, 1, "the cap of 1 s");
}

// STATUS-3, STATUS-15: with `max_wait` zero (the default), `Prefer: wait` on a poll is ignored.
#[tokio::test(start_paused = true)]
async fn status_3_long_poll_is_off_without_max_wait() {
    let server = start(|b| b).await;
    let status_url = server
        .kick_off(Method::POST, "/$slow", "respond-async")
        .await;
    let (reply, took) = timed(server.poll(&status_url, &[("prefer", "wait=10")])).await;
    assert_eq!(reply.status, StatusCode::ACCEPTED, "{reply:?}");
    assert_at_once(took, "a poll without max_wait");
}

// STATUS-3, CANCEL-3: a job deleted while a long poll waits on it wakes the poll, which then
// answers 404 + OperationOutcome, well before `wait` runs out.
#[tokio::test(start_paused = true)]
async fn status_3_long_poll_of_a_job_deleted_meanwhile_answers_404() {
    let server = Arc::new(start(with_max_wait(10)).await);
    let status_url = server
        .kick_off(Method::POST, "/$slow", "respond-async")
        .await;
    server.handler_started().await;
    let running = server.poll(&status_url, &[]).await;
    assert_eq!(running.status, StatusCode::ACCEPTED, "{running:?}");
    let tag = etag(&running);
    let poll = server.spawn_poll(
        &status_url,
        vec![("prefer", "wait=10".to_owned()), ("if-none-match", tag)],
    );
    tokio::time::sleep(HELD).await;
    assert!(
        !poll.is_finished(),
        "the long poll is held while the job runs"
    );
    let deleted = server.client.delete(&status_url).await;
    assert_eq!(deleted.status, StatusCode::ACCEPTED, "{deleted:?}");
    let (reply, took) = within("the long poll", poll).await.expect("the poll task");
    assert_at_once(took - HELD, "the long poll woken by the DELETE");
    assert_not_found(&reply, "a long poll of a deleted job");
}

// STATUS-3: a long poll whose `If-None-Match` already differs from the current tag has news
// to tell, and is answered at once.
#[tokio::test(start_paused = true)]
async fn status_3_long_poll_with_a_stale_tag_answers_at_once() {
    let server = start(with_max_wait(10)).await;
    let status_url = server
        .kick_off(Method::POST, "/$slow", "respond-async")
        .await;
    let (reply, took) = timed(server.poll(
        &status_url,
        &[("prefer", "wait=10"), ("if-none-match", "W/\"stale\"")],
    ))
    .await;
    assert_at_once(took, "a long poll with a stale tag");
    assert_eq!(reply.status, StatusCode::ACCEPTED, "{reply:?}");
    etag(&reply);
}

// STATUS-3: a long poll of a finished job is answered at once with the completion.
#[tokio::test(start_paused = true)]
async fn status_3_long_poll_of_a_finished_job_answers_at_once() {
    let server = start(with_max_wait(10)).await;
    let status_url = server
        .kick_off(Method::POST, "/Patient", "respond-async")
        .await;
    server.finished(&status_url).await;
    let (reply, took) = timed(server.poll(&status_url, &[("prefer", "wait=10")])).await;
    assert_at_once(took, "a long poll of a finished job");
    assert_eq!(only_entry(&reply)["response"]["status"], "201 Created");
}
