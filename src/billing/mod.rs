//! Billing: token counts when the upstream sends no `usage`, the cost of a stream, daily spend
//! budgets per user and per tier, and [`Settlement`], the one place a stream's end is billed
//! and recorded (its reservation, its token and spend metrics, its budgets).
//!
//! - `tokens`: the tokenizers, their bounded pool off the async workers, and their warm-up.
//! - `budgets`: daily spend limits per user and tier, charged when a stream ends.
//! - `settlement`: a stream's price, and its settlement.
//!
//! Upstream `usage`, when present, wins over a count.

mod budgets;
mod settlement;
mod tokens;

pub use budgets::{BudgetConfig, BudgetRefused, Budgets};
pub use settlement::{cost_usd, Price, Settlement};
pub use tokens::{
    count_off_runtime, count_prompt_tokens, count_tokens, count_tools_tokens, prompt_text_bytes,
    warm_up,
};
