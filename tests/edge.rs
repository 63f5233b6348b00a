//! Hostile clients at the server's edge: DNS rebinding, log injection, tokens that expire on a
//! live connection, oversize and broken frames, and sockets that never finish a request.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::*;
use futures_util::{SinkExt, StreamExt};
use muxgate::test_support::{unix_now, unix_now_ms};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};
use tokio_tungstenite::tungstenite::protocol::frame::Frame;
use tokio_tungstenite::tungstenite::Message;

/// A raw WebSocket upgrade request naming `host`, with `origin` if given.
fn upgrade_request(host: &str, origin: Option<&str>) -> String {
    let origin = origin.map_or(String::new(), |o| format!("Origin: {o}\r\n"));
    format!(
        "GET /v1/ws HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n{origin}\r\n"
    )
}

fn get(path: &str, host: &str) -> String {
    format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n")
}

// Item 2: DNS rebinding.

#[tokio::test]
async fn dev_mode_answers_only_loopback_host_names() {
    let h = Harness::start_with(|c| c.dev = Some(true)).await;
    let port = h.addr.port();
    let evil = format!("rebind.evil.example:{port}");
    for path in ["/dev/token", "/", "/index.html", "/healthz", "/metrics"] {
        assert_eq!(
            raw_http_status(h.addr, &get(path, &evil)).await,
            421,
            "{path}"
        );
    }
    let origin = format!("http://{evil}");
    assert_eq!(
        raw_http_status(h.addr, &upgrade_request(&evil, Some(&origin))).await,
        421
    );
    for host in [
        format!("127.0.0.1:{port}"),
        format!("localhost:{port}"),
        format!("[::1]:{port}"),
    ] {
        assert_eq!(
            raw_http_status(h.addr, &get("/dev/token", &host)).await,
            200,
            "{host}"
        );
        let origin = format!("http://{host}");
        assert_eq!(
            raw_http_status(h.addr, &upgrade_request(&host, Some(&origin))).await,
            101,
            "{host}"
        );
    }
}

#[tokio::test]
async fn production_compares_origin_with_the_public_origins_not_the_host() {
    let h = Harness::start_with(|c| {
        c.server.public_origins = vec!["https://gw.example".into()];
    })
    .await;
    let evil = "rebind.evil.example";
    assert_eq!(
        raw_http_status(
            h.addr,
            &upgrade_request(evil, Some(&format!("http://{evil}")))
        )
        .await,
        403
    );
    assert_eq!(
        raw_http_status(h.addr, &upgrade_request(evil, Some("https://gw.example"))).await,
        101
    );
    // A non-browser client sends no Origin; its token is what authenticates it.
    assert_eq!(
        raw_http_status(h.addr, &upgrade_request(evil, None)).await,
        101
    );
}

// Item 3: log injection.

#[tokio::test]
async fn models_and_subs_that_could_forge_log_lines_are_refused() {
    let h = Harness::start().await;
    let mut c = h.connect("alice").await;
    let long = "m".repeat(201);
    for model in [
        "deepseek-v3.2\nINFO forged line",
        "m\u{1b}[2Jx",
        "a\u{202e}b",
        &long,
    ] {
        c.send(json!({"type":"open","id":"s","model":model,
            "messages":[{"role":"user","content":"hi"}]}))
            .await;
        let e = c.recv().await;
        assert_eq!(
            (e["type"].as_str(), e["code"].as_str(), e["id"].as_str()),
            (Some("error"), Some("bad_request"), Some("s")),
            "{e}"
        );
        assert!(e["message"].as_str().unwrap().contains("`model`"), "{e}");
    }
    // The connection is fine and the id was never registered.
    c.open("s", "fine [[mock chunks=2]]").await;
    let r = c.collect(&["s".into()]).await;
    assert_eq!(r["s"].end_type(), "done");

    for sub in ["alice\nINFO forged line", "eve\u{1b}[31m", &"x".repeat(257)] {
        let token = sign(&json!({"sub":sub,"tier":"pro","exp":unix_now() + 600}));
        let mut c = h.connect_raw().await;
        c.send(json!({"type":"hello","token":token})).await;
        let m = c.expect_unauthorized_close().await;
        assert!(m.contains("`sub`") && m.contains("printable"), "{m}");
    }
}

// Item 4: token expiry on a live connection.

/// Reads frames, feeding those of stream `id` into `r`, until one of another stream or of the
/// connection arrives.
async fn next_other(c: &mut Client, id: &str, r: &mut StreamRecord) -> Value {
    loop {
        let f = c.recv().await;
        if f["id"] == id {
            r.take(f);
        } else {
            return f;
        }
    }
}

fn assert_unauthorized(f: &Value, id: Option<&str>, needle: &str) {
    assert_eq!(
        (f["type"].as_str(), f["code"].as_str(), f["id"].as_str()),
        (Some("error"), Some("unauthorized"), id),
        "{f}"
    );
    assert!(f["message"].as_str().unwrap().contains(needle), "{f}");
}

#[tokio::test]
async fn an_expired_token_refuses_opens_until_a_refresh_for_the_same_user() {
    let h = Harness::start_with(|c| {
        c.session.token_leeway_ms = 0;
        c.session.token_grace_ms = 60_000;
    })
    .await;
    let token =
        h.gw.issue_token("alice", "pro", Duration::from_secs(1))
            .unwrap();
    let exp = h.gw.verify_token(&token).unwrap().exp;
    let mut c = h.connect_raw().await;
    c.send(json!({"type":"hello","token":token})).await;
    let welcome = c.recv().await;
    assert_eq!(welcome["exp"], exp, "{welcome}");

    // Running streams are not the token's business.
    c.open("before", "before [[mock chunks=60 delay_ms=50]]")
        .await;
    let mut before = StreamRecord::default();
    while unix_now_ms() <= exp * 1000 + 100 {
        let _ = tokio::time::timeout(Duration::from_millis(50), async {
            let f = c.recv().await;
            before.take(f);
        })
        .await;
    }
    c.open("late", "late [[mock chunks=2]]").await;
    let f = next_other(&mut c, "before", &mut before).await;
    assert_unauthorized(&f, Some("late"), "refresh");

    // Refused refreshes leave the connection as it was.
    let refusals = [
        (h.token("bob", "pro"), "another user"),
        (h.token("alice", "free"), "another tier"),
        ("not-a-jwt".to_string(), "invalid token"),
        (
            sign(&json!({"sub":"alice","tier":"pro","exp":unix_now() - 600})),
            "expired",
        ),
    ];
    for (token, needle) in refusals {
        c.send(json!({"type":"refresh","token":token})).await;
        let f = next_other(&mut c, "before", &mut before).await;
        assert_unauthorized(&f, None, needle);
    }
    c.open("still", "still [[mock chunks=2]]").await;
    let f = next_other(&mut c, "before", &mut before).await;
    assert_unauthorized(&f, Some("still"), "refresh");

    let fresh = h.token("alice", "pro");
    let fresh_exp = h.gw.verify_token(&fresh).unwrap().exp;
    c.send(json!({"type":"refresh","token":fresh})).await;
    let f = next_other(&mut c, "before", &mut before).await;
    assert_eq!(f, json!({"type":"refreshed","exp":fresh_exp}));
    // A far-future `exp` neither overflows the expiry arithmetic nor the timer.
    let far = sign(&json!({"sub":"alice","tier":"pro","exp":u64::MAX / 2}));
    c.send(json!({"type":"refresh","token":far})).await;
    let f = next_other(&mut c, "before", &mut before).await;
    assert_eq!(f, json!({"type":"refreshed","exp":u64::MAX / 2}));
    c.open("after", "after [[mock chunks=3]]").await;
    let mut after = StreamRecord::default();
    while after.end.is_none() || before.end.is_none() {
        let f = c.recv().await;
        match f["id"].as_str() {
            Some("before") => before.take(f),
            Some("after") => after.take(f),
            _ => panic!("unexpected frame {f}"),
        }
    }
    assert_eq!(after.text, expected("after", 3));
    assert_eq!(before.text, expected("before", 60));
}

#[tokio::test]
async fn no_refresh_closes_4401_after_the_grace_and_streams_stay_resumable() {
    let h = Harness::start_with(|c| {
        c.session.token_leeway_ms = 0;
        c.session.token_grace_ms = 1_000;
    })
    .await;
    let token =
        h.gw.issue_token("alice", "pro", Duration::from_secs(1))
            .unwrap();
    let mut c = h.connect_raw().await;
    c.send(json!({"type":"hello","token":token})).await;
    c.recv_until("welcome", None).await;
    c.open("long", "long [[mock chunks=100 delay_ms=50]]").await;
    let mut r = StreamRecord::default();
    let f = next_other(&mut c, "long", &mut r).await;
    assert_unauthorized(&f, None, "token expired");
    loop {
        match c.next_event().await {
            Event::Frame(f) => r.take(f),
            Event::Closed(code) => {
                assert_eq!(code, Some(4401));
                break;
            }
        }
    }
    assert!(r.end.is_none(), "the stream should outlive the connection");

    let (mut c, welcome) = h
        .connect_resume("alice", json!([{"id":"long","after":r.last_seq}]))
        .await;
    assert_eq!(welcome["resumed"], json!(["long"]));
    while r.end.is_none() {
        let f = c.recv().await;
        assert_eq!(f["id"], "long", "{f}");
        r.take(f);
    }
    assert_eq!(r.end_type(), "done");
    assert_eq!(r.text, expected("long", 100));
}

// Item 10: oversize and broken frames get their close code, and the close frame arrives.

/// Sends `msgs` from a separate task (the gateway may stop reading mid-frame) and returns the
/// close code the client reads.
async fn close_code_after(c: Client, msgs: Vec<Message>, read_after: Duration) -> Option<u16> {
    let (mut tx, mut rx) = c.ws.split();
    let sender = tokio::spawn(async move {
        for msg in msgs {
            if tx.send(msg).await.is_err() {
                break;
            }
        }
    });
    // A client busy elsewhere reads late: the close frame must still be there.
    tokio::time::sleep(read_after).await;
    let code = loop {
        match tokio::time::timeout(FRAME_WAIT, rx.next())
            .await
            .expect("no close within FRAME_WAIT")
        {
            Some(Ok(Message::Close(frame))) => break frame.map(|f| u16::from(f.code)),
            Some(Ok(_)) => continue,
            Some(Err(_)) | None => break None,
        }
    };
    sender.abort();
    code
}

fn invalid_utf8_text() -> Message {
    Message::Frame(Frame::message(
        vec![b'{', 0xff, 0xfe, b'}'],
        OpCode::Data(Data::Text),
        true,
    ))
}

#[tokio::test]
async fn a_frame_over_the_hard_limit_closes_1009_and_invalid_utf8_1007() {
    // Hard limit: 8 × max_frame_bytes, at least 1 MiB.
    let h = Harness::start_with(|c| c.session.max_frame_bytes = 1024).await;
    let huge = || Message::Text("x".repeat((1 << 20) + 4096).into());

    let c = h.connect("alice").await;
    assert_eq!(
        close_code_after(c, vec![huge()], Duration::ZERO).await,
        Some(1009)
    );
    let c = h.connect_raw().await;
    assert_eq!(
        close_code_after(c, vec![huge()], Duration::ZERO).await,
        Some(1009)
    );

    let c = h.connect("alice").await;
    assert_eq!(
        close_code_after(c, vec![invalid_utf8_text()], Duration::ZERO).await,
        Some(1007)
    );
    let c = h.connect_raw().await;
    assert_eq!(
        close_code_after(c, vec![invalid_utf8_text()], Duration::ZERO).await,
        Some(1007)
    );
}

#[tokio::test]
async fn the_4400_close_frame_reaches_a_client_that_keeps_sending() {
    let h = Harness::start_with(|c| c.session.max_bad_frames_per_minute = 3).await;
    let mut c = h.connect("alice").await;
    // Unread frames fill the socket buffers, so the close frame queues behind them: closing
    // the socket while the client still sends would discard it with a reset.
    c.open("big", "big [[mock chunks=4000 chunk_bytes=1024]]")
        .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let garbage = "g".repeat(8 * 1024);
    let flood = (0..1000)
        .map(|_| Message::Text(garbage.clone().into()))
        .collect();
    assert_eq!(
        close_code_after(c, flood, Duration::from_millis(300)).await,
        Some(4400)
    );
}

// Item 6: sockets that never finish a request.

/// Reads until the gateway closes the socket or `within` passes; returns what was read, or
/// `None` if the socket is still open.
async fn read_until_closed(tcp: &mut tokio::net::TcpStream, within: Duration) -> Option<String> {
    use tokio::io::AsyncReadExt;
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + within;
    loop {
        match tokio::time::timeout_at(deadline, tcp.read(&mut buf)).await {
            Err(_) => return None,
            Ok(Ok(0)) | Ok(Err(_)) => return Some(String::from_utf8_lossy(&got).into_owned()),
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
        }
    }
}

#[tokio::test]
async fn shutdown_ends_on_time_whatever_idle_and_half_sent_requests_do() {
    use tokio::io::AsyncWriteExt;
    // The header-read timeout is far beyond the drain: only the drain deadline can end these.
    let mut h = Harness::start_with(|c| {
        c.drain_timeout_ms = 500;
        c.server.header_read_timeout_ms = 120_000;
    })
    .await;
    let mut half_sent = tokio::net::TcpStream::connect(h.addr).await.unwrap();
    half_sent
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
        .await
        .unwrap();
    let mut keep_alive = tokio::net::TcpStream::connect(h.addr).await.unwrap();
    keep_alive
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        .await
        .unwrap();
    let mut buf = [0u8; 1024];
    let n = tokio::io::AsyncReadExt::read(&mut keep_alive, &mut buf)
        .await
        .unwrap();
    assert!(buf[..n].starts_with(b"HTTP/1.1 200"));
    let _never_spoke = tokio::net::TcpStream::connect(h.addr).await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;

    h.shutdown();
    // Generous: the drain is 0.5 s; this only tells "on time" from "never".
    tokio::time::timeout(Duration::from_secs(8), h.server.take().unwrap())
        .await
        .expect("shutdown did not finish")
        .unwrap()
        .unwrap();
    assert!(read_until_closed(&mut half_sent, Duration::from_secs(2))
        .await
        .is_some());
    assert!(read_until_closed(&mut keep_alive, Duration::from_secs(2))
        .await
        .is_some());
}

#[tokio::test]
async fn a_slowloris_socket_is_closed_at_the_header_read_timeout() {
    use tokio::io::AsyncWriteExt;
    let h = Harness::start_with(|c| c.server.header_read_timeout_ms = 300).await;
    let mut tcp = tokio::net::TcpStream::connect(h.addr).await.unwrap();
    tcp.write_all(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        .await
        .unwrap();
    // One header byte every 100 ms: never a whole header, never silent for long.
    let start = tokio::time::Instant::now();
    let mut closed = false;
    while start.elapsed() < Duration::from_secs(6) {
        if tcp.write_all(b"X").await.is_err() {
            closed = true;
            break;
        }
        if read_until_closed(&mut tcp, Duration::from_millis(100))
            .await
            .is_some()
        {
            closed = true;
            break;
        }
    }
    assert!(closed, "the slowloris socket is still open after 6 s");

    // An idle keep-alive connection is closed by the same timeout.
    let mut tcp = tokio::net::TcpStream::connect(h.addr).await.unwrap();
    tcp.write_all(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        .await
        .unwrap();
    let answer = read_until_closed(&mut tcp, Duration::from_secs(6)).await;
    assert!(
        answer
            .as_deref()
            .is_some_and(|a| a.starts_with("HTTP/1.1 200")),
        "{answer:?}"
    );
}

#[tokio::test]
async fn the_per_ip_cap_refuses_the_extra_connection_until_one_leaves() {
    let h = Harness::start_with(|c| c.server.max_pending_connections_per_ip = 2).await;
    let first = tokio::net::TcpStream::connect(h.addr).await.unwrap();
    let mut second = tokio::net::TcpStream::connect(h.addr).await.unwrap();
    let mut extra = tokio::net::TcpStream::connect(h.addr).await.unwrap();
    let answer = read_until_closed(&mut extra, Duration::from_secs(5))
        .await
        .expect("the extra connection was not closed");
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
    assert!(
        answer.contains("too many connections from your address"),
        "{answer}"
    );
    assert!(
        read_until_closed(&mut second, Duration::from_millis(200))
            .await
            .is_none(),
        "a connection within the cap was closed"
    );

    // A WebSocket counts only until its upgrade: with one slot free, any number connect.
    drop(first);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let _a = h.connect("alice").await;
    let _b = h.connect("bob").await;
    let _c = h.connect("carol").await;
}

#[tokio::test]
async fn a_slow_reader_that_reads_again_soon_gets_the_4408_close_frame() {
    let h = Harness::start_with(|c| {
        c.session.stream_buffer_bytes = 64 * 1024;
        c.session.write_timeout_ms = 300;
        c.session.heartbeat_ms = 60_000;
    })
    .await;
    let mut c = h.connect("alice").await;
    c.open("big", "slow [[mock chunks=20000 chunk_bytes=4096]]")
        .await;
    c.recv_until("delta", Some("big")).await;
    // Not reading: the socket fills and a write blocks. Once no write has completed for
    // 150 ms, the write timeout (300 ms) is near; the gateway then gives up on the socket and
    // tries for up to a second to queue the close frame behind what the client has not read.
    let sent_frames = || {
        let text = h.gw.metrics_text();
        text.lines()
            .find_map(|l| l.strip_prefix("muxgate_ws_sent_frames_total "))
            .map(|v| v.trim().parse::<f64>().unwrap())
            .unwrap()
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let (mut last, mut since) = (sent_frames(), tokio::time::Instant::now());
    while since.elapsed() < Duration::from_millis(150) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the writer never blocked"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
        let now = sent_frames();
        if now != last {
            (last, since) = (now, tokio::time::Instant::now());
        }
    }
    tokio::time::sleep(Duration::from_millis(400)).await;
    // Reading again, the client finds the close frame behind the frames it had not read.
    loop {
        match c.next_event().await {
            Event::Frame(_) => {}
            Event::Closed(code) => {
                assert_eq!(code, Some(4408));
                break;
            }
        }
    }
}
