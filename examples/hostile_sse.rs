//! What one hostile upstream costs a gateway process: it answers 200 `text/event-stream` and
//! sends one SSE line of `--line-mb` MB with no line end (then closes), while a healthy stream
//! from the mock upstream runs beside it on the same WebSocket. Works against any build of the
//! gateway binary (the old one included: its config only uses keys every version knows).
//!
//! Prints one JSON line: the gateway's CPU time (utime + stime from /proc) and peak RSS over the
//! run, how the hostile stream ended and after how long, how many bytes the hostile upstream got
//! to write before the gateway hung up, and the healthy stream's largest gap between deltas.
//!
//! `cargo run --release --example hostile_sse -- --gateway target/release/muxgate [--line-mb 50]
//! [--max-secs 300]`: past `--max-secs` it stops waiting and prints what it has (an old build
//! can take far longer than that on a 50 MB line).
#![allow(clippy::unwrap_used, clippy::print_stdout)]

use std::process::Stdio;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use muxgate::mock;
use muxgate::Authenticator;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio_tungstenite::tungstenite::Message;

const SECRET: &str = "hostile-sse-measure-0123456789";
/// `getconf CLK_TCK` on Linux.
const CLK_TCK: f64 = 100.0;

fn arg(name: &str) -> Option<String> {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let Some(close) = stat.rfind(')') else {
        return 0.0;
    };
    let f: Vec<&str> = stat[close + 1..].split_whitespace().collect();
    let n = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    (n(11) + n(12)) as f64 / CLK_TCK
}

fn peak_rss_mib(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}

/// The hostile upstream: reads one request, answers with a line that never ends.
async fn hostile(
    listener: TcpListener,
    line: u64,
    written: Arc<AtomicU64>,
    finished: Arc<AtomicBool>,
    attempts: Arc<AtomicU64>,
) {
    loop {
        let Ok((mut tcp, _)) = listener.accept().await else {
            return;
        };
        attempts.fetch_add(1, Ordering::Relaxed);
        let (written, finished) = (written.clone(), finished.clone());
        tokio::spawn(async move {
            let mut buf = Vec::new();
            let mut chunk = [0u8; 8192];
            loop {
                let Ok(n) = tcp.read(&mut chunk).await else {
                    return;
                };
                if n == 0 {
                    return;
                }
                buf.extend_from_slice(&chunk[..n]);
                let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
                    continue;
                };
                let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
                let len: usize = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length:"))
                    .and_then(|v| v.trim().parse().ok())
                    .unwrap_or(0);
                if buf.len() >= end + 4 + len {
                    break;
                }
            }
            let head = "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nconnection: close\r\n\r\ndata: ";
            if tcp.write_all(head.as_bytes()).await.is_err() {
                return;
            }
            let block = vec![b'x'; 64 << 10];
            let mut sent = 0;
            while sent < line {
                if tcp.write_all(&block).await.is_err() {
                    break;
                }
                sent += block.len() as u64;
                written.fetch_add(block.len() as u64, Ordering::Relaxed);
            }
            finished.store(true, Ordering::SeqCst);
        });
    }
}

#[tokio::main]
async fn main() {
    let gateway = arg("--gateway").expect("--gateway PATH (a muxgate binary)");
    let line_mb: u64 = arg("--line-mb").map_or(50, |v| v.parse().unwrap());
    let line = line_mb << 20;
    let max_secs: u64 = arg("--max-secs").map_or(300, |v| v.parse().unwrap());

    let mock = mock::spawn(TcpListener::bind("127.0.0.1:0").await.unwrap(), None)
        .await
        .unwrap();
    let hostile_listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let hostile_url = format!("http://{}/v1", hostile_listener.local_addr().unwrap());
    let written = Arc::new(AtomicU64::new(0));
    let finished = Arc::new(AtomicBool::new(false));
    let attempts = Arc::new(AtomicU64::new(0));
    tokio::spawn(hostile(
        hostile_listener,
        line,
        written.clone(),
        finished.clone(),
        attempts.clone(),
    ));

    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("muxgate.toml");
    std::fs::write(
        &config,
        format!(
            r#"listen = "127.0.0.1:{port}"

[[providers]]
name = "hostile"
base_url = "{hostile_url}"
models = ["hostile"]
first_token_timeout_ms = 300000
idle_timeout_ms = 300000

[[providers]]
name = "mock"
base_url = "{}"
models = ["*"]
"#,
            mock.base_url()
        ),
    )
    .unwrap();
    let mut child = tokio::process::Command::new(&gateway)
        .arg("--config")
        .arg(&config)
        .env("MUXGATE_JWT_SECRET", SECRET)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("start the gateway");
    let pid = child.id().unwrap();
    let http = reqwest::Client::new();
    let up = Instant::now();
    while http
        .get(format!("http://127.0.0.1:{port}/healthz"))
        .send()
        .await
        .is_err()
    {
        assert!(
            up.elapsed() < Duration::from_secs(20),
            "gateway never came up"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let auth = Authenticator::new(SECRET.as_bytes(), 30, vec!["pro".into()]);
    let token = auth
        .issue("measure", "pro", Duration::from_secs(600))
        .unwrap();
    let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://127.0.0.1:{port}/v1/ws"))
        .await
        .unwrap();
    let send = |v: Value| Message::Text(v.to_string().into());
    ws.send(send(json!({"type":"hello","token":token})))
        .await
        .unwrap();
    let cpu_before = cpu_seconds(pid);
    let started = Instant::now();
    // 300 chunks 10 ms apart: about 3 s of healthy stream.
    ws.send(send(json!({"type":"open","id":"healthy","model":"m",
        "messages":[{"role":"user","content":"[[mock chunks=300 delay_ms=10]]"}]})))
        .await
        .unwrap();
    ws.send(send(json!({"type":"open","id":"hostile","model":"hostile",
        "messages":[{"role":"user","content":"hi"}]})))
        .await
        .unwrap();

    let mut hostile_end: Option<(Value, Duration)> = None;
    let mut healthy_end: Option<Value> = None;
    let mut healthy_deltas = 0u64;
    let mut last_delta: Option<Instant> = None;
    let mut max_gap = Duration::ZERO;
    let mut closed: Option<String> = None;
    let deadline = Instant::now() + Duration::from_secs(max_secs);
    while hostile_end.is_none() || healthy_end.is_none() {
        let left = deadline.saturating_duration_since(Instant::now());
        let msg = match tokio::time::timeout(left, ws.next()).await {
            Err(_) => {
                closed = Some(format!("still open after --max-secs {max_secs}"));
                break;
            }
            Ok(Some(Ok(Message::Text(t)))) => serde_json::from_str::<Value>(&t).unwrap(),
            Ok(Some(Ok(Message::Close(f)))) => {
                closed = Some(format!("{f:?}"));
                break;
            }
            Ok(Some(Ok(_))) => continue,
            Ok(other) => {
                closed = Some(format!("{other:?}"));
                break;
            }
        };
        let now = Instant::now();
        match (msg["id"].as_str(), msg["type"].as_str()) {
            (Some("healthy"), Some("delta")) => {
                healthy_deltas += 1;
                if let Some(last) = last_delta {
                    max_gap = max_gap.max(now - last);
                }
                last_delta = Some(now);
            }
            (Some("healthy"), Some("done" | "error")) => healthy_end = Some(msg),
            (Some("hostile"), Some("done" | "error")) => {
                hostile_end = Some((msg, started.elapsed()))
            }
            _ => {}
        }
    }
    // Let the hostile writer see the hang-up (or finish its line).
    let wait = Instant::now();
    while closed.is_none()
        && !finished.load(Ordering::SeqCst)
        && wait.elapsed() < Duration::from_secs(60)
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let cpu = cpu_seconds(pid) - cpu_before;
    let rss = peak_rss_mib(pid);
    let _ = child.kill().await;
    let (end, after) = hostile_end.map_or((Value::Null, None), |(v, d)| (v, Some(d)));
    println!(
        "{}",
        json!({
            "gateway": gateway,
            "line_mb": line_mb,
            "gateway_cpu_s": (cpu * 100.0).round() / 100.0,
            "gateway_peak_rss_mib": rss.round(),
            "hostile_end": {"type": end["type"], "code": end["code"], "message": end["message"]},
            "hostile_end_after_ms": after.map(|d| d.as_millis() as u64),
            "measured_for_ms": started.elapsed().as_millis() as u64,
            "hostile_bytes_written": written.load(Ordering::Relaxed),
            "hostile_upstream_calls": attempts.load(Ordering::Relaxed),
            "healthy_end": healthy_end.as_ref().map(|v| v["type"].clone()),
            "healthy_deltas": healthy_deltas,
            "healthy_max_gap_ms": max_gap.as_millis() as u64,
            "connection_closed": closed,
        })
    );
}
