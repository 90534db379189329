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
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use futures_util::{FutureExt, StreamExt};
use http::{HeaderValue, StatusCode};
use tower_fhir_async::redis::aio::{ConnectionManager, MultiplexedConnection};
use tower_fhir_async::redis::{self, Client};
use tower_fhir_async::store::conformance::{Fixture, Transitions};
use tower_fhir_async::store::{Change, Changes, Created};
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
    let store = connect(&format!("{}{name}:", *RUN)).await;
    let outcome = AssertUnwindSafe(test(store.clone())).catch_unwind().await;
    delete_keys(store.prefix()).await;
    if let Err(panic) = outcome {
        std::panic::resume_unwind(panic);
    }
}

/// A store with its own connection and pub/sub client, keys under `prefix`.
async fn connect(prefix: &str) -> RedisStore {
    let url = redis_url();
    match tokio::time::timeout(10 * SECOND, RedisStore::connect(&url)).await {
        Ok(Ok(store)) => store.with_prefix(prefix),
        Ok(Err(err)) => no_redis(&url, err),
        Err(_) => no_redis(&url, "no connection within 10 s"),
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

/// The next announcement of a changes stream, within 5 s.
async fn next_change(changes: &mut Changes) -> Change {
    tokio::time::timeout(5 * SECOND, changes.next())
        .await
        .expect("an announcement within 5 s")
        .expect("the stream is open")
}

async fn pttl(store: &RedisStore, id: &JobId) -> i64 {
    query(redis::cmd("PTTL").arg(store.job_key(id))).await
}

/// A store per case under a prefix of its own; another handle is a second connection (and
/// pub/sub client) on the same prefix, as another instance would have. Clean-up deletes every
/// key under the prefix.
struct Redis;

impl Fixture for Redis {
    type Store = RedisStore;

    async fn store(&self) -> RedisStore {
        connect(&format!("{}case-{}:", *RUN, JobId::new())).await
    }

    async fn handle(&self, store: &RedisStore) -> RedisStore {
        connect(store.prefix()).await
    }

    async fn clean_up(&self, store: RedisStore) {
        delete_keys(store.prefix()).await;
    }
}

tower_fhir_async::store_conformance_tests!(Redis);

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

// CANCEL-3: a cancel publishes `cancelled {id}` on the changes channel, once, in the same atomic
// step; cancelling an unknown or expired job publishes nothing.
#[tokio::test]
async fn cancel_3_cancel_publishes_the_id_on_the_changes_channel() {
    with_store("publish", |store| async move {
        assert_eq!(
            store.changes_channel(),
            format!("{}changed", store.prefix())
        );
        let url = redis_url();
        let client = Client::open(url.as_str()).unwrap();
        let new_subscriber = NEW_SUBSCRIBERS.lock().await;
        let mut pubsub = client
            .get_async_pubsub()
            .await
            .unwrap_or_else(|err| no_redis(&url, err));
        pubsub.subscribe(store.changes_channel()).await.unwrap();
        drop(new_subscriber);
        let mut messages = pubsub.on_message();
        let mut next = async || {
            let message = tokio::time::timeout(5 * SECOND, messages.next())
                .await
                .expect("a cancel message within 5 s")
                .expect("the subscription is open");
            assert_eq!(message.get_channel_name(), store.changes_channel());
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
        assert_eq!(next().await, format!("cancelled {}", running.id));

        // None of these publishes a cancel (the expired job's end is an update): the next
        // cancel message is the last cancel's.
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
        assert_eq!(next().await, format!("updated {}", expired.id));
        assert_eq!(next().await, format!("cancelled {}", accepted.id));
    })
    .await;
}

// [DESIGN] An unreachable Redis is StoreError::Unavailable (the layer's 503) from every entry
// point: never a panic, never a hang (each call is bounded only to turn a hang into a failure).
#[tokio::test]
async fn design_an_unreachable_redis_is_unavailable_and_never_hangs() {
    let unreachable = "redis://127.0.0.1:1";
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
    let subscribed = tokio::time::timeout(10 * SECOND, store.changes())
        .await
        .expect("changes gives up within 10 s");
    assert!(
        matches!(subscribed, Err(StoreError::Unavailable(_))),
        "changes"
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

// CANCEL-3: changes() reads what is published on the changes channel and skips what is not a
// job change; another prefix's changes are not ours. (That cancels and updates through any
// handle are announced is the conformance suite's.)
#[tokio::test]
async fn cancel_3_changes_skip_junk_and_other_prefixes() {
    with_store("changes", |here| async move {
        let new_subscriber = NEW_SUBSCRIBERS.lock().await;
        let mut changes = here
            .changes()
            .await
            .unwrap()
            .expect("a store made by connect() subscribes");
        drop(new_subscriber);

        let now = now_ms();
        for junk in [
            "not a job id".to_owned(),
            JobId::new().to_string(),
            format!("paused {}", JobId::new()),
        ] {
            query::<i64>(redis::cmd("PUBLISH").arg(here.changes_channel()).arg(junk)).await;
        }
        // Another prefix's cancels are not ours.
        let stranger = here
            .clone()
            .with_prefix(format!("{}stranger:", here.prefix()));
        let theirs = record(now);
        stranger.create(theirs.clone()).await.unwrap();
        assert!(stranger.cancel(&theirs.id, now).await.unwrap());
        let last = record(now);
        here.create(last.clone()).await.unwrap();
        assert!(here.cancel(&last.id, now).await.unwrap());
        assert_eq!(
            next_change(&mut changes).await,
            Change::Cancelled(last.id),
            "the junk and the stranger's cancel were skipped"
        );
    })
    .await;
}

// [DESIGN] The changes stream ends when its connection drops, and asking again works; a store
// built from a bare ConnectionManager has no stream unless given a client.
#[tokio::test]
async fn design_changes_end_with_their_connection_and_can_be_asked_again() {
    with_store("resubscribe", |store| async move {
        let new_subscriber = NEW_SUBSCRIBERS.lock().await;
        let before = subscriber_ids().await;
        let mut ids = store.changes().await.unwrap().unwrap();
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

        let mut ids = store.changes().await.unwrap().unwrap();
        let now = now_ms();
        let rec = record(now);
        store.create(rec.clone()).await.unwrap();
        assert!(store.cancel(&rec.id, now).await.unwrap());
        assert_eq!(next_change(&mut ids).await, Change::Cancelled(rec.id));

        let url = redis_url();
        let client = Client::open(url.as_str()).unwrap();
        let manager =
            ConnectionManager::new_with_config(client.clone(), RedisStore::manager_config())
                .await
                .unwrap_or_else(|err| no_redis(&url, err));
        let bare = RedisStore::new(manager).with_prefix(store.prefix());
        assert!(
            bare.changes().await.unwrap().is_none(),
            "no client, no stream"
        );
        let _ids = bare
            .with_pubsub(client)
            .changes()
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
