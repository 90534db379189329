//! [`RedisStore`]: jobs shared by many instances through Redis (feature `redis`).
//!
//! # Layout
//!
//! Every key starts with the store's prefix (default [`RedisStore::DEFAULT_PREFIX`]):
//!
//! | key | type | holds |
//! | --- | --- | --- |
//! | `{prefix}job:{id}` | hash | one job: `state`, `instance`, `lease`, `owner`, `method`, `target`, `progress`, `created`, `finished`, `expires`, `kind`, `response`, and `once` (the name of its idempotency key, when it has one) |
//! | `{prefix}once:{n}:{owner}:{key}` | string | the id of the job `owner` kicked off with idempotency key `key`; `n` is the owner's length in bytes, so no owner and key pair reads as another |
//! | `{prefix}accepted` | sorted set | ids of `Accepted` jobs, scored by creation time |
//! | `{prefix}running` | sorted set | ids of `Running` jobs, scored by lease end |
//! | `{prefix}expiring` | sorted set | ids of finished jobs, scored by expiry |
//! | `{prefix}changed` | pub/sub channel | `cancelled {id}` as a job is cancelled, `updated {id}` as it ends or its progress changes |
//!
//! Times are Unix milliseconds in decimal; `response` is the binary encoding of the stored
//! response. Every state change is one Lua script, so it is atomic and keeps the sorted sets in
//! step with the hashes.
//!
//! An idempotency key lives exactly as long as its job counts for a repeated kick-off: it gets
//! the job's native expiry when the job completes, and is deleted when the job fails, is
//! cancelled or is swept, by the same script (only while it still names that job: a key names
//! the newest job kicked off with it).

use std::future::ready;
use std::sync::{Arc, LazyLock};
use std::time::{Duration, SystemTime};

use futures_util::StreamExt;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{Client, ErrorKind, RedisError, Script, Value};

use super::codec::{
    decode_change, decode_response, encode_change, encode_response, from_millis, to_millis,
};
use super::{Change, Changes, Created, JobStore, StoreError, Transition, once_owner};
use crate::job::{JobId, JobKind, JobOutcome, JobRecord, JobState, StoredResponse};

/// At most this many index entries are visited by one script run of `fail_lapsed` or `sweep`,
/// so a large backlog never blocks Redis for long; the store loops until it is done.
const BATCH: usize = 128;

/// At most this many jobs are renewed by one script run of `renew_leases`.
const RENEW_BATCH: usize = 256;

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
/// Needs a standalone Redis server (or a primary with replicas; tested with Redis 7). Redis
/// Cluster is not supported: the scripts reach jobs named by the sorted sets, which may live on
/// other nodes.
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
    manager: ConnectionManager,
    /// Opens the pub/sub connection of [`JobStore::changes`]; a `ConnectionManager` cannot.
    pubsub: Option<Client>,
    prefix: Arc<str>,
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
            manager,
            pubsub: None,
            prefix: Arc::from(Self::DEFAULT_PREFIX),
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
        self.prefix = Arc::from(prefix.into());
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
        &self.prefix
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
        format!("{}changed", self.prefix)
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
        format!("{}job:{id}", self.prefix)
    }

    /// The key naming the job `owner` kicked off with idempotency key `key`.
    fn once_key(&self, owner: &str, key: &str) -> String {
        format!("{}once:{}:{owner}:{key}", self.prefix, owner.len())
    }

    fn index_key(&self, name: &str) -> String {
        format!("{}{name}", self.prefix)
    }

    fn connection(&self) -> ConnectionManager {
        // A clone shares the one multiplexed connection.
        self.manager.clone()
    }
}

/// The hash fields, in the order `get` reads them.
const FIELDS: [&str; 12] = [
    "state", "instance", "lease", "owner", "method", "target", "progress", "created", "finished",
    "expires", "kind", "response",
];

const ACCEPTED: &str = "accepted";
const RUNNING: &str = "running";
const COMPLETED: &str = "completed";
const FAILED: &str = "failed";
const EXPIRING: &str = "expiring";

/// `KEYS`: job, index. `ARGV`: id, index score ('' for none), ttl ms ('' for none), then field,
/// value pairs. 1 when created, 0 when the id is taken.
static CREATE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], unpack(ARGV, 4))
if ARGV[2] ~= '' then redis.call('ZADD', KEYS[2], ARGV[2], ARGV[1]) end
if ARGV[3] ~= '' then redis.call('PEXPIRE', KEYS[1], ARGV[3]) end
return 1
",
    )
});

/// `KEYS`: idempotency key, job, index. `ARGV`: id, index score ('' for none), ttl ms ('' for
/// none), prefix, now, owner, then field, value pairs. 1 when created, 0 when the id is taken,
/// or the id of the job the idempotency key names, when that job counts: accepted, running or
/// completed, of the same owner, not expired at `now`.
static CREATE_ONCE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local existing = redis.call('GET', KEYS[1])
if existing then
  local job = redis.call('HMGET', ARGV[4] .. 'job:' .. existing, 'state', 'owner', 'expires')
  local expires = tonumber(job[3])
  if (job[1] == 'accepted' or job[1] == 'running' or job[1] == 'completed')
    and job[2] == ARGV[6] and not (expires and expires <= tonumber(ARGV[5])) then
    return existing
  end
end
if redis.call('EXISTS', KEYS[2]) == 1 then return 0 end
redis.call('HSET', KEYS[2], unpack(ARGV, 7))
if ARGV[2] ~= '' then redis.call('ZADD', KEYS[3], ARGV[2], ARGV[1]) end
-- SET drops the expiry the key had for the job it named before.
redis.call('SET', KEYS[1], ARGV[1])
if ARGV[3] ~= '' then
  redis.call('PEXPIRE', KEYS[2], ARGV[3])
  redis.call('PEXPIRE', KEYS[1], ARGV[3])
end
return 1
",
    )
});

/// `KEYS`: job, accepted, running. `ARGV`: id, instance, lease.
static START: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
if redis.call('HGET', KEYS[1], 'state') ~= 'accepted' then return 0 end
redis.call('HSET', KEYS[1], 'state', 'running', 'instance', ARGV[2], 'lease', ARGV[3])
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('ZADD', KEYS[3], ARGV[3], ARGV[1])
return 1
",
    )
});

/// `KEYS`: job, accepted, running, expiring. `ARGV`: id, state, response, finished, expires,
/// ttl ms, channel ('' for none). When the job ended here, `updated {id}` is published on the
/// channel in the same round trip.
///
/// The job's idempotency key, if it still names the job, gets the same expiry when the job
/// completes, and is deleted when it fails (a failed job does not count for a repeat).
///
/// The native expiry is relative (`PEXPIRE expires - finished`) rather than `PEXPIREAT expires`,
/// so it is right even when the caller's clock is not Redis's (paused test clocks, skew); reads
/// compare `expires` with the caller's `now` in any case.
static FINISH: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local job = redis.call('HMGET', KEYS[1], 'state', 'once')
if job[1] ~= 'accepted' and job[1] ~= 'running' then return 0 end
if job[2] and redis.call('GET', job[2]) == ARGV[1] then
  if ARGV[2] == 'completed' and tonumber(ARGV[6]) > 0 then
    redis.call('PEXPIRE', job[2], ARGV[6])
  else
    redis.call('DEL', job[2])
  end
end
redis.call('HSET', KEYS[1], 'state', ARGV[2], 'response', ARGV[3], 'finished', ARGV[4],
  'expires', ARGV[5])
redis.call('HDEL', KEYS[1], 'instance', 'lease', 'progress')
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('ZREM', KEYS[3], ARGV[1])
if tonumber(ARGV[6]) > 0 then
  redis.call('PEXPIRE', KEYS[1], ARGV[6])
  redis.call('ZADD', KEYS[4], ARGV[5], ARGV[1])
else
  redis.call('DEL', KEYS[1])
end
if ARGV[7] ~= '' then redis.call('PUBLISH', ARGV[7], 'updated ' .. ARGV[1]) end
return 1
",
    )
});

/// `KEYS`: job, accepted, running, expiring. `ARGV`: id, now, channel. 1 when a job (unexpired
/// at `now`) was removed, and then `cancelled {id}` is published on the channel. Its idempotency key goes
/// too, if it still names the job.
static CANCEL: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
for i = 2, 4 do redis.call('ZREM', KEYS[i], ARGV[1]) end
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
local job = redis.call('HMGET', KEYS[1], 'expires', 'once')
local expires = tonumber(job[1])
if job[2] and redis.call('GET', job[2]) == ARGV[1] then redis.call('DEL', job[2]) end
redis.call('DEL', KEYS[1])
if expires and expires <= tonumber(ARGV[2]) then return 0 end
redis.call('PUBLISH', ARGV[3], 'cancelled ' .. ARGV[1])
return 1
",
    )
});

/// `KEYS`: job, accepted, running, expiring. `ARGV`: id, ttl ms. Removes the job as `CANCEL`
/// does (without announcing: nobody was given its status URL) and leaves a tombstone hash in
/// its place for `ttl`, so a `CREATE` or `CREATE_ONCE` of the id that arrives later (sent on a
/// connection that stalled) finds the key taken and creates nothing.
static ABANDON: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
for i = 2, 4 do redis.call('ZREM', KEYS[i], ARGV[1]) end
local once = redis.call('HGET', KEYS[1], 'once')
if once and redis.call('GET', once) == ARGV[1] then redis.call('DEL', once) end
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], 'state', 'abandoned')
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return 1
",
    )
});

/// `KEYS`: job. `ARGV`: progress, id, channel ('' for none). A change is published as
/// `updated {id}` in the same round trip.
static SET_PROGRESS: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local job = redis.call('HMGET', KEYS[1], 'state', 'progress')
if (job[1] == 'accepted' or job[1] == 'running') and job[2] ~= ARGV[1] then
  redis.call('HSET', KEYS[1], 'progress', ARGV[1])
  if ARGV[3] ~= '' then redis.call('PUBLISH', ARGV[3], 'updated ' .. ARGV[2]) end
  return 1
end
return 0
",
    )
});

/// `KEYS`: running, then one job key per id. `ARGV`: instance, lease, then the ids. Returns the
/// 0-based positions of the ids no longer running on `instance`.
static RENEW_LEASES: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local gone = {}
for i = 2, #KEYS do
  local id = ARGV[i + 1]
  local job = redis.call('HMGET', KEYS[i], 'state', 'instance')
  if job[1] == 'running' and job[2] == ARGV[1] then
    redis.call('HSET', KEYS[i], 'lease', ARGV[2])
    redis.call('ZADD', KEYS[1], ARGV[2], id)
  else
    gone[#gone + 1] = i - 2
  end
end
return gone
",
    )
});

/// `KEYS`: running, accepted, expiring. `ARGV`: prefix, now, unstarted_before, state, response,
/// expires, ttl ms, batch size. Visits at most a batch of lapsed entries in each index; returns
/// `{visited running, visited accepted, {failed ids}}`.
///
/// A failed job's idempotency key is deleted, if it still names the job.
///
/// Each visited entry is either failed (and leaves its index), dropped (its job is gone or in
/// another state), or re-scored from its hash (the index lagged behind), so the next run never
/// visits it again.
static FAIL_LAPSED: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local prefix, now, unstarted = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local failed = {}
local function fail(key, id)
  local once = redis.call('HGET', key, 'once')
  if once and redis.call('GET', once) == id then redis.call('DEL', once) end
  redis.call('HSET', key, 'state', ARGV[4], 'response', ARGV[5], 'finished', ARGV[2],
    'expires', ARGV[6])
  redis.call('HDEL', key, 'instance', 'lease', 'progress')
  if tonumber(ARGV[7]) > 0 then
    redis.call('PEXPIRE', key, ARGV[7])
    redis.call('ZADD', KEYS[3], ARGV[6], id)
  else
    redis.call('DEL', key)
  end
  failed[#failed + 1] = id
end
local function visit(index, state, field, max, until_text)
  local ids = redis.call('ZRANGEBYSCORE', index, '-inf', until_text, 'LIMIT', 0, ARGV[8])
  for _, id in ipairs(ids) do
    local key = prefix .. 'job:' .. id
    local job = redis.call('HMGET', key, 'state', field)
    local at = tonumber(job[2])
    if job[1] == state and at and at > max then
      redis.call('ZADD', index, job[2], id)
    else
      redis.call('ZREM', index, id)
      if job[1] == state then fail(key, id) end
    end
  end
  return #ids
end
local running = visit(KEYS[1], 'running', 'lease', now, ARGV[2])
local accepted = visit(KEYS[2], 'accepted', 'created', unstarted, ARGV[3])
return {running, accepted, failed}
",
    )
});

/// `KEYS`: expiring. `ARGV`: prefix, now, batch size. Deletes jobs expired at `now` that Redis
/// has not removed yet (with their idempotency keys, if those still name them), and drops index
/// entries of jobs Redis already removed. Returns `{visited, deleted}`.
static SWEEP: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local prefix, now = ARGV[1], tonumber(ARGV[2])
local deleted = 0
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[2], 'LIMIT', 0, ARGV[3])
for _, id in ipairs(ids) do
  local key = prefix .. 'job:' .. id
  local job = redis.call('HMGET', key, 'expires', 'once')
  local raw = job[1]
  local expires = tonumber(raw)
  if expires and expires > now then
    redis.call('ZADD', KEYS[1], raw, id)
  else
    redis.call('ZREM', KEYS[1], id)
    if job[2] and redis.call('GET', job[2]) == id then redis.call('DEL', job[2]) end
    if raw then deleted = deleted + redis.call('DEL', key) end
  end
end
return {#ids, deleted}
",
    )
});

impl JobStore for RedisStore {
    async fn create(&self, record: JobRecord) -> Result<(), StoreError> {
        let placement = Placement::of(&record);
        let mut invocation = CREATE.prepare_invoke();
        invocation
            .key(self.job_key(&record.id))
            .key(self.index_key(placement.index))
            .arg(record.id.to_string())
            .arg(placement.score)
            .arg(placement.ttl);
        for (field, value) in fields(&record) {
            invocation.arg(field).arg(value);
        }
        let created: i64 = invocation
            .invoke_async(&mut self.connection())
            .await
            .map_err(store_error)?;
        if created == 1 {
            Ok(())
        } else {
            Err(StoreError::Conflict(record.id))
        }
    }

    async fn create_once(
        &self,
        record: JobRecord,
        key: &str,
        now: SystemTime,
    ) -> Result<Created, StoreError> {
        let Some(owner) = once_owner(&record) else {
            return self.create(record).await.map(|()| Created::New);
        };
        let once = self.once_key(owner, key);
        let placement = Placement::of(&record);
        let mut invocation = CREATE_ONCE.prepare_invoke();
        invocation
            .key(&once)
            .key(self.job_key(&record.id))
            .key(self.index_key(placement.index))
            .arg(record.id.to_string())
            .arg(placement.score)
            .arg(placement.ttl)
            .arg(&*self.prefix)
            .arg(to_millis(now))
            .arg(owner);
        for (field, value) in fields(&record) {
            invocation.arg(field).arg(value);
        }
        invocation.arg("once").arg(&once);
        let reply: Value = invocation
            .invoke_async(&mut self.connection())
            .await
            .map_err(store_error)?;
        match reply {
            Value::Int(1) => Ok(Created::New),
            Value::Int(0) => Err(StoreError::Conflict(record.id)),
            Value::BulkString(existing) => std::str::from_utf8(&existing)
                .ok()
                .and_then(JobId::parse)
                .map(Created::Existing)
                .ok_or_else(|| {
                    StoreError::Corrupt(format!(
                        "the idempotency key {once:?} names {:?}, not a job id",
                        String::from_utf8_lossy(&existing)
                    ))
                }),
            other => Err(StoreError::Corrupt(format!(
                "unexpected reply from Redis to a kick-off with an idempotency key: {other:?}"
            ))),
        }
    }

    async fn get(&self, id: &JobId, now: SystemTime) -> Result<Option<JobRecord>, StoreError> {
        let values: Vec<Option<Vec<u8>>> = redis::cmd("HMGET")
            .arg(self.job_key(id))
            .arg(&FIELDS[..])
            .query_async(&mut self.connection())
            .await
            .map_err(store_error)?;
        decode_record(*id, values, now)
    }

    async fn transition(&self, id: &JobId, transition: Transition<'_>) -> Result<bool, StoreError> {
        // Ends and progress are announced by the scripts themselves, in the same round trip.
        let applied: i64 = match transition {
            Transition::Start {
                instance,
                lease_until,
            } => {
                let started = START
                    .key(self.job_key(id))
                    .key(self.index_key(ACCEPTED))
                    .key(self.index_key(RUNNING))
                    .arg(id.to_string())
                    .arg(instance)
                    .arg(to_millis(lease_until))
                    .invoke_async(&mut self.connection())
                    .await;
                // A start is nobody's news: pollers see `Running` as they saw `Accepted`.
                started.map_err(store_error)?
            }
            Transition::Finish {
                outcome,
                finished_at,
                expires_at,
            } => {
                let (state, response) = outcome_parts(&outcome);
                let finished = FINISH
                    .key(self.job_key(id))
                    .key(self.index_key(ACCEPTED))
                    .key(self.index_key(RUNNING))
                    .key(self.index_key(EXPIRING))
                    .arg(id.to_string())
                    .arg(state)
                    .arg(encode_response(response))
                    .arg(to_millis(finished_at))
                    .arg(to_millis(expires_at))
                    .arg(ttl_millis(finished_at, expires_at))
                    .arg(self.announced_on())
                    .invoke_async(&mut self.connection())
                    .await;
                finished.map_err(store_error)?
            }
            Transition::Progress(progress) => {
                let changed = SET_PROGRESS
                    .key(self.job_key(id))
                    .arg(progress)
                    .arg(id.to_string())
                    .arg(self.announced_on())
                    .invoke_async(&mut self.connection())
                    .await;
                changed.map_err(store_error)?
            }
        };
        Ok(applied == 1)
    }

    async fn cancel(&self, id: &JobId, now: SystemTime) -> Result<bool, StoreError> {
        let cancelled: i64 = CANCEL
            .key(self.job_key(id))
            .key(self.index_key(ACCEPTED))
            .key(self.index_key(RUNNING))
            .key(self.index_key(EXPIRING))
            .arg(id.to_string())
            .arg(to_millis(now))
            .arg(self.changes_channel())
            .invoke_async(&mut self.connection())
            .await
            .map_err(store_error)?;
        Ok(cancelled == 1)
    }

    async fn abandon(
        &self,
        id: &JobId,
        now: SystemTime,
        until: SystemTime,
    ) -> Result<(), StoreError> {
        let _: i64 = ABANDON
            .key(self.job_key(id))
            .key(self.index_key(ACCEPTED))
            .key(self.index_key(RUNNING))
            .key(self.index_key(EXPIRING))
            .arg(id.to_string())
            .arg(ttl_millis(now, until).max(1))
            .invoke_async(&mut self.connection())
            .await
            .map_err(store_error)?;
        Ok(())
    }

    async fn renew_leases(
        &self,
        instance: &str,
        ids: &[JobId],
        lease_until: SystemTime,
    ) -> Result<Vec<JobId>, StoreError> {
        let mut gone = Vec::new();
        let mut connection = self.connection();
        for chunk in ids.chunks(RENEW_BATCH) {
            let mut invocation = RENEW_LEASES.key(self.index_key(RUNNING));
            invocation.arg(instance).arg(to_millis(lease_until));
            for id in chunk {
                invocation.key(self.job_key(id)).arg(id.to_string());
            }
            let positions: Vec<usize> = invocation
                .invoke_async(&mut connection)
                .await
                .map_err(store_error)?;
            for position in positions {
                let id = chunk.get(position).ok_or_else(|| {
                    StoreError::Corrupt(format!(
                        "Redis named lease {position} of {} renewed",
                        chunk.len()
                    ))
                })?;
                gone.push(*id);
            }
        }
        Ok(gone)
    }

    async fn fail_lapsed(
        &self,
        now: SystemTime,
        unstarted_before: SystemTime,
        outcome: JobOutcome,
        expires_at: SystemTime,
    ) -> Result<Vec<JobId>, StoreError> {
        let (state, response) = outcome_parts(&outcome);
        let response = encode_response(response);
        let mut connection = self.connection();
        let mut failed = Vec::new();
        loop {
            let (running, accepted, ids): (usize, usize, Vec<String>) = FAIL_LAPSED
                .key(self.index_key(RUNNING))
                .key(self.index_key(ACCEPTED))
                .key(self.index_key(EXPIRING))
                .arg(&*self.prefix)
                .arg(to_millis(now))
                .arg(to_millis(unstarted_before))
                .arg(state)
                .arg(&response)
                .arg(to_millis(expires_at))
                .arg(ttl_millis(now, expires_at))
                .arg(BATCH)
                .invoke_async(&mut connection)
                .await
                .map_err(store_error)?;
            let first = failed.len();
            for id in ids {
                failed.push(parse_id(&id)?);
            }
            self.announce(&failed[first..]).await?;
            // Every visited entry left the range, so a short batch means none are left.
            if running < BATCH && accepted < BATCH {
                return Ok(failed);
            }
        }
    }

    async fn sweep(&self, now: SystemTime) -> Result<usize, StoreError> {
        let mut connection = self.connection();
        let mut deleted = 0;
        loop {
            let (visited, removed): (usize, usize) = SWEEP
                .key(self.index_key(EXPIRING))
                .arg(&*self.prefix)
                .arg(to_millis(now))
                .arg(BATCH)
                .invoke_async(&mut connection)
                .await
                .map_err(store_error)?;
            deleted += removed;
            if visited < BATCH {
                return Ok(deleted);
            }
        }
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
        let ids = pubsub.into_on_message().filter_map(|message| {
            let payload = message.get_payload_bytes();
            let change = std::str::from_utf8(payload).ok().and_then(decode_change);
            if change.is_none() {
                tracing::debug!(
                    payload = %String::from_utf8_lossy(payload),
                    "ignoring a pub/sub message that is not a job change"
                );
            }
            ready(change)
        });
        Ok(Some(Box::pin(ids)))
    }

    /// Announces changed jobs on [`changes_channel`](Self::changes_channel), after the change
    /// is committed. Only with a pub/sub client: without one, nobody here listens.
    /// The channel changes are announced on, or `""` when nobody listens (no pub/sub).
    fn announced_on(&self) -> String {
        if self.pubsub.is_some() {
            self.changes_channel()
        } else {
            String::new()
        }
    }

    async fn announce(&self, ids: &[JobId]) -> Result<(), StoreError> {
        if self.pubsub.is_none() || ids.is_empty() {
            return Ok(());
        }
        let channel = self.changes_channel();
        let mut pipe = redis::pipe();
        for id in ids {
            pipe.cmd("PUBLISH")
                .arg(&channel)
                .arg(encode_change(Change::Updated(*id)))
                .ignore();
        }
        pipe.query_async::<()>(&mut self.connection())
            .await
            .map_err(store_error)
    }
}

/// Where a new record goes: its index, its score there ('' for none), and its native expiry in
/// milliseconds ('' for none).
struct Placement {
    index: &'static str,
    score: String,
    ttl: String,
}

impl Placement {
    fn of(record: &JobRecord) -> Self {
        let (index, score, ttl) = match &record.state {
            JobState::Accepted => (ACCEPTED, to_millis(record.created_at).to_string(), None),
            JobState::Running { lease_until, .. } => {
                (RUNNING, to_millis(*lease_until).to_string(), None)
            }
            JobState::Completed(_) | JobState::Failed(_) => match record.expires_at {
                Some(expires) => (
                    EXPIRING,
                    to_millis(expires).to_string(),
                    record.finished_at.map(|at| ttl_millis(at, expires).max(1)),
                ),
                None => (EXPIRING, String::new(), None),
            },
        };
        Self {
            index,
            score,
            ttl: ttl.map(|ms| ms.to_string()).unwrap_or_default(),
        }
    }
}

/// Milliseconds from `from` to `to`, for a native expiry; 0 or less when `to` is not later.
fn ttl_millis(from: SystemTime, to: SystemTime) -> i64 {
    to_millis(to).saturating_sub(to_millis(from))
}

fn outcome_parts(outcome: &JobOutcome) -> (&'static str, &StoredResponse) {
    match outcome {
        JobOutcome::Completed(response) => (COMPLETED, response),
        JobOutcome::Failed(response) => (FAILED, response),
    }
}

/// The hash fields of `record`; absent options are left out.
fn fields(record: &JobRecord) -> Vec<(&'static str, Vec<u8>)> {
    let text = |s: &str| s.as_bytes().to_vec();
    let millis = |at: SystemTime| to_millis(at).to_string().into_bytes();
    let mut fields = vec![
        ("kind", text(record.kind.as_str())),
        ("method", text(&record.method)),
        ("target", text(&record.target)),
        ("created", millis(record.created_at)),
    ];
    match &record.state {
        JobState::Accepted => fields.push(("state", text(ACCEPTED))),
        JobState::Running {
            instance,
            lease_until,
        } => fields.extend([
            ("state", text(RUNNING)),
            ("instance", text(instance)),
            ("lease", millis(*lease_until)),
        ]),
        JobState::Completed(response) => fields.extend([
            ("state", text(COMPLETED)),
            ("response", encode_response(response)),
        ]),
        JobState::Failed(response) => fields.extend([
            ("state", text(FAILED)),
            ("response", encode_response(response)),
        ]),
    }
    let optional = [
        ("owner", record.owner.as_deref().map(text)),
        ("progress", record.progress.as_deref().map(text)),
        ("finished", record.finished_at.map(millis)),
        ("expires", record.expires_at.map(millis)),
    ];
    fields.extend(
        optional
            .into_iter()
            .filter_map(|(name, value)| Some((name, value?))),
    );
    fields
}

/// The record from the `FIELDS` values of its hash; `None` when absent or expired at `now`.
fn decode_record(
    id: JobId,
    values: Vec<Option<Vec<u8>>>,
    now: SystemTime,
) -> Result<Option<JobRecord>, StoreError> {
    let corrupt = |why: String| StoreError::Corrupt(format!("job {id}: {why}"));
    let Ok(
        [
            state,
            instance,
            lease,
            owner,
            method,
            target,
            progress,
            created,
            finished,
            expires,
            kind,
            response,
        ],
    ) = <[Option<Vec<u8>>; 12]>::try_from(values)
    else {
        return Err(corrupt(
            "Redis answered HMGET with the wrong number of fields".into(),
        ));
    };
    let Some(state) = state else {
        // HMGET of a missing key is all nils; a hash without a state is not a job.
        return if [&instance, &method, &created, &kind]
            .iter()
            .all(|v| v.is_none())
        {
            Ok(None)
        } else {
            Err(corrupt("no state field".into()))
        };
    };
    let text = |name: &str, value: Option<Vec<u8>>| -> Result<Option<String>, StoreError> {
        value
            .map(|bytes| {
                String::from_utf8(bytes).map_err(|_| corrupt(format!("{name} is not UTF-8")))
            })
            .transpose()
    };
    let required = |name: &str, value: Option<Vec<u8>>| -> Result<String, StoreError> {
        text(name, value)?.ok_or_else(|| corrupt(format!("no {name} field")))
    };
    let time = |name: &str, value: Option<Vec<u8>>| -> Result<Option<SystemTime>, StoreError> {
        text(name, value)?
            .map(|ms| {
                ms.parse::<i64>()
                    .map(from_millis)
                    .map_err(|_| corrupt(format!("{name} is not a time in milliseconds: {ms:?}")))
            })
            .transpose()
    };
    let expires_at = time("expires", expires)?;
    if expires_at.is_some_and(|at| at <= now) {
        return Ok(None);
    }
    let stored = |value: Option<Vec<u8>>| -> Result<StoredResponse, StoreError> {
        decode_response(&value.ok_or_else(|| corrupt("no response field".into()))?)
    };
    let state = match state.as_slice() {
        // A tombstone left by `abandon`: no job.
        b"abandoned" => return Ok(None),
        b"accepted" => JobState::Accepted,
        b"running" => JobState::Running {
            instance: required("instance", instance)?,
            lease_until: time("lease", lease)?.ok_or_else(|| corrupt("no lease field".into()))?,
        },
        b"completed" => JobState::Completed(stored(response)?),
        b"failed" => JobState::Failed(stored(response)?),
        other => {
            return Err(corrupt(format!(
                "unknown state {:?}",
                String::from_utf8_lossy(other)
            )));
        }
    };
    let kind = required("kind", kind)?;
    Ok(Some(JobRecord {
        id,
        kind: JobKind::from_name(&kind).ok_or_else(|| corrupt(format!("unknown kind {kind:?}")))?,
        state,
        owner: text("owner", owner)?,
        method: required("method", method)?,
        target: required("target", target)?,
        progress: text("progress", progress)?,
        created_at: time("created", created)?.ok_or_else(|| corrupt("no created field".into()))?,
        finished_at: time("finished", finished)?,
        expires_at,
    }))
}

fn parse_id(text: &str) -> Result<JobId, StoreError> {
    JobId::parse(text).ok_or_else(|| StoreError::Corrupt(format!("not a job id: {text:?}")))
}

/// Replies that do not parse, and keys of another type under the prefix, are corrupt data;
/// everything else (connection, timeout, server refusing) is the store being unavailable.
fn store_error(err: RedisError) -> StoreError {
    match err.kind() {
        ErrorKind::Parse | ErrorKind::UnexpectedReturnType => {
            StoreError::Corrupt(format!("unexpected reply from Redis: {err}"))
        }
        _ if err.code() == Some("WRONGTYPE") => StoreError::Corrupt(format!(
            "a key under the store's prefix holds another kind of value (use a prefix of its own): {err}"
        )),
        _ => StoreError::Unavailable(Box::new(err)),
    }
}
