//! The two bodies of an answer: the SSE stream, generated lazily one event per poll, and the
//! one-document JSON answer; both can be cut mid-way by the `cut` directive.

use std::{
    future::Future,
    pin::Pin,
    sync::{atomic::Ordering, Arc},
    task::{ready, Context, Poll},
    time::Duration,
};

use axum::{
    body::{Body, Bytes},
    http::{header, HeaderValue, StatusCode},
    response::{IntoResponse, Response},
};
use futures_util::{Stream, StreamExt};
use tokio::time::Sleep;

use super::{plan::Plan, stats::MockStats};

const DONE_EVENT: &[u8] = b"data: [DONE]\n\n";
/// hyper discards whatever it still buffers when a body fails, so the error
/// waits this long after the last chunk; returning Pending meanwhile lets
/// hyper flush the K chunks the client was promised.
const CUT_GRACE: Duration = Duration::from_millis(10);

fn cut_error() -> std::io::Error {
    std::io::Error::other("mock: response cut by the `cut` directive")
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Open,
    Completed,
    Cut,
    /// Ended by the `error_event` directive.
    ErrorEvent,
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
    Part(usize),
    ErrorEvent,
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
        } else if self.plan.error_at == Some(sent) {
            Phase::ErrorEvent
        } else if sent >= self.plan.limit {
            Phase::Finish
        } else {
            Phase::Part(sent)
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
                    this.phase = Phase::Part(k);
                }
                Phase::Part(k) => {
                    let event = this.plan.part_event(k);
                    this.guard.stats.chunks_sent.fetch_add(1, Ordering::Relaxed);
                    this.phase = match this.after(k + 1) {
                        Phase::Part(next) if !this.plan.delay.is_zero() => {
                            this.arm(this.plan.delay);
                            Phase::Delay(next)
                        }
                        next => next,
                    };
                    return Poll::Ready(Some(Ok(event)));
                }
                Phase::ErrorEvent => {
                    this.guard.outcome = Outcome::ErrorEvent;
                    this.guard.stats.error_events.fetch_add(1, Ordering::SeqCst);
                    // Like OpenAI's own mid-stream failures: the error event, then the
                    // end of the body, with neither a finish chunk nor `[DONE]`.
                    this.phase = Phase::End;
                    return Poll::Ready(Some(Ok(this.plan.error_event())));
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

pub(super) fn sse_response(plan: Plan, stats: Arc<MockStats>) -> Response {
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

pub(super) async fn json_response(
    plan: Plan,
    explicit_delay: Option<u64>,
    stats: &MockStats,
) -> Response {
    let gaps = plan.limit.saturating_sub(1) as u64;
    let wait = plan.stall + Duration::from_millis(explicit_delay.unwrap_or(0).saturating_mul(gaps));
    if !wait.is_zero() {
        tokio::time::sleep(wait).await;
    }
    let json_type = [(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    )];
    if plan.error_at.is_some() {
        // A one-document answer has no place for an in-stream error: the
        // failure becomes the whole response, as a provider failing mid-generation does.
        stats.error_events.fetch_add(1, Ordering::SeqCst);
        let body = plan.error_body.to_string();
        return (StatusCode::INTERNAL_SERVER_ERROR, json_type, body).into_response();
    }
    let body = plan.completion_json().to_string();
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
