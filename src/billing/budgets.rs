//! Daily spend budgets per user and per tier, in USD per UTC day.
//!
//! In cluster mode ([`Budgets::shared`]) the spend that decides is the one in Redis, added to
//! by every instance; each instance still keeps its own, which decides when Redis fails under
//! `on_redis_error = "fail_open"`.
//!
//! Budgets are checked before a stream reaches the upstream and charged when it ends, so a
//! stream that starts under the limit may finish over it; the next one is refused.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use dashmap::DashMap;
use serde::{Deserialize, Serialize};

use crate::cluster::{Cluster, Ending, Unavailable};

/// Daily spend limits, in USD per UTC day. Every field is optional; with none set nothing is
/// refused, but spend is still tracked for the admin view.
///
/// ```toml
/// [budgets]
/// per_user_usd_per_day = 5.0
/// per_tier_usd_per_day = { free = 20.0, pro = 500.0 }
/// user_overrides = { "alice" = 50.0 }
/// ```
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BudgetConfig {
    /// Limit for each user (by token `sub`). Default: none, users are not limited.
    pub per_user_usd_per_day: Option<f64>,
    /// Limit for all users of a tier together, by tier name. Default: empty, tiers are not
    /// limited.
    pub per_tier_usd_per_day: BTreeMap<String, f64>,
    /// Per-user limits that replace `per_user_usd_per_day` for those users (higher or lower),
    /// and apply even when it is unset. Default: empty.
    pub user_overrides: BTreeMap<String, f64>,
}

impl BudgetConfig {
    /// Every limit must be a finite number of USD, at least 0 (0 refuses everything).
    pub fn validate(&self) -> Result<(), BudgetConfigError> {
        let check = |key: String, value: f64| {
            if value.is_finite() && value >= 0.0 {
                Ok(())
            } else {
                Err(BudgetConfigError { key, value })
            }
        };
        if let Some(v) = self.per_user_usd_per_day {
            check("per_user_usd_per_day".into(), v)?;
        }
        for (tier, v) in &self.per_tier_usd_per_day {
            check(format!("per_tier_usd_per_day.{tier}"), *v)?;
        }
        for (user, v) in &self.user_overrides {
            check(format!("user_overrides.{user}"), *v)?;
        }
        Ok(())
    }

    /// `user`'s own daily limit: the override, else the per-user default.
    pub fn user_limit(&self, user: &str) -> Option<f64> {
        self.user_overrides
            .get(user)
            .copied()
            .or(self.per_user_usd_per_day)
    }

    /// The daily limit shared by all users of `tier`.
    pub fn tier_limit(&self, tier: &str) -> Option<f64> {
        self.per_tier_usd_per_day.get(tier).copied()
    }
}

/// A budget limit that is not a finite, non-negative number.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("budget `{key}` must be a finite number of USD, at least 0; got {value}")]
pub struct BudgetConfigError {
    /// The key under the budgets table, e.g. `per_tier_usd_per_day.free`.
    pub key: String,
    pub value: f64,
}

/// Which budget refused a stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BudgetScope {
    /// The user's own daily budget.
    User,
    /// The daily budget shared by the user's tier.
    Tier(String),
}

/// A stream refused because a daily budget is used up. Its `Display` is the message of the
/// client's `budget_exceeded` error frame: it names the budget and its limit, never another
/// user's spend.
#[derive(Debug, Clone, PartialEq)]
pub struct BudgetError {
    pub scope: BudgetScope,
    /// The limit, USD per UTC day.
    pub limit_usd: f64,
    /// Spent today by the user or the tier when the stream was refused.
    pub spent_usd: f64,
    /// Until the budget resets at 00:00 UTC: the frame's `retry_after_ms`.
    pub retry_after: Duration,
}

impl fmt::Display for BudgetError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let limit = Usd(self.limit_usd);
        match &self.scope {
            BudgetScope::User => write!(f, "daily budget of {limit} for this user is used up"),
            BudgetScope::Tier(tier) => {
                write!(f, "daily budget of {limit} for tier \"{tier}\" is used up")
            }
        }?;
        f.write_str("; it resets at 00:00 UTC")
    }
}

impl std::error::Error for BudgetError {}

/// Why [`Budgets::admits`] refused a stream.
#[derive(Debug, Clone, PartialEq)]
pub enum BudgetRefused {
    Over(BudgetError),
    /// Cluster mode, Redis unavailable, `fail_closed`.
    Unavailable(Unavailable),
}

/// Dollars with cents, or more digits below a cent so a tiny limit does not print as $0.00.
struct Usd(f64);

impl fmt::Display for Usd {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0 == 0.0 || self.0 >= 0.01 {
            write!(f, "${:.2}", self.0)
        } else {
            write!(f, "${}", self.0)
        }
    }
}

/// Where [`Budgets`] reads the time, so tests can move it across midnight.
pub trait Clock: Send + Sync + fmt::Debug {
    fn now(&self) -> SystemTime;
}

/// The system's wall clock: budgets follow the calendar, not a monotonic clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> SystemTime {
        SystemTime::now()
    }
}

const SECS_PER_DAY: u64 = 86_400;

/// Spend is kept in nano-dollars so that adding many small costs is exact and a budget refuses at
/// exactly its limit; one nano-dollar is far below any token's price.
const NANOS_PER_USD: f64 = 1e9;

fn to_nanos(usd: f64) -> u64 {
    // `as` saturates: a huge limit becomes u64::MAX nano-dollars, which is never reached.
    (usd * NANOS_PER_USD).round() as u64
}

fn to_usd(nanos: u64) -> f64 {
    nanos as f64 / NANOS_PER_USD
}

/// Seconds since the Unix epoch (UTC, no leap seconds), 0 for a clock set before 1970.
fn since_epoch(now: SystemTime) -> Duration {
    now.duration_since(UNIX_EPOCH).unwrap_or_default()
}

fn utc_day(now: SystemTime) -> u64 {
    since_epoch(now).as_secs() / SECS_PER_DAY
}

fn until_midnight(now: SystemTime) -> Duration {
    let since = since_epoch(now);
    let next = (since.as_secs() / SECS_PER_DAY + 1) * SECS_PER_DAY;
    Duration::from_secs(next).saturating_sub(since)
}

/// `YYYY-MM-DD` of a day number since the epoch (Howard Hinnant's `civil_from_days`).
fn civil_date(day: u64) -> String {
    let z = day as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02}")
}

/// Spend of one user or tier on one UTC day.
#[derive(Debug, Clone, Copy, Default)]
struct DaySpend {
    day: u64,
    nanos: u64,
}

impl DaySpend {
    fn on(&self, day: u64) -> u64 {
        // A clock stepped back a little must not forget today's spend.
        if self.day >= day {
            self.nanos
        } else {
            0
        }
    }

    fn add(&mut self, day: u64, nanos: u64) {
        if day > self.day {
            *self = DaySpend { day, nanos: 0 };
        }
        self.nanos = self.nanos.saturating_add(nanos);
    }
}

/// Spend today, for the admin view.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SpendSnapshot {
    /// The UTC day, `YYYY-MM-DD`.
    pub day: String,
    /// USD spent today per user that spent anything.
    pub users: BTreeMap<String, f64>,
    /// USD spent today per tier.
    pub tiers: BTreeMap<String, f64>,
}

/// Daily spend per user and per tier, and the limits on it. One per process, shared in an
/// `Arc`; every method takes `&self`. Entries are sharded maps, so users do not contend on one
/// lock; yesterday's entries are dropped on the first charge of a new day.
#[derive(Debug)]
pub struct Budgets {
    config: BudgetConfig,
    clock: Arc<dyn Clock>,
    users: DashMap<String, DaySpend>,
    tiers: DashMap<String, DaySpend>,
    /// The last day whose stale entries were dropped, so that happens once a day.
    pruned_day: AtomicU64,
    /// Cluster mode: the spend that decides is in Redis.
    cluster: Option<Arc<Cluster>>,
}

impl Budgets {
    /// Budgets on the system clock. The config should have passed [`BudgetConfig::validate`]; a
    /// NaN limit would otherwise never refuse.
    pub fn new(config: BudgetConfig) -> Budgets {
        Budgets::with_clock(config, Arc::new(SystemClock))
    }

    /// Budgets on `clock`, for tests.
    pub fn with_clock(config: BudgetConfig, clock: Arc<dyn Clock>) -> Budgets {
        let today = utc_day(clock.now());
        Budgets {
            config,
            clock,
            users: DashMap::new(),
            tiers: DashMap::new(),
            pruned_day: AtomicU64::new(today),
            cluster: None,
        }
    }

    /// Cluster mode: spend is added to and read from Redis through `cluster`.
    pub fn shared(mut self, cluster: Arc<Cluster>) -> Self {
        self.cluster = Some(cluster);
        self
    }

    /// [`Budgets::check`] against the spend of every instance (cluster mode; else this
    /// process's). When Redis fails: this instance's spend under `fail_open`, refused under
    /// `fail_closed`.
    pub async fn admits(&self, user: &str, tier: &str) -> Result<(), BudgetRefused> {
        let (Some(cluster), Some(keys)) = (&self.cluster, self.shared_keys(user, tier)) else {
            return self.check(user, tier).map_err(BudgetRefused::Over);
        };
        match cluster.counters(&keys).await {
            Ok(spent) => self
                .judge_shared(user, tier, &spent)
                .map_err(BudgetRefused::Over),
            Err(_) if cluster.fails_open() => {
                cluster.fell_back("budget");
                self.check(user, tier).map_err(BudgetRefused::Over)
            }
            Err(unavailable) => Err(BudgetRefused::Unavailable(unavailable)),
        }
    }

    /// Cluster mode: the counters of today's spend (`user`'s, then `tier`'s) in Redis, for a
    /// read made in one call with others (a stream's open). `None` in one process.
    pub fn shared_keys(&self, user: &str, tier: &str) -> Option<Vec<String>> {
        let cluster = self.cluster.as_ref()?;
        let day = utc_day(self.clock.now());
        Some(vec![
            cluster.user_key(user, &format!("spend:{day}")),
            cluster.tier_key(tier, &format!("spend:{day}")),
        ])
    }

    /// The limits (nano-USD) of the counters of [`Budgets::shared_keys`], in their order, for
    /// a stream's open decided in Redis: one reached refuses it, as [`Budgets::judge_shared`]
    /// does on the same values. `None`: no limit.
    pub fn shared_limits(&self, user: &str, tier: &str) -> [Option<u64>; 2] {
        [
            self.config.user_limit(user).map(to_nanos),
            self.config.tier_limit(tier).map(to_nanos),
        ]
    }

    /// [`Budgets::check`] on the values read from [`Budgets::shared_keys`].
    pub fn judge_shared(&self, user: &str, tier: &str, spent: &[u64]) -> Result<(), BudgetError> {
        let spent = |i: usize| spent.get(i).copied().unwrap_or(0);
        self.judge(user, tier, spent(0), spent(1), self.clock.now())
    }

    /// [`Budgets::record`], and in cluster mode the same charge added in Redis as part of the
    /// stream's `ending` (one round trip with the rest; a charge Redis misses is logged and
    /// counted there, and stays in this instance's own spend).
    pub fn charge(&self, user: &str, tier: &str, usd: f64, ending: &mut Ending) {
        self.record(user, tier, usd);
        let Some(cluster) = &self.cluster else { return };
        if !(usd.is_finite() && usd > 0.0) {
            return;
        }
        let day = utc_day(self.clock.now());
        let keys = vec![
            cluster.user_key(user, &format!("spend:{day}")),
            cluster.tier_key(tier, &format!("spend:{day}")),
        ];
        // Two days: the day's key outlives its day whatever the instances' clocks say.
        let ttl = Duration::from_secs(2 * SECS_PER_DAY);
        ending.spend(cluster, keys, to_nanos(usd), ttl);
    }

    /// Whether `user` of `tier` may start a stream: refused once today's spend has reached the
    /// user's limit, or the tier's (checked in that order). Call it before the stream is queued
    /// or reaches an upstream.
    pub fn check(&self, user: &str, tier: &str) -> Result<(), BudgetError> {
        let now = self.clock.now();
        let day = utc_day(now);
        let spent =
            |map: &DashMap<String, DaySpend>, key: &str| map.get(key).map_or(0, |s| s.on(day));
        self.judge(
            user,
            tier,
            spent(&self.users, user),
            spent(&self.tiers, tier),
            now,
        )
    }

    /// Refuses once `user_spent` (nano-dollars today) reached the user's limit, or
    /// `tier_spent` the tier's, in that order.
    fn judge(
        &self,
        user: &str,
        tier: &str,
        user_spent: u64,
        tier_spent: u64,
        now: SystemTime,
    ) -> Result<(), BudgetError> {
        let over = |spent: u64, limit: f64| (spent >= to_nanos(limit)).then_some(to_usd(spent));
        if let Some(limit) = self.config.user_limit(user) {
            if let Some(spent_usd) = over(user_spent, limit) {
                return Err(BudgetError {
                    scope: BudgetScope::User,
                    limit_usd: limit,
                    spent_usd,
                    retry_after: until_midnight(now),
                });
            }
        }
        if let Some(limit) = self.config.tier_limit(tier) {
            if let Some(spent_usd) = over(tier_spent, limit) {
                return Err(BudgetError {
                    scope: BudgetScope::Tier(tier.to_owned()),
                    limit_usd: limit,
                    spent_usd,
                    retry_after: until_midnight(now),
                });
            }
        }
        Ok(())
    }

    /// Charges `usd` to `user` and to `tier` for today. Call it once per stream when it ends,
    /// cancelled or cut ones included. Zero, negative and non-finite amounts are ignored.
    pub fn record(&self, user: &str, tier: &str, usd: f64) {
        if !(usd.is_finite() && usd > 0.0) {
            return;
        }
        let day = utc_day(self.clock.now());
        self.prune(day);
        let nanos = to_nanos(usd);
        for (map, key) in [(&self.users, user), (&self.tiers, tier)] {
            // `get_mut` first: only a user's first charge of the process allocates its key.
            if let Some(mut spend) = map.get_mut(key) {
                spend.add(day, nanos);
                continue;
            }
            map.entry(key.to_owned()).or_default().add(day, nanos);
        }
    }

    /// USD `user` has spent today.
    pub fn user_spent_today(&self, user: &str) -> f64 {
        let day = utc_day(self.clock.now());
        to_usd(self.users.get(user).map_or(0, |s| s.on(day)))
    }

    /// USD `user` has spent today on every instance (cluster mode; else this process's), for
    /// the admin view. `Err` when Redis does not answer.
    pub async fn user_spent_today_everywhere(&self, user: &str) -> Result<f64, Unavailable> {
        let Some(cluster) = &self.cluster else {
            return Ok(self.user_spent_today(user));
        };
        let day = utc_day(self.clock.now());
        let spent = cluster
            .counters(&[cluster.user_key(user, &format!("spend:{day}"))])
            .await?;
        Ok(to_usd(spent[0]))
    }

    /// USD the users of `tier` have spent today on every instance (cluster mode; else this
    /// process's), for the admin view.
    pub async fn tier_spent_today_everywhere(&self, tier: &str) -> Result<f64, Unavailable> {
        let Some(cluster) = &self.cluster else {
            return Ok(self.snapshot().tiers.get(tier).copied().unwrap_or(0.0));
        };
        let day = utc_day(self.clock.now());
        let spent = cluster
            .counters(&[cluster.tier_key(tier, &format!("spend:{day}"))])
            .await?;
        Ok(to_usd(spent[0]))
    }

    /// USD the users of `tier` have spent today.
    #[cfg(test)]
    pub fn tier_spent_today(&self, tier: &str) -> f64 {
        let day = utc_day(self.clock.now());
        to_usd(self.tiers.get(tier).map_or(0, |s| s.on(day)))
    }

    /// Today's spend of every user and tier that spent anything, for the admin view.
    pub fn snapshot(&self) -> SpendSnapshot {
        let day = utc_day(self.clock.now());
        let collect = |map: &DashMap<String, DaySpend>| {
            map.iter()
                .filter(|e| e.value().on(day) > 0)
                .map(|e| (e.key().clone(), to_usd(e.value().on(day))))
                .collect()
        };
        SpendSnapshot {
            day: civil_date(day),
            users: collect(&self.users),
            tiers: collect(&self.tiers),
        }
    }

    /// Drops entries older than `day`, once per day, so the maps hold only users active today.
    fn prune(&self, day: u64) {
        if self.pruned_day.load(Ordering::Relaxed) >= day {
            return;
        }
        if self.pruned_day.fetch_max(day, Ordering::Relaxed) < day {
            self.users.retain(|_, s| s.day >= day);
            self.tiers.retain(|_, s| s.day >= day);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug)]
    struct ManualClock(AtomicU64);

    impl ManualClock {
        fn at(secs: u64) -> Arc<ManualClock> {
            Arc::new(ManualClock(AtomicU64::new(secs)))
        }
        fn set(&self, secs: u64) {
            self.0.store(secs, Ordering::Relaxed);
        }
    }

    impl Clock for ManualClock {
        fn now(&self) -> SystemTime {
            UNIX_EPOCH + Duration::from_secs(self.0.load(Ordering::Relaxed))
        }
    }

    /// 2025-06-01T00:00:00Z.
    const JUNE_1: u64 = 1_748_736_000;

    fn config(
        per_user: Option<f64>,
        tiers: &[(&str, f64)],
        overrides: &[(&str, f64)],
    ) -> BudgetConfig {
        BudgetConfig {
            per_user_usd_per_day: per_user,
            per_tier_usd_per_day: tiers.iter().map(|(k, v)| (k.to_string(), *v)).collect(),
            user_overrides: overrides.iter().map(|(k, v)| (k.to_string(), *v)).collect(),
        }
    }

    #[test]
    fn user_budget_refuses_at_exactly_the_limit() {
        let b = Budgets::with_clock(config(Some(1.0), &[], &[]), ManualClock::at(JUNE_1 + 3600));
        // Ten charges of 0.1 add up to exactly 1.0: a float sum would land just below it.
        for _ in 0..9 {
            b.record("alice", "free", 0.1);
            assert_eq!(b.check("alice", "free"), Ok(()));
        }
        b.record("alice", "free", 0.1);
        let err = b.check("alice", "free").expect_err("at the limit");
        assert_eq!(err.scope, BudgetScope::User);
        assert_eq!(err.limit_usd, 1.0);
        assert_eq!(err.spent_usd, 1.0);
        assert_eq!(err.retry_after, Duration::from_secs(23 * 3600));
        assert_eq!(
            err.to_string(),
            "daily budget of $1.00 for this user is used up; it resets at 00:00 UTC"
        );
        // Another user is not affected.
        assert_eq!(b.check("bob", "free"), Ok(()));
    }

    #[test]
    fn overrides_replace_the_default() {
        let b = Budgets::with_clock(
            config(Some(1.0), &[], &[("vip", 10.0), ("blocked", 0.0)]),
            ManualClock::at(JUNE_1),
        );
        b.record("vip", "pro", 5.0);
        assert_eq!(b.check("vip", "pro"), Ok(()));
        assert!(b.check("blocked", "pro").is_err());
        let only_override =
            Budgets::with_clock(config(None, &[], &[("bob", 0.5)]), ManualClock::at(JUNE_1));
        only_override.record("alice", "free", 100.0);
        assert_eq!(only_override.check("alice", "free"), Ok(()));
        only_override.record("bob", "free", 0.5);
        assert!(only_override.check("bob", "free").is_err());
    }

    #[test]
    fn tier_budget_is_shared() {
        let b = Budgets::with_clock(
            config(Some(5.0), &[("free", 2.0)], &[]),
            ManualClock::at(JUNE_1),
        );
        b.record("alice", "free", 1.25);
        assert_eq!(b.check("bob", "free"), Ok(()));
        b.record("bob", "free", 0.75);
        let err = b.check("carol", "free").expect_err("tier used up");
        assert_eq!(err.scope, BudgetScope::Tier("free".into()));
        assert_eq!(err.limit_usd, 2.0);
        assert_eq!(err.spent_usd, 2.0);
        assert_eq!(
            err.to_string(),
            "daily budget of $2.00 for tier \"free\" is used up; it resets at 00:00 UTC"
        );
        assert_eq!(b.check("carol", "pro"), Ok(()));
    }

    #[test]
    fn user_budget_is_checked_before_tier() {
        let b = Budgets::with_clock(
            config(Some(1.0), &[("free", 1.0)], &[]),
            ManualClock::at(JUNE_1),
        );
        b.record("alice", "free", 1.0);
        assert_eq!(
            b.check("alice", "free").map_err(|e| e.scope),
            Err(BudgetScope::User)
        );
    }

    #[test]
    fn budgets_reset_at_midnight_utc() {
        let clock = ManualClock::at(JUNE_1 + SECS_PER_DAY - 1);
        let b = Budgets::with_clock(config(Some(1.0), &[("free", 1.0)], &[]), clock.clone());
        b.record("alice", "free", 1.0);
        let err = b.check("alice", "free").expect_err("spent");
        assert_eq!(err.retry_after, Duration::from_secs(1));
        assert_eq!(b.snapshot().day, "2025-06-01");

        clock.set(JUNE_1 + SECS_PER_DAY);
        assert_eq!(b.check("alice", "free"), Ok(()));
        assert_eq!(b.user_spent_today("alice"), 0.0);
        assert_eq!(b.snapshot().users.len(), 0);

        b.record("alice", "free", 0.25);
        assert_eq!(b.user_spent_today("alice"), 0.25);
        assert_eq!(b.tier_spent_today("free"), 0.25);
        let snap = b.snapshot();
        assert_eq!(snap.day, "2025-06-02");
        assert_eq!(snap.users, BTreeMap::from([("alice".to_string(), 0.25)]));
    }

    #[test]
    fn stale_users_are_pruned_on_a_new_day() {
        let clock = ManualClock::at(JUNE_1);
        let b = Budgets::with_clock(BudgetConfig::default(), clock.clone());
        b.record("alice", "free", 0.1);
        b.record("bob", "pro", 0.1);
        clock.set(JUNE_1 + SECS_PER_DAY + 5);
        b.record("bob", "pro", 0.2);
        assert_eq!(b.users.len(), 1);
        assert_eq!(b.tiers.len(), 1);
        assert_eq!(b.user_spent_today("bob"), 0.2);
    }

    #[test]
    fn clock_stepping_back_keeps_todays_spend() {
        let clock = ManualClock::at(JUNE_1 + 10);
        let b = Budgets::with_clock(config(Some(1.0), &[], &[]), clock.clone());
        b.record("alice", "free", 1.0);
        clock.set(JUNE_1 - 10);
        assert!(b.check("alice", "free").is_err());
    }

    #[test]
    fn bad_amounts_are_ignored() {
        let b = Budgets::with_clock(BudgetConfig::default(), ManualClock::at(JUNE_1));
        b.record("alice", "free", -1.0);
        b.record("alice", "free", f64::NAN);
        b.record("alice", "free", f64::INFINITY);
        b.record("alice", "free", 0.0);
        assert_eq!(b.snapshot().users.len(), 0);
        assert_eq!(b.check("alice", "free"), Ok(()));
    }

    #[test]
    fn concurrent_charges_add_up_exactly() {
        let b = Arc::new(Budgets::with_clock(
            config(Some(8.0), &[], &[]),
            ManualClock::at(JUNE_1),
        ));
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let b = b.clone();
                std::thread::spawn(move || {
                    for _ in 0..1000 {
                        b.record("alice", "free", 0.002);
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().expect("thread");
        }
        assert_eq!(b.user_spent_today("alice"), 8.0);
        assert!(b.check("alice", "free").is_err());
    }

    #[test]
    fn config_is_strict_with_documented_defaults() {
        let c: BudgetConfig = toml::from_str("").expect("empty");
        assert_eq!(c, BudgetConfig::default());
        assert_eq!(c.per_user_usd_per_day, None);
        let c: BudgetConfig = toml::from_str(
            "per_user_usd_per_day = 5.0\nper_tier_usd_per_day = { free = 20.0 }\nuser_overrides = { alice = 50 }\n",
        )
        .expect("valid");
        assert_eq!(c.user_limit("alice"), Some(50.0));
        assert_eq!(c.user_limit("bob"), Some(5.0));
        assert_eq!(c.tier_limit("free"), Some(20.0));
        assert_eq!(c.tier_limit("pro"), None);
        assert_eq!(c.validate(), Ok(()));
        let err = toml::from_str::<BudgetConfig>("per_user_usd = 5.0").expect_err("unknown key");
        assert!(err.to_string().contains("per_user_usd"), "{err}");

        let bad = config(None, &[("free", -1.0)], &[]);
        assert_eq!(
            bad.validate(),
            Err(BudgetConfigError {
                key: "per_tier_usd_per_day.free".into(),
                value: -1.0
            })
        );
        assert!(config(Some(f64::NAN), &[], &[]).validate().is_err());
    }

    #[test]
    fn civil_dates() {
        assert_eq!(civil_date(0), "1970-01-01");
        assert_eq!(civil_date(JUNE_1 / SECS_PER_DAY), "2025-06-01");
        // 2024-02-29, a leap day, and the day after.
        assert_eq!(civil_date(19_782), "2024-02-29");
        assert_eq!(civil_date(19_783), "2024-03-01");
    }

    #[test]
    fn tiny_limits_print_their_digits() {
        assert_eq!(Usd(0.005).to_string(), "$0.005");
        assert_eq!(Usd(0.0).to_string(), "$0.00");
        assert_eq!(Usd(12.5).to_string(), "$12.50");
    }
}
