//! Upstream providers: one pooled HTTP client each, the chat-completions call, SSE chunk
//! parsing, and what a failure is (its code, whether it is transient, its `Retry-After`, what
//! it says about the provider's health). When to retry is [`crate::retry`]'s to decide.

use std::borrow::Cow;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures_util::Stream;
use reqwest::header::{HeaderMap, CONTENT_TYPE, RETRY_AFTER};
use ring::hmac;
use serde::Deserialize;
use serde_json::value::RawValue;

use crate::breaker::{Breaker, BreakerConfig, Health};
use crate::config::{Config, ProviderConfig, UpstreamConfig};
use crate::protocol::{DeltaParts, ErrorCode, UpstreamDetail, Usage};
use crate::redact::Redactor;
use crate::scheduler::{Scheduler, SchedulerConfig};
use crate::sse::{self, SseError};

mod h1;
mod scan;

/// Bounds on upstream text quoted in an error, in characters.
const MAX_MESSAGE_CHARS: usize = 300;
const MAX_QUOTE_CHARS: usize = 120;

/// Why a provider could not be built from its configuration.
#[derive(Debug, thiserror::Error)]
pub enum ProviderError {
    #[error("cannot build the HTTP client: {0}")]
    Client(#[from] reqwest::Error),
    /// Its `base_url` does not make a URL (a configuration that skipped validation).
    #[error("{0}")]
    Url(String),
}

/// One upstream: where it is, its key, and its connection pool.
pub struct Provider {
    pub name: String,
    /// `{base_url}/chat/completions`, parsed once: reqwest takes a `Url` as it is, where a
    /// string would be parsed again for every request.
    url: reqwest::Url,
    /// Sent as `Authorization: Bearer`; never logged, never put in a frame.
    api_key: Option<String>,
    /// Every string this provider sends back goes through it before a frame or a log.
    redactor: Arc<Redactor>,
    max_event_bytes: usize,
    /// Built once per provider so keep-alive connections (and HTTP/2 where offered) are
    /// reused by every stream; one per worker thread (see [`crate::workers`]), so a pooled
    /// connection's task runs on the thread of the streams that read it.
    clients: Vec<reqwest::Client>,
    /// Plain-http upstreams: hyper's HTTP/1.1 connection polled by the relay's task itself
    /// (see [`h1`]), with its own keep-alive pool; `None` for https, which takes `clients`.
    direct: Option<(h1::Target, Arc<h1::Pool>)>,
    connect_timeout: Duration,
    models: Vec<String>,
    pub first_token_timeout: Duration,
    pub idle_timeout: Duration,
    /// Upstream slots and the queue for them.
    pub scheduler: Arc<Scheduler>,
    pub breaker: Breaker,
}

/// All providers, in the order a model is looked up.
pub struct Upstreams {
    providers: Vec<Arc<Provider>>,
    /// Keys the upstream `user` field, so a provider can tell users apart (abuse reports,
    /// its own per-user limits) without learning who they are.
    user_key: hmac::Key,
}

impl Upstreams {
    /// `secret` is the JWT secret: the upstream `user` key is derived from it, so user ids
    /// are stable across restarts and replicas sharing the secret.
    pub fn new(config: &Config, secret: &[u8]) -> Result<Self, ProviderError> {
        // Any provider's key is redacted from every provider's text: a fallback can quote
        // what it was sent no more than the primary.
        let redactor = Arc::new(Redactor::new(
            config.providers.iter().filter_map(|p| p.api_key.as_deref()),
        ));
        let pools = config.server.worker_count();
        let providers = config
            .providers
            .iter()
            .map(|c| {
                Provider::new(
                    c,
                    &config.scheduler,
                    &config.breaker,
                    &config.upstream,
                    redactor.clone(),
                    pools,
                )
                .map(Arc::new)
            })
            .collect::<Result<_, _>>()?;
        let derived = hmac::sign(
            &hmac::Key::new(hmac::HMAC_SHA256, secret),
            b"muxgate upstream user id v1",
        );
        Ok(Upstreams {
            providers,
            user_key: hmac::Key::new(hmac::HMAC_SHA256, derived.as_ref()),
        })
    }

    /// The `user` sent upstream for the authenticated `sub`: a keyed hash (HMAC-SHA256,
    /// first 128 bits in hex), the same for every stream of that user, meaningless without
    /// the gateway's secret.
    pub fn user_id(&self, sub: &str) -> String {
        // By nibble from a table: `write!("{b:02x}")` per byte cost about 3,600 instructions a
        // stream, more than the HMAC.
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let tag = hmac::sign(&self.user_key, sub.as_bytes());
        let mut out = String::with_capacity(32);
        for &b in &tag.as_ref()[..16] {
            out.push(char::from(HEX[usize::from(b >> 4)]));
            out.push(char::from(HEX[usize::from(b & 0xf)]));
        }
        out
    }

    /// The provider serving `model`, if any.
    pub fn route(&self, model: &str) -> Option<&Arc<Provider>> {
        self.providers
            .iter()
            .find(|p| p.models.iter().any(|m| m == "*" || m == model))
    }

    pub fn all(&self) -> &[Arc<Provider>] {
        &self.providers
    }
}

/// The SSE events of one upstream response (`S`, its body), errors already redacted. Polled
/// per relayed chunk, so a plain struct: no boxed stream and no combinator between the body
/// and the relay.
pub struct EventStream<S> {
    events: sse::EventStream<S>,
    redactor: Arc<Redactor>,
}

impl EventStream<UpstreamBody> {
    /// The relay took the stream's last event (`[DONE]`) and reads no further, so a direct
    /// connection may go back to its pool (see [`h1::Body::last_event`]).
    pub fn last_event(&mut self) {
        if let UpstreamBody::Direct(body) = self.events.get_mut() {
            body.last_event();
        }
    }
}

impl<S, E> Stream for EventStream<S>
where
    S: Stream<Item = Result<Bytes, E>> + Unpin,
    E: std::error::Error,
{
    type Item = Result<sse::Event, UpstreamError>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        let next = ready!(Pin::new(&mut this.events).poll_next(cx));
        Poll::Ready(next.map(|event| {
            event.map_err(|e| match e {
                SseError::TooLarge { limit } => UpstreamError::EventTooLarge(limit),
                SseError::Transport(e) => {
                    UpstreamError::Broken(this.redactor.clean(&error_chain(&e), MAX_MESSAGE_CHARS))
                }
            })
        }))
    }
}

impl Provider {
    pub fn new(
        c: &ProviderConfig,
        scheduler: &SchedulerConfig,
        breaker: &BreakerConfig,
        limits: &UpstreamConfig,
        redactor: Arc<Redactor>,
        pools: usize,
    ) -> Result<Self, ProviderError> {
        let url = c.chat_completions_url().map_err(ProviderError::Url)?;
        let clients = (0..pools.max(1))
            .map(|_| {
                reqwest::Client::builder()
                    .connect_timeout(Duration::from_millis(c.connect_timeout_ms))
                    .pool_max_idle_per_host(c.pool_max_idle_per_host)
                    .pool_idle_timeout(Duration::from_secs(90))
                    .tcp_nodelay(true)
                    .tcp_keepalive(Duration::from_secs(30))
                    .user_agent(concat!("muxgate/", env!("CARGO_PKG_VERSION")))
                    .build()
            })
            .collect::<Result<_, _>>()?;
        let direct = (c.direct_http1 && url.scheme() == "http" && !proxy_from_env())
            .then(|| {
                let host = url.host_str()?;
                let port = url.port_or_known_default()?;
                let authority = match url.port() {
                    Some(p) => format!("{host}:{p}"),
                    None => host.to_string(),
                };
                Some((
                    h1::Target {
                        addr: format!("{host}:{port}"),
                        host: http::HeaderValue::from_str(&authority).ok()?,
                    },
                    h1::Pool::new(pools, c.pool_max_idle_per_host, Duration::from_secs(90)),
                ))
            })
            .flatten();
        Ok(Provider {
            name: c.name.clone(),
            direct,
            connect_timeout: Duration::from_millis(c.connect_timeout_ms),
            url,
            api_key: c.api_key.clone(),
            redactor,
            max_event_bytes: limits.max_event_bytes,
            clients,
            models: c.models.clone(),
            first_token_timeout: Duration::from_millis(c.first_token_timeout_ms),
            idle_timeout: Duration::from_millis(c.idle_timeout_ms),
            scheduler: Scheduler::new(c.max_concurrent, scheduler.clone()),
            breaker: Breaker::new(breaker.clone()),
        })
    }

    /// Posts one streaming chat-completions request and checks status and content type
    /// before anything is streamed.
    pub async fn open(&self, body: Bytes) -> Result<EventStream<UpstreamBody>, UpstreamError> {
        let (status, headers, mut stream) = match &self.direct {
            Some((target, pool)) => self.send_direct(target, pool, body).await?,
            None => self.send_pooled(body).await?,
        };
        if !status.is_success() {
            let retry_after = retry_after(&headers);
            let text = read_prefix(&mut stream, 4096).await;
            let (message, upstream) = error_body(&text, &self.redactor);
            return Err(UpstreamError::Status {
                status: status.as_u16(),
                message,
                retry_after,
                upstream,
            });
        }
        let content_type = headers
            .get(CONTENT_TYPE)
            .map(|v| String::from_utf8_lossy(v.as_bytes()))
            .unwrap_or_default();
        if !content_type.starts_with("text/event-stream") {
            return Err(UpstreamError::ContentType(
                self.redactor.clean(&content_type, MAX_QUOTE_CHARS),
            ));
        }
        Ok(EventStream {
            events: sse::EventStream::new(stream, self.max_event_bytes),
            redactor: self.redactor.clone(),
        })
    }

    async fn send_pooled(
        &self,
        body: Bytes,
    ) -> Result<(http::StatusCode, HeaderMap, UpstreamBody), UpstreamError> {
        let client = &self.clients[crate::workers::current().unwrap_or(0) % self.clients.len()];
        let mut req = client
            .post(self.url.clone())
            .header(CONTENT_TYPE, "application/json")
            .header("accept", "text/event-stream")
            .body(body);
        if let Some(key) = &self.api_key {
            req = req.bearer_auth(key);
        }
        let mut resp = req
            .send()
            .await
            .map_err(|e| UpstreamError::Connect(self.redact(&error_chain(&e))))?;
        let headers = std::mem::take(resp.headers_mut());
        Ok((
            resp.status(),
            headers,
            UpstreamBody::Pooled(Box::pin(resp.bytes_stream())),
        ))
    }

    async fn send_direct(
        &self,
        target: &h1::Target,
        pool: &Arc<h1::Pool>,
        body: Bytes,
    ) -> Result<(http::StatusCode, HeaderMap, UpstreamBody), UpstreamError> {
        let path = match self.url.query() {
            Some(q) => format!("{}?{q}", self.url.path()),
            None => self.url.path().to_string(),
        };
        let mut req = http::Request::post(path)
            .header(http::header::HOST, target.host.clone())
            .header(CONTENT_TYPE, "application/json")
            .header(http::header::ACCEPT, "text/event-stream")
            .header(
                http::header::USER_AGENT,
                concat!("muxgate/", env!("CARGO_PKG_VERSION")),
            );
        if let Some(key) = &self.api_key {
            req = req.header(http::header::AUTHORIZATION, format!("Bearer {key}"));
        }
        let req = req
            .body(http_body_util::Full::new(body))
            .map_err(|e| UpstreamError::Connect(self.redact(&e.to_string())))?;
        let (parts, body) = h1::send(pool, target, self.connect_timeout, req)
            .await
            .map_err(|e| UpstreamError::Connect(self.redact(&error_chain(&e))))?;
        Ok((parts.status, parts.headers, UpstreamBody::Direct(body)))
    }

    /// Upstream text made fit for a client frame or a log (see [`crate::redact`]).
    pub fn redact(&self, text: &str) -> String {
        self.redactor.clean(text, MAX_MESSAGE_CHARS)
    }

    /// [`parse_chunk`] with this provider's redaction of what an error quotes.
    pub fn parse_chunk<'a>(&self, data: &'a str) -> Result<Chunk<'a>, UpstreamError> {
        parse_chunk(data, &self.redactor)
    }
}

/// Whether reqwest would send a plain-http request through a proxy from the environment: the
/// direct path connects itself, so it is used only when none is set.
fn proxy_from_env() -> bool {
    ["http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"]
        .iter()
        .any(|k| std::env::var_os(k).is_some_and(|v| !v.is_empty()))
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(inner) = source {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        source = inner.source();
    }
    s
}

async fn read_prefix(body: &mut UpstreamBody, max: usize) -> String {
    use futures_util::StreamExt;
    let mut buf = Vec::new();
    while buf.len() < max {
        match body.next().await {
            Some(Ok(chunk)) => buf.extend_from_slice(&chunk),
            _ => break,
        }
    }
    buf.truncate(max);
    String::from_utf8_lossy(&buf).into_owned()
}

/// An upstream response's body: through reqwest's pool (its stream type has no name, hence
/// the box), or read by the relay's own task.
// The direct body is the larger by far, but the body lives in place in its stream's task for
// the stream's life: a box would be one more allocation per stream and one more pointer to
// follow per chunk.
#[allow(clippy::large_enum_variant)]
pub enum UpstreamBody {
    Pooled(Pin<Box<dyn Stream<Item = reqwest::Result<Bytes>> + Send>>),
    Direct(h1::Body),
}

/// Why an upstream response's body broke.
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    #[error(transparent)]
    Pooled(#[from] reqwest::Error),
    #[error(transparent)]
    Direct(#[from] hyper::Error),
}

impl Stream for UpstreamBody {
    type Item = Result<Bytes, BodyError>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        match self.get_mut() {
            UpstreamBody::Pooled(s) => s
                .as_mut()
                .poll_next(cx)
                .map(|o| o.map(|r| r.map_err(BodyError::from))),
            UpstreamBody::Direct(s) => Pin::new(s)
                .poll_next(cx)
                .map(|o| o.map(|r| r.map_err(BodyError::from))),
        }
    }
}

/// The `error.message` of an OpenAI-style error body (else the body's start), redacted, and
/// the body's `error.type`, `error.code` and `error.param`.
fn error_body(body: &str, redactor: &Redactor) -> (String, Option<UpstreamDetail>) {
    let parsed = serde_json::from_str::<serde_json::Value>(body).ok();
    let error = parsed.as_ref().and_then(|v| v.get("error"));
    let mut message = match error
        .and_then(|e| e.get("message"))
        .and_then(|m| m.as_str())
    {
        Some(m) => m.to_string(),
        None => body.trim().to_string(),
    };
    if message.is_empty() {
        message.push_str("(empty body)");
    }
    let upstream = error.and_then(|e| error_detail(e, redactor));
    (redactor.clean(&message, MAX_MESSAGE_CHARS), upstream)
}

/// `retry-after-ms` (OpenAI's) first, then `Retry-After` in seconds or as an HTTP date.
pub fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    if let Some(ms) = headers
        .get("retry-after-ms")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<f64>().ok())
        .filter(|ms| ms.is_finite() && *ms >= 0.0)
    {
        return Some(Duration::from_micros((ms * 1000.0) as u64));
    }
    let value = headers.get(RETRY_AFTER)?.to_str().ok()?.trim();
    if let Ok(secs) = value.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let when = httpdate::parse_http_date(value).ok()?;
    Some(
        when.duration_since(std::time::SystemTime::now())
            .unwrap_or(Duration::ZERO),
    )
}

/// Why one upstream attempt failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum UpstreamError {
    #[error("upstream unreachable: {0}")]
    Connect(String),
    #[error("upstream answered HTTP {status}: {message}")]
    Status {
        status: u16,
        message: String,
        retry_after: Option<Duration>,
        /// The error body's `type`, `code` and `param`, for the client's `error.upstream`.
        upstream: Option<UpstreamDetail>,
    },
    #[error("upstream answered with content-type `{0}`, not text/event-stream")]
    ContentType(String),
    #[error("upstream sent no token within {0:?}")]
    FirstTokenTimeout(Duration),
    #[error("upstream went silent for {0:?} mid-stream")]
    IdleTimeout(Duration),
    #[error("upstream stream broke: {0}")]
    Broken(String),
    /// An `error` event inside the SSE stream (providers send one on mid-stream failures).
    #[error("upstream stream broke: upstream error event: {message}")]
    ErrorEvent {
        message: String,
        upstream: Option<UpstreamDetail>,
    },
    #[error("upstream sent a chunk that is not a chat-completion chunk: {0}")]
    BadChunk(String),
    #[error("upstream sent an SSE event larger than {0} bytes (upstream.max_event_bytes)")]
    EventTooLarge(usize),
    #[error("the stream ran past its maximum duration of {0:?} (upstream.max_stream_duration_ms)")]
    MaxDuration(Duration),
    #[error("provider `{provider}` is failing: circuit open for another {retry_after:?}")]
    CircuitOpen {
        provider: String,
        retry_after: Duration,
    },
}

impl UpstreamError {
    /// Whether another attempt may help, provided no token has gone out yet.
    pub fn retryable(&self) -> bool {
        match self {
            UpstreamError::Connect(_)
            | UpstreamError::FirstTokenTimeout(_)
            | UpstreamError::Broken(_)
            | UpstreamError::ErrorEvent { .. } => true,
            UpstreamError::Status { status, .. } => *status == 429 || *status >= 500,
            UpstreamError::ContentType(_)
            | UpstreamError::IdleTimeout(_)
            | UpstreamError::BadChunk(_)
            | UpstreamError::EventTooLarge(_)
            | UpstreamError::MaxDuration(_)
            | UpstreamError::CircuitOpen { .. } => false,
        }
    }

    /// The protocol code a client sees when this is the final failure.
    pub fn code(&self) -> ErrorCode {
        match self {
            UpstreamError::FirstTokenTimeout(_)
            | UpstreamError::IdleTimeout(_)
            | UpstreamError::MaxDuration(_) => ErrorCode::UpstreamTimeout,
            _ => ErrorCode::UpstreamError,
        }
    }

    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            UpstreamError::Status { retry_after, .. } => *retry_after,
            UpstreamError::CircuitOpen { retry_after, .. } => Some(*retry_after),
            _ => None,
        }
    }

    /// The upstream's HTTP status, when it answered with an error status.
    pub fn status(&self) -> Option<u16> {
        match self {
            UpstreamError::Status { status, .. } => Some(*status),
            _ => None,
        }
    }

    /// What the upstream's error said of itself (`type`, `code`, `param`), when it said any.
    pub fn upstream_detail(&self) -> Option<&UpstreamDetail> {
        match self {
            UpstreamError::Status { upstream, .. } | UpstreamError::ErrorEvent { upstream, .. } => {
                upstream.as_ref()
            }
            _ => None,
        }
    }

    /// Short label for logs and metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            UpstreamError::Connect(_) => "connect",
            UpstreamError::Status { status: 429, .. } => "http_429",
            UpstreamError::Status { status, .. } if *status >= 500 => "http_5xx",
            UpstreamError::Status { .. } => "http_4xx",
            UpstreamError::ContentType(_) => "content_type",
            UpstreamError::FirstTokenTimeout(_) => "first_token_timeout",
            UpstreamError::IdleTimeout(_) => "idle_timeout",
            // Counted as the break it is: the label set stays what dashboards know.
            UpstreamError::Broken(_) | UpstreamError::ErrorEvent { .. } => "broken",
            UpstreamError::BadChunk(_) => "bad_chunk",
            UpstreamError::EventTooLarge(_) => "event_too_large",
            UpstreamError::MaxDuration(_) => "max_duration",
            UpstreamError::CircuitOpen { .. } => "circuit_open",
        }
    }

    /// What this failure says about the provider's health (for its circuit breaker).
    pub fn health(&self) -> Health {
        match self {
            UpstreamError::Status { status, .. } if *status < 500 => Health::Neutral,
            // The upstream was answering all along: the limit is ours, not its failure.
            UpstreamError::CircuitOpen { .. } | UpstreamError::MaxDuration(_) => Health::Neutral,
            _ => Health::Failure,
        }
    }
}

/// What one SSE `data` payload carries: every part of its first choice, borrowed from the
/// payload where it can be. The structured parts (`tool_calls`, `logprobs`) stay raw JSON:
/// they are relayed verbatim, so re-serialising them would only cost time.
#[derive(Debug, Default)]
pub struct Chunk<'a> {
    /// `delta.content`, `None` when absent or empty.
    pub content: Option<Cow<'a, str>>,
    /// `delta.reasoning_content`, else `delta.reasoning`; `None` when absent or empty.
    pub reasoning: Option<Cow<'a, str>>,
    /// `delta.refusal`, `None` when absent or empty.
    pub refusal: Option<Cow<'a, str>>,
    /// `delta.tool_calls`, verbatim, when it is a non-empty array.
    pub tool_calls: Option<&'a RawValue>,
    /// `choices[0].logprobs`, verbatim, when not null.
    pub logprobs: Option<&'a RawValue>,
    pub finish_reason: Option<Cow<'a, str>>,
    /// Boxed: it comes once per stream, and a smaller `Chunk` is cheaper to move per chunk.
    pub usage: Option<Box<Usage>>,
}

impl Chunk<'_> {
    /// Whether the chunk carries any part of the answer, so is one `delta` frame (and a token
    /// for every timing and retry rule).
    pub fn has_part(&self) -> bool {
        self.content.is_some()
            || self.reasoning.is_some()
            || self.refusal.is_some()
            || self.tool_calls.is_some()
            || self.logprobs.is_some()
    }

    /// The parts as a `delta` frame carries them (`text` `""` when the chunk has none).
    pub fn parts(&self) -> DeltaParts<'_> {
        DeltaParts {
            text: self.content.as_deref().unwrap_or(""),
            reasoning: self.reasoning.as_deref(),
            refusal: self.refusal.as_deref(),
            tool_calls: self.tool_calls,
            logprobs: self.logprobs,
        }
    }
}

#[derive(Deserialize)]
struct ChunkWire<'a> {
    #[serde(borrow, default)]
    choices: Vec<ChoiceWire<'a>>,
    #[serde(default)]
    usage: Option<Box<Usage>>,
    #[serde(borrow, default)]
    error: Option<&'a RawValue>,
}

#[derive(Deserialize)]
struct ChoiceWire<'a> {
    #[serde(borrow, default)]
    delta: Option<DeltaWire<'a>>,
    #[serde(borrow, default)]
    finish_reason: Option<Text<'a>>,
    #[serde(borrow, default)]
    logprobs: Option<&'a RawValue>,
}

#[derive(Deserialize)]
struct DeltaWire<'a> {
    #[serde(borrow, default)]
    content: Option<Text<'a>>,
    #[serde(borrow, default)]
    reasoning_content: Option<Text<'a>>,
    #[serde(borrow, default)]
    reasoning: Option<Text<'a>>,
    #[serde(borrow, default)]
    refusal: Option<Text<'a>>,
    #[serde(borrow, default)]
    tool_calls: Option<&'a RawValue>,
}

/// serde borrows a `Cow<str>` only when it is the field's own type, not inside an `Option`;
/// this newtype keeps unescaped text borrowed from the SSE payload.
#[derive(Deserialize)]
struct Text<'a>(#[serde(borrow)] Cow<'a, str>);

fn non_empty(t: Option<Text<'_>>) -> Option<Cow<'_, str>> {
    t.map(|t| t.0).filter(|s| !s.is_empty())
}

/// What an upstream error said of itself, besides its message: each field only when it was
/// sent, redacted and bounded like every quoted upstream text.
fn error_detail(error: &serde_json::Value, redactor: &Redactor) -> Option<UpstreamDetail> {
    let field = |key: &str| match error.get(key)? {
        serde_json::Value::String(s) => Some(redactor.clean(s, MAX_QUOTE_CHARS)),
        serde_json::Value::Number(n) => Some(n.to_string()),
        _ => None,
    };
    let detail = UpstreamDetail {
        r#type: field("type"),
        code: field("code"),
        param: field("param"),
    };
    (!detail.is_empty()).then_some(detail)
}

/// Parses one chat-completion chunk, borrowing its text where it has no escapes.
/// An `error` object inside the stream (some providers send one mid-stream) is an error.
/// What an error quotes of the chunk goes through `redactor` first. The common shapes take a
/// single scan ([`scan`]), which yields what serde would; the others, and every error, serde.
pub fn parse_chunk<'a>(data: &'a str, redactor: &Redactor) -> Result<Chunk<'a>, UpstreamError> {
    match scan::chunk(data) {
        Some(chunk) => Ok(chunk),
        None => parse_full(data, redactor),
    }
}

/// [`parse_chunk`] by serde alone: any shape, and the words of every error.
fn parse_full<'a>(data: &'a str, redactor: &Redactor) -> Result<Chunk<'a>, UpstreamError> {
    let wire: ChunkWire<'_> = serde_json::from_str(data).map_err(|e| {
        // serde's message quotes values too (`invalid type: string "sk-…"`).
        let error = redactor.clean(&e.to_string(), MAX_MESSAGE_CHARS);
        let raw = redactor.clean(data, MAX_QUOTE_CHARS);
        UpstreamError::BadChunk(format!("{error} in `{raw}`"))
    })?;
    if let Some(raw) = wire.error.filter(|e| e.get() != "null") {
        // Rare, so parsed again as a value: it may be an object or a bare string.
        let err: serde_json::Value = serde_json::from_str(raw.get()).unwrap_or_default();
        let message = match err.get("message").and_then(|m| m.as_str()) {
            Some(m) => redactor.clean(m, MAX_MESSAGE_CHARS),
            None => redactor.clean(&err.to_string(), MAX_MESSAGE_CHARS),
        };
        return Err(UpstreamError::ErrorEvent {
            message,
            upstream: error_detail(&err, redactor),
        });
    }
    let mut chunk = Chunk {
        usage: wire.usage,
        ..Chunk::default()
    };
    // `n > 1` is refused at `open`, so the first choice is the answer.
    if let Some(choice) = wire.choices.into_iter().next() {
        if let Some(delta) = choice.delta {
            chunk.content = non_empty(delta.content);
            chunk.reasoning = non_empty(delta.reasoning_content).or(non_empty(delta.reasoning));
            chunk.refusal = non_empty(delta.refusal);
            // Verbatim, but only a non-empty array is a fragment list (some providers send
            // `[]` on chunks without calls).
            chunk.tool_calls = delta
                .tool_calls
                .filter(|raw| raw.get().starts_with('[') && !is_empty_array(raw.get()));
        }
        chunk.logprobs = choice.logprobs.filter(|raw| raw.get() != "null");
        chunk.finish_reason = choice.finish_reason.map(|t| t.0);
    }
    Ok(chunk)
}

/// A chunk's `id` (the upstream's completion id) and `system_fingerprint`.
#[derive(Default, Deserialize)]
pub struct ChunkIds<'a> {
    #[serde(borrow, default)]
    id: Option<Text<'a>>,
    #[serde(borrow, default)]
    system_fingerprint: Option<Text<'a>>,
}

impl ChunkIds<'_> {
    pub fn id(&self) -> Option<&str> {
        self.id.as_ref().map(|t| &*t.0).filter(|s| !s.is_empty())
    }

    pub fn system_fingerprint(&self) -> Option<&str> {
        self.system_fingerprint
            .as_ref()
            .map(|t| &*t.0)
            .filter(|s| !s.is_empty())
    }
}

/// Reads a chunk's ids apart from [`parse_chunk`]: providers repeat them on every chunk, and
/// reading them there would cost every text chunk two more strings (13 % more instructions per
/// chunk, measured with `examples/chunk_cost.rs`), so the relay asks only of the chunks that
/// can be the last to carry them (the first, and those with a finish reason or usage). A
/// payload [`parse_chunk`] accepted has no syntax error; other shapes give no ids.
pub fn chunk_ids(data: &str) -> ChunkIds<'_> {
    serde_json::from_str(data).unwrap_or_default()
}

fn is_empty_array(json: &str) -> bool {
    json.strip_prefix('[')
        .and_then(|rest| rest.strip_suffix(']'))
        .is_some_and(|inner| inner.trim().is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(data: &str) -> Result<Chunk<'_>, UpstreamError> {
        parse_chunk(data, &Redactor::default())
    }

    #[test]
    fn chunk_errors_quote_only_redacted_text() {
        let key = "sk-upstream-secret-7f3a9c";
        let r = Redactor::new([key]);
        let e = parse_chunk(&format!("{{\"oops\": \"{key}\n\u{1b}\""), &r).expect_err("bad");
        let m = e.to_string();
        assert!(!m.contains("sk-up") && m.contains("[redacted]"), "{m}");
        let e = parse_chunk(
            &format!(r#"{{"error":{{"message":"Incorrect API key provided: {key}\nx"}}}}"#),
            &r,
        )
        .expect_err("event");
        let m = e.to_string();
        assert!(!m.contains("sk-up") && !m.contains('\n'), "{m}");
        let typed = parse_chunk(&format!(r#"{{"choices":"{key}\u001b"}}"#), &r).expect_err("type");
        let m = typed.to_string();
        assert!(!m.contains("sk-up") && !m.contains('\u{1b}'), "{m}");
        let long = format!("{}{key}", "x".repeat(MAX_QUOTE_CHARS - 5));
        let m = parse_chunk(&long, &r).expect_err("bad").to_string();
        assert!(
            !m.contains("sk-u"),
            "a key cut by the bound is still gone: {m}"
        );
    }

    #[test]
    fn parses_openai_chunks() {
        let c = parse(r#"{"id":"x","object":"chat.completion.chunk","choices":[{"index":0,"delta":{"content":"Hel"},"finish_reason":null}]}"#)
            .expect("chunk");
        assert_eq!(c.content.as_deref(), Some("Hel"));
        assert!(
            matches!(c.content, Some(Cow::Borrowed(_))),
            "plain text is borrowed"
        );
        assert_eq!(c.finish_reason, None);

        let c = parse(r#"{"choices":[{"delta":{"content":"a\"b\nc"}}]}"#).expect("escaped");
        assert_eq!(c.content.as_deref(), Some("a\"b\nc"));

        let c =
            parse(r#"{"choices":[{"delta":{"role":"assistant","content":""}}]}"#).expect("role");
        assert_eq!(c.content, None);

        let c = parse(r#"{"choices":[{"delta":{},"finish_reason":"length"}]}"#).expect("finish");
        assert_eq!(c.finish_reason.as_deref(), Some("length"));

        let c = parse(r#"{"choices":[],"usage":{"prompt_tokens":12,"completion_tokens":40,"total_tokens":52}}"#)
            .expect("usage");
        assert_eq!(c.usage.as_deref(), Some(&Usage::counted(12, 40)));

        assert!(matches!(parse("not json"), Err(UpstreamError::BadChunk(_))));
        let e = parse(r#"{"error":{"message":"overloaded"}}"#).expect_err("event");
        assert!(e.to_string().contains("overloaded"), "{e}");
        assert!(
            e.retryable(),
            "an error event is retried before the first token, as before"
        );
        assert_eq!(e.upstream_detail(), None);
    }

    #[test]
    fn every_part_of_a_choice() {
        let c = parse(r#"{"id":"chatcmpl-1","system_fingerprint":"fp_9","choices":[{"index":0,"delta":{"role":"assistant","content":null,"reasoning_content":"Let me think"},"finish_reason":null}]}"#)
            .expect("reasoning");
        assert_eq!(c.reasoning.as_deref(), Some("Let me think"));
        assert!(matches!(c.reasoning, Some(Cow::Borrowed(_))), "borrowed");
        assert_eq!(c.content, None);
        assert!(c.has_part());
        let ids = chunk_ids(r#"{"id":"chatcmpl-1","system_fingerprint":"fp_9","choices":[]}"#);
        assert_eq!(ids.id(), Some("chatcmpl-1"));
        assert_eq!(ids.system_fingerprint(), Some("fp_9"));
        let ids = chunk_ids(r#"{"id":"","system_fingerprint":null,"choices":[]}"#);
        assert_eq!((ids.id(), ids.system_fingerprint()), (None, None));
        let ids = chunk_ids(r#"{"id":5}"#);
        assert_eq!(ids.id(), None, "a shape it does not know gives no ids");

        let c = parse(r#"{"choices":[{"delta":{"reasoning":"other name"}}]}"#).expect("reasoning");
        assert_eq!(c.reasoning.as_deref(), Some("other name"));
        let c = parse(r#"{"choices":[{"delta":{"reasoning_content":"a","reasoning":"b"}}]}"#)
            .expect("both");
        assert_eq!(c.reasoning.as_deref(), Some("a"), "reasoning_content first");

        let calls = r#"[{"index":0,"id":"call_a","type":"function","function":{"name":"get_weather","arguments":""}}]"#;
        let data =
            format!(r#"{{"choices":[{{"delta":{{"tool_calls":{calls}}},"finish_reason":null}}]}}"#);
        let c = parse(&data).expect("tool call");
        assert_eq!(c.tool_calls.map(RawValue::get), Some(calls), "verbatim");
        assert!(c.has_part());
        for empty in [
            r#"{"tool_calls":[]}"#,
            r#"{"tool_calls":[ ]}"#,
            r#"{"tool_calls":null}"#,
            r#"{"role":"assistant"}"#,
        ] {
            let data = format!(r#"{{"choices":[{{"delta":{empty}}}]}}"#);
            let c = parse(&data).expect("empty");
            assert!(!c.has_part(), "{empty}");
        }

        let c = parse(r#"{"choices":[{"delta":{"refusal":"I can't"}}]}"#).expect("refusal");
        assert_eq!(c.refusal.as_deref(), Some("I can't"));

        let lp =
            r#"{"content":[{"token":"Hi","logprob":-0.1,"bytes":[72,105],"top_logprobs":[]}]}"#;
        let data = format!(r#"{{"choices":[{{"delta":{{"content":"Hi"}},"logprobs":{lp}}}]}}"#);
        let c = parse(&data).expect("logprobs");
        assert_eq!(c.logprobs.map(RawValue::get), Some(lp));
        let c = parse(r#"{"choices":[{"delta":{"content":"Hi"},"logprobs":null}]}"#).expect("null");
        assert!(c.logprobs.is_none());
    }

    #[test]
    fn usage_kept_whole() {
        let c = parse(r#"{"choices":[],"usage":{"prompt_tokens":12,"completion_tokens":40,"total_tokens":52,"prompt_tokens_details":{"cached_tokens":8,"audio_tokens":0},"completion_tokens_details":{"reasoning_tokens":20},"cost":null}}"#)
            .expect("usage");
        let u = c.usage.expect("usage");
        assert_eq!(u.total_tokens, 52);
        assert_eq!(u.cached_tokens(), 8);
        assert_eq!(
            serde_json::to_value(&u).expect("json"),
            serde_json::json!({"prompt_tokens":12,"completion_tokens":40,"total_tokens":52,
                "prompt_tokens_details":{"cached_tokens":8,"audio_tokens":0},
                "completion_tokens_details":{"reasoning_tokens":20}}),
            "every field the upstream sent, nulls dropped"
        );
        let c = parse(r#"{"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":4}}"#)
            .expect("usage");
        assert_eq!(
            c.usage.expect("usage").total_tokens,
            7,
            "computed when omitted"
        );
        let c = parse(r#"{"choices":[{"delta":{"content":"x"}}],"usage":null}"#).expect("null");
        assert!(c.usage.is_none());
    }

    #[test]
    fn upstream_error_details() {
        let key = "sk-upstream-secret-7f3a9c";
        let r = Redactor::new([key]);
        let e = parse_chunk(
            &format!(r#"{{"error":{{"message":"bad {key}","type":"server_error","code":500,"param":"{key}"}}}}"#),
            &r,
        )
        .expect_err("event");
        let d = e.upstream_detail().expect("detail");
        assert_eq!(d.r#type.as_deref(), Some("server_error"));
        assert_eq!(
            d.code.as_deref(),
            Some("500"),
            "a numeric code as its decimal string"
        );
        assert_eq!(d.param.as_deref(), Some("[redacted]"));
        assert!(!e.to_string().contains("sk-up"), "{e}");

        let (message, detail) = error_body(
            r#"{"error":{"message":"This model's maximum context length is 8192 tokens","type":"invalid_request_error","code":"context_length_exceeded","param":"messages"}}"#,
            &r,
        );
        assert!(
            message.starts_with("This model's maximum context length"),
            "{message}"
        );
        let detail = detail.expect("detail");
        assert_eq!(detail.code.as_deref(), Some("context_length_exceeded"));
        assert_eq!(detail.param.as_deref(), Some("messages"));
        assert_eq!(
            serde_json::to_value(&detail).expect("json"),
            serde_json::json!({"type":"invalid_request_error","code":"context_length_exceeded","param":"messages"})
        );
        let (_, detail) = error_body(r#"{"error":{"message":"m","code":null}}"#, &r);
        assert_eq!(detail, None, "null fields are not sent");
        let (_, detail) = error_body("plain text", &r);
        assert_eq!(detail, None);
    }

    #[test]
    fn retry_after_headers() {
        let mut h = HeaderMap::new();
        assert_eq!(retry_after(&h), None);
        h.insert(RETRY_AFTER, "3".parse().expect("hv"));
        assert_eq!(retry_after(&h), Some(Duration::from_secs(3)));
        h.insert("retry-after-ms", "150".parse().expect("hv"));
        assert_eq!(retry_after(&h), Some(Duration::from_millis(150)));
        let mut h = HeaderMap::new();
        let later = std::time::SystemTime::now() + Duration::from_secs(60);
        h.insert(
            RETRY_AFTER,
            httpdate::fmt_http_date(later).parse().expect("hv"),
        );
        let d = retry_after(&h).expect("date");
        assert!(
            d > Duration::from_secs(55) && d <= Duration::from_secs(60),
            "{d:?}"
        );
    }

    #[test]
    fn classification() {
        let s = |status| UpstreamError::Status {
            status,
            message: String::new(),
            retry_after: None,
            upstream: None,
        };
        assert!(s(429).retryable());
        assert!(s(503).retryable());
        assert!(!s(400).retryable());
        assert!(!s(401).retryable());
        assert!(UpstreamError::Connect("x".into()).retryable());
        assert!(!UpstreamError::IdleTimeout(Duration::ZERO).retryable());
        assert_eq!(
            UpstreamError::FirstTokenTimeout(Duration::ZERO).code(),
            ErrorCode::UpstreamTimeout
        );
        assert_eq!(s(500).code(), ErrorCode::UpstreamError);
    }

    #[test]
    fn error_bodies() {
        let message = |body| error_body(body, &Redactor::default()).0;
        assert_eq!(
            message(r#"{"error":{"message":"slow down","type":"x"}}"#),
            "slow down"
        );
        assert_eq!(message("plain text"), "plain text");
        assert_eq!(message(""), "(empty body)");
    }
}
