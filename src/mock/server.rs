//! The mock's routes, its injected failures, and serving it.

use std::{
    future::Future,
    net::SocketAddr,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
};

use axum::{
    body::Bytes,
    extract::{DefaultBodyLimit, State},
    http::{header, HeaderMap, HeaderValue, StatusCode},
    response::{IntoResponse, Response},
    routing::{get, post},
    serve::ListenerExt,
    Json, Router,
};
use dashmap::DashMap;
use serde_json::{json, Value};
use tokio::{net::TcpListener, task::JoinHandle};
use tower_http::cors::CorsLayer;

use super::{
    body::{json_response, sse_response},
    directives::{parse_directives, Directives},
    plan::{error_json, Plan},
    request::parse_request,
    stats::{MockStats, MockStatsSnapshot},
};

const DEFAULT_RETRY_AFTER_MS: u64 = 100;
/// Benchmarks send long conversations; axum's 2 MiB default would turn them
/// into 413s that the mock never counts.
const BODY_LIMIT: usize = 16 << 20;

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
    d.check().map_err(|m| bad_request(&m))?;
    if !req.tools.is_empty() {
        state.stats.tool_requests.fetch_add(1, Ordering::SeqCst);
    }

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
    let mut response = (status, Json(error_json(&message, d, kind, Some(code)))).into_response();
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

fn nodelay(
    listener: TcpListener,
    stats: Arc<MockStats>,
) -> impl axum::serve::Listener<Addr = SocketAddr> {
    // Without TCP_NODELAY small SSE events can sit in Nagle's buffer waiting
    // for a delayed ACK, which skews latency benchmarks by tens of milliseconds.
    listener.tap_io(move |tcp| {
        stats.connections.fetch_add(1, Ordering::SeqCst);
        if let Err(err) = tcp.set_nodelay(true) {
            tracing::debug!(%err, "mock upstream: cannot set TCP_NODELAY");
        }
    })
}

/// Serves a fresh mock on `listener` in a background task.
pub async fn spawn(listener: TcpListener, api_key: Option<String>) -> std::io::Result<MockHandle> {
    let addr = listener.local_addr()?;
    let state = MockState::new(api_key);
    let server = axum::serve(
        nodelay(listener, state.stats.clone()),
        router(state.clone()),
    );
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
    axum::serve(nodelay(listener, state.stats.clone()), router(state))
        .with_graceful_shutdown(shutdown)
        .await
}
