//! The demo server as shipped has slow-client and abuse limits (SEC-7, SEC-13, STATUS-6; issue 11
//! item 7): a connection that dribbles its request head, or sends nothing, is closed after the
//! header timeout; polling one job in a tight loop gets `429` + `Retry-After`, while a client
//! polling once a second, or following `Retry-After`, never does; a client over its job quota
//! gets `429`. The demo runs as a child process on 127.0.0.1 (`examples/server`;
//! `cargo build --example server` first when running this file alone).
//!
//! Every wait is bounded and what is asserted is what happened (a close, statuses, counts),
//! never how fast.

#[path = "support/demo.rs"]
mod demo;
mod support;

use std::time::Duration;

use demo::Demo;
use http::{Method, StatusCode};
use support::{Reply, TestClient};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The bound on any one wait in this file; never a timing assertion.
const BOUND: Duration = Duration::from_secs(30);

/// A request head of about 2 kB: sent a byte every 20 ms it would take some 40 s.
fn slow_head() -> Vec<u8> {
    let mut head = b"GET /fhir/metadata HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Padding: ".to_vec();
    head.extend(std::iter::repeat_n(b'a', 2000));
    head.extend_from_slice(b"\r\n\r\n");
    head
}

// SEC-7: a client sending its request head one byte at a time is cut off by the header timeout
// (here 500 ms) long before the head is complete, and gets no answer; a connection that sends
// nothing at all is closed too; the server goes on serving others.
#[tokio::test]
async fn sec_7_slow_and_silent_connections_are_closed_after_the_header_timeout() {
    let demo = Demo::start(&["--patients", "20", "--header-timeout", "500ms"]);

    let head = slow_head();
    let stream = TcpStream::connect(demo.addr).await.expect("connected");
    let (mut reader, mut writer) = stream.into_split();
    // The server's side: everything it sends until it closes the connection.
    let closed = tokio::spawn(async move {
        let mut received = Vec::new();
        let _ = reader.read_to_end(&mut received).await;
        received
    });
    let mut sent = 0;
    for byte in &head {
        if closed.is_finished() || writer.write_all(&[*byte]).await.is_err() {
            break;
        }
        sent += 1;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        sent < head.len(),
        "the server took the whole {}-byte head at a byte per 20 ms without closing; its log:\n{}",
        head.len(),
        demo.log_tail()
    );
    let received = tokio::time::timeout(BOUND, closed)
        .await
        .expect("the connection closed")
        .expect("the reader ran");
    assert!(
        received.is_empty(),
        "a half-sent request got an answer: {}",
        String::from_utf8_lossy(&received)
    );

    let mut silent = TcpStream::connect(demo.addr).await.expect("connected");
    let mut buf = [0u8; 64];
    let read = tokio::time::timeout(BOUND, silent.read(&mut buf))
        .await
        .expect("a silent connection is closed");
    assert!(
        matches!(read, Ok(0) | Err(_)),
        "a silent connection got bytes: {read:?}"
    );

    let reply = TestClient::default()
        .get(&format!("{}/metadata", demo.base))
        .await;
    assert_eq!(reply.status, StatusCode::OK, "the server still serves");
}

/// `Retry-After` as delta seconds.
fn retry_after(reply: &Reply) -> u64 {
    let value = reply.header("retry-after");
    value
        .parse()
        .unwrap_or_else(|_| panic!("Retry-After is not delta seconds: {reply:?}"))
}

/// Kicks off a `$reindex` that runs for ten minutes, as `token` when given; the reply.
async fn reindex(client: &TestClient, demo: &Demo, token: Option<&str>) -> Reply {
    let bearer = token.map(|t| format!("Bearer {t}"));
    let headers: Vec<(&str, &str)> = bearer
        .iter()
        .map(|bearer| ("authorization", bearer.as_str()))
        .collect();
    client
        .send_async(
            Method::POST,
            &format!("{}/$reindex", demo.base),
            &headers,
            "",
        )
        .await
}

// STATUS-6, SEC-13: by default the demo throttles polls of one job to one per 250 ms: a tight
// loop of polls gets 429 + `throttled` + a delta-seconds `Retry-After`, and the job goes on;
// a client that polls once a second, or waits what `Retry-After` says, never sees 429.
#[tokio::test]
async fn status_6_tight_polling_gets_429_and_polite_polling_never_does() {
    let demo = Demo::start(&["--patients", "20", "--reindex-secs", "600"]);
    let client = TestClient::default();

    let tight = reindex(&client, &demo, None).await;
    assert_eq!(tight.status, StatusCode::ACCEPTED, "{tight:?}");
    let tight = tight.header("content-location").to_owned();
    let mut throttled = 0;
    for _ in 0..20 {
        let reply = client.get(&tight).await;
        match reply.status {
            StatusCode::ACCEPTED => {}
            StatusCode::TOO_MANY_REQUESTS => {
                throttled += 1;
                reply.assert_outcome("throttled");
                assert!(retry_after(&reply) >= 1, "{reply:?}");
            }
            other => panic!("a tight poll got {other}: {reply:?}"),
        }
    }
    assert!(throttled > 0, "20 back-to-back polls were all answered 202");

    let polite = reindex(&client, &demo, None).await;
    assert_eq!(polite.status, StatusCode::ACCEPTED, "{polite:?}");
    let polite = polite.header("content-location").to_owned();
    let mut statuses = Vec::new();
    for _ in 0..4 {
        let reply = client.get(&polite).await;
        statuses.push(reply.status.as_u16());
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    // Following `Retry-After` (the job's first answers say 1 s).
    for _ in 0..3 {
        let reply = client.get(&polite).await;
        statuses.push(reply.status.as_u16());
        let wait = retry_after(&reply);
        tokio::time::sleep(Duration::from_secs(wait)).await;
    }
    assert_eq!(statuses, [202; 7], "polite polls were throttled");
    // The tight poller's job went on.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(client.get(&tight).await.status, StatusCode::ACCEPTED);
}

// SEC-13, KICK-8: with `--auth` the per-client quota is on (here lowered to 2 by its flag): a
// client's third unfinished job is refused with 429 `throttled`, another client is still
// admitted; `off` lifts the limit.
#[tokio::test]
async fn sec_13_per_client_job_quota_is_on_and_adjustable() {
    let client = TestClient::default();
    let demo = Demo::start(&[
        "--patients",
        "20",
        "--auth",
        "--reindex-secs",
        "600",
        "--max-jobs-per-caller",
        "2",
    ]);
    for n in 1..=2 {
        let reply = reindex(&client, &demo, Some("token-a")).await;
        assert_eq!(reply.status, StatusCode::ACCEPTED, "job {n}: {reply:?}");
    }
    let refused = reindex(&client, &demo, Some("token-a")).await;
    assert_eq!(refused.status, StatusCode::TOO_MANY_REQUESTS, "{refused:?}");
    refused.assert_outcome("throttled");
    assert!(retry_after(&refused) >= 1);
    let other = reindex(&client, &demo, Some("token-b")).await;
    assert_eq!(
        other.status,
        StatusCode::ACCEPTED,
        "another client: {other:?}"
    );
    drop(demo);

    let demo = Demo::start(&[
        "--patients",
        "20",
        "--auth",
        "--reindex-secs",
        "600",
        "--max-jobs-per-caller",
        "off",
    ]);
    for n in 1..=12 {
        let reply = reindex(&client, &demo, Some("token-a")).await;
        assert_eq!(
            reply.status,
            StatusCode::ACCEPTED,
            "job {n} with the quota off: {reply:?}"
        );
    }
}

// SEC-11, SEC-12, issue 11 item 6: with `--auth`, the demo's log — its access log, the audit
// trail, `$reindex` — carries paths, never a query string or a token, for a search, an async
// kick-off, polls, and another client's denied poll.
#[tokio::test]
async fn sec_12_demo_logs_carry_no_query_string_or_token() {
    const TOKEN: &str = "demo-log-token-3c9e";
    const OTHER: &str = "demo-log-other-token-b21f";
    const MARKER: &str = "querymarker7d";
    let demo = Demo::start(&["--patients", "20", "--auth", "--reindex-secs", "600"]);
    let client = TestClient::default();
    let bearer = format!("Bearer {TOKEN}");
    let search = client
        .send(
            Method::GET,
            &format!("{}/Patient?name={MARKER}&access_token={TOKEN}", demo.base),
            &[("authorization", &bearer)],
            "",
        )
        .await;
    assert_eq!(search.status, StatusCode::OK, "{search:?}");
    let kick = reindex(&client, &demo, Some(TOKEN)).await;
    assert_eq!(kick.status, StatusCode::ACCEPTED, "{kick:?}");
    let status_url = kick.header("content-location").to_owned();
    let own = client
        .send(Method::GET, &status_url, &[("authorization", &bearer)], "")
        .await;
    assert_eq!(own.status, StatusCode::ACCEPTED, "the client's own job");
    let other = format!("Bearer {OTHER}");
    let denied = client
        .send(Method::GET, &status_url, &[("authorization", &other)], "")
        .await;
    assert_eq!(
        denied.status,
        StatusCode::NOT_FOUND,
        "another client's poll"
    );

    // The log is read on a thread: wait (bounded) for the denied poll's audit line.
    let mut log = String::new();
    for _ in 0..300 {
        log = demo.log_tail();
        if log.contains(r#"outcome="denied""#) && log.contains("reindex started") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(log.contains(r#"outcome="denied""#), "no audit line:\n{log}");
    assert!(log.contains("path=/fhir/Patient"), "no access line:\n{log}");
    for secret in [TOKEN, OTHER, MARKER, "access_token", "name="] {
        assert!(!log.contains(secret), "the log holds {secret:?}:\n{log}");
    }
}
