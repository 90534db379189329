//! The object-safe twin of [`JobStore`], so the layer holds `Arc<dyn DynStore>` and carries no
//! store type parameter.

use std::future::Future;
use std::pin::Pin;
use std::time::SystemTime;

use super::{Cancellations, Changes, Created, JobStore, StoreError};
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
    fn start<'a>(
        &'a self,
        id: &'a JobId,
        instance: &'a str,
        lease_until: SystemTime,
    ) -> BoxFuture<'a, Result<bool, StoreError>>;
    fn finish<'a>(
        &'a self,
        id: &'a JobId,
        outcome: JobOutcome,
        finished_at: SystemTime,
        expires_at: SystemTime,
    ) -> BoxFuture<'a, Result<bool, StoreError>>;
    fn cancel<'a>(
        &'a self,
        id: &'a JobId,
        now: SystemTime,
    ) -> BoxFuture<'a, Result<bool, StoreError>>;
    fn sweep(&self, now: SystemTime) -> BoxFuture<'_, Result<usize, StoreError>>;
    fn set_progress<'a>(
        &'a self,
        id: &'a JobId,
        progress: &'a str,
    ) -> BoxFuture<'a, Result<(), StoreError>>;
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
    fn cancellations(&self) -> BoxFuture<'_, Result<Option<Cancellations>, StoreError>>;
    fn changes(&self) -> BoxFuture<'_, Result<Option<Changes>, StoreError>>;
}

impl<S: JobStore> DynStore for S {
    fn create(&self, record: JobRecord) -> BoxFuture<'_, Result<(), StoreError>> {
        Box::pin(JobStore::create(self, record))
    }

    fn create_once<'a>(
        &'a self,
        record: JobRecord,
        key: &'a str,
        now: SystemTime,
    ) -> BoxFuture<'a, Result<Created, StoreError>> {
        Box::pin(JobStore::create_once(self, record, key, now))
    }

    fn get<'a>(
        &'a self,
        id: &'a JobId,
        now: SystemTime,
    ) -> BoxFuture<'a, Result<Option<JobRecord>, StoreError>> {
        Box::pin(JobStore::get(self, id, now))
    }

    fn start<'a>(
        &'a self,
        id: &'a JobId,
        instance: &'a str,
        lease_until: SystemTime,
    ) -> BoxFuture<'a, Result<bool, StoreError>> {
        Box::pin(JobStore::start(self, id, instance, lease_until))
    }

    fn finish<'a>(
        &'a self,
        id: &'a JobId,
        outcome: JobOutcome,
        finished_at: SystemTime,
        expires_at: SystemTime,
    ) -> BoxFuture<'a, Result<bool, StoreError>> {
        Box::pin(JobStore::finish(self, id, outcome, finished_at, expires_at))
    }

    fn cancel<'a>(
        &'a self,
        id: &'a JobId,
        now: SystemTime,
    ) -> BoxFuture<'a, Result<bool, StoreError>> {
        Box::pin(JobStore::cancel(self, id, now))
    }

    fn sweep(&self, now: SystemTime) -> BoxFuture<'_, Result<usize, StoreError>> {
        Box::pin(JobStore::sweep(self, now))
    }

    fn set_progress<'a>(
        &'a self,
        id: &'a JobId,
        progress: &'a str,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(JobStore::set_progress(self, id, progress))
    }

    fn renew_leases<'a>(
        &'a self,
        instance: &'a str,
        ids: &'a [JobId],
        lease_until: SystemTime,
    ) -> BoxFuture<'a, Result<Vec<JobId>, StoreError>> {
        Box::pin(JobStore::renew_leases(self, instance, ids, lease_until))
    }

    fn fail_lapsed(
        &self,
        now: SystemTime,
        unstarted_before: SystemTime,
        outcome: JobOutcome,
        expires_at: SystemTime,
    ) -> BoxFuture<'_, Result<Vec<JobId>, StoreError>> {
        Box::pin(JobStore::fail_lapsed(
            self,
            now,
            unstarted_before,
            outcome,
            expires_at,
        ))
    }

    fn cancellations(&self) -> BoxFuture<'_, Result<Option<Cancellations>, StoreError>> {
        Box::pin(JobStore::cancellations(self))
    }

    fn changes(&self) -> BoxFuture<'_, Result<Option<Changes>, StoreError>> {
        Box::pin(JobStore::changes(self))
    }
}
