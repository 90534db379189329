//! Choosing the bulk pattern at kick-off (SEL-3…6, BULK-1…3): which requests take it, the
//! layer's own parameters (`_outputFormat`, `_maximumFileSize`, `_minimumFileSize`) read from
//! the query, a form body or a `Parameters` body and checked, and the request the wrapped
//! service then gets, without them.

use bytes::Bytes;
use http::header;
use http::request::Parts;
use http::{HeaderMap, Response, StatusCode, Uri};
use serde_json::Value;

use crate::bulk::config::BulkConfig;
use crate::media;
use crate::outcome::{IssueCode, error_response};

/// The parameters that belong to the layer, not to the wrapped service (BULK-3, SEL-3).
const OUTPUT_FORMAT: &str = "_outputFormat";
const MAXIMUM_FILE_SIZE: &str = "_maximumFileSize";
const MINIMUM_FILE_SIZE: &str = "_minimumFileSize";

/// Whether `uri` names one of the bulk operations (e.g. `$export`) while the bulk pattern is on.
/// Cheap for other requests: a comparison of the path's end per operation.
pub(crate) fn is_operation_request(config: &BulkConfig, uri: &Uri) -> bool {
    config.enabled && names_operation(config, uri)
}

/// Whether the request's last path segment is one of the bulk operations. Compared from the
/// end, without looking for the last `/`: on the pass-through path this is a length test and a
/// short comparison per operation.
fn names_operation(config: &BulkConfig, uri: &Uri) -> bool {
    let path = uri.path().as_bytes();
    config.operations.iter().any(|op| {
        let op = op.as_bytes();
        // Byte by byte from the end (no `memcmp` call): most paths differ in their last byte.
        path.len() > op.len()
            && path.iter().rev().zip(op.iter().rev()).all(|(a, b)| a == b)
            && path[path.len() - op.len() - 1] == b'/'
    })
}

/// Whether a kick-off might take the bulk pattern, judged from its URI alone (before its body
/// is read): it names `_outputFormat` or a bulk operation.
pub(crate) fn may_be_bulk(config: &BulkConfig, uri: &Uri) -> bool {
    names_operation(config, uri)
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
    let operation = names_operation(config, &parts.uri);
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
    let keep_format = names_operation(config, &parts.uri);
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bulk::manifest::ManifestFormat;
    use http::Request;
    use object_store::path::Path;
    use std::sync::Arc;

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
            upstream_files: crate::bulk::UpstreamFiles::Copy,
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
}
