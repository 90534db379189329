//! The bulk file route over a real socket (BULK-13, BULK-14, BULK-15): compression, `HEAD`, the
//! route's defences against path tricks, and files bound to the caller.

mod support;

use axum::Router;
use axum::body::Body;
use axum::response::Response;
use axum::routing::{get, post};
use http::{HeaderName, Method, StatusCode, Uri};
use serde_json::Value;
use support::bulk::{NDJSON, created, fhir_routes, items, manifest_of, ndjson, patients, start};
use support::{assert_not_found, job_id};

// ---------------------------------------------------------------------------------------------
// 6. Compression, 13. HEAD.

/// Decompresses a gzip body.
async fn gunzip(body: &[u8]) -> Vec<u8> {
    use tokio::io::AsyncReadExt;
    let mut decoder = async_compression::tokio::bufread::GzipDecoder::new(body);
    let mut plain = Vec::new();
    decoder.read_to_end(&mut plain).await.expect("valid gzip");
    plain
}

// BULK-13, BULK-15 (interop.md "Files"): with `Accept-Encoding` admitting gzip (as clients send
// it, or `*`) the file is gzip with `Content-Encoding: gzip` and decompresses to exactly the plain
// bytes; without `Accept-Encoding`, with `identity` only or with `gzip;q=0` it is plain, with
// `Content-Length`; `Accept` is optional.
#[tokio::test]
async fn bulk_15_gzip_when_asked_same_bytes() {
    let body = patients(3000, "gzip-test-patient-with-a-longer-id");
    let routes = Router::new().route(
        "/fhir/$export",
        get(move || {
            let body = body.clone();
            async move { ndjson(body) }
        }),
    );
    let server = start(routes, |b| b).await;
    let status_url = server.export("/$export").await;
    let manifest = server.manifest(&status_url).await;
    let url = manifest["output"][0]["url"].as_str().unwrap().to_owned();

    let plain = server.client.get(&url).await;
    assert_eq!(plain.status, StatusCode::OK);
    assert_eq!(plain.header("content-type"), NDJSON);
    assert!(plain.headers.get("content-encoding").is_none());
    assert_eq!(plain.header("content-length"), plain.body.len().to_string());
    assert_eq!(
        plain.body,
        patients(3000, "gzip-test-patient-with-a-longer-id")
    );

    for accept_encoding in [
        "gzip, deflate, br, identity",
        "gzip",
        "br;q=1.0, GZIP;q=0.5",
        "*",
    ] {
        let reply = server
            .client
            .send(
                Method::GET,
                &url,
                &[("accept", NDJSON), ("accept-encoding", accept_encoding)],
                "",
            )
            .await;
        assert_eq!(reply.status, StatusCode::OK, "{accept_encoding}");
        assert_eq!(reply.header("content-type"), NDJSON, "{accept_encoding}");
        assert_eq!(
            reply.header("content-encoding"),
            "gzip",
            "{accept_encoding}"
        );
        assert!(
            reply
                .header("vary")
                .to_ascii_lowercase()
                .contains("accept-encoding")
        );
        assert_eq!(
            &reply.body[..2],
            [0x1f, 0x8b],
            "{accept_encoding}: gzip magic"
        );
        assert!(
            reply.body.len() < plain.body.len(),
            "{accept_encoding}: compressed"
        );
        assert_eq!(
            gunzip(&reply.body).await,
            plain.body,
            "{accept_encoding}: same bytes"
        );
    }
    for accept_encoding in ["identity", "gzip;q=0, identity", "br"] {
        let reply = server
            .client
            .send(
                Method::GET,
                &url,
                &[("accept-encoding", accept_encoding)],
                "",
            )
            .await;
        assert_eq!(reply.status, StatusCode::OK, "{accept_encoding}");
        assert!(
            reply.headers.get("content-encoding").is_none(),
            "{accept_encoding}"
        );
        assert_eq!(reply.body, plain.body, "{accept_encoding}");
    }
}

// BULK-13: `HEAD` on a file gives the `GET` headers (type, length; encoding when gzip is asked)
// and no body.
#[tokio::test]
async fn bulk_13_head_on_a_file() {
    let server = start(fhir_routes(), |b| b).await;
    let status_url = server.export("/$export").await;
    let manifest = server.manifest(&status_url).await;
    let url = manifest["output"][0]["url"].as_str().unwrap().to_owned();
    let get = server.client.get(&url).await;

    let head = server.client.send(Method::HEAD, &url, &[], "").await;
    assert_eq!(head.status, StatusCode::OK, "{head:?}");
    assert_eq!(head.header("content-type"), NDJSON);
    assert_eq!(head.header("content-length"), get.body.len().to_string());
    assert!(head.body.is_empty());

    let head = server
        .client
        .send(Method::HEAD, &url, &[("accept-encoding", "gzip")], "")
        .await;
    assert_eq!(head.status, StatusCode::OK, "{head:?}");
    assert_eq!(head.header("content-encoding"), "gzip");
    assert!(head.body.is_empty());

    let missing = server
        .client
        .send(
            Method::HEAD,
            &format!("{status_url}/file/Encounter-1.ndjson"),
            &[],
            "",
        )
        .await;
    assert_eq!(missing.status, StatusCode::NOT_FOUND);
    assert!(missing.body.is_empty(), "HEAD has no body");
}

// ---------------------------------------------------------------------------------------------
// 9. The file route's defences.

/// What a file request must get.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Expect {
    NotFound,
    NotAllowed,
    /// Job A's own `Patient-1.ndjson` (the query string is not part of the name).
    OwnFile,
}

// BULK-13, CANCEL-7, SEC-9, SEL-7: table-driven tricks on the file route of job A (`..` plain and
// encoded, encoded slashes, double slashes, another job's path and id, names of files that were
// never written, malformed and overlong names, unknown, interaction and failed jobs, query
// strings, methods other than GET/HEAD): always 404 (or 405 with `Allow: GET, HEAD`) with an
// OperationOutcome, never job B's file; afterwards both jobs' files are intact.
#[tokio::test]
async fn bulk_13_file_route_path_tricks_never_serve_another_jobs_file() {
    async fn marked(uri: Uri) -> Response {
        // `/fhir/Group/{marker}/$export`: the marker is in every line.
        let marker = uri.path().split('/').nth(3).unwrap().to_owned();
        if marker == "broken" {
            return Response::builder().status(500).body(Body::empty()).unwrap();
        }
        ndjson(patients(3, &marker))
    }
    let routes = Router::new()
        .route("/fhir/Group/{id}/$export", get(marked))
        .route("/fhir/Patient", post(created));
    let server = start(routes, |b| b).await;
    let a_url = server.export("/Group/job-a/$export").await;
    let b_url = server.export("/Group/job-b-secret/$export").await;
    let f_url = server.export("/Group/broken/$export").await;
    let i_url = server
        .kick_off(
            Method::POST,
            "/Patient",
            &[("content-type", "application/fhir+json")],
            "{}",
        )
        .await;
    server.manifest(&a_url).await;
    server.manifest(&b_url).await;
    assert_eq!(
        server.finished(&f_url).await.status,
        StatusCode::INTERNAL_SERVER_ERROR
    );
    assert_eq!(server.finished(&i_url).await.status, StatusCode::OK);
    let a_file = server
        .client
        .get(&format!("{a_url}/file/Patient-1.ndjson"))
        .await;
    let b_file = server
        .client
        .get(&format!("{b_url}/file/Patient-1.ndjson"))
        .await;
    assert_eq!(a_file.status, StatusCode::OK);
    assert_eq!(b_file.status, StatusCode::OK);
    assert!(String::from_utf8_lossy(&b_file.body).contains("job-b-secret"));

    let prefix = format!("{}/_async/", server.base);
    let a = job_id(&a_url).to_owned();
    let b = job_id(&b_url).to_owned();
    let f = job_id(&f_url);
    let i = job_id(&i_url);
    let unknown = "0123456789abcdef0123456789abcdef";
    let b_upper = b.to_ascii_uppercase();
    let long_type = "A".repeat(70);
    let long_number = "1".repeat(20);
    let huge = "x".repeat(8000);
    use Expect::{NotAllowed, NotFound, OwnFile};
    let get = Method::GET;
    let rows: Vec<(Method, String, Expect)> = vec![
        (
            get.clone(),
            format!("{a}/file/../../_async/{b}/file/Patient-1.ndjson"),
            NotFound,
        ),
        (
            get.clone(),
            format!("{a}/file/..%2F..%2F{b}%2Ffile%2FPatient-1.ndjson"),
            NotFound,
        ),
        (
            get.clone(),
            format!("{a}/file/%2e%2e/%2e%2e/{b}/file/Patient-1.ndjson"),
            NotFound,
        ),
        (
            get.clone(),
            format!("{a}/file/%2E%2E%2F%2E%2E%2F{b}%2Ffile%2FPatient-1.ndjson"),
            NotFound,
        ),
        (
            get.clone(),
            format!("{a}/file/Patient-1.ndjson%2F..%2F..%2F{b}%2FPatient-1.ndjson"),
            NotFound,
        ),
        (
            get.clone(),
            format!("{a}/file/Patient-1.ndjson/../../../{b}/file/Patient-1.ndjson"),
            NotFound,
        ),
        (
            get.clone(),
            format!("{a}/file/{b}/Patient-1.ndjson"),
            NotFound,
        ),
        (
            get.clone(),
            format!("{a}/file/..%2F{b}%2FPatient-1.ndjson"),
            NotFound,
        ),
        (
            get.clone(),
            format!("{a}/file/fhir-async/{b}/Patient-1.ndjson"),
            NotFound,
        ),
        (
            get.clone(),
            format!("{a}/file/%2Ffhir-async%2F{b}%2FPatient-1.ndjson"),
            NotFound,
        ),
        (
            get.clone(),
            format!("{a}/../{b}/file/Patient-1.ndjson"),
            NotFound,
        ),
        (
            get.clone(),
            format!("{a}%2F..%2F{b}/file/Patient-1.ndjson"),
            NotFound,
        ),
        (get.clone(), format!("{a}//file/Patient-1.ndjson"), NotFound),
        (get.clone(), format!("{a}/file//Patient-1.ndjson"), NotFound),
        (get.clone(), format!("/{a}/file/Patient-1.ndjson"), NotFound),
        (get.clone(), format!("{a}/file/Patient-1.ndjson/"), NotFound),
        (
            get.clone(),
            format!("{a}/./file/Patient-1.ndjson"),
            NotFound,
        ),
        (
            get.clone(),
            format!("{a}/file/./Patient-1.ndjson"),
            NotFound,
        ),
        (
            get.clone(),
            format!("{a}%2Ffile%2FPatient-1.ndjson"),
            NotFound,
        ),
        (
            get.clone(),
            format!("{a}/file%2FPatient-1.ndjson"),
            NotFound,
        ),
        (
            get.clone(),
            format!("{b_upper}/file/Patient-1.ndjson"),
            NotFound,
        ),
        (
            get.clone(),
            format!("{a}{b}/file/Patient-1.ndjson"),
            NotFound,
        ),
        (
            get.clone(),
            format!("{}/file/Patient-1.ndjson", &b[..31]),
            NotFound,
        ),
        (
            get.clone(),
            format!("{unknown}/file/Patient-1.ndjson"),
            NotFound,
        ),
        (get.clone(), format!("{i}/file/Patient-1.ndjson"), NotFound),
        (get.clone(), format!("{f}/file/Patient-1.ndjson"), NotFound),
        (
            get.clone(),
            format!("{a}/file/Observation-1.ndjson"),
            NotFound,
        ),
        (get.clone(), format!("{a}/file/Patient-2.ndjson"), NotFound),
        (get.clone(), format!("{a}/file/errors-1.ndjson"), NotFound),
        (get.clone(), format!("{a}/file/Patient-0.ndjson"), NotFound),
        (get.clone(), format!("{a}/file/Patient-01.ndjson"), NotFound),
        (get.clone(), format!("{a}/file/patient-1.ndjson"), NotFound),
        (get.clone(), format!("{a}/file/Patient-1.NDJSON"), NotFound),
        (get.clone(), format!("{a}/file/Patient-1.json"), NotFound),
        (
            get.clone(),
            format!("{a}/file/Patient-1.ndjson%00"),
            NotFound,
        ),
        (
            get.clone(),
            format!("{a}/file/Patient-1.ndjson%00.png"),
            NotFound,
        ),
        (
            get.clone(),
            format!("{a}/file/Patient%2D1.ndjson"),
            NotFound,
        ),
        (
            get.clone(),
            format!("{a}/file/Patient-1.ndjson;{b}"),
            NotFound,
        ),
        (
            get.clone(),
            format!("{a}/file/Patient-1.ndjson.."),
            NotFound,
        ),
        (get.clone(), format!("{a}/file/.ndjson"), NotFound),
        (get.clone(), format!("{a}/file/-1.ndjson"), NotFound),
        (get.clone(), format!("{a}/file/"), NotFound),
        (get.clone(), format!("{a}/file"), NotFound),
        (get.clone(), format!("{a}/files/Patient-1.ndjson"), NotFound),
        (
            get.clone(),
            format!("{a}/file/{long_type}-1.ndjson"),
            NotFound,
        ),
        (
            get.clone(),
            format!("{a}/file/Patient-{long_number}.ndjson"),
            NotFound,
        ),
        (get.clone(), format!("{a}/file/{huge}"), NotFound),
        (
            get.clone(),
            format!("{a}/file/?../../{b}/file/Patient-1.ndjson"),
            NotFound,
        ),
        (
            get.clone(),
            format!("{a}/file/Patient-1.ndjson?name=../../{b}/file/Patient-1.ndjson"),
            OwnFile,
        ),
        (get.clone(), format!("{a}/file/Patient-1.ndjson?"), OwnFile),
        (
            Method::OPTIONS,
            format!("{a}/file/Patient-1.ndjson"),
            NotAllowed,
        ),
        (
            Method::DELETE,
            format!("{a}/file/Patient-1.ndjson"),
            NotAllowed,
        ),
        (
            Method::POST,
            format!("{a}/file/Patient-1.ndjson"),
            NotAllowed,
        ),
        (
            Method::PUT,
            format!("{a}/file/Patient-1.ndjson"),
            NotAllowed,
        ),
        (
            Method::PATCH,
            format!("{a}/file/Patient-1.ndjson"),
            NotAllowed,
        ),
        (
            Method::DELETE,
            format!("{a}/file/../../{b}/file/Patient-1.ndjson"),
            NotAllowed,
        ),
    ];
    let mut failures = Vec::new();
    for (method, path, expect) in &rows {
        let url = format!("{prefix}{path}");
        let shown: String = url.chars().take(160).collect();
        let reply = server.client.send(method.clone(), &url, &[], "").await;
        if String::from_utf8_lossy(&reply.body).contains("job-b-secret") {
            failures.push(format!("{method} {shown}: served job B's data: {reply:?}"));
            continue;
        }
        let outcome = || -> Result<(), String> {
            let want = match expect {
                OwnFile => {
                    if reply.status != StatusCode::OK || reply.body != a_file.body {
                        return Err(format!("expected job A's file, got {reply:?}"));
                    }
                    return Ok(());
                }
                NotFound => (StatusCode::NOT_FOUND, "not-found"),
                NotAllowed => (StatusCode::METHOD_NOT_ALLOWED, "not-supported"),
            };
            if reply.status != want.0 {
                return Err(format!("expected {}, got {reply:?}", want.0));
            }
            if *expect == NotAllowed
                && reply.headers.get("allow").and_then(|v| v.to_str().ok()) != Some("GET, HEAD")
            {
                return Err(format!("no `Allow: GET, HEAD`: {reply:?}"));
            }
            let is_outcome = reply
                .headers
                .get("content-type")
                .and_then(|v| v.to_str().ok())
                == Some("application/fhir+json")
                && serde_json::from_slice::<Value>(&reply.body).is_ok_and(|o| {
                    o["resourceType"] == "OperationOutcome" && o["issue"][0]["code"] == want.1
                });
            if !is_outcome {
                return Err(format!("no OperationOutcome `{}`: {reply:?}", want.1));
            }
            Ok(())
        };
        if let Err(why) = outcome() {
            failures.push(format!("{method} {shown}: {why}"));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} rows failed:\n{}",
        failures.len(),
        rows.len(),
        failures.join("\n")
    );

    // Nothing above changed anything: both jobs' files are served as before.
    let a_again = server
        .client
        .get(&format!("{a_url}/file/Patient-1.ndjson"))
        .await;
    let b_again = server
        .client
        .get(&format!("{b_url}/file/Patient-1.ndjson"))
        .await;
    assert_eq!(
        (a_again.status, a_again.body),
        (StatusCode::OK, a_file.body)
    );
    assert_eq!(
        (b_again.status, b_again.body),
        (StatusCode::OK, b_file.body)
    );
}

// ---------------------------------------------------------------------------------------------
// 11. Files bound to the caller.

// BULK-14, SEC-3, SEC-10: with caller binding and `requiresAccessToken` true (the default), only
// the kick-off's caller gets the status and the files; another caller, or none, gets 404 + OO.
// With `requires_access_token(false)` the file URLs are capability URLs: anyone holding one gets
// the file (the status stays bound), and the manifest says `requiresAccessToken: false`.
// Another caller's DELETE is refused the same way and removes nothing (CANCEL-7).
#[tokio::test]
async fn bulk_14_files_bound_to_the_caller_unless_capability_urls() {
    let caller = HeaderName::from_static("x-caller");
    let alice = [("x-caller", "alice")];
    let bob = [("x-caller", "bob")];
    for requires_token in [true, false] {
        let caller = caller.clone();
        let server = start(fhir_routes(), move |b| {
            b.caller_from_header(caller)
                .requires_access_token(requires_token)
        })
        .await;
        let status_url = server.kick_off(Method::GET, "/$export", &alice, "").await;
        let done = server.finished_with(&status_url, &alice).await;
        let manifest = manifest_of(&done, &status_url);
        assert_eq!(manifest["requiresAccessToken"], requires_token);
        assert_not_found(
            &server.client.send(Method::GET, &status_url, &bob, "").await,
            "another caller's status",
        );
        let refused = server
            .client
            .send(Method::DELETE, &status_url, &bob, "")
            .await;
        assert_not_found(&refused, "another caller's DELETE");
        for item in items(&manifest, "output") {
            let url = item["url"].as_str().unwrap();
            let own = server.client.send(Method::GET, url, &alice, "").await;
            assert_eq!(own.status, StatusCode::OK, "{url}: {own:?}");
            for (who, headers) in [("bob", &bob[..]), ("nobody", &[][..])] {
                let reply = server.client.send(Method::GET, url, headers, "").await;
                if requires_token {
                    assert_not_found(&reply, &format!("{who} asking for alice's file"));
                } else {
                    assert_eq!(
                        reply.status,
                        StatusCode::OK,
                        "{who}: capability URL: {reply:?}"
                    );
                    assert_eq!(reply.body, own.body, "{who}");
                }
            }
        }
    }
}
