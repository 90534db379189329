//! Quotas: whether a new job may start now (KICK-8, SEC-13). A job holds its [`Admission`] for
//! its whole run; dropping it gives the places back.

use std::sync::Arc;

use dashmap::DashMap;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// The limits on jobs running in this instance.
pub(crate) struct Quotas {
    running: Option<Arc<Semaphore>>,
    max_per_caller: Option<usize>,
    per_caller: DashMap<String, usize>,
}

/// Why a kick-off was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// The instance runs as many jobs as it may.
    Busy,
    /// The caller has as many unfinished jobs as it may.
    CallerBusy,
}

/// A place for one job, given back when dropped.
pub(crate) struct Admission {
    quotas: Arc<Quotas>,
    caller: Option<String>,
    _permit: Option<OwnedSemaphorePermit>,
}

impl Quotas {
    pub(crate) fn new(max_running: Option<usize>, max_per_caller: Option<usize>) -> Arc<Self> {
        Arc::new(Self {
            running: max_running.map(|n| Arc::new(Semaphore::new(n))),
            max_per_caller,
            per_caller: DashMap::new(),
        })
    }

    /// Takes a place for a job of `caller`, or says why there is none.
    pub(crate) fn admit(self: &Arc<Self>, caller: Option<&str>) -> Result<Admission, Refusal> {
        let mut admission = Admission {
            quotas: self.clone(),
            caller: None,
            _permit: None,
        };
        if let (Some(max), Some(caller)) = (self.max_per_caller, caller) {
            let mut count = self.per_caller.entry(caller.to_owned()).or_insert(0);
            if *count >= max {
                return Err(Refusal::CallerBusy);
            }
            *count += 1;
            admission.caller = Some(caller.to_owned());
        }
        if let Some(running) = &self.running {
            // Dropping `admission` here gives the caller's place back.
            admission._permit = Some(
                running
                    .clone()
                    .try_acquire_owned()
                    .map_err(|_| Refusal::Busy)?,
            );
        }
        Ok(admission)
    }
}

impl Drop for Admission {
    fn drop(&mut self) {
        if let Some(caller) = self.caller.take() {
            if let Some(mut count) = self.quotas.per_caller.get_mut(&caller) {
                *count = count.saturating_sub(1);
            }
            self.quotas
                .per_caller
                .remove_if(&caller, |_, count| *count == 0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // KICK-8, SEC-13: places are limited per instance and per caller, and given back on drop.
    #[test]
    fn kick_8_places_are_limited_and_returned() {
        let quotas = Quotas::new(Some(2), Some(1));
        let a = quotas.admit(Some("a")).unwrap();
        assert_eq!(quotas.admit(Some("a")).err(), Some(Refusal::CallerBusy));
        let b = quotas.admit(Some("b")).unwrap();
        assert_eq!(quotas.admit(Some("c")).err(), Some(Refusal::Busy));
        assert!(
            quotas.per_caller.get("c").is_none(),
            "a refused caller keeps no count"
        );
        drop(a);
        let again = quotas.admit(Some("a")).unwrap();
        drop((again, b));
        assert!(
            quotas.per_caller.is_empty(),
            "counts are removed when they reach zero"
        );
        let anonymous = Quotas::new(None, Some(1));
        let _x = anonymous.admit(None).unwrap();
        let _y = anonymous.admit(None).unwrap();
    }
}
