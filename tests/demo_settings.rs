//! The demo exposes the settings a tester wants to try (issue #14 item 6): it declares the layer
//! in its CapabilityStatement by default (`--no-declare-async` leaves it as written), collects
//! finished jobs by redirect with `--completion redirect`, and keeps results for `--retention`.
//! The demo runs as a child process on 127.0.0.1 (`cargo build --example server` first when
//! running this file alone). Every wait is bounded; nothing asserts how fast.

#[path = "support/demo.rs"]
mod demo;
mod support;

use std::time::{Duration, Instant};

use demo::Demo;
use http::{Method, StatusCode};
use serde_json::Value;
use support::TestClient;

const SYNCHRONICITY: &str = "http://hl7.org/fhir/StructureDefinition/synchronicity-control";

/// Every `synchronicity-control` value in the CapabilityStatement's resources.
fn declared(capability: &Value) -> Vec<String> {
    capability["rest"][0]["resource"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|resource| resource["interaction"].as_array().into_iter().flatten())
        .flat_map(|interaction| interaction["extension"].as_array().into_iter().flatten())
        .filter(|extension| extension["url"] == SYNCHRONICITY)
        .map(|extension| {
            extension["valueUri"]
                .as_str()
                .unwrap_or_default()
                .to_owned()
        })
        .collect()
}

// CAP-4: the demo's /metadata declares the asynchronous interactions (`either`) by default, and
// not with `--no-declare-async`.
#[tokio::test]
async fn cap_4_the_demo_declares_the_layer_in_its_metadata() {
    let client = TestClient::default();
    let demo = Demo::start(&["--patients", "5"]);
    let metadata = client.get(&demo.url("/fhir/metadata")).await;
    assert_eq!(metadata.status, StatusCode::OK, "{metadata:?}");
    let values = declared(&metadata.json());
    assert!(!values.is_empty(), "{}", metadata.json());
    assert!(values.iter().all(|v| v == "either"), "{values:?}");

    let plain = Demo::start(&["--patients", "5", "--no-declare-async"]);
    let metadata = client.get(&plain.url("/fhir/metadata")).await;
    assert_eq!(metadata.status, StatusCode::OK, "{metadata:?}");
    assert!(declared(&metadata.json()).is_empty(), "{}", metadata.json());
}

// FUT-1: with `--completion redirect` a finished job answers
// `303` to its result, which answers as the synchronous search would.
#[tokio::test]
async fn fut_1_the_demo_completes_by_redirect_when_asked() {
    let client = TestClient::default();
    let demo = Demo::start(&[
        "--patients",
        "5",
        "--completion",
        "redirect",
        "--min-poll-interval",
        "off",
    ]);
    let status = client
        .kick_off(Method::GET, &demo.url("/fhir/Patient?_count=2"), &[], "")
        .await;
    let done = client.poll_until_done(&status, 250).await;
    assert_eq!(done.status, StatusCode::SEE_OTHER, "{done:?}");
    assert_eq!(done.header("location"), format!("{status}/result"));
    let result = client.get(done.header("location")).await;
    assert_eq!(result.status, StatusCode::OK, "{result:?}");
    assert_eq!(result.json()["resourceType"], "Bundle");
    assert_eq!(result.json()["type"], "searchset");
}

// EXPIRE-1: with `--retention 1s` a finished result is served, then, once expired, `404`.
#[tokio::test]
async fn expire_1_the_demo_keeps_results_for_its_retention() {
    let client = TestClient::default();
    let demo = Demo::start(&[
        "--patients",
        "5",
        "--retention",
        "1s",
        "--min-poll-interval",
        "off",
    ]);
    let status = client
        .kick_off(Method::GET, &demo.url("/fhir/Patient?_count=1"), &[], "")
        .await;
    let done = client.poll_until_done(&status, 250).await;
    assert_eq!(done.status, StatusCode::OK, "{done:?}");
    let bound = Instant::now() + Duration::from_secs(20);
    loop {
        let reply = client.get(&status).await;
        if reply.status == StatusCode::NOT_FOUND {
            reply.assert_outcome("not-found");
            break;
        }
        assert_eq!(reply.status, StatusCode::OK, "{reply:?}");
        assert!(
            Instant::now() < bound,
            "the result outlived its 1 s retention by 20 s"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
