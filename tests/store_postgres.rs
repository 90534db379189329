#![cfg(feature = "postgres")]
//! `PostgresStore` against a real PostgreSQL server: the public conformance suite, then what is
//! particular to PostgreSQL (migration, `NOTIFY` on cancel, errors, batched sweeping).
//!
//! The server is `DATABASE_URL` (default `postgres://postgres@127.0.0.1:5432/test`). These tests
//! fail, never skip, when it cannot be reached. Each test works in a table of its own,
//! `jobs_test_<random>`, dropped when the test ends, so tests run in parallel and leave nothing.

use std::future::Future;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use futures_util::StreamExt;
use http::StatusCode;
use tower_fhir_async::store::sqlx::postgres::{PgListener, PgPoolOptions};
use tower_fhir_async::store::sqlx::{self, AssertSqlSafe, PgPool};
use tower_fhir_async::store::{Created, conformance};
use tower_fhir_async::{
    JobId, JobKind, JobOutcome, JobRecord, JobState, JobStore, PostgresStore, StoreError,
    StoredResponse,
};

const DEFAULT_URL: &str = "postgres://postgres@127.0.0.1:5432/test";
const SECOND: Duration = Duration::from_secs(1);
/// How long to wait for a notification that should arrive at once.
const NOTIFY_WAIT: Duration = Duration::from_secs(5);

async fn connect() -> PgPool {
    let url = std::env::var("DATABASE_URL").unwrap_or_else(|_| DEFAULT_URL.to_owned());
    // Few connections per test: tests run in parallel against one server.
    let pool = PgPoolOptions::new()
        .max_connections(4)
        .acquire_timeout(10 * SECOND)
        .connect(&url)
        .await;
    pool.unwrap_or_else(|error| {
        panic!(
            "cannot connect to PostgreSQL at {url}: {error}\n\
             These tests need a running server: start it (e.g. `pg_ctlcluster \
             --skip-systemctl-redirect <version> main start`) or set DATABASE_URL."
        )
    })
}

fn fresh_table() -> String {
    format!("jobs_test_{}", JobId::new())
}

async fn drop_table(pool: &PgPool, table: &str) {
    sqlx::query(AssertSqlSafe(format!("DROP TABLE IF EXISTS \"{table}\"")))
        .execute(pool)
        .await
        .expect("dropping the test table should succeed");
}

/// Runs `test` on a migrated store with a table of its own, then drops the table, whether the
/// test passed or not.
async fn with_store<F, Fut>(test: F)
where
    F: FnOnce(PostgresStore) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let pool = connect().await;
    let table = fresh_table();
    let store = PostgresStore::new(pool.clone()).with_table(&table);
    store.migrate().await.expect("migrate should succeed");
    // A panic in the spawned task comes back as an error, so the table is dropped either way.
    let outcome = tokio::spawn(test(store)).await;
    drop_table(&pool, &table).await;
    pool.close().await;
    if let Err(error) = outcome {
        std::panic::resume_unwind(error.into_panic());
    }
}

/// The current time to the millisecond, as the store keeps it.
fn now_ms() -> SystemTime {
    let since = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap();
    SystemTime::UNIX_EPOCH + Duration::from_millis(u64::try_from(since.as_millis()).unwrap())
}

fn record(at: SystemTime) -> JobRecord {
    JobRecord::new(JobId::new(), JobKind::Interaction, "POST", "/fhir/$x", at)
}

fn completed() -> JobOutcome {
    JobOutcome::Completed(StoredResponse {
        status: StatusCode::OK,
        headers: vec![],
        body: Bytes::from_static(b"{}"),
    })
}

mod conformance_cases {
    use super::*;

    macro_rules! cases {
        ($($name:ident => $case:ident;)*) => {$(
            #[tokio::test]
            async fn $name() {
                with_store(|store| async move { conformance::$case(&store).await }).await;
            }
        )*};
    }

    // CANCEL-3, CANCEL-5, CANCEL-6, EXPIRE-3 (all store-level cases at once, sharing one store).
    #[tokio::test]
    async fn cancel_3_expire_3_run_all_cases_on_one_shared_store() {
        with_store(|store| async move { conformance::run_all(&store).await }).await;
    }

    cases! {
        // [DESIGN] create / get round trip.
        design_create_then_get_returns_the_record => create_then_get_returns_the_record;
        // [DESIGN] ids are unique in the store.
        design_create_rejects_a_taken_id => create_rejects_a_taken_id;
        // STATUS-15, CANCEL-7: unknown ids are absent for every operation.
        status_15_cancel_7_unknown_ids_are_absent => unknown_ids_are_absent;
        // [DESIGN] Accepted → Running is a compare-and-set.
        design_start_moves_accepted_to_running_once => start_moves_accepted_to_running_once;
        // STATUS-14: the first finish wins; the result never changes afterwards.
        status_14_finish_first_transition_wins => finish_first_transition_wins;
        // [DESIGN] a job that never started can be failed (shutdown).
        design_finish_from_accepted_is_allowed => finish_from_accepted_is_allowed;
        // CANCEL-3, CANCEL-6: a cancelled job is absent and never resurrected.
        cancel_3_cancel_6_cancel_removes_the_job_and_blocks_later_transitions =>
            cancel_removes_the_job_and_blocks_later_transitions;
        // CANCEL-5: cancel after completion removes the result.
        cancel_5_cancel_after_finish_removes_the_result => cancel_after_finish_removes_the_result;
        // EXPIRE-3, CANCEL-7: expired records are absent before any sweep.
        expire_3_expired_records_are_absent_before_any_sweep =>
            expired_records_are_absent_before_any_sweep;
        // EXPIRE-1: sweeping reclaims expired records only.
        expire_1_sweep_removes_only_expired_records => sweep_removes_only_expired_records;
        // STATUS-4: progress is kept while the job runs, dropped when it ends.
        status_4_progress_is_kept_until_the_job_ends => progress_is_kept_until_the_job_ends;
        // [DESIGN] lease renewal names the jobs that stopped running on this instance.
        design_renew_leases_reports_jobs_that_stopped_running_here =>
            renew_leases_reports_jobs_that_stopped_running_here;
        // [DESIGN] a job whose instance died is failed, never left running forever.
        design_fail_lapsed_fails_only_lapsed_running_jobs =>
            fail_lapsed_fails_only_lapsed_running_jobs;
        // STATUS-14, BUNDLE-*: stored responses survive storage byte for byte.
        status_14_stored_responses_round_trip_exactly => stored_responses_round_trip_exactly;
        // KICK-9, issue #7 item 6: a repeat with the same owner and key names the first job.
        kick_9_create_once_returns_the_existing_job_for_a_repeated_key =>
            create_once_returns_the_existing_job_for_a_repeated_key;
        // KICK-9, issue #7 item 6: keys are scoped to the caller, never shared across callers.
        kick_9_create_once_never_matches_across_owners => create_once_never_matches_across_owners;
        // KICK-9, issue #7 item 6: without a caller identity, a key never matches.
        kick_9_create_once_without_an_owner_always_creates =>
            create_once_without_an_owner_always_creates;
        // KICK-9, issue #7 item 6: a cancelled job is never returned for a repeat.
        kick_9_create_once_after_cancel_creates_a_new_job =>
            create_once_after_cancel_creates_a_new_job;
        // KICK-9, issue #7 item 6 (Idempotency-Key): a failed job is never returned for a repeat.
        kick_9_create_once_after_failure_creates_a_new_job =>
            create_once_after_failure_creates_a_new_job;
        // KICK-9, issue #7 item 6: a completed job is returned until it expires.
        kick_9_create_once_returns_a_completed_job_until_it_expires =>
            create_once_returns_a_completed_job_until_it_expires;
        // KICK-9, issue #7 item 6 (Idempotency-Key): concurrent repeats create exactly one job.
        kick_9_create_once_has_one_winner_among_concurrent_kick_offs =>
            create_once_has_one_winner_among_concurrent_kick_offs;
        // KICK-9, issue #7 item 6: keys up to MAX_IDEMPOTENCY_KEY_LEN bytes of any text.
        kick_9_create_once_supports_the_longest_key => create_once_supports_the_longest_key;
        // KICK-9, issue #7 item 6: a taken id is a conflict and leaves the key free.
        kick_9_create_once_rejects_a_taken_id => create_once_rejects_a_taken_id;
        // KICK-9, issue #11 item 2: a kick-off answered 503 leaves no job, even when its create lands late.
        kick_9_abandon_removes_the_job_and_blocks_a_late_create => abandon_removes_the_job_and_blocks_a_late_create;
        // KICK-9, issue #11 item 2: an abandon that overtakes its create still leaves no job.
        kick_9_abandon_before_create_blocks_the_create => abandon_before_create_blocks_the_create;
        // KICK-9, issue #11 item 2: an idempotent retry never names an abandoned job.
        kick_9_abandon_frees_the_idempotency_key => abandon_frees_the_idempotency_key;
    }
}

// [DESIGN] `migrate` may run on every start, from several instances at once.
#[tokio::test]
async fn design_migrate_is_idempotent_and_safe_to_run_concurrently() {
    with_store(|store| async move {
        store.migrate().await.expect("a second migrate succeeds");
        let rec = record(now_ms());
        store.create(rec.clone()).await.unwrap();
        store.migrate().await.expect("migrate with rows succeeds");
        assert_eq!(
            store.get(&rec.id, now_ms()).await.unwrap(),
            Some(rec),
            "migrate keeps existing rows"
        );

        // Instances starting together, on a table that does not exist yet.
        let table = format!("{}_new", store.table());
        let fresh = PostgresStore::new(store.pool().clone()).with_table(&table);
        let results = futures_util::future::join_all((0..4).map(|_| fresh.migrate())).await;
        drop_table(store.pool(), &table).await;
        for result in results {
            result.expect("concurrent migrates all succeed");
        }
    })
    .await;
}

// CANCEL-3: a cancel is announced with NOTIFY on the store's channel, once it committed; a
// cancel that removed nothing live announces nothing.
#[tokio::test]
async fn cancel_3_cancel_sends_notify_with_the_job_id() {
    with_store(|store| async move {
        assert_eq!(store.cancel_channel(), store.table());
        let mut listener = PgListener::connect_with(store.pool()).await.unwrap();
        listener.listen(store.cancel_channel()).await.unwrap();

        let now = now_ms();
        let finished = record(now);
        store.create(finished.clone()).await.unwrap();
        store
            .finish(&finished.id, completed(), now, now + SECOND)
            .await
            .unwrap();
        // Unknown, expired and finished jobs: nothing is running, so nothing is announced.
        assert!(!store.cancel(&JobId::new(), now).await.unwrap());
        assert!(!store.cancel(&finished.id, now + 2 * SECOND).await.unwrap());

        let running = record(now);
        store.create(running.clone()).await.unwrap();
        store
            .start(&running.id, "a", now + 30 * SECOND)
            .await
            .unwrap();
        assert!(store.cancel(&running.id, now).await.unwrap());

        let notification = tokio::time::timeout(NOTIFY_WAIT, listener.recv())
            .await
            .expect("a notification arrives within 5 s")
            .unwrap();
        assert_eq!(notification.channel(), store.cancel_channel());
        assert_eq!(
            notification.payload(),
            running.id.to_string(),
            "the first notification is the running job's, none came for the others"
        );
    })
    .await;
}

// CANCEL-3: `cancellations` yields the ids of jobs cancelled through any store on the table.
#[tokio::test]
async fn cancel_3_cancellations_stream_yields_cancelled_ids() {
    with_store(|store| async move {
        let mut ids = store
            .cancellations()
            .await
            .unwrap()
            .expect("PostgresStore offers a cancellation stream");
        // Another instance: its own pool, the same table.
        let other_pool = connect().await;
        let other = PostgresStore::new(other_pool.clone()).with_table(store.table());
        let now = now_ms();
        let rec = record(now);
        other.create(rec.clone()).await.unwrap();
        assert!(other.cancel(&rec.id, now).await.unwrap());
        let id = tokio::time::timeout(NOTIFY_WAIT, ids.next())
            .await
            .expect("the cancel arrives within 5 s");
        assert_eq!(id, Some(rec.id));
        other_pool.close().await;
    })
    .await;
}

// [DESIGN] an unreachable database is `Unavailable` (503, Retry-After), within the pool's
// acquire timeout, not a hang.
#[tokio::test]
async fn design_unreachable_database_is_unavailable_within_bounded_time() {
    let pool = PgPoolOptions::new()
        .acquire_timeout(Duration::from_millis(500))
        .connect_lazy("postgres://postgres@127.0.0.1:1/test")
        .expect("a lazy pool is created without connecting");
    let store = PostgresStore::new(pool);
    let started = Instant::now();
    let result = tokio::time::timeout(10 * SECOND, store.get(&JobId::new(), now_ms()))
        .await
        .expect("get gives up within the acquire timeout");
    assert!(
        matches!(result, Err(StoreError::Unavailable(_))),
        "{result:?}"
    );
    assert!(started.elapsed() < 5 * SECOND, "{:?}", started.elapsed());
}

// [DESIGN] a store whose table was never created says what to do.
#[tokio::test]
async fn design_missing_table_is_unavailable_and_names_migrate() {
    let pool = connect().await;
    let store = PostgresStore::new(pool.clone()).with_table(&fresh_table());
    let error = store
        .get(&JobId::new(), now_ms())
        .await
        .expect_err("the table does not exist");
    assert!(matches!(error, StoreError::Unavailable(_)), "{error:?}");
    let message = error.to_string();
    assert!(
        message.contains(store.table()) && message.contains("migrate()"),
        "{message}"
    );
    pool.close().await;
}

// EXPIRE-1: a backlog larger than one delete batch is swept entirely, and only it.
#[tokio::test]
async fn expire_1_sweep_deletes_more_than_one_batch() {
    with_store(|store| async move {
        let now = now_ms();
        let expired = 2500;
        futures_util::stream::iter(0..expired)
            .map(|_| {
                let mut rec = record(now - 60 * SECOND);
                rec.state = completed().into();
                rec.finished_at = Some(now - 60 * SECOND);
                rec.expires_at = Some(now - SECOND);
                store.create(rec)
            })
            .buffer_unordered(8)
            .for_each(|created| async move { created.expect("create should succeed") })
            .await;
        let lasting = record(now);
        store.create(lasting.clone()).await.unwrap();

        assert_eq!(store.sweep(now).await.unwrap(), expired);
        assert_eq!(store.sweep(now).await.unwrap(), 0, "nothing left to sweep");
        assert!(store.get(&lasting.id, now).await.unwrap().is_some());
        let left: i64 = sqlx::query_scalar(AssertSqlSafe(format!(
            "SELECT count(*) FROM \"{}\"",
            store.table()
        )))
        .fetch_one(store.pool())
        .await
        .unwrap();
        assert_eq!(left, 1, "only the unexpired row is left");
    })
    .await;
}

// CANCEL-6, STATUS-14: compare-and-set holds across connections: one start wins, and a finish
// racing a cancel never resurrects the job.
#[tokio::test]
async fn cancel_6_transitions_race_safely_across_connections() {
    with_store(|store| async move {
        let now = now_ms();
        let rec = record(now);
        let id = rec.id;
        store.create(rec).await.unwrap();
        let starts = futures_util::future::join_all((0..8).map(|i| {
            let store = store.clone();
            async move { store.start(&id, &format!("i{i}"), now + SECOND).await }
        }))
        .await;
        let won = starts.into_iter().filter(|s| *s.as_ref().unwrap()).count();
        assert_eq!(won, 1, "exactly one start wins");

        for _ in 0..20 {
            let rec = record(now);
            store.create(rec.clone()).await.unwrap();
            store.start(&rec.id, "a", now + SECOND).await.unwrap();
            let (finished, cancelled) = tokio::join!(
                store.finish(&rec.id, completed(), now, now + 60 * SECOND),
                store.cancel(&rec.id, now),
            );
            finished.unwrap();
            assert!(cancelled.unwrap(), "the job was there to cancel");
            assert_eq!(store.get(&rec.id, now).await.unwrap(), None);
        }
    })
    .await;
}

// [DESIGN] rows that do not decode are `Corrupt`, not a panic and not a wrong record.
#[tokio::test]
async fn design_undecodable_rows_are_corrupt() {
    with_store(|store| async move {
        let now = now_ms();
        let [bad_response, bad_state] = [record(now), record(now)];
        for rec in [&bad_response, &bad_state] {
            store.create(rec.clone()).await.unwrap();
        }
        store
            .finish(&bad_response.id, completed(), now, now + 60 * SECOND)
            .await
            .unwrap();
        let table = store.table();
        for (sql, id) in [
            (
                format!("UPDATE \"{table}\" SET response = '\\x09' WHERE id = $1"),
                bad_response.id,
            ),
            (
                format!("UPDATE \"{table}\" SET state = 'paused' WHERE id = $1"),
                bad_state.id,
            ),
        ] {
            sqlx::query(AssertSqlSafe(sql))
                .bind(id.to_string())
                .execute(store.pool())
                .await
                .unwrap();
            let result = store.get(&id, now).await;
            assert!(matches!(result, Err(StoreError::Corrupt(_))), "{result:?}");
        }
    })
    .await;
}

// [DESIGN] lease times and instance survive storage; progress is written only when it changes.
#[tokio::test]
async fn design_running_state_round_trips() {
    with_store(|store| async move {
        let now = now_ms();
        let rec = record(now);
        store.create(rec.clone()).await.unwrap();
        store
            .start(&rec.id, "pod-7", now + 45 * SECOND)
            .await
            .unwrap();
        store.set_progress(&rec.id, "1/3").await.unwrap();
        store.set_progress(&rec.id, "1/3").await.unwrap();
        let got = store.get(&rec.id, now).await.unwrap().unwrap();
        assert_eq!(
            got.state,
            JobState::Running {
                instance: "pod-7".into(),
                lease_until: now + 45 * SECOND
            }
        );
        assert_eq!(got.progress.as_deref(), Some("1/3"));
    })
    .await;
}

// SEC: the table name becomes SQL text, so only plain identifiers are accepted.
#[tokio::test]
#[should_panic(expected = "invalid PostgresStore table name")]
async fn sec_table_names_must_be_plain_identifiers() {
    let pool = PgPool::connect_lazy(DEFAULT_URL).unwrap();
    let _ = PostgresStore::new(pool).with_table("jobs\"; DROP TABLE x; --");
}

/// The table as version 0.1 of this crate created it, before idempotent kick-offs.
fn table_before_idempotency_keys(table: &str) -> Vec<String> {
    vec![
        format!(
            "CREATE TABLE \"{table}\" (
                id text COLLATE \"C\" PRIMARY KEY,
                kind text NOT NULL,
                state text NOT NULL,
                owner text,
                method text NOT NULL,
                target text NOT NULL,
                progress text,
                instance text,
                lease_until_ms bigint,
                response bytea,
                created_ms bigint NOT NULL,
                finished_ms bigint,
                expires_ms bigint
            )"
        ),
        format!(
            "CREATE INDEX \"{table}_lease\" ON \"{table}\" (lease_until_ms) \
             WHERE state = 'running'"
        ),
        format!(
            "CREATE INDEX \"{table}_unstarted\" ON \"{table}\" (created_ms) \
             WHERE state = 'accepted'"
        ),
        format!(
            "CREATE INDEX \"{table}_expires\" ON \"{table}\" (expires_ms) \
             WHERE expires_ms IS NOT NULL"
        ),
    ]
}

fn owned(at: SystemTime) -> JobRecord {
    record(at).with_owner(Some("alice".into()))
}

// KICK-9, issue #7 item 6: `migrate` upgrades a table created before idempotent kick-offs,
// keeping its rows; until then, a kick-off with a key says to call `migrate()`, and everything
// else keeps working.
#[tokio::test]
async fn kick_9_migrate_upgrades_a_table_from_before_idempotency_keys() {
    let pool = connect().await;
    let table = fresh_table();
    for statement in table_before_idempotency_keys(&table) {
        sqlx::query(AssertSqlSafe(statement))
            .execute(&pool)
            .await
            .unwrap();
    }
    let store = PostgresStore::new(pool.clone()).with_table(&table);
    let outcome = tokio::spawn(async move {
        let now = now_ms();
        let old = owned(now);
        store.create(old.clone()).await.unwrap();
        store.start(&old.id, "a", now + 30 * SECOND).await.unwrap();

        let error = store
            .create_once(owned(now), "k", now)
            .await
            .expect_err("the table has no idempotency_key column yet");
        assert!(matches!(error, StoreError::Unavailable(_)), "{error:?}");
        let message = error.to_string();
        assert!(
            message.contains(store.table()) && message.contains("migrate()"),
            "{message}"
        );

        store.migrate().await.expect("migrate upgrades the table");
        store.migrate().await.expect("and is idempotent afterwards");
        assert_eq!(
            store.get(&old.id, now).await.unwrap().map(|r| r.state),
            Some(JobState::Running {
                instance: "a".into(),
                lease_until: now + 30 * SECOND
            }),
            "existing rows are kept"
        );
        let first = owned(now);
        assert_eq!(
            store.create_once(first.clone(), "k", now).await.unwrap(),
            Created::New
        );
        assert_eq!(
            store.create_once(owned(now), "k", now).await.unwrap(),
            Created::Existing(first.id)
        );
        let index: Option<String> =
            sqlx::query_scalar("SELECT indexdef FROM pg_indexes WHERE indexname = $1")
                .bind(format!("{}_once", store.table()))
                .fetch_optional(store.pool())
                .await
                .unwrap();
        let index = index.expect("migrate created the unique index");
        assert!(index.starts_with("CREATE UNIQUE INDEX"), "{index}");
    })
    .await;
    drop_table(&pool, &table).await;
    pool.close().await;
    if let Err(error) = outcome {
        std::panic::resume_unwind(error.into_panic());
    }
}

// KICK-9, issue #7 item 6: one row per owner and key among jobs that count: an expired row is
// replaced by the new job in place, a failed row keeps its key but no longer holds it.
#[tokio::test]
async fn kick_9_rows_holding_a_key() {
    with_store(|store| async move {
        let count = |store: PostgresStore, key: &'static str| async move {
            sqlx::query_scalar::<_, i64>(AssertSqlSafe(format!(
                "SELECT count(*) FROM \"{}\" WHERE owner = 'alice' AND idempotency_key = $1",
                store.table()
            )))
            .bind(key)
            .fetch_one(store.pool())
            .await
            .unwrap()
        };
        let now = now_ms();
        let expired = owned(now);
        store.create_once(expired.clone(), "k", now).await.unwrap();
        store
            .finish(&expired.id, completed(), now, now + SECOND)
            .await
            .unwrap();
        let next = owned(now);
        assert_eq!(
            store
                .create_once(next.clone(), "k", now + SECOND)
                .await
                .unwrap(),
            Created::New
        );
        assert_eq!(
            count(store.clone(), "k").await,
            1,
            "the expired row was replaced"
        );
        assert_eq!(
            store.get(&next.id, now).await.unwrap().map(|r| r.state),
            Some(JobState::Accepted),
            "by the new job, whole"
        );
        assert_eq!(store.get(&expired.id, now).await.unwrap(), None);

        let failure = JobOutcome::Failed(StoredResponse {
            status: StatusCode::SERVICE_UNAVAILABLE,
            headers: vec![],
            body: Bytes::from_static(b"{}"),
        });
        store
            .finish(&next.id, failure, now, now + 60 * SECOND)
            .await
            .unwrap();
        let retry = owned(now);
        assert_eq!(
            store.create_once(retry.clone(), "k", now).await.unwrap(),
            Created::New
        );
        assert_eq!(
            count(store.clone(), "k").await,
            2,
            "the failed row stays readable"
        );
        assert!(store.get(&next.id, now).await.unwrap().is_some());
    })
    .await;
}

// KICK-9, issue #7 item 6: kick-offs with the same owner and key racing on many connections
// (several instances) create exactly one job, also while the job they find is being cancelled.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kick_9_kick_offs_racing_across_connections_have_one_winner() {
    with_store(|store| async move {
        let other_pool = connect().await;
        let other = PostgresStore::new(other_pool.clone()).with_table(store.table());
        for round in 0..10 {
            let now = now_ms();
            let key = format!("race-{round}");
            let records: Vec<JobRecord> = (0..16).map(|_| owned(now)).collect();
            let kick_offs = records.iter().enumerate().map(|(n, rec)| {
                let store = if n % 2 == 0 { &store } else { &other }.clone();
                let (rec, key) = (rec.clone(), key.clone());
                tokio::spawn(async move { store.create_once(rec, &key, now).await })
            });
            let results: Vec<Created> = futures_util::future::join_all(kick_offs)
                .await
                .into_iter()
                .map(|joined| joined.unwrap().unwrap())
                .collect();
            let winners: Vec<JobId> = records
                .iter()
                .zip(&results)
                .filter(|(_, created)| **created == Created::New)
                .map(|(rec, _)| rec.id)
                .collect();
            assert_eq!(winners.len(), 1, "{results:?}");
            assert!(
                results
                    .iter()
                    .all(|c| *c == Created::New || *c == Created::Existing(winners[0])),
                "{results:?}"
            );
            for rec in &records {
                assert_eq!(
                    store.get(&rec.id, now).await.unwrap().is_some(),
                    rec.id == winners[0]
                );
            }

            // A repeat racing a cancel of the job it finds: either it names the job (and the
            // cancel then removes it) or it creates a new one; never an error, never two.
            let repeat = owned(now);
            let (created, cancelled) = tokio::join!(
                tokio::spawn({
                    let (store, repeat, key) = (other.clone(), repeat.clone(), key.clone());
                    async move { store.create_once(repeat, &key, now).await }
                }),
                tokio::spawn({
                    let (store, id) = (store.clone(), winners[0]);
                    async move { store.cancel(&id, now).await }
                }),
            );
            assert!(cancelled.unwrap().unwrap());
            match created.unwrap().unwrap() {
                Created::Existing(id) => assert_eq!(id, winners[0]),
                Created::New => assert!(store.get(&repeat.id, now).await.unwrap().is_some()),
                other => panic!("{other:?}"),
            }
        }
        other_pool.close().await;
    })
    .await;
}
