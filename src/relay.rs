//! A stream's task: take its rate-limit share, wait for an upstream slot, call the upstream,
//! retry what may be retried, fall back to other models where configured, turn SSE chunks
//! into `delta` frames, and end with exactly one `done` or `error`.

use std::borrow::Cow;
use std::future::Future;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use serde_json::{Map, Value};
use tokio::time::Instant;

use crate::billing;
use crate::billing::BudgetRefused;
use crate::breaker::Health;
use crate::cluster::{Ending, Lease};
use crate::gateway::Gateway;
use crate::limits::{Limited, Refused, Reservation};
use crate::metrics::{self, StreamOutcome};
use crate::protocol::{self, DeltaParts, ErrorCode, OpenRequest, UpstreamDetail, Usage};
use crate::retry;
use crate::scheduler::NoSlot;
use crate::stream::{CancelReason, Stream};
use crate::tiers::Tier;
use crate::upstream::{self, Provider, UpstreamError};

/// One stream to run.
pub struct Job {
    pub gw: Arc<Gateway>,
    pub stream: Arc<Stream>,
    pub req: OpenRequest,
    /// The connection's tier, resolved at its `hello`.
    pub tier: Arc<Tier>,
    /// Cluster mode: the stream's place in its user's cap across instances, held while it
    /// runs and released with the rest of its settlement.
    pub lease: Option<Lease>,
    /// Cluster mode: what Redis said of the stream's budgets and rate limits in the round trip
    /// that took its lease; `None` when that call failed (the task asks again).
    pub admission: Option<Admission>,
}

/// What the shared store decided for a stream at its open, in the call that took its lease
/// (see [`crate::cluster::Opening`]), so that its task does not ask again.
#[derive(Debug)]
pub struct Admission {
    /// Today's spend of its user and tier ([`crate::billing::Budgets::shared_keys`]).
    pub spent: Option<Vec<u64>>,
    /// The check of its rate limits: for its whole reservation when `reserved`, else (its
    /// prompt not counted yet) for its completion reservation.
    pub checked: Option<Result<(), Limited>>,
    /// Its prompt's tokens, when it was short enough to be counted before the call.
    pub prompt_tokens: Option<u64>,
    /// Its whole reservation, charged in that call: nothing is left to check or take.
    pub reserved: Option<Reservation>,
    /// Whether it holds its lease. `false`: a budget or a rate limit refused it in that call,
    /// which took nothing; it ends refused without waiting (it has no place in the cap).
    pub leased: bool,
}

impl Admission {
    /// Nothing decided (Redis failed under `fail_open`): the task asks again, its prompt
    /// counted already if `prompt_tokens`.
    pub fn undecided(prompt_tokens: Option<u64>) -> Admission {
        Admission {
            spent: None,
            checked: None,
            prompt_tokens,
            reserved: None,
            leased: true,
        }
    }
}

/// How a stream ended: what its terminal frame says. An upstream attempt returns one too when
/// it did not fail (done, or cancelled), else the error the retry policy judges.
#[derive(Debug)]
pub enum Outcome {
    Done {
        finish_reason: String,
        /// The upstream's `usage` while the stream runs; what was billed once [`run`] returns.
        usage: Option<Usage>,
        /// The model that answered (a fallback's, if one served).
        model: String,
        /// The upstream's completion `id` and `system_fingerprint`, from the last chunk that
        /// had them.
        completion_id: Option<String>,
        system_fingerprint: Option<String>,
    },
    Failed(Failure),
    Cancelled(CancelReason),
}

impl Outcome {
    /// The stream was cancelled; why, as its `cancel` said (set before its token fires).
    fn cancelled(stream: &Stream) -> Outcome {
        Outcome::Cancelled(stream.cancel_reason().unwrap_or(CancelReason::Client))
    }

    fn failed(code: ErrorCode, message: String, retry_after: Option<Duration>) -> Outcome {
        Outcome::Failed(Failure::new(code, message, retry_after, false))
    }

    /// The `stream ended` line, one per stream, in the stream's span. Each part is its own
    /// field, short ones by `Display` and upstream text through [`protocol::LogSafe`]: the
    /// `Debug` of the whole outcome cost about 20,000 instructions a stream, most of it
    /// formatting machinery, and quoted strings twice. Its target stays the session's, where
    /// it was logged before, so log filters keep matching it.
    pub fn log(&self) {
        use tracing::field::{display, DisplayValue};
        fn safe(s: &Option<String>) -> Option<DisplayValue<protocol::LogSafe<'_>>> {
            s.as_deref().map(|s| display(protocol::LogSafe(s)))
        }
        match self {
            Outcome::Done {
                finish_reason,
                usage,
                model,
                completion_id,
                system_fingerprint,
            } => tracing::info!(
                target: "muxgate::session",
                outcome = "done",
                finish_reason = %protocol::LogSafe(finish_reason),
                model = %protocol::LogSafe(model),
                prompt_tokens = usage.as_ref().map(|u| u.prompt_tokens),
                completion_tokens = usage.as_ref().map(|u| u.completion_tokens),
                total_tokens = usage.as_ref().map(|u| u.total_tokens),
                usage_details = usage
                    .as_ref()
                    .filter(|u| !u.details.is_empty())
                    .map(|u| display(UsageDetails(&u.details))),
                completion_id = safe(completion_id),
                system_fingerprint = safe(system_fingerprint),
                "stream ended"
            ),
            Outcome::Failed(f) => {
                let detail = f.upstream.as_ref();
                tracing::info!(
                    target: "muxgate::session",
                    outcome = "failed",
                    code = f.code.as_str(),
                    error = %protocol::LogSafe(&f.message),
                    status = f.status,
                    retry_after_ms = f.retry_after.map(|d| d.as_millis() as u64),
                    may_fall_back = f.may_fall_back,
                    upstream_type = detail.and_then(|d| safe(&d.r#type)),
                    upstream_code = detail.and_then(|d| safe(&d.code)),
                    upstream_param = detail.and_then(|d| safe(&d.param)),
                    "stream ended"
                )
            }
            Outcome::Cancelled(reason) => {
                tracing::info!(target: "muxgate::session", outcome = "cancelled", reason = ?reason, "stream ended")
            }
        }
    }
}

/// A usage's extra fields (`prompt_tokens_details`, ...) as compact JSON, made safe for a
/// log line; only formatted when the line is written.
struct UsageDetails<'a>(&'a Map<String, Value>);

impl std::fmt::Display for UsageDetails<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let json = serde_json::to_string(self.0).map_err(|_| std::fmt::Error)?;
        protocol::LogSafe(&json).fmt(f)
    }
}

/// Builds the upstream body for `model`: the client's messages and allowed params, with
/// `stream`, `stream_options.include_usage` and `user` always set by the gateway. `user_id`
/// is the authenticated user's keyed hash (`Upstreams::user_id`): a
/// client-sent `params.user` is replaced, so a client cannot pose as another user upstream.
pub fn upstream_body(
    req: &OpenRequest,
    model: &str,
    user_id: &str,
) -> Result<Bytes, serde_json::Error> {
    use serde::ser::{SerializeMap, Serializer};
    /// Keys the gateway sets; a client's own value for one of them is dropped.
    const SET_HERE: [&str; 5] = ["model", "user", "messages", "stream", "stream_options"];
    // Written straight from the request: building a `Map` first cloned every message and
    // param (about 11,000 instructions a stream), only to serialise the copy.
    let mut out = Vec::with_capacity(256);
    let mut ser = serde_json::Serializer::new(&mut out);
    let mut body = ser.serialize_map(None)?;
    for (k, v) in &req.params {
        if !SET_HERE.contains(&k.as_str()) {
            body.serialize_entry(k, v)?;
        }
    }
    body.serialize_entry("model", model)?;
    body.serialize_entry("user", user_id)?;
    body.serialize_entry("messages", &req.messages)?;
    body.serialize_entry("stream", &true)?;
    body.serialize_entry(
        "stream_options",
        &IncludeUsage {
            include_usage: true,
        },
    )?;
    body.end()?;
    Ok(Bytes::from(out))
}

#[derive(serde::Serialize)]
struct IncludeUsage {
    include_usage: bool,
}

/// Checks an `open` request's messages and params. The message text is the client's to
/// send; only the shape is checked.
pub fn validate_open(req: &OpenRequest, allowed_params: &[String]) -> Result<(), String> {
    if req.model.is_empty() || req.model.len() > 200 {
        return Err("`model` must be 1-200 characters".into());
    }
    if req.messages.is_empty() {
        return Err("`messages` must not be empty".into());
    }
    for (i, m) in req.messages.iter().enumerate() {
        let ok = m
            .as_object()
            .and_then(|o| o.get("role"))
            .is_some_and(Value::is_string);
        if !ok {
            return Err(format!(
                "`messages[{i}]` must be an object with a string `role`"
            ));
        }
    }
    // One stream is one choice: the frames have no choice index to tell several apart. `n: 1`
    // asks for what a stream is anyway, so it passes whatever the allow-list says.
    if let Some(n) = req.params.get("n") {
        if n.as_u64() != Some(1) {
            return Err("n > 1 is not supported: one stream is one choice".into());
        }
    }
    for key in req.params.keys() {
        if key != "n" && !allowed_params.iter().any(|a| a == key) {
            return Err(format!("parameter `{key}` is not allowed"));
        }
    }
    Ok(())
}

/// The refusal frame for an `open` that a budget or a rate limit refuses right now, decided
/// without charging anything or counting the prompt; `None` when it may go on (a tier that
/// waits for its limits waits in the stream's task). Checked before the stream is registered,
/// so a refused open costs no `Stream`, no timer and no tokenizer time. The stream's task
/// checks again before it charges: this is only the cheap first look.
pub fn refuse_early(
    gw: &Gateway,
    user: &Arc<str>,
    tier: &Tier,
    req: &OpenRequest,
) -> Option<axum::extract::ws::Utf8Bytes> {
    let tier_name = &*tier.name;
    let id = Some(req.id.as_str());
    // Counted as a stream that ended refused, as it was when refusals happened in its task.
    let ended = |code: ErrorCode| {
        gw.metrics.stream_finished(&StreamOutcome {
            model: &req.model,
            provider: "none",
            tier: tier_name,
            status: code.as_str(),
            duration: Duration::ZERO,
            time_to_first_token: None,
            upstream_time_to_first_byte: None,
            queue_wait: Duration::ZERO,
        });
    };
    if let Err(over) = gw.budgets.check(user, tier_name) {
        gw.metrics.refused("budget");
        ended(ErrorCode::BudgetExceeded);
        let retry_after = Some(over.retry_after.as_millis() as u64);
        return Some(protocol::error(
            id,
            ErrorCode::BudgetExceeded,
            &over.to_string(),
            retry_after,
        ));
    }
    let limited = gw
        .limits
        .check(user, tier, completion_reservation(gw, req))
        .err()?;
    if tier.waits_for(limited.retry_after, Duration::ZERO) {
        return None;
    }
    gw.metrics.refused(limited.kind.as_str());
    ended(ErrorCode::RateLimited);
    Some(protocol::error(
        id,
        ErrorCode::RateLimited,
        &limited.message(),
        limited.retry_after.map(|d| d.as_millis() as u64),
    ))
}

/// Completion tokens to reserve: the larger of `max_tokens` and `max_completion_tokens` when
/// the client set either, else the configured default.
pub(crate) fn completion_reservation(gw: &Gateway, req: &OpenRequest) -> u64 {
    let max_tokens = ["max_tokens", "max_completion_tokens"]
        .iter()
        .filter_map(|k| req.params.get(*k).and_then(Value::as_u64))
        .max();
    gw.limits.completion_reservation(max_tokens)
}

/// Runs one stream to its end: budget, rate limits, a queue slot, the upstream call with
/// retries and fallbacks. Never returns before the terminal frame is in the log. Bills and
/// records what the stream used, whatever way it ended.
pub async fn run(mut job: Job) -> Outcome {
    let linger = Duration::from_millis(job.gw.config.session.resume_window_ms);
    let ending = Ending::new(job.lease.take(), linger);
    let gw = &job.gw;
    let stream = &job.stream;
    let _live = gw.metrics.stream_started();
    let mut t = Timings::new(Duration::from_millis(
        gw.config.upstream.max_stream_duration_ms,
    ));
    let (mut outcome, reservation, prompt_tokens) = drive(&job, &mut t).await;
    let key = t.delivered + 1;
    let (model, reported) = match &mut outcome {
        Outcome::Done { model, usage, .. } => (model.clone(), usage.take()),
        _ => (job.req.model.clone(), None),
    };
    let bill = billing::Settlement {
        model: &model,
        tier: &job.tier.name,
        user: &stream.user,
        price: gw.config.pricing.get(&model).copied(),
        reservation,
        prompt_tokens,
        reported,
        accepted: t.accepted,
        generated: std::mem::take(&mut t.generated),
    }
    .settle(&gw.limits, &gw.budgets, &gw.metrics, ending)
    .await;
    let terminal = match &mut outcome {
        Outcome::Done {
            finish_reason,
            usage,
            completion_id,
            system_fingerprint,
            ..
        } => {
            let served_by = (model != job.req.model).then_some(model.as_str());
            let frame = protocol::done(&protocol::Done {
                id: &stream.id,
                seq: key,
                finish_reason,
                usage: bill.usage.as_ref(),
                cost_usd: bill.cost_usd,
                served_by,
                usage_estimated: bill.estimated,
                completion_id: completion_id.as_deref(),
                system_fingerprint: system_fingerprint.as_deref(),
            });
            *usage = bill.usage;
            frame
        }
        Outcome::Failed(failure) => {
            let retry_after = failure.retry_after.map(|d| d.as_millis() as u64);
            protocol::upstream_error(
                Some(&stream.id),
                failure.code,
                &failure.message,
                retry_after,
                failure.status,
                failure.upstream.as_ref(),
            )
        }
        Outcome::Cancelled(reason) => {
            let (code, message) = match reason {
                CancelReason::Client => (ErrorCode::Cancelled, "cancelled by the client"),
                CancelReason::ResumeExpired => {
                    (ErrorCode::Cancelled, "not resumed within the resume window")
                }
                CancelReason::Shutdown => (
                    ErrorCode::Internal,
                    "the gateway shut down before the stream finished",
                ),
            };
            protocol::error(Some(&stream.id), code, message, None)
        }
    };
    stream.finish(key, terminal);
    let status = match &outcome {
        Outcome::Done { .. } => metrics::STATUS_DONE,
        Outcome::Failed(failure) => failure.code.as_str(),
        Outcome::Cancelled(CancelReason::Shutdown) => ErrorCode::Internal.as_str(),
        Outcome::Cancelled(_) => ErrorCode::Cancelled.as_str(),
    };
    gw.metrics.stream_finished(&StreamOutcome {
        model: &model,
        provider: t.provider.as_deref().unwrap_or("none"),
        tier: &job.tier.name,
        status,
        duration: t.opened.elapsed(),
        time_to_first_token: t.first_delta.map(|at| at - t.opened),
        upstream_time_to_first_byte: t.upstream_started.zip(t.first_chunk).map(|(s, f)| f - s),
        queue_wait: t.waited,
    });
    outcome
}

/// Counts the prompt's tokens for the reservation, merging at most `limits.prompt_count_bytes`
/// of its text: past that, an upper bound (see [`billing::count_prompt`]), so one frame buys a
/// bounded amount of tokenizer CPU whatever its text. A short prompt is counted here (see
/// [`billing::count_small_prompt`]), a longer one off the async threads (see
/// [`billing::count_off_runtime`]).
async fn prompt_tokens(gw: &Gateway, req: &OpenRequest) -> u64 {
    if let Some(tokens) = small_prompt_tokens(gw, req) {
        return tokens;
    }
    let max_merged = gw.config.limits.prompt_count_bytes;
    let tools = req.params.get("tools").unwrap_or(&Value::Null).clone();
    let counted = billing::count_off_runtime(
        || (req.model.clone(), req.messages.clone(), tools),
        move |(model, messages, tools)| {
            billing::count_prompt(&model, &messages, &tools, max_merged)
        },
    )
    .await;
    counted.map_or(0, |counted| tokenized(gw, counted))
}

/// A short prompt's tokens (see [`billing::count_small_prompt`]), counted on this thread;
/// `None` for a longer one.
fn small_prompt_tokens(gw: &Gateway, req: &OpenRequest) -> Option<u64> {
    small_prompt(gw, req).map(|counted| tokenized(gw, counted))
}

/// [`small_prompt_tokens`] before it is recorded in the metrics (by [`tokenized`]). In cluster
/// mode a stream's open counts it before its one call to Redis, which then charges its whole
/// reservation, and records it only if that call did not refuse the stream.
pub(crate) fn small_prompt(
    gw: &Gateway,
    req: &OpenRequest,
) -> Option<(billing::PromptCount, Duration)> {
    let max_merged = gw.config.limits.prompt_count_bytes;
    let tools = req.params.get("tools").unwrap_or(&Value::Null);
    billing::count_small_prompt(&req.model, &req.messages, tools, max_merged)
}

/// Records a prompt's count in the tokenizer metrics; its tokens.
pub(crate) fn tokenized(gw: &Gateway, (count, took): (billing::PromptCount, Duration)) -> u64 {
    gw.metrics.tokenized(count.merged, took);
    gw.metrics.tokens_bounded(count.bounded);
    count.tokens
}

/// When things happened to one stream, for the latency metrics.
struct Timings {
    /// The stream's task started (the `open` frame was just read).
    opened: Instant,
    /// Time spent waiting by policy: for a rate limit under `on_limit = "wait"`, or in the
    /// upstream queue. Not gateway overhead.
    waited: Duration,
    /// The first upstream attempt began.
    upstream_started: Option<Instant>,
    /// The first chunk with any part of the answer arrived from the upstream.
    first_chunk: Option<Instant>,
    /// The first `delta` was in the stream's log, ready for its connection.
    first_delta: Option<Instant>,
    /// The last provider tried.
    provider: Option<String>,
    /// An upstream answered 200 and began streaming: from then on the prompt is billable.
    accepted: bool,
    /// Deltas pushed to the stream's log, so the `seq` of the last one. Only the first attempt
    /// that sends any part (text, reasoning, refusal, tool call) may do so: none is retried or
    /// falls back after its first token.
    delivered: u64,
    /// Every delta's text, reasoning, refusal and tool-call name and arguments, gathered as
    /// they go out: what a stream with no upstream `usage` is billed for. Not the replay log,
    /// which drops frames already written once it passes `session.stream_buffer_bytes`.
    generated: String,
    /// `opened` plus `upstream.max_stream_duration_ms`: no upstream call runs past it.
    ends_by: Instant,
    max_duration: Duration,
}

impl Timings {
    fn new(max_duration: Duration) -> Self {
        let opened = Instant::now();
        Timings {
            opened,
            ends_by: opened + max_duration,
            max_duration,
            waited: Duration::ZERO,
            upstream_started: None,
            first_chunk: None,
            first_delta: None,
            provider: None,
            accepted: false,
            delivered: 0,
            generated: String::new(),
        }
    }
}

/// Why a stream failed, as the client will read it.
pub struct Failure {
    code: ErrorCode,
    message: String,
    retry_after: Option<Duration>,
    /// Whether another model in the fallback chain may serve instead.
    may_fall_back: bool,
    /// The upstream's HTTP status, when its response was the failure.
    status: Option<u16>,
    /// What the upstream's error said of itself (`type`, `code`, `param`).
    upstream: Option<UpstreamDetail>,
}

impl Failure {
    fn new(
        code: ErrorCode,
        message: String,
        retry_after: Option<Duration>,
        may_fall_back: bool,
    ) -> Self {
        Failure {
            code,
            message,
            retry_after,
            may_fall_back,
            status: None,
            upstream: None,
        }
    }
}

/// Without the message: it can quote the upstream's text, which no log carries.
impl std::fmt::Debug for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Failure")
            .field("code", &self.code)
            .field("retry_after", &self.retry_after)
            .finish_non_exhaustive()
    }
}

impl From<UpstreamError> for Failure {
    fn from(e: UpstreamError) -> Self {
        Failure {
            code: e.code(),
            may_fall_back: e.retryable() || matches!(e, UpstreamError::CircuitOpen { .. }),
            retry_after: e.retry_after(),
            message: e.to_string(),
            status: e.status(),
            upstream: e.upstream_detail().cloned(),
        }
    }
}

/// Everything before the stream's end: refusals, limits, queue, upstream attempts. Returns
/// how it ended (with the upstream's `usage`, not yet billed), its reservation and the prompt
/// tokens counted for it.
async fn drive(job: &Job, t: &mut Timings) -> (Outcome, Option<Reservation>, u64) {
    let gw = &job.gw;
    let stream = &job.stream;
    let tier = &job.tier;
    let admission = job.admission.as_ref();
    // Admitted whole at the open: budgets, limits and the charge were one call.
    if let Some(reserved) = admission.and_then(|a| a.reserved.clone()) {
        let prompt_tokens = admission.and_then(|a| a.prompt_tokens).unwrap_or(0);
        return call_upstream(job, t, reserved, prompt_tokens).await;
    }
    let budget = match admission.and_then(|a| a.spent.as_deref()) {
        Some(spent) => gw
            .budgets
            .judge_shared(&stream.user, &tier.name, spent)
            .map_err(BudgetRefused::Over),
        None => gw.budgets.admits(&stream.user, &tier.name).await,
    };
    match budget {
        Ok(()) => {}
        Err(BudgetRefused::Over(over)) => {
            gw.metrics.refused("budget");
            let ended = Outcome::failed(
                ErrorCode::BudgetExceeded,
                over.to_string(),
                Some(over.retry_after),
            );
            return (ended, None, 0);
        }
        Err(BudgetRefused::Unavailable(e)) => {
            gw.metrics.refused("redis_unavailable");
            return (unavailable(e), None, 0);
        }
    }
    let completion = completion_reservation(gw, &job.req);
    // The request limits first, charging nothing: a stream refused (or still waiting) for
    // them has its prompt counted by no one. Both waits share the tier's one `max_wait_ms`.
    let waiting_since = Instant::now();
    let first = admission.and_then(|a| a.checked.clone());
    if let (Some(Err(limited)), false) = (&first, admission.is_none_or(|a| a.leased)) {
        return (rate_limited(job, limited.clone()), None, 0);
    }
    let checked = admit(job, completion, false, first, waiting_since).await;
    t.waited += waiting_since.elapsed();
    if let Err(ended) = checked {
        return (ended, None, 0);
    }
    let prompt_tokens = match admission.and_then(|a| a.prompt_tokens) {
        Some(tokens) => tokens,
        None => prompt_tokens(gw, &job.req).await,
    };
    let admitting = Instant::now();
    let admitted = admit(job, prompt_tokens + completion, true, None, waiting_since).await;
    t.waited += admitting.elapsed();
    let reservation = match admitted {
        Ok(r) => r.unwrap_or_else(|| Reservation::none(tier.name.clone())),
        Err(ended) => return (ended, None, prompt_tokens),
    };
    call_upstream(job, t, reservation, prompt_tokens).await
}

/// The admitted stream's upstream calls: a queue slot, then each model of its fallback chain
/// until one serves. Returns as [`drive`] does.
async fn call_upstream(
    job: &Job,
    t: &mut Timings,
    reservation: Reservation,
    prompt_tokens: u64,
) -> (Outcome, Option<Reservation>, u64) {
    let gw = &job.gw;
    let stream = &job.stream;
    let tier = &job.tier;
    let primary = job.req.model.as_str();
    let fallbacks = gw.config.fallbacks.get(primary).into_iter().flatten();
    let mut last: Option<Failure> = None;
    let mut started = false;
    for model in std::iter::once(primary).chain(fallbacks.map(String::as_str)) {
        let Some(provider) = gw.upstreams.route(model) else {
            continue;
        };
        if let Some(retry_after) = provider.breaker.open_for() {
            last = Some(Failure::from(UpstreamError::CircuitOpen {
                provider: provider.name.clone(),
                retry_after,
            }));
            continue;
        }
        t.provider = Some(provider.name.clone());
        let queueing = Instant::now();
        let waiter = stream.clone();
        let slot = provider
            .scheduler
            .acquire(
                &tier.name,
                tier.priority(),
                stream.cancelled().cancelled(),
                move |position| waiter.set_queued(position),
            )
            .await;
        t.waited += queueing.elapsed();
        let _slot = match slot {
            Ok(slot) => slot,
            Err(NoSlot::Cancelled) => {
                return (Outcome::cancelled(stream), Some(reservation), prompt_tokens)
            }
            Err(why) => {
                gw.metrics.refused(match why {
                    NoSlot::QueueFull => "queue_full",
                    _ => "queue_timeout",
                });
                let message = match why {
                    NoSlot::QueueFull => format!("provider `{}`: queue full", provider.name),
                    _ => format!(
                        "provider `{}`: no upstream slot within {} ms",
                        provider.name, gw.config.scheduler.queue_max_wait_ms
                    ),
                };
                last = Some(Failure::new(ErrorCode::Overloaded, message, None, true));
                continue;
            }
        };
        if !started {
            stream.set_start(protocol::start(&stream.id, &stream.model));
            started = true;
        }
        let body = match upstream_body(&job.req, model, &gw.upstreams.user_id(&stream.user)) {
            Ok(body) => body,
            Err(e) => {
                let ended = Outcome::failed(ErrorCode::BadRequest, e.to_string(), None);
                return (ended, Some(reservation), prompt_tokens);
            }
        };
        t.upstream_started.get_or_insert_with(Instant::now);
        match attempt_all(job, provider, body, model, t).await {
            Outcome::Failed(failure) if t.delivered == 0 && failure.may_fall_back => {
                tracing::info!(model, code = %failure.code, "falling back to the next model");
                last = Some(failure);
            }
            ended => return (ended, Some(reservation), prompt_tokens),
        }
    }
    let failure = last.unwrap_or_else(|| {
        let message = format!("no provider serves model `{primary}`");
        Failure::new(ErrorCode::BadRequest, message, None, false)
    });
    (Outcome::Failed(failure), Some(reservation), prompt_tokens)
}

/// Takes the stream's share of every rate limit (`charge`), or only checks it would pass,
/// waiting where the tier's policy allows (its wait counted from `waiting_since`). `Ok(None)`
/// when only checking. `first`: the first check's answer, read already (at the open).
async fn admit(
    job: &Job,
    tokens: u64,
    charge: bool,
    mut first: Option<Result<(), Limited>>,
    waiting_since: Instant,
) -> Result<Option<Reservation>, Outcome> {
    let limits = &job.gw.limits;
    let user = &job.stream.user;
    let tier = &job.tier;
    loop {
        let result = if let Some(checked) = first.take() {
            checked.map(|()| None).map_err(Refused::Limited)
        } else if charge {
            limits.acquire(user, tier, tokens).await.map(Some)
        } else {
            limits.admits(user, tier, tokens).await.map(|()| None)
        };
        let limited = match result {
            Ok(reservation) => return Ok(reservation),
            Err(Refused::Limited(limited)) => limited,
            Err(Refused::Unavailable(e)) => {
                job.gw.metrics.refused("redis_unavailable");
                return Err(unavailable(e));
            }
        };
        let wait = limited
            .retry_after
            .filter(|_| tier.waits_for(limited.retry_after, waiting_since.elapsed()));
        let Some(wait) = wait else {
            return Err(rate_limited(job, limited));
        };
        if until_cancelled(&job.stream, tokio::time::sleep(wait))
            .await
            .is_none()
        {
            return Err(Outcome::cancelled(&job.stream));
        }
    }
}

/// A stream refused by `limited`, counted.
fn rate_limited(job: &Job, limited: Limited) -> Outcome {
    job.gw.metrics.refused(limited.kind.as_str());
    Outcome::failed(
        ErrorCode::RateLimited,
        limited.message(),
        limited.retry_after,
    )
}

/// A stream refused because the shared limits cannot be read (cluster mode, `fail_closed`).
fn unavailable(e: crate::cluster::Unavailable) -> Outcome {
    Outcome::failed(ErrorCode::Overloaded, e.to_string(), None)
}

/// Calls one provider until it answers, retrying failures before the first token as
/// [`crate::retry`] decides.
async fn attempt_all(
    job: &Job,
    provider: &Provider,
    body: Bytes,
    model: &str,
    t: &mut Timings,
) -> Outcome {
    let stream = &job.stream;
    let policy = &job.gw.config.retry;
    let mut retries = 0u32;
    loop {
        let error = match attempt(job, provider, body.clone(), model, t).await {
            Ok(ended) => return ended,
            Err(e) => e,
        };
        let failed = retry::Failed {
            attempts: retries + 1,
            transient: error.retryable(),
            delivered: t.delivered > 0,
            retry_after: error.retry_after(),
        };
        let Some(wait) = policy.next_wait(&failed, &mut rand::thread_rng()) else {
            // The kind and status only: upstream messages can quote the conversation.
            tracing::warn!(provider = %provider.name, kind = error.kind(), status = error.status(), attempts = retries + 1, "upstream failed");
            return Outcome::Failed(error.into());
        };
        job.gw.metrics.upstream_retry(&provider.name, error.kind());
        tracing::info!(provider = %provider.name, kind = error.kind(), status = error.status(), ?wait, "retrying upstream");
        retries += 1;
        if until_cancelled(stream, tokio::time::sleep(wait))
            .await
            .is_none()
        {
            return Outcome::cancelled(stream);
        }
    }
}

/// Runs `f` unless the stream is cancelled first. Dropping `f` is what aborts an upstream
/// request at once: its connection is closed, not returned to the pool.
async fn until_cancelled<F: Future>(stream: &Stream, f: F) -> Option<F::Output> {
    tokio::select! {
        out = f => Some(out),
        _ = stream.cancelled().cancelled() => None,
    }
}

/// One upstream call, let through by the provider's breaker and reported back to it. Ends
/// the stream (done, or cancelled) or fails with an error the caller may retry; the deltas it
/// pushes are counted in `t.delivered`, so the caller knows whether any part went out.
async fn attempt(
    job: &Job,
    provider: &Provider,
    body: Bytes,
    model: &str,
    t: &mut Timings,
) -> Result<Outcome, UpstreamError> {
    if let Err(retry_after) = provider.breaker.try_pass() {
        return Err(UpstreamError::CircuitOpen {
            provider: provider.name.clone(),
            retry_after,
        });
    }
    let result = relay_once(&job.stream, provider, body, model, t).await;
    let health = match &result {
        Ok(Outcome::Done { .. }) => Health::Success,
        Ok(_) => Health::Neutral,
        Err(e) => e.health(),
    };
    provider.breaker.report(health);
    result
}

async fn relay_once(
    stream: &Arc<Stream>,
    provider: &Provider,
    body: Bytes,
    model: &str,
    t: &mut Timings,
) -> Result<Outcome, UpstreamError> {
    let first_token_deadline = Instant::now() + provider.first_token_timeout;
    let ends_by = t.ends_by;
    let max_duration = t.max_duration;
    // Whichever comes first: the timeout the upstream is in, or the stream's end of life.
    let timed_out = |delivered: u64| {
        if Instant::now() >= ends_by {
            UpstreamError::MaxDuration(max_duration)
        } else if delivered == 0 {
            UpstreamError::FirstTokenTimeout(provider.first_token_timeout)
        } else {
            UpstreamError::IdleTimeout(provider.idle_timeout)
        }
    };
    let opened = tokio::time::timeout_at(first_token_deadline.min(ends_by), provider.open(body));
    let Some(opened) = until_cancelled(stream, opened).await else {
        return Ok(Outcome::cancelled(stream));
    };
    let mut events = opened.map_err(|_| timed_out(0))??;
    t.accepted = true;
    let mut finish_reason: Option<String> = None;
    let mut usage = None;
    let mut completion_id: Option<String> = None;
    let mut system_fingerprint: Option<String> = None;
    let mut read_ids = false;
    let done = |finish_reason: String,
                usage: Option<Usage>,
                completion_id: Option<String>,
                system_fingerprint: Option<String>| Outcome::Done {
        finish_reason,
        usage,
        model: model.to_string(),
        completion_id,
        system_fingerprint,
    };
    // One timer for the whole call: first the first-token deadline, then the idle timeout
    // after each token, never past `ends_by`. `due` is when the wait really ends; the timer
    // is moved only when `due` comes sooner than it, or when it fires and finds `due` later
    // (resetting it on every chunk was the timer wheel's work per chunk, ~160 instructions).
    let mut due = first_token_deadline.min(ends_by);
    let deadline = tokio::time::sleep_until(due);
    tokio::pin!(deadline);
    loop {
        // A cancel takes effect before the next event, even when the upstream never pauses;
        // the cancel and the timer are only polled when there is nothing to read. Both checks
        // are the stream's flag (an atomic), not the token (a mutex per look).
        if stream.is_cancelled() {
            return Ok(Outcome::cancelled(stream));
        }
        let next = std::future::poll_fn(|cx| {
            if let Poll::Ready(next) = events.poll_next_unpin(cx) {
                Poll::Ready(Wait::Event(next))
            } else if stream.poll_cancelled(cx).is_ready() {
                Poll::Ready(Wait::Cancelled)
            } else {
                while deadline.as_mut().poll(cx).is_ready() {
                    if due <= deadline.deadline() {
                        return Poll::Ready(Wait::TimedOut);
                    }
                    // Events came since the timer was set: wait on, until `due`.
                    deadline.as_mut().reset(due);
                }
                Poll::Pending
            }
        })
        .await;
        let next = match next {
            Wait::Event(next) => next,
            Wait::Cancelled => return Ok(Outcome::cancelled(stream)),
            Wait::TimedOut => return Err(timed_out(t.delivered)),
        };
        let event = match next {
            None => {
                // A clean end without [DONE] is fine once the upstream said why it finished.
                return match finish_reason {
                    Some(reason) => Ok(done(reason, usage, completion_id, system_fingerprint)),
                    None => Err(UpstreamError::Broken(
                        "the upstream closed the stream before finishing".into(),
                    )),
                };
            }
            Some(Err(e)) => return Err(e),
            Some(Ok(event)) => event,
        };
        // One clock read per stream, not per chunk: only the first answering chunk's time counts.
        let received = t.first_chunk.is_none().then(Instant::now);
        if event.data == "[DONE]" {
            events.last_event();
            let reason = finish_reason.unwrap_or_else(|| "stop".into());
            return Ok(done(reason, usage, completion_id, system_fingerprint));
        }
        let mut chunk = provider.parse_chunk(&event.data)?;
        // The ids are read apart (see `upstream::chunk_ids`): from the first chunk and from
        // those that can be the last to carry them. Copied only when they change.
        if !read_ids || chunk.finish_reason.is_some() || chunk.usage.is_some() {
            read_ids = true;
            let ids = upstream::chunk_ids(&event.data);
            remember(&mut completion_id, ids.id());
            remember(&mut system_fingerprint, ids.system_fingerprint());
        }
        if chunk.usage.is_some() {
            usage = chunk.usage.take().map(|u| *u);
        }
        if let Some(reason) = chunk.finish_reason.take() {
            finish_reason = Some(reason.into_owned());
        }
        if chunk.has_part() {
            if t.delivered == 0 {
                t.first_chunk = received;
            }
            t.delivered += 1;
            let seq = t.delivered;
            let parts = chunk.parts();
            gather(&mut t.generated, &parts);
            if !stream
                .push(seq, protocol::delta_parts(&stream.id, seq, &parts))
                .await
            {
                return Ok(Outcome::cancelled(stream));
            }
            t.first_delta.get_or_insert_with(Instant::now);
        }
        if t.delivered > 0 {
            // Any event after the first token proves the upstream alive.
            due = (Instant::now() + provider.idle_timeout).min(ends_by);
            if due < deadline.deadline() {
                deadline.as_mut().reset(due);
            }
        }
    }
}

/// What ended a wait of [`relay_once`] for the upstream's next event.
enum Wait<T> {
    Event(T),
    Cancelled,
    TimedOut,
}

/// Sets `slot` to `value` when it is new, without allocating when it is the same again.
fn remember(slot: &mut Option<String>, value: Option<&str>) {
    if let Some(value) = value {
        if slot.as_deref() != Some(value) {
            *slot = Some(value.to_owned());
        }
    }
}

/// Appends what a delta's parts cost in completion tokens to `generated`: its text, reasoning
/// and refusal, and each tool-call fragment's function name and arguments.
fn gather(generated: &mut String, parts: &DeltaParts<'_>) {
    generated.push_str(parts.text);
    for s in [parts.reasoning, parts.refusal].into_iter().flatten() {
        generated.push_str(s);
    }
    let Some(raw) = parts.tool_calls else {
        return;
    };
    #[derive(serde::Deserialize)]
    struct Fragment<'a> {
        #[serde(borrow, default)]
        function: Option<Function<'a>>,
    }
    #[derive(serde::Deserialize)]
    struct Function<'a> {
        #[serde(borrow, default)]
        name: Option<Cow<'a, str>>,
        #[serde(borrow, default)]
        arguments: Option<Cow<'a, str>>,
    }
    // Relayed verbatim whatever their shape; a shape this does not know counts as its JSON.
    match serde_json::from_str::<Vec<Fragment<'_>>>(raw.get()) {
        Ok(fragments) => {
            for f in fragments.iter().filter_map(|f| f.function.as_ref()) {
                for s in [&f.name, &f.arguments].into_iter().flatten() {
                    generated.push_str(s);
                }
            }
        }
        Err(_) => generated.push_str(raw.get()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn open(params: Value) -> OpenRequest {
        serde_json::from_value(serde_json::json!({
            "id": "s", "model": "m", "messages": [{"role":"user","content":"hi"}], "params": params
        }))
        .expect("open")
    }

    #[test]
    fn body_forces_streaming_and_usage() {
        let req = open(serde_json::json!({"temperature": 0.5, "user": "someone-else"}));
        let body: Value =
            serde_json::from_slice(&upstream_body(&req, "m2", "u-hash").expect("body"))
                .expect("json");
        assert_eq!(body["stream"], true);
        assert_eq!(body["stream_options"]["include_usage"], true);
        assert_eq!(body["temperature"], 0.5);
        assert_eq!(body["model"], "m2", "the model actually called");
        assert_eq!(body["user"], "u-hash", "never the client's `user`");
    }

    #[test]
    fn body_sets_each_gateway_key_once() {
        let req = open(serde_json::json!({
            "user": "someone-else", "stream": false, "model": "x",
            "stream_options": {"include_usage": false}, "top_p": 1
        }));
        let bytes = upstream_body(&req, "m2", "u-hash").expect("body");
        let text = std::str::from_utf8(&bytes).expect("utf8");
        for key in [
            "\"user\":",
            "\"stream\":",
            "\"model\":",
            "\"stream_options\":",
            "\"messages\":",
        ] {
            assert_eq!(text.matches(key).count(), 1, "{key} in {text}");
        }
        let body: Value = serde_json::from_str(text).expect("json");
        assert_eq!(
            body["messages"],
            serde_json::json!([{"role":"user","content":"hi"}])
        );
        assert_eq!(
            body["stream_options"],
            serde_json::json!({"include_usage": true})
        );
        assert_eq!(body["stream"], true);
        assert_eq!(body["top_p"], 1);
    }

    #[test]
    fn validation() {
        let allowed = crate::config::default_allowed_params();
        assert!(validate_open(&open(serde_json::json!({"max_tokens": 5})), &allowed).is_ok());
        let e = validate_open(&open(serde_json::json!({"stream": false})), &allowed)
            .expect_err("stream");
        assert!(e.contains("`stream`"), "{e}");
        let mut req = open(serde_json::json!({}));
        req.messages = vec![serde_json::json!("hi")];
        assert!(validate_open(&req, &allowed).is_err());
        req.messages.clear();
        assert!(validate_open(&req, &allowed).is_err());

        for n in [
            serde_json::json!(2),
            serde_json::json!(0),
            serde_json::json!("1"),
        ] {
            let e = validate_open(&open(serde_json::json!({ "n": n })), &allowed).expect_err("n");
            assert_eq!(e, "n > 1 is not supported: one stream is one choice");
        }
        assert!(validate_open(&open(serde_json::json!({"n": 1})), &allowed).is_ok());
        let tools = serde_json::json!({"tools": [], "tool_choice": "auto", "parallel_tool_calls": true,
            "logprobs": true, "top_logprobs": 2, "modalities": ["text"], "prediction": {},
            "store": false, "metadata": {}, "service_tier": "auto"});
        assert!(
            validate_open(&open(tools), &allowed).is_ok(),
            "issue 12's defaults"
        );
    }

    #[test]
    fn gathered_for_the_estimate() {
        let calls = serde_json::value::RawValue::from_string(
            r#"[{"index":0,"id":"c","type":"function","function":{"name":"get_weather","arguments":"{\"ci"}},{"index":1,"function":{"arguments":"ty\"}"}}]"#.into(),
        )
        .expect("raw");
        let mut out = String::new();
        gather(
            &mut out,
            &DeltaParts {
                text: "Hi ",
                reasoning: Some("think "),
                refusal: Some("no "),
                tool_calls: Some(&calls),
                logprobs: None,
            },
        );
        assert_eq!(out, "Hi think no get_weather{\"city\"}");
        let odd = serde_json::value::RawValue::from_string(r#"[1,2]"#.into()).expect("raw");
        let mut out = String::new();
        gather(
            &mut out,
            &DeltaParts {
                tool_calls: Some(&odd),
                ..DeltaParts::default()
            },
        );
        assert_eq!(out, "[1,2]", "an unknown shape counts as its JSON");
    }

    #[test]
    fn remembers_without_copying_the_same() {
        let mut slot = None;
        remember(&mut slot, None);
        assert_eq!(slot, None);
        remember(&mut slot, Some("a"));
        remember(&mut slot, None);
        assert_eq!(slot.as_deref(), Some("a"));
        remember(&mut slot, Some("b"));
        assert_eq!(slot.as_deref(), Some("b"));
    }
}
