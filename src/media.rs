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

/// Whether a media type (already an [`essence`]) is JSON the FHIR way: `application/fhir+json`,
/// `application/json`, or the pre-R4 `application/json+fhir`.
pub(crate) fn is_json(essence: &str) -> bool {
    matches!(
        essence,
        "application/fhir+json" | "application/json" | "application/json+fhir"
    )
}

/// Whether a header value names a FHIR JSON media type.
pub(crate) fn header_is_json(value: Option<&HeaderValue>) -> bool {
    value
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| is_json(&essence(v)))
}
