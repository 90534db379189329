//! Issue #13 item 6: `cargo run --example gateway -- --upstream URL` as shipped, in front of the
//! demo run as a separate upstream process. It prints `listening on <public base>` (the upstream's
//! path on the gateway's address, as documented), and a client of it gets the async patterns.
//!
//! `cargo test --all-features` builds both examples first; `cargo test --test gateway_example`
//! alone does not: run `cargo build --examples --features upstream` before it.

#[path = "support/demo.rs"]
mod demo;
mod support;

use std::process::Command;

use demo::example_process::{self, Example};
use http::{Method, StatusCode};
use support::TestClient;

// GATEWAY-6, KICK-2, BUNDLE-1: the shipped gateway listens on the upstream's path at its own
// address, and runs a search asynchronously against the upstream; a bad flag is a clear error.
#[tokio::test]
async fn gateway_6_the_example_gateway_serves_the_upstream_asynchronously() {
    let upstream = demo::Demo::start(&["--patients", "15", "--min-poll-interval", "off"]);
    // `Example` checks that it listens on http://127.0.0.1:PORT/fhir: the upstream's path on
    // the gateway's address.
    let gateway = Example::start(
        "gateway",
        &["--upstream", &upstream.base, "--header", "X-Api-Key: test"],
        1,
    );
    let gateway_base = gateway.base().to_owned();
    assert_ne!(gateway_base, upstream.base);
    let client = TestClient::default();
    let status = client
        .kick_off(
            Method::GET,
            &format!("{}/Patient?_count=5", gateway_base),
            &[],
            "",
        )
        .await;
    assert!(status.starts_with(&gateway_base), "{status}");
    let done = client.poll_until_done(&status, 2000).await;
    assert_eq!(done.status, StatusCode::OK, "{done:?}");
    let text = String::from_utf8(done.body.to_vec()).unwrap();
    assert!(
        !text.contains(&upstream.base),
        "the upstream's address leaked: {text}"
    );
    assert_eq!(
        done.json()["entry"][0]["resource"]["resourceType"],
        "Bundle"
    );

    let refused = Command::new(example_process::binary("gateway"))
        .args(["--upstream", "not a url"])
        .output()
        .expect("the gateway runs");
    assert!(!refused.status.success());
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(stderr.contains("--upstream"), "{stderr}");
}
