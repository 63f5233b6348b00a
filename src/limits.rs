//! Rate limits: token buckets per user (requests/minute), per tier (requests and tokens per
//! minute) and global, shared by every connection of the process.
//!
//! Tokens are reserved before the upstream call (prompt tokens plus `max_tokens`) and
//! reconciled with the upstream's real usage afterwards, so an unused reservation comes back.
//! All the buckets a request touches are checked and charged under their locks at once, so a
//! refused request takes nothing, and `retry_after` is the wait of the slowest bucket.
//!
//! In cluster mode ([`RateLimiter::shared`]) the same buckets live in Redis and one Lua script
//! checks and charges all five at once ([`Cluster::take`]), so any number of instances admit
//! exactly what one would; the in-process buckets then serve only when Redis fails under
//! `on_redis_error = "fail_open"`.
//!
//! Why not `governor`: it has no way to hand back an unused reservation, and its multi-cell
//! check is per limiter, not atomic across the five buckets a stream draws from.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use dashmap::DashMap;
use parking_lot::{Mutex, MutexGuard};
use serde::Deserialize;
use tokio::time::Instant;

use crate::cluster::{BucketDraw, Cluster, Ending, Unavailable};
use crate::tiers::{Tier, Tiers};

/// Process-wide limits.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Requests per minute over all tiers. Default 10000.
    pub global_rpm: u32,
    /// Tokens per minute over all tiers. Default 10000000.
    pub global_tpm: u64,
    /// Completion tokens reserved when the client sets no `max_tokens`. Default 1024.
    pub default_max_tokens: u64,
    /// Per-user requests per minute, overriding the tier's `user_rpm`. Default none.
    pub user_rpm: BTreeMap<String, u32>,
    /// Bytes of a request's prompt the tokenizer reads for its reservation; the rest counts one
    /// token per byte, an upper bound (and so the bill for the prompt if the upstream sends no
    /// `usage`). Bounds the tokenizer's CPU per request: a long piece of one repeated character
    /// costs up to ~0.8 CPU-s per MiB to merge, prose ~30 ms. Default 262144 (256 KiB, some 64k
    /// tokens of prose counted exactly).
    pub prompt_count_bytes: usize,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            global_rpm: 10_000,
            global_tpm: 10_000_000,
            default_max_tokens: 1024,
            user_rpm: BTreeMap::new(),
            prompt_count_bytes: 256 << 10,
        }
    }
}

/// A token bucket holding up to one minute's allowance, refilled continuously.
#[derive(Debug)]
pub struct Bucket {
    capacity: f64,
    per_sec: f64,
    /// May go below zero when a stream used more tokens than it reserved: the debt is repaid
    /// by refill before anyone else is admitted.
    tokens: f64,
    refilled: Instant,
}

impl Bucket {
    pub fn per_minute(limit: u64, now: Instant) -> Self {
        Bucket {
            capacity: limit as f64,
            per_sec: limit as f64 / 60.0,
            tokens: limit as f64,
            refilled: now,
        }
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.refilled).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.per_sec).min(self.capacity);
        self.refilled = now;
    }

    /// How long until `n` can be taken; zero when it can be now, `None` when never (more
    /// than the bucket holds).
    fn wait_for(&self, n: f64) -> Option<Duration> {
        if n > self.capacity {
            return None;
        }
        if self.tokens >= n {
            return Some(Duration::ZERO);
        }
        // Up to a whole millisecond, as clients read it (`retry_after_ms`): a client that
        // waits exactly that long is admitted, never refused again for a fraction of one.
        let wait = Duration::from_secs_f64((n - self.tokens) / self.per_sec);
        Some(Duration::from_millis(
            u64::try_from(wait.as_nanos().div_ceil(1_000_000)).unwrap_or(u64::MAX),
        ))
    }

    fn take(&mut self, n: f64) {
        self.tokens -= n;
    }

    /// Returns `n` (negative: charges it) after reconciliation.
    fn adjust(&mut self, n: f64, now: Instant) {
        self.refill(now);
        self.tokens = (self.tokens + n).min(self.capacity);
    }

    pub fn available(&mut self, now: Instant) -> f64 {
        self.refill(now);
        self.tokens
    }
}

/// Which limit refused a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LimitKind {
    UserRpm,
    TierRpm,
    TierTpm,
    GlobalRpm,
    GlobalTpm,
}

impl LimitKind {
    pub fn as_str(self) -> &'static str {
        match self {
            LimitKind::UserRpm => "user_rpm",
            LimitKind::TierRpm => "tier_rpm",
            LimitKind::TierTpm => "tier_tpm",
            LimitKind::GlobalRpm => "global_rpm",
            LimitKind::GlobalTpm => "global_tpm",
        }
    }
}

/// The five shared buckets (user, tier and global; requests and tokens) one request draws
/// from in Redis, and which limit each is.
pub struct SharedCheck {
    kinds: Vec<LimitKind>,
    draws: Vec<BucketDraw>,
}

impl SharedCheck {
    fn new(
        limiter: &RateLimiter,
        cluster: &Cluster,
        user: &str,
        tier: &Tier,
        tokens: u64,
    ) -> SharedCheck {
        let tokens = tokens as f64;
        let draw = |kind: LimitKind, key: String, capacity: u64, amount: f64| {
            (
                kind,
                BucketDraw {
                    key,
                    capacity: capacity as f64,
                    amount,
                },
            )
        };
        let name = &*tier.name;
        let draws = [
            draw(
                LimitKind::UserRpm,
                cluster.user_key(user, "rpm"),
                limiter.user_rpm(user, tier).into(),
                1.0,
            ),
            draw(
                LimitKind::TierRpm,
                cluster.tier_key(name, "rpm"),
                tier.config.rpm.into(),
                1.0,
            ),
            draw(
                LimitKind::TierTpm,
                cluster.tier_key(name, "tpm"),
                tier.config.tpm,
                tokens,
            ),
            draw(
                LimitKind::GlobalRpm,
                cluster.global_key("rpm"),
                limiter.config.global_rpm.into(),
                1.0,
            ),
            draw(
                LimitKind::GlobalTpm,
                cluster.global_key("tpm"),
                limiter.config.global_tpm,
                tokens,
            ),
        ];
        let (kinds, draws) = draws.into_iter().unzip();
        SharedCheck { kinds, draws }
    }

    pub fn draws(&self) -> &[BucketDraw] {
        &self.draws
    }

    /// The refusal Redis's answer ([`Cluster::take`]'s) means: which limit, and when it passes.
    pub fn verdict(&self, limited: Option<(usize, Option<Duration>)>) -> Result<(), Limited> {
        match limited {
            None => Ok(()),
            Some((i, retry_after)) => Err(Limited {
                kind: self.kinds[i],
                retry_after,
            }),
        }
    }
}

/// Why [`RateLimiter::acquire`] or [`RateLimiter::admits`] refused a request.
#[derive(Debug, Clone, PartialEq)]
pub enum Refused {
    Limited(Limited),
    /// Cluster mode, Redis unavailable, `fail_closed`: the client gets `overloaded`.
    Unavailable(Unavailable),
}

/// A refused request.
#[derive(Debug, Clone, PartialEq)]
pub struct Limited {
    pub kind: LimitKind,
    /// When a retry will pass (given no other traffic); `None`: never, the request is larger
    /// than the limit itself.
    pub retry_after: Option<Duration>,
}

impl Limited {
    pub fn message(&self) -> String {
        match self.retry_after {
            Some(d) => format!(
                "rate limited ({}): retry in {} ms",
                self.kind.as_str(),
                d.as_millis()
            ),
            None => format!(
                "the request's token reservation exceeds the {} limit itself: lower max_tokens",
                self.kind.as_str()
            ),
        }
    }
}

struct TierBuckets {
    rpm: Mutex<Bucket>,
    tpm: Mutex<Bucket>,
}

/// All the buckets of the process.
pub struct RateLimiter {
    config: LimitsConfig,
    tier_buckets: BTreeMap<Arc<str>, TierBuckets>,
    global_rpm: Mutex<Bucket>,
    global_tpm: Mutex<Bucket>,
    /// Per-user request buckets, created on first use. A full bucket acts exactly like a new
    /// one, so full buckets are dropped (at most once per [`PRUNE_EVERY`]): the map holds only
    /// users who made a request in the last minute or so.
    users: DashMap<Arc<str>, Arc<Mutex<Bucket>>>,
    /// When `users` was last pruned.
    pruned_at: Mutex<Instant>,
    /// Cluster mode: the buckets that decide are in Redis; the ones above serve only as the
    /// `fail_open` fallback.
    cluster: Option<Arc<Cluster>>,
}

/// How often the per-user buckets are swept for full ones.
const PRUNE_EVERY: Duration = Duration::from_secs(60);

/// Tokens taken for one stream, to be reconciled when it ends.
#[derive(Debug, Clone, PartialEq)]
pub struct Reservation {
    pub tier: Arc<str>,
    pub tokens: u64,
    /// Taken from the buckets in Redis (cluster mode), so given back there.
    pub shared: bool,
}

impl Reservation {
    /// A reservation of no tokens: nothing to reconcile but the tokens really used.
    pub fn none(tier: Arc<str>) -> Reservation {
        Reservation {
            tier,
            tokens: 0,
            shared: false,
        }
    }
}

impl RateLimiter {
    pub fn new(config: LimitsConfig, tiers: &Tiers) -> Self {
        let now = Instant::now();
        let tier_buckets = tiers
            .iter()
            .map(|t| {
                let buckets = TierBuckets {
                    rpm: Mutex::new(Bucket::per_minute(t.config.rpm.into(), now)),
                    tpm: Mutex::new(Bucket::per_minute(t.config.tpm, now)),
                };
                (t.name.clone(), buckets)
            })
            .collect();
        RateLimiter {
            global_rpm: Mutex::new(Bucket::per_minute(config.global_rpm.into(), now)),
            global_tpm: Mutex::new(Bucket::per_minute(config.global_tpm, now)),
            config,
            tier_buckets,
            users: DashMap::new(),
            pruned_at: Mutex::new(now),
            cluster: None,
        }
    }

    /// Cluster mode: the buckets are checked and charged in Redis through `cluster`.
    pub fn shared(mut self, cluster: Arc<Cluster>) -> Self {
        self.cluster = Some(cluster);
        self
    }

    /// Admits one request reserving `tokens` (charging every bucket or none), or says which
    /// limit refused it and for how long. In cluster mode, decided in Redis; when Redis fails,
    /// on this instance's buckets (`fail_open`) or refused (`fail_closed`).
    pub async fn acquire(
        &self,
        user: &Arc<str>,
        tier: &Tier,
        tokens: u64,
    ) -> Result<Reservation, Refused> {
        if let Some(cluster) = &self.cluster {
            match self.assess_shared(cluster, user, tier, tokens, true).await {
                Ok(()) => {
                    return Ok(Reservation {
                        tier: tier.name.clone(),
                        tokens,
                        shared: true,
                    })
                }
                Err(Some(refused)) => return Err(refused),
                Err(None) => cluster.fell_back("take"),
            }
        }
        self.try_acquire(user, tier, tokens)
            .map_err(Refused::Limited)
    }

    /// Whether [`RateLimiter::acquire`] would admit the request now, charging nothing.
    pub async fn admits(&self, user: &Arc<str>, tier: &Tier, tokens: u64) -> Result<(), Refused> {
        if let Some(cluster) = &self.cluster {
            match self.assess_shared(cluster, user, tier, tokens, false).await {
                Ok(()) => return Ok(()),
                Err(Some(refused)) => return Err(refused),
                Err(None) => cluster.fell_back("check"),
            }
        }
        self.assess(user, tier, tokens, false)
            .map_err(Refused::Limited)
    }

    /// The five buckets in Redis. `Err(None)`: Redis failed and the policy says decide here.
    async fn assess_shared(
        &self,
        cluster: &Cluster,
        user: &str,
        tier: &Tier,
        tokens: u64,
        charge: bool,
    ) -> Result<(), Option<Refused>> {
        let check = SharedCheck::new(self, cluster, user, tier, tokens);
        match cluster.take(&check.draws, charge).await {
            Ok(limited) => check
                .verdict(limited)
                .map_err(|limited| Some(Refused::Limited(limited))),
            Err(_) if cluster.fails_open() => Err(None),
            Err(unavailable) => Err(Some(Refused::Unavailable(unavailable))),
        }
    }

    /// Cluster mode: the shared buckets a request reserving `tokens` draws from, for a check
    /// made elsewhere in one call with other reads (a stream's open). `None` in one process.
    pub fn shared_check(&self, user: &str, tier: &Tier, tokens: u64) -> Option<SharedCheck> {
        let cluster = self.cluster.as_ref()?;
        Some(SharedCheck::new(self, cluster, user, tier, tokens))
    }

    /// Settles a reservation against the tokens really used, in the buckets it was taken
    /// from: here, or in cluster mode as part of the stream's `ending` (one round trip with
    /// the rest). A reconciliation Redis misses is lost: the shared buckets refill anyway.
    pub fn settle(&self, reservation: &Reservation, used: u64, ending: &mut Ending) {
        let diff = reservation.tokens as f64 - used as f64;
        let Some(cluster) = self.cluster.as_ref().filter(|_| reservation.shared) else {
            self.reconcile(reservation, used);
            return;
        };
        if diff == 0.0 {
            return;
        }
        let mut buckets = vec![(cluster.global_key("tpm"), self.config.global_tpm as f64)];
        if let Some(t) = self.tier_buckets.get(&reservation.tier) {
            buckets.insert(
                0,
                (
                    cluster.tier_key(&reservation.tier, "tpm"),
                    t.tpm.lock().capacity,
                ),
            );
        }
        ending.refund(cluster, buckets, diff);
    }

    fn user_rpm(&self, user: &str, tier: &Tier) -> u32 {
        self.config
            .user_rpm
            .get(user)
            .copied()
            .unwrap_or(tier.config.user_rpm)
    }

    /// The completion tokens to reserve for a request that asked for `max_tokens`.
    pub fn completion_reservation(&self, max_tokens: Option<u64>) -> u64 {
        max_tokens.unwrap_or(self.config.default_max_tokens)
    }

    fn user_bucket(&self, user: &Arc<str>, tier: &Tier) -> Arc<Mutex<Bucket>> {
        if let Some(b) = self.users.get(user) {
            return b.clone();
        }
        let rpm = self.user_rpm(user, tier);
        self.users
            .entry(user.clone())
            .or_insert_with(|| Arc::new(Mutex::new(Bucket::per_minute(rpm.into(), Instant::now()))))
            .clone()
    }

    /// Admits one request reserving `tokens`, or says which limit refused it and for how long.
    /// Charges all five buckets or none.
    pub fn try_acquire(
        &self,
        user: &Arc<str>,
        tier: &Tier,
        tokens: u64,
    ) -> Result<Reservation, Limited> {
        self.prune_users();
        self.assess(user, tier, tokens, true)?;
        Ok(Reservation {
            tier: tier.name.clone(),
            tokens,
            shared: false,
        })
    }

    /// Whether [`RateLimiter::try_acquire`] would admit the request now, charging nothing: the
    /// cheap check made before a request costs anything (a `Stream`, counting its prompt).
    ///
    /// In cluster mode only a request larger than a limit itself is refused here: the
    /// in-process buckets hold only what was charged while Redis was down, so they would refuse
    /// requests the shared buckets admit.
    pub fn check(&self, user: &Arc<str>, tier: &Tier, tokens: u64) -> Result<(), Limited> {
        if self.cluster.is_none() {
            return self.assess(user, tier, tokens, false);
        }
        let never = |kind| {
            Err(Limited {
                kind,
                retry_after: None,
            })
        };
        if tokens > tier.config.tpm {
            return never(LimitKind::TierTpm);
        }
        if tokens > self.config.global_tpm {
            return never(LimitKind::GlobalTpm);
        }
        Ok(())
    }

    fn assess(
        &self,
        user: &Arc<str>,
        tier: &Tier,
        tokens: u64,
        charge: bool,
    ) -> Result<(), Limited> {
        let Some(tier_buckets) = self.tier_buckets.get(&tier.name) else {
            // Tiers are resolved from the same configuration as the buckets, so this is
            // unreachable in practice; refuse rather than admit unmetered traffic.
            return Err(Limited {
                kind: LimitKind::TierRpm,
                retry_after: None,
            });
        };
        let user_bucket = self.user_bucket(user, tier);
        let now = Instant::now();
        // Always the same lock order: user, tier, global.
        let mut guards: [(LimitKind, MutexGuard<'_, Bucket>, f64); 5] = [
            (LimitKind::UserRpm, user_bucket.lock(), 1.0),
            (LimitKind::TierRpm, tier_buckets.rpm.lock(), 1.0),
            (LimitKind::TierTpm, tier_buckets.tpm.lock(), tokens as f64),
            (LimitKind::GlobalRpm, self.global_rpm.lock(), 1.0),
            (LimitKind::GlobalTpm, self.global_tpm.lock(), tokens as f64),
        ];
        let mut worst: Option<Limited> = None;
        for (kind, bucket, n) in guards.iter_mut() {
            bucket.refill(now);
            let wait = bucket.wait_for(*n);
            let limited = match wait {
                Some(d) if d.is_zero() => continue,
                other => Limited {
                    kind: *kind,
                    retry_after: other,
                },
            };
            let worse = match (&worst, limited.retry_after) {
                (None, _) => true,
                (Some(w), None) => w.retry_after.is_some(),
                (Some(w), Some(d)) => w.retry_after.is_some_and(|wd| d > wd),
            };
            if worse {
                worst = Some(limited);
            }
        }
        if let Some(limited) = worst {
            return Err(limited);
        }
        if charge {
            for (_, bucket, n) in guards.iter_mut() {
                bucket.take(*n);
            }
        }
        Ok(())
    }

    /// Drops the buckets of users whose bucket has refilled, at most once per [`PRUNE_EVERY`].
    fn prune_users(&self) {
        let now = Instant::now();
        {
            let mut pruned_at = self.pruned_at.lock();
            if now.saturating_duration_since(*pruned_at) < PRUNE_EVERY {
                return;
            }
            *pruned_at = now;
        }
        self.users.retain(|_, bucket| {
            // A bucket another request holds right now may be about to be charged: keep it.
            if Arc::strong_count(bucket) > 1 {
                return true;
            }
            let mut b = bucket.lock();
            b.available(now) < b.capacity
        });
    }

    /// Users with a request bucket.
    #[cfg(test)]
    pub fn tracked_users(&self) -> usize {
        self.users.len()
    }

    /// Settles a reservation against the tokens really used: the difference goes back to (or
    /// is charged to) the token buckets.
    pub fn reconcile(&self, reservation: &Reservation, used: u64) {
        let diff = reservation.tokens as f64 - used as f64;
        if diff == 0.0 {
            return;
        }
        let now = Instant::now();
        if let Some(t) = self.tier_buckets.get(&reservation.tier) {
            t.tpm.lock().adjust(diff, now);
        }
        self.global_tpm.lock().adjust(diff, now);
    }

    /// Tokens left in a tier's tokens-per-minute bucket (for tests).
    pub fn tier_tokens_available(&self, tier: &str) -> Option<f64> {
        self.tier_buckets
            .get(tier)
            .map(|t| t.tpm.lock().available(Instant::now()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tiers::default_tiers;

    /// A limiter whose free tier has these limits, and that tier.
    fn limiter(user_rpm: u32, rpm: u32, tpm: u64) -> (RateLimiter, Arc<Tier>) {
        let mut configs = default_tiers();
        let free = configs.get_mut("free").expect("free");
        free.user_rpm = user_rpm;
        free.rpm = rpm;
        free.tpm = tpm;
        let tiers = Tiers::new(&configs, 32);
        let free = tiers.get("free").expect("free");
        (RateLimiter::new(LimitsConfig::default(), &tiers), free)
    }

    fn tier(name: &str) -> Arc<Tier> {
        Tiers::new(&default_tiers(), 32).get(name).expect("tier")
    }

    #[tokio::test(start_paused = true)]
    async fn exact_user_rpm_count_and_accurate_retry_after() {
        let (l, free) = limiter(3, 1000, 1_000_000);
        let alice: Arc<str> = "alice".into();
        for _ in 0..3 {
            l.try_acquire(&alice, &free, 10).expect("within the limit");
        }
        let refused = l.try_acquire(&alice, &free, 10).expect_err("4th refused");
        assert_eq!(refused.kind, LimitKind::UserRpm);
        assert_eq!(
            refused.retry_after,
            Some(Duration::from_secs(20)),
            "3 per minute: one every 20 s"
        );
        // Another user is not affected.
        l.try_acquire(&"bob".into(), &free, 10).expect("bob");
        tokio::time::advance(Duration::from_millis(19_900)).await;
        assert!(l.try_acquire(&alice, &free, 10).is_err(), "not yet");
        tokio::time::advance(Duration::from_millis(100)).await;
        l.try_acquire(&alice, &free, 10)
            .expect("retry_after was honest");
    }

    #[tokio::test(start_paused = true)]
    async fn retry_after_is_never_short_of_the_refill() {
        // 120 a minute: one every 500 ms. Refused 0.4 ms before the refill, the client reads
        // whole milliseconds: 1, not 0 (which would send it back to be refused again).
        let (l, free) = limiter(120, 10_000, 1_000_000);
        let alice: Arc<str> = "alice".into();
        for _ in 0..120 {
            l.try_acquire(&alice, &free, 1).expect("within the limit");
        }
        tokio::time::advance(Duration::from_micros(499_600)).await;
        let refused = l
            .try_acquire(&alice, &free, 1)
            .expect_err("not refilled yet");
        assert_eq!(refused.retry_after, Some(Duration::from_millis(1)));
        assert!(
            refused.message().contains("retry in 1 ms"),
            "{}",
            refused.message()
        );
        tokio::time::advance(Duration::from_millis(1)).await;
        l.try_acquire(&alice, &free, 1)
            .expect("retry_after was honest");
    }

    #[tokio::test(start_paused = true)]
    async fn refusal_takes_nothing() {
        let (l, free) = limiter(100, 100, 1000);
        let alice: Arc<str> = "alice".into();
        l.try_acquire(&alice, &free, 900).expect("first");
        let refused = l.try_acquire(&alice, &free, 200).expect_err("tpm");
        assert_eq!(refused.kind, LimitKind::TierTpm);
        // 100 tokens short at 1000/60 per second: 6 s.
        assert_eq!(refused.retry_after, Some(Duration::from_secs(6)));
        // The refused request did not consume a request slot: 99 more fit.
        for _ in 0..99 {
            l.try_acquire(&alice, &free, 1)
                .expect("request slots intact");
        }
        let over = l
            .try_acquire(&alice, &free, 1)
            .expect_err("100 requests used");
        assert_eq!(over.kind, LimitKind::UserRpm);
        let never = l
            .try_acquire(&"bob".into(), &free, 5000)
            .expect_err("too big");
        assert_eq!(never.retry_after, None);
        assert!(never.message().contains("lower max_tokens"));
    }

    #[tokio::test(start_paused = true)]
    async fn unused_reservation_comes_back_and_overuse_is_charged() {
        let (l, free) = limiter(100, 100, 1000);
        let alice: Arc<str> = "alice".into();
        let r = l.try_acquire(&alice, &free, 800).expect("reserve");
        assert_eq!(l.tier_tokens_available("free"), Some(200.0));
        assert!(l.try_acquire(&alice, &free, 500).is_err());
        l.reconcile(&r, 50);
        assert_eq!(l.tier_tokens_available("free"), Some(950.0));
        let r = l.try_acquire(&alice, &free, 500).expect("room again");
        l.reconcile(&r, 900);
        assert_eq!(l.tier_tokens_available("free"), Some(50.0));
    }

    #[tokio::test(start_paused = true)]
    async fn global_cap_spans_tiers() {
        let config = LimitsConfig {
            global_rpm: 2,
            ..LimitsConfig::default()
        };
        let l = RateLimiter::new(config, &Tiers::new(&default_tiers(), 32));
        l.try_acquire(&"a".into(), &tier("free"), 1).expect("1");
        l.try_acquire(&"b".into(), &tier("pro"), 1).expect("2");
        let refused = l
            .try_acquire(&"c".into(), &tier("enterprise"), 1)
            .expect_err("global");
        assert_eq!(refused.kind, LimitKind::GlobalRpm);
        assert_eq!(refused.retry_after, Some(Duration::from_secs(30)));
    }

    #[tokio::test(start_paused = true)]
    async fn check_charges_nothing_and_idle_users_are_pruned() {
        let (l, free) = limiter(2, 1000, 1_000_000);
        let alice: Arc<str> = "alice".into();
        for _ in 0..5 {
            l.check(&alice, &free, 10).expect("a check takes nothing");
        }
        l.try_acquire(&alice, &free, 10).expect("1");
        l.try_acquire(&alice, &free, 10).expect("2");
        assert_eq!(
            l.check(&alice, &free, 10).expect_err("over").kind,
            LimitKind::UserRpm
        );
        for i in 0..100 {
            l.try_acquire(&format!("user{i}").into(), &free, 1)
                .expect("others");
        }
        assert_eq!(l.tracked_users(), 101);
        // A minute later every bucket has refilled: the next request sweeps them all but its
        // own.
        tokio::time::advance(Duration::from_secs(61)).await;
        l.try_acquire(&"late".into(), &free, 1).expect("late");
        assert_eq!(l.tracked_users(), 1, "only the user just seen is kept");
        // A pruned user starts again from a full bucket, as if never seen.
        l.try_acquire(&alice, &free, 10).expect("alice again");
        l.try_acquire(&alice, &free, 10).expect("alice again");
        assert!(l.try_acquire(&alice, &free, 10).is_err());
    }

    #[tokio::test(start_paused = true)]
    async fn user_override_wins() {
        let mut config = LimitsConfig::default();
        config.user_rpm.insert("vip".into(), 1);
        let l = RateLimiter::new(config, &Tiers::new(&default_tiers(), 32));
        let vip: Arc<str> = "vip".into();
        l.try_acquire(&vip, &tier("enterprise"), 1).expect("1");
        assert_eq!(
            l.try_acquire(&vip, &tier("enterprise"), 1)
                .expect_err("override")
                .kind,
            LimitKind::UserRpm
        );
    }
}
