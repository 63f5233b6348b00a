//! Cluster mode: streams follow their user across instances.
//!
//! The instance that runs a stream's upstream call owns it and records so in Redis (with the
//! stream's lease, [`crate::cluster::OwnerRecord`]). A client whose socket moved to another
//! instance (a drop, a `goaway`, a rolling restart) resumes there; that instance finds the
//! owner and asks it to relay the stream from the client's `after`:
//!
//! - here, a *mirror* [`Stream`] is registered in the hub, so the session, replay log, resume,
//!   backpressure and metrics work unchanged; a task feeds it the owner's frames;
//! - on the owner, a *remote consumer* attaches to the real stream like a connection (so the
//!   resume window does not run while it relays), pulls its frames and publishes them.
//!
//! Messages travel on each instance's own pub/sub channel, one subscription per instance
//! (pub/sub rather than Redis Streams: a chunk costs one `PUBLISH` and no key to write, trim
//! or expire, and the replay log the owner already keeps is what makes a lost message
//! recoverable). They are numbered per relay, and both sides send a heartbeat while quiet, so
//! a lost message (a subscriber reconnecting, Redis restarting) shows as a gap and the mirror
//! asks again from the last key it has; a peer silent for `cluster.lease_ms` counts as gone.
//!
//! Backpressure is credit by acknowledgement: the mirror acknowledges what its client's
//! socket wrote, and only then does the owner count those frames as written. The owner's log
//! bound (`session.stream_buffer_bytes`) therefore holds across instances: past it the
//! upstream read stops, whichever instance the slow client is on, and the mirror never holds
//! more than the owner let go unwritten.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use axum::extract::ws::Utf8Bytes;
use dashmap::DashMap;
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, Notify};
use tokio::time::Instant;

use crate::cluster::Cluster;
use crate::gateway::Gateway;
use crate::protocol::{self, ErrorCode};
use crate::stream::{CancelReason, Inbox, Pulled, Stream};

/// Messages waiting for one mirror's task. The owner sends at most its log's unwritten frames
/// plus heartbeats, so this is seldom more than a few; a message that finds it full is
/// dropped, and the gap it leaves is asked for again.
const MIRROR_QUEUE: usize = 256;

/// How long a resume waits for the owner's answer to a relay request.
const ANSWER_WAIT: Duration = Duration::from_secs(2);

/// The longest quiet time on a relay before a heartbeat; shorter when `lease_ms / 3` is.
const MAX_BEAT: Duration = Duration::from_secs(1);

/// What a resume answers when no instance runs the stream.
const NO_SUCH_STREAM: &str = "no such stream to resume (it ended long ago, never existed, or belonged to a gateway that restarted)";

/// One relay message's header; a `frames` message is followed by the frames, one a line.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "t", rename_all = "snake_case")]
enum Header {
    /// To the owner: relay `user`'s stream `id` from after key `after` to instance `to`,
    /// whose client wrote the frames through `written`.
    Request {
        relay: u64,
        to: String,
        user: String,
        id: String,
        after: u64,
        written: u64,
    },
    /// To the mirror: the relay runs.
    Accept { relay: u64, model: String },
    /// To the mirror: the owner cannot relay the stream (gone, or the frames asked for were
    /// trimmed).
    Refuse { relay: u64, message: String },
    /// To the mirror: message `n` of the relay, with frames; `finished` when the last one is
    /// the stream's terminal frame.
    Frames { relay: u64, n: u64, finished: bool },
    /// To the mirror: nothing new; `n` messages sent so far.
    Beat { relay: u64, n: u64 },
    /// To the mirror: the stream was resumed by another connection.
    Moved { relay: u64 },
    /// To the owner: the client wrote every frame through `through`; `cancel` while the
    /// client's `cancel` is not yet answered. Also the mirror's heartbeat.
    Ack {
        relay: u64,
        through: u64,
        cancel: bool,
    },
    /// To the owner: the mirror ends (its client left, or it has the terminal frame).
    Detach { relay: u64 },
    /// To the owner: a client on another instance cancelled `user`'s stream `id`.
    Cancel { user: String, id: String },
}

impl Header {
    fn relay(&self) -> Option<u64> {
        match self {
            Header::Request { relay, .. }
            | Header::Accept { relay, .. }
            | Header::Refuse { relay, .. }
            | Header::Frames { relay, .. }
            | Header::Beat { relay, .. }
            | Header::Moved { relay }
            | Header::Ack { relay, .. }
            | Header::Detach { relay } => Some(*relay),
            Header::Cancel { .. } => None,
        }
    }
}

/// A relay message: the header as a JSON line, then `key frame` lines. Frames are compact
/// JSON, which holds no raw newline, so no escaping is needed.
fn encode(header: &Header, frames: &[(u64, Utf8Bytes)]) -> Vec<u8> {
    let body: usize = frames.iter().map(|(_, f)| f.len() + 22).sum();
    let mut out = Vec::with_capacity(128 + body);
    serde_json::to_writer(&mut out, header).expect("a header serialises");
    out.push(b'\n');
    let mut key = itoa::Buffer::new();
    for (k, frame) in frames {
        out.extend_from_slice(key.format(*k).as_bytes());
        out.push(b' ');
        out.extend_from_slice(frame.as_bytes());
        out.push(b'\n');
    }
    out
}

/// The message, or `None` for one this version cannot read.
fn decode(payload: &[u8]) -> Option<(Header, Vec<(u64, Utf8Bytes)>)> {
    let text = std::str::from_utf8(payload).ok()?;
    let mut lines = text.split_terminator('\n');
    let header = serde_json::from_str(lines.next()?).ok()?;
    let mut frames = Vec::new();
    for line in lines {
        let (key, frame) = line.split_once(' ')?;
        frames.push((key.parse().ok()?, Utf8Bytes::from(frame)));
    }
    Some((header, frames))
}

/// What a mirror's task receives.
type Inbound = (Header, Vec<(u64, Utf8Bytes)>);

/// The relays of one instance, both ways.
pub struct Handoff {
    cluster: Arc<Cluster>,
    /// Mirrors here, by relay id: where their owners' messages go.
    mirrors: DashMap<u64, mpsc::Sender<Inbound>>,
    /// Streams of this instance relayed to another, by relay id.
    consumers: DashMap<u64, Arc<Consumer>>,
    /// How often a quiet relay sends a heartbeat.
    beat: Duration,
}

/// The owner's side of one relay: what the mirror said last.
struct Consumer {
    stream: Arc<Stream>,
    /// Highest key the mirror's client wrote.
    acked: AtomicU64,
    /// The mirror ended.
    detached: AtomicBool,
    /// When the mirror was last heard from.
    heard: Mutex<Instant>,
    /// Wakes the consumer's task after an ack or a detach.
    notify: Notify,
}

impl Handoff {
    pub fn new(cluster: Arc<Cluster>) -> Handoff {
        let beat = (cluster.peer_silence() / 3).min(MAX_BEAT);
        Handoff {
            cluster,
            mirrors: DashMap::new(),
            consumers: DashMap::new(),
            beat,
        }
    }

    /// Handles one message from this instance's relay channel (on the subscriber's task:
    /// nothing here waits).
    pub fn on_message(gw: &Weak<Gateway>, payload: &[u8]) {
        let Some(gw) = gw.upgrade() else { return };
        let Some(handoff) = &gw.handoff else { return };
        let Some((header, frames)) = decode(payload) else {
            tracing::warn!("ignored a malformed relay message");
            return;
        };
        match header {
            Header::Request {
                relay,
                to,
                user,
                id,
                after,
                written,
            } => {
                let gw = gw.clone();
                let from = (after, written);
                tokio::spawn(async move { serve_request(&gw, relay, to, &user, &id, from).await });
            }
            Header::Ack {
                relay,
                through,
                cancel,
            } => {
                if let Some(c) = handoff.consumers.get(&relay) {
                    *c.heard.lock() = Instant::now();
                    c.acked.fetch_max(through, Ordering::Relaxed);
                    if cancel {
                        c.stream.cancel(CancelReason::Client);
                    }
                    c.notify.notify_one();
                }
            }
            Header::Detach { relay } => {
                if let Some(c) = handoff.consumers.get(&relay) {
                    c.detached.store(true, Ordering::Relaxed);
                    c.notify.notify_one();
                }
            }
            Header::Cancel { user, id } => {
                let stream = gw.hub.get(&Arc::from(user), &id);
                if let Some(stream) = stream.filter(|s| !s.is_mirror() && !s.is_finished()) {
                    stream.cancel(CancelReason::Client);
                }
            }
            header => {
                let Some(relay) = header.relay() else { return };
                let Some(mirror) = handoff.mirrors.get(&relay) else {
                    return;
                };
                gw.metrics
                    .cross_instance_frames_received(frames.len() as u64);
                if mirror.try_send((header, frames)).is_err() {
                    tracing::debug!(relay, "a mirror's queue is full: the message is dropped and will be asked for again");
                }
            }
        }
    }

    /// Resumes `user`'s stream `id`, which this instance does not have, from its owner: a
    /// mirror registered in the hub, fed from after `after`, ready to attach. `Err` is the
    /// `not_found` frame to answer.
    pub async fn resume(
        self: &Arc<Self>,
        gw: &Arc<Gateway>,
        user: &Arc<str>,
        id: &str,
        after: u64,
    ) -> Result<Arc<Stream>, Utf8Bytes> {
        let not_found = |message: &str| {
            let id = protocol::valid_stream_id(id).then_some(id);
            protocol::error(id, ErrorCode::NotFound, message, None)
        };
        let owner = match self.cluster.owner_of(user, id).await {
            Ok(Some(owner)) if owner != self.cluster.instance() => owner,
            _ => return Err(not_found(NO_SUCH_STREAM)),
        };
        let (tx, mut rx) = mpsc::channel(MIRROR_QUEUE);
        let mut link = Link {
            handoff: self.clone(),
            owner,
            relay: 0,
            user: user.clone(),
            id: id.to_string(),
            tx,
        };
        let model = link
            .request(&mut rx, after, after)
            .await
            .map_err(|e| not_found(e.message()))?;
        let mirror = Stream::mirror(
            id.to_string(),
            user.clone(),
            model,
            gw.config.session.stream_buffer_bytes,
            after,
        );
        if let Err(refusal) = gw.hub.adopt(&mirror) {
            link.send(Header::Detach { relay: link.relay }).await;
            return Err(protocol::error(
                Some(id),
                refusal.code,
                &refusal.message,
                None,
            ));
        }
        gw.metrics.cross_instance_relay();
        tracing::info!(stream = %id, owner = %link.owner, after, "relaying a stream from its owner");
        let task = relay_to_mirror(gw.clone(), link, rx, mirror.clone(), after);
        gw.stream_tasks.spawn(task);
        Ok(mirror)
    }

    /// Forwards a client's `cancel` of `user`'s stream `id` to the instance running it.
    /// `false`: no instance does (answer `not_found`).
    pub async fn cancel(&self, user: &str, id: &str) -> bool {
        let owner = match self.cluster.owner_of(user, id).await {
            Ok(Some(owner)) if owner != self.cluster.instance() => owner,
            _ => return false,
        };
        let message = encode(
            &Header::Cancel {
                user: user.to_string(),
                id: id.to_string(),
            },
            &[],
        );
        matches!(self.cluster.publish_relay(&owner, message).await, Ok(n) if n > 0)
    }
}

/// The owner's answer to a relay request: attach a remote consumer to the stream and relay it.
/// `from`: the keys through which the mirror has the frames, and its client wrote them.
async fn serve_request(
    gw: &Arc<Gateway>,
    relay: u64,
    to: String,
    user: &str,
    id: &str,
    from: (u64, u64),
) {
    let (after, written) = from;
    let Some(handoff) = &gw.handoff else { return };
    let cluster = &handoff.cluster;
    let refuse = |message: String| encode(&Header::Refuse { relay, message }, &[]);
    let stream = gw.hub.get(&Arc::from(user), id);
    let Some(stream) = stream.filter(|s| !s.is_mirror()) else {
        let _ = cluster
            .publish_relay(&to, refuse(NO_SUCH_STREAM.to_string()))
            .await;
        return;
    };
    let inbox = Inbox::new();
    if let Err(gap) = stream.attach_written(&inbox, after, written) {
        let message = format!(
            "stream `{id}` can no longer be replayed after seq {after}: the oldest kept is {}",
            gap.oldest_available
        );
        let _ = cluster.publish_relay(&to, refuse(message)).await;
        return;
    }
    let consumer = Arc::new(Consumer {
        stream: stream.clone(),
        acked: AtomicU64::new(written),
        detached: AtomicBool::new(false),
        heard: Mutex::new(Instant::now()),
        notify: Notify::new(),
    });
    handoff.consumers.insert(relay, consumer.clone());
    let accept = Header::Accept {
        relay,
        model: stream.model.clone(),
    };
    // Published before the consumer starts, on the same connection: it arrives first.
    let _ = cluster.publish_relay(&to, encode(&accept, &[])).await;
    tracing::info!(stream = %id, to = %to, after, "relaying a stream to another instance");
    gw.stream_tasks
        .spawn(relay_from_owner(gw.clone(), relay, to, inbox, consumer));
}

/// The remote consumer: pulls the stream's frames like a connection and publishes them to the
/// mirror; counts them written as the mirror acknowledges. Ends when the mirror has the
/// terminal frame, leaves (then the resume window runs here again), goes silent, or the
/// stream moves to another connection.
async fn relay_from_owner(
    gw: Arc<Gateway>,
    relay: u64,
    to: String,
    inbox: Arc<Inbox>,
    consumer: Arc<Consumer>,
) {
    let Some(handoff) = &gw.handoff else { return };
    let cluster = &handoff.cluster;
    let stream = &consumer.stream;
    let silence = cluster.peer_silence();
    let window = Duration::from_millis(gw.config.session.resume_window_ms);
    let mut beat = tokio::time::interval(handoff.beat);
    let mut ready = Vec::new();
    let mut frames = Vec::new();
    let mut n = 0u64;
    let mut acked = consumer.acked.load(Ordering::Relaxed);
    let mut terminal: Option<u64> = None;
    loop {
        tokio::select! {
            () = inbox.notify.notified() => {
                inbox.take_ready(&mut ready);
                ready.clear();
                let pulled = stream.pull_keyed(inbox.conn, &mut frames);
                if pulled == Pulled::NotMine {
                    let _ = cluster.publish_relay(&to, encode(&Header::Moved { relay }, &[])).await;
                    break;
                }
                if let Some((last, _)) = frames.last() {
                    n += 1;
                    let finished = pulled == Pulled::Finished;
                    if finished {
                        terminal = Some(*last);
                    }
                    let message = encode(&Header::Frames { relay, n, finished }, &frames);
                    gw.metrics.cross_instance_frames_sent(frames.len() as u64);
                    frames.clear();
                    // A message lost here is a gap the mirror sees and asks for again.
                    let _ = cluster.publish_relay(&to, message).await;
                }
            }
            () = consumer.notify.notified() => {}
            _ = beat.tick() => {
                let _ = cluster.publish_relay(&to, encode(&Header::Beat { relay, n }, &[])).await;
            }
            () = gw.closing.cancelled() => break,
        }
        let through = consumer.acked.load(Ordering::Relaxed);
        if through > acked {
            acked = through;
            stream.written(inbox.conn, through);
        }
        if terminal.is_some_and(|t| acked >= t) {
            break;
        }
        let silent = consumer.heard.lock().elapsed() > silence;
        if consumer.detached.load(Ordering::Relaxed) || silent {
            if silent {
                tracing::warn!(stream = %stream.id, to = %to, "the instance relaying this stream went silent: detached");
            }
            if let Some(epoch) = stream.detach(inbox.conn) {
                stream.expire_unless_resumed(epoch, window);
            }
            break;
        }
    }
    handoff.consumers.remove(&relay);
}

/// Why a relay request got no relay.
enum Unanswered {
    /// The owner said no (the stream is gone, or the frames asked for were trimmed).
    Refused(String),
    /// No answer: the owner is gone, or Redis or its subscription is down for now.
    NoAnswer(String),
}

impl Unanswered {
    fn message(&self) -> &str {
        match self {
            Unanswered::Refused(m) | Unanswered::NoAnswer(m) => m,
        }
    }
}

/// The mirror's link to its owner: the relay in use and how to reach it.
struct Link {
    handoff: Arc<Handoff>,
    owner: String,
    /// The current relay id; a new one after each request, so a late message of an earlier
    /// relay is told apart.
    relay: u64,
    user: Arc<str>,
    id: String,
    tx: mpsc::Sender<Inbound>,
}

impl Link {
    async fn send(&self, header: Header) -> bool {
        let message = encode(&header, &[]);
        matches!(self.handoff.cluster.publish_relay(&self.owner, message).await, Ok(n) if n > 0)
    }

    /// Asks the owner to relay the stream from after `after` (the client here wrote through
    /// `written`) under a new relay id; the stream's model once it accepts, else why not.
    async fn request(
        &mut self,
        rx: &mut mpsc::Receiver<Inbound>,
        after: u64,
        written: u64,
    ) -> Result<String, Unanswered> {
        self.handoff.mirrors.remove(&self.relay);
        self.relay = rand::random::<u64>() | 1;
        self.handoff.mirrors.insert(self.relay, self.tx.clone());
        let request = Header::Request {
            relay: self.relay,
            to: self.handoff.cluster.instance().to_string(),
            user: self.user.to_string(),
            id: self.id.clone(),
            after,
            written,
        };
        if !self.send(request).await {
            return Err(Unanswered::NoAnswer(format!(
                "{NO_SUCH_STREAM}; the instance running it does not answer"
            )));
        }
        let deadline = Instant::now() + ANSWER_WAIT;
        loop {
            let message = tokio::time::timeout_at(deadline, rx.recv()).await;
            match message {
                Ok(Some((Header::Accept { relay, model }, _))) if relay == self.relay => {
                    return Ok(model)
                }
                Ok(Some((Header::Refuse { relay, message }, _))) if relay == self.relay => {
                    return Err(Unanswered::Refused(message))
                }
                Ok(Some(_)) => continue,
                Ok(None) | Err(_) => {
                    return Err(Unanswered::NoAnswer(format!(
                        "{NO_SUCH_STREAM}; the instance running it did not answer within {} ms",
                        ANSWER_WAIT.as_millis()
                    )))
                }
            }
        }
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        self.handoff.mirrors.remove(&self.relay);
    }
}

/// Feeds `mirror` the owner's frames until the stream ends there, the client here leaves
/// (the stream is handed back), or the owner stops answering (the stream ends with an error
/// frame: its text past the last key relayed is lost with the owner).
async fn relay_to_mirror(
    gw: Arc<Gateway>,
    mut link: Link,
    mut rx: mpsc::Receiver<Inbound>,
    mirror: Arc<Stream>,
    after: u64,
) {
    let silence = link.handoff.cluster.peer_silence();
    let mut beat = tokio::time::interval(link.handoff.beat);
    let mut heard = Instant::now();
    let mut last_n = 0u64;
    let mut last_key = after;
    let mut acked = after;
    let mut cancelling = false;
    let end = 'relay: loop {
        tokio::select! {
            message = rx.recv() => {
                // The link holds a sender: the queue never closes while this runs.
                let Some((header, frames)) = message else { break End::Failed("relay queue closed".into()) };
                if header.relay() != Some(link.relay) {
                    continue;
                }
                heard = Instant::now();
                let gap = match header {
                    Header::Frames { n, finished, .. } if n == last_n + 1 => {
                        last_n = n;
                        let count = frames.len();
                        for (i, (key, frame)) in frames.into_iter().enumerate() {
                            if key <= last_key {
                                continue;
                            }
                            last_key = key;
                            if finished && i + 1 == count {
                                mirror.finish(key, frame);
                            } else {
                                mirror.push_relayed(key, frame);
                            }
                        }
                        if finished {
                            break End::Finished;
                        }
                        false
                    }
                    Header::Frames { .. } => true,
                    Header::Beat { n, .. } => n != last_n,
                    Header::Moved { .. } => break End::Moved,
                    Header::Refuse { message, .. } => break End::Failed(message),
                    _ => false,
                };
                if gap {
                    gw.metrics.cross_instance_rerequest();
                    tracing::info!(stream = %mirror.id, after = last_key, "relay messages were lost: asking the owner again");
                    // Redis may be coming back, or the owner resubscribing: asked again each
                    // heartbeat while the owner has not been silent for too long.
                    loop {
                        match link.request(&mut rx, last_key, acked).await {
                            Ok(_) => {
                                last_n = 0;
                                heard = Instant::now();
                                break;
                            }
                            Err(Unanswered::NoAnswer(message)) if heard.elapsed() > silence => {
                                break 'relay End::Failed(message)
                            }
                            Err(Unanswered::NoAnswer(_)) => tokio::time::sleep(link.handoff.beat).await,
                            Err(Unanswered::Refused(message)) => break 'relay End::Failed(message),
                        }
                    }
                }
            }
            () = mirror.mirror_written() => {
                let through = mirror.written_through();
                if through > acked {
                    acked = through;
                    link.send(Header::Ack { relay: link.relay, through, cancel: cancelling }).await;
                }
            }
            () = mirror.cancelled().cancelled(), if !cancelling => {
                if mirror.cancel_reason() == Some(CancelReason::Client) {
                    cancelling = true;
                    link.send(Header::Ack { relay: link.relay, through: acked, cancel: true }).await;
                } else {
                    break End::HandedBack;
                }
            }
            _ = beat.tick() => {
                if heard.elapsed() > silence {
                    break End::Failed(format!("the instance running this stream has not answered for {} ms", silence.as_millis()));
                }
                link.send(Header::Ack { relay: link.relay, through: acked, cancel: cancelling }).await;
            }
        }
    };
    let linger = Duration::from_millis(gw.config.session.resume_window_ms);
    let retain = gw.config.session.retained_bytes_per_user;
    match end {
        End::Finished => {
            gw.hub.finished(&mirror, linger, retain);
            link.send(Header::Detach { relay: link.relay }).await;
        }
        End::HandedBack => {
            gw.hub.abandon(&mirror);
            link.send(Header::Detach { relay: link.relay }).await;
        }
        End::Moved => {
            mirror.release();
            gw.hub.abandon(&mirror);
        }
        End::Failed(why) => {
            tracing::warn!(stream = %mirror.id, owner = %link.owner, %why, "relay failed: the stream ends here");
            let message = format!("the stream was running on another gateway instance and its relay failed after seq {last_key}: {why}");
            mirror.finish(
                last_key + 1,
                protocol::error(Some(&mirror.id), ErrorCode::Internal, &message, None),
            );
            gw.hub.finished(&mirror, linger, retain);
            link.send(Header::Detach { relay: link.relay }).await;
        }
    }
}

/// How a mirror's relay ended.
enum End {
    /// The terminal frame is in the mirror.
    Finished,
    /// The client here left: the owner's resume window runs again.
    HandedBack,
    /// Another connection resumed the stream.
    Moved,
    /// The owner is gone or refused a request again; why.
    Failed(String),
}
