//! Mapping the upstream's base URL onto the public one in FHIR JSON and NDJSON, streamed: every
//! JSON string that starts with the upstream base (followed by the end of the string, `/`, `?`
//! or `#`) gets the public base instead; every other byte is passed on as it came (key order,
//! numbers, escapes and whitespace kept). Memory is bounded by the base's length, whatever the
//! body's size and however it is split into chunks.

use std::sync::Arc;

/// Maps one base URL onto another in JSON text, chunk by chunk.
#[derive(Debug, Clone)]
pub(crate) struct Rewriter {
    from: Arc<str>,
    to: Arc<str>,
    state: State,
    /// The start of the current string while it may still be the base: the raw bytes as they
    /// came (so a mismatch passes them on unchanged).
    pending: Vec<u8>,
    /// How many bytes of `from` `pending` has matched (`\/` counts as one `/`).
    matched: usize,
    /// `pending` ends in a backslash whose escape is not complete yet.
    escape_open: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Between strings.
    Outside,
    /// At the start of a string, comparing it with the base.
    Matching,
    /// Inside a string, past the point where it could be the base.
    Inside { escaped: bool },
}

impl Rewriter {
    /// Maps `from` (e.g. `http://fhir.internal:8103/fhir/R4`) to `to`, both without a trailing
    /// `/`. Shared, so a rewriter per response copies no text.
    pub(crate) fn new(from: Arc<str>, to: Arc<str>) -> Self {
        Self {
            from,
            to,
            state: State::Outside,
            pending: Vec::new(),
            matched: 0,
            escape_open: false,
        }
    }

    /// Rewrites the next chunk, appending the output to `out`. Bytes that may still be part of
    /// the base are held back until the next chunk (or [`finish`](Self::finish)).
    ///
    /// Between strings and inside strings that cannot be the base any more, whole spans up to
    /// the next quote (or backslash) are copied at once; only the start of each string is
    /// compared byte by byte.
    pub(crate) fn push(&mut self, chunk: &[u8], out: &mut Vec<u8>) {
        out.reserve(chunk.len());
        let mut rest = chunk;
        while let Some(&first) = rest.first() {
            match self.state {
                State::Outside => {
                    let Some(at) = memchr::memchr(b'"', rest) else {
                        out.extend_from_slice(rest);
                        return;
                    };
                    out.extend_from_slice(&rest[..=at]);
                    self.state = State::Matching;
                    self.matched = 0;
                    rest = &rest[at + 1..];
                }
                State::Inside { escaped: true } => {
                    out.push(first);
                    self.state = State::Inside { escaped: false };
                    rest = &rest[1..];
                }
                State::Inside { escaped: false } => {
                    let Some(at) = memchr::memchr2(b'"', b'\\', rest) else {
                        out.extend_from_slice(rest);
                        return;
                    };
                    out.extend_from_slice(&rest[..=at]);
                    self.state = if rest[at] == b'"' {
                        State::Outside
                    } else {
                        State::Inside { escaped: true }
                    };
                    rest = &rest[at + 1..];
                }
                State::Matching => {
                    self.matching(first, out);
                    rest = &rest[1..];
                }
            }
        }
    }

    /// Ends the body: what was held back is passed on as it came.
    pub(crate) fn finish(&mut self, out: &mut Vec<u8>) {
        out.append(&mut self.pending);
        self.matched = 0;
        self.escape_open = false;
        self.state = State::Outside;
    }

    fn byte(&mut self, byte: u8, out: &mut Vec<u8>) {
        match self.state {
            State::Outside => {
                out.push(byte);
                if byte == b'"' {
                    self.state = State::Matching;
                    self.matched = 0;
                }
            }
            State::Inside { escaped } => {
                out.push(byte);
                self.state = match byte {
                    _ if escaped => State::Inside { escaped: false },
                    b'\\' => State::Inside { escaped: true },
                    b'"' => State::Outside,
                    _ => State::Inside { escaped: false },
                };
            }
            State::Matching => self.matching(byte, out),
        }
    }

    fn matching(&mut self, byte: u8, out: &mut Vec<u8>) {
        if self.escape_open {
            self.escape_open = false;
            self.pending.push(byte);
            // Only `\/` can stand for a byte of a URL here; any other escape ends the match.
            if byte == b'/' && self.matched == self.from.len() {
                // The base, then an escaped `/`: the base it is.
                self.pending.clear();
                self.matched = 0;
                out.extend_from_slice(self.to.as_bytes());
                out.extend_from_slice(b"\\/");
                self.state = State::Inside { escaped: false };
            } else if byte == b'/' && self.from.as_bytes().get(self.matched) == Some(&b'/') {
                self.matched += 1;
            } else {
                self.give_up(out, State::Inside { escaped: false });
            }
            return;
        }
        if self.matched == self.from.len() {
            // The whole base matched: it is the base if the URL ends or goes on here.
            if byte == b'\\' {
                self.pending.push(byte);
                self.escape_open = true;
            } else if matches!(byte, b'"' | b'/' | b'?' | b'#') {
                self.pending.clear();
                self.matched = 0;
                out.extend_from_slice(self.to.as_bytes());
                self.state = State::Inside { escaped: false };
                self.byte(byte, out);
            } else {
                self.give_up(out, State::Inside { escaped: false });
                self.byte(byte, out);
            }
            return;
        }
        match byte {
            b'\\' => {
                self.pending.push(byte);
                self.escape_open = true;
            }
            _ if self.from.as_bytes()[self.matched] == byte => {
                self.pending.push(byte);
                self.matched += 1;
            }
            _ => {
                self.give_up(out, State::Inside { escaped: false });
                self.byte(byte, out);
            }
        }
    }

    /// The string is not the base: pass on what was held back and go on in `state`.
    fn give_up(&mut self, out: &mut Vec<u8>, state: State) {
        out.append(&mut self.pending);
        self.matched = 0;
        self.state = state;
    }
}

/// The authority of a base URL (`fhir.internal:8103` of `http://fhir.internal:8103/fhir`):
/// every occurrence of the base in a body, escaped slashes or not, contains it as it is, so a
/// body without it has nothing to map.
pub(crate) fn authority(base: &str) -> &str {
    let rest = base.split_once("://").map_or(base, |(_, rest)| rest);
    rest.split(['/', '?', '#']).next().unwrap_or(rest)
}

/// `value` with a leading `from` base (followed by its end, `/`, `?` or `#`) replaced by `to`;
/// `None` when it does not start with the base. For `Location` and `Content-Location`.
pub(crate) fn map_url(value: &str, from: &str, to: &str) -> Option<String> {
    let from = from.trim_end_matches('/');
    let rest = value
        .get(..from.len())
        .filter(|head| head.eq_ignore_ascii_case(from))
        .map(|_| &value[from.len()..])?;
    if !(rest.is_empty() || rest.starts_with(['/', '?', '#'])) {
        return None;
    }
    Some(format!("{}{rest}", to.trim_end_matches('/')))
}

/// `value`, an absolute path (`/Patient/1`, as some servers write `Location`), made an absolute
/// URL on `to` when it lies under the upstream's base path `path` (`""` for a server at the
/// root); `None` otherwise (a relative reference, or another path).
pub(crate) fn map_path(value: &str, path: &str, to: &str) -> Option<String> {
    if !value.starts_with('/') || value.starts_with("//") {
        return None;
    }
    let path = path.trim_end_matches('/');
    let rest = value.strip_prefix(path)?;
    if !(rest.is_empty() || rest.starts_with(['/', '?', '#'])) {
        return None;
    }
    Some(format!("{}{rest}", to.trim_end_matches('/')))
}

/// A `Link` header value with every `<url>` on the `from` base mapped to `to`; `None` when
/// nothing changed.
pub(crate) fn map_link(value: &str, from: &str, to: &str) -> Option<String> {
    let mut out = String::with_capacity(value.len());
    let mut changed = false;
    let mut rest = value;
    while let Some(open) = rest.find('<') {
        out.push_str(&rest[..=open]);
        rest = &rest[open + 1..];
        let Some(close) = rest.find('>') else {
            break;
        };
        let url = &rest[..close];
        match map_url(url, from, to) {
            Some(mapped) => {
                out.push_str(&mapped);
                changed = true;
            }
            None => out.push_str(url),
        }
        rest = &rest[close..];
    }
    out.push_str(rest);
    changed.then_some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const FROM: &str = "http://fhir.internal:8103/fhir/R4";
    const TO: &str = "https://fhir.example.org/api";

    fn whole(input: &str) -> String {
        let mut rewriter = Rewriter::new(FROM.into(), TO.into());
        let mut out = Vec::new();
        rewriter.push(input.as_bytes(), &mut out);
        rewriter.finish(&mut out);
        String::from_utf8(out).unwrap()
    }

    // GATEWAY-2: fullUrl, link.url and response.location name the public base; everything else
    // is byte for byte what came.
    #[test]
    fn urls_on_the_upstream_base_are_mapped_and_nothing_else_changes() {
        let input = format!(
            r#"{{"resourceType":"Bundle", "link":[{{"relation":"next","url":"{FROM}?_getpages=x&_count=2"}}],
  "total": 1.50e3, "entry":[{{"fullUrl":"{FROM}/Patient/1","resource":{{"id":"1","note":"see {FROM}/x"}},
  "response":{{"location":"{FROM}/Patient/1/_history/2"}}}}], "other":"{FROM}", "near":"{FROM}5/x",
  "esc":"\u00e9\"{FROM}", "tail":"{FROM}#frag"}}"#
        );
        let expected = format!(
            r#"{{"resourceType":"Bundle", "link":[{{"relation":"next","url":"{TO}?_getpages=x&_count=2"}}],
  "total": 1.50e3, "entry":[{{"fullUrl":"{TO}/Patient/1","resource":{{"id":"1","note":"see {FROM}/x"}},
  "response":{{"location":"{TO}/Patient/1/_history/2"}}}}], "other":"{TO}", "near":"{FROM}5/x",
  "esc":"\u00e9\"{FROM}", "tail":"{TO}#frag"}}"#
        );
        assert_eq!(whole(&input), expected);
    }

    // GATEWAY-2: a base written with escaped slashes is still the base.
    #[test]
    fn escaped_slashes_are_recognised() {
        let escaped = FROM.replace('/', "\\/");
        let input = format!(r#"{{"url":"{escaped}\/Patient\/1","x":"\n{escaped}"}}"#);
        let expected = format!(r#"{{"url":"{TO}\/Patient\/1","x":"\n{escaped}"}}"#);
        assert_eq!(whole(&input), expected);
    }

    // GATEWAY-2: however the body is split into chunks, the output is the same.
    #[test]
    fn every_split_gives_the_same_output() {
        let input = format!(
            r#"{{"a":"{FROM}/P/1","b":"x\"{FROM}","c":["{FROM}","{FROM}?q"],"d":"{FROM}X"}}"#
        );
        let expected = whole(&input);
        for split in 0..input.len() {
            for second in split..input.len() {
                let mut rewriter = Rewriter::new(FROM.into(), TO.into());
                let mut out = Vec::new();
                rewriter.push(&input.as_bytes()[..split], &mut out);
                rewriter.push(&input.as_bytes()[split..second], &mut out);
                rewriter.push(&input.as_bytes()[second..], &mut out);
                rewriter.finish(&mut out);
                assert_eq!(
                    String::from_utf8(out).unwrap(),
                    expected,
                    "split {split}/{second}"
                );
            }
        }
    }

    // GATEWAY-2: the authority of the base is what every occurrence contains.
    #[test]
    fn the_authority_is_the_host_and_port() {
        assert_eq!(authority(FROM), "fhir.internal:8103");
        assert_eq!(authority("http://h"), "h");
        assert_eq!(authority("https://h:1?x"), "h:1");
    }

    // GATEWAY-2: long strings, escapes and strings that only start like the base, in chunks of
    // every size, give the same output as one byte at a time.
    #[test]
    fn spans_and_single_bytes_agree() {
        let long = "x".repeat(300);
        let input = format!(
            r#"{{"a":"{long}\"{long}\\","h":"http://fhir","b":"{FROM}/P/1","c":"\/\/{FROM}","d":["{FROM}\/x",1,"{FROM}"]}}"#
        );
        let expected = whole(&input);
        for size in 1..=input.len() {
            let mut rewriter = Rewriter::new(FROM.into(), TO.into());
            let mut out = Vec::new();
            for chunk in input.as_bytes().chunks(size) {
                rewriter.push(chunk, &mut out);
            }
            rewriter.finish(&mut out);
            assert_eq!(
                String::from_utf8(out).unwrap(),
                expected,
                "chunks of {size}"
            );
        }
        assert!(
            expected.contains(&format!(r#""b":"{TO}/P/1""#)),
            "{expected}"
        );
        assert!(
            expected.contains(&format!(r#"["{TO}\/x",1,"{TO}"]"#)),
            "{expected}"
        );
    }

    // GATEWAY-2: a body cut off inside a held-back prefix loses nothing.
    #[test]
    fn a_truncated_body_is_passed_on_whole() {
        let input = format!(r#"{{"a":"{}"#, &FROM[..10]);
        assert_eq!(whole(&input), input);
    }

    // GATEWAY-2: Location, Content-Location and Link headers.
    #[test]
    fn headers_are_mapped_on_the_base_only() {
        assert_eq!(
            map_url(&format!("{FROM}/Patient/1"), FROM, TO).as_deref(),
            Some(&*format!("{TO}/Patient/1"))
        );
        assert_eq!(map_url(FROM, FROM, TO).as_deref(), Some(TO));
        assert_eq!(map_url(&format!("{FROM}5/Patient"), FROM, TO), None);
        assert_eq!(map_url("http://elsewhere/fhir", FROM, TO), None);
        let link = format!(r#"<{FROM}?page=2>; rel="next", <http://other/x>; rel="self""#);
        assert_eq!(
            map_link(&link, FROM, TO).as_deref(),
            Some(&*format!(
                r#"<{TO}?page=2>; rel="next", <http://other/x>; rel="self""#
            ))
        );
        assert_eq!(map_link("<http://other/x>; rel=next", FROM, TO), None);
        // An absolute path under the upstream's base path (a server at the root: any path).
        assert_eq!(
            map_path("/fhir/R4/Patient/1", "/fhir/R4", TO).as_deref(),
            Some(&*format!("{TO}/Patient/1"))
        );
        assert_eq!(
            map_path("/Patient/1/_history/1", "", TO).as_deref(),
            Some(&*format!("{TO}/Patient/1/_history/1"))
        );
        assert_eq!(map_path("/other/Patient/1", "/fhir/R4", TO), None);
        assert_eq!(map_path("Patient/1", "", TO), None);
        assert_eq!(map_path("//evil.example/x", "", TO), None);
    }
}
