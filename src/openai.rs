//! The OpenAI-compatible HTTP front end: `POST /v1/chat/completions` (streaming and not) and
//! `GET /v1/models`, for clients that cannot keep a WebSocket (networks whose proxies block
//! them, servers, `curl`).
//!
//! A request is one stream opened exactly as a WebSocket `open` is
//! ([`crate::session::open_stream`]: limits, queue, breaker, retries, fallbacks, billing,
//! metrics, the user's live-stream cap), attached to an [`Inbox`] of its own. Its frames are
//! read as the JSON a WebSocket client gets and encoded per `docs/openai-compat.md`, the same
//! bytes the browser shim's `mux.fetch` writes (`web/src/openai.js`): whatever a frame says,
//! this encoder says it the way the shim does, field by field. The client going away cancels
//! the stream, as a WebSocket `cancel` would.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::rejection::BytesRejection;
use axum::extract::ws::Utf8Bytes;
use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderName, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::{Map, Value};
use tower_http::cors::{AllowHeaders, AllowOrigin, CorsLayer};

use crate::auth::Claims;
use crate::gateway::Gateway;
use crate::protocol::{push_json_string, ErrorCode, OpenRequest};
use crate::session::open_stream;
use crate::stream::{CancelReason, Inbox, Pulled, Stream};

/// Headers a browser page may read from an answer: the stream id and the retry hints.
const EXPOSED: [&str; 4] = [
    "x-request-id",
    "x-should-retry",
    "retry-after",
    "retry-after-ms",
];

/// The CORS layer of the HTTP front end: the origins a WebSocket may come from
/// ([`crate::server::origin_allowed`]), preflight included. Request headers are mirrored: the
/// SDKs send their own (`x-stainless-*`), and the Bearer token, not the origin, authenticates.
pub fn cors(gw: &Arc<Gateway>) -> CorsLayer {
    let gw = gw.clone();
    CorsLayer::new()
        .allow_origin(AllowOrigin::predicate(move |_, parts| {
            crate::server::origin_allowed(&gw.config, &parts.headers)
        }))
        .allow_methods([Method::GET, Method::POST])
        .allow_headers(AllowHeaders::mirror_request())
        .expose_headers(EXPOSED.map(HeaderName::from_static))
        .max_age(std::time::Duration::from_secs(600))
}

/// `GET /v1/models`: every model this gateway routes by name (the providers' listed models,
/// the models that have fallbacks or prices), in OpenAI's list shape.
pub async fn models(State(gw): State<Arc<Gateway>>, headers: HeaderMap) -> Response {
    if let Err(refusal) = authenticate(&gw, &headers) {
        return *refusal;
    }
    let named = gw
        .config
        .providers
        .iter()
        .flat_map(|p| p.models.iter())
        .chain(gw.config.fallbacks.keys())
        .chain(gw.config.fallbacks.values().flatten())
        .chain(gw.config.pricing.keys())
        .filter(|m| m.as_str() != "*");
    let mut seen = BTreeSet::new();
    let mut out = String::from(r#"{"object":"list","data":["#);
    for model in named {
        let Some(provider) = gw.upstreams.route(model) else {
            continue;
        };
        if !seen.insert(model.as_str()) {
            continue;
        }
        if seen.len() > 1 {
            out.push(',');
        }
        out.push_str(r#"{"id":"#);
        push_json_string(&mut out, model);
        out.push_str(r#","object":"model","created":0,"owned_by":"#);
        push_json_string(&mut out, &provider.name);
        out.push('}');
    }
    out.push_str("]}");
    ([(header::CONTENT_TYPE, "application/json")], out).into_response()
}

/// `POST /v1/chat/completions`.
pub async fn chat_completions(
    State(gw): State<Arc<Gateway>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    if !crate::server::origin_allowed(&gw.config, &headers) {
        return refusal(
            ErrorCode::Unauthorized,
            "origin not allowed",
            StatusCode::FORBIDDEN,
        );
    }
    let claims = match authenticate(&gw, &headers) {
        Ok(claims) => claims,
        Err(refusal) => return *refusal,
    };
    let Some(tier) = gw.tiers.get(&claims.tier) else {
        return refusal(
            ErrorCode::Unauthorized,
            "unknown tier",
            StatusCode::UNAUTHORIZED,
        );
    };
    let body = match body {
        Ok(body) => body,
        Err(rejection) => {
            let message = format!(
                "request body refused (at most max_frame_bytes, {} bytes): {}",
                gw.config.session.max_frame_bytes,
                rejection.body_text()
            );
            return refusal(ErrorCode::BadRequest, &message, rejection.status());
        }
    };
    let call = match read_call(&body) {
        Ok(call) => call,
        Err(message) => return refusal(ErrorCode::BadRequest, &message, StatusCode::BAD_REQUEST),
    };
    if gw.draining.is_cancelled() {
        return error_response(
            &ErrorFrame::of(
                ErrorCode::Overloaded,
                "the gateway is shutting down: try again",
            ),
            None,
        );
    }
    let id = format!("http:{:016x}", rand::random::<u64>());
    let created = crate::auth::unix_now_ms() / 1000;
    let meta = Meta {
        id: id.clone(),
        created,
        model: call.model.clone(),
    };
    let req = OpenRequest {
        id,
        model: call.model,
        messages: call.messages,
        params: call.params,
    };
    let inbox = Inbox::new();
    let user: Arc<str> = Arc::from(claims.sub.as_ref());
    let stream = match open_stream(&gw, &user, &tier, tier.max_streams, &inbox, req).await {
        Ok(stream) => stream,
        Err(frame) => return error_response(&ErrorFrame::parse(&frame), Some(&meta.id)),
    };
    let reader = Reader::new(stream, inbox);
    if call.stream {
        stream_answer(reader, Encoder::new(meta, call.include_usage, false)).await
    } else {
        whole_answer(reader, Encoder::new(meta, false, true)).await
    }
}

/// The Bearer token's claims, or the 401 refusing it.
fn authenticate(gw: &Gateway, headers: &HeaderMap) -> Result<Claims, Box<Response>> {
    let token = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
        })
        .map(str::trim)
        .unwrap_or("");
    if token.is_empty() {
        return Err(Box::new(refusal(
            ErrorCode::Unauthorized,
            "missing `Authorization: Bearer <token>` (the same JWT as the WebSocket's `hello`)",
            StatusCode::UNAUTHORIZED,
        )));
    }
    gw.auth.verify(token).map_err(|e| {
        Box::new(refusal(
            ErrorCode::Unauthorized,
            &e.to_string(),
            StatusCode::UNAUTHORIZED,
        ))
    })
}

/// An error answered before any stream exists, with `status` (which may differ from the
/// table's: 403 for an origin, 413 for a body too large).
fn refusal(code: ErrorCode, message: &str, status: StatusCode) -> Response {
    let mut response = error_response(&ErrorFrame::of(code, message), None);
    *response.status_mut() = status;
    response
}

/// What the request asks, split as `mux.fetch`'s `readCall` splits it.
struct Call {
    model: String,
    messages: Vec<Value>,
    params: Map<String, Value>,
    stream: bool,
    include_usage: bool,
}

/// The request body as an `open`, or what is wrong with it (the same checks, in the same
/// order, with the same messages as `web/src/fetch.js`).
fn read_call(body: &[u8]) -> Result<Call, String> {
    let value: Value =
        serde_json::from_slice(body).map_err(|e| format!("the request body is not JSON: {e}"))?;
    let Value::Object(mut params) = value else {
        return Err("the request body must be a JSON object".into());
    };
    let model = match params.remove("model") {
        Some(Value::String(m)) if !m.is_empty() => m,
        _ => return Err("`model` must be a non-empty string".into()),
    };
    let messages = match params.remove("messages") {
        Some(Value::Array(m)) if !m.is_empty() => m,
        _ => return Err("`messages` must be a non-empty array".into()),
    };
    let stream = match params.remove("stream") {
        None => false,
        Some(Value::Bool(b)) => b,
        Some(_) => return Err("`stream` must be a boolean".into()),
    };
    let include_usage = match params.remove("stream_options") {
        None | Some(Value::Null) => false,
        Some(Value::Object(o)) => o.get("include_usage") == Some(&Value::Bool(true)),
        Some(_) => return Err("`stream_options` must be an object".into()),
    };
    Ok(Call {
        model,
        messages,
        params,
        stream,
        include_usage: stream && include_usage,
    })
}

/// The streaming answer: nothing until the first event, `done` or `error` (an early error is
/// still an HTTP status), then the events as the reader pulls them.
async fn stream_answer(mut reader: Reader, mut enc: Encoder) -> Response {
    let mut first = String::new();
    let mut ended = false;
    loop {
        let Some(frame) = reader.next().await else {
            return lost(&enc.meta.id);
        };
        match frame.kind.as_str() {
            "delta" => {
                enc.delta(&frame, &mut first);
                if !first.is_empty() {
                    break;
                }
            }
            "done" => {
                enc.done(&frame, &mut first);
                ended = true;
                break;
            }
            "error" => return error_response(&ErrorFrame::from(&frame), Some(&enc.meta.id)),
            _ => {}
        }
    }
    let id = enc.meta.id.clone();
    let state = (reader, enc, Some(first), ended);
    let events =
        futures_util::stream::unfold(state, |(mut reader, mut enc, first, ended)| async move {
            if let Some(first) = first {
                return Some((Ok(Bytes::from(first)), (reader, enc, None, ended)));
            }
            if ended {
                return None;
            }
            let mut out = String::new();
            let mut ended = false;
            while out.is_empty() && !ended {
                let Some(frame) = reader.next().await else {
                    // The stream was taken by another connection: a dropped connection to this
                    // client, as `fetch` sees one.
                    let lost = std::io::Error::other("the stream was lost");
                    return Some((Err(lost), (reader, enc, None, true)));
                };
                match frame.kind.as_str() {
                    "delta" => enc.delta(&frame, &mut out),
                    "done" => {
                        enc.done(&frame, &mut out);
                        ended = true;
                    }
                    "error" => {
                        enc.error(&ErrorFrame::from(&frame), &mut out);
                        ended = true;
                    }
                    _ => {}
                }
            }
            Some((Ok(Bytes::from(out)), (reader, enc, None, ended)))
        });
    let mut response = Response::new(Body::from_stream(events));
    let h = response.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream; charset=utf-8"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    insert_request_id(h, &id);
    response
}

/// The non-streaming answer: one `chat.completion` once `done` has come.
async fn whole_answer(mut reader: Reader, mut enc: Encoder) -> Response {
    loop {
        let Some(frame) = reader.next().await else {
            return lost(&enc.meta.id);
        };
        match frame.kind.as_str() {
            "delta" => enc.delta(&frame, &mut String::new()),
            "done" => {
                let body = enc.completion(&frame);
                let mut response = Response::new(Body::from(body));
                let h = response.headers_mut();
                h.insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("application/json"),
                );
                insert_request_id(h, &enc.meta.id);
                return response;
            }
            "error" => return error_response(&ErrorFrame::from(&frame), Some(&enc.meta.id)),
            _ => {}
        }
    }
}

fn insert_request_id(h: &mut HeaderMap, id: &str) {
    if let Ok(v) = HeaderValue::from_str(id) {
        h.insert(HeaderName::from_static("x-request-id"), v);
    }
}

/// The stream ended without a terminal frame for this request: another connection of the
/// user resumed it (its id is in `x-request-id`), so this one has nothing more to say.
fn lost(id: &str) -> Response {
    error_response(
        &ErrorFrame::of(
            ErrorCode::Internal,
            "the stream was taken over by another connection",
        ),
        Some(id),
    )
}

/// One request's side of its stream: pulls the frames as a connection's writer does, and
/// cancels the stream if dropped before its end (the client went away).
struct Reader {
    stream: Arc<Stream>,
    inbox: Arc<Inbox>,
    frames: Vec<Utf8Bytes>,
    queue: VecDeque<Utf8Bytes>,
    ready: Vec<Arc<Stream>>,
    /// The terminal frame was pulled, or the stream left for another connection.
    ended: bool,
}

impl Reader {
    fn new(stream: Arc<Stream>, inbox: Arc<Inbox>) -> Self {
        Reader {
            stream,
            inbox,
            frames: Vec::new(),
            queue: VecDeque::new(),
            ready: Vec::new(),
            ended: false,
        }
    }

    /// The next frame of the stream, parsed; `None` after its last.
    async fn next(&mut self) -> Option<Frame> {
        loop {
            while let Some(text) = self.queue.pop_front() {
                match serde_json::from_str::<Frame>(text.as_str()) {
                    Ok(frame) => return Some(frame),
                    Err(e) => tracing::error!(error = %e, "unreadable frame skipped"),
                }
            }
            if self.ended {
                return None;
            }
            let (state, through) = self.stream.pull(self.inbox.conn, &mut self.frames);
            // Pulled only when the body asks for more, so a client that stops reading stops
            // the pulls, and a full log stops the upstream, as for a slow WebSocket.
            self.stream.written(self.inbox.conn, through);
            self.queue.extend(self.frames.drain(..));
            match state {
                Pulled::Open if self.queue.is_empty() => {
                    self.inbox.notify.notified().await;
                    self.inbox.take_ready(&mut self.ready);
                    self.ready.clear();
                }
                Pulled::Open => {}
                Pulled::Finished | Pulled::NotMine => self.ended = true,
            }
        }
    }
}

impl Drop for Reader {
    fn drop(&mut self) {
        if !self.stream.is_finished() {
            self.stream.cancel(CancelReason::Client);
        }
        // The stream and the inbox hold each other while attached.
        self.inbox.attached.lock().clear();
        self.stream.detach(self.inbox.conn);
    }
}

/// The fields of a server frame the encoding reads: the JSON a WebSocket client gets, read
/// as the shim reads it (a field of another JSON type counts as absent, as there).
#[derive(Deserialize, Default)]
#[serde(default)]
struct Frame {
    #[serde(rename = "type")]
    kind: String,
    text: Option<Value>,
    reasoning: Option<Value>,
    refusal: Option<Value>,
    tool_calls: Option<Value>,
    /// Verbatim: written back with its keys in the frame's order.
    logprobs: Option<Box<RawValue>>,
    finish_reason: Option<Value>,
    usage: Option<Box<RawValue>>,
    model: Option<Value>,
    system_fingerprint: Option<Value>,
    code: Option<Value>,
    message: Option<Value>,
    retry_after_ms: Option<Value>,
    status: Option<Value>,
    upstream: Option<Value>,
}

fn string(v: &Option<Value>) -> Option<&str> {
    v.as_ref().and_then(Value::as_str)
}

fn nonempty(v: &Option<Value>) -> Option<&str> {
    string(v).filter(|s| !s.is_empty())
}

/// A JSON object or array (what JavaScript's `typeof x === 'object'` admits, null aside).
fn object_like(raw: &Option<Box<RawValue>>) -> Option<&RawValue> {
    raw.as_deref()
        .filter(|r| matches!(r.get().as_bytes().first(), Some(b'{' | b'[')))
}

/// The stream's shared values: `id` is the stream id (`chatcmpl-` is added when written).
struct Meta {
    id: String,
    created: u64,
    model: String,
}

/// One tool call as its fragments built it.
#[derive(Default)]
struct ToolCall {
    id: Option<String>,
    kind: Option<String>,
    name: String,
    arguments: String,
}

/// One key of the joined `logprobs` (`content` or `refusal`) and its entries, verbatim.
type JoinedLogprobs = (&'static str, Vec<Box<RawValue>>);

/// The encoder of one stream (`ChunkEncoder` and `completion` of `web/src/openai.js`, with
/// the answer `ChatStream` keeps for the non-streaming case).
struct Encoder {
    meta: Meta,
    include_usage: bool,
    /// Keep the whole answer (non-streaming).
    whole: bool,
    started: bool,
    called_tools: bool,
    calls: BTreeMap<i64, ToolCall>,
    text: String,
    reasoning: String,
    refusal: Option<String>,
    /// The deltas' `logprobs` joined, by key in first-seen order; `None` when none had any.
    logprobs: Option<Vec<JoinedLogprobs>>,
}

impl Encoder {
    fn new(meta: Meta, include_usage: bool, whole: bool) -> Self {
        Encoder {
            meta,
            include_usage,
            whole,
            started: false,
            called_tools: false,
            calls: BTreeMap::new(),
            text: String::new(),
            reasoning: String::new(),
            refusal: None,
            logprobs: None,
        }
    }

    /// One `delta` frame: an event per part (reasoning, refusal, text, tool calls) into `out`.
    fn delta(&mut self, f: &Frame, out: &mut String) {
        let logprobs = object_like(&f.logprobs);
        if self.whole {
            if let Some(lp) = logprobs {
                self.add_logprobs(lp);
            }
        }
        let text = nonempty(&f.text);
        if let Some(r) = nonempty(&f.reasoning) {
            if self.whole {
                self.reasoning.push_str(r);
            }
            self.event(out, r#""reasoning_content":"#, r, None);
        }
        if let Some(r) = nonempty(&f.refusal) {
            if self.whole {
                self.refusal.get_or_insert_with(String::new).push_str(r);
            }
            let lp = if text.is_none() { logprobs } else { None };
            self.event(out, r#""refusal":"#, r, lp);
        }
        if let Some(t) = text {
            if self.whole {
                self.text.push_str(t);
            }
            self.event(out, r#""content":"#, t, logprobs);
        }
        if let Some(Value::Array(fragments)) = &f.tool_calls {
            for fragment in fragments {
                if matches!(fragment, Value::Object(_) | Value::Array(_)) {
                    let written = self.merge_tool_call(fragment);
                    self.called_tools = true;
                    let mut delta = String::from(r#""tool_calls":["#);
                    delta.push_str(&written);
                    delta.push(']');
                    self.chunk(out, &delta, None);
                }
            }
        }
    }

    /// A text part's event: `{key: value}` as its delta.
    fn event(&mut self, out: &mut String, key: &str, value: &str, logprobs: Option<&RawValue>) {
        let mut delta = String::with_capacity(key.len() + value.len() + 2);
        delta.push_str(key);
        push_json_string(&mut delta, value);
        self.chunk(out, &delta, logprobs);
    }

    /// `data: <chunk>\n\n` with `delta_body` (the delta object's members) as its delta.
    fn chunk(&mut self, out: &mut String, delta_body: &str, logprobs: Option<&RawValue>) {
        self.head(out, &self.meta.model, None);
        out.push_str(r#","choices":[{"index":0,"delta":{"#);
        if !self.started {
            out.push_str(r#""role":"assistant""#);
            if !delta_body.is_empty() {
                out.push(',');
            }
            self.started = true;
        }
        out.push_str(delta_body);
        out.push('}');
        if let Some(lp) = logprobs {
            out.push_str(r#","logprobs":"#);
            out.push_str(lp.get());
        }
        out.push_str(r#","finish_reason":null}]}"#);
        out.push_str("\n\n");
    }

    /// `data: {"id":..,"object":"chat.completion.chunk","created":..,"model":..[,"system_fingerprint":..]`
    fn head(&self, out: &mut String, model: &str, fingerprint: Option<&str>) {
        out.push_str(r#"data: {"id":"chatcmpl-"#);
        out.push_str(&self.meta.id);
        out.push_str(r#"","object":"chat.completion.chunk","created":"#);
        out.push_str(itoa::Buffer::new().format(self.meta.created));
        out.push_str(r#","model":"#);
        push_json_string(out, model);
        if let Some(fp) = fingerprint {
            out.push_str(r#","system_fingerprint":"#);
            push_json_string(out, fp);
        }
    }

    /// The end of a finished stream: the finish chunk, the usage chunk when asked, `[DONE]`.
    fn done(&mut self, f: &Frame, out: &mut String) {
        let model = string(&f.model).unwrap_or(&self.meta.model).to_string();
        let fp = string(&f.system_fingerprint);
        let reason = finish_reason(&f.finish_reason, self.called_tools);
        self.head(out, &model, fp);
        out.push_str(r#","choices":[{"index":0,"delta":{"#);
        if !self.started {
            out.push_str(r#""role":"assistant""#);
            self.started = true;
        }
        out.push_str(r#"},"finish_reason":"#);
        push_json_string(out, reason);
        out.push_str("}]}\n\n");
        if self.include_usage {
            self.head(out, &model, fp);
            out.push_str(r#","choices":[],"usage":"#);
            out.push_str(f.usage.as_deref().map_or("null", RawValue::get));
            out.push_str("}\n\n");
        }
        out.push_str("data: [DONE]\n\n");
    }

    /// A failure after the first event: one `error` event.
    fn error(&self, e: &ErrorFrame, out: &mut String) {
        out.push_str("event: error\ndata: ");
        out.push_str(&error_body(e));
        out.push_str("\n\n");
    }

    /// Adds one fragment to its call (as `ChatStream.mergeToolCall`) and returns the fragment
    /// as written in a chunk.
    fn merge_tool_call(&mut self, fragment: &Value) -> String {
        let field = |k: &str| fragment.as_object().and_then(|o| o.get(k));
        let function = field("function").and_then(Value::as_object);
        let index = match field("index").and_then(integer) {
            Some(i) => i,
            None => {
                let last = self.calls.keys().next_back().copied();
                let id = field("id").filter(|v| !v.is_null());
                let known = id.and_then(|id| {
                    self.calls
                        .iter()
                        .find(|(_, c)| c.id.as_deref().is_some_and(|c| Some(c) == id.as_str()))
                        .map(|(i, _)| *i)
                });
                match (known, id, last) {
                    (Some(i), _, _) => i,
                    (None, None, Some(last)) => last,
                    (None, _, last) => last.map_or(0, |l| l + 1),
                }
            }
        };
        let call = self.calls.entry(index).or_default();
        let mut out = String::from(r#"{"index":"#);
        out.push_str(itoa::Buffer::new().format(index));
        if let Some(id) = field("id").and_then(Value::as_str) {
            call.id = Some(id.to_string());
            out.push_str(r#","id":"#);
            push_json_string(&mut out, id);
            out.push_str(r#","type":"function""#);
        }
        if let Some(kind) = field("type").and_then(Value::as_str) {
            call.kind = Some(kind.to_string());
        }
        out.push_str(r#","function":{"#);
        let name = function
            .and_then(|f| f.get("name"))
            .and_then(Value::as_str)
            .filter(|n| !n.is_empty());
        if let Some(name) = name {
            call.name = name.to_string();
            out.push_str(r#""name":"#);
            push_json_string(&mut out, name);
            out.push(',');
        }
        let arguments = function
            .and_then(|f| f.get("arguments"))
            .and_then(Value::as_str)
            .unwrap_or("");
        if self.whole {
            call.arguments.push_str(arguments);
        }
        out.push_str(r#""arguments":"#);
        push_json_string(&mut out, arguments);
        out.push_str("}}");
        out
    }

    fn add_logprobs(&mut self, raw: &RawValue) {
        #[derive(Deserialize)]
        struct Parts {
            content: Option<Box<RawValue>>,
            refusal: Option<Box<RawValue>>,
        }
        let joined = self.logprobs.get_or_insert_with(Vec::new);
        let Ok(parts) = serde_json::from_str::<Parts>(raw.get()) else {
            return;
        };
        for (key, list) in [("content", parts.content), ("refusal", parts.refusal)] {
            let Some(list) = list else { continue };
            let Ok(entries) = serde_json::from_str::<Vec<Box<RawValue>>>(list.get()) else {
                continue;
            };
            match joined.iter_mut().find(|(k, _)| *k == key) {
                Some((_, all)) => all.extend(entries),
                None => joined.push((key, entries)),
            }
        }
    }

    /// The `chat.completion` object, once `done` has come.
    fn completion(&self, f: &Frame) -> String {
        let model = string(&f.model).unwrap_or(&self.meta.model);
        let mut out = String::from(r#"{"id":"chatcmpl-"#);
        out.push_str(&self.meta.id);
        out.push_str(r#"","object":"chat.completion","created":"#);
        out.push_str(itoa::Buffer::new().format(self.meta.created));
        out.push_str(r#","model":"#);
        push_json_string(&mut out, model);
        if let Some(fp) = string(&f.system_fingerprint) {
            out.push_str(r#","system_fingerprint":"#);
            push_json_string(&mut out, fp);
        }
        out.push_str(r#","choices":[{"index":0,"message":{"role":"assistant","content":"#);
        if self.text.is_empty() {
            out.push_str("null");
        } else {
            push_json_string(&mut out, &self.text);
        }
        if !self.reasoning.is_empty() {
            out.push_str(r#","reasoning_content":"#);
            push_json_string(&mut out, &self.reasoning);
        }
        out.push_str(r#","refusal":"#);
        match &self.refusal {
            Some(r) => push_json_string(&mut out, r),
            None => out.push_str("null"),
        }
        if !self.calls.is_empty() {
            out.push_str(r#","tool_calls":["#);
            for (i, call) in self.calls.values().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(r#"{"id":"#);
                push_json_string(&mut out, call.id.as_deref().unwrap_or(""));
                out.push_str(r#","type":"#);
                push_json_string(&mut out, call.kind.as_deref().unwrap_or("function"));
                out.push_str(r#","function":{"name":"#);
                push_json_string(&mut out, &call.name);
                out.push_str(r#","arguments":"#);
                push_json_string(&mut out, &call.arguments);
                out.push_str("}}");
            }
            out.push(']');
        }
        out.push('}');
        if let Some(joined) = &self.logprobs {
            out.push_str(r#","logprobs":{"#);
            for (i, (key, entries)) in joined.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push('"');
                out.push_str(key);
                out.push_str(r#"":["#);
                for (j, e) in entries.iter().enumerate() {
                    if j > 0 {
                        out.push(',');
                    }
                    out.push_str(e.get());
                }
                out.push(']');
            }
            out.push('}');
        }
        out.push_str(r#","finish_reason":"#);
        push_json_string(
            &mut out,
            finish_reason(&f.finish_reason, !self.calls.is_empty()),
        );
        out.push_str("}]");
        if let Some(usage) = f.usage.as_deref() {
            out.push_str(r#","usage":"#);
            out.push_str(usage.get());
        }
        out.push('}');
        out
    }
}

/// A JSON number that is an integer (`Number.isInteger`), as an `i64`.
fn integer(v: &Value) -> Option<i64> {
    v.as_i64().or_else(|| {
        v.as_f64()
            .filter(|f| f.fract() == 0.0 && f.abs() < 9.0e15)
            .map(|f| f as i64)
    })
}

/// The upstream's finish reason; when it sent none, `tool_calls` for an answer that called
/// tools, else `stop` (the SDKs refuse a choice without one).
fn finish_reason(reason: &Option<Value>, called_tools: bool) -> &str {
    match nonempty(reason) {
        Some(r) => r,
        None if called_tools => "tool_calls",
        None => "stop",
    }
}

/// An `error` frame as `MuxError.fromFrame` reads it.
struct ErrorFrame {
    code: String,
    message: String,
    retry_after_ms: Option<f64>,
    status: Option<f64>,
    /// `type`, `code`, `param`, each when the upstream said it (strings; a numeric `code` as
    /// its decimal string).
    upstream: [Option<String>; 3],
}

impl ErrorFrame {
    fn of(code: ErrorCode, message: &str) -> Self {
        ErrorFrame {
            code: code.as_str().to_string(),
            message: message.to_string(),
            retry_after_ms: None,
            status: None,
            upstream: [None, None, None],
        }
    }

    fn parse(text: &str) -> Self {
        match serde_json::from_str::<Frame>(text) {
            Ok(frame) => ErrorFrame::from(&frame),
            Err(_) => ErrorFrame::of(ErrorCode::Internal, "unreadable error frame"),
        }
    }
}

impl From<&Frame> for ErrorFrame {
    fn from(f: &Frame) -> Self {
        let code = nonempty(&f.code).unwrap_or("internal").to_string();
        let message = nonempty(&f.message).unwrap_or(&code).to_string();
        let upstream = f.upstream.as_ref().and_then(Value::as_object);
        let said = |key: &str| -> Option<String> {
            match upstream?.get(key)? {
                Value::String(s) => Some(s.clone()),
                Value::Number(n) if key == "code" => Some(js_number(n)),
                _ => None,
            }
        };
        ErrorFrame {
            upstream: [said("type"), said("code"), said("param")],
            code,
            message,
            retry_after_ms: f.retry_after_ms.as_ref().and_then(Value::as_f64),
            status: f.status.as_ref().and_then(Value::as_f64),
        }
    }
}

/// A number as JavaScript's `String(n)` writes the common cases (integers without `.0`).
fn js_number(n: &serde_json::Number) -> String {
    match (n.as_i64(), n.as_f64()) {
        (Some(i), _) => i.to_string(),
        (None, Some(f)) if f.fract() == 0.0 && f.abs() < 1e21 => format!("{f:.0}"),
        _ => n.to_string(),
    }
}

/// How an error code answers over HTTP: status, OpenAI's error `type`, `x-should-retry`.
/// The table of docs/openai-compat.md, as `HTTP_ERROR` in `web/src/openai.js`.
fn http_row(code: &str) -> (u16, &'static str, bool) {
    match code {
        "bad_request" => (400, "invalid_request_error", false),
        "unauthorized" => (401, "authentication_error", false),
        "not_found" => (404, "invalid_request_error", false),
        "duplicate_id" => (409, "invalid_request_error", false),
        "rate_limited" | "too_many_streams" => (429, "rate_limit_error", true),
        "too_many_connections" => (429, "rate_limit_error", false),
        "budget_exceeded" => (429, "insufficient_quota", false),
        "cancelled" => (499, "cancelled", false),
        "internal" => (500, "server_error", true),
        "upstream_error" => (502, "upstream_error", false),
        "overloaded" => (503, "overloaded_error", true),
        "upstream_timeout" => (504, "timeout_error", false),
        _ => (500, "server_error", false),
    }
}

/// OpenAI's error body: `{"error":{"message","type","param","code","muxgate_code"}}`.
fn error_body(e: &ErrorFrame) -> String {
    let (_, row_type, _) = http_row(&e.code);
    let [up_type, up_code, up_param] = &e.upstream;
    let mut out = String::from(r#"{"error":{"message":"#);
    push_json_string(&mut out, &e.message);
    out.push_str(r#","type":"#);
    push_json_string(&mut out, up_type.as_deref().unwrap_or(row_type));
    out.push_str(r#","param":"#);
    match up_param {
        Some(p) => push_json_string(&mut out, p),
        None => out.push_str("null"),
    }
    out.push_str(r#","code":"#);
    push_json_string(&mut out, up_code.as_deref().unwrap_or(&e.code));
    out.push_str(r#","muxgate_code":"#);
    push_json_string(&mut out, &e.code);
    out.push_str("}}");
    out
}

/// An error as an HTTP answer: the table's status (an upstream error keeps the upstream's),
/// the retry hints, OpenAI's error body.
fn error_response(e: &ErrorFrame, stream_id: Option<&str>) -> Response {
    let (mut status, _, row_retry) = http_row(&e.code);
    let upstream_error = e.code == "upstream_error";
    if let Some(s) = e
        .status
        .filter(|s| upstream_error && s.fract() == 0.0 && (400.0..=599.0).contains(s))
    {
        status = s as u16;
    }
    let wait = e.retry_after_ms.filter(|w| w.is_finite() && *w >= 0.0);
    let retry = if upstream_error {
        wait.is_some()
    } else {
        row_retry
    };
    let mut response = Response::new(Body::from(error_body(e)));
    *response.status_mut() =
        StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let h = response.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    if let Some(id) = stream_id {
        insert_request_id(h, id);
    }
    h.insert(
        HeaderName::from_static("x-should-retry"),
        HeaderValue::from_static(if retry { "true" } else { "false" }),
    );
    if let Some(wait) = wait {
        h.insert(
            header::RETRY_AFTER,
            HeaderValue::from((wait / 1000.0).ceil() as u64),
        );
        h.insert(
            HeaderName::from_static("retry-after-ms"),
            HeaderValue::from(wait.ceil() as u64),
        );
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(json: &str) -> Frame {
        serde_json::from_str(json).expect("frame")
    }

    fn enc(include_usage: bool, whole: bool) -> Encoder {
        let meta = Meta {
            id: "s:1".into(),
            created: 7,
            model: "m".into(),
        };
        Encoder::new(meta, include_usage, whole)
    }

    #[test]
    fn chunks_in_part_order_with_role_first_and_logprobs_on_text() {
        let mut e = enc(true, false);
        let mut out = String::new();
        e.delta(
            &frame(r#"{"type":"delta","id":"s:1","seq":1,"text":"Hi","reasoning":"r","logprobs":{"content":[{"token":"Hi","logprob":-0.1}]}}"#),
            &mut out,
        );
        e.delta(&frame(r#"{"type":"delta","id":"s:1","seq":2,"text":"","tool_calls":[{"index":0,"id":"c","type":"function","function":{"name":"f","arguments":""}},{"function":{"arguments":"{}"}}]}"#), &mut out);
        e.done(&frame(r#"{"type":"done","id":"s:1","seq":3,"finish_reason":"","usage":{"prompt_tokens":1,"completion_tokens":2,"total_tokens":3},"model":"m2","system_fingerprint":"fp"}"#), &mut out);
        let head =
            r#"data: {"id":"chatcmpl-s:1","object":"chat.completion.chunk","created":7,"model":"#;
        let want = [
            format!(
                r#"{head}"m","choices":[{{"index":0,"delta":{{"role":"assistant","reasoning_content":"r"}},"finish_reason":null}}]}}"#
            ),
            format!(
                r#"{head}"m","choices":[{{"index":0,"delta":{{"content":"Hi"}},"logprobs":{{"content":[{{"token":"Hi","logprob":-0.1}}]}},"finish_reason":null}}]}}"#
            ),
            format!(
                r#"{head}"m","choices":[{{"index":0,"delta":{{"tool_calls":[{{"index":0,"id":"c","type":"function","function":{{"name":"f","arguments":""}}}}]}},"finish_reason":null}}]}}"#
            ),
            format!(
                r#"{head}"m","choices":[{{"index":0,"delta":{{"tool_calls":[{{"index":0,"function":{{"arguments":"{{}}"}}}}]}},"finish_reason":null}}]}}"#
            ),
            format!(
                r#"{head}"m2","system_fingerprint":"fp","choices":[{{"index":0,"delta":{{}},"finish_reason":"tool_calls"}}]}}"#
            ),
            format!(
                r#"{head}"m2","system_fingerprint":"fp","choices":[],"usage":{{"prompt_tokens":1,"completion_tokens":2,"total_tokens":3}}}}"#
            ),
            "data: [DONE]".to_string(),
        ];
        assert_eq!(out, want.join("\n\n") + "\n\n");
    }

    #[test]
    fn completion_merges_calls_and_logprobs() {
        let mut e = enc(false, true);
        let mut sink = String::new();
        e.delta(
            &frame(r#"{"type":"delta","text":"a","logprobs":{"refusal":[1]}}"#),
            &mut sink,
        );
        e.delta(
            &frame(r#"{"type":"delta","text":"b","logprobs":{"content":[2],"refusal":[3]}}"#),
            &mut sink,
        );
        e.delta(&frame(r#"{"type":"delta","text":"","tool_calls":[{"index":1,"id":"y","function":{"name":"g","arguments":"[1"}},{"index":0,"id":"x","type":"function","function":{"name":"f","arguments":"{"}},{"index":1,"function":{"arguments":"]"}}]}"#), &mut sink);
        let body = e.completion(&frame(r#"{"type":"done","finish_reason":"stop"}"#));
        assert_eq!(
            body,
            r#"{"id":"chatcmpl-s:1","object":"chat.completion","created":7,"model":"m","choices":[{"index":0,"message":{"role":"assistant","content":"ab","refusal":null,"tool_calls":[{"id":"x","type":"function","function":{"name":"f","arguments":"{"}},{"id":"y","type":"function","function":{"name":"g","arguments":"[1]"}}]},"logprobs":{"refusal":[1,3],"content":[2]},"finish_reason":"stop"}]}"#
        );
    }

    #[test]
    fn empty_answer_finishes_with_the_role() {
        let mut e = enc(false, false);
        let mut out = String::new();
        e.done(&frame(r#"{"type":"done","finish_reason":null}"#), &mut out);
        assert!(out.starts_with(r#"data: {"id":"chatcmpl-s:1","object":"chat.completion.chunk","created":7,"model":"m","choices":[{"index":0,"delta":{"role":"assistant"},"finish_reason":"stop"}]}"#), "{out}");
    }

    #[test]
    fn error_bodies_follow_the_table() {
        let e = ErrorFrame::from(&frame(
            r#"{"type":"error","code":"upstream_error","message":"too long","status":400,"upstream":{"type":"invalid_request_error","code":"context_length_exceeded","param":"messages"}}"#,
        ));
        assert_eq!(
            error_body(&e),
            r#"{"error":{"message":"too long","type":"invalid_request_error","param":"messages","code":"context_length_exceeded","muxgate_code":"upstream_error"}}"#
        );
        let r = error_response(&e, Some("s:1"));
        assert_eq!(r.status(), 400);
        assert_eq!(r.headers()["x-should-retry"], "false");
        let limited = ErrorFrame::from(&frame(
            r#"{"type":"error","code":"rate_limited","message":"","retry_after_ms":1500.2}"#,
        ));
        assert_eq!(
            error_body(&limited),
            r#"{"error":{"message":"rate_limited","type":"rate_limit_error","param":null,"code":"rate_limited","muxgate_code":"rate_limited"}}"#
        );
        let r = error_response(&limited, None);
        assert_eq!(r.status(), 429);
        assert_eq!(r.headers()["retry-after"], "2");
        assert_eq!(r.headers()["retry-after-ms"], "1501");
        assert_eq!(r.headers()["x-should-retry"], "true");
        let odd = ErrorFrame::from(&frame(
            r#"{"type":"error","code":"upstream_error","status":200,"upstream":{"code":429}}"#,
        ));
        assert_eq!(error_response(&odd, None).status(), 502);
        assert!(error_body(&odd).contains(r#""code":"429""#));
    }

    #[test]
    fn read_call_checks_like_the_shim() {
        assert!(read_call(br#"{"model":"m","messages":[{"role":"user","content":"x"}],"stream":true,"stream_options":{"include_usage":true},"temperature":0}"#).is_ok_and(|c| c.stream && c.include_usage && c.params.contains_key("temperature")));
        for (body, message) in [
            (&b"nope"[..], "the request body is not JSON"),
            (b"[]", "the request body must be a JSON object"),
            (
                br#"{"model":"","messages":[{}]}"#,
                "`model` must be a non-empty string",
            ),
            (
                br#"{"model":"m","messages":[]}"#,
                "`messages` must be a non-empty array",
            ),
            (
                br#"{"model":"m","messages":[{}],"stream":"yes"}"#,
                "`stream` must be a boolean",
            ),
            (
                br#"{"model":"m","messages":[{}],"stream_options":1}"#,
                "`stream_options` must be an object",
            ),
        ] {
            let err = read_call(body).err().unwrap_or_default();
            assert!(err.starts_with(message), "{err}");
        }
    }
}
