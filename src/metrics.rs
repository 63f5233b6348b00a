//! Prometheus metrics: what the gateway does and what it costs.
//!
//! One [`Metrics`] per process, shared in an `Arc`; every method takes `&self`. Served by
//! `GET /metrics` as [`Metrics::encode`] with [`CONTENT_TYPE`]. Every metric is listed in
//! `docs/metrics.md` and drawn in `docs/grafana-dashboard.json`.
//!
//! # Cost
//! Nothing here runs per upstream chunk. [`Metrics::frames_sent`] runs once per socket write
//! batch and only adds to two unlabelled atomic counters. Labelled series are looked up in their
//! family (a short read lock inside `prometheus-client`) once per stream when it ends, once per
//! retry or refusal, and on queue or breaker state changes.
//!
//! # Cardinality
//! Labels hold only bounded values: providers and tiers come from the config, statuses and
//! reasons are `&'static str` (error codes and limit names from code, never from a request).
//! The model comes from the client, and a provider serving `models = ["*"]` accepts any name, so
//! the first [`MAX_MODEL_LABELS`] distinct models keep their name and later ones are counted as
//! [`OTHER_MODEL`]. No label carries a user id: spend per user is in the admin view
//! ([`crate::billing::Budgets::snapshot`]).

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use dashmap::DashSet;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// `Content-Type` of [`Metrics::encode`]'s output: the Prometheus text format 0.0.4, which every
/// Prometheus-compatible scraper reads.
pub const CONTENT_TYPE: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

/// How many distinct model names get their own label value; the rest become [`OTHER_MODEL`].
pub const MAX_MODEL_LABELS: usize = 64;

/// The `model` label value of models past [`MAX_MODEL_LABELS`].
pub const OTHER_MODEL: &str = "other";

/// `status` of [`StreamOutcome`] for a stream that ended with `done`.
pub const STATUS_DONE: &str = "done";

/// Time to first token, seconds: interactive answers land between 0.2 s and a few seconds,
/// reasoning models can think for a minute.
const TTFT_BUCKETS: [f64; 15] = [
    0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 7.5, 10.0, 15.0, 30.0, 60.0,
];

/// Whole stream, seconds: from a one-line answer to a long generation.
const DURATION_BUCKETS: [f64; 14] = [
    0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0,
];

/// Gateway overhead, seconds: fine from 50 µs, because the relay itself should cost well under
/// a millisecond, up to 1 s, where something is badly wrong.
const OVERHEAD_BUCKETS: [f64; 16] = [
    0.00005, 0.0001, 0.00025, 0.0005, 0.00075, 0.001, 0.0025, 0.005, 0.0075, 0.01, 0.025, 0.05,
    0.1, 0.25, 0.5, 1.0,
];

/// How one stream ended, for [`Metrics::stream_finished`].
///
/// Times are measured by the caller with a monotonic clock (`tokio::time::Instant`).
#[derive(Debug, Clone, Copy)]
pub struct StreamOutcome<'a> {
    /// The model the client asked for.
    pub model: &'a str,
    /// The provider that served it (the last one tried), or `"none"` if none was chosen.
    pub provider: &'a str,
    /// The tier of the user's token.
    pub tier: &'a str,
    /// [`STATUS_DONE`], or the error code of the stream's terminal `error` frame
    /// (`ErrorCode::as_str()`), `cancelled` included.
    pub status: &'static str,
    /// From the `open` frame read to the terminal frame appended to the stream's log.
    pub duration: Duration,
    /// From the `open` frame read to the first `delta` frame written to a socket, as the client
    /// sees it; `None` if no token was produced.
    pub time_to_first_token: Option<Duration>,
    /// From the first upstream request of this stream being sent to the first byte of the
    /// answer that was relayed: failed attempts and their backoff count as upstream time, not
    /// as gateway overhead. `None` if the upstream never answered.
    pub upstream_time_to_first_byte: Option<Duration>,
    /// Time spent waiting in the scheduler's queue before the upstream call (zero without a
    /// queue): a policy decision, visible in `muxgate_queue_depth`, so not counted as overhead.
    pub queue_wait: Duration,
}

impl StreamOutcome<'_> {
    /// The gateway's own share of the time to first token, when both ends were measured.
    pub fn overhead(&self) -> Option<Duration> {
        let ttft = self.time_to_first_token?;
        let upstream = self.upstream_time_to_first_byte?;
        Some(
            ttft.saturating_sub(upstream)
                .saturating_sub(self.queue_wait),
        )
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StreamLabels {
    model: String,
    provider: String,
    tier: String,
    status: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ModelLabels {
    model: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct QueueLabels {
    provider: String,
    tier: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RetryLabels {
    provider: String,
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OpLabels {
    op: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DirectionLabels {
    direction: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TokenLabels {
    model: String,
    tier: String,
    kind: &'static str,
    estimated: bool,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SpendLabels {
    model: String,
    tier: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ProviderLabels {
    provider: String,
}

type SpendCounter = Counter<f64, AtomicU64>;
type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

/// Every metric of the gateway, registered once.
#[derive(Debug)]
pub struct Metrics {
    /// Owns the descriptors; the fields below are clones of the same `Arc`-backed metrics, kept
    /// so that recording needs no lookup by name.
    registry: Registry,
    ws_connections: Gauge,
    ws_connections_opened: Counter,
    users_multi_socket: Gauge,
    live_streams: Gauge,
    queue_depth: Family<QueueLabels, Gauge>,
    streams: Family<StreamLabels, Counter>,
    time_to_first_token: HistogramFamily<ModelLabels>,
    stream_duration: HistogramFamily<ModelLabels>,
    gateway_overhead: Histogram,
    upstream_retries: Family<RetryLabels, Counter>,
    refusals: Family<ReasonLabels, Counter>,
    tokens: Family<TokenLabels, Counter>,
    spend: Family<SpendLabels, SpendCounter>,
    breaker_state: Family<ProviderLabels, Gauge>,
    ws_sent_frames: Counter,
    ws_sent_bytes: Counter,
    tokenizer_bytes: Counter,
    tokenizer_seconds: Counter<f64, std::sync::atomic::AtomicU64>,
    /// Prompt bytes past `limits.prompt_count_bytes`, reserved at a token per byte unread.
    tokenizer_bounded_bytes: Counter,
    /// 1 while the last call to the shared store (Redis, cluster mode) succeeded; 0 after one
    /// failed or timed out. Absent from the output in single-process mode.
    redis_up: Gauge,
    /// Failed or timed-out Redis calls by operation.
    redis_errors: Family<OpLabels, Counter>,
    /// Decisions taken on this instance's own counters because Redis failed (`fail_open`), by
    /// operation.
    redis_fallbacks: Family<OpLabels, Counter>,
    /// Operator goaways this instance applied on another instance's behalf (cluster mode).
    goaways_relayed: Counter,
    /// Streams relayed here from the instance running them, for a client that resumed here.
    cross_instance_relays: Counter,
    /// Relays asked for again after a lost message.
    cross_instance_rerequests: Counter,
    /// Frames relayed between instances, by direction (`sent` by the owner, `received` by
    /// the mirror).
    cross_instance_frames: Family<DirectionLabels, Counter>,
    /// Model names that have a label of their own (see the module docs on cardinality).
    models: DashSet<String>,
    /// `models.len()` without walking the set's shards; may run ahead by a racing insert.
    model_count: AtomicUsize,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    /// Registers every metric, all at zero (labelled families appear on first use).
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("muxgate");
        let m = Metrics {
            ws_connections: Gauge::default(),
            ws_connections_opened: Counter::default(),
            users_multi_socket: Gauge::default(),
            live_streams: Gauge::default(),
            queue_depth: Family::default(),
            streams: Family::default(),
            time_to_first_token: Family::new_with_constructor(ttft_histogram),
            stream_duration: Family::new_with_constructor(duration_histogram),
            gateway_overhead: Histogram::new(OVERHEAD_BUCKETS),
            upstream_retries: Family::default(),
            refusals: Family::default(),
            tokens: Family::default(),
            spend: Family::default(),
            breaker_state: Family::default(),
            ws_sent_frames: Counter::default(),
            ws_sent_bytes: Counter::default(),
            tokenizer_bytes: Counter::default(),
            tokenizer_seconds: Counter::default(),
            tokenizer_bounded_bytes: Counter::default(),
            redis_up: Gauge::default(),
            redis_errors: Family::default(),
            redis_fallbacks: Family::default(),
            goaways_relayed: Counter::default(),
            cross_instance_relays: Counter::default(),
            cross_instance_rerequests: Counter::default(),
            cross_instance_frames: Family::default(),
            models: DashSet::new(),
            model_count: AtomicUsize::new(0),
            registry: Registry::default(),
        };
        // Counter names go in without `_total`: the encoder appends it.
        registry.register(
            "ws_connections",
            "WebSocket connections open now",
            m.ws_connections.clone(),
        );
        registry.register(
            "ws_connections_opened",
            "WebSocket connections accepted since start",
            m.ws_connections_opened.clone(),
        );
        registry.register(
            "users_multi_socket",
            "Users with more than one WebSocket open now",
            m.users_multi_socket.clone(),
        );
        registry.register(
            "live_streams",
            "Streams running now, attached to a socket or waiting for a resume",
            m.live_streams.clone(),
        );
        registry.register(
            "queue_depth",
            "Streams waiting in the scheduler's queue for an upstream slot",
            m.queue_depth.clone(),
        );
        registry.register(
            "streams",
            "Streams ended, by final status: done or the error code",
            m.streams.clone(),
        );
        registry.register(
            "time_to_first_token_seconds",
            "From the open frame to the first delta frame written to the client",
            m.time_to_first_token.clone(),
        );
        registry.register(
            "stream_duration_seconds",
            "From the open frame to the stream's terminal frame",
            m.stream_duration.clone(),
        );
        registry.register(
            "gateway_overhead_seconds",
            "Time to first token minus the upstream's own time to first byte and the queue wait",
            m.gateway_overhead.clone(),
        );
        registry.register(
            "upstream_retries",
            "Upstream attempts retried, by provider and failure kind",
            m.upstream_retries.clone(),
        );
        registry.register(
            "refusals",
            "Streams refused before reaching an upstream, by reason",
            m.refusals.clone(),
        );
        registry.register(
            "tokens",
            "Tokens billed, by kind (prompt or completion); estimated=true when the upstream sent no usage and the gateway counted them",
            m.tokens.clone(),
        );
        registry.register(
            "spend_usd",
            "Spend in US dollars at the configured prices",
            m.spend.clone(),
        );
        registry.register(
            "circuit_breaker_state",
            "Circuit breaker state per provider: 0 closed, 1 half-open, 2 open",
            m.breaker_state.clone(),
        );
        registry.register(
            "ws_sent_frames",
            "WebSocket frames written to clients",
            m.ws_sent_frames.clone(),
        );
        registry.register(
            "ws_sent_bytes",
            "WebSocket payload bytes written to clients",
            m.ws_sent_bytes.clone(),
        );
        registry.register(
            "tokenizer_bytes",
            "Bytes of text run through the tokenizer: prompts of admitted streams (up to limits.prompt_count_bytes each), and completions the upstream sent no usage for",
            m.tokenizer_bytes.clone(),
        );
        registry.register(
            "tokenizer_seconds",
            "Time spent in the tokenizer, on its bounded pool of blocking threads",
            m.tokenizer_seconds.clone(),
        );
        registry.register(
            "tokenizer_bounded_bytes",
            "Prompt bytes past limits.prompt_count_bytes, not run through the tokenizer but counted one token per byte (an upper bound)",
            m.tokenizer_bounded_bytes.clone(),
        );
        Metrics { registry, ..m }
    }

    /// A WebSocket was accepted (after the upgrade, before `hello`). Counts it in
    /// `muxgate_ws_connections_opened_total` and in the `muxgate_ws_connections` gauge until the
    /// returned guard is dropped, so a session that ends by any path, panic included, leaves the
    /// gauge right. Keep the guard in the session task.
    pub fn connection_opened(&self) -> OpenConnection {
        self.ws_connections_opened.inc();
        self.ws_connections.inc();
        OpenConnection {
            gauge: self.ws_connections.clone(),
        }
    }

    /// A user's count of open sockets went from `before` to `after` (call it on each attach and
    /// detach, with the counts the hub already keeps). Maintains `muxgate_users_multi_socket`
    /// without scanning users: the gauge moves only when a user crosses from one socket to two
    /// or back.
    pub fn user_connections_changed(&self, before: usize, after: usize) {
        match (before > 1, after > 1) {
            (false, true) => {
                self.users_multi_socket.inc();
            }
            (true, false) => {
                self.users_multi_socket.dec();
            }
            _ => {}
        }
    }

    /// A stream was admitted and its relay task starts. It counts in `muxgate_live_streams` until
    /// the returned guard is dropped; keep the guard in the relay task, which lives exactly as
    /// long as the stream does (through a resume window too).
    pub fn stream_started(&self) -> LiveStream {
        self.live_streams.inc();
        LiveStream {
            gauge: self.live_streams.clone(),
        }
    }

    /// Sets the number of streams waiting for an upstream slot of `provider` in `tier`
    /// (`muxgate_queue_depth`). Call it when the queue changes.
    pub fn set_queue_depth(&self, provider: &str, tier: &str, depth: usize) {
        let labels = QueueLabels {
            provider: provider.to_owned(),
            tier: tier.to_owned(),
        };
        self.queue_depth
            .get_or_create(&labels)
            .set(i64::try_from(depth).unwrap_or(i64::MAX));
    }

    /// A stream ended, by any path. Counts it in `muxgate_streams_total` and observes its
    /// duration, its time to first token and the gateway's overhead
    /// ([`StreamOutcome::overhead`]) when they were measured. Call it exactly once per stream,
    /// when its terminal frame is appended.
    pub fn stream_finished(&self, outcome: &StreamOutcome<'_>) {
        let model = self.model_label(outcome.model);
        self.streams
            .get_or_create(&StreamLabels {
                model: model.to_owned(),
                provider: outcome.provider.to_owned(),
                tier: outcome.tier.to_owned(),
                status: outcome.status,
            })
            .inc();
        let model = ModelLabels {
            model: model.to_owned(),
        };
        self.stream_duration
            .get_or_create(&model)
            .observe(outcome.duration.as_secs_f64());
        if let Some(ttft) = outcome.time_to_first_token {
            self.time_to_first_token
                .get_or_create(&model)
                .observe(ttft.as_secs_f64());
        }
        if let Some(overhead) = outcome.overhead() {
            self.gateway_overhead.observe(overhead.as_secs_f64());
        }
    }

    /// An upstream attempt failed and will be retried (`muxgate_upstream_retries_total`).
    /// `reason` is the failure kind, e.g. `UpstreamError::kind()`: `http_429`, `http_5xx`,
    /// `connect`, `first_token_timeout`…
    pub fn upstream_retry(&self, provider: &str, reason: &'static str) {
        self.upstream_retries
            .get_or_create(&RetryLabels {
                provider: provider.to_owned(),
                reason,
            })
            .inc();
    }

    /// The metrics of a gateway in cluster mode: every metric of [`Metrics::new`], plus
    /// `muxgate_redis_up`, the Redis error and fallback counters and the goaways relayed
    /// through Redis, which a single-process
    /// gateway does not show.
    pub fn with_redis() -> Metrics {
        let mut m = Metrics::new();
        let registry = &mut m.registry;
        registry.register(
            "redis_up",
            "1 while the shared store (Redis) answers this instance, 0 after a failed or timed-out call",
            m.redis_up.clone(),
        );
        registry.register(
            "redis_errors",
            "Redis calls that failed or timed out, by operation",
            m.redis_errors.clone(),
        );
        registry.register(
            "redis_fallbacks",
            "Decisions taken on this instance's own limits because Redis failed (on_redis_error = fail_open), by operation",
            m.redis_fallbacks.clone(),
        );
        registry.register(
            "goaways_relayed",
            "Operator goaways received through Redis from another instance and applied to this instance's connections",
            m.goaways_relayed.clone(),
        );
        registry.register(
            "cross_instance_relays",
            "Streams relayed to this instance from the instance running them, for a client that resumed them here",
            m.cross_instance_relays.clone(),
        );
        registry.register(
            "cross_instance_rerequests",
            "Cross-instance relays asked for again after a lost message (a gap in their numbering)",
            m.cross_instance_rerequests.clone(),
        );
        registry.register(
            "cross_instance_frames",
            "Stream frames relayed between instances, by direction: sent by the instance running the stream, received by the one relaying it to its client",
            m.cross_instance_frames.clone(),
        );
        m
    }

    /// Records whether Redis answered the last call.
    pub fn set_redis_up(&self, up: bool) {
        self.redis_up.set(i64::from(up));
    }

    /// A Redis call for `op` failed or timed out.
    pub fn redis_error(&self, op: &'static str) {
        self.redis_errors.get_or_create(&OpLabels { op }).inc();
    }

    /// `op` was decided on this instance's own counters because Redis failed.
    pub fn redis_fallback(&self, op: &'static str) {
        self.redis_fallbacks.get_or_create(&OpLabels { op }).inc();
    }

    /// Counts an operator goaway received through Redis from another instance.
    pub fn goaway_relayed(&self) {
        self.goaways_relayed.inc();
    }

    /// Counts a stream relayed here from the instance running it.
    pub fn cross_instance_relay(&self) {
        self.cross_instance_relays.inc();
    }

    /// Counts a relay asked for again after a lost message.
    pub fn cross_instance_rerequest(&self) {
        self.cross_instance_rerequests.inc();
    }

    /// Counts `n` frames published to another instance.
    pub fn cross_instance_frames_sent(&self, n: u64) {
        self.cross_instance_frames
            .get_or_create(&DirectionLabels { direction: "sent" })
            .inc_by(n);
    }

    /// Counts `n` frames received from another instance.
    pub fn cross_instance_frames_received(&self, n: u64) {
        self.cross_instance_frames
            .get_or_create(&DirectionLabels {
                direction: "received",
            })
            .inc_by(n);
    }

    /// A stream was refused before reaching an upstream (`muxgate_refusals_total`). `reason`
    /// names the limit: `user_rpm`, `tier_rpm`, `tier_tpm`, `global_rpm`, `global_tpm`
    /// (`LimitKind::as_str()`), `too_many_streams`, `queue_full`, `queue_timeout`, `budget`…
    pub fn refused(&self, reason: &'static str) {
        self.refusals.get_or_create(&ReasonLabels { reason }).inc();
    }

    /// Tokens billed for one stream (`muxgate_tokens_total`), both kinds at once.
    /// `estimated` is true when the upstream sent no `usage` and the figures come from
    /// [`crate::billing::count_tokens`]. A stream cancelled or cut mid-way is billed for what
    /// was generated, so call it for those too.
    pub fn tokens(
        &self,
        model: &str,
        tier: &str,
        prompt_tokens: u64,
        completion_tokens: u64,
        estimated: bool,
    ) {
        let model = self.model_label(model);
        for (kind, n) in [("prompt", prompt_tokens), ("completion", completion_tokens)] {
            self.tokens
                .get_or_create(&TokenLabels {
                    model: model.to_owned(),
                    tier: tier.to_owned(),
                    kind,
                    estimated,
                })
                .inc_by(n);
        }
    }

    /// Spend of one stream in USD (`muxgate_spend_usd_total`), e.g.
    /// [`crate::billing::cost_usd`]. A negative, NaN or infinite amount is ignored: a counter
    /// never goes down.
    pub fn spend(&self, model: &str, tier: &str, usd: f64) {
        if !(usd.is_finite() && usd >= 0.0) {
            return;
        }
        let model = self.model_label(model);
        self.spend
            .get_or_create(&SpendLabels {
                model: model.to_owned(),
                tier: tier.to_owned(),
            })
            .inc_by(usd);
    }

    /// Sets `provider`'s circuit breaker state (`muxgate_circuit_breaker_state`) to `gauge`:
    /// 0 closed, 1 half-open, 2 open, as the breaker reports it (`BreakerState::as_gauge`).
    /// Call it on every transition, and once per provider at start so closed breakers show as 0.
    pub fn set_breaker_state(&self, provider: &str, gauge: i64) {
        self.breaker_state
            .get_or_create(&ProviderLabels {
                provider: provider.to_owned(),
            })
            .set(gauge);
    }

    /// A connection's writer sent one batch: `frames` WebSocket messages carrying `bytes` of
    /// payload (`muxgate_ws_sent_frames_total`, `muxgate_ws_sent_bytes_total`). Two relaxed
    /// atomic adds, no lock: call it once per batch, after the flush succeeded.
    pub fn frames_sent(&self, frames: u64, bytes: u64) {
        self.ws_sent_frames.inc_by(frames);
        self.ws_sent_bytes.inc_by(bytes);
    }

    /// The tokenizer counted `bytes` of text in `took` (`muxgate_tokenizer_bytes_total`,
    /// `muxgate_tokenizer_seconds_total`): what counting tokens costs, and proof that refused
    /// streams cost none of it.
    pub fn tokenized(&self, bytes: usize, took: Duration) {
        self.tokenizer_bytes.inc_by(bytes as u64);
        self.tokenizer_seconds.inc_by(took.as_secs_f64());
    }

    /// `bytes` of a prompt were counted a token per byte, past the tokenizer's allowance
    /// (`muxgate_tokenizer_bounded_bytes_total`): how often reservations are upper bounds.
    pub fn tokens_bounded(&self, bytes: usize) {
        self.tokenizer_bounded_bytes.inc_by(bytes as u64);
    }

    /// The text exposition of every metric, for `GET /metrics` with [`CONTENT_TYPE`].
    pub fn encode(&self) -> String {
        let mut out = String::with_capacity(16 * 1024);
        if let Err(err) =
            prometheus_client::encoding::prometheus_text::encode(&mut out, &self.registry)
        {
            // Writing to a String cannot fail; if the encoder ever does, a partial scrape is
            // still better than none.
            tracing::warn!(error = %err, "metrics encoding failed");
        }
        out
    }

    /// `model`, or [`OTHER_MODEL`] once [`MAX_MODEL_LABELS`] other names have been seen.
    fn model_label<'a>(&self, model: &'a str) -> &'a str {
        if self.models.contains(model) {
            return model;
        }
        if self.model_count.fetch_add(1, Ordering::Relaxed) >= MAX_MODEL_LABELS {
            self.model_count.fetch_sub(1, Ordering::Relaxed);
            return OTHER_MODEL;
        }
        if !self.models.insert(model.to_owned()) {
            // Another stream admitted the same name meanwhile: give the slot back.
            self.model_count.fetch_sub(1, Ordering::Relaxed);
        }
        model
    }
}

fn ttft_histogram() -> Histogram {
    Histogram::new(TTFT_BUCKETS)
}

fn duration_histogram() -> Histogram {
    Histogram::new(DURATION_BUCKETS)
}

/// Keeps one connection in `muxgate_ws_connections`; from [`Metrics::connection_opened`].
#[derive(Debug)]
#[must_use = "the connection leaves the gauge when this guard is dropped"]
pub struct OpenConnection {
    gauge: Gauge,
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.gauge.dec();
    }
}

/// Keeps one stream in `muxgate_live_streams`; from [`Metrics::stream_started`].
#[derive(Debug)]
#[must_use = "the stream leaves the gauge when this guard is dropped"]
pub struct LiveStream {
    gauge: Gauge,
}

impl Drop for LiveStream {
    fn drop(&mut self) {
        self.gauge.dec();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::{BTreeMap, BTreeSet};

    /// Series (name with its labels sorted) to value, from the text exposition.
    fn parse(text: &str) -> BTreeMap<String, f64> {
        let mut out = BTreeMap::new();
        for line in text.lines() {
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (series, value) = line.rsplit_once(' ').expect("a sample line");
            let value: f64 = match value {
                "+Inf" => f64::INFINITY,
                v => v.parse().expect("a number"),
            };
            out.insert(normalize(series), value);
        }
        out
    }

    /// Sorts a series' labels, so tests need not know the encoder's order.
    fn normalize(series: &str) -> String {
        let Some((name, labels)) = series.split_once('{') else {
            return series.to_string();
        };
        let labels = labels.trim_end_matches('}');
        let mut parts: Vec<&str> = labels.split(',').filter(|p| !p.is_empty()).collect();
        parts.sort_unstable();
        format!("{name}{{{}}}", parts.join(","))
    }

    fn get(samples: &BTreeMap<String, f64>, series: &str) -> f64 {
        let key = normalize(series);
        match samples.get(&key) {
            Some(v) => *v,
            None => panic!("no series {key} in {samples:#?}"),
        }
    }

    fn outcome<'a>(model: &'a str, status: &'static str) -> StreamOutcome<'a> {
        StreamOutcome {
            model,
            provider: "openai",
            tier: "pro",
            status,
            duration: Duration::from_millis(1500),
            time_to_first_token: Some(Duration::from_millis(300)),
            upstream_time_to_first_byte: Some(Duration::from_micros(299_800)),
            queue_wait: Duration::ZERO,
        }
    }

    /// One event of each kind, so that every family has a series.
    fn record_one_of_each(m: &Metrics) -> (OpenConnection, LiveStream) {
        let conn = m.connection_opened();
        m.user_connections_changed(1, 2);
        let live = m.stream_started();
        m.set_queue_depth("openai", "free", 3);
        m.stream_finished(&outcome("gpt-4.1", STATUS_DONE));
        m.upstream_retry("openai", "http_429");
        m.refused("user_rpm");
        m.tokens("gpt-4.1", "pro", 12, 40, false);
        m.spend("gpt-4.1", "pro", 0.000344);
        m.set_breaker_state("openai", 1);
        m.frames_sent(5, 1234);
        m.tokenized(10, Duration::from_millis(1));
        m.tokens_bounded(5);
        m.set_redis_up(true);
        m.redis_error("take");
        m.redis_fallback("take");
        m.cross_instance_relay();
        m.cross_instance_rerequest();
        m.cross_instance_frames_sent(1);
        (conn, live)
    }

    #[test]
    fn redis_metrics_only_in_cluster_mode() {
        let single = Metrics::new();
        single.set_redis_up(true);
        single.redis_error("take");
        single.goaway_relayed();
        single.cross_instance_relay();
        let text = single.encode();
        assert!(
            !text.contains("redis")
                && !text.contains("goaways_relayed")
                && !text.contains("cross_instance"),
            "one process: no Redis series"
        );
        let cluster = Metrics::with_redis();
        assert_eq!(get(&parse(&cluster.encode()), "muxgate_redis_up"), 0.0);
        cluster.set_redis_up(true);
        cluster.redis_error("take");
        cluster.redis_error("take");
        cluster.redis_fallback("lease_stream");
        cluster.goaway_relayed();
        cluster.cross_instance_relay();
        cluster.cross_instance_frames_sent(3);
        cluster.cross_instance_frames_received(2);
        let v = parse(&cluster.encode());
        assert_eq!(get(&v, "muxgate_goaways_relayed_total"), 1.0);
        assert_eq!(get(&v, "muxgate_cross_instance_relays_total"), 1.0);
        assert_eq!(get(&v, "muxgate_cross_instance_rerequests_total"), 0.0);
        assert_eq!(
            get(
                &v,
                "muxgate_cross_instance_frames_total{direction=\"sent\"}"
            ),
            3.0
        );
        assert_eq!(
            get(
                &v,
                "muxgate_cross_instance_frames_total{direction=\"received\"}"
            ),
            2.0
        );
        assert_eq!(get(&v, "muxgate_redis_up"), 1.0);
        assert_eq!(get(&v, "muxgate_redis_errors_total{op=\"take\"}"), 2.0);
        assert_eq!(
            get(&v, "muxgate_redis_fallbacks_total{op=\"lease_stream\"}"),
            1.0
        );
    }

    #[test]
    fn gauges_follow_guards_and_socket_counts() {
        let m = Metrics::new();
        let a = m.connection_opened();
        let b = m.connection_opened();
        m.user_connections_changed(0, 1);
        m.user_connections_changed(1, 2);
        m.user_connections_changed(2, 3);
        let s = m.stream_started();
        let s2 = m.stream_started();
        drop(b);
        drop(s2);
        let v = parse(&m.encode());
        assert_eq!(get(&v, "muxgate_ws_connections"), 1.0);
        assert_eq!(get(&v, "muxgate_ws_connections_opened_total"), 2.0);
        assert_eq!(get(&v, "muxgate_users_multi_socket"), 1.0);
        assert_eq!(get(&v, "muxgate_live_streams"), 1.0);

        m.user_connections_changed(3, 2);
        assert_eq!(get(&parse(&m.encode()), "muxgate_users_multi_socket"), 1.0);
        m.user_connections_changed(2, 1);
        drop(a);
        drop(s);
        let v = parse(&m.encode());
        assert_eq!(get(&v, "muxgate_users_multi_socket"), 0.0);
        assert_eq!(get(&v, "muxgate_ws_connections"), 0.0);
        assert_eq!(get(&v, "muxgate_ws_connections_opened_total"), 2.0);
        assert_eq!(get(&v, "muxgate_live_streams"), 0.0);
    }

    #[test]
    fn streams_and_histograms_exact() {
        let m = Metrics::new();
        m.stream_finished(&outcome("gpt-4.1", STATUS_DONE));
        m.stream_finished(&outcome("gpt-4.1", STATUS_DONE));
        m.stream_finished(&StreamOutcome {
            time_to_first_token: None,
            upstream_time_to_first_byte: None,
            duration: Duration::from_millis(40),
            ..outcome("gpt-4.1", "upstream_error")
        });
        m.stream_finished(&StreamOutcome {
            time_to_first_token: Some(Duration::from_secs(2)),
            upstream_time_to_first_byte: Some(Duration::from_millis(1200)),
            queue_wait: Duration::from_millis(799),
            duration: Duration::from_secs(45),
            ..outcome("deepseek-v3.2", "cancelled")
        });
        let v = parse(&m.encode());

        let s = |model: &str, status: &str| {
            format!(
                r#"muxgate_streams_total{{model="{model}",provider="openai",tier="pro",status="{status}"}}"#
            )
        };
        assert_eq!(get(&v, &s("gpt-4.1", "done")), 2.0);
        assert_eq!(get(&v, &s("gpt-4.1", "upstream_error")), 1.0);
        assert_eq!(get(&v, &s("deepseek-v3.2", "cancelled")), 1.0);

        let h = |name: &str, model: &str, le: &str| {
            format!(r#"muxgate_{name}_bucket{{model="{model}",le="{le}"}}"#)
        };
        // Durations 1.5, 1.5, 0.04 for gpt-4.1: cumulative buckets.
        assert_eq!(
            get(&v, &h("stream_duration_seconds", "gpt-4.1", "0.1")),
            1.0
        );
        assert_eq!(get(&v, &h("stream_duration_seconds", "gpt-4.1", "1")), 1.0);
        assert_eq!(get(&v, &h("stream_duration_seconds", "gpt-4.1", "2")), 3.0);
        assert_eq!(
            get(&v, &h("stream_duration_seconds", "gpt-4.1", "+Inf")),
            3.0
        );
        assert_eq!(
            get(
                &v,
                r#"muxgate_stream_duration_seconds_count{model="gpt-4.1"}"#
            ),
            3.0
        );
        assert_eq!(
            get(
                &v,
                r#"muxgate_stream_duration_seconds_sum{model="gpt-4.1"}"#
            ),
            1.5 + 1.5 + 0.04
        );
        // The stream with no token has no time to first token.
        assert_eq!(
            get(
                &v,
                r#"muxgate_time_to_first_token_seconds_count{model="gpt-4.1"}"#
            ),
            2.0
        );
        assert_eq!(
            get(&v, &h("time_to_first_token_seconds", "gpt-4.1", "0.25")),
            0.0
        );
        assert_eq!(
            get(&v, &h("time_to_first_token_seconds", "gpt-4.1", "0.5")),
            2.0
        );
        assert_eq!(
            get(&v, &h("time_to_first_token_seconds", "deepseek-v3.2", "2")),
            1.0
        );

        // Overheads: 200 µs twice (300 ms - 299.8 ms), 1 ms (2 s - 1.2 s - 0.799 s).
        assert_eq!(get(&v, "muxgate_gateway_overhead_seconds_count"), 3.0);
        assert_eq!(
            get(
                &v,
                r#"muxgate_gateway_overhead_seconds_bucket{le="0.0001"}"#
            ),
            0.0
        );
        assert_eq!(
            get(
                &v,
                r#"muxgate_gateway_overhead_seconds_bucket{le="0.00025"}"#
            ),
            2.0
        );
        assert_eq!(
            get(
                &v,
                r#"muxgate_gateway_overhead_seconds_bucket{le="0.00075"}"#
            ),
            2.0
        );
        assert_eq!(
            get(&v, r#"muxgate_gateway_overhead_seconds_bucket{le="0.001"}"#),
            3.0
        );
        let sum = get(&v, "muxgate_gateway_overhead_seconds_sum");
        assert!((sum - 0.0014).abs() < 1e-12, "{sum}");
    }

    #[test]
    fn overhead_never_negative() {
        let o = StreamOutcome {
            time_to_first_token: Some(Duration::from_millis(10)),
            upstream_time_to_first_byte: Some(Duration::from_millis(12)),
            ..outcome("m", STATUS_DONE)
        };
        assert_eq!(o.overhead(), Some(Duration::ZERO));
        let o = StreamOutcome {
            upstream_time_to_first_byte: None,
            ..o
        };
        assert_eq!(o.overhead(), None);
    }

    #[test]
    fn tokens_spend_retries_refusals_breaker_frames_exact() {
        let m = Metrics::new();
        m.tokens("gpt-4.1", "pro", 12, 40, false);
        m.tokens("gpt-4.1", "pro", 100, 7, false);
        m.tokens("gpt-4.1", "pro", 5, 3, true);
        m.spend("gpt-4.1", "pro", 0.000344);
        m.spend("gpt-4.1", "pro", 0.000256);
        m.spend("gpt-4.1", "pro", 0.1);
        m.spend("gpt-4.1", "pro", -1.0);
        m.spend("gpt-4.1", "pro", f64::NAN);
        m.spend("claude-sonnet-4.5", "free", 0.0);
        m.upstream_retry("openai", "http_429");
        m.upstream_retry("openai", "http_429");
        m.upstream_retry("anthropic", "connect");
        m.refused("user_rpm");
        m.refused("budget");
        m.refused("budget");
        m.set_breaker_state("openai", 2);
        m.set_breaker_state("anthropic", 2);
        m.set_breaker_state("anthropic", 0);
        m.set_queue_depth("openai", "free", 7);
        m.set_queue_depth("openai", "free", 2);
        m.frames_sent(5, 1000);
        m.frames_sent(1, 24);
        let v = parse(&m.encode());

        let t = |kind: &str, estimated: &str| {
            format!(
                r#"muxgate_tokens_total{{model="gpt-4.1",tier="pro",kind="{kind}",estimated="{estimated}"}}"#
            )
        };
        assert_eq!(get(&v, &t("prompt", "false")), 112.0);
        assert_eq!(get(&v, &t("completion", "false")), 47.0);
        assert_eq!(get(&v, &t("prompt", "true")), 5.0);
        assert_eq!(get(&v, &t("completion", "true")), 3.0);

        // The exposition must carry the f64 sum exactly, bit for bit.
        let expected: f64 = 0.0 + 0.000344 + 0.000256 + 0.1;
        assert_eq!(
            get(&v, r#"muxgate_spend_usd_total{model="gpt-4.1",tier="pro"}"#).to_bits(),
            expected.to_bits()
        );
        assert_eq!(
            get(
                &v,
                r#"muxgate_spend_usd_total{model="claude-sonnet-4.5",tier="free"}"#
            ),
            0.0
        );

        assert_eq!(
            get(
                &v,
                r#"muxgate_upstream_retries_total{provider="openai",reason="http_429"}"#
            ),
            2.0
        );
        assert_eq!(
            get(
                &v,
                r#"muxgate_upstream_retries_total{provider="anthropic",reason="connect"}"#
            ),
            1.0
        );
        assert_eq!(get(&v, r#"muxgate_refusals_total{reason="user_rpm"}"#), 1.0);
        assert_eq!(get(&v, r#"muxgate_refusals_total{reason="budget"}"#), 2.0);
        assert_eq!(
            get(&v, r#"muxgate_circuit_breaker_state{provider="openai"}"#),
            2.0
        );
        assert_eq!(
            get(&v, r#"muxgate_circuit_breaker_state{provider="anthropic"}"#),
            0.0
        );
        assert_eq!(
            get(&v, r#"muxgate_queue_depth{provider="openai",tier="free"}"#),
            2.0
        );
        assert_eq!(get(&v, "muxgate_ws_sent_frames_total"), 6.0);
        assert_eq!(get(&v, "muxgate_ws_sent_bytes_total"), 1024.0);
    }

    #[test]
    fn model_labels_are_capped() {
        let m = Metrics::new();
        for i in 0..MAX_MODEL_LABELS + 10 {
            m.tokens(&format!("model-{i}"), "free", 1, 0, false);
        }
        // A name admitted before the cap keeps its label afterwards.
        m.tokens("model-0", "free", 1, 0, false);
        let v = parse(&m.encode());
        let prompt = |model: &str| {
            format!(
                r#"muxgate_tokens_total{{model="{model}",tier="free",kind="prompt",estimated="false"}}"#
            )
        };
        assert_eq!(get(&v, &prompt("model-0")), 2.0);
        assert_eq!(
            get(&v, &prompt(&format!("model-{}", MAX_MODEL_LABELS - 1))),
            1.0
        );
        assert_eq!(get(&v, &prompt(OTHER_MODEL)), 10.0);
        assert!(!v.contains_key(&normalize(&prompt(&format!("model-{MAX_MODEL_LABELS}")))));
    }

    #[test]
    fn label_values_are_escaped() {
        let m = Metrics::new();
        m.tokens("evil\"}\nmodel", "free", 1, 0, false);
        let text = m.encode();
        assert!(text.contains(r#"model="evil\"}\nmodel""#), "{text}");
    }

    #[test]
    fn names_follow_conventions() {
        let m = Metrics::new();
        let _guards = record_one_of_each(&m);
        let text = m.encode();
        let mut families = BTreeMap::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, kind) = rest.split_once(' ').expect("name and type");
                families.insert(name.to_string(), kind.to_string());
            }
        }
        assert_eq!(families.len(), 19, "{families:#?}");
        for (name, kind) in &families {
            assert!(name.starts_with("muxgate_"), "{name}");
            match kind.as_str() {
                "counter" => assert!(name.ends_with("_total"), "{name}"),
                "histogram" => assert!(name.ends_with("_seconds"), "{name}"),
                "gauge" => assert!(!name.ends_with("_total"), "{name}"),
                other => panic!("{name} has type {other}"),
            }
        }
    }

    /// Every metric name in a string, e.g. a PromQL expression.
    fn metric_names(s: &str) -> Vec<String> {
        let mut out = Vec::new();
        let mut rest = s;
        while let Some(i) = rest.find("muxgate_") {
            let tail = &rest[i..];
            let end = tail
                .find(|c: char| !(c.is_ascii_lowercase() || c == '_'))
                .unwrap_or(tail.len());
            out.push(tail[..end].to_string());
            rest = &tail[end..];
        }
        out
    }

    fn strings(v: &serde_json::Value, out: &mut Vec<String>) {
        match v {
            serde_json::Value::String(s) => out.push(s.clone()),
            serde_json::Value::Array(a) => a.iter().for_each(|v| strings(v, out)),
            serde_json::Value::Object(o) => o.values().for_each(|v| strings(v, out)),
            _ => {}
        }
    }

    #[test]
    fn dashboard_matches_exported_metrics() {
        let dashboard: serde_json::Value =
            serde_json::from_str(include_str!("../docs/grafana-dashboard.json"))
                .expect("docs/grafana-dashboard.json is JSON");
        let m = Metrics::with_redis();
        let _guards = record_one_of_each(&m);
        let text = m.encode();
        let exported: BTreeSet<String> = parse(&text)
            .keys()
            .map(|series| series.split('{').next().unwrap_or_default().to_string())
            .collect();

        let mut all = Vec::new();
        strings(&dashboard, &mut all);
        let used: BTreeSet<String> = all.iter().flat_map(|s| metric_names(s)).collect();
        assert!(!used.is_empty());
        for name in &used {
            assert!(
                exported.contains(name),
                "dashboard uses {name}, not exported"
            );
        }

        // And every family has a panel.
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let family = rest.split(' ').next().unwrap_or_default();
                assert!(
                    used.iter().any(|u| u.starts_with(family)),
                    "no panel for {family}"
                );
            }
        }

        // Every target reads the datasource input, so the import dialog asks for it.
        let panels = dashboard["panels"].as_array().expect("panels");
        for p in panels {
            if p["type"] == "row" {
                continue;
            }
            assert_eq!(p["datasource"]["uid"], "${DS_PROMETHEUS}", "{}", p["title"]);
            for t in p["targets"].as_array().expect("targets") {
                assert!(t["expr"].as_str().is_some_and(|e| !e.is_empty()));
            }
        }
    }
}
