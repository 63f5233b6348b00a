//! The counters of one mock instance, served by `GET /mock/stats`.

use std::sync::atomic::{AtomicU64, Ordering};

use parking_lot::Mutex;
use serde_json::Value;

/// Live counters of one mock instance. Counters are atomics so that thousands
/// of concurrent streams never contend on a lock.
#[derive(Debug, Default)]
pub struct MockStats {
    pub(super) requests: AtomicU64,
    pub(super) completed: AtomicU64,
    pub(super) aborted: AtomicU64,
    pub(super) cut: AtomicU64,
    pub(super) in_flight: AtomicU64,
    pub(super) chunks_sent: AtomicU64,
    pub(super) errors_injected: AtomicU64,
    pub(super) error_events: AtomicU64,
    pub(super) tool_requests: AtomicU64,
    pub(super) connections: AtomicU64,
    pub(super) last_authorization: Mutex<Option<String>>,
    pub(super) last_request: Mutex<Option<Value>>,
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
    /// Parts (content, reasoning, refusal and tool-call chunks) handed to response bodies,
    /// over all requests.
    pub chunks_sent: u64,
    /// HTTP error answers produced by `fail`.
    pub errors_injected: u64,
    /// Answers ended by the `error_event` directive (an SSE `error` event, or a 500 when
    /// not streaming).
    pub error_events: u64,
    /// Accepted chat-completion requests (valid body and directives) that carried a non-empty
    /// `tools` array.
    pub tool_requests: u64,
    /// TCP connections accepted: with `requests`, whether a client reused its keep-alive
    /// connections.
    #[serde(default)]
    pub connections: u64,
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
            error_events: self.error_events.load(Ordering::SeqCst),
            tool_requests: self.tool_requests.load(Ordering::SeqCst),
            connections: self.connections.load(Ordering::SeqCst),
            last_authorization: self.last_authorization.lock().clone(),
            last_request: self.last_request.lock().clone(),
        }
    }

    pub(super) fn reset(&self) {
        // in_flight is left alone: open streams decrement it when they end,
        // and zeroing it here would make it wrap below zero.
        for counter in [
            &self.requests,
            &self.completed,
            &self.aborted,
            &self.cut,
            &self.chunks_sent,
            &self.errors_injected,
            &self.error_events,
            &self.tool_requests,
            &self.connections,
        ] {
            counter.store(0, Ordering::SeqCst);
        }
        *self.last_authorization.lock() = None;
        *self.last_request.lock() = None;
    }
}
