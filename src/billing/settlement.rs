//! The price of a stream, and [`Settlement`]: the one place a stream's end is billed and
//! recorded (its tokens, their price, its rate-limit reservation, its token and spend metrics,
//! its budgets).

use crate::cluster::Ending;
use crate::limits::{RateLimiter, Reservation};
use crate::metrics::Metrics;
use crate::protocol::Usage;

use super::budgets::Budgets;
use super::tokens::{count_off_runtime, count_tokens};

/// USD for a stream: prices are USD per million tokens, as in the `[pricing]` config table.
pub fn cost_usd(
    prompt_tokens: u64,
    completion_tokens: u64,
    price_in_per_mtok: f64,
    price_out_per_mtok: f64,
) -> f64 {
    (prompt_tokens as f64 * price_in_per_mtok + completion_tokens as f64 * price_out_per_mtok)
        / 1_000_000.0
}

/// A model's prices, USD per million tokens: one `[pricing."MODEL"]` table of the config.
#[derive(Debug, Clone, Copy, PartialEq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Price {
    /// Prompt tokens (those not read from the upstream's prompt cache).
    pub input: f64,
    /// Completion tokens, reasoning tokens included.
    pub output: f64,
    /// Prompt tokens the upstream reports as cached (`prompt_tokens_details.cached_tokens`).
    /// Default: none, so cached tokens cost `input` like the rest of the prompt.
    #[serde(default)]
    pub cached_input: Option<f64>,
}

impl Price {
    /// USD for `usage`: its cached prompt tokens at `cached_input` (when the model has that
    /// price), the rest of the prompt at `input`, the completion at `output`.
    pub fn cost(&self, usage: &Usage) -> f64 {
        let Some(cached_price) = self.cached_input else {
            return cost_usd(
                usage.prompt_tokens,
                usage.completion_tokens,
                self.input,
                self.output,
            );
        };
        let cached = usage.cached_tokens();
        (cached as f64 * cached_price
            + (usage.prompt_tokens - cached) as f64 * self.input
            + usage.completion_tokens as f64 * self.output)
            / 1_000_000.0
    }
}

/// What one stream used, settled once when it ends, whatever way it ended: its tokens (the
/// upstream's count when it sent one, else counted with the model's tokenizer over the prompt
/// and every delta that went out), their price, the rate-limit reservation brought to what was
/// used, the token and spend metrics, and the daily budgets. A stream no upstream accepted
/// (refused, or answered only with errors) used nothing.
#[derive(Debug)]
pub struct Settlement<'a> {
    /// The model that answered (a fallback's, if one served): its tokenizer and price count.
    pub model: &'a str,
    pub tier: &'a str,
    pub user: &'a str,
    /// `model`'s prices; `None` when it has none.
    pub price: Option<Price>,
    /// The rate-limit share taken before the upstream call, if one was.
    pub reservation: Option<Reservation>,
    /// Counted before the upstream call, for the reservation.
    pub prompt_tokens: u64,
    /// The upstream's own count, which wins when present.
    pub reported: Option<Usage>,
    /// An upstream answered 200 and began streaming: from then on the prompt is billable.
    pub accepted: bool,
    /// The text of every delta sent (content, reasoning, refusals, tool-call names and
    /// arguments), gathered as they went out (not read back from the replay log, which drops
    /// what was already written once it is full).
    pub generated: String,
}

/// What a stream is billed, for its terminal frame.
#[derive(Debug, Clone, PartialEq)]
pub struct Bill {
    pub usage: Option<Usage>,
    pub cost_usd: Option<f64>,
    /// `usage` was counted by the gateway, not reported by the upstream.
    pub estimated: bool,
}

impl Settlement<'_> {
    /// Counts (off the async workers, see [`count_off_runtime`]), prices and records the
    /// stream's use, and returns the bill for its terminal frame. Recorded before that frame
    /// goes out, so a client that reads `done` and opens again meets its limits and budget
    /// already charged. In cluster mode the shared writes (reconciliation, spend, and the
    /// release of the stream's lease that `ending` holds) go to Redis in one round trip.
    pub async fn settle(
        self,
        limits: &RateLimiter,
        budgets: &Budgets,
        metrics: &Metrics,
        mut ending: Ending,
    ) -> Bill {
        let Settlement {
            model,
            tier,
            user,
            price,
            reservation,
            prompt_tokens,
            reported,
            accepted,
            generated,
        } = self;
        let estimated = reported.is_none();
        let usage = match (reported, accepted) {
            (Some(usage), _) => Some(usage),
            (None, true) => {
                let counted = count_off_runtime(
                    || (model.to_owned(), generated),
                    |(model, text)| (count_tokens(&model, &text), text.len()),
                )
                .await;
                let completion_tokens = counted.map_or(0, |((tokens, bytes), took)| {
                    metrics.tokenized(bytes, took);
                    tokens
                });
                Some(Usage::counted(prompt_tokens, completion_tokens))
            }
            (None, false) => None,
        };
        let cost_usd = usage.as_ref().zip(price).map(|(u, price)| price.cost(u));
        if let Some(reservation) = reservation {
            limits.settle(
                &reservation,
                usage
                    .as_ref()
                    .map_or(0, |u| u.prompt_tokens + u.completion_tokens),
                &mut ending,
            );
        }
        if let Some(u) = &usage {
            metrics.tokens(model, tier, u.prompt_tokens, u.completion_tokens, estimated);
        }
        if let Some(cost) = cost_usd {
            metrics.spend(model, tier, cost);
            budgets.charge(user, tier, cost, &mut ending);
        }
        ending.commit().await;
        Bill {
            usage,
            cost_usd,
            estimated,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cost() {
        // gpt-4.1 at 2.00 / 8.00 USD per million tokens.
        assert_eq!(cost_usd(1_000, 500, 2.0, 8.0), 0.006);
        assert_eq!(cost_usd(1_000_000, 1_000_000, 0.10, 0.42), 0.52);
        assert_eq!(cost_usd(0, 0, 3.0, 15.0), 0.0);
    }

    #[test]
    fn cached_prompt_tokens_at_their_price() {
        let usage: Usage = serde_json::from_str(
            r#"{"prompt_tokens":1000,"completion_tokens":500,"prompt_tokens_details":{"cached_tokens":800}}"#,
        )
        .expect("usage");
        let uncached = Price {
            input: 2.0,
            output: 8.0,
            cached_input: None,
        };
        assert_eq!(uncached.cost(&usage), cost_usd(1000, 500, 2.0, 8.0));
        let cached = Price {
            cached_input: Some(0.5),
            ..uncached
        };
        // 800 × 0.5 + 200 × 2 + 500 × 8 = 4800 micro-dollars.
        assert!(
            (cached.cost(&usage) - 0.0048).abs() < 1e-15,
            "{}",
            cached.cost(&usage)
        );
        // A cached count above the prompt (a confused upstream) never makes the prompt cheaper
        // than all-cached, nor a negative count.
        let over: Usage = serde_json::from_str(
            r#"{"prompt_tokens":10,"completion_tokens":0,"prompt_tokens_details":{"cached_tokens":99}}"#,
        )
        .expect("usage");
        assert!((cached.cost(&over) - 10.0 * 0.5 / 1e6).abs() < 1e-18);
        assert_eq!(
            cached.cost(&Usage::counted(1000, 500)),
            cost_usd(1000, 500, 2.0, 8.0)
        );
    }
}
