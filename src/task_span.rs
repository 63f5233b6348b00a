//! A task's tracing span, entered on every poll of the task but those of its hot section.
//!
//! `tracing::Instrument` enters the span on each poll and leaves it after: for a stream's task
//! that is every relayed chunk (a few hundred instructions in the subscriber, per chunk), though
//! the relay loop logs nothing; its failures are returned and logged by the code around it.
//! [`TaskSpan::quiet`] marks that loop, so the span is entered wherever the task can log and
//! nowhere else, and every log line keeps the fields it had.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use tracing::Span;

/// The span of one task and whether the task is inside its quiet section.
pub struct TaskSpan {
    span: Span,
    /// Set while a [`TaskSpan::quiet`] section runs; read at the start of every poll. Only
    /// the task itself sets it, so relaxed ordering is enough.
    quiet: AtomicBool,
}

impl TaskSpan {
    pub fn new(span: Span) -> Arc<Self> {
        Arc::new(TaskSpan {
            span,
            quiet: AtomicBool::new(false),
        })
    }

    /// `task`, entering this span on each of its polls unless it is in its quiet section.
    pub fn instrument<F: Future>(self: &Arc<Self>, task: F) -> Instrumented<F> {
        Instrumented {
            task: Box::pin(task),
            span: self.clone(),
        }
    }

    /// Runs `section` outside the span. It must not log: its events would lack the span's
    /// fields. After it ends the task yields once, so the code that follows (which may log
    /// what the section returned) runs in a poll that entered the span again.
    pub async fn quiet<F: Future>(&self, section: F) -> F::Output {
        let out = {
            let _loud_again = Quiet::enter(&self.quiet);
            section.await
        };
        tokio::task::yield_now().await;
        out
    }
}

/// Clears the quiet flag however the section ends, dropped futures included.
struct Quiet<'a>(&'a AtomicBool);

impl<'a> Quiet<'a> {
    fn enter(flag: &'a AtomicBool) -> Self {
        flag.store(true, Ordering::Relaxed);
        Quiet(flag)
    }
}

impl Drop for Quiet<'_> {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Relaxed);
    }
}

/// What [`TaskSpan::instrument`] returns.
pub struct Instrumented<F> {
    /// Boxed so that `Instrumented` is `Unpin`: one allocation per task, no unsafe projection.
    task: Pin<Box<F>>,
    span: Arc<TaskSpan>,
}

impl<F: Future> Future for Instrumented<F> {
    type Output = F::Output;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = &mut *self;
        let _entered = (!this.span.quiet.load(Ordering::Relaxed)).then(|| this.span.span.enter());
        this.task.as_mut().poll(cx)
    }
}
