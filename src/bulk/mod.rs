//! The asynchronous bulk data pattern: choosing it at kick-off (SEL-3…6, BULK-2, BULK-3),
//! running the export into NDJSON files ([`export`]), keeping the files ([`files`]) and
//! describing them in a manifest (BULK-8, BULK-9).

pub(crate) mod export;
pub(crate) mod files;

use std::fmt;
use std::sync::Arc;

use bytes::Bytes;
use http::header;
use http::request::Parts;
use http::{HeaderMap, Response, StatusCode, Uri};
use object_store::ObjectStore;
use object_store::path::Path;
use serde_json::{Map, Value};

use crate::media;
use crate::outcome::{IssueCode, error_response};

/// The NDJSON media type of every file (BULK-2, BULK-13).
pub(crate) const NDJSON: &str = "application/fhir+ndjson";

/// The parameters that belong to the layer, not to the wrapped service (BULK-3, SEL-3).
const OUTPUT_FORMAT: &str = "_outputFormat";
const MAXIMUM_FILE_SIZE: &str = "_maximumFileSize";
const MINIMUM_FILE_SIZE: &str = "_minimumFileSize";

/// Which form of the bulk data manifest a completed export is described in (BULK-9).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum ManifestFormat {
    /// The form of FHIR R5 and Bulk Data STU2/STU3, which every published client reads:
    /// `transactionTime`, `request`, `requiresAccessToken`, `output[]` (`type`, `url`, `count`)
    /// and `error[]`.
    #[default]
    Stu2,
    /// The Bulk Data STU4 ballot's `BulkDataManifest`: `manifestType`, `outputFormat`,
    /// `fileSize` per file, and `outcome[]` (with `countSeverity`) instead of `error[]`; no
    /// `request`.
    Stu4Ballot,
}

/// The bulk pattern's configuration, fixed at build time.
pub(crate) struct BulkConfig {
    pub(crate) enabled: bool,
    /// Operation names (last path segment, e.g. `$export`) that take the bulk pattern even
    /// without `_outputFormat`.
    pub(crate) operations: Vec<String>,
    pub(crate) files: Arc<dyn ObjectStore>,
    /// Where in `files` the layer keeps its files: `{prefix}/{job id}/{file name}`.
    pub(crate) prefix: Path,
    pub(crate) max_file_size: u64,
    pub(crate) max_file_resources: u64,
    pub(crate) part_size: usize,
    pub(crate) open_files: usize,
    pub(crate) manifest: ManifestFormat,
    pub(crate) requires_access_token: bool,
}

impl BulkConfig {
    /// The folder of one job's files.
    pub(crate) fn job_dir(&self, id: &crate::JobId) -> Path {
        self.prefix.clone().join(id.to_string())
    }

    /// Whether the request's last path segment is one of the bulk operations.
    fn is_operation(&self, uri: &Uri) -> bool {
        let last = uri.path().rsplit('/').next().unwrap_or_default();
        self.operations.iter().any(|op| op == last)
    }
}

impl fmt::Debug for BulkConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BulkConfig")
            .field("enabled", &self.enabled)
            .field("operations", &self.operations)
            .field("files", &format_args!("{}", self.files))
            .field("prefix", &self.prefix.as_ref())
            .field("max_file_size", &self.max_file_size)
            .field("max_file_resources", &self.max_file_resources)
            .field("manifest", &self.manifest)
            .finish_non_exhaustive()
    }
}

/// Whether `uri` names one of the bulk operations (e.g. `$export`) while the bulk pattern is on.
/// Cheap for other requests: one byte search unless the path has a `$`.
pub(crate) fn is_operation_request(config: &BulkConfig, uri: &Uri) -> bool {
    config.enabled
        && memchr::memchr(b'$', uri.path().as_bytes()).is_some()
        && config.is_operation(uri)
}

/// `400` for a bulk operation sent without `Prefer: respond-async`, where the layer is set to
/// refuse those (BULK-1).
pub(crate) fn prefer_required(uri: &Uri) -> Response<Bytes> {
    let operation = uri.path().rsplit('/').next().unwrap_or_default();
    error_response(
        StatusCode::BAD_REQUEST,
        IssueCode::Invalid,
        &format!(
            "{operation} is an asynchronous operation on this server: send it with the header \
             Prefer: respond-async."
        ),
    )
}

/// Whether a kick-off might take the bulk pattern, judged from its URI alone (before its body
/// is read): it names `_outputFormat` or a bulk operation.
pub(crate) fn may_be_bulk(config: &BulkConfig, uri: &Uri) -> bool {
    config.is_operation(uri)
        || form_urlencoded::parse(uri.query().unwrap_or_default().as_bytes())
            .any(|(name, _)| name == OUTPUT_FORMAT)
}

/// What a bulk kick-off asked of the export itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct ExportParams {
    /// `_maximumFileSize` in bytes (BULK-3).
    pub(crate) max_file_size: Option<u64>,
    /// `_minimumFileSize` in bytes (BULK-3).
    pub(crate) min_file_size: Option<u64>,
}

/// The layer's parameters found in a kick-off: in the query, a form body or a `Parameters`
/// body (SEL-6).
#[derive(Debug, Default)]
struct Found {
    formats: Vec<String>,
    max: Vec<String>,
    min: Vec<String>,
}

impl Found {
    fn push(&mut self, name: &str, value: String) {
        match name {
            OUTPUT_FORMAT => self.formats.push(value),
            MAXIMUM_FILE_SIZE => self.max.push(value),
            MINIMUM_FILE_SIZE => self.min.push(value),
            _ => {}
        }
    }
}

/// Why a bulk kick-off is refused: `400` + an OperationOutcome with this code (KICK-5).
#[derive(Debug)]
pub(crate) struct Refusal {
    code: IssueCode,
    diagnostics: String,
}

impl Refusal {
    pub(crate) fn response(&self) -> Response<Bytes> {
        error_response(StatusCode::BAD_REQUEST, self.code, &self.diagnostics)
    }
}

/// SEL-3…6: whether an eligible `respond-async` kick-off takes the bulk pattern, and with what
/// parameters.
pub(crate) fn select(
    config: &BulkConfig,
    parts: &Parts,
    body: &[u8],
) -> Result<Option<ExportParams>, Refusal> {
    let mut found = Found::default();
    for (name, value) in form_urlencoded::parse(parts.uri.query().unwrap_or_default().as_bytes()) {
        found.push(&name, value.into_owned());
    }
    body_parameters(&parts.headers, body, &mut found);
    let operation = config.is_operation(&parts.uri);
    if found.formats.is_empty() && !operation {
        return Ok(None);
    }
    if !config.enabled {
        if found.formats.is_empty() {
            return Ok(None);
        }
        return Err(invalid(
            IssueCode::NotSupported,
            "_outputFormat asks for the asynchronous bulk data pattern, which is not supported for this request. \
             Send the request without _outputFormat to get a batch-response Bundle.",
        ));
    }
    for format in &found.formats {
        // An unescaped `+` in a query decodes as a space; clients send it, servers accept it.
        let format = format.trim().replace(' ', "+");
        if !matches!(
            format.to_ascii_lowercase().as_str(),
            "application/fhir+ndjson" | "application/ndjson" | "ndjson"
        ) {
            return Err(invalid(
                IssueCode::NotSupported,
                &format!(
                    "_outputFormat={format} is not supported; the only bulk output format is \
                     application/fhir+ndjson (also accepted as application/ndjson or ndjson)."
                ),
            ));
        }
    }
    let max_file_size = size(MAXIMUM_FILE_SIZE, &found.max)?;
    let min_file_size = size(MINIMUM_FILE_SIZE, &found.min)?;
    if let (Some(max), Some(min)) = (max_file_size, min_file_size) {
        if max <= min {
            return Err(invalid(
                IssueCode::Invalid,
                &format!("_maximumFileSize ({max}) must be larger than _minimumFileSize ({min})."),
            ));
        }
    }
    Ok(Some(ExportParams {
        max_file_size,
        min_file_size,
    }))
}

fn invalid(code: IssueCode, diagnostics: &str) -> Refusal {
    Refusal {
        code,
        diagnostics: diagnostics.to_owned(),
    }
}

/// BULK-3: a file size is a positive whole number of bytes, given at most once.
fn size(name: &str, values: &[String]) -> Result<Option<u64>, Refusal> {
    match values {
        [] => Ok(None),
        [value] => match value.trim().parse::<u64>() {
            Ok(bytes) if bytes > 0 => Ok(Some(bytes)),
            _ => Err(invalid(
                IssueCode::Invalid,
                &format!("{name}={value} is not a positive whole number of bytes."),
            )),
        },
        _ => Err(invalid(
            IssueCode::Invalid,
            &format!("{name} is given more than once."),
        )),
    }
}

/// The layer's parameters in a form body or a `Parameters` resource body (sent as
/// `application/fhir+json` or, by some clients, `application/json`).
fn body_parameters(headers: &HeaderMap, body: &[u8], found: &mut Found) {
    if body.is_empty() || !mentions_own_parameter(body) {
        return;
    }
    match body_kind(headers) {
        BodyKind::Form => {
            for (name, value) in form_urlencoded::parse(body) {
                found.push(&name, value.into_owned());
            }
        }
        BodyKind::Json => {
            let Ok(Value::Object(resource)) = serde_json::from_slice::<Value>(body) else {
                return;
            };
            if resource.get("resourceType").and_then(Value::as_str) != Some("Parameters") {
                return;
            }
            let parameters = resource.get("parameter").and_then(Value::as_array);
            for parameter in parameters.into_iter().flatten() {
                let Some(name) = parameter.get("name").and_then(Value::as_str) else {
                    continue;
                };
                if let Some(value) = parameter_value(parameter) {
                    found.push(name, value);
                }
            }
        }
        BodyKind::Other => {}
    }
}

/// The value of a `Parameters.parameter` as text: any `value[x]` that is a string or number.
fn parameter_value(parameter: &Value) -> Option<String> {
    let object = parameter.as_object()?;
    object.iter().find_map(|(key, value)| {
        if !key.starts_with("value") {
            return None;
        }
        match value {
            Value::String(text) => Some(text.clone()),
            Value::Number(number) => Some(number.to_string()),
            _ => None,
        }
    })
}

fn mentions_own_parameter(body: &[u8]) -> bool {
    [OUTPUT_FORMAT, MAXIMUM_FILE_SIZE, MINIMUM_FILE_SIZE]
        .iter()
        .any(|name| body.windows(name.len()).any(|w| w == name.as_bytes()))
}

enum BodyKind {
    Form,
    Json,
    Other,
}

fn body_kind(headers: &HeaderMap) -> BodyKind {
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    let essence = media::essence(content_type);
    if essence == "application/x-www-form-urlencoded" {
        BodyKind::Form
    } else if media::is_json(&essence) {
        BodyKind::Json
    } else {
        BodyKind::Other
    }
}

/// The request a bulk job sends to the wrapped service: the layer's own parameters removed
/// (`_outputFormat` is kept for bulk operations such as `$export`, which define it), so a
/// strict server never sees parameters it does not know.
pub(crate) fn inner_request(config: &BulkConfig, parts: &mut Parts, body: Bytes) -> Bytes {
    let keep_format = config.is_operation(&parts.uri);
    let own = |name: &str| {
        name == MAXIMUM_FILE_SIZE
            || name == MINIMUM_FILE_SIZE
            || (!keep_format && name == OUTPUT_FORMAT)
    };
    if let Some(query) = parts.uri.query() {
        if let Some(kept) = without_pairs(query, own) {
            let path = parts.uri.path();
            let target = if kept.is_empty() {
                path.to_owned()
            } else {
                format!("{path}?{kept}")
            };
            let mut uri = parts.uri.clone().into_parts();
            if let Ok(path_and_query) = target.parse() {
                uri.path_and_query = Some(path_and_query);
                if let Ok(rebuilt) = Uri::from_parts(uri) {
                    parts.uri = rebuilt;
                }
            }
        }
    }
    if body.is_empty() || !mentions_own_parameter(&body) {
        return body;
    }
    let rewritten = match body_kind(&parts.headers) {
        BodyKind::Form => std::str::from_utf8(&body)
            .ok()
            .and_then(|text| without_pairs(text, own))
            .map(Bytes::from),
        BodyKind::Json => without_parameters(&body, own),
        BodyKind::Other => None,
    };
    match rewritten {
        Some(body) => {
            parts
                .headers
                .insert(header::CONTENT_LENGTH, body.len().into());
            body
        }
        None => body,
    }
}

/// `query` without the pairs whose decoded name matches `drop`, every other pair kept exactly
/// as written; `None` when nothing is dropped.
fn without_pairs(query: &str, drop: impl Fn(&str) -> bool) -> Option<String> {
    let mut dropped = false;
    let kept: Vec<&str> = query
        .split('&')
        .filter(|pair| {
            let name = pair.split('=').next().unwrap_or_default();
            let decoded = form_urlencoded::parse(name.as_bytes())
                .next()
                .map(|(name, _)| name.into_owned())
                .unwrap_or_default();
            let keep = !drop(&decoded);
            dropped |= !keep;
            keep
        })
        .collect();
    dropped.then(|| kept.join("&"))
}

/// A `Parameters` body without the parameters whose name matches `drop`.
fn without_parameters(body: &[u8], drop: impl Fn(&str) -> bool) -> Option<Bytes> {
    let Ok(Value::Object(mut resource)) = serde_json::from_slice::<Value>(body) else {
        return None;
    };
    if resource.get("resourceType").and_then(Value::as_str) != Some("Parameters") {
        return None;
    }
    let parameters = resource.get_mut("parameter")?.as_array_mut()?;
    let before = parameters.len();
    parameters.retain(|p| !p.get("name").and_then(Value::as_str).is_some_and(&drop));
    if parameters.len() == before {
        return None;
    }
    if parameters.is_empty() {
        resource.remove("parameter");
    }
    serde_json::to_vec(&Value::Object(resource))
        .ok()
        .map(Bytes::from)
}

/// One file of a finished export, as listed in the manifest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct FileEntry {
    /// The file's name under the job (`Patient-1.ndjson`, `errors-1.ndjson`).
    pub(crate) name: String,
    /// The resource type of every line; `OperationOutcome` for error files.
    pub(crate) resource_type: String,
    /// Lines (resources) in the file.
    pub(crate) count: u64,
    /// Bytes in the file.
    pub(crate) size: u64,
    /// Whether this is an error file (BULK-7).
    pub(crate) error: bool,
    /// Lines per issue severity, for error files (BD4 `countSeverity`).
    pub(crate) severities: Vec<(String, u64)>,
}

/// What the manifest says about the export besides its files.
pub(crate) struct ManifestHead<'a> {
    pub(crate) transaction_time: std::time::SystemTime,
    /// The kick-off's full URL (BULK-9 `request`).
    pub(crate) request: &'a str,
    /// The job's status URL; file URLs are `{status_url}/file/{name}`.
    pub(crate) status_url: &'a str,
    pub(crate) requires_access_token: bool,
}

/// BULK-9: the manifest, in the configured form.
pub(crate) fn manifest(
    format: ManifestFormat,
    head: &ManifestHead<'_>,
    files: &[FileEntry],
) -> Bytes {
    let url = |file: &FileEntry| format!("{}/file/{}", head.status_url, file.name);
    let mut manifest = Map::new();
    let (output, errors): (Vec<&FileEntry>, Vec<&FileEntry>) = files.iter().partition(|f| !f.error);
    match format {
        ManifestFormat::Stu2 => {
            manifest.insert(
                "transactionTime".into(),
                instant_millis(head.transaction_time).into(),
            );
            manifest.insert("request".into(), head.request.into());
            manifest.insert(
                "requiresAccessToken".into(),
                head.requires_access_token.into(),
            );
            let item = |file: &&FileEntry| serde_json::json!({ "type": file.resource_type, "url": url(file), "count": file.count });
            manifest.insert("output".into(), output.iter().map(item).collect());
            manifest.insert("error".into(), errors.iter().map(item).collect());
        }
        ManifestFormat::Stu4Ballot => {
            manifest.insert(
                "manifestType".into(),
                "http://hl7.org/fhir/uv/bulkdata/StructureDefinition/BulkDataManifest".into(),
            );
            manifest.insert(
                "transactionTime".into(),
                instant_millis(head.transaction_time).into(),
            );
            manifest.insert(
                "requiresAccessToken".into(),
                head.requires_access_token.into(),
            );
            manifest.insert("outputFormat".into(), NDJSON.into());
            let output_items = output.iter().map(|file| {
                serde_json::json!({
                    "type": file.resource_type, "url": url(file), "count": file.count, "fileSize": file.size,
                })
            });
            manifest.insert("output".into(), output_items.collect());
            let outcome_items = errors.iter().map(|file| {
                let severities: Vec<Value> = file
                    .severities
                    .iter()
                    .map(|(code, count)| serde_json::json!({ "code": code, "count": count }))
                    .collect();
                serde_json::json!({
                    "url": url(file), "count": file.count, "fileSize": file.size, "countSeverity": severities,
                })
            });
            manifest.insert("outcome".into(), outcome_items.collect());
        }
    }
    Bytes::from(Value::Object(manifest).to_string())
}

/// A FHIR `instant` with milliseconds, UTC.
fn instant_millis(time: std::time::SystemTime) -> String {
    humantime::format_rfc3339_millis(time).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::Request;

    fn config() -> BulkConfig {
        BulkConfig {
            enabled: true,
            operations: vec!["$export".into()],
            files: Arc::new(object_store::memory::InMemory::new()),
            prefix: Path::from("jobs"),
            max_file_size: 1 << 20,
            max_file_resources: 1000,
            part_size: 1 << 20,
            open_files: 4,
            manifest: ManifestFormat::Stu2,
            requires_access_token: true,
        }
    }

    fn parts(method: &str, uri: &str, content_type: Option<&str>) -> Parts {
        let mut request = Request::builder().method(method).uri(uri);
        if let Some(content_type) = content_type {
            request = request.header(header::CONTENT_TYPE, content_type);
        }
        request.body(()).unwrap().into_parts().0
    }

    fn status(result: Result<Option<ExportParams>, Refusal>) -> Result<bool, u16> {
        result
            .map(|p| p.is_some())
            .map_err(|r| r.response().status().as_u16())
    }

    // SEL-3, SEL-6, BULK-2: the three places `_outputFormat` is found, and `$export` without it.
    #[test]
    fn sel_3_bulk_is_chosen_by_output_format_or_operation() {
        let c = config();
        let select = |p: Parts, body: &[u8]| status(select(&c, &p, body));
        assert_eq!(
            select(parts("GET", "/fhir/Patient?name=x", None), b""),
            Ok(false)
        );
        assert_eq!(
            select(
                parts("GET", "/fhir/Observation?_outputFormat=ndjson", None),
                b""
            ),
            Ok(true)
        );
        assert_eq!(select(parts("GET", "/fhir/$export", None), b""), Ok(true));
        assert_eq!(
            select(parts("POST", "/fhir/Patient/$export", None), b""),
            Ok(true)
        );
        assert_eq!(
            select(
                parts("GET", "/fhir/Group/g1/$export?_type=Patient", None),
                b""
            ),
            Ok(true)
        );
        let form = parts(
            "POST",
            "/fhir/Observation/_search",
            Some("application/x-www-form-urlencoded"),
        );
        assert_eq!(
            select(form, b"code=1&_outputFormat=application%2Ffhir%2Bndjson"),
            Ok(true)
        );
        let params = br#"{"resourceType":"Parameters","parameter":[{"name":"_outputFormat","valueString":"ndjson"}]}"#;
        assert_eq!(
            select(
                parts("POST", "/fhir/$reindex", Some("application/json")),
                params
            ),
            Ok(true)
        );
        assert_eq!(
            select(
                parts("POST", "/fhir/$reindex", Some("application/fhir+json")),
                params
            ),
            Ok(true)
        );
    }

    // BULK-2: three spellings of NDJSON are one format (an unescaped `+` arrives as a space);
    // anything else is refused at kick-off.
    #[test]
    fn bulk_2_output_formats() {
        let c = config();
        let check = |query: &str| {
            status(select(
                &c,
                &parts("GET", &format!("/fhir/Patient?{query}"), None),
                b"",
            ))
        };
        for ok in [
            "_outputFormat=application%2Ffhir%2Bndjson",
            "_outputFormat=application/fhir+ndjson",
            "_outputFormat=application%2Fndjson",
            "_outputFormat=ndjson",
        ] {
            assert_eq!(check(ok), Ok(true), "{ok}");
        }
        assert_eq!(check("_outputFormat=text%2Fcsv"), Err(400));
        assert_eq!(check("_outputFormat=application%2Ffhir%2Bjson"), Err(400));
    }

    // BULK-3: sizes are positive integers, max larger than min, each at most once.
    #[test]
    fn bulk_3_file_size_parameters() {
        let c = config();
        let run = |query: &str| {
            select(
                &c,
                &parts("GET", &format!("/fhir/$export?{query}"), None),
                b"",
            )
        };
        let params = run("_maximumFileSize=1000&_minimumFileSize=10")
            .unwrap()
            .unwrap();
        assert_eq!(params.max_file_size, Some(1000));
        assert_eq!(params.min_file_size, Some(10));
        for bad in [
            "_maximumFileSize=0",
            "_maximumFileSize=-5",
            "_maximumFileSize=ten",
            "_maximumFileSize=10&_minimumFileSize=10",
            "_maximumFileSize=10&_maximumFileSize=20",
        ] {
            assert_eq!(status(run(bad)), Err(400), "{bad}");
        }
        let body = br#"{"resourceType":"Parameters","parameter":[{"name":"_maximumFileSize","valueInteger":4096}]}"#;
        let params = select(
            &c,
            &parts("POST", "/fhir/$export", Some("application/json")),
            body,
        )
        .unwrap()
        .unwrap();
        assert_eq!(params.max_file_size, Some(4096));
    }

    // SEL-4: with the bulk pattern turned off, `_outputFormat` is refused and `$export` is an
    // interaction.
    #[test]
    fn sel_4_bulk_disabled() {
        let mut c = config();
        c.enabled = false;
        assert_eq!(
            status(select(
                &c,
                &parts("GET", "/fhir/Patient?_outputFormat=ndjson", None),
                b""
            )),
            Err(400)
        );
        assert_eq!(
            status(select(&c, &parts("GET", "/fhir/$export", None), b"")),
            Ok(false)
        );
    }

    // The wrapped service never sees the layer's own parameters; everything else is kept as
    // written, encodings included.
    #[test]
    fn own_parameters_are_removed_from_the_inner_request() {
        let c = config();
        let mut p = parts(
            "GET",
            "/fhir/Observation?code=a%2Cb&_outputFormat=ndjson&_maximumFileSize=100&_count=5",
            None,
        );
        inner_request(&c, &mut p, Bytes::new());
        assert_eq!(p.uri.to_string(), "/fhir/Observation?code=a%2Cb&_count=5");

        let mut p = parts(
            "GET",
            "/fhir/$export?_outputFormat=ndjson&_minimumFileSize=1",
            None,
        );
        inner_request(&c, &mut p, Bytes::new());
        assert_eq!(p.uri.to_string(), "/fhir/$export?_outputFormat=ndjson");

        let mut p = parts("POST", "/fhir/$export", Some("application/fhir+json"));
        let body = br#"{"resourceType":"Parameters","parameter":[{"name":"_type","valueString":"Patient"},{"name":"_maximumFileSize","valueInteger":9}]}"#;
        let body = inner_request(&c, &mut p, Bytes::from_static(body));
        let value: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(value["parameter"].as_array().unwrap().len(), 1);
        assert_eq!(
            p.headers[header::CONTENT_LENGTH],
            body.len().to_string().as_str()
        );
    }

    fn files() -> Vec<FileEntry> {
        vec![
            FileEntry {
                name: "Patient-1.ndjson".into(),
                resource_type: "Patient".into(),
                count: 3,
                size: 300,
                error: false,
                severities: vec![],
            },
            FileEntry {
                name: "errors-1.ndjson".into(),
                resource_type: "OperationOutcome".into(),
                count: 1,
                size: 120,
                error: true,
                severities: vec![("error".into(), 1)],
            },
        ]
    }

    // BULK-9: both manifest forms, with absolute file URLs and no `resourceType`.
    #[test]
    fn bulk_9_manifest_forms() {
        let head = ManifestHead {
            transaction_time: std::time::UNIX_EPOCH
                + std::time::Duration::from_millis(1_772_441_998_123),
            request: "https://x.org/fhir/$export",
            status_url: "https://x.org/fhir/_async/abc",
            requires_access_token: true,
        };
        let stu2: Value =
            serde_json::from_slice(&manifest(ManifestFormat::Stu2, &head, &files())).unwrap();
        assert_eq!(stu2["transactionTime"], "2026-03-02T08:59:58.123Z");
        assert_eq!(stu2["request"], "https://x.org/fhir/$export");
        assert_eq!(stu2["requiresAccessToken"], true);
        assert_eq!(
            stu2["output"][0]["url"],
            "https://x.org/fhir/_async/abc/file/Patient-1.ndjson"
        );
        assert_eq!(stu2["output"][0]["type"], "Patient");
        assert_eq!(stu2["output"][0]["count"], 3);
        assert_eq!(stu2["error"][0]["type"], "OperationOutcome");
        assert!(stu2.get("resourceType").is_none());

        let stu4: Value =
            serde_json::from_slice(&manifest(ManifestFormat::Stu4Ballot, &head, &files())).unwrap();
        assert!(stu4.get("request").is_none());
        assert!(stu4.get("error").is_none());
        assert_eq!(stu4["outputFormat"], NDJSON);
        assert_eq!(stu4["output"][0]["fileSize"], 300);
        assert_eq!(stu4["outcome"][0]["countSeverity"][0]["code"], "error");
    }
}
