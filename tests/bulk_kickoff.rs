//! Kick-off of the asynchronous bulk data pattern over a real socket (§2.6 BULK, SEL, KICK as
//! they apply to bulk jobs): the kick-off forms real clients send at three levels, refused
//! `_outputFormat`s, bulk without `Prefer`, and client errors at kick-off.

mod support;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::routing::get;
use http::{Method, StatusCode};
use serde_json::{Value, json};
use support::BOUND;
use support::bulk::{FHIR_JSON_ACCEPT, failure, fetch, fhir_routes, items, small_export, start};
use tokio::sync::Notify;
use tower_fhir_async::BulkWithoutPrefer;

// ---------------------------------------------------------------------------------------------
// 1. Kick-off forms.

/// One kick-off form and what the wrapped service must see of it.
struct Form {
    method: Method,
    target: &'static str,
    headers: &'static [(&'static str, &'static str)],
    body: &'static str,
    /// The path and query the wrapped service gets: the layer's own parameters removed,
    /// everything else as written.
    inner_target: &'static str,
    /// The parameters left in the body the wrapped service gets (form or Parameters).
    inner_params: &'static [&'static str],
    types: &'static [&'static str],
}

/// Request headers as name/value pairs.
type Headers<'a> = &'a [(&'a str, &'a str)];

// SEL-2, SEL-3, SEL-5, SEL-6, BULK-1, BULK-2, BULK-3, BULK-8, BULK-9, KICK-2, KICK-3 (interop.md
// "Kick-off"): GET with a query, POST with no body and the parameters in the query, and POST with
// a Parameters body as `application/json` (and `application/fhir+json`), at system, type and
// Group level; `_outputFormat` on a plain search (query and form body) and on a non-bulk
// operation. Each is accepted with an absolute status URL, completes with a manifest whose
// `request` is the kick-off URL, and the wrapped service never sees `respond-async`,
// `_maximumFileSize`/`_minimumFileSize`, nor `_outputFormat` outside a bulk operation.
#[tokio::test]
async fn sel_3_sel_6_bulk_1_kick_off_forms_at_three_levels() {
    let server = start(fhir_routes(), |b| b).await;
    const BOTH: &[&str] = &["Observation", "Patient"];
    const OBSERVATION: &[&str] = &["Observation"];
    let forms = [
        Form {
            method: Method::GET,
            target: "/$export?_type=Patient,Observation&_outputFormat=application%2Ffhir%2Bndjson",
            headers: &[FHIR_JSON_ACCEPT],
            body: "",
            inner_target: "/fhir/$export?_type=Patient,Observation&_outputFormat=application%2Ffhir%2Bndjson",
            inner_params: &[],
            types: BOTH,
        },
        Form {
            method: Method::GET,
            target: "/Patient/$export?_typeFilter=Observation%3Fcode%3Da%2Cb&_since=2024-01-01T00:00:00Z",
            headers: &[
                ("accept", "application/fhir+json, */*; q=0.1"),
                ("prefer", "respond-async, handling=lenient"),
            ],
            body: "",
            inner_target: "/fhir/Patient/$export?_typeFilter=Observation%3Fcode%3Da%2Cb&_since=2024-01-01T00:00:00Z",
            inner_params: &[],
            types: BOTH,
        },
        Form {
            method: Method::GET,
            target: "/Group/g1/$export?_outputFormat=ndjson&_maximumFileSize=1000000",
            headers: &[FHIR_JSON_ACCEPT],
            body: "",
            inner_target: "/fhir/Group/g1/$export?_outputFormat=ndjson",
            inner_params: &[],
            types: BOTH,
        },
        Form {
            method: Method::POST,
            target: "/$export?_type=Patient&_outputFormat=application/fhir+ndjson",
            headers: &[FHIR_JSON_ACCEPT],
            body: "",
            inner_target: "/fhir/$export?_type=Patient&_outputFormat=application/fhir+ndjson",
            inner_params: &[],
            types: BOTH,
        },
        Form {
            method: Method::POST,
            target: "/Patient/$export?_type=Observation",
            headers: &[],
            body: "",
            inner_target: "/fhir/Patient/$export?_type=Observation",
            inner_params: &[],
            types: BOTH,
        },
        Form {
            method: Method::POST,
            target: "/Group/g1/$export?_maximumFileSize=500000&_minimumFileSize=1000",
            headers: &[FHIR_JSON_ACCEPT],
            body: "",
            inner_target: "/fhir/Group/g1/$export",
            inner_params: &[],
            types: BOTH,
        },
        Form {
            method: Method::POST,
            target: "/$export",
            headers: &[("content-type", "application/json"), FHIR_JSON_ACCEPT],
            body: r#"{"resourceType":"Parameters","parameter":[
                {"name":"_outputFormat","valueString":"application/fhir+ndjson"},
                {"name":"_type","valueString":"Patient,Observation"},
                {"name":"_maximumFileSize","valueInteger":1000000}]}"#,
            inner_target: "/fhir/$export",
            inner_params: &["_outputFormat", "_type"],
            types: BOTH,
        },
        Form {
            method: Method::POST,
            target: "/Patient/$export",
            headers: &[("content-type", "application/json")],
            body: r#"{"resourceType":"Parameters","parameter":[{"name":"_type","valueString":"Patient"}]}"#,
            inner_target: "/fhir/Patient/$export",
            inner_params: &["_type"],
            types: BOTH,
        },
        Form {
            method: Method::POST,
            target: "/Group/g1/$export",
            headers: &[("content-type", "application/fhir+json"), FHIR_JSON_ACCEPT],
            body: r#"{"resourceType":"Parameters","parameter":[
                {"name":"_outputFormat","valueString":"application/ndjson"},
                {"name":"_minimumFileSize","valueInteger":10},
                {"name":"_type","valueString":"Patient"}]}"#,
            inner_target: "/fhir/Group/g1/$export",
            inner_params: &["_outputFormat", "_type"],
            types: BOTH,
        },
        Form {
            method: Method::GET,
            target: "/Observation?code=x&_outputFormat=ndjson",
            headers: &[FHIR_JSON_ACCEPT],
            body: "",
            inner_target: "/fhir/Observation?code=x",
            inner_params: &[],
            types: OBSERVATION,
        },
        Form {
            method: Method::GET,
            target: "/Observation?_outputFormat=application/fhir+ndjson",
            headers: &[],
            body: "",
            inner_target: "/fhir/Observation",
            inner_params: &[],
            types: OBSERVATION,
        },
        Form {
            method: Method::POST,
            target: "/Observation/_search",
            headers: &[("content-type", "application/x-www-form-urlencoded")],
            body: "code=x&_outputFormat=application%2Ffhir%2Bndjson",
            inner_target: "/fhir/Observation/_search",
            inner_params: &["code"],
            types: OBSERVATION,
        },
        Form {
            method: Method::POST,
            target: "/Patient/p1/$everything",
            headers: &[("content-type", "application/json")],
            body: r#"{"resourceType":"Parameters","parameter":[
                {"name":"_outputFormat","valueString":"ndjson"},
                {"name":"start","valueDate":"2024-01-01"}]}"#,
            inner_target: "/fhir/Patient/p1/$everything",
            inner_params: &["start"],
            types: BOTH,
        },
    ];
    for form in &forms {
        let what = format!("{} {}", form.method, form.target);
        let status_url = server
            .kick_off(form.method.clone(), form.target, form.headers, form.body)
            .await;
        let manifest = server.manifest(&status_url).await;
        assert_eq!(
            manifest["request"],
            format!("{}{}", server.base, form.target),
            "{what}: BULK-9 request is the kick-off URL"
        );
        assert_eq!(manifest["requiresAccessToken"], true, "{what}");
        assert_eq!(manifest["error"], json!([]), "{what}");
        let output = fetch(&server.client, &manifest, "output").await;
        let types: BTreeSet<&str> = output.iter().map(|f| f.kind.as_str()).collect();
        assert_eq!(types, form.types.iter().copied().collect(), "{what}");

        let seen = server.seen.take();
        assert_eq!(seen.len(), 1, "{what}: one inner request: {seen:?}");
        let inner = &seen[0];
        assert_eq!(inner.method, form.method, "{what}");
        assert_eq!(inner.target(), form.inner_target, "{what}");
        assert!(
            !inner
                .header("prefer")
                .unwrap_or_default()
                .contains("respond-async"),
            "{what}: PREFER-9 {:?}",
            inner.headers
        );
        let params: Vec<String> = if inner.body.is_empty() {
            Vec::new()
        } else if form
            .headers
            .iter()
            .any(|(_, v)| v.contains("form-urlencoded"))
        {
            form_urlencoded::parse(&inner.body)
                .map(|(name, _)| name.into_owned())
                .collect()
        } else {
            let body: Value = serde_json::from_slice(&inner.body).expect("a Parameters body");
            assert_eq!(body["resourceType"], "Parameters", "{what}");
            items(&body, "parameter")
                .iter()
                .map(|p| p["name"].as_str().unwrap().to_owned())
                .collect()
        };
        assert_eq!(
            params, form.inner_params,
            "{what}: inner body {:?}",
            inner.body
        );
        if let Some(length) = inner.header("content-length") {
            assert_eq!(
                length,
                inner.body.len().to_string(),
                "{what}: Content-Length of the rewritten body"
            );
        }
    }
}

// BULK-2, SEL-4, KICK-5: an `_outputFormat` other than NDJSON — in the query, a Parameters body or
// a form body, on an operation or a search — is refused at kick-off: `400` + OperationOutcome
// `not-supported`, no job recorded, the wrapped service never called.
#[tokio::test]
async fn bulk_2_unsupported_output_format_is_refused_at_kick_off() {
    let server = start(fhir_routes(), |b| b).await;
    let refused: [(Method, &str, Headers<'_>, &str); 6] = [
        (Method::GET, "/$export?_outputFormat=text%2Fcsv", &[], ""),
        (
            Method::GET,
            "/Observation?_outputFormat=application%2Ffhir%2Bjson",
            &[],
            "",
        ),
        (
            Method::GET,
            "/Patient/$export?_outputFormat=application/fhir+xml",
            &[],
            "",
        ),
        (
            Method::POST,
            "/Group/g1/$export?_outputFormat=ndjson2",
            &[],
            "",
        ),
        (
            Method::POST,
            "/Group/g1/$export",
            &[("content-type", "application/json")],
            r#"{"resourceType":"Parameters","parameter":[{"name":"_outputFormat","valueString":"text/csv"}]}"#,
        ),
        (
            Method::POST,
            "/Observation/_search",
            &[("content-type", "application/x-www-form-urlencoded")],
            "code=x&_outputFormat=parquet",
        ),
    ];
    for (method, target, headers, body) in refused {
        let reply = server.send(method.clone(), target, headers, body).await;
        assert_eq!(
            reply.status,
            StatusCode::BAD_REQUEST,
            "{method} {target}: {reply:?}"
        );
        reply.assert_outcome("not-supported");
        assert!(reply.headers.get("content-location").is_none(), "{target}");
    }
    assert_eq!(server.jobs.len(), 0, "no job was recorded");
    assert!(
        server.seen.take().is_empty(),
        "the wrapped service was never called"
    );
}

// SEL-4, SEL-1: with `.bulk(false)`, `_outputFormat` is refused with `400` `not-supported` and
// `$export` runs as an interaction (a batch-response Bundle); with `.bulk_operations(..)` another
// operation takes the bulk pattern without `_outputFormat`.
#[tokio::test]
async fn sel_4_bulk_off_and_configured_bulk_operations() {
    let off = start(fhir_routes(), |b| b.bulk(false)).await;
    let reply = off
        .send(Method::GET, "/Observation?_outputFormat=ndjson", &[], "")
        .await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST, "{reply:?}");
    reply.assert_outcome("not-supported");
    let status_url = off.export("/$export").await;
    let done = off.finished(&status_url).await;
    assert_eq!(done.status, StatusCode::OK, "{done:?}");
    assert_eq!(done.json()["type"], "batch-response");

    let routes = Router::new().route("/fhir/Patient/$extract", get(small_export));
    let custom = start(routes, |b| b.bulk_operations(["$extract"])).await;
    let status_url = custom.export("/Patient/$extract").await;
    let manifest = custom.manifest(&status_url).await;
    assert_eq!(items(&manifest, "output").len(), 2, "{manifest}");
}

// ---------------------------------------------------------------------------------------------
// Issue #11 item 10: bulk-data conformance at kick-off.

// BULK-1 (issue #11 item 10a): `$export` without `Prefer: respond-async` is never streamed back
// synchronously: by default it is processed as if `respond-async` had been sent.
#[tokio::test]
async fn bulk_1_export_without_prefer_runs_asynchronously_by_default() {
    let server = start(fhir_routes(), |b| b).await;
    for target in ["/$export", "/Patient/$export", "/Group/g1/$export"] {
        let reply = server
            .client
            .send(Method::GET, &format!("{}{target}", server.base), &[], "")
            .await;
        assert_eq!(reply.status, StatusCode::ACCEPTED, "{target}: {reply:?}");
        let status_url = reply.header("content-location").to_owned();
        assert!(
            status_url.starts_with(&format!("{}/_async/", server.base)),
            "{target}: {reply:?}"
        );
        let manifest = server.manifest(&status_url).await;
        assert!(
            manifest["output"].as_array().is_some_and(|o| !o.is_empty()),
            "{target}: {manifest}"
        );
    }
    // The wrapped service saw each export once, without `respond-async`.
    let seen = server.seen.take();
    assert_eq!(seen.len(), 3, "{seen:?}");
    assert!(
        seen.iter().all(|s| s.header("prefer").is_none()),
        "{seen:?}"
    );
}

// BULK-1 (issue #11 item 10a): set to refuse, `$export` without `Prefer: respond-async` gets
// `400` + OperationOutcome, and the wrapped service sees nothing.
#[tokio::test]
async fn bulk_1_export_without_prefer_can_be_refused() {
    let server = start(fhir_routes(), |b| {
        b.bulk_without_prefer(BulkWithoutPrefer::Refuse)
    })
    .await;
    for method in [Method::GET, Method::POST] {
        let reply = server
            .client
            .send(
                method.clone(),
                &format!("{}/Patient/$export", server.base),
                &[],
                "",
            )
            .await;
        assert_eq!(reply.status, StatusCode::BAD_REQUEST, "{method}: {reply:?}");
        reply.assert_outcome("invalid");
        assert!(
            String::from_utf8_lossy(&reply.body).contains("Prefer: respond-async"),
            "the outcome says what to send: {reply:?}"
        );
    }
    assert!(server.seen.take().is_empty());
    assert_eq!(server.jobs.len(), 0, "a refused kick-off keeps no job");
    // With the preference, the same export is accepted.
    let status_url = server.export("/Patient/$export").await;
    server.manifest(&status_url).await;
}

// KICK-5, BULK-6 (issue #11 item 10b): a client error the wrapped service reports at once (an
// unknown Group, a forbidden one) is the kick-off's own answer — its status and
// OperationOutcome — and no job is kept; other answers still give `202`.
#[tokio::test]
async fn kick_5_client_errors_reported_at_once_answer_the_kick_off() {
    // A long wait, so that "at once" holds on a loaded machine; the default is 50 ms.
    let server = start(
        Router::new().route("/fhir/Group/{case}/$export", get(failure)),
        |b| b.kickoff_wait(BOUND),
    )
    .await;
    for (case, status) in [
        ("forbidden", StatusCode::FORBIDDEN),
        ("missing", StatusCode::NOT_FOUND),
    ] {
        let reply = server
            .send(Method::GET, &format!("/Group/{case}/$export"), &[], "")
            .await;
        assert_eq!(reply.status, status, "{case}: {reply:?}");
        assert!(reply.headers.get("content-location").is_none(), "{reply:?}");
        let outcome = reply.json();
        assert_eq!(
            outcome["resourceType"], "OperationOutcome",
            "{case}: {outcome}"
        );
        assert_eq!(server.jobs.len(), 0, "{case}: no job is kept");
    }
    assert_eq!(
        server.seen.take().len(),
        2,
        "each kick-off reached the service once"
    );
    // A server error, or a success, is the job's: 202, and the status URL reports it.
    for (case, status) in [
        ("crash", StatusCode::INTERNAL_SERVER_ERROR),
        ("csv", StatusCode::BAD_GATEWAY),
    ] {
        let status_url = server.export(&format!("/Group/{case}/$export")).await;
        let reply = server.finished(&status_url).await;
        assert_eq!(reply.status, status, "{case}: {reply:?}");
    }
}

// KICK-5 (issue #11 item 10b): a client error that comes after the kick-off's wait is the
// job's, reported at the status URL as before.
#[tokio::test]
async fn kick_5_a_late_client_error_is_the_jobs() {
    let release = Arc::new(Notify::new());
    let held = release.clone();
    let routes = Router::new().route(
        "/fhir/$export",
        get(move || {
            let held = held.clone();
            async move {
                held.notified().await;
                failure(axum::extract::Path("missing".to_owned())).await
            }
        }),
    );
    let server = start(routes, |b| b.kickoff_wait(Duration::from_millis(20))).await;
    // Released only after the 202: the answer cannot have come within the wait.
    let status_url = server.export("/$export").await;
    release.notify_one();
    let reply = server.finished(&status_url).await;
    assert_eq!(reply.status, StatusCode::NOT_FOUND, "{reply:?}");
}
