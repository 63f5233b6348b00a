//! One logical stream's frames, and the hand-off between the stream's task and the connection
//! that carries it.
//!
//! The stream's task appends frames to a bounded replay log; the connection *pulls* them. A
//! connection never gets a pushed queue that could grow: it gets at most one wake-up per
//! stream (the stream's place in its [`Inbox`]), then copies out every frame it has not
//! written yet. That one log serves three needs at once: ordering (replay and live frames
//! come from the same place), resume (a new connection starts pulling after the client's
//! `after`), and backpressure (when unwritten frames fill the log, the task stops reading
//! its upstream until the client catches up).

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use axum::extract::ws::Utf8Bytes;
use futures_util::task::AtomicWaker;
use parking_lot::Mutex;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::protocol;

/// Why a stream's task was told to stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CancelReason {
    /// The client sent `cancel`.
    Client,
    /// Its connection dropped and nobody resumed it within the resume window.
    ResumeExpired,
    /// The gateway is shutting down and the drain timeout ran out.
    Shutdown,
}

/// A logical stream, shared by its task, the registry and the connection that carries it.
pub struct Stream {
    pub id: String,
    pub user: Arc<str>,
    pub model: String,
    /// Cap on the replay log in bytes (`session.stream_buffer_bytes`).
    buffer_cap: usize,
    state: Mutex<State>,
    /// Wakes the task when the connection has written frames and the log has room again.
    space: Notify,
    /// Stops the task; the reason is set first.
    cancel: CancellationToken,
    cancel_reason: Mutex<Option<CancelReason>>,
    /// Set by [`Stream::cancel`] before the token fires: what the relay reads per chunk. The
    /// token's own check takes its mutex, and its future a second lock to re-register.
    cancel_flag: AtomicBool,
    /// The relay's waker while it waits for its upstream (see [`Stream::poll_cancelled`]).
    cancel_waker: AtomicWaker,
    /// Set on a mirror (cluster mode: a stream whose upstream call runs on another instance,
    /// relayed here for a client that resumed it here): woken at every completed write, so the
    /// relay can tell the owner how far the client has read.
    mirror: Option<Notify>,
}

struct State {
    /// Frames with a replay key: `delta` and `done` by their `seq`, a terminal `error` by the
    /// key after the last `seq`. Oldest first.
    log: VecDeque<Entry>,
    /// Bytes of frames in `log`.
    bytes: usize,
    /// Highest key dropped from the front of `log`; a resume from before it has a gap.
    trimmed_through: u64,
    /// Highest key copied out to the attached connection (maybe still in its socket write).
    pulled: u64,
    /// Highest key whose socket write to the attached connection completed. Only frames up to
    /// here may be trimmed: a frame pulled by a write that then times out is still unwritten.
    written: u64,
    /// Latest queue position not yet written (`queued` frames replace each other).
    queued: Option<usize>,
    /// The `start` frame, until written. Not replayed to a later connection.
    start: Option<Utf8Bytes>,
    /// The connection pulling this stream's frames, if any.
    attached: Option<Attachment>,
    /// A terminal frame (`done` or `error`) is in the log.
    finished: bool,
    /// Bumped at every detach, so a resume-window timer knows whether it is stale.
    detach_epoch: u64,
}

struct Entry {
    key: u64,
    frame: Utf8Bytes,
}

struct Attachment {
    inbox: Arc<Inbox>,
    /// The stream already has a place in `inbox.ready`; no second wake-up is needed.
    scheduled: bool,
}

/// What a connection found when it pulled a stream.
#[derive(Debug, PartialEq, Eq)]
pub enum Pulled {
    /// The stream is attached to another connection now.
    NotMine,
    /// Frames were copied out (maybe none); more will come.
    Open,
    /// The terminal frame has been copied out: the stream is over for this connection.
    Finished,
}

/// A resume asked for frames that were already dropped from the log.
#[derive(Debug, PartialEq, Eq)]
pub struct ReplayGap {
    pub oldest_available: u64,
}

impl Stream {
    pub fn new(id: String, user: Arc<str>, model: String, buffer_cap: usize) -> Arc<Self> {
        Stream::build(id, user, model, buffer_cap, None, 0)
    }

    fn build(
        id: String,
        user: Arc<str>,
        model: String,
        buffer_cap: usize,
        mirror: Option<Notify>,
        trimmed_through: u64,
    ) -> Arc<Self> {
        Arc::new(Stream {
            id,
            user,
            model,
            buffer_cap,
            state: Mutex::new(State {
                log: VecDeque::new(),
                bytes: 0,
                trimmed_through,
                pulled: 0,
                written: 0,
                queued: None,
                start: None,
                attached: None,
                finished: false,
                detach_epoch: 0,
            }),
            space: Notify::new(),
            cancel: CancellationToken::new(),
            cancel_reason: Mutex::new(None),
            cancel_flag: AtomicBool::new(false),
            cancel_waker: AtomicWaker::new(),
            mirror,
        })
    }

    /// A mirror of a stream another instance runs, whose frames will be pushed here from key
    /// `after + 1` on: a resume from before `after` has a gap, as if the log were trimmed there.
    pub fn mirror(
        id: String,
        user: Arc<str>,
        model: String,
        buffer_cap: usize,
        after: u64,
    ) -> Arc<Self> {
        Stream::build(id, user, model, buffer_cap, Some(Notify::new()), after)
    }

    /// Whether this is a mirror of a stream another instance runs.
    pub fn is_mirror(&self) -> bool {
        self.mirror.is_some()
    }

    /// A mirror: waits until a write to its connection completed since the last call.
    pub async fn mirror_written(&self) {
        match &self.mirror {
            Some(progress) => progress.notified().await,
            None => std::future::pending().await,
        }
    }

    /// A mirror whose client left (or whose instance shuts down): its relay is handing the
    /// stream back to its owner, and a resume must ask the owner again.
    pub fn is_handed_back(&self) -> bool {
        self.is_mirror()
            && !self.is_finished()
            && matches!(
                self.cancel_reason(),
                Some(CancelReason::ResumeExpired | CancelReason::Shutdown)
            )
    }

    /// Highest key written to the attached connection (or to the last one, once detached).
    pub fn written_through(&self) -> u64 {
        self.state.lock().written
    }

    /// Detaches the stream from whatever connection carries it (its client resumed it
    /// elsewhere). That connection stops getting its frames, as after a local resume.
    pub fn release(&self) {
        let mut st = self.state.lock();
        st.attached = None;
        st.start = None;
        st.queued = None;
        st.detach_epoch += 1;
    }

    /// Appends a replayable frame, waiting while the log is full of unwritten frames.
    /// Returns `false` if the stream was cancelled meanwhile (the frame is then dropped).
    pub async fn push(self: &Arc<Self>, key: u64, frame: Utf8Bytes) -> bool {
        let mut frame = Some(frame);
        // The common case, room in the log, registers no waiter.
        if let Some(wake) = self.try_append(key, &mut frame) {
            self.wake(wake);
            return true;
        }
        loop {
            let space = self.space.notified();
            tokio::pin!(space);
            space.as_mut().enable();
            // Checked again after registering, so a pull in between cannot be missed.
            if let Some(wake) = self.try_append(key, &mut frame) {
                self.wake(wake);
                return true;
            }
            tokio::select! {
                _ = &mut space => {}
                _ = self.cancel.cancelled() => return false,
            }
        }
    }

    /// Appends `frame` if the log has room; `Some(inbox to wake, if any)` when it did.
    fn try_append(&self, key: u64, frame: &mut Option<Utf8Bytes>) -> Option<Option<Arc<Inbox>>> {
        let mut st = self.state.lock();
        st.trim(self.buffer_cap);
        if st.bytes >= self.buffer_cap && !st.log.is_empty() {
            return None;
        }
        if let Some(frame) = frame.take() {
            st.append(key, frame);
        }
        Some(st.schedule())
    }

    fn wake(self: &Arc<Self>, inbox: Option<Arc<Inbox>>) {
        if let Some(inbox) = inbox {
            inbox.wake(self);
        }
    }

    /// A mirror's frame, appended without waiting for room: its owner sends no more than its
    /// own log holds unwritten (it lets frames go only once the client here wrote them), so
    /// that log's bound is this one's too; a relay blocked here could not hear its owner.
    pub fn push_relayed(self: &Arc<Self>, key: u64, frame: Utf8Bytes) {
        let wake = {
            let mut st = self.state.lock();
            st.trim(self.buffer_cap);
            st.append(key, frame);
            st.schedule()
        };
        self.wake(wake);
    }

    /// Appends the stream's last frame (`done` or `error`), without waiting for room: a stream
    /// must always be able to end.
    pub fn finish(self: &Arc<Self>, key: u64, frame: Utf8Bytes) {
        let wake = {
            let mut st = self.state.lock();
            st.append(key, frame);
            st.finished = true;
            st.schedule()
        };
        self.wake(wake);
    }

    /// Sets the `start` frame, written once to the connection attached at that moment.
    pub fn set_start(self: &Arc<Self>, frame: Utf8Bytes) {
        let wake = {
            let mut st = self.state.lock();
            st.start = Some(frame);
            st.schedule()
        };
        self.wake(wake);
    }

    /// Sets the latest queue position; a position not yet written is replaced.
    pub fn set_queued(self: &Arc<Self>, position: usize) {
        let wake = {
            let mut st = self.state.lock();
            st.queued = Some(position);
            st.schedule()
        };
        self.wake(wake);
    }

    /// Attaches the stream to a connection, which will next pull every frame after `after`.
    pub fn attach(self: &Arc<Self>, inbox: &Arc<Inbox>, after: u64) -> Result<(), ReplayGap> {
        self.attach_written(inbox, after, after)
    }

    /// [`Stream::attach`] for a relay to another instance that already has the frames through
    /// `after` but whose client wrote only those through `written`: the frames in between
    /// stay in the log (unwritten) until the relay acknowledges them.
    pub fn attach_written(
        self: &Arc<Self>,
        inbox: &Arc<Inbox>,
        after: u64,
        written: u64,
    ) -> Result<(), ReplayGap> {
        let wake = {
            let mut st = self.state.lock();
            if after < st.trimmed_through {
                return Err(ReplayGap {
                    oldest_available: st.trimmed_through + 1,
                });
            }
            // A mirror's log starts empty after the key it was resumed from.
            let last = st.log.back().map_or(st.trimmed_through, |e| e.key);
            st.pulled = after.min(last);
            st.written = written.min(st.pulled).max(st.trimmed_through);
            st.attached = Some(Attachment {
                inbox: inbox.clone(),
                scheduled: false,
            });
            st.schedule()
        };
        // Never under the stream's lock: no code path holds both locks at once.
        inbox.attached.lock().insert(self.id.clone(), self.clone());
        self.wake(wake);
        Ok(())
    }

    /// Detaches the stream from the connection `conn`, if it is attached there. Returns the
    /// detach epoch when the stream is still running (so its resume window starts now).
    pub fn detach(&self, conn: u64) -> Option<u64> {
        let mut st = self.state.lock();
        match &st.attached {
            Some(a) if a.inbox.conn == conn => {}
            _ => return None,
        }
        st.attached = None;
        st.start = None;
        st.queued = None;
        st.detach_epoch += 1;
        (!st.finished).then_some(st.detach_epoch)
    }

    /// Whether connection `conn` is the one pulling this stream's frames.
    pub fn is_attached_to(&self, conn: u64) -> bool {
        self.state
            .lock()
            .attached
            .as_ref()
            .is_some_and(|a| a.inbox.conn == conn)
    }

    /// Starts the resume window of a detach that returned `epoch`: the stream is cancelled
    /// unless a connection (here or on another instance) resumes it within `window`.
    pub fn expire_unless_resumed(self: &Arc<Self>, epoch: u64, window: std::time::Duration) {
        let stream = self.clone();
        tokio::spawn(async move {
            tokio::time::sleep(window).await;
            if stream.detached_since(epoch) {
                stream.cancel(CancelReason::ResumeExpired);
            }
        });
    }

    /// Whether the stream is still detached since the detach that returned `epoch`.
    pub fn detached_since(&self, epoch: u64) -> bool {
        let st = self.state.lock();
        st.attached.is_none() && st.detach_epoch == epoch && !st.finished
    }

    /// Copies every frame not yet pulled by connection `conn` into `out`. The frames count as
    /// written only once the connection reports its write done with [`Stream::written`], with
    /// the key returned here.
    pub fn pull(&self, conn: u64, out: &mut Vec<Utf8Bytes>) -> (Pulled, u64) {
        let mut st = self.state.lock();
        match &mut st.attached {
            Some(a) if a.inbox.conn == conn => a.scheduled = false,
            _ => return (Pulled::NotMine, 0),
        }
        if let Some(position) = st.queued.take() {
            out.push(protocol::queued(&self.id, position));
        }
        if let Some(start) = st.start.take() {
            out.push(start);
        }
        let pulled = st.pulled;
        let from = st.log.partition_point(|e| e.key <= pulled);
        for entry in st.log.range(from..) {
            out.push(entry.frame.clone());
        }
        if let Some(last) = st.log.back() {
            st.pulled = last.key;
        }
        let through = st.pulled;
        if st.finished {
            (Pulled::Finished, through)
        } else {
            (Pulled::Open, through)
        }
    }

    /// Records that connection `conn` finished writing every frame up to `through` (a key
    /// [`Stream::pull`] returned), so they may be trimmed and the task may go on. A report
    /// from a connection the stream has since left is ignored.
    pub fn written(&self, conn: u64, through: u64) {
        let mut st = self.state.lock();
        match &st.attached {
            Some(a) if a.inbox.conn == conn => {}
            _ => return,
        }
        if through <= st.written {
            return;
        }
        st.written = through.min(st.pulled);
        drop(st);
        self.space.notify_one();
        if let Some(progress) = &self.mirror {
            progress.notify_one();
        }
    }

    /// Like [`Stream::pull`], for a relay to another instance: only the replayable frames (no
    /// `queued`, no `start`: a resumed stream gets neither), each with its key.
    pub fn pull_keyed(&self, conn: u64, out: &mut Vec<(u64, Utf8Bytes)>) -> Pulled {
        let mut st = self.state.lock();
        match &mut st.attached {
            Some(a) if a.inbox.conn == conn => a.scheduled = false,
            _ => return Pulled::NotMine,
        }
        st.queued = None;
        st.start = None;
        let pulled = st.pulled;
        let from = st.log.partition_point(|e| e.key <= pulled);
        out.extend(st.log.range(from..).map(|e| (e.key, e.frame.clone())));
        if let Some(last) = st.log.back() {
            st.pulled = st.pulled.max(last.key);
        }
        if st.finished {
            Pulled::Finished
        } else {
            Pulled::Open
        }
    }

    /// Tells the task to stop. The first reason given wins.
    pub fn cancel(&self, reason: CancelReason) {
        self.cancel_reason.lock().get_or_insert(reason);
        self.cancel_flag.store(true, Ordering::Release);
        self.cancel.cancel();
        self.cancel_waker.wake();
    }

    /// Whether [`Stream::cancel`] was called: one atomic load, for the relay's per-chunk check.
    pub fn is_cancelled(&self) -> bool {
        self.cancel_flag.load(Ordering::Acquire)
    }

    /// Ready once the stream is cancelled; else wakes `cx` when it is. For the one task that
    /// relays the stream (a single waker slot): cheaper per poll than the token's future.
    pub fn poll_cancelled(&self, cx: &mut std::task::Context<'_>) -> std::task::Poll<()> {
        // Registered before the check: a cancel in between finds the waker.
        self.cancel_waker.register(cx.waker());
        if self.is_cancelled() {
            std::task::Poll::Ready(())
        } else {
            std::task::Poll::Pending
        }
    }

    pub fn cancel_reason(&self) -> Option<CancelReason> {
        *self.cancel_reason.lock()
    }

    pub fn cancelled(&self) -> &CancellationToken {
        &self.cancel
    }

    pub fn is_finished(&self) -> bool {
        self.state.lock().finished
    }

    /// Bytes held in the replay log (for the admin view and tests).
    pub fn buffered_bytes(&self) -> usize {
        self.state.lock().bytes
    }
}

impl State {
    fn append(&mut self, key: u64, frame: Utf8Bytes) {
        self.bytes += frame.len();
        self.log.push_back(Entry { key, frame });
    }

    /// Drops written frames from the front while the log is over `cap`.
    fn trim(&mut self, cap: usize) {
        while self.bytes >= cap {
            match self.log.front() {
                Some(e) if e.key <= self.written => {
                    self.trimmed_through = e.key;
                    self.bytes -= e.frame.len();
                    self.log.pop_front();
                }
                _ => break,
            }
        }
    }

    /// Marks the stream as needing a pull; returns the inbox to wake if it was not already.
    fn schedule(&mut self) -> Option<Arc<Inbox>> {
        let a = self.attached.as_mut()?;
        if a.scheduled {
            return None;
        }
        a.scheduled = true;
        Some(a.inbox.clone())
    }
}

/// A connection's side of the hand-off: which of its streams have frames to write.
pub struct Inbox {
    /// Process-unique connection number.
    pub conn: u64,
    /// Streams with frames to pull. Each stream is in here at most once per attachment, so its
    /// length is bounded by the streams attached.
    ready: Mutex<Vec<Arc<Stream>>>,
    /// Wakes the connection's writer.
    pub notify: Notify,
    /// Streams this connection carries, by id.
    pub attached: Mutex<HashMap<String, Arc<Stream>>>,
}

static NEXT_CONN: AtomicU64 = AtomicU64::new(1);

impl Inbox {
    pub fn new() -> Arc<Self> {
        Arc::new(Inbox {
            conn: NEXT_CONN.fetch_add(1, Ordering::Relaxed),
            ready: Mutex::new(Vec::new()),
            notify: Notify::new(),
            attached: Mutex::new(HashMap::new()),
        })
    }

    fn wake(&self, stream: &Arc<Stream>) {
        self.ready.lock().push(stream.clone());
        self.notify.notify_one();
    }

    /// Moves the ready streams into `into` (which should be empty), keeping both allocations.
    pub fn take_ready(&self, into: &mut Vec<Arc<Stream>>) {
        std::mem::swap(&mut *self.ready.lock(), into);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The `seq` of each frame.
    fn seqs(frames: &[Utf8Bytes]) -> Vec<u64> {
        frames
            .iter()
            .map(|f| {
                serde_json::from_str::<serde_json::Value>(f.as_str()).expect("json")["seq"]
                    .as_u64()
                    .expect("seq")
            })
            .collect()
    }

    fn frames(out: &[Utf8Bytes]) -> Vec<String> {
        out.iter().map(|f| f.as_str().to_string()).collect()
    }

    #[tokio::test]
    async fn pull_copies_each_frame_once_in_order() {
        let s = Stream::new("s1".into(), "u".into(), "m".into(), 1 << 20);
        let inbox = Inbox::new();
        s.attach(&inbox, 0).expect("attach");
        s.set_start(protocol::start("s1", "m"));
        assert!(s.push(1, protocol::delta("s1", 1, "a")).await);
        assert!(s.push(2, protocol::delta("s1", 2, "b")).await);
        let mut ready = Vec::new();
        inbox.take_ready(&mut ready);
        assert_eq!(ready.len(), 1, "one wake-up for many frames");
        let mut out = Vec::new();
        assert_eq!(s.pull(inbox.conn, &mut out), (Pulled::Open, 2));
        assert_eq!(out.len(), 3);
        assert!(out[0].as_str().contains("\"start\""));
        out.clear();
        assert_eq!(s.pull(inbox.conn, &mut out).0, Pulled::Open);
        assert!(out.is_empty(), "nothing twice");
        s.finish(
            3,
            protocol::done(&protocol::Done {
                id: "s1",
                seq: 3,
                finish_reason: "stop",
                ..Default::default()
            }),
        );
        assert_eq!(s.pull(inbox.conn, &mut out), (Pulled::Finished, 3));
        assert_eq!(frames(&out).len(), 1);
    }

    #[tokio::test]
    async fn resume_replays_after_and_other_connection_is_not_mine() {
        let s = Stream::new("s1".into(), "u".into(), "m".into(), 1 << 20);
        let first = Inbox::new();
        s.attach(&first, 0).expect("attach");
        for seq in 1..=5 {
            assert!(s.push(seq, protocol::delta("s1", seq, "x")).await);
        }
        let mut out = Vec::new();
        s.pull(first.conn, &mut out);
        assert_eq!(out.len(), 5);
        assert!(s.detach(first.conn).is_some());
        let second = Inbox::new();
        s.attach(&second, 3).expect("resume");
        out.clear();
        assert_eq!(s.pull(first.conn, &mut out).0, Pulled::NotMine);
        s.pull(second.conn, &mut out);
        assert_eq!(seqs(&out), vec![4, 5]);
        assert_eq!(
            s.detach(first.conn),
            None,
            "a stale connection cannot detach it"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn full_log_blocks_the_producer_until_written() {
        let frame = protocol::delta("s", 1, &"x".repeat(100));
        let cap = frame.len() * 4;
        let s = Stream::new("s".into(), "u".into(), "m".into(), cap);
        let inbox = Inbox::new();
        s.attach(&inbox, 0).expect("attach");
        for seq in 1..=4 {
            assert!(
                s.push(seq, protocol::delta("s", seq, &"x".repeat(100)))
                    .await
            );
        }
        let producer = {
            let s = s.clone();
            tokio::spawn(async move { s.push(5, protocol::delta("s", 5, &"x".repeat(100))).await })
        };
        tokio::time::sleep(std::time::Duration::from_secs(5)).await;
        assert!(
            !producer.is_finished(),
            "producer waits while nothing is written"
        );
        assert_eq!(s.buffered_bytes(), cap);
        let mut out = Vec::new();
        let (_, through) = s.pull(inbox.conn, &mut out);
        tokio::time::sleep(std::time::Duration::from_secs(5)).await;
        assert!(
            !producer.is_finished(),
            "pulled frames whose write has not completed make no room"
        );
        s.written(inbox.conn, through);
        assert!(producer.await.expect("join"), "written frames make room");
        // written frames were trimmed: a resume from before them reports the gap
        assert!(s.detach(inbox.conn).is_some());
        let again = Inbox::new();
        assert_eq!(
            s.attach(&again, 0),
            Err(ReplayGap {
                oldest_available: 2
            })
        );
        s.attach(&again, 1).expect("no gap after 1");
    }

    /// The slow-consumer case: a write that times out leaves its frames unwritten, so they are
    /// kept for the resume however full the log gets.
    #[tokio::test(start_paused = true)]
    async fn frames_of_a_failed_write_survive_for_the_resume() {
        let frame = protocol::delta("s", 1, &"x".repeat(100));
        let cap = frame.len() * 2;
        let s = Stream::new("s".into(), "u".into(), "m".into(), cap);
        let first = Inbox::new();
        s.attach(&first, 0).expect("attach");
        let mut out = Vec::new();
        for seq in 1..=2 {
            assert!(
                s.push(seq, protocol::delta("s", seq, &"x".repeat(100)))
                    .await
            );
        }
        let (_, through) = s.pull(first.conn, &mut out);
        s.written(first.conn, through);
        for seq in 3..=4 {
            assert!(
                s.push(seq, protocol::delta("s", seq, &"x".repeat(100)))
                    .await
            );
        }
        // Pulled, then the write fails: never reported written.
        s.pull(first.conn, &mut out);
        let producer = {
            let s = s.clone();
            tokio::spawn(async move { s.push(5, protocol::delta("s", 5, "y")).await })
        };
        tokio::time::sleep(std::time::Duration::from_secs(5)).await;
        assert!(!producer.is_finished(), "3 and 4 are not written yet");
        assert!(s.detach(first.conn).is_some());
        let second = Inbox::new();
        s.attach(&second, 2).expect("3 and 4 were kept");
        out.clear();
        let (_, through) = s.pull(second.conn, &mut out);
        assert_eq!(out.len(), 2);
        // A late report from the dead connection changes nothing.
        s.written(first.conn, 99);
        s.written(second.conn, through);
        assert!(producer.await.expect("join"));
    }

    /// Property: under any interleaving of appends, pulls, completed and failed writes,
    /// reconnects and trims, a resume from the last frame the client has seen never finds a
    /// gap, and replays exactly the frames after it. A seeded loop rather than `proptest`: the
    /// model is a few lines and needs no shrinking to read a failure (the seed and step are in
    /// the message).
    #[tokio::test]
    async fn the_log_never_loses_an_unwritten_frame() {
        use rand::{Rng, SeedableRng};
        for seed in 0..300u64 {
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
            let size = protocol::delta("s", 1, "xxxx").len();
            let cap = size * rng.gen_range(1..6);
            let s = Stream::new("s".into(), "u".into(), "m".into(), cap);
            let mut inbox = Inbox::new();
            s.attach(&inbox, 0).expect("attach");
            // What the client has received, in order: a write that completed delivered its
            // frames; a failed write delivered an arbitrary prefix of them.
            let mut seen = 0u64;
            let mut next = 1u64;
            let mut in_flight: Vec<u64> = Vec::new();
            let mut through = 0;
            for step in 0..200 {
                let ctx = format!("seed {seed} step {step}");
                match rng.gen_range(0..10) {
                    0..=3 => {
                        let mut frame = Some(protocol::delta("s", next, "xxxx"));
                        if s.try_append(next, &mut frame).is_some() {
                            next += 1;
                        }
                    }
                    4..=5 => {
                        let mut out = Vec::new();
                        let (_, t) = s.pull(inbox.conn, &mut out);
                        through = t;
                        in_flight.extend(seqs(&out));
                    }
                    6..=7 => {
                        // The write completes.
                        for seq in in_flight.drain(..) {
                            assert_eq!(seq, seen + 1, "{ctx}: delivered in order");
                            seen = seq;
                        }
                        s.written(inbox.conn, through);
                    }
                    _ => {
                        // The write times out having delivered some prefix; the client
                        // reconnects and resumes after what it saw.
                        let delivered = rng.gen_range(0..=in_flight.len());
                        for seq in in_flight.drain(..).take(delivered) {
                            assert_eq!(seq, seen + 1, "{ctx}: delivered in order");
                            seen = seq;
                        }
                        s.detach(inbox.conn);
                        inbox = Inbox::new();
                        if let Err(gap) = s.attach(&inbox, seen) {
                            panic!("{ctx}: resume after {seen} found a gap: {gap:?}");
                        }
                        through = seen;
                    }
                }
            }
            // A last reconnect: everything after `seen` comes next, in order, once.
            s.detach(inbox.conn);
            let last = Inbox::new();
            if let Err(gap) = s.attach(&last, seen) {
                panic!("seed {seed}: final resume after {seen} found a gap: {gap:?}");
            }
            let mut out = Vec::new();
            s.pull(last.conn, &mut out);
            let replay = seqs(&out);
            let want: Vec<u64> = (seen + 1..next).collect();
            assert_eq!(replay, want, "seed {seed}: the rest, in order, once");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn cancel_wakes_the_relay_waiting_on_its_flag() {
        let s = Stream::new("s".into(), "u".into(), "m".into(), 1024);
        assert!(!s.is_cancelled());
        let waiting = {
            let s = s.clone();
            tokio::spawn(async move { std::future::poll_fn(|cx| s.poll_cancelled(cx)).await })
        };
        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
        assert!(!waiting.is_finished(), "not cancelled yet");
        s.cancel(CancelReason::Client);
        assert!(s.is_cancelled());
        tokio::time::timeout(std::time::Duration::from_secs(1), waiting)
            .await
            .expect("woken by the cancel")
            .expect("join");
    }

    #[tokio::test(start_paused = true)]
    async fn cancel_releases_a_blocked_producer() {
        let s = Stream::new("s".into(), "u".into(), "m".into(), 1024);
        assert!(s.push(1, protocol::delta("s", 1, &"x".repeat(2000))).await);
        let producer = {
            let s = s.clone();
            tokio::spawn(async move { s.push(2, protocol::delta("s", 2, "y")).await })
        };
        tokio::task::yield_now().await;
        s.cancel(CancelReason::Client);
        s.cancel(CancelReason::Shutdown);
        assert!(!producer.await.expect("join"));
        assert_eq!(s.cancel_reason(), Some(CancelReason::Client));
    }
}
