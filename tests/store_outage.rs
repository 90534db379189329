#![cfg(feature = "redis")]
//! A Redis outage under a running layer (issue #4 item 6; README "Running several instances"):
//! while the store is down, polls and kick-offs get `503` + `transient` + `Retry-After` and the
//! server keeps answering; a job that finishes meanwhile keeps trying to record its result, and
//! once Redis is back the result is there and the layer works again without a restart.
//!
//! The shared Redis on 127.0.0.1:6379 is used by other tests in parallel, so these tests never
//! touch it: each outage test runs a `redis-server` of its own (on a free 127.0.0.1 port, with an
//! append-only file in a fresh temporary directory, so a restart keeps the data), stops it and
//! starts it again. The binary must be on PATH; without it the test fails, never skips.
//!
//! With `redis-cluster`, the same outage on a three-master Redis Cluster of the test's own, and
//! a master failover in a six-node one (issue #16 item 1): nodes started the same way, joined by
//! `redis-cli --cluster create` (so `redis-cli` must be on PATH too).

mod support;

use support::Captured;

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use axum::Router;
use axum::routing::{get, post};
use http::header::{CONTENT_TYPE, LOCATION};
use http::{Method, StatusCode};
use support::free_port;
use support::private_redis::{RedisServer, TempDir};
use support::{Reply, TestClient, serve};
use tokio::sync::Notify;
use tower_fhir_async::redis::Client;
use tower_fhir_async::redis::aio::ConnectionManager;
use tower_fhir_async::{AsyncLayer, JobId, JobStore, RedisStore, StoreError};

const SECOND: Duration = Duration::from_secs(1);

/// The longest any one request may take while Redis is down (the store gives up on a connection
/// within about 1.2 s; the client's own limit is 30 s).
const REQUEST_LIMIT: Duration = Duration::from_secs(15);

/// What `$hold` answers once released.
const HELD_BODY: &str = r#"{"resourceType":"Patient","id":"held-1","active":true}"#;

const RETRYING: &str = "recording the job's outcome failed; trying again";
const FINISHED: &str = "asynchronous job finished status=201";

/// How many failed attempts to record the finished job's outcome the outage lasts.
const FAILED_WRITES: usize = 5;

// ---------------------------------------------------------------------------------------------
// Captured logs: proof that the finished job's outcome write failed and was retried.

/// Lines that contain `message`.
///
/// Matched by message only, not by the job's span: the span's callsite may be registered
/// first by the other test of this binary, on a thread without a subscriber, and with a
/// single scoped dispatcher tracing-core then caches `Interest::never` for it
/// (tokio-rs/tracing#3611), so this subscriber may never see the span. The messages counted
/// here come only from finishing jobs, which only the outage test has.
fn count(captured: &Captured, message: &str) -> usize {
    captured
        .text()
        .lines()
        .filter(|line| line.contains(message))
        .count()
}

/// Prints the captured log when the test fails.
struct LogOnPanic(Captured);

impl Drop for LogOnPanic {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("---- captured log ----\n{}", self.0.text());
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The application.

/// Controls `POST /fhir/$hold`: each call counts itself, signals `started`, and waits for
/// `release`.
#[derive(Default)]
struct Hold {
    calls: AtomicUsize,
    started: Notify,
    release: Notify,
}

fn app(layer: AsyncLayer, hold: Arc<Hold>) -> Router {
    Router::new()
        .route(
            "/fhir/metadata",
            get(|| async {
                (
                    [(CONTENT_TYPE, "application/fhir+json")],
                    r#"{"resourceType":"CapabilityStatement"}"#,
                )
            }),
        )
        .route(
            "/fhir/$hold",
            post(move || {
                let hold = hold.clone();
                async move {
                    hold.calls.fetch_add(1, Ordering::SeqCst);
                    hold.started.notify_one();
                    hold.release.notified().await;
                    Ok::<_, Infallible>((
                        StatusCode::CREATED,
                        [
                            (CONTENT_TYPE, "application/fhir+json"),
                            (LOCATION, "Patient/held-1/_history/1"),
                        ],
                        HELD_BODY,
                    ))
                }
            }),
        )
        .layer(layer)
}

async fn kick_off(client: &TestClient, base: &str) -> Reply {
    client
        .send(
            Method::POST,
            &format!("{base}/$hold"),
            &[("prefer", "respond-async")],
            "",
        )
        .await
}

/// `request`, which must be answered within [`REQUEST_LIMIT`]; returns the reply and how long it
/// took.
async fn bounded(what: &str, request: impl Future<Output = Reply>) -> (Reply, Duration) {
    let started = Instant::now();
    let reply = tokio::time::timeout(REQUEST_LIMIT, request)
        .await
        .unwrap_or_else(|_| panic!("{what}: no answer within {REQUEST_LIMIT:?}"));
    (reply, started.elapsed())
}

/// `503` + `transient` OperationOutcome + delta-seconds `Retry-After`.
fn assert_unavailable(what: &str, reply: &Reply) {
    assert_eq!(
        reply.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "{what}: {reply:?}"
    );
    reply.assert_outcome("transient");
    let retry_after = reply.header("retry-after");
    assert!(
        retry_after.parse::<u64>().is_ok_and(|seconds| seconds >= 1),
        "{what}: Retry-After must be delta seconds, got {retry_after:?}"
    );
}

/// The final reply of a job that was still running, polled every 250 ms for up to `limit`; while
/// waiting only `202` (running) and `503` (store not back yet) are acceptable.
async fn poll_until_done(client: &TestClient, status_url: &str, limit: Duration) -> Reply {
    let deadline = Instant::now() + limit;
    loop {
        let reply = client.get(status_url).await;
        match reply.status {
            StatusCode::ACCEPTED => {}
            StatusCode::SERVICE_UNAVAILABLE => reply.assert_outcome("transient"),
            _ => return reply,
        }
        assert!(
            Instant::now() < deadline,
            "{status_url} still not done after {limit:?}; last reply {reply:?}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

fn assert_held_result(reply: &Reply) {
    assert_eq!(
        reply.status,
        StatusCode::OK,
        "the finished job's result must be there (not lost to the outage): {reply:?}"
    );
    let bundle = reply.json();
    assert_eq!(bundle["resourceType"], "Bundle", "{bundle}");
    let entry = &bundle["entry"][0];
    assert_eq!(entry["response"]["status"], "201 Created", "{bundle}");
    let expected: serde_json::Value = serde_json::from_str(HELD_BODY).unwrap();
    assert_eq!(entry["resource"], expected, "{bundle}");
}

// ---------------------------------------------------------------------------------------------

// Issue #4 item 6, STATUS-10, E7, KICK-5: Redis goes away under a running job and comes back.
// Meanwhile polls and kick-offs are refused with 503 + `transient` + `Retry-After` and the server
// keeps answering; the job finishes during the outage and its result, retried, is recorded once
// Redis is back; and the same layer accepts new jobs again.
#[tokio::test(flavor = "current_thread")]
async fn e7_redis_outage_is_503_transient_and_a_finished_result_survives_it() {
    // Declared before the store, so the server is killed before its directory is removed.
    let dir = TempDir::new();
    let redis = RedisServer::start(free_port(), &dir.0).await;
    let store = tokio::time::timeout(10 * SECOND, RedisStore::connect(&redis.url()))
        .await
        .expect("RedisStore::connect within 10 s")
        .expect("RedisStore::connect to the test's redis-server");
    outage_survives(store, redis).await;
}

/// A store server a test can take away and bring back with its data.
trait Outage {
    fn stop(&mut self);
    async fn restart(&mut self);
}

impl Outage for RedisServer {
    fn stop(&mut self) {
        RedisServer::stop(self);
    }

    async fn restart(&mut self) {
        RedisServer::restart(self).await;
    }
}

/// The outage scenario of `e7_…`, on `store`, whose server is `server`.
async fn outage_survives<S: JobStore>(store: S, mut redis: impl Outage) {
    let captured = Captured::default();
    let _log_on_panic = LogOnPanic(captured.clone());
    let subscriber = tracing_subscriber::fmt()
        .with_writer(captured.clone())
        .with_ansi(false)
        .with_env_filter(tracing_subscriber::EnvFilter::new("tower_fhir_async=info"))
        .finish();
    // The current-thread runtime runs the server and the jobs on this thread, under this
    // subscriber.
    let _subscriber = tracing::subscriber::set_default(subscriber);

    // 1. The layer on its own Redis, in front of an axum Router served on 127.0.0.1:0.
    let layer = AsyncLayer::builder(store).base_path("/fhir").build();
    let hold = Arc::new(Hold::default());
    let addr = serve(app(layer, hold.clone())).await;
    let base = format!("http://{addr}/fhir");
    let client = TestClient::default();

    // 2. Kick-off → 202; the job runs (its handler waits); poll → 202.
    let kick = kick_off(&client, &base).await;
    assert_eq!(kick.status, StatusCode::ACCEPTED, "{kick:?}");
    let status_url = kick.header("content-location").to_owned();
    tokio::time::timeout(10 * SECOND, hold.started.notified())
        .await
        .expect("the held handler was called within 10 s");
    let running = client.get(&status_url).await;
    assert_eq!(running.status, StatusCode::ACCEPTED, "{running:?}");

    // 3. Redis goes away.
    redis.stop();
    println!("redis-server stopped");

    // 4. STATUS-10: a poll is 503 + transient + Retry-After (not a 404, not a 500, not a hang).
    let (poll, took) = bounded("poll while Redis is down", client.get(&status_url)).await;
    assert_unavailable("poll while Redis is down", &poll);
    println!("poll while down: {} in {took:?}", poll.status);
    // KICK-5: a kick-off is refused synchronously, the same way; its work never runs.
    let (refused, took) = bounded("kick-off while Redis is down", kick_off(&client, &base)).await;
    assert_unavailable("kick-off while Redis is down", &refused);
    assert!(
        !refused.headers.contains_key("content-location"),
        "{refused:?}"
    );
    println!("kick-off while down: {} in {took:?}", refused.status);
    // Nothing panicked: the server still answers, the store-free route as well as the layer's.
    let (metadata, took) = bounded(
        "metadata while Redis is down",
        client.get(&format!("{base}/metadata")),
    )
    .await;
    assert_eq!(metadata.status, StatusCode::OK, "{metadata:?}");
    println!("metadata while down: {} in {took:?}", metadata.status);
    let (again, took) = bounded("second poll while Redis is down", client.get(&status_url)).await;
    assert_unavailable("second poll while Redis is down", &again);
    println!("second poll while down: {} in {took:?}", again.status);

    // 5. The job finishes while Redis is down: writing its outcome fails and is retried (with
    // the delay doubling from 100 ms, five failures take about 1.5 s plus the failed attempts).
    hold.release.notify_one();
    let released = Instant::now();
    let deadline = released + 30 * SECOND;
    while count(&captured, RETRYING) < FAILED_WRITES {
        assert!(
            Instant::now() < deadline,
            "the finished job did not try recording its outcome {FAILED_WRITES} times within 30 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    println!(
        "outcome write failed {} times in {:?} after release",
        count(&captured, RETRYING),
        released.elapsed()
    );
    let (poll, _) = bounded(
        "poll after the job finished, Redis down",
        client.get(&status_url),
    )
    .await;
    assert_unavailable("poll after the job finished, Redis down", &poll);
    assert_eq!(
        count(&captured, FINISHED),
        0,
        "no outcome can be recorded while Redis is down"
    );

    // 6. Redis comes back on the same port and directory, with its append-only data.
    let restarting = Instant::now();
    redis.restart().await;
    let restarted = Instant::now();
    println!(
        "redis-server restarted (answered PING after {:?}); outage lasted {:?} after release",
        restarted - restarting,
        restarted - released
    );

    // 7. The result was not lost: within the record retries it reaches the store.
    let done = poll_until_done(&client, &status_url, 60 * SECOND).await;
    println!(
        "first 200 after {:?} from restart ({} failed writes before)",
        restarted.elapsed(),
        count(&captured, RETRYING)
    );
    assert_held_result(&done);
    assert_eq!(
        count(&captured, FINISHED),
        1,
        "the job's outcome was recorded once"
    );
    assert_eq!(
        hold.calls.load(Ordering::SeqCst),
        1,
        "the kick-off refused during the outage never ran; the job never ran twice"
    );

    // The same layer (no restart) accepts and completes new jobs again.
    let kick = kick_off(&client, &base).await;
    assert_eq!(kick.status, StatusCode::ACCEPTED, "{kick:?}");
    let second_url = kick.header("content-location").to_owned();
    tokio::time::timeout(10 * SECOND, hold.started.notified())
        .await
        .expect("the second held handler was called within 10 s");
    hold.release.notify_one();
    let done = poll_until_done(&client, &second_url, 30 * SECOND).await;
    assert_held_result(&done);
    println!("after recovery: new job accepted and completed");
    drop(redis);
}

// STATUS-10, KICK-5: a layer whose Redis is unreachable from the start. `RedisStore::connect`
// itself fails fast with `Unavailable`; a store on a lazily connecting manager can be built
// anyway, and the layer on it refuses kick-offs, polls and cancels with 503 + `transient` +
// `Retry-After` (never a hang or a panic) while the rest of the server keeps working.
#[tokio::test(flavor = "current_thread")]
async fn status_10_redis_unreachable_from_the_start_is_503_transient() {
    // Nothing listens on port 1 of 127.0.0.1 (binding it needs root).
    let unreachable = "redis://127.0.0.1:1";
    let started = Instant::now();
    let connected = tokio::time::timeout(10 * SECOND, RedisStore::connect(unreachable))
        .await
        .expect("connect gives up within 10 s");
    assert!(
        matches!(connected, Err(StoreError::Unavailable(_))),
        "connect to an unreachable Redis: {connected:?}"
    );
    println!("connect failed with Unavailable in {:?}", started.elapsed());

    let client = Client::open(unreachable).unwrap();
    let manager =
        ConnectionManager::new_lazy_with_config(client.clone(), RedisStore::manager_config())
            .expect("a lazy manager connects on first use");
    let store = RedisStore::new(manager).with_pubsub(client);
    let layer = AsyncLayer::builder(store).base_path("/fhir").build();
    let hold = Arc::new(Hold::default());
    let addr = serve(app(layer, hold.clone())).await;
    let base = format!("http://{addr}/fhir");
    let http = TestClient::default();

    for attempt in 1..=2 {
        let what = format!("kick-off {attempt}");
        let (refused, took) = bounded(&what, kick_off(&http, &base)).await;
        assert_unavailable(&what, &refused);
        assert!(
            !refused.headers.contains_key("content-location"),
            "{refused:?}"
        );
        println!("{what}: {} in {took:?}", refused.status);
    }
    let status_url = format!("{base}/_async/{}", JobId::new());
    let (poll, took) = bounded("poll", http.get(&status_url)).await;
    assert_unavailable("poll", &poll);
    println!("poll: {} in {took:?}", poll.status);
    let (cancel, took) = bounded("cancel", http.delete(&status_url)).await;
    assert_unavailable("cancel", &cancel);
    println!("cancel: {} in {took:?}", cancel.status);
    let (metadata, _) = bounded("metadata", http.get(&format!("{base}/metadata"))).await;
    assert_eq!(metadata.status, StatusCode::OK, "{metadata:?}");
    assert_eq!(
        hold.calls.load(Ordering::SeqCst),
        0,
        "refused kick-offs never reach the wrapped service"
    );
}

// ---------------------------------------------------------------------------------------------
// A Redis Cluster (feature `redis-cluster`): the whole cluster goes away, and one master fails
// over to its replica.

#[cfg(feature = "redis-cluster")]
mod cluster {
    use super::*;
    use support::private_redis::PrivateCluster;
    use tower_fhir_async::RedisClusterStore;

    impl Outage for PrivateCluster {
        fn stop(&mut self) {
            for node in &mut self.nodes {
                node.stop();
            }
        }

        async fn restart(&mut self) {
            for node in &mut self.nodes {
                node.restart().await;
            }
            self.wait_until_ok(3, 60 * SECOND).await;
        }
    }

    async fn connect(cluster: &PrivateCluster) -> RedisClusterStore {
        tokio::time::timeout(10 * SECOND, RedisClusterStore::connect(cluster.urls()))
            .await
            .expect("RedisClusterStore::connect within 10 s")
            .expect("RedisClusterStore::connect to the test's cluster")
    }

    // Issue #16 item 1, STATUS-10, E7, KICK-5: the outage scenario on a three-master cluster of
    // the test's own: every node goes away under a running job and comes back with its data.
    #[tokio::test(flavor = "current_thread")]
    async fn item_16_e7_cluster_outage_is_503_transient_and_a_finished_result_survives_it() {
        let cluster = PrivateCluster::start(3, 0).await;
        let store = connect(&cluster).await;
        outage_survives(store, cluster).await;
    }

    /// `POST /fhir/$quick` answers at once; `POST /fhir/$hold` once `release` turns true.
    fn work_app(layer: AsyncLayer, release: tokio::sync::watch::Receiver<bool>) -> Router {
        Router::new()
            .route(
                "/fhir/$quick",
                post(|body: String| async move {
                    (
                        [(CONTENT_TYPE, "application/fhir+json")],
                        format!(r#"{{"resourceType":"Parameters","id":"{body}"}}"#),
                    )
                }),
            )
            .route(
                "/fhir/$hold",
                post(move |body: String| {
                    let mut release = release.clone();
                    async move {
                        let _ = release.wait_for(|released| *released).await;
                        (
                            [(CONTENT_TYPE, "application/fhir+json")],
                            format!(r#"{{"resourceType":"Parameters","id":"{body}"}}"#),
                        )
                    }
                }),
            )
            .layer(layer)
    }

    async fn kick_off_job(client: &TestClient, base: &str, op: &str, n: usize) -> Reply {
        client
            .send(
                Method::POST,
                &format!("{base}/{op}"),
                &[("prefer", "respond-async")],
                &format!("job-{n}"),
            )
            .await
    }

    async fn start_job(client: &TestClient, base: &str, op: &str, n: usize) -> String {
        let reply = kick_off_job(client, base, op, n).await;
        assert_eq!(reply.status, StatusCode::ACCEPTED, "{reply:?}");
        reply.header("content-location").to_owned()
    }

    /// The partition (of the default 16) of the job a status URL names.
    fn partition_of(status_url: &str) -> u16 {
        let id = status_url
            .rsplit('/')
            .next()
            .and_then(JobId::parse)
            .unwrap_or_else(|| panic!("no job id in {status_url}"));
        let [.., high, low] = *id.as_bytes();
        u16::from_be_bytes([high, low]) % RedisClusterStore::DEFAULT_PARTITIONS
    }

    fn assert_result(reply: &Reply, n: usize) {
        assert_eq!(reply.status, StatusCode::OK, "job-{n}: {reply:?}");
        let bundle = reply.json();
        assert_eq!(
            bundle["entry"][0]["resource"]["id"],
            format!("job-{n}"),
            "{bundle}"
        );
    }

    // Issue #16 item 1, STATUS-14, STATUS-10: in a six-node cluster (three masters, one replica
    // each), the master holding the most finished results (and at least four running jobs) is
    // killed (SIGKILL) and its replica takes over.
    // No finished result is lost (the store waits for a replica's acknowledgement of every
    // kick-off and result), and no job is stranded: jobs running through the failover record
    // their results on the new master, and the layers (two instances) keep working.
    #[tokio::test(flavor = "multi_thread")]
    async fn item_16_status_14_a_master_failover_loses_no_result_and_strands_no_job() {
        let mut cluster = PrivateCluster::start(3, 1).await;
        // A tenth of the layer's store timeout (1 s): the WAITs queued for the promoted master,
        // which has no replica, run one after another until the first shortfall pauses them.
        let acks = Duration::from_millis(100);
        let a = connect(&cluster).await.with_replica_acks(1, acks);
        let b = connect(&cluster).await.with_replica_acks(1, acks);
        let (release, released) = tokio::sync::watch::channel(false);
        let layer = |store: RedisClusterStore, name: &str| {
            AsyncLayer::builder(store)
                .base_path("/fhir")
                .instance_id(name)
                .build()
        };
        let base_a = format!(
            "http://{}/fhir",
            serve(work_app(layer(a.clone(), "a"), released.clone())).await
        );
        let base_b = format!(
            "http://{}/fhir",
            serve(work_app(layer(b.clone(), "b"), released.clone())).await
        );
        let client = TestClient::default();

        // Finished results, spread over every partition (and so every master).
        let mut finished = Vec::new();
        for n in 0..48 {
            finished.push(start_job(&client, &base_a, "$quick", n).await);
        }
        for (n, url) in finished.iter().enumerate() {
            let done = poll_until_done(&client, url, 30 * SECOND).await;
            assert_result(&done, n);
        }
        // The victim: the master holding the most of those results (each master has a replica).
        let masters = cluster.masters(0).await;
        assert_eq!(masters.len(), 3, "{}", cluster.nodes_seen_by(0).await);
        let mut master_of_partition = Vec::new();
        for partition in 0..RedisClusterStore::DEFAULT_PARTITIONS {
            master_of_partition.push(cluster.master_of(&format!("{{{partition}}}"), 0).await);
        }
        let on = |master: usize, urls: &[String]| {
            urls.iter()
                .filter(|url| master_of_partition[usize::from(partition_of(url))] == master)
                .count()
        };
        let victim = *masters
            .iter()
            .max_by_key(|&&master| on(master, &finished))
            .expect("three masters");
        let finished_on_victim = on(victim, &finished);
        assert!(finished_on_victim > 0, "48 results over three masters");
        // Jobs still running when the master dies: at least four of them on the victim.
        let mut running = Vec::new();
        while on(victim, &running) < 4 {
            assert!(running.len() < 256, "no running job landed on the victim");
            let n = 100 + running.len();
            running.push(start_job(&client, &base_a, "$hold", n).await);
        }
        println!(
            "killing node {victim}: it holds {finished_on_victim} of {} results and {} of {} \
             running jobs",
            finished.len(),
            on(victim, &running),
            running.len()
        );

        // Kill it and wait for its replica to take over.
        let witness = (0..cluster.nodes.len())
            .find(|&n| n != victim)
            .expect("another node");
        let killed = Instant::now();
        cluster.nodes[victim].stop();
        println!("killed master on node {victim}");
        let deadline = Instant::now() + 60 * SECOND;
        loop {
            let now_masters = cluster.masters(witness).await;
            if now_masters.len() == 3 && !now_masters.contains(&victim) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "no replica took over within 60 s:\n{}",
                cluster.nodes_seen_by(witness).await
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        println!("a replica took over {:?} after the kill", killed.elapsed());

        // The running jobs finish after the failover and record their results.
        release.send_replace(true);
        for (n, url) in running.iter().enumerate() {
            let done = poll_until_done(&client, url, 60 * SECOND).await;
            assert_result(&done, 100 + n);
        }
        println!(
            "every running job recorded its result {:?} after the kill",
            killed.elapsed()
        );

        // Every result finished before the failover is still there, through either instance.
        for (n, url) in finished.iter().enumerate() {
            let through_b = url.replace(&base_a, &base_b);
            for url in [url, &through_b] {
                let done = poll_until_done(&client, url, 30 * SECOND).await;
                assert_result(&done, n);
            }
        }

        // And new jobs run, through both instances. A kick-off may still meet the store
        // settling (a script not yet loaded on the promoted master, WAITs queued behind its
        // missing replica): that is `503` + `transient`, which a client retries, as polls above.
        for (n, base) in [(200, &base_a), (201, &base_b)] {
            let deadline = Instant::now() + 30 * SECOND;
            let url = loop {
                let reply = kick_off_job(&client, base, "$quick", n).await;
                if reply.status != StatusCode::SERVICE_UNAVAILABLE {
                    assert_eq!(reply.status, StatusCode::ACCEPTED, "{reply:?}");
                    break reply.header("content-location").to_owned();
                }
                assert_unavailable("a kick-off after the failover", &reply);
                assert!(Instant::now() < deadline, "still 503 after 30 s: {reply:?}");
                tokio::time::sleep(Duration::from_millis(250)).await;
            };
            let done = poll_until_done(&client, &url, 30 * SECOND).await;
            assert_result(&done, n);
        }
    }
}
