//! Media types: which ones the layer treats as FHIR JSON.

use http::HeaderValue;

/// The media type of a `Content-Type`-like value, lowercased, without parameters.
pub(crate) fn essence(value: &str) -> String {
    value
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase()
}

/// The media types of FHIR JSON: `application/fhir+json`, `application/json`, and the pre-R4
/// `application/json+fhir`.
const JSON: [&str; 3] = [
    "application/fhir+json",
    "application/json",
    "application/json+fhir",
];

/// The media types of NDJSON: `application/fhir+ndjson`, `application/ndjson`, and the older
/// `application/x-ndjson`.
const NDJSON: [&str; 3] = [
    "application/fhir+ndjson",
    "application/ndjson",
    "application/x-ndjson",
];

/// Whether a media type (already an [`essence`]) is JSON the FHIR way: `application/fhir+json`,
/// `application/json`, or the pre-R4 `application/json+fhir`.
pub(crate) fn is_json(essence: &str) -> bool {
    JSON.contains(&essence)
}

/// Whether a media type (already an [`essence`]) is NDJSON: `application/fhir+ndjson`,
/// `application/ndjson`, or the older `application/x-ndjson`.
pub(crate) fn is_ndjson(essence: &str) -> bool {
    NDJSON.contains(&essence)
}

/// Whether a `Content-Type` value (parameters and case as they came) is FHIR JSON or NDJSON;
/// unlike [`essence`], it copies nothing.
#[cfg(feature = "upstream")]
pub(crate) fn is_json_or_ndjson(content_type: &str) -> bool {
    // On every forwarded answer: a plain scan for the parameters, no `split` machinery.
    let end = content_type
        .bytes()
        .position(|b| b == b';')
        .unwrap_or(content_type.len());
    let essence = content_type[..end].trim();
    JSON.iter()
        .chain(&NDJSON)
        .any(|known| essence.eq_ignore_ascii_case(known))
}

/// One element of an `Accept`-style list (`Accept`, `Accept-Encoding`): its value, lowercased,
/// without parameters, and its `q` weight: 1 when absent, `None` when unreadable.
pub(crate) fn weighted(element: &str) -> (String, Option<f32>) {
    let mut pieces = element.split(';');
    let value = essence(pieces.next().unwrap_or_default());
    let quality = pieces
        .filter_map(|param| param.split_once('='))
        .find(|(name, _)| name.trim().eq_ignore_ascii_case("q"))
        .map_or(Some(1.0), |(_, q)| q.trim().parse::<f32>().ok());
    (value, quality)
}

/// Whether a header value names a FHIR JSON media type.
pub(crate) fn header_is_json(value: Option<&HeaderValue>) -> bool {
    value
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| is_json(&essence(v)))
}

#[cfg(test)]
mod tests {
    use super::*;

    // GATEWAY-2: the gateway maps FHIR JSON and NDJSON bodies, whatever the case and parameters
    // of their Content-Type, and nothing else.
    #[cfg(feature = "upstream")]
    #[test]
    fn json_and_ndjson_are_recognised_without_copying() {
        for mapped in [
            "application/fhir+json",
            "application/fhir+json;charset=utf-8",
            " Application/FHIR+JSON ; fhirVersion=4.0",
            "application/json",
            "application/json+fhir",
            "application/fhir+ndjson",
            "application/x-ndjson",
        ] {
            assert!(is_json_or_ndjson(mapped), "{mapped}");
        }
        for kept in [
            "text/plain",
            "application/fhir+xml",
            "",
            "application/jsonx",
        ] {
            assert!(!is_json_or_ndjson(kept), "{kept}");
        }
    }

    // The essence is what `is_json` and `is_ndjson` compare.
    #[test]
    fn essences_are_lowercased_without_parameters() {
        assert_eq!(
            essence(" Application/FHIR+json; charset=UTF-8"),
            "application/fhir+json"
        );
        assert!(is_json(&essence("application/json+fhir")));
        assert!(is_ndjson(&essence("application/ndjson;x=1")));
        assert!(!is_json(&essence("application/fhir+ndjson")));
    }
}
