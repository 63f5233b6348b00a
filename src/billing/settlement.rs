//! The price of a stream, and [`Settlement`]: the one place a stream's end is billed and
//! recorded (its tokens, their price, its rate-limit reservation, its token and spend metrics,
//! its budgets).

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
    /// USD per million tokens in and out for `model`; `None` when it has no price.
    pub price: Option<(f64, f64)>,
    /// The rate-limit share taken before the upstream call, if one was.
    pub reservation: Option<Reservation>,
    /// Counted before the upstream call, for the reservation.
    pub prompt_tokens: u64,
    /// The upstream's own count, which wins when present.
    pub reported: Option<Usage>,
    /// An upstream answered 200 and began streaming: from then on the prompt is billable.
    pub accepted: bool,
    /// The text of every delta sent, gathered as they went out (not read back from the replay
    /// log, which drops what was already written once it is full).
    pub generated: String,
}

/// What a stream is billed, for its terminal frame.
#[derive(Debug, Clone, Copy, PartialEq)]
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
    /// already charged.
    pub async fn settle(self, limits: &RateLimiter, budgets: &Budgets, metrics: &Metrics) -> Bill {
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
                Some(Usage {
                    prompt_tokens,
                    completion_tokens,
                })
            }
            (None, false) => None,
        };
        let estimated = reported.is_none();
        let cost_usd = usage.zip(price).map(|(u, (input, output))| {
            cost_usd(u.prompt_tokens, u.completion_tokens, input, output)
        });
        if let Some(reservation) = reservation {
            limits
                .settle(
                    &reservation,
                    usage.map_or(0, |u| u.prompt_tokens + u.completion_tokens),
                )
                .await;
        }
        if let Some(u) = usage {
            metrics.tokens(model, tier, u.prompt_tokens, u.completion_tokens, estimated);
        }
        if let Some(cost) = cost_usd {
            metrics.spend(model, tier, cost);
            budgets.charge(user, tier, cost).await;
        }
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
}
