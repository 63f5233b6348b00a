//! Tiers: what each plan may do (queue priority, rate limits, live streams, connections).
//!
//! A connection's tier is resolved once, when its `hello` is accepted, into an [`Arc<Tier>`]
//! with the process defaults filled in; the connection and each of its streams carry it, so no
//! later step looks a tier up by name or decides its defaults again.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;

/// What one tier may do. The defaults are the seed article's plans.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TierConfig {
    /// Scheduling priority; higher is served first. Defaults: free 0, pro 1, enterprise 2.
    #[serde(default)]
    pub priority: u32,
    /// Requests per minute per user of this tier (a user override wins).
    pub user_rpm: u32,
    /// Requests per minute for the whole tier.
    pub rpm: u32,
    /// Tokens (prompt + completion) per minute for the whole tier.
    pub tpm: u64,
    /// `reject` answers `rate_limited` at once with `retry_after_ms`; `wait` holds the stream
    /// up to `max_wait_ms` first. Default `reject`.
    #[serde(default)]
    pub on_limit: OnLimit,
    /// Longest wait under `on_limit = "wait"`. Default 0.
    #[serde(default)]
    pub max_wait_ms: u64,
    /// Live streams per user; default `session.max_streams`.
    #[serde(default)]
    pub max_streams: Option<usize>,
    /// Simultaneous WebSocket connections per user. Default 16.
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
}

fn default_max_connections() -> usize {
    16
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnLimit {
    #[default]
    Reject,
    Wait,
}

/// The seed's tiers: free 60 rpm / 50k tpm, pro 500 / 500k, enterprise 5000 / 5M (whole
/// tier), with per-user limits of 60, 120 and 600 requests per minute. Free users are refused
/// at once; pro and enterprise wait up to 5 s, as the seed's client does.
pub fn default_tiers() -> BTreeMap<String, TierConfig> {
    let tier = |priority, user_rpm, rpm, tpm, on_limit, max_wait_ms| TierConfig {
        priority,
        user_rpm,
        rpm,
        tpm,
        on_limit,
        max_wait_ms,
        max_streams: None,
        max_connections: default_max_connections(),
    };
    BTreeMap::from([
        (
            "free".to_string(),
            tier(0, 60, 60, 50_000, OnLimit::Reject, 0),
        ),
        (
            "pro".to_string(),
            tier(1, 120, 500, 500_000, OnLimit::Wait, 5_000),
        ),
        (
            "enterprise".to_string(),
            tier(2, 600, 5_000, 5_000_000, OnLimit::Wait, 5_000),
        ),
    ])
}

/// One tier, resolved: its name, its settings, and the defaults that depend on the rest of
/// the configuration.
#[derive(Debug, PartialEq)]
pub struct Tier {
    /// The name tokens carry in `tier`; the label of the tier's metrics and budgets.
    pub name: Arc<str>,
    pub config: TierConfig,
    /// Live streams per user: the tier's `max_streams`, else `session.max_streams`.
    pub max_streams: usize,
}

impl Tier {
    /// Scheduling priority in the upstream queue.
    pub fn priority(&self) -> u32 {
        self.config.priority
    }

    /// Simultaneous connections per user.
    pub fn max_connections(&self) -> usize {
        self.config.max_connections
    }

    /// The longest a stream waits for its rate limits in all (see [`Tier::waits_for`]); `None`
    /// when it never waits.
    pub fn max_wait(&self) -> Option<Duration> {
        (self.config.on_limit == OnLimit::Wait)
            .then(|| Duration::from_millis(self.config.max_wait_ms))
    }

    /// Whether a stream refused by a rate limit for `retry_after` (`None`: never passes) waits
    /// for it rather than being refused: only under `on_limit = "wait"`, and only when the
    /// stream's whole wait (`waited` so far, plus this one) stays within `max_wait_ms`.
    pub fn waits_for(&self, retry_after: Option<Duration>, waited: Duration) -> bool {
        retry_after.is_some_and(|d| {
            self.config.on_limit == OnLimit::Wait
                && waited.saturating_add(d) <= Duration::from_millis(self.config.max_wait_ms)
        })
    }
}

/// Every configured tier by name, resolved once at start.
#[derive(Debug)]
pub struct Tiers {
    by_name: BTreeMap<String, Arc<Tier>>,
}

impl Tiers {
    /// Resolves `configs`; a tier without `max_streams` gets `default_max_streams`.
    pub fn new(configs: &BTreeMap<String, TierConfig>, default_max_streams: usize) -> Tiers {
        let by_name = configs
            .iter()
            .map(|(name, config)| {
                let tier = Tier {
                    name: Arc::from(name.as_str()),
                    max_streams: config.max_streams.unwrap_or(default_max_streams),
                    config: config.clone(),
                };
                (name.clone(), Arc::new(tier))
            })
            .collect();
        Tiers { by_name }
    }

    /// The tier a token names; `None` for a name the configuration does not have.
    pub fn get(&self, name: &str) -> Option<Arc<Tier>> {
        self.by_name.get(name).cloned()
    }

    /// Every tier, in name order.
    pub fn iter(&self) -> impl Iterator<Item = &Arc<Tier>> {
        self.by_name.values()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolution_fills_the_session_default() {
        let mut configs = default_tiers();
        configs.get_mut("pro").expect("pro").max_streams = Some(7);
        let tiers = Tiers::new(&configs, 32);
        let pro = tiers.get("pro").expect("pro");
        assert_eq!(&*pro.name, "pro");
        assert_eq!(pro.max_streams, 7, "the tier's own cap wins");
        assert_eq!(pro.priority(), 1);
        let free = tiers.get("free").expect("free");
        assert_eq!(free.max_streams, 32, "else session.max_streams");
        assert_eq!(free.max_connections(), 16);
        assert!(tiers.get("gold").is_none());
        let names: Vec<&str> = tiers.iter().map(|t| &*t.name).collect();
        assert_eq!(names, ["enterprise", "free", "pro"]);
    }

    #[test]
    fn only_a_waiting_tier_waits_and_only_within_its_bound() {
        let tiers = Tiers::new(&default_tiers(), 32);
        let free = tiers.get("free").expect("free");
        let pro = tiers.get("pro").expect("pro");
        let s = Duration::from_secs;
        assert!(!free.waits_for(Some(s(1)), Duration::ZERO), "free rejects");
        assert!(
            pro.waits_for(Some(s(5)), Duration::ZERO),
            "5 s is within 5 s"
        );
        assert!(!pro.waits_for(Some(s(5)), Duration::from_millis(1)));
        assert!(pro.waits_for(Some(s(2)), s(3)), "the wait so far counts");
        assert!(
            !pro.waits_for(None, Duration::ZERO),
            "never passes: no wait"
        );
    }
}
