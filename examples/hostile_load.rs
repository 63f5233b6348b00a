//! What hostile clients cost a gateway binary, measured from outside: its RSS (VmRSS) and CPU
//! time (utime + stime) from `/proc`, before and after each scenario. For comparing two builds
//! (issue 9: refused opens, big-`name` prompts, finished streams pinning memory).
//!
//! ```text
//! cargo run --release --example hostile_load -- BINARY [SCENARIO...]
//! ```
//!
//! Starts BINARY (a `muxgate` build) on a loopback port against the mock upstream, run
//! in-process on another loopback port, with the default tiers. Scenarios (default: all):
//! - `refused N`: one free-tier socket sends N small opens after its 60 requests a minute are
//!   used up; every one is refused (`rate_limited`, or on old builds also
//!   `too_many_streams`, as refused streams counted as live until their task ran). Default
//!   N = 100000.
//! - `bigname N`: N opens with a 1 MB `name` after the rate limit is used up. Default N = 10.
//! - `preauth N`: N sockets each send, instead of `hello`, one frame of 8 MiB - 1 KiB (under
//!   the WebSocket layer's 8 × `max_frame_bytes`); RSS is read 4.5 s in, before the 5 s
//!   hello timeout. Default N = 20.
//! - `retained N`: one pro user runs N streams one after another, each with ~1 MiB of frames,
//!   and leaves them finished within the resume window. Default N = 100.
//! - `idle`: the RSS (anonymous and file-backed apart) before the first connection, then after
//!   one connection's first stream, whose prompt is counted (issue 15: the tokenizer tables).
//! - `prompt N`: one enterprise user (5M tokens a minute) opens N streams one after another, each with a prompt of one
//!   ~1 MiB run of `!` (one pre-tokenizer piece: the merges' worst case), which the gateway
//!   counts for the reservation before calling the upstream. Default N = 10.
//!
//! Loopback only; every scenario is bounded in count and in time (120 s).
#![allow(clippy::unwrap_used, clippy::print_stdout)]

use std::collections::BTreeMap;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use muxgate::mock;
use muxgate::Authenticator;
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio_tungstenite::tungstenite::Message;

const SECRET: &str = "hostile-load-secret-0123456789";
const LIMIT: Duration = Duration::from_secs(120);

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

struct Gateway {
    child: Child,
    addr: String,
    auth: Authenticator,
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Gateway {
    /// RSS in KiB and CPU seconds (user + system) of the gateway process.
    fn usage(&self) -> (u64, f64) {
        let pid = self.child.id();
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        let rss = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap();
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
        // Fields after the command name, which is in parentheses and may hold spaces.
        let fields: Vec<&str> = stat[stat.rfind(')').unwrap() + 2..].split(' ').collect();
        let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
        (rss, ticks as f64 / 100.0)
    }

    /// VmRSS, RssAnon and RssFile in MiB, as one line.
    fn memory(&self) -> String {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        ["VmRSS", "RssAnon", "RssFile"]
            .iter()
            .map(|key| {
                let kib: f64 = status
                    .lines()
                    .find_map(|l| l.strip_prefix(&format!("{key}:")))
                    .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
                    .unwrap();
                format!("{key} {:.1} MiB", kib / 1024.0)
            })
            .collect::<Vec<_>>()
            .join(", ")
    }

    async fn connect(&self, user: &str, tier: &str) -> Ws {
        let token = self
            .auth
            .issue(user, tier, Duration::from_secs(3600))
            .unwrap();
        let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://{}/v1/ws", self.addr))
            .await
            .unwrap();
        send(&mut ws, json!({"type":"hello","token":token})).await;
        let welcome = recv(&mut ws).await;
        assert_eq!(welcome["type"], "welcome", "{welcome}");
        ws
    }
}

async fn send(ws: &mut Ws, v: Value) {
    ws.send(Message::Text(v.to_string().into())).await.unwrap();
}

async fn recv(ws: &mut Ws) -> Value {
    loop {
        match tokio::time::timeout(LIMIT, ws.next()).await.unwrap() {
            Some(Ok(Message::Text(t))) => return serde_json::from_str(&t).unwrap(),
            Some(Ok(Message::Close(c))) => panic!("closed: {c:?}"),
            Some(Ok(_)) => continue,
            other => panic!("socket ended: {other:?}"),
        }
    }
}

async fn start(binary: &str) -> Gateway {
    let mock = mock::spawn(TcpListener::bind("127.0.0.1:0").await.unwrap(), None)
        .await
        .unwrap();
    let base_url = mock.base_url();
    // The mock lives as long as the process.
    std::mem::forget(mock);
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let addr = format!("127.0.0.1:{port}");
    let child = Command::new(binary)
        .env_clear()
        .env("MUXGATE_JWT_SECRET", SECRET)
        .env("MUXGATE_LISTEN", &addr)
        .env("MUXGATE_UPSTREAM_BASE_URL", base_url)
        .env("RUST_LOG", "error")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while tokio::net::TcpStream::connect(&addr).await.is_err() {
        assert!(Instant::now() < deadline, "{binary} did not start");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let tiers = ["free", "pro", "enterprise"].map(String::from).to_vec();
    let gw = Gateway {
        child,
        addr,
        auth: Authenticator::new(SECRET.as_bytes(), 30, tiers),
    };
    // The tokenizers are built in the background at start: measure from after that, once the
    // RSS has held still for a second.
    let mut last = gw.usage().0;
    let mut still = 0;
    while still < 5 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let rss = gw.usage().0;
        still = if rss == last { still + 1 } else { 0 };
        last = rss;
    }
    gw
}

/// Opens `n` streams of `open(i)` on `ws` and reads until each has ended; returns how many
/// ended with each outcome (`done` or the error code).
async fn open_all(
    ws: &mut Ws,
    n: usize,
    window: usize,
    open: impl Fn(usize) -> Value,
) -> BTreeMap<String, usize> {
    let (mut sent, mut ended) = (0, 0);
    let mut outcomes = BTreeMap::new();
    // A window of opens in flight: the gateway's control queue is bounded, so a client that
    // never reads would only stall itself.
    while ended < n {
        while sent < n && sent - ended < window {
            send(ws, open(sent)).await;
            sent += 1;
        }
        let f = recv(ws).await;
        let outcome = match f["type"].as_str() {
            Some("done") => "done".to_string(),
            Some("error") if f["id"].is_string() => f["code"].as_str().unwrap().to_string(),
            _ => continue,
        };
        ended += 1;
        *outcomes.entry(outcome).or_insert(0) += 1;
    }
    outcomes
}

/// Opens small streams until one is refused: the user's requests per minute are used up.
async fn use_up_rate_limit(ws: &mut Ws) {
    for i in 0.. {
        let outcomes = open_all(ws, 1, 1, |_| {
            json!({"type":"open","id":format!("warm{i}"),"model":"m",
                "messages":[{"role":"user","content":"hi [[mock chunks=1]]"}]})
        })
        .await;
        if outcomes.contains_key("rate_limited") {
            return;
        }
    }
}

async fn refused(binary: &str, n: usize) {
    let gw = start(binary).await;
    let mut ws = gw.connect("refused", "free").await;
    use_up_rate_limit(&mut ws).await;
    let (rss0, cpu0) = gw.usage();
    let t = Instant::now();
    let outcomes = open_all(&mut ws, n, 64, |i| {
        json!({"type":"open","id":format!("r{i}"),"model":"m",
            "messages":[{"role":"user","content":"hi"}]})
    })
    .await;
    let (rss1, cpu1) = gw.usage();
    println!(
        "refused: {n} opens ({outcomes:?}) in {:.1} s; RSS {} -> {} KiB (+{:.1} MiB); CPU {:.2} s",
        t.elapsed().as_secs_f64(),
        rss0,
        rss1,
        (rss1 as f64 - rss0 as f64) / 1024.0,
        cpu1 - cpu0
    );
}

async fn bigname(binary: &str, n: usize) {
    let gw = start(binary).await;
    let mut ws = gw.connect("bigname", "free").await;
    use_up_rate_limit(&mut ws).await;
    let name = "a".repeat(1_000_000);
    let (rss0, cpu0) = gw.usage();
    let t = Instant::now();
    let outcomes = open_all(&mut ws, n, 64, |i| {
        json!({"type":"open","id":format!("b{i}"),"model":"m",
            "messages":[{"role":"user","name":name,"content":"hi"}]})
    })
    .await;
    let (rss1, cpu1) = gw.usage();
    println!(
        "bigname: {n} opens with a 1 MB name ({outcomes:?}) in {:.1} s; CPU {:.2} s ({:.3} CPU-s each); RSS {} -> {} KiB",
        t.elapsed().as_secs_f64(),
        cpu1 - cpu0,
        (cpu1 - cpu0) / n as f64,
        rss0,
        rss1
    );
}

async fn retained(binary: &str, n: usize) {
    let gw = start(binary).await;
    let mut ws = gw.connect("retained", "pro").await;
    let (rss0, cpu0) = gw.usage();
    let t = Instant::now();
    // 256 chunks of 4 KiB: each stream's log holds about 1 MiB when it finishes.
    // Fewer in flight than the tier's live streams, so none is refused.
    let outcomes = open_all(&mut ws, n, 16, |i| {
        json!({"type":"open","id":format!("big{i}"),"model":"m",
            "messages":[{"role":"user","content":format!("answer {i} [[mock chunks=256 chunk_bytes=4096]]")}]})
    })
    .await;
    assert!(
        t.elapsed() < Duration::from_secs(25),
        "the window would expire"
    );
    let (rss1, cpu1) = gw.usage();
    println!(
        "retained: {n} streams of ~1 MiB ({outcomes:?}) in {:.1} s; RSS {} -> {} KiB (+{:.1} MiB); CPU {:.2} s",
        t.elapsed().as_secs_f64(),
        rss0,
        rss1,
        (rss1 as f64 - rss0 as f64) / 1024.0,
        cpu1 - cpu0
    );
}

async fn idle(binary: &str) {
    let gw = start(binary).await;
    let before = gw.memory();
    let mut ws = gw.connect("idle", "pro").await;
    let outcomes = open_all(&mut ws, 1, 1, |_| {
        json!({"type":"open","id":"first","model":"gpt-4o",
            "messages":[{"role":"user","content":"Count me, then answer. [[mock chunks=3]]"}]})
    })
    .await;
    // Let the allocator settle as `start` does.
    tokio::time::sleep(Duration::from_secs(1)).await;
    println!("idle: before the first connection: {before}");
    println!(
        "idle: after one stream ({outcomes:?}), its connection open: {}",
        gw.memory()
    );
}

async fn prompt(binary: &str, n: usize) {
    let gw = start(binary).await;
    let mut ws = gw.connect("prompt", "enterprise").await;
    // Under the 1 MiB frame limit with the frame's JSON around it.
    let flood = "!".repeat((1 << 20) - 4096);
    let (rss0, cpu0) = gw.usage();
    let t = Instant::now();
    let outcomes = open_all(&mut ws, n, 1, |i| {
        json!({"type":"open","id":format!("p{i}"),"model":"m","max_tokens":1,
            "messages":[{"role":"user","content":format!("{flood} [[mock chunks=1]]")}]})
    })
    .await;
    let (rss1, cpu1) = gw.usage();
    println!(
        "prompt: {n} opens with a ~1 MiB run of one character ({outcomes:?}) in {:.1} s; CPU {:.2} s ({:.3} CPU-s each); RSS {} -> {} KiB",
        t.elapsed().as_secs_f64(),
        cpu1 - cpu0,
        (cpu1 - cpu0) / n as f64,
        rss0,
        rss1
    );
}

async fn preauth(binary: &str, n: usize) {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
    let gw = start(binary).await;
    let (rss0, cpu0) = gw.usage();
    let len: u64 = (8 << 20) - 1024;
    let mut senders = Vec::new();
    for _ in 0..n {
        let tcp = tokio::net::TcpStream::connect(&gw.addr).await.unwrap();
        let mut tcp = BufReader::new(tcp);
        let request = format!(
            "GET /v1/ws HTTP/1.1\r\nHost: {}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
            gw.addr
        );
        tcp.get_mut().write_all(request.as_bytes()).await.unwrap();
        let mut line = String::new();
        loop {
            line.clear();
            tcp.read_line(&mut line).await.unwrap();
            if line == "\r\n" {
                break;
            }
        }
        senders.push(tokio::spawn(async move {
            // A masked text frame with an all-zero mask, so the payload goes out as is: the
            // client spends nothing on masking.
            let mut header = vec![0x81, 0x80 | 127];
            header.extend_from_slice(&len.to_be_bytes());
            header.extend_from_slice(&[0, 0, 0, 0]);
            let tcp = tcp.get_mut();
            let _ = tcp.write_all(&header).await;
            let chunk = vec![b'x'; 64 * 1024];
            let mut sent = 0;
            while sent < len {
                let n = chunk.len().min((len - sent) as usize);
                if tcp.write_all(&chunk[..n]).await.is_err() {
                    break;
                }
                sent += n as u64;
            }
            // Hold the socket open until the scenario ends.
            std::future::pending::<()>().await;
        }));
    }
    // Just before the 5 s hello timeout would close them.
    tokio::time::sleep(Duration::from_millis(4_500)).await;
    let (rss1, cpu1) = gw.usage();
    for s in senders {
        s.abort();
    }
    println!(
        "preauth: {n} unauthenticated sockets sending an 8 MiB frame; RSS {} -> {} KiB (+{:.1} MiB); CPU {:.2} s",
        rss0,
        rss1,
        (rss1 as f64 - rss0 as f64) / 1024.0,
        cpu1 - cpu0
    );
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some(binary) = args.first() else {
        eprintln!("usage: hostile_load BINARY [refused N] [bigname N] [preauth N] [retained N] [idle] [prompt N]");
        std::process::exit(2);
    };
    let mut rest: Vec<(String, Option<usize>)> = Vec::new();
    for a in &args[1..] {
        match a.parse::<usize>() {
            Ok(n) => {
                if let Some(last) = rest.last_mut() {
                    last.1 = Some(n);
                }
            }
            Err(_) => rest.push((a.clone(), None)),
        }
    }
    if rest.is_empty() {
        rest = ["refused", "bigname", "preauth", "retained"]
            .map(|s| (s.to_string(), None))
            .to_vec();
    }
    for (scenario, n) in rest {
        let run = async {
            match scenario.as_str() {
                "refused" => refused(binary, n.unwrap_or(100_000).min(1_000_000)).await,
                "bigname" => bigname(binary, n.unwrap_or(10).min(100)).await,
                "preauth" => preauth(binary, n.unwrap_or(20).min(100)).await,
                "retained" => retained(binary, n.unwrap_or(100).min(500)).await,
                "idle" => idle(binary).await,
                "prompt" => prompt(binary, n.unwrap_or(10).min(100)).await,
                other => panic!("unknown scenario {other}"),
            }
        };
        tokio::time::timeout(LIMIT, run)
            .await
            .unwrap_or_else(|_| panic!("{scenario} did not finish within {LIMIT:?}"));
    }
}
