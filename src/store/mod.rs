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
#[cfg(feature = "redis-cluster")]
mod redis_cluster;
#[cfg(feature = "redis")]
mod redis_core;
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
#[cfg(feature = "redis-cluster")]
pub use redis_cluster::RedisClusterStore;
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
/// The core is five operations — [`create`](Self::create), [`get`](Self::get),
/// [`transition`](Self::transition), [`cancel`](Self::cancel) and [`sweep`](Self::sweep) — and
/// everything else has a default: idempotency keys ([`create_once`](Self::create_once)), late
/// writes ([`abandon`](Self::abandon)), the one push feed ([`changes`](Self::changes)) and the
/// leases that let several instances share the store ([`renew_leases`](Self::renew_leases),
/// [`fail_lapsed`](Self::fail_lapsed)). A store that keeps the lease defaults serves one
/// instance.
///
/// All times are passed in by the caller, so a store never reads a clock of its own for
/// decisions; the layer's clock follows tokio's, which lets tests pause time.
///
/// Implementations must make [`transition`](Self::transition) and [`cancel`](Self::cancel)
/// atomic compare-and-set operations, and must treat a record whose `expires_at` is at or
/// before `now` as absent everywhere. The conformance suite (`store_conformance_tests!`,
/// feature `test-util`) checks all of this.
///
/// To change one operation of an existing store (count it, delay it, fail it), implement
/// [`DelegateStore`] instead: every operation you do not write is passed on.
pub trait JobStore: Send + Sync + 'static {
    /// Records a newly accepted job, in the state its record has. The layer creates its jobs
    /// [`Running`](JobState::Running) on their instance, under a lease (accepted and started in
    /// one write), so the record must be indexed for [`renew_leases`](Self::renew_leases) and
    /// [`fail_lapsed`](Self::fail_lapsed) as a started one is; an
    /// [`Accepted`](JobState::Accepted) record is started later with [`Transition::Start`].
    /// Fails with [`StoreError::Conflict`] if the id is taken, and
    /// with [`StoreError::Full`] if the store refuses new jobs because it keeps as many finished
    /// results as it may ([`MemoryStore`]'s caps); it must never evict an unexpired result to
    /// make room.
    fn create(&self, record: JobRecord) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Reads a job. Unknown, cancelled and expired (at `now`) jobs are `None`.
    fn get(
        &self,
        id: &JobId,
        now: SystemTime,
    ) -> impl Future<Output = Result<Option<JobRecord>, StoreError>> + Send;

    /// Applies `transition` to job `id` if the job is in a state it applies to, as one atomic
    /// compare-and-set; `Ok(false)` when it is not (the job was cancelled, has already ended,
    /// was started elsewhere, or is unknown), and then nothing changed:
    ///
    /// - [`Transition::Start`]: `Accepted → Running` on an instance, holding a lease. `false`
    ///   means the caller must not run the job.
    /// - [`Transition::Finish`]: `Accepted | Running → Completed | Failed`, readable until its
    ///   `expires_at`. The first committed end wins; later ones are dropped.
    /// - [`Transition::Progress`]: the progress text of an unfinished job (the state stays).
    ///   `false` also when the text is the one already recorded.
    fn transition(
        &self,
        id: &JobId,
        transition: Transition<'_>,
    ) -> impl Future<Output = Result<bool, StoreError>> + Send;

    /// Cancels a job in any state: the record and its result are removed. `Ok(true)` when a job
    /// was there (not expired at `now`), `Ok(false)` otherwise.
    fn cancel(
        &self,
        id: &JobId,
        now: SystemTime,
    ) -> impl Future<Output = Result<bool, StoreError>> + Send;

    /// Deletes records that expired at `now`; returns how many. Only reclaims space: reads
    /// already ignore expired records.
    fn sweep(&self, now: SystemTime) -> impl Future<Output = Result<usize, StoreError>> + Send;

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

    /// The jobs that change through any handle on this store, announced after each change is
    /// committed: [`Change::Cancelled`] for a cancel, [`Change::Updated`] for an end or new
    /// progress. The layer stops a job cancelled through another instance at once (instead of
    /// at its next lease renewal), and wakes the long polls it holds for a job running
    /// elsewhere.
    ///
    /// `None` (the default) when the store has no such feed: the layer then learns of changes
    /// by reading the store. The stream may end when its connection drops; it is asked for
    /// again. Announcements may be lost (a dropped connection), never invented.
    fn changes(&self) -> impl Future<Output = Result<Option<Changes>, StoreError>> + Send {
        std::future::ready(Ok(None))
    }

    /// Extends the leases of `ids`, running on `instance`, to `lease_until`, and returns those
    /// among them that are no longer running on `instance` (cancelled, finished, expired or
    /// taken over): their work should stop.
    ///
    /// The default, for a store that serves one instance, renews nothing and reports nothing:
    /// that instance learns of its jobs' cancels directly.
    fn renew_leases(
        &self,
        instance: &str,
        ids: &[JobId],
        lease_until: SystemTime,
    ) -> impl Future<Output = Result<Vec<JobId>, StoreError>> + Send {
        let _ = (instance, ids, lease_until);
        std::future::ready(Ok(Vec::new()))
    }

    /// Fails, with `outcome` readable until `expires_at`, every job whose instance is gone:
    /// running jobs whose lease lapsed at or before `now`, and jobs still `Accepted` that were
    /// created at or before `unstarted_before` (recorded, then their instance died before
    /// starting them). Returns the ids it failed.
    ///
    /// The default, for a store that serves one instance (and is gone with it), fails nothing.
    fn fail_lapsed(
        &self,
        now: SystemTime,
        unstarted_before: SystemTime,
        outcome: JobOutcome,
        expires_at: SystemTime,
    ) -> impl Future<Output = Result<Vec<JobId>, StoreError>> + Send {
        let _ = (now, unstarted_before, outcome, expires_at);
        std::future::ready(Ok(Vec::new()))
    }
}

/// A state change [`JobStore::transition`] applies as one compare-and-set.
#[derive(Debug, Clone, PartialEq)]
pub enum Transition<'a> {
    /// `Accepted → Running` on `instance`, which holds a lease on the job until `lease_until`.
    Start {
        /// The instance that runs the job.
        instance: &'a str,
        /// Until when the instance's lease holds, unless renewed.
        lease_until: SystemTime,
    },
    /// `Accepted | Running → Completed | Failed`.
    Finish {
        /// The result.
        outcome: JobOutcome,
        /// When the job ended.
        finished_at: SystemTime,
        /// Until when the result is readable.
        expires_at: SystemTime,
    },
    /// New progress text of an unfinished job.
    Progress(&'a str),
}

/// One announcement of [`JobStore::changes`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Change {
    /// The job was cancelled: its record is gone.
    Cancelled(JobId),
    /// The job ended (completed or failed) or its progress changed.
    Updated(JobId),
}

impl Change {
    /// The job that changed.
    #[must_use]
    pub fn id(&self) -> JobId {
        match *self {
            Self::Cancelled(id) | Self::Updated(id) => id,
        }
    }
}

/// A store wrapping another, passing on every operation it does not write itself: implement
/// this instead of [`JobStore`] to change one operation (count it, delay it, fail it) and keep
/// the rest. Every `DelegateStore` is a `JobStore`.
///
/// ```
/// use std::sync::atomic::{AtomicUsize, Ordering};
/// use std::time::SystemTime;
///
/// use tower_fhir_async::store::DelegateStore;
/// use tower_fhir_async::{JobId, JobRecord, JobStore, MemoryStore, StoreError};
///
/// /// Counts reads; everything else is the inner store's.
/// struct CountedReads {
///     inner: MemoryStore,
///     reads: AtomicUsize,
/// }
///
/// impl DelegateStore for CountedReads {
///     type Inner = MemoryStore;
///
///     fn inner(&self) -> &MemoryStore {
///         &self.inner
///     }
///
///     async fn get(&self, id: &JobId, now: SystemTime) -> Result<Option<JobRecord>, StoreError> {
///         self.reads.fetch_add(1, Ordering::Relaxed);
///         self.inner.get(id, now).await
///     }
/// }
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// let store = CountedReads { inner: MemoryStore::new(), reads: AtomicUsize::new(0) };
/// let found = JobStore::get(&store, &JobId::new(), SystemTime::now()).await;
/// assert!(matches!(found, Ok(None)));
/// assert_eq!(store.reads.load(Ordering::Relaxed), 1);
/// # }
/// ```
pub trait DelegateStore: Send + Sync + 'static {
    /// The store the operations go to.
    type Inner: JobStore;

    /// The wrapped store.
    fn inner(&self) -> &Self::Inner;

    /// [`JobStore::create`]; by default the inner store's.
    fn create(&self, record: JobRecord) -> impl Future<Output = Result<(), StoreError>> + Send {
        self.inner().create(record)
    }

    /// [`JobStore::get`]; by default the inner store's.
    fn get(
        &self,
        id: &JobId,
        now: SystemTime,
    ) -> impl Future<Output = Result<Option<JobRecord>, StoreError>> + Send {
        self.inner().get(id, now)
    }

    /// [`JobStore::transition`]; by default the inner store's.
    fn transition(
        &self,
        id: &JobId,
        transition: Transition<'_>,
    ) -> impl Future<Output = Result<bool, StoreError>> + Send {
        self.inner().transition(id, transition)
    }

    /// [`JobStore::cancel`]; by default the inner store's.
    fn cancel(
        &self,
        id: &JobId,
        now: SystemTime,
    ) -> impl Future<Output = Result<bool, StoreError>> + Send {
        self.inner().cancel(id, now)
    }

    /// [`JobStore::sweep`]; by default the inner store's.
    fn sweep(&self, now: SystemTime) -> impl Future<Output = Result<usize, StoreError>> + Send {
        self.inner().sweep(now)
    }

    /// [`JobStore::create_once`]; by default the inner store's.
    fn create_once(
        &self,
        record: JobRecord,
        key: &str,
        now: SystemTime,
    ) -> impl Future<Output = Result<Created, StoreError>> + Send {
        self.inner().create_once(record, key, now)
    }

    /// [`JobStore::abandon`]; by default the inner store's.
    fn abandon(
        &self,
        id: &JobId,
        now: SystemTime,
        until: SystemTime,
    ) -> impl Future<Output = Result<(), StoreError>> + Send {
        self.inner().abandon(id, now, until)
    }

    /// [`JobStore::changes`]; by default the inner store's.
    fn changes(&self) -> impl Future<Output = Result<Option<Changes>, StoreError>> + Send {
        self.inner().changes()
    }

    /// [`JobStore::renew_leases`]; by default the inner store's.
    fn renew_leases(
        &self,
        instance: &str,
        ids: &[JobId],
        lease_until: SystemTime,
    ) -> impl Future<Output = Result<Vec<JobId>, StoreError>> + Send {
        self.inner().renew_leases(instance, ids, lease_until)
    }

    /// [`JobStore::fail_lapsed`]; by default the inner store's.
    fn fail_lapsed(
        &self,
        now: SystemTime,
        unstarted_before: SystemTime,
        outcome: JobOutcome,
        expires_at: SystemTime,
    ) -> impl Future<Output = Result<Vec<JobId>, StoreError>> + Send {
        self.inner()
            .fail_lapsed(now, unstarted_before, outcome, expires_at)
    }
}

impl<D: DelegateStore> JobStore for D {
    fn create(&self, record: JobRecord) -> impl Future<Output = Result<(), StoreError>> + Send {
        DelegateStore::create(self, record)
    }

    fn get(
        &self,
        id: &JobId,
        now: SystemTime,
    ) -> impl Future<Output = Result<Option<JobRecord>, StoreError>> + Send {
        DelegateStore::get(self, id, now)
    }

    fn transition(
        &self,
        id: &JobId,
        transition: Transition<'_>,
    ) -> impl Future<Output = Result<bool, StoreError>> + Send {
        DelegateStore::transition(self, id, transition)
    }

    fn cancel(
        &self,
        id: &JobId,
        now: SystemTime,
    ) -> impl Future<Output = Result<bool, StoreError>> + Send {
        DelegateStore::cancel(self, id, now)
    }

    fn sweep(&self, now: SystemTime) -> impl Future<Output = Result<usize, StoreError>> + Send {
        DelegateStore::sweep(self, now)
    }

    fn create_once(
        &self,
        record: JobRecord,
        key: &str,
        now: SystemTime,
    ) -> impl Future<Output = Result<Created, StoreError>> + Send {
        DelegateStore::create_once(self, record, key, now)
    }

    fn abandon(
        &self,
        id: &JobId,
        now: SystemTime,
        until: SystemTime,
    ) -> impl Future<Output = Result<(), StoreError>> + Send {
        DelegateStore::abandon(self, id, now, until)
    }

    fn changes(&self) -> impl Future<Output = Result<Option<Changes>, StoreError>> + Send {
        DelegateStore::changes(self)
    }

    fn renew_leases(
        &self,
        instance: &str,
        ids: &[JobId],
        lease_until: SystemTime,
    ) -> impl Future<Output = Result<Vec<JobId>, StoreError>> + Send {
        DelegateStore::renew_leases(self, instance, ids, lease_until)
    }

    fn fail_lapsed(
        &self,
        now: SystemTime,
        unstarted_before: SystemTime,
        outcome: JobOutcome,
        expires_at: SystemTime,
    ) -> impl Future<Output = Result<Vec<JobId>, StoreError>> + Send {
        DelegateStore::fail_lapsed(self, now, unstarted_before, outcome, expires_at)
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

/// The stream of [`JobStore::changes`].
pub type Changes = std::pin::Pin<Box<dyn futures_core::Stream<Item = Change> + Send>>;
