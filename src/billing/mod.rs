//! Billing: token counts when the upstream sends no `usage`, the cost of a stream, daily spend
//! budgets per user and per tier, and [`Settlement`], the one place a stream's end is billed
//! and recorded (its reservation, its token and spend metrics, its budgets).
//!
//! - `tokens`: the tokenizers, the bounded prompt count, their pool off the async workers.
//! - `ranks`: a vocabulary as one flat table, built at compile time and read in place.
//! - `budgets`: daily spend limits per user and tier, charged when a stream ends.
//! - `settlement`: a stream's price, and its settlement.
//!
//! Upstream `usage`, when present, wins over a count.

mod budgets;
mod ranks;
mod settlement;
mod tokens;

pub use budgets::{BudgetConfig, BudgetRefused, Budgets};
pub use settlement::{cost_usd, Price, Settlement};
pub use tokens::{
    count_off_runtime, count_prompt, count_prompt_tokens, count_small_prompt, count_tokens,
    count_tools_tokens, warm_up, PromptCount,
};
