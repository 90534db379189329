//! Issue #13 item 7: a FHIR server nobody on this project wrote behind the gateway — the example
//! server that ships with FHIRStarter (a FastAPI FHIR framework, installed from PyPI), run with
//! uvicorn as a separate process at the root of its own port. It answers creates with a relative
//! `Location` (`/Patient/{id}`), searches with searchset Bundles, and has no async support.
//!
//! `.ci/run` installs it into a virtual environment and sets `FHIRSTARTER_PYTHON` to that
//! environment's `python`; without it these tests fail (they never skip) and say how to install.

#![cfg(all(feature = "upstream", feature = "bulk"))]

mod support;

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use http::{Method, StatusCode};
use serde_json::Value;
use support::{TestClient, free_port, within};

/// The FHIRStarter example server on a free port; killed when dropped.
struct FhirStarter {
    child: Child,
    base: String,
}

impl FhirStarter {
    async fn start() -> Self {
        let python = std::env::var("FHIRSTARTER_PYTHON").unwrap_or_else(|_| {
            panic!(
                "FHIRSTARTER_PYTHON is not set. These tests run the FHIRStarter example server: \
                 `python3 -m venv VENV && VENV/bin/pip install fhirstarter==4.2.0 uvicorn jsonpatch`, \
                 then FHIRSTARTER_PYTHON=VENV/bin/python (.ci/run does this)"
            )
        });
        let port = free_port();
        let child = Command::new(&python)
            .args([
                "-m",
                "uvicorn",
                "fhirstarter.examples.example:app",
                "--host",
                "127.0.0.1",
                "--port",
                &port.to_string(),
                "--log-level",
                "warning",
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|err| panic!("starting {python} -m uvicorn: {err}"));
        let server = Self {
            child,
            base: format!("http://127.0.0.1:{port}"),
        };
        let client = TestClient::default();
        let metadata = format!("{}/metadata", server.base);
        tokio::time::timeout(Duration::from_secs(60), async {
            loop {
                let up = tokio::net::TcpStream::connect(("127.0.0.1", port))
                    .await
                    .is_ok();
                if up && client.get(&metadata).await.status == StatusCode::OK {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        })
        .await
        .expect("the FHIRStarter server answers /metadata within 60 s");
        server
    }
}

impl Drop for FhirStarter {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// GATEWAY-1, GATEWAY-2, BUNDLE-1: async creates through the gateway run on FHIRStarter; each
// result's `response.location` is an absolute URL on the gateway (FHIRStarter writes a relative
// path); an async search finds them; a bulk export of the search exports exactly them.
#[tokio::test]
async fn gateway_7_a_third_party_server_gets_the_async_patterns() {
    let upstream = FhirStarter::start().await;
    let public = support::gateway::start(&upstream.base, "/fhir").await;
    let client = TestClient::default();
    let family = format!("Gateway{}", free_port());

    let mut created = Vec::new();
    for n in 0..3 {
        let body = format!(
            r#"{{"resourceType":"Patient","name":[{{"family":"{family}","given":["P{n}"]}}]}}"#
        );
        let status = client
            .kick_off(
                Method::POST,
                &format!("{public}/Patient"),
                &[("content-type", "application/fhir+json")],
                &body,
            )
            .await;
        let done = client.poll_until_done(&status, 2000).await;
        assert_eq!(done.status, StatusCode::OK, "{done:?}");
        let entry = &done.json()["entry"][0];
        assert_eq!(entry["response"]["status"], "201 Created", "{entry}");
        let location = entry["response"]["location"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        let id = location
            .strip_prefix(&format!("{public}/Patient/"))
            .unwrap_or_else(|| panic!("the location is on the gateway: {location:?}"))
            .split('/')
            .next()
            .unwrap()
            .to_owned();
        // The created Patient is readable through the gateway at that location.
        let read = client.get(&format!("{public}/Patient/{id}")).await;
        assert_eq!(read.status, StatusCode::OK, "{read:?}");
        created.push(id);
    }

    let search = format!("{public}/Patient?family={family}");
    let status = client.kick_off(Method::GET, &search, &[], "").await;
    let done = client.poll_until_done(&status, 2000).await;
    assert_eq!(done.status, StatusCode::OK, "{done:?}");
    let bundle = &done.json()["entry"][0]["resource"];
    assert_eq!(bundle["type"], "searchset", "{bundle}");
    let mut found: Vec<String> = bundle["entry"]
        .as_array()
        .expect("entries")
        .iter()
        .map(|e| e["resource"]["id"].as_str().unwrap().to_owned())
        .collect();
    found.sort();
    created.sort();
    assert_eq!(
        found, created,
        "the async search finds what the async creates made"
    );

    let status = client
        .kick_off(
            Method::GET,
            &format!("{search}&_outputFormat=application/fhir%2Bndjson"),
            &[],
            "",
        )
        .await;
    let done = client.poll_until_done(&status, 2000).await;
    assert_eq!(done.status, StatusCode::OK, "{done:?}");
    let manifest = done.json();
    assert_eq!(manifest["error"], serde_json::json!([]), "{manifest}");
    let file = manifest["output"][0]["url"]
        .as_str()
        .expect("a file")
        .to_owned();
    assert!(file.starts_with(&public), "{manifest}");
    let lines = client.get(&file).await;
    let mut exported: Vec<String> = String::from_utf8(lines.body.to_vec())
        .unwrap()
        .lines()
        .map(|line| {
            serde_json::from_str::<Value>(line).unwrap()["id"]
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect();
    exported.sort();
    assert_eq!(
        exported, created,
        "the export holds exactly the created Patients"
    );

    // The server's own CapabilityStatement, through the gateway.
    let metadata = within("metadata", client.get(&format!("{public}/metadata"))).await;
    assert_eq!(metadata.status, StatusCode::OK);
    assert_eq!(metadata.json()["resourceType"], "CapabilityStatement");
}
