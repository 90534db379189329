//! What of a URL may be recorded: every `access_token` query parameter removed (RFC 6750 allows a
//! bearer token in the query; no credential may reach the job store, SEC-11).

#[cfg(feature = "bulk")]
use std::borrow::Cow;

/// Whether one `name=value` pair of a query names `access_token` once decoded, in any case.
/// Some servers also split pairs at `;`, so every `;`-separated part is checked.
pub(crate) fn carries_access_token(pair: &str) -> bool {
    pair.split(';').any(|part| {
        form_urlencoded::parse(part.as_bytes())
            .next()
            .is_some_and(|(name, _)| name.trim().eq_ignore_ascii_case("access_token"))
    })
}

/// `url` (absolute, or a path) without the query pairs that carry an `access_token`; the pairs
/// kept stay byte for byte as they were. Borrowed, unchanged, when no pair carries one.
#[cfg(feature = "bulk")]
pub(crate) fn without_access_token(url: &str) -> Cow<'_, str> {
    let Some((head, query)) = url.split_once('?') else {
        return Cow::Borrowed(url);
    };
    if !query.split('&').any(carries_access_token) {
        return Cow::Borrowed(url);
    }
    let kept: Vec<&str> = query
        .split('&')
        .filter(|pair| !pair.is_empty() && !carries_access_token(pair))
        .collect();
    if kept.is_empty() {
        Cow::Owned(head.to_owned())
    } else {
        Cow::Owned(format!("{head}?{}", kept.join("&")))
    }
}

#[cfg(all(test, feature = "bulk"))]
mod tests {
    use super::*;

    // SEC-11: an absolute URL loses its `access_token` pairs, in any spelling, and nothing else.
    #[test]
    fn sec_11_access_tokens_are_removed_from_urls() {
        let url = "https://gw.example/fhir/$export?_type=Patient&access%5Ftoken=SECRET&_since=2026";
        assert_eq!(
            without_access_token(url),
            "https://gw.example/fhir/$export?_type=Patient&_since=2026"
        );
        assert_eq!(
            without_access_token("https://gw.example/fhir/$export?ACCESS_TOKEN=S"),
            "https://gw.example/fhir/$export"
        );
        for kept in [
            "https://gw.example/fhir/$export",
            "https://gw.example/fhir/$export?_type=Patient,Observation&&my_access_token=x",
        ] {
            assert!(matches!(without_access_token(kept), Cow::Borrowed(same) if same == kept));
        }
    }
}
