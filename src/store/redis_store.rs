//! [`RedisStore`]: jobs shared by many instances through one Redis server (feature `redis`).
//!
//! The key layout, the scripts and the record encoding are `redis_core`'s, shared with
//! `RedisClusterStore`; on one server no key carries a hash tag, so every key is
//! `{prefix}job:{id}`, `{prefix}accepted` … as in earlier versions.

use std::future::ready;
use std::time::{Duration, SystemTime};

use futures_util::StreamExt;
use redis::Client;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};

use super::redis_core::{Core, Layout, decode_announcement, store_error};
use super::{Changes, Created, JobStore, StoreError, Transition};
use crate::job::{JobId, JobOutcome, JobRecord};

/// How long `changes` may take to connect and subscribe before the store is unavailable.
const SUBSCRIBE_TIMEOUT: Duration = Duration::from_secs(2);

/// Jobs in Redis, shared by every instance of the layer that uses the same server and prefix.
///
/// Built on redis-rs's multiplexed [`ConnectionManager`], which reconnects by itself; clones
/// share its connection. Every state change is a Lua script, so transitions are atomic
/// compare-and-sets even between instances. Finished jobs get a native Redis expiry, so Redis
/// reclaims their space itself; reads also compare the stored expiry with the caller's `now`, so
/// a record is absent from the moment it expires even before Redis removes it.
///
/// A cancel publishes the job's id on [`changes_channel`](Self::changes_channel) in the same
/// script, and every end or progress change after it is committed; [`changes`](JobStore::changes)
/// subscribes to it (on a connection of its own), so the instance running a job cancelled
/// through another one stops it at once, and long polls wake wherever they are held.
///
/// Needs a standalone Redis server (or a primary with replicas; tested with Redis 7). For a
/// Redis Cluster use `RedisClusterStore` (feature `redis-cluster`), which keeps the same records
/// in hash-tagged partitions.
///
/// ```no_run
/// use tower_fhir_async::{AsyncLayer, RedisStore};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), tower_fhir_async::StoreError> {
/// let store = RedisStore::connect("redis://127.0.0.1:6379").await?;
/// let layer = AsyncLayer::builder(store).build();
/// # drop(layer);
/// # Ok(())
/// # }
/// ```
#[derive(Debug, Clone)]
pub struct RedisStore {
    core: Core<ConnectionManager>,
    /// Opens the pub/sub connection of [`JobStore::changes`]; a `ConnectionManager` cannot.
    pubsub: Option<Client>,
}

impl RedisStore {
    /// The prefix of every key, unless [`with_prefix`](Self::with_prefix) sets another.
    ///
    /// ```
    /// assert_eq!(tower_fhir_async::RedisStore::DEFAULT_PREFIX, "tower-fhir-async:");
    /// ```
    pub const DEFAULT_PREFIX: &'static str = "tower-fhir-async:";

    /// A store using `manager`'s connection, with the default prefix.
    ///
    /// A store built this way publishes cancels but does not subscribe to changes (its
    /// [`changes`](JobStore::changes) is `None`: the layer learns of cancels through another
    /// instance at its next lease renewal, and long polls read the store again) unless
    /// [`with_pubsub`](Self::with_pubsub) gives it a client. [`connect`](Self::connect) does both.
    ///
    /// Build the manager with [`manager_config`](Self::manager_config) (or settings like it), so
    /// that operations fail fast with [`StoreError::Unavailable`] while Redis is unreachable
    /// instead of waiting through redis-rs's default reconnection backoff.
    ///
    /// ```no_run
    /// use tower_fhir_async::RedisStore;
    /// use tower_fhir_async::redis::{Client, aio::ConnectionManager};
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let client = Client::open("redis://127.0.0.1:6379")?;
    /// let manager =
    ///     ConnectionManager::new_with_config(client, RedisStore::manager_config()).await?;
    /// let store = RedisStore::new(manager);
    /// # drop(store);
    /// # Ok(())
    /// # }
    /// ```
    pub fn new(manager: ConnectionManager) -> Self {
        Self {
            core: Core {
                connection: manager,
                layout: Layout::single(Self::DEFAULT_PREFIX),
                announces: false,
            },
            pubsub: None,
        }
    }

    /// Connects to the Redis server at `url` (e.g. `redis://127.0.0.1:6379`, or `rediss://` with
    /// a TLS feature of the `redis` crate), using [`manager_config`](Self::manager_config).
    ///
    /// Fails with [`StoreError::Unavailable`] when the URL is invalid or the server cannot be
    /// reached.
    ///
    /// ```no_run
    /// use tower_fhir_async::RedisStore;
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), tower_fhir_async::StoreError> {
    /// let store = RedisStore::connect("redis://127.0.0.1:6379")
    ///     .await?
    ///     .with_prefix("fhir-prod:");
    /// # drop(store);
    /// # Ok(())
    /// # }
    /// ```
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        let client = Client::open(url).map_err(|err| {
            StoreError::Unavailable(
                format!("invalid Redis URL (expected redis://host:port/db): {err}").into(),
            )
        })?;
        let manager = ConnectionManager::new_with_config(client.clone(), Self::manager_config())
            .await
            .map_err(store_error)?;
        Ok(Self::new(manager).with_pubsub(client))
    }

    /// Subscribes to changes through `client`, which opens a connection of its own for each
    /// [`changes`](JobStore::changes) stream (pub/sub needs a dedicated RESP2
    /// connection). Use the client the manager was built from.
    ///
    /// ```no_run
    /// use tower_fhir_async::RedisStore;
    /// use tower_fhir_async::redis::{Client, aio::ConnectionManager};
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let client = Client::open("redis://127.0.0.1:6379")?;
    /// let manager =
    ///     ConnectionManager::new_with_config(client.clone(), RedisStore::manager_config()).await?;
    /// let store = RedisStore::new(manager).with_pubsub(client);
    /// # drop(store);
    /// # Ok(())
    /// # }
    /// ```
    pub fn with_pubsub(mut self, client: Client) -> Self {
        self.pubsub = Some(client);
        self.core.announces = true;
        self
    }

    /// The connection settings [`connect`](Self::connect) uses, for building a
    /// [`ConnectionManager`] yourself.
    ///
    /// A job store sits on the request path (polls, kick-offs, cancels), so an unreachable Redis
    /// must turn into a quick `503` rather than a hung request: each connection attempt times
    /// out after 500 ms and is retried once (after 50–200 ms), so an operation fails within
    /// about 1.2 s while Redis is down, and the next operation tries to reconnect afresh. A reply
    /// may take up to 5 s, leaving room for large results.
    ///
    /// ```
    /// use std::time::Duration;
    /// use tower_fhir_async::RedisStore;
    ///
    /// let config = RedisStore::manager_config().set_response_timeout(Some(Duration::from_secs(10)));
    /// # drop(config);
    /// ```
    pub fn manager_config() -> ConnectionManagerConfig {
        ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_millis(500)))
            .set_number_of_retries(1)
            .set_min_delay(Duration::from_millis(50))
            .set_max_delay(Duration::from_millis(200))
            .set_response_timeout(Some(Duration::from_secs(5)))
    }

    /// Uses `prefix` before every key and channel name, so several applications (or test runs)
    /// can share one Redis server. Instances that share jobs must use the same prefix.
    ///
    /// ```no_run
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), tower_fhir_async::StoreError> {
    /// let store = tower_fhir_async::RedisStore::connect("redis://127.0.0.1:6379")
    ///     .await?
    ///     .with_prefix("billing-fhir:");
    /// assert_eq!(store.prefix(), "billing-fhir:");
    /// # Ok(())
    /// # }
    /// ```
    pub fn with_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.core.layout = self.core.layout.with_prefix(&prefix.into());
        self
    }

    /// The prefix of every key and channel name.
    ///
    /// ```no_run
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), tower_fhir_async::StoreError> {
    /// let store = tower_fhir_async::RedisStore::connect("redis://127.0.0.1:6379").await?;
    /// assert_eq!(store.prefix(), tower_fhir_async::RedisStore::DEFAULT_PREFIX);
    /// # Ok(())
    /// # }
    /// ```
    pub fn prefix(&self) -> &str {
        self.core.layout.prefix()
    }

    /// The pub/sub channel on which changed jobs are announced: `cancelled {id}` by every
    /// cancel (in the cancelling script), `updated {id}` after a job ends or its progress
    /// changes; ids in their 32-digit text form. The channel is `{prefix}changed`; see
    /// [`JobStore::changes`].
    ///
    /// ```no_run
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), tower_fhir_async::StoreError> {
    /// let store = tower_fhir_async::RedisStore::connect("redis://127.0.0.1:6379").await?;
    /// assert_eq!(store.changes_channel(), "tower-fhir-async:changed");
    /// # Ok(())
    /// # }
    /// ```
    pub fn changes_channel(&self) -> String {
        self.core.layout.channel(0)
    }

    /// The key of the hash holding job `id`: `{prefix}job:{id}`.
    ///
    /// ```no_run
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), tower_fhir_async::StoreError> {
    /// use tower_fhir_async::{JobId, RedisStore};
    ///
    /// let store = RedisStore::connect("redis://127.0.0.1:6379").await?;
    /// let id = JobId::new();
    /// assert_eq!(store.job_key(&id), format!("tower-fhir-async:job:{id}"));
    /// # Ok(())
    /// # }
    /// ```
    pub fn job_key(&self, id: &JobId) -> String {
        self.core.layout.job_key(id)
    }
}

impl JobStore for RedisStore {
    async fn create(&self, record: JobRecord) -> Result<(), StoreError> {
        self.core.create(record).await
    }

    async fn create_once(
        &self,
        record: JobRecord,
        key: &str,
        now: SystemTime,
    ) -> Result<Created, StoreError> {
        self.core.create_once_atomic(record, key, now).await
    }

    async fn get(&self, id: &JobId, now: SystemTime) -> Result<Option<JobRecord>, StoreError> {
        self.core.get(id, now).await
    }

    async fn transition(&self, id: &JobId, transition: Transition<'_>) -> Result<bool, StoreError> {
        self.core.transition(id, transition).await
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

impl RedisStore {
    /// The changes published on [`changes_channel`](Self::changes_channel), on a pub/sub
    /// connection of its own; `None` without a pub/sub client.
    async fn subscribe(&self) -> Result<Option<Changes>, StoreError> {
        let channel = self.changes_channel();
        let Some(client) = &self.pubsub else {
            return Ok(None);
        };
        let subscribe = async {
            let mut pubsub = client.get_async_pubsub().await?;
            pubsub.subscribe(&channel).await?;
            Ok(pubsub)
        };
        let pubsub = tokio::time::timeout(SUBSCRIBE_TIMEOUT, subscribe)
            .await
            .map_err(|_| {
                StoreError::Unavailable(
                    format!(
                        "could not subscribe to {channel} within {SUBSCRIBE_TIMEOUT:?}; is Redis reachable?"
                    )
                    .into(),
                )
            })?
            .map_err(store_error)?;
        // The stream ends when the connection drops; the layer then asks again, and catches up
        // at its next lease renewal (cancels) or store read (long polls).
        let ids = pubsub
            .into_on_message()
            .filter_map(|message| ready(decode_announcement(message.get_payload_bytes())));
        Ok(Some(Box::pin(ids)))
    }
}
