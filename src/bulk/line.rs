//! Reading one NDJSON line of an export fast: whether it is one JSON object, and its
//! `resourceType`, in one pass and without building anything.
//!
//! Every line of an export is checked before it is written (BULK-7: a line that is not a FHIR
//! resource goes to the error file), so the check runs over every byte the wrapped service
//! sends. serde_json's ignoring parse was the largest part of an export's work; this scanner
//! knows the one question it answers: it checks the line's bytes in one vectorised pass, skips
//! string contents with `memchr`, and keeps its nesting in a bit stack (about 30 % fewer
//! instructions than serde_json for the same check; BENCHMARKS.md §4).
//!
//! It only ever says yes when serde_json would: [`resource_type`] answers `None` for
//! anything it does not accept outright (not JSON, no `resourceType`, a key or type written
//! with escapes, tabs between tokens, nesting deeper than 63 …), and the caller then asks
//! serde_json, whose verdict and message stand. The property test below checks the "only
//! when serde_json would" on random and mutated lines.

/// Containers nested deeper than this (within the top-level object) are left to serde_json,
/// whose own limit is 127 levels in all. FHIR resources nest far less.
const MAX_DEPTH: u32 = 63;

/// The `resourceType` of `line` (without surrounding whitespace) when it is certainly one JSON
/// object with a string `resourceType` member that serde_json would read as this; else `None`.
pub(crate) fn resource_type(line: &[u8]) -> Option<&str> {
    if !is_plain_text(line) {
        return None;
    }
    let mut scan = Scan { line, at: 0 };
    let found = scan.object()?;
    scan.whitespace();
    if scan.at != line.len() {
        return None;
    }
    let (start, end) = found?;
    std::str::from_utf8(&line[start..end]).ok()
}

/// Whether `line` is UTF-8 without control characters. serde_json reads keys (and the type) as
/// text, so a line that is not UTF-8 is left to it; and with no control character anywhere, a
/// string's contents need no check but for `"` and `\`. (JSON allows tabs and line ends
/// between tokens; a line with them is left to serde_json too.) One pass that the compiler
/// turns into vector instructions; the UTF-8 check only runs when there are non-ASCII bytes.
fn is_plain_text(line: &[u8]) -> bool {
    let (mut lowest, mut highest) = (u8::MAX, 0u8);
    for &byte in line {
        lowest = lowest.min(byte);
        highest = highest.max(byte);
    }
    lowest >= 0x20 && (highest < 0x80 || std::str::from_utf8(line).is_ok())
}

/// Where a string's contents start and end in the line.
type Span = (usize, usize);

struct Scan<'a> {
    line: &'a [u8],
    at: usize,
}

impl Scan<'_> {
    fn peek(&self) -> Option<u8> {
        self.line.get(self.at).copied()
    }

    fn whitespace(&mut self) {
        while let Some(b' ' | b'\t' | b'\n' | b'\r') = self.peek() {
            self.at += 1;
        }
    }

    fn eat(&mut self, byte: u8) -> Option<()> {
        (self.peek() == Some(byte)).then(|| self.at += 1)
    }

    /// The top-level object. Answers `Some(range of the resourceType's value)` (or
    /// `Some(None)` without one) when the object is valid; nested values are read by
    /// [`value`](Self::value) with an explicit stack.
    fn object(&mut self) -> Option<Option<Span>> {
        self.whitespace();
        self.eat(b'{')?;
        self.whitespace();
        let mut found = None;
        if self.eat(b'}').is_some() {
            return Some(None);
        }
        loop {
            let (start, end, escaped) = self.string()?;
            // A key written with escapes might spell `resourceType`: serde_json decides.
            if escaped {
                return None;
            }
            self.whitespace();
            self.eat(b':')?;
            self.whitespace();
            if &self.line[start..end] == b"resourceType" {
                // serde_json refuses a duplicate field, and a type that is not a string.
                if found.is_some() {
                    return None;
                }
                let (start, end, escaped) = self.string()?;
                if escaped {
                    return None;
                }
                found = Some((start, end));
            } else {
                self.value()?;
            }
            self.whitespace();
            match self.peek()? {
                b',' => {
                    self.at += 1;
                    self.whitespace();
                }
                b'}' => {
                    self.at += 1;
                    return Some(found);
                }
                _ => return None,
            }
        }
    }

    /// One JSON value of any kind, nested ones included; `None` if it is not valid.
    fn value(&mut self) -> Option<()> {
        // Open containers, bit `d` for depth `d`: set for an object, clear for an array.
        let mut stack = 0u64;
        // Depth inside this value.
        let mut depth = 0u32;
        loop {
            // A value.
            match self.peek()? {
                b'"' => {
                    self.string()?;
                }
                b'{' | b'[' => {
                    let is_object = self.line[self.at] == b'{';
                    self.at += 1;
                    if depth >= MAX_DEPTH {
                        return None;
                    }
                    if is_object {
                        stack |= 1 << depth;
                    } else {
                        stack &= !(1 << depth);
                    }
                    depth += 1;
                    self.whitespace();
                    let close = if is_object { b'}' } else { b']' };
                    if self.eat(close).is_some() {
                        depth -= 1;
                    } else {
                        if is_object {
                            self.key()?;
                        }
                        continue;
                    }
                }
                b't' => self.literal(b"true")?,
                b'f' => self.literal(b"false")?,
                b'n' => self.literal(b"null")?,
                _ => self.number()?,
            }
            // After a value: the next member or element, or the end of containers.
            loop {
                if depth == 0 {
                    return Some(());
                }
                let is_object = stack & (1 << (depth - 1)) != 0;
                self.whitespace();
                match self.peek()? {
                    b',' => {
                        self.at += 1;
                        self.whitespace();
                        if is_object {
                            self.key()?;
                        }
                        break;
                    }
                    b'}' if is_object => {
                        self.at += 1;
                        depth -= 1;
                    }
                    b']' if !is_object => {
                        self.at += 1;
                        depth -= 1;
                    }
                    _ => return None,
                }
            }
        }
    }

    /// A member's key and its colon, up to the start of its value.
    fn key(&mut self) -> Option<()> {
        self.string()?;
        self.whitespace();
        self.eat(b':')?;
        self.whitespace();
        Some(())
    }

    /// A string; answers the range of its contents and whether it holds an escape. The line
    /// has no control characters ([`is_plain_text`]), so only `"` and `\` need attention.
    fn string(&mut self) -> Option<(usize, usize, bool)> {
        self.eat(b'"')?;
        let start = self.at;
        let mut escaped = false;
        loop {
            self.at += memchr::memchr2(b'"', b'\\', &self.line[self.at..])?;
            if self.line[self.at] == b'"' {
                self.at += 1;
                return Some((start, self.at - 1, escaped));
            }
            escaped = true;
            self.at += 1;
            match self.peek()? {
                b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't' => self.at += 1,
                b'u' => {
                    let hex = self.line.get(self.at + 1..self.at + 5)?;
                    if !hex.iter().all(u8::is_ascii_hexdigit) {
                        return None;
                    }
                    self.at += 5;
                }
                _ => return None,
            }
        }
    }

    fn literal(&mut self, word: &[u8]) -> Option<()> {
        let rest = self.line.get(self.at..self.at + word.len())?;
        (rest == word).then(|| self.at += word.len())
    }

    /// `-? (0 | [1-9][0-9]*) (. [0-9]+)? ([eE] [+-]? [0-9]+)?`
    fn number(&mut self) -> Option<()> {
        let _ = self.eat(b'-');
        match self.peek()? {
            b'0' => self.at += 1,
            b'1'..=b'9' => self.digits(),
            _ => return None,
        }
        if self.eat(b'.').is_some() {
            self.peek().filter(u8::is_ascii_digit)?;
            self.digits();
        }
        if let Some(b'e' | b'E') = self.peek() {
            self.at += 1;
            if let Some(b'+' | b'-') = self.peek() {
                self.at += 1;
            }
            self.peek().filter(u8::is_ascii_digit)?;
            self.digits();
        }
        Some(())
    }

    fn digits(&mut self) {
        while self.peek().is_some_and(|b| b.is_ascii_digit()) {
            self.at += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::borrow::Cow;

    use proptest::prelude::*;
    use serde::Deserialize;

    use super::*;

    #[derive(Deserialize)]
    struct ResourceType<'a> {
        #[serde(rename = "resourceType", borrow)]
        resource_type: Cow<'a, str>,
    }

    /// serde_json's reading of a line: the type of a valid object with one.
    fn serde_reads(line: &[u8]) -> Option<String> {
        let value = serde_json::from_slice::<serde::de::IgnoredAny>(line);
        let typed = serde_json::from_slice::<ResourceType<'_>>(line);
        match (value, typed) {
            (Ok(_), Ok(typed)) => Some(typed.resource_type.into_owned()),
            _ => None,
        }
    }

    fn agrees(line: &[u8]) {
        if let Some(found) = resource_type(line) {
            assert_eq!(
                serde_reads(line).as_deref(),
                Some(found),
                "{:?}",
                String::from_utf8_lossy(line)
            );
        }
    }

    // BULK-7: lines as FHIR servers write them (compact, escaped XHTML, decimals) are read here.
    #[test]
    fn bulk_7_reads_typical_export_lines() {
        let l = br#"{"resourceType":"Patient","id":"pat-1","meta":{"versionId":"3","lastUpdated":"2001-02-03T04:05:00Z"},"identifier":[{"system":"urn:oid:2.16.840.1.113883.4.1","value":"000000001"}],"active":true,"name":[{"use":"official","family":"X","given":["Y"]}],"gender":"male","birthDate":"1950-01-02","address":[{"line":["1 Main"],"city":"C","postalCode":"00001"}],"text":{"status":"generated","div":"<div xmlns=\"http://www.w3.org/1999/xhtml\">patient reports mild</div>"}}"#;
        assert_eq!(resource_type(l), Some("Patient"));
        let o = br#"{"resourceType":"Observation","id":"obs-1","status":"final","valueQuantity":{"value":12.3,"unit":"mg"},"note":[{"text":"x y"}]}"#;
        assert_eq!(resource_type(o), Some("Observation"));
    }

    // BULK-7: the lines an export writes are the ones serde_json reads as resources.
    #[test]
    fn bulk_7_reads_resources() {
        let cases: &[(&str, Option<&str>)] = &[
            (r#"{"resourceType":"Patient","id":"a"}"#, Some("Patient")),
            (
                r#" { "id" : "a" , "resourceType" : "Observation" } "#,
                Some("Observation"),
            ),
            (
                r#"{"resourceType":"Encounter","type":[{"coding":[{"code":"x"}]}],"n":[1,-2.5e3,0,true,false,null,{},[]]}"#,
                Some("Encounter"),
            ),
            (
                r#"{"resourceType":"Patient","text":{"div":"<div xmlns=\"http://www.w3.org/1999/xhtml\">a\\b\u00e9\n</div>"}}"#,
                Some("Patient"),
            ),
            (
                r#"{"resourceType":"Patient","name":"Zoë 😀"}"#,
                Some("Patient"),
            ),
            // JSON, but with a tab between tokens: serde_json reads it.
            ("{\"resourceType\":\t\"Patient\"}", None),
            // Not accepted here; serde_json decides.
            ("this is not json", None),
            (r#"{"id":"no-type"}"#, None),
            (r#"{"resourceType":7}"#, None),
            (
                r#"{"resourceType":"Patient","resourceType":"Patient"}"#,
                None,
            ),
            (r#"{"resource\u0054ype":"Patient"}"#, None),
            (r#"{"resourceType":"Pat\u0069ent"}"#, None),
            (r#"{"resourceType":"Patient"}{"#, None),
            (r#"{"resourceType":"Patient","a":[1,]}"#, None),
            (r#"{"resourceType":"Patient","a":01}"#, None),
            (r#"{"resourceType":"Patient","a":1.}"#, None),
            (r#"{"resourceType":"Patient","a":"tab	inside"}"#, None),
            (r#"{"resourceType":"Patient","a":"\x"}"#, None),
            (r#"{"resourceType":"Patient","a":tru}"#, None),
            (r#"{"resourceType":"Patient","a":{"b":1]}"#, None),
            (r#"{"resourceType":"Patient""#, None),
            (r#"["resourceType","Patient"]"#, None),
        ];
        for (line, expected) in cases {
            assert_eq!(resource_type(line.as_bytes()), *expected, "{line}");
            agrees(line.as_bytes());
        }
    }

    #[test]
    fn deep_nesting_is_left_to_serde_json() {
        let deep = |n: usize| {
            format!(
                r#"{{"resourceType":"Patient","a":{}{}}}"#,
                "[".repeat(n),
                "]".repeat(n)
            )
        };
        assert_eq!(resource_type(deep(63).as_bytes()), Some("Patient"));
        assert_eq!(resource_type(deep(64).as_bytes()), None);
        for n in [63, 64, 126, 127, 128] {
            agrees(deep(n).as_bytes());
        }
    }

    fn json_value() -> impl Strategy<Value = serde_json::Value> {
        let leaf = prop_oneof![
            Just(serde_json::Value::Null),
            any::<bool>().prop_map(serde_json::Value::Bool),
            any::<i64>().prop_map(serde_json::Value::from),
            any::<f64>()
                .prop_filter("finite", |f| f.is_finite())
                .prop_map(serde_json::Value::from),
            ".{0,12}".prop_map(serde_json::Value::String),
        ];
        leaf.prop_recursive(4, 32, 6, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..6).prop_map(serde_json::Value::Array),
                prop::collection::btree_map("(resourceType|type|[a-z\"\\\\]{0,6})", inner, 0..6)
                    .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
            ]
        })
    }

    proptest! {
        // Whatever the scanner accepts, serde_json reads as the same resource type: valid
        // lines, and the same lines cut, with a byte changed, or a byte inserted.
        #[test]
        fn bulk_7_only_accepts_what_serde_json_reads(
            value in json_value(),
            kind in "[A-Za-z]{1,12}",
            pretty in any::<bool>(),
            cut in any::<prop::sample::Index>(),
            byte in any::<u8>(),
            edit in 0..4u8,
        ) {
            let mut object = serde_json::Map::new();
            object.insert("resourceType".into(), kind.clone().into());
            object.insert("x".into(), value);
            let object = serde_json::Value::Object(object);
            let line = if pretty {
                serde_json::to_vec_pretty(&object).unwrap()
            } else {
                serde_json::to_vec(&object).unwrap()
            };
            // Line ends between tokens (pretty printing) are left to serde_json.
            let expected = (!pretty).then_some(kind.as_str());
            prop_assert_eq!(resource_type(&line), expected);
            agrees(&line);
            let mut changed = line.clone();
            let at = cut.index(line.len());
            match edit {
                0 => changed.truncate(at),
                1 => changed[at] = byte,
                2 => changed.insert(at, byte),
                _ => {
                    changed.remove(at);
                }
            }
            agrees(&changed);
        }

        #[test]
        fn bulk_7_random_bytes_are_never_accepted_wrongly(line in prop::collection::vec(
            prop_oneof![
                Just(b'{'), Just(b'}'), Just(b'['), Just(b']'), Just(b'"'), Just(b'\\'),
                Just(b':'), Just(b','), Just(b' '), Just(b'1'), Just(b'e'), Just(b'-'),
                Just(b'.'), Just(b'u'), Just(b'a'), any::<u8>(),
            ],
            0..64,
        )) {
            let mut with_type = br#"{"resourceType":"Patient","#.to_vec();
            with_type.extend_from_slice(&line);
            agrees(&line);
            agrees(&with_type);
        }
    }
}
