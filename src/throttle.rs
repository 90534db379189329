//! Poll throttling: a job's status polled faster than the minimum interval gets `429` with the
//! time left to wait (STATUS-6, STATUS-7). The job itself is never abandoned.

use std::time::Duration;

use dashmap::DashMap;
use tokio::time::Instant;

use crate::job::JobId;

/// When the last poll map is this large, entries older than the interval are dropped.
const PRUNE_AT: usize = 100_000;

pub(crate) struct PollThrottle {
    interval: Duration,
    last: DashMap<JobId, Instant>,
}

impl PollThrottle {
    pub(crate) fn new(interval: Duration) -> Self {
        Self {
            interval,
            last: DashMap::new(),
        }
    }

    /// Counts a poll of `id`: `Err(wait)` when it came sooner than the interval allows.
    pub(crate) fn check(&self, id: JobId) -> Result<(), Duration> {
        let now = Instant::now();
        if self.last.len() >= PRUNE_AT {
            self.prune(now);
        }
        let mut last = self.last.entry(id).or_insert(now - self.interval);
        let since = now.duration_since(*last);
        if since < self.interval {
            return Err(self.interval - since);
        }
        *last = now;
        Ok(())
    }

    /// Forgets a job (cancelled).
    pub(crate) fn forget(&self, id: &JobId) {
        self.last.remove(id);
    }

    /// Drops entries whose interval has passed: they would allow the next poll anyway.
    pub(crate) fn prune(&self, now: Instant) {
        self.last
            .retain(|_, last| now.duration_since(*last) < self.interval);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // STATUS-6: polls inside the interval are refused with the time left; later ones pass.
    #[tokio::test(start_paused = true)]
    async fn status_6_polls_faster_than_the_interval_are_refused() {
        let throttle = PollThrottle::new(Duration::from_secs(2));
        let id = JobId::new();
        assert_eq!(throttle.check(id), Ok(()));
        tokio::time::advance(Duration::from_millis(500)).await;
        assert_eq!(throttle.check(id), Err(Duration::from_millis(1500)));
        assert_eq!(
            throttle.check(JobId::new()),
            Ok(()),
            "other jobs are counted apart"
        );
        tokio::time::advance(Duration::from_millis(1500)).await;
        assert_eq!(throttle.check(id), Ok(()));
        tokio::time::advance(Duration::from_secs(5)).await;
        throttle.prune(Instant::now());
        assert!(throttle.last.is_empty());
    }
}
