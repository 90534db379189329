#![cfg(feature = "postgres")]
//! `PostgresStore` against a real PostgreSQL server: the public conformance suite, then what is
//! particular to PostgreSQL (migration, `NOTIFY` on cancel, errors, batched sweeping).
//!
//! The server is `DATABASE_URL` (default `postgres://postgres@127.0.0.1:5432/test`). These tests
//! fail, never skip, when it cannot be reached. Each test works in a table of its own,
//! `jobs_test_<random>`, dropped when the test ends, so tests run in parallel and leave nothing.

use std::future::Future;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use futures_util::StreamExt;
use http::StatusCode;
use tower_fhir_async::store::Created;
use tower_fhir_async::store::conformance::{Fixture, Transitions};
use tower_fhir_async::store::sqlx::postgres::{PgListener, PgPoolOptions};
use tower_fhir_async::store::sqlx::{self, AssertSqlSafe, PgPool};
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

/// A migrated table of its own per case; another handle is a second pool on the same table,
/// as another instance would have. Clean-up drops the table.
struct Postgres;

impl Fixture for Postgres {
    type Store = PostgresStore;

    async fn store(&self) -> PostgresStore {
        let store = PostgresStore::new(connect().await).with_table(&fresh_table());
        store.migrate().await.expect("migrate should succeed");
        store
    }

    async fn handle(&self, store: &PostgresStore) -> PostgresStore {
        PostgresStore::new(connect().await).with_table(store.table())
    }

    async fn clean_up(&self, store: PostgresStore) {
        drop_table(store.pool(), store.table()).await;
        store.pool().close().await;
    }
}

tower_fhir_async::store_conformance_tests!(Postgres);

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

// CANCEL-3: a cancel is announced with NOTIFY on the store's changes channel, once it
// committed; a cancel that removed nothing live announces nothing.
#[tokio::test]
async fn cancel_3_cancel_sends_notify_with_the_job_id() {
    with_store(|store| async move {
        assert_eq!(
            store.changes_channel(),
            format!("{}_changed", store.table())
        );
        let mut listener = PgListener::connect_with(store.pool()).await.unwrap();
        listener.listen(&store.changes_channel()).await.unwrap();

        let now = now_ms();
        let finished = record(now);
        store.create(finished.clone()).await.unwrap();
        store
            .finish(&finished.id, completed(), now, now + SECOND)
            .await
            .unwrap();
        // Its end is announced as an update.
        let notification = tokio::time::timeout(NOTIFY_WAIT, listener.recv())
            .await
            .expect("a notification arrives within 5 s")
            .unwrap();
        assert_eq!(notification.payload(), format!("updated {}", finished.id));
        // Unknown and expired jobs: nothing was there, so nothing is announced.
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
        assert_eq!(notification.channel(), store.changes_channel());
        assert_eq!(
            notification.payload(),
            format!("cancelled {}", running.id),
            "the next notification is the running job's cancel, none came for the others"
        );
    })
    .await;
}

// [DESIGN] an unreachable database is `Unavailable` (503, Retry-After), never a hang (the call
// is bounded only to turn a hang into a failure).
#[tokio::test]
async fn design_unreachable_database_is_unavailable_within_bounded_time() {
    let pool = PgPoolOptions::new()
        .acquire_timeout(Duration::from_millis(500))
        .connect_lazy("postgres://postgres@127.0.0.1:1/test")
        .expect("a lazy pool is created without connecting");
    let store = PostgresStore::new(pool);
    let result = tokio::time::timeout(10 * SECOND, store.get(&JobId::new(), now_ms()))
        .await
        .expect("get gives up within the acquire timeout");
    assert!(
        matches!(result, Err(StoreError::Unavailable(_))),
        "{result:?}"
    );
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
