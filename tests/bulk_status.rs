//! The status answers of a finished bulk job over a real socket (BULK-6, BULK-8, BULK-9): a
//! failed export's status and OperationOutcome, and the completion manifest's headers and
//! fields.

mod support;

use std::time::{Duration, SystemTime};

use axum::Router;
use axum::response::Response;
use axum::routing::get;
use http::StatusCode;
use serde_json::json;
use support::assert_not_found;
use support::bulk::{
    NDJSON, assert_final_codes, failure, fetch, fhir_routes, items, manifest_of, ndjson, start,
};
use tower_fhir_async::ManifestFormat;

// ---------------------------------------------------------------------------------------------
// 5. Whole-job failure.

// BULK-6, STATUS-11, CANCEL-3: when the first request fails, the job fails: the status URL
// answers that 4xx/5xx (502 for an answer that cannot be exported; 500 for the inner 429/503,
// which would tell a client to poll again — a failed job is final) with an OperationOutcome —
// the server's own when it sent one — as `application/fhir+json`, with no transient issue code
// (clients would poll forever); no files are left; the job can still be deleted.
#[tokio::test]
async fn bulk_6_failed_first_request_fails_the_job_with_its_status() {
    // Without the kick-off's wait, so that client errors too reach the status URL (with it,
    // they are the kick-off's answer: `kick_5_client_errors_reported_at_once_answer_the_kick_off`).
    let server = start(
        Router::new().route("/fhir/Group/{case}/$export", get(failure)),
        |b| b.kickoff_wait(Duration::ZERO),
    )
    .await;
    let cases = [
        (
            "forbidden",
            StatusCode::FORBIDDEN,
            Some("Group g is not yours"),
        ),
        (
            "unavailable",
            StatusCode::INTERNAL_SERVER_ERROR,
            Some("index rebuilding"),
        ),
        ("busy", StatusCode::INTERNAL_SERVER_ERROR, None),
        ("crash", StatusCode::INTERNAL_SERVER_ERROR, None),
        ("missing", StatusCode::NOT_FOUND, None),
        ("slow", StatusCode::GATEWAY_TIMEOUT, None),
        ("csv", StatusCode::BAD_GATEWAY, None),
    ];
    for (case, status, diagnostics) in cases {
        let status_url = server.export(&format!("/Group/{case}/$export")).await;
        let reply = server.finished(&status_url).await;
        assert_eq!(reply.status, status, "{case}: {reply:?}");
        assert_eq!(
            reply.header("content-type"),
            "application/fhir+json",
            "{case}"
        );
        let outcome = reply.json();
        assert_eq!(
            outcome["resourceType"], "OperationOutcome",
            "{case}: {outcome}"
        );
        assert!(
            outcome["issue"][0]["diagnostics"]
                .as_str()
                .is_some_and(|d| !d.is_empty()),
            "{case}: {outcome}"
        );
        if let Some(diagnostics) = diagnostics {
            assert_eq!(
                outcome["issue"][0]["diagnostics"], diagnostics,
                "{case}: the server's own outcome"
            );
        }
        assert_final_codes(&outcome, case);
        if case == "forbidden" {
            assert_eq!(
                outcome["issue"][0]["code"], "forbidden",
                "a final code is kept"
            );
        }
        assert!(
            !reply.body.windows(12).any(|w| w == b"NullPointerE"),
            "{case}: inner text not leaked as JSON"
        );
        let again = server.client.get(&status_url).await;
        assert_eq!(
            (again.status, again.body.clone()),
            (reply.status, reply.body.clone()),
            "{case}: stable"
        );
        assert!(
            server.stored(&status_url).await.is_empty(),
            "{case}: no files"
        );
        assert_eq!(
            server.client.delete(&status_url).await.status,
            StatusCode::ACCEPTED,
            "{case}"
        );
        assert_not_found(&server.client.get(&status_url).await, case);
    }
}

// ---------------------------------------------------------------------------------------------
// 12. The manifest.

// BULK-8, BULK-9, EXPIRE-2 (interop.md "Completion"): the completed status is `200`,
// `Content-Type: application/json`, `Expires` an HTTP date after completion (about the
// retention ahead), `Cache-Control: no-store`; the manifest has `transactionTime` (an instant
// from when the export ran), `request`, `requiresAccessToken`, `output` and `error`, no
// `resourceType`.
#[tokio::test]
async fn bulk_8_bulk_9_manifest_headers_and_fields() {
    let server = start(fhir_routes(), |b| {
        b.retention(Duration::from_secs(2 * 3600))
    })
    .await;
    let before = SystemTime::now() - Duration::from_secs(1);
    let status_url = server.export("/$export?_type=Patient").await;
    let done = server.finished(&status_url).await;
    let after = SystemTime::now() + Duration::from_secs(1);
    let manifest = manifest_of(&done, &status_url);
    assert!(done.header("cache-control").contains("no-store"));
    let expires =
        httpdate::parse_http_date(done.header("expires")).expect("Expires is an HTTP date");
    assert!(
        expires > before + Duration::from_secs(3600)
            && expires < after + Duration::from_secs(2 * 3600),
        "Expires {:?} is about two hours ahead",
        done.header("expires")
    );
    let time = humantime::parse_rfc3339(
        manifest["transactionTime"]
            .as_str()
            .expect("transactionTime"),
    )
    .expect("transactionTime is an instant");
    assert!(time >= before && time <= after, "{manifest}");
    assert_eq!(
        manifest["request"],
        format!("{}/$export?_type=Patient", server.base)
    );
    assert_eq!(manifest["requiresAccessToken"], true);
    assert_eq!(manifest["error"], json!([]));
    let mut keys: Vec<&str> = manifest
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    keys.sort_unstable();
    assert_eq!(
        keys,
        [
            "error",
            "output",
            "request",
            "requiresAccessToken",
            "transactionTime"
        ]
    );
    for item in items(&manifest, "output") {
        assert!(item["count"].is_u64(), "{item}");
    }
    // STATUS-14: the manifest can be fetched again, unchanged.
    let again = server.client.get(&status_url).await;
    assert_eq!(again.body, done.body);
}

// BULK-9 (BD4 `BulkDataManifest`): with `ManifestFormat::Stu4Ballot`, the manifest has
// `manifestType`, `outputFormat`, `output[].fileSize` equal to each file's bytes, and `outcome[]`
// with `count`, `fileSize` and `countSeverity` instead of `error[]`; no `request`.
#[tokio::test]
async fn bulk_9_stu4_ballot_manifest() {
    async fn export() -> Response {
        ndjson(concat!(
            "{\"resourceType\":\"OperationOutcome\",\"issue\":[{\"severity\":\"warning\",\"code\":\"informational\"}]}\n",
            "{\"resourceType\":\"Patient\",\"id\":\"p1\"}\n",
            "not a resource\n",
            "{\"resourceType\":\"Patient\",\"id\":\"p2\"}\n",
        ))
    }
    let routes = Router::new().route("/fhir/$export", get(export));
    let server = start(routes, |b| b.manifest_format(ManifestFormat::Stu4Ballot)).await;
    let status_url = server.export("/$export").await;
    let manifest = server.manifest(&status_url).await;
    assert_eq!(
        manifest["manifestType"],
        "http://hl7.org/fhir/uv/bulkdata/StructureDefinition/BulkDataManifest"
    );
    assert_eq!(manifest["outputFormat"], NDJSON);
    assert_eq!(manifest["requiresAccessToken"], true);
    assert!(manifest["transactionTime"].is_string());
    assert!(manifest.get("request").is_none(), "{manifest}");
    assert!(manifest.get("error").is_none(), "{manifest}");
    let output = fetch(&server.client, &manifest, "output").await;
    assert_eq!(output.len(), 1);
    assert_eq!(manifest["output"][0]["fileSize"], output[0].bytes.len());

    let outcome = items(&manifest, "outcome");
    assert_eq!(outcome.len(), 1, "{manifest}");
    let url = outcome[0]["url"].as_str().unwrap();
    assert!(url.starts_with(&format!("{status_url}/file/")), "{url}");
    let file = server.client.get(url).await;
    assert_eq!(file.status, StatusCode::OK);
    assert_eq!(outcome[0]["count"], 2);
    assert_eq!(outcome[0]["fileSize"], file.body.len());
    let mut severities: Vec<(String, u64)> = items(&outcome[0], "countSeverity")
        .iter()
        .map(|s| {
            (
                s["code"].as_str().unwrap().to_owned(),
                s["count"].as_u64().unwrap(),
            )
        })
        .collect();
    severities.sort();
    assert_eq!(
        severities,
        [("error".to_owned(), 1), ("warning".to_owned(), 1)]
    );
}
