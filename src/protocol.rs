//! Wire protocol v1: the frames, error codes and close codes of `docs/protocol.md`.
//!
//! Client frames are parsed in two steps (the `type` first, then the frame itself) so that a
//! bad frame gets an error that names what is wrong. Server frames are serialized once into
//! [`Utf8Bytes`] and shared by reference count between a stream's replay log and the socket:
//! the per-chunk `delta` frame is written by hand to avoid a `serde_json::Value` on the hot path.

use std::borrow::Cow;
use std::fmt;

use axum::extract::ws::Utf8Bytes;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use serde_json::{Map, Value};

/// The WebSocket subprotocol the gateway accepts when a client offers it.
pub const SUBPROTOCOL: &str = "muxgate.v1";

/// Longest stream id the contract allows.
pub const MAX_STREAM_ID_LEN: usize = 64;

/// Every error code of the contract. Mirrored in `web/src/constants.js`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    Unauthorized,
    BadRequest,
    DuplicateId,
    NotFound,
    TooManyStreams,
    RateLimited,
    Overloaded,
    BudgetExceeded,
    UpstreamError,
    UpstreamTimeout,
    Cancelled,
    Internal,
}

impl ErrorCode {
    /// Every code, for the check that the four places naming them agree.
    pub const ALL: [ErrorCode; 12] = [
        ErrorCode::Unauthorized,
        ErrorCode::BadRequest,
        ErrorCode::DuplicateId,
        ErrorCode::NotFound,
        ErrorCode::TooManyStreams,
        ErrorCode::RateLimited,
        ErrorCode::Overloaded,
        ErrorCode::BudgetExceeded,
        ErrorCode::UpstreamError,
        ErrorCode::UpstreamTimeout,
        ErrorCode::Cancelled,
        ErrorCode::Internal,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::Unauthorized => "unauthorized",
            ErrorCode::BadRequest => "bad_request",
            ErrorCode::DuplicateId => "duplicate_id",
            ErrorCode::NotFound => "not_found",
            ErrorCode::TooManyStreams => "too_many_streams",
            ErrorCode::RateLimited => "rate_limited",
            ErrorCode::Overloaded => "overloaded",
            ErrorCode::BudgetExceeded => "budget_exceeded",
            ErrorCode::UpstreamError => "upstream_error",
            ErrorCode::UpstreamTimeout => "upstream_timeout",
            ErrorCode::Cancelled => "cancelled",
            ErrorCode::Internal => "internal",
        }
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// WebSocket close codes the gateway uses. The 4xxx range is ours; a client should reconnect
/// after every code except [`close::UNAUTHORIZED`] (get a new token first) and
/// [`close::POLICY`] (fix the client).
pub mod close {
    /// Normal closure after a client's own close. Named for the table's check only: the
    /// WebSocket layer echoes a client's close code by itself.
    #[cfg_attr(not(test), allow(dead_code))]
    pub const NORMAL: u16 = 1000;
    /// The gateway is shutting down; reconnect (elsewhere) and resume.
    pub const GOING_AWAY: u16 = 1001;
    /// The WebSocket framing was broken (RFC 6455). Fix the client.
    pub const PROTOCOL_ERROR: u16 = 1002;
    /// A text frame was not valid UTF-8. Fix the client.
    pub const INVALID_DATA: u16 = 1007;
    /// A frame over the hard size limit (8× `max_frame_bytes`, at least 1 MiB). Fix the client.
    pub const TOO_BIG: u16 = 1009;
    /// Too many bad frames on one connection ("repeated abuse" in the contract). Do not retry
    /// unchanged.
    pub const POLICY: u16 = 4400;
    /// No `hello` in time, a bad or expired token, or a frame before `hello`.
    pub const UNAUTHORIZED: u16 = 4401;
    /// The client read too slowly: one socket write did not finish within the write timeout.
    /// Reconnect and resume; nothing was lost.
    pub const SLOW_CONSUMER: u16 = 4408;
    /// The client stopped answering heartbeats. Reconnect and resume.
    pub const HEARTBEAT_TIMEOUT: u16 = 4409;
    /// The user already has the tier's maximum of simultaneous connections. Reconnect only
    /// after closing another.
    pub const TOO_MANY_CONNECTIONS: u16 = 4429;

    /// Every code the gateway closes with, for the check that the places naming them agree.
    #[cfg(test)]
    pub const ALL: [u16; 10] = [
        NORMAL,
        GOING_AWAY,
        PROTOCOL_ERROR,
        INVALID_DATA,
        TOO_BIG,
        POLICY,
        UNAUTHORIZED,
        SLOW_CONSUMER,
        HEARTBEAT_TIMEOUT,
        TOO_MANY_CONNECTIONS,
    ];
}

/// Whether `id` is a valid logical stream id: 1–64 chars of `[A-Za-z0-9._:-]`.
pub fn valid_stream_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= MAX_STREAM_ID_LEN
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-'))
}

/// Longest `model` name accepted.
pub const MAX_MODEL_LEN: usize = 200;

/// Whether `s` holds no character that could forge or hide a log line: no C0/C1 control
/// (newline, carriage return, ESC, DEL...) and no bidirectional override.
pub fn printable(s: &str) -> bool {
    !s.chars().any(unsafe_in_logs)
}

fn unsafe_in_logs(c: char) -> bool {
    c.is_control()
        || matches!(c, '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
}

/// Whether `model` is a model name the gateway will route: 1–200 bytes, printable.
pub fn valid_model(model: &str) -> bool {
    !model.is_empty() && model.len() <= MAX_MODEL_LEN && printable(model)
}

/// Displays a client- or upstream-derived string for a log line or a plain-text answer: what
/// [`printable`] refuses is written as a `\u{..}` escape, so the text can neither end the line
/// nor steer a terminal. Valid ids, models and users print unchanged.
pub struct LogSafe<'a>(pub &'a str);

impl fmt::Display for LogSafe<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut rest = self.0;
        while let Some((i, c)) = rest.char_indices().find(|&(_, c)| unsafe_in_logs(c)) {
            f.write_str(&rest[..i])?;
            write!(f, "\\u{{{:x}}}", c as u32)?;
            rest = &rest[i + c.len_utf8()..];
        }
        f.write_str(rest)
    }
}

/// One entry of `hello.resume`.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
pub struct ResumeRequest {
    pub id: String,
    /// The last `seq` the client saw; replay starts after it. 0 (or absent) replays everything.
    #[serde(default)]
    pub after: u64,
}

/// A parsed client frame.
#[derive(Debug, Clone, PartialEq)]
pub enum ClientFrame {
    Hello {
        token: String,
        client: Option<String>,
        resume: Vec<ResumeRequest>,
        /// Extension: the client reads several frames per WebSocket message (a JSON array).
        batch: bool,
    },
    Open(OpenRequest),
    Cancel {
        id: String,
    },
    Ping {
        ts: Value,
    },
    /// A new token for the same user and tier, before the current one expires.
    Refresh {
        token: String,
    },
    /// Extension: `hello.resume` on a connection already authenticated (a warm standby socket
    /// taking over a closed one's streams without a new handshake).
    Resume {
        resume: Vec<ResumeRequest>,
    },
}

/// The `open` frame: one logical stream to run.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct OpenRequest {
    pub id: String,
    pub model: String,
    pub messages: Vec<Value>,
    #[serde(default)]
    pub params: Map<String, Value>,
}

#[derive(Deserialize)]
struct Envelope<'a> {
    #[serde(rename = "type", borrow)]
    kind: Cow<'a, str>,
}

#[derive(Deserialize)]
struct HelloFrame {
    token: String,
    #[serde(default)]
    client: Option<String>,
    #[serde(default)]
    resume: Vec<ResumeRequest>,
    #[serde(default)]
    batch: bool,
}

#[derive(Deserialize)]
struct ResumeFrame {
    resume: Vec<ResumeRequest>,
}

#[derive(Deserialize)]
struct RefreshFrame {
    token: String,
}

#[derive(Deserialize)]
struct CancelFrame {
    id: String,
}

#[derive(Deserialize)]
struct PingFrame {
    #[serde(default)]
    ts: Value,
}

/// Why a client frame was refused; the message goes into the `error` frame as is.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{0}")]
pub struct FrameError(pub String);

/// Parses one client text frame. Unknown fields are ignored, as the contract says.
pub fn parse_client_frame(text: &str) -> Result<ClientFrame, FrameError> {
    let envelope: Envelope<'_> = serde_json::from_str(text).map_err(|e| {
        FrameError(format!(
            "frame is not a JSON object with a string field `type`: {e}"
        ))
    })?;
    let bad = |kind: &str, e: serde_json::Error| FrameError(format!("bad `{kind}` frame: {e}"));
    match envelope.kind.as_ref() {
        "hello" => {
            let f: HelloFrame = serde_json::from_str(text).map_err(|e| bad("hello", e))?;
            Ok(ClientFrame::Hello {
                token: f.token,
                client: f.client,
                resume: f.resume,
                batch: f.batch,
            })
        }
        "open" => {
            let f: OpenRequest = serde_json::from_str(text).map_err(|e| bad("open", e))?;
            Ok(ClientFrame::Open(f))
        }
        "cancel" => {
            let f: CancelFrame = serde_json::from_str(text).map_err(|e| bad("cancel", e))?;
            Ok(ClientFrame::Cancel { id: f.id })
        }
        "refresh" => {
            let f: RefreshFrame = serde_json::from_str(text).map_err(|e| bad("refresh", e))?;
            Ok(ClientFrame::Refresh { token: f.token })
        }
        "resume" => {
            let f: ResumeFrame = serde_json::from_str(text).map_err(|e| bad("resume", e))?;
            Ok(ClientFrame::Resume { resume: f.resume })
        }
        "ping" => {
            let f: PingFrame = serde_json::from_str(text).map_err(|e| bad("ping", e))?;
            Ok(ClientFrame::Ping { ts: f.ts })
        }
        other => Err(FrameError(format!(
            "unknown frame type `{}`",
            truncate(other, 40)
        ))),
    }
}

fn truncate(s: &str, max: usize) -> &str {
    match s.char_indices().nth(max) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

/// Token counts of one stream: the upstream's `usage` object with every field it sent, or the
/// gateway's estimate (the three counts only).
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(from = "UsageWire")]
pub struct Usage {
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    /// The upstream's, else `prompt_tokens + completion_tokens`.
    pub total_tokens: u64,
    /// Every other field the upstream sent, verbatim and in its order
    /// (`prompt_tokens_details`, `completion_tokens_details`, ...); nulls dropped.
    #[serde(flatten)]
    pub details: Map<String, Value>,
}

impl Usage {
    /// Counts with no details (an estimate, or a test's).
    pub fn counted(prompt_tokens: u64, completion_tokens: u64) -> Usage {
        Usage {
            prompt_tokens,
            completion_tokens,
            total_tokens: prompt_tokens + completion_tokens,
            details: Map::new(),
        }
    }

    /// `prompt_tokens_details.cached_tokens`, never more than the prompt.
    pub fn cached_tokens(&self) -> u64 {
        self.details
            .get("prompt_tokens_details")
            .and_then(|d| d.get("cached_tokens"))
            .and_then(Value::as_u64)
            .map_or(0, |cached| cached.min(self.prompt_tokens))
    }
}

#[derive(Deserialize)]
struct UsageWire {
    prompt_tokens: u64,
    completion_tokens: u64,
    #[serde(default)]
    total_tokens: Option<u64>,
    #[serde(flatten)]
    details: Map<String, Value>,
}

impl From<UsageWire> for Usage {
    fn from(w: UsageWire) -> Self {
        let mut details = w.details;
        details.retain(|_, v| !v.is_null());
        Usage {
            prompt_tokens: w.prompt_tokens,
            completion_tokens: w.completion_tokens,
            total_tokens: w
                .total_tokens
                .unwrap_or(w.prompt_tokens + w.completion_tokens),
            details,
        }
    }
}

/// `error.upstream`: what an upstream's error body said of itself. Each field only when the
/// upstream sent it; already redacted.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize)]
pub struct UpstreamDetail {
    #[serde(rename = "type", skip_serializing_if = "Option::is_none")]
    pub r#type: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub code: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub param: Option<String>,
}

impl UpstreamDetail {
    pub fn is_empty(&self) -> bool {
        self.r#type.is_none() && self.code.is_none() && self.param.is_none()
    }
}

/// `welcome.limits`.
#[derive(Debug, Clone, Serialize)]
pub struct WelcomeLimits {
    pub max_streams: usize,
    pub max_frame_bytes: usize,
    /// Extension: the user's simultaneous connections (the tier's cap), so a client can tell
    /// whether one more socket (a warm standby) would push a real one over it.
    pub max_connections: usize,
}

#[derive(Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum ServerFrame<'a> {
    Welcome {
        session: &'a str,
        user: &'a str,
        tier: &'a str,
        heartbeat_ms: u64,
        limits: &'a WelcomeLimits,
        resumed: &'a [String],
        /// Extension: the hello token's expiry (Unix seconds); `refresh` before it.
        exp: u64,
        /// Extension: echoes `hello.batch`; absent for a client that did not ask, so a v1
        /// client's `welcome` is unchanged.
        #[serde(skip_serializing_if = "std::ops::Not::not")]
        batch: bool,
    },
    /// Extension: a `refresh` was accepted; the connection now expires at `exp`.
    Refreshed {
        exp: u64,
    },
    /// Extension: the answer to a `resume` frame, before the replay of the streams it lists.
    Resumed {
        resumed: &'a [String],
    },
    Queued {
        id: &'a str,
        position: usize,
    },
    Start {
        id: &'a str,
        model: &'a str,
    },
    Done {
        id: &'a str,
        seq: u64,
        finish_reason: &'a str,
        #[serde(skip_serializing_if = "Option::is_none")]
        usage: Option<&'a Usage>,
        #[serde(skip_serializing_if = "Option::is_none")]
        cost_usd: Option<f64>,
        /// Extension: the model that answered, when a fallback served instead of the one asked.
        #[serde(skip_serializing_if = "Option::is_none")]
        model: Option<&'a str>,
        /// Extension: `usage` was counted by the gateway's tokenizer, the upstream sent none.
        #[serde(skip_serializing_if = "std::ops::Not::not")]
        usage_estimated: bool,
        #[serde(skip_serializing_if = "Option::is_none")]
        completion_id: Option<&'a str>,
        #[serde(skip_serializing_if = "Option::is_none")]
        system_fingerprint: Option<&'a str>,
    },
    Error {
        id: Option<&'a str>,
        code: ErrorCode,
        message: &'a str,
        #[serde(skip_serializing_if = "Option::is_none")]
        retry_after_ms: Option<u64>,
        /// The upstream's HTTP status, when its response caused the error.
        #[serde(skip_serializing_if = "Option::is_none")]
        status: Option<u16>,
        #[serde(skip_serializing_if = "Option::is_none")]
        upstream: Option<&'a UpstreamDetail>,
    },
    Pong {
        ts: &'a Value,
    },
    Goaway {
        reason: &'a str,
        reconnect_after_ms: u64,
    },
}

fn encode(frame: &ServerFrame<'_>) -> Utf8Bytes {
    // Serializing these plain structs cannot fail: no maps with non-string keys, no I/O.
    serde_json::to_string(frame)
        .unwrap_or_else(|_| {
            String::from(
                r#"{"type":"error","id":null,"code":"internal","message":"frame encoding failed"}"#,
            )
        })
        .into()
}

#[allow(clippy::too_many_arguments)] // one per `welcome` field: a struct would only rename them
pub fn welcome(
    session: &str,
    user: &str,
    tier: &str,
    heartbeat_ms: u64,
    limits: &WelcomeLimits,
    resumed: &[String],
    exp: u64,
    batch: bool,
) -> Utf8Bytes {
    encode(&ServerFrame::Welcome {
        session,
        user,
        tier,
        heartbeat_ms,
        limits,
        resumed,
        exp,
        batch,
    })
}

pub fn resumed(resumed: &[String]) -> Utf8Bytes {
    encode(&ServerFrame::Resumed { resumed })
}

pub fn refreshed(exp: u64) -> Utf8Bytes {
    encode(&ServerFrame::Refreshed { exp })
}

pub fn queued(id: &str, position: usize) -> Utf8Bytes {
    encode(&ServerFrame::Queued { id, position })
}

pub fn start(id: &str, model: &str) -> Utf8Bytes {
    encode(&ServerFrame::Start { id, model })
}

/// A stream's `done` frame; the optional fields are omitted when `None`.
#[derive(Debug, Default)]
pub struct Done<'a> {
    pub id: &'a str,
    pub seq: u64,
    pub finish_reason: &'a str,
    pub usage: Option<&'a Usage>,
    pub cost_usd: Option<f64>,
    /// The model that answered, when a fallback served instead of the one asked.
    pub served_by: Option<&'a str>,
    pub usage_estimated: bool,
    /// The upstream chunks' `id`.
    pub completion_id: Option<&'a str>,
    pub system_fingerprint: Option<&'a str>,
}

pub fn done(d: &Done<'_>) -> Utf8Bytes {
    encode(&ServerFrame::Done {
        id: d.id,
        seq: d.seq,
        finish_reason: d.finish_reason,
        usage: d.usage,
        cost_usd: d.cost_usd,
        model: d.served_by,
        usage_estimated: d.usage_estimated,
        completion_id: d.completion_id,
        system_fingerprint: d.system_fingerprint,
    })
}

pub fn error(
    id: Option<&str>,
    code: ErrorCode,
    message: &str,
    retry_after_ms: Option<u64>,
) -> Utf8Bytes {
    upstream_error(id, code, message, retry_after_ms, None, None)
}

/// An `error` frame that may say what the upstream answered: its HTTP `status` and its error
/// body's `upstream` detail.
pub fn upstream_error(
    id: Option<&str>,
    code: ErrorCode,
    message: &str,
    retry_after_ms: Option<u64>,
    status: Option<u16>,
    upstream: Option<&UpstreamDetail>,
) -> Utf8Bytes {
    encode(&ServerFrame::Error {
        id,
        code,
        message,
        retry_after_ms,
        status,
        upstream,
    })
}

pub fn pong(ts: &Value) -> Utf8Bytes {
    encode(&ServerFrame::Pong { ts })
}

pub fn goaway(reason: &str, reconnect_after_ms: u64) -> Utf8Bytes {
    encode(&ServerFrame::Goaway {
        reason,
        reconnect_after_ms,
    })
}

/// The parts of one `delta` frame: `text` always, the others when the upstream chunk had them.
/// `tool_calls` and `logprobs` are the upstream's JSON, written verbatim.
#[derive(Debug, Default, Clone, Copy)]
pub struct DeltaParts<'a> {
    pub text: &'a str,
    pub reasoning: Option<&'a str>,
    pub refusal: Option<&'a str>,
    pub tool_calls: Option<&'a RawValue>,
    pub logprobs: Option<&'a RawValue>,
}

/// Writes `{"type":"delta","id":..,"seq":..,"text":..}` straight into one buffer (tests build
/// text-only frames with it; the relay writes every part with [`delta_parts`]).
#[cfg(test)]
pub fn delta(id: &str, seq: u64, text: &str) -> Utf8Bytes {
    delta_parts(
        id,
        seq,
        &DeltaParts {
            text,
            ..DeltaParts::default()
        },
    )
}

/// Writes a `delta` frame with every part `parts` has, in the order text, reasoning, refusal,
/// tool_calls, logprobs, straight into one buffer.
///
/// This is the hot path (one upstream chunk, one frame), so it avoids building a JSON value.
/// `id` needs no escaping: [`valid_stream_id`] admits no character JSON would escape; the raw
/// parts are valid JSON already (serde_json checked them when the chunk was parsed).
pub fn delta_parts(id: &str, seq: u64, parts: &DeltaParts<'_>) -> Utf8Bytes {
    const HEAD: &str = r#"{"type":"delta","id":""#;
    const SEQ: &str = r#"","seq":"#;
    const TEXT: &str = r#","text":"#;
    const REASONING: &str = r#","reasoning":"#;
    const REFUSAL: &str = r#","refusal":"#;
    const TOOL_CALLS: &str = r#","tool_calls":"#;
    const LOGPROBS: &str = r#","logprobs":"#;
    let mut digits = itoa::Buffer::new();
    let seq = digits.format(seq);
    let string_len = |key: &str, s: Option<&str>| s.map_or(0, |s| key.len() + json_string_len(s));
    let raw_len = |key: &str, r: Option<&RawValue>| r.map_or(0, |r| key.len() + r.get().len());
    // The exact size: a `String` whose capacity equals its length becomes `Bytes` without a
    // second allocation.
    let len = HEAD.len()
        + id.len()
        + SEQ.len()
        + seq.len()
        + TEXT.len()
        + json_string_len(parts.text)
        + string_len(REASONING, parts.reasoning)
        + string_len(REFUSAL, parts.refusal)
        + raw_len(TOOL_CALLS, parts.tool_calls)
        + raw_len(LOGPROBS, parts.logprobs)
        + 1;
    let mut out = String::with_capacity(len);
    out.push_str(HEAD);
    out.push_str(id);
    out.push_str(SEQ);
    out.push_str(seq);
    out.push_str(TEXT);
    push_json_string(&mut out, parts.text);
    for (key, s) in [(REASONING, parts.reasoning), (REFUSAL, parts.refusal)] {
        if let Some(s) = s {
            out.push_str(key);
            push_json_string(&mut out, s);
        }
    }
    for (key, raw) in [(TOOL_CALLS, parts.tool_calls), (LOGPROBS, parts.logprobs)] {
        if let Some(raw) = raw {
            out.push_str(key);
            out.push_str(raw.get());
        }
    }
    out.push('}');
    debug_assert_eq!(out.len(), len);
    out.into()
}

/// Length of `s` as a JSON string literal, quotes included (see [`push_json_string`]).
fn json_string_len(s: &str) -> usize {
    let bytes = s.as_bytes();
    let mut len = 2;
    let mut i = 0;
    loop {
        let end = plain_run_end(bytes, i);
        len += end - i;
        let Some(&b) = bytes.get(end) else {
            return len;
        };
        len += match b {
            b'"' | b'\\' | b'\n' | b'\r' | b'\t' | 0x08 | 0x0c => 2,
            _ => 6,
        };
        i = end + 1;
    }
}

/// Appends `s` as a JSON string literal, escaping as `serde_json` does, byte for byte. The
/// crate's one JSON string escaper: the `delta` hot path and the mock upstream's hand-written
/// chunks both use it.
pub(crate) fn push_json_string(out: &mut String, s: &str) {
    out.push('"');
    let bytes = s.as_bytes();
    let mut start = 0;
    loop {
        // A run ends at an ASCII byte or at the end: always a char boundary.
        let end = plain_run_end(bytes, start);
        out.push_str(&s[start..end]);
        let Some(&b) = bytes.get(end) else {
            break;
        };
        let escape: &str = match b {
            b'"' => "\\\"",
            b'\\' => "\\\\",
            b'\n' => "\\n",
            b'\r' => "\\r",
            b'\t' => "\\t",
            0x08 => "\\b",
            0x0c => "\\f",
            _ => "",
        };
        if escape.is_empty() {
            const HEX: &[u8; 16] = b"0123456789abcdef";
            out.push_str("\\u00");
            out.push(HEX[(b >> 4) as usize] as char);
            out.push(HEX[(b & 0xf) as usize] as char);
        } else {
            out.push_str(escape);
        }
        start = end + 1;
    }
    out.push('"');
}

/// Where the run of bytes a JSON string holds as they are (anything but `"`, `\` and the
/// control characters) that starts at `i` ends: at the first byte that needs an escape (or
/// ends the string), else at the end. Eight bytes a step: a chunk's text and the keys and
/// values around it are mostly such runs, and the upstream's chunk scan and the `delta`
/// frame's escaping both skip them whole.
pub(crate) fn plain_run_end(bytes: &[u8], mut i: usize) -> usize {
    const ONES: u64 = u64::from_ne_bytes([1; 8]);
    const HIGHS: u64 = u64::from_ne_bytes([0x80; 8]);
    // The high bit of a byte of `zero(x)` is set where that byte of `x` is 0 (and of
    // `below_space` where the byte is under 0x20); a borrow can mark only bytes after a real
    // match, and only the first match is read.
    let zero = |x: u64| x.wrapping_sub(ONES) & !x & HIGHS;
    while let Some(word) = bytes.get(i..i + 8) {
        let mut eight = [0; 8];
        eight.copy_from_slice(word);
        let word = u64::from_le_bytes(eight);
        let below_space = word.wrapping_sub(ONES * 0x20) & !word & HIGHS;
        let stop = zero(word ^ (ONES * u64::from(b'"')))
            | zero(word ^ (ONES * u64::from(b'\\')))
            | below_space;
        if stop != 0 {
            return i + (stop.trailing_zeros() / 8) as usize;
        }
        i += 8;
    }
    // The last few bytes, one at a time.
    while let Some(&b) = bytes.get(i) {
        if b == b'"' || b == b'\\' || b < 0x20 {
            break;
        }
        i += 1;
    }
    i
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    /// The error and close codes are written in four places: here, `docs/protocol.md`,
    /// `web/src/constants.js` and `web/src/index.d.ts`. This fails when any of them disagree.
    #[test]
    fn codes_agree_with_the_docs_and_the_shim() {
        let doc = include_str!("../docs/protocol.md");
        let js = include_str!("../web/src/constants.js");
        let dts = include_str!("../web/src/index.d.ts");
        let ours: BTreeSet<String> = ErrorCode::ALL.iter().map(|c| c.as_str().into()).collect();
        for code in ErrorCode::ALL {
            let json = serde_json::to_value(code).expect("serializes");
            assert_eq!(json, Value::from(code.as_str()), "serde and as_str agree");
        }

        // The contract's list: every backticked word of its "Error codes" section.
        let section = between(doc, "## Error codes", "\n## ");
        let in_doc: BTreeSet<String> = quoted(&outside_parentheses(section), '`')
            .into_iter()
            .collect();
        assert_eq!(in_doc, ours, "docs/protocol.md's error codes");

        let in_js: BTreeSet<String> = quoted(object(js, "ERROR_CODE"), '\'').into_iter().collect();
        assert_eq!(in_js, ours, "web/src/constants.js ERROR_CODE");

        // The shim's type names the protocol's codes, then its own (CLIENT_ERROR_CODE).
        let client: BTreeSet<String> = quoted(object(js, "CLIENT_ERROR_CODE"), '\'')
            .into_iter()
            .collect();
        assert!(
            ours.is_disjoint(&client),
            "a shim code shadows a protocol code"
        );
        let ty = between(dts, "export type ErrorCode =", "\n\n");
        let in_dts: BTreeSet<String> = quoted(ty, '\'').into_iter().collect();
        let expected: BTreeSet<String> = ours.union(&client).cloned().collect();
        assert_eq!(in_dts, expected, "web/src/index.d.ts ErrorCode");

        // Close codes: the docs' table, and the shim's table (which adds two of its own: 1006,
        // no status from the browser, and 4000, its own heartbeat timeout).
        let ours: BTreeSet<u16> = close::ALL.into_iter().collect();
        let table = between(doc, "## Close codes", "\n\n");
        let in_doc: BTreeSet<u16> = table
            .lines()
            .filter_map(|l| l.strip_prefix("| ")?.split(' ').next()?.parse().ok())
            .collect();
        assert_eq!(in_doc, ours, "docs/protocol.md's close codes");
        let in_js: BTreeSet<u16> = object(js, "CLOSE_CODE")
            .lines()
            .filter_map(|l| {
                l.trim()
                    .trim_end_matches(',')
                    .rsplit(": ")
                    .next()?
                    .parse()
                    .ok()
            })
            .collect();
        let client_only: BTreeSet<u16> = [1006, 4000].into_iter().collect();
        assert_eq!(
            in_js
                .difference(&client_only)
                .copied()
                .collect::<BTreeSet<_>>(),
            ours,
            "web/src/constants.js CLOSE_CODE"
        );
    }

    /// The text of `s` after `start`, up to the next `end`.
    fn between<'a>(s: &'a str, start: &str, end: &str) -> &'a str {
        let from = s.find(start).unwrap_or_else(|| panic!("no `{start}`")) + start.len();
        let rest = &s[from..];
        &rest[..rest.find(end).unwrap_or(rest.len())]
    }

    /// The body of `export const NAME = Object.freeze({ ... })` in constants.js.
    fn object<'a>(js: &'a str, name: &str) -> &'a str {
        between(
            js,
            &format!("export const {name} = Object.freeze({{"),
            "\n})",
        )
    }

    /// `s` without its parenthesized asides (they name fields, not codes).
    fn outside_parentheses(s: &str) -> String {
        let mut depth = 0usize;
        s.chars()
            .filter(|&c| {
                match c {
                    '(' => depth += 1,
                    ')' => depth = depth.saturating_sub(1),
                    _ => return depth == 0,
                }
                false
            })
            .collect()
    }

    /// Every string between a pair of `quote`s.
    fn quoted(s: &str, quote: char) -> Vec<String> {
        s.split(quote)
            .skip(1)
            .step_by(2)
            .map(str::to_string)
            .collect()
    }

    #[test]
    fn stream_ids() {
        assert!(valid_stream_id("t1:8"));
        assert!(valid_stream_id("a.b_c-d:e"));
        assert!(valid_stream_id(&"x".repeat(64)));
        assert!(!valid_stream_id(""));
        assert!(!valid_stream_id(&"x".repeat(65)));
        assert!(!valid_stream_id("a b"));
        assert!(!valid_stream_id("a/b"));
        assert!(!valid_stream_id("é"));
        assert!(!valid_stream_id("a\"b"));
    }

    #[test]
    fn a_plain_run_ends_where_a_byte_by_byte_scan_ends_it() {
        use rand::rngs::StdRng;
        use rand::seq::SliceRandom;
        use rand::{Rng, SeedableRng};
        let mut rng = StdRng::seed_from_u64(15);
        let alphabet = b"ab \"\\\x00\x1f\x20\x7f\x80\xc3\xa9\xff!#[]";
        for _ in 0..20_000 {
            let len = rng.gen_range(0..40);
            let bytes: Vec<u8> = (0..len)
                .map(|_| {
                    if rng.gen_bool(0.8) {
                        b'a' + rng.gen_range(0..26)
                    } else {
                        *alphabet.choose(&mut rng).unwrap_or(&b'a')
                    }
                })
                .collect();
            for from in 0..=bytes.len() {
                let slow = bytes[from..]
                    .iter()
                    .position(|&b| b == b'"' || b == b'\\' || b < 0x20)
                    .map_or(bytes.len(), |n| from + n);
                assert_eq!(plain_run_end(&bytes, from), slow, "{bytes:?} from {from}");
            }
        }
    }

    #[test]
    fn the_escaper_writes_what_serde_json_writes() {
        let mut every_control: String = (0u8..0x20).map(char::from).collect();
        every_control.push_str("\"\\/\u{7f}é🎉\u{2028}");
        // Runs longer than a step of `plain_run_end`, cut by an escape at every offset.
        let long: Vec<String> = (0..20)
            .map(|k| {
                format!(
                    "{}\"{}é\u{1}🎉 plain text{}\\",
                    "x".repeat(k),
                    "y".repeat(k % 9),
                    "z".repeat(k)
                )
            })
            .collect();
        let texts = ["", "plain", "a\"b\\c\nd\u{1}é", every_control.as_str()];
        for text in texts.into_iter().chain(long.iter().map(String::as_str)) {
            let mut out = String::new();
            push_json_string(&mut out, text);
            assert_eq!(out, serde_json::to_string(text).expect("json"), "{text:?}");
            assert_eq!(out.len(), json_string_len(text), "{text:?}");
        }
    }

    #[test]
    fn delta_matches_serde() {
        for text in [
            "Hel",
            "",
            "quote \" back \\ nl \n tab \t",
            "\u{1}\u{1f}ctl",
            "ünï 🎉",
            "\u{7f}",
        ] {
            let frame = delta("t1:8", 12345678901, text);
            let parsed: Value = serde_json::from_str(frame.as_str()).expect("valid json");
            assert_eq!(parsed["type"], "delta");
            assert_eq!(parsed["id"], "t1:8");
            assert_eq!(parsed["seq"], 12345678901u64);
            assert_eq!(parsed["text"], text);
            let expected =
                serde_json::json!({"type":"delta","id":"t1:8","seq":12345678901u64,"text":text});
            assert_eq!(parsed, expected);
        }
        assert_eq!(
            delta("a", 0, "x").as_str(),
            r#"{"type":"delta","id":"a","seq":0,"text":"x"}"#
        );
    }

    #[test]
    fn delta_parts_match_serde() {
        let calls = RawValue::from_string(
            r#"[{"index":0,"id":"call_a","type":"function","function":{"name":"get_weather","arguments":"{\"city\":\"Ha"}}]"#.into(),
        )
        .expect("raw");
        let lp = RawValue::from_string(
            r#"{"content":[{"token":"Hi","logprob":-0.1,"bytes":[72,105],"top_logprobs":[]}]}"#
                .into(),
        )
        .expect("raw");
        let parts = DeltaParts {
            text: "a\"b",
            reasoning: Some("think\n"),
            refusal: Some("no \u{1}"),
            tool_calls: Some(&calls),
            logprobs: Some(&lp),
        };
        let frame = delta_parts("t1:8", 3, &parts);
        let parsed: Value = serde_json::from_str(frame.as_str()).expect("valid json");
        let expected = serde_json::json!({"type":"delta","id":"t1:8","seq":3,"text":"a\"b",
            "reasoning":"think\n","refusal":"no \u{1}",
            "tool_calls":serde_json::from_str::<Value>(calls.get()).expect("calls"),
            "logprobs":serde_json::from_str::<Value>(lp.get()).expect("lp")});
        assert_eq!(parsed, expected);
        let only_reasoning = DeltaParts {
            reasoning: Some("hmm"),
            ..DeltaParts::default()
        };
        assert_eq!(
            delta_parts("a", 1, &only_reasoning).as_str(),
            r#"{"type":"delta","id":"a","seq":1,"text":"","reasoning":"hmm"}"#,
            "text always present, absent parts omitted"
        );
    }

    #[test]
    fn done_and_error_omit_what_is_absent() {
        let usage: Usage = serde_json::from_str(
            r#"{"prompt_tokens":12,"completion_tokens":40,"prompt_tokens_details":{"cached_tokens":8}}"#,
        )
        .expect("usage");
        let frame = done(&Done {
            id: "t1:8",
            seq: 9,
            finish_reason: "tool_calls",
            usage: Some(&usage),
            cost_usd: Some(0.5),
            completion_id: Some("chatcmpl-abc"),
            system_fingerprint: Some("fp_1"),
            ..Done::default()
        });
        let v: Value = serde_json::from_str(frame.as_str()).expect("json");
        assert_eq!(
            v,
            serde_json::json!({"type":"done","id":"t1:8","seq":9,"finish_reason":"tool_calls",
                "usage":{"prompt_tokens":12,"completion_tokens":40,"total_tokens":52,
                    "prompt_tokens_details":{"cached_tokens":8}},
                "cost_usd":0.5,"completion_id":"chatcmpl-abc","system_fingerprint":"fp_1"})
        );
        let plain = done(&Done {
            id: "a",
            seq: 1,
            finish_reason: "stop",
            ..Done::default()
        });
        assert_eq!(
            plain.as_str(),
            r#"{"type":"done","id":"a","seq":1,"finish_reason":"stop"}"#
        );
        let detail = UpstreamDetail {
            code: Some("context_length_exceeded".into()),
            ..UpstreamDetail::default()
        };
        let frame = upstream_error(
            Some("s"),
            ErrorCode::UpstreamError,
            "m",
            None,
            Some(400),
            Some(&detail),
        );
        assert_eq!(
            frame.as_str(),
            r#"{"type":"error","id":"s","code":"upstream_error","message":"m","status":400,"upstream":{"code":"context_length_exceeded"}}"#
        );
        assert_eq!(
            error(Some("s"), ErrorCode::Cancelled, "m", None).as_str(),
            r#"{"type":"error","id":"s","code":"cancelled","message":"m"}"#
        );
    }

    #[test]
    fn parses_client_frames() {
        let f = parse_client_frame(
            r#"{"type":"hello","token":"t","client":"x","resume":[{"id":"t1:7","after":17}],"extra":1}"#,
        )
        .expect("hello");
        assert_eq!(
            f,
            ClientFrame::Hello {
                token: "t".into(),
                client: Some("x".into()),
                resume: vec![ResumeRequest {
                    id: "t1:7".into(),
                    after: 17
                }],
                batch: false,
            }
        );
        let f = parse_client_frame(
            r#"{"type":"open","id":"t1:8","model":"m","messages":[{"role":"user","content":"hi"}],"params":{"temperature":0.7}}"#,
        )
        .expect("open");
        match f {
            ClientFrame::Open(o) => {
                assert_eq!(o.id, "t1:8");
                assert_eq!(o.params["temperature"], 0.7);
            }
            other => panic!("not open: {other:?}"),
        }
        assert_eq!(
            parse_client_frame(r#"{"type":"ping","ts":5}"#).expect("ping"),
            ClientFrame::Ping { ts: Value::from(5) }
        );
        assert_eq!(
            parse_client_frame(r#"{"type":"resume","resume":[{"id":"a","after":3},{"id":"b"}]}"#)
                .expect("resume"),
            ClientFrame::Resume {
                resume: vec![
                    ResumeRequest {
                        id: "a".into(),
                        after: 3
                    },
                    ResumeRequest {
                        id: "b".into(),
                        after: 0
                    },
                ],
            }
        );
        let e = parse_client_frame(r#"{"type":"resume"}"#).expect_err("resume without a list");
        assert!(e.0.starts_with("bad `resume` frame"), "{e}");
        assert_eq!(
            resumed(&["a".to_string()]).as_str(),
            r#"{"type":"resumed","resumed":["a"]}"#
        );
        assert!(parse_client_frame("not json").is_err());
        assert!(parse_client_frame(r#"{"id":"x"}"#).is_err());
        let e = parse_client_frame(r#"{"type":"subscribe"}"#).expect_err("unknown");
        assert!(e.0.contains("unknown frame type `subscribe`"), "{e}");
        let e = parse_client_frame(r#"{"type":"open","id":"x"}"#).expect_err("missing model");
        assert!(e.0.contains("bad `open` frame"), "{e}");
        assert_eq!(
            parse_client_frame(r#"{"type":"refresh","token":"t2"}"#).expect("refresh"),
            ClientFrame::Refresh { token: "t2".into() }
        );
        let e = parse_client_frame(r#"{"type":"refresh"}"#).expect_err("no token");
        assert!(e.0.contains("bad `refresh` frame"), "{e}");
    }

    #[test]
    fn models_and_log_escaping() {
        assert!(valid_model("deepseek-v3.2"));
        assert!(valid_model("org/model:tag ünï"));
        assert!(valid_model(&"m".repeat(MAX_MODEL_LEN)));
        for bad in [
            "",
            "a\nb",
            "a\rb",
            "a\u{1b}[2J",
            "a\u{7f}",
            "a\u{85}",
            "a\u{202e}b",
        ] {
            assert!(!valid_model(bad), "{bad:?}");
        }
        assert!(!valid_model(&"m".repeat(MAX_MODEL_LEN + 1)));
        assert_eq!(LogSafe("alice").to_string(), "alice");
        assert_eq!(
            LogSafe("a\nINFO forged\u{1b}[2J\u{202e}é").to_string(),
            "a\\u{a}INFO forged\\u{1b}[2J\\u{202e}é"
        );
    }

    #[test]
    fn error_codes_serialize_as_in_contract() {
        let frame = error(Some("s"), ErrorCode::TooManyStreams, "m", Some(5));
        let v: Value = serde_json::from_str(frame.as_str()).expect("json");
        assert_eq!(v["code"], "too_many_streams");
        assert_eq!(v["retry_after_ms"], 5);
        let v: Value = serde_json::from_str(error(None, ErrorCode::BadRequest, "m", None).as_str())
            .expect("json");
        assert_eq!(v["id"], Value::Null);
        assert!(v.get("retry_after_ms").is_none());
        for code in [
            ErrorCode::Unauthorized,
            ErrorCode::UpstreamTimeout,
            ErrorCode::BudgetExceeded,
        ] {
            assert_eq!(
                serde_json::to_value(code).expect("code"),
                Value::from(code.as_str())
            );
        }
    }
}
