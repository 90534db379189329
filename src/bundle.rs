//! The completion of the interaction pattern: a `batch-response` Bundle wrapping the inner
//! response (BUNDLE-1…12), rendered from the stored raw response when polled.

use std::borrow::Cow;
use std::time::SystemTime;

use base64::Engine;
use bytes::Bytes;
use http::{StatusCode, header};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::job::{JobId, StoredResponse};
use crate::media;
use crate::outcome::{IssueCode, operation_outcome};

/// How much of a non-FHIR error body is quoted in a synthesized OperationOutcome.
const MAX_DIAGNOSTICS_CHARS: usize = 2000;

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Bundle<'a> {
    resource_type: &'static str,
    id: String,
    #[serde(rename = "type")]
    kind: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    timestamp: Option<String>,
    entry: [Entry<'a>; 1],
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Entry<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    full_url: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    resource: Option<Json<'a>>,
    response: EntryResponse<'a>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct EntryResponse<'a> {
    status: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    location: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    etag: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    last_modified: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    outcome: Option<Json<'a>>,
}

/// A resource as the inner service sent it, or one the layer made.
#[derive(Serialize)]
#[serde(untagged)]
enum Json<'a> {
    Raw(&'a RawValue),
    Made(serde_json::Value),
}

/// Just enough of a JSON body to tell whether it is a FHIR resource, and which.
#[derive(Deserialize)]
struct Probe<'a> {
    #[serde(rename = "resourceType", borrow)]
    resource_type: Option<Cow<'a, str>>,
    #[serde(borrow)]
    id: Option<Cow<'a, str>>,
}

/// Renders a finished job as a `batch-response` Bundle. `base` is the absolute FHIR base, for
/// `fullUrl` (left out when unknown).
pub(crate) fn render(
    id: &JobId,
    response: &StoredResponse,
    finished_at: Option<SystemTime>,
    base: Option<&str>,
) -> Bytes {
    let status = response.status;
    let text_header = |name| response.header(&name).and_then(|v| v.to_str().ok());
    let (resource, outcome, full_url) = entry_body(response, base);
    let bundle = Bundle {
        resource_type: "Bundle",
        id: id.to_string(),
        kind: "batch-response",
        timestamp: finished_at.map(instant),
        entry: [Entry {
            full_url,
            resource,
            response: EntryResponse {
                status: status_line(status),
                location: text_header(header::LOCATION),
                etag: text_header(header::ETAG),
                last_modified: text_header(header::LAST_MODIFIED)
                    .and_then(|date| httpdate::parse_http_date(date).ok())
                    .map(instant),
                outcome,
            },
        }],
    };
    // Serializing borrowed strings, raw JSON and values cannot fail.
    Bytes::from(serde_json::to_vec(&bundle).unwrap_or_default())
}

/// `entry.resource`, `entry.response.outcome` and `entry.fullUrl` per the BUNDLE-11 table.
fn entry_body<'a>(
    response: &'a StoredResponse,
    base: Option<&str>,
) -> (Option<Json<'a>>, Option<Json<'a>>, Option<String>) {
    let status = response.status;
    let failed = status.is_client_error() || status.is_server_error();
    let body = &response.body;
    if body.is_empty() {
        let outcome = failed.then(|| Json::Made(synthesized_outcome(status, "")));
        return (None, outcome, None);
    }
    if let Some((raw, probe)) = fhir_json(response) {
        let resource_type = probe.resource_type.as_deref().unwrap_or_default();
        if resource_type == "OperationOutcome" {
            return (None, Some(Json::Raw(raw)), None);
        }
        let full_url = match (base, probe.id.as_deref()) {
            (Some(base), Some(id)) if resource_type != "Bundle" => {
                Some(format!("{base}/{resource_type}/{id}"))
            }
            _ => None,
        };
        let outcome = failed.then(|| Json::Made(synthesized_outcome(status, "")));
        return (Some(Json::Raw(raw)), outcome, full_url);
    }
    if failed {
        let text = String::from_utf8_lossy(body);
        let quoted: String = text.chars().take(MAX_DIAGNOSTICS_CHARS).collect();
        return (
            None,
            Some(Json::Made(synthesized_outcome(status, &quoted))),
            None,
        );
    }
    (Some(Json::Made(binary(response))), None, None)
}

/// The body as a FHIR JSON resource, when it is one: JSON (by content type, or sniffed when there
/// is none) holding an object with a `resourceType`.
fn fhir_json(response: &StoredResponse) -> Option<(&RawValue, Probe<'_>)> {
    let json_type = match response.header(&header::CONTENT_TYPE) {
        Some(value) => media::header_is_json(Some(value)),
        None => response.body.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'{'),
    };
    if !json_type {
        return None;
    }
    let probe: Probe<'_> = serde_json::from_slice(&response.body).ok()?;
    probe.resource_type.as_ref()?;
    let raw: &RawValue = serde_json::from_slice(&response.body).ok()?;
    Some((raw, probe))
}

/// An OperationOutcome for an error status without a FHIR body (BUNDLE-11).
fn synthesized_outcome(status: StatusCode, body_text: &str) -> serde_json::Value {
    let code = IssueCode::for_status(status);
    let diagnostics = if body_text.trim().is_empty() {
        format!(
            "The request failed with HTTP status {}",
            status_line(status)
        )
    } else {
        body_text.to_owned()
    };
    operation_outcome(code, &diagnostics)
}

/// A non-FHIR success body as a `Binary` resource (BUNDLE-11, AMB-4).
fn binary(response: &StoredResponse) -> serde_json::Value {
    let content_type = response
        .header(&header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("application/octet-stream");
    serde_json::json!({
        "resourceType": "Binary",
        "contentType": content_type,
        "data": base64::engine::general_purpose::STANDARD.encode(&response.body),
    })
}

/// `"201 Created"`: the code, then the reason phrase when there is one (BUNDLE-5).
pub(crate) fn status_line(status: StatusCode) -> String {
    match status.canonical_reason() {
        Some(reason) => format!("{} {reason}", status.as_u16()),
        None => status.as_u16().to_string(),
    }
}

/// A FHIR `instant` (RFC 3339, UTC, whole seconds).
pub(crate) fn instant(time: SystemTime) -> String {
    humantime::format_rfc3339_seconds(time).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::{HeaderName, HeaderValue};
    use serde_json::{Value, json};

    const BASE: &str = "https://fhir.example.org/fhir";

    fn stored(
        status: u16,
        headers: &[(&'static str, &'static str)],
        body: &'static [u8],
    ) -> StoredResponse {
        StoredResponse {
            status: StatusCode::from_u16(status).unwrap(),
            headers: headers
                .iter()
                .map(|(n, v)| (HeaderName::from_static(n), HeaderValue::from_static(v)))
                .collect(),
            body: Bytes::from_static(body),
        }
    }

    fn entry(response: &StoredResponse) -> Value {
        let bundle: Value =
            serde_json::from_slice(&render(&JobId::new(), response, None, Some(BASE))).unwrap();
        assert_eq!(bundle["resourceType"], "Bundle");
        assert_eq!(bundle["type"], "batch-response"); // BUNDLE-2
        assert_eq!(bundle["entry"].as_array().unwrap().len(), 1); // BUNDLE-3
        assert!(bundle.get("total").is_none());
        bundle["entry"][0].clone()
    }

    // BUNDLE-5, BUNDLE-7, BUNDLE-8, BUNDLE-9, BUNDLE-11 row 1.
    #[test]
    fn bundle_11_created_resource_with_location_etag_last_modified() {
        let response = stored(
            201,
            &[
                ("content-type", "application/fhir+json; charset=utf-8"),
                (
                    "location",
                    "https://fhir.example.org/fhir/Observation/obs-1/_history/1",
                ),
                ("etag", "W/\"1\""),
                ("last-modified", "Mon, 02 Mar 2026 09:41:06 GMT"),
            ],
            br#"{"resourceType":"Observation","id":"obs-1","status":"final"}"#,
        );
        let entry = entry(&response);
        assert_eq!(entry["response"]["status"], "201 Created");
        assert_eq!(
            entry["response"]["location"],
            "https://fhir.example.org/fhir/Observation/obs-1/_history/1"
        );
        assert_eq!(entry["response"]["etag"], "W/\"1\"");
        assert_eq!(entry["response"]["lastModified"], "2026-03-02T09:41:06Z");
        assert_eq!(
            entry["resource"],
            json!({"resourceType":"Observation","id":"obs-1","status":"final"})
        );
        assert_eq!(
            entry["fullUrl"],
            "https://fhir.example.org/fhir/Observation/obs-1"
        );
        assert!(entry["response"].get("outcome").is_none());
    }

    // BUNDLE-11 row 2: a 2xx OperationOutcome goes to `outcome`, not `resource`.
    #[test]
    fn bundle_11_success_operation_outcome_is_the_outcome() {
        let body = br#"{"resourceType":"OperationOutcome","issue":[{"severity":"information","code":"informational"}]}"#;
        let entry = entry(&stored(
            200,
            &[("content-type", "application/fhir+json")],
            body,
        ));
        assert_eq!(entry["response"]["status"], "200 OK");
        assert!(entry.get("resource").is_none());
        assert_eq!(
            entry["response"]["outcome"]["issue"][0]["code"],
            "informational"
        );
    }

    // BUNDLE-11 row 3: no body, no resource, no outcome.
    #[test]
    fn bundle_11_no_content() {
        let entry = entry(&stored(204, &[], b""));
        assert_eq!(entry["response"]["status"], "204 No Content");
        assert!(entry.get("resource").is_none());
        assert!(entry["response"].get("outcome").is_none());
    }

    // BUNDLE-4, BUNDLE-6, BUNDLE-11 row 4.
    #[test]
    fn bundle_11_error_with_operation_outcome() {
        let body = br#"{"resourceType":"OperationOutcome","issue":[{"severity":"error","code":"invariant"}]}"#;
        let entry = entry(&stored(
            422,
            &[("content-type", "application/fhir+json")],
            body,
        ));
        assert_eq!(entry["response"]["status"], "422 Unprocessable Entity");
        assert_eq!(
            entry["response"]["outcome"]["issue"][0]["code"],
            "invariant"
        );
        assert!(entry.get("resource").is_none());
    }

    // BUNDLE-11 row 5: non-FHIR or empty error bodies get a synthesized outcome.
    #[test]
    fn bundle_11_error_without_fhir_body_is_synthesized() {
        let entry1 = entry(&stored(
            404,
            &[("content-type", "text/plain")],
            b"no such thing",
        ));
        assert_eq!(entry1["response"]["status"], "404 Not Found");
        assert_eq!(
            entry1["response"]["outcome"]["issue"][0]["code"],
            "not-found"
        );
        assert_eq!(
            entry1["response"]["outcome"]["issue"][0]["diagnostics"],
            "no such thing"
        );
        let entry2 = entry(&stored(412, &[], b""));
        assert_eq!(
            entry2["response"]["outcome"]["issue"][0]["code"],
            "conflict"
        );
        let entry3 = entry(&stored(
            500,
            &[("content-type", "application/json")],
            b"{\"error\":1}",
        ));
        assert_eq!(
            entry3["response"]["outcome"]["issue"][0]["code"],
            "exception"
        );
    }

    // BUNDLE-11 row 6: a non-FHIR success body becomes a Binary.
    #[test]
    fn bundle_11_non_fhir_success_is_binary() {
        let entry = entry(&stored(200, &[("content-type", "text/csv")], b"a,b\n1,2\n"));
        assert_eq!(entry["resource"]["resourceType"], "Binary");
        assert_eq!(entry["resource"]["contentType"], "text/csv");
        assert_eq!(entry["resource"]["data"], "YSxiCjEsMgo=");
        let array = stored(200, &[("content-type", "application/json")], b"[1,2]");
        let json_not_fhir = entry_body(&array, Some(BASE));
        assert!(
            matches!(json_not_fhir.0, Some(Json::Made(ref v)) if v["resourceType"] == "Binary")
        );
    }

    // BUNDLE-10: a searchset is nested whole, with no fullUrl for the Bundle.
    #[test]
    fn bundle_10_search_result_is_nested() {
        let body =
            br#"{"resourceType":"Bundle","id":"s1","type":"searchset","total":2,"entry":[]}"#;
        let entry = entry(&stored(
            200,
            &[("content-type", "application/fhir+json")],
            body,
        ));
        assert_eq!(entry["resource"]["type"], "searchset");
        assert_eq!(entry["resource"]["total"], 2);
        assert!(entry.get("fullUrl").is_none());
    }

    // Without a known base (no configured URL, no Host on the poll) only `fullUrl` is left out.
    #[test]
    fn bundle_9_without_a_base_there_is_no_full_url() {
        let response = stored(
            200,
            &[("content-type", "application/fhir+json")],
            br#"{"resourceType":"Patient","id":"p1"}"#,
        );
        let bundle: Value =
            serde_json::from_slice(&render(&JobId::new(), &response, None, None)).unwrap();
        assert_eq!(bundle["entry"][0]["resource"]["id"], "p1");
        assert!(bundle["entry"][0].get("fullUrl").is_none());
    }

    #[test]
    fn unknown_status_codes_have_no_reason_phrase() {
        assert_eq!(status_line(StatusCode::from_u16(299).unwrap()), "299");
    }

    #[test]
    fn timestamps_are_fhir_instants() {
        let at = SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_772_444_466);
        assert_eq!(instant(at), "2026-03-02T09:41:06Z");
    }
}
