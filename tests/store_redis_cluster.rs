//! `RedisClusterStore` against a real Redis Cluster: the public store conformance suite (every
//! case also as its own test), then what only the cluster layout has: one slot per job, the
//! partitions spread over the masters, sweeps and renewals across partitions, idempotency keys
//! in slots of their own that follow their jobs, and failing fast when the cluster is gone.
//!
//! Connects to `REDIS_CLUSTER_URLS` (default the three masters `.ci/run` starts,
//! `redis://127.0.0.1:7000,redis://127.0.0.1:7001,redis://127.0.0.1:7002`) and fails, never
//! skips, when no node answers. Each test uses a key prefix of its own under one random prefix
//! per run, and deletes its keys on every master when it ends, passed or failed.

#![cfg(feature = "redis-cluster")]

mod support;

use std::collections::HashSet;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::LazyLock;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use futures_util::FutureExt;
use http::{HeaderValue, StatusCode};
use support::private_redis::{cluster_masters, cluster_urls, delete_cluster_keys, no_cluster};
use tower_fhir_async::redis;
use tower_fhir_async::redis::cluster::ClusterClient;
use tower_fhir_async::redis::cluster_async::ClusterConnection;
use tower_fhir_async::store::Created;
use tower_fhir_async::store::conformance::{Fixture, Transitions};
use tower_fhir_async::{
    JobId, JobKind, JobOutcome, JobRecord, JobStore, RedisClusterStore, StoreError, StoredResponse,
};

const SECOND: Duration = Duration::from_secs(1);

/// One random prefix per run of this test binary, so runs never see each other's keys.
static RUN: LazyLock<String> = LazyLock::new(|| format!("test-{}:", JobId::new()));

/// A store with its own connections, keys under `prefix`.
async fn connect(prefix: &str) -> RedisClusterStore {
    match tokio::time::timeout(10 * SECOND, RedisClusterStore::connect(cluster_urls())).await {
        Ok(Ok(store)) => store.with_prefix(prefix),
        Ok(Err(err)) => no_cluster(err),
        Err(_) => no_cluster("no connection within 10 s"),
    }
}

/// A plain cluster connection, for looking behind the store's back.
async fn raw() -> ClusterConnection {
    let client = ClusterClient::new(cluster_urls()).unwrap_or_else(|err| no_cluster(err));
    match tokio::time::timeout(10 * SECOND, client.get_async_connection()).await {
        Ok(Ok(connection)) => connection,
        Ok(Err(err)) => no_cluster(err),
        Err(_) => no_cluster("no connection within 10 s"),
    }
}

async fn query<T: redis::FromRedisValue>(cmd: &mut redis::Cmd) -> T {
    cmd.query_async(&mut raw().await)
        .await
        .expect("query the cluster directly")
}

async fn delete_keys(prefix: &str) {
    delete_cluster_keys(&cluster_urls()[0], prefix).await;
}

/// Runs `test` against a store with the prefix `{RUN}{name}:`, then deletes every key under it,
/// also when the test panics.
async fn with_store<F, Fut>(name: &str, test: F)
where
    F: FnOnce(RedisClusterStore) -> Fut,
    Fut: Future<Output = ()>,
{
    let store = connect(&format!("{}{name}:", *RUN)).await;
    let outcome = AssertUnwindSafe(test(store.clone())).catch_unwind().await;
    delete_keys(store.prefix()).await;
    if let Err(panic) = outcome {
        std::panic::resume_unwind(panic);
    }
}

fn now_ms() -> SystemTime {
    let ms = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_millis();
    SystemTime::UNIX_EPOCH + Duration::from_millis(u64::try_from(ms).unwrap())
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

fn owned(at: SystemTime) -> JobRecord {
    record(at).with_owner(Some("alice".into()))
}

fn response(status: u16) -> StoredResponse {
    StoredResponse {
        status: StatusCode::from_u16(status).unwrap(),
        headers: vec![(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static("application/fhir+json"),
        )],
        body: Bytes::from_static(b"{}"),
    }
}

/// A job id in partition `partition` of a store with `count` partitions.
fn id_in(partition: u16, count: u16) -> JobId {
    loop {
        let id = JobId::new();
        let [.., high, low] = *id.as_bytes();
        if u16::from_be_bytes([high, low]) % count == partition {
            return id;
        }
    }
}

async fn slot(key: &str) -> i64 {
    query(redis::cmd("CLUSTER").arg("KEYSLOT").arg(key)).await
}

/// A store per case under a prefix of its own; another handle is a second set of connections
/// on the same prefix, as another instance would have.
struct Cluster;

impl Fixture for Cluster {
    type Store = RedisClusterStore;

    async fn store(&self) -> RedisClusterStore {
        connect(&format!("{}case-{}:", *RUN, JobId::new())).await
    }

    async fn handle(&self, store: &RedisClusterStore) -> RedisClusterStore {
        connect(store.prefix()).await
    }

    async fn clean_up(&self, store: RedisClusterStore) {
        delete_keys(store.prefix()).await;
    }
}

tower_fhir_async::store_conformance_tests!(Cluster);

// [DESIGN] Every key of a job and every index it is listed in share one slot (so each script
// runs on one node), and the default partitions spread over more than one master.
#[tokio::test]
async fn design_a_job_and_its_indexes_share_one_slot_and_partitions_spread() {
    with_store("slots", |store| async move {
        let count = store.partition_count();
        assert_eq!(count, RedisClusterStore::DEFAULT_PARTITIONS);
        let mut slots = HashSet::new();
        for partition in 0..count {
            let id = id_in(partition, count);
            let job = store.job_key(&id);
            assert!(
                job.starts_with(&format!("{}{{{partition}}}job:", store.prefix())),
                "{job}"
            );
            let job_slot = slot(&job).await;
            for index in ["accepted", "running", "expiring", "changed"] {
                let key = format!("{}{{{partition}}}{index}", store.prefix());
                assert_eq!(slot(&key).await, job_slot, "{key} and {job}");
            }
            slots.insert(job_slot);
        }
        assert_eq!(slots.len(), usize::from(count), "one slot per partition");

        // Which master serves each partition's slot.
        let ranges: Vec<redis::Value> = query(redis::cmd("CLUSTER").arg("SLOTS")).await;
        let mut owners = HashSet::new();
        for range in ranges {
            let redis::Value::Array(parts) = range else {
                panic!("CLUSTER SLOTS entry {range:?}");
            };
            let (redis::Value::Int(start), redis::Value::Int(end)) = (&parts[0], &parts[1]) else {
                panic!("CLUSTER SLOTS range {parts:?}");
            };
            if slots.iter().any(|s| (start..=end).contains(&s)) {
                owners.insert(format!("{:?}", parts[2]));
            }
        }
        assert!(
            owners.len() > 1,
            "the partitions live on {} master(s) of {}",
            owners.len(),
            cluster_masters(&cluster_urls()[0]).await.len()
        );
    })
    .await;
}

// [DESIGN] fail_lapsed, sweep and renew_leases visit every partition, in batches: 300 lapsed
// jobs spread over all partitions are all failed, all expired ones all swept, and of 300
// renewed jobs exactly the cancelled ones are reported gone.
#[tokio::test]
async fn design_sweeps_and_renewals_cover_every_partition() {
    with_store("partitions", |store| async move {
        let base = SystemTime::UNIX_EPOCH + 700_000 * SECOND;
        let mut lapsed = Vec::new();
        for n in 0..300u16 {
            let mut rec = record(base);
            rec.id = id_in(n % store.partition_count(), store.partition_count());
            store.create(rec.clone()).await.unwrap();
            assert!(store.start(&rec.id, "dead", base + SECOND).await.unwrap());
            lapsed.push(rec.id);
        }
        let outcome = JobOutcome::Failed(response(503));
        let mut failed = store
            .fail_lapsed(base + 2 * SECOND, base, outcome, base + 10 * SECOND)
            .await
            .unwrap();
        failed.sort_by_key(|id| *id.as_bytes());
        lapsed.sort_by_key(|id| *id.as_bytes());
        assert_eq!(failed, lapsed, "every lapsed job of every partition failed");
        assert_eq!(
            store.sweep(base + 10 * SECOND).await.unwrap(),
            300,
            "every expired job of every partition swept"
        );

        let now = now_ms();
        let mut running = Vec::new();
        for n in 0..300u16 {
            let mut rec = record(now);
            rec.id = id_in(n % store.partition_count(), store.partition_count());
            store.create(rec.clone()).await.unwrap();
            store
                .start(&rec.id, "here", now + 30 * SECOND)
                .await
                .unwrap();
            running.push(rec.id);
        }
        let cancelled: Vec<JobId> = running.iter().step_by(7).copied().collect();
        for id in &cancelled {
            assert!(store.cancel(id, now).await.unwrap());
        }
        let mut gone = store
            .renew_leases("here", &running, now + 60 * SECOND)
            .await
            .unwrap();
        gone.sort_by_key(|id| *id.as_bytes());
        let mut expected = cancelled.clone();
        expected.sort_by_key(|id| *id.as_bytes());
        assert_eq!(gone, expected, "exactly the cancelled jobs are gone");
        for id in &running {
            if !cancelled.contains(id) {
                assert!(
                    matches!(
                        store.get(id, now).await.unwrap().map(|r| r.state),
                        Some(tower_fhir_async::JobState::Running { lease_until, .. })
                            if lease_until == now + 60 * SECOND
                    ),
                    "job {id} renewed"
                );
            }
        }
    })
    .await;
}

fn once_key(store: &RedisClusterStore, key: &str) -> String {
    format!("{}once:5:alice:{key}", store.prefix())
}

// KICK-9: an idempotency key (in a slot of its own) follows its job: it names the job while
// the job runs, gets the job's expiry when it completes, and goes when the job fails or is
// cancelled; a kick-off that found a counting job leaves no job of its own behind.
#[tokio::test]
async fn kick_9_cluster_idempotency_keys_follow_their_jobs() {
    with_store("once", |store| async move {
        let now = now_ms();
        let completed = owned(now);
        let created = store.create_once(completed.clone(), "k1", now).await;
        assert_eq!(created.unwrap(), Created::New);
        let key = once_key(&store, "k1");
        assert_eq!(
            query::<Option<String>>(redis::cmd("GET").arg(&key)).await,
            Some(completed.id.to_string())
        );
        assert_eq!(query::<i64>(redis::cmd("PTTL").arg(&key)).await, -1);
        let repeat = owned(now);
        assert_eq!(
            store.create_once(repeat.clone(), "k1", now).await.unwrap(),
            Created::Existing(completed.id)
        );
        assert_eq!(
            query::<i64>(redis::cmd("EXISTS").arg(store.job_key(&repeat.id))).await,
            0,
            "the repeat's own job was removed"
        );
        let done = JobOutcome::Completed(response(200));
        assert!(
            store
                .finish(&completed.id, done, now, now + 60 * SECOND)
                .await
                .unwrap()
        );
        let ttl: i64 = query(redis::cmd("PTTL").arg(&key)).await;
        assert!(
            (50_000..=60_000).contains(&ttl),
            "the key expires with its completed job (PTTL {ttl} ms)"
        );

        let failing = owned(now);
        store.create_once(failing.clone(), "k2", now).await.unwrap();
        let failed = JobOutcome::Failed(response(500));
        assert!(
            store
                .finish(&failing.id, failed, now, now + 60 * SECOND)
                .await
                .unwrap()
        );
        assert_eq!(
            query::<i64>(redis::cmd("EXISTS").arg(once_key(&store, "k2"))).await,
            0,
            "a failed job's key goes"
        );

        let cancelled = owned(now);
        store
            .create_once(cancelled.clone(), "k3", now)
            .await
            .unwrap();
        assert!(store.cancel(&cancelled.id, now).await.unwrap());
        assert_eq!(
            query::<i64>(redis::cmd("EXISTS").arg(once_key(&store, "k3"))).await,
            0,
            "a cancelled job's key goes"
        );
    })
    .await;
}

// [DESIGN] A cluster nobody answers is StoreError::Unavailable, within a bound: never a panic,
// never a hang.
#[tokio::test]
async fn design_an_unreachable_cluster_is_unavailable_and_never_hangs() {
    let connected = tokio::time::timeout(
        30 * SECOND,
        RedisClusterStore::connect(["redis://127.0.0.1:1"]),
    )
    .await
    .expect("connect gives up within 30 s");
    assert!(
        matches!(connected, Err(StoreError::Unavailable(_))),
        "{connected:?}"
    );
    let invalid = RedisClusterStore::connect(["not a url"]).await;
    assert!(
        matches!(invalid, Err(StoreError::Unavailable(_))),
        "{invalid:?}"
    );
    let none = RedisClusterStore::connect(Vec::<String>::new()).await;
    assert!(matches!(none, Err(StoreError::Unavailable(_))), "{none:?}");
}
