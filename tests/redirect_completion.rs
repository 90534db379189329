//! The redirect completion mode (`CompletionMode::Redirect`, §2.10 FUT-1…7), over a real
//! socket: a finished job's status URL answers `303` to a result URL that replays what the
//! synchronous call would have answered, until the job is deleted or expires.

mod support;

use std::time::Duration;

use http::header::{ALLOW, CONTENT_LOCATION, LOCATION};
use http::{HeaderName, Method, StatusCode};
use support::gated::{
    DESCRIBING, FHIR, PATIENT, PATIENT_LOCATION, Server, assert_manifest, invalid_observation,
    only_entry, start,
};
use support::{assert_not_found, within};
use tower_fhir_async::{AsyncLayerBuilder, CompletionMode};

// 2. FUT-1…7: `CompletionMode::Redirect`.

fn redirect(b: AsyncLayerBuilder) -> AsyncLayerBuilder {
    b.completion(CompletionMode::Redirect)
}

/// FUT-1: a finished job's status answer: `303`, absolute `Location: {status URL}/result`,
/// empty body, `Cache-Control: no-store`. Returns the result URL.
async fn see_other(server: &Server, status_url: &str) -> String {
    let reply = server.finished(status_url).await;
    assert_eq!(reply.status, StatusCode::SEE_OTHER, "{reply:?}");
    assert_eq!(reply.header("location"), format!("{status_url}/result"));
    assert!(reply.body.is_empty(), "{reply:?}");
    assert_eq!(reply.header("cache-control"), "no-store");
    reply.header("location").to_owned()
}

// FUT-1, FUT-2, FUT-7, STATUS-14: a created resource: the status URL redirects to the result,
// which answers exactly what the synchronous create answered (201, Location, ETag,
// Last-Modified, Content-Type, the resource), as often as asked; HEAD gets the same head.
#[tokio::test]
async fn fut_1_fut_2_redirect_then_replay_of_a_created_resource() {
    let server = start(redirect).await;
    let synchronous = server.send(Method::POST, "/Patient", &[]).await;
    assert_eq!(synchronous.status, StatusCode::CREATED);

    let status_url = server
        .kick_off(Method::POST, "/Patient", "respond-async")
        .await;
    let result_url = see_other(&server, &status_url).await;
    for attempt in 0..2 {
        let result = server.client.get(&result_url).await;
        assert_eq!(result.status, StatusCode::CREATED, "#{attempt}: {result:?}");
        for name in DESCRIBING {
            assert_eq!(
                result.headers.get(&name),
                synchronous.headers.get(&name),
                "#{attempt} {name}: {result:?}"
            );
        }
        assert_eq!(result.body, synchronous.body, "#{attempt}");
        assert!(
            result.headers.get(CONTENT_LOCATION).is_none(),
            "#{attempt}: {result:?}"
        );
    }
    let head = server.client.send(Method::HEAD, &result_url, &[], "").await;
    assert_eq!(head.status, StatusCode::CREATED, "{head:?}");
    assert_eq!(head.header("location"), PATIENT_LOCATION);
    assert!(head.body.is_empty(), "{head:?}");

    // The status URL keeps redirecting (STATUS-14).
    let again = server.poll(&status_url, &[]).await;
    assert_eq!(again.status, StatusCode::SEE_OTHER, "{again:?}");
    assert_eq!(again.header("location"), result_url);
}

// FUT-1, FUT-2: a failed inner request completes the same way (303, not an error at the
// status URL); the result is the server's own `422` + OperationOutcome.
#[tokio::test]
async fn fut_1_fut_2_redirect_then_replay_of_a_failed_request() {
    let server = start(redirect).await;
    let status_url = server
        .kick_off(Method::POST, "/Observation", "respond-async")
        .await;
    let result_url = see_other(&server, &status_url).await;
    for attempt in 0..2 {
        let result = server.client.get(&result_url).await;
        assert_eq!(
            result.status,
            StatusCode::UNPROCESSABLE_ENTITY,
            "#{attempt}: {result:?}"
        );
        assert_eq!(result.header("content-type"), FHIR);
        assert_eq!(result.json(), invalid_observation(), "#{attempt}");
    }
}

// FUT-2, FUT-3: while the job runs, the status URL answers 202 (no redirect yet) and the
// result URL has nothing to show.
#[tokio::test]
async fn fut_3_running_job_polls_202_and_has_no_result_yet() {
    let server = start(redirect).await;
    let status_url = server
        .kick_off(Method::POST, "/$slow", "respond-async")
        .await;
    let running = server.poll(&status_url, &[]).await;
    assert_eq!(running.status, StatusCode::ACCEPTED, "{running:?}");
    assert!(running.headers.get(LOCATION).is_none(), "{running:?}");
    assert_not_found(
        &server.client.get(&format!("{status_url}/result")).await,
        "result of a running job",
    );

    server.gate.notify_one();
    let result_url = see_other(&server, &status_url).await;
    let result = server.client.get(&result_url).await;
    assert_eq!(result.status, StatusCode::OK, "{result:?}");
    assert_eq!(result.json()["resourceType"], "Parameters");
}

// FUT-7, CANCEL-3, EXPIRE-3: the result stays until the job is deleted; then 404 + OO.
#[tokio::test]
async fn fut_7_result_is_gone_after_delete() {
    let server = start(redirect).await;
    let status_url = server
        .kick_off(Method::POST, "/Patient", "respond-async")
        .await;
    let result_url = see_other(&server, &status_url).await;
    assert_eq!(
        server.client.get(&result_url).await.status,
        StatusCode::CREATED
    );
    let deleted = server.client.delete(&status_url).await;
    assert_eq!(deleted.status, StatusCode::ACCEPTED, "{deleted:?}");
    assert_not_found(&server.client.get(&result_url).await, "result after DELETE");
    assert_not_found(&server.client.get(&status_url).await, "status after DELETE");
}

// FUT-7, EXPIRE-3: the result stays until the job expires (retention 1 s here); then 404 + OO.
// Paused time: the layer's clock is tokio's, so the expiry comes after a second of it.
#[tokio::test(start_paused = true)]
async fn fut_7_result_is_gone_after_expiry() {
    let server = start(|b| redirect(b).retention(Duration::from_secs(1))).await;
    let status_url = server
        .kick_off(Method::POST, "/Patient", "respond-async")
        .await;
    let result_url = see_other(&server, &status_url).await;
    assert_eq!(
        server.client.get(&result_url).await.status,
        StatusCode::CREATED
    );
    let gone = within("the result's expiry", async {
        loop {
            let reply = server.client.get(&result_url).await;
            if reply.status != StatusCode::CREATED {
                return reply;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    assert_not_found(&gone, "result after expiry");
    assert_not_found(&server.client.get(&status_url).await, "status after expiry");
}

// FUT-2, STATUS-15: the result URL is read-only: other methods get 405 + `Allow: GET, HEAD`
// + OperationOutcome, and change nothing (a DELETE there cancels nothing).
#[tokio::test]
async fn fut_2_other_methods_on_the_result_get_405() {
    let server = start(redirect).await;
    let status_url = server
        .kick_off(Method::POST, "/Patient", "respond-async")
        .await;
    let result_url = see_other(&server, &status_url).await;
    for method in [Method::POST, Method::PUT, Method::PATCH, Method::DELETE] {
        let reply = server
            .client
            .send(method.clone(), &result_url, &[("content-type", FHIR)], "{}")
            .await;
        assert_eq!(
            reply.status,
            StatusCode::METHOD_NOT_ALLOWED,
            "{method}: {reply:?}"
        );
        assert_eq!(reply.header("allow"), "GET, HEAD", "{method}");
        reply.assert_outcome("not-supported");
    }
    assert_eq!(
        server.poll(&status_url, &[]).await.status,
        StatusCode::SEE_OTHER
    );
    assert_eq!(
        server.client.get(&result_url).await.status,
        StatusCode::CREATED
    );
}

// FUT-1, BUNDLE-1: in the default `CompletionMode::Bundle` there is no result route: the status
// URL answers the 200 batch-response Bundle and `{status URL}/result` is 404 + OO.
#[tokio::test]
async fn fut_1_bundle_mode_has_no_result_route() {
    let server = start(|b| b).await;
    let status_url = server
        .kick_off(Method::POST, "/Patient", "respond-async")
        .await;
    let done = server.finished(&status_url).await;
    assert_eq!(done.header("content-type"), FHIR);
    let entry = only_entry(&done);
    assert_eq!(entry["response"]["status"], "201 Created");
    assert_eq!(entry["response"]["location"], PATIENT_LOCATION);
    assert_not_found(
        &server.client.get(&format!("{status_url}/result")).await,
        "result in Bundle mode",
    );
    let post = server
        .client
        .send(Method::POST, &format!("{status_url}/result"), &[], "")
        .await;
    assert_eq!(post.status, StatusCode::NOT_FOUND, "{post:?}");
}

// FUT-1, BULK-8: the redirect mode is for the interaction pattern: a bulk job still completes
// with its 200 manifest at the status URL, and has no `/result`.
#[tokio::test]
async fn fut_1_redirect_mode_leaves_bulk_completion_alone() {
    let server = start(redirect).await;
    let status_url = server
        .kick_off(Method::GET, "/Patient/$export", "respond-async")
        .await;
    let done = server.finished(&status_url).await;
    assert_eq!(done.status, StatusCode::OK, "{done:?}");
    assert_manifest(&done, "a bulk job in redirect mode");
    assert_not_found(
        &server.client.get(&format!("{status_url}/result")).await,
        "a bulk job's result URL",
    );
}

// FUT-5, STATUS-15: result URLs of unknown or malformed job ids are 404 + OO.
#[tokio::test]
async fn fut_2_unknown_or_malformed_result_urls_are_404() {
    let server = start(redirect).await;
    for target in [
        "/_async/0123456789abcdef0123456789abcdef/result",
        "/_async/not-a-job/result",
        "/_async/../result",
        "/_async//result",
    ] {
        let reply = server.send(Method::GET, target, &[]).await;
        assert_not_found(&reply, target);
    }
}

// FUT-6, SEC-10: with `caller_from_header`, only the kick-off's caller gets the result; another
// caller, or none, gets the same 404 as an unknown job.
#[tokio::test]
async fn fut_6_result_is_bound_to_the_caller() {
    let server =
        start(|b| redirect(b).caller_from_header(HeaderName::from_static("x-client-id"))).await;
    let kicked = server
        .send(
            Method::POST,
            "/Patient",
            &[("prefer", "respond-async"), ("x-client-id", "alice")],
        )
        .await;
    assert_eq!(kicked.status, StatusCode::ACCEPTED, "{kicked:?}");
    let status_url = kicked.header("content-location").to_owned();
    let alice = [("x-client-id", "alice")];
    let done = server
        .poll_until(&status_url, &alice, "the job's end", |r| {
            r.status != StatusCode::ACCEPTED
        })
        .await;
    assert_eq!(done.status, StatusCode::SEE_OTHER, "{done:?}");
    let result_url = done.header("location").to_owned();

    let bob = server
        .client
        .send(Method::GET, &result_url, &[("x-client-id", "bob")], "")
        .await;
    assert_not_found(&bob, "another caller's result");
    assert_not_found(&server.client.get(&result_url).await, "an anonymous result");
    let bob_status = server.poll(&status_url, &[("x-client-id", "bob")]).await;
    assert_not_found(&bob_status, "another caller's status");

    let result = server
        .client
        .send(Method::GET, &result_url, &alice, "")
        .await;
    assert_eq!(result.status, StatusCode::CREATED, "{result:?}");
    assert_eq!(result.body, PATIENT.as_bytes());
}

// STATUS-15: the 405 on a status URL still lists the status URL's own methods (the result
// route's `Allow` is only for `/result`).
#[tokio::test]
async fn status_15_status_url_allow_is_unchanged_in_redirect_mode() {
    let server = start(redirect).await;
    let status_url = server
        .kick_off(Method::POST, "/Patient", "respond-async")
        .await;
    let reply = server.client.send(Method::PUT, &status_url, &[], "").await;
    assert_eq!(reply.status, StatusCode::METHOD_NOT_ALLOWED, "{reply:?}");
    assert_eq!(reply.headers.get(ALLOW).unwrap(), "GET, HEAD, DELETE");
}
