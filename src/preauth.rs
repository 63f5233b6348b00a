//! A byte budget on what an unauthenticated WebSocket may make the gateway read.
//!
//! The WebSocket layer reads a whole frame into memory before the session sees it, and its
//! size limit (8 × `session.max_frame_bytes`) is set once, at the upgrade, for the life of the
//! socket. So before `hello` is checked, the budget is enforced one layer down, on the
//! connection's bytes: the accept loop (`accept.rs`) wraps every accepted TCP stream in a [`PreAuthIo`]
//! whose [`Gate`] the session arms at the upgrade (with `session.max_hello_bytes` plus the frame
//! header) and lifts once `hello` is accepted. A socket that spends its budget is not read any
//! further: its `hello` never completes, and the hello timeout answers it with 4401. Plain HTTP
//! requests never arm the gate and are not limited here.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// No budget: the gate is not armed, or was lifted.
const UNLIMITED: u64 = u64::MAX;

/// Bytes a frame header takes at most (2 + 8 length bytes + 4 mask bytes).
pub const FRAME_HEADER_BYTES: u64 = 14;

/// The budget of one connection, shared by its IO and its session.
#[derive(Debug)]
pub struct Gate {
    remaining: AtomicU64,
    /// A read was refused for want of budget.
    exhausted: AtomicBool,
}

/// The connection's gate, in every request's extensions (as `ConnectInfo`).
#[derive(Debug, Clone)]
pub struct PreAuth(pub Arc<Gate>);

impl Gate {
    fn new() -> Arc<Self> {
        Arc::new(Gate {
            remaining: AtomicU64::new(UNLIMITED),
            exhausted: AtomicBool::new(false),
        })
    }

    /// From now on, at most `bytes` more are read until [`Gate::lift`].
    pub fn arm(&self, bytes: u64) {
        self.remaining.store(bytes, Ordering::Relaxed);
    }

    /// The client is authenticated: reads are no longer limited here.
    pub fn lift(&self) {
        self.remaining.store(UNLIMITED, Ordering::Relaxed);
    }

    /// Whether the budget ran out (so a missing `hello` was too large, not late).
    pub fn exhausted(&self) -> bool {
        self.exhausted.load(Ordering::Relaxed)
    }
}

/// A TCP stream that reads no more than its [`Gate`] allows.
pub struct PreAuthIo {
    io: TcpStream,
    gate: Arc<Gate>,
}

impl PreAuthIo {
    /// Wraps an accepted connection; the gate is what its requests carry as [`PreAuth`].
    pub fn new(io: TcpStream) -> (Self, Arc<Gate>) {
        let gate = Gate::new();
        (
            PreAuthIo {
                io,
                gate: gate.clone(),
            },
            gate,
        )
    }
}

impl AsyncRead for PreAuthIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let remaining = this.gate.remaining.load(Ordering::Relaxed);
        if remaining == UNLIMITED {
            return Pin::new(&mut this.io).poll_read(cx, buf);
        }
        if remaining == 0 {
            // Never ready, and nothing will wake this read: the session's hello timeout
            // ends the connection.
            this.gate.exhausted.store(true, Ordering::Relaxed);
            return Poll::Pending;
        }
        let max = usize::try_from(remaining)
            .unwrap_or(usize::MAX)
            .min(buf.remaining());
        let mut limited = ReadBuf::new(buf.initialize_unfilled_to(max));
        let polled = Pin::new(&mut this.io).poll_read(cx, &mut limited);
        let n = limited.filled().len();
        if let Poll::Ready(Ok(())) = polled {
            buf.advance(n);
            // Only a lift can have raced this read; it wins.
            let _ = this.gate.remaining.compare_exchange(
                remaining,
                remaining - n as u64,
                Ordering::Relaxed,
                Ordering::Relaxed,
            );
        }
        polled
    }
}

impl AsyncWrite for PreAuthIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}
