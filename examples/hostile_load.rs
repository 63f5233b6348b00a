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
//!   used up; every one is refused `rate_limited`. Default N = 100000.
//! - `bigname N`: N opens with a 1 MB `name`, all refused by the rate limit. Default N = 10.
//! - `retained N`: one pro user runs N streams one after another, each with ~1 MiB of frames,
//!   and leaves them finished within the resume window. Default N = 100.
//!
//! Loopback only; every scenario is bounded in count and in time (120 s).
#![allow(clippy::unwrap_used, clippy::print_stdout)]

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use muxgate::auth::Authenticator;
use muxgate::mock;
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
    Gateway {
        child,
        addr,
        auth: Authenticator::new(SECRET.as_bytes(), 30, tiers),
    }
}

/// Opens `n` streams of `open(i)` on `ws` and reads until each has ended; returns how many
/// ended refused with `rate_limited`.
async fn open_all(ws: &mut Ws, n: usize, open: impl Fn(usize) -> Value) -> usize {
    let (mut sent, mut ended, mut refused) = (0, 0, 0);
    // A window of opens in flight: the gateway's control queue is bounded, so a client that
    // never reads would only stall itself.
    while ended < n {
        while sent < n && sent - ended < 64 {
            send(ws, open(sent)).await;
            sent += 1;
        }
        let f = recv(ws).await;
        match f["type"].as_str() {
            Some("done") => ended += 1,
            Some("error") if f["id"].is_string() => {
                ended += 1;
                if f["code"] == "rate_limited" {
                    refused += 1;
                }
            }
            _ => {}
        }
    }
    refused
}

async fn use_up_rate_limit(ws: &mut Ws) {
    open_all(ws, 60, |i| {
        json!({"type":"open","id":format!("warm{i}"),"model":"m",
            "messages":[{"role":"user","content":"hi [[mock chunks=1]]"}]})
    })
    .await;
}

async fn refused(binary: &str, n: usize) {
    let gw = start(binary).await;
    let mut ws = gw.connect("refused", "free").await;
    use_up_rate_limit(&mut ws).await;
    let (rss0, cpu0) = gw.usage();
    let t = Instant::now();
    let refused = open_all(&mut ws, n, |i| {
        json!({"type":"open","id":format!("r{i}"),"model":"m",
            "messages":[{"role":"user","content":"hi"}]})
    })
    .await;
    let (rss1, cpu1) = gw.usage();
    println!(
        "refused: {refused}/{n} opens refused in {:.1} s; RSS {} -> {} KiB (+{:.1} MiB); CPU {:.2} s",
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
    let refused = open_all(&mut ws, n, |i| {
        json!({"type":"open","id":format!("b{i}"),"model":"m",
            "messages":[{"role":"user","name":name,"content":"hi"}]})
    })
    .await;
    let (rss1, cpu1) = gw.usage();
    println!(
        "bigname: {refused}/{n} refused opens with a 1 MB name in {:.1} s; CPU {:.2} s ({:.3} CPU-s each); RSS {} -> {} KiB",
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
    let refused = open_all(&mut ws, n, |i| {
        json!({"type":"open","id":format!("big{i}"),"model":"m",
            "messages":[{"role":"user","content":format!("answer {i} [[mock chunks=256 chunk_bytes=4096]]")}],
            "params":{"max_tokens":10}})
    })
    .await;
    assert!(
        t.elapsed() < Duration::from_secs(25),
        "the window would expire"
    );
    let (rss1, cpu1) = gw.usage();
    println!(
        "retained: {n} finished streams of ~1 MiB ({refused} refused) in {:.1} s; RSS {} -> {} KiB (+{:.1} MiB); CPU {:.2} s",
        t.elapsed().as_secs_f64(),
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
        eprintln!("usage: hostile_load BINARY [refused N] [bigname N] [retained N]");
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
        rest = ["refused", "bigname", "retained"]
            .map(|s| (s.to_string(), None))
            .to_vec();
    }
    for (scenario, n) in rest {
        let run = async {
            match scenario.as_str() {
                "refused" => refused(binary, n.unwrap_or(100_000).min(1_000_000)).await,
                "bigname" => bigname(binary, n.unwrap_or(10).min(100)).await,
                "retained" => retained(binary, n.unwrap_or(100).min(500)).await,
                other => panic!("unknown scenario {other}"),
            }
        };
        tokio::time::timeout(LIMIT, run)
            .await
            .unwrap_or_else(|_| panic!("{scenario} did not finish within {LIMIT:?}"));
    }
}
