//! Billing: token counts when the upstream sends no `usage`, the cost of a stream, daily spend
//! budgets per user and per tier, and [`Settlement`], the one place a stream's end is billed
//! and recorded (its reservation, its token and spend metrics, its budgets).
//!
//! Token counts come from a real BPE tokenizer, `tiktoken-rs`, whose rank files are compiled into
//! the binary: nothing is read from disk or the network at run time. OpenAI's models get their
//! own encoding; every other model is counted with `cl100k_base`, an estimate (Claude, Gemini and
//! DeepSeek tokenizers differ by some percent), which is why a counted figure is always labelled
//! `estimated` in the metrics. Upstream `usage`, when present, wins.
//!
//! Budgets are checked before a stream reaches the upstream and charged when it ends, so a
//! stream that starts under the limit may finish over it; the next one is refused.

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use dashmap::DashMap;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tiktoken_rs::CoreBPE;

use crate::limits::{RateLimiter, Reservation};
use crate::metrics::Metrics;
use crate::protocol::Usage;

/// The BPE encoding used to count a model's tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Encoding {
    /// GPT-3.5, GPT-4 and, as an estimate, every model not known to use `o200k_base`.
    Cl100kBase,
    /// GPT-4o, GPT-4.1, GPT-4.5, GPT-5, the o-series and gpt-oss.
    O200kBase,
}

/// Model name prefixes counted with `o200k_base`, as in OpenAI's `tiktoken` model table. A
/// prefix matches the whole name or a name continuing with a non-alphanumeric character, so
/// `gpt-4o-mini` and `o3-2025-04-16` match but `o1x` does not.
const O200K_PREFIXES: [&str; 10] = [
    "gpt-4o",
    "chatgpt-4o",
    "gpt-4.1",
    "gpt-4.5",
    "gpt-5",
    "o1",
    "o3",
    "o4",
    "gpt-oss",
    "codex-mini",
];

/// Framing tokens around each message (`<|start|>{role}<|message|>…<|end|>`), per OpenAI's
/// counting rule for current chat models.
const TOKENS_PER_MESSAGE: u64 = 3;
/// A `name` field costs one token beyond its text.
const TOKENS_PER_NAME: u64 = 1;
/// Every reply is primed with `<|start|>assistant<|message|>`.
const REPLY_PRIMING: u64 = 3;

/// When the pre-tokenizer's backtracking gives up on pathological input (a huge run of
/// whitespace, say), the text is counted in slices of this size instead.
const SLICE_BYTES: usize = 16 * 1024;

static CL100K: LazyLock<Option<CoreBPE>> =
    LazyLock::new(|| load("cl100k_base", tiktoken_rs::cl100k_base));
static O200K: LazyLock<Option<CoreBPE>> =
    LazyLock::new(|| load("o200k_base", tiktoken_rs::o200k_base));

fn load<E: fmt::Display>(name: &str, build: fn() -> Result<CoreBPE, E>) -> Option<CoreBPE> {
    match build() {
        Ok(bpe) => Some(bpe),
        Err(err) => {
            // The ranks are compiled in, so this means a broken build; counting falls back to
            // the other encoding, and a broken build is caught by the unit tests.
            tracing::error!(encoding = name, error = %err, "tokenizer failed to load");
            None
        }
    }
}

/// Tokenizer calls running at once, process-wide: at most half the CPUs (at least one), so
/// counting hostile prompts can never take every core from the streams being relayed.
static COUNTING: LazyLock<tokio::sync::Semaphore> = LazyLock::new(|| {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    tokio::sync::Semaphore::new((cpus / 2).max(1))
});

/// Runs `count` (a tokenizer call) over what `input` copies out, on a blocking thread, once
/// one of the process's few counting permits is free; `None` if the blocking task failed.
/// Never tokenize on an async worker thread: a megabyte of adversarial text costs ~0.6 CPU-s
/// and would stall every connection that worker serves. `input` runs only once the permit is
/// held, so the permits bound both the CPU and the memory (the copies of the text) counting
/// takes at once; callers wait in line, first come first served. Returns what `count` returned
/// and the time it ran.
pub async fn count_off_runtime<A, T>(
    input: impl FnOnce() -> A,
    count: impl FnOnce(A) -> T + Send + 'static,
) -> Option<(T, Duration)>
where
    A: Send + 'static,
    T: Send + 'static,
{
    let _permit = COUNTING.acquire().await.ok()?;
    let input = input();
    tokio::task::spawn_blocking(move || {
        let started = std::time::Instant::now();
        let out = count(input);
        (out, started.elapsed())
    })
    .await
    .ok()
}

/// Bytes of every string in `messages`: what [`count_prompt_tokens`] runs the tokenizer over,
/// near enough (it also counts the JSON of unusual structures).
pub fn prompt_text_bytes(messages: &[Value]) -> usize {
    fn walk(v: &Value) -> usize {
        match v {
            Value::String(s) => s.len(),
            Value::Array(items) => items.iter().map(walk).sum(),
            Value::Object(fields) => fields.values().map(walk).sum(),
            _ => 0,
        }
    }
    messages.iter().map(walk).sum()
}

/// Builds both encoders now rather than on the first stream that needs one. Takes a few hundred
/// milliseconds of CPU: call it from `tokio::task::spawn_blocking` at startup.
pub fn warm_up() {
    LazyLock::force(&CL100K);
    LazyLock::force(&O200K);
}

/// The encoding [`count_tokens`] uses for `model`. A provider prefix (`openai/gpt-4o`) is
/// ignored and case does not matter.
pub fn encoding_for_model(model: &str) -> Encoding {
    let name = model.rsplit('/').next().unwrap_or(model).as_bytes();
    let is_o200k = O200K_PREFIXES.iter().any(|prefix| {
        let prefix = prefix.as_bytes();
        name.len() >= prefix.len()
            && name[..prefix.len()].eq_ignore_ascii_case(prefix)
            && name
                .get(prefix.len())
                .is_none_or(|next| !next.is_ascii_alphanumeric())
    });
    if is_o200k {
        Encoding::O200kBase
    } else {
        Encoding::Cl100kBase
    }
}

fn encoder(encoding: Encoding) -> Option<&'static CoreBPE> {
    let (wanted, other) = match encoding {
        Encoding::Cl100kBase => (&CL100K, &O200K),
        Encoding::O200kBase => (&O200K, &CL100K),
    };
    wanted.as_ref().or(other.as_ref())
}

/// Tokens in `text` as `model`'s tokenizer would count them (see [`encoding_for_model`]; for
/// non-OpenAI models an estimate). Special-token markers such as `<|endoftext|>` in the text
/// are counted as the plain text they are, as the API does for message content.
///
/// Cost, measured in release builds: 25–45 ms per MiB of prose, up to 0.6 s per MiB of
/// adversarial text (a long run of one character). Call it through [`count_off_runtime`], never
/// on an async worker thread. Count a
/// completion once at the end, not chunk by chunk: that would also miscount the tokens that
/// span chunk boundaries.
pub fn count_tokens(model: &str, text: &str) -> u64 {
    count_with(encoder(encoding_for_model(model)), text)
}

fn count_with(bpe: Option<&CoreBPE>, text: &str) -> u64 {
    if text.is_empty() {
        return 0;
    }
    let Some(bpe) = bpe else {
        // Both encoders failed to load (see `load`). Byte-level BPE never makes more tokens than
        // bytes, so this bounds the count from above instead of guessing it.
        return text.len() as u64;
    };
    match encode_len(bpe, text) {
        Some(n) => n,
        None => count_in_slices(bpe, text),
    }
}

fn encode_len(bpe: &CoreBPE, text: &str) -> Option<u64> {
    // `encode` reports a regex failure where `encode_ordinary` panics on it; with no special
    // token allowed, both encode exactly the same tokens.
    bpe.encode(text, &HashSet::new())
        .ok()
        .map(|(tokens, _)| tokens.len() as u64)
}

/// Counts `text` in slices of at most [`SLICE_BYTES`], cut at character boundaries. Only the
/// tokens spanning a cut are miscounted (by one or two each), which is close enough for input
/// that defeats the tokenizer as a whole.
fn count_in_slices(bpe: &CoreBPE, text: &str) -> u64 {
    let mut total = 0;
    let mut rest = text;
    while !rest.is_empty() {
        let mut cut = rest.len().min(SLICE_BYTES);
        while !rest.is_char_boundary(cut) {
            cut -= 1;
        }
        let (slice, tail) = rest.split_at(cut);
        total += encode_len(bpe, slice).unwrap_or(slice.len() as u64);
        rest = tail;
    }
    total
}

/// Prompt tokens of a chat completion request's `messages`, by OpenAI's counting rule: 3
/// framing tokens per message, the tokens of each of its string fields (role, content, name,
/// tool call id…), 1 more for a `name`, and 3 priming the reply. Content given as parts counts
/// its text parts; images, audio and files are not text and count 0. Tool calls count their
/// function name and arguments. An estimate for non-OpenAI models, and as costly per byte, as
/// [`count_tokens`] is.
pub fn count_prompt_tokens(model: &str, messages: &[Value]) -> u64 {
    let bpe = encoder(encoding_for_model(model));
    let count = |s: &str| count_with(bpe, s);
    let mut total = REPLY_PRIMING;
    for message in messages {
        total += TOKENS_PER_MESSAGE;
        let Some(fields) = message.as_object() else {
            total += count(&message.to_string());
            continue;
        };
        for (key, value) in fields {
            total += match (key.as_str(), value) {
                (_, Value::String(s)) => count(s),
                ("content", Value::Array(parts)) => parts
                    .iter()
                    .map(|part| {
                        ["text", "refusal"]
                            .iter()
                            .filter_map(|k| part.get(k).and_then(Value::as_str))
                            .map(count)
                            .sum::<u64>()
                    })
                    .sum(),
                ("tool_calls", Value::Array(calls)) => calls
                    .iter()
                    .map(|call| function_tokens(call.get("function"), &count))
                    .sum(),
                ("function_call", call) => function_tokens(Some(call), &count),
                (_, Value::Null | Value::Bool(_) | Value::Number(_)) => 0,
                // Any other structure reaches the model as text of some form: its JSON is the
                // closest stand-in.
                (_, other) => count(&other.to_string()),
            };
            if key == "name" {
                total += TOKENS_PER_NAME;
            }
        }
    }
    total
}

fn function_tokens(function: Option<&Value>, count: &impl Fn(&str) -> u64) -> u64 {
    let Some(function) = function else {
        return 0;
    };
    ["name", "arguments"]
        .iter()
        .filter_map(|k| function.get(k).and_then(Value::as_str))
        .map(count)
        .sum()
}

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
            limits.reconcile(
                &reservation,
                usage.map_or(0, |u| u.prompt_tokens + u.completion_tokens),
            );
        }
        if let Some(u) = usage {
            metrics.tokens(model, tier, u.prompt_tokens, u.completion_tokens, estimated);
        }
        if let Some(cost) = cost_usd {
            metrics.spend(model, tier, cost);
            budgets.record(user, tier, cost);
        }
        Bill {
            usage,
            cost_usd,
            estimated,
        }
    }
}

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
        }
    }

    pub fn config(&self) -> &BudgetConfig {
        &self.config
    }

    /// Whether `user` of `tier` may start a stream: refused once today's spend has reached the
    /// user's limit, or the tier's (checked in that order). Call it before the stream is queued
    /// or reaches an upstream.
    pub fn check(&self, user: &str, tier: &str) -> Result<(), BudgetError> {
        let now = self.clock.now();
        let day = utc_day(now);
        let over = |map: &DashMap<String, DaySpend>, key: &str, limit: f64| {
            let spent = map.get(key).map_or(0, |s| s.on(day));
            (spent >= to_nanos(limit)).then_some(to_usd(spent))
        };
        if let Some(limit) = self.config.user_limit(user) {
            if let Some(spent_usd) = over(&self.users, user, limit) {
                return Err(BudgetError {
                    scope: BudgetScope::User,
                    limit_usd: limit,
                    spent_usd,
                    retry_after: until_midnight(now),
                });
            }
        }
        if let Some(limit) = self.config.tier_limit(tier) {
            if let Some(spent_usd) = over(&self.tiers, tier, limit) {
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

    /// USD the users of `tier` have spent today.
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
    use serde_json::json;

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

    #[test]
    fn known_token_counts() {
        // Published counts: tiktoken's README and the tiktoken-rs test vectors.
        for model in ["gpt-4", "gpt-4o", "deepseek-v3.2"] {
            assert_eq!(count_tokens(model, "hello world"), 2, "{model}");
            assert_eq!(count_tokens(model, "tiktoken is great!"), 6, "{model}");
            assert_eq!(
                count_tokens(model, "This is a test         with a lot of spaces"),
                10,
                "{model}"
            );
            assert_eq!(count_tokens(model, ""), 0);
        }
    }

    #[test]
    fn encodings_differ_where_they_should() {
        // "ひらがなカタカナ漢字" is one of the round-trip vectors; o200k's larger vocabulary
        // needs fewer tokens for Japanese than cl100k's.
        let text = "ひらがなカタカナ漢字";
        assert!(count_tokens("gpt-4o", text) < count_tokens("gpt-4", text));
    }

    #[test]
    fn encoding_by_model() {
        use Encoding::*;
        for (model, want) in [
            ("gpt-4.1", O200kBase),
            ("gpt-4.1-mini", O200kBase),
            ("gpt-4o", O200kBase),
            ("gpt-4o-2024-08-06", O200kBase),
            ("GPT-4o-mini", O200kBase),
            ("openai/gpt-4o", O200kBase),
            ("chatgpt-4o-latest", O200kBase),
            ("gpt-5", O200kBase),
            ("gpt-5.1", O200kBase),
            ("o1", O200kBase),
            ("o3-mini", O200kBase),
            ("o4-mini-2025-04-16", O200kBase),
            ("gpt-oss-120b", O200kBase),
            ("gpt-4", Cl100kBase),
            ("gpt-4-turbo", Cl100kBase),
            ("gpt-3.5-turbo", Cl100kBase),
            ("claude-sonnet-4.5", Cl100kBase),
            ("gemini-2.5-flash", Cl100kBase),
            ("deepseek-v3.2", Cl100kBase),
            ("o1x", Cl100kBase),
            ("", Cl100kBase),
        ] {
            assert_eq!(encoding_for_model(model), want, "{model}");
        }
    }

    /// The OpenAI cookbook's "How to count tokens with tiktoken" example, whose counts the API
    /// itself confirmed: 129 prompt tokens for gpt-4 (cl100k_base), 124 for gpt-4o (o200k_base).
    fn cookbook_messages() -> Vec<Value> {
        vec![
            json!({"role": "system", "content": "You are a helpful, pattern-following assistant that translates corporate jargon into plain English."}),
            json!({"role": "system", "name": "example_user", "content": "New synergies will help drive top-line growth."}),
            json!({"role": "system", "name": "example_assistant", "content": "Things working well together will increase revenue."}),
            json!({"role": "system", "name": "example_user", "content": "Let's circle back when we have more bandwidth to touch base on opportunities for increased leverage."}),
            json!({"role": "system", "name": "example_assistant", "content": "Let's talk later when we're less busy about how to do better."}),
            json!({"role": "user", "content": "This late pivot means we don't have time to boil the ocean for the client deliverable."}),
        ]
    }

    #[test]
    fn prompt_tokens_match_the_api() {
        assert_eq!(count_prompt_tokens("gpt-4", &cookbook_messages()), 129);
        assert_eq!(
            count_prompt_tokens("gpt-3.5-turbo", &cookbook_messages()),
            129
        );
        assert_eq!(count_prompt_tokens("gpt-4o", &cookbook_messages()), 124);
        assert_eq!(count_prompt_tokens("gpt-4o", &[]), REPLY_PRIMING);
    }

    #[test]
    fn prompt_parts_and_tool_calls() {
        let plain = [json!({"role": "user", "content": "hello world"})];
        // 3 per message + "user" (1) + "hello world" (2) + 3 priming.
        assert_eq!(count_prompt_tokens("gpt-4", &plain), 9);
        let parts = [json!({"role": "user", "content": [
            {"type": "text", "text": "hello world"},
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}
        ]})];
        assert_eq!(count_prompt_tokens("gpt-4", &parts), 9);

        let call = [json!({"role": "assistant", "content": null, "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "hello", "arguments": "world"}}
        ]})];
        let expected = TOKENS_PER_MESSAGE
            + count_tokens("gpt-4", "assistant")
            + count_tokens("gpt-4", "hello")
            + count_tokens("gpt-4", "world")
            + REPLY_PRIMING;
        assert_eq!(count_prompt_tokens("gpt-4", &call), expected);
    }

    #[test]
    fn special_token_text_is_plain_text() {
        let n = count_tokens("gpt-4", "<|endoftext|>");
        assert!(n > 1, "{n}");
    }

    #[test]
    fn pathological_input_does_not_panic() {
        // A 1 MiB run of spaces is the known input on which the pre-tokenizer's backtracking
        // gives up (where `encode_ordinary` would panic); it is counted in slices instead.
        let text = " ".repeat(1 << 20) + "x";
        let bpe = encoder(Encoding::Cl100kBase).expect("loaded");
        assert_eq!(encode_len(bpe, &text), None);
        let n = count_tokens("gpt-4", &text);
        assert!(n > 0 && n <= text.len() as u64, "{n}");
    }

    #[test]
    fn slices_cut_at_char_boundaries() {
        let bpe = encoder(Encoding::O200kBase).expect("loaded");
        let text = "漢字".repeat(SLICE_BYTES);
        let n = count_in_slices(bpe, &text);
        assert!(n > 0 && n <= text.len() as u64);
    }

    #[test]
    fn both_encoders_load_from_the_crate() {
        warm_up();
        assert!(CL100K.is_some());
        assert!(O200K.is_some());
    }

    #[test]
    fn cost() {
        // gpt-4.1 at 2.00 / 8.00 USD per million tokens.
        assert_eq!(cost_usd(1_000, 500, 2.0, 8.0), 0.006);
        assert_eq!(cost_usd(1_000_000, 1_000_000, 0.10, 0.42), 0.52);
        assert_eq!(cost_usd(0, 0, 3.0, 15.0), 0.0);
    }

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
