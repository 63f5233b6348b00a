//! What a cross-instance relay costs per chunk (cluster mode, issue 14): two gateways on one
//! `redis-server` (started here on a free loopback port; Debian's `redis-server` package), one
//! mock upstream, a WebSocket client. The same stream of N chunks is read twice: from the
//! instance running it (local), and resumed on the other instance, which relays it from its
//! owner through Redis pub/sub (relayed). Prints, per chunk, the CPU time of this process
//! (both gateways, the mock and the client) and of `redis-server`, and the wall time.
//!
//!   cargo run --release --example relay_cost -- 20000
//!
//! CPU times come from /proc (Linux); the machine's load does not inflate them the way it
//! does wall time, but the figures still vary a few percent between runs.
#![allow(clippy::print_stdout, clippy::unwrap_used, clippy::expect_used)]

use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use muxgate::{mock, Config, Gateway};
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio_tungstenite::tungstenite::Message;

type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// utime + stime of a process, in seconds.
fn cpu_seconds(pid: &str) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("/proc");
    // Fields after the `(comm)`: state is field 3, utime 14, stime 15.
    let rest = &stat[stat.rfind(')').expect("comm") + 2..];
    let fields: Vec<&str> = rest.split(' ').collect();
    let ticks: f64 = fields[11].parse::<f64>().unwrap() + fields[12].parse::<f64>().unwrap();
    // CLK_TCK is 100 on Linux.
    ticks / 100.0
}

async fn gateway(redis_port: u16, upstream: &str) -> (Arc<Gateway>, String) {
    let env = |name: &str| match name {
        "MUXGATE_JWT_SECRET" => Some("relay-cost-secret-0123456789abcdef".to_string()),
        "MUXGATE_LISTEN" => Some("127.0.0.1:0".to_string()),
        _ => None,
    };
    let mut config = Config::load_with_env(None, &env).unwrap();
    config.providers = vec![muxgate::config::ProviderConfig::catch_all(
        "mock",
        upstream.to_string(),
        None,
    )];
    config.redis_url = Some(format!("redis://127.0.0.1:{redis_port}/"));
    // Long streams back to back: no tier limit should refuse one.
    for tier in config.tiers.values_mut() {
        tier.tpm = 1 << 40;
    }
    let listener = TcpListener::bind(config.listen).await.unwrap();
    let url = format!("ws://{}/v1/ws", listener.local_addr().unwrap());
    let gw = Gateway::start(config).await.unwrap();
    tokio::spawn(muxgate::serve(listener, gw.clone(), std::future::pending()));
    (gw, url)
}

async fn hello(url: &str, token: &str, resume: Value) -> Socket {
    let (mut ws, _) = tokio_tungstenite::connect_async(url).await.unwrap();
    let hello = json!({"type": "hello", "token": token, "resume": resume});
    ws.send(Message::Text(hello.to_string().into()))
        .await
        .unwrap();
    let welcome = next(&mut ws).await;
    assert_eq!(welcome["type"], "welcome", "{welcome}");
    ws
}

async fn next(ws: &mut Socket) -> Value {
    loop {
        match ws.next().await.expect("open").expect("frame") {
            Message::Text(t) => return serde_json::from_str(&t).unwrap(),
            _ => continue,
        }
    }
}

/// Reads stream `id` to its `done`; the number of deltas and the time from the first.
async fn read_to_end(ws: &mut Socket, id: &str) -> (u64, Duration) {
    let mut deltas = 0;
    let mut first = None;
    loop {
        let f = next(ws).await;
        if f["id"] != id {
            continue;
        }
        match f["type"].as_str() {
            Some("delta") => {
                first.get_or_insert_with(Instant::now);
                deltas += 1;
            }
            Some("done") => return (deltas, first.expect("a delta").elapsed()),
            Some("start" | "queued") => {}
            _ => panic!("{f}"),
        }
    }
}

#[tokio::main]
async fn main() {
    let n: u64 = std::env::args()
        .nth(1)
        .map_or(20_000, |a| a.parse().expect("a count"));
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let dir = tempfile::tempdir().unwrap();
    let mut redis = tokio::process::Command::new("redis-server")
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
        .args(["--save", "", "--appendonly", "no"])
        .arg("--dir")
        .arg(dir.path())
        .stdout(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("redis-server (Debian's package) on PATH");
    let redis_pid = redis.id().unwrap().to_string();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let upstream = mock::spawn(TcpListener::bind("127.0.0.1:0").await.unwrap(), None)
        .await
        .unwrap();
    let (a, url_a) = gateway(port, &upstream.base_url()).await;
    let (_b, url_b) = gateway(port, &upstream.base_url()).await;
    let token = a
        .issue_token("bench", "pro", Duration::from_secs(600))
        .unwrap();
    // The upstream waits before its first chunk, so the stream can move before any is sent.
    let prompt = format!("relay cost [[mock chunks={n} stall_ms=500]]");
    let open = |id: &str| {
        json!({"type": "open", "id": id, "model": "deepseek-v3.2",
               "messages": [{"role": "user", "content": prompt}]})
        .to_string()
    };
    let me = std::process::id().to_string();
    let mut results = Vec::new();
    for (round, relayed) in [(0, false), (1, true), (2, false), (3, true)] {
        let id = format!("s{round}");
        let mut ws = hello(&url_a, &token, json!([])).await;
        ws.send(Message::Text(open(&id).into())).await.unwrap();
        if relayed {
            tokio::time::sleep(Duration::from_millis(100)).await;
            drop(ws);
            ws = hello(&url_b, &token, json!([{"id": id, "after": 0}])).await;
        }
        let (cpu, redis_cpu) = (cpu_seconds(&me), cpu_seconds(&redis_pid));
        // The stall is idle time: it adds nothing to the CPU times.
        let (deltas, wall) = read_to_end(&mut ws, &id).await;
        assert_eq!(deltas, n);
        let cpu = cpu_seconds(&me) - cpu;
        let redis_cpu = cpu_seconds(&redis_pid) - redis_cpu;
        results.push((relayed, cpu, redis_cpu, wall));
    }
    println!("{n} chunks per stream; per chunk:");
    for (relayed, cpu, redis_cpu, wall) in &results {
        let per = |s: f64| s * 1e6 / n as f64;
        println!(
            "{:8} gateway+mock+client CPU {:6.2} µs, redis-server CPU {:5.2} µs, wall {:6.2} µs",
            if *relayed { "relayed" } else { "local" },
            per(*cpu),
            per(*redis_cpu),
            per(wall.as_secs_f64()),
        );
    }
    redis.kill().await.unwrap();
}
