//! A bulk data client that behaves as the published ones do (`interop.md`: the SMART bulk-data
//! client, a Python bulk-export client, Medplum), run against the demo server
//! (`examples/server`) as a child process, over plain HTTP: `$export` at system, Patient and
//! Group level, for every kick-off form those clients send, through to downloading every file
//! and deleting the job (§2.6 BULK, §2.7 CANCEL).
//!
//! Nothing here uses the library's internals: what is checked is what a client sees. What the
//! exports must contain is worked out from a plain system-level `$export`, itself checked against
//! plain searches.
//!
//! `cargo test` builds the demo first; `cargo test --test bulk_client` alone does not, so run
//! `cargo build --example server` before it.
//!
//! Every wait is bounded and nothing asserts how fast anything happened.

#[path = "support/demo.rs"]
mod demo;
mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant, SystemTime};

use demo::Demo;
use futures_util::future::join_all;
use http::{Method, StatusCode, Uri};
use serde_json::{Value, json};
use support::{Reply, TestClient};

/// The longest one wait between polls may be, whatever `Retry-After` says (clients cap it too).
const POLL_WAIT_CAP: Duration = Duration::from_secs(10);
/// How long one export may take from kick-off to manifest.
const EXPORT_WAIT: Duration = Duration::from_secs(120);

const NDJSON: &str = "application/fhir+ndjson";
/// What the SMART client and the Python client send when downloading (interop.md, Files).
const ACCEPT_ENCODING: &str = "gzip, deflate, br, identity";

/// `_since` used by the variants; the demo's data is last updated during 2024.
const SINCE: &str = "2024-07-01T00:00:00Z";
/// Heart rate and systolic blood pressure: the Observation `_typeFilter`.
const VITALS: &[&str] = &["8867-4", "8480-6"];
/// Type 2 diabetes: the Condition `_typeFilter`.
const DIABETES: &[&str] = &["44054006"];
/// `_maximumFileSize` of the variant that asks for small files.
const SMALL_FILES: usize = 20_000;

// ---------------------------------------------------------------------------------------------
// The demo server

// ---------------------------------------------------------------------------------------------
// What a client sees of resources

/// Resources by type, then by id.
type Resources = BTreeMap<String, BTreeMap<String, Value>>;

fn resource_count(resources: &Resources) -> usize {
    resources.values().map(BTreeMap::len).sum()
}

/// The patient a resource belongs to: a Patient itself, the `subject` of the others; `None` for
/// resources outside the Patient compartment (Group).
fn patient_of(kind: &str, resource: &Value) -> Option<String> {
    match kind {
        "Patient" => resource["id"].as_str().map(str::to_owned),
        _ => resource["subject"]["reference"]
            .as_str()
            .and_then(|r| r.strip_prefix("Patient/"))
            .map(str::to_owned),
    }
}

fn millis(instant: &str) -> SystemTime {
    humantime::parse_rfc3339(instant)
        .unwrap_or_else(|err| panic!("{instant:?} is not a FHIR instant: {err}"))
}

fn has_code(resource: &Value, codes: &[&str]) -> bool {
    resource["code"]["coding"]
        .as_array()
        .into_iter()
        .flatten()
        .any(|coding| coding["code"].as_str().is_some_and(|c| codes.contains(&c)))
}

/// Readable differences between what an export held and what it should have.
fn diff(actual: &Resources, expected: &Resources) -> String {
    // A few ids say enough; thousands drown the message.
    let some = |ids: Vec<&String>| {
        let shown: Vec<&str> = ids.iter().take(8).map(|id| id.as_str()).collect();
        match ids.len() {
            0 => "none".to_owned(),
            n if n <= 8 => shown.join(", "),
            n => format!("{} and {} more", shown.join(", "), n - 8),
        }
    };
    let kinds: BTreeSet<&String> = actual.keys().chain(expected.keys()).collect();
    let mut out = Vec::new();
    for kind in kinds {
        let empty = BTreeMap::new();
        let have = actual.get(kind).unwrap_or(&empty);
        let want = expected.get(kind).unwrap_or(&empty);
        let missing: Vec<&String> = want.keys().filter(|id| !have.contains_key(*id)).collect();
        let extra: Vec<&String> = have.keys().filter(|id| !want.contains_key(*id)).collect();
        let changed: Vec<&String> = have
            .iter()
            .filter(|(id, r)| want.get(*id).is_some_and(|w| w != *r))
            .map(|(id, _)| id)
            .collect();
        if !missing.is_empty() || !extra.is_empty() || !changed.is_empty() {
            out.push(format!(
                "{kind}: {} exported, {} expected; missing: {}; not expected: {}; different: {}",
                have.len(),
                want.len(),
                some(missing),
                some(extra),
                some(changed)
            ));
        }
    }
    out.join("\n")
}

// ---------------------------------------------------------------------------------------------
// The client

/// The manifest entries a client reads.
#[derive(Debug, Clone)]
struct FileEntry {
    kind: String,
    url: String,
    count: u64,
}

#[derive(Debug)]
struct Manifest {
    requires_access_token: bool,
    output: Vec<FileEntry>,
    error: Vec<FileEntry>,
}

impl Manifest {
    fn files(&self) -> impl Iterator<Item = &FileEntry> {
        self.output.iter().chain(&self.error)
    }
}

/// What `GET [base]/metadata` told the client.
struct Capability {
    types: BTreeSet<String>,
}

/// A bulk data client of one server, optionally with a bearer token.
#[derive(Clone)]
struct BulkClient {
    http: TestClient,
    base: String,
    /// `Bearer <client-id>`, for a server started with `--auth`.
    authorization: Option<String>,
}

impl BulkClient {
    fn new(base: &str, client_id: Option<&str>) -> Self {
        Self {
            http: TestClient::default(),
            base: base.to_owned(),
            authorization: client_id.map(|id| format!("Bearer {id}")),
        }
    }

    /// Sends with `headers`, plus the bearer token when `authorize` and the client has one.
    async fn send(
        &self,
        method: Method,
        url: &str,
        headers: &[(&str, &str)],
        body: &str,
        authorize: bool,
    ) -> Reply {
        let mut all: Vec<(&str, &str)> = headers.to_vec();
        if let (true, Some(token)) = (authorize, &self.authorization) {
            all.push(("authorization", token));
        }
        self.http.send(method, url, &all, body).await
    }

    async fn get_json(&self, url: &str) -> Value {
        let reply = self
            .send(
                Method::GET,
                url,
                &[("accept", "application/fhir+json")],
                "",
                true,
            )
            .await;
        assert_eq!(reply.status, StatusCode::OK, "GET {url}: {reply:?}");
        reply.json()
    }

    /// `GET [base]/metadata`: the resource types listed under `rest[0].resource`, and the three
    /// export operations declared (BULK-1; interop.md, Kick-off).
    async fn capability(&self) -> Capability {
        let statement = self.get_json(&format!("{}/metadata", self.base)).await;
        assert_eq!(
            statement["resourceType"], "CapabilityStatement",
            "{statement}"
        );
        let rest = &statement["rest"][0];
        let types: BTreeSet<String> = rest["resource"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|r| r["type"].as_str().map(str::to_owned))
            .collect();
        assert!(!types.is_empty(), "no rest[0].resource[].type: {statement}");
        // Declared at system level or on a resource, by name or by the canonical definition.
        let operations: Vec<&Value> = rest["operation"]
            .as_array()
            .into_iter()
            .flatten()
            .chain(
                rest["resource"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .flat_map(|r| r["operation"].as_array().into_iter().flatten()),
            )
            .collect();
        for wanted in ["export", "patient-export", "group-export"] {
            let declared = operations.iter().any(|op| {
                op["name"] == wanted
                    || op["definition"]
                        .as_str()
                        .is_some_and(|d| d.ends_with(&format!("/OperationDefinition/{wanted}")))
            });
            assert!(
                declared,
                "the CapabilityStatement does not declare the {wanted} operation: {statement}"
            );
        }
        Capability { types }
    }

    /// Every resource of `kind` a plain search returns, following `next` links.
    async fn search_all(&self, kind: &str, query: &str) -> BTreeMap<String, Value> {
        let mut found = BTreeMap::new();
        let mut url = Some(format!("{}/{kind}?{query}&_count=1000", self.base));
        let mut pages = 0;
        while let Some(page_url) = url.take() {
            pages += 1;
            assert!(pages <= 100, "more than 100 pages searching {kind}?{query}");
            let bundle = self.get_json(&page_url).await;
            assert_eq!(bundle["type"], "searchset", "{bundle}");
            for entry in bundle["entry"].as_array().into_iter().flatten() {
                let resource = &entry["resource"];
                let id = resource["id"].as_str().expect("a resource id").to_owned();
                found.insert(id, resource.clone());
            }
            url = bundle["link"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|l| l["relation"] == "next")
                .and_then(|l| l["url"].as_str())
                .map(str::to_owned);
        }
        found
    }

    /// The Groups a `GET [base]/Group` finds, with their member patient ids.
    async fn groups(&self) -> BTreeMap<String, BTreeSet<String>> {
        self.search_all("Group", "")
            .await
            .into_iter()
            .map(|(id, group)| {
                let members = group["member"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|m| m["entity"]["reference"].as_str())
                    .filter_map(|r| r.strip_prefix("Patient/"))
                    .map(str::to_owned)
                    .collect();
                (id, members)
            })
            .collect()
    }

    /// Sends a kick-off; BULK-1, KICK-3: exactly `202` and an absolute `Content-Location`, which
    /// it returns.
    async fn kick_off(
        &self,
        label: &str,
        method: Method,
        url: &str,
        headers: &[(&str, &str)],
        body: &str,
    ) -> String {
        let reply = self.send(method, url, headers, body, true).await;
        assert_eq!(
            reply.status,
            StatusCode::ACCEPTED,
            "{label}: kick-off {url}: {reply:?}"
        );
        let location = reply.header("content-location").to_owned();
        assert_absolute(label, "Content-Location", &location);
        // One client takes `issue[0].diagnostics` of a kick-off OperationOutcome as the status URL.
        if !reply.body.is_empty() {
            let body = reply.json();
            if body["resourceType"] == "OperationOutcome" {
                let diagnostics = &body["issue"][0]["diagnostics"];
                assert!(
                    diagnostics.is_null() || *diagnostics == location.as_str(),
                    "{label}: a kick-off OperationOutcome carries other text than the status URL \
                     in issue[0].diagnostics: {body}"
                );
            }
        }
        // Checked for its form only: the first poll goes out at once, as some clients do.
        retry_after(label, &reply);
        location
    }

    /// Polls until the export is done, as clients do: `Accept: application/json`, waiting what
    /// `Retry-After` says (capped), retrying `429` and transient `5xx` (BULK-5, STATUS-3…7).
    async fn wait_for_manifest(&self, label: &str, status_url: &str) -> Reply {
        let started = Instant::now();
        let mut wait: Option<Duration> = None;
        loop {
            if let Some(wait) = wait {
                tokio::time::sleep(wait.min(POLL_WAIT_CAP)).await;
            }
            assert!(
                started.elapsed() < EXPORT_WAIT,
                "{label}: the export at {status_url} did not finish within {EXPORT_WAIT:?}"
            );
            let reply = self
                .send(
                    Method::GET,
                    status_url,
                    &[("accept", "application/json")],
                    "",
                    true,
                )
                .await;
            match reply.status {
                StatusCode::OK => return reply,
                StatusCode::ACCEPTED => {
                    // A non-JSON body breaks one client.
                    if !reply.body.is_empty() {
                        let _ = reply.json();
                    }
                    let after = retry_after(label, &reply);
                    assert!(
                        after.is_some(),
                        "{label}: an in-progress reply without Retry-After (one client then \
                         waits 60 s): {reply:?}"
                    );
                    wait = after;
                }
                status
                    if status == StatusCode::TOO_MANY_REQUESTS
                        || (status.is_server_error() && only_transient(&reply)) =>
                {
                    wait = retry_after(label, &reply).or(Some(Duration::from_secs(1)));
                }
                _ => panic!("{label}: polling {status_url}: {reply:?}"),
            }
        }
    }

    /// Downloads one file twice, as clients do: with no `Accept` header at all, and with
    /// `Accept: application/fhir+ndjson` asking for gzip; BULK-13, BULK-15. Checks every line
    /// and the manifest's `count`; returns the lines and the file's size.
    async fn download(
        &self,
        label: &str,
        manifest: &Manifest,
        entry: &FileEntry,
    ) -> (Vec<Value>, usize) {
        // The bearer token goes only where `requiresAccessToken` says it is needed.
        let authorize = manifest.requires_access_token;
        let plain = self.send(Method::GET, &entry.url, &[], "", authorize).await;
        assert_eq!(
            plain.status,
            StatusCode::OK,
            "{label}: {}: {plain:?}",
            entry.url
        );
        assert_ndjson(label, &plain);
        let encoding = plain.headers.get("content-encoding");
        assert!(
            encoding.is_none_or(|e| e == "identity"),
            "{label}: {} is encoded although the client asked for no encoding: {plain:?}",
            entry.url
        );

        let zipped = self
            .send(
                Method::GET,
                &entry.url,
                &[("accept", NDJSON), ("accept-encoding", ACCEPT_ENCODING)],
                "",
                authorize,
            )
            .await;
        assert_eq!(
            zipped.status,
            StatusCode::OK,
            "{label}: {}: {zipped:?}",
            entry.url
        );
        assert_ndjson(label, &zipped);
        assert_eq!(
            zipped.headers.get("content-encoding").map(|e| e.as_bytes()),
            Some(&b"gzip"[..]),
            "{label}: {} asked for gzip: {:?}",
            entry.url,
            zipped.headers
        );
        assert!(
            zipped.body.starts_with(&[0x1f, 0x8b]),
            "{label}: {} says gzip but lacks the gzip magic bytes",
            entry.url
        );
        let unzipped = gunzip(&zipped.body).await;
        assert!(
            unzipped == plain.body,
            "{label}: {} gunzipped ({} bytes) differs from the plain download ({} bytes)",
            entry.url,
            unzipped.len(),
            plain.body.len()
        );

        // One resource per line, each line ended by a newline, so that every way of counting
        // lines agrees with `count` (one client fails the export when they differ).
        let text = std::str::from_utf8(&plain.body)
            .unwrap_or_else(|err| panic!("{label}: {} is not UTF-8: {err}", entry.url));
        assert!(
            text.is_empty() || text.ends_with('\n'),
            "{label}: {} does not end with a newline",
            entry.url
        );
        let lines: Vec<Value> = text
            .lines()
            .enumerate()
            .map(|(n, line)| {
                let resource: Value = serde_json::from_str(line).unwrap_or_else(|err| {
                    panic!(
                        "{label}: {} line {} is not JSON ({err}): {line}",
                        entry.url,
                        n + 1
                    )
                });
                assert_eq!(
                    resource["resourceType"],
                    entry.kind.as_str(),
                    "{label}: {} line {} is not a {}",
                    entry.url,
                    n + 1,
                    entry.kind
                );
                resource
            })
            .collect();
        assert_eq!(
            lines.len() as u64,
            entry.count,
            "{label}: {} has {} lines but the manifest's count is {}",
            entry.url,
            lines.len(),
            entry.count
        );
        (lines, plain.body.len())
    }

    /// CANCEL-1…3, CANCEL-5, CANCEL-7: after downloading, `DELETE` → `202`; then the status URL
    /// and every file are gone (`404` + OperationOutcome), and a second `DELETE` is `404`.
    async fn delete(&self, label: &str, status_url: &str, manifest: &Manifest) {
        let deleted = self.send(Method::DELETE, status_url, &[], "", true).await;
        assert_eq!(
            deleted.status,
            StatusCode::ACCEPTED,
            "{label}: DELETE {status_url}: {deleted:?}"
        );
        let gone = self
            .send(
                Method::GET,
                status_url,
                &[("accept", "application/json")],
                "",
                true,
            )
            .await;
        assert_eq!(
            gone.status,
            StatusCode::NOT_FOUND,
            "{label}: GET after DELETE: {gone:?}"
        );
        gone.assert_outcome("not-found");
        let again = self.send(Method::DELETE, status_url, &[], "", true).await;
        assert_eq!(
            again.status,
            StatusCode::NOT_FOUND,
            "{label}: second DELETE: {again:?}"
        );
        again.assert_outcome("not-found");
        for entry in manifest.files() {
            let file = self
                .send(
                    Method::GET,
                    &entry.url,
                    &[],
                    "",
                    manifest.requires_access_token,
                )
                .await;
            assert_eq!(
                file.status,
                StatusCode::NOT_FOUND,
                "{label}: {} after DELETE: {file:?}",
                entry.url
            );
        }
    }
}

/// BULK-8, BULK-9: `200`, `application/json`, `Expires`, and a manifest object with no
/// `resourceType`, the kick-off URL as `request`, and absolute file URLs with counts.
fn read_manifest(label: &str, reply: &Reply, request: &str) -> Manifest {
    assert_eq!(
        essence(reply.header("content-type")),
        "application/json",
        "{label}: manifest {reply:?}"
    );
    assert!(
        reply.headers.contains_key("expires"),
        "{label}: a manifest without Expires (BULK-8): {reply:?}"
    );
    let body = reply.json();
    assert!(body.is_object(), "{label}: {body}");
    assert!(
        body.get("resourceType").is_none(),
        "{label}: a manifest is not a FHIR resource: {body}"
    );
    let time = body["transactionTime"]
        .as_str()
        .unwrap_or_else(|| panic!("{label}: no transactionTime: {body}"));
    millis(time);
    assert_eq!(body["request"], request, "{label}: {body}");
    let requires_access_token = body["requiresAccessToken"]
        .as_bool()
        .unwrap_or_else(|| panic!("{label}: requiresAccessToken is not a boolean: {body}"));
    let entries = |field: &str| -> Vec<FileEntry> {
        body[field]
            .as_array()
            .unwrap_or_else(|| panic!("{label}: `{field}` is not an array: {body}"))
            .iter()
            .map(|item| {
                let kind = item["type"]
                    .as_str()
                    .filter(|t| !t.is_empty())
                    .unwrap_or_else(|| panic!("{label}: a `{field}` item has no type: {body}"));
                let url = item["url"]
                    .as_str()
                    .unwrap_or_else(|| panic!("{label}: a `{field}` item has no url: {body}"));
                assert_absolute(label, "a file url", url);
                let count = item["count"]
                    .as_u64()
                    .unwrap_or_else(|| panic!("{label}: a `{field}` item has no count: {body}"));
                FileEntry {
                    kind: kind.to_owned(),
                    url: url.to_owned(),
                    count,
                }
            })
            .collect()
    };
    Manifest {
        requires_access_token,
        output: entries("output"),
        error: entries("error"),
    }
}

fn essence(content_type: &str) -> String {
    content_type
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase()
}

fn assert_ndjson(label: &str, reply: &Reply) {
    assert_eq!(
        essence(reply.header("content-type")),
        NDJSON,
        "{label}: {reply:?}"
    );
}

fn assert_absolute(label: &str, what: &str, url: &str) {
    let uri: Uri = url
        .parse()
        .unwrap_or_else(|err| panic!("{label}: {what} {url:?} is not a URL: {err}"));
    assert!(
        matches!(uri.scheme_str(), Some("http" | "https")) && uri.authority().is_some(),
        "{label}: {what} {url:?} is not an absolute URL"
    );
}

/// `Retry-After` as delta seconds (interop.md: send delta seconds, never an absolute time).
fn retry_after(label: &str, reply: &Reply) -> Option<Duration> {
    let value = reply.headers.get("retry-after")?;
    let text = value.to_str().unwrap_or_default().trim();
    let seconds: u64 = text.parse().unwrap_or_else(|_| {
        panic!("{label}: Retry-After {text:?} is not delta seconds: {reply:?}")
    });
    Some(Duration::from_secs(seconds))
}

/// Whether an error reply is an OperationOutcome with only `transient` issues (retried).
fn only_transient(reply: &Reply) -> bool {
    let Ok(body) = serde_json::from_slice::<Value>(&reply.body) else {
        return false;
    };
    body["issue"]
        .as_array()
        .is_some_and(|issues| !issues.is_empty() && issues.iter().all(|i| i["code"] == "transient"))
}

async fn gunzip(bytes: &[u8]) -> Vec<u8> {
    use tokio::io::AsyncReadExt;
    let mut decoder = async_compression::tokio::bufread::GzipDecoder::new(bytes);
    let mut out = Vec::new();
    decoder
        .read_to_end(&mut out)
        .await
        .expect("a gzip body that decodes");
    out
}

// ---------------------------------------------------------------------------------------------
// Exports

/// Which resources an export starts from.
#[derive(Debug, Clone)]
enum Level {
    System,
    Patient,
    Group {
        id: String,
        members: BTreeSet<String>,
    },
}

impl Level {
    fn path(&self) -> String {
        match self {
            Level::System => "$export".to_owned(),
            Level::Patient => "Patient/$export".to_owned(),
            Level::Group { id, .. } => format!("Group/{id}/$export"),
        }
    }

    fn name(&self) -> String {
        match self {
            Level::System => "system".to_owned(),
            Level::Patient => "Patient".to_owned(),
            Level::Group { id, .. } => format!("Group/{id}"),
        }
    }

    /// Whether a resource is in this level's scope: everything, the Patient compartment, or
    /// the Group members' compartments.
    fn includes(&self, kind: &str, resource: &Value) -> bool {
        match self {
            Level::System => true,
            Level::Patient => patient_of(kind, resource).is_some(),
            Level::Group { members, .. } => {
                patient_of(kind, resource).is_some_and(|p| members.contains(&p))
            }
        }
    }
}

/// One kick-off form a published client sends (interop.md, Kick-off), and what it must export.
struct Variant {
    label: &'static str,
    method: Method,
    /// The query as the client writes it on the wire.
    query: &'static str,
    accept: &'static str,
    prefer: &'static str,
    /// A `Parameters` body, sent as `Content-Type: application/json`.
    parameters: Option<Value>,
    /// `_type`: only these types.
    types: Option<&'static [&'static str]>,
    /// `_since`: only resources last updated at or after [`SINCE`].
    since: bool,
    /// `_typeFilter`: resources of the type only with one of the codes.
    filters: &'static [(&'static str, &'static [&'static str])],
    /// `_maximumFileSize`: no file larger than this, in bytes (BULK-3).
    max_file_size: Option<usize>,
}

impl Variant {
    fn get(label: &'static str, query: &'static str) -> Self {
        Self {
            label,
            method: Method::GET,
            query,
            accept: "application/fhir+json",
            prefer: "respond-async",
            parameters: None,
            types: None,
            since: false,
            filters: &[],
            max_file_size: None,
        }
    }

    fn label(&self, level: &Level) -> String {
        format!("{} $export, {}", level.name(), self.label)
    }

    fn keeps(&self, kind: &str, resource: &Value) -> bool {
        self.types.is_none_or(|types| types.contains(&kind))
            && (!self.since
                || millis(resource["meta"]["lastUpdated"].as_str().unwrap_or_default())
                    >= millis(SINCE))
            && self
                .filters
                .iter()
                .filter(|(filtered, _)| *filtered == kind)
                .all(|(_, codes)| has_code(resource, codes))
    }

    fn restricts(&self) -> bool {
        self.types.is_some() || self.since || !self.filters.is_empty()
    }
}

/// The kick-off forms of interop.md, each with what it must restrict.
fn variants() -> Vec<Variant> {
    vec![
        // BULK-1: the plainest kick-off.
        Variant::get("GET, no parameters", ""),
        // Accept lists with q values; `handling=lenient` in the one Prefer line; `_type`
        // comma-joined.
        Variant {
            accept: "application/fhir+json, */*; q=0.1",
            prefer: "respond-async, handling=lenient",
            types: Some(&["Patient", "Observation"]),
            ..Variant::get("GET, _type comma-joined", "_type=Patient,Observation")
        },
        // `_since`, percent-encoded as URLSearchParams writes it.
        Variant {
            since: true,
            ..Variant::get("GET, _since", "_since=2024-07-01T00%3A00%3A00Z")
        },
        // `_typeFilter` whose comma inside the filter arrives as `%2C`.
        Variant {
            types: Some(&["Observation"]),
            filters: &[("Observation", VITALS)],
            ..Variant::get(
                "GET, _typeFilter with %2C inside",
                "_type=Observation&_typeFilter=Observation%3Fcode%3D8867-4%2C8480-6",
            )
        },
        // Two filters in one value, every comma encoded (URLSearchParams); other types whole.
        Variant {
            filters: &[("Observation", VITALS), ("Condition", DIABETES)],
            ..Variant::get(
                "GET, two _typeFilter filters",
                "_typeFilter=Observation%3Fcode%3D8867-4%2C8480-6%2CCondition%3Fcode%3D44054006",
            )
        },
        // POST with no body at all, the parameters in the query; BULK-2: `_outputFormat`.
        Variant {
            method: Method::POST,
            types: Some(&["Condition"]),
            since: true,
            ..Variant::get(
                "POST without a body",
                concat!(
                    "_type=Condition&_since=2024-07-01T00:00:00Z",
                    "&_outputFormat=application%2Ffhir%2Bndjson"
                ),
            )
        },
        // POST with a Parameters body sent as `application/json`.
        Variant {
            method: Method::POST,
            parameters: Some(json!({
                "resourceType": "Parameters",
                "parameter": [
                    { "name": "_type", "valueString": "Patient,Condition" },
                    { "name": "_since", "valueInstant": SINCE },
                    { "name": "_typeFilter", "valueString": "Condition?code=44054006" },
                    { "name": "_outputFormat", "valueString": NDJSON },
                ],
            })),
            types: Some(&["Patient", "Condition"]),
            since: true,
            filters: &[("Condition", DIABETES)],
            ..Variant::get("POST with a Parameters body as application/json", "")
        },
        // BULK-2: `_outputFormat` with its `+` unescaped, as typed by hand (a space once
        // decoded); BULK-3: small files, so a type spans several.
        Variant {
            max_file_size: Some(SMALL_FILES),
            ..Variant::get(
                "GET, _outputFormat and _maximumFileSize",
                "_outputFormat=application/fhir+ndjson&_maximumFileSize=20000",
            )
        },
    ]
}

/// Sends the kick-off of `variant` at `level`; returns the kick-off URL and the status URL.
async fn start(
    client: &BulkClient,
    capability: &Capability,
    level: &Level,
    variant: &Variant,
) -> (String, String) {
    let label = variant.label(level);
    // A client drops requested types the CapabilityStatement does not list: all must be there.
    for kind in variant.types.into_iter().flatten() {
        assert!(
            capability.types.contains(*kind),
            "{label}: {kind} is not listed in the CapabilityStatement, so a client drops it"
        );
    }
    let url = if variant.query.is_empty() {
        format!("{}/{}", client.base, level.path())
    } else {
        format!("{}/{}?{}", client.base, level.path(), variant.query)
    };
    let mut headers = vec![("accept", variant.accept), ("prefer", variant.prefer)];
    let body = match &variant.parameters {
        Some(parameters) => {
            headers.push(("content-type", "application/json"));
            parameters.to_string()
        }
        None => String::new(),
    };
    let status_url = client
        .kick_off(&label, variant.method.clone(), &url, &headers, &body)
        .await;
    (url, status_url)
}

/// Downloads every file of `manifest`; returns what they held.
async fn download_all(
    client: &BulkClient,
    label: &str,
    manifest: &Manifest,
    max_file_size: Option<usize>,
) -> Resources {
    let mut resources = Resources::new();
    for entry in manifest.files() {
        let (lines, size) = client.download(label, manifest, entry).await;
        if let Some(max) = max_file_size {
            assert!(
                size <= max,
                "{label}: {} has {size} bytes, more than _maximumFileSize={max} (BULK-3)",
                entry.url
            );
        }
        let of_type = resources.entry(entry.kind.clone()).or_default();
        for resource in lines {
            let id = resource["id"]
                .as_str()
                .unwrap_or_else(|| panic!("{label}: a resource without id in {}", entry.url))
                .to_owned();
            // BULK-10: only the current version of each resource, once.
            assert!(
                of_type.insert(id.clone(), resource).is_none(),
                "{label}: {} {id} is exported twice",
                entry.kind
            );
        }
    }
    resources
}

/// One export as a client runs it: kick-off, polling, every file downloaded, then `DELETE`.
/// Returns what the files held, and the manifest.
async fn export(
    client: &BulkClient,
    capability: &Capability,
    level: &Level,
    variant: &Variant,
) -> (Resources, Manifest) {
    let label = variant.label(level);
    let (url, status_url) = start(client, capability, level, variant).await;
    let reply = client.wait_for_manifest(&label, &status_url).await;
    let manifest = read_manifest(&label, &reply, &url);
    assert!(
        manifest.error.is_empty(),
        "{label}: the export reported errors: {manifest:?}"
    );
    let resources = download_all(client, &label, &manifest, variant.max_file_size).await;
    for kind in resources.keys() {
        assert!(
            capability.types.contains(kind),
            "{label}: {kind} is exported but not listed in the CapabilityStatement"
        );
    }
    client.delete(&label, &status_url, &manifest).await;
    (resources, manifest)
}

/// What an export of `variant` (or of everything) at `level` must hold, from `all`, the
/// server's whole data. Types with nothing to export get no file, so no entry.
fn expected(all: &Resources, level: &Level, variant: Option<&Variant>) -> Resources {
    all.iter()
        .map(|(kind, resources)| {
            let kept = resources
                .iter()
                .filter(|(_, r)| level.includes(kind, r))
                .filter(|(_, r)| variant.is_none_or(|v| v.keeps(kind, r)))
                .map(|(id, r)| (id.clone(), r.clone()))
                .collect::<BTreeMap<_, _>>();
            (kind.clone(), kept)
        })
        .filter(|(_, kept)| !kept.is_empty())
        .collect()
}

fn assert_holds(label: &str, exported: &Resources, expected: &Resources) {
    assert!(
        exported == expected,
        "{label}: the export does not hold what it should:\n{}",
        diff(exported, expected)
    );
}

/// The exports of `level` (every variant at once) hold exactly what each must.
async fn check_level(client: &BulkClient, capability: &Capability, level: &Level, all: &Resources) {
    let variants = variants();
    let runs = variants.iter().map(|variant| async move {
        let (exported, manifest) = export(client, capability, level, variant).await;
        (variant, exported, manifest)
    });
    let scope = resource_count(&expected(all, level, None));
    for (variant, exported, manifest) in join_all(runs).await {
        let label = variant.label(level);
        let wanted = expected(all, level, Some(variant));
        if variant.restricts() {
            // Otherwise the check below could not tell a restricted export from a whole one.
            let count = resource_count(&wanted);
            assert!(
                count > 0 && count < scope,
                "{label}: the data gives this variant nothing to cut ({count} of {scope} resources)"
            );
        }
        assert_holds(&label, &exported, &wanted);
        if variant.max_file_size.is_some() && matches!(level, Level::System) {
            let types: BTreeSet<&String> = manifest.output.iter().map(|e| &e.kind).collect();
            assert!(
                manifest.output.len() > types.len(),
                "{label}: small files, yet no type spans several: {manifest:?}"
            );
        }
    }
}

/// The server's whole data, as a plain system-level `$export` gives it, checked against plain
/// searches of every type the CapabilityStatement lists.
async fn everything(client: &BulkClient, capability: &Capability) -> Resources {
    let plain = Variant::get("baseline, no parameters", "");
    let (all, _) = export(client, capability, &Level::System, &plain).await;
    for kind in &capability.types {
        let searched = Resources::from([(kind.clone(), client.search_all(kind, "").await)]);
        let exported =
            Resources::from([(kind.clone(), all.get(kind).cloned().unwrap_or_default())]);
        assert_holds(
            &format!("system $export of {kind}, against GET [base]/{kind}"),
            &exported,
            &searched,
        );
    }
    assert!(
        all.len() >= 3 && resource_count(&all) > 100,
        "the demo's data is too small to test with: {:?}",
        all.iter().map(|(k, r)| (k, r.len())).collect::<Vec<_>>()
    );
    all
}

// ---------------------------------------------------------------------------------------------
// The tests

// BULK-1, BULK-8, BULK-9, BULK-10, BULK-13, BULK-15, CANCEL-2, CANCEL-3, CANCEL-5, CANCEL-7:
// system-level `$export` for every kick-off form; `_typeFilter` agrees with a plain search.
#[tokio::test(flavor = "multi_thread")]
async fn bulk_8_bulk_13_system_export_for_every_client_kick_off() {
    let demo = Demo::start(&[]);
    let client = BulkClient::new(&demo.base, None);
    let capability = client.capability().await;
    let all = everything(&client, &capability).await;
    check_level(&client, &capability, &Level::System, &all).await;

    // `_typeFilter=Observation?code=a,b` is the search `Observation?code=a,b`.
    let vitals = Variant {
        types: Some(&["Observation"]),
        filters: &[("Observation", VITALS)],
        ..Variant::get(
            "_typeFilter against a search",
            "_type=Observation&_typeFilter=Observation%3Fcode%3D8867-4%2C8480-6",
        )
    };
    let (exported, _) = export(&client, &capability, &Level::System, &vitals).await;
    let searched = client.search_all("Observation", "code=8867-4,8480-6").await;
    assert!(!searched.is_empty(), "the search finds no Observation");
    let searched = Resources::from([("Observation".to_owned(), searched)]);
    assert_holds(&vitals.label(&Level::System), &exported, &searched);
}

// BULK-1, BULK-8, BULK-9, BULK-13, BULK-15, CANCEL-3: Patient-level `$export` for every kick-off
// form: the Patient compartment only.
#[tokio::test(flavor = "multi_thread")]
async fn bulk_8_bulk_13_patient_export_for_every_client_kick_off() {
    let demo = Demo::start(&[]);
    let client = BulkClient::new(&demo.base, None);
    let capability = client.capability().await;
    let all = everything(&client, &capability).await;
    check_level(&client, &capability, &Level::Patient, &all).await;
}

// BULK-1, BULK-8, BULK-9, BULK-13, BULK-15, CANCEL-3: Group-level `$export` of every Group a
// search finds; every kick-off form on the largest.
#[tokio::test(flavor = "multi_thread")]
async fn bulk_8_bulk_13_group_export_for_every_client_kick_off() {
    let demo = Demo::start(&[]);
    let client = BulkClient::new(&demo.base, None);
    let capability = client.capability().await;
    let all = everything(&client, &capability).await;
    let groups = client.groups().await;
    assert!(!groups.is_empty(), "GET [base]/Group finds no Group");

    let levels: Vec<Level> = groups
        .iter()
        .map(|(id, members)| Level::Group {
            id: id.clone(),
            members: members.clone(),
        })
        .collect();
    let plain = Variant::get("no parameters", "");
    let whole = levels.iter().map(|level| {
        let (client, capability, all, plain) = (&client, &capability, &all, &plain);
        async move {
            let (exported, _) = export(client, capability, level, plain).await;
            let Level::Group { members, .. } = level else {
                unreachable!("only Group levels here")
            };
            let patients: BTreeSet<String> = exported
                .get("Patient")
                .map(|p| p.keys().cloned().collect())
                .unwrap_or_default();
            assert_eq!(
                &patients,
                members,
                "{}: the exported patients are not the Group's members",
                plain.label(level)
            );
            assert_holds(&plain.label(level), &exported, &expected(all, level, None));
        }
    });
    join_all(whole).await;

    let largest = levels
        .iter()
        .max_by_key(|level| match level {
            Level::Group { members, .. } => members.len(),
            _ => 0,
        })
        .expect("a Group");
    check_level(&client, &capability, largest, &all).await;
}

// SEC-10, BULK-14, CANCEL-3: with `--auth`, an export belongs to the client that started it:
// another client's polls, file requests and DELETE get 404, requests without a token 401; the
// owner polls, downloads (sending its token, as `requiresAccessToken` asks) and deletes.
#[tokio::test(flavor = "multi_thread")]
async fn sec_10_bulk_14_exports_belong_to_the_client_that_started_them() {
    // The owner polls again at once after the manifest, to prove the other client changed
    // nothing; the demo's default poll throttle (250 ms) would rightly answer that with 429.
    let demo = Demo::start(&["--auth", "--min-poll-interval", "off"]);
    let owner = BulkClient::new(&demo.base, Some("bulk-client-a"));
    let other = BulkClient::new(&demo.base, Some("bulk-client-b"));
    let anonymous = BulkClient::new(&demo.base, None);
    let capability = owner.capability().await;
    let all = everything(&owner, &capability).await;
    let (id, members) = owner
        .groups()
        .await
        .into_iter()
        .next()
        .expect("GET [base]/Group finds a Group");
    let level = Level::Group { id, members };
    let variant = Variant {
        types: Some(&["Patient", "Observation"]),
        ..Variant::get("bound to its client", "_type=Patient,Observation")
    };
    let label = &variant.label(&level);

    let (url, status_url) = start(&owner, &capability, &level, &variant).await;
    let json = [("accept", "application/json")];
    let assert_foreign = |reply: Reply, what: &str| {
        assert_eq!(
            reply.status,
            StatusCode::NOT_FOUND,
            "another client's {what}: {reply:?}"
        );
        reply.assert_outcome("not-found");
    };
    assert_foreign(
        other.send(Method::GET, &status_url, &json, "", true).await,
        "poll",
    );
    let unauthenticated = anonymous
        .send(Method::GET, &status_url, &json, "", false)
        .await;
    assert_eq!(
        unauthenticated.status,
        StatusCode::UNAUTHORIZED,
        "a poll without a token: {unauthenticated:?}"
    );
    assert!(unauthenticated.headers.contains_key("www-authenticate"));

    let reply = owner.wait_for_manifest(label, &status_url).await;
    let manifest = read_manifest(label, &reply, &url);
    assert!(
        manifest.requires_access_token,
        "files behind bearer tokens need requiresAccessToken: true, or clients send none: \
         {manifest:?}"
    );
    assert!(!manifest.output.is_empty(), "{manifest:?}");

    // The finished export: still nobody else's.
    assert_foreign(
        other.send(Method::GET, &status_url, &json, "", true).await,
        "poll of a finished export",
    );
    for entry in &manifest.output {
        let file = other.send(Method::GET, &entry.url, &[], "", true).await;
        assert_eq!(
            file.status,
            StatusCode::NOT_FOUND,
            "another client's download of {}: {file:?}",
            entry.url
        );
        let file = anonymous
            .send(Method::GET, &entry.url, &[], "", false)
            .await;
        assert_eq!(
            file.status,
            StatusCode::UNAUTHORIZED,
            "a download of {} without a token: {file:?}",
            entry.url
        );
    }
    assert_foreign(
        other.send(Method::DELETE, &status_url, &[], "", true).await,
        "DELETE",
    );

    // The other client's DELETE changed nothing for the owner.
    let again = owner.send(Method::GET, &status_url, &json, "", true).await;
    assert_eq!(again.status, StatusCode::OK, "the owner's poll: {again:?}");
    assert_eq!(again.body, reply.body, "the manifest changed");
    let exported = download_all(&owner, label, &manifest, None).await;
    assert_holds(label, &exported, &expected(&all, &level, Some(&variant)));
    owner.delete(label, &status_url, &manifest).await;
}
