//! Caller digests: where jobs are bound to their callers (SEC-10), the layer keeps and logs only
//! an HMAC-SHA-256 of each caller identity under a per-deployment key, never the identity itself.
//!
//! A caller function may well return something secret (a bearer token, an e-mail address, a
//! certificate subject); the digest is what reaches the job store (the `owner` of a record, the
//! names of idempotency keys), the audit trail and the quotas. It is computed once, where the
//! identity is taken from the request, so nothing downstream ever sees the raw value. Keyed, so
//! that someone who reads the store or the logs cannot test guesses of likely identities.
//!
//! The digest is the 64 lowercase hex digits of `HMAC-SHA-256(key, identity)`;
//! [`caller_digest`] computes it outside the layer, e.g. to find one caller's lines in the audit
//! trail.

use std::fmt;
use std::fmt::Write as _;

use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;

/// The shortest key accepted: a shorter one could be guessed, and with it every digest undone.
pub(crate) const MIN_KEY_LEN: usize = 16;

/// The HMAC key caller identities are digested with: set per deployment, or random per layer.
#[derive(Clone)]
pub(crate) struct CallerKey {
    /// The HMAC state with the key already absorbed; cloned for each digest.
    mac: Hmac<Sha256>,
}

impl CallerKey {
    /// A key of the given bytes; `None` when it is shorter than [`MIN_KEY_LEN`].
    pub(crate) fn new(key: &[u8]) -> Option<Self> {
        if key.len() < MIN_KEY_LEN {
            return None;
        }
        // HMAC takes a key of any length, so this cannot fail.
        let mac = <Hmac<Sha256> as KeyInit>::new_from_slice(key).ok()?;
        Some(Self { mac })
    }

    /// A key of 32 bytes from the operating system's CSPRNG: right for one instance only, since
    /// another instance's random key gives the same caller another digest.
    pub(crate) fn random() -> Self {
        let mut bytes = [0u8; 32];
        getrandom::fill(&mut bytes).expect("the operating system's random number generator failed");
        Self::new(&bytes).expect("32 bytes is a long enough key")
    }

    /// The digest of `caller`: 64 lowercase hex digits.
    pub(crate) fn digest(&self, caller: &str) -> String {
        let mut mac = self.mac.clone();
        mac.update(caller.as_bytes());
        let tag = mac.finalize().into_bytes();
        let mut hex = String::with_capacity(tag.len() * 2);
        for byte in tag.iter() {
            // Writing to a String cannot fail.
            let _ = write!(hex, "{byte:02x}");
        }
        hex
    }
}

impl fmt::Debug for CallerKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never the key.
        f.write_str("CallerKey(..)")
    }
}

/// The digest under which a layer configured with
/// [`caller_key(key)`](crate::AsyncLayerBuilder::caller_key) stores and logs `caller`: the
/// `owner` of its jobs, and the `caller` field of its audit events. For operators matching a
/// known caller to the audit trail or the store; the layer computes it itself.
///
/// Returns `None` when `key` is shorter than 16 bytes, which the builder refuses too.
///
/// ```
/// let key = b"a per-deployment secret of 32 b.";
/// let digest = tower_fhir_async::caller_digest(key, "client-42").expect("a long enough key");
/// assert_eq!(digest.len(), 64);
/// assert!(!digest.contains("client-42"));
/// ```
pub fn caller_digest(key: &[u8], caller: &str) -> Option<String> {
    CallerKey::new(key).map(|key| key.digest(caller))
}

#[cfg(test)]
mod tests {
    use super::*;

    // SEC-10, SEC-11: the digest is the standard HMAC-SHA-256, as lowercase hex: RFC 4231 test
    // case 1 (key 0x0b × 20, data "Hi There").
    #[test]
    fn sec_11_digest_is_hmac_sha256_in_lowercase_hex() {
        let key = CallerKey::new(&[0x0b; 20]).unwrap();
        assert_eq!(
            key.digest("Hi There"),
            "b0344c61d8db38535ca8afceaf0bf12b881dc200c9833da726e9376c2e32cff7"
        );
    }

    // SEC-10: one key gives one caller one digest, and different callers different digests;
    // another key gives the same caller another digest, and the digest never holds the caller.
    #[test]
    fn sec_10_digests_are_stable_per_key_and_differ_across_keys() {
        let key = CallerKey::new(b"0123456789abcdef").unwrap();
        let again = CallerKey::new(b"0123456789abcdef").unwrap();
        let other = CallerKey::new(b"0123456789abcdeF").unwrap();
        let alice = key.digest("Bearer alice-secret");
        assert_eq!(alice, again.digest("Bearer alice-secret"));
        assert_ne!(alice, key.digest("Bearer alice-secreT"));
        assert_ne!(alice, other.digest("Bearer alice-secret"));
        assert_eq!(alice.len(), 64);
        assert!(
            alice
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        );
        assert!(!alice.contains("alice"));
        assert_ne!(
            CallerKey::random().digest("alice"),
            CallerKey::random().digest("alice"),
            "random keys differ"
        );
    }

    // A key shorter than 16 bytes is refused; the key never shows in debug output.
    #[test]
    fn short_keys_are_refused_and_keys_never_printed() {
        assert!(CallerKey::new(b"").is_none());
        assert!(CallerKey::new(&[7; MIN_KEY_LEN - 1]).is_none());
        assert!(caller_digest(b"short", "alice").is_none());
        let key = CallerKey::new(b"do-not-print-me-ever").unwrap();
        assert_eq!(format!("{key:?}"), "CallerKey(..)");
        assert_eq!(
            caller_digest(b"do-not-print-me-ever", "alice"),
            Some(key.digest("alice"))
        );
    }
}
