//! `RedisStore` against a real Redis server: the public store conformance suite (every case also
//! as its own test, so a failure names the case), then what only Redis has: native expiry, the
//! sorted-set indexes, the cancel channel, and failing fast when Redis is unreachable.
//!
//! Connects to `REDIS_URL` (default `redis://127.0.0.1:6379`) and fails, never skips, when no
//! server answers. Each test uses a key prefix of its own under one random prefix per run, and
//! deletes its keys when it ends, passed or failed.

#![cfg(feature = "redis")]

use std::collections::HashSet;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::LazyLock;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use futures_util::{FutureExt, StreamExt};
use http::{HeaderValue, StatusCode};
use tower_fhir_async::redis::aio::{ConnectionManager, MultiplexedConnection};
use tower_fhir_async::redis::{self, Client};
use tower_fhir_async::store::{Cancellations, Created, conformance};
use tower_fhir_async::{
    JobId, JobKind, JobOutcome, JobRecord, JobState, JobStore, RedisStore, StoreError,
    StoredResponse,
};

const SECOND: Duration = Duration::from_secs(1);

/// One random prefix per run of this test binary, so runs never see each other's keys.
static RUN: LazyLock<String> = LazyLock::new(|| format!("test-{}:", JobId::new()));

fn redis_url() -> String {
    std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

fn no_redis(url: &str, why: impl std::fmt::Display) -> ! {
    panic!(
        "cannot reach Redis at {url}: {why}. These tests need a Redis server: start one with \
         `redis-server --daemonize yes --port 6379 --save '' --appendonly no`, or set REDIS_URL"
    )
}

/// A second, plain connection for looking behind the store's back.
async fn raw_connection() -> MultiplexedConnection {
    let url = redis_url();
    let client = Client::open(url.as_str()).unwrap_or_else(|err| no_redis(&url, err));
    match tokio::time::timeout(10 * SECOND, client.get_multiplexed_async_connection()).await {
        Ok(Ok(connection)) => connection,
        Ok(Err(err)) => no_redis(&url, err),
        Err(_) => no_redis(&url, "no connection within 10 s"),
    }
}

/// Runs `test` against a store with the prefix `{RUN}{name}:`, then deletes every key under it,
/// also when the test panics.
async fn with_store<F, Fut>(name: &str, test: F)
where
    F: FnOnce(RedisStore) -> Fut,
    Fut: Future<Output = ()>,
{
    let url = redis_url();
    let store = match tokio::time::timeout(10 * SECOND, RedisStore::connect(&url)).await {
        Ok(Ok(store)) => store.with_prefix(format!("{}{name}:", *RUN)),
        Ok(Err(err)) => no_redis(&url, err),
        Err(_) => no_redis(&url, "no connection within 10 s"),
    };
    let outcome = AssertUnwindSafe(test(store.clone())).catch_unwind().await;
    delete_keys(store.prefix()).await;
    if let Err(panic) = outcome {
        std::panic::resume_unwind(panic);
    }
}

async fn delete_keys(prefix: &str) {
    let mut connection = raw_connection().await;
    let mut cursor = 0u64;
    loop {
        let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(format!("{prefix}*"))
            .arg("COUNT")
            .arg(1000)
            .query_async(&mut connection)
            .await
            .expect("SCAN for the test's keys");
        if !keys.is_empty() {
            let _: i64 = redis::cmd("DEL")
                .arg(&keys)
                .query_async(&mut connection)
                .await
                .expect("DEL the test's keys");
        }
        if next == 0 {
            return;
        }
        cursor = next;
    }
}

/// Now, to the millisecond, as the conformance suite does.
fn now_ms() -> SystemTime {
    let ms = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_millis();
    SystemTime::UNIX_EPOCH + Duration::from_millis(u64::try_from(ms).unwrap())
}

fn millis(at: SystemTime) -> f64 {
    at.duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_millis() as f64
}

fn record(at: SystemTime) -> JobRecord {
    JobRecord::new(
        JobId::new(),
        JobKind::Interaction,
        "POST",
        "/fhir/$reindex",
        at,
    )
}

fn response(status: u16, body: &'static str) -> StoredResponse {
    StoredResponse {
        status: StatusCode::from_u16(status).unwrap(),
        headers: vec![(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static("application/fhir+json"),
        )],
        body: Bytes::from_static(body.as_bytes()),
    }
}

fn done() -> JobOutcome {
    JobOutcome::Completed(response(200, "{}"))
}

async fn query<T: redis::FromRedisValue>(cmd: &mut redis::Cmd) -> T {
    cmd.query_async(&mut raw_connection().await)
        .await
        .expect("query Redis directly")
}

async fn score(store: &RedisStore, index: &str, id: &JobId) -> Option<f64> {
    query(
        redis::cmd("ZSCORE")
            .arg(format!("{}{index}", store.prefix()))
            .arg(id.to_string()),
    )
    .await
}

async fn exists(store: &RedisStore, id: &JobId) -> bool {
    query::<i64>(redis::cmd("EXISTS").arg(store.job_key(id))).await == 1
}

/// Held while a test opens a pub/sub connection, so that another can tell its own apart.
static NEW_SUBSCRIBERS: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The ids of the server's connections subscribed to a channel.
async fn subscriber_ids() -> HashSet<String> {
    let list: String = query(redis::cmd("CLIENT").arg("LIST")).await;
    list.lines()
        .filter(|line| {
            line.split(' ')
                .any(|f| f.starts_with("sub=") && f != "sub=0")
        })
        .filter_map(|line| line.split(' ').find_map(|f| f.strip_prefix("id=")))
        .map(str::to_owned)
        .collect()
}

/// The next id of a cancellations stream, within 5 s.
async fn next_cancelled(ids: &mut Cancellations) -> JobId {
    tokio::time::timeout(5 * SECOND, ids.next())
        .await
        .expect("a cancelled id within 5 s")
        .expect("the stream is open")
}

async fn pttl(store: &RedisStore, id: &JobId) -> i64 {
    query(redis::cmd("PTTL").arg(store.job_key(id))).await
}

mod conformance_cases {
    use super::*;

    // CANCEL-3, CANCEL-5, CANCEL-6, EXPIRE-3 (all store-level cases at once, sharing one store).
    #[tokio::test]
    async fn cancel_3_expire_3_run_all_cases_on_one_shared_store() {
        with_store("run-all", |store| async move {
            conformance::run_all(&store).await;
        })
        .await;
    }

    // [DESIGN] create / get round trip.
    #[tokio::test]
    async fn design_create_then_get_returns_the_record() {
        with_store("create-get", |store| async move {
            conformance::create_then_get_returns_the_record(&store).await;
        })
        .await;
    }

    // [DESIGN] ids are unique in the store.
    #[tokio::test]
    async fn design_create_rejects_a_taken_id() {
        with_store("conflict", |store| async move {
            conformance::create_rejects_a_taken_id(&store).await;
        })
        .await;
    }

    // STATUS-15, CANCEL-7: unknown ids are absent for every operation.
    #[tokio::test]
    async fn status_15_cancel_7_unknown_ids_are_absent() {
        with_store("unknown", |store| async move {
            conformance::unknown_ids_are_absent(&store).await;
        })
        .await;
    }

    // [DESIGN] Accepted → Running is a compare-and-set.
    #[tokio::test]
    async fn design_start_moves_accepted_to_running_once() {
        with_store("start", |store| async move {
            conformance::start_moves_accepted_to_running_once(&store).await;
        })
        .await;
    }

    // STATUS-14: the first finish wins; the result never changes afterwards.
    #[tokio::test]
    async fn status_14_finish_first_transition_wins() {
        with_store("finish-once", |store| async move {
            conformance::finish_first_transition_wins(&store).await;
        })
        .await;
    }

    // [DESIGN] a job that never started can be failed (shutdown).
    #[tokio::test]
    async fn design_finish_from_accepted_is_allowed() {
        with_store("finish-accepted", |store| async move {
            conformance::finish_from_accepted_is_allowed(&store).await;
        })
        .await;
    }

    // CANCEL-3, CANCEL-6: a cancelled job is absent and never resurrected.
    #[tokio::test]
    async fn cancel_3_cancel_6_cancel_removes_the_job_and_blocks_later_transitions() {
        with_store("cancel", |store| async move {
            conformance::cancel_removes_the_job_and_blocks_later_transitions(&store).await;
        })
        .await;
    }

    // CANCEL-5: cancel after completion removes the result.
    #[tokio::test]
    async fn cancel_5_cancel_after_finish_removes_the_result() {
        with_store("cancel-finished", |store| async move {
            conformance::cancel_after_finish_removes_the_result(&store).await;
        })
        .await;
    }

    // EXPIRE-3, CANCEL-7: expired records are absent before any sweep.
    #[tokio::test]
    async fn expire_3_expired_records_are_absent_before_any_sweep() {
        with_store("expired", |store| async move {
            conformance::expired_records_are_absent_before_any_sweep(&store).await;
        })
        .await;
    }

    // EXPIRE-1: sweeping reclaims expired records only.
    #[tokio::test]
    async fn expire_1_sweep_removes_only_expired_records() {
        with_store("sweep", |store| async move {
            conformance::sweep_removes_only_expired_records(&store).await;
        })
        .await;
    }

    // STATUS-4: progress is kept while the job runs, dropped when it ends.
    #[tokio::test]
    async fn status_4_progress_is_kept_until_the_job_ends() {
        with_store("progress", |store| async move {
            conformance::progress_is_kept_until_the_job_ends(&store).await;
        })
        .await;
    }

    // [DESIGN] lease renewal names the jobs that stopped running on this instance.
    #[tokio::test]
    async fn design_renew_leases_reports_jobs_that_stopped_running_here() {
        with_store("renew", |store| async move {
            conformance::renew_leases_reports_jobs_that_stopped_running_here(&store).await;
        })
        .await;
    }

    // [DESIGN] a job whose instance died is failed, never left running forever.
    #[tokio::test]
    async fn design_fail_lapsed_fails_only_lapsed_running_jobs() {
        with_store("lapsed", |store| async move {
            conformance::fail_lapsed_fails_only_lapsed_running_jobs(&store).await;
        })
        .await;
    }

    // STATUS-14, BUNDLE-*: stored responses survive storage byte for byte.
    #[tokio::test]
    async fn status_14_stored_responses_round_trip_exactly() {
        with_store("round-trip", |store| async move {
            conformance::stored_responses_round_trip_exactly(&store).await;
        })
        .await;
    }

    // KICK-9, issue #7 item 6: a repeat with the same owner and key names the first job.
    #[tokio::test]
    async fn kick_9_create_once_returns_the_existing_job_for_a_repeated_key() {
        with_store("once-repeat", |store| async move {
            conformance::create_once_returns_the_existing_job_for_a_repeated_key(&store).await;
        })
        .await;
    }

    // KICK-9, issue #7 item 6: keys are scoped to the caller, never shared across callers.
    #[tokio::test]
    async fn kick_9_create_once_never_matches_across_owners() {
        with_store("once-owners", |store| async move {
            conformance::create_once_never_matches_across_owners(&store).await;
        })
        .await;
    }

    // KICK-9, issue #7 item 6 (Idempotency-Key): without a caller identity, a key never matches.
    #[tokio::test]
    async fn kick_9_create_once_without_an_owner_always_creates() {
        with_store("once-no-owner", |store| async move {
            conformance::create_once_without_an_owner_always_creates(&store).await;
        })
        .await;
    }

    // KICK-9, issue #7 item 6 (Idempotency-Key): a cancelled job is never returned for a repeat.
    #[tokio::test]
    async fn kick_9_create_once_after_cancel_creates_a_new_job() {
        with_store("once-cancel", |store| async move {
            conformance::create_once_after_cancel_creates_a_new_job(&store).await;
        })
        .await;
    }

    // KICK-9, issue #7 item 6 (Idempotency-Key): a failed job is never returned for a repeat.
    #[tokio::test]
    async fn kick_9_create_once_after_failure_creates_a_new_job() {
        with_store("once-failure", |store| async move {
            conformance::create_once_after_failure_creates_a_new_job(&store).await;
        })
        .await;
    }

    // KICK-9, issue #7 item 6: a completed job is returned until it expires.
    #[tokio::test]
    async fn kick_9_create_once_returns_a_completed_job_until_it_expires() {
        with_store("once-expiry", |store| async move {
            conformance::create_once_returns_a_completed_job_until_it_expires(&store).await;
        })
        .await;
    }

    // KICK-9, issue #7 item 6 (Idempotency-Key): concurrent repeats create exactly one job.
    #[tokio::test]
    async fn kick_9_create_once_has_one_winner_among_concurrent_kick_offs() {
        with_store("once-race", |store| async move {
            conformance::create_once_has_one_winner_among_concurrent_kick_offs(&store).await;
        })
        .await;
    }

    // KICK-9, issue #7 item 6: keys up to MAX_IDEMPOTENCY_KEY_LEN bytes of any text.
    #[tokio::test]
    async fn kick_9_create_once_supports_the_longest_key() {
        with_store("once-long-key", |store| async move {
            conformance::create_once_supports_the_longest_key(&store).await;
        })
        .await;
    }

    // KICK-9, issue #7 item 6 (Idempotency-Key): a taken id is a conflict and leaves the key free.
    #[tokio::test]
    async fn kick_9_create_once_rejects_a_taken_id() {
        with_store("once-conflict", |store| async move {
            conformance::create_once_rejects_a_taken_id(&store).await;
        })
        .await;
    }

    // KICK-9, issue #11 item 2: a kick-off answered 503 leaves no job, even when its create lands late.
    #[tokio::test]
    async fn kick_9_abandon_removes_the_job_and_blocks_a_late_create() {
        with_store("abandon_removes_the_", |store| async move {
            conformance::abandon_removes_the_job_and_blocks_a_late_create(&store).await;
        })
        .await;
    }

    // KICK-9, issue #11 item 2: an abandon that overtakes its create still leaves no job.
    #[tokio::test]
    async fn kick_9_abandon_before_create_blocks_the_create() {
        with_store("abandon_before_creat", |store| async move {
            conformance::abandon_before_create_blocks_the_create(&store).await;
        })
        .await;
    }

    // KICK-9, issue #11 item 2: an idempotent retry never names an abandoned job.
    #[tokio::test]
    async fn kick_9_abandon_frees_the_idempotency_key() {
        with_store("abandon_frees_the_id", |store| async move {
            conformance::abandon_frees_the_idempotency_key(&store).await;
        })
        .await;
    }
}

// EXPIRE-1: Redis reclaims finished jobs itself: finishing sets a native expiry on the job's
// key, relative to the caller's times, so it holds even for a caller whose clock is far from
// Redis's. Unfinished jobs never expire.
#[tokio::test]
async fn expire_1_finished_jobs_get_a_native_expiry() {
    with_store("native-expiry", |store| async move {
        let now = now_ms();
        let rec = record(now);
        store.create(rec.clone()).await.unwrap();
        store.start(&rec.id, "a", now + 30 * SECOND).await.unwrap();
        assert_eq!(
            pttl(&store, &rec.id).await,
            -1,
            "a running job has no expiry"
        );
        store
            .finish(&rec.id, done(), now, now + 60 * SECOND)
            .await
            .unwrap();
        let ttl = pttl(&store, &rec.id).await;
        assert!(
            (50_000..=60_000).contains(&ttl),
            "a finished job expires 60 s after it finished (PTTL {ttl} ms)"
        );

        // Times of a caller in 1970: the record still lives for expires_at - now.
        let base = SystemTime::UNIX_EPOCH + 1_000_000 * SECOND;
        let old = record(base);
        store.create(old.clone()).await.unwrap();
        store.start(&old.id, "dead", base + SECOND).await.unwrap();
        let outcome = JobOutcome::Failed(response(503, "{}"));
        let failed = store
            .fail_lapsed(base + 2 * SECOND, base, outcome, base + 122 * SECOND)
            .await
            .unwrap();
        assert_eq!(failed, vec![old.id]);
        let ttl = pttl(&store, &old.id).await;
        assert!(
            (110_000..=120_000).contains(&ttl),
            "a lapsed job failed by fail_lapsed expires 120 s later (PTTL {ttl} ms)"
        );
    })
    .await;
}

// EXPIRE-3: a record is absent at its expiry by the caller's clock, while Redis still holds it.
#[tokio::test]
async fn expire_3_reads_compare_expiry_with_now_before_redis_removes_the_key() {
    with_store("read-expiry", |store| async move {
        let now = now_ms();
        let rec = record(now);
        store.create(rec.clone()).await.unwrap();
        store
            .finish(&rec.id, done(), now, now + 60 * SECOND)
            .await
            .unwrap();
        assert!(
            store
                .get(&rec.id, now + 59 * SECOND)
                .await
                .unwrap()
                .is_some()
        );
        assert_eq!(store.get(&rec.id, now + 60 * SECOND).await.unwrap(), None);
        assert!(exists(&store, &rec.id).await, "Redis still holds the key");
    })
    .await;
}

// EXPIRE-1: when Redis expired a job itself, sweep only drops its index entry and counts
// nothing; a job Redis still holds past its expiry is deleted and counted.
#[tokio::test]
async fn expire_1_sweep_drops_index_entries_of_jobs_redis_already_expired() {
    with_store("sweep-native", |store| async move {
        let now = now_ms();
        let gone = record(now);
        store.create(gone.clone()).await.unwrap();
        let at = now + Duration::from_millis(20);
        store.finish(&gone.id, done(), now, at).await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(!exists(&store, &gone.id).await, "Redis expired the key");
        assert!(score(&store, "expiring", &gone.id).await.is_some());

        let held = record(now);
        store.create(held.clone()).await.unwrap();
        store
            .finish(&held.id, done(), now, now + 60 * SECOND)
            .await
            .unwrap();

        assert_eq!(
            store.sweep(now + SECOND).await.unwrap(),
            0,
            "nothing left to delete"
        );
        assert_eq!(
            score(&store, "expiring", &gone.id).await,
            None,
            "index entry dropped"
        );
        assert!(
            score(&store, "expiring", &held.id).await.is_some(),
            "live entry kept"
        );

        assert_eq!(store.sweep(now + 60 * SECOND).await.unwrap(), 1);
        assert!(!exists(&store, &held.id).await);
        assert_eq!(score(&store, "expiring", &held.id).await, None);
    })
    .await;
}

// [DESIGN] The sorted sets follow every transition: accepted by creation time, running by lease
// end, finished by expiry, and a cancelled job leaves every one of them.
#[tokio::test]
async fn design_indexes_follow_every_transition() {
    with_store("indexes", |store| async move {
        let now = now_ms();
        let rec = record(now);
        let id = &rec.id;
        store.create(rec.clone()).await.unwrap();
        assert_eq!(score(&store, "accepted", id).await, Some(millis(now)));
        assert_eq!(score(&store, "running", id).await, None);

        store.start(id, "a", now + 30 * SECOND).await.unwrap();
        assert_eq!(score(&store, "accepted", id).await, None);
        assert_eq!(
            score(&store, "running", id).await,
            Some(millis(now + 30 * SECOND))
        );

        let gone = store
            .renew_leases("a", &[*id], now + 90 * SECOND)
            .await
            .unwrap();
        assert!(gone.is_empty());
        assert_eq!(
            score(&store, "running", id).await,
            Some(millis(now + 90 * SECOND))
        );

        store
            .finish(id, done(), now + SECOND, now + 3600 * SECOND)
            .await
            .unwrap();
        assert_eq!(score(&store, "running", id).await, None);
        assert_eq!(
            score(&store, "expiring", id).await,
            Some(millis(now + 3600 * SECOND))
        );

        assert!(store.cancel(id, now).await.unwrap());
        for index in ["accepted", "running", "expiring"] {
            assert_eq!(score(&store, index, id).await, None, "{index}");
        }
        assert!(!exists(&store, id).await);
    })
    .await;
}

// CANCEL-3: a cancel publishes the job's id on the cancel channel, once, in the same atomic
// step; cancelling an unknown or expired job publishes nothing.
#[tokio::test]
async fn cancel_3_cancel_publishes_the_id_on_the_cancel_channel() {
    with_store("publish", |store| async move {
        assert_eq!(store.cancel_channel(), format!("{}cancel", store.prefix()));
        let url = redis_url();
        let client = Client::open(url.as_str()).unwrap();
        let new_subscriber = NEW_SUBSCRIBERS.lock().await;
        let mut pubsub = client
            .get_async_pubsub()
            .await
            .unwrap_or_else(|err| no_redis(&url, err));
        pubsub.subscribe(store.cancel_channel()).await.unwrap();
        drop(new_subscriber);
        let mut messages = pubsub.on_message();
        let mut next = async || {
            let message = tokio::time::timeout(5 * SECOND, messages.next())
                .await
                .expect("a cancel message within 5 s")
                .expect("the subscription is open");
            assert_eq!(message.get_channel_name(), store.cancel_channel());
            message.get_payload::<String>().unwrap()
        };

        let now = now_ms();
        let running = record(now);
        store.create(running.clone()).await.unwrap();
        store
            .start(&running.id, "a", now + 30 * SECOND)
            .await
            .unwrap();
        assert!(store.cancel(&running.id, now).await.unwrap());
        assert_eq!(next().await, running.id.to_string());

        // Neither of these publishes: the next message is the last cancel's.
        assert!(!store.cancel(&JobId::new(), now).await.unwrap());
        let expired = record(now);
        store.create(expired.clone()).await.unwrap();
        store
            .finish(&expired.id, done(), now, now + SECOND)
            .await
            .unwrap();
        assert!(!store.cancel(&expired.id, now + 2 * SECOND).await.unwrap());
        let accepted = record(now);
        store.create(accepted.clone()).await.unwrap();
        assert!(store.cancel(&accepted.id, now).await.unwrap());
        assert_eq!(next().await, accepted.id.to_string());
    })
    .await;
}

// [DESIGN] An unreachable Redis is StoreError::Unavailable (the layer's 503), quickly, from
// every entry point: never a panic, never a hang.
#[tokio::test]
async fn design_an_unreachable_redis_is_unavailable_and_fails_fast() {
    let unreachable = "redis://127.0.0.1:1";
    let started = Instant::now();
    let connected = tokio::time::timeout(10 * SECOND, RedisStore::connect(unreachable))
        .await
        .expect("connect gives up within 10 s");
    assert!(
        matches!(connected, Err(StoreError::Unavailable(_))),
        "connect: {connected:?}"
    );

    // A manager that connects lazily, as one built while Redis is down would be.
    let client = Client::open(unreachable).unwrap();
    let manager =
        ConnectionManager::new_lazy_with_config(client, RedisStore::manager_config()).unwrap();
    let store = RedisStore::new(manager);
    let id = JobId::new();
    for attempt in 0..3 {
        let got = tokio::time::timeout(10 * SECOND, store.get(&id, now_ms()))
            .await
            .expect("get gives up within 10 s");
        let Err(err @ StoreError::Unavailable(_)) = got else {
            panic!("get, attempt {attempt}: expected Unavailable, got {got:?}");
        };
        assert!(err.to_string().contains("unavailable"), "{err}");
    }
    let cancelled = tokio::time::timeout(10 * SECOND, store.cancel(&id, now_ms()))
        .await
        .expect("cancel gives up within 10 s");
    assert!(
        matches!(cancelled, Err(StoreError::Unavailable(_))),
        "{cancelled:?}"
    );
    let store = store.with_pubsub(Client::open(unreachable).unwrap());
    let subscribed = tokio::time::timeout(10 * SECOND, store.cancellations())
        .await
        .expect("cancellations gives up within 10 s");
    assert!(
        matches!(subscribed, Err(StoreError::Unavailable(_))),
        "cancellations"
    );
    let elapsed = started.elapsed();
    assert!(
        elapsed < 10 * SECOND,
        "six failed operations took {elapsed:?}"
    );

    let invalid = RedisStore::connect("not a url").await;
    assert!(
        matches!(&invalid, Err(StoreError::Unavailable(err)) if err.to_string().contains("URL")),
        "{invalid:?}"
    );
}

/// A hash field and the bytes written into it behind the store's back.
type Field = (&'static str, &'static [u8]);

// [DESIGN] Data the store did not write is StoreError::Corrupt, never a panic or a wrong record.
#[tokio::test]
async fn design_undecodable_records_are_corrupt() {
    with_store("corrupt", |store| async move {
        let now = now_ms();
        let cases: [(&str, &[Field]); 5] = [
            ("unknown state", &[("state", b"paused")]),
            ("completed without response", &[("state", b"completed")]),
            (
                "bad response",
                &[("state", b"failed"), ("response", b"\x09garbage")],
            ),
            (
                "bad time",
                &[("state", b"accepted"), ("created", b"yesterday")],
            ),
            (
                "bad kind",
                &[("state", b"accepted"), ("kind", b"bulk-export")],
            ),
        ];
        for (what, overrides) in cases {
            let rec = record(now);
            store.create(rec.clone()).await.unwrap();
            let mut hset = redis::cmd("HSET");
            hset.arg(store.job_key(&rec.id));
            for (field, value) in overrides {
                hset.arg(*field).arg(*value);
            }
            query::<i64>(&mut hset).await;
            let got = store.get(&rec.id, now).await;
            assert!(
                matches!(got, Err(StoreError::Corrupt(_))),
                "{what}: {got:?}"
            );
        }

        // A key of another type where a job should be.
        let id = JobId::new();
        query::<()>(redis::cmd("SET").arg(store.job_key(&id)).arg("not a hash")).await;
        let got = store.get(&id, now).await;
        assert!(
            matches!(got, Err(StoreError::Corrupt(_))),
            "a string key: {got:?}"
        );
        let started = store.start(&id, "a", now).await;
        assert!(
            matches!(started, Err(StoreError::Corrupt(_))),
            "{started:?}"
        );
    })
    .await;
}

// STATUS-14, CANCEL-6: transitions race between many connections and exactly one wins; a cancel
// racing a finish leaves no record either way.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn status_14_cancel_6_concurrent_transitions_have_one_winner() {
    with_store("races", |store| async move {
        let now = now_ms();
        let rec = record(now);
        store.create(rec.clone()).await.unwrap();
        let finishes = (0..16u16).map(|n| {
            let store = store.clone();
            let id = rec.id;
            tokio::spawn(async move {
                let outcome = JobOutcome::Completed(response(200 + n, "{}"));
                let won = store
                    .finish(&id, outcome, now, now + 60 * SECOND)
                    .await
                    .unwrap();
                won.then_some(200 + n)
            })
        });
        let winners: Vec<u16> = futures_util::future::join_all(finishes)
            .await
            .into_iter()
            .filter_map(|joined| joined.unwrap())
            .collect();
        assert_eq!(winners.len(), 1, "exactly one finish wins: {winners:?}");
        let JobState::Completed(stored) = store.get(&rec.id, now).await.unwrap().unwrap().state
        else {
            panic!("the job is completed");
        };
        assert_eq!(
            stored.status.as_u16(),
            winners[0],
            "the winner's result is kept"
        );

        for _ in 0..20 {
            let rec = record(now);
            store.create(rec.clone()).await.unwrap();
            store.start(&rec.id, "a", now + 30 * SECOND).await.unwrap();
            let (finish, cancel) = tokio::join!(
                tokio::spawn({
                    let store = store.clone();
                    async move { store.finish(&rec.id, done(), now, now + 60 * SECOND).await }
                }),
                tokio::spawn({
                    let store = store.clone();
                    async move { store.cancel(&rec.id, now).await }
                }),
            );
            let (_finished, cancelled) = (finish.unwrap().unwrap(), cancel.unwrap().unwrap());
            assert!(cancelled, "the job was there to cancel, finished or not");
            assert_eq!(
                store.get(&rec.id, now).await.unwrap(),
                None,
                "never resurrected"
            );
            assert!(!exists(&store, &rec.id).await);
        }
    })
    .await;
}

// [DESIGN] fail_lapsed, sweep and renew_leases work through backlogs larger than one script run.
#[tokio::test]
async fn design_backlogs_are_worked_through_in_batches() {
    with_store("batches", |store| async move {
        let base = SystemTime::UNIX_EPOCH + 2_000_000 * SECOND;
        let mut accepted = Vec::new();
        let mut running = Vec::new();
        for n in 0..600 {
            let rec = record(base);
            store.create(rec.clone()).await.unwrap();
            if n % 2 == 0 {
                store.start(&rec.id, "here", base + SECOND).await.unwrap();
                running.push(rec.id);
            } else {
                accepted.push(rec.id);
            }
        }
        let unknown = JobId::new();
        let mut ids = running.clone();
        ids.push(unknown);
        let gone = store
            .renew_leases("here", &ids, base + 5 * SECOND)
            .await
            .unwrap();
        assert_eq!(
            gone,
            vec![unknown],
            "all 300 running jobs renewed, in chunks"
        );
        let last = store
            .get(running.last().unwrap(), base)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            last.state,
            JobState::Running {
                instance: "here".into(),
                lease_until: base + 5 * SECOND
            }
        );

        let outcome = JobOutcome::Failed(response(503, "{}"));
        let expires = base + 3600 * SECOND;
        let mut failed = store
            .fail_lapsed(base + 10 * SECOND, base, outcome, expires)
            .await
            .unwrap();
        failed.sort();
        let mut expected = [running, accepted].concat();
        expected.sort();
        assert_eq!(failed, expected, "all 600 lapsed jobs failed");
        for index in ["accepted", "running"] {
            let left: i64 =
                query(redis::cmd("ZCARD").arg(format!("{}{index}", store.prefix()))).await;
            assert_eq!(left, 0, "failed jobs left the {index} index");
        }

        assert_eq!(store.sweep(expires - SECOND).await.unwrap(), 0);
        assert_eq!(store.sweep(expires).await.unwrap(), 600, "all 600 swept");
        let left: i64 = query(redis::cmd("ZCARD").arg(format!("{}expiring", store.prefix()))).await;
        assert_eq!(left, 0);
    })
    .await;
}

// [DESIGN] Stores with different prefixes share a server without seeing each other's jobs.
#[tokio::test]
async fn design_prefixes_keep_stores_apart() {
    with_store("prefix-a", |a| async move {
        let b = a.clone().with_prefix(format!("{}other:", a.prefix()));
        let now = now_ms();
        let rec = record(now);
        a.create(rec.clone()).await.unwrap();
        assert_eq!(b.get(&rec.id, now).await.unwrap(), None);
        b.create(rec.clone())
            .await
            .expect("the same id is free in another prefix");
        assert!(b.cancel(&rec.id, now).await.unwrap());
        assert!(a.get(&rec.id, now).await.unwrap().is_some());
    })
    .await;
}

// CANCEL-3: cancellations() streams the ids of jobs cancelled through any instance (any store on
// the same server and prefix), and skips messages on the channel that are not job ids.
#[tokio::test]
async fn cancel_3_cancellations_stream_ids_cancelled_through_any_instance() {
    with_store("cancellations", |here| async move {
        let url = redis_url();
        let elsewhere = RedisStore::connect(&url)
            .await
            .unwrap_or_else(|err| no_redis(&url, err))
            .with_prefix(here.prefix());
        let new_subscriber = NEW_SUBSCRIBERS.lock().await;
        let mut ids = here
            .cancellations()
            .await
            .unwrap()
            .expect("a store made by connect() subscribes");
        drop(new_subscriber);

        let now = now_ms();
        let rec = record(now);
        here.create(rec.clone()).await.unwrap();
        here.start(&rec.id, "here", now + 30 * SECOND)
            .await
            .unwrap();
        assert!(elsewhere.cancel(&rec.id, now).await.unwrap());
        assert_eq!(next_cancelled(&mut ids).await, rec.id);

        query::<i64>(
            redis::cmd("PUBLISH")
                .arg(here.cancel_channel())
                .arg("not a job id"),
        )
        .await;
        assert!(!elsewhere.cancel(&JobId::new(), now).await.unwrap());
        let other = record(now);
        here.create(other.clone()).await.unwrap();
        assert!(elsewhere.cancel(&other.id, now).await.unwrap());
        assert_eq!(
            next_cancelled(&mut ids).await,
            other.id,
            "the junk was skipped"
        );

        // Another prefix's cancels are not ours.
        let stranger = elsewhere
            .clone()
            .with_prefix(format!("{}stranger:", here.prefix()));
        let theirs = record(now);
        stranger.create(theirs.clone()).await.unwrap();
        assert!(stranger.cancel(&theirs.id, now).await.unwrap());
        let last = record(now);
        here.create(last.clone()).await.unwrap();
        assert!(here.cancel(&last.id, now).await.unwrap());
        assert_eq!(next_cancelled(&mut ids).await, last.id);
    })
    .await;
}

// [DESIGN] The cancellations stream ends when its connection drops, and asking again works; a
// store built from a bare ConnectionManager has no stream unless given a client.
#[tokio::test]
async fn design_cancellations_end_with_their_connection_and_can_be_asked_again() {
    with_store("resubscribe", |store| async move {
        let new_subscriber = NEW_SUBSCRIBERS.lock().await;
        let before = subscriber_ids().await;
        let mut ids = store.cancellations().await.unwrap().unwrap();
        let mine: Vec<String> = subscriber_ids()
            .await
            .difference(&before)
            .cloned()
            .collect();
        drop(new_subscriber);
        assert_eq!(mine.len(), 1, "one new subscribed connection: {mine:?}");
        query::<()>(redis::cmd("CLIENT").arg("KILL").arg("ID").arg(&mine[0])).await;
        let ended = tokio::time::timeout(5 * SECOND, ids.next())
            .await
            .expect("the stream ends within 5 s of its connection dropping");
        assert_eq!(ended, None);

        let mut ids = store.cancellations().await.unwrap().unwrap();
        let now = now_ms();
        let rec = record(now);
        store.create(rec.clone()).await.unwrap();
        assert!(store.cancel(&rec.id, now).await.unwrap());
        assert_eq!(next_cancelled(&mut ids).await, rec.id);

        let url = redis_url();
        let client = Client::open(url.as_str()).unwrap();
        let manager =
            ConnectionManager::new_with_config(client.clone(), RedisStore::manager_config())
                .await
                .unwrap_or_else(|err| no_redis(&url, err));
        let bare = RedisStore::new(manager).with_prefix(store.prefix());
        assert!(
            bare.cancellations().await.unwrap().is_none(),
            "no client, no stream"
        );
        let _ids = bare
            .with_pubsub(client)
            .cancellations()
            .await
            .unwrap()
            .expect("with_pubsub subscribes");
    })
    .await;
}

/// The key naming the job `owner` kicked off with idempotency key `key`, as the layout in
/// `RedisStore`'s documentation describes it.
fn once_key(store: &RedisStore, owner: &str, key: &str) -> String {
    format!("{}once:{}:{owner}:{key}", store.prefix(), owner.len())
}

async fn once_value(store: &RedisStore, owner: &str, key: &str) -> Option<String> {
    query(redis::cmd("GET").arg(once_key(store, owner, key))).await
}

async fn once_pttl(store: &RedisStore, owner: &str, key: &str) -> i64 {
    query(redis::cmd("PTTL").arg(once_key(store, owner, key))).await
}

fn owned(at: SystemTime) -> JobRecord {
    record(at).with_owner(Some("alice".into()))
}

// KICK-9, issue #7 item 6: an idempotency key is a string key naming its job, with no expiry
// while the job runs, the job's own expiry once it completes, and gone once the job fails, is
// cancelled or is swept, so keys never pile up in Redis.
#[tokio::test]
async fn kick_9_idempotency_keys_live_exactly_as_long_as_their_jobs() {
    with_store("once-lifetime", |store| async move {
        let now = now_ms();
        let completed = owned(now);
        store
            .create_once(completed.clone(), "k-done", now)
            .await
            .unwrap();
        assert_eq!(
            once_value(&store, "alice", "k-done").await,
            Some(completed.id.to_string()),
            "the key names the job"
        );
        let field: Option<String> = query(
            redis::cmd("HGET")
                .arg(store.job_key(&completed.id))
                .arg("once"),
        )
        .await;
        assert_eq!(
            field,
            Some(once_key(&store, "alice", "k-done")),
            "the job names its key"
        );
        assert_eq!(
            once_pttl(&store, "alice", "k-done").await,
            -1,
            "no expiry while unfinished"
        );
        store
            .start(&completed.id, "a", now + 30 * SECOND)
            .await
            .unwrap();
        store
            .finish(&completed.id, done(), now, now + 60 * SECOND)
            .await
            .unwrap();
        let ttl = once_pttl(&store, "alice", "k-done").await;
        assert!(
            (50_000..=60_000).contains(&ttl),
            "the key expires with its completed job (PTTL {ttl} ms)"
        );
        assert!((ttl - pttl(&store, &completed.id).await).abs() < 1_000);

        let failed = owned(now);
        store
            .create_once(failed.clone(), "k-failed", now)
            .await
            .unwrap();
        let outcome = JobOutcome::Failed(response(500, "{}"));
        store
            .finish(&failed.id, outcome, now, now + 60 * SECOND)
            .await
            .unwrap();
        assert_eq!(
            once_value(&store, "alice", "k-failed").await,
            None,
            "failed: key deleted"
        );

        let cancelled = owned(now);
        store
            .create_once(cancelled.clone(), "k-cancel", now)
            .await
            .unwrap();
        store.cancel(&cancelled.id, now).await.unwrap();
        assert_eq!(
            once_value(&store, "alice", "k-cancel").await,
            None,
            "cancelled: key deleted"
        );

        let base = SystemTime::UNIX_EPOCH + 600_000 * SECOND;
        let lapsed = owned(base);
        store
            .create_once(lapsed.clone(), "k-lapsed", base)
            .await
            .unwrap();
        store
            .start(&lapsed.id, "dead", base + SECOND)
            .await
            .unwrap();
        let outcome = JobOutcome::Failed(response(503, "{}"));
        let failed_ids = store
            .fail_lapsed(base + 2 * SECOND, base, outcome, base + 60 * SECOND)
            .await
            .unwrap();
        assert_eq!(failed_ids, vec![lapsed.id]);
        assert_eq!(
            once_value(&store, "alice", "k-lapsed").await,
            None,
            "lapsed: key deleted"
        );

        // Swept by the caller's clock before Redis expired it.
        assert!(store.sweep(now + 60 * SECOND).await.unwrap() >= 1);
        assert!(!exists(&store, &completed.id).await);
        assert_eq!(
            once_value(&store, "alice", "k-done").await,
            None,
            "swept: key deleted"
        );
    })
    .await;
}

// KICK-9, issue #7 item 6: a key is taken over by the job created after its job stopped
// counting; later transitions of the older job leave it alone, and it loses the older job's
// expiry.
#[tokio::test]
async fn kick_9_a_key_names_the_newest_job_kicked_off_with_it() {
    with_store("once-takeover", |store| async move {
        let now = now_ms();
        let old = owned(now);
        store.create_once(old.clone(), "k", now).await.unwrap();
        store
            .finish(&old.id, done(), now, now + 10 * SECOND)
            .await
            .unwrap();
        assert!(once_pttl(&store, "alice", "k").await > 0);
        // The old job expired by the caller's clock; Redis still holds it.
        let new = owned(now + 10 * SECOND);
        let created = store
            .create_once(new.clone(), "k", now + 10 * SECOND)
            .await
            .unwrap();
        assert_eq!(created, Created::New);
        assert_eq!(
            once_value(&store, "alice", "k").await,
            Some(new.id.to_string())
        );
        assert_eq!(
            once_pttl(&store, "alice", "k").await,
            -1,
            "the new, unfinished job's key has no expiry"
        );
        assert!(exists(&store, &old.id).await);
        // Sweeping or cancelling the old job keeps the key that names the new one.
        store.sweep(now + 10 * SECOND).await.unwrap();
        assert!(!exists(&store, &old.id).await);
        store.cancel(&old.id, now).await.unwrap();
        assert_eq!(
            once_value(&store, "alice", "k").await,
            Some(new.id.to_string())
        );

        // A key whose job Redis already removed is taken over too.
        query::<i64>(redis::cmd("DEL").arg(store.job_key(&new.id))).await;
        let newest = owned(now);
        let created = store.create_once(newest.clone(), "k", now).await.unwrap();
        assert_eq!(created, Created::New);
        assert_eq!(
            once_value(&store, "alice", "k").await,
            Some(newest.id.to_string())
        );

        // A job of another owner named by the key (written behind the store's back) is never
        // returned.
        let bob = record(now).with_owner(Some("bob".into()));
        store.create(bob.clone()).await.unwrap();
        query::<()>(
            redis::cmd("SET")
                .arg(once_key(&store, "alice", "forged"))
                .arg(bob.id.to_string()),
        )
        .await;
        let created = store.create_once(owned(now), "forged", now).await.unwrap();
        assert_eq!(created, Created::New);

        // Stores with different prefixes do not share keys.
        let other = store
            .clone()
            .with_prefix(format!("{}other:", store.prefix()));
        let created = other.create_once(owned(now), "k", now).await.unwrap();
        assert_eq!(created, Created::New);
    })
    .await;
}

// KICK-9, issue #7 item 6: kick-offs with the same owner and key racing on many connections
// (several instances) create exactly one job.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kick_9_kick_offs_racing_across_connections_have_one_winner() {
    with_store("once-race", |store| async move {
        let url = redis_url();
        let mut stores = Vec::new();
        for _ in 0..8 {
            let connected = RedisStore::connect(&url).await.unwrap();
            stores.push(connected.with_prefix(store.prefix()));
        }
        for round in 0..10 {
            let now = now_ms();
            let key = format!("race-{round}");
            let records: Vec<JobRecord> = (0..16).map(|_| owned(now)).collect();
            let kick_offs = records.iter().enumerate().map(|(n, rec)| {
                let store = stores[n % stores.len()].clone();
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
                assert_eq!(exists(&store, &rec.id).await, rec.id == winners[0]);
            }
        }
    })
    .await;
}
