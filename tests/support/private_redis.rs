//! A `redis-server` of a test's own, on a free 127.0.0.1 port: for tests that stop, pause or
//! restart the store, which must never touch the shared server on 6379. The binary must be on
//! PATH; without it the test fails, never skips.

#![cfg(feature = "redis")]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tower_fhir_async::JobId;

const SECOND: Duration = Duration::from_secs(1);

/// A fresh directory under the system's temporary directory, removed when dropped.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new() -> Self {
        let path = std::env::temp_dir().join(format!("tower-fhir-async-outage-{}", JobId::new()));
        std::fs::create_dir(&path)
            .unwrap_or_else(|e| panic!("cannot create {}: {e}", path.display()));
        Self(path)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A `redis-server` child process; dropping it kills the process, so none is left behind even
/// when the test panics.
pub struct RedisServer {
    child: Option<Child>,
    port: u16,
    dir: PathBuf,
    /// Further `redis-server` arguments (a cluster node's).
    extra: Vec<String>,
}

impl RedisServer {
    /// Starts `redis-server` on `port` with its data in `dir` and waits until it answers `PING`.
    pub async fn start(port: u16, dir: &Path) -> Self {
        let mut server = Self {
            child: None,
            port,
            dir: dir.to_owned(),
            extra: Vec::new(),
        };
        server.restart().await;
        server
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("redis.log")).unwrap_or_default()
    }

    /// Starts the server (again) on the same port and directory; the append-only file is
    /// reloaded. Waits until it answers `PING`.
    pub async fn restart(&mut self) {
        assert!(self.child.is_none(), "redis-server is running already");
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "yes", "--appendfsync", "always"])
            .arg("--dir")
            .arg(&self.dir)
            .arg("--logfile")
            .arg(self.dir.join("redis.log"))
            .args(&self.extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot start `redis-server` ({e}). This test runs a Redis server of its own \
                     and needs the redis-server binary on PATH (e.g. `apt-get install redis-server`)"
                )
            });
        self.child = Some(child);
        self.wait_for_ping().await;
    }

    /// SIGSTOP: the server keeps its connections but answers nothing (a stalled store), until
    /// [`resume`](Self::resume).
    pub fn pause(&self) {
        self.signal("-STOP");
    }

    /// SIGCONT after [`pause`](Self::pause): the server reads what was sent meanwhile.
    pub fn resume(&self) {
        self.signal("-CONT");
    }

    fn signal(&self, signal: &str) {
        let child = self.child.as_ref().expect("redis-server is running");
        let status = Command::new("kill")
            .arg(signal)
            .arg(child.id().to_string())
            .status()
            .expect("run kill");
        assert!(status.success(), "kill {signal} redis-server failed");
    }

    /// Kills the server and waits for it to exit.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    async fn wait_for_ping(&mut self) {
        let deadline = Instant::now() + 20 * SECOND;
        loop {
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(exit)) = child.try_wait() {
                    self.child = None;
                    panic!(
                        "redis-server on port {} exited ({exit}) before answering PING; its log:\n{}",
                        self.port,
                        self.log()
                    );
                }
            }
            if ping(self.port).await {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "redis-server on port {} did not answer PING within 20 s; its log:\n{}",
                self.port,
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Whether a Redis server on `port` answers `PING` with `PONG` (not `-LOADING` while it reads
/// its append-only file).
pub async fn ping(port: u16) -> bool {
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
        stream.write_all(b"PING\r\n").await?;
        let mut reply = [0u8; 64];
        let read = stream.read(&mut reply).await?;
        Ok::<_, std::io::Error>(reply[..read].starts_with(b"+PONG"))
    };
    matches!(tokio::time::timeout(SECOND, exchange).await, Ok(Ok(true)))
}

/// A Redis Cluster of a test's own: `masters` masters with `replicas` replicas each, every node
/// a [`RedisServer`] on a free 127.0.0.1 port (its cluster bus on the port + 10000) with its own
/// directory (append-only file and `nodes.conf`, so a restarted node rejoins with its data),
/// `cluster-node-timeout` 1 s. Created with `redis-cli --cluster create`; dropping it kills every
/// node.
#[cfg(feature = "redis-cluster")]
pub struct PrivateCluster {
    pub nodes: Vec<RedisServer>,
    _dir: TempDir,
}

#[cfg(feature = "redis-cluster")]
impl PrivateCluster {
    pub async fn start(masters: usize, replicas: usize) -> Self {
        let dir = TempDir::new();
        let mut nodes = Vec::new();
        for port in cluster_ports(masters * (1 + replicas)) {
            let node_dir = dir.0.join(port.to_string());
            std::fs::create_dir(&node_dir).expect("a node directory");
            let mut node = RedisServer {
                child: None,
                port,
                dir: node_dir,
                extra: [
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    "nodes.conf",
                    "--cluster-node-timeout",
                    "1000",
                ]
                .map(String::from)
                .to_vec(),
            };
            node.restart().await;
            nodes.push(node);
        }
        let addresses: Vec<String> = nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect();
        let created = std::process::Command::new("redis-cli")
            .arg("--cluster")
            .arg("create")
            .args(&addresses)
            .args(["--cluster-replicas", &replicas.to_string(), "--cluster-yes"])
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| {
                panic!("cannot run `redis-cli --cluster create` ({e}); install redis-tools")
            });
        assert!(
            created.status.success(),
            "redis-cli --cluster create failed: {}",
            String::from_utf8_lossy(&created.stdout)
        );
        let cluster = Self { nodes, _dir: dir };
        cluster.wait_until_ok(masters, 30 * SECOND).await;
        cluster
            .wait_for_replicas(masters * replicas, 30 * SECOND)
            .await;
        cluster
    }

    /// Waits until `count` replicas have finished their first sync (`master_link_status:up`).
    pub async fn wait_for_replicas(&self, count: usize, limit: Duration) {
        let deadline = Instant::now() + limit;
        loop {
            let mut synced = 0;
            for node in self.nodes.iter().filter(|n| n.child.is_some()) {
                let client = tower_fhir_async::redis::Client::open(node.url()).unwrap();
                if let Ok(mut c) = client.get_multiplexed_async_connection().await {
                    let info: String = tower_fhir_async::redis::cmd("INFO")
                        .arg("replication")
                        .query_async(&mut c)
                        .await
                        .unwrap_or_default();
                    if info.contains("role:slave") && info.contains("master_link_status:up") {
                        synced += 1;
                    }
                }
            }
            if synced >= count {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{synced} of {count} replicas in sync after {limit:?}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    pub fn urls(&self) -> Vec<String> {
        self.nodes.iter().map(RedisServer::url).collect()
    }

    /// `CLUSTER NODES` as one node sees it.
    pub async fn nodes_seen_by(&self, node: usize) -> String {
        let client = tower_fhir_async::redis::Client::open(self.nodes[node].url()).unwrap();
        let mut connection = client.get_multiplexed_async_connection().await.unwrap();
        tower_fhir_async::redis::cmd("CLUSTER")
            .arg("NODES")
            .query_async(&mut connection)
            .await
            .unwrap()
    }

    /// The index in [`nodes`](Self::nodes) of every master with slots, as node `seen_by` sees it
    /// (failed nodes left out).
    pub async fn masters(&self, seen_by: usize) -> Vec<usize> {
        let table = self.nodes_seen_by(seen_by).await;
        table
            .lines()
            .filter(|line| {
                let flags = line.split(' ').nth(2).unwrap_or_default();
                flags.contains("master") && !flags.contains("fail") && line.split(' ').count() > 8
            })
            .filter_map(|line| {
                let address = line.split(' ').nth(1)?.split('@').next()?;
                let port: u16 = address.rsplit(':').next()?.parse().ok()?;
                self.nodes.iter().position(|n| n.port == port)
            })
            .collect()
    }

    /// The index in [`nodes`](Self::nodes) of the master serving `key`'s slot, as node
    /// `seen_by` sees it.
    pub async fn master_of(&self, key: &str, seen_by: usize) -> usize {
        use tower_fhir_async::redis;
        let client = redis::Client::open(self.nodes[seen_by].url()).unwrap();
        let mut connection = client.get_multiplexed_async_connection().await.unwrap();
        let slot: u16 = redis::cmd("CLUSTER")
            .arg("KEYSLOT")
            .arg(key)
            .query_async(&mut connection)
            .await
            .unwrap();
        let table = self.nodes_seen_by(seen_by).await;
        for line in table.lines() {
            let fields: Vec<&str> = line.split(' ').collect();
            let serves = fields.iter().skip(8).any(|range| {
                let (start, end) = range.split_once('-').unwrap_or((range, range));
                matches!((start.parse::<u16>(), end.parse::<u16>()),
                    (Ok(start), Ok(end)) if (start..=end).contains(&slot))
            });
            if serves && fields.get(2).is_some_and(|f| f.contains("master")) {
                let port: u16 = fields[1]
                    .split('@')
                    .next()
                    .and_then(|address| address.rsplit(':').next())
                    .and_then(|port| port.parse().ok())
                    .expect("a node address");
                return self
                    .nodes
                    .iter()
                    .position(|n| n.port == port)
                    .expect("a node of this cluster");
            }
        }
        panic!("no master serves slot {slot} of {key:?}:\n{table}");
    }

    /// Waits until every running node reports `cluster_state:ok` and `masters` masters serve
    /// slots.
    pub async fn wait_until_ok(&self, masters: usize, limit: Duration) {
        let deadline = Instant::now() + limit;
        loop {
            let mut ok = true;
            for (index, node) in self.nodes.iter().enumerate() {
                if node.child.is_none() {
                    continue;
                }
                let client = tower_fhir_async::redis::Client::open(node.url()).unwrap();
                let info: Option<String> = match client.get_multiplexed_async_connection().await {
                    Ok(mut c) => tower_fhir_async::redis::cmd("CLUSTER")
                        .arg("INFO")
                        .query_async(&mut c)
                        .await
                        .ok(),
                    Err(_) => None,
                };
                let state_ok = info.is_some_and(|i| i.contains("cluster_state:ok"));
                ok &= state_ok && self.masters(index).await.len() == masters;
            }
            if ok {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the test's Redis Cluster was not ok within {limit:?}; node 0 sees:\n{}",
                self.nodes_seen_by(0).await
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

/// `count` consecutive free ports whose cluster bus ports (+ 10000) are free too.
#[cfg(feature = "redis-cluster")]
fn cluster_ports(count: usize) -> Vec<u16> {
    let bindable = |port: u16| std::net::TcpListener::bind(("127.0.0.1", port)).is_ok();
    for _ in 0..200 {
        let mut random = [0u8; 2];
        getrandom_port(&mut random);
        let first = 20_000 + u16::from_be_bytes(random) % 20_000;
        let ports: Vec<u16> = (first..first + count as u16).collect();
        if ports.iter().all(|&p| bindable(p) && bindable(p + 10_000)) {
            return ports;
        }
    }
    panic!("no {count} free ports (with their cluster bus ports) found on 127.0.0.1");
}

/// Random bytes for picking ports, from a fresh job id (the test crates have no RNG of their own).
#[cfg(feature = "redis-cluster")]
fn getrandom_port(bytes: &mut [u8; 2]) {
    let id = JobId::new();
    bytes.copy_from_slice(&id.as_bytes()[..2]);
}

/// `REDIS_CLUSTER_URLS`, comma-separated (default the three masters `.ci/run` starts).
#[cfg(feature = "redis-cluster")]
pub fn cluster_urls() -> Vec<String> {
    std::env::var("REDIS_CLUSTER_URLS")
        .unwrap_or_else(|_| {
            "redis://127.0.0.1:7000,redis://127.0.0.1:7001,redis://127.0.0.1:7002".into()
        })
        .split(',')
        .map(|url| url.trim().to_owned())
        .filter(|url| !url.is_empty())
        .collect()
}

/// Fails a test that cannot reach the cluster of [`cluster_urls`], saying how to get one.
#[cfg(feature = "redis-cluster")]
pub fn no_cluster(why: impl std::fmt::Display) -> ! {
    panic!(
        "cannot reach the Redis Cluster at {:?}: {why}. These tests need one: `bash .ci/run` \
         starts three masters on 127.0.0.1:7000-7002 (see ensure_redis_cluster there), or set \
         REDIS_CLUSTER_URLS",
        cluster_urls()
    )
}

/// Plain connections to every master of the Redis Cluster that the node at `url` belongs to,
/// for looking behind a store's back.
#[cfg(feature = "redis-cluster")]
pub async fn cluster_masters(
    url: &str,
) -> Vec<tower_fhir_async::redis::aio::MultiplexedConnection> {
    use tower_fhir_async::redis;
    let connect = async |url: &str| {
        let client = redis::Client::open(url)
            .unwrap_or_else(|e| panic!("cannot use the Redis Cluster node {url}: {e}"));
        tokio::time::timeout(10 * SECOND, client.get_multiplexed_async_connection())
            .await
            .unwrap_or_else(|_| panic!("no connection to {url} within 10 s"))
            .unwrap_or_else(|e| {
                panic!(
                    "cannot reach the Redis Cluster node {url}: {e}. `bash .ci/run` starts a \
                     cluster on 127.0.0.1:7000-7002, or set REDIS_CLUSTER_URLS"
                )
            })
    };
    let nodes: String = redis::cmd("CLUSTER")
        .arg("NODES")
        .query_async(&mut connect(url).await)
        .await
        .expect("CLUSTER NODES");
    let mut masters = Vec::new();
    for line in nodes.lines() {
        let fields: Vec<&str> = line.split(' ').collect();
        if fields
            .get(2)
            .is_some_and(|f| f.contains("master") && !f.contains("fail"))
        {
            let address = fields[1].split('@').next().unwrap_or_default();
            masters.push(connect(&format!("redis://{address}")).await);
        }
    }
    masters
}

/// Deletes every key under `prefix` on every master of the cluster `url` belongs to, one key
/// at a time (keys of different slots cannot share a `DEL`).
#[cfg(feature = "redis-cluster")]
pub async fn delete_cluster_keys(url: &str, prefix: &str) {
    use tower_fhir_async::redis;
    for mut master in cluster_masters(url).await {
        let mut cursor = 0u64;
        loop {
            let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(format!("{prefix}*"))
                .arg("COUNT")
                .arg(1000)
                .query_async(&mut master)
                .await
                .expect("SCAN for the test's keys");
            if !keys.is_empty() {
                let mut pipe = redis::pipe();
                for key in &keys {
                    pipe.cmd("DEL").arg(key).ignore();
                }
                let () = pipe
                    .query_async(&mut master)
                    .await
                    .expect("DEL the test's keys");
            }
            if next == 0 {
                break;
            }
            cursor = next;
        }
    }
}
