//! An OpenAI-compatible mock upstream, used by the integration tests, the
//! benchmarks and the offline demo (`muxgate mock-upstream`).
//!
//! It answers `POST /v1/chat/completions` either as an OpenAI-style SSE stream
//! (`"stream": true`) or as one `chat.completion` JSON document, and exposes
//! `GET /mock/stats`, `POST /mock/reset` and `GET /healthz`. Its behaviour is
//! steered per request by *directives*, taken from the `x-mock` header and from
//! a `[[mock key=value ...]]` block anywhere in the last user message (the block
//! is removed from the prompt; when both give a key, the header wins):
//!
//! | directive          | effect                                                                       |
//! |--------------------|------------------------------------------------------------------------------|
//! | `chunks=N`         | word mode: exactly N content chunks, see [`word_chunks`] (0..=1000000)       |
//! | (no `chunks`)      | prose mode: a short readable demo answer, one chunk per word                 |
//! | `delay_ms=D`       | pause between content chunks (default 0 in word mode, 30 in prose mode)      |
//! | `chunk_bytes=B`    | pad each word-mode chunk with `.` before its trailing space up to B bytes    |
//! | `fail=STATUS`      | answer HTTP STATUS (400..=599) with an OpenAI-style error body, ...          |
//! | `fail_times=K`     | ... for the first K requests sharing a failure key (default 1)               |
//! | `key=NAME`         | the failure key (default: prompt text plus the raw directive text)           |
//! | `retry_after_ms=M` | on 429/503: `Retry-After: ceil(M/1000)`, `retry-after-ms: M` (default 100)   |
//! | `cut=K`            | break the connection after K content chunks: no finish chunk, no `[DONE]`    |
//! | `stall_ms=S`       | wait S ms after the 200 headers before the first content chunk               |
//! | `finish=REASON`    | `finish_reason` of the final chunk (default `stop`)                          |
//!
//! Directives are `key=value` pairs separated by whitespace or commas; an
//! unknown key or a bad value is a 400. `max_tokens` (or
//! `max_completion_tokens`) below the number of chunks truncates the answer
//! with `finish_reason: "length"`; a `cut` beyond the answer cuts just before
//! the finish chunk. Non-streaming answers wait `stall_ms` plus an explicit
//! `delay_ms` per gap between chunks, and `cut` there sends half of the JSON
//! before breaking the connection. Usage counts whitespace-separated words of
//! all messages as prompt tokens (raw text, blocks included) and content
//! chunks as completion tokens. Array contents join their text parts with `\n`.
//!
//! Streams are generated lazily, one chunk per poll of the response body, so a
//! client that stops reading back-pressures the mock instead of making it
//! buffer the whole answer; `chunks_sent` counts chunks handed to the body.

use std::{
    borrow::Cow,
    fmt::Write as _,
    future::Future,
    net::SocketAddr,
    pin::Pin,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    task::{ready, Context, Poll},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use axum::{
    body::{Body, Bytes},
    extract::{DefaultBodyLimit, State},
    http::{header, HeaderMap, HeaderValue, StatusCode},
    response::{IntoResponse, Response},
    routing::{get, post},
    serve::ListenerExt,
    Json, Router,
};
use dashmap::DashMap;
use futures_util::{Stream, StreamExt};
use parking_lot::Mutex;
use serde_json::{json, Value};
use tokio::{net::TcpListener, task::JoinHandle, time::Sleep};
use tower_http::cors::CorsLayer;

/// The words word mode cycles through; a JavaScript test re-implements
/// [`word_chunks`], so this list and its order are part of the contract.
pub const WORDS: [&str; 16] = [
    "alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india", "juliet",
    "kilo", "lima", "mike", "november", "oscar", "papa",
];

const MAX_CHUNKS: u64 = 1_000_000;
/// Upper bound for every `*_ms` directive: long enough for any test, short
/// enough that a typo cannot park a connection for days.
const MAX_MS: u64 = 3_600_000;
const MAX_CHUNK_BYTES: u64 = 1 << 20;
const MAX_FAIL_TIMES: u64 = 1_000_000;
const DEFAULT_PROSE_DELAY_MS: u64 = 30;
const DEFAULT_RETRY_AFTER_MS: u64 = 100;
/// Benchmarks send long conversations; axum's 2 MiB default would turn them
/// into 413s that the mock never counts.
const BODY_LIMIT: usize = 16 << 20;
const BLOCK_OPEN: &str = "[[mock";
const BLOCK_CLOSE: &str = "]]";
const ECHO_MAX_CHARS: usize = 80;
const DONE_EVENT: &[u8] = b"data: [DONE]\n\n";
/// hyper discards whatever it still buffers when a body fails, so the error
/// waits this long after the last chunk; returning Pending meanwhile lets
/// hyper flush the K chunks the client was promised.
const CUT_GRACE: Duration = Duration::from_millis(10);

fn cut_error() -> std::io::Error {
    std::io::Error::other("mock: response cut by the `cut` directive")
}

/// Live counters of one mock instance. Counters are atomics so that thousands
/// of concurrent streams never contend on a lock.
#[derive(Debug, Default)]
pub struct MockStats {
    requests: AtomicU64,
    completed: AtomicU64,
    aborted: AtomicU64,
    cut: AtomicU64,
    in_flight: AtomicU64,
    chunks_sent: AtomicU64,
    errors_injected: AtomicU64,
    last_authorization: Mutex<Option<String>>,
    last_request: Mutex<Option<Value>>,
}

/// A point-in-time copy of [`MockStats`], also served by `GET /mock/stats`.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, PartialEq)]
pub struct MockStatsSnapshot {
    /// Chat-completion requests received, whatever their outcome.
    pub requests: u64,
    /// Responses whose body was fully produced (SSE through `[DONE]`, or JSON).
    pub completed: u64,
    /// Streams dropped by the client before their end (not counting `cut`).
    pub aborted: u64,
    /// Streams deliberately broken by the `cut` directive.
    pub cut: u64,
    /// Streaming bodies currently open.
    pub in_flight: u64,
    /// Content chunks handed to response bodies, over all requests.
    pub chunks_sent: u64,
    /// HTTP error answers produced by `fail`.
    pub errors_injected: u64,
    /// The `Authorization` header of the last request.
    pub last_authorization: Option<String>,
    /// The JSON body of the last request (`None` if it was not JSON).
    pub last_request: Option<Value>,
}

impl MockStats {
    /// Copies the counters.
    pub fn snapshot(&self) -> MockStatsSnapshot {
        // in_flight is read first: a stream bumps `aborted`/`completed` before
        // it leaves in_flight, so whoever sees it leave also sees its outcome.
        let in_flight = self.in_flight.load(Ordering::SeqCst);
        MockStatsSnapshot {
            requests: self.requests.load(Ordering::SeqCst),
            completed: self.completed.load(Ordering::SeqCst),
            aborted: self.aborted.load(Ordering::SeqCst),
            cut: self.cut.load(Ordering::SeqCst),
            in_flight,
            chunks_sent: self.chunks_sent.load(Ordering::SeqCst),
            errors_injected: self.errors_injected.load(Ordering::SeqCst),
            last_authorization: self.last_authorization.lock().clone(),
            last_request: self.last_request.lock().clone(),
        }
    }

    fn reset(&self) {
        // in_flight is left alone: open streams decrement it when they end,
        // and zeroing it here would make it wrap below zero.
        for counter in [
            &self.requests,
            &self.completed,
            &self.aborted,
            &self.cut,
            &self.chunks_sent,
            &self.errors_injected,
        ] {
            counter.store(0, Ordering::SeqCst);
        }
        *self.last_authorization.lock() = None;
        *self.last_request.lock() = None;
    }
}

/// Shared state of one mock instance; cheap to clone.
#[derive(Debug, Clone)]
pub struct MockState {
    api_key: Option<Arc<str>>,
    stats: Arc<MockStats>,
    failures: Arc<DashMap<String, u32>>,
    // Separate from `requests` so that ids stay unique across `/mock/reset`.
    next_id: Arc<AtomicU64>,
}

impl MockState {
    /// With `Some(key)`, every request must carry `Authorization: Bearer key`.
    pub fn new(api_key: Option<String>) -> Self {
        Self {
            api_key: api_key.map(Arc::from),
            stats: Arc::default(),
            failures: Arc::default(),
            next_id: Arc::default(),
        }
    }

    pub fn stats(&self) -> MockStatsSnapshot {
        self.stats.snapshot()
    }

    /// Zeroes the counters and forgets how often each failure key has failed.
    pub fn reset(&self) {
        self.stats.reset();
        self.failures.clear();
    }
}

/// Per-request directives; `None` means "not given" so that header and
/// message directives can be merged key by key.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Directives {
    pub chunks: Option<usize>,
    pub delay_ms: Option<u64>,
    pub chunk_bytes: Option<usize>,
    pub fail: Option<u16>,
    pub fail_times: Option<u32>,
    pub retry_after_ms: Option<u64>,
    pub key: Option<String>,
    pub cut: Option<usize>,
    pub stall_ms: Option<u64>,
    pub finish: Option<String>,
}

impl Directives {
    /// Every key given in `self` wins over the same key in `base`.
    pub fn overriding(self, base: Directives) -> Directives {
        Directives {
            chunks: self.chunks.or(base.chunks),
            delay_ms: self.delay_ms.or(base.delay_ms),
            chunk_bytes: self.chunk_bytes.or(base.chunk_bytes),
            fail: self.fail.or(base.fail),
            fail_times: self.fail_times.or(base.fail_times),
            retry_after_ms: self.retry_after_ms.or(base.retry_after_ms),
            key: self.key.or(base.key),
            cut: self.cut.or(base.cut),
            stall_ms: self.stall_ms.or(base.stall_ms),
            finish: self.finish.or(base.finish),
        }
    }
}

/// Parses `key=value` pairs separated by whitespace or commas; a later
/// duplicate key wins.
pub fn parse_directives(s: &str) -> Result<Directives, String> {
    let mut d = Directives::default();
    let tokens = s
        .split(|c: char| c.is_whitespace() || c == ',')
        .filter(|t| !t.is_empty());
    for token in tokens {
        let Some((key, value)) = token.split_once('=') else {
            return Err(format!(
                "mock directive `{token}` is not of the form key=value"
            ));
        };
        match key {
            "chunks" => d.chunks = Some(to_usize(number(key, value, 0, MAX_CHUNKS)?)),
            "delay_ms" => d.delay_ms = Some(number(key, value, 0, MAX_MS)?),
            "chunk_bytes" => {
                d.chunk_bytes = Some(to_usize(number(key, value, 0, MAX_CHUNK_BYTES)?));
            }
            "fail" => d.fail = Some(number(key, value, 400, 599)? as u16),
            "fail_times" => d.fail_times = Some(number(key, value, 0, MAX_FAIL_TIMES)? as u32),
            "retry_after_ms" => d.retry_after_ms = Some(number(key, value, 0, MAX_MS)?),
            "key" => d.key = Some(non_empty(key, value)?),
            "cut" => d.cut = Some(to_usize(number(key, value, 0, MAX_CHUNKS)?)),
            "stall_ms" => d.stall_ms = Some(number(key, value, 0, MAX_MS)?),
            "finish" => d.finish = Some(non_empty(key, value)?),
            _ => {
                return Err(format!(
                    "unknown mock directive `{key}` (known: chunks, delay_ms, chunk_bytes, fail, \
                     fail_times, retry_after_ms, key, cut, stall_ms, finish)"
                ))
            }
        }
    }
    Ok(d)
}

fn number(key: &str, value: &str, min: u64, max: u64) -> Result<u64, String> {
    value
        .parse::<u64>()
        .ok()
        .filter(|n| (min..=max).contains(n))
        .ok_or_else(|| {
            format!("mock directive {key}={value}: expected an integer in {min}..={max}")
        })
}

fn non_empty(key: &str, value: &str) -> Result<String, String> {
    if value.is_empty() {
        Err(format!("mock directive {key}= needs a value"))
    } else {
        Ok(value.to_owned())
    }
}

fn to_usize(n: u64) -> usize {
    // Only reachable on targets narrower than the directive limits.
    usize::try_from(n).unwrap_or(usize::MAX)
}

/// Removes every `[[mock ...]]` block from `text`, returning the remaining text
/// and the blocks' insides in order. The block is cut out verbatim, nothing
/// replaces it: the JavaScript re-implementation of the prompt hash relies on it.
fn extract_blocks(text: &str) -> Result<(String, Vec<&str>), String> {
    let mut rest = String::with_capacity(text.len());
    let mut blocks = Vec::new();
    let mut pos = 0;
    let mut search_from = 0;
    while let Some(found) = text[search_from..].find(BLOCK_OPEN) {
        let open = search_from + found;
        let inner_start = open + BLOCK_OPEN.len();
        let after = &text[inner_start..];
        // `[[mockingbird]]` is prose, not a block.
        if !(after.starts_with(char::is_whitespace) || after.starts_with(BLOCK_CLOSE)) {
            search_from = inner_start;
            continue;
        }
        let Some(close) = after.find(BLOCK_CLOSE) else {
            return Err("unterminated [[mock ...]] block in the last user message".to_owned());
        };
        rest.push_str(&text[pos..open]);
        blocks.push(&after[..close]);
        pos = inner_start + close + BLOCK_CLOSE.len();
        search_from = pos;
    }
    rest.push_str(&text[pos..]);
    Ok((rest, blocks))
}

fn prompt_hash(prompt: &str) -> usize {
    prompt
        .bytes()
        .fold(0usize, |h, b| h.wrapping_add(usize::from(b)))
}

fn push_word_chunk(out: &mut String, h: usize, k: usize, pad_to: usize) {
    let start = out.len();
    out.push_str(WORDS[h.wrapping_add(k) % WORDS.len()]);
    // Writing into a String cannot fail.
    let _ = write!(out, "{k}");
    let natural = out.len() - start + 1;
    out.extend(std::iter::repeat_n('.', pad_to.saturating_sub(natural)));
    out.push(' ');
}

/// The exact content chunks the mock sends in word mode for this prompt
/// (without `chunk_bytes`): chunk k is `WORDS[(h + k) % 16]` followed by k and
/// a space, where h is the sum of the UTF-8 bytes of the prompt after removing
/// any `[[mock ...]]` block and trimming whitespace.
pub fn word_chunks(prompt: &str, n: usize) -> Vec<String> {
    let cleaned = extract_blocks(prompt).map_or_else(|_| prompt.to_owned(), |(rest, _)| rest);
    let h = prompt_hash(cleaned.trim());
    (0..n)
        .map(|k| {
            let mut chunk = String::new();
            push_word_chunk(&mut chunk, h, k, 0);
            chunk
        })
        .collect()
}

const PROSE_CORE: [&str; 2] = [
    "This answer comes from muxgate's built-in simulated provider, so no real model or API key is involved.",
    "Every browser tab shares one WebSocket to the gateway, and each answer travels over it as its own multiplexed stream.",
];

const PROSE_EXTRA: [&str; 4] = [
    "You can ask several questions at once and watch their words arrive side by side without opening extra connections.",
    "Cancelling one question stops only that stream, while the others keep flowing over the same socket.",
    "The words arrive a few at a time, just as a real OpenAI-compatible upstream would send them.",
    "Point muxgate at a real provider in its configuration to get genuine answers instead of this demo text.",
];

/// The demo answer: an echo of the question, then 3 to 5 sentences chosen by
/// the prompt hash so that different questions get visibly different answers.
fn prose_text(prompt: &str) -> String {
    let mut text = String::new();
    let collapsed = prompt.split_whitespace().collect::<Vec<_>>().join(" ");
    if collapsed.is_empty() {
        text.push_str("You sent an empty message.");
    } else {
        let mut echo: String = collapsed.chars().take(ECHO_MAX_CHARS).collect();
        if echo.len() < collapsed.len() {
            echo.push('…');
        }
        let _ = write!(text, "You asked: “{echo}”.");
    }
    let h = prompt_hash(prompt);
    for sentence in PROSE_CORE {
        text.push(' ');
        text.push_str(sentence);
    }
    let extra = 1 + h % 3;
    for i in 0..extra {
        text.push(' ');
        text.push_str(PROSE_EXTRA[(h + i) % PROSE_EXTRA.len()]);
    }
    text
}

fn prose_chunks(prompt: &str) -> Vec<String> {
    prose_text(prompt)
        .split_whitespace()
        .map(|w| format!("{w} "))
        .collect()
}

fn push_json_str(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if u32::from(c) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", u32::from(c));
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

/// Text of one message: a string, or the `text` parts of an array joined with
/// `\n` (a separator keeps the words of adjacent parts apart).
fn message_text(message: &Value) -> Cow<'_, str> {
    match message.get("content") {
        Some(Value::String(s)) => Cow::Borrowed(s.as_str()),
        Some(Value::Array(parts)) => Cow::Owned(
            parts
                .iter()
                .filter(|p| p.get("type").and_then(Value::as_str).unwrap_or("text") == "text")
                .filter_map(|p| p.get("text").and_then(Value::as_str))
                .collect::<Vec<_>>()
                .join("\n"),
        ),
        _ => Cow::Borrowed(""),
    }
}

/// The fields of a chat-completion request the mock cares about.
struct ChatRequest {
    model: String,
    stream: bool,
    include_usage: bool,
    max_tokens: Option<u64>,
    /// Last user message, blocks removed, trimmed.
    prompt: String,
    /// Insides of the message's `[[mock ...]]` blocks, space-joined.
    block_directives: String,
    prompt_tokens: u64,
}

fn parse_request(body: &Value) -> Result<ChatRequest, String> {
    if !body.is_object() {
        return Err("the request body must be a JSON object".to_owned());
    }
    let model = body
        .get("model")
        .and_then(Value::as_str)
        .ok_or("`model` is required and must be a string")?
        .to_owned();
    let messages = body
        .get("messages")
        .and_then(Value::as_array)
        .ok_or("`messages` is required and must be an array")?;
    let mut max_tokens = None;
    for field in ["max_completion_tokens", "max_tokens"] {
        match body.get(field) {
            None | Some(Value::Null) => {}
            Some(v) => {
                let n = v
                    .as_u64()
                    .ok_or_else(|| format!("`{field}` must be a non-negative integer"))?;
                max_tokens.get_or_insert(n);
            }
        }
    }
    // Counted on the raw text, directive blocks included: the mock reports
    // what it was sent, like a real provider would.
    let prompt_tokens = messages
        .iter()
        .map(|m| message_text(m).split_whitespace().count() as u64)
        .sum();
    let last_user = messages
        .iter()
        .rev()
        .find(|m| m.get("role").and_then(Value::as_str) == Some("user"));
    let (prompt, block_directives) = match last_user {
        Some(m) => {
            let text = message_text(m);
            let (rest, blocks) = extract_blocks(&text)?;
            (rest.trim().to_owned(), blocks.join(" "))
        }
        None => (String::new(), String::new()),
    };
    Ok(ChatRequest {
        model,
        stream: body.get("stream").and_then(Value::as_bool).unwrap_or(false),
        include_usage: body
            .pointer("/stream_options/include_usage")
            .and_then(Value::as_bool)
            .unwrap_or(false),
        max_tokens,
        prompt,
        block_directives,
        prompt_tokens,
    })
}

fn openai_error(status: StatusCode, kind: &str, code: Option<&str>, message: &str) -> Response {
    let body = json!({
        "error": { "message": message, "type": kind, "param": null, "code": code }
    });
    (status, Json(body)).into_response()
}

fn bad_request(message: &str) -> Response {
    openai_error(
        StatusCode::BAD_REQUEST,
        "invalid_request_error",
        None,
        &format!("mock: {message}"),
    )
}

enum Content {
    Words { h: usize, pad_to: usize, n: usize },
    Prose(Vec<String>),
}

impl Content {
    fn len(&self) -> usize {
        match self {
            Content::Words { n, .. } => *n,
            Content::Prose(chunks) => chunks.len(),
        }
    }

    fn push_json(&self, out: &mut String, k: usize) {
        match self {
            // Word chunks are ASCII letters, digits, dots and a space: nothing to escape.
            Content::Words { h, pad_to, .. } => {
                out.push('"');
                push_word_chunk(out, *h, k, *pad_to);
                out.push('"');
            }
            Content::Prose(chunks) => push_json_str(out, &chunks[k]),
        }
    }

    fn text(&self, limit: usize) -> String {
        match self {
            Content::Words { h, pad_to, .. } => {
                let mut text = String::new();
                for k in 0..limit {
                    push_word_chunk(&mut text, *h, k, *pad_to);
                }
                text
            }
            Content::Prose(chunks) => chunks[..limit].concat(),
        }
    }
}

/// Everything a response needs, computed once per request.
struct Plan {
    /// `data: {"id":..,"object":..,"created":..,"model":..,` shared by every event.
    head: String,
    id: String,
    created: u64,
    model: String,
    content: Content,
    /// Number of content chunks to send (after `max_tokens`).
    limit: usize,
    finish: String,
    delay: Duration,
    stall: Duration,
    /// Chunk count after which to cut; never beyond `limit` so that a cut
    /// always happens once asked for.
    cut_at: Option<usize>,
    include_usage: bool,
    prompt_tokens: u64,
}

impl Plan {
    fn new(id_number: u64, req: ChatRequest, d: &Directives) -> Plan {
        let created = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |t| t.as_secs());
        let id = format!("chatcmpl-mock-{id_number}");
        let (content, default_delay) = match d.chunks {
            Some(n) => (
                Content::Words {
                    h: prompt_hash(&req.prompt),
                    pad_to: d.chunk_bytes.unwrap_or(0),
                    n,
                },
                0,
            ),
            None => (
                Content::Prose(prose_chunks(&req.prompt)),
                DEFAULT_PROSE_DELAY_MS,
            ),
        };
        let total = content.len();
        let limit = req.max_tokens.map_or(total, |m| {
            total.min(usize::try_from(m).unwrap_or(usize::MAX))
        });
        let finish = if limit < total {
            "length".to_owned()
        } else {
            d.finish.clone().unwrap_or_else(|| "stop".to_owned())
        };
        let mut head = String::with_capacity(128 + req.model.len());
        let _ = write!(
            head,
            "data: {{\"id\":\"{id}\",\"object\":\"chat.completion.chunk\",\"created\":{created},\"model\":"
        );
        push_json_str(&mut head, &req.model);
        head.push(',');
        Plan {
            head,
            id,
            created,
            model: req.model,
            content,
            limit,
            finish,
            delay: Duration::from_millis(d.delay_ms.unwrap_or(default_delay)),
            stall: Duration::from_millis(d.stall_ms.unwrap_or(0)),
            cut_at: d.cut.map(|c| c.min(limit)),
            include_usage: req.include_usage,
            prompt_tokens: req.prompt_tokens,
        }
    }

    fn choice_event(
        &self,
        extra: usize,
        delta: impl FnOnce(&mut String),
        finish: Option<&str>,
    ) -> Bytes {
        let mut out = String::with_capacity(self.head.len() + 96 + extra);
        out.push_str(&self.head);
        out.push_str("\"choices\":[{\"index\":0,\"delta\":");
        delta(&mut out);
        out.push_str(",\"finish_reason\":");
        match finish {
            Some(reason) => push_json_str(&mut out, reason),
            None => out.push_str("null"),
        }
        out.push_str("}]}\n\n");
        Bytes::from(out)
    }

    fn role_event(&self) -> Bytes {
        self.choice_event(
            0,
            |out| out.push_str("{\"role\":\"assistant\",\"content\":\"\"}"),
            None,
        )
    }

    fn content_event(&self, k: usize) -> Bytes {
        let extra = match &self.content {
            Content::Words { pad_to, .. } => *pad_to + 24,
            Content::Prose(chunks) => chunks[k].len() + 8,
        };
        self.choice_event(
            extra,
            |out| {
                out.push_str("{\"content\":");
                self.content.push_json(out, k);
                out.push('}');
            },
            None,
        )
    }

    fn finish_event(&self) -> Bytes {
        self.choice_event(
            self.finish.len(),
            |out| out.push_str("{}"),
            Some(&self.finish),
        )
    }

    fn usage_json(&self) -> Value {
        let completion = self.limit as u64;
        json!({
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": completion,
            "total_tokens": self.prompt_tokens + completion,
        })
    }

    fn usage_event(&self) -> Bytes {
        let mut out = String::with_capacity(self.head.len() + 128);
        out.push_str(&self.head);
        let _ = write!(out, "\"choices\":[],\"usage\":{}}}\n\n", self.usage_json());
        Bytes::from(out)
    }

    fn completion_json(&self) -> Value {
        json!({
            "id": self.id,
            "object": "chat.completion",
            "created": self.created,
            "model": self.model,
            "choices": [{
                "index": 0,
                "message": { "role": "assistant", "content": self.content.text(self.limit) },
                "finish_reason": self.finish,
            }],
            "usage": self.usage_json(),
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Open,
    Completed,
    Cut,
}

/// Owned by a streaming body; its Drop is the only reliable signal that the
/// client went away, since hyper just drops the body when the socket dies.
struct StreamGuard {
    stats: Arc<MockStats>,
    outcome: Outcome,
}

impl StreamGuard {
    fn new(stats: Arc<MockStats>) -> Self {
        stats.in_flight.fetch_add(1, Ordering::SeqCst);
        Self {
            stats,
            outcome: Outcome::Open,
        }
    }
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        if self.outcome == Outcome::Open {
            self.stats.aborted.fetch_add(1, Ordering::SeqCst);
        }
        self.stats.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

#[derive(Debug, Clone, Copy)]
enum Phase {
    Role,
    Stalled,
    Delay(usize),
    Content(usize),
    Cut,
    Cutting,
    Finish,
    Usage,
    Done,
    End,
}

/// The SSE body: a hand-rolled state machine rather than an async block so
/// that one boxed timer is reused for every delay and each poll yields at most
/// one event (the lazy generation backpressure depends on).
struct SseBody {
    plan: Plan,
    phase: Phase,
    timer: Option<Pin<Box<Sleep>>>,
    guard: StreamGuard,
}

impl SseBody {
    fn after(&self, sent: usize) -> Phase {
        if self.plan.cut_at == Some(sent) {
            Phase::Cut
        } else if sent >= self.plan.limit {
            Phase::Finish
        } else {
            Phase::Content(sent)
        }
    }

    fn arm(&mut self, after: Duration) {
        let deadline = tokio::time::Instant::now() + after;
        match &mut self.timer {
            Some(timer) => timer.as_mut().reset(deadline),
            None => self.timer = Some(Box::pin(tokio::time::sleep_until(deadline))),
        }
    }

    fn poll_timer(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        match &mut self.timer {
            Some(timer) => timer.as_mut().poll(cx),
            None => Poll::Ready(()),
        }
    }
}

impl Stream for SseBody {
    type Item = Result<Bytes, std::io::Error>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        loop {
            match this.phase {
                Phase::Role => {
                    let event = this.plan.role_event();
                    this.phase = if this.plan.stall.is_zero() {
                        this.after(0)
                    } else {
                        this.arm(this.plan.stall);
                        Phase::Stalled
                    };
                    return Poll::Ready(Some(Ok(event)));
                }
                Phase::Stalled => {
                    ready!(this.poll_timer(cx));
                    this.phase = this.after(0);
                }
                Phase::Delay(k) => {
                    ready!(this.poll_timer(cx));
                    this.phase = Phase::Content(k);
                }
                Phase::Content(k) => {
                    let event = this.plan.content_event(k);
                    this.guard.stats.chunks_sent.fetch_add(1, Ordering::Relaxed);
                    this.phase = match this.after(k + 1) {
                        Phase::Content(next) if !this.plan.delay.is_zero() => {
                            this.arm(this.plan.delay);
                            Phase::Delay(next)
                        }
                        next => next,
                    };
                    return Poll::Ready(Some(Ok(event)));
                }
                Phase::Cut => {
                    this.arm(CUT_GRACE);
                    this.phase = Phase::Cutting;
                }
                Phase::Cutting => {
                    ready!(this.poll_timer(cx));
                    this.guard.outcome = Outcome::Cut;
                    this.guard.stats.cut.fetch_add(1, Ordering::SeqCst);
                    this.phase = Phase::End;
                    // An error from the body makes hyper drop the connection
                    // without the final chunk, like an upstream dying mid-answer.
                    return Poll::Ready(Some(Err(cut_error())));
                }
                Phase::Finish => {
                    this.phase = if this.plan.include_usage {
                        Phase::Usage
                    } else {
                        Phase::Done
                    };
                    return Poll::Ready(Some(Ok(this.plan.finish_event())));
                }
                Phase::Usage => {
                    this.phase = Phase::Done;
                    return Poll::Ready(Some(Ok(this.plan.usage_event())));
                }
                Phase::Done => {
                    this.guard.outcome = Outcome::Completed;
                    this.guard.stats.completed.fetch_add(1, Ordering::SeqCst);
                    this.phase = Phase::End;
                    return Poll::Ready(Some(Ok(Bytes::from_static(DONE_EVENT))));
                }
                Phase::End => return Poll::Ready(None),
            }
        }
    }
}

fn sse_response(plan: Plan, stats: Arc<MockStats>) -> Response {
    let body = SseBody {
        plan,
        phase: Phase::Role,
        timer: None,
        guard: StreamGuard::new(stats),
    };
    (
        [
            (
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/event-stream"),
            ),
            (header::CACHE_CONTROL, HeaderValue::from_static("no-cache")),
        ],
        Body::from_stream(body),
    )
        .into_response()
}

async fn json_response(plan: Plan, explicit_delay: Option<u64>, stats: &MockStats) -> Response {
    let gaps = plan.limit.saturating_sub(1) as u64;
    let wait = plan.stall + Duration::from_millis(explicit_delay.unwrap_or(0).saturating_mul(gaps));
    if !wait.is_zero() {
        tokio::time::sleep(wait).await;
    }
    let body = plan.completion_json().to_string();
    let json_type = [(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    )];
    if plan.cut_at.is_some() {
        stats.cut.fetch_add(1, Ordering::SeqCst);
        let whole = Bytes::from(body);
        let half = whole.slice(..whole.len() / 2);
        let first = futures_util::stream::once(async move { Ok(half) });
        let then_fail = futures_util::stream::once(async {
            tokio::time::sleep(CUT_GRACE).await;
            Err(cut_error())
        });
        let parts = first.chain(then_fail);
        return (json_type, Body::from_stream(parts)).into_response();
    }
    stats.completed.fetch_add(1, Ordering::SeqCst);
    (json_type, body).into_response()
}

fn directive_header(headers: &HeaderMap) -> Result<&str, String> {
    match headers.get("x-mock") {
        None => Ok(""),
        Some(v) => v
            .to_str()
            .map_err(|_| "the x-mock header must be visible ASCII".to_owned()),
    }
}

async fn respond(
    state: &MockState,
    headers: &HeaderMap,
    body: Option<&Value>,
) -> Result<Response, Response> {
    if let Some(key) = &state.api_key {
        let presented = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        if presented != Some(&**key) {
            return Err(openai_error(
                StatusCode::UNAUTHORIZED,
                "invalid_request_error",
                Some("invalid_api_key"),
                "mock: missing or incorrect API key (expected `Authorization: Bearer <key>`)",
            ));
        }
    }
    let body = body.ok_or_else(|| bad_request("the request body is not valid JSON"))?;
    let req = parse_request(body).map_err(|m| bad_request(&m))?;
    let header_source = directive_header(headers).map_err(|m| bad_request(&m))?;
    let from_header = parse_directives(header_source).map_err(|m| bad_request(&m))?;
    let from_message = parse_directives(&req.block_directives).map_err(|m| bad_request(&m))?;
    let d = from_header.overriding(from_message);

    if let Some(status) = d.fail {
        let times = d.fail_times.unwrap_or(1);
        let key = d.key.clone().unwrap_or_else(|| {
            format!(
                "{}\u{1f}{}\u{1f}{}",
                req.prompt, header_source, req.block_directives
            )
        });
        let attempt = {
            let mut failures = state.failures.entry(key).or_insert(0);
            if *failures < times {
                *failures += 1;
                Some(*failures)
            } else {
                None
            }
        };
        if let Some(attempt) = attempt {
            state.stats.errors_injected.fetch_add(1, Ordering::SeqCst);
            return Err(injected_failure(status, attempt, times, &d));
        }
    }

    let id = state.next_id.fetch_add(1, Ordering::Relaxed) + 1;
    let stream = req.stream;
    let plan = Plan::new(id, req, &d);
    if stream {
        Ok(sse_response(plan, Arc::clone(&state.stats)))
    } else {
        Ok(json_response(plan, d.delay_ms, &state.stats).await)
    }
}

fn injected_failure(status: u16, attempt: u32, times: u32, d: &Directives) -> Response {
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let (kind, code) = match status.as_u16() {
        429 => ("rate_limit_error", "rate_limit_exceeded"),
        s if s >= 500 => ("server_error", "mock_injected_failure"),
        _ => ("invalid_request_error", "mock_injected_failure"),
    };
    let message = format!(
        "mock: injected failure {} ({attempt} of {times})",
        status.as_u16()
    );
    let mut response = openai_error(status, kind, Some(code), &message);
    if matches!(status.as_u16(), 429 | 503) {
        let ms = d.retry_after_ms.unwrap_or(DEFAULT_RETRY_AFTER_MS);
        let headers = response.headers_mut();
        headers.insert(header::RETRY_AFTER, HeaderValue::from(ms.div_ceil(1000)));
        headers.insert("retry-after-ms", HeaderValue::from(ms));
    }
    response
}

async fn chat_completions(
    State(state): State<MockState>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    state.stats.requests.fetch_add(1, Ordering::SeqCst);
    *state.stats.last_authorization.lock() = headers
        .get(header::AUTHORIZATION)
        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned());
    let value = serde_json::from_slice::<Value>(&body).ok();
    *state.stats.last_request.lock() = value.clone();
    match respond(&state, &headers, value.as_ref()).await {
        Ok(response) | Err(response) => response,
    }
}

async fn stats(State(state): State<MockState>) -> Json<MockStatsSnapshot> {
    Json(state.stats())
}

async fn reset(State(state): State<MockState>) -> Json<MockStatsSnapshot> {
    state.reset();
    Json(state.stats())
}

async fn not_found() -> Response {
    openai_error(
        StatusCode::NOT_FOUND,
        "invalid_request_error",
        Some("unknown_url"),
        "mock: unknown route (try POST /v1/chat/completions)",
    )
}

/// All mock routes, with permissive CORS so the demo page on another loopback
/// port can call the mock directly.
pub fn router(state: MockState) -> Router {
    Router::new()
        .route("/v1/chat/completions", post(chat_completions))
        .route("/mock/stats", get(stats))
        .route("/mock/reset", post(reset))
        .route("/healthz", get(|| async { "ok" }))
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(BODY_LIMIT))
        .layer(CorsLayer::permissive())
        .with_state(state)
}

/// A mock served in a background task; dropping the handle stops accepting
/// connections.
#[derive(Debug)]
pub struct MockHandle {
    pub addr: SocketAddr,
    pub state: MockState,
    task: JoinHandle<()>,
}

impl MockHandle {
    /// The OpenAI-style base URL, `http://ADDR/v1`.
    pub fn base_url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    pub fn stats(&self) -> MockStatsSnapshot {
        self.state.stats()
    }
}

impl Drop for MockHandle {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn nodelay(listener: TcpListener) -> impl axum::serve::Listener<Addr = SocketAddr> {
    // Without TCP_NODELAY small SSE events can sit in Nagle's buffer waiting
    // for a delayed ACK, which skews latency benchmarks by tens of milliseconds.
    listener.tap_io(|tcp| {
        if let Err(err) = tcp.set_nodelay(true) {
            tracing::debug!(%err, "mock upstream: cannot set TCP_NODELAY");
        }
    })
}

/// Serves a fresh mock on `listener` in a background task.
pub async fn spawn(listener: TcpListener, api_key: Option<String>) -> std::io::Result<MockHandle> {
    let addr = listener.local_addr()?;
    let state = MockState::new(api_key);
    let server = axum::serve(nodelay(listener), router(state.clone()));
    let task = tokio::spawn(async move {
        if let Err(err) = server.await {
            tracing::warn!(%err, "mock upstream stopped");
        }
    });
    Ok(MockHandle { addr, state, task })
}

/// Serves the mock until `shutdown` resolves, then waits for open responses.
pub async fn run(
    listener: TcpListener,
    state: MockState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(nodelay(listener), router(state))
        .with_graceful_shutdown(shutdown)
        .await
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_directive() {
        let d = parse_directives(
            "chunks=5 delay_ms=10 chunk_bytes=64 fail=429 fail_times=2 retry_after_ms=1500 \
             key=abc cut=3 stall_ms=7 finish=content_filter",
        )
        .unwrap();
        assert_eq!(
            d,
            Directives {
                chunks: Some(5),
                delay_ms: Some(10),
                chunk_bytes: Some(64),
                fail: Some(429),
                fail_times: Some(2),
                retry_after_ms: Some(1500),
                key: Some("abc".into()),
                cut: Some(3),
                stall_ms: Some(7),
                finish: Some("content_filter".into()),
            }
        );
    }

    #[test]
    fn parse_accepts_empty_commas_and_duplicates() {
        assert_eq!(parse_directives("").unwrap(), Directives::default());
        assert_eq!(parse_directives("  \t ").unwrap(), Directives::default());
        let d = parse_directives("chunks=1, chunks=2,delay_ms=0").unwrap();
        assert_eq!(d.chunks, Some(2));
        assert_eq!(d.delay_ms, Some(0));
        assert_eq!(
            parse_directives("chunks=1000000").unwrap().chunks,
            Some(1_000_000)
        );
    }

    #[test]
    fn parse_rejects_bad_input() {
        for bad in [
            "chunks",
            "chunks=",
            "chunks=-1",
            "chunks=abc",
            "chunks=1000001",
            "fail=200",
            "fail=600",
            "bogus=1",
            "key=",
            "finish=",
            "delay_ms=1.5",
        ] {
            let err = parse_directives(bad).unwrap_err();
            assert!(err.contains("mock directive"), "{bad}: {err}");
        }
        assert!(parse_directives("bogus=1").unwrap_err().contains("unknown"));
        assert!(parse_directives("chunks=abc")
            .unwrap_err()
            .contains("chunks"));
    }

    #[test]
    fn header_directives_override_message_directives() {
        let header = parse_directives("chunks=3").unwrap();
        let message = parse_directives("chunks=9 delay_ms=4").unwrap();
        let merged = header.overriding(message);
        assert_eq!(merged.chunks, Some(3));
        assert_eq!(merged.delay_ms, Some(4));
    }

    #[test]
    fn blocks_are_removed_verbatim() {
        let (rest, blocks) = extract_blocks("hi [[mock chunks=3]] there [[mock cut=1]]").unwrap();
        assert_eq!(rest, "hi  there ");
        assert_eq!(blocks, vec![" chunks=3", " cut=1"]);
        let (rest, blocks) = extract_blocks("[[mock]]x").unwrap();
        assert_eq!((rest.as_str(), blocks), ("x", vec![""]));
        let (rest, blocks) = extract_blocks("a [[mockingbird]] b").unwrap();
        assert_eq!(rest, "a [[mockingbird]] b");
        assert!(blocks.is_empty());
        assert!(extract_blocks("x [[mock chunks=3").is_err());
    }

    #[test]
    fn word_chunks_follow_the_documented_rule() {
        // h = 0 for the empty prompt.
        assert_eq!(word_chunks("", 3), vec!["alpha0 ", "bravo1 ", "charlie2 "]);
        // "a" = 97, 97 % 16 = 1.
        assert_eq!(word_chunks("a", 2), vec!["bravo0 ", "charlie1 "]);
        // Wraps around the word list.
        assert_eq!(word_chunks("", 18)[16..], ["alpha16 ", "bravo17 "]);
        // Trimming and block removal do not change the hash.
        assert_eq!(word_chunks("  a \n", 2), word_chunks("a", 2));
        assert_eq!(word_chunks("a [[mock chunks=2]]", 2), word_chunks("a", 2));
        // Multi-byte characters count every UTF-8 byte: "é" = 0xC3 + 0xA9 = 364, % 16 = 12.
        assert_eq!(word_chunks("é", 1), vec!["mike0 "]);
        assert!(word_chunks("x", 0).is_empty());
    }

    #[test]
    fn chunk_padding_reaches_the_requested_size() {
        let mut s = String::new();
        push_word_chunk(&mut s, 0, 0, 16);
        assert_eq!(s, "alpha0......... ");
        s.clear();
        push_word_chunk(&mut s, 0, 0, 3);
        assert_eq!(s, "alpha0 ");
    }

    #[test]
    fn prose_is_deterministic_and_readable() {
        let a = prose_text("What is muxgate?");
        assert_eq!(a, prose_text("What is muxgate?"));
        assert!(a.starts_with("You asked: “What is muxgate?”. "));
        assert!(a.contains("simulated provider"));
        assert!(a.contains("WebSocket"));
        let sentences = a.matches(". ").count() + 1;
        assert!((4..=6).contains(&sentences), "{sentences}: {a}");
        let long = "word ".repeat(50);
        assert!(prose_text(&long).contains("…”."));
        assert!(prose_text("").starts_with("You sent an empty message."));
        let chunks = prose_chunks("hi");
        assert!(chunks
            .iter()
            .all(|c| c.ends_with(' ') && !c.trim().is_empty()));
    }

    #[test]
    fn json_strings_are_escaped() {
        let mut s = String::new();
        push_json_str(&mut s, "a\"b\\c\nd\u{1}é");
        assert_eq!(s, r#""a\"b\\c\nd\u0001é""#);
        let back: String = serde_json::from_str(&s).unwrap();
        assert_eq!(back, "a\"b\\c\nd\u{1}é");
    }

    #[test]
    fn message_text_joins_text_parts() {
        let m = json!({"role":"user","content":[
            {"type":"text","text":"Hello"},
            {"type":"image_url","image_url":{"url":"x"}},
            {"type":"text","text":"world"}
        ]});
        assert_eq!(message_text(&m), "Hello\nworld");
        assert_eq!(
            message_text(&json!({"role":"assistant","content":null})),
            ""
        );
    }
}
