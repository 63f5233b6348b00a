//! The registry of every stream and connection in the process, by user.
//!
//! A stream outlives its connection (for resume), so streams are registered here under
//! `(user, id)` rather than owned by a connection. Finished streams stay for the resume
//! window too: the connection that carried the last frames may have died before the client
//! read them. Their logs count against a per-user byte budget
//! (`session.retained_bytes_per_user`): past it, the user's oldest finished streams are
//! forgotten early, so finished streams cannot pin memory beyond it. A user with no connection,
//! no live stream and no lingering stream is forgotten too.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use dashmap::mapref::entry::Entry;
use dashmap::DashMap;
use serde::Serialize;

use tokio_util::sync::CancellationToken;

use crate::cluster::Lease;
use crate::metrics::Metrics;
use crate::protocol::ErrorCode;
use crate::stream::Stream;

type StreamKey = (Arc<str>, String);

/// Per-user counters.
#[derive(Debug, Default, Clone, Serialize)]
pub struct UserStats {
    /// WebSocket connections open now.
    pub connections: u64,
    /// WebSocket connections opened since the process started.
    pub connections_total: u64,
    /// Streams opened and not yet finished.
    pub live_streams: u64,
}

/// Why a stream could not be registered.
#[derive(Debug, PartialEq, Eq)]
pub struct Refusal {
    pub code: ErrorCode,
    pub message: String,
}

/// One user's entry: counters, and the finished streams still kept for a resume.
#[derive(Default)]
struct UserEntry {
    stats: UserStats,
    /// Finished streams not yet forgotten, oldest first, with the bytes of their logs.
    retained: VecDeque<(Arc<Stream>, usize)>,
    /// Sum of the bytes in `retained`.
    retained_bytes: usize,
}

impl UserEntry {
    /// Nothing of the user is left: the entry can go.
    fn is_idle(&self) -> bool {
        self.stats.connections == 0 && self.stats.live_streams == 0 && self.retained.is_empty()
    }

    /// Stops counting `stream` (after it was forgotten).
    fn release(&mut self, stream: &Arc<Stream>) {
        if let Some(i) = self
            .retained
            .iter()
            .position(|(s, _)| Arc::ptr_eq(s, stream))
        {
            if let Some((_, bytes)) = self.retained.remove(i) {
                self.retained_bytes -= bytes;
            }
        }
    }
}

#[derive(Default)]
pub struct Hub {
    streams: DashMap<StreamKey, Arc<Stream>>,
    /// Users with a connection, a live stream or a finished one kept for a resume; no others.
    users: DashMap<Arc<str>, UserEntry>,
    /// Open connections by number, with their user and the token that asks them to `goaway`.
    conns: DashMap<u64, (Arc<str>, CancellationToken)>,
}

/// A connection's place in the [`Hub`]: counted in its user's connections (and in the
/// multi-socket metric) and reachable by an operator's `goaway` while it lives. Dropping it
/// undoes both, so no path out of a connection can forget one half.
pub struct Registration {
    hub: Arc<Hub>,
    metrics: Arc<Metrics>,
    user: Arc<str>,
    conn: u64,
    goaway: CancellationToken,
    /// Cluster mode: the connection's place in its user's cap across instances.
    lease: Option<Lease>,
}

impl Registration {
    /// Keeps `lease` (the connection counted across instances) as long as the connection.
    pub fn hold(&mut self, lease: Lease) {
        self.lease = Some(lease);
    }

    /// The user id, interned: every connection and stream of a user shares it.
    pub fn user(&self) -> &Arc<str> {
        &self.user
    }

    /// Cancelled when an operator asks this user's connections to move (`goaway`).
    pub fn goaway(&self) -> &CancellationToken {
        &self.goaway
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.hub.conns.remove(&self.conn);
        let open = self.hub.disconnect(&self.user);
        self.metrics
            .user_connections_changed(open as usize + 1, open as usize);
    }
}

impl Hub {
    pub fn new() -> Self {
        Hub::default()
    }

    /// Counts a new connection of `user`, unless they already have `max_connections`.
    /// Interns the user id so every connection and stream of a user shares one allocation.
    /// Returns the user and their number of open connections, this one included.
    fn connect(&self, user: &str, max_connections: usize) -> Result<(Arc<str>, u64), Refusal> {
        let key: Arc<str> = match self.users.get(user) {
            Some(e) => e.key().clone(),
            None => Arc::from(user),
        };
        let mut entry = self.users.entry(key.clone()).or_default();
        let stats = &mut entry.stats;
        if stats.connections >= max_connections as u64 {
            return Err(Refusal {
                code: ErrorCode::TooManyStreams,
                message: format!("at most {max_connections} simultaneous connections per user"),
            });
        }
        stats.connections += 1;
        stats.connections_total += 1;
        Ok((key, stats.connections))
    }

    /// Counts connection `conn` of `user` (unless they already have `max_connections`) and
    /// makes it reachable by an operator's `goaway`, until the returned guard is dropped.
    pub fn register(
        self: &Arc<Self>,
        user: &str,
        conn: u64,
        max_connections: usize,
        metrics: &Arc<Metrics>,
    ) -> Result<Registration, Refusal> {
        let (user, open) = self.connect(user, max_connections)?;
        metrics.user_connections_changed(open as usize - 1, open as usize);
        let goaway = CancellationToken::new();
        self.conns.insert(conn, (user.clone(), goaway.clone()));
        Ok(Registration {
            hub: self.clone(),
            metrics: metrics.clone(),
            user,
            conn,
            goaway,
            lease: None,
        })
    }

    /// Sends `goaway` on every connection of `user`; returns how many.
    pub fn goaway_user(&self, user: &str) -> usize {
        let mut told = 0;
        for entry in self.conns.iter() {
            if &*entry.value().0 == user {
                entry.value().1.cancel();
                told += 1;
            }
        }
        told
    }

    /// Returns the user's number of open connections left.
    fn disconnect(&self, user: &Arc<str>) -> u64 {
        let left = match self.users.get_mut(user) {
            Some(mut entry) => {
                entry.stats.connections = entry.stats.connections.saturating_sub(1);
                entry.stats.connections
            }
            None => 0,
        };
        self.prune(user);
        left
    }

    /// Forgets `user` if nothing of theirs is left.
    fn prune(&self, user: &str) {
        self.users.remove_if(user, |_, entry| entry.is_idle());
    }

    /// Registers a new live stream, refusing a duplicate live id or one stream too many.
    /// A finished stream lingering under the same id is replaced.
    pub fn open(&self, stream: &Arc<Stream>, max_streams: usize) -> Result<(), Refusal> {
        let key = (stream.user.clone(), stream.id.clone());
        let mut entry = self.users.entry(stream.user.clone()).or_default();
        let stats = &mut entry.stats;
        match self.streams.entry(key) {
            Entry::Occupied(e) if !e.get().is_finished() => Err(Refusal {
                code: ErrorCode::DuplicateId,
                message: format!("stream `{}` is already live", stream.id),
            }),
            entry => {
                if stats.live_streams >= max_streams as u64 {
                    return Err(Refusal {
                        code: ErrorCode::TooManyStreams,
                        message: format!("at most {max_streams} live streams per user"),
                    });
                }
                stats.live_streams += 1;
                entry.insert(stream.clone());
                Ok(())
            }
        }
    }

    /// Registers a mirror (cluster mode: a stream another instance runs, relayed here for its
    /// client), counted in the user's live streams here like the stream it mirrors. It
    /// replaces a finished stream or a mirror being handed back under the same id, never a
    /// live stream. No cap is checked: a resume moves a stream the caps already count.
    pub fn adopt(&self, mirror: &Arc<Stream>) -> Result<(), Refusal> {
        let key = (mirror.user.clone(), mirror.id.clone());
        let mut entry = self.users.entry(mirror.user.clone()).or_default();
        match self.streams.entry(key) {
            Entry::Occupied(e) if !e.get().is_finished() && !e.get().is_handed_back() => {
                Err(Refusal {
                    code: ErrorCode::DuplicateId,
                    message: format!("stream `{}` is already live", mirror.id),
                })
            }
            e => {
                entry.stats.live_streams += 1;
                e.insert(mirror.clone());
                Ok(())
            }
        }
    }

    /// Forgets a mirror that ends here without its stream ending: handed back to its owner,
    /// or resumed elsewhere.
    pub fn abandon(&self, mirror: &Arc<Stream>) {
        self.unregister(mirror);
        if let Some(mut entry) = self.users.get_mut(&mirror.user) {
            entry.stats.live_streams = entry.stats.live_streams.saturating_sub(1);
        }
        self.prune(&mirror.user);
    }

    pub fn get(&self, user: &Arc<str>, id: &str) -> Option<Arc<Stream>> {
        self.streams
            .get(&(user.clone(), id.to_string()))
            .map(|s| s.value().clone())
    }

    /// Marks a stream's end: it stops counting as live, and is forgotten after `linger`
    /// unless an open with the same id has replaced it by then. Its log counts against the
    /// user's `retain_bytes` until then; past that budget the user's oldest finished streams
    /// are forgotten now (a resume of one gets `not_found`; a connection still writing it is
    /// not affected).
    pub fn finished(self: &Arc<Self>, stream: &Arc<Stream>, linger: Duration, retain_bytes: usize) {
        let mut evicted = Vec::new();
        if let Some(mut entry) = self.users.get_mut(&stream.user) {
            entry.stats.live_streams = entry.stats.live_streams.saturating_sub(1);
            let bytes = stream.buffered_bytes();
            entry.retained.push_back((stream.clone(), bytes));
            entry.retained_bytes += bytes;
            while entry.retained_bytes > retain_bytes {
                let Some((old, bytes)) = entry.retained.pop_front() else {
                    break;
                };
                entry.retained_bytes -= bytes;
                evicted.push(old);
            }
        }
        for old in &evicted {
            self.unregister(old);
        }
        if !evicted.is_empty() {
            self.prune(&stream.user);
        }
        if evicted.iter().any(|old| Arc::ptr_eq(old, stream)) {
            return;
        }
        // Weak: a stream evicted for the budget before its window ends must be freed then,
        // not when this timer fires.
        let hub = Arc::downgrade(self);
        let stream = Arc::downgrade(stream);
        tokio::spawn(async move {
            tokio::time::sleep(linger).await;
            if let Some((hub, stream)) = hub.upgrade().zip(stream.upgrade()) {
                hub.forget(&stream);
            }
        });
    }

    /// Removes `stream` from the registry if it is still the one registered under its id, and
    /// stops counting its log.
    pub fn forget(&self, stream: &Arc<Stream>) {
        self.unregister(stream);
        if let Some(mut entry) = self.users.get_mut(&stream.user) {
            entry.release(stream);
        }
        self.prune(&stream.user);
    }

    fn unregister(&self, stream: &Arc<Stream>) {
        self.streams
            .remove_if(&(stream.user.clone(), stream.id.clone()), |_, s| {
                Arc::ptr_eq(s, stream)
            });
    }

    /// Users the hub holds an entry for (for tests).
    pub fn tracked_users(&self) -> usize {
        self.users.len()
    }

    /// Bytes of finished streams' logs kept for `user` (for tests).
    pub fn retained_bytes(&self, user: &str) -> usize {
        self.users.get(user).map_or(0, |e| e.retained_bytes)
    }

    pub fn user_stats(&self, user: &str) -> Option<UserStats> {
        self.users.get(user).map(|e| e.stats.clone())
    }

    /// Every user's counters (for the admin view).
    pub fn all_user_stats(&self) -> Vec<(Arc<str>, UserStats)> {
        let mut all: Vec<_> = self
            .users
            .iter()
            .map(|u| (u.key().clone(), u.value().stats.clone()))
            .collect();
        all.sort_by(|a, b| a.0.cmp(&b.0));
        all
    }

    /// Ids of a user's live streams (for the admin view).
    pub fn live_stream_ids(&self, user: &str) -> Vec<String> {
        let mut ids: Vec<String> = self
            .streams
            .iter()
            .filter(|s| &*s.key().0 == user && !s.is_finished() && !s.is_mirror())
            .map(|s| s.key().1.clone())
            .collect();
        ids.sort();
        ids
    }

    /// Every stream still running, mirrors included (for shutdown).
    pub fn live_streams(&self) -> Vec<Arc<Stream>> {
        self.streams
            .iter()
            .filter(|s| !s.is_finished())
            .map(|s| s.value().clone())
            .collect()
    }

    /// Totals over all users: (connections open, live streams).
    pub fn totals(&self) -> (u64, u64) {
        self.users.iter().fold((0, 0), |(c, s), u| {
            (c + u.stats.connections, s + u.stats.live_streams)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registration_is_undone_on_drop() {
        let hub = Arc::new(Hub::new());
        let metrics = Arc::new(Metrics::new());
        let first = hub.register("alice", 1, 2, &metrics).expect("first");
        let second = hub.register("alice", 2, 2, &metrics).expect("second");
        assert!(Arc::ptr_eq(first.user(), second.user()), "one interned id");
        assert!(hub.register("alice", 3, 2, &metrics).is_err());
        assert_eq!(hub.user_stats("alice").expect("stats").connections, 2);
        let multi = |n: u8| format!("muxgate_users_multi_socket {n}\n");
        assert!(metrics.encode().contains(&multi(1)));
        drop(second);
        assert_eq!(hub.user_stats("alice").expect("stats").connections, 1);
        assert!(metrics.encode().contains(&multi(0)));
        // A dropped connection is no longer told to move.
        assert_eq!(hub.goaway_user("alice"), 1);
        assert!(first.goaway().is_cancelled());
        drop(first);
        assert_eq!(hub.goaway_user("alice"), 0);
        assert_eq!(
            hub.tracked_users(),
            0,
            "a user with nothing left is forgotten"
        );
    }

    #[test]
    fn duplicate_and_limit() {
        let hub = Hub::new();
        let (user, _) = hub.connect("alice", 2).expect("connect");
        hub.connect("alice", 2).expect("second connection");
        assert_eq!(
            hub.connect("alice", 2).map_err(|r| r.code),
            Err(ErrorCode::TooManyStreams)
        );
        let a = Stream::new("a".into(), user.clone(), "m".into(), 1024);
        hub.open(&a, 2).expect("first");
        let dup = Stream::new("a".into(), user.clone(), "m".into(), 1024);
        assert_eq!(
            hub.open(&dup, 2).map_err(|r| r.code),
            Err(ErrorCode::DuplicateId)
        );
        let b = Stream::new("b".into(), user.clone(), "m".into(), 1024);
        hub.open(&b, 2).expect("second");
        let c = Stream::new("c".into(), user.clone(), "m".into(), 1024);
        assert_eq!(
            hub.open(&c, 2).map_err(|r| r.code),
            Err(ErrorCode::TooManyStreams)
        );
        // another user has their own namespace and count
        let (bob, _) = hub.connect("bob", 2).expect("bob");
        hub.open(&Stream::new("a".into(), bob, "m".into(), 1024), 2)
            .expect("bob's a");
        assert_eq!(hub.user_stats("alice").expect("stats").live_streams, 2);
        assert_eq!(hub.user_stats("alice").expect("stats").connections_total, 2);
    }

    #[tokio::test(start_paused = true)]
    async fn users_who_leave_are_forgotten() {
        let hub = Arc::new(Hub::new());
        for i in 0..100 {
            let (user, _) = hub.connect(&format!("u{i}"), 4).expect("connect");
            hub.disconnect(&user);
        }
        assert_eq!(
            hub.tracked_users(),
            0,
            "no entry outlives its last connection"
        );
        // A user with a lingering finished stream is kept until it is forgotten.
        let (alice, _) = hub.connect("alice", 4).expect("connect");
        let s = Stream::new("a".into(), alice.clone(), "m".into(), 1024);
        hub.open(&s, 4).expect("open");
        s.finish(
            1,
            crate::protocol::done(&crate::protocol::Done {
                id: "a",
                seq: 1,
                finish_reason: "stop",
                ..Default::default()
            }),
        );
        hub.finished(&s, Duration::from_secs(30), 1 << 20);
        hub.disconnect(&alice);
        assert_eq!(hub.tracked_users(), 1);
        assert!(
            hub.get(&alice, "a").is_some(),
            "resumable within the window"
        );
        tokio::time::sleep(Duration::from_secs(31)).await;
        assert!(hub.get(&alice, "a").is_none());
        assert_eq!(hub.tracked_users(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn finished_logs_count_against_the_user_budget() {
        let hub = Arc::new(Hub::new());
        let (alice, _) = hub.connect("alice", 4).expect("connect");
        let frame = crate::protocol::delta("s", 1, &"x".repeat(1000));
        let size = frame.len();
        let budget = size * 3;
        let mut streams = Vec::new();
        let mut weak = Vec::new();
        for i in 0..10 {
            let id = format!("s{i}");
            let s = Stream::new(id.clone(), alice.clone(), "m".into(), 1 << 20);
            hub.open(&s, 100).expect("open");
            assert!(s.push(1, frame.clone()).await);
            s.finish(
                2,
                crate::protocol::error(Some(&id), ErrorCode::Cancelled, "c", None),
            );
            hub.finished(&s, Duration::from_secs(30), budget);
            assert!(hub.retained_bytes("alice") <= budget, "within the budget");
            weak.push(Arc::downgrade(&s));
            streams.push(id);
        }
        let kept: Vec<&String> = streams
            .iter()
            .filter(|id| hub.get(&alice, id).is_some())
            .collect();
        assert_eq!(
            kept,
            vec!["s8", "s9"],
            "the newest are kept, the oldest go first"
        );
        assert_eq!(hub.user_stats("alice").expect("stats").live_streams, 0);
    }
}
