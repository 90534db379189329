//! Jobs: their ids, states and the records a [`JobStore`](crate::store::JobStore) keeps.

use std::fmt;
use std::str::FromStr;
use std::time::SystemTime;

use bytes::Bytes;
use http::{HeaderName, HeaderValue, StatusCode};

/// The id of an asynchronous job: 128 bits from the operating system's CSPRNG (SEC-9).
///
/// Its text form, used in status URLs, is exactly 32 lowercase hexadecimal digits. Parsing is
/// strict: anything else is rejected before a store is ever asked (STATUS-15).
///
/// ```
/// use tower_fhir_async::JobId;
///
/// let id = JobId::new();
/// let text = id.to_string();
/// assert_eq!(text.len(), 32);
/// assert_eq!(JobId::parse(&text), Some(id));
/// assert_eq!(JobId::parse("../etc/passwd"), None);
/// assert_eq!(JobId::parse(&text.to_uppercase()), None);
/// ```
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct JobId([u8; 16]);

impl JobId {
    /// A new random id.
    ///
    /// # Panics
    ///
    /// Only if the operating system's random number generator fails, which on supported
    /// platforms does not happen once it has been seeded.
    #[allow(clippy::new_without_default)] // a random value is not a default
    pub fn new() -> Self {
        let mut bytes = [0u8; 16];
        getrandom::fill(&mut bytes).expect("the operating system's random number generator failed");
        Self(bytes)
    }

    /// Parses the text form: exactly 32 lowercase hexadecimal digits.
    pub fn parse(text: &str) -> Option<Self> {
        let text = text.as_bytes();
        if text.len() != 32 {
            return None;
        }
        let mut bytes = [0u8; 16];
        for (byte, pair) in bytes.iter_mut().zip(text.chunks_exact(2)) {
            *byte = (hex_value(pair[0])? << 4) | hex_value(pair[1])?;
        }
        Some(Self(bytes))
    }

    /// The id from its 16 raw bytes.
    pub const fn from_bytes(bytes: [u8; 16]) -> Self {
        Self(bytes)
    }

    /// The 16 raw bytes.
    pub const fn as_bytes(&self) -> &[u8; 16] {
        &self.0
    }
}

fn hex_value(digit: u8) -> Option<u8> {
    match digit {
        b'0'..=b'9' => Some(digit - b'0'),
        b'a'..=b'f' => Some(digit - b'a' + 10),
        _ => None,
    }
}

impl fmt::Display for JobId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const DIGITS: &[u8; 16] = b"0123456789abcdef";
        let mut text = [0u8; 32];
        for (pair, byte) in text.chunks_exact_mut(2).zip(self.0) {
            pair[0] = DIGITS[usize::from(byte >> 4)];
            pair[1] = DIGITS[usize::from(byte & 0x0f)];
        }
        // Every byte written above is an ASCII hex digit.
        f.write_str(std::str::from_utf8(&text).map_err(|_| fmt::Error)?)
    }
}

impl fmt::Debug for JobId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "JobId({self})")
    }
}

/// The error of parsing a [`JobId`] from text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InvalidJobId;

impl fmt::Display for InvalidJobId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a job id is exactly 32 lowercase hexadecimal digits")
    }
}

impl std::error::Error for InvalidJobId {}

impl FromStr for JobId {
    type Err = InvalidJobId;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s).ok_or(InvalidJobId)
    }
}

/// Which asynchronous pattern a job follows, and so how its completion is rendered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum JobKind {
    /// The asynchronous interaction request pattern: completion is a `batch-response` Bundle.
    Interaction,
    /// The asynchronous bulk data request pattern: the result is written to NDJSON files, and
    /// completion is a manifest listing them.
    Bulk,
    /// The bulk pattern, kicked off with `Prefer: separate-export-status` (PREFER-13): every
    /// status response is `200` and carries the job's own status in `X-Export-Status`.
    BulkSeparateStatus,
}

impl JobKind {
    /// A stable name, for stores that keep the kind as text.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Interaction => "interaction",
            Self::Bulk => "bulk",
            Self::BulkSeparateStatus => "bulk-separate-export-status",
        }
    }

    /// Whether the job follows the bulk data pattern.
    pub const fn is_bulk(self) -> bool {
        matches!(self, Self::Bulk | Self::BulkSeparateStatus)
    }

    /// The kind named by [`as_str`](Self::as_str).
    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "interaction" => Some(Self::Interaction),
            "bulk" => Some(Self::Bulk),
            "bulk-separate-export-status" => Some(Self::BulkSeparateStatus),
            _ => None,
        }
    }
}

/// Where a job is in its life.
///
/// Transitions only go forward: `Accepted → Running → Completed | Failed`, and a cancelled job is
/// removed from the store altogether. Stores make each transition a compare-and-set, so the first
/// committed transition wins.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum JobState {
    /// Recorded, not yet started.
    Accepted,
    /// Running on the instance `instance`, which holds a lease on it until `lease_until`.
    Running {
        /// The id of the layer instance running the job.
        instance: String,
        /// When the lease lapses unless renewed.
        lease_until: SystemTime,
    },
    /// The inner service answered (whatever its status); the raw response is kept.
    Completed(StoredResponse),
    /// The layer could not finish the job (shutdown, lost instance, time limit); the response
    /// describes why, as an OperationOutcome.
    Failed(StoredResponse),
}

impl JobState {
    /// Whether the job has ended (completed or failed).
    pub const fn is_finished(&self) -> bool {
        matches!(self, Self::Completed(_) | Self::Failed(_))
    }
}

/// How a job ended, as recorded by [`Transition::Finish`](crate::store::Transition::Finish).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JobOutcome {
    /// The inner service answered.
    Completed(StoredResponse),
    /// The layer could not finish the job.
    Failed(StoredResponse),
}

impl From<JobOutcome> for JobState {
    fn from(outcome: JobOutcome) -> Self {
        match outcome {
            JobOutcome::Completed(response) => Self::Completed(response),
            JobOutcome::Failed(response) => Self::Failed(response),
        }
    }
}

/// The raw response of a finished job: status, the headers that matter, body.
///
/// The layer keeps what the inner service said, not a rendering of it, so the same record can be
/// served as a `batch-response` Bundle or in other completion modes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredResponse {
    /// The HTTP status code.
    pub status: StatusCode,
    /// The response headers worth keeping (content type, location, validators, links).
    pub headers: Vec<(HeaderName, HeaderValue)>,
    /// The whole body.
    pub body: Bytes,
}

impl StoredResponse {
    /// The first value of `name`, if present.
    pub fn header(&self, name: &HeaderName) -> Option<&HeaderValue> {
        self.headers.iter().find(|(n, _)| n == name).map(|(_, v)| v)
    }

    /// The response itself, as the synchronous call answered it (status, kept headers, body).
    pub(crate) fn into_response(self) -> http::Response<Bytes> {
        let mut response = http::Response::new(self.body);
        *response.status_mut() = self.status;
        let headers = response.headers_mut();
        for (name, value) in self.headers {
            headers.append(name, value);
        }
        response
    }
}

/// Everything a store keeps about one job.
///
/// No credentials are ever part of a record (SEC-11): the replayed request lives in memory only,
/// for the job's run.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct JobRecord {
    /// The job's id.
    pub id: JobId,
    /// The pattern it follows.
    pub kind: JobKind,
    /// Where it is in its life.
    pub state: JobState,
    /// The keyed digest of the caller identity bound to the job, when the layer is configured to
    /// bind one (see `AsyncLayerBuilder::caller_key`); never the identity itself.
    pub owner: Option<String>,
    /// The kick-off request's method.
    pub method: String,
    /// The kick-off request's path and query.
    pub target: String,
    /// The latest progress text reported for the job (feeds `X-Progress`).
    pub progress: Option<String>,
    /// When the job was accepted.
    pub created_at: SystemTime,
    /// When the job ended.
    pub finished_at: Option<SystemTime>,
    /// When the record stops being readable. `None` while the job runs.
    pub expires_at: Option<SystemTime>,
}

impl JobRecord {
    /// A record of a newly accepted job.
    pub fn new(
        id: JobId,
        kind: JobKind,
        method: impl Into<String>,
        target: impl Into<String>,
        created_at: SystemTime,
    ) -> Self {
        Self {
            id,
            kind,
            state: JobState::Accepted,
            owner: None,
            method: method.into(),
            target: target.into(),
            progress: None,
            created_at,
            finished_at: None,
            expires_at: None,
        }
    }

    /// Binds the record to a caller identity.
    pub fn with_owner(mut self, owner: Option<String>) -> Self {
        self.owner = owner;
        self
    }

    /// Whether the record has expired at `now`. Stores treat expired records as absent.
    pub fn is_expired(&self, now: SystemTime) -> bool {
        self.expires_at.is_some_and(|at| at <= now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // SEC-9: ids are 128 random bits; text form round-trips; parsing is strict.
    #[test]
    fn sec_9_ids_round_trip_and_differ() {
        let a = JobId::new();
        let b = JobId::new();
        assert_ne!(a, b);
        assert_eq!(JobId::parse(&a.to_string()), Some(a));
        assert_eq!(a.to_string().parse::<JobId>(), Ok(a));
    }

    #[test]
    fn sec_9_parse_rejects_everything_else() {
        let good = JobId::new().to_string();
        for bad in [
            "",
            "0",
            &good[..31],
            &format!("{good}0"),
            &good.to_uppercase(),
            "0123456789abcdef0123456789abcdeg",
            "0123456789abcdef0123456789abcde/",
            "..23456789abcdef0123456789abcdef",
            "0123456789abcdef0123456789abcdé",
        ] {
            assert_eq!(JobId::parse(bad), None, "{bad:?}");
        }
    }

    proptest::proptest! {
        // SEC-9: any id round-trips through its text form.
        #[test]
        fn sec_9_ids_round_trip(bytes in proptest::prelude::any::<[u8; 16]>()) {
            let id = JobId::from_bytes(bytes);
            proptest::prop_assert_eq!(JobId::parse(&id.to_string()), Some(id));
        }

        // SEC-9, STATUS-15: parsing never panics, and accepts only the canonical form.
        #[test]
        fn sec_9_parse_accepts_only_canonical_text(text in "\\PC{0,40}") {
            if let Some(id) = JobId::parse(&text) {
                proptest::prop_assert_eq!(id.to_string(), text);
            }
        }
    }
}
