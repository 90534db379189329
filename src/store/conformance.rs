//! The conformance suite every [`JobStore`] must pass (feature `test-util`).
//!
//! [`store_conformance_tests!`](crate::store_conformance_tests) generates one `#[tokio::test]`
//! per case for a [`Fixture`]: a way to get a store for one case, another handle on the same
//! jobs (as a second instance sees them, on a connection of its own), and clean-up. Every
//! backend of this crate runs it the same way; so can yours:
//!
//! ```
//! use tower_fhir_async::MemoryStore;
//! use tower_fhir_async::store::conformance::Fixture;
//!
//! struct Memory;
//!
//! impl Fixture for Memory {
//!     type Store = MemoryStore;
//!
//!     async fn store(&self) -> MemoryStore {
//!         MemoryStore::new()
//!     }
//!
//!     // Clones share their jobs, as instances in one process would.
//!     async fn handle(&self, store: &MemoryStore) -> MemoryStore {
//!         store.clone()
//!     }
//! }
//!
//! // In a test file: one test per case, named after the requirement it proves.
//! tower_fhir_async::store_conformance_tests!(Memory);
//! # fn main() {}
//! ```
//!
//! The generated tests use `#[tokio::test(flavor = "multi_thread")]`, so the test crate needs
//! `tokio` with the `macros` and `rt-multi-thread` features. Cases use fresh random ids and
//! times of their own; the cases that race run their contenders through several handles.

#![allow(clippy::missing_panics_doc)]

use std::future::Future;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use futures_util::{FutureExt, StreamExt};
use http::{HeaderName, HeaderValue, StatusCode};

use super::{Change, Changes, Created, JobStore, MAX_IDEMPOTENCY_KEY_LEN, StoreError, Transition};
use crate::job::{JobId, JobKind, JobOutcome, JobRecord, JobState, StoredResponse};

const SECOND: Duration = Duration::from_secs(1);

/// How long a case waits for an announcement that should come at once.
const FEED_WAIT: Duration = Duration::from_secs(10);

/// What the suite needs of a backend: stores, handles on them, clean-up.
pub trait Fixture: Send + Sync + 'static {
    /// The store under test.
    type Store: JobStore;

    /// A store for one case. It may hold other cases' jobs (cases use ids of their own), but
    /// a store of its own (a fresh table or key prefix) makes failures easier to read.
    fn store(&self) -> impl Future<Output = Self::Store> + Send;

    /// Another handle on the jobs of `store`, as another instance would hold: for a backend
    /// reached over a network, its own connection. Races and feeds run across handles.
    fn handle(&self, store: &Self::Store) -> impl Future<Output = Self::Store> + Send;

    /// Whether the store announces changes ([`JobStore::changes`] gives a stream). The feed
    /// cases check that it does, or, when this is `false`, that it says it does not.
    fn has_changes(&self) -> bool {
        true
    }

    /// Removes what a case left in `store`; runs after every case, passed or failed.
    fn clean_up(&self, store: Self::Store) -> impl Future<Output = ()> + Send {
        let _ = store;
        std::future::ready(())
    }
}

/// Shorthands for [`JobStore::transition`], for tests of stores.
pub trait Transitions: JobStore {
    /// [`Transition::Start`].
    fn start(
        &self,
        id: &JobId,
        instance: &str,
        lease_until: SystemTime,
    ) -> impl Future<Output = Result<bool, StoreError>> + Send {
        self.transition(
            id,
            Transition::Start {
                instance,
                lease_until,
            },
        )
    }

    /// [`Transition::Finish`].
    fn finish(
        &self,
        id: &JobId,
        outcome: JobOutcome,
        finished_at: SystemTime,
        expires_at: SystemTime,
    ) -> impl Future<Output = Result<bool, StoreError>> + Send {
        self.transition(
            id,
            Transition::Finish {
                outcome,
                finished_at,
                expires_at,
            },
        )
    }

    /// [`Transition::Progress`].
    fn set_progress(
        &self,
        id: &JobId,
        progress: &str,
    ) -> impl Future<Output = Result<bool, StoreError>> + Send {
        self.transition(id, Transition::Progress(progress))
    }
}

impl<S: JobStore> Transitions for S {}

/// Generates one `#[tokio::test]` per conformance case for a [`Fixture`]
/// (`tower_fhir_async::store::conformance::Fixture`), named after the requirement the case
/// proves. Each test gets a store from the fixture, runs the case, and cleans up whether the
/// case passed or not. See the [`conformance`](crate::store::conformance) module.
#[macro_export]
macro_rules! store_conformance_tests {
    ($fixture:expr $(,)?) => {
        $crate::__store_conformance_cases! { $fixture;
            design_create_then_get_returns_the_record
            design_create_rejects_a_taken_id
            status_15_cancel_7_unknown_ids_are_absent
            design_start_moves_accepted_to_running_once
            status_14_finish_first_transition_wins
            design_finish_from_accepted_is_allowed
            cancel_3_cancel_6_cancel_removes_the_job_and_blocks_later_transitions
            cancel_5_cancel_after_finish_removes_the_result
            expire_3_expired_records_are_absent_before_any_sweep
            expire_1_sweep_removes_only_expired_records
            status_4_progress_is_kept_until_the_job_ends
            design_renew_leases_reports_jobs_that_stopped_running_here
            design_fail_lapsed_fails_only_lapsed_running_jobs
            design_jobs_created_running_are_leased_like_started_ones
            status_14_stored_responses_round_trip_exactly
            kick_9_create_once_returns_the_existing_job_for_a_repeated_key
            kick_9_create_once_never_matches_across_owners
            kick_9_create_once_without_an_owner_always_creates
            kick_9_create_once_after_cancel_creates_a_new_job
            kick_9_create_once_after_failure_creates_a_new_job
            kick_9_create_once_returns_a_completed_job_until_it_expires
            kick_9_create_once_has_one_winner_among_concurrent_kick_offs
            kick_9_create_once_supports_the_longest_key
            kick_9_create_once_rejects_a_taken_id
            kick_9_abandon_removes_the_job_and_blocks_a_late_create
            kick_9_abandon_before_create_blocks_the_create
            kick_9_abandon_frees_the_idempotency_key
            cancel_3_changes_announce_a_cancel_to_every_handle
            status_4_changes_announce_ends_and_progress_to_every_handle
            status_14_cancel_6_transitions_racing_across_handles_have_one_winner
            kick_9_create_once_racing_across_handles_has_one_winner
        }
    };
}

#[doc(hidden)]
#[macro_export]
macro_rules! __store_conformance_cases {
    ($fixture:expr; $($case:ident)*) => {$(
        #[::tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $case() {
            $crate::store::conformance::__run(
                &$fixture,
                |fixture, store| ::std::boxed::Box::pin(
                    $crate::store::conformance::$case(fixture, store)
                ),
            )
            .await;
        }
    )*};
}

/// Runs one case on a store from `fixture`, cleans up, and fails as the case did.
#[doc(hidden)]
pub async fn __run<F: Fixture>(
    fixture: &F,
    case: impl for<'a> FnOnce(
        &'a F,
        &'a F::Store,
    ) -> std::pin::Pin<Box<dyn Future<Output = ()> + Send + 'a>>,
) {
    let store = fixture.store().await;
    let outcome = std::panic::AssertUnwindSafe(case(fixture, &store))
        .catch_unwind()
        .await;
    fixture.clean_up(store).await;
    if let Err(panic) = outcome {
        std::panic::resume_unwind(panic);
    }
}

/// The current time, truncated to whole milliseconds: stores must keep times to the millisecond.
fn now_ms() -> SystemTime {
    let since_epoch = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default();
    SystemTime::UNIX_EPOCH
        + Duration::from_millis(u64::try_from(since_epoch.as_millis()).unwrap_or(u64::MAX))
}

/// A fresh accepted record created at `at`.
fn record(at: SystemTime) -> JobRecord {
    JobRecord::new(
        JobId::new(),
        JobKind::Interaction,
        "POST",
        "/fhir/Observation?x=1",
        at,
    )
}

fn response(status: u16, body: &'static str) -> StoredResponse {
    StoredResponse {
        status: StatusCode::from_u16(status).expect("a valid status"),
        headers: vec![(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static("application/fhir+json"),
        )],
        body: Bytes::from_static(body.as_bytes()),
    }
}

async fn get<S: JobStore>(store: &S, id: &JobId, now: SystemTime) -> Option<JobRecord> {
    store.get(id, now).await.expect("get should succeed")
}

/// `create` then `get` returns an equal record, whatever its kind.
pub async fn design_create_then_get_returns_the_record<F: Fixture>(_: &F, store: &F::Store) {
    let now = now_ms();
    let rec = record(now).with_owner(Some("client-7".into()));
    store
        .create(rec.clone())
        .await
        .expect("create should succeed");
    assert_eq!(
        get(store, &rec.id, now).await,
        Some(rec),
        "get returns what create stored"
    );
    // Every kind round-trips, running and finished too: the kind decides how a status and a
    // completion are rendered (a bulk job with a separate status answers with its manifest).
    for kind in [
        JobKind::Interaction,
        JobKind::Bulk,
        JobKind::BulkSeparateStatus,
    ] {
        let job = JobRecord::new(JobId::new(), kind, "GET", "/fhir/$export", now);
        store
            .create(job.clone())
            .await
            .expect("create should succeed");
        assert_eq!(get(store, &job.id, now).await.map(|r| r.kind), Some(kind));
        assert!(store.start(&job.id, "a", now + 30 * SECOND).await.unwrap());
        assert_eq!(get(store, &job.id, now).await.map(|r| r.kind), Some(kind));
        let outcome = JobOutcome::Completed(response(200, "{}"));
        assert!(
            store
                .finish(&job.id, outcome, now, now + 60 * SECOND)
                .await
                .unwrap()
        );
        assert_eq!(
            get(store, &job.id, now).await.map(|r| r.kind),
            Some(kind),
            "a {kind:?} job is read back as one when finished"
        );
    }
}

/// A second `create` with the same id is a conflict and changes nothing.
pub async fn design_create_rejects_a_taken_id<F: Fixture>(_: &F, store: &F::Store) {
    let now = now_ms();
    let rec = record(now);
    store
        .create(rec.clone())
        .await
        .expect("create should succeed");
    let mut other = rec.clone();
    other.target = "/fhir/Patient".into();
    let err = store
        .create(other)
        .await
        .expect_err("a taken id must be rejected");
    assert!(
        matches!(err, StoreError::Conflict(id) if id == rec.id),
        "conflict names the id: {err}"
    );
    assert_eq!(
        get(store, &rec.id, now).await,
        Some(rec),
        "the first record is untouched"
    );
}

/// Unknown ids are absent for every operation.
pub async fn status_15_cancel_7_unknown_ids_are_absent<F: Fixture>(_: &F, store: &F::Store) {
    let now = now_ms();
    let id = JobId::new();
    assert_eq!(get(store, &id, now).await, None);
    assert!(
        !store.start(&id, "a", now + SECOND).await.unwrap(),
        "start of an unknown job"
    );
    let finished = store
        .finish(
            &id,
            JobOutcome::Completed(response(200, "{}")),
            now,
            now + SECOND,
        )
        .await;
    assert!(!finished.unwrap(), "finish of an unknown job");
    assert!(
        !store.cancel(&id, now).await.unwrap(),
        "cancel of an unknown job"
    );
    assert!(
        !store.set_progress(&id, "50%").await.unwrap(),
        "progress of an unknown job is ignored"
    );
    assert_eq!(
        get(store, &id, now).await,
        None,
        "nothing was created by the calls above"
    );
}

/// `start` moves `Accepted` to `Running` with the instance and lease, exactly once.
pub async fn design_start_moves_accepted_to_running_once<F: Fixture>(_: &F, store: &F::Store) {
    let now = now_ms();
    let rec = record(now);
    store.create(rec.clone()).await.unwrap();
    assert!(
        store
            .start(&rec.id, "instance-a", now + 30 * SECOND)
            .await
            .unwrap()
    );
    assert!(
        !store
            .start(&rec.id, "instance-b", now + 30 * SECOND)
            .await
            .unwrap(),
        "second start"
    );
    let state = get(store, &rec.id, now)
        .await
        .expect("the job exists")
        .state;
    assert_eq!(
        state,
        JobState::Running {
            instance: "instance-a".into(),
            lease_until: now + 30 * SECOND
        }
    );
}

/// The first `finish` wins; a later one is refused and changes nothing.
pub async fn status_14_finish_first_transition_wins<F: Fixture>(_: &F, store: &F::Store) {
    let now = now_ms();
    let rec = record(now);
    store.create(rec.clone()).await.unwrap();
    store.start(&rec.id, "a", now + 30 * SECOND).await.unwrap();
    let done = response(201, r#"{"resourceType":"Observation","id":"1"}"#);
    let expires = now + 3600 * SECOND;
    assert!(
        store
            .finish(
                &rec.id,
                JobOutcome::Completed(done.clone()),
                now + SECOND,
                expires
            )
            .await
            .unwrap()
    );
    let late = JobOutcome::Failed(response(500, "{}"));
    assert!(
        !store
            .finish(&rec.id, late, now + 2 * SECOND, expires)
            .await
            .unwrap(),
        "second finish"
    );
    assert!(
        !store.start(&rec.id, "a", now + 30 * SECOND).await.unwrap(),
        "start after finish"
    );
    let got = get(store, &rec.id, now + SECOND)
        .await
        .expect("the job exists");
    assert_eq!(got.state, JobState::Completed(done));
    assert_eq!(got.finished_at, Some(now + SECOND));
    assert_eq!(got.expires_at, Some(expires));
}

/// A job that never started can still be failed (e.g. at shutdown).
pub async fn design_finish_from_accepted_is_allowed<F: Fixture>(_: &F, store: &F::Store) {
    let now = now_ms();
    let rec = record(now);
    store.create(rec.clone()).await.unwrap();
    let failed = response(503, r#"{"resourceType":"OperationOutcome"}"#);
    assert!(
        store
            .finish(
                &rec.id,
                JobOutcome::Failed(failed.clone()),
                now,
                now + 60 * SECOND
            )
            .await
            .unwrap()
    );
    assert_eq!(
        get(store, &rec.id, now).await.unwrap().state,
        JobState::Failed(failed)
    );
}

/// Cancel removes the job; later reads are absent and later transitions refused (CANCEL-3, CANCEL-6).
pub async fn cancel_3_cancel_6_cancel_removes_the_job_and_blocks_later_transitions<F: Fixture>(
    _: &F,
    store: &F::Store,
) {
    let now = now_ms();
    let rec = record(now);
    store.create(rec.clone()).await.unwrap();
    store.start(&rec.id, "a", now + 30 * SECOND).await.unwrap();
    assert!(
        store.cancel(&rec.id, now).await.unwrap(),
        "cancel of a running job"
    );
    assert_eq!(
        get(store, &rec.id, now).await,
        None,
        "a cancelled job is absent"
    );
    assert!(!store.cancel(&rec.id, now).await.unwrap(), "second cancel");
    let outcome = JobOutcome::Completed(response(200, "{}"));
    assert!(
        !store
            .finish(&rec.id, outcome, now, now + 60 * SECOND)
            .await
            .unwrap(),
        "finish after cancel"
    );
    assert_eq!(
        get(store, &rec.id, now).await,
        None,
        "a cancelled job is never resurrected"
    );

    let never_started = record(now);
    store.create(never_started.clone()).await.unwrap();
    assert!(store.cancel(&never_started.id, now).await.unwrap());
    assert!(
        !store
            .start(&never_started.id, "a", now + SECOND)
            .await
            .unwrap(),
        "start after cancel"
    );
}

/// Cancel after completion removes the result (CANCEL-5).
pub async fn cancel_5_cancel_after_finish_removes_the_result<F: Fixture>(_: &F, store: &F::Store) {
    let now = now_ms();
    let rec = record(now);
    store.create(rec.clone()).await.unwrap();
    let outcome = JobOutcome::Completed(response(200, "{}"));
    store
        .finish(&rec.id, outcome, now, now + 60 * SECOND)
        .await
        .unwrap();
    assert!(store.cancel(&rec.id, now).await.unwrap());
    assert_eq!(get(store, &rec.id, now).await, None);
}

/// Records are absent from the moment they expire, with no sweep (EXPIRE-3).
pub async fn expire_3_expired_records_are_absent_before_any_sweep<F: Fixture>(
    _: &F,
    store: &F::Store,
) {
    let now = now_ms();
    let rec = record(now);
    store.create(rec.clone()).await.unwrap();
    let outcome = JobOutcome::Completed(response(200, "{}"));
    store
        .finish(&rec.id, outcome, now, now + 10 * SECOND)
        .await
        .unwrap();
    assert!(
        get(store, &rec.id, now + 9 * SECOND).await.is_some(),
        "readable before expiry"
    );
    assert_eq!(
        get(store, &rec.id, now + 10 * SECOND).await,
        None,
        "absent at expiry"
    );
    assert!(
        !store.cancel(&rec.id, now + 11 * SECOND).await.unwrap(),
        "an expired job cannot be cancelled"
    );
}

/// Sweeping deletes expired records and keeps the rest.
pub async fn expire_1_sweep_removes_only_expired_records<F: Fixture>(_: &F, store: &F::Store) {
    let now = now_ms();
    let expiring = record(now);
    let lasting = record(now);
    let running = record(now);
    for rec in [&expiring, &lasting, &running] {
        store.create(rec.clone()).await.unwrap();
    }
    let done = || JobOutcome::Completed(response(200, "{}"));
    store
        .finish(&expiring.id, done(), now, now + SECOND)
        .await
        .unwrap();
    store
        .finish(&lasting.id, done(), now, now + 3600 * SECOND)
        .await
        .unwrap();
    let swept = store
        .sweep(now + 2 * SECOND)
        .await
        .expect("sweep should succeed");
    assert!(swept >= 1, "the expired record was swept (swept {swept})");
    assert_eq!(
        get(store, &expiring.id, now).await,
        None,
        "the expired record is gone, even for an earlier now"
    );
    assert!(
        get(store, &lasting.id, now + 2 * SECOND).await.is_some(),
        "an unexpired record stays"
    );
    assert!(
        get(store, &running.id, now + 2 * SECOND).await.is_some(),
        "an unfinished record stays"
    );
}

/// Progress is recorded while the job runs and dropped when it ends.
pub async fn status_4_progress_is_kept_until_the_job_ends<F: Fixture>(_: &F, store: &F::Store) {
    let now = now_ms();
    let rec = record(now);
    store.create(rec.clone()).await.unwrap();
    store.start(&rec.id, "a", now + 30 * SECOND).await.unwrap();
    store.set_progress(&rec.id, "42% complete").await.unwrap();
    assert_eq!(
        get(store, &rec.id, now).await.unwrap().progress.as_deref(),
        Some("42% complete")
    );
    let outcome = JobOutcome::Completed(response(200, "{}"));
    store
        .finish(&rec.id, outcome, now, now + 60 * SECOND)
        .await
        .unwrap();
    store.set_progress(&rec.id, "99% complete").await.unwrap();
    assert_eq!(get(store, &rec.id, now).await.unwrap().progress, None);
}

/// Lease renewal extends this instance's running jobs and names the ones that stopped.
pub async fn design_renew_leases_reports_jobs_that_stopped_running_here<F: Fixture>(
    _: &F,
    store: &F::Store,
) {
    let now = now_ms();
    let [mine, cancelled, finished, elsewhere] =
        [record(now), record(now), record(now), record(now)];
    for rec in [&mine, &cancelled, &finished, &elsewhere] {
        store.create(rec.clone()).await.unwrap();
    }
    for rec in [&mine, &cancelled, &finished] {
        store.start(&rec.id, "here", now + SECOND).await.unwrap();
    }
    store
        .start(&elsewhere.id, "there", now + SECOND)
        .await
        .unwrap();
    store.cancel(&cancelled.id, now).await.unwrap();
    let outcome = JobOutcome::Completed(response(200, "{}"));
    store
        .finish(&finished.id, outcome, now, now + 60 * SECOND)
        .await
        .unwrap();
    let unknown = JobId::new();
    let ids = [mine.id, cancelled.id, finished.id, elsewhere.id, unknown];
    let mut gone = store
        .renew_leases("here", &ids, now + 60 * SECOND)
        .await
        .unwrap();
    gone.sort();
    let mut expected = vec![cancelled.id, finished.id, elsewhere.id, unknown];
    expected.sort();
    assert_eq!(gone, expected);
    let state = get(store, &mine.id, now).await.unwrap().state;
    assert_eq!(
        state,
        JobState::Running {
            instance: "here".into(),
            lease_until: now + 60 * SECOND
        }
    );
}

/// Running jobs whose lease lapsed, and accepted jobs never started in time, are failed with
/// the given outcome; nothing else is.
pub async fn design_fail_lapsed_fails_only_lapsed_running_jobs<F: Fixture>(
    _: &F,
    store: &F::Store,
) {
    // Far in the past, so that other tests' jobs sharing the store keep their leases.
    let base = SystemTime::UNIX_EPOCH + 1_000_000 * SECOND;
    let [lapsed, renewed, accepted, orphan] = [
        record(base),
        record(base),
        record(base + 10 * SECOND),
        record(base),
    ];
    for rec in [&lapsed, &renewed, &accepted, &orphan] {
        store.create(rec.clone()).await.unwrap();
    }
    store
        .start(&lapsed.id, "dead", base + SECOND)
        .await
        .unwrap();
    store
        .start(&renewed.id, "alive", base + 100 * SECOND)
        .await
        .unwrap();
    let lost = response(503, r#"{"resourceType":"OperationOutcome"}"#);
    let failed = store
        .fail_lapsed(
            base + 2 * SECOND,
            base + SECOND,
            JobOutcome::Failed(lost.clone()),
            base + 3600 * SECOND,
        )
        .await
        .unwrap();
    assert!(failed.contains(&lapsed.id), "the lapsed job was failed");
    assert!(
        failed.contains(&orphan.id),
        "the job accepted but never started was failed"
    );
    assert!(
        !failed.contains(&renewed.id) && !failed.contains(&accepted.id),
        "others were not"
    );
    let got = get(store, &lapsed.id, base + 2 * SECOND).await.unwrap();
    assert_eq!(got.state, JobState::Failed(lost));
    assert_eq!(got.finished_at, Some(base + 2 * SECOND));
    assert!(matches!(
        get(store, &renewed.id, base).await.unwrap().state,
        JobState::Running { .. }
    ));
    assert_eq!(
        get(store, &accepted.id, base + 10 * SECOND)
            .await
            .unwrap()
            .state,
        JobState::Accepted
    );
    assert!(matches!(
        get(store, &orphan.id, base).await.unwrap().state,
        JobState::Failed(_)
    ));
    for rec in [&lapsed, &renewed, &accepted, &orphan] {
        store.cancel(&rec.id, base).await.unwrap();
    }
}

/// The layer accepts and starts a job in one write: a record created (or created once)
/// `Running` is leased like one started later: `start` refuses it, `renew_leases` renews it,
/// `fail_lapsed` fails it once its lease lapsed, and it finishes as usual.
pub async fn design_jobs_created_running_are_leased_like_started_ones<F: Fixture>(
    _: &F,
    store: &F::Store,
) {
    // Far in the past, so that other tests' jobs sharing the store keep their leases.
    let base = SystemTime::UNIX_EPOCH + 2_000_000 * SECOND;
    let running = |instance: &str, lease_until| {
        let mut rec = record(base);
        rec.state = JobState::Running {
            instance: instance.into(),
            lease_until,
        };
        rec
    };
    let alive = running("alive", base + 100 * SECOND);
    let dead = running("dead", base + SECOND);
    let once = running("alive", base + 100 * SECOND).with_owner(Some("owner".into()));
    store.create(alive.clone()).await.unwrap();
    store.create(dead.clone()).await.unwrap();
    assert_eq!(
        store
            .create_once(once.clone(), "key-created-running", base)
            .await
            .unwrap(),
        Created::New
    );
    assert_eq!(
        get(store, &alive.id, base).await.unwrap().state,
        alive.state
    );
    assert!(
        !store
            .start(&alive.id, "other", base + 100 * SECOND)
            .await
            .unwrap(),
        "a job created running is not started again"
    );
    let gone = store
        .renew_leases("alive", &[alive.id, once.id], base + 200 * SECOND)
        .await
        .unwrap();
    assert!(gone.is_empty(), "both still run on \"alive\": {gone:?}");
    assert_eq!(
        get(store, &once.id, base).await.unwrap().state,
        JobState::Running {
            instance: "alive".into(),
            lease_until: base + 200 * SECOND
        }
    );
    let lost = response(503, r#"{"resourceType":"OperationOutcome"}"#);
    let failed = store
        .fail_lapsed(
            base + 2 * SECOND,
            base + SECOND,
            JobOutcome::Failed(lost.clone()),
            base + 3600 * SECOND,
        )
        .await
        .unwrap();
    assert!(failed.contains(&dead.id), "the lapsed lease was noticed");
    assert!(
        !failed.contains(&alive.id) && !failed.contains(&once.id),
        "renewed leases hold: {failed:?}"
    );
    assert_eq!(
        get(store, &dead.id, base + 2 * SECOND).await.unwrap().state,
        JobState::Failed(lost)
    );
    let outcome = JobOutcome::Completed(response(200, "{}"));
    assert!(
        store
            .finish(&alive.id, outcome.clone(), base, base + 3600 * SECOND)
            .await
            .unwrap()
    );
    assert_eq!(
        get(store, &alive.id, base).await.unwrap().state,
        JobState::Completed(response(200, "{}"))
    );
    for rec in [&alive, &dead, &once] {
        store.cancel(&rec.id, base).await.unwrap();
    }
}

/// Status, headers (any bytes), body (any bytes) and every record field survive storage.
pub async fn status_14_stored_responses_round_trip_exactly<F: Fixture>(_: &F, store: &F::Store) {
    let now = now_ms();
    let mut rec = record(now).with_owner(Some("ünïcode owner".into()));
    rec.target = "/fhir/Patient?name=Zoë&_count=10".into();
    store.create(rec.clone()).await.unwrap();
    let stored = StoredResponse {
        status: StatusCode::from_u16(422).unwrap(),
        headers: vec![
            (
                http::header::CONTENT_TYPE,
                HeaderValue::from_static("text/plain; charset=latin1"),
            ),
            (http::header::ETAG, HeaderValue::from_static("W/\"3\"")),
            (
                HeaderName::from_static("x-raw"),
                HeaderValue::from_bytes(b"caf\xe9").unwrap(),
            ),
            (
                HeaderName::from_static("x-raw"),
                HeaderValue::from_static("second"),
            ),
        ],
        body: Bytes::from_static(b"\x00\xffnot json\n"),
    };
    let finished_at = now + SECOND;
    let expires = now + 7200 * SECOND;
    store
        .finish(
            &rec.id,
            JobOutcome::Completed(stored.clone()),
            finished_at,
            expires,
        )
        .await
        .unwrap();
    let got = get(store, &rec.id, now).await.unwrap();
    assert_eq!(got.state, JobState::Completed(stored));
    assert_eq!(got.owner, rec.owner);
    assert_eq!(got.target, rec.target);
    assert_eq!(got.method, rec.method);
    assert_eq!(got.kind, rec.kind);
    assert_eq!(got.created_at, rec.created_at);
    assert_eq!(got.finished_at, Some(finished_at));
}

/// A fresh record of `owner`, created at `at`.
fn owned(owner: &str, at: SystemTime) -> JobRecord {
    record(at).with_owner(Some(owner.into()))
}

/// A fresh idempotency key, so that cases sharing a store never meet each other's keys.
fn fresh_key() -> String {
    format!("kick-off-{}", JobId::new())
}

async fn create_once<S: JobStore>(
    store: &S,
    record: &JobRecord,
    key: &str,
    now: SystemTime,
) -> Created {
    store
        .create_once(record.clone(), key, now)
        .await
        .expect("create_once should succeed")
}

/// A repeated kick-off with the same owner and key names the first job and creates nothing,
/// while that job is accepted or running.
pub async fn kick_9_create_once_returns_the_existing_job_for_a_repeated_key<F: Fixture>(
    _: &F,
    store: &F::Store,
) {
    let now = now_ms();
    let key = fresh_key();
    let first = owned("alice", now);
    assert_eq!(create_once(store, &first, &key, now).await, Created::New);
    assert_eq!(
        get(store, &first.id, now).await,
        Some(first.clone()),
        "create_once stores the record as create does"
    );
    let repeat = owned("alice", now + SECOND);
    assert_eq!(
        create_once(store, &repeat, &key, now + SECOND).await,
        Created::Existing(first.id),
        "a repeat of an accepted job"
    );
    assert_eq!(
        get(store, &repeat.id, now).await,
        None,
        "a repeat creates nothing"
    );
    store
        .start(&first.id, "a", now + 30 * SECOND)
        .await
        .unwrap();
    let again = owned("alice", now + 2 * SECOND);
    assert_eq!(
        create_once(store, &again, &key, now + 2 * SECOND).await,
        Created::Existing(first.id),
        "a repeat of a running job"
    );
    assert_eq!(get(store, &again.id, now).await, None);
    let other_key = owned("alice", now);
    assert_eq!(
        create_once(store, &other_key, &fresh_key(), now).await,
        Created::New,
        "another key is another kick-off"
    );
    for rec in [&first, &other_key] {
        store.cancel(&rec.id, now).await.unwrap();
    }
}

/// The same key sent by two owners is two kick-offs: keys are scoped to the caller.
pub async fn kick_9_create_once_never_matches_across_owners<F: Fixture>(_: &F, store: &F::Store) {
    let now = now_ms();
    let key = fresh_key();
    let alice = owned("alice", now);
    let bob = owned("bob", now);
    assert_eq!(create_once(store, &alice, &key, now).await, Created::New);
    assert_eq!(
        create_once(store, &bob, &key, now).await,
        Created::New,
        "another owner's key never matches"
    );
    assert!(get(store, &alice.id, now).await.is_some());
    assert!(get(store, &bob.id, now).await.is_some());
    assert_eq!(
        create_once(store, &owned("alice", now), &key, now).await,
        Created::Existing(alice.id)
    );
    assert_eq!(
        create_once(store, &owned("bob", now), &key, now).await,
        Created::Existing(bob.id)
    );
    // Pairs that a naive concatenation of owner and key would confuse.
    let mut pairs = Vec::new();
    for (owner, key_start) in [("ab", "c"), ("a", "bc"), ("a:b", "c"), ("a", "b:c")] {
        let rec = owned(owner, now);
        let key = format!("{key_start}{key}");
        assert_eq!(
            create_once(store, &rec, &key, now).await,
            Created::New,
            "owner {owner:?} with key {key:?} is a kick-off of its own"
        );
        pairs.push(rec);
    }
    for rec in pairs.iter().chain([&alice, &bob]) {
        store.cancel(&rec.id, now).await.unwrap();
    }
}

/// A record without an owner is always created: without a caller identity there is no scope
/// for a key.
pub async fn kick_9_create_once_without_an_owner_always_creates<F: Fixture>(
    _: &F,
    store: &F::Store,
) {
    let now = now_ms();
    let key = fresh_key();
    let [first, second] = [record(now), record(now)];
    assert_eq!(create_once(store, &first, &key, now).await, Created::New);
    assert_eq!(create_once(store, &second, &key, now).await, Created::New);
    assert!(get(store, &first.id, now).await.is_some());
    assert!(get(store, &second.id, now).await.is_some());
    // Nor does an owner's job match a kick-off without an owner, or the other way round.
    let owned_job = owned("alice", now);
    assert_eq!(
        create_once(store, &owned_job, &key, now).await,
        Created::New
    );
    let third = record(now);
    assert_eq!(create_once(store, &third, &key, now).await, Created::New);
    for rec in [&first, &second, &owned_job, &third] {
        store.cancel(&rec.id, now).await.unwrap();
    }
}

/// A cancelled job does not count: the next kick-off with its key is new, and is the one that
/// later repeats find.
pub async fn kick_9_create_once_after_cancel_creates_a_new_job<F: Fixture>(
    _: &F,
    store: &F::Store,
) {
    let now = now_ms();
    let key = fresh_key();
    let cancelled = owned("alice", now);
    assert_eq!(
        create_once(store, &cancelled, &key, now).await,
        Created::New
    );
    assert!(store.cancel(&cancelled.id, now).await.unwrap());
    let next = owned("alice", now);
    assert_eq!(
        create_once(store, &next, &key, now).await,
        Created::New,
        "a cancelled job is never returned"
    );
    assert_eq!(
        create_once(store, &owned("alice", now), &key, now).await,
        Created::Existing(next.id)
    );
    // Also when the cancelled job had completed, and once a sweep has run.
    let outcome = JobOutcome::Completed(response(200, "{}"));
    store
        .finish(&next.id, outcome, now, now + 60 * SECOND)
        .await
        .unwrap();
    assert!(store.cancel(&next.id, now).await.unwrap());
    store.sweep(now).await.unwrap();
    let last = owned("alice", now);
    assert_eq!(create_once(store, &last, &key, now).await, Created::New);
    assert_eq!(
        create_once(store, &owned("alice", now), &key, now).await,
        Created::Existing(last.id)
    );
    store.cancel(&last.id, now).await.unwrap();
}

/// A failed job does not count, whether it failed through `finish` or `fail_lapsed`: the next
/// kick-off is new, and later repeats find that one. The failed job stays readable.
pub async fn kick_9_create_once_after_failure_creates_a_new_job<F: Fixture>(
    _: &F,
    store: &F::Store,
) {
    let now = now_ms();
    let key = fresh_key();
    let failed = owned("alice", now);
    assert_eq!(create_once(store, &failed, &key, now).await, Created::New);
    store
        .start(&failed.id, "a", now + 30 * SECOND)
        .await
        .unwrap();
    let lost = response(503, r#"{"resourceType":"OperationOutcome"}"#);
    let outcome = JobOutcome::Failed(lost.clone());
    assert!(
        store
            .finish(&failed.id, outcome, now, now + 3600 * SECOND)
            .await
            .unwrap()
    );
    let retry = owned("alice", now);
    assert_eq!(
        create_once(store, &retry, &key, now).await,
        Created::New,
        "a failed job is never returned"
    );
    assert_eq!(
        create_once(store, &owned("alice", now), &key, now).await,
        Created::Existing(retry.id),
        "the job created after the failure is"
    );
    assert_eq!(
        get(store, &failed.id, now).await.map(|r| r.state),
        Some(JobState::Failed(lost.clone())),
        "the failed job's outcome is still readable"
    );

    // A job failed because its instance died. Times far in the past (and apart from those of
    // `fail_lapsed_fails_only_lapsed_running_jobs`), so that no other job sharing the store
    // lapses.
    let base = SystemTime::UNIX_EPOCH + 500_000 * SECOND;
    let key = fresh_key();
    let orphan = owned("alice", base);
    assert_eq!(create_once(store, &orphan, &key, base).await, Created::New);
    store
        .start(&orphan.id, "dead", base + SECOND)
        .await
        .unwrap();
    let lapsed = store
        .fail_lapsed(
            base + 2 * SECOND,
            base,
            JobOutcome::Failed(lost),
            base + 3600 * SECOND,
        )
        .await
        .unwrap();
    assert!(lapsed.contains(&orphan.id));
    let retry_lapsed = owned("alice", base + 3 * SECOND);
    assert_eq!(
        create_once(store, &retry_lapsed, &key, base + 3 * SECOND).await,
        Created::New,
        "a job failed by fail_lapsed is never returned"
    );
    assert_eq!(
        create_once(store, &owned("alice", base), &key, base + 4 * SECOND).await,
        Created::Existing(retry_lapsed.id)
    );
    for rec in [&failed, &retry, &orphan] {
        store.cancel(&rec.id, now).await.unwrap();
    }
    store.cancel(&retry_lapsed.id, base).await.unwrap();
}

/// A completed job counts until it expires; from then on the key starts a new job, which later
/// repeats find.
pub async fn kick_9_create_once_returns_a_completed_job_until_it_expires<F: Fixture>(
    _: &F,
    store: &F::Store,
) {
    let now = now_ms();
    let key = fresh_key();
    let done = owned("alice", now);
    assert_eq!(create_once(store, &done, &key, now).await, Created::New);
    let outcome = JobOutcome::Completed(response(200, "{}"));
    store
        .finish(&done.id, outcome, now + SECOND, now + 10 * SECOND)
        .await
        .unwrap();
    assert_eq!(
        create_once(store, &owned("alice", now), &key, now + 9 * SECOND).await,
        Created::Existing(done.id),
        "a completed job is returned while it is readable"
    );
    let after = owned("alice", now + 10 * SECOND);
    assert_eq!(
        create_once(store, &after, &key, now + 10 * SECOND).await,
        Created::New,
        "an expired job is never returned"
    );
    assert_eq!(
        create_once(store, &owned("alice", now), &key, now + 11 * SECOND).await,
        Created::Existing(after.id)
    );
    assert_eq!(
        get(store, &done.id, now + 10 * SECOND).await,
        None,
        "the expired job stays absent"
    );
    assert_eq!(
        get(store, &after.id, now + 10 * SECOND)
            .await
            .map(|r| r.state),
        Some(JobState::Accepted)
    );
    store.cancel(&after.id, now + 10 * SECOND).await.unwrap();
}

/// Of concurrent kick-offs with the same owner and key, exactly one creates a job and the
/// others all name it.
pub async fn kick_9_create_once_has_one_winner_among_concurrent_kick_offs<F: Fixture>(
    _: &F,
    store: &F::Store,
) {
    let winner = race_create_once(&[store], store).await;
    store.cancel(&winner, now_ms()).await.unwrap();
}

/// Sixteen kick-offs of one owner and key, spread over `handles`, at once: exactly one creates
/// a job, every other names it, and only its record exists (read through `store`). The winner.
async fn race_create_once<S: JobStore>(handles: &[&S], store: &S) -> JobId {
    let now = now_ms();
    let key = fresh_key();
    let records: Vec<JobRecord> = (0..16).map(|_| owned("alice", now)).collect();
    let kick_offs = records
        .iter()
        .enumerate()
        .map(|(n, rec)| handles[n % handles.len()].create_once(rec.clone(), &key, now));
    let results: Vec<Created> = futures_util::future::join_all(kick_offs)
        .await
        .into_iter()
        .map(|result| result.expect("create_once should succeed"))
        .collect();
    let winners: Vec<JobId> = records
        .iter()
        .zip(&results)
        .filter(|(_, created)| **created == Created::New)
        .map(|(rec, _)| rec.id)
        .collect();
    assert_eq!(winners.len(), 1, "exactly one New: {results:?}");
    let winner = winners[0];
    for created in &results {
        assert!(
            *created == Created::New || *created == Created::Existing(winner),
            "every other kick-off names the winner: {results:?}"
        );
    }
    for rec in &records {
        assert_eq!(
            get(store, &rec.id, now).await.is_some(),
            rec.id == winner,
            "only the winner's record exists"
        );
    }
    winner
}

/// Keys of up to [`MAX_IDEMPOTENCY_KEY_LEN`] bytes, of any printable text, work.
pub async fn kick_9_create_once_supports_the_longest_key<F: Fixture>(_: &F, store: &F::Store) {
    let now = now_ms();
    let prefix = fresh_key();
    let mut key = format!("{prefix}:ü/é*?\"x");
    while key.len() < MAX_IDEMPOTENCY_KEY_LEN {
        key.push('k');
    }
    assert_eq!(key.len(), MAX_IDEMPOTENCY_KEY_LEN);
    let owner = "https://idp.example.org/realms/fhir|user:0042";
    let first = owned(owner, now);
    assert_eq!(create_once(store, &first, &key, now).await, Created::New);
    assert_eq!(
        create_once(store, &owned(owner, now), &key, now).await,
        Created::Existing(first.id)
    );
    let shorter = &key[..key.len() - 1];
    let other = owned(owner, now);
    assert_eq!(
        create_once(store, &other, shorter, now).await,
        Created::New,
        "a key that is a prefix of another is another key"
    );
    for rec in [&first, &other] {
        store.cancel(&rec.id, now).await.unwrap();
    }
}

/// A taken id is a conflict, as for `create`, and leaves the key free.
pub async fn kick_9_create_once_rejects_a_taken_id<F: Fixture>(_: &F, store: &F::Store) {
    let now = now_ms();
    let key = fresh_key();
    let taken = owned("alice", now);
    store.create(taken.clone()).await.unwrap();
    let err = store
        .create_once(taken.clone(), &key, now)
        .await
        .expect_err("a taken id must be rejected");
    assert!(
        matches!(err, StoreError::Conflict(id) if id == taken.id),
        "conflict names the id: {err}"
    );
    let next = owned("alice", now);
    assert_eq!(
        create_once(store, &next, &key, now).await,
        Created::New,
        "the key was not taken by the rejected kick-off"
    );
    for rec in [&taken, &next] {
        store.cancel(&rec.id, now).await.unwrap();
    }
}

/// `abandon` after `create`: the job is gone, and the same create arriving again later (a
/// write delayed in a stalled connection) leaves no job behind (issue: a kick-off answered
/// `503` still left a job).
pub async fn kick_9_abandon_removes_the_job_and_blocks_a_late_create<F: Fixture>(
    _: &F,
    store: &F::Store,
) {
    let now = now_ms();
    let rec = record(now);
    store.create(rec.clone()).await.unwrap();
    store
        .abandon(&rec.id, now, now + 60 * SECOND)
        .await
        .expect("abandon should succeed");
    assert_eq!(
        get(store, &rec.id, now).await,
        None,
        "an abandoned job is absent"
    );
    let late = store.create(rec.clone()).await;
    assert!(
        matches!(late, Err(StoreError::Conflict(id)) if id == rec.id),
        "a create arriving after abandon must conflict, got {late:?}"
    );
    assert_eq!(
        get(store, &rec.id, now).await,
        None,
        "a late create leaves no job"
    );
    assert!(
        !store.start(&rec.id, "i-1", now + SECOND).await.unwrap(),
        "an abandoned job never starts"
    );
    assert!(
        !store
            .finish(
                &rec.id,
                JobOutcome::Completed(response(200, "{}")),
                now,
                now + SECOND
            )
            .await
            .unwrap(),
        "an abandoned job never finishes"
    );
}

/// `abandon` that reaches the store before the `create` it takes back (the two took different
/// connections): the create finds the id taken.
pub async fn kick_9_abandon_before_create_blocks_the_create<F: Fixture>(_: &F, store: &F::Store) {
    let now = now_ms();
    let rec = owned("alice", now);
    store
        .abandon(&rec.id, now, now + 60 * SECOND)
        .await
        .expect("abandon of an unknown id should succeed");
    let late = store.create(rec.clone()).await;
    assert!(
        matches!(late, Err(StoreError::Conflict(_))),
        "create after abandon must conflict, got {late:?}"
    );
    let key = fresh_key();
    let late = store.create_once(rec.clone(), &key, now).await;
    assert!(
        matches!(late, Err(StoreError::Conflict(_))),
        "create_once after abandon must conflict, got {late:?}"
    );
    assert_eq!(get(store, &rec.id, now).await, None);
    // The key did not stick to the abandoned id: a new kick-off with it is new.
    let next = owned("alice", now);
    assert_eq!(create_once(store, &next, &key, now).await, Created::New);
    store.cancel(&next.id, now).await.unwrap();
}

/// An idempotent kick-off that was abandoned frees its key: a retry with the same key creates
/// a new job rather than naming one that will never run.
pub async fn kick_9_abandon_frees_the_idempotency_key<F: Fixture>(_: &F, store: &F::Store) {
    let now = now_ms();
    let key = fresh_key();
    let orphan = owned("alice", now);
    assert_eq!(create_once(store, &orphan, &key, now).await, Created::New);
    store
        .abandon(&orphan.id, now, now + 60 * SECOND)
        .await
        .unwrap();
    let retry = owned("alice", now);
    assert_eq!(
        create_once(store, &retry, &key, now).await,
        Created::New,
        "the retry must not name the abandoned job"
    );
    store.cancel(&retry.id, now).await.unwrap();
}

/// The next announcement on `feed` about `id`, skipping others; fails after [`FEED_WAIT`].
async fn next_about(feed: &mut Changes, id: JobId, what: &str) -> Change {
    let wait = async {
        while let Some(change) = feed.next().await {
            if change.id() == id {
                return change;
            }
        }
        panic!("the change feed ended before announcing {what}");
    };
    tokio::time::timeout(FEED_WAIT, wait)
        .await
        .unwrap_or_else(|_| panic!("no announcement of {what} within {FEED_WAIT:?}"))
}

/// The change feed of `store`, or `None` if the fixture says it has none (checked).
async fn feed_of<F: Fixture>(fixture: &F, store: &F::Store) -> Option<Changes> {
    let feed = store.changes().await.expect("changes should succeed");
    assert_eq!(
        feed.is_some(),
        fixture.has_changes(),
        "the store has a change feed exactly when the fixture says so"
    );
    feed
}

/// A cancel through one handle is announced as [`Change::Cancelled`] on the feed of another,
/// so the instance running the job stops it at once; a cancel of an unknown job announces
/// nothing.
pub async fn cancel_3_changes_announce_a_cancel_to_every_handle<F: Fixture>(
    fixture: &F,
    store: &F::Store,
) {
    let elsewhere = fixture.handle(store).await;
    let Some(mut feed) = feed_of(fixture, &elsewhere).await else {
        return;
    };
    let now = now_ms();
    let unknown = JobId::new();
    assert!(!store.cancel(&unknown, now).await.unwrap());
    let rec = record(now);
    store.create(rec.clone()).await.unwrap();
    assert!(store.start(&rec.id, "a", now + 30 * SECOND).await.unwrap());
    assert!(store.cancel(&rec.id, now).await.unwrap());
    // Announcements arrive in commit order on one feed, so the unknown job's cancel (earlier)
    // would have come first.
    let first = tokio::time::timeout(FEED_WAIT, feed.next())
        .await
        .expect("an announcement of the cancel")
        .expect("the feed stays open");
    assert_eq!(
        first,
        Change::Cancelled(rec.id),
        "the cancel is announced, and nothing before it"
    );
}

/// An end and a progress change through one handle are announced as [`Change::Updated`] on
/// the feed of another, so long polls held anywhere wake; a progress write that changes
/// nothing (the same text) is not written.
pub async fn status_4_changes_announce_ends_and_progress_to_every_handle<F: Fixture>(
    fixture: &F,
    store: &F::Store,
) {
    let elsewhere = fixture.handle(store).await;
    let Some(mut feed) = feed_of(fixture, &elsewhere).await else {
        return;
    };
    let now = now_ms();
    let rec = record(now);
    store.create(rec.clone()).await.unwrap();
    assert!(store.start(&rec.id, "a", now + 30 * SECOND).await.unwrap());
    assert!(store.set_progress(&rec.id, "10%").await.unwrap());
    assert_eq!(
        next_about(&mut feed, rec.id, "new progress").await,
        Change::Updated(rec.id)
    );
    assert!(
        !store.set_progress(&rec.id, "10%").await.unwrap(),
        "the same progress again changes nothing"
    );
    let outcome = JobOutcome::Completed(response(200, "{}"));
    assert!(
        store
            .finish(&rec.id, outcome, now, now + 60 * SECOND)
            .await
            .unwrap()
    );
    assert_eq!(
        next_about(&mut feed, rec.id, "the job's end").await,
        Change::Updated(rec.id)
    );
    // A failure announced by `fail_lapsed` reaches the feed too.
    let base = SystemTime::UNIX_EPOCH + 3_000_000 * SECOND;
    let lapsed = record(base);
    store.create(lapsed.clone()).await.unwrap();
    assert!(
        store
            .start(&lapsed.id, "gone", base + SECOND)
            .await
            .unwrap()
    );
    let failed = store
        .fail_lapsed(
            base + 2 * SECOND,
            base,
            JobOutcome::Failed(response(503, "{}")),
            now + 60 * SECOND,
        )
        .await
        .unwrap();
    if failed.contains(&lapsed.id) {
        assert_eq!(
            next_about(&mut feed, lapsed.id, "a lapsed job's failure").await,
            Change::Updated(lapsed.id)
        );
    } else {
        assert!(failed.is_empty(), "only lapsed jobs are failed: {failed:?}");
    }
}

/// Transitions racing through several handles: exactly one start wins, exactly one finish
/// wins and its result is kept; a cancel racing a finish leaves no record either way.
pub async fn status_14_cancel_6_transitions_racing_across_handles_have_one_winner<F: Fixture>(
    fixture: &F,
    store: &F::Store,
) {
    let mut handles = Vec::new();
    for _ in 0..4 {
        handles.push(fixture.handle(store).await);
    }
    let now = now_ms();
    let rec = record(now);
    store.create(rec.clone()).await.unwrap();
    let starts = (0..8).map(|n| {
        let instance = format!("instance-{n}");
        let handle = &handles[n % handles.len()];
        async move {
            handle
                .start(&rec.id, &instance, now + 30 * SECOND)
                .await
                .expect("start should succeed")
        }
    });
    let started = futures_util::future::join_all(starts).await;
    assert_eq!(
        started.iter().filter(|won| **won).count(),
        1,
        "exactly one start wins: {started:?}"
    );
    let finishes = (0..16u16).map(|n| {
        let handle = &handles[usize::from(n) % handles.len()];
        let outcome = JobOutcome::Completed(response(200 + n, "{}"));
        async move {
            let won = handle
                .finish(&rec.id, outcome, now, now + 60 * SECOND)
                .await
                .expect("finish should succeed");
            won.then_some(200 + n)
        }
    });
    let winners: Vec<u16> = futures_util::future::join_all(finishes)
        .await
        .into_iter()
        .flatten()
        .collect();
    assert_eq!(winners.len(), 1, "exactly one finish wins: {winners:?}");
    let Some(JobState::Completed(kept)) = get(store, &rec.id, now).await.map(|r| r.state) else {
        panic!("the job is completed");
    };
    assert_eq!(
        kept.status.as_u16(),
        winners[0],
        "the winner's result is kept"
    );

    for round in 0..20 {
        let rec = record(now);
        store.create(rec.clone()).await.unwrap();
        assert!(store.start(&rec.id, "a", now + 30 * SECOND).await.unwrap());
        let finisher = &handles[round % handles.len()];
        let canceller = &handles[(round + 1) % handles.len()];
        let outcome = JobOutcome::Completed(response(200, "{}"));
        let (finished, cancelled) = futures_util::future::join(
            finisher.finish(&rec.id, outcome, now, now + 60 * SECOND),
            canceller.cancel(&rec.id, now),
        )
        .await;
        finished.expect("finish should succeed");
        assert!(
            cancelled.expect("cancel should succeed"),
            "the job was there to cancel, finished or not"
        );
        assert_eq!(get(store, &rec.id, now).await, None, "never resurrected");
    }
}

/// Kick-offs with the same owner and key racing through several handles (instances) create
/// exactly one job, and every other one names it.
pub async fn kick_9_create_once_racing_across_handles_has_one_winner<F: Fixture>(
    fixture: &F,
    store: &F::Store,
) {
    let mut handles = Vec::new();
    for _ in 0..4 {
        handles.push(fixture.handle(store).await);
    }
    let handles: Vec<&F::Store> = handles.iter().collect();
    for _ in 0..5 {
        race_create_once(&handles, store).await;
    }
}
