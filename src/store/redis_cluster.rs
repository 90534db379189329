//! [`RedisClusterStore`]: jobs shared by many instances through a Redis Cluster (feature
//! `redis-cluster`).
//!
//! The records, scripts and encoding are `redis_core`'s, as for [`RedisStore`](super::RedisStore);
//! the keys of each job and the indexes it is listed in carry the hash tag of one of the
//! store's partitions, so every script runs on one slot, and announcements go out on each
//! partition's sharded channel (`SPUBLISH`), so a message reaches only its shard.

use std::borrow::Cow;
use std::fmt;
use std::future::ready;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime};

use futures_util::StreamExt;
use redis::cluster::{ClusterClient, ClusterClientBuilder};
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::{Route, RoutingInfo, SingleNodeRoutingInfo, Slot, SlotAddr};
use redis::{ProtocolVersion, PushInfo, PushKind, Value};

use super::redis_core::{Core, Layout, decode_announcement, store_error};
use super::{Changes, Created, JobStore, StoreError, Transition, once_owner};
use crate::job::{JobId, JobOutcome, JobRecord};

/// How long `changes` may take to connect and subscribe before the store is unavailable.
const SUBSCRIBE_TIMEOUT: Duration = Duration::from_secs(5);

/// How long writes stop waiting for replicas after a master had too few.
const SHORT_OF_REPLICAS_PAUSE: Duration = Duration::from_secs(5);

/// Settings applied to every cluster client the store builds, after its own defaults.
type Configure = dyn Fn(ClusterClientBuilder) -> ClusterClientBuilder + Send + Sync;

/// Jobs in a Redis Cluster, shared by every instance of the layer that uses the same cluster,
/// prefix and partition count.
///
/// Every job lives in one of [`partition_count`](Self::partition_count) partitions (by its
/// id), each a hash tag `{p}` in its key names: the job's hash and the partition's `accepted`,
/// `running` and `expiring` indexes share a slot, so each state change is one atomic Lua script
/// on one node, as with [`RedisStore`](super::RedisStore), and the sweeps of
/// [`fail_lapsed`](JobStore::fail_lapsed) and [`sweep`](JobStore::sweep) visit the partitions
/// one after another, in batches, so no index grows into one hot key. An idempotency key lives
/// in its own slot: a kick-off with one creates its job, then claims the key for it (removing
/// the job again when the key names a job that still counts), and the key's expiry follows its
/// job in a second step. Changes are announced on each partition's sharded channel
/// (`SSUBSCRIBE`, Redis 7 or later), which [`changes`](JobStore::changes) subscribes to on a
/// RESP3 connection of its own; redis-rs subscribes again after a failover.
///
/// Built on redis-rs's async cluster client, which follows `MOVED` and `ASK` redirections and
/// refreshes its slot map after a failover by itself. A master that fails over without having
/// replicated its last writes loses them (Redis replicates asynchronously);
/// [`with_replica_acks`](Self::with_replica_acks) makes each finished result wait for its
/// replicas.
///
/// ```no_run
/// use tower_fhir_async::{AsyncLayer, RedisClusterStore};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), tower_fhir_async::StoreError> {
/// let store = RedisClusterStore::connect([
///     "redis://127.0.0.1:7000",
///     "redis://127.0.0.1:7001",
///     "redis://127.0.0.1:7002",
/// ])
/// .await?;
/// let layer = AsyncLayer::builder(store).build();
/// # drop(layer);
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct RedisClusterStore {
    core: Core<ClusterConnection>,
    nodes: Arc<[String]>,
    configure: Arc<Configure>,
    replica_acks: Option<(usize, Duration)>,
    /// The connection of writes that wait for replicas (`WAIT` covers the writes of its own
    /// connection, and blocks it meanwhile), opened at the first such write.
    durable: Arc<tokio::sync::OnceCell<ClusterConnection>>,
    /// Until when writes do not wait for replicas, after a master had too few (a `WAIT` that
    /// cannot be satisfied would only hold up every write queued behind it).
    waits_paused_until: Arc<Mutex<Option<Instant>>>,
}

impl fmt::Debug for RedisClusterStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisClusterStore")
            .field("nodes", &self.nodes)
            .field("prefix", &self.prefix())
            .field("partitions", &self.partition_count())
            .field("replica_acks", &self.replica_acks)
            .finish_non_exhaustive()
    }
}

impl RedisClusterStore {
    /// The prefix of every key, unless [`with_prefix`](Self::with_prefix) sets another; the
    /// same as [`RedisStore`](super::RedisStore)'s.
    ///
    /// ```
    /// assert_eq!(tower_fhir_async::RedisClusterStore::DEFAULT_PREFIX, "tower-fhir-async:");
    /// ```
    pub const DEFAULT_PREFIX: &'static str = "tower-fhir-async:";

    /// How many partitions jobs are spread over, unless
    /// [`with_partitions`](Self::with_partitions) sets another number.
    ///
    /// ```
    /// assert_eq!(tower_fhir_async::RedisClusterStore::DEFAULT_PARTITIONS, 16);
    /// ```
    pub const DEFAULT_PARTITIONS: u16 = 16;

    /// Connects to the cluster that `nodes` belong to (`redis://host:port` each; one reachable
    /// node is enough, the others are found from it), with [`client_builder`](Self::client_builder)'s
    /// settings. The store announces changes and subscribes to them.
    ///
    /// Fails with [`StoreError::Unavailable`] when a URL is invalid or no node can be reached.
    ///
    /// ```no_run
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), tower_fhir_async::StoreError> {
    /// let store = tower_fhir_async::RedisClusterStore::connect(["redis://10.0.0.5:6379"])
    ///     .await?
    ///     .with_prefix("fhir-prod:");
    /// # drop(store);
    /// # Ok(())
    /// # }
    /// ```
    pub async fn connect<I, S>(nodes: I) -> Result<Self, StoreError>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        Self::connect_with(nodes, |builder| builder).await
    }

    /// Like [`connect`](Self::connect), with `configure` applied to every cluster client the
    /// store builds (for commands, and for each subscription, which also gets RESP3 and a push
    /// channel): a password, TLS, other timeouts.
    ///
    /// ```no_run
    /// use std::time::Duration;
    /// use tower_fhir_async::RedisClusterStore;
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), tower_fhir_async::StoreError> {
    /// let store = RedisClusterStore::connect_with(["redis://10.0.0.5:6379"], |builder| {
    ///     builder
    ///         .password("s3cret")
    ///         .response_timeout(Duration::from_secs(10))
    /// })
    /// .await?;
    /// # drop(store);
    /// # Ok(())
    /// # }
    /// ```
    pub async fn connect_with<I, S, F>(nodes: I, configure: F) -> Result<Self, StoreError>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
        F: Fn(ClusterClientBuilder) -> ClusterClientBuilder + Send + Sync + 'static,
    {
        let nodes: Arc<[String]> = nodes.into_iter().map(|n| n.as_ref().to_owned()).collect();
        if nodes.is_empty() {
            return Err(StoreError::Unavailable(
                "no Redis Cluster node given (expected redis://host:port, …)".into(),
            ));
        }
        let configure: Arc<Configure> = Arc::new(configure);
        let client = configure(Self::client_builder(nodes.iter()))
            .build()
            .map_err(|err| {
                StoreError::Unavailable(
                    format!("invalid Redis Cluster node URL (expected redis://host:port): {err}")
                        .into(),
                )
            })?;
        let connection = client.get_async_connection().await.map_err(store_error)?;
        Ok(Self {
            core: Core {
                connection,
                layout: Layout::partitioned(Self::DEFAULT_PREFIX, Self::DEFAULT_PARTITIONS),
                announces: true,
            },
            nodes,
            configure,
            replica_acks: None,
            durable: Arc::new(tokio::sync::OnceCell::new()),
            waits_paused_until: Arc::new(Mutex::new(None)),
        })
    }

    /// The cluster client settings [`connect`](Self::connect) starts from: each connection
    /// attempt times out after 500 ms, a reply after 5 s, and a request is retried up to 5
    /// times, 100 ms to 1 s apart, which carries it across a failover (a replica is promoted
    /// within a few seconds of `cluster-node-timeout`) yet fails it with
    /// [`StoreError::Unavailable`] (`503` at the layer) within seconds when the cluster is gone.
    ///
    /// ```
    /// let builder = tower_fhir_async::RedisClusterStore::client_builder(["redis://127.0.0.1:7000"]);
    /// # drop(builder);
    /// ```
    pub fn client_builder<I, S>(nodes: I) -> ClusterClientBuilder
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let nodes: Vec<String> = nodes.into_iter().map(|n| n.as_ref().to_owned()).collect();
        ClusterClientBuilder::new(nodes)
            .connection_timeout(Duration::from_millis(500))
            .response_timeout(Duration::from_secs(5))
            .retries(5)
            .min_retry_wait(100)
            .max_retry_wait(1000)
    }

    /// Uses `prefix` before every key and channel name, so several applications (or test runs)
    /// can share one cluster. Instances that share jobs must use the same prefix. A prefix
    /// holding a whole hash tag (`{…}`) would put every key in one slot: it works, but on one
    /// node only.
    ///
    /// ```no_run
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), tower_fhir_async::StoreError> {
    /// let store = tower_fhir_async::RedisClusterStore::connect(["redis://127.0.0.1:7000"])
    ///     .await?
    ///     .with_prefix("billing-fhir:");
    /// assert_eq!(store.prefix(), "billing-fhir:");
    /// # Ok(())
    /// # }
    /// ```
    #[must_use]
    pub fn with_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.core.layout = self.core.layout.with_prefix(&prefix.into());
        self
    }

    /// Spreads jobs over `partitions` partitions (at least 1; default
    /// [`DEFAULT_PARTITIONS`](Self::DEFAULT_PARTITIONS)). More partitions spread the indexes
    /// over more slots (and so nodes); each sweep and subscription visits every partition.
    /// Every instance sharing jobs must use the same number: a job is found by its partition.
    ///
    /// ```no_run
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), tower_fhir_async::StoreError> {
    /// let store = tower_fhir_async::RedisClusterStore::connect(["redis://127.0.0.1:7000"])
    ///     .await?
    ///     .with_partitions(64);
    /// assert_eq!(store.partition_count(), 64);
    /// # Ok(())
    /// # }
    /// ```
    #[must_use]
    pub fn with_partitions(mut self, partitions: u16) -> Self {
        self.core.layout = Layout::partitioned(self.core.layout.prefix(), partitions);
        self
    }

    /// Makes every new job and every finished result wait (up to `timeout`) until `replicas`
    /// replicas of its master have acknowledged it (`WAIT`) before the store reports it
    /// recorded, so a master that fails over right after a kick-off was answered `202`, or a
    /// result recorded, cannot take it with it. Off by default: Redis replicates
    /// asynchronously, and without it a failover loses what its master wrote in the last
    /// moments (milliseconds, on a healthy network) before it died.
    ///
    /// These writes go through a connection of their own (`WAIT` blocks the connection it is
    /// sent on), and each waits for a round trip to the replicas, so every master needs that
    /// many. When a write is not acknowledged within `timeout` it stays recorded on its master,
    /// a warning is logged, and no write waits for replicas for the next 5 s: a master left
    /// without replicas after a failover (until a new one joins) would otherwise hold up every
    /// write queued behind its `WAIT`s. The `WAIT`s sent to one master before that run one
    /// after another, so keep `timeout` a small fraction of the layer's
    /// [`store_timeout`](crate::AsyncLayerBuilder::store_timeout) (a tenth, say), or a lost
    /// replica turns into refused kick-offs.
    ///
    /// ```no_run
    /// use std::time::Duration;
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), tower_fhir_async::StoreError> {
    /// let store = tower_fhir_async::RedisClusterStore::connect(["redis://127.0.0.1:7000"])
    ///     .await?
    ///     .with_replica_acks(1, Duration::from_millis(100));
    /// # drop(store);
    /// # Ok(())
    /// # }
    /// ```
    #[must_use]
    pub fn with_replica_acks(mut self, replicas: usize, timeout: Duration) -> Self {
        self.replica_acks = (replicas > 0).then_some((replicas, timeout));
        self
    }

    /// The prefix of every key and channel name.
    pub fn prefix(&self) -> &str {
        self.core.layout.prefix()
    }

    /// How many partitions jobs are spread over.
    pub fn partition_count(&self) -> u16 {
        self.core.layout.partition_count()
    }

    /// The key of the hash holding job `id`: `{prefix}{p}job:{id}`, `p` its partition.
    ///
    /// ```no_run
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), tower_fhir_async::StoreError> {
    /// use tower_fhir_async::{JobId, RedisClusterStore};
    ///
    /// let store = RedisClusterStore::connect(["redis://127.0.0.1:7000"]).await?;
    /// let id = JobId::from_bytes([0; 16]);
    /// assert_eq!(store.job_key(&id), format!("tower-fhir-async:{{0}}job:{id}"));
    /// # Ok(())
    /// # }
    /// ```
    pub fn job_key(&self, id: &JobId) -> String {
        self.core.layout.job_key(id)
    }

    /// The sharded channels changes are announced on, one per partition:
    /// `{prefix}{p}changed`, carrying `cancelled {id}` and `updated {id}` as
    /// [`RedisStore::changes_channel`](super::RedisStore::changes_channel) does.
    pub fn changes_channels(&self) -> Vec<String> {
        self.core.layout.channels()
    }

    /// The operations on the connection writes go through: the shared one, or, when
    /// [`with_replica_acks`](Self::with_replica_acks) asks for replicas, one of their own.
    async fn writer(&self) -> Result<Cow<'_, Core<ClusterConnection>>, StoreError> {
        if self.replica_acks.is_none() {
            return Ok(Cow::Borrowed(&self.core));
        }
        let connection = self
            .durable
            .get_or_try_init(|| async {
                let client = (self.configure)(Self::client_builder(self.nodes.iter()))
                    .build()
                    .map_err(store_error)?;
                client.get_async_connection().await.map_err(store_error)
            })
            .await?;
        Ok(Cow::Owned(Core {
            connection: connection.clone(),
            ..self.core.clone()
        }))
    }

    /// Waits until the replicas [`with_replica_acks`](Self::with_replica_acks) asks for (if
    /// any) have every write sent on `writer`'s connection to the master of job `id` (and to
    /// the master of the idempotency key `once`, when there is one).
    async fn await_replicas(
        &self,
        writer: &Core<ClusterConnection>,
        id: &JobId,
        once: Option<&str>,
    ) {
        if self.replica_acks.is_none() {
            return;
        }
        let job = self.job_key(id);
        let mut slots = vec![Slot::for_key(&job)];
        slots.extend(once.map(Slot::for_key));
        slots.dedup();
        for slot in slots {
            self.await_replicas_of(writer, slot, id).await;
        }
    }

    /// Whether waiting for replicas is paused after a shortfall.
    fn waits_paused(&self) -> bool {
        let paused = self
            .waits_paused_until
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        paused.is_some_and(|until| Instant::now() < until)
    }

    async fn await_replicas_of(&self, writer: &Core<ClusterConnection>, slot: Slot, id: &JobId) {
        let Some((replicas, timeout)) = self.replica_acks else {
            return;
        };
        if self.waits_paused() {
            return;
        }
        let millis = u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX);
        let mut wait = redis::cmd("WAIT");
        wait.arg(replicas).arg(millis);
        // The master that took the write: WAIT counts the replicas that have this connection's
        // writes to it.
        let route = RoutingInfo::SingleNode(SingleNodeRoutingInfo::SpecificNode(Route::with_slot(
            slot,
            SlotAddr::Master,
        )));
        let acked = writer
            .connection
            .clone()
            .route_command(wait, route)
            .await
            .and_then(|value| redis::from_redis_value::<usize>(value).map_err(Into::into));
        match acked {
            Ok(acked) if acked >= replicas => {}
            Ok(acked) => {
                *self
                    .waits_paused_until
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner) =
                    Some(Instant::now() + SHORT_OF_REPLICAS_PAUSE);
                tracing::warn!(
                    job = %id,
                    acked,
                    wanted = replicas,
                    pause = ?SHORT_OF_REPLICAS_PAUSE,
                    "the job is recorded on its master but not yet on enough replicas; writes \
                     do not wait for replicas for a while"
                );
            }
            Err(err) => tracing::warn!(
                job = %id,
                error = %err,
                "could not wait for replicas to acknowledge the job"
            ),
        }
    }

    /// The changes announced on every partition's sharded channel, on a RESP3 connection of
    /// its own.
    async fn subscribe(&self) -> Result<Option<Changes>, StoreError> {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<PushInfo>();
        let client: ClusterClient = (self.configure)(Self::client_builder(self.nodes.iter()))
            .use_protocol(ProtocolVersion::RESP3)
            .push_sender(tx)
            .build()
            .map_err(store_error)?;
        let channels = self.changes_channels();
        let subscribe = async {
            let mut connection = client.get_async_connection().await?;
            for channel in &channels {
                // One at a time: the channels hash to different slots.
                connection.ssubscribe(channel).await?;
            }
            Ok(connection)
        };
        let connection = tokio::time::timeout(SUBSCRIBE_TIMEOUT, subscribe)
            .await
            .map_err(|_| {
                StoreError::Unavailable(
                    format!(
                        "could not subscribe to the {} change channels within {SUBSCRIBE_TIMEOUT:?}; is the Redis Cluster reachable?",
                        channels.len()
                    )
                    .into(),
                )
            })?
            .map_err(store_error)?;
        // The connection lives as long as the stream; redis-rs subscribes again after it
        // reconnects (announcements sent meanwhile are lost: the layer catches up at its next
        // lease renewal or store read).
        let pushes = futures_util::stream::unfold((rx, connection), |(mut rx, connection)| async {
            let push = rx.recv().await?;
            Some((push, (rx, connection)))
        });
        let changes = pushes.filter_map(|push| {
            let change = match push.kind {
                PushKind::SMessage | PushKind::Message => match push.data.get(1) {
                    Some(Value::BulkString(payload)) => decode_announcement(payload),
                    _ => None,
                },
                _ => None,
            };
            ready(change)
        });
        Ok(Some(Box::pin(changes)))
    }
}

impl JobStore for RedisClusterStore {
    async fn create(&self, record: JobRecord) -> Result<(), StoreError> {
        let writer = self.writer().await?;
        let id = record.id;
        writer.create(record).await?;
        self.await_replicas(&writer, &id, None).await;
        Ok(())
    }

    async fn create_once(
        &self,
        record: JobRecord,
        key: &str,
        now: SystemTime,
    ) -> Result<Created, StoreError> {
        let writer = self.writer().await?;
        let id = record.id;
        let once = once_owner(&record)
            .filter(|_| self.replica_acks.is_some())
            .map(|owner| writer.layout.once_key(owner, key));
        let created = writer.create_once_split(record, key, now).await?;
        self.await_replicas(&writer, &id, once.as_deref()).await;
        Ok(created)
    }

    async fn get(&self, id: &JobId, now: SystemTime) -> Result<Option<JobRecord>, StoreError> {
        self.core.get(id, now).await
    }

    async fn transition(&self, id: &JobId, transition: Transition<'_>) -> Result<bool, StoreError> {
        if !matches!(transition, Transition::Finish { .. }) {
            return self.core.transition(id, transition).await;
        }
        let writer = self.writer().await?;
        let applied = writer.transition(id, transition).await?;
        if applied {
            self.await_replicas(&writer, id, None).await;
        }
        Ok(applied)
    }

    async fn cancel(&self, id: &JobId, now: SystemTime) -> Result<bool, StoreError> {
        self.core.cancel(id, now).await
    }

    async fn abandon(
        &self,
        id: &JobId,
        now: SystemTime,
        until: SystemTime,
    ) -> Result<(), StoreError> {
        self.core.abandon(id, now, until).await
    }

    async fn renew_leases(
        &self,
        instance: &str,
        ids: &[JobId],
        lease_until: SystemTime,
    ) -> Result<Vec<JobId>, StoreError> {
        self.core.renew_leases(instance, ids, lease_until).await
    }

    async fn fail_lapsed(
        &self,
        now: SystemTime,
        unstarted_before: SystemTime,
        outcome: JobOutcome,
        expires_at: SystemTime,
    ) -> Result<Vec<JobId>, StoreError> {
        self.core
            .fail_lapsed(now, unstarted_before, outcome, expires_at)
            .await
    }

    async fn sweep(&self, now: SystemTime) -> Result<usize, StoreError> {
        self.core.sweep(now).await
    }

    async fn changes(&self) -> Result<Option<Changes>, StoreError> {
        self.subscribe().await
    }
}
