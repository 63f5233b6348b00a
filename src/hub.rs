//! The registry of every stream and connection in the process, by user.
//!
//! A stream outlives its connection (for resume), so streams are registered here under
//! `(user, id)` rather than owned by a connection. Finished streams stay for the resume
//! window too: the connection that carried the last frames may have died before the client
//! read them.

use std::sync::Arc;
use std::time::Duration;

use dashmap::mapref::entry::Entry;
use dashmap::DashMap;
use serde::Serialize;

use tokio_util::sync::CancellationToken;

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

#[derive(Default)]
pub struct Hub {
    streams: DashMap<StreamKey, Arc<Stream>>,
    users: DashMap<Arc<str>, UserStats>,
    /// Open connections by number, with their user and the token that asks them to `goaway`.
    conns: DashMap<u64, (Arc<str>, CancellationToken)>,
}

impl Hub {
    pub fn new() -> Self {
        Hub::default()
    }

    /// Counts a new connection of `user`, unless they already have `max_connections`.
    /// Interns the user id so every connection and stream of a user shares one allocation.
    /// Returns the user and their number of open connections, this one included.
    pub fn connect(&self, user: &str, max_connections: usize) -> Result<(Arc<str>, u64), Refusal> {
        let key: Arc<str> = match self.users.get(user) {
            Some(e) => e.key().clone(),
            None => Arc::from(user),
        };
        let mut stats = self.users.entry(key.clone()).or_default();
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

    /// Registers an open connection; the token is cancelled when an operator asks its user's
    /// connections to move (`goaway`).
    pub fn register_conn(&self, conn: u64, user: &Arc<str>) -> CancellationToken {
        let token = CancellationToken::new();
        self.conns.insert(conn, (user.clone(), token.clone()));
        token
    }

    pub fn unregister_conn(&self, conn: u64) {
        self.conns.remove(&conn);
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
    pub fn disconnect(&self, user: &Arc<str>) -> u64 {
        match self.users.get_mut(user) {
            Some(mut stats) => {
                stats.connections = stats.connections.saturating_sub(1);
                stats.connections
            }
            None => 0,
        }
    }

    /// Registers a new live stream, refusing a duplicate live id or one stream too many.
    /// A finished stream lingering under the same id is replaced.
    pub fn open(&self, stream: &Arc<Stream>, max_streams: usize) -> Result<(), Refusal> {
        let key = (stream.user.clone(), stream.id.clone());
        let mut stats = self.users.entry(stream.user.clone()).or_default();
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

    pub fn get(&self, user: &Arc<str>, id: &str) -> Option<Arc<Stream>> {
        self.streams
            .get(&(user.clone(), id.to_string()))
            .map(|s| s.value().clone())
    }

    /// Marks a stream's end: it stops counting as live, and is forgotten after `linger`
    /// unless an open with the same id has replaced it by then.
    pub fn finished(self: &Arc<Self>, stream: &Arc<Stream>, linger: Duration) {
        if let Some(mut stats) = self.users.get_mut(&stream.user) {
            stats.live_streams = stats.live_streams.saturating_sub(1);
        }
        let hub = Arc::downgrade(self);
        let stream = stream.clone();
        tokio::spawn(async move {
            tokio::time::sleep(linger).await;
            if let Some(hub) = hub.upgrade() {
                hub.forget(&stream);
            }
        });
    }

    /// Removes `stream` from the registry if it is still the one registered under its id.
    pub fn forget(&self, stream: &Arc<Stream>) {
        self.streams
            .remove_if(&(stream.user.clone(), stream.id.clone()), |_, s| {
                Arc::ptr_eq(s, stream)
            });
    }

    pub fn user_stats(&self, user: &str) -> Option<UserStats> {
        self.users.get(user).map(|s| s.clone())
    }

    /// Every user's counters (for the admin view).
    pub fn all_user_stats(&self) -> Vec<(Arc<str>, UserStats)> {
        let mut all: Vec<_> = self
            .users
            .iter()
            .map(|u| (u.key().clone(), u.value().clone()))
            .collect();
        all.sort_by(|a, b| a.0.cmp(&b.0));
        all
    }

    /// Ids of a user's live streams (for the admin view).
    pub fn live_stream_ids(&self, user: &str) -> Vec<String> {
        let mut ids: Vec<String> = self
            .streams
            .iter()
            .filter(|s| &*s.key().0 == user && !s.is_finished())
            .map(|s| s.key().1.clone())
            .collect();
        ids.sort();
        ids
    }

    /// Every stream still running (for shutdown).
    pub fn live_streams(&self) -> Vec<Arc<Stream>> {
        self.streams
            .iter()
            .filter(|s| !s.is_finished())
            .map(|s| s.value().clone())
            .collect()
    }

    /// Totals over all users: (connections open, live streams).
    pub fn totals(&self) -> (u64, u64) {
        self.users
            .iter()
            .fold((0, 0), |(c, s), u| (c + u.connections, s + u.live_streams))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
