//! Issue #13 item 6: `cargo run --example gateway -- --upstream URL` as shipped, in front of the
//! demo run as a separate upstream process. It prints `listening on <public base>` (the upstream's
//! path on the gateway's address, as documented), and a client of it gets the async patterns.
//!
//! `cargo test --all-features` builds both examples first; `cargo test --test gateway_example`
//! alone does not: run `cargo build --examples --features upstream` before it.

#[path = "support/demo.rs"]
mod demo;
mod support;

use std::io::BufRead;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use http::{Method, StatusCode};
use support::TestClient;

/// The gateway example as a child process; killed when dropped.
struct Gateway {
    child: Child,
    base: String,
}

impl Gateway {
    fn start(args: &[&str]) -> Self {
        let exe = std::env::current_exe().expect("the test binary's path");
        let path = exe
            .parent()
            .and_then(|deps| deps.parent())
            .map(|profile| {
                profile
                    .join("examples")
                    .join(format!("gateway{}", std::env::consts::EXE_SUFFIX))
            })
            .expect("the test binary lives in <target>/<profile>/deps");
        let mut child = Command::new(&path)
            .args(["--addr", "127.0.0.1:0"])
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|err| {
                panic!(
                    "starting {} ({err}): run `cargo build --examples --features upstream`",
                    path.display()
                )
            });
        let stdout = child.stdout.take().expect("piped stdout");
        let (first_tx, first_rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut lines = std::io::BufReader::new(stdout).lines();
            if let Some(Ok(line)) = lines.next() {
                let _ = first_tx.send(line);
            }
            lines.for_each(drop);
        });
        let first = first_rx
            .recv_timeout(Duration::from_secs(30))
            .expect("the gateway says where it listens");
        let base = first
            .strip_prefix("listening on ")
            .unwrap_or_else(|| panic!("the gateway's first line is {first:?}"))
            .to_owned();
        Self { child, base }
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// GATEWAY-6, KICK-2, BUNDLE-1: the shipped gateway listens on the upstream's path at its own
// address, and runs a search asynchronously against the upstream; a bad flag is a clear error.
#[tokio::test]
async fn gateway_6_the_example_gateway_serves_the_upstream_asynchronously() {
    let upstream = demo::Demo::start(&["--patients", "15", "--min-poll-interval", "off"]);
    let gateway = Gateway::start(&["--upstream", &upstream.base, "--header", "X-Api-Key: test"]);
    assert!(
        gateway.base.starts_with("http://127.0.0.1:") && gateway.base.ends_with("/fhir"),
        "the upstream's path on the gateway's address: {}",
        gateway.base
    );
    assert_ne!(gateway.base, upstream.base);
    let client = TestClient::default();
    let status = client
        .kick_off(
            Method::GET,
            &format!("{}/Patient?_count=5", gateway.base),
            &[],
            "",
        )
        .await;
    assert!(status.starts_with(&gateway.base), "{status}");
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

    let exe = std::env::current_exe().unwrap();
    let path = exe
        .parent()
        .unwrap()
        .parent()
        .unwrap()
        .join("examples")
        .join("gateway");
    let refused = Command::new(path)
        .args(["--upstream", "not a url"])
        .output()
        .expect("the gateway runs");
    assert!(!refused.status.success());
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(stderr.contains("--upstream"), "{stderr}");
}
