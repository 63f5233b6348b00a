//! Cluster mode: the state several gateway instances share through Redis, so N instances
//! behind a load balancer enforce the limits one instance does.
//!
//! [`Cluster`] is the one handle on Redis: it names the keys, runs the Lua scripts that check
//! and charge atomically, holds this instance's leases (connections and live streams counted
//! across instances), and decides what a Redis fault means (`on_redis_error`). The modules
//! that own a limit ask it ([`crate::limits`], [`crate::billing`], [`crate::hub`] through the
//! session); none of them talks to Redis directly.
//!
//! Keys are `{key_prefix}:{{user}}:…` for a user's own state (rate bucket, spend, connection
//! and stream leases), `{key_prefix}:tier:{{tier}}:…` and `{key_prefix}:{global}:…`: the
//! braces are Redis Cluster hash tags, so every key of one user lives in one slot.
//!
//! Why `redis` and not `fred`: `redis` is the reference client (the Redis organisation keeps
//! it), its `ConnectionManager` reconnects with exponential backoff by itself and multiplexes
//! every request over one connection, and its `Script` sends `EVALSHA` and falls back to
//! `EVAL` on `NOSCRIPT` (after a Redis restart flushed the script cache). `fred` does as much
//! with a larger API and more dependencies than these few scripts need.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use dashmap::DashMap;
use futures_util::StreamExt;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{RedisResult, Script};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;

/// Cluster mode's settings, used only when `redis_url` is set.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClusterConfig {
    /// This instance's name in logs and in the members of its leases. Default: the host name
    /// (env `HOSTNAME`, else `/etc/hostname`) and the listen port, `host:port`. Env
    /// `MUXGATE_INSTANCE_ID`.
    pub instance_id: Option<String>,
    /// Prefix of every Redis key, so several deployments can share one Redis. No braces.
    /// Default `muxgate`.
    pub key_prefix: String,
    /// What a new stream meets while Redis fails or is slower than `redis_timeout_ms`:
    /// `fail_open` decides on this instance's own limits and budgets (logged, and counted in
    /// `muxgate_redis_fallbacks_total`); `fail_closed` refuses it with `overloaded`. Streams
    /// already running are never affected, and connections are always admitted on the
    /// instance's own cap (a refused reconnect would cut the running streams it resumes).
    /// Default `fail_open`.
    pub on_redis_error: OnRedisError,
    /// Longest wait for one Redis call; past it the call counts as failed. Default 250.
    pub redis_timeout_ms: u64,
    /// How long a connection or live stream keeps counting against its user's caps when the
    /// instance holding it stops renewing it (it died), and a stream's owner record with it.
    /// Renewed once older than half of it (looked at every quarter). Also how long either end
    /// of a cross-instance relay waits on
    /// a silent peer before counting it gone. Default 15000.
    pub lease_ms: u64,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        ClusterConfig {
            instance_id: None,
            key_prefix: "muxgate".into(),
            on_redis_error: OnRedisError::FailOpen,
            redis_timeout_ms: 250,
            lease_ms: 15_000,
        }
    }
}

/// What a new stream meets while Redis is unavailable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnRedisError {
    #[default]
    FailOpen,
    FailClosed,
}

/// Redis failed or did not answer within `redis_timeout_ms`, and the policy is `fail_closed`
/// (under `fail_open` the caller decides locally instead and never sees it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the shared limits store (Redis) is unavailable, and this gateway refuses new streams until it is back (on_redis_error = \"fail_closed\")")]
pub struct Unavailable;

/// Why the shared store could not start.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("redis_url: {0}")]
    Url(redis::RedisError),
}

/// One token bucket a request draws from, for [`Cluster::take`].
#[derive(Debug, Clone)]
pub struct BucketDraw {
    pub key: String,
    /// The bucket's one-minute allowance.
    pub capacity: f64,
    /// What this request takes from it.
    pub amount: f64,
}

/// Lua shared by [`TAKE`] and [`LEASE`]: `assess(now, keys, args, first)` refills each token
/// bucket of `keys` (capacity per minute, continuously, by Redis's own clock so instances'
/// clocks do not matter; capacity `args[first + 2i - 2]`, amount asked `args[first + 2i - 1]`)
/// and returns the index of the one with the longest wait (0: all pass), that wait in ms (-1
/// when the amount exceeds the capacity itself) and every bucket's tokens; `charge(now, keys,
/// args, first, tokens)` then takes each amount from those tokens. A full bucket is no key: it
/// expires once refilled.
macro_rules! assess_lua {
    () => {
        r"
local function assess(now, keys, args, first)
  local tokens = {}
  local worst, worst_wait = 0, 0
  for i = 1, #keys do
    local cap = tonumber(args[first + 2 * i - 2])
    local amount = tonumber(args[first + 2 * i - 1])
    local rate = cap / 60000
    local h = redis.call('HMGET', keys[i], 't', 'ts')
    local tok = cap
    if h[1] then
      tok = math.min(cap, tonumber(h[1]) + math.max(0, now - tonumber(h[2])) * rate)
    end
    tokens[i] = tok
    local wait = 0
    if amount > cap then
      wait = -1
    elseif tok < amount then
      wait = (amount - tok) / rate
    end
    if wait ~= 0 then
      if worst == 0 or (wait == -1 and worst_wait ~= -1) or (worst_wait ~= -1 and wait > worst_wait) then
        worst, worst_wait = i, wait
      end
    end
  end
  return worst, worst_wait, tokens
end

local function charge(now, keys, args, first, tokens)
  for i = 1, #keys do
    local cap = tonumber(args[first + 2 * i - 2])
    local left = tokens[i] - tonumber(args[first + 2 * i - 1])
    if left < cap then
      redis.call('HSET', keys[i], 't', string.format('%.17g', left), 'ts', string.format('%.17g', now))
      redis.call('PEXPIRE', keys[i], math.ceil((cap - left) * 60000 / cap) + 1000)
    end
  end
end
"
    };
}

/// Checks every bucket of `KEYS` (capacity and amount pairs from `ARGV[2]`) and, if `ARGV[1]`
/// is 1 and all pass, charges them all. Returns `{0}` when all pass, else `{index, wait_ms}`
/// of the bucket with the longest wait, `wait_ms` -1 when the amount exceeds the capacity.
const TAKE: &str = concat!(
    assess_lua!(),
    r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
local worst, worst_wait, tokens = assess(now, KEYS, ARGV, 2)
if worst > 0 then
  return {worst, string.format('%.17g', worst_wait)}
end
if ARGV[1] == '1' then
  charge(now, KEYS, ARGV, 2, tokens)
end
return {0}
"
);

/// Ends a stream in the shared store in one call. Gives back (or charges, when negative)
/// `ARGV[3]` tokens to each of the first `ARGV[1]` keys, token buckets whose capacities follow,
/// after refilling it, never above its capacity (the reservation reconciled); adds `ARGV[a+1]`
/// to each of the next `ARGV[2]` keys, spend counters kept `ARGV[a+2]` ms after their last
/// change; with one key more, removes lease `ARGV[a+3]` from that sorted set; and with one
/// more, the stream's owner record, keeps it `ARGV[a+5]` ms from now if it still names
/// `ARGV[a+4]` (the stream stays resumable there while it lingers; no renewal needed).
const END: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
local nb, ns = tonumber(ARGV[1]), tonumber(ARGV[2])
local diff = tonumber(ARGV[3])
for i = 1, nb do
  local cap = tonumber(ARGV[3 + i])
  local h = redis.call('HMGET', KEYS[i], 't', 'ts')
  local tok = cap
  if h[1] then
    tok = math.min(cap, tonumber(h[1]) + math.max(0, now - tonumber(h[2])) * cap / 60000)
  end
  local left = math.min(cap, tok + diff)
  if left >= cap then
    redis.call('DEL', KEYS[i])
  else
    redis.call('HSET', KEYS[i], 't', string.format('%.17g', left), 'ts', string.format('%.17g', now))
    redis.call('PEXPIRE', KEYS[i], math.ceil((cap - left) * 60000 / cap) + 1000)
  end
end
local a = 3 + nb
for i = nb + 1, nb + ns do
  redis.call('INCRBY', KEYS[i], ARGV[a + 1])
  redis.call('PEXPIRE', KEYS[i], ARGV[a + 2])
end
if KEYS[nb + ns + 1] then
  redis.call('ZREM', KEYS[nb + ns + 1], ARGV[a + 3])
end
local owner = KEYS[nb + ns + 2]
if owner and redis.call('GET', owner) == ARGV[a + 4] then
  redis.call('PEXPIRE', owner, ARGV[a + 5])
end
return 1
";

/// Adds lease `ARGV[1]` to the sorted set `KEYS[1]` (member → expiry, Redis time in ms) for
/// `ARGV[3]` ms, after dropping expired ones, unless the set already holds `ARGV[2]` live
/// members. Returns `{0}` when full (nothing else done), else `{1}`.
///
/// A stream's lease (`ARGV[4]` not empty) is its whole admission, decided at once so that a
/// stream's open costs one round trip. It reads the values of the `ARGV[5]` counters after
/// `KEYS[2]` (its budgets' spend; 0 when missing) and refuses when one has reached its limit
/// (`ARGV[9]`…, one per counter, -1 for none); else checks the `ARGV[6]` token buckets after
/// them (capacity and amount pairs following the limits) as [`TAKE`] does. All passing, it
/// takes the lease, records the stream's owner (`KEYS[2]` set to `ARGV[4]` for as long) and,
/// if `ARGV[7]` is 1, charges the buckets. A bucket that refuses with a wait of at most
/// `ARGV[8]` ms (-1: none) still lets it take the lease, charging nothing: the stream waits
/// for its turn holding its place in the cap. Any other refusal leaves nothing behind. Replies
/// `{1 or 2 (refused: nothing done), spent..., index, wait_ms}`, the index and wait as [`TAKE`]
/// answers them (0 and 0 when a budget refused before the buckets were read).
const LEASE: &str = concat!(
    assess_lua!(),
    r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ms = tonumber(ARGV[3])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if not redis.call('ZSCORE', KEYS[1], ARGV[1]) then
  if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[2]) then
    return {0}
  end
end
if ARGV[4] ~= '' then
  local ns, nb = tonumber(ARGV[5]), tonumber(ARGV[6])
  local reply = {1}
  local over = false
  for i = 1, ns do
    local spent = redis.call('GET', KEYS[2 + i]) or '0'
    reply[#reply + 1] = spent
    local limit = tonumber(ARGV[8 + i])
    if limit >= 0 and tonumber(spent) >= limit then
      over = true
    end
  end
  local worst, worst_wait, tokens = 0, 0, nil
  if not over then
    local buckets = {}
    for i = 1, nb do
      buckets[i] = KEYS[2 + ns + i]
    end
    -- The buckets keep time to the microsecond, as in TAKE.
    local exact = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
    worst, worst_wait, tokens = assess(exact, buckets, ARGV, 9 + ns)
    if worst == 0 and ARGV[7] == '1' then
      charge(exact, buckets, ARGV, 9 + ns, tokens)
    end
  end
  reply[#reply + 1] = worst
  reply[#reply + 1] = string.format('%.17g', worst_wait)
  if over or (worst > 0 and not (worst_wait >= 0 and worst_wait <= tonumber(ARGV[8]))) then
    reply[1] = 2
    return reply
  end
  redis.call('SET', KEYS[2], ARGV[4], 'PX', ms)
  redis.call('ZADD', KEYS[1], now + ms, ARGV[1])
  redis.call('PEXPIRE', KEYS[1], ms)
  return reply
end
redis.call('ZADD', KEYS[1], now + ms, ARGV[1])
redis.call('PEXPIRE', KEYS[1], ms)
return {1}
"
);

/// Renews the owner record `KEYS[1]` as `ARGV[1]` for `ARGV[2]` ms, or writes it back after
/// Redis lost it, unless another instance has since recorded a stream of the same id.
const RENEW_OWNER: &str = r"
local v = redis.call('GET', KEYS[1])
if v == false or v == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
end
return 1
";

/// Deletes the owner record `KEYS[1]` if it still names `ARGV[1]`.
const RELEASE_OWNER: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('DEL', KEYS[1])
end
return 1
";

/// The shared writes that end one stream, gathered from the modules that own each part (its
/// reservation reconciled, by [`crate::limits`]; its spend, by [`crate::billing`]; its stream
/// lease) and sent by [`Ending::commit`] as one script call: one Redis round trip per stream
/// end, however many parts it has. Without any part (one process, or nothing shared to
/// write) it sends nothing.
#[derive(Default)]
pub struct Ending {
    cluster: Option<Arc<Cluster>>,
    /// Token buckets (key, capacity) to give `diff` tokens back to (negative: to charge).
    refund: Vec<(String, f64)>,
    diff: f64,
    /// Spend counters to add `amount` (nano-USD) to, each kept `spend_ttl` after its last change.
    spend: Vec<String>,
    amount: u64,
    spend_ttl: Duration,
    /// Released with the rest; if the ending is never committed it releases itself when dropped.
    lease: Option<Lease>,
    /// How long the stream stays resumable on this instance once ended: its owner record
    /// (the lease's) is kept that long by the same call, and then left to expire.
    linger: Duration,
}

impl Ending {
    /// An ending that releases `lease` (if any) with whatever else is added to it, and keeps
    /// its owner record for `linger` (the resume window).
    pub fn new(lease: Option<Lease>, linger: Duration) -> Ending {
        Ending {
            cluster: lease.as_ref().map(|l| l.cluster.clone()),
            lease,
            linger,
            ..Ending::default()
        }
    }

    /// Gives `diff` tokens back (negative: charges them) to each of `buckets` (key and
    /// capacity), never above its capacity.
    pub fn refund(&mut self, cluster: &Arc<Cluster>, buckets: Vec<(String, f64)>, diff: f64) {
        self.cluster.get_or_insert_with(|| cluster.clone());
        self.refund = buckets;
        self.diff = diff;
    }

    /// Adds `amount` to each counter of `keys`, each kept for `ttl` after its last change.
    pub fn spend(&mut self, cluster: &Arc<Cluster>, keys: Vec<String>, amount: u64, ttl: Duration) {
        self.cluster.get_or_insert_with(|| cluster.clone());
        self.spend = keys;
        self.amount = amount;
        self.spend_ttl = ttl;
    }

    /// Sends every part in one call. A part Redis misses is lost to the shared store: the
    /// buckets refill anyway, the lease expires within `lease_ms`, and a spend missed is logged
    /// and counted (`muxgate_redis_errors_total{op="settle"}`) and stays in this instance's own.
    /// The owner record is then renewed no more, or, when the call failed, renewed through
    /// the resume window and deleted after it.
    pub async fn commit(mut self) {
        let Some(cluster) = self.cluster.take() else {
            return;
        };
        let (lease, owner) = self.lease.take().map(Lease::disarm).unzip();
        let owner = owner.flatten();
        if self.refund.is_empty() && self.spend.is_empty() && lease.is_none() {
            return;
        }
        let ended = cluster.end(&self, lease, owner.as_ref()).await.is_ok();
        if !ended && !self.spend.is_empty() {
            tracing::warn!(
                nano_usd = self.amount,
                "a stream's spend was not added to the shared budgets"
            );
        }
        match owner {
            Some(owner) if ended => owner.left_to_expire(),
            Some(owner) => {
                let linger = self.linger;
                tokio::spawn(async move {
                    tokio::time::sleep(linger).await;
                    drop(owner);
                });
            }
            None => {}
        }
    }
}

/// What a stream's open decides in the shared store in the round trip that takes its lease
/// ([`Cluster::lease_stream`]): its budgets and its rate limits, checked (and its reservation
/// charged, when its prompt was counted already) with its place in the cap, all or nothing.
#[derive(Debug, Clone, Copy)]
pub struct Opening<'a> {
    /// The stream's id, for its owner record.
    pub id: &'a str,
    /// Counters to read: the spend its budgets are judged on.
    pub spend: &'a [String],
    /// Each counter's limit, in its unit (nano-USD): reached, the stream is refused. `None`: no
    /// limit.
    pub limits: &'a [Option<u64>],
    /// Token buckets to check, as [`Cluster::take`] does.
    pub draws: &'a [BucketDraw],
    /// Whether `draws` are the stream's whole reservation, charged when all pass; else they
    /// are only checked (a long prompt is counted afterwards, once the stream is admitted).
    pub charge: bool,
    /// The longest rate-limit wait the stream may spend holding its lease (its tier's wait
    /// policy); a longer one refuses it. `None`: it never waits.
    pub waits_up_to: Option<Duration>,
}

/// What [`Cluster::lease_stream`] decided for an [`Opening`].
#[derive(Debug, Clone, PartialEq)]
pub struct Opened {
    /// Whether the lease was taken (and, with [`Opening::charge`] and no `limited`, the
    /// buckets charged). `false`: refused by a budget or a rate limit, nothing done.
    pub leased: bool,
    /// The values of [`Opening::spend`], in its order.
    pub spent: Vec<u64>,
    /// As [`Cluster::take`] answers: `None` when every bucket passes (or a budget refused
    /// before they were read), else the index of the one that refuses and when it would pass
    /// (`None`: never).
    pub limited: Option<(usize, Option<Duration>)>,
}

impl Opened {
    /// `reply`: 1 (leased) or 2 (refused), the spend values, then the check's index (1-based,
    /// 0: all pass) and wait in ms. `None` when it does not have that shape.
    fn parse(reply: &[String], opening: &Opening<'_>) -> Option<Opened> {
        let n = opening.spend.len();
        let leased = match reply.first()?.as_str() {
            "1" => true,
            "2" => false,
            _ => return None,
        };
        let (spent, check) = (reply.get(1..=n)?, reply.get(n + 1..n + 3)?);
        let spent = spent
            .iter()
            .map(|v| v.parse().ok())
            .collect::<Option<_>>()?;
        Some(Opened {
            leased,
            spent,
            limited: parse_check(check, opening.draws.len()),
        })
    }
}

/// A bucket check's answer, `{index, wait_ms}` ([`TAKE`]): `None` when all of `buckets` pass.
fn parse_check(reply: &[String], buckets: usize) -> Option<(usize, Option<Duration>)> {
    let index: usize = reply.first().and_then(|i| i.parse().ok()).unwrap_or(0);
    if index == 0 || index > buckets {
        return None;
    }
    let wait_ms: f64 = reply.get(1).and_then(|w| w.parse().ok()).unwrap_or(-1.0);
    // Up to a whole millisecond, as the in-process buckets do (`limits::Bucket::wait_for`).
    let wait = (wait_ms >= 0.0).then(|| Duration::from_millis(wait_ms.ceil() as u64));
    Some((index - 1, wait))
}

/// What a lease counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeaseKind {
    Connection,
    Stream,
}

impl LeaseKind {
    fn key_suffix(self) -> &'static str {
        match self {
            LeaseKind::Connection => "conns",
            LeaseKind::Stream => "streams",
        }
    }

    fn op(self) -> &'static str {
        match self {
            LeaseKind::Connection => "lease_connection",
            LeaseKind::Stream => "lease_stream",
        }
    }
}

/// Why a lease was not taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeaseRefused {
    /// The user already holds the cap's number of leases across all instances.
    Full,
    /// Redis is unavailable and the policy is `fail_closed` (streams only).
    Unavailable(Unavailable),
}

/// One connection or live stream counted in its user's cap across instances, until dropped.
/// The instance renews it once older than half of `lease_ms`; if the instance dies it expires.
pub struct Lease {
    cluster: Arc<Cluster>,
    key: String,
    member: String,
    /// A stream's: the record naming this instance as its owner.
    owner: Option<OwnerRecord>,
}

impl Lease {
    /// Stops renewing the lease and hands back its key and member, for a caller that removes
    /// it from Redis itself (with the rest of an [`Ending`]), and its owner record, which
    /// outlives it: a finished stream stays resumable (so findable from other instances) for
    /// the resume window.
    fn disarm(mut self) -> ((String, String), Option<OwnerRecord>) {
        self.cluster.leases.remove(&self.member);
        let lease = (
            std::mem::take(&mut self.key),
            std::mem::take(&mut self.member),
        );
        (lease, self.owner.take())
    }
}

/// The record `{prefix}:{user}:owner:{stream}` naming this instance as the one running the
/// stream's upstream call, so another instance where its client resumes finds where to relay
/// it from. Renewed with the leases while the stream runs; its end keeps it through the resume
/// window, after which it expires (or, if that failed, it is deleted, if still ours, when
/// dropped). It expires within `lease_ms` if this instance dies while the stream runs; after
/// that, or past its expiry, a resume elsewhere gets `not_found` (an owner that no longer has
/// the stream, or is gone, answers so too).
pub struct OwnerRecord {
    cluster: Arc<Cluster>,
    key: String,
}

impl OwnerRecord {
    /// Renewed no more and never deleted: it expires when its end said.
    fn left_to_expire(mut self) {
        self.release(false);
    }

    /// One stream fewer names the record; the last one stops its renewal, and deletes it if
    /// `delete`.
    fn release(&mut self, delete: bool) {
        if self.key.is_empty() {
            return;
        }
        let last = self
            .cluster
            .owners
            .remove_if_mut(&self.key, |_, (n, _)| {
                *n -= 1;
                *n == 0
            })
            .is_some();
        let key = std::mem::take(&mut self.key);
        if last && delete {
            // Deleted with the others released about the same time, in one round trip; if
            // that fails (or never runs) the record expires by itself within `lease_ms`.
            self.cluster.released_owners.lock().push(key);
            self.cluster.release_owners.notify_one();
        }
    }
}

impl Drop for OwnerRecord {
    fn drop(&mut self) {
        self.release(true);
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        // Disarmed: released by its owner already.
        if self.member.is_empty() {
            return;
        }
        self.cluster.leases.remove(&self.member);
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let cluster = self.cluster.clone();
        let key = std::mem::take(&mut self.key);
        let member = std::mem::take(&mut self.member);
        // If this fails the lease expires by itself within `lease_ms`.
        runtime.spawn(async move {
            let mut conn = cluster.conn.clone();
            let _ = cluster
                .call(
                    "release",
                    redis::cmd("ZREM")
                        .arg(&key)
                        .arg(&member)
                        .query_async::<i64>(&mut conn),
                )
                .await;
        });
    }
}

/// The shared store: one multiplexed Redis connection, the scripts, this instance's leases,
/// and the fault policy.
pub struct Cluster {
    /// For the pub/sub connection, which the connection manager does not carry.
    client: redis::Client,
    /// Reconnects by itself (exponential backoff with jitter) on the next call after a failure.
    conn: ConnectionManager,
    prefix: String,
    /// This instance's id plus a random boot number, so a restarted instance with the same id
    /// never renews or releases its predecessor's leases.
    instance: String,
    policy: OnRedisError,
    timeout: Duration,
    lease: Duration,
    metrics: Arc<Metrics>,
    /// Whether the last call succeeded: logs say "down" and "back" once per transition, not
    /// once per call.
    up: AtomicBool,
    /// This instance's live leases by member, with their key and when they were last written
    /// (taken or renewed): renewed together, and written back after Redis lost them (restart
    /// without persistence), so caps become exact again.
    leases: DashMap<String, (String, Instant)>,
    /// This instance's owner records by key, each with the number of streams naming it (a
    /// finished stream lingering and a new one reusing its id) and when it was last written:
    /// renewed with the leases.
    owners: DashMap<String, (u32, Instant)>,
    /// A call failed since the last renewal that wrote everything: Redis may have lost what
    /// this instance holds (restarted without persistence), so the next renewal writes every
    /// lease and owner record, however fresh.
    stale: AtomicBool,
    next_lease: AtomicU64,
    /// Owner records no stream names any more, deleted in batches by [`release_owners`].
    released_owners: parking_lot::Mutex<Vec<String>>,
    /// Wakes [`release_owners`].
    release_owners: Arc<tokio::sync::Notify>,
    take: Script,
    end: Script,
    lease_script: Script,
    renew_owner: Script,
    release_owner: Script,
    /// Ends the goaway subscriber when the cluster is dropped (it holds no `Arc` on it).
    stopped: CancellationToken,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.stopped.cancel();
    }
}

/// One instance's share of a user's leases, as the cluster-wide admin view shows it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct InstanceLeases {
    pub connections: usize,
    pub live_streams: usize,
}

/// An operator's goaway as published to every instance.
#[derive(Debug, Serialize, Deserialize)]
struct GoawayMessage {
    /// The publishing instance (id and boot number): it applied the goaway itself already.
    from: String,
    user: String,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster")
            .field("instance", &self.instance)
            .field("prefix", &self.prefix)
            .field("policy", &self.policy)
            .finish_non_exhaustive()
    }
}

/// The default instance id: the host name and the listen port.
pub fn default_instance_id(port: u16) -> String {
    let host = std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".into());
    format!("{host}:{port}")
}

impl Cluster {
    /// Connects lazily to `url` (the gateway starts even while Redis is down) and starts the
    /// task that renews this instance's leases and watches Redis's health; it ends when the
    /// returned `Arc` is dropped.
    pub fn start(
        url: &str,
        config: &ClusterConfig,
        instance_id: String,
        metrics: Arc<Metrics>,
    ) -> Result<Arc<Cluster>, ClusterError> {
        let client = redis::Client::open(url).map_err(ClusterError::Url)?;
        let timeout = Duration::from_millis(config.redis_timeout_ms);
        let manager_config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(timeout))
            .set_response_timeout(Some(timeout))
            .set_number_of_retries(3)
            .set_min_delay(Duration::from_millis(50))
            .set_max_delay(Duration::from_secs(2));
        let conn = ConnectionManager::new_lazy_with_config(client.clone(), manager_config)
            .map_err(ClusterError::Url)?;
        metrics.set_redis_up(false);
        let cluster = Arc::new(Cluster {
            client,
            conn,
            prefix: config.key_prefix.clone(),
            instance: format!("{instance_id}/{:08x}", rand::random::<u32>()),
            policy: config.on_redis_error,
            timeout,
            lease: Duration::from_millis(config.lease_ms),
            metrics,
            up: AtomicBool::new(true),
            leases: DashMap::new(),
            owners: DashMap::new(),
            stale: AtomicBool::new(true),
            next_lease: AtomicU64::new(0),
            released_owners: parking_lot::Mutex::new(Vec::new()),
            release_owners: Arc::new(tokio::sync::Notify::new()),
            take: Script::new(TAKE),
            end: Script::new(END),
            lease_script: Script::new(LEASE),
            renew_owner: Script::new(RENEW_OWNER),
            release_owner: Script::new(RELEASE_OWNER),
            stopped: CancellationToken::new(),
        });
        tokio::spawn(renew(Arc::downgrade(&cluster), cluster.lease / 4));
        tokio::spawn(release_owners(
            Arc::downgrade(&cluster),
            cluster.release_owners.clone(),
            cluster.stopped.clone(),
        ));
        Ok(cluster)
    }

    /// This instance's id and boot number, as in its leases.
    pub fn instance(&self) -> &str {
        &self.instance
    }

    /// A key of `user`'s own state: `{prefix}:{user}:what`, in the user's hash slot.
    pub fn user_key(&self, user: &str, what: &str) -> String {
        format!("{}:{{{user}}}:{what}", self.prefix)
    }

    /// A key of a tier's state, in the tier's hash slot.
    pub fn tier_key(&self, tier: &str, what: &str) -> String {
        format!("{}:tier:{{{tier}}}:{what}", self.prefix)
    }

    /// A key of the whole deployment's state.
    pub fn global_key(&self, what: &str) -> String {
        format!("{}:{{global}}:{what}", self.prefix)
    }

    /// Whether a Redis fault lets new streams be decided on this instance's own counters. The
    /// caller then calls [`Cluster::fell_back`].
    pub fn fails_open(&self) -> bool {
        self.policy == OnRedisError::FailOpen
    }

    /// Counts a decision taken locally because Redis failed.
    pub fn fell_back(&self, op: &'static str) {
        self.metrics.redis_fallback(op);
    }

    /// Runs one Redis call, bounded by `redis_timeout_ms`, and keeps the health gauge, the
    /// error counter and the down/back log lines.
    async fn call<T>(
        &self,
        op: &'static str,
        fut: impl Future<Output = RedisResult<T>>,
    ) -> Result<T, Unavailable> {
        let error = match tokio::time::timeout(self.timeout, fut).await {
            Ok(Ok(value)) => {
                if !self.up.swap(true, Ordering::Relaxed) {
                    tracing::info!(
                        instance = %self.instance,
                        "Redis answers again: limits are shared across instances"
                    );
                }
                self.metrics.set_redis_up(true);
                return Ok(value);
            }
            Ok(Err(e)) => e.to_string(),
            Err(_) => format!("no answer within {} ms", self.timeout.as_millis()),
        };
        self.metrics.redis_error(op);
        self.metrics.set_redis_up(false);
        self.stale.store(true, Ordering::Relaxed);
        if self.up.swap(false, Ordering::Relaxed) {
            let policy = match self.policy {
                OnRedisError::FailOpen => "new streams are admitted on this instance's own limits",
                OnRedisError::FailClosed => "new streams are refused with `overloaded`",
            };
            tracing::warn!(op, %error, instance = %self.instance, "Redis is unavailable: {policy} until it is back");
        }
        Err(Unavailable)
    }

    /// Checks every bucket in `draws` and, if `charge`, takes from all of them at once; none
    /// when one refuses. `Ok(None)`: all pass. `Ok(Some((i, wait)))`: `draws[i]` refused, the
    /// request passes after `wait` (`None`: never, it exceeds the capacity).
    pub async fn take(
        &self,
        draws: &[BucketDraw],
        charge: bool,
    ) -> Result<Option<(usize, Option<Duration>)>, Unavailable> {
        let mut invocation = self.take.prepare_invoke();
        invocation.arg(u8::from(charge));
        for d in draws {
            invocation.key(&d.key).arg(d.capacity).arg(d.amount);
        }
        let mut conn = self.conn.clone();
        let op = if charge { "take" } else { "check" };
        let reply: Vec<String> = self.call(op, invocation.invoke_async(&mut conn)).await?;
        Ok(parse_check(&reply, draws.len()))
    }

    /// The integer values of `keys` (0 for a missing one), in one round trip.
    pub async fn counters(&self, keys: &[String]) -> Result<Vec<u64>, Unavailable> {
        let mut pipe = redis::pipe();
        for key in keys {
            pipe.cmd("GET").arg(key);
        }
        let mut conn = self.conn.clone();
        let values: Vec<Option<u64>> = self.call("read", pipe.query_async(&mut conn)).await?;
        Ok(values.into_iter().map(Option::unwrap_or_default).collect())
    }

    /// Sends the writes that end one stream in one script call (see [`Ending`]).
    async fn end(
        &self,
        ending: &Ending,
        lease: Option<(String, String)>,
        owner: Option<&OwnerRecord>,
    ) -> Result<(), Unavailable> {
        let mut invocation = self.end.prepare_invoke();
        invocation
            .arg(ending.refund.len())
            .arg(ending.spend.len())
            .arg(ending.diff);
        for (key, capacity) in &ending.refund {
            invocation.key(key).arg(*capacity);
        }
        for key in &ending.spend {
            invocation.key(key);
        }
        invocation
            .arg(ending.amount)
            .arg(ending.spend_ttl.as_millis() as u64);
        if let Some((key, member)) = &lease {
            invocation.key(key).arg(member);
            if let Some(owner) = owner {
                let keep = ending.linger + self.lease;
                invocation
                    .key(&owner.key)
                    .arg(&self.instance)
                    .arg(keep.as_millis() as u64);
            }
        }
        let mut conn = self.conn.clone();
        self.call("settle", invocation.invoke_async::<i64>(&mut conn))
            .await
            .map(drop)
    }

    /// Takes one of `user`'s `max` connection leases across instances. Redis unavailable: it
    /// is admitted (on the instance's own cap, which the hub checks), and written to Redis by
    /// the renewal once it is back.
    pub async fn lease_connection(
        self: &Arc<Self>,
        user: &str,
        max: usize,
    ) -> Result<Lease, LeaseRefused> {
        let key = self.user_key(user, LeaseKind::Connection.key_suffix());
        let member = self.next_member();
        let mut invocation = self.lease_script.prepare_invoke();
        invocation
            .key(&key)
            .arg(&member)
            .arg(max)
            .arg(self.lease.as_millis() as u64)
            .arg("");
        let mut conn = self.conn.clone();
        let op = LeaseKind::Connection.op();
        let sent = Instant::now();
        match self
            .call(op, invocation.invoke_async::<Vec<String>>(&mut conn))
            .await
        {
            Ok(reply) if reply.first().is_none_or(|taken| taken == "0") => {
                return Err(LeaseRefused::Full)
            }
            Ok(_) => {}
            Err(_) => self.fell_back(op),
        }
        Ok(self.held(key, member, sent))
    }

    /// Takes one of `user`'s `max` live stream leases across instances, recording this
    /// instance as the owner of stream `opening.id`, and decides the rest of its admission in
    /// the same round trip (see [`Opening`]): `(None, Some(opened))` when a budget or a rate
    /// limit refused it, leaving nothing behind. Redis unavailable: as the policy says; a lease
    /// taken so is written to Redis by the renewal once it is back, and nothing is decided
    /// (`None`: the stream asks again, and falls back as its own calls decide).
    pub async fn lease_stream(
        self: &Arc<Self>,
        user: &str,
        max: usize,
        opening: &Opening<'_>,
    ) -> Result<(Option<Lease>, Option<Opened>), LeaseRefused> {
        let key = self.user_key(user, LeaseKind::Stream.key_suffix());
        let owner_key = self.owner_key(user, opening.id);
        let member = self.next_member();
        let mut invocation = self.lease_script.prepare_invoke();
        invocation
            .key(&key)
            .key(&owner_key)
            .arg(&member)
            .arg(max)
            .arg(self.lease.as_millis() as u64)
            .arg(&self.instance)
            .arg(opening.spend.len())
            .arg(opening.draws.len())
            .arg(u8::from(opening.charge))
            .arg(
                opening
                    .waits_up_to
                    .map_or(-1.0, |d| d.as_secs_f64() * 1000.0),
            );
        for key in opening.spend {
            invocation.key(key);
        }
        for limit in opening.limits {
            invocation.arg(limit.map_or(-1, |l| i64::try_from(l).unwrap_or(i64::MAX)));
        }
        for d in opening.draws {
            invocation.key(&d.key).arg(d.capacity).arg(d.amount);
        }
        let mut conn = self.conn.clone();
        let op = LeaseKind::Stream.op();
        // Before the call: Redis dates what it writes no earlier than this.
        let sent = Instant::now();
        let opened = match self
            .call(op, invocation.invoke_async::<Vec<String>>(&mut conn))
            .await
        {
            Ok(reply) if reply.first().is_none_or(|taken| taken == "0") => {
                return Err(LeaseRefused::Full)
            }
            Ok(reply) => Opened::parse(&reply, opening),
            Err(unavailable) => {
                if !self.fails_open() {
                    return Err(LeaseRefused::Unavailable(unavailable));
                }
                self.fell_back(op);
                None
            }
        };
        if opened.as_ref().is_some_and(|o| !o.leased) {
            return Ok((None, opened));
        }
        let mut lease = self.held(key, member, sent);
        self.owners
            .entry(owner_key.clone())
            .and_modify(|(n, written)| {
                *n += 1;
                *written = sent;
            })
            .or_insert((1, sent));
        lease.owner = Some(OwnerRecord {
            cluster: self.clone(),
            key: owner_key,
        });
        Ok((Some(lease), opened))
    }

    /// A new lease member: this instance's id and boot number, and a count.
    fn next_member(&self) -> String {
        format!(
            "{}/{}",
            self.instance,
            self.next_lease.fetch_add(1, Ordering::Relaxed)
        )
    }

    /// `member` of the sorted set `key`, taken at `written` (or to be written by the renewal,
    /// which a failed call makes write everything): renewed from now on until released.
    fn held(self: &Arc<Self>, key: String, member: String, written: Instant) -> Lease {
        self.leases.insert(member.clone(), (key.clone(), written));
        Lease {
            cluster: self.clone(),
            key,
            member,
            owner: None,
        }
    }

    /// The key naming the instance that runs `user`'s stream `id`.
    fn owner_key(&self, user: &str, id: &str) -> String {
        self.user_key(user, &format!("owner:{id}"))
    }

    /// The instance (id and boot number) running `user`'s stream `id`, if one recorded it and
    /// has renewed the record within `lease_ms`.
    pub async fn owner_of(&self, user: &str, id: &str) -> Result<Option<String>, Unavailable> {
        let mut conn = self.conn.clone();
        self.call(
            "read",
            redis::cmd("GET")
                .arg(self.owner_key(user, id))
                .query_async(&mut conn),
        )
        .await
    }

    /// The pub/sub channel where `instance` hears about the streams it relays to or from
    /// other instances.
    fn relay_channel(&self, instance: &str) -> String {
        self.global_key(&format!("relay:{instance}"))
    }

    /// Publishes `message` to `instance`'s relay channel; how many subscribers got it (0: that
    /// instance is gone, or its subscription is down for now).
    pub async fn publish_relay(
        &self,
        instance: &str,
        message: Vec<u8>,
    ) -> Result<u64, Unavailable> {
        let mut conn = self.conn.clone();
        self.call(
            "relay",
            redis::cmd("PUBLISH")
                .arg(self.relay_channel(instance))
                .arg(message)
                .query_async(&mut conn),
        )
        .await
    }

    /// How long an instance relaying a stream may go without a message from its peer before
    /// the peer counts as gone: the leases' own lifetime.
    pub fn peer_silence(&self) -> Duration {
        self.lease
    }

    /// `user`'s unexpired connection and stream leases across the cluster, by instance (id and
    /// boot number, as in [`Cluster::instance`]).
    pub async fn user_leases(
        &self,
        user: &str,
    ) -> Result<BTreeMap<String, InstanceLeases>, Unavailable> {
        let mut conn = self.conn.clone();
        let (secs, micros): (u64, u64) = self
            .call("read", redis::cmd("TIME").query_async(&mut conn))
            .await?;
        // A lease's score is its expiry on Redis's clock.
        let now = secs * 1000 + micros / 1000;
        let mut by_instance: BTreeMap<String, InstanceLeases> = BTreeMap::new();
        for kind in [LeaseKind::Connection, LeaseKind::Stream] {
            let members: Vec<String> = self
                .call(
                    "read",
                    redis::cmd("ZRANGEBYSCORE")
                        .arg(self.user_key(user, kind.key_suffix()))
                        .arg(format!("({now}"))
                        .arg("+inf")
                        .query_async(&mut conn),
                )
                .await?;
            for member in members {
                // A member is `{instance}/{n}`; the instance itself holds one `/`.
                let Some((instance, _)) = member.rsplit_once('/') else {
                    continue;
                };
                let entry = by_instance.entry(instance.to_string()).or_default();
                match kind {
                    LeaseKind::Connection => entry.connections += 1,
                    LeaseKind::Stream => entry.live_streams += 1,
                }
            }
        }
        Ok(by_instance)
    }

    /// Every user with a lease key in Redis: a connection or stream somewhere in the cluster
    /// within the last `lease_ms` (the key expires after that). By `SCAN`, so on a Redis
    /// Cluster it sees the node this instance talks to.
    pub async fn users_with_leases(&self) -> Result<Vec<String>, Unavailable> {
        let mut conn = self.conn.clone();
        let escaped: String = self
            .prefix
            .chars()
            .flat_map(|c| {
                let escape = matches!(c, '*' | '?' | '[' | ']' | '\\');
                escape.then_some('\\').into_iter().chain([c])
            })
            .collect();
        let head = format!("{}:{{", self.prefix);
        let mut users = std::collections::BTreeSet::new();
        for kind in [LeaseKind::Connection, LeaseKind::Stream] {
            let tail = format!("}}:{}", kind.key_suffix());
            let pattern = format!("{escaped}:{{*{tail}");
            let mut cursor = 0u64;
            loop {
                let (next, keys): (u64, Vec<String>) = self
                    .call(
                        "read",
                        redis::cmd("SCAN")
                            .arg(cursor)
                            .arg("MATCH")
                            .arg(&pattern)
                            .arg("COUNT")
                            .arg(500)
                            .query_async(&mut conn),
                    )
                    .await?;
                users.extend(
                    keys.iter().filter_map(|k| {
                        k.strip_prefix(&head)?.strip_suffix(&tail).map(String::from)
                    }),
                );
                if next == 0 {
                    break;
                }
                cursor = next;
            }
        }
        Ok(users.into_iter().collect())
    }

    /// The pub/sub channel of operator goaways. Channels are not keys (Redis Cluster sends
    /// every `PUBLISH` to every node), but it is named like the deployment's global keys.
    fn goaway_channel(&self) -> String {
        self.global_key("goaway")
    }

    /// Publishes an operator's goaway for `user` to every instance; the caller applies it on
    /// this instance itself. Returns how many instances (this one included) are subscribed
    /// and received it.
    pub async fn publish_goaway(&self, user: &str) -> Result<u64, Unavailable> {
        let message = serde_json::to_string(&GoawayMessage {
            from: self.instance.clone(),
            user: user.to_string(),
        })
        .expect("a string pair serialises");
        let mut conn = self.conn.clone();
        self.call(
            "publish_goaway",
            redis::cmd("PUBLISH")
                .arg(self.goaway_channel())
                .arg(message)
                .query_async(&mut conn),
        )
        .await
    }

    /// Starts the task that applies the goaways other instances publish (`apply(user)` on
    /// each) and hands every message on this instance's relay channel to `relay`. It
    /// resubscribes with backoff after Redis fails, and ends with the cluster.
    pub fn subscribe(
        self: &Arc<Self>,
        apply: impl Fn(&str) -> usize + Send + 'static,
        relay: impl Fn(&[u8]) + Send + 'static,
    ) {
        tokio::spawn(subscribe(
            self.client.clone(),
            [self.goaway_channel(), self.relay_channel(&self.instance)],
            self.instance.clone(),
            self.metrics.clone(),
            self.timeout,
            self.stopped.clone(),
            apply,
            relay,
        ));
    }

    /// Writes the live leases of this instance with a fresh expiry (and their keys'), and its
    /// owner records, in pipelines scored by Redis's clock: those written more than half of
    /// `lease_ms` ago (called every quarter, each is renewed with at least a quarter left), or
    /// every one after a failed call, so leases lost with a restarted Redis come back too.
    /// Streams shorter than half of `lease_ms` are never renewed.
    async fn renew_leases(&self) -> Result<(), Unavailable> {
        let all = self.stale.swap(false, Ordering::Relaxed);
        let started = Instant::now();
        let due = |written: &Instant| all || started.duration_since(*written) >= self.lease / 2;
        let leases: Vec<(String, String)> = self
            .leases
            .iter()
            .filter(|e| due(&e.value().1))
            .map(|e| (e.key().clone(), e.value().0.clone()))
            .collect();
        let owners: Vec<String> = self
            .owners
            .iter()
            .filter(|e| due(&e.value().1))
            .map(|e| e.key().clone())
            .collect();
        let mut conn = self.conn.clone();
        // Also the health check: Redis is asked something every quarter of `lease_ms`.
        let (secs, micros): (u64, u64) = self
            .call("renew", redis::cmd("TIME").query_async(&mut conn))
            .await?;
        let ms = self.lease.as_millis() as u64;
        let expiry = secs * 1000 + micros / 1000 + ms;
        for chunk in leases.chunks(512) {
            let mut pipe = redis::pipe();
            for (member, key) in chunk {
                pipe.cmd("ZADD")
                    .arg(key)
                    .arg(expiry)
                    .arg(member)
                    .ignore()
                    .cmd("PEXPIRE")
                    .arg(key)
                    .arg(ms)
                    .ignore();
            }
            self.call("renew", pipe.query_async::<()>(&mut conn))
                .await?;
            for (member, _) in chunk {
                if let Some(mut lease) = self.leases.get_mut(member) {
                    lease.1 = started;
                }
            }
        }
        for chunk in owners.chunks(512) {
            // Loaded first in the same pipeline: each call then sends only the script's hash.
            let mut pipe = redis::pipe();
            pipe.load_script(&self.renew_owner).ignore();
            for key in chunk {
                let mut invocation = self.renew_owner.key(key);
                invocation.arg(&self.instance).arg(ms);
                pipe.invoke_script(&invocation).ignore();
            }
            self.call("renew", pipe.query_async::<()>(&mut conn))
                .await?;
            for key in chunk {
                if let Some(mut owner) = self.owners.get_mut(key) {
                    owner.1 = started;
                }
            }
        }
        Ok(())
    }
}

/// Renews the leases of the cluster every `every` (and so pings Redis, keeping
/// `muxgate_redis_up` current), until the cluster is dropped. Every second at least while
/// Redis is down, so its return is noticed soon.
async fn renew(cluster: Weak<Cluster>, every: Duration) {
    let down_every = every.min(Duration::from_secs(1));
    loop {
        let Some(c) = cluster.upgrade() else { return };
        let ok = c.renew_leases().await.is_ok();
        drop(c);
        tokio::time::sleep(if ok { every } else { down_every }).await;
    }
}

/// How long the deletion of a released owner record waits for others to go with it: streams
/// end at their own times, and under load many end within this.
const OWNER_RELEASE_BATCH: Duration = Duration::from_millis(20);

/// Deletes the owner records released on this instance (those still naming it), a pipeline
/// per batch, until the cluster is dropped.
async fn release_owners(
    cluster: Weak<Cluster>,
    wake: Arc<tokio::sync::Notify>,
    stopped: CancellationToken,
) {
    loop {
        tokio::select! {
            () = stopped.cancelled() => return,
            () = wake.notified() => {}
        }
        tokio::time::sleep(OWNER_RELEASE_BATCH).await;
        let Some(c) = cluster.upgrade() else { return };
        let keys = std::mem::take(&mut *c.released_owners.lock());
        let mut conn = c.conn.clone();
        for chunk in keys.chunks(512) {
            let mut pipe = redis::pipe();
            pipe.load_script(&c.release_owner).ignore();
            for key in chunk {
                let mut invocation = c.release_owner.key(key);
                invocation.arg(&c.instance);
                pipe.invoke_script(&invocation).ignore();
            }
            if let Err(Unavailable) = c.call("release", pipe.query_async::<()>(&mut conn)).await {
                break;
            }
        }
    }
}

/// Subscribes to the goaway channel and this instance's relay channel, applies each goaway
/// published by another instance and hands relay messages to `relay`, until `stopped`. A
/// goaway published while this instance was not subscribed is lost: PUBLISH's count, which
/// the operator gets back, shows how many instances heard it. A relay message lost so is
/// noticed by its relay (numbered messages and heartbeats) and asked for again.
#[allow(clippy::too_many_arguments)]
async fn subscribe(
    client: redis::Client,
    channels: [String; 2],
    me: String,
    metrics: Arc<Metrics>,
    timeout: Duration,
    stopped: CancellationToken,
    apply: impl Fn(&str) -> usize,
    relay: impl Fn(&[u8]),
) {
    let [goaway_channel, relay_channel] = channels;
    const MIN_BACKOFF: Duration = Duration::from_millis(50);
    let mut backoff = MIN_BACKOFF;
    loop {
        let subscribed = async {
            let mut pubsub = client.get_async_pubsub().await?;
            pubsub.subscribe(&goaway_channel).await?;
            pubsub.subscribe(&relay_channel).await?;
            RedisResult::Ok(pubsub)
        };
        let pubsub = tokio::select! {
            () = stopped.cancelled() => return,
            r = tokio::time::timeout(timeout, subscribed) => r,
        };
        match pubsub {
            Ok(Ok(pubsub)) => {
                backoff = MIN_BACKOFF;
                let mut messages = pubsub.into_on_message();
                loop {
                    let message = tokio::select! {
                        () = stopped.cancelled() => return,
                        m = messages.next() => m,
                    };
                    // `None`: the connection dropped; resubscribe.
                    let Some(message) = message else { break };
                    if message.get_channel_name() == relay_channel {
                        relay(message.get_payload_bytes());
                        continue;
                    }
                    let Ok(payload) = message.get_payload::<String>() else {
                        continue;
                    };
                    match serde_json::from_str::<GoawayMessage>(&payload) {
                        Ok(g) if g.from == me => {}
                        Ok(g) => {
                            let told = apply(&g.user);
                            metrics.goaway_relayed();
                            tracing::info!(user = %g.user, from = %g.from, connections = told, "operator goaway relayed through Redis");
                        }
                        Err(e) => tracing::warn!(%e, "ignored a malformed goaway message"),
                    }
                }
                tracing::warn!(
                    "the subscription to Redis (goaways, relays) dropped; resubscribing"
                );
            }
            Ok(Err(e)) => tracing::debug!(%e, "subscription to Redis failed"),
            Err(_) => tracing::debug!("subscription to Redis timed out"),
        }
        tokio::select! {
            () = stopped.cancelled() => return,
            () = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(Duration::from_secs(2));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The part of a key Redis Cluster hashes: between the first `{` and the next `}`.
    fn hash_tag(key: &str) -> &str {
        let open = key.find('{').expect("a tag");
        let close = key[open..].find('}').expect("closed") + open;
        &key[open + 1..close]
    }

    #[test]
    fn a_shared_refusal_waits_whole_milliseconds() {
        let reply = |r: &[&str]| r.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        // 0.4 ms short of the refill: a client told 0 would come back and be refused again.
        assert_eq!(
            parse_check(&reply(&["2", "0.4"]), 3),
            Some((1, Some(Duration::from_millis(1))))
        );
        assert_eq!(
            parse_check(&reply(&["1", "499.5"]), 3),
            Some((0, Some(Duration::from_millis(500))))
        );
        assert_eq!(parse_check(&reply(&["3", "-1"]), 3), Some((2, None)));
        assert_eq!(parse_check(&reply(&["0"]), 3), None);
    }

    #[test]
    fn an_opening_reads_whether_it_was_leased_then_spend_then_the_check_of_its_buckets() {
        let draw = |key: &str| BucketDraw {
            key: key.into(),
            capacity: 60.0,
            amount: 1.0,
        };
        let spend = ["u".to_string(), "t".to_string()];
        let draws = [draw("a"), draw("b")];
        let opening = Opening {
            id: "s1",
            spend: &spend,
            limits: &[Some(5000), None],
            draws: &draws,
            charge: true,
            waits_up_to: None,
        };
        let reply = |r: &[&str]| r.iter().map(|v| v.to_string()).collect::<Vec<_>>();
        assert_eq!(
            Opened::parse(&reply(&["1", "2400", "0", "0", "0"]), &opening),
            Some(Opened {
                leased: true,
                spent: vec![2400, 0],
                limited: None
            })
        );
        // The second bucket refuses: passes in 1.5 s; or never (-1).
        let refused = Opened::parse(&reply(&["2", "1", "2", "2", "1500"]), &opening).expect("read");
        assert!(!refused.leased);
        assert_eq!(
            refused.limited,
            Some((1, Some(Duration::from_millis(1500))))
        );
        let never = Opened::parse(&reply(&["2", "1", "2", "1", "-1"]), &opening).expect("read");
        assert_eq!(never.limited, Some((0, None)));
        // A budget refused before the buckets were read.
        let over = Opened::parse(&reply(&["2", "5000", "0", "0", "0"]), &opening).expect("read");
        assert_eq!((over.leased, over.limited), (false, None));
        // A reply of another shape is no reading: the stream's task asks again.
        assert_eq!(Opened::parse(&reply(&[]), &opening), None);
        assert_eq!(
            Opened::parse(&reply(&["1", "x", "0", "0", "0"]), &opening),
            None
        );
        assert_eq!(
            Opened::parse(&reply(&["3", "1", "0", "0", "0"]), &opening),
            None
        );
        assert_eq!(Opened::parse(&reply(&["1", "1", "0", "0"]), &opening), None);
    }

    #[tokio::test]
    async fn every_key_of_a_user_shares_its_hash_tag() {
        // Lazy: nothing listens on this port and nothing is sent.
        let cluster = Cluster::start(
            "redis://127.0.0.1:1/",
            &ClusterConfig::default(),
            "gw-a:8080".into(),
            Arc::new(Metrics::with_redis()),
        )
        .expect("a valid URL");
        assert!(cluster.instance().starts_with("gw-a:8080/"));
        let keys = [
            cluster.user_key("alice", "rpm"),
            cluster.user_key("alice", "spend:20000"),
            cluster.user_key("alice", LeaseKind::Connection.key_suffix()),
            cluster.user_key("alice", LeaseKind::Stream.key_suffix()),
        ];
        assert_eq!(keys[0], "muxgate:{alice}:rpm");
        assert!(keys.iter().all(|k| hash_tag(k) == "alice"), "{keys:?}");
        assert_eq!(hash_tag(&cluster.tier_key("pro", "tpm")), "pro");
        assert_eq!(cluster.global_key("rpm"), "muxgate:{global}:rpm");
        assert!(matches!(
            Cluster::start(
                "nope://x",
                &ClusterConfig::default(),
                "x".into(),
                Arc::new(Metrics::new())
            ),
            Err(ClusterError::Url(_))
        ));
    }
}
