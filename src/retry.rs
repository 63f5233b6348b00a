//! Retries of an upstream call that failed before its first token: which failure may be tried
//! again, and after how long. The relay runs the attempts and asks [`RetryConfig::next_wait`]
//! after each failure; nothing else decides a retry.
//!
//! Kept free of the upstream's types: the policy reads the facts it needs from [`Failed`], so
//! this module imports nothing of the crate (the config imports it).

use std::time::Duration;

use rand::Rng;
use serde::Deserialize;

/// Retries of an upstream call that failed before its first token.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetryConfig {
    /// Attempts in all, the first included. Default 3.
    pub max_attempts: u32,
    /// Backoff base: attempt n waits a random time in `[0, min(max, base * 2^n))`. Default 250 ms.
    pub base_delay_ms: u64,
    /// Backoff ceiling. Default 4000 ms.
    pub max_delay_ms: u64,
    /// Longest upstream `Retry-After` honoured; a longer one ends the stream at once with
    /// `upstream_error` and `retry_after_ms`. Default 30000 ms.
    pub max_retry_after_ms: u64,
}

impl Default for RetryConfig {
    fn default() -> Self {
        RetryConfig {
            max_attempts: 3,
            base_delay_ms: 250,
            max_delay_ms: 4_000,
            max_retry_after_ms: 30_000,
        }
    }
}

/// One failed attempt, as far as the retry policy goes.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Failed {
    /// Attempts made so far, the failed one included (1 after the first).
    pub attempts: u32,
    /// Whether the failure may pass on another try (a connect error, a 429 or 5xx, no first
    /// token in time, a broken stream): `UpstreamError::retryable`.
    pub transient: bool,
    /// Whether any text went out: another attempt would send it twice.
    pub delivered: bool,
    /// The upstream's `Retry-After`, if it sent one.
    pub retry_after: Option<Duration>,
}

impl RetryConfig {
    /// How long to wait before the next attempt, or `None`: give up, the failure is final.
    ///
    /// A retry needs a transient failure, no text delivered, attempts left, and a
    /// `Retry-After` (if any) no longer than `max_retry_after_ms`.
    pub fn next_wait(&self, failed: &Failed, rng: &mut impl Rng) -> Option<Duration> {
        let exhausted = failed.attempts >= self.max_attempts;
        let too_long = failed
            .retry_after
            .is_some_and(|d| d > Duration::from_millis(self.max_retry_after_ms));
        if failed.delivered || !failed.transient || exhausted || too_long {
            return None;
        }
        Some(self.backoff(failed.attempts.saturating_sub(1), failed.retry_after, rng))
    }

    /// Full-jitter exponential backoff: a uniform wait in `[0, min(max, base * 2^retry))`,
    /// where `retry` counts from 0 for the wait after the first failure. An upstream
    /// `Retry-After` is a floor, not a suggestion.
    pub fn backoff(
        &self,
        retry: u32,
        retry_after: Option<Duration>,
        rng: &mut impl Rng,
    ) -> Duration {
        let ceiling = self
            .base_delay_ms
            .saturating_mul(1u64.checked_shl(retry.min(32)).unwrap_or(u64::MAX))
            .min(self.max_delay_ms);
        let jitter = Duration::from_millis(if ceiling == 0 {
            0
        } else {
            rng.gen_range(0..ceiling)
        });
        match retry_after {
            Some(floor) => floor.max(jitter),
            None => jitter,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    fn policy() -> RetryConfig {
        RetryConfig {
            max_attempts: 5,
            base_delay_ms: 100,
            max_delay_ms: 1000,
            max_retry_after_ms: 30_000,
        }
    }

    #[test]
    fn backoff_is_full_jitter_and_bounded() {
        let policy = policy();
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        for retry in 0..10u32 {
            let ceiling = (100u64 << retry.min(20)).min(1000);
            let mut seen_low = false;
            for _ in 0..200 {
                let d = policy.backoff(retry, None, &mut rng);
                assert!(d < Duration::from_millis(ceiling), "retry {retry}: {d:?}");
                seen_low |= d < Duration::from_millis(ceiling / 2);
            }
            assert!(seen_low, "jitter spans the range");
        }
        let d = policy.backoff(0, Some(Duration::from_secs(2)), &mut rng);
        assert!(d >= Duration::from_secs(2), "Retry-After is a floor");
    }

    #[test]
    fn only_a_transient_failure_before_any_text_within_the_attempts_is_retried() {
        let policy = policy();
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let failed = |attempts, transient, delivered, retry_after| Failed {
            attempts,
            transient,
            delivered,
            retry_after,
        };
        for attempts in 1..5 {
            let wait = policy
                .next_wait(&failed(attempts, true, false, None), &mut rng)
                .expect("attempts left");
            let ceiling = (100u64 << (attempts - 1)).min(1000);
            assert!(
                wait < Duration::from_millis(ceiling),
                "{attempts}: {wait:?}"
            );
        }
        assert_eq!(
            policy.next_wait(&failed(5, true, false, None), &mut rng),
            None,
            "max_attempts counts the first"
        );
        assert_eq!(
            policy.next_wait(&failed(1, false, false, None), &mut rng),
            None,
            "a lasting failure"
        );
        assert_eq!(
            policy.next_wait(&failed(1, true, true, None), &mut rng),
            None,
            "text went out"
        );
        let s = Duration::from_secs;
        let wait = policy.next_wait(&failed(1, true, false, Some(s(30))), &mut rng);
        assert!(
            wait.is_some_and(|w| w >= s(30)),
            "Retry-After up to the bound is a floor"
        );
        assert_eq!(
            policy.next_wait(&failed(1, true, false, Some(s(31))), &mut rng),
            None,
            "a longer Retry-After ends the stream at once"
        );
    }

    #[test]
    fn one_attempt_never_retries() {
        let policy = RetryConfig {
            max_attempts: 1,
            ..policy()
        };
        let failed = Failed {
            attempts: 1,
            transient: true,
            delivered: false,
            retry_after: None,
        };
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        assert_eq!(policy.next_wait(&failed, &mut rng), None);
    }
}
