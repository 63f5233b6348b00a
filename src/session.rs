//! One WebSocket connection: the `hello` handshake, then a reader (client frames) and a
//! writer (stream frames, control frames, pings) that share nothing but an [`Inbox`] and one
//! bounded control queue.
//!
//! The connection is written over any sink and source of messages (as axum's
//! `testing-websockets` example does): [`run`] splits the real socket, and the unit tests
//! below drive the same code through channels, with no socket and with paused time.

use std::ops::ControlFlow;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket};
use futures_util::{SinkExt, StreamExt};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::auth::{unix_now_ms, AuthError, Claims};
use crate::cluster::{LeaseRefused, Opening};
use crate::gateway::Gateway;
use crate::hub::{self, Registration};
use crate::limits::{Reservation, SharedCheck};
use crate::metrics::Metrics;
use crate::preauth::{Gate, FRAME_HEADER_BYTES};
use crate::protocol::{
    self, close, ClientFrame, ErrorCode, LogSafe, OpenRequest, ResumeRequest, WelcomeLimits,
};
use crate::relay::{self, Job};
use crate::stream::{CancelReason, Inbox, Pulled, Stream};
use crate::tiers::Tier;

/// Control frames (welcome, pong, connection errors, goaway) waiting for the writer. Bounded:
/// a client that floods requests without reading answers is slowed down, not buffered.
const CONTROL_QUEUE: usize = 64;

/// After the gateway sends a close frame, how long the connection stays open reading (and
/// discarding) what the client still sends. Closing a socket with unread input makes the
/// kernel send a reset, and a reset can destroy the close frame before the client reads it.
const CLOSE_LINGER: Duration = Duration::from_secs(1);

/// What the connection writes to: the sending half of its WebSocket (or a channel in tests).
trait MessageSink: futures_util::Sink<Message> + Unpin + Send + 'static {}
impl<T: futures_util::Sink<Message> + Unpin + Send + 'static> MessageSink for T {}

/// What the connection reads from: the receiving half of its WebSocket (or a channel in tests).
trait MessageSource: futures_util::Stream<Item = Result<Message, axum::Error>> + Unpin + Send {}
impl<T: futures_util::Stream<Item = Result<Message, axum::Error>> + Unpin + Send> MessageSource
    for T
{
}

enum Control {
    Frame(Utf8Bytes),
    /// Extension `resume` on a live connection: the writer attaches the streams itself, so the
    /// `resumed` frame goes out before any frame of their replay (it is their only puller),
    /// then the error frames.
    Resume(Vec<(Arc<Stream>, u64)>, Vec<Utf8Bytes>),
    /// Write what is pending, then close with this code.
    Close(u16, &'static str),
}

/// Runs one connection to its end. `gate` is the connection's pre-`hello` read budget (none
/// when the gateway is served without the accept loop's [`crate::preauth::PreAuthIo`]).
pub async fn run(gw: Arc<Gateway>, socket: WebSocket, gate: Option<Arc<Gate>>) {
    let (sink, source) = socket.split();
    run_on(gw, sink, source, gate).await;
}

/// [`run`] over a socket already split into its two halves.
async fn run_on(
    gw: Arc<Gateway>,
    sink: impl MessageSink,
    mut source: impl MessageSource,
    gate: Option<Arc<Gate>>,
) {
    let _open = gw.metrics.connection_opened();
    let max_hello = gw.config.session.max_hello_bytes;
    if let Some(gate) = &gate {
        gate.arm(max_hello as u64 + FRAME_HEADER_BYTES);
    }
    let hello = handshake(&gw, &mut source, gate.as_deref()).await;
    if let (Ok(_), Some(gate)) = (&hello, &gate) {
        gate.lift();
    }
    let Hello {
        claims,
        resume,
        batch,
    } = match hello {
        Ok(hello) => hello,
        Err(Refusal::Unauthorized(message)) => {
            let frame = protocol::error(None, ErrorCode::Unauthorized, &message, None);
            return refuse(
                sink,
                source,
                Some(frame),
                close::UNAUTHORIZED,
                "unauthorized",
            )
            .await;
        }
        Err(Refusal::Broken(code, reason)) => {
            return refuse(sink, source, None, code, reason).await;
        }
        Err(Refusal::Gone) => return,
    };
    let Some(tier) = gw.tiers.get(&claims.tier) else {
        return;
    };
    let inbox = Inbox::new();
    // Cluster mode: the cap counts the user's connections on every instance first; the hub
    // then counts this instance's (the only count when Redis is unavailable).
    let lease = match &gw.cluster {
        Some(cluster) => cluster
            .lease_connection(&claims.sub, tier.max_connections())
            .await
            .map(Some)
            .map_err(|_| hub::Refusal {
                code: ErrorCode::TooManyStreams,
                message: format!(
                    "at most {} simultaneous connections per user",
                    tier.max_connections()
                ),
            }),
        None => Ok(None),
    };
    let registered = lease.and_then(|lease| {
        let mut registration =
            gw.hub
                .register(&claims.sub, inbox.conn, tier.max_connections(), &gw.metrics)?;
        if let Some(lease) = lease {
            registration.hold(lease);
        }
        Ok(registration)
    });
    let registration = match registered {
        Ok(registration) => registration,
        Err(refusal) => {
            gw.metrics.refused("too_many_connections");
            let frame = protocol::error(None, refusal.code, &refusal.message, None);
            return refuse(
                sink,
                source,
                Some(frame),
                close::TOO_MANY_CONNECTIONS,
                "too many connections",
            )
            .await;
        }
    };
    let max_streams = tier.max_streams;
    let span = tracing::info_span!("conn", user = %LogSafe(registration.user()), tier = %LogSafe(&claims.tier));
    let session = Authenticated {
        registration,
        inbox,
        tier,
        max_streams,
        resume,
        exp: claims.exp,
        batch,
    };
    tracing::Instrument::instrument(serve(gw, sink, source, session), span).await;
}

/// Sends a last `error` frame (if any) and closes with `code`, then lingers so the close frame
/// reaches the client.
async fn refuse(
    mut sink: impl MessageSink,
    mut source: impl MessageSource,
    frame: Option<Utf8Bytes>,
    code: u16,
    reason: &'static str,
) {
    let readable = frame.is_some();
    let sent = tokio::time::timeout(Duration::from_secs(2), async {
        if let Some(frame) = frame {
            sink.send(Message::Text(frame)).await?;
        }
        sink.send(close_message(code, reason)).await
    })
    .await;
    if matches!(sent, Ok(Ok(()))) {
        // Without a frame, the refusal is for input that broke the WebSocket layer.
        linger(&mut source, readable).await;
    }
}

/// Reads and discards what the client still sends after our close frame, until its own close,
/// the end of the socket, or [`CLOSE_LINGER`]. A source that already failed (a frame over the
/// hard limit) cannot be read: then the socket is only held open, unread, for that time, which
/// still lets a client that reads see the close frame before the reset.
async fn linger(source: &mut impl MessageSource, readable: bool) {
    let _ = tokio::time::timeout(CLOSE_LINGER, async {
        if readable {
            while let Some(Ok(_)) = source.next().await {}
        } else {
            std::future::pending::<()>().await
        }
    })
    .await;
}

/// How a socket error maps to a close code (RFC 6455 §7.4.1), when the peer deserves one.
fn close_for_read_error(error: axum::Error) -> Option<(u16, &'static str)> {
    let error = error.into_inner().downcast::<tungstenite::Error>().ok()?;
    match *error {
        tungstenite::Error::Capacity(_) => Some((close::TOO_BIG, "frame too large")),
        tungstenite::Error::Utf8(_) => Some((close::INVALID_DATA, "invalid UTF-8")),
        tungstenite::Error::Protocol(_) => Some((close::PROTOCOL_ERROR, "protocol error")),
        _ => None,
    }
}

/// Who is on a connection, once `hello` has been accepted.
struct Authenticated {
    /// The connection's place in the hub, held until its streams are detached.
    registration: Registration,
    inbox: Arc<Inbox>,
    tier: Arc<Tier>,
    max_streams: usize,
    resume: Vec<ResumeRequest>,
    /// The hello token's `exp`, Unix seconds.
    exp: u64,
    /// The client asked for several frames per message (`hello.batch`).
    batch: bool,
}

/// An accepted connection, from `welcome` to the detach of its streams.
async fn serve(
    gw: Arc<Gateway>,
    sink: impl MessageSink,
    mut source: impl MessageSource,
    session: Authenticated,
) {
    let Authenticated {
        registration,
        inbox,
        tier,
        max_streams,
        resume,
        exp,
        batch,
    } = session;
    let user = registration.user().clone();
    let (control, control_rx) = mpsc::channel(CONTROL_QUEUE);
    let conn_end = CancellationToken::new();
    let session_id = format!("{:016x}", rand::random::<u64>());
    tracing::info!(session = %session_id, "connected");

    // Resumed streams are attached first, so `welcome.resumed` lists exactly the streams that
    // will replay. Their frames wait in the inbox: the writer starts only after `welcome` is in
    // the control queue, and always empties that queue first, so `welcome` comes first.
    let (found, missing) = find_resumes(&gw, &user, &resume, max_streams).await;
    let (resumed, refused) = attach_resumed(&inbox, found);
    let s = &gw.config.session;
    let limits = WelcomeLimits {
        max_streams,
        max_frame_bytes: s.max_frame_bytes,
        max_connections: tier.max_connections(),
    };
    let welcome = protocol::welcome(
        &session_id,
        &user,
        &tier.name,
        s.heartbeat_ms,
        &limits,
        &resumed,
        exp,
        batch,
    );
    let _ = control.send(Control::Frame(welcome)).await;
    let writer = tokio::spawn(write_loop(
        gw.metrics.clone(),
        sink,
        inbox.clone(),
        control_rx,
        conn_end.clone(),
        Duration::from_millis(s.heartbeat_ms),
        Duration::from_millis(s.write_timeout_ms),
        batch,
    ));
    for frame in refused.into_iter().chain(missing) {
        let _ = control.send(Control::Frame(frame)).await;
    }

    let mut conn = Connection {
        gw: gw.clone(),
        user: user.clone(),
        tier,
        max_streams,
        inbox: inbox.clone(),
        control,
        draining: false,
        moved_at: None,
        bad_frames: 0,
        bad_window: Instant::now(),
        exp,
        closed_by_us: false,
        source_broken: false,
    };
    conn.read_loop(&mut source, &conn_end, registration.goaway())
        .await;
    let closed_by_us = conn.closed_by_us;
    conn_end.cancel();
    let write_end = tokio::time::timeout(Duration::from_secs(5), writer).await;
    let closed_by_us = closed_by_us || matches!(write_end, Ok(Ok(WriteEnd::SlowConsumer)));

    // The connection is gone; its streams keep running for the resume window.
    let attached = std::mem::take(&mut *inbox.attached.lock());
    let window = Duration::from_millis(gw.config.session.resume_window_ms);
    for stream in attached.into_values() {
        if let Some(epoch) = stream.detach(inbox.conn) {
            if stream.is_mirror() {
                // Its resume window runs where its upstream call does: hand it back now.
                stream.cancel(CancelReason::ResumeExpired);
            } else {
                stream.expire_unless_resumed(epoch, window);
            }
        }
    }
    drop(registration);
    tracing::info!("disconnected");
    // Last, so neither the user's connection count nor the streams wait for it.
    if closed_by_us {
        linger(&mut source, !conn.source_broken).await;
    }
}

/// Why a connection ends before `welcome`.
enum Refusal {
    /// Answered with `unauthorized` and close 4401.
    Unauthorized(String),
    /// The socket broke the WebSocket rules: closed with this code, no frame.
    Broken(u16, &'static str),
    /// The client is already gone.
    Gone,
}

/// An accepted `hello`.
struct Hello {
    claims: Claims,
    resume: Vec<ResumeRequest>,
    batch: bool,
}

/// Waits for `hello` and checks its token.
async fn handshake(
    gw: &Gateway,
    source: &mut impl MessageSource,
    gate: Option<&Gate>,
) -> Result<Hello, Refusal> {
    let unauthorized = |m: &str| Refusal::Unauthorized(m.to_string());
    let max_hello = gw.config.session.max_hello_bytes;
    let too_large = || format!("the `hello` frame is over max_hello_bytes ({max_hello})");
    let timeout = Duration::from_millis(gw.config.session.hello_timeout_ms);
    let first = tokio::time::timeout(timeout, async {
        loop {
            match source.next().await {
                Some(Ok(Message::Text(text))) => return Ok(text),
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
                Some(Ok(Message::Binary(_))) => {
                    return Err(unauthorized("the first frame must be a `hello` text frame"))
                }
                Some(Err(e)) => {
                    return Err(
                        close_for_read_error(e).map_or(Refusal::Gone, |(code, reason)| {
                            Refusal::Broken(code, reason)
                        }),
                    )
                }
                Some(Ok(Message::Close(_))) | None => return Err(Refusal::Gone),
            }
        }
    })
    .await
    .map_err(|_| {
        // Out of read budget: the `hello` was too large, not late.
        Refusal::Unauthorized(match gate {
            Some(gate) if gate.exhausted() => too_large(),
            _ => format!("no `hello` within {} ms", timeout.as_millis()),
        })
    })??;
    if first.len() > max_hello {
        return Err(Refusal::Unauthorized(too_large()));
    }
    match protocol::parse_client_frame(&first) {
        Ok(ClientFrame::Hello {
            token,
            resume,
            batch,
            ..
        }) => {
            let claims = gw
                .auth
                .verify(&token)
                .map_err(|e| Refusal::Unauthorized(e.to_string()))?;
            Ok(Hello {
                claims,
                resume,
                batch,
            })
        }
        Ok(_) => Err(unauthorized("the first frame must be `hello`")),
        Err(e) => Err(Refusal::Unauthorized(format!(
            "the first frame must be `hello`: {e}"
        ))),
    }
}

/// The `not_found` answer to a resume of a stream no instance has.
fn no_such_stream(id: &str) -> Utf8Bytes {
    let id_field = protocol::valid_stream_id(id).then_some(id);
    protocol::error(
        id_field,
        ErrorCode::NotFound,
        "no such stream to resume (it ended long ago, never existed, or belonged to a gateway that restarted)",
        None,
    )
}

/// This instance's stream `id` of `user`, if it has one to resume or cancel: not a mirror
/// being handed back to the instance that runs it (that one is asked again).
fn local_stream(gw: &Gateway, user: &Arc<str>, id: &str) -> Option<Arc<Stream>> {
    gw.hub.get(user, id).filter(|s| !s.is_handed_back())
}

/// `hello.resume`, looked up in this instance's hub.
struct Lookup<'r> {
    /// Streams found here, with the key to resume after.
    found: Vec<(Arc<Stream>, u64)>,
    /// Streams this instance does not have (another may, in cluster mode).
    absent: Vec<&'r ResumeRequest>,
    /// Error frames to answer (more than `max_streams` listed).
    missing: Vec<Utf8Bytes>,
}

/// Splits `hello.resume` into the streams found here, those absent, and error frames.
fn lookup_resumes<'r>(
    gw: &Gateway,
    user: &Arc<str>,
    resume: &'r [ResumeRequest],
    max_streams: usize,
) -> Lookup<'r> {
    let mut found: Vec<(Arc<Stream>, u64)> = Vec::new();
    let mut absent: Vec<&ResumeRequest> = Vec::new();
    let mut missing = Vec::new();
    for r in resume.iter().take(max_streams) {
        if found.iter().any(|(s, _)| s.id == r.id) || absent.iter().any(|a| a.id == r.id) {
            continue;
        }
        match local_stream(gw, user, &r.id) {
            Some(stream) => found.push((stream, r.after)),
            None => absent.push(r),
        }
    }
    if resume.len() > max_streams {
        missing.push(protocol::error(
            None,
            ErrorCode::BadRequest,
            "`resume` lists more streams than max_streams; the rest were ignored",
            None,
        ));
    }
    Lookup {
        found,
        absent,
        missing,
    }
}

/// The streams a `resume` list names, with the key to resume after, and the error frames for
/// those no instance has (or past `max_streams`).
async fn find_resumes(
    gw: &Arc<Gateway>,
    user: &Arc<str>,
    resume: &[ResumeRequest],
    max_streams: usize,
) -> (Vec<(Arc<Stream>, u64)>, Vec<Utf8Bytes>) {
    let Lookup {
        mut found,
        absent,
        mut missing,
    } = lookup_resumes(gw, user, resume, max_streams);
    // Cluster mode: the streams this instance does not have may run on another; each is
    // asked of its owner at once, before the answer says which streams resumed.
    let remote = absent.iter().map(|r| async {
        match &gw.handoff {
            Some(handoff) => handoff
                .resume(gw, user, &r.id, r.after)
                .await
                .map(|mirror| (mirror, r.after)),
            None => Err(no_such_stream(&r.id)),
        }
    });
    for result in futures_util::future::join_all(remote).await {
        match result {
            Ok(mirror) => found.push(mirror),
            Err(frame) => missing.push(frame),
        }
    }
    (found, missing)
}

/// Attaches `found` to `inbox` (moving any attached to another connection): the ids that will
/// replay, and a `not_found` frame for each whose frames after the key are no longer kept.
fn attach_resumed(
    inbox: &Arc<Inbox>,
    found: Vec<(Arc<Stream>, u64)>,
) -> (Vec<String>, Vec<Utf8Bytes>) {
    let mut resumed: Vec<String> = Vec::with_capacity(found.len());
    let mut refused = Vec::new();
    for (stream, after) in found {
        match stream.attach(inbox, after) {
            Ok(()) => resumed.push(stream.id.clone()),
            Err(gap) => {
                let message = format!(
                    "stream `{}` can no longer be replayed after seq {after}: the oldest kept is {}",
                    stream.id, gap.oldest_available
                );
                refused.push(protocol::error(
                    Some(&stream.id),
                    ErrorCode::NotFound,
                    &message,
                    None,
                ));
            }
        }
    }
    (resumed, refused)
}

struct Connection {
    gw: Arc<Gateway>,
    user: Arc<str>,
    tier: Arc<Tier>,
    /// Live streams this user may have (the tier's, or `session.max_streams`).
    max_streams: usize,
    inbox: Arc<Inbox>,
    control: mpsc::Sender<Control>,
    /// `goaway` was sent: no new streams on this connection.
    draining: bool,
    /// When an operator's `goaway` was sent; the connection closes once its streams have moved
    /// to the client's new connection, or after the resume window.
    moved_at: Option<Instant>,
    bad_frames: u32,
    bad_window: Instant,
    /// The current token's `exp` (Unix seconds): the hello token's, then the last refresh's.
    exp: u64,
    /// The gateway sent a close frame: the client still gets [`CLOSE_LINGER`] to read it.
    closed_by_us: bool,
    /// The WebSocket layer refused the client's input and can read no more.
    source_broken: bool,
}

impl Connection {
    async fn read_loop(
        &mut self,
        source: &mut impl MessageSource,
        conn_end: &CancellationToken,
        goaway: &CancellationToken,
    ) {
        let heartbeat = Duration::from_millis(self.gw.config.session.heartbeat_ms);
        let mut check = tokio::time::interval(heartbeat);
        let mut moved_check = tokio::time::interval(Duration::from_millis(100));
        let mut last_seen = Instant::now();
        let gw = self.gw.clone();
        let window = Duration::from_millis(gw.config.session.resume_window_ms);
        let mut armed_exp = self.exp;
        let expiry = tokio::time::sleep_until(self.grace_deadline());
        tokio::pin!(expiry);
        loop {
            if armed_exp != self.exp {
                armed_exp = self.exp;
                expiry.as_mut().reset(self.grace_deadline());
            }
            let next = tokio::select! {
                msg = source.next() => match msg {
                    Some(Ok(msg)) => {
                        last_seen = Instant::now();
                        self.on_message(msg).await
                    }
                    Some(Err(e)) => {
                        self.source_broken = true;
                        if let Some((code, reason)) = close_for_read_error(e) {
                            tracing::info!(code, reason, "closing: bad WebSocket input");
                            self.close(code, reason).await;
                        }
                        ControlFlow::Break(())
                    }
                    None => ControlFlow::Break(()),
                },
                () = &mut expiry => {
                    if unix_now_ms() < self.close_at_ms() {
                        expiry.as_mut().reset(self.grace_deadline());
                        ControlFlow::Continue(())
                    } else {
                        self.expired().await
                    }
                }
                _ = check.tick() => {
                    if last_seen.elapsed() > heartbeat * 2 {
                        tracing::info!("heartbeat timeout");
                        self.close(close::HEARTBEAT_TIMEOUT, "heartbeat timeout").await;
                        ControlFlow::Break(())
                    } else {
                        ControlFlow::Continue(())
                    }
                }
                _ = gw.draining.cancelled(), if !self.draining => {
                    self.draining = true;
                    self.send(protocol::goaway("shutdown", 500)).await
                }
                _ = goaway.cancelled(), if !self.draining => {
                    self.draining = true;
                    self.moved_at = Some(Instant::now());
                    self.send(protocol::goaway("rebalance", 0)).await
                }
                _ = moved_check.tick(), if self.moved_at.is_some() => {
                    let carried: Vec<Arc<Stream>> = self.inbox.attached.lock().values().cloned().collect();
                    let moved = carried.iter().all(|s| !s.is_attached_to(self.inbox.conn));
                    if moved || self.moved_at.is_some_and(|t| t.elapsed() > window) {
                        self.close(close::GOING_AWAY, "moved").await;
                        ControlFlow::Break(())
                    } else {
                        ControlFlow::Continue(())
                    }
                }
                _ = gw.closing.cancelled() => {
                    self.close(close::GOING_AWAY, "shutdown").await;
                    ControlFlow::Break(())
                }
                _ = conn_end.cancelled() => ControlFlow::Break(()),
            };
            if next.is_break() {
                return;
            }
        }
    }

    async fn on_message(&mut self, msg: Message) -> ControlFlow<()> {
        match msg {
            Message::Text(text) => {
                if text.len() > self.gw.config.session.max_frame_bytes {
                    let message = format!(
                        "frame of {} bytes is over max_frame_bytes ({})",
                        text.len(),
                        self.gw.config.session.max_frame_bytes
                    );
                    return self.bad_frame(None, ErrorCode::BadRequest, &message).await;
                }
                match protocol::parse_client_frame(&text) {
                    Ok(frame) => self.on_frame(frame).await,
                    Err(e) => self.bad_frame(None, ErrorCode::BadRequest, &e.0).await,
                }
            }
            Message::Binary(_) => {
                self.bad_frame(
                    None,
                    ErrorCode::BadRequest,
                    "binary frames are not part of the protocol",
                )
                .await
            }
            Message::Close(_) => ControlFlow::Break(()),
            Message::Ping(_) | Message::Pong(_) => ControlFlow::Continue(()),
        }
    }

    /// When the expiry timer next wakes: at the token's `exp` plus the grace, or sooner.
    /// The timer never sleeps longer than this at once: a token may say it expires in a
    /// thousand years, and the wall clock may jump; on waking the expiry is checked again.
    const MAX_EXPIRY_SLEEP: Duration = Duration::from_secs(24 * 3600);

    fn grace_deadline(&self) -> Instant {
        let left = self.close_at_ms().saturating_sub(unix_now_ms());
        Instant::now() + Duration::from_millis(left).min(Self::MAX_EXPIRY_SLEEP)
    }

    /// No valid `refresh` within the grace: tell the client why, close 4401.
    async fn expired(&mut self) -> ControlFlow<()> {
        tracing::info!("closing: token expired and not refreshed");
        let message = format!(
            "token expired: no valid `refresh` within {} ms of its `exp`",
            self.gw.config.session.token_grace_ms
        );
        let _ = self
            .send(protocol::error(
                None,
                ErrorCode::Unauthorized,
                &message,
                None,
            ))
            .await;
        self.close(close::UNAUTHORIZED, "token expired").await;
        ControlFlow::Break(())
    }

    /// When the connection closes unless a `refresh` comes (Unix ms).
    fn close_at_ms(&self) -> u64 {
        self.exp
            .saturating_mul(1000)
            .saturating_add(self.gw.config.session.token_grace_ms)
    }

    /// Whether the current token is past its `exp` and the leeway: no new streams.
    fn token_expired(&self) -> bool {
        let refuse_after = self
            .exp
            .saturating_mul(1000)
            .saturating_add(self.gw.config.session.token_leeway_ms);
        unix_now_ms() > refuse_after
    }

    /// A new token for the same user and tier moves the connection's expiry; anything else is
    /// refused and the connection goes on under its current token.
    async fn refresh(&mut self, token: &str) -> ControlFlow<()> {
        let refusal = match self.gw.auth.verify(token) {
            Ok(claims) if *claims.sub != *self.user => {
                "refresh refused: the new token is for another user (`sub`)".to_string()
            }
            Ok(claims) if *claims.tier != *self.tier.name => {
                "refresh refused: the new token is for another tier; reconnect to change tier"
                    .to_string()
            }
            Ok(claims) => {
                self.exp = claims.exp;
                return self.send(protocol::refreshed(claims.exp)).await;
            }
            Err(AuthError::Expired) => "refresh refused: the new token is expired".to_string(),
            Err(e) => format!("refresh refused: {e}"),
        };
        // Counted as a bad frame: a client cannot make the gateway verify tokens without end.
        self.bad_frame(None, ErrorCode::Unauthorized, &refusal)
            .await
    }

    async fn on_frame(&mut self, frame: ClientFrame) -> ControlFlow<()> {
        match frame {
            ClientFrame::Ping { ts } => self.send(protocol::pong(&ts)).await,
            ClientFrame::Refresh { token } => self.refresh(&token).await,
            ClientFrame::Hello { .. } => {
                self.bad_frame(
                    None,
                    ErrorCode::BadRequest,
                    "already authenticated: `hello` comes once",
                )
                .await
            }
            ClientFrame::Cancel { id } => {
                let local = local_stream(&self.gw, &self.user, &id).filter(|s| !s.is_finished());
                let forwarded = match (&local, &self.gw.handoff) {
                    (None, Some(handoff)) => handoff.cancel(&self.user, &id).await,
                    _ => false,
                };
                match local {
                    Some(stream) => {
                        stream.cancel(CancelReason::Client);
                        ControlFlow::Continue(())
                    }
                    // The instance running it aborts it; its end reaches whichever
                    // connection carries the stream.
                    None if forwarded => ControlFlow::Continue(()),
                    None => {
                        let id = protocol::valid_stream_id(&id).then_some(id.as_str());
                        self.send(protocol::error(
                            id,
                            ErrorCode::NotFound,
                            "no live stream with this id",
                            None,
                        ))
                        .await
                    }
                }
            }
            ClientFrame::Open(req) => self.open(req).await,
            ClientFrame::Resume { resume } => self.resume(resume).await,
        }
    }

    /// Extension `resume`: `hello.resume` on this connection, answered by a `resumed` frame.
    async fn resume(&mut self, resume: Vec<ResumeRequest>) -> ControlFlow<()> {
        if self.draining {
            // Its streams are to leave this connection, not join it.
            return self
                .send(protocol::error(
                    None,
                    ErrorCode::Overloaded,
                    "this connection is draining after `goaway`: resume on a new connection",
                    None,
                ))
                .await;
        }
        let (found, missing) = find_resumes(&self.gw, &self.user, &resume, self.max_streams).await;
        match self.control.send(Control::Resume(found, missing)).await {
            Ok(()) => ControlFlow::Continue(()),
            Err(_) => ControlFlow::Break(()),
        }
    }

    async fn open(&mut self, req: OpenRequest) -> ControlFlow<()> {
        if !protocol::valid_stream_id(&req.id) {
            return self
                .bad_frame(
                    None,
                    ErrorCode::BadRequest,
                    "stream `id` must be 1-64 characters of [A-Za-z0-9._:-]",
                )
                .await;
        }
        let id = req.id.as_str();
        let refuse =
            |code: ErrorCode, message: &str| protocol::error(Some(id), code, message, None);
        if self.token_expired() {
            let frame = refuse(ErrorCode::Unauthorized, "token expired: send `refresh`");
            return self.send(frame).await;
        }
        if self.draining {
            let frame = refuse(
                ErrorCode::Overloaded,
                "this connection is draining after `goaway`: reconnect and open the stream there",
            );
            return self.send(frame).await;
        }
        match open_stream(
            &self.gw,
            &self.user,
            &self.tier,
            self.max_streams,
            &self.inbox,
            req,
        )
        .await
        {
            Ok(_) => ControlFlow::Continue(()),
            Err(frame) => self.send(frame).await,
        }
    }

    async fn send(&self, frame: Utf8Bytes) -> ControlFlow<()> {
        match self.control.send(Control::Frame(frame)).await {
            Ok(()) => ControlFlow::Continue(()),
            Err(_) => ControlFlow::Break(()),
        }
    }

    async fn close(&mut self, code: u16, reason: &'static str) {
        self.closed_by_us = true;
        let _ = self.control.send(Control::Close(code, reason)).await;
    }

    /// Answers a bad frame, and closes the connection once they come too often.
    async fn bad_frame(
        &mut self,
        id: Option<&str>,
        code: ErrorCode,
        message: &str,
    ) -> ControlFlow<()> {
        if self.bad_window.elapsed() > Duration::from_secs(60) {
            self.bad_window = Instant::now();
            self.bad_frames = 0;
        }
        self.bad_frames += 1;
        if let ControlFlow::Break(()) = self.send(protocol::error(id, code, message, None)).await {
            return ControlFlow::Break(());
        }
        if self.bad_frames > self.gw.config.session.max_bad_frames_per_minute {
            tracing::warn!("closing: too many bad frames");
            self.close(close::POLICY, "too many bad frames").await;
            return ControlFlow::Break(());
        }
        ControlFlow::Continue(())
    }
}

/// Starts one stream for `user` and attaches it to `inbox`: the checks of an `open` that do not
/// depend on the connection (model, params, route, budget and rate limits, the user's live
/// streams), then the stream's task. A WebSocket `open` and an HTTP chat completion
/// ([`crate::openai`]) both come through here, so both get the same limits, queue, retries,
/// fallbacks, billing and metrics. `Err` is the `error` frame refusing it.
pub(crate) async fn open_stream(
    gw: &Arc<Gateway>,
    user: &Arc<str>,
    tier: &Arc<Tier>,
    max_streams: usize,
    inbox: &Arc<Inbox>,
    req: OpenRequest,
) -> Result<Arc<Stream>, Utf8Bytes> {
    let refuse =
        |code: ErrorCode, message: &str| protocol::error(Some(&req.id), code, message, None);
    if !protocol::valid_model(&req.model) {
        let message = format!(
            "`model` must be 1-{} bytes of printable characters",
            protocol::MAX_MODEL_LEN
        );
        return Err(refuse(ErrorCode::BadRequest, &message));
    }
    if let Err(message) = relay::validate_open(&req, &gw.config.allowed_params) {
        return Err(refuse(ErrorCode::BadRequest, &message));
    }
    if gw.upstreams.route(&req.model).is_none() {
        let message = format!("unknown model `{}`", req.model);
        return Err(refuse(ErrorCode::BadRequest, &message));
    };
    // Refusals that cost nothing to decide come before anything is allocated for the
    // stream, and before its prompt is counted.
    if let Some(frame) = relay::refuse_early(gw, user, tier, &req) {
        return Err(frame);
    }
    let stream = Stream::new(
        req.id.clone(),
        user.clone(),
        req.model.clone(),
        gw.config.session.stream_buffer_bytes,
    );
    // Cluster mode: the user's live streams on every instance count against the cap. The
    // same round trip decides what the stream's task would ask Redis next (its budgets, its
    // rate limits) and, for a short prompt counted here first, charges its reservation: one
    // call opens a stream. A longer prompt is counted by its task once the call admitted it,
    // and charged then.
    let mut admission = None;
    let lease = match &gw.cluster {
        Some(cluster) => {
            let counted = relay::small_prompt(gw, &req);
            let prompt_tokens = counted.as_ref().map(|(count, _)| count.tokens);
            let completion = relay::completion_reservation(gw, &req);
            let tokens = completion + prompt_tokens.unwrap_or(0);
            let spend = gw.budgets.shared_keys(user, &tier.name);
            let limits = gw.budgets.shared_limits(user, &tier.name);
            let check = gw.limits.shared_check(user, tier, tokens);
            let opening = Opening {
                id: &req.id,
                spend: spend.as_deref().unwrap_or_default(),
                limits: spend.as_ref().map_or(&[], |_| &limits[..]),
                draws: check.as_ref().map_or(&[], SharedCheck::draws),
                charge: prompt_tokens.is_some(),
                waits_up_to: tier.max_wait(),
            };
            match cluster.lease_stream(user, max_streams, &opening).await {
                Ok((lease, opened)) => {
                    // A stream refused here has its prompt counted by no one, as in one process.
                    if let Some(counted) = counted.filter(|_| lease.is_some()) {
                        relay::tokenized(gw, counted);
                    }
                    admission = Some(match opened {
                        Some(opened) => {
                            let checked = check.as_ref().map(|c| c.verdict(opened.limited));
                            let charged = opening.charge
                                && opened.leased
                                && checked.as_ref().is_some_and(Result::is_ok);
                            relay::Admission {
                                spent: spend.is_some().then_some(opened.spent),
                                reserved: charged.then(|| Reservation {
                                    tier: tier.name.clone(),
                                    tokens,
                                    shared: true,
                                }),
                                checked,
                                prompt_tokens,
                                leased: opened.leased,
                            }
                        }
                        None => relay::Admission::undecided(prompt_tokens),
                    });
                    lease
                }
                Err(LeaseRefused::Full) => {
                    gw.metrics.refused("too_many_streams");
                    let message = format!("at most {max_streams} live streams per user");
                    return Err(refuse(ErrorCode::TooManyStreams, &message));
                }
                Err(LeaseRefused::Unavailable(e)) => {
                    gw.metrics.refused("redis_unavailable");
                    return Err(refuse(ErrorCode::Overloaded, &e.to_string()));
                }
            }
        }
        None => None,
    };
    if let Err(refusal) = gw.hub.open(&stream, max_streams) {
        if refusal.code == ErrorCode::TooManyStreams {
            gw.metrics.refused("too_many_streams");
        }
        return Err(refuse(refusal.code, &refusal.message));
    }
    // A fresh stream has no gap to refuse.
    let _ = stream.attach(inbox, 0);
    let hub = gw.hub.clone();
    let linger = Duration::from_millis(gw.config.session.resume_window_ms);
    let retain = gw.config.session.retained_bytes_per_user;
    let span = tracing::info_span!("stream", stream = %stream.id, model = %LogSafe(&stream.model));
    let job = Job {
        gw: gw.clone(),
        stream: stream.clone(),
        req,
        tier: tier.clone(),
        lease,
        admission,
    };
    let task_stream = stream.clone();
    gw.stream_tasks.spawn(tracing::Instrument::instrument(
        async move {
            let outcome = relay::run(job).await;
            outcome.log();
            // Its owner record (cluster mode) outlives its lease for as long: the ending kept it.
            hub.finished(&task_stream, linger, retain);
        },
        span,
    ));
    Ok(stream)
}

fn close_message(code: u16, reason: &'static str) -> Message {
    Message::Close(Some(CloseFrame {
        code,
        reason: Utf8Bytes::from_static(reason),
    }))
}

/// Why the writer stopped.
#[derive(Debug)]
enum WriteEnd {
    /// The socket failed or the session ended.
    Done,
    /// A write did not finish within the write timeout.
    SlowConsumer,
}

/// Writes control frames, stream frames and pings until the connection ends.
#[allow(clippy::too_many_arguments)] // the connection's parts and rules, each used once here
async fn write_loop(
    metrics: Arc<Metrics>,
    mut sink: impl MessageSink,
    inbox: Arc<Inbox>,
    mut control: mpsc::Receiver<Control>,
    conn_end: CancellationToken,
    heartbeat: Duration,
    write_timeout: Duration,
    batch: bool,
) -> WriteEnd {
    let mut ready = Vec::new();
    let mut frames = Vec::new();
    // The streams whose frames are in `frames`, and the key they were pulled through: reported
    // written only once the socket write completes, so a write that times out loses nothing.
    let mut pulled = Vec::new();
    let mut ping = tokio::time::interval_at(Instant::now() + heartbeat, heartbeat);
    // Made once, not once per turn: a new one registers with the token (a lock) each time the
    // writer sleeps and unregisters (another) each time it wakes, that is once per write.
    let conn_ended = conn_end.cancelled();
    tokio::pin!(conn_ended);
    let end = loop {
        let result = tokio::select! {
            biased;
            msg = control.recv() => match msg {
                Some(Control::Frame(frame)) => {
                    frames.push(frame);
                    write(&mut sink, &mut frames, write_timeout, &metrics, batch).await
                }
                Some(Control::Resume(found, missing)) => {
                    let (resumed, refused) = attach_resumed(&inbox, found);
                    frames.push(protocol::resumed(&resumed));
                    frames.extend(refused.into_iter().chain(missing));
                    write(&mut sink, &mut frames, write_timeout, &metrics, batch).await
                }
                Some(Control::Close(code, reason)) => {
                    pull_ready(&inbox, &mut ready, &mut frames, &mut pulled);
                    let written = write(&mut sink, &mut frames, write_timeout, &metrics, batch).await;
                    report_written(&inbox, &mut pulled, written.is_ok());
                    let _ = tokio::time::timeout(write_timeout, sink.send(close_message(code, reason))).await;
                    break WriteEnd::Done;
                }
                None => break WriteEnd::Done,
            },
            _ = inbox.notify.notified() => {
                pull_ready(&inbox, &mut ready, &mut frames, &mut pulled);
                let written = write(&mut sink, &mut frames, write_timeout, &metrics, batch).await;
                report_written(&inbox, &mut pulled, written.is_ok());
                written
            }
            _ = ping.tick() => {
                match tokio::time::timeout(write_timeout, sink.send(Message::Ping(Default::default()))).await {
                    Ok(Ok(())) => Ok(()),
                    Ok(Err(_)) => Err(WriteEnd::Done),
                    Err(_) => Err(WriteEnd::SlowConsumer),
                }
            }
            _ = &mut conn_ended => break WriteEnd::Done,
        };
        if let Err(end) = result {
            break end;
        }
    };
    if let WriteEnd::SlowConsumer = end {
        tracing::warn!(conn = inbox.conn, "closing slow consumer");
        // The socket stays open (the session lingers) while this waits for room behind the
        // frames the client has not read yet.
        let _ = tokio::time::timeout(
            CLOSE_LINGER,
            sink.send(close_message(close::SLOW_CONSUMER, "slow consumer")),
        )
        .await;
    }
    conn_end.cancel();
    end
}

/// Copies the frames of every ready stream into `frames`, noting in `pulled` how far each was
/// pulled; forgets streams that ended.
fn pull_ready(
    inbox: &Inbox,
    ready: &mut Vec<Arc<Stream>>,
    frames: &mut Vec<Utf8Bytes>,
    pulled: &mut Vec<(Arc<Stream>, u64)>,
) {
    inbox.take_ready(ready);
    for stream in ready.drain(..) {
        let (state, through) = stream.pull(inbox.conn, frames);
        if state == Pulled::NotMine {
            continue;
        }
        if state == Pulled::Finished {
            let mut attached = inbox.attached.lock();
            if attached
                .get(&stream.id)
                .is_some_and(|s| Arc::ptr_eq(s, &stream))
            {
                attached.remove(&stream.id);
            }
        }
        pulled.push((stream, through));
    }
}

/// After a write: when it completed, tells each stream its pulled frames are written (which
/// lets its log trim them); when it failed, they stay unwritten for the resume.
fn report_written(inbox: &Inbox, pulled: &mut Vec<(Arc<Stream>, u64)>, completed: bool) {
    for (stream, through) in pulled.drain(..) {
        if completed {
            stream.written(inbox.conn, through);
        }
    }
}

/// Extension `batch`: the most bytes of frames packed into one WebSocket message, so that a
/// replay of many streams is a few messages a client parses in bounded pieces. A frame over it
/// goes alone.
const BATCH_MAX_BYTES: usize = 64 * 1024;

/// Packs `frames[..]`'s next run into one message: the frame itself when it is alone (what a
/// v1 reader expects), else a JSON array of the frames in order, up to [`BATCH_MAX_BYTES`].
/// Returns the message and how many frames it holds.
fn pack(frames: &[Utf8Bytes]) -> (Utf8Bytes, usize) {
    let mut size = 1;
    let mut n = 0;
    for frame in frames {
        if n > 0 && size + frame.len() + 1 > BATCH_MAX_BYTES {
            break;
        }
        size += frame.len() + 1;
        n += 1;
    }
    if n <= 1 {
        return (frames[0].clone(), 1);
    }
    let mut array = String::with_capacity(size);
    array.push('[');
    for (i, frame) in frames[..n].iter().enumerate() {
        if i > 0 {
            array.push(',');
        }
        array.push_str(frame);
    }
    array.push(']');
    (array.into(), n)
}

/// Writes and flushes `frames` (emptying it) within `timeout`; with `batch`, several frames
/// to a message.
async fn write(
    sink: &mut impl MessageSink,
    frames: &mut Vec<Utf8Bytes>,
    timeout: Duration,
    metrics: &Metrics,
    batch: bool,
) -> Result<(), WriteEnd> {
    if frames.is_empty() {
        return Ok(());
    }
    let count = frames.len() as u64;
    let bytes: usize = frames.iter().map(|f| f.len()).sum();
    let result = tokio::time::timeout(timeout, async {
        if batch {
            let mut rest = &frames[..];
            while !rest.is_empty() {
                let (message, n) = pack(rest);
                rest = &rest[n..];
                sink.feed(Message::Text(message)).await?;
            }
        } else {
            for frame in frames.drain(..) {
                sink.feed(Message::Text(frame)).await?;
            }
        }
        sink.flush().await
    })
    .await;
    frames.clear();
    match result {
        Ok(Ok(())) => {
            metrics.frames_sent(count, bytes as u64);
            Ok(())
        }
        Ok(Err(_)) => Err(WriteEnd::Done),
        Err(_) => Err(WriteEnd::SlowConsumer),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    //! The connection's rules, driven through channels instead of a socket, with paused time
    //! (tokio auto-advances the clock whenever every task waits, so timeouts cost nothing).

    use std::pin::Pin;
    use std::task::{Context, Poll};

    use serde_json::{json, Value};
    use tokio_util::sync::PollSender;

    use super::*;
    use crate::config::{Config, SessionConfig};

    /// A gateway whose session settings `tweak` adjusted. Its upstream is never called: these
    /// tests open no stream.
    async fn gateway(tweak: impl FnOnce(&mut SessionConfig)) -> Arc<Gateway> {
        let env = |name: &str| match name {
            "MUXGATE_JWT_SECRET" => Some("session-unit-test-secret-0123".to_string()),
            "MUXGATE_UPSTREAM_BASE_URL" => Some("http://127.0.0.1:9/v1".to_string()),
            _ => None,
        };
        let mut config = Config::load_with_env(None, &env).unwrap();
        tweak(&mut config.session);
        Gateway::start(config).await.unwrap()
    }

    /// The client's end of a connection whose socket is a pair of channels.
    struct Peer {
        /// What the gateway's reader reads.
        to_gateway: mpsc::Sender<Result<Message, axum::Error>>,
        /// What the gateway's writer wrote; closed once the connection dropped its sink.
        from_gateway: mpsc::Receiver<Message>,
    }

    fn connect(gw: &Arc<Gateway>) -> Peer {
        let (to_gateway, mut from_peer) = mpsc::channel(64);
        let (to_peer, from_gateway) = mpsc::channel(64);
        let source = futures_util::stream::poll_fn(move |cx| from_peer.poll_recv(cx));
        tokio::spawn(run_on(gw.clone(), PollSender::new(to_peer), source, None));
        Peer {
            to_gateway,
            from_gateway,
        }
    }

    impl Peer {
        async fn send(&self, message: Message) {
            self.to_gateway.send(Ok(message)).await.unwrap();
        }

        async fn send_frame(&self, frame: Value) {
            self.send(Message::Text(frame.to_string().into())).await;
        }

        /// The next message other than a WebSocket ping; `None` once the connection is gone.
        async fn recv(&mut self) -> Option<Message> {
            loop {
                match self.from_gateway.recv().await? {
                    Message::Ping(_) => continue,
                    message => return Some(message),
                }
            }
        }

        async fn frame(&mut self) -> Value {
            match self.recv().await {
                Some(Message::Text(text)) => serde_json::from_str(&text).unwrap(),
                other => panic!("expected a text frame, got {other:?}"),
            }
        }

        /// Expects the close frame; its code.
        async fn close_code(&mut self) -> u16 {
            match self.recv().await {
                Some(Message::Close(Some(frame))) => frame.code,
                other => panic!("expected a close frame, got {other:?}"),
            }
        }

        /// Says `hello` as a `pro` user; the `welcome`.
        async fn hello(&mut self, gw: &Gateway) -> Value {
            let token = gw
                .auth
                .issue("u1", "pro", Duration::from_secs(3600))
                .unwrap();
            self.send_frame(json!({"type": "hello", "token": token}))
                .await;
            let welcome = self.frame().await;
            assert_eq!(welcome["type"], "welcome", "{welcome}");
            welcome
        }

        /// Expects an `error` frame with `code`.
        async fn error(&mut self, code: &str) {
            let e = self.frame().await;
            assert_eq!(
                (e["type"].as_str(), e["code"].as_str()),
                (Some("error"), Some(code)),
                "{e}"
            );
        }
    }

    #[tokio::test(start_paused = true)]
    async fn no_hello_within_the_timeout_is_refused_with_4401() {
        let gw = gateway(|s| s.hello_timeout_ms = 5_000).await;
        let mut peer = connect(&gw);
        let started = Instant::now();
        // WebSocket pings are not a `hello`, and do not restart its clock.
        peer.send(Message::Ping(Default::default())).await;
        let e = peer.frame().await;
        assert_eq!(e["code"], "unauthorized", "{e}");
        assert_eq!(e["message"], "no `hello` within 5000 ms");
        assert!(started.elapsed() >= Duration::from_millis(5_000));
        assert_eq!(peer.close_code().await, close::UNAUTHORIZED);
        assert!(peer.recv().await.is_none(), "nothing after the close");
    }

    #[tokio::test(start_paused = true)]
    async fn a_binary_first_frame_is_refused_at_once() {
        let gw = gateway(|_| {}).await;
        let mut peer = connect(&gw);
        let started = Instant::now();
        peer.send(Message::Binary(Default::default())).await;
        peer.error("unauthorized").await;
        assert_eq!(peer.close_code().await, close::UNAUTHORIZED);
        assert!(started.elapsed() < Duration::from_millis(gw.config.session.hello_timeout_ms));
    }

    #[tokio::test(start_paused = true)]
    async fn bad_frames_past_the_minute_budget_close_with_4400() {
        let gw = gateway(|s| {
            s.max_bad_frames_per_minute = 3;
            // No heartbeat timeout within the test's two minutes.
            s.heartbeat_ms = 3_600_000;
        })
        .await;
        let mut peer = connect(&gw);
        peer.hello(&gw).await;
        let bad = || Message::Text("{not json".into());
        for _ in 0..3 {
            peer.send(bad()).await;
            peer.error("bad_request").await;
        }
        // A new minute, a new budget.
        tokio::time::sleep(Duration::from_secs(61)).await;
        peer.send(Message::Binary(Default::default())).await;
        peer.error("bad_request").await;
        peer.send_frame(json!({"type": "hello", "token": "again"}))
            .await;
        peer.error("bad_request").await;
        peer.send(bad()).await;
        peer.error("bad_request").await;
        peer.send_frame(json!({"type": "ping", "ts": "still here"}))
            .await;
        let pong = peer.frame().await;
        assert_eq!(
            (pong["type"].as_str(), pong["ts"].as_str()),
            (Some("pong"), Some("still here"))
        );
        // The fourth of this minute: answered, then the connection closes.
        peer.send(bad()).await;
        peer.error("bad_request").await;
        assert_eq!(peer.close_code().await, close::POLICY);
    }

    #[tokio::test(start_paused = true)]
    async fn input_the_websocket_layer_refused_closes_with_its_code() {
        let gw = gateway(|_| {}).await;
        for (error, code) in [
            (
                tungstenite::Error::Utf8("invalid".into()),
                close::INVALID_DATA,
            ),
            (
                tungstenite::Error::Capacity(tungstenite::error::CapacityError::MessageTooLong {
                    size: 1 << 30,
                    max_size: 1 << 20,
                }),
                close::TOO_BIG,
            ),
        ] {
            let mut peer = connect(&gw);
            peer.hello(&gw).await;
            peer.to_gateway
                .send(Err(axum::Error::new(error)))
                .await
                .unwrap();
            assert_eq!(peer.close_code().await, code);
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_silent_client_is_dropped_after_two_heartbeats() {
        let gw = gateway(|s| s.heartbeat_ms = 1_000).await;
        let mut peer = connect(&gw);
        peer.hello(&gw).await;
        let welcomed = Instant::now();
        let mut pings = 0;
        let code = loop {
            match peer.from_gateway.recv().await {
                Some(Message::Ping(_)) => pings += 1,
                Some(Message::Close(Some(frame))) => break frame.code,
                other => panic!("expected pings then a close, got {other:?}"),
            }
        };
        assert_eq!(code, close::HEARTBEAT_TIMEOUT);
        let after = welcomed.elapsed();
        assert!(
            (Duration::from_millis(2_000)..Duration::from_millis(4_000)).contains(&after),
            "{after:?}"
        );
        assert!(pings >= 2, "the gateway pinged before giving up: {pings}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_client_that_answers_pings_stays_connected() {
        let gw = gateway(|s| s.heartbeat_ms = 1_000).await;
        let mut peer = connect(&gw);
        peer.hello(&gw).await;
        let until = Instant::now() + Duration::from_secs(10);
        let mut pings = 0;
        loop {
            tokio::select! {
                message = peer.from_gateway.recv() => match message {
                    Some(Message::Ping(payload)) => {
                        pings += 1;
                        peer.send(Message::Pong(payload)).await;
                    }
                    other => panic!("expected only pings, got {other:?}"),
                },
                () = tokio::time::sleep_until(until) => break,
            }
        }
        assert!(pings >= 9, "{pings}");
        peer.send_frame(json!({"type": "ping", "ts": "t"})).await;
        assert_eq!(peer.frame().await["type"], "pong");
    }

    /// What the writer did to its sink, in order.
    #[derive(Debug, Clone, PartialEq)]
    enum Written {
        Text(String),
        Ping,
        Close(u16),
        Flush,
    }

    /// A sink that accepts everything at once and records each message and each flush.
    #[derive(Clone, Default)]
    struct Recorder(Arc<parking_lot::Mutex<Vec<Written>>>);

    impl Recorder {
        fn take(&self) -> Vec<Written> {
            std::mem::take(&mut *self.0.lock())
        }
    }

    impl futures_util::Sink<Message> for Recorder {
        type Error = std::convert::Infallible;

        fn poll_ready(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
            Poll::Ready(Ok(()))
        }

        fn start_send(self: Pin<&mut Self>, message: Message) -> Result<(), Self::Error> {
            let written = match message {
                Message::Text(text) => Written::Text(text.to_string()),
                Message::Ping(_) => Written::Ping,
                Message::Close(frame) => Written::Close(frame.map_or(0, |f| f.code)),
                other => panic!("the writer sent {other:?}"),
            };
            self.0.lock().push(written);
            Ok(())
        }

        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
            self.0.lock().push(Written::Flush);
            Poll::Ready(Ok(()))
        }

        fn poll_close(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
            Poll::Ready(Ok(()))
        }
    }

    /// A writer over `sink` with no heartbeat in the test's time; its control queue and the
    /// signal that ends it.
    fn writer(
        sink: impl MessageSink,
        inbox: &Arc<Inbox>,
        write_timeout: Duration,
    ) -> (
        mpsc::Sender<Control>,
        CancellationToken,
        tokio::task::JoinHandle<WriteEnd>,
    ) {
        let (control, control_rx) = mpsc::channel(CONTROL_QUEUE);
        let conn_end = CancellationToken::new();
        let task = tokio::spawn(write_loop(
            Arc::new(Metrics::new()),
            sink,
            inbox.clone(),
            control_rx,
            conn_end.clone(),
            Duration::from_secs(3_600),
            write_timeout,
            false,
        ));
        (control, conn_end, task)
    }

    #[test]
    fn batch_packs_runs_of_frames_into_arrays_and_leaves_a_lone_frame_bare() {
        let one = protocol::delta("a", 1, "x");
        assert_eq!(pack(std::slice::from_ref(&one)), (one.clone(), 1));
        let frames: Vec<Utf8Bytes> = (1..=3).map(|seq| protocol::delta("a", seq, "x")).collect();
        let (message, n) = pack(&frames);
        assert_eq!(n, 3);
        let parsed: Vec<Value> = serde_json::from_str(&message).unwrap();
        let want: Vec<Value> = frames
            .iter()
            .map(|f| serde_json::from_str(f).unwrap())
            .collect();
        assert_eq!(parsed, want);
        // A run stops before the frame that would take it past the cap; that frame starts the
        // next message, and a frame over the cap on its own goes alone, bare.
        let big = protocol::delta("b", 1, &"y".repeat(BATCH_MAX_BYTES / 2));
        let huge = protocol::delta("c", 1, &"z".repeat(BATCH_MAX_BYTES));
        let run = [
            one.clone(),
            big.clone(),
            big.clone(),
            huge.clone(),
            one.clone(),
        ];
        let (first, n) = pack(&run);
        assert_eq!(n, 2);
        assert!(first.len() <= BATCH_MAX_BYTES);
        assert_eq!(pack(&run[2..]).1, 1);
        assert_eq!(pack(&run[3..]), (huge, 1));
    }

    /// A stream attached to `inbox` whose log holds exactly `frames` deltas of this size, and
    /// has received them; one more push waits until a completed write makes room.
    async fn full_stream(id: &str, inbox: &Arc<Inbox>, frames: u64) -> Arc<Stream> {
        let cap = protocol::delta(id, 1, "word ").len() * frames as usize;
        let stream = Stream::new(id.into(), "u1".into(), "m".into(), cap);
        stream.attach(inbox, 0).unwrap();
        for seq in 1..=frames {
            assert!(stream.push(seq, protocol::delta(id, seq, "word ")).await);
        }
        stream
    }

    /// Lets every task run until all of them wait (the paused clock advances only then).
    async fn settle() {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }

    #[tokio::test(start_paused = true)]
    async fn ready_streams_go_out_in_one_batch_then_count_as_written() {
        let inbox = Inbox::new();
        let a = full_stream("a", &inbox, 2).await;
        let b = full_stream("b", &inbox, 2).await;
        let recorder = Recorder::default();
        let (control, conn_end, task) = writer(recorder.clone(), &inbox, Duration::from_secs(10));
        control
            .send(Control::Frame(protocol::pong(&json!("t"))))
            .await
            .unwrap();
        settle().await;
        let written = recorder.take();
        assert_eq!(
            written.first(),
            Some(&Written::Text(protocol::pong(&json!("t")).to_string()))
        );
        let batch = &written[2..];
        assert_eq!(written[1], Written::Flush, "{written:?}");
        // Both streams' frames in one write: fed in order per stream, flushed once.
        assert_eq!(batch.len(), 5, "{batch:?}");
        assert_eq!(batch[4], Written::Flush);
        for stream in ["a", "b"] {
            let seqs: Vec<u64> = batch
                .iter()
                .filter_map(|w| match w {
                    Written::Text(t) => serde_json::from_str::<Value>(t).ok(),
                    _ => None,
                })
                .filter(|f| f["id"] == stream)
                .map(|f| f["seq"].as_u64().unwrap())
                .collect();
            assert_eq!(seqs, vec![1, 2], "stream {stream}: {batch:?}");
        }
        // The write completed, so the frames count as written: a full log has room again.
        let more = tokio::spawn(async move { a.push(3, protocol::delta("a", 3, "word ")).await });
        settle().await;
        assert!(
            more.is_finished(),
            "a completed write makes room in the log"
        );
        assert!(more.await.unwrap());
        assert!(b.push(3, protocol::delta("b", 3, "word ")).await);
        conn_end.cancel();
        assert!(matches!(task.await.unwrap(), WriteEnd::Done));
    }

    #[tokio::test(start_paused = true)]
    async fn a_write_past_the_timeout_closes_with_4408_and_loses_nothing() {
        let inbox = Inbox::new();
        let stream = full_stream("s", &inbox, 3).await;
        // A client that reads nothing: room for one message, then every write waits.
        let (to_peer, mut from_gateway) = mpsc::channel(1);
        let write_timeout = Duration::from_secs(10);
        let started = Instant::now();
        let (_control, conn_end, task) = writer(PollSender::new(to_peer), &inbox, write_timeout);
        let producer = {
            let stream = stream.clone();
            tokio::spawn(async move { stream.push(4, protocol::delta("s", 4, "word ")).await })
        };
        tokio::time::sleep(write_timeout - Duration::from_millis(1)).await;
        assert!(!task.is_finished(), "the write still has time");
        tokio::time::sleep(Duration::from_millis(2)).await;
        // The client reads again while the gateway waits to say why it closes.
        let first = from_gateway.recv().await.unwrap();
        assert!(
            matches!(&first, Message::Text(t) if t.contains("\"seq\":1")),
            "{first:?}"
        );
        match from_gateway.recv().await {
            Some(Message::Close(Some(frame))) => assert_eq!(frame.code, close::SLOW_CONSUMER),
            other => panic!("expected close 4408, got {other:?}"),
        }
        assert!(matches!(task.await.unwrap(), WriteEnd::SlowConsumer));
        assert!(started.elapsed() >= write_timeout);
        assert!(
            conn_end.is_cancelled(),
            "a write past the timeout ends the connection"
        );
        // Nothing of the timed-out write counts as written: the log keeps every frame for the
        // resume, and stays full.
        settle().await;
        assert!(
            !producer.is_finished(),
            "no frame of a failed write was let go"
        );
        assert!(stream.detach(inbox.conn).is_some());
        let resumed = Inbox::new();
        stream.attach(&resumed, 0).unwrap();
        let mut frames = Vec::new();
        stream.pull(resumed.conn, &mut frames);
        assert_eq!(frames.len(), 3, "every frame replays on the new connection");
    }

    #[tokio::test(start_paused = true)]
    async fn control_frames_first_and_a_close_after_the_pending_stream_frames() {
        let inbox = Inbox::new();
        let _stream = full_stream("s", &inbox, 1).await;
        let recorder = Recorder::default();
        let (control, conn_end, task) = writer(recorder.clone(), &inbox, Duration::from_secs(10));
        for ts in ["1", "2"] {
            control
                .send(Control::Frame(protocol::pong(&json!(ts))))
                .await
                .unwrap();
        }
        control
            .send(Control::Close(close::GOING_AWAY, "shutdown"))
            .await
            .unwrap();
        assert!(matches!(task.await.unwrap(), WriteEnd::Done));
        let kinds: Vec<String> = recorder
            .take()
            .into_iter()
            .filter_map(|w| match w {
                Written::Text(t) => Some(
                    serde_json::from_str::<Value>(&t).unwrap()["type"]
                        .as_str()
                        .unwrap()
                        .to_string(),
                ),
                Written::Close(code) => Some(code.to_string()),
                _ => None,
            })
            .collect();
        assert_eq!(kinds, ["pong", "pong", "delta", "1001"]);
        assert!(conn_end.is_cancelled());
    }
}
