//! A circuit breaker per provider: after `failure_threshold` consecutive failed attempts the
//! provider is skipped (fail fast, or fall back) for `open_ms`; then up to `half_open_probes`
//! attempts probe it, and the first result closes or re-opens it.

use std::time::Duration;

use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use tokio::time::Instant;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BreakerConfig {
    /// Consecutive failed attempts (connect errors, 5xx, timeouts, broken streams) that open
    /// the circuit. 4xx and 429 answers do not count: the provider is up. Default 5.
    pub failure_threshold: u32,
    /// How long the circuit stays open before probing. Default 10000 ms.
    pub open_ms: u64,
    /// Attempts let through at once while half-open. Default 1.
    pub half_open_probes: u32,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        BreakerConfig {
            failure_threshold: 5,
            open_ms: 10_000,
            half_open_probes: 1,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum BreakerState {
    Closed,
    HalfOpen,
    Open,
}

impl BreakerState {
    /// The gauge value: 0 closed, 1 half-open, 2 open.
    pub fn as_gauge(self) -> i64 {
        match self {
            BreakerState::Closed => 0,
            BreakerState::HalfOpen => 1,
            BreakerState::Open => 2,
        }
    }
}

/// How an attempt that was let through went, as far as the provider's health goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Health {
    Success,
    Failure,
    /// Says nothing about the provider (a client error, a cancel).
    Neutral,
}

struct Inner {
    state: BreakerState,
    failures: u32,
    open_until: Instant,
    probes: u32,
}

pub struct Breaker {
    config: BreakerConfig,
    inner: Mutex<Inner>,
}

impl Breaker {
    pub fn new(config: BreakerConfig) -> Self {
        Breaker {
            config,
            inner: Mutex::new(Inner {
                state: BreakerState::Closed,
                failures: 0,
                open_until: Instant::now(),
                probes: 0,
            }),
        }
    }

    /// Lets an attempt through, or says how long until the circuit may be probed.
    pub fn try_pass(&self) -> Result<(), Duration> {
        let mut b = self.inner.lock();
        let now = Instant::now();
        if b.state == BreakerState::Open {
            if now < b.open_until {
                return Err(b.open_until - now);
            }
            b.state = BreakerState::HalfOpen;
            b.probes = 0;
        }
        if b.state == BreakerState::HalfOpen {
            if b.probes >= self.config.half_open_probes {
                return Err(Duration::from_millis(100));
            }
            b.probes += 1;
        }
        Ok(())
    }

    /// Records the result of an attempt let through by [`Breaker::try_pass`].
    pub fn report(&self, health: Health) {
        let mut b = self.inner.lock();
        let half_open = b.state == BreakerState::HalfOpen;
        if half_open {
            b.probes = b.probes.saturating_sub(1);
        }
        match health {
            Health::Success => {
                b.state = BreakerState::Closed;
                b.failures = 0;
            }
            Health::Failure => {
                b.failures += 1;
                if half_open || b.failures >= self.config.failure_threshold {
                    b.state = BreakerState::Open;
                    b.open_until = Instant::now() + Duration::from_millis(self.config.open_ms);
                }
            }
            Health::Neutral => {}
        }
    }

    /// How long the circuit stays open, if it is open and not yet due for a probe. Takes no
    /// probe slot, so callers can skip a provider before queueing for it.
    pub fn open_for(&self) -> Option<Duration> {
        let b = self.inner.lock();
        let now = Instant::now();
        (b.state == BreakerState::Open && now < b.open_until).then(|| b.open_until - now)
    }

    pub fn state(&self) -> BreakerState {
        let b = self.inner.lock();
        if b.state == BreakerState::Open && Instant::now() >= b.open_until {
            // Due for a probe: report it as such without changing anything.
            return BreakerState::HalfOpen;
        }
        b.state
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn opens_fails_fast_probes_and_closes() {
        let b = Breaker::new(BreakerConfig {
            failure_threshold: 3,
            open_ms: 1_000,
            half_open_probes: 1,
        });
        for _ in 0..2 {
            b.try_pass().expect("closed");
            b.report(Health::Failure);
        }
        b.try_pass().expect("still closed");
        b.report(Health::Success);
        for _ in 0..3 {
            b.try_pass().expect("closed");
            b.report(Health::Failure);
        }
        assert_eq!(b.state(), BreakerState::Open);
        assert_eq!(b.try_pass(), Err(Duration::from_millis(1_000)));
        tokio::time::advance(Duration::from_millis(1_000)).await;
        assert_eq!(b.state(), BreakerState::HalfOpen);
        b.try_pass().expect("one probe");
        assert!(b.try_pass().is_err(), "only one probe at a time");
        b.report(Health::Failure);
        assert_eq!(b.state(), BreakerState::Open, "a failed probe re-opens");
        tokio::time::advance(Duration::from_millis(1_000)).await;
        b.try_pass().expect("probe again");
        b.report(Health::Success);
        assert_eq!(b.state(), BreakerState::Closed);
        b.try_pass().expect("closed again");
    }

    #[tokio::test(start_paused = true)]
    async fn neutral_results_do_not_count() {
        let b = Breaker::new(BreakerConfig {
            failure_threshold: 2,
            open_ms: 1_000,
            half_open_probes: 1,
        });
        for _ in 0..10 {
            b.try_pass().expect("closed");
            b.report(Health::Neutral);
        }
        assert_eq!(b.state(), BreakerState::Closed);
    }
}
