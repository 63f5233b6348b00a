//! The direct HTTP/1.1 path to plain-http upstreams (`src/upstream/h1.rs`): which upstream
//! connections are kept for the next stream, counted where the upstream accepts them.
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use muxgate::config::ProviderConfig;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Relays `n` streams one after the other on one WebSocket, each complete.
async fn streams_in_turn(h: &Harness, n: usize) {
    let mut c = h.connect("alice").await;
    for i in 0..n {
        let id = format!("s{i}");
        c.open(&id, "hello there [[mock chunks=3]]").await;
        let records = c.collect(std::slice::from_ref(&id)).await;
        assert_eq!(records[&id].text, expected("hello there", 3));
    }
}

#[tokio::test]
async fn streams_in_turn_share_one_upstream_connection() {
    let h = Harness::start().await;
    streams_in_turn(&h, 3).await;
    let s = h.mock.stats();
    assert_eq!((s.requests, s.connections), (3, 1), "{s:?}");
}

#[tokio::test]
async fn with_direct_http1_off_reqwest_relays_and_pools() {
    let h = Harness::start_with(|c| c.providers[0].direct_http1 = false).await;
    streams_in_turn(&h, 2).await;
    let s = h.mock.stats();
    assert_eq!((s.requests, s.connections), (2, 1), "{s:?}");
}

#[tokio::test]
async fn a_connection_cancelled_mid_body_is_not_reused() {
    let h = Harness::start().await;
    let mut c = h.connect("alice").await;
    cancel_mid_stream(&h, &mut c, "s1").await;
    c.open("s2", "again [[mock chunks=3]]").await;
    let records = c.collect(&["s2".to_string()]).await;
    assert_eq!(records["s2"].text, expected("again", 3));
    let s = h.mock.stats();
    assert_eq!((s.requests, s.connections), (2, 2), "{s:?}");
}

/// How the hand-written upstream below treats a connection after its one answer.
#[derive(Clone, Copy)]
enum After {
    /// Says `connection: close` but leaves the socket open and reads nothing more.
    SaysClose,
    /// Keeps it alive, then closes it once it has sat idle this long.
    ClosesIdle(Duration),
}

/// An upstream answering one request per connection with a whole SSE answer; counts accepts.
async fn upstream(after: After) -> (String, Arc<AtomicU64>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base_url = format!("http://{}/v1", listener.local_addr().unwrap());
    let accepted = Arc::new(AtomicU64::new(0));
    let counter = accepted.clone();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            counter.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(answer_once(tcp, after));
        }
    });
    (base_url, accepted)
}

async fn answer_once(mut tcp: TcpStream, after: After) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    // The head, then a body of its content-length.
    let body_start = loop {
        let n = tcp.read(&mut chunk).await.unwrap_or(0);
        if n == 0 {
            return;
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
    };
    let head = String::from_utf8_lossy(&buf[..body_start]).to_ascii_lowercase();
    let length: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    while buf.len() < body_start + length {
        let n = tcp.read(&mut chunk).await.unwrap_or(0);
        if n == 0 {
            return;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let body = concat!(
        "data: {\"choices\":[{\"delta\":{\"content\":\"hi\"}}]}\n\n",
        "data: {\"choices\":[{\"delta\":{},\"finish_reason\":\"stop\"}]}\n\n",
        "data: [DONE]\n\n"
    );
    let connection = match after {
        After::SaysClose => "close",
        After::ClosesIdle(_) => "keep-alive",
    };
    let response = format!(
        "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncontent-length: {}\r\nconnection: {connection}\r\n\r\n{body}",
        body.len()
    );
    if tcp.write_all(response.as_bytes()).await.is_err() {
        return;
    }
    match after {
        After::SaysClose => {
            // Open but deaf: a second request on it would never be answered.
            tokio::time::sleep(Duration::from_secs(30)).await;
        }
        After::ClosesIdle(idle) => {
            tokio::time::sleep(idle).await;
        }
    }
}

async fn two_streams_on(base_url: String) -> Vec<StreamRecord> {
    let h = Harness::start_with(|c| {
        c.providers = vec![ProviderConfig::catch_all(
            "hostile",
            base_url,
            Some(API_KEY.to_string()),
        )];
        c.providers[0].first_token_timeout_ms = 5_000;
    })
    .await;
    let mut c = h.connect("alice").await;
    let mut out = Vec::new();
    for id in ["s1", "s2"] {
        c.open(id, "hello").await;
        let mut records = c.collect(&[id.to_string()]).await;
        out.push(records.remove(id).unwrap());
        // Past the idle close of `After::ClosesIdle` below.
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    out
}

#[tokio::test]
async fn connection_close_is_honoured() {
    let (base_url, accepted) = upstream(After::SaysClose).await;
    for r in two_streams_on(base_url).await {
        assert_eq!((r.end_type(), r.text.as_str()), ("done", "hi"), "{r:?}");
    }
    assert_eq!(accepted.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn a_pooled_connection_the_upstream_closed_is_not_used() {
    let (base_url, accepted) = upstream(After::ClosesIdle(Duration::from_millis(50))).await;
    for r in two_streams_on(base_url).await {
        assert_eq!((r.end_type(), r.text.as_str()), ("done", "hi"), "{r:?}");
    }
    assert_eq!(accepted.load(Ordering::SeqCst), 2);
}
