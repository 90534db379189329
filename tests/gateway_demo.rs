//! Issue #13 (GATEWAY-1…3, item 8's equality): the demo server run as a separate upstream
//! process (its own port and base path `/fhir`), behind a gateway (the layer over
//! `upstream::Upstream`) whose public base is another port and path (`/api`). What a client does
//! through the gateway matches the same work done directly on the upstream: the same resources,
//! byte for byte, and only the gateway's base in URLs.
//!
//! `cargo test` builds the demo first; `cargo test --test gateway_demo` alone does not, so run
//! `cargo build --example server` before it.

#[path = "support/demo.rs"]
mod demo;
mod support;

use std::collections::BTreeSet;

use demo::Demo;
use http::{Method, StatusCode};
use serde_json::Value;
use support::TestClient;

/// The lines of every file of a completed export's manifest, sorted.
async fn exported(client: &TestClient, manifest: &Value) -> BTreeSet<String> {
    assert_eq!(manifest["error"], serde_json::json!([]), "{manifest}");
    let mut lines = BTreeSet::new();
    for file in manifest["output"].as_array().expect("output") {
        let reply = client.get(file["url"].as_str().expect("url")).await;
        assert_eq!(reply.status, StatusCode::OK, "{reply:?}");
        lines.extend(
            String::from_utf8(reply.body.to_vec())
                .unwrap()
                .lines()
                .map(str::to_owned),
        );
    }
    lines
}

/// Kicks off the export `query` under `base`, polls it to its end (its status URL under `base`
/// too), and returns its manifest.
async fn export(client: &TestClient, base: &str, query: &str, demo: &Demo) -> Value {
    let status = client
        .kick_off(Method::GET, &format!("{base}/{query}"), &[], "")
        .await;
    assert!(status.starts_with(base), "{status}");
    let done = client.poll_until_done(&status, 2000).await;
    assert_eq!(done.status, StatusCode::OK, "{done:?}\n{}", demo.log_tail());
    done.json()
}

/// A manifest through the gateway names only the gateway: every file on `public`, nothing on the
/// demo's base.
fn assert_on_gateway(manifest: &Value, public: &str, demo: &Demo) {
    let text = manifest.to_string();
    assert!(
        !text.contains(&demo.base),
        "the demo's address leaked: {text}"
    );
    let files = manifest["output"].as_array().expect("output files");
    assert!(!files.is_empty(), "{manifest}");
    for file in files {
        let url = file["url"].as_str().expect("a file URL");
        assert!(url.starts_with(public), "{manifest}");
    }
}

// GATEWAY-1, GATEWAY-3, BULK-6: a bulk export (`_outputFormat`) of the demo's paged Patient search
// through the gateway exports exactly what the demo exports itself.
#[tokio::test]
async fn gateway_3_an_export_through_the_gateway_equals_the_upstreams_own() {
    let demo = Demo::start(&["--patients", "130", "--min-poll-interval", "off"]);
    let public = support::gateway::start(&demo.base, "/api").await;
    let client = TestClient::default();
    let query = "Patient?_count=25&_outputFormat=application/fhir%2Bndjson";
    let direct = export(&client, &demo.base, query, &demo).await;
    let direct = exported(&client, &direct).await;
    let manifest = export(&client, &public, query, &demo).await;
    assert_on_gateway(&manifest, &public, &demo);
    let through = exported(&client, &manifest).await;
    assert_eq!(direct.len(), 130, "the demo's own export");
    assert_eq!(through, direct, "the same resources, byte for byte");
}

// GATEWAY-2: an async search through the gateway completes with the demo's result, every URL on
// the gateway's public base and none on the demo's.
#[tokio::test]
async fn gateway_2_an_async_search_names_only_the_gateway() {
    let demo = Demo::start(&["--patients", "30", "--min-poll-interval", "off"]);
    let public = support::gateway::start(&demo.base, "/api").await;
    let client = TestClient::default();
    let status = client
        .kick_off(Method::GET, &format!("{public}/Patient?_count=10"), &[], "")
        .await;
    let done = client.poll_until_done(&status, 2000).await;
    assert_eq!(done.status, StatusCode::OK, "{done:?}");
    let text = String::from_utf8(done.body.to_vec()).unwrap();
    assert!(
        !text.contains(&demo.base),
        "the demo's address leaked: {text}"
    );
    let search = &done.json()["entry"][0]["resource"];
    assert_eq!(search["resourceType"], "Bundle", "{search}");
    let next = search["link"]
        .as_array()
        .and_then(|links| links.iter().find(|l| l["relation"] == "next"))
        .and_then(|l| l["url"].as_str())
        .expect("a next link")
        .to_owned();
    assert!(next.starts_with(&format!("{public}/")), "{next}");
    // The next page is reachable through the gateway, as any client would follow it.
    let page = client.get(&next).await;
    assert_eq!(page.status, StatusCode::OK, "{page:?}");
    assert_eq!(page.json()["resourceType"], "Bundle");
}

// GATEWAY-5, BULK-1…BULK-13: the demo runs `$export` asynchronously itself (it answers the
// gateway's replay with `202` + `Content-Location`); the gateway's job follows it to its manifest
// and copies its files, so a client of the gateway gets the demo's export, on the gateway's URLs.
#[tokio::test]
async fn gateway_5_an_upstreams_own_export_is_followed_and_copied() {
    let demo = Demo::start(&["--patients", "40", "--min-poll-interval", "off"]);
    let public = support::gateway::start(&demo.base, "/api").await;
    let client = TestClient::default();
    let query = "Patient/$export?_type=Patient";
    let direct = export(&client, &demo.base, query, &demo).await;
    let direct = exported(&client, &direct).await;
    let manifest = export(&client, &public, query, &demo).await;
    assert_on_gateway(&manifest, &public, &demo);
    let through = exported(&client, &manifest).await;
    assert_eq!(direct.len(), 40, "the demo's own export");
    assert_eq!(through, direct, "the same resources, byte for byte");
}
