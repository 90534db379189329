//! RFC 7240 `Prefer` parsing, as far as the layer needs it.
//!
//! Several header lines are one comma-joined list (PREFER-2); names compare case-insensitively
//! (PREFER-3); what cannot be parsed or is not understood is ignored (PREFER-4); a repeated
//! preference counts only the first time (PREFER-5); an empty value is no value (PREFER-6); quoted
//! values may hold `,`, `;` and `=` (PREFER-7).
//!
//! ```
//! use http::{HeaderMap, HeaderValue, header::HeaderName};
//! use tower_fhir_async::prefer;
//!
//! let mut headers = HeaderMap::new();
//! let prefer = HeaderName::from_static("prefer");
//! headers.append(&prefer, HeaderValue::from_static("return=minimal"));
//! headers.append(&prefer, HeaderValue::from_static("RESPOND-ASYNC, foo=\"a,b;c\""));
//!
//! let names: Vec<_> = prefer::preferences(&headers).map(|p| p.name().to_owned()).collect();
//! assert_eq!(names, ["return", "RESPOND-ASYNC", "foo"]);
//! let found = prefer::AsyncPreferences::from_headers(&headers);
//! assert!(found.respond_async);
//! ```

use std::borrow::Cow;

use http::header::{HeaderName, ValueIter};
use http::{HeaderMap, HeaderValue};

/// The `Prefer` request header.
pub const PREFER: HeaderName = HeaderName::from_static("prefer");
/// The `Preference-Applied` response header.
pub const PREFERENCE_APPLIED: HeaderName = HeaderName::from_static("preference-applied");

/// One parsed preference: a name, an optional value and optional parameters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Preference<'a> {
    name: &'a str,
    value: Option<&'a [u8]>,
    params: &'a [u8],
}

impl<'a> Preference<'a> {
    /// Parses one list element (the text between top-level commas). `None` when it does not
    /// start with a token, which RFC 7240 says to ignore.
    pub fn parse(element: &'a [u8]) -> Option<Self> {
        let element = trim(element);
        let (head, params) = split_top(element, b';');
        let (name, value) = match head.iter().position(|&b| b == b'=') {
            Some(eq) => (trim(&head[..eq]), Some(trim(&head[eq + 1..]))),
            None => (trim(head), None),
        };
        if name.is_empty() || !name.iter().all(|&b| is_tchar(b)) {
            return None;
        }
        // Token characters are ASCII, so this cannot fail.
        let name = std::str::from_utf8(name).ok()?;
        let value = value.filter(|v| !v.is_empty() && *v != b"\"\"");
        Some(Self {
            name,
            value,
            params: params.unwrap_or_default(),
        })
    }

    /// The preference's name, as sent (compare with [`is`](Self::is)).
    pub fn name(&self) -> &'a str {
        self.name
    }

    /// Whether the name is `name`, ignoring ASCII case (PREFER-3).
    pub fn is(&self, name: &str) -> bool {
        self.name.eq_ignore_ascii_case(name)
    }

    /// The value with quotes and escapes removed; `None` for no value or an empty one.
    pub fn value(&self) -> Option<Cow<'a, str>> {
        self.value.map(unquote)
    }

    /// The raw text of the parameters after the first `;`, if any.
    pub fn params(&self) -> &'a [u8] {
        self.params
    }
}

/// Every preference of every `Prefer` line, in order, skipping elements that cannot be parsed.
pub fn preferences(headers: &HeaderMap) -> impl Iterator<Item = Preference<'_>> {
    elements(headers).filter_map(Preference::parse)
}

/// The raw list elements of every `Prefer` line, trimmed, empty ones skipped.
fn elements(headers: &HeaderMap) -> Elements<'_> {
    Elements {
        lines: headers.get_all(PREFER).into_iter(),
        rest: None,
    }
}

struct Elements<'a> {
    lines: ValueIter<'a, HeaderValue>,
    rest: Option<&'a [u8]>,
}

impl<'a> Iterator for Elements<'a> {
    type Item = &'a [u8];

    fn next(&mut self) -> Option<&'a [u8]> {
        loop {
            let Some(rest) = self.rest else {
                self.rest = Some(self.lines.next()?.as_bytes());
                continue;
            };
            let (element, tail) = split_top(rest, b',');
            self.rest = tail;
            let element = trim(element);
            if !element.is_empty() {
                return Some(element);
            }
        }
    }
}

/// What the layer takes from `Prefer`; everything else is forwarded to the inner service.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct AsyncPreferences {
    /// `respond-async` was asked for (with any value or parameters, PREFER-6).
    pub respond_async: bool,
    /// The first `wait` preference, in seconds, when it was a valid `1*DIGIT` (saturating).
    pub wait: Option<u64>,
    /// `separate-export-status` was asked for (bulk pattern).
    pub separate_export_status: bool,
}

impl AsyncPreferences {
    /// Scans the `Prefer` lines of `headers`. Allocates nothing.
    pub fn from_headers(headers: &HeaderMap) -> Self {
        let mut found = Self::default();
        let mut seen_wait = false;
        for pref in preferences(headers) {
            if pref.is("respond-async") {
                found.respond_async = true;
            } else if pref.is("wait") {
                // PREFER-5: only the first occurrence counts, even when it is malformed.
                if !seen_wait {
                    seen_wait = true;
                    found.wait = pref.value.and_then(parse_delta_seconds);
                }
            } else if pref.is("separate-export-status") {
                found.separate_export_status = true;
            }
        }
        found
    }
}

/// `1*DIGIT`, saturating at `u64::MAX`; `None` for anything else (signs, decimals, quotes).
fn parse_delta_seconds(value: &[u8]) -> Option<u64> {
    if value.is_empty() || !value.iter().all(u8::is_ascii_digit) {
        return None;
    }
    Some(value.iter().fold(0u64, |acc, &d| {
        acc.saturating_mul(10).saturating_add(u64::from(d - b'0'))
    }))
}

/// The `Prefer` value to forward to the inner service: every element except `respond-async` and
/// `wait` (PREFER-9), joined with `, `. `None` when nothing is left.
pub fn forwarded(headers: &HeaderMap) -> Option<HeaderValue> {
    let mut kept: Vec<u8> = Vec::new();
    for element in elements(headers) {
        let drop =
            Preference::parse(element).is_some_and(|p| p.is("respond-async") || p.is("wait"));
        if !drop {
            if !kept.is_empty() {
                kept.extend_from_slice(b", ");
            }
            kept.extend_from_slice(element);
        }
    }
    if kept.is_empty() {
        return None;
    }
    // Every byte came from a valid header value, and ", " is valid too.
    HeaderValue::from_bytes(&kept).ok()
}

/// Rewrites `headers` so that the inner service never sees `respond-async` or `wait`.
pub(crate) fn strip_async_preferences(headers: &mut HeaderMap) {
    let kept = forwarded(headers);
    headers.remove(PREFER);
    if let Some(value) = kept {
        headers.insert(PREFER, value);
    }
}

/// Whether any `Prefer` line is present (the cheap test on the pass-through path).
pub(crate) fn has_prefer(headers: &HeaderMap) -> bool {
    headers.contains_key(PREFER)
}

/// Whether some `Prefer` line contains the text `respond-async` in any case: without it no
/// element can be `respond-async` (names are tokens, matched case-insensitively), so requests
/// with other preferences skip the parse.
///
/// One lookup of the header name: a request without `Prefer` (most of them) costs one hash.
pub(crate) fn mentions_respond_async(headers: &HeaderMap) -> bool {
    const NAME: &[u8] = b"respond-async";
    headers.get_all(PREFER).iter().any(|value| {
        value
            .as_bytes()
            .windows(NAME.len())
            // The hyphen first: most windows of other preferences fail there.
            .any(|window| window[7] == b'-' && window.eq_ignore_ascii_case(NAME))
    })
}

/// Splits at the first `sep` outside a quoted string.
fn split_top(input: &[u8], sep: u8) -> (&[u8], Option<&[u8]>) {
    let mut quoted = false;
    let mut escaped = false;
    for (i, &b) in input.iter().enumerate() {
        if escaped {
            escaped = false;
        } else if quoted && b == b'\\' {
            escaped = true;
        } else if b == b'"' {
            quoted = !quoted;
        } else if !quoted && b == sep {
            return (&input[..i], Some(&input[i + 1..]));
        }
    }
    (input, None)
}

fn trim(mut bytes: &[u8]) -> &[u8] {
    while let [b' ' | b'\t', rest @ ..] = bytes {
        bytes = rest;
    }
    while let [rest @ .., b' ' | b'\t'] = bytes {
        bytes = rest;
    }
    bytes
}

fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

fn unquote(value: &[u8]) -> Cow<'_, str> {
    let Some(inner) = value
        .strip_prefix(b"\"")
        .and_then(|v| v.strip_suffix(b"\""))
    else {
        return String::from_utf8_lossy(value);
    };
    if !inner.contains(&b'\\') {
        return String::from_utf8_lossy(inner);
    }
    let mut out = Vec::with_capacity(inner.len());
    let mut bytes = inner.iter();
    while let Some(&b) = bytes.next() {
        if b == b'\\' {
            if let Some(&next) = bytes.next() {
                out.push(next);
            }
        } else {
            out.push(b);
        }
    }
    Cow::Owned(String::from_utf8_lossy(&out).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn headers(lines: &[&str]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for line in lines {
            map.append(PREFER, HeaderValue::from_str(line).unwrap());
        }
        map
    }

    #[test]
    fn prefer_2_several_lines_are_one_list() {
        let found = AsyncPreferences::from_headers(&headers(&["return=minimal", "respond-async"]));
        assert!(found.respond_async);
    }

    #[test]
    fn prefer_3_names_are_case_insensitive() {
        assert!(AsyncPreferences::from_headers(&headers(&["RESPOND-ASYNC"])).respond_async);
        assert!(AsyncPreferences::from_headers(&headers(&["Respond-Async; x=1"])).respond_async);
    }

    #[test]
    fn prefer_4_unknown_and_broken_tokens_are_ignored() {
        let map = headers(&["respond-async, x-foo=bar; baz, =nameless, (junk), ,,"]);
        assert!(AsyncPreferences::from_headers(&map).respond_async);
        let names: Vec<_> = preferences(&map).map(|p| p.name()).collect();
        assert_eq!(names, ["respond-async", "x-foo"]);
    }

    #[test]
    fn prefer_5_first_wait_wins() {
        assert_eq!(
            AsyncPreferences::from_headers(&headers(&["wait=2, wait=100"])).wait,
            Some(2)
        );
        assert_eq!(
            AsyncPreferences::from_headers(&headers(&["wait=-1, wait=100"])).wait,
            None
        );
        assert_eq!(
            AsyncPreferences::from_headers(&headers(&["wait=99999999999999999999"])).wait,
            Some(u64::MAX)
        );
        assert_eq!(
            AsyncPreferences::from_headers(&headers(&["wait=1.5"])).wait,
            None
        );
    }

    #[test]
    fn prefer_6_empty_value_is_no_value() {
        let map = headers(&["respond-async=\"\""]);
        let pref = preferences(&map).next().unwrap();
        assert!(pref.is("respond-async"));
        assert_eq!(pref.value(), None);
        assert!(AsyncPreferences::from_headers(&map).respond_async);
    }

    #[test]
    fn prefer_7_quoted_values_may_hold_separators() {
        let map = headers(&[r#"respond-async, foo="a,b;c=\"d\"", bar"#]);
        let prefs: Vec<_> = preferences(&map).collect();
        assert_eq!(prefs.len(), 3);
        assert_eq!(prefs[1].value().as_deref(), Some(r#"a,b;c="d""#));
        assert_eq!(prefs[2].name(), "bar");
    }

    #[test]
    fn prefer_9_forwarded_value_drops_only_async_tokens() {
        let map = headers(&[
            "respond-async, return=minimal",
            "WAIT=10; x, handling=lenient",
        ]);
        assert_eq!(forwarded(&map).unwrap(), "return=minimal, handling=lenient");
        assert_eq!(forwarded(&headers(&["respond-async", "wait=3"])), None);
        let mut map = headers(&["respond-async; foo, return=representation"]);
        strip_async_preferences(&mut map);
        let lines: Vec<_> = map.get_all(PREFER).iter().collect();
        assert_eq!(lines, ["return=representation"]);
    }

    #[test]
    fn mentions_respond_async_is_a_sound_shortcut() {
        for lines in [
            &["respond-async"][..],
            &["RESPOND-ASYNC; foo=bar"],
            &["return=minimal", "wait=10, Respond-Async"],
            &["foo=\"respond-async\""],
        ] {
            assert!(mentions_respond_async(&headers(lines)), "{lines:?}");
        }
        for lines in [
            &["return=minimal"][..],
            &["respond_async"],
            &["wait=5", "handling=lenient"],
        ] {
            let headers = headers(lines);
            assert!(!mentions_respond_async(&headers), "{lines:?}");
            assert!(!AsyncPreferences::from_headers(&headers).respond_async);
        }
    }

    #[test]
    fn non_utf8_lines_do_not_hide_respond_async() {
        let mut map = HeaderMap::new();
        map.append(
            PREFER,
            HeaderValue::from_bytes(b"x=\"\xff\xfe\", respond-async").unwrap(),
        );
        assert!(AsyncPreferences::from_headers(&map).respond_async);
        assert_eq!(forwarded(&map).unwrap().as_bytes(), b"x=\"\xff\xfe\"");
    }

    proptest! {
        // The pass-through shortcut never hides a `respond-async` the parser would find.
        #[test]
        fn respond_async_is_never_missed_by_the_shortcut(
            line in "(respond-async|Respond-ASYNC|respond|async|wait=1|return=minimal|[,; \"=-]|x){0,8}"
        ) {
            if let Ok(value) = HeaderValue::from_str(&line) {
                let mut map = HeaderMap::new();
                map.append(PREFER, value);
                if AsyncPreferences::from_headers(&map).respond_async {
                    prop_assert!(mentions_respond_async(&map));
                }
            }
        }

        // PREFER-4: no input makes the parser panic; forwarding never yields an invalid header.
        #[test]
        fn prefer_4_never_panics(bytes in proptest::collection::vec(32u8..=255, 0..200)) {
            if let Ok(value) = HeaderValue::from_bytes(&bytes) {
                let mut map = HeaderMap::new();
                map.append(PREFER, value);
                let _ = AsyncPreferences::from_headers(&map);
                for preference in preferences(&map) {
                    let _ = preference.value();
                }
                if let Some(kept) = forwarded(&map) {
                    prop_assert!(!kept.is_empty());
                }
            }
        }

        // PREFER-2, PREFER-9: forwarding keeps every other preference, in order.
        #[test]
        fn prefer_9_forwarding_round_trips(
            names in proptest::collection::vec("[a-z][a-z0-9-]{0,8}", 0..8),
            async_at in 0usize..8,
        ) {
            let mut elements: Vec<String> = names.iter().map(|n| format!("{n}=v")).collect();
            elements.insert(async_at.min(elements.len()), "respond-async".to_owned());
            let map = headers(&[&elements.join(", ")]);
            prop_assert!(AsyncPreferences::from_headers(&map).respond_async);
            let expected: Vec<String> = names
                .iter()
                .filter(|n| *n != "respond-async" && *n != "wait")
                .map(|n| format!("{n}=v"))
                .collect();
            let kept = forwarded(&map).map(|v| v.to_str().unwrap().to_owned()).unwrap_or_default();
            prop_assert_eq!(kept, expected.join(", "));
        }
    }
}
