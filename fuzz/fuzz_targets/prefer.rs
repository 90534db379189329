//! The `Prefer` parser and the forwarded value never panic, whatever the header bytes
//! (PREFER-4), and forwarding never keeps `respond-async` or `wait` (PREFER-9).

#![no_main]

use http::{HeaderMap, HeaderValue};
use libfuzzer_sys::fuzz_target;
use tower_fhir_async::prefer::{self, AsyncPreferences, PREFER};

fuzz_target!(|data: &[u8]| {
    let mut headers = HeaderMap::new();
    // Each NUL-separated part is one header line, so several lines are fuzzed too.
    for line in data.split(|&b| b == 0) {
        if let Ok(value) = HeaderValue::from_bytes(line) {
            headers.append(PREFER, value);
        }
    }
    let _ = AsyncPreferences::from_headers(&headers);
    for preference in prefer::preferences(&headers) {
        let _ = preference.value();
    }
    if let Some(kept) = prefer::forwarded(&headers) {
        let mut again = HeaderMap::new();
        again.insert(PREFER, kept);
        let left = AsyncPreferences::from_headers(&again);
        assert!(!left.respond_async && left.wait.is_none(), "forwarded value kept an async preference");
    }
});
