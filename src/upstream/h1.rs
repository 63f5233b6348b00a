//! Plain-http upstreams over hyper's HTTP/1.1 connection driven by the relay's own task.
//!
//! Through reqwest, a chunk crosses two tasks: hyper's connection task reads the socket and
//! hands the frame to the body's channel, waking the relay task. Here the relay's poll of the
//! body polls the connection first, so the frame is read and taken in one poll of one task.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::task::AtomicWaker;
use futures_util::Stream;
use http_body::Body as _;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::client::conn::http1::{self, Connection, SendRequest};
use hyper_util::rt::TokioIo;
use parking_lot::Mutex;
use tokio::net::TcpStream;

type Conn = Connection<TokioIo<TcpStream>, Full<Bytes>>;

/// Why a direct HTTP/1.1 exchange failed before a response head arrived, or while its body
/// was read.
#[derive(Debug, thiserror::Error)]
pub enum H1Error {
    #[error("connect to {addr}: {source}")]
    Connect {
        addr: String,
        source: std::io::Error,
    },
    #[error("connect to {0}: timed out")]
    ConnectTimeout(String),
    #[error(transparent)]
    Http(#[from] hyper::Error),
}

/// An idle keep-alive connection, not polled while it waits: nothing runs for it until a
/// stream takes it, which polls it once to see whether the upstream closed it meanwhile.
struct Idle {
    sender: SendRequest<Full<Bytes>>,
    conn: Conn,
    since: Instant,
}

/// The idle connections of one upstream, one list per worker so a connection is only ever
/// polled by tasks of the thread it was opened on.
pub struct Pool {
    idle: Vec<Mutex<VecDeque<Idle>>>,
    max_idle: usize,
    idle_timeout: Duration,
}

impl Pool {
    pub fn new(workers: usize, max_idle: usize, idle_timeout: Duration) -> Arc<Self> {
        Arc::new(Pool {
            idle: (0..workers.max(1))
                .map(|_| Mutex::new(VecDeque::new()))
                .collect(),
            max_idle,
            idle_timeout,
        })
    }

    fn slot(&self) -> &Mutex<VecDeque<Idle>> {
        &self.idle[crate::workers::current().unwrap_or(0) % self.idle.len()]
    }

    /// The most recently used idle connection that is still open, if any.
    fn take(&self) -> Option<(SendRequest<Full<Bytes>>, Conn)> {
        let mut idle = self.slot().lock();
        let now = Instant::now();
        while idle
            .front()
            .is_some_and(|c| now.duration_since(c.since) >= self.idle_timeout)
        {
            idle.pop_front();
        }
        while let Some(mut c) = idle.pop_back() {
            // One poll with no waker: reads an EOF (or an unexpected byte) the upstream sent
            // while the connection sat idle, so a closed one is dropped before it is used.
            let mut cx = Context::from_waker(Waker::noop());
            if Pin::new(&mut c.conn).poll(&mut cx).is_ready() || !c.sender.is_ready() {
                continue;
            }
            return Some((c.sender, c.conn));
        }
        None
    }

    fn put(&self, sender: SendRequest<Full<Bytes>>, conn: Conn) {
        let mut idle = self.slot().lock();
        if idle.len() < self.max_idle {
            idle.push_back(Idle {
                sender,
                conn,
                since: Instant::now(),
            });
        }
    }
}

/// Where a plain-http upstream is: `host:port` to connect to and the `Host` header.
pub struct Target {
    pub addr: String,
    pub host: http::HeaderValue,
}

/// Sends `req` on a pooled connection or a new one, driving the connection in this task until
/// the response head arrives.
pub async fn send(
    pool: &Arc<Pool>,
    target: &Target,
    connect_timeout: Duration,
    req: http::Request<Full<Bytes>>,
) -> Result<(http::response::Parts, Body), H1Error> {
    let (mut sender, mut conn) = match pool.take() {
        Some(c) => c,
        None => connect(target, connect_timeout).await?,
    };
    let mut response = std::pin::pin!(sender.send_request(req));
    let mut conn_done = false;
    let head = std::future::poll_fn(|cx| {
        if !conn_done {
            if let Poll::Ready(result) = Pin::new(&mut conn).poll(cx) {
                conn_done = true;
                // The response future carries the connection's error; this only wakes it.
                let _ = result;
            }
        }
        response.as_mut().poll(cx)
    })
    .await?;
    let (parts, body) = head.into_parts();
    Ok((
        parts,
        Body::new(
            Exchange {
                conn: (!conn_done).then_some(conn),
                body,
                ended: false,
                last_event: false,
            },
            sender,
            pool.clone(),
        ),
    ))
}

async fn connect(
    target: &Target,
    timeout: Duration,
) -> Result<(SendRequest<Full<Bytes>>, Conn), H1Error> {
    let tcp = tokio::time::timeout(timeout, TcpStream::connect(&target.addr))
        .await
        .map_err(|_| H1Error::ConnectTimeout(target.addr.clone()))?
        .map_err(|source| H1Error::Connect {
            addr: target.addr.clone(),
            source,
        })?;
    let _ = tcp.set_nodelay(true);
    Ok(http1::handshake(TokioIo::new(tcp)).await?)
}

/// A response body whose connection is polled by whoever polls the body.
pub struct Body {
    io: Exchange,
    /// Kept with the connection so it can go back to the pool after a clean end.
    sender: Option<SendRequest<Full<Bytes>>>,
    pool: Arc<Pool>,
    local: Arc<Local>,
    /// `local` as the waker the connection and the body get.
    waker: Waker,
}

/// One request's connection and response body, polled together.
struct Exchange {
    /// `None` once the connection future finished (closed, or failed: the body then holds
    /// the error).
    conn: Option<Conn>,
    body: Incoming,
    /// The body ended cleanly: the connection may serve another request.
    ended: bool,
    /// The reader took the stream's last event (`[DONE]`): only the body's end may follow.
    last_event: bool,
}

const IDLE: u8 = 0;
const POLLING: u8 = 1;
const POLLING_WOKEN: u8 = 2;

/// A waker that, while the body is being polled, turns a wake-up into one more turn of the
/// same poll: the connection handing a frame to the body's slot, and the body taking it,
/// each wake the other's waker, which here is this task's own, and a task woken while it runs
/// is polled once more for nothing. Outside the poll (the socket readable) it wakes the task.
struct Local {
    state: AtomicU8,
    task: AtomicWaker,
}

impl Body {
    fn new(io: Exchange, sender: SendRequest<Full<Bytes>>, pool: Arc<Pool>) -> Self {
        let local = Arc::new(Local {
            state: AtomicU8::new(IDLE),
            task: AtomicWaker::new(),
        });
        Body {
            io,
            sender: Some(sender),
            pool,
            waker: Waker::from(local.clone()),
            local,
        }
    }
}

impl Wake for Local {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        let mut state = self.state.load(Ordering::Acquire);
        loop {
            if state == IDLE {
                return self.task.wake();
            }
            match self.state.compare_exchange_weak(
                state,
                POLLING_WOKEN,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => return,
                Err(now) => state = now,
            }
        }
    }
}

/// Turns of one poll before a wake-up from inside it is handed to the task instead.
const MAX_TURNS: usize = 4;

impl Stream for Body {
    type Item = Result<Bytes, hyper::Error>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        let local = &*this.local;
        local.task.register(cx.waker());
        let mut inner = Context::from_waker(&this.waker);
        for _ in 0..MAX_TURNS {
            local.state.store(POLLING, Ordering::Release);
            let next = this.io.poll_once(&mut inner);
            if next.is_ready() {
                // The caller polls again after an item (or drops the body after its end), so
                // a wake-up noted during this poll needs no one woken.
                local.state.store(IDLE, Ordering::Release);
                return next;
            }
            if local
                .state
                .compare_exchange(POLLING, IDLE, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
            {
                return Poll::Pending;
            }
        }
        // Still woken from inside after MAX_TURNS: yield to the scheduler rather than spin.
        local.state.store(IDLE, Ordering::Release);
        cx.waker().wake_by_ref();
        Poll::Pending
    }
}

impl Exchange {
    fn poll_once(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Bytes, hyper::Error>>> {
        loop {
            // The connection first: what it reads now is in the body's slot below.
            if let Some(conn) = &mut self.conn {
                if Pin::new(conn).poll(cx).is_ready() {
                    self.conn = None;
                }
            }
            match Pin::new(&mut self.body).poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => {
                    if let Ok(data) = frame.into_data() {
                        return Poll::Ready(Some(Ok(data)));
                    }
                }
                Poll::Ready(Some(Err(e))) => return Poll::Ready(Some(Err(e))),
                Poll::Ready(None) => {
                    self.ended = true;
                    return Poll::Ready(None);
                }
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

impl Body {
    /// Says the reader took the stream's last event and will read no further: the body's end
    /// (which usually came in the same read) is then read here, and the connection kept.
    pub fn last_event(&mut self) {
        self.io.last_event = true;
    }
}

impl Drop for Body {
    fn drop(&mut self) {
        if self.io.last_event && !self.io.ended {
            let mut cx = Context::from_waker(Waker::noop());
            let _ = self.io.poll_once(&mut cx);
        }
        // Only a connection whose response was read to its end, or is known to have nothing
        // but its end left, can carry the next request: the pool's check polls it once more
        // before its next use, which reads that end or finds it closed. Any other (cancelled,
        // failed mid-body) is closed with this drop.
        if self.io.ended || self.io.last_event {
            if let (Some(sender), Some(conn)) = (self.sender.take(), self.io.conn.take()) {
                self.pool.put(sender, conn);
            }
        }
    }
}
