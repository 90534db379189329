//! The object-safe twin of [`JobStore`], so the layer holds `Arc<dyn DynStore>` and carries no
//! store type parameter.

use std::future::Future;
use std::pin::Pin;
use std::time::{Duration, SystemTime};

use super::{Changes, Created, JobStore, StoreError, Transition};
use crate::job::{JobId, JobOutcome, JobRecord};

pub(crate) type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

pub(crate) trait DynStore: Send + Sync + 'static {
    fn create(&self, record: JobRecord) -> BoxFuture<'_, Result<(), StoreError>>;
    fn create_once<'a>(
        &'a self,
        record: JobRecord,
        key: &'a str,
        now: SystemTime,
    ) -> BoxFuture<'a, Result<Created, StoreError>>;
    fn get<'a>(
        &'a self,
        id: &'a JobId,
        now: SystemTime,
    ) -> BoxFuture<'a, Result<Option<JobRecord>, StoreError>>;
    fn transition<'a>(
        &'a self,
        id: &'a JobId,
        transition: Transition<'a>,
    ) -> BoxFuture<'a, Result<bool, StoreError>>;
    fn cancel<'a>(
        &'a self,
        id: &'a JobId,
        now: SystemTime,
    ) -> BoxFuture<'a, Result<bool, StoreError>>;
    fn abandon<'a>(
        &'a self,
        id: &'a JobId,
        now: SystemTime,
        until: SystemTime,
    ) -> BoxFuture<'a, Result<(), StoreError>>;
    fn sweep(&self, now: SystemTime) -> BoxFuture<'_, Result<usize, StoreError>>;
    fn renew_leases<'a>(
        &'a self,
        instance: &'a str,
        ids: &'a [JobId],
        lease_until: SystemTime,
    ) -> BoxFuture<'a, Result<Vec<JobId>, StoreError>>;
    fn fail_lapsed(
        &self,
        now: SystemTime,
        unstarted_before: SystemTime,
        outcome: JobOutcome,
        expires_at: SystemTime,
    ) -> BoxFuture<'_, Result<Vec<JobId>, StoreError>>;
    fn changes(&self) -> BoxFuture<'_, Result<Option<Changes>, StoreError>>;
}

/// The transitions by name, for the layer's code.
impl dyn DynStore {
    /// [`Transition::Start`].
    pub(crate) fn start<'a>(
        &'a self,
        id: &'a JobId,
        instance: &'a str,
        lease_until: SystemTime,
    ) -> BoxFuture<'a, Result<bool, StoreError>> {
        self.transition(
            id,
            Transition::Start {
                instance,
                lease_until,
            },
        )
    }

    /// [`Transition::Finish`].
    pub(crate) fn finish<'a>(
        &'a self,
        id: &'a JobId,
        outcome: JobOutcome,
        finished_at: SystemTime,
        expires_at: SystemTime,
    ) -> BoxFuture<'a, Result<bool, StoreError>> {
        self.transition(
            id,
            Transition::Finish {
                outcome,
                finished_at,
                expires_at,
            },
        )
    }

    /// [`Transition::Progress`]; whether it was written does not matter to the layer.
    pub(crate) fn set_progress<'a>(
        &'a self,
        id: &'a JobId,
        progress: &'a str,
    ) -> BoxFuture<'a, Result<bool, StoreError>> {
        self.transition(id, Transition::Progress(progress))
    }
}

/// A store whose every operation ends within `limit`: a stalled store answers
/// [`StoreError::Unavailable`] after the deadline instead of holding the request (the layer's
/// `store_timeout`). The operation's future is dropped then; a write it sent may still land,
/// which is why a failed kick-off is taken back with [`JobStore::abandon`].
pub(crate) struct Bounded<S> {
    pub(crate) store: S,
    pub(crate) limit: Duration,
}

/// `operation`, or `Unavailable` once `limit` has passed.
fn within<'a, T: 'a>(
    limit: Duration,
    operation: impl Future<Output = Result<T, StoreError>> + Send + 'a,
) -> BoxFuture<'a, Result<T, StoreError>> {
    Box::pin(async move {
        match tokio::time::timeout(limit, operation).await {
            Ok(result) => result,
            Err(_) => Err(StoreError::Unavailable(
                format!(
                    "the job store did not answer within {} (store_timeout)",
                    humantime::format_duration(limit)
                )
                .into(),
            )),
        }
    })
}

impl<S: JobStore> DynStore for Bounded<S> {
    fn create(&self, record: JobRecord) -> BoxFuture<'_, Result<(), StoreError>> {
        within(self.limit, JobStore::create(&self.store, record))
    }

    fn create_once<'a>(
        &'a self,
        record: JobRecord,
        key: &'a str,
        now: SystemTime,
    ) -> BoxFuture<'a, Result<Created, StoreError>> {
        within(
            self.limit,
            JobStore::create_once(&self.store, record, key, now),
        )
    }

    fn get<'a>(
        &'a self,
        id: &'a JobId,
        now: SystemTime,
    ) -> BoxFuture<'a, Result<Option<JobRecord>, StoreError>> {
        within(self.limit, JobStore::get(&self.store, id, now))
    }

    fn transition<'a>(
        &'a self,
        id: &'a JobId,
        transition: Transition<'a>,
    ) -> BoxFuture<'a, Result<bool, StoreError>> {
        within(
            self.limit,
            JobStore::transition(&self.store, id, transition),
        )
    }

    fn cancel<'a>(
        &'a self,
        id: &'a JobId,
        now: SystemTime,
    ) -> BoxFuture<'a, Result<bool, StoreError>> {
        within(self.limit, JobStore::cancel(&self.store, id, now))
    }

    fn abandon<'a>(
        &'a self,
        id: &'a JobId,
        now: SystemTime,
        until: SystemTime,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        within(self.limit, JobStore::abandon(&self.store, id, now, until))
    }

    fn sweep(&self, now: SystemTime) -> BoxFuture<'_, Result<usize, StoreError>> {
        within(self.limit, JobStore::sweep(&self.store, now))
    }

    fn renew_leases<'a>(
        &'a self,
        instance: &'a str,
        ids: &'a [JobId],
        lease_until: SystemTime,
    ) -> BoxFuture<'a, Result<Vec<JobId>, StoreError>> {
        within(
            self.limit,
            JobStore::renew_leases(&self.store, instance, ids, lease_until),
        )
    }

    fn fail_lapsed(
        &self,
        now: SystemTime,
        unstarted_before: SystemTime,
        outcome: JobOutcome,
        expires_at: SystemTime,
    ) -> BoxFuture<'_, Result<Vec<JobId>, StoreError>> {
        within(
            self.limit,
            JobStore::fail_lapsed(&self.store, now, unstarted_before, outcome, expires_at),
        )
    }

    fn changes(&self) -> BoxFuture<'_, Result<Option<Changes>, StoreError>> {
        within(self.limit, JobStore::changes(&self.store))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::MemoryStore;
    use crate::store::DelegateStore;

    /// A store whose reads never answer: a stalled server.
    struct Stalled(MemoryStore);

    impl DelegateStore for Stalled {
        type Inner = MemoryStore;

        fn inner(&self) -> &MemoryStore {
            &self.0
        }

        async fn get(&self, _: &JobId, _: SystemTime) -> Result<Option<JobRecord>, StoreError> {
            std::future::pending().await
        }
    }

    // Issue #11 item 3: a stalled store answers `Unavailable` at the configured deadline — not
    // before, not later — naming the setting; a store that answers is not affected.
    #[tokio::test(start_paused = true)]
    async fn a_stalled_operation_ends_at_the_store_timeout() {
        let limit = Duration::from_millis(300);
        let store = Bounded {
            store: Stalled(MemoryStore::default()),
            limit,
        };
        let started = tokio::time::Instant::now();
        let error = DynStore::get(&store, &JobId::new(), SystemTime::now())
            .await
            .expect_err("a stalled read must fail");
        assert_eq!(
            started.elapsed(),
            limit,
            "paused time: exactly the deadline"
        );
        assert!(matches!(error, StoreError::Unavailable(_)), "{error}");
        assert!(error.to_string().contains("store_timeout"), "{error}");
        assert!(error.to_string().contains("300ms"), "{error}");

        let started = tokio::time::Instant::now();
        let answered = DynStore::cancel(&store, &JobId::new(), SystemTime::now()).await;
        assert!(matches!(answered, Ok(false)), "{answered:?}");
        assert!(
            started.elapsed().is_zero(),
            "an answering store is not delayed"
        );
    }
}
