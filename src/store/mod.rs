//! Where jobs live: the [`JobStore`] trait, its error, and the embedded [`MemoryStore`].
//!
//! A store keeps job records, nothing about HTTP. Every state change is a compare-and-set, so
//! when a cancel and a completion race, the first one committed wins and the other is dropped;
//! a cancelled job is never resurrected. Reads treat expired records as absent, so correctness
//! never depends on [`sweep`](JobStore::sweep) having run; sweeping only reclaims space.
//!
//! Every backend runs the same conformance suite (`conformance`, behind the `test-util`
//! feature).

#[cfg(any(test, feature = "redis", feature = "postgres"))]
mod codec;
mod dynamic;
mod memory;
#[cfg(feature = "postgres")]
mod postgres;
#[cfg(feature = "redis")]
mod redis_store;
mod retained;

#[cfg(any(test, feature = "test-util"))]
pub mod conformance;

use std::error::Error as StdError;
use std::fmt;
use std::future::Future;
use std::time::{Duration, SystemTime};

/// The redis-rs client crate that [`RedisStore`] is built on, re-exported so that a
/// [`ConnectionManager`](redis::aio::ConnectionManager) you build yourself is of the matching version.
#[cfg(feature = "redis")]
pub use ::redis;
/// The `sqlx` crate [`PostgresStore`] is built on, so that the pool you pass it comes from the
/// matching version.
#[cfg(feature = "postgres")]
pub use ::sqlx;
pub(crate) use dynamic::{Bounded, DynStore};
pub use memory::MemoryStore;
#[cfg(feature = "postgres")]
pub use postgres::PostgresStore;
#[cfg(feature = "redis")]
pub use redis_store::RedisStore;

use crate::job::{JobId, JobOutcome, JobRecord, JobState};

/// The longest idempotency key (in bytes) that every backend supports with
/// [`create_once`](JobStore::create_once); the layer refuses longer `Idempotency-Key` headers
/// before asking the store.
///
/// Keys are stored as given (they are client-chosen text, not secrets). The PostgreSQL store
/// indexes `(owner, key)`, and PostgreSQL refuses index entries over about 2.7 kB, so an owner
/// identity plus a key must stay under that; caller identities are far shorter in practice.
pub const MAX_IDEMPOTENCY_KEY_LEN: usize = 255;

/// What [`JobStore::create_once`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Created {
    /// The record was created: the work should run.
    New,
    /// The same owner already kicked off this job with the same idempotency key, and it still
    /// counts (accepted, running or completed, not expired): nothing was created, and the
    /// kick-off should answer with this job's status URL instead of running the work again.
    Existing(JobId),
}

pub use crate::BoxError;

/// Why a store operation failed.
#[derive(Debug)]
#[non_exhaustive]
pub enum StoreError {
    /// The store cannot be reached or did not answer; trying again later may work. The layer
    /// answers `503` with a `transient` OperationOutcome and `Retry-After`.
    Unavailable(BoxError),
    /// A job with this id already exists.
    Conflict(JobId),
    /// A stored record could not be decoded.
    Corrupt(String),
    /// The store keeps as many finished results as it may, for the new job's owner or in all,
    /// and refuses to record another job until some expire or are cancelled. Nothing was
    /// recorded, and no kept result was evicted to make room.
    ///
    /// The layer answers the kick-off `429` with a `throttled` OperationOutcome
    /// ([`FullScope::Caller`]) or `503` with a `transient` one ([`FullScope::Store`]), and
    /// `Retry-After: retry_after` in delta seconds. Only [`create`](JobStore::create) and
    /// [`create_once`](JobStore::create_once) return it; recording a result never does.
    Full {
        /// Whose cap was reached.
        scope: FullScope,
        /// When a place is expected to free up: when the earliest kept result in `scope`
        /// expires (a cancel may free one sooner).
        retry_after: Duration,
    },
}

/// Which cap [`StoreError::Full`] met.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum FullScope {
    /// The new job's owner (the caller the layer bound it to) already has as many finished,
    /// unexpired results kept as the store allows per caller.
    Caller,
    /// The results kept for everyone together take as many bytes as the store allows.
    Store,
}

impl fmt::Display for StoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Unavailable(source) => write!(f, "the job store is unavailable: {source}"),
            Self::Conflict(id) => write!(f, "a job with id {id} already exists"),
            Self::Corrupt(why) => write!(f, "a stored job record could not be read: {why}"),
            Self::Full {
                scope: FullScope::Caller,
                retry_after,
            } => write!(
                f,
                "the job's owner already has as many finished results kept as the store allows; cancel \
                 one of them or try again in {} s",
                retry_after.as_secs().max(1)
            ),
            Self::Full {
                scope: FullScope::Store,
                retry_after,
            } => write!(
                f,
                "the job store keeps as many result bytes as it may; try again in {} s, or raise its cap",
                retry_after.as_secs().max(1)
            ),
        }
    }
}

impl StdError for StoreError {
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        match self {
            Self::Unavailable(source) => Some(&**source),
            _ => None,
        }
    }
}

/// A place to keep jobs: the embedded [`MemoryStore`], or a shared backend for many instances.
///
/// All times are passed in by the caller, so a store never reads a clock of its own for
/// decisions; the layer's clock follows tokio's, which lets tests pause time.
///
/// Implementations must make [`start`](Self::start), [`finish`](Self::finish) and
/// [`cancel`](Self::cancel) atomic compare-and-set operations, and must treat a record whose
/// `expires_at` is at or before `now` as absent everywhere. The conformance suite
/// (feature `test-util`) checks all of this.
pub trait JobStore: Send + Sync + 'static {
    /// Records a newly accepted job. Fails with [`StoreError::Conflict`] if the id is taken, and
    /// with [`StoreError::Full`] if the store refuses new jobs because it keeps as many finished
    /// results as it may ([`MemoryStore`]'s caps); it must never evict an unexpired result to
    /// make room.
    fn create(&self, record: JobRecord) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Records a newly accepted job, unless the same owner already kicked off a job with the
    /// same idempotency `key` that still counts: then nothing is created and that job's id is
    /// returned as [`Created::Existing`].
    ///
    /// The scope is the pair `(record.owner, key)`: keys never match across owners, and a
    /// record without an owner (or one already failed, which could never count) is simply
    /// created, as by [`create`](Self::create). A job counts while it is accepted, running or
    /// completed and not expired at `now`; a cancelled (removed), failed or expired job does
    /// not, so a new job is created and the key names it from then on. Fails with
    /// [`StoreError::Conflict`] if `record.id` is taken and [`StoreError::Full`] at a cap, like
    /// `create`; a repeat that names an existing job creates nothing, so no cap applies to it.
    ///
    /// Implementations must make the check and the creation one atomic step, so that of
    /// concurrent calls with the same owner and key exactly one gets [`Created::New`] and the
    /// others name its job; and the key's mapping must not outlive its job. Keys up to
    /// [`MAX_IDEMPOTENCY_KEY_LEN`] bytes must be supported. The conformance suite checks all of
    /// this.
    ///
    /// The default implementation, for stores without support, calls `create` and always
    /// answers `New`: every kick-off then runs its work, as if no key had been sent.
    fn create_once(
        &self,
        record: JobRecord,
        key: &str,
        now: SystemTime,
    ) -> impl Future<Output = Result<Created, StoreError>> + Send {
        // Without support, the key and time are not needed: every kick-off is new.
        let _ = (key, now);
        let created = self.create(record);
        async move { created.await.map(|()| Created::New) }
    }

    /// Reads a job. Unknown, cancelled and expired (at `now`) jobs are `None`.
    fn get(
        &self,
        id: &JobId,
        now: SystemTime,
    ) -> impl Future<Output = Result<Option<JobRecord>, StoreError>> + Send;

    /// `Accepted → Running` on `instance`, holding a lease until `lease_until`.
    ///
    /// `Ok(false)` when the job is not `Accepted` any more (cancelled, or started elsewhere): the
    /// caller must then not run it.
    fn start(
        &self,
        id: &JobId,
        instance: &str,
        lease_until: SystemTime,
    ) -> impl Future<Output = Result<bool, StoreError>> + Send;

    /// `Accepted | Running → Completed | Failed`, readable until `expires_at`.
    ///
    /// `Ok(false)` when the job has already ended, was cancelled, or is unknown: the first
    /// committed transition wins.
    fn finish(
        &self,
        id: &JobId,
        outcome: JobOutcome,
        finished_at: SystemTime,
        expires_at: SystemTime,
    ) -> impl Future<Output = Result<bool, StoreError>> + Send;

    /// Cancels a job in any state: the record and its result are removed. `Ok(true)` when a job
    /// was there (not expired at `now`), `Ok(false)` otherwise.
    fn cancel(
        &self,
        id: &JobId,
        now: SystemTime,
    ) -> impl Future<Output = Result<bool, StoreError>> + Send;

    /// Takes back job `id` after its kick-off was answered with an error (the store did not
    /// answer in time): the record goes if it was created, its idempotency key with it, and a
    /// `create` or `create_once` of the same id that reaches the store later (a write delayed in
    /// a stalled connection or a pooled one) fails with [`StoreError::Conflict`] until `until`,
    /// so no job nobody knows of is left behind. Reads treat the id as absent meanwhile.
    ///
    /// The default calls [`cancel`](Self::cancel), which is enough for a store whose writes
    /// cannot arrive late; a store reached over a network must leave a marker (a tombstone)
    /// until `until`. The conformance suite checks both orders.
    fn abandon(
        &self,
        id: &JobId,
        now: SystemTime,
        until: SystemTime,
    ) -> impl Future<Output = Result<(), StoreError>> + Send {
        let _ = until;
        let cancelled = self.cancel(id, now);
        async move { cancelled.await.map(|_| ()) }
    }

    /// Records the progress text of an unfinished job. Unknown or finished jobs are left alone.
    fn set_progress(
        &self,
        id: &JobId,
        progress: &str,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Extends the leases of `ids`, running on `instance`, to `lease_until`.
    ///
    /// Returns the ids among them that are no longer running on `instance` (cancelled, finished,
    /// expired or taken over): their work should stop.
    fn renew_leases(
        &self,
        instance: &str,
        ids: &[JobId],
        lease_until: SystemTime,
    ) -> impl Future<Output = Result<Vec<JobId>, StoreError>> + Send;

    /// Fails, with `outcome` readable until `expires_at`, every job whose instance is gone: running
    /// jobs whose lease lapsed at or before `now`, and jobs still `Accepted` that were created at
    /// or before `unstarted_before` (recorded, then their instance died before starting them).
    /// Returns the ids it failed.
    fn fail_lapsed(
        &self,
        now: SystemTime,
        unstarted_before: SystemTime,
        outcome: JobOutcome,
        expires_at: SystemTime,
    ) -> impl Future<Output = Result<Vec<JobId>, StoreError>> + Send;

    /// Deletes records that expired at `now`; returns how many. Only reclaims space: reads
    /// already ignore expired records.
    fn sweep(&self, now: SystemTime) -> impl Future<Output = Result<usize, StoreError>> + Send;

    /// The ids of jobs cancelled through any instance, as they are cancelled, for stores shared
    /// by several instances (Redis pub/sub, PostgreSQL `LISTEN`). The layer then stops those
    /// jobs at once instead of at its next lease renewal. `None` (the default) when the store
    /// has no such channel; the stream may end when the connection drops, and is asked for again.
    fn cancellations(
        &self,
    ) -> impl Future<Output = Result<Option<Cancellations>, StoreError>> + Send {
        std::future::ready(Ok(None))
    }

    /// The ids of jobs whose state or progress changed through any instance (finished, failed,
    /// cancelled, progress written), announced after the change is committed, so that a long
    /// poll held by one instance wakes when the job runs on another. `None` (the default) when
    /// the store has no such channel; long polls then read the store again periodically. The
    /// stream may end when the connection drops, and is asked for again.
    fn changes(&self) -> impl Future<Output = Result<Option<Changes>, StoreError>> + Send {
        std::future::ready(Ok(None))
    }
}

/// The owner that `create_once` scopes `record`'s idempotency key to, or `None` when it must
/// simply create the record: it has no owner, or has already failed and so could never count.
fn once_owner(record: &JobRecord) -> Option<&str> {
    match record.state {
        JobState::Failed(_) => None,
        _ => record.owner.as_deref(),
    }
}

/// A stream of cancelled jobs' ids, from [`JobStore::cancellations`].
pub type Cancellations = std::pin::Pin<Box<dyn futures_core::Stream<Item = JobId> + Send>>;

/// A stream of changed jobs' ids, from [`JobStore::changes`].
pub type Changes = std::pin::Pin<Box<dyn futures_core::Stream<Item = JobId> + Send>>;
