//! What [`RedisStore`](super::RedisStore) and `RedisClusterStore` share: the key layout, the Lua
//! scripts of every state change, the hash encoding of a record, and the operations built from
//! them over any redis-rs async connection.
//!
//! # Layout
//!
//! Every key starts with the store's prefix. On one Redis server every key is in one keyspace;
//! on a Redis Cluster the keys of a job and the indexes it is listed in carry a hash tag `{p}`
//! naming one of the store's partitions (`p` is the job id's last two bytes, big-endian, modulo
//! the partition count), so every script touches one slot, and every sweep visits each
//! partition's indexes in turn:
//!
//! | key | type | holds |
//! | --- | --- | --- |
//! | `{prefix}{tag}job:{id}` | hash | one job: `state`, `instance`, `lease`, `owner`, `method`, `target`, `progress`, `created`, `finished`, `expires`, `kind`, `response`, and the name of its idempotency key when it has one: `once` (same slot) or `onceref` (another slot, on a cluster) |
//! | `{prefix}once:{n}:{owner}:{key}` | string | the id of the job `owner` kicked off with idempotency key `key`; `n` is the owner's length in bytes, so no owner and key pair reads as another |
//! | `{prefix}{tag}accepted` | sorted set | ids of `Accepted` jobs, scored by creation time |
//! | `{prefix}{tag}running` | sorted set | ids of `Running` jobs, scored by lease end |
//! | `{prefix}{tag}expiring` | sorted set | ids of finished jobs, scored by expiry |
//! | `{prefix}{tag}changed` | channel (sharded on a cluster) | `cancelled {id}` as a job is cancelled, `updated {id}` as it ends or its progress changes |
//!
//! `{tag}` is empty on one server (the layout of earlier versions) and `{p}` on a cluster.
//! Times are Unix milliseconds in decimal; `response` is the binary encoding of the stored
//! response. Every state change is one Lua script, so it is atomic and keeps the sorted sets in
//! step with the hashes.
//!
//! An idempotency key lives exactly as long as its job counts for a repeated kick-off: it gets
//! the job's native expiry when the job completes, and is deleted when the job fails, is
//! cancelled or is swept (only while it still names that job: a key names the newest job
//! kicked off with it). On one server the job's own scripts do this; on a cluster the key is in
//! another slot, so the scripts return its name and the store settles it in a second step.

use std::ops::Range;
use std::sync::{Arc, LazyLock};
use std::time::SystemTime;

use redis::aio::ConnectionLike;
use redis::{ErrorKind, RedisError, Script, Value};

use super::codec::{decode_response, encode_change, encode_response, from_millis, to_millis};
use super::{Change, Created, StoreError, Transition, once_owner};
use crate::job::{JobId, JobKind, JobOutcome, JobRecord, JobState, StoredResponse};

/// At most this many index entries are visited by one script run of `fail_lapsed` or `sweep`,
/// so a large backlog never blocks Redis for long; the store loops until it is done.
const BATCH: usize = 128;

/// At most this many jobs are renewed by one script run of `renew_leases`.
const RENEW_BATCH: usize = 256;

/// Where a store's keys live: its prefix, and how many hash-tagged partitions (0: none, one
/// keyspace on one server).
#[derive(Debug, Clone)]
pub(super) struct Layout {
    prefix: Arc<str>,
    partitions: u16,
}

impl Layout {
    /// One keyspace on one server.
    pub(super) fn single(prefix: &str) -> Self {
        Self {
            prefix: Arc::from(prefix),
            partitions: 0,
        }
    }

    #[cfg(feature = "redis-cluster")]
    /// `partitions` hash-tagged partitions (at least one), for a cluster.
    pub(super) fn partitioned(prefix: &str, partitions: u16) -> Self {
        Self {
            prefix: Arc::from(prefix),
            partitions: partitions.max(1),
        }
    }

    pub(super) fn with_prefix(&self, prefix: &str) -> Self {
        Self {
            prefix: Arc::from(prefix),
            partitions: self.partitions,
        }
    }

    pub(super) fn prefix(&self) -> &str {
        &self.prefix
    }

    pub(super) fn partition_count(&self) -> u16 {
        self.partitions
    }

    fn sharded(&self) -> bool {
        self.partitions > 0
    }

    /// Every partition: `0..1` for one keyspace.
    pub(super) fn partitions(&self) -> Range<u16> {
        0..self.partitions.max(1)
    }

    /// The partition of job `id`.
    pub(super) fn partition(&self, id: &JobId) -> u16 {
        if self.partitions == 0 {
            return 0;
        }
        let [.., high, low] = *id.as_bytes();
        u16::from_be_bytes([high, low]) % self.partitions
    }

    fn tag(&self, partition: u16) -> String {
        if self.sharded() {
            format!("{{{partition}}}")
        } else {
            String::new()
        }
    }

    pub(super) fn job_key(&self, id: &JobId) -> String {
        format!("{}{}job:{id}", self.prefix, self.tag(self.partition(id)))
    }

    /// What job keys of `partition` start with; scripts append the id.
    fn job_prefix(&self, partition: u16) -> String {
        format!("{}{}job:", self.prefix, self.tag(partition))
    }

    fn index_key(&self, partition: u16, name: &str) -> String {
        format!("{}{}{name}", self.prefix, self.tag(partition))
    }

    pub(super) fn channel(&self, partition: u16) -> String {
        format!("{}{}changed", self.prefix, self.tag(partition))
    }

    #[cfg(feature = "redis-cluster")]
    /// Every channel changes are announced on.
    pub(super) fn channels(&self) -> Vec<String> {
        self.partitions().map(|p| self.channel(p)).collect()
    }

    /// `PUBLISH` on one server, `SPUBLISH` (sharded: delivered by the channel's shard only) on
    /// a cluster.
    fn publish_command(&self) -> &'static str {
        if self.sharded() {
            "SPUBLISH"
        } else {
            "PUBLISH"
        }
    }

    /// The key naming the job `owner` kicked off with idempotency key `key`.
    pub(super) fn once_key(&self, owner: &str, key: &str) -> String {
        format!("{}once:{}:{owner}:{key}", self.prefix, owner.len())
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

/// One server only. `KEYS`: idempotency key, job, index. `ARGV`: id, index score ('' for
/// none), ttl ms ('' for none), job key prefix, now, owner, then field, value pairs. 1 when
/// created, 0 when the id is taken, or the id of the job the idempotency key names, when that
/// job counts: accepted, running or completed, of the same owner, not expired at `now`.
static CREATE_ONCE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local existing = redis.call('GET', KEYS[1])
if existing then
  local job = redis.call('HMGET', ARGV[4] .. existing, 'state', 'owner', 'expires')
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
/// ttl ms, channel ('' for none), publish command. When the job ended here, `updated {id}` is
/// published on the channel in the same round trip. 0 when the job was not unfinished; 1 when
/// it ended, or the name of its idempotency key in another slot, for the store to settle.
///
/// The job's idempotency key, if it is in the job's slot and still names the job, gets the same
/// expiry when the job completes, and is deleted when it fails (a failed job does not count for
/// a repeat).
///
/// The native expiry is relative (`PEXPIRE expires - finished`) rather than `PEXPIREAT expires`,
/// so it is right even when the caller's clock is not Redis's (paused test clocks, skew); reads
/// compare `expires` with the caller's `now` in any case.
static FINISH: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local job = redis.call('HMGET', KEYS[1], 'state', 'once', 'onceref')
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
if ARGV[7] ~= '' then redis.call(ARGV[8], ARGV[7], 'updated ' .. ARGV[1]) end
return job[3] or 1
",
    )
});

/// `KEYS`: job, accepted, running, expiring. `ARGV`: id, now, channel, publish command.
/// `{1, ref}` when a job (unexpired at `now`) was removed, and then `cancelled {id}` is
/// published on the channel; `{0, ref}` otherwise. `ref` is the name of the job's idempotency
/// key in another slot ('' for none), for the store to settle; one in the job's slot goes here,
/// if it still names the job.
static CANCEL: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
for i = 2, 4 do redis.call('ZREM', KEYS[i], ARGV[1]) end
if redis.call('EXISTS', KEYS[1]) == 0 then return {0, ''} end
local job = redis.call('HMGET', KEYS[1], 'expires', 'once', 'onceref')
local expires = tonumber(job[1])
local ref = job[3] or ''
if job[2] and redis.call('GET', job[2]) == ARGV[1] then redis.call('DEL', job[2]) end
redis.call('DEL', KEYS[1])
if expires and expires <= tonumber(ARGV[2]) then return {0, ref} end
redis.call(ARGV[4], ARGV[3], 'cancelled ' .. ARGV[1])
return {1, ref}
",
    )
});

/// `KEYS`: job, accepted, running, expiring. `ARGV`: id, ttl ms. Removes the job as `CANCEL`
/// does (without announcing: nobody was given its status URL) and leaves a tombstone hash in
/// its place for `ttl`, so a `CREATE` or `CREATE_ONCE` of the id that arrives later (sent on a
/// connection that stalled) finds the key taken and creates nothing. 1, or the name of the
/// job's idempotency key in another slot.
static ABANDON: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
for i = 2, 4 do redis.call('ZREM', KEYS[i], ARGV[1]) end
local job = redis.call('HMGET', KEYS[1], 'once', 'onceref')
if job[1] and redis.call('GET', job[1]) == ARGV[1] then redis.call('DEL', job[1]) end
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], 'state', 'abandoned')
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return job[2] or 1
",
    )
});

/// `KEYS`: job. `ARGV`: progress, id, channel ('' for none), publish command. A change is
/// published as `updated {id}` in the same round trip.
static SET_PROGRESS: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local job = redis.call('HMGET', KEYS[1], 'state', 'progress')
if (job[1] == 'accepted' or job[1] == 'running') and job[2] ~= ARGV[1] then
  redis.call('HSET', KEYS[1], 'progress', ARGV[1])
  if ARGV[3] ~= '' then redis.call(ARGV[4], ARGV[3], 'updated ' .. ARGV[2]) end
  return 1
end
return 0
",
    )
});

/// `KEYS`: running, then one job key per id (all of one slot). `ARGV`: instance, lease, then
/// the ids. Returns the 0-based positions of the ids no longer running on `instance`.
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

/// `KEYS`: running, accepted, expiring (of one partition). `ARGV`: job key prefix, now,
/// unstarted_before, state, response, expires, ttl ms, batch size. Visits at most a batch of
/// lapsed entries in each index; returns `{visited running, visited accepted, {failed ids},
/// {id, idempotency key in another slot, …}}`.
///
/// A failed job's idempotency key in its slot is deleted, if it still names the job.
///
/// Each visited entry is either failed (and leaves its index), dropped (its job is gone or in
/// another state), or re-scored from its hash (the index lagged behind), so the next run never
/// visits it again.
static FAIL_LAPSED: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local jobs, now, unstarted = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local failed, refs = {}, {}
local function fail(key, id)
  local once = redis.call('HMGET', key, 'once', 'onceref')
  if once[1] and redis.call('GET', once[1]) == id then redis.call('DEL', once[1]) end
  if once[2] then
    refs[#refs + 1] = id
    refs[#refs + 1] = once[2]
  end
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
    local key = jobs .. id
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
return {running, accepted, failed, refs}
",
    )
});

/// `KEYS`: expiring (of one partition). `ARGV`: job key prefix, now, batch size. Deletes jobs
/// expired at `now` that Redis has not removed yet (with their idempotency keys in their slot,
/// if those still name them), and drops index entries of jobs Redis already removed. Returns
/// `{visited, deleted}`. An idempotency key in another slot got the job's expiry when the job
/// completed, and is deleted when the job failed.
static SWEEP: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local jobs, now = ARGV[1], tonumber(ARGV[2])
local deleted = 0
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[2], 'LIMIT', 0, ARGV[3])
for _, id in ipairs(ids) do
  local key = jobs .. id
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

#[cfg(feature = "redis-cluster")]
/// Cluster only. `KEYS`: idempotency key. `ARGV`: id, the id the caller found there and saw
/// no longer counts ('' for none). Names `id` when the key is free, names `id` already, or
/// still names the id the caller found; 1 then, else the id it names.
static ONCE_CLAIM: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local existing = redis.call('GET', KEYS[1])
if existing == ARGV[1] then return 1 end
if not existing or existing == ARGV[2] then
  redis.call('SET', KEYS[1], ARGV[1])
  return 1
end
return existing
",
    )
});

/// Cluster only. `KEYS`: idempotency key. `ARGV`: id, ttl ms (0: delete). Gives the key the
/// expiry of its completed job, or deletes it, if it still names job `id`.
static ONCE_SETTLE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
if tonumber(ARGV[2]) > 0 then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
else
  redis.call('DEL', KEYS[1])
end
return 1
",
    )
});

#[cfg(feature = "redis-cluster")]
/// Cluster only. `KEYS`: job, accepted, running, expiring. `ARGV`: id. Removes a job nobody
/// was told of (a kick-off that found its idempotency key taken).
static REMOVE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
for i = 2, 4 do redis.call('ZREM', KEYS[i], ARGV[1]) end
return redis.call('DEL', KEYS[1])
",
    )
});

#[cfg(feature = "redis-cluster")]
/// How often a cluster kick-off with an idempotency key tries to claim the key while other
/// kick-offs keep replacing a job that no longer counts; each try means another kick-off won.
const CLAIM_ATTEMPTS: usize = 16;

/// A connection and a layout: every operation of the Redis stores, on one server or a cluster.
#[derive(Debug, Clone)]
pub(super) struct Core<C> {
    pub(super) connection: C,
    pub(super) layout: Layout,
    /// Whether ends and progress are announced (someone subscribes); cancels always are.
    pub(super) announces: bool,
}

impl<C> Core<C>
where
    C: ConnectionLike + Clone + Send + Sync + 'static,
{
    fn connection(&self) -> C {
        // A clone shares the one multiplexed connection (per node, on a cluster).
        self.connection.clone()
    }

    /// The channel ends and progress of jobs in `partition` are announced on, or `""` when
    /// nobody listens.
    fn announced_on(&self, partition: u16) -> String {
        if self.announces {
            self.layout.channel(partition)
        } else {
            String::new()
        }
    }

    /// Creates `record` with the extra hash field `extra`; `false` when its id is taken.
    async fn create_record(
        &self,
        record: &JobRecord,
        extra: Option<(&str, &str)>,
    ) -> Result<bool, StoreError> {
        let partition = self.layout.partition(&record.id);
        let placement = Placement::of(record);
        let mut invocation = CREATE.prepare_invoke();
        invocation
            .key(self.layout.job_key(&record.id))
            .key(self.layout.index_key(partition, placement.index))
            .arg(record.id.to_string())
            .arg(placement.score)
            .arg(placement.ttl);
        for (field, value) in fields(record) {
            invocation.arg(field).arg(value);
        }
        if let Some((field, value)) = extra {
            invocation.arg(field).arg(value);
        }
        let created: i64 = invocation
            .invoke_async(&mut self.connection())
            .await
            .map_err(store_error)?;
        Ok(created == 1)
    }

    pub(super) async fn create(&self, record: JobRecord) -> Result<(), StoreError> {
        if self.create_record(&record, None).await? {
            Ok(())
        } else {
            Err(StoreError::Conflict(record.id))
        }
    }

    /// One server: the key is checked and the job created by one script.
    pub(super) async fn create_once_atomic(
        &self,
        record: JobRecord,
        key: &str,
        now: SystemTime,
    ) -> Result<Created, StoreError> {
        let Some(owner) = once_owner(&record) else {
            return self.create(record).await.map(|()| Created::New);
        };
        let once = self.layout.once_key(owner, key);
        let partition = self.layout.partition(&record.id);
        let placement = Placement::of(&record);
        let mut invocation = CREATE_ONCE.prepare_invoke();
        invocation
            .key(&once)
            .key(self.layout.job_key(&record.id))
            .key(self.layout.index_key(partition, placement.index))
            .arg(record.id.to_string())
            .arg(placement.score)
            .arg(placement.ttl)
            .arg(self.layout.job_prefix(partition))
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
            Value::BulkString(existing) => existing_id(&once, &existing).map(Created::Existing),
            other => Err(StoreError::Corrupt(format!(
                "unexpected reply from Redis to a kick-off with an idempotency key: {other:?}"
            ))),
        }
    }

    #[cfg(feature = "redis-cluster")]
    /// A cluster: the key lives in a slot of its own, so the job is created first (holding
    /// the key's name in `onceref`), then the key is claimed for it. When the key names a job
    /// that still counts, the new job is removed again (nobody was told of it) and that job is
    /// named; when it names one that no longer counts (failed, cancelled, expired), the claim
    /// replaces it only if no other kick-off did so first. Of concurrent kick-offs exactly one
    /// claims the key, and the others name its job.
    pub(super) async fn create_once_split(
        &self,
        record: JobRecord,
        key: &str,
        now: SystemTime,
    ) -> Result<Created, StoreError> {
        let Some(owner) = once_owner(&record) else {
            return self.create(record).await.map(|()| Created::New);
        };
        let once = self.layout.once_key(owner, key);
        if !self
            .create_record(&record, Some(("onceref", &once)))
            .await?
        {
            return Err(StoreError::Conflict(record.id));
        }
        let id = record.id.to_string();
        let mut stale = String::new();
        for _ in 0..CLAIM_ATTEMPTS {
            let reply: Value = ONCE_CLAIM
                .key(&once)
                .arg(&id)
                .arg(&stale)
                .invoke_async(&mut self.connection())
                .await
                .map_err(store_error)?;
            let existing = match reply {
                Value::Int(1) => return Ok(Created::New),
                Value::BulkString(existing) => existing_id(&once, &existing)?,
                other => {
                    return Err(StoreError::Corrupt(format!(
                        "unexpected reply from Redis to claiming an idempotency key: {other:?}"
                    )));
                }
            };
            let counts = self.get(&existing, now).await?.is_some_and(|job| {
                job.owner.as_deref() == Some(owner)
                    && matches!(
                        job.state,
                        JobState::Accepted | JobState::Running { .. } | JobState::Completed(_)
                    )
            });
            if counts {
                let partition = self.layout.partition(&record.id);
                let _: i64 = REMOVE
                    .key(self.layout.job_key(&record.id))
                    .key(self.layout.index_key(partition, ACCEPTED))
                    .key(self.layout.index_key(partition, RUNNING))
                    .key(self.layout.index_key(partition, EXPIRING))
                    .arg(&id)
                    .invoke_async(&mut self.connection())
                    .await
                    .map_err(store_error)?;
                return Ok(Created::Existing(existing));
            }
            stale = existing.to_string();
        }
        Err(StoreError::Unavailable(
            format!(
                "the idempotency key {once:?} was claimed by {CLAIM_ATTEMPTS} other kick-offs in turn"
            )
            .into(),
        ))
    }

    pub(super) async fn get(
        &self,
        id: &JobId,
        now: SystemTime,
    ) -> Result<Option<JobRecord>, StoreError> {
        let values: Vec<Option<Vec<u8>>> = redis::cmd("HMGET")
            .arg(self.layout.job_key(id))
            .arg(&FIELDS[..])
            .query_async(&mut self.connection())
            .await
            .map_err(store_error)?;
        decode_record(*id, values, now)
    }

    pub(super) async fn transition(
        &self,
        id: &JobId,
        transition: Transition<'_>,
    ) -> Result<bool, StoreError> {
        let partition = self.layout.partition(id);
        let job = self.layout.job_key(id);
        // Ends and progress are announced by the scripts themselves, in the same round trip.
        match transition {
            Transition::Start {
                instance,
                lease_until,
            } => {
                let started: i64 = START
                    .key(job)
                    .key(self.layout.index_key(partition, ACCEPTED))
                    .key(self.layout.index_key(partition, RUNNING))
                    .arg(id.to_string())
                    .arg(instance)
                    .arg(to_millis(lease_until))
                    .invoke_async(&mut self.connection())
                    .await
                    .map_err(store_error)?;
                // A start is nobody's news: pollers see `Running` as they saw `Accepted`.
                Ok(started == 1)
            }
            Transition::Finish {
                outcome,
                finished_at,
                expires_at,
            } => {
                let (state, response) = outcome_parts(&outcome);
                let ttl = ttl_millis(finished_at, expires_at);
                let reply: Value = FINISH
                    .key(job)
                    .key(self.layout.index_key(partition, ACCEPTED))
                    .key(self.layout.index_key(partition, RUNNING))
                    .key(self.layout.index_key(partition, EXPIRING))
                    .arg(id.to_string())
                    .arg(state)
                    .arg(encode_response(response))
                    .arg(to_millis(finished_at))
                    .arg(to_millis(expires_at))
                    .arg(ttl)
                    .arg(self.announced_on(partition))
                    .arg(self.layout.publish_command())
                    .invoke_async(&mut self.connection())
                    .await
                    .map_err(store_error)?;
                match reply {
                    Value::Int(0) => Ok(false),
                    Value::Int(_) => Ok(true),
                    Value::BulkString(once) => {
                        let keep = if state == COMPLETED { ttl.max(0) } else { 0 };
                        self.settle(id, &once, keep).await;
                        Ok(true)
                    }
                    other => Err(StoreError::Corrupt(format!(
                        "unexpected reply from Redis to finishing job {id}: {other:?}"
                    ))),
                }
            }
            Transition::Progress(progress) => {
                let changed: i64 = SET_PROGRESS
                    .key(job)
                    .arg(progress)
                    .arg(id.to_string())
                    .arg(self.announced_on(partition))
                    .arg(self.layout.publish_command())
                    .invoke_async(&mut self.connection())
                    .await
                    .map_err(store_error)?;
                Ok(changed == 1)
            }
        }
    }

    pub(super) async fn cancel(&self, id: &JobId, now: SystemTime) -> Result<bool, StoreError> {
        let partition = self.layout.partition(id);
        let (cancelled, once): (i64, Vec<u8>) = CANCEL
            .key(self.layout.job_key(id))
            .key(self.layout.index_key(partition, ACCEPTED))
            .key(self.layout.index_key(partition, RUNNING))
            .key(self.layout.index_key(partition, EXPIRING))
            .arg(id.to_string())
            .arg(to_millis(now))
            .arg(self.layout.channel(partition))
            .arg(self.layout.publish_command())
            .invoke_async(&mut self.connection())
            .await
            .map_err(store_error)?;
        if !once.is_empty() {
            self.settle(id, &once, 0).await;
        }
        Ok(cancelled == 1)
    }

    pub(super) async fn abandon(
        &self,
        id: &JobId,
        now: SystemTime,
        until: SystemTime,
    ) -> Result<(), StoreError> {
        let partition = self.layout.partition(id);
        let reply: Value = ABANDON
            .key(self.layout.job_key(id))
            .key(self.layout.index_key(partition, ACCEPTED))
            .key(self.layout.index_key(partition, RUNNING))
            .key(self.layout.index_key(partition, EXPIRING))
            .arg(id.to_string())
            .arg(ttl_millis(now, until).max(1))
            .invoke_async(&mut self.connection())
            .await
            .map_err(store_error)?;
        if let Value::BulkString(once) = reply {
            self.settle(id, &once, 0).await;
        }
        Ok(())
    }

    /// Gives the idempotency key `once` (in another slot) the expiry `ttl` ms of its completed
    /// job, or deletes it (`ttl` 0), if it still names job `id`. A failure only leaves the key
    /// longer than its job: a later kick-off with it reads the job it names, sees it gone, and
    /// takes the key over; so it is logged, not returned.
    async fn settle(&self, id: &JobId, once: &[u8], ttl: i64) {
        let settled: Result<i64, RedisError> = ONCE_SETTLE
            .key(once)
            .arg(id.to_string())
            .arg(ttl)
            .invoke_async(&mut self.connection())
            .await;
        if let Err(err) = settled {
            tracing::warn!(
                job = %id,
                key = %String::from_utf8_lossy(once),
                error = %err,
                "could not settle the job's idempotency key; it stays until the key is used again"
            );
        }
    }

    pub(super) async fn renew_leases(
        &self,
        instance: &str,
        ids: &[JobId],
        lease_until: SystemTime,
    ) -> Result<Vec<JobId>, StoreError> {
        let mut gone = Vec::new();
        let mut connection = self.connection();
        for (partition, ids) in self.by_partition(ids) {
            for chunk in ids.chunks(RENEW_BATCH) {
                let mut invocation = RENEW_LEASES.key(self.layout.index_key(partition, RUNNING));
                invocation.arg(instance).arg(to_millis(lease_until));
                for id in chunk {
                    invocation.key(self.layout.job_key(id)).arg(id.to_string());
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
        }
        Ok(gone)
    }

    /// `ids` grouped by partition, each group in the order given.
    fn by_partition(&self, ids: &[JobId]) -> Vec<(u16, Vec<JobId>)> {
        if self.layout.partition_count() == 0 {
            return vec![(0, ids.to_vec())];
        }
        let mut groups: Vec<(u16, Vec<JobId>)> = Vec::new();
        for id in ids {
            let partition = self.layout.partition(id);
            match groups.iter_mut().find(|(p, _)| *p == partition) {
                Some((_, group)) => group.push(*id),
                None => groups.push((partition, vec![*id])),
            }
        }
        groups
    }

    pub(super) async fn fail_lapsed(
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
        for partition in self.layout.partitions() {
            loop {
                type Reply = (usize, usize, Vec<String>, Vec<Vec<u8>>);
                let (running, accepted, ids, refs): Reply = FAIL_LAPSED
                    .key(self.layout.index_key(partition, RUNNING))
                    .key(self.layout.index_key(partition, ACCEPTED))
                    .key(self.layout.index_key(partition, EXPIRING))
                    .arg(self.layout.job_prefix(partition))
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
                for pair in refs.chunks_exact(2) {
                    let id = std::str::from_utf8(&pair[0])
                        .map_err(|_| StoreError::Corrupt("a job id is not UTF-8".into()))
                        .and_then(parse_id)?;
                    self.settle(&id, &pair[1], 0).await;
                }
                self.announce(&failed[first..]).await?;
                // Every visited entry left the range, so a short batch means none are left.
                if running < BATCH && accepted < BATCH {
                    break;
                }
            }
        }
        Ok(failed)
    }

    pub(super) async fn sweep(&self, now: SystemTime) -> Result<usize, StoreError> {
        let mut connection = self.connection();
        let mut deleted = 0;
        for partition in self.layout.partitions() {
            loop {
                let (visited, removed): (usize, usize) = SWEEP
                    .key(self.layout.index_key(partition, EXPIRING))
                    .arg(self.layout.job_prefix(partition))
                    .arg(to_millis(now))
                    .arg(BATCH)
                    .invoke_async(&mut connection)
                    .await
                    .map_err(store_error)?;
                deleted += removed;
                if visited < BATCH {
                    break;
                }
            }
        }
        Ok(deleted)
    }

    /// Announces changed jobs, after the change is committed, on their partitions' channels;
    /// only when someone listens.
    async fn announce(&self, ids: &[JobId]) -> Result<(), StoreError> {
        if !self.announces || ids.is_empty() {
            return Ok(());
        }
        for (partition, ids) in self.by_partition(ids) {
            let channel = self.layout.channel(partition);
            let mut pipe = redis::pipe();
            for id in ids {
                pipe.cmd(self.layout.publish_command())
                    .arg(&channel)
                    .arg(encode_change(Change::Updated(id)))
                    .ignore();
            }
            pipe.query_async::<()>(&mut self.connection())
                .await
                .map_err(store_error)?;
        }
        Ok(())
    }
}

/// The job id an idempotency key `once` holds.
fn existing_id(once: &str, existing: &[u8]) -> Result<JobId, StoreError> {
    std::str::from_utf8(existing)
        .ok()
        .and_then(JobId::parse)
        .ok_or_else(|| {
            StoreError::Corrupt(format!(
                "the idempotency key {once:?} names {:?}, not a job id",
                String::from_utf8_lossy(existing)
            ))
        })
}

/// Reads announcements of [`Layout::channels`] as changes; anything else is skipped.
pub(super) fn decode_announcement(payload: &[u8]) -> Option<Change> {
    let change = std::str::from_utf8(payload)
        .ok()
        .and_then(super::codec::decode_change);
    if change.is_none() {
        tracing::debug!(
            payload = %String::from_utf8_lossy(payload),
            "ignoring a pub/sub message that is not a job change"
        );
    }
    change
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
pub(super) fn store_error(err: RedisError) -> StoreError {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn id_ending(high: u8, low: u8) -> JobId {
        let mut bytes = [7u8; 16];
        bytes[14] = high;
        bytes[15] = low;
        JobId::from_bytes(bytes)
    }

    // [DESIGN] On one server no key carries a hash tag: the layout of earlier versions.
    #[test]
    fn design_one_keyspace_keeps_the_untagged_layout() {
        let layout = Layout::single("p:");
        let id = id_ending(1, 2);
        assert_eq!(layout.partitions(), 0..1);
        assert_eq!(layout.partition(&id), 0);
        assert_eq!(layout.job_key(&id), format!("p:job:{id}"));
        assert_eq!(layout.index_key(0, RUNNING), "p:running");
        assert_eq!(layout.channel(0), "p:changed");
        assert_eq!(layout.publish_command(), "PUBLISH");
        assert_eq!(layout.once_key("alice", "k"), "p:once:5:alice:k");
    }

    // [DESIGN] On a cluster a job's partition is its id's last two bytes modulo the count, and
    // its key, its partition's indexes and channel share that partition's hash tag.
    #[cfg(feature = "redis-cluster")]
    #[test]
    fn design_partitions_tag_a_job_and_its_indexes_alike() {
        let layout = Layout::partitioned("p:", 16);
        assert_eq!(layout.partitions(), 0..16);
        let id = id_ending(0x01, 0x13); // 0x0113 = 275 = 17 * 16 + 3
        assert_eq!(layout.partition(&id), 3);
        assert_eq!(layout.job_key(&id), format!("p:{{3}}job:{id}"));
        assert_eq!(layout.job_prefix(3), "p:{3}job:");
        assert_eq!(layout.index_key(3, EXPIRING), "p:{3}expiring");
        assert_eq!(layout.channel(3), "p:{3}changed");
        assert_eq!(layout.channels().len(), 16);
        assert_eq!(layout.publish_command(), "SPUBLISH");
        assert_eq!(
            Layout::partitioned("p:", 0).partitions(),
            0..1,
            "at least one"
        );
        assert_eq!(
            layout.with_prefix("q:").job_key(&id),
            format!("q:{{3}}job:{id}")
        );
    }
}
