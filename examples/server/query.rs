//! `application/x-www-form-urlencoded` parsing and encoding, for query strings, `_search` form
//! bodies and the nested queries inside `_typeFilter`. Done by hand because the FHIR parameter
//! list must keep order and repeats, and `_typeFilter` needs a second decoding pass.

/// Decoded `(name, value)` pairs, in order, repeats kept.
pub(crate) type Params = Vec<(String, String)>;

/// Splits `a=1&b=x%2Cy` into decoded `(name, value)` pairs, keeping order and repeats.
pub(crate) fn parse(query: &str) -> Params {
    query
        .split('&')
        .filter(|pair| !pair.is_empty())
        .map(|pair| {
            let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
            (decode(name), decode(value))
        })
        .collect()
}

/// Percent-decodes one component, `+` meaning space. Malformed escapes are kept literally and
/// invalid UTF-8 is replaced, so a bad byte never fails the whole request.
fn decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' => match (
                bytes.get(i + 1).and_then(|&b| hex(b)),
                bytes.get(i + 2).and_then(|&b| hex(b)),
            ) {
                (Some(high), Some(low)) => {
                    out.push(high << 4 | low);
                    i += 2;
                }
                _ => out.push(b'%'),
            },
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Builds `a=1&b=x%2Cy` from pairs.
pub(crate) fn encode(pairs: &[(String, String)]) -> String {
    pairs
        .iter()
        .map(|(name, value)| format!("{}={}", encode_component(name), encode_component(value)))
        .collect::<Vec<_>>()
        .join("&")
}

/// Percent-encodes everything but the unreserved set and the few characters FHIR search
/// values commonly hold (`|`, `:`, `/`, `,`), which keeps next links readable.
fn encode_component(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for b in text.bytes() {
        match b {
            b'A'..=b'Z'
            | b'a'..=b'z'
            | b'0'..=b'9'
            | b'-'
            | b'.'
            | b'_'
            | b'~'
            | b'|'
            | b':'
            | b'/'
            | b',' => out.push(b as char),
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_and_encodes() {
        assert_eq!(
            parse("a=1&b=x%2Cy&c&d=a+b&e=%zz"),
            vec![
                ("a".into(), "1".into()),
                ("b".into(), "x,y".into()),
                ("c".into(), "".into()),
                ("d".into(), "a b".into()),
                ("e".into(), "%zz".into()),
            ]
        );
        let pairs = vec![("name".to_string(), "Mü ller&x".to_string())];
        assert_eq!(parse(&encode(&pairs)), pairs);
    }
}
