//! [`MemoryStore`](super::MemoryStore)'s account of the finished results it keeps: their bytes
//! in all and their number per owner, each by the second in which they expire, so that its caps
//! are checked in constant time and a refusal can say when a place frees up.
//!
//! The account holds no entry per job (a job's share is computed again from its record when it
//! leaves), so the caps cost no memory per kept result.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, SystemTime};

use super::{FullScope, StoreError};

/// The longest `Retry-After` a refusal names. Results usually leave before they expire (clients
/// cancel what they have read), so a client is asked back within minutes, not hours.
pub(super) const MAX_RETRY_AFTER: Duration = Duration::from_secs(300);

/// The caps of a [`Ledger`].
#[derive(Debug, Clone, Copy)]
pub(super) struct Caps {
    /// Bytes of results kept in all.
    pub(super) bytes: u64,
    /// Results kept per owner.
    pub(super) per_owner: usize,
}

impl Default for Caps {
    /// 256 MiB in all and 1000 results per owner (about 40 an hour over the layer's default
    /// retention of 24 hours), as documented on `MemoryStore`.
    fn default() -> Self {
        Self {
            bytes: 256 * 1024 * 1024,
            per_owner: 1000,
        }
    }
}

/// One kept result, as entered into and removed from the account; the same job must give the
/// same values both times.
#[derive(Debug, Clone, Copy)]
pub(super) struct Kept<'a> {
    pub(super) bytes: u64,
    pub(super) expires_at: SystemTime,
    pub(super) owner: Option<&'a str>,
}

/// The results kept, expired ones included until they are removed.
#[derive(Debug, Default)]
pub(super) struct Ledger {
    bytes: u64,
    /// Bytes of kept results by the [second] by which they expire.
    expiring: BTreeMap<u64, u64>,
    owners: HashMap<Box<str>, OwnerResults>,
}

/// One owner's kept results.
#[derive(Debug, Default)]
struct OwnerResults {
    count: usize,
    /// How many expire by each [second].
    expiring: BTreeMap<u64, usize>,
}

/// Why a new job may not be recorded now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Refusal {
    scope: FullScope,
    /// The [second] by which the earliest result in `scope` expires.
    earliest: u64,
}

impl Refusal {
    /// When every result of the earliest second in scope has expired.
    fn free_at(&self) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(self.earliest)
    }

    /// Whether removing expired records could lift the refusal: the earliest results in scope
    /// have all expired at `now`.
    pub(super) fn expired_results_wait(&self, now: SystemTime) -> bool {
        self.free_at() <= now
    }

    /// The error for the kick-off: the time until the earliest results in scope have expired,
    /// in whole seconds rounded up (a client that waits exactly that long finds them expired),
    /// at least one second, at most [`MAX_RETRY_AFTER`].
    pub(super) fn into_error(self, now: SystemTime) -> StoreError {
        let wait = self.free_at().duration_since(now).unwrap_or_default();
        let wait = Duration::from_secs(wait.as_secs() + u64::from(wait.subsec_nanos() > 0));
        StoreError::Full {
            scope: self.scope,
            retry_after: wait.clamp(Duration::from_secs(1), MAX_RETRY_AFTER),
        }
    }
}

impl Ledger {
    /// The bytes of all results kept.
    pub(super) fn bytes(&self) -> u64 {
        self.bytes
    }

    /// How many results `owner` has kept.
    #[cfg(test)]
    pub(super) fn owned(&self, owner: &str) -> usize {
        self.owners.get(owner).map_or(0, |results| results.count)
    }

    /// Whether nothing is accounted for (every count back to zero).
    #[cfg(test)]
    pub(super) fn is_empty(&self) -> bool {
        self.bytes == 0 && self.expiring.is_empty() && self.owners.is_empty()
    }

    pub(super) fn keep(&mut self, kept: Kept<'_>) {
        let at = second(kept.expires_at);
        self.bytes = self.bytes.saturating_add(kept.bytes);
        *self.expiring.entry(at).or_default() += kept.bytes;
        if let Some(owner) = kept.owner {
            let results = self.owners.entry(owner.into()).or_default();
            results.count += 1;
            *results.expiring.entry(at).or_default() += 1;
        }
    }

    pub(super) fn forget(&mut self, kept: Kept<'_>) {
        let at = second(kept.expires_at);
        self.bytes = self.bytes.saturating_sub(kept.bytes);
        if let Some(bytes) = self.expiring.get_mut(&at) {
            *bytes = bytes.saturating_sub(kept.bytes);
            // Every result counts at least its record's bytes, so a second without bytes has
            // no results left.
            if *bytes == 0 {
                self.expiring.remove(&at);
            }
        }
        if let Some(owner) = kept.owner {
            if let Some(results) = self.owners.get_mut(owner) {
                results.count = results.count.saturating_sub(1);
                if let Some(count) = results.expiring.get_mut(&at) {
                    *count -= 1;
                    if *count == 0 {
                        results.expiring.remove(&at);
                    }
                }
                if results.count == 0 {
                    self.owners.remove(owner);
                }
            }
        }
    }

    /// Whether a new job of `owner` would exceed a cap: `owner`'s first (it is the more
    /// specific answer, and the owner can lift it by cancelling), then the whole store's.
    pub(super) fn refusal(&self, caps: Caps, owner: Option<&str>) -> Option<Refusal> {
        if let Some(results) = owner.and_then(|owner| self.owners.get(owner)) {
            if results.count >= caps.per_owner {
                return Some(Refusal {
                    scope: FullScope::Caller,
                    earliest: results.expiring.keys().next().copied().unwrap_or(0),
                });
            }
        }
        (self.bytes >= caps.bytes).then(|| Refusal {
            scope: FullScope::Store,
            earliest: self.expiring.keys().next().copied().unwrap_or(0),
        })
    }
}

/// The first whole second since the Unix epoch at or after `at`: results are grouped by the
/// second by which they have expired.
fn second(at: SystemTime) -> u64 {
    at.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |since| {
            since.as_secs() + u64::from(since.subsec_nanos() > 0)
        })
}
