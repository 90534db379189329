//! What a bulk export writes, over a real socket (BULK-3, BULK-7, BULK-9, BULK-10): a large
//! export split into exact files, paging through searches, partial failures as error files, and
//! file-size limits.

mod support;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::response::Response;
use axum::routing::get;
use bytes::Bytes;
use http::{HeaderMap, Method, StatusCode, Uri};
use serde_json::{Value, json};
use support::bulk::{
    FHIR_JSON_ACCEPT, Seen, fetch, fhir_routes, ids, items, lines_by_type, ndjson, patients,
    query_value, start, streamed,
};
use support::fhir_json;
use tokio::sync::Notify;

// ---------------------------------------------------------------------------------------------
// 2. A large export.

const TYPES: [&str; 4] = ["Patient", "Observation", "Encounter", "Condition"];
const LARGE: usize = 100_000;
const PER_FILE: usize = 9_000;

/// 100 000 small resources: 60 000 of four types interleaved irregularly, then four blocks of
/// 10 000; a few `\r\n` line ends and blank lines, no newline after the last line; sent in
/// 8191-byte chunks that split lines anywhere. Returns the chunks and each type's lines.
fn large_export() -> (Vec<Bytes>, BTreeMap<String, Vec<String>>) {
    let mut text = String::with_capacity(LARGE * 48);
    let mut expected: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for i in 0..LARGE {
        let kind = if i < 60_000 {
            TYPES[(i * 7 + i / 3) % 4]
        } else {
            TYPES[(i - 60_000) / 10_000]
        };
        let line = format!("{{\"resourceType\":\"{kind}\",\"id\":\"r{i}\"}}");
        text.push_str(&line);
        expected.entry(kind.to_owned()).or_default().push(line);
        if i + 1 == LARGE {
            break;
        }
        text.push_str(if i % 997 == 0 { "\r\n" } else { "\n" });
        if i % 4999 == 0 {
            text.push('\n');
        }
    }
    let bytes = Bytes::from(text);
    let chunks = (0..bytes.len())
        .step_by(8191)
        .map(|at| bytes.slice(at..(at + 8191).min(bytes.len())))
        .collect();
    (chunks, expected)
}

// BULK-9, BULK-10, BULK-13, BULK-3 (interop.md "Completion", "Files"): a 100 000-resource NDJSON
// export is split per resource type and at `max_file_resources`; every file holds only its type,
// the manifest `count` equals each file's lines, the files hold exactly the data sent (in order,
// none lost or duplicated), and the object store holds exactly the listed files.
#[tokio::test]
async fn bulk_9_bulk_10_hundred_thousand_resources_into_exact_files() {
    let (chunks, expected) = large_export();
    let chunks = Arc::new(chunks);
    let routes = Router::new().route(
        "/fhir/$export",
        get(move || {
            let chunks = chunks.clone();
            async move { ndjson(streamed(chunks.to_vec())) }
        }),
    );
    let server = start(routes, |b| b.max_file_resources(PER_FILE as u64)).await;
    let status_url = server
        .kick_off(Method::GET, "/$export", &[FHIR_JSON_ACCEPT], "")
        .await;
    let manifest = server.manifest(&status_url).await;
    assert_eq!(manifest["error"], json!([]), "nothing went wrong");

    let output = fetch(&server.client, &manifest, "output").await;
    let total: u64 = items(&manifest, "output")
        .iter()
        .map(|item| item["count"].as_u64().unwrap())
        .sum();
    assert_eq!(total, LARGE as u64);
    for kind in TYPES {
        let names: Vec<&str> = output
            .iter()
            .filter(|f| f.kind == kind)
            .map(|f| f.name.as_str())
            .collect();
        let files = expected[kind].len().div_ceil(PER_FILE);
        assert!(files >= 2, "several files of {kind}");
        let numbered: Vec<String> = (1..=files).map(|n| format!("{kind}-{n}.ndjson")).collect();
        assert_eq!(
            names, numbered,
            "{kind}: files filled to max_file_resources, in order"
        );
    }
    for file in &output {
        assert!(
            file.lines.len() <= PER_FILE,
            "{}: {} lines",
            file.name,
            file.lines.len()
        );
    }
    assert_eq!(
        lines_by_type(&output),
        expected,
        "the files hold exactly the data sent"
    );

    let stored = server.stored(&status_url).await;
    let listed: BTreeMap<String, u64> = output
        .iter()
        .map(|f| (f.name.clone(), f.bytes.len() as u64))
        .collect();
    assert_eq!(stored, listed, "the store holds exactly the listed files");
}

// ---------------------------------------------------------------------------------------------
// 3. Paging through a search.

const SECRET: &str = "Bearer s3cr3t-token";

fn observation(page: u32, i: u32) -> Value {
    let mut resource = json!({
        "resourceType": "Observation", "id": format!("obs-{page}-{i}"), "status": "final",
        "code": {"text": "x"},
    });
    if page == 3 && i == 0 {
        resource["note"] =
            json!([{"text": "two  spaces,\n a newline, \"quotes\" and { } : , [ ]"}]);
    }
    resource
}

/// A search of four 30-Observation pages (`total` 120), pretty-printed. Page 1 includes two
/// Patients (`search.mode = include`), page 2 an OperationOutcome (`search.mode = outcome`).
/// `next` links: absolute, then an absolute path, then absolute to another path.
async fn search_page(headers: HeaderMap, uri: Uri) -> Response {
    let host = headers["host"].to_str().unwrap().to_owned();
    let page: u32 = query_value(&uri, "page").map_or(1, |p| p.parse().unwrap());
    let mut entry: Vec<Value> = (0..30)
        .map(|i| {
            json!({"fullUrl": format!("http://{host}/fhir/Observation/obs-{page}-{i}"),
                        "resource": observation(page, i), "search": {"mode": "match"}})
        })
        .collect();
    if page == 1 {
        for id in ["p1", "p2"] {
            entry.push(json!({"resource": {"resourceType": "Patient", "id": id}, "search": {"mode": "include"}}));
        }
    }
    if page == 2 {
        entry.push(json!({"resource": {"resourceType": "OperationOutcome", "issue": [
            {"severity": "warning", "code": "informational", "diagnostics": "code x is deprecated"}]},
            "search": {"mode": "outcome"}}));
    }
    let mut link = vec![json!({"relation": "self", "url": format!("http://{host}{uri}")})];
    let next = match page {
        1 => Some(format!("http://{host}/fhir/Observation?code=x&page=2")),
        2 => Some("/fhir/Observation?code=x&page=3".to_owned()),
        3 => Some(format!("http://{host}/fhir/_page?token=abc&page=4")),
        _ => None,
    };
    if let Some(next) = next {
        link.push(json!({"relation": "next", "url": next}));
    }
    let bundle = json!({"resourceType": "Bundle", "type": "searchset", "total": 120, "link": link, "entry": entry});
    Response::builder()
        .header("content-type", "application/fhir+json; charset=utf-8")
        .body(Body::from(serde_json::to_string_pretty(&bundle).unwrap()))
        .unwrap()
}

// BULK-10, BULK-7, BULK-9, SEC-14, SEL-6, PREFER-9: a paged search is followed through its `next`
// links (absolute, absolute path, another path); every resource arrives exactly once, pretty
// JSON becomes one compact line with strings intact, included resources get their own file, an
// `outcome` entry goes to the error file; every page request carried the kick-off's credentials
// and none carried `_outputFormat`, `_maximumFileSize` or `respond-async`.
#[tokio::test]
async fn bulk_10_paged_search_every_resource_once_with_credentials() {
    let routes = Router::new()
        .route("/fhir/Observation", get(search_page))
        .route("/fhir/_page", get(search_page));
    let server = start(routes, |b| b).await;
    let status_url = server
        .kick_off(
            Method::GET,
            "/Observation?code=x&_outputFormat=application%2Ffhir%2Bndjson&_maximumFileSize=1048576",
            &[("authorization", SECRET), FHIR_JSON_ACCEPT],
            "",
        )
        .await;
    let manifest = server.manifest(&status_url).await;

    let seen = server.seen.take();
    let targets: Vec<&str> = seen.iter().map(Seen::target).collect();
    assert_eq!(
        targets,
        [
            "/fhir/Observation?code=x",
            "/fhir/Observation?code=x&page=2",
            "/fhir/Observation?code=x&page=3",
            "/fhir/_page?token=abc&page=4",
        ]
    );
    for request in &seen {
        assert_eq!(request.method, Method::GET);
        assert_eq!(request.header("authorization"), Some(SECRET), "{request:?}");
        let target = request.target();
        assert!(
            !target.contains("_outputFormat") && !target.contains("_maximumFileSize"),
            "{target}"
        );
        assert!(
            !request
                .header("prefer")
                .unwrap_or_default()
                .contains("respond-async"),
            "{request:?}"
        );
    }

    let output = fetch(&server.client, &manifest, "output").await;
    let by_type = lines_by_type(&output);
    let mut observations = ids(&by_type["Observation"]);
    let count = observations.len();
    observations.sort();
    observations.dedup();
    assert_eq!(count, observations.len(), "no Observation twice");
    let mut wanted: Vec<String> = (1..=4)
        .flat_map(|page| (0..30).map(move |i| format!("obs-{page}-{i}")))
        .collect();
    wanted.sort();
    assert_eq!(observations, wanted, "every Observation once");
    assert_eq!(ids(&by_type["Patient"]), ["p1", "p2"]);
    let noted = by_type["Observation"]
        .iter()
        .find(|line| line.contains("obs-3-0"))
        .unwrap();
    assert_eq!(
        noted,
        &serde_json::to_string(&observation(3, 0)).unwrap(),
        "compact, strings intact"
    );

    let errors = fetch(&server.client, &manifest, "error").await;
    assert_eq!(errors.len(), 1, "{manifest}");
    assert_eq!(errors[0].lines.len(), 1);
    let outcome: Value = serde_json::from_str(&errors[0].lines[0]).unwrap();
    assert_eq!(outcome["issue"][0]["diagnostics"], "code x is deprecated");
}

// STATUS-4, BULK-5: while a paged export runs, the status is `202` with `X-Progress` as a
// percentage of the first page's `Bundle.total`, which clients parse as a number.
#[tokio::test]
async fn status_4_progress_is_a_percentage_of_bundle_total() {
    let gate = Arc::new(Notify::new());
    let page = {
        let gate = gate.clone();
        move |headers: HeaderMap, uri: Uri| {
            let gate = gate.clone();
            async move {
                let host = headers["host"].to_str().unwrap().to_owned();
                let second = query_value(&uri, "page").is_some();
                if second {
                    gate.notified().await;
                }
                let (from, to) = if second { (1000, 3000) } else { (0, 1000) };
                let entry: Vec<Value> = (from..to)
                    .map(|i| json!({"resource": {"resourceType": "Observation", "id": format!("o{i}")}}))
                    .collect();
                let mut bundle = json!({"resourceType": "Bundle", "type": "searchset", "total": 3000, "entry": entry});
                if !second {
                    bundle["link"] = json!([{"relation": "next", "url": format!("http://{host}/fhir/Observation?page=2")}]);
                }
                fhir_json(StatusCode::OK, &bundle)
            }
        }
    };
    let server = start(Router::new().route("/fhir/Observation", get(page)), |b| b).await;
    let status_url = server.export("/Observation?_outputFormat=ndjson").await;
    let mut progress = String::new();
    for _ in 0..500 {
        let reply = server.client.get(&status_url).await;
        assert_eq!(
            reply.status,
            StatusCode::ACCEPTED,
            "page 2 is held back: {reply:?}"
        );
        assert!(reply.headers.contains_key("retry-after"), "{reply:?}");
        progress = reply
            .headers
            .get("x-progress")
            .map(|v| v.to_str().unwrap().to_owned())
            .unwrap_or_default();
        if !progress.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(progress, "33% complete (1000 of 3000 resources)");
    gate.notify_one();
    let manifest = server.manifest(&status_url).await;
    assert_eq!(manifest["output"][0]["count"], 3000, "{manifest}");
}

// BULK-10, BULK-7: a server whose `next` links go round in a circle (page 1 → page 2 → the very
// URL of page 1 → …) must not make the export run forever, writing the same resources again and
// again: it should end with each resource once and an error entry. (The handler breaks the
// circle itself after `CIRCLE_CAP` pages, so that a layer that follows it still finishes.)
#[tokio::test]
async fn bulk_10_next_links_in_a_circle_end_the_export() {
    const CIRCLE_CAP: usize = 1000;
    let calls = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let circle = {
        let calls = calls.clone();
        move |uri: Uri| {
            let call = calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
            async move {
                let second = query_value(&uri, "page").is_some();
                let (id, next) = if second {
                    ("o2", "/fhir/Observation")
                } else {
                    ("o1", "/fhir/Observation?page=2")
                };
                let mut bundle = json!({"resourceType": "Bundle", "type": "searchset",
                    "entry": [{"resource": {"resourceType": "Observation", "id": id}}]});
                if call < CIRCLE_CAP {
                    bundle["link"] = json!([{"relation": "next", "url": next}]);
                }
                fhir_json(StatusCode::OK, &bundle)
            }
        }
    };
    let server = start(Router::new().route("/fhir/Observation", get(circle)), |b| b).await;
    let status_url = server.export("/Observation?_outputFormat=ndjson").await;
    let manifest = server.manifest(&status_url).await;
    let output = fetch(&server.client, &manifest, "output").await;
    let observations = ids(&lines_by_type(&output)["Observation"]);
    let requests: Vec<String> = server
        .seen
        .take()
        .iter()
        .map(|seen| seen.target().to_owned())
        .collect();
    assert_eq!(
        &requests[..2],
        ["/fhir/Observation", "/fhir/Observation?page=2"]
    );
    assert!(
        observations == ["o1", "o2"],
        "the export followed a circle of two next links: {} page requests, {} Observations \
         written (2 distinct)",
        requests.len(),
        observations.len()
    );
    assert_eq!(items(&manifest, "error").len(), 1, "{manifest}");
}

// ---------------------------------------------------------------------------------------------
// 4. Partial failure.

// BULK-7: a later page answering 500, and a `next` link to another server, end the export but not
// the job: `200` + manifest with the resources read so far and an error file of
// OperationOutcomes saying what happened. The foreign server is never asked.
#[tokio::test]
async fn bulk_7_later_page_failure_and_foreign_link_are_error_entries() {
    async fn failing(headers: HeaderMap, uri: Uri) -> Response {
        let host = headers["host"].to_str().unwrap();
        if query_value(&uri, "page").is_some() {
            return Response::builder()
                .status(StatusCode::INTERNAL_SERVER_ERROR)
                .header("content-type", "text/plain")
                .body(Body::from("database on fire"))
                .unwrap();
        }
        let entry: Vec<Value> = (0..10)
            .map(|i| json!({"resource": {"resourceType": "Observation", "id": format!("o{i}")}}))
            .collect();
        fhir_json(
            StatusCode::OK,
            &json!({"resourceType": "Bundle", "type": "searchset", "entry": entry,
                    "link": [{"relation": "next", "url": format!("http://{host}/fhir/Observation?page=2")}]}),
        )
    }
    async fn foreign() -> Response {
        fhir_json(
            StatusCode::OK,
            &json!({"resourceType": "Bundle", "type": "searchset",
                    "entry": [{"resource": {"resourceType": "Encounter", "id": "e1"}}],
                    "link": [{"relation": "next", "url": "http://elsewhere.example/fhir/Encounter?page=2"}]}),
        )
    }
    let routes = Router::new()
        .route("/fhir/Observation", get(failing))
        .route("/fhir/Encounter", get(foreign));
    let server = start(routes, |b| b).await;

    let cases = [
        (
            "/Observation?_outputFormat=ndjson",
            "Observation",
            10,
            2,
            ["Page 2", "500"],
        ),
        (
            "/Encounter?_outputFormat=ndjson",
            "Encounter",
            1,
            1,
            ["another server", "elsewhere.example"],
        ),
    ];
    for (target, kind, count, requests, words) in cases {
        let status_url = server.export(target).await;
        let manifest = server.manifest(&status_url).await;
        let output = fetch(&server.client, &manifest, "output").await;
        assert_eq!(output.len(), 1, "{target}: {manifest}");
        assert_eq!(
            (output[0].kind.as_str(), output[0].lines.len()),
            (kind, count),
            "{target}"
        );
        let errors = fetch(&server.client, &manifest, "error").await;
        assert_eq!(errors.len(), 1, "{target}: {manifest}");
        assert_eq!(errors[0].lines.len(), 1, "{target}");
        let outcome: Value = serde_json::from_str(&errors[0].lines[0]).unwrap();
        let diagnostics = outcome["issue"][0]["diagnostics"]
            .as_str()
            .unwrap_or_default();
        for word in words {
            assert!(
                diagnostics.contains(word),
                "{target}: {diagnostics:?} should mention {word:?}"
            );
        }
        assert_eq!(server.seen.take().len(), requests, "{target}");
    }
}

// BULK-7, BULK-9, BULK-10: bad NDJSON lines (not JSON, no `resourceType`, an invalid one) become
// OperationOutcomes in the error file, OperationOutcome lines from the server go there too, and
// every other line — the last one without a newline included — is kept.
#[tokio::test]
async fn bulk_7_invalid_ndjson_lines_go_to_the_error_file() {
    async fn messy() -> Response {
        ndjson(concat!(
            "{\"resourceType\":\"Patient\",\"id\":\"a\"}\n",
            "this is not json\n",
            "{\"resourceType\":\"Observation\",\"id\":\"b\"}\n",
            "{\"id\":\"no-type\"}\n",
            "{\"resourceType\":\"../../etc\",\"id\":\"c\"}\n",
            "{\"resourceType\":\"OperationOutcome\",\"issue\":[{\"severity\":\"warning\",\"code\":\"informational\",\"diagnostics\":\"partial\"}]}\n",
            "   \n",
            "{\"resourceType\":\"Patient\",\"id\":\"d\"}",
        ))
    }
    let routes = Router::new().route("/fhir/$export", get(messy));
    let server = start(routes, |b| b).await;
    let status_url = server.export("/$export").await;
    let manifest = server.manifest(&status_url).await;
    let by_type = lines_by_type(&fetch(&server.client, &manifest, "output").await);
    assert_eq!(
        by_type.keys().collect::<Vec<_>>(),
        ["Observation", "Patient"]
    );
    assert_eq!(ids(&by_type["Patient"]), ["a", "d"]);
    assert_eq!(ids(&by_type["Observation"]), ["b"]);
    let errors = fetch(&server.client, &manifest, "error").await;
    let lines: Vec<&String> = errors.iter().flat_map(|f| &f.lines).collect();
    assert_eq!(
        lines.len(),
        4,
        "three bad lines and the server's outcome: {lines:?}"
    );
    assert!(lines.iter().any(|l| l.contains("\"partial\"")), "{lines:?}");
    assert!(
        !lines.iter().any(|l| l.contains("this is not json")),
        "bad input is described, not copied"
    );
}

// BULK-7, BULK-10: a resource's own `type` element (Encounter.type is a list of
// CodeableConcepts, Group.type a code) is the resource's business: such resources are exported
// like any other, from NDJSON lines, from searchset entries, and as a page that is one resource.
#[tokio::test]
async fn bulk_7_resources_with_a_type_element_are_exported() {
    async fn lines() -> Response {
        ndjson(concat!(
            "{\"resourceType\":\"Encounter\",\"id\":\"e1\",\"type\":[{\"text\":\"checkup\"}]}\n",
            "{\"resourceType\":\"Group\",\"id\":\"g1\",\"type\":\"person\",\"actual\":true}\n",
            "{\"type\":{\"text\":\"x\"},\"resourceType\":\"Encounter\",\"id\":\"e2\"}\n",
        ))
    }
    async fn page() -> Response {
        fhir_json(
            StatusCode::OK,
            &json!({"resourceType": "Bundle", "type": "searchset", "entry": [
                {"resource": {"resourceType": "Encounter", "id": "e3", "type": [{"text": "visit"}]}},
                {"resource": {"resourceType": "Encounter", "id": "e4", "type": {"text": "odd"}}},
            ]}),
        )
    }
    async fn one() -> Response {
        fhir_json(
            StatusCode::OK,
            &json!({"resourceType": "Encounter", "id": "e5", "type": [{"text": "single"}]}),
        )
    }
    let routes = Router::new()
        .route("/fhir/$export", get(lines))
        .route("/fhir/Encounter", get(page))
        .route("/fhir/Encounter/e5", get(one));
    let server = start(routes, |b| b).await;
    // The export's target, and the ids it should write per type.
    type Expected = &'static [(&'static str, &'static [&'static str])];
    let cases: [(&str, Expected); 3] = [
        (
            "/$export",
            &[("Encounter", &["e1", "e2"]), ("Group", &["g1"])],
        ),
        (
            "/Encounter?_outputFormat=ndjson",
            &[("Encounter", &["e3", "e4"])],
        ),
        (
            "/Encounter/e5?_outputFormat=ndjson",
            &[("Encounter", &["e5"])],
        ),
    ];
    for (target, expected) in cases {
        let status_url = server.export(target).await;
        let manifest = server.manifest(&status_url).await;
        let by_type = lines_by_type(&fetch(&server.client, &manifest, "output").await);
        let got: Vec<(&str, Vec<String>)> = by_type
            .iter()
            .map(|(kind, lines)| (kind.as_str(), ids(lines)))
            .collect();
        let expected: Vec<(&str, Vec<String>)> = expected
            .iter()
            .map(|(kind, ids)| (*kind, ids.iter().map(|id| id.to_string()).collect()))
            .collect();
        assert_eq!(got, expected, "{target}: {manifest}");
        assert!(
            fetch(&server.client, &manifest, "error").await.is_empty(),
            "{target}: no error file: {manifest}"
        );
    }
}

// BULK-7: an NDJSON stream that breaks off half-way keeps the lines read so far and says so in
// the error file; the job completes.
#[tokio::test]
async fn bulk_7_broken_ndjson_stream_keeps_what_arrived() {
    async fn broken() -> Response {
        let chunks = futures_util::stream::iter([
            Ok(Bytes::from(patients(5, "before-the-break"))),
            Ok(Bytes::from_static(
                b"{\"resourceType\":\"Patient\",\"id\":\"half",
            )),
            Err(std::io::Error::other("connection reset by peer")),
        ]);
        ndjson(Body::from_stream(chunks))
    }
    let server = start(Router::new().route("/fhir/$export", get(broken)), |b| b).await;
    let status_url = server.export("/$export").await;
    let manifest = server.manifest(&status_url).await;
    let output = fetch(&server.client, &manifest, "output").await;
    assert_eq!(
        ids(&lines_by_type(&output)["Patient"]).len(),
        5,
        "{manifest}"
    );
    let errors = fetch(&server.client, &manifest, "error").await;
    assert_eq!(errors.len(), 1, "{manifest}");
    assert!(
        errors[0].lines[0].contains("broke off"),
        "{:?}",
        errors[0].lines
    );
}

// BULK-7, BULK-3: a line longer than the layer's `result_limit` is left out with an error entry
// (in the middle of the stream, and as its unterminated last line); the lines around it are kept.
#[tokio::test]
async fn bulk_7_overlong_lines_are_error_entries() {
    async fn long_lines() -> Response {
        let long = format!(
            "{{\"resourceType\":\"Patient\",\"id\":\"long\",\"text\":\"{}\"}}",
            "x".repeat(5000)
        );
        let body = format!("{}{long}\n{}{long}", patients(2, "a"), patients(2, "b"));
        let bytes = Bytes::from(body);
        // Small chunks, so the long lines arrive in pieces.
        let chunks = (0..bytes.len())
            .step_by(700)
            .map(|at| bytes.slice(at..(at + 700).min(bytes.len())))
            .collect();
        ndjson(streamed(chunks))
    }
    let routes = Router::new().route("/fhir/$export", get(long_lines));
    let server = start(routes, |b| b.result_limit(2048)).await;
    let status_url = server.export("/$export").await;
    let manifest = server.manifest(&status_url).await;
    let output = fetch(&server.client, &manifest, "output").await;
    assert_eq!(
        ids(&lines_by_type(&output)["Patient"]),
        ["a-00000", "a-00001", "b-00000", "b-00001"]
    );
    let errors = fetch(&server.client, &manifest, "error").await;
    let lines: Vec<&String> = errors.iter().flat_map(|f| &f.lines).collect();
    assert_eq!(lines.len(), 2, "one entry per long line: {lines:?}");
    assert!(lines.iter().all(|l| l.len() < 2048), "{lines:?}");
}

// BULK-9, BULK-10: with more resource types interleaved than files kept open
// (`max_open_files(2)`), files are closed and reopened as new numbers, and still every file holds
// one type, every `count` is exact and no resource is lost or repeated.
#[tokio::test]
async fn bulk_9_more_types_than_open_files_keeps_counts_exact() {
    const KINDS: [&str; 6] = [
        "Patient",
        "Observation",
        "Encounter",
        "Condition",
        "Procedure",
        "Immunization",
    ];
    let mut body = String::new();
    let mut expected: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for i in 0..600 {
        let kind = KINDS[(i / 7) % KINDS.len()];
        let line = format!("{{\"resourceType\":\"{kind}\",\"id\":\"x{i}\"}}");
        body.push_str(&line);
        body.push('\n');
        expected.entry(kind.to_owned()).or_default().push(line);
    }
    let routes = Router::new().route(
        "/fhir/$export",
        get(move || {
            let body = body.clone();
            async move { ndjson(body) }
        }),
    );
    let server = start(routes, |b| b.max_open_files(2)).await;
    let status_url = server.export("/$export").await;
    let manifest = server.manifest(&status_url).await;
    let output = fetch(&server.client, &manifest, "output").await;
    assert!(
        output.len() > KINDS.len(),
        "files were reopened: {manifest}"
    );
    assert_eq!(lines_by_type(&output), expected);
    assert_eq!(server.stored(&status_url).await.len(), output.len());
}

// BULK-9 (interop.md "Completion"): an export with nothing in it completes with empty `output`
// and `error` arrays, and leaves no files.
#[tokio::test]
async fn bulk_9_empty_export_has_empty_arrays() {
    let routes = Router::new()
        .route("/fhir/$export", get(|| async { StatusCode::NO_CONTENT }))
        .route("/fhir/Patient/$export", get(|| async { ndjson("") }))
        .route(
            "/fhir/Observation",
            get(|| async {
                fhir_json(
                    StatusCode::OK,
                    &json!({"resourceType": "Bundle", "type": "searchset", "total": 0}),
                )
            }),
        );
    let server = start(routes, |b| b).await;
    for target in [
        "/$export",
        "/Patient/$export",
        "/Observation?_outputFormat=ndjson",
    ] {
        let status_url = server.export(target).await;
        let manifest = server.manifest(&status_url).await;
        assert_eq!(manifest["output"], json!([]), "{target}: {manifest}");
        assert_eq!(manifest["error"], json!([]), "{target}: {manifest}");
        assert!(server.stored(&status_url).await.is_empty(), "{target}");
    }
}

// ---------------------------------------------------------------------------------------------
// 10. File sizes.

// BULK-3: `_maximumFileSize` splits files so none exceeds it (every line here has the same
// length, so a file holds `limit / line` of them); it never raises the server's own
// `max_file_size`; the wrapped service never sees it; `_minimumFileSize` below it is accepted.
#[tokio::test]
async fn bulk_3_maximum_file_size_splits_files() {
    let routes = Router::new().route(
        "/fhir/$export",
        get(|| async { ndjson(patients(40, "sized")) }),
    );
    let server = start(routes, |b| b.max_file_size(300)).await;
    let line = patients(1, "sized").len();
    for (target, limit) in [
        ("/$export?_maximumFileSize=200&_minimumFileSize=38", 200),
        ("/$export?_maximumFileSize=100000", 300),
        ("/$export", 300),
    ] {
        let status_url = server.export(target).await;
        let manifest = server.manifest(&status_url).await;
        let output = fetch(&server.client, &manifest, "output").await;
        assert_eq!(
            output.len(),
            40usize.div_ceil(limit / line),
            "{target}: {manifest}"
        );
        assert!(
            output.iter().all(|f| f.bytes.len() <= limit),
            "{target}: a file over {limit} bytes"
        );
        assert_eq!(
            ids(&lines_by_type(&output)["Patient"]),
            ids(&patients(40, "sized")
                .lines()
                .map(str::to_owned)
                .collect::<Vec<_>>()),
            "{target}"
        );
        for seen in server.seen.take() {
            assert!(
                !seen.target().contains("FileSize"),
                "{target}: inner saw {}",
                seen.target()
            );
        }
    }
}

// BULK-3, KICK-5: a file size that is not a positive whole number, a maximum not above the
// minimum, or a size given twice is refused at kick-off with `400` + `invalid`; no job is made.
#[tokio::test]
async fn bulk_3_invalid_file_sizes_are_refused() {
    let server = start(fhir_routes(), |b| b).await;
    let queries = [
        "_maximumFileSize=0",
        "_maximumFileSize=-1",
        "_maximumFileSize=abc",
        "_maximumFileSize=1.5",
        "_maximumFileSize=",
        "_maximumFileSize=100&_minimumFileSize=100",
        "_maximumFileSize=100&_minimumFileSize=200",
        "_maximumFileSize=100&_maximumFileSize=200",
        "_minimumFileSize=0",
        "_minimumFileSize=-5",
    ];
    for query in queries {
        for target in [
            format!("/$export?{query}"),
            format!("/Observation?_outputFormat=ndjson&{query}"),
        ] {
            let reply = server.send(Method::GET, &target, &[], "").await;
            assert_eq!(reply.status, StatusCode::BAD_REQUEST, "{target}: {reply:?}");
            reply.assert_outcome("invalid");
        }
    }
    for value in [
        r#""valueInteger":0"#,
        r#""valueString":"big""#,
        r#""valueDecimal":1.5"#,
    ] {
        let body = format!(
            r#"{{"resourceType":"Parameters","parameter":[{{"name":"_maximumFileSize",{value}}}]}}"#
        );
        let reply = server
            .send(
                Method::POST,
                "/$export",
                &[("content-type", "application/json")],
                &body,
            )
            .await;
        assert_eq!(reply.status, StatusCode::BAD_REQUEST, "{body}: {reply:?}");
        reply.assert_outcome("invalid");
    }
    assert_eq!(server.jobs.len(), 0);
    assert!(server.seen.take().is_empty());
}
