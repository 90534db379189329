//! The layer's wall clock.

use std::time::SystemTime;

use tokio::time::Instant;

/// Wall-clock time that advances with tokio's clock.
///
/// Records carry `SystemTime`s (several instances must agree on them), but tests drive expiry
/// with paused tokio time; anchoring once and adding tokio's elapsed time serves both.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Clock {
    anchor_wall: SystemTime,
    anchor: Instant,
}

impl Clock {
    pub(crate) fn new() -> Self {
        Self {
            anchor_wall: SystemTime::now(),
            anchor: Instant::now(),
        }
    }

    pub(crate) fn now(&self) -> SystemTime {
        self.anchor_wall + self.anchor.elapsed()
    }
}

/// `now + after`, saturating far in the future instead of overflowing.
pub(crate) fn later(now: SystemTime, after: std::time::Duration) -> SystemTime {
    now.checked_add(after).unwrap_or(now)
}
