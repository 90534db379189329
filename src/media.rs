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

/// Whether a media type (already an [`essence`]) is NDJSON: `application/fhir+ndjson`,
/// `application/ndjson`, or the older `application/x-ndjson`.
pub(crate) fn is_ndjson(essence: &str) -> bool {
    matches!(
        essence,
        "application/fhir+ndjson" | "application/ndjson" | "application/x-ndjson"
    )
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
