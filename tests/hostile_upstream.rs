//! Hostile upstreams: an upstream that quotes the API key it was sent, sends a line that never
//! ends, or keeps a stream alive forever; and what the gateway sends upstream about its users.
//! The upstream here is a hand-written HTTP/1.1 server on loopback, so it can do what no
//! well-behaved server would.
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use futures_util::future::BoxFuture;
use muxgate::config::ProviderConfig;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// One request as the hostile upstream read it.
#[derive(Clone, Debug)]
struct Request {
    /// The bearer token it was sent (the configured API key).
    key: String,
    body: Value,
}

impl Request {
    /// The last message's text: tests steer the hostile upstream through it.
    fn prompt(&self) -> &str {
        self.body["messages"]
            .as_array()
            .and_then(|m| m.last())
            .and_then(|m| m["content"].as_str())
            .unwrap_or("")
    }
}

type Handler = Arc<dyn Fn(Request, Conn) -> BoxFuture<'static, ()> + Send + Sync>;

/// The response side of one accepted connection, counting what it wrote.
struct Conn {
    tcp: TcpStream,
    written: Arc<AtomicU64>,
}

impl Conn {
    /// Writes `bytes`; false once the gateway has hung up.
    async fn write(&mut self, bytes: &[u8]) -> bool {
        let ok = self.tcp.write_all(bytes).await.is_ok();
        if ok {
            self.written
                .fetch_add(bytes.len() as u64, Ordering::Relaxed);
        }
        ok
    }

    async fn sse_head(&mut self, content_type: &str) -> bool {
        let head =
            format!("HTTP/1.1 200 OK\r\ncontent-type: {content_type}\r\nconnection: close\r\n\r\n");
        self.write(head.as_bytes()).await
    }
}

struct Hostile {
    base_url: String,
    requests: Arc<Mutex<Vec<Request>>>,
    /// Body and head bytes written over every connection.
    written: Arc<AtomicU64>,
    /// Set when a handler returned (it gave up writing, or finished).
    finished: Arc<AtomicBool>,
}

impl Hostile {
    async fn spawn(handler: Handler) -> Hostile {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base_url = format!("http://{}/v1", listener.local_addr().unwrap());
        let requests = Arc::new(Mutex::new(Vec::new()));
        let written = Arc::new(AtomicU64::new(0));
        let finished = Arc::new(AtomicBool::new(false));
        let (reqs, w, f) = (requests.clone(), written.clone(), finished.clone());
        tokio::spawn(async move {
            loop {
                let Ok((mut tcp, _)) = listener.accept().await else {
                    return;
                };
                let (handler, reqs, w, f) = (handler.clone(), reqs.clone(), w.clone(), f.clone());
                tokio::spawn(async move {
                    let Some(req) = read_request(&mut tcp).await else {
                        return;
                    };
                    reqs.lock().unwrap().push(req.clone());
                    handler(req, Conn { tcp, written: w }).await;
                    f.store(true, Ordering::SeqCst);
                });
            }
        });
        Hostile {
            base_url,
            requests,
            written,
            finished,
        }
    }

    fn provider(&self, models: &[&str]) -> ProviderConfig {
        let mut p =
            ProviderConfig::catch_all("hostile", self.base_url.clone(), Some(API_KEY.into()));
        p.models = models.iter().map(|m| m.to_string()).collect();
        p
    }
}

async fn read_request(tcp: &mut TcpStream) -> Option<Request> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    let head_end = loop {
        let n = tcp.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
    let raw_head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let header = |name: &str| {
        head.lines()
            .position(|l| l.starts_with(name))
            .and_then(|i| raw_head.lines().nth(i))
            .map(|l| l[name.len()..].trim().to_string())
    };
    let len: usize = header("content-length:")?.parse().ok()?;
    let key = header("authorization:")
        .and_then(|v| v.strip_prefix("Bearer ").map(str::to_string))
        .unwrap_or_default();
    while buf.len() < head_end + len {
        let n = tcp.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let body = serde_json::from_slice(&buf[head_end..head_end + len]).ok()?;
    Some(Request { key, body })
}

fn event(data: &Value) -> Vec<u8> {
    format!("data: {data}\n\n").into_bytes()
}

fn content(text: &str) -> Value {
    json!({"choices":[{"index":0,"delta":{"content":text},"finish_reason":null}]})
}

/// A short, valid answer: one token, a finish, `[DONE]`.
async fn answer(conn: &mut Conn, text: &str) {
    conn.sse_head("text/event-stream").await;
    conn.write(&event(&content(text))).await;
    conn.write(&event(
        &json!({"choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}),
    ))
    .await;
    conn.write(b"data: [DONE]\n\n").await;
}

/// Every way an upstream can put text in front of the gateway: an HTTP error body, an error
/// event in the stream, a chunk that is not JSON, a bad content type. Each one quotes the key
/// the hostile upstream was sent, another `sk-` key, a bearer token and control characters.
/// What reaches the client (and the logs) is redacted, and still says what went wrong.
#[tokio::test]
async fn upstream_text_is_redacted_on_every_route() {
    let captured = captured_logs();
    let other_key = "sk-proj-Zq8xV2mN4bT6yR1wE3uI5oP7";
    let hostile = Hostile::spawn(Arc::new(move |req: Request, mut conn: Conn| {
        Box::pin(async move {
            let echo = format!(
                "Incorrect API key provided: {}. Also tried {other_key}, Authorization: Bearer {}\n\u{1b}[2Jforged log line",
                req.key, req.key
            );
            match req.prompt() {
                "status" => {
                    let body = json!({"error":{"message":echo,"type":"invalid_request_error"}})
                        .to_string();
                    let head = format!(
                        "HTTP/1.1 401 Unauthorized\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                        body.len()
                    );
                    conn.write(head.as_bytes()).await;
                    conn.write(body.as_bytes()).await;
                }
                "event" => {
                    conn.sse_head("text/event-stream").await;
                    conn.write(&event(&json!({"error":{"message":echo}}))).await;
                }
                "chunk" => {
                    conn.sse_head("text/event-stream").await;
                    let raw = format!("data: {{not json {echo}\n\n");
                    conn.write(raw.as_bytes()).await;
                }
                "content_type" => {
                    // Header values cannot hold control characters; the key they can.
                    conn.sse_head(&format!("text/html; key={}", req.key)).await;
                }
                _ => {}
            }
        })
    }))
    .await;
    let h = Harness::start_with(|c| c.providers = vec![hostile.provider(&["*"])]).await;
    let mut c = h.connect("alice").await;
    let routes = ["status", "event", "chunk", "content_type"];
    for id in routes {
        c.open(id, id).await;
    }
    let ids: Vec<String> = routes.iter().map(|r| r.to_string()).collect();
    let records = c.collect(&ids).await;
    assert_eq!(hostile.requests.lock().unwrap()[0].key, API_KEY);
    for (id, r) in &records {
        assert_eq!(r.error_code(), "upstream_error", "{id}: {:?}", r.end);
        let message = r.end.as_ref().unwrap()["message"].as_str().unwrap();
        assert!(
            !message.contains(API_KEY) && !message.contains("sk-"),
            "{id}: a key reached the client: {message}"
        );
        assert!(
            !message.chars().any(|c| c.is_control()),
            "{id}: control characters reached the client: {message:?}"
        );
        assert!(
            message.contains("[redacted]"),
            "{id}: the upstream's text is quoted, redacted: {message}"
        );
    }
    let status = records["status"].end.as_ref().unwrap()["message"]
        .as_str()
        .unwrap();
    assert!(
        status.contains("401") && status.contains("Incorrect API key provided"),
        "{status}"
    );
    assert!(
        !status.contains(&format!("Bearer {}", &API_KEY[..6])),
        "{status}"
    );
    c.close().await;
    let logs = || String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
    let deadline = tokio::time::Instant::now() + FRAME_WAIT;
    while logs().matches("stream ended").count() < routes.len() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no log of the streams' ends"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let logs = logs();
    for secret in [API_KEY, other_key, "\\u001b"] {
        assert!(!logs.contains(secret), "reached the logs: {secret}");
    }
    assert!(
        logs.lines()
            .all(|l| serde_json::from_str::<Value>(l).is_ok()),
        "every log line is one whole record"
    );
}

/// An upstream sends a 50 MB line that never ends, on one stream, while a healthy stream runs
/// beside it on the same socket. The hostile stream ends with `upstream_error` once the line
/// passes `upstream.max_event_bytes`, and the gateway stops reading it (the hostile server
/// cannot write its 50 MB); the healthy stream completes in full and the connection, with a
/// short heartbeat, stays up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_line_that_never_ends_is_cut_and_the_stream_beside_it_runs() {
    const LINE: u64 = 50 << 20;
    let hostile = Hostile::spawn(Arc::new(|_req: Request, mut conn: Conn| {
        Box::pin(async move {
            conn.sse_head("text/event-stream").await;
            conn.write(b"data: ").await;
            let block = vec![b'x'; 64 << 10];
            let mut sent = 0;
            while sent < LINE {
                if !conn.write(&block).await {
                    return;
                }
                sent += block.len() as u64;
            }
            // All sent and still no line end: hold the response open.
            tokio::time::sleep(Duration::from_secs(120)).await;
        })
    }))
    .await;
    let h = Harness::start_with(|c| {
        let mock = c.providers.remove(0);
        c.providers = vec![hostile.provider(&["hostile"]), mock];
        c.session.heartbeat_ms = 1_500;
    })
    .await;
    let mut c = h.connect("alice").await;
    let prompt = "[[mock chunks=40 delay_ms=25]]";
    c.open("healthy", prompt).await;
    c.send(json!({"type":"open","id":"hostile","model":"hostile",
        "messages":[{"role":"user","content":"hi"}]}))
        .await;
    let records = c.collect(&["healthy".into(), "hostile".into()]).await;
    let bad = &records["hostile"];
    assert_eq!(bad.error_code(), "upstream_error", "{:?}", bad.end);
    let message = bad.end.as_ref().unwrap()["message"].as_str().unwrap();
    assert!(
        message.contains("larger than 4194304 bytes"),
        "the limit is named: {message}"
    );
    let good = &records["healthy"];
    assert_eq!(good.end_type(), "done", "{:?}", good.end);
    assert_eq!(good.text, expected(prompt, 40));
    // The connection is alive: a ping is answered.
    c.send(json!({"type":"ping","ts":7})).await;
    assert_eq!(c.recv_until("pong", None).await["ts"], 7);
    // The gateway hung up on the hostile response long before its 50 MB.
    let deadline = tokio::time::Instant::now() + FRAME_WAIT;
    while !hostile.finished.load(Ordering::SeqCst) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the gateway kept reading the endless line"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let written = hostile.written.load(Ordering::Relaxed);
    assert!(
        written < LINE / 2,
        "the hostile upstream wrote {written} bytes before the gateway hung up"
    );
}

/// An upstream that sends one token, then an empty event every 50 ms forever, resets the idle
/// timer forever; `upstream.max_stream_duration_ms` ends the stream anyway.
#[tokio::test]
async fn a_stream_ends_at_its_maximum_duration() {
    let hostile = Hostile::spawn(Arc::new(|_req: Request, mut conn: Conn| {
        Box::pin(async move {
            conn.sse_head("text/event-stream").await;
            conn.write(&event(&content("tok"))).await;
            let empty = event(&json!({"choices":[{"index":0,"delta":{}}]}));
            while conn.write(&empty).await {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
    }))
    .await;
    let h = Harness::start_with(|c| {
        c.providers = vec![hostile.provider(&["*"])];
        c.upstream.max_stream_duration_ms = 2_000;
    })
    .await;
    let mut c = h.connect("alice").await;
    let opened = tokio::time::Instant::now();
    c.open("s", "hi").await;
    let r = c.collect(&["s".into()]).await.remove("s").unwrap();
    let lasted = opened.elapsed();
    assert_eq!(r.text, "tok");
    assert_eq!(r.error_code(), "upstream_timeout", "{:?}", r.end);
    let message = r.end.as_ref().unwrap()["message"].as_str().unwrap();
    assert!(message.contains("maximum duration"), "{message}");
    assert!(lasted >= Duration::from_millis(2_000), "{lasted:?}");
    // The upstream call was dropped: its writes start failing.
    let deadline = tokio::time::Instant::now() + FRAME_WAIT;
    while !hostile.finished.load(Ordering::SeqCst) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "upstream still read"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The `user` sent upstream is HMAC-SHA256 of the token's `sub` under a key derived from the
/// JWT secret, whatever the client put in `params.user`.
#[tokio::test]
async fn upstream_user_is_a_keyed_hash_of_the_subject() {
    let hostile = Hostile::spawn(Arc::new(|_req: Request, mut conn: Conn| {
        Box::pin(async move { answer(&mut conn, "ok").await })
    }))
    .await;
    let h = Harness::start_with(|c| c.providers = vec![hostile.provider(&["*"])]).await;
    let mut alice = h.connect("alice").await;
    let mut bob = h.connect("bob").await;
    for (who, id) in [("alice", "a1"), ("alice", "a2"), ("bob", "b1")] {
        let c = if who == "alice" { &mut alice } else { &mut bob };
        c.send(json!({"type":"open","id":id,"model":"m",
            "messages":[{"role":"user","content":id}],
            "params":{"user":"victim@example.com"}}))
            .await;
        let r = c.collect(&[id.to_string()]).await;
        assert_eq!(r[id].end_type(), "done", "{:?}", r[id].end);
    }
    let users: Vec<(String, String)> = hostile
        .requests
        .lock()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r.prompt().to_string(),
                r.body["user"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect();
    let user_of = |id: &str| users.iter().find(|(p, _)| p == id).unwrap().1.clone();
    let derived = ring::hmac::sign(
        &ring::hmac::Key::new(ring::hmac::HMAC_SHA256, SECRET.as_bytes()),
        b"muxgate upstream user id v1",
    );
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, derived.as_ref());
    let hex = |sub: &str| {
        ring::hmac::sign(&key, sub.as_bytes()).as_ref()[..16]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<String>()
    };
    assert_eq!(user_of("a1"), hex("alice"), "{users:?}");
    assert_eq!(user_of("a2"), user_of("a1"), "stable per user");
    assert_eq!(user_of("b1"), hex("bob"));
    assert_ne!(user_of("a1"), user_of("b1"));
}

/// The token reservation takes the larger of `max_tokens` and `max_completion_tokens`: a
/// small `max_tokens` beside a huge `max_completion_tokens` cannot slip under the tier's
/// tokens-per-minute.
#[tokio::test]
async fn reservation_takes_the_larger_of_both_max_token_params() {
    let h = Harness::start_with(|_| {}).await;
    let mut c = h.connect_tier("carol", "free").await;
    let open = |id: &str, max_tokens: u64, max_completion_tokens: u64| {
        json!({"type":"open","id":id,"model":"deepseek-v3.2",
            "messages":[{"role":"user","content":"[[mock chunks=2]]"}],
            "params":{"max_tokens":max_tokens,"max_completion_tokens":max_completion_tokens}})
    };
    // The free tier's tokens-per-minute is 50000.
    for (id, a, b, want) in [
        ("small", 10, 10, "done"),
        ("completion-huge", 10, 60_000, "rate_limited"),
        ("max-huge", 60_000, 10, "rate_limited"),
    ] {
        c.send(open(id, a, b)).await;
        let r = c.collect(&[id.to_string()]).await;
        let got = match r[id].end_type() {
            "done" => "done",
            _ => r[id].error_code(),
        };
        assert_eq!(got, want, "{id}: {:?}", r[id].end);
    }
}

/// With one upstream slot taken, 150 streams queue. Cancelling the first 100, one at a time,
/// moves every waiter 100 times; the first `ANNOUNCE_HEAD` positions hear of each move, the
/// ones further back only of a refresh at most once a second: the work per queue change is
/// bounded by the head, not the queue. Positions stay right where they are announced.
#[tokio::test]
async fn queue_positions_behind_the_head_are_refreshed_not_walked_per_change() {
    use muxgate::test_support::{ANNOUNCE_EVERY, ANNOUNCE_HEAD};
    const WAITERS: usize = 150;
    const CANCELLED: usize = 100;
    let h = Harness::start_with(|c| {
        c.providers[0].max_concurrent = 1;
        c.session.max_streams = 500;
        let pro = c.tiers.get_mut("pro").unwrap();
        pro.user_rpm = 10_000;
        pro.rpm = 10_000;
        pro.tpm = 10_000_000;
    })
    .await;
    // The last waiter stays behind the head throughout; the first survivor reaches it.
    const _: () = assert!(WAITERS - CANCELLED > ANNOUNCE_HEAD);
    let mut c = h.connect("dave").await;
    c.open("holder", "[[mock chunks=1 stall_ms=60000]]").await;
    c.recv_until("start", Some("holder")).await;
    let mut positions: std::collections::HashMap<String, Vec<u64>> = Default::default();
    let take = |f: &Value, positions: &mut std::collections::HashMap<String, Vec<u64>>| {
        if f["type"] == "queued" {
            positions
                .entry(f["id"].as_str().unwrap().to_string())
                .or_default()
                .push(f["position"].as_u64().unwrap());
        }
    };
    for i in 0..WAITERS {
        c.open(&format!("q{i}"), "[[mock chunks=1]]").await;
        // Wait for each to be queued, so the arrival order is the open order.
        loop {
            let f = c.recv().await;
            take(&f, &mut positions);
            if f["type"] == "queued" && f["id"] == format!("q{i}") {
                break;
            }
        }
    }
    let last = format!("q{}", WAITERS - 1);
    assert_eq!(positions[&last].last(), Some(&(WAITERS as u64)));
    let started = tokio::time::Instant::now();
    let before = positions[&last].len();
    for i in 0..CANCELLED {
        let id = format!("q{i}");
        c.send(json!({"type":"cancel","id":id})).await;
        loop {
            let f = c.recv().await;
            take(&f, &mut positions);
            if f["type"] == "error" && f["id"] == id {
                break;
            }
        }
    }
    let elapsed = started.elapsed();
    // The first survivor is at the head now, and was told so exactly.
    let first = format!("q{CANCELLED}");
    while positions[&first].last() != Some(&1) {
        let f = c.recv().await;
        take(&f, &mut positions);
    }
    let moves_heard = positions[&last].len() - before;
    let refreshes = (elapsed.as_secs_f64() / ANNOUNCE_EVERY.as_secs_f64()).ceil() as usize + 1;
    assert!(
        moves_heard <= refreshes,
        "the last waiter heard {moves_heard} of {CANCELLED} moves in {elapsed:?} (at most {refreshes} refreshes)"
    );
    // Every position announced was right when it was sent: never below its true place.
    for (i, seen) in positions
        .iter()
        .filter_map(|(id, seen)| Some((id[1..].parse::<usize>().ok()?, seen)))
    {
        let lowest_possible = (i + 1).saturating_sub(CANCELLED) as u64;
        assert!(
            seen.iter().all(|p| *p >= lowest_possible.max(1)),
            "q{i}: {seen:?}"
        );
    }
    c.close().await;
}

/// An answer longer than the replay log with no upstream `usage` is billed for all of it: the
/// gateway counts what went out, not what the log still holds after trimming.
#[tokio::test]
async fn an_answer_past_the_replay_log_without_usage_is_billed_in_full() {
    // 1.5 MiB of words in 4 KiB chunks, a finish and `[DONE]`, and no `usage` chunk.
    const CHUNKS: usize = 384;
    let chunk_text = |k: usize| {
        let mut s = String::with_capacity(4096);
        let mut w = 0;
        while s.len() < 4000 {
            s.push_str(&format!("word{k}x{w} "));
            w += 1;
        }
        s
    };
    let hostile = Hostile::spawn(Arc::new(move |_req: Request, mut conn: Conn| {
        Box::pin(async move {
            conn.sse_head("text/event-stream").await;
            for k in 0..CHUNKS {
                if !conn.write(&event(&content(&chunk_text(k)))).await {
                    return;
                }
            }
            conn.write(&event(
                &json!({"choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}),
            ))
            .await;
            conn.write(b"data: [DONE]\n\n").await;
        })
    }))
    .await;
    let h = Harness::start_with(|c| {
        c.providers = vec![hostile.provider(&["*"])];
        // The default, 1 MiB, stated: the answer must outgrow it.
        c.session.stream_buffer_bytes = 1 << 20;
    })
    .await;
    let mut c = h.connect("alice").await;
    c.send(json!({"type":"open","id":"big","model":"m",
        "messages":[{"role":"user","content":"talk"}]}))
        .await;
    let r = c.collect(&["big".to_string()]).await;
    let record = &r["big"];
    assert_eq!(record.end_type(), "done", "{:?}", record.end);
    assert!(
        record.text.len() > (1 << 20) + (1 << 18),
        "{}",
        record.text.len()
    );
    let end = record.end.clone().unwrap();
    assert_eq!(end["usage_estimated"], true, "{end}");
    assert_eq!(
        end["usage"]["completion_tokens"].as_u64().unwrap(),
        muxgate::test_support::count_tokens("m", &record.text),
        "billed for every token the client received"
    );
}
