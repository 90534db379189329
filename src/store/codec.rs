//! How shared backends keep a job's result and times: a compact binary encoding of
//! [`StoredResponse`] (any header bytes, any body bytes) and times as Unix milliseconds.

use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::{HeaderName, HeaderValue, StatusCode};

use super::{Change, StoreError};
use crate::job::{JobId, StoredResponse};

/// The first byte of every encoding, so a later format can be told apart.
const VERSION: u8 = 1;

/// `version u8 | status u16 | header count u16 | (name len u16, name, value len u32, value)* | body`,
/// integers big-endian.
pub(crate) fn encode_response(response: &StoredResponse) -> Vec<u8> {
    let headers_len: usize = response
        .headers
        .iter()
        .map(|(n, v)| 6 + n.as_str().len() + v.len())
        .sum();
    let mut out = Vec::with_capacity(5 + headers_len + response.body.len());
    out.push(VERSION);
    out.extend_from_slice(&response.status.as_u16().to_be_bytes());
    let count = u16::try_from(response.headers.len()).unwrap_or(u16::MAX);
    out.extend_from_slice(&count.to_be_bytes());
    for (name, value) in response.headers.iter().take(usize::from(count)) {
        // Header names are short and values are bounded by the HTTP server's limits.
        out.extend_from_slice(
            &u16::try_from(name.as_str().len())
                .unwrap_or(u16::MAX)
                .to_be_bytes(),
        );
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(&u32::try_from(value.len()).unwrap_or(u32::MAX).to_be_bytes());
        out.extend_from_slice(value.as_bytes());
    }
    out.extend_from_slice(&response.body);
    out
}

/// The inverse of [`encode_response`]; [`StoreError::Corrupt`] for anything it did not write.
pub(crate) fn decode_response(bytes: &[u8]) -> Result<StoredResponse, StoreError> {
    let corrupt = |why: &str| StoreError::Corrupt(format!("stored response: {why}"));
    let mut reader = Reader(bytes);
    if reader.take(1).ok_or_else(|| corrupt("empty"))? != [VERSION] {
        return Err(corrupt("unknown encoding version"));
    }
    let status = u16::from_be_bytes(reader.array().ok_or_else(|| corrupt("no status"))?);
    let status = StatusCode::from_u16(status).map_err(|_| corrupt("invalid status"))?;
    let count = u16::from_be_bytes(reader.array().ok_or_else(|| corrupt("no header count"))?);
    let mut headers = Vec::with_capacity(usize::from(count));
    for _ in 0..count {
        let name_len =
            u16::from_be_bytes(reader.array().ok_or_else(|| corrupt("truncated header"))?);
        let name = reader
            .take(usize::from(name_len))
            .ok_or_else(|| corrupt("truncated header name"))?;
        let name = HeaderName::from_bytes(name).map_err(|_| corrupt("invalid header name"))?;
        let value_len =
            u32::from_be_bytes(reader.array().ok_or_else(|| corrupt("truncated header"))?);
        let value_len = usize::try_from(value_len).map_err(|_| corrupt("header value too long"))?;
        let value = reader
            .take(value_len)
            .ok_or_else(|| corrupt("truncated header value"))?;
        let value = HeaderValue::from_bytes(value).map_err(|_| corrupt("invalid header value"))?;
        headers.push((name, value));
    }
    Ok(StoredResponse {
        status,
        headers,
        body: Bytes::copy_from_slice(reader.0),
    })
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Some(head)
    }

    fn array<const N: usize>(&mut self) -> Option<[u8; N]> {
        self.take(N)?.try_into().ok()
    }
}

/// A time as milliseconds since the Unix epoch (negative before it), saturating.
pub(crate) fn to_millis(time: SystemTime) -> i64 {
    match time.duration_since(SystemTime::UNIX_EPOCH) {
        Ok(after) => i64::try_from(after.as_millis()).unwrap_or(i64::MAX),
        Err(before) => i64::try_from(before.duration().as_millis()).map_or(i64::MIN, |ms| -ms),
    }
}

/// The inverse of [`to_millis`].
pub(crate) fn from_millis(millis: i64) -> SystemTime {
    let magnitude = Duration::from_millis(millis.unsigned_abs());
    if millis >= 0 {
        SystemTime::UNIX_EPOCH + magnitude
    } else {
        SystemTime::UNIX_EPOCH - magnitude
    }
}

/// The text form of a [`Change`] on a pub/sub channel or in a `NOTIFY` payload:
/// `cancelled {id}` or `updated {id}`. The cancel scripts write the first form themselves.
#[cfg(any(test, feature = "redis"))]
pub(super) fn encode_change(change: Change) -> String {
    match change {
        Change::Cancelled(id) => format!("cancelled {id}"),
        Change::Updated(id) => format!("updated {id}"),
    }
}

/// Reads [`encode_change`]'s form; `None` for anything else.
pub(super) fn decode_change(text: &str) -> Option<Change> {
    let (kind, id) = text.split_once(' ')?;
    let id = JobId::parse(id)?;
    match kind {
        "cancelled" => Some(Change::Cancelled(id)),
        "updated" => Some(Change::Updated(id)),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn responses_round_trip() {
        let response = StoredResponse {
            status: StatusCode::CREATED,
            headers: vec![
                (
                    http::header::LOCATION,
                    HeaderValue::from_static("Patient/1/_history/1"),
                ),
                (
                    HeaderName::from_static("x-raw"),
                    HeaderValue::from_bytes(b"caf\xe9").unwrap(),
                ),
            ],
            body: Bytes::from_static(b"\x00\xff{\"resourceType\":\"Patient\"}"),
        };
        assert_eq!(
            decode_response(&encode_response(&response)).unwrap(),
            response
        );
    }

    #[test]
    fn corrupt_encodings_are_errors_not_panics() {
        let good = encode_response(&StoredResponse {
            status: StatusCode::OK,
            headers: vec![(http::header::ETAG, HeaderValue::from_static("W/\"1\""))],
            body: Bytes::from_static(b"{}"),
        });
        for cut in 0..good.len() - 2 {
            let result = decode_response(&good[..cut]);
            assert!(
                matches!(result, Err(StoreError::Corrupt(_))),
                "cut at {cut}"
            );
        }
        assert!(
            decode_response(&[2, 0, 200, 0, 0]).is_err(),
            "unknown version"
        );
        assert!(decode_response(&[1, 0, 1, 0, 0]).is_err(), "status 1");
    }

    #[test]
    fn millis_round_trip_both_sides_of_the_epoch() {
        for ms in [0i64, 1, 1_772_444_466_123, -1, -86_400_000] {
            assert_eq!(to_millis(from_millis(ms)), ms);
        }
    }

    // CANCEL-3: a change read back off the feed is the change announced; anything else is no
    // change at all.
    #[test]
    fn changes_round_trip_and_nothing_else_reads_as_one() {
        let id = JobId::new();
        for change in [Change::Cancelled(id), Change::Updated(id)] {
            assert_eq!(decode_change(&encode_change(change)), Some(change));
        }
        assert_eq!(
            decode_change(&format!("cancelled {id}")),
            Some(Change::Cancelled(id))
        );
        for other in [
            String::new(),
            id.to_string(),
            format!("deleted {id}"),
            "cancelled x".into(),
        ] {
            assert_eq!(decode_change(&other), None, "{other:?}");
        }
    }
}
