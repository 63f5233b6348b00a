//! The muxgate load generator (`docs/benchmarks.md`; `scripts/bench` runs it).
//!
//! A bench target with `harness = false` rather than a `src/bin/` binary: it needs
//! tokio-tungstenite and hdrhistogram, which are dev-dependencies, and it must not ship in
//! (or lengthen the build of) the product binary. It is a black-box client: it speaks the
//! wire protocol of `docs/protocol.md` and OpenAI-style SSE, mints its own HS256 tokens with
//! the gateway's secret, and never calls into the gateway's code.
//!
//! Subcommands (every one bounded in count and in wall time, loopback targets only):
//! - `stream`: K concurrent streams in a closed loop, either over muxgate WebSockets
//!   (C connections × S streams) or as plain SSE requests (the mock upstream directly, or
//!   LiteLLM). Records time to first token and inter-chunk gaps in HDR histograms, relayed
//!   chunks in the measurement window, and utime+stime of the server and mock processes from
//!   `/proc`. Appends one JSON line to `--out`.
//! - `idle`: reads the gateway's RSS before anything connects, then opens up to N idle
//!   connections in steps, reading RSS at each step, then opens live streams on some of them
//!   and reads RSS again. Appends one JSON line.
//! - `report`: turns the JSON lines of one run into the markdown tables of the doc; for
//!   `scripts/bench --hotpath`, first issue 15's summary (CPU per chunk ÷ nginx's, pinned TTFT,
//!   idle RSS; two builds side by side).
//!
//! Run with no arguments (as `cargo test --all-targets` does) it does nothing and exits 0.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::io::Write as _;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use futures_util::{SinkExt, StreamExt};
use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokio::sync::{mpsc, Semaphore};
use tokio::time::{sleep_until, timeout_at, Instant};
use tokio_tungstenite::tungstenite::Message;

#[derive(Parser)]
#[command(
    name = "loadgen",
    about = "muxgate load generator (see docs/benchmarks.md)"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// K concurrent streams in a closed loop; latency, throughput, CPU.
    Stream(StreamArgs),
    /// Idle connections in steps, then live streams; RSS of the gateway at each step.
    Idle(IdleArgs),
    /// Markdown tables from the JSON lines of one run.
    Report(ReportArgs),
    /// Long streams opened on one instance and read on another (cluster mode): what relaying a
    /// chunk between instances costs, against reading them where they run.
    Relay(RelayArgs),
    /// The gateway library served with TCP_NODELAY on accepted sockets: an A/B of the first
    /// suggested optimisation without touching `src/` (config from the environment, as
    /// `muxgate serve`; no graceful drain).
    GatewayNodelay(GatewayArgs),
}

#[derive(Args, Clone)]
struct GatewayArgs {
    /// Address to listen on (loopback); `MUXGATE_LISTEN` is ignored here.
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: std::net::SocketAddr,
}

#[derive(Args, Clone)]
struct StreamArgs {
    /// `ws` (muxgate) or `sse` (an OpenAI-compatible /chat/completions endpoint).
    #[arg(long)]
    target: String,
    /// ws://HOST:PORT/v1/ws, or http://HOST:PORT/v1/chat/completions.
    #[arg(long)]
    url: String,
    /// A name for this run in the report (e.g. `direct`, `muxgate`, `litellm`).
    #[arg(long)]
    label: String,
    /// Concurrent streams (K).
    #[arg(long)]
    streams: usize,
    /// Streams per WebSocket connection (S); connections = ceil(K / S). `ws` only.
    #[arg(long, default_value_t = 10)]
    per_conn: usize,
    /// Content chunks per stream (the mock's `chunks`).
    #[arg(long, default_value_t = 64)]
    chunks: u32,
    /// Pause between chunks (the mock's `delay_ms`): fixes each stream's token rate.
    #[arg(long, default_value_t = 20)]
    delay_ms: u64,
    /// Seconds of steady load measured, after the warm-up.
    #[arg(long, default_value_t = 20.0)]
    duration_s: f64,
    /// Seconds before measuring (starts are staggered over the first stream's length).
    #[arg(long, default_value_t = 3.0)]
    warmup_s: f64,
    /// Seconds to let open streams finish after the load stops; then they are cancelled.
    #[arg(long, default_value_t = 15.0)]
    drain_s: f64,
    #[arg(long, default_value = "mock-model")]
    model: String,
    /// Bearer token for `sse` (LiteLLM's master key).
    #[arg(long)]
    api_key: Option<String>,
    /// JWT secret for `ws` tokens (HS256, claims sub/tier/exp, as `muxgate token`).
    #[arg(long, env = "MUXGATE_JWT_SECRET", hide_env_values = true)]
    secret: Option<String>,
    #[arg(long, default_value = "pro")]
    tier: String,
    /// The server process (muxgate, or LiteLLM's master): CPU and RSS of it and its children.
    #[arg(long)]
    server_pid: Option<u32>,
    /// The mock upstream process, for its CPU.
    #[arg(long)]
    mock_pid: Option<u32>,
    /// Clock ticks per second of /proc/PID/stat (`getconf CLK_TCK`).
    #[arg(long, default_value_t = 100)]
    clk_tck: u64,
    /// Append the result as one JSON line here.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Extra JSON fields for the result line, e.g. '{"phase":"side"}'.
    #[arg(long, default_value = "{}")]
    tag: String,
}

#[derive(Args, Clone)]
struct IdleArgs {
    /// ws://HOST:PORT/v1/ws
    #[arg(long)]
    url: String,
    #[arg(long, env = "MUXGATE_JWT_SECRET", hide_env_values = true)]
    secret: String,
    #[arg(long, default_value = "pro")]
    tier: String,
    /// The gateway process whose RSS is read.
    #[arg(long)]
    server_pid: u32,
    /// Connection counts at which RSS is read, ascending.
    #[arg(long, value_delimiter = ',', default_value = "1000,5000,10000")]
    steps: Vec<usize>,
    /// Live-stream counts (one per connection, on the first connections) at which RSS is read;
    /// `0` alone reads none.
    #[arg(long, value_delimiter = ',', default_value = "1000,5000")]
    live: Vec<usize>,
    /// Handshakes in flight at once while ramping.
    #[arg(long, default_value_t = 200)]
    parallel: usize,
    /// Pause before each RSS reading, so the gateway's allocator settles.
    #[arg(long, default_value_t = 2000)]
    settle_ms: u64,
    /// Hard limit on the whole command.
    #[arg(long, default_value_t = 240)]
    max_s: u64,
    #[arg(long, default_value = "mock-model")]
    model: String,
    #[arg(long)]
    out: Option<PathBuf>,
    /// Extra JSON fields for the result line, e.g. '{"phase":"hp-idle","label":"muxgate"}'.
    #[arg(long, default_value = "{}")]
    tag: String,
}

#[derive(Args, Clone)]
struct RelayArgs {
    /// ws://HOST:PORT/v1/ws of the instance that opens (owns) the streams.
    #[arg(long)]
    owner_url: String,
    /// ws://HOST:PORT/v1/ws of the instance the clients move to; without it they stay on the
    /// owner (the local baseline).
    #[arg(long)]
    reader_url: Option<String>,
    #[arg(long)]
    label: String,
    /// Concurrent streams, all open for the whole window (no stream ends inside it).
    #[arg(long)]
    streams: usize,
    #[arg(long, default_value_t = 10)]
    per_conn: usize,
    #[arg(long, default_value_t = 50)]
    delay_ms: u64,
    #[arg(long, default_value_t = 15.0)]
    duration_s: f64,
    /// Seconds after every stream has moved, before measuring.
    #[arg(long, default_value_t = 3.0)]
    warmup_s: f64,
    #[arg(long, default_value = "mock-model")]
    model: String,
    #[arg(long, env = "MUXGATE_JWT_SECRET", hide_env_values = true)]
    secret: String,
    #[arg(long, default_value = "pro")]
    tier: String,
    /// The gateway processes whose CPU is summed (owner and reader).
    #[arg(long)]
    server_pid: Vec<u32>,
    #[arg(long, default_value_t = 100)]
    clk_tck: u64,
    #[arg(long)]
    out: Option<PathBuf>,
    #[arg(long, default_value = "{}")]
    tag: String,
}

#[derive(Args, Clone)]
struct ReportArgs {
    /// The JSON lines written by `stream` and `idle`.
    results: PathBuf,
}

fn main() -> Result<()> {
    // `cargo bench` appends `--bench`; `cargo test --all-targets` runs us with no argument.
    let args: Vec<String> = std::env::args().filter(|a| a != "--bench").collect();
    if args.len() <= 1 {
        eprintln!("loadgen: nothing to do (run scripts/bench, or `loadgen --help`)");
        return Ok(());
    }
    let cli = Cli::parse_from(args);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    match cli.cmd {
        Cmd::Stream(a) => rt.block_on(stream_cmd(a)),
        Cmd::Idle(a) => rt.block_on(idle_cmd(a)),
        Cmd::Report(a) => report_cmd(&a),
        Cmd::Relay(a) => rt.block_on(relay_cmd(a)),
        Cmd::GatewayNodelay(a) => rt.block_on(gateway_nodelay(a)),
    }
}

async fn gateway_nodelay(a: GatewayArgs) -> Result<()> {
    use axum::serve::ListenerExt;
    if !a.listen.ip().is_loopback() {
        bail!("the bench gateway listens on loopback only");
    }
    // Logs as `muxgate serve` does (text, MUXGATE_LOG, default info), so both cost the same.
    let filter = tracing_subscriber::EnvFilter::try_from_env("MUXGATE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    let path = std::env::var_os("MUXGATE_CONFIG").map(PathBuf::from);
    let config = muxgate::Config::load(path.as_deref())?;
    let gw = muxgate::Gateway::start(config).await?;
    let listener = tokio::net::TcpListener::bind(a.listen).await?;
    let addr = listener.local_addr()?;
    {
        let mut stdout = std::io::stdout().lock();
        writeln!(stdout, "muxgate: listening on http://{addr}")?;
        stdout.flush()?;
    }
    let listener = listener.tap_io(|tcp| {
        let _ = tcp.set_nodelay(true);
    });
    axum::serve(listener, muxgate::app(gw)).await?;
    Ok(())
}

// ---------------------------------------------------------------------------------------
// /proc readings

/// Every pid in the tree rooted at `root` (LiteLLM runs its workers as children).
fn proc_tree(root: u32) -> Vec<u32> {
    let mut parent_of = Vec::new();
    if let Ok(dir) = std::fs::read_dir("/proc") {
        for entry in dir.flatten() {
            let Some(pid) = entry
                .file_name()
                .to_str()
                .and_then(|s| s.parse::<u32>().ok())
            else {
                continue;
            };
            if let Some(fields) = stat_fields(pid) {
                if let Some(ppid) = fields.get(1).and_then(|p| p.parse::<u32>().ok()) {
                    parent_of.push((pid, ppid));
                }
            }
        }
    }
    let mut tree = vec![root];
    let mut i = 0;
    while i < tree.len() {
        let p = tree[i];
        tree.extend(parent_of.iter().filter(|(_, pp)| *pp == p).map(|(c, _)| *c));
        i += 1;
    }
    tree
}

/// The fields of /proc/PID/stat after the command name (field 3, `state`, is index 0).
fn stat_fields(pid: u32) -> Option<Vec<String>> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 1..];
    Some(rest.split_whitespace().map(str::to_owned).collect())
}

/// utime + stime of the process (all its threads), in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    stat_fields(pid)
        .map(|f| {
            let n = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
            n(11) + n(12)
        })
        .unwrap_or(0)
}

fn tree_cpu_ticks(root: u32) -> u64 {
    proc_tree(root).into_iter().map(cpu_ticks).sum()
}

fn status_kb(pid: u32, key: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(key))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

fn tree_rss_kb(root: u32) -> u64 {
    proc_tree(root)
        .into_iter()
        .map(|p| status_kb(p, "VmRSS:"))
        .sum()
}

fn fd_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

fn self_cpu_ticks() -> u64 {
    cpu_ticks(std::process::id())
}

// ---------------------------------------------------------------------------------------
// Tokens

#[derive(Serialize)]
struct Claims<'a> {
    sub: &'a str,
    tier: &'a str,
    exp: u64,
}

fn token(secret: &str, user: &str, tier: &str) -> Result<String> {
    let exp = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs() + 3600;
    let claims = Claims {
        sub: user,
        tier,
        exp,
    };
    Ok(jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
    )?)
}

// ---------------------------------------------------------------------------------------
// Recording

fn histogram() -> Histogram<u64> {
    // Microseconds, 1 µs .. 10 min, 3 significant digits.
    Histogram::new_with_bounds(1, 600_000_000, 3).expect("valid histogram bounds")
}

/// What one connection or one SSE slot saw; merged at the end, so no lock on the hot path.
struct Recorder {
    ttft: Histogram<u64>,
    gap: Histogram<u64>,
    /// Content chunks received inside the measurement window.
    chunks_window: u64,
    chunks_total: u64,
    streams_ok: u64,
    /// Streams that ended with fewer or more chunks than asked, or a seq gap.
    streams_short: u64,
    streams_err: u64,
    /// Streams still open at the hard deadline (then cancelled).
    unfinished: u64,
    errors: BTreeMap<String, u64>,
}

impl Recorder {
    fn new() -> Self {
        Recorder {
            ttft: histogram(),
            gap: histogram(),
            chunks_window: 0,
            chunks_total: 0,
            streams_ok: 0,
            streams_short: 0,
            streams_err: 0,
            unfinished: 0,
            errors: BTreeMap::new(),
        }
    }

    fn merge(&mut self, o: Recorder) {
        let _ = self.ttft.add(&o.ttft);
        let _ = self.gap.add(&o.gap);
        self.chunks_window += o.chunks_window;
        self.chunks_total += o.chunks_total;
        self.streams_ok += o.streams_ok;
        self.streams_short += o.streams_short;
        self.streams_err += o.streams_err;
        self.unfinished += o.unfinished;
        for (k, v) in o.errors {
            *self.errors.entry(k).or_default() += v;
        }
    }

    fn error(&mut self, what: impl Into<String>) {
        self.streams_err += 1;
        let mut what: String = what.into();
        what.truncate(120);
        *self.errors.entry(what).or_default() += 1;
    }
}

/// The measurement window, shared by every task.
#[derive(Clone, Copy)]
struct Window {
    warm: Instant,
    end: Instant,
    hard: Instant,
}

/// One stream in flight, as the client sees it.
struct Live {
    opened: Instant,
    last: Option<Instant>,
    chunks: u32,
    seq_ok: bool,
}

impl Live {
    fn new(opened: Instant) -> Self {
        Live {
            opened,
            last: None,
            chunks: 0,
            seq_ok: true,
        }
    }

    /// One content chunk arrived now.
    fn chunk(&mut self, rec: &mut Recorder, w: &Window, seq: Option<u64>) {
        let now = Instant::now();
        self.chunks += 1;
        if let Some(seq) = seq {
            self.seq_ok &= seq == u64::from(self.chunks);
        }
        rec.chunks_total += 1;
        let in_window = now >= w.warm && now < w.end;
        if in_window {
            rec.chunks_window += 1;
        }
        match self.last {
            None if self.opened >= w.warm && self.opened < w.end => {
                rec.ttft.saturating_record(micros(now - self.opened));
            }
            Some(last) if in_window => rec.gap.saturating_record(micros(now - last)),
            _ => {}
        }
        self.last = Some(now);
    }

    fn end(&self, rec: &mut Recorder, expected: u32) {
        if self.chunks == expected && self.seq_ok {
            rec.streams_ok += 1;
        } else {
            rec.streams_short += 1;
        }
    }
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX).max(1)
}

fn prompt(chunks: u32, delay_ms: u64, slot: usize) -> String {
    // The directive goes in the message, not in a header, so every path (direct, muxgate,
    // LiteLLM) forwards exactly the same request.
    format!("benchmark stream {slot} [[mock chunks={chunks} delay_ms={delay_ms}]]")
}

// ---------------------------------------------------------------------------------------
// `stream`

async fn stream_cmd(a: StreamArgs) -> Result<()> {
    if a.streams == 0 || a.streams > 20_000 {
        bail!("--streams must be in 1..=20000");
    }
    if a.duration_s > 600.0 || a.warmup_s > 120.0 || a.drain_s > 120.0 {
        bail!("--duration-s ≤ 600, --warmup-s ≤ 120, --drain-s ≤ 120");
    }
    let tag: Value = serde_json::from_str(&a.tag).context("--tag must be a JSON object")?;
    let start = Instant::now() + Duration::from_millis(300);
    let warm = start + Duration::from_secs_f64(a.warmup_s);
    let end = warm + Duration::from_secs_f64(a.duration_s);
    let w = Window {
        warm,
        end,
        hard: end + Duration::from_secs_f64(a.drain_s),
    };
    // Starts spread over one stream's length, so the load is steady rather than one burst.
    let stream_len = Duration::from_millis(a.delay_ms * u64::from(a.chunks.saturating_sub(1)))
        .max(Duration::from_millis(50));
    let offset = |slot: usize| start + stream_len.mul_f64(slot as f64 / a.streams as f64);

    // CPU and RSS sampled at the edges of the window, by a side task.
    let sampler = {
        let (server, mock) = (a.server_pid, a.mock_pid);
        tokio::spawn(async move {
            sleep_until(w.warm).await;
            let s0 = server.map(tree_cpu_ticks);
            let m0 = mock.map(cpu_ticks);
            let l0 = self_cpu_ticks();
            let t0 = Instant::now();
            sleep_until(w.end).await;
            let s1 = server.map(tree_cpu_ticks);
            let m1 = mock.map(cpu_ticks);
            let l1 = self_cpu_ticks();
            let elapsed = t0.elapsed();
            let rss = server.map(tree_rss_kb);
            let fds = server.map(fd_count);
            (
                s0.zip(s1).map(|(a, b)| b.saturating_sub(a)),
                m0.zip(m1).map(|(a, b)| b.saturating_sub(a)),
                l1.saturating_sub(l0),
                elapsed,
                rss,
                fds,
            )
        })
    };

    let mut total = Recorder::new();
    let conns;
    match a.target.as_str() {
        "ws" => {
            let secret = a
                .secret
                .clone()
                .context("--secret or MUXGATE_JWT_SECRET is needed for ws")?;
            let per = a.per_conn.clamp(1, 32);
            conns = a.streams.div_ceil(per);
            let mut tasks = Vec::with_capacity(conns);
            let cfg = Arc::new(a.clone());
            for c in 0..conns {
                let slots: Vec<(usize, Instant)> = (c * per..((c + 1) * per).min(a.streams))
                    .map(|s| (s, offset(s)))
                    .collect();
                let tok = token(&secret, &format!("bench-{c}"), &a.tier)?;
                let cfg = cfg.clone();
                tasks.push(tokio::spawn(async move {
                    let mut rec = Recorder::new();
                    if let Err(e) = ws_conn(&cfg, w, tok, slots, &mut rec).await {
                        rec.error(format!("connection: {e:#}"));
                    }
                    rec
                }));
            }
            for t in tasks {
                total.merge(t.await?);
            }
        }
        "sse" => {
            conns = a.streams;
            let client = reqwest::Client::builder()
                .tcp_nodelay(true)
                .pool_max_idle_per_host(a.streams)
                .build()?;
            let cfg = Arc::new(a.clone());
            let mut tasks = Vec::with_capacity(a.streams);
            for s in 0..a.streams {
                let (cfg, client, first) = (cfg.clone(), client.clone(), offset(s));
                tasks.push(tokio::spawn(async move {
                    let mut rec = Recorder::new();
                    sse_slot(&cfg, &client, w, s, first, &mut rec).await;
                    rec
                }));
            }
            for t in tasks {
                total.merge(t.await?);
            }
        }
        other => bail!("--target must be ws or sse, not {other}"),
    }
    let (server_ticks, mock_ticks, self_ticks, elapsed, rss_kb, fds) = sampler.await?;
    let secs = |t: u64| t as f64 / a.clk_tck as f64;
    let window_s = elapsed.as_secs_f64();
    let chunks = total.chunks_window as f64;
    let per_100k = |t: Option<u64>| t.filter(|_| chunks > 0.0).map(|t| secs(t) / chunks * 1e5);
    let mut result = json!({
        "kind": "stream",
        "label": a.label,
        "target": a.target,
        "streams": a.streams,
        "conns": conns,
        "chunks": a.chunks,
        "delay_ms": a.delay_ms,
        "window_s": window_s,
        "ttft_us": summary(&total.ttft),
        "gap_us": summary(&total.gap),
        "chunks_window": total.chunks_window,
        "chunks_total": total.chunks_total,
        "chunks_per_s": chunks / window_s,
        "offered_chunks_per_s": a.streams as f64 * 1000.0 / a.delay_ms.max(1) as f64,
        "server_cpu_s": server_ticks.map(secs),
        "server_cpu_s_per_100k": per_100k(server_ticks),
        "server_cpu_pct": server_ticks.map(|t| secs(t) / window_s * 100.0),
        "mock_cpu_s": mock_ticks.map(secs),
        "mock_cpu_s_per_100k": per_100k(mock_ticks),
        "loadgen_cpu_s": secs(self_ticks),
        "server_rss_kb": rss_kb,
        "server_fds": fds,
        "streams_ok": total.streams_ok,
        "streams_short": total.streams_short,
        "streams_err": total.streams_err,
        "unfinished": total.unfinished,
        "errors": total.errors,
    });
    if let (Some(obj), Value::Object(extra)) = (result.as_object_mut(), tag) {
        obj.extend(extra);
    }
    emit(&result, a.out.as_ref())?;
    let t = &result["ttft_us"];
    let g = &result["gap_us"];
    eprintln!(
        "{:>8} K={:<5} ttft p50 {:>8.3} ms p99 {:>8.3} ms | gap p50 {:>7.3} ms p99 {:>8.3} ms | {:>8.0} chunks/s | server cpu {} s/100k | ok {} short {} err {} unfinished {}",
        a.label,
        a.streams,
        ms(&t["p50"]),
        ms(&t["p99"]),
        ms(&g["p50"]),
        ms(&g["p99"]),
        chunks / window_s,
        result["server_cpu_s_per_100k"].as_f64().map_or("-".into(), |v| format!("{v:.3}")),
        total.streams_ok,
        total.streams_short,
        total.streams_err,
        total.unfinished,
    );
    Ok(())
}

fn ms(v: &Value) -> f64 {
    v.as_f64().unwrap_or(f64::NAN) / 1000.0
}

fn summary(h: &Histogram<u64>) -> Value {
    if h.is_empty() {
        return json!({"n": 0});
    }
    json!({
        "n": h.len(),
        "p50": h.value_at_quantile(0.50),
        "p90": h.value_at_quantile(0.90),
        "p99": h.value_at_quantile(0.99),
        "p999": h.value_at_quantile(0.999),
        "max": h.max(),
        "mean": h.mean(),
    })
}

fn emit(result: &Value, out: Option<&PathBuf>) -> Result<()> {
    let line = serde_json::to_string(result)?;
    if let Some(path) = out {
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .with_context(|| format!("cannot open {}", path.display()))?;
        writeln!(f, "{line}")?;
    } else {
        let mut stdout = std::io::stdout().lock();
        writeln!(stdout, "{line}")?;
    }
    Ok(())
}

/// A server frame, as much of it as the client needs (`text` is not even parsed).
#[derive(Deserialize)]
struct Frame<'a> {
    #[serde(rename = "type", borrow)]
    kind: Cow<'a, str>,
    #[serde(default, borrow)]
    id: Option<Cow<'a, str>>,
    #[serde(default)]
    seq: Option<u64>,
    #[serde(default, borrow)]
    code: Option<Cow<'a, str>>,
}

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn ws_connect(url: &str, token: &str, deadline: Instant) -> Result<Ws> {
    ws_connect_resuming(url, token, &json!([]), deadline).await
}

/// A connection whose `hello` resumes `resume` (`[{"id", "after"}]`).
async fn ws_connect_resuming(
    url: &str,
    token: &str,
    resume: &Value,
    deadline: Instant,
) -> Result<Ws> {
    let (mut ws, _) = timeout_at(
        deadline,
        tokio_tungstenite::connect_async_with_config(url, None, true),
    )
    .await
    .context("connect timed out")??;
    let hello =
        json!({"type": "hello", "token": token, "client": "muxgate-loadgen/0.1", "resume": resume});
    ws.send(Message::Text(hello.to_string().into())).await?;
    loop {
        let msg = timeout_at(deadline, ws.next())
            .await
            .context("no welcome in time")?;
        match msg {
            Some(Ok(Message::Text(t))) => {
                let f: Frame<'_> = serde_json::from_str(t.as_str())?;
                match f.kind.as_ref() {
                    "welcome" => return Ok(ws),
                    _ => bail!("expected welcome, got {}", t.as_str()),
                }
            }
            Some(Ok(_)) => continue,
            Some(Err(e)) => return Err(e.into()),
            None => bail!("closed before welcome"),
        }
    }
}

/// One WebSocket carrying up to S stream slots, each re-opening its stream as soon as the
/// previous one ends, until the window closes.
async fn ws_conn(
    a: &StreamArgs,
    w: Window,
    token: String,
    slots: Vec<(usize, Instant)>,
    rec: &mut Recorder,
) -> Result<()> {
    let connect_deadline = Instant::now() + Duration::from_secs(30);
    let mut ws = ws_connect(&a.url, &token, connect_deadline).await?;
    let messages = |slot: usize| {
        json!([{"role": "user", "content": prompt(a.chunks, a.delay_ms, slot)}]).to_string()
    };
    let bodies: Vec<String> = slots.iter().map(|(s, _)| messages(*s)).collect();
    let mut next: Vec<Option<Instant>> = slots.iter().map(|(_, t)| Some(*t)).collect();
    let mut live: Vec<Option<Live>> = slots.iter().map(|_| None).collect();
    let mut opened_n: Vec<u64> = vec![0; slots.len()];
    loop {
        let due = next.iter().flatten().min().copied();
        let busy = live.iter().any(Option::is_some);
        if due.is_none() && !busy {
            break;
        }
        let wake = due.unwrap_or(w.hard).min(w.hard);
        tokio::select! {
            msg = ws.next() => {
                let text = match msg {
                    Some(Ok(Message::Text(t))) => t,
                    Some(Ok(Message::Close(c))) => bail!("closed by the server: {c:?}"),
                    Some(Ok(_)) => continue,
                    Some(Err(e)) => bail!("read: {e}"),
                    None => bail!("closed by the server"),
                };
                let f: Frame<'_> = serde_json::from_str(text.as_str())?;
                let Some(i) = f.id.as_deref().and_then(|id| id.split(':').next()).and_then(|s| s.parse::<usize>().ok()) else {
                    if f.kind == "error" {
                        rec.error(format!("connection error: {}", f.code.as_deref().unwrap_or("?")));
                    }
                    continue;
                };
                let Some(Some(l)) = live.get_mut(i) else { continue };
                match f.kind.as_ref() {
                    "delta" => l.chunk(rec, &w, f.seq),
                    "done" => {
                        l.end(rec, a.chunks);
                        live[i] = None;
                        next[i] = Some(Instant::now());
                    }
                    "error" => {
                        rec.error(f.code.as_deref().unwrap_or("error").to_string());
                        live[i] = None;
                        // Back off a little so a refused stream does not spin.
                        next[i] = Some(Instant::now() + Duration::from_millis(100));
                    }
                    _ => {}
                }
            }
            _ = sleep_until(wake) => {
                let now = Instant::now();
                if now >= w.hard {
                    for (i, l) in live.iter_mut().enumerate() {
                        if l.take().is_some() {
                            rec.unfinished += 1;
                            let cancel = json!({"type": "cancel", "id": format!("{i}:{}", opened_n[i])});
                            let _ = ws.feed(Message::Text(cancel.to_string().into())).await;
                        }
                    }
                    let _ = tokio::time::timeout(Duration::from_secs(2), ws.flush()).await;
                    break;
                }
                for i in 0..next.len() {
                    if next[i].is_some_and(|t| t <= now) {
                        if now >= w.end {
                            next[i] = None;
                            continue;
                        }
                        next[i] = None;
                        opened_n[i] += 1;
                        // Ids are `slot:n`; the slot index is local to this connection.
                        let frame = format!(
                            r#"{{"type":"open","id":"{i}:{}","model":{},"messages":{}}}"#,
                            opened_n[i],
                            serde_json::to_string(&a.model)?,
                            bodies[i]
                        );
                        live[i] = Some(Live::new(Instant::now()));
                        ws.send(Message::Text(frame.into())).await?;
                    }
                }
            }
        }
    }
    let _ = tokio::time::timeout(Duration::from_secs(2), ws.close(None)).await;
    Ok(())
}

#[derive(Deserialize)]
struct SseChunk<'a> {
    #[serde(default, borrow)]
    choices: Vec<SseChoice<'a>>,
    #[serde(default)]
    error: Option<Value>,
}

#[derive(Deserialize)]
struct SseChoice<'a> {
    #[serde(default, borrow)]
    delta: Option<SseDelta<'a>>,
}

#[derive(Deserialize)]
struct SseDelta<'a> {
    #[serde(default, borrow)]
    content: Option<Cow<'a, str>>,
}

/// One slot of plain SSE requests in a closed loop.
async fn sse_slot(
    a: &StreamArgs,
    client: &reqwest::Client,
    w: Window,
    slot: usize,
    first: Instant,
    rec: &mut Recorder,
) {
    let body = json!({
        "model": a.model,
        "stream": true,
        "messages": [{"role": "user", "content": prompt(a.chunks, a.delay_ms, slot)}],
    })
    .to_string();
    let mut at = first;
    loop {
        sleep_until(at).await;
        let now = Instant::now();
        if now >= w.end {
            return;
        }
        let mut l = Live::new(now);
        match timeout_at(w.hard, sse_once(a, client, &body, &mut l, rec, &w)).await {
            Ok(Ok(())) => {
                l.end(rec, a.chunks);
                at = Instant::now();
            }
            Ok(Err(e)) => {
                rec.error(format!("{e:#}"));
                at = Instant::now() + Duration::from_millis(100);
            }
            Err(_) => {
                rec.unfinished += 1;
                return;
            }
        }
    }
}

async fn sse_once(
    a: &StreamArgs,
    client: &reqwest::Client,
    body: &str,
    l: &mut Live,
    rec: &mut Recorder,
    w: &Window,
) -> Result<()> {
    let mut req = client
        .post(&a.url)
        .header("content-type", "application/json")
        .header("accept", "text/event-stream")
        .body(body.to_owned());
    if let Some(key) = &a.api_key {
        req = req.bearer_auth(key);
    }
    let resp = req.send().await?;
    let status = resp.status();
    if !status.is_success() {
        let text = resp.text().await.unwrap_or_default();
        bail!(
            "HTTP {}: {}",
            status.as_u16(),
            text.chars().take(80).collect::<String>()
        );
    }
    let mut body = resp.bytes_stream();
    let mut buf: Vec<u8> = Vec::with_capacity(4096);
    while let Some(bytes) = body.next().await {
        buf.extend_from_slice(&bytes?);
        let mut consumed = 0;
        while let Some(pos) = find_event_end(&buf[consumed..]) {
            let event = &buf[consumed..consumed + pos];
            consumed += pos + 2;
            for line in event.split(|b| *b == b'\n') {
                let line = line.strip_suffix(b"\r").unwrap_or(line);
                let Some(data) = line.strip_prefix(b"data:") else {
                    continue;
                };
                let data = data.strip_prefix(b" ").unwrap_or(data);
                if data == b"[DONE]" {
                    return Ok(());
                }
                let chunk: SseChunk<'_> = serde_json::from_slice(data)
                    .with_context(|| format!("bad chunk {}", String::from_utf8_lossy(data)))?;
                if let Some(err) = chunk.error {
                    bail!("error event: {err}");
                }
                let has_text = chunk
                    .choices
                    .first()
                    .and_then(|c| c.delta.as_ref())
                    .and_then(|d| d.content.as_deref())
                    .is_some_and(|t| !t.is_empty());
                if has_text {
                    l.chunk(rec, w, None);
                }
            }
        }
        buf.drain(..consumed);
    }
    Ok(())
}

fn find_event_end(buf: &[u8]) -> Option<usize> {
    buf.windows(2).position(|w| w == b"\n\n")
}

// ---------------------------------------------------------------------------------------
// `idle`

enum ConnCmd {
    /// Open one long stream and count it live at its first delta.
    OpenLive,
    /// Cancel what is open and close.
    Close,
}

async fn idle_cmd(a: IdleArgs) -> Result<()> {
    let hard = Instant::now() + Duration::from_secs(a.max_s.min(900));
    let max_conns = a.steps.iter().copied().max().unwrap_or(0);
    if max_conns > 20_000 {
        bail!("at most 20000 connections");
    }
    let tag: Value = serde_json::from_str(&a.tag).context("--tag must be a JSON object")?;
    let settle = Duration::from_millis(a.settle_ms);
    // Before anything connects: what an operator sees of a freshly started gateway (a lazy
    // table would show up in the reading after the warm-up stream instead).
    sleep_until(Instant::now() + settle).await;
    let rss_fresh = status_kb(a.server_pid, "VmRSS:");
    eprintln!("idle: before the first connection, gateway RSS {rss_fresh} kB");
    let connected = Arc::new(AtomicUsize::new(0));
    let failed = Arc::new(AtomicUsize::new(0));
    let live_started = Arc::new(AtomicUsize::new(0));
    let live_failed = Arc::new(AtomicUsize::new(0));
    let dropped = Arc::new(AtomicU64::new(0));
    let gate = Arc::new(Semaphore::new(a.parallel.max(1)));
    let body = Arc::new(
        json!([{"role": "user", "content": "idle benchmark [[mock chunks=2 delay_ms=600000]]"}])
            .to_string(),
    );
    let model = Arc::new(serde_json::to_string(&a.model)?);

    // One short stream first, so one-time work (lazy tables, the upstream client's first
    // connection) is in the baseline rather than charged to the first live streams.
    warm_up(&a, &model, hard).await.context("warm-up stream")?;
    sleep_until(Instant::now() + settle).await;
    let rss0 = status_kb(a.server_pid, "VmRSS:");
    let mut steps_out = vec![json!({"conns": 0, "rss_kb": rss0, "fds": fd_count(a.server_pid)})];
    eprintln!("idle: 0 connections, gateway RSS {rss0} kB");
    let mut senders: Vec<mpsc::Sender<ConnCmd>> = Vec::with_capacity(max_conns);
    let mut tasks = Vec::with_capacity(max_conns);
    let ramp_start = Instant::now();
    for &step in &a.steps {
        while senders.len() < step {
            let c = senders.len();
            let (tx, rx) = mpsc::channel(2);
            senders.push(tx);
            let tok = token(&a.secret, &format!("idle-{c}"), &a.tier)?;
            let permit = gate.clone().acquire_owned().await?;
            let (url, connected, failed, live_started, live_failed, dropped, body, model) = (
                a.url.clone(),
                connected.clone(),
                failed.clone(),
                live_started.clone(),
                live_failed.clone(),
                dropped.clone(),
                body.clone(),
                model.clone(),
            );
            tasks.push(tokio::spawn(async move {
                let ws = ws_connect(&url, &tok, Instant::now() + Duration::from_secs(30)).await;
                drop(permit);
                let Ok(ws) = ws else {
                    failed.fetch_add(1, Ordering::Relaxed);
                    return;
                };
                connected.fetch_add(1, Ordering::Relaxed);
                idle_conn(
                    ws,
                    rx,
                    hard,
                    &live_started,
                    &live_failed,
                    &dropped,
                    &body,
                    &model,
                )
                .await;
            }));
        }
        // Every handshake of this step has finished (or failed).
        while connected.load(Ordering::Relaxed) + failed.load(Ordering::Relaxed) < step
            && Instant::now() < hard
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let ramp_s = ramp_start.elapsed().as_secs_f64();
        sleep_until(Instant::now() + settle).await;
        let rss = status_kb(a.server_pid, "VmRSS:");
        let fds = fd_count(a.server_pid);
        eprintln!(
            "idle: {} connections ({} failed) after {ramp_s:.1} s, gateway RSS {rss} kB, {fds} fds",
            connected.load(Ordering::Relaxed),
            failed.load(Ordering::Relaxed)
        );
        steps_out.push(json!({
            "conns": connected.load(Ordering::Relaxed),
            "failed": failed.load(Ordering::Relaxed),
            "rss_kb": rss,
            "fds": fds,
            "ramp_s": ramp_s,
        }));
    }
    let idle_rss = status_kb(a.server_pid, "VmRSS:");
    let mut live_out = Vec::new();
    let mut opened = 0usize;
    for &target in a.live.iter().filter(|n| **n > 0) {
        let target = target.min(senders.len());
        for tx in &senders[opened..target] {
            let _ = tx.send(ConnCmd::OpenLive).await;
        }
        opened = target;
        let t0 = Instant::now();
        while live_started.load(Ordering::Relaxed) + live_failed.load(Ordering::Relaxed) < target
            && Instant::now() < hard
            && t0.elapsed() < Duration::from_secs(60)
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        sleep_until(Instant::now() + settle).await;
        let rss = status_kb(a.server_pid, "VmRSS:");
        let fds = fd_count(a.server_pid);
        let started = live_started.load(Ordering::Relaxed);
        eprintln!(
            "idle: {started} live streams ({} failed), gateway RSS {rss} kB, {fds} fds",
            live_failed.load(Ordering::Relaxed)
        );
        live_out.push(json!({
            "live": started,
            "failed": live_failed.load(Ordering::Relaxed),
            "rss_kb": rss,
            "fds": fds,
        }));
    }
    let hwm = status_kb(a.server_pid, "VmHWM:");
    for tx in &senders {
        let _ = tx.try_send(ConnCmd::Close);
    }
    drop(senders);
    let close_deadline = (Instant::now() + Duration::from_secs(20)).min(hard);
    for t in tasks {
        let _ = timeout_at(close_deadline, t).await;
    }
    let mut result = json!({
        "kind": "idle",
        "rss_fresh_kb": rss_fresh,
        "rss0_kb": rss0,
        "steps": steps_out,
        "idle_rss_kb": idle_rss,
        "live": live_out,
        "hwm_kb": hwm,
        "dropped_while_idle": dropped.load(Ordering::Relaxed),
    });
    if let (Some(obj), Value::Object(extra)) = (result.as_object_mut(), tag) {
        obj.extend(extra);
    }
    emit(&result, a.out.as_ref())
}

async fn warm_up(a: &IdleArgs, model: &str, hard: Instant) -> Result<()> {
    let deadline = (Instant::now() + Duration::from_secs(20)).min(hard);
    let tok = token(&a.secret, "idle-warmup", &a.tier)?;
    let mut ws = ws_connect(&a.url, &tok, deadline).await?;
    let frame = format!(
        r#"{{"type":"open","id":"warmup","model":{model},"messages":[{{"role":"user","content":"warm-up [[mock chunks=2]]"}}]}}"#
    );
    ws.send(Message::Text(frame.into())).await?;
    loop {
        match timeout_at(deadline, ws.next())
            .await
            .context("no answer in time")?
        {
            Some(Ok(Message::Text(t))) => {
                let f: Frame<'_> = serde_json::from_str(t.as_str())?;
                match f.kind.as_ref() {
                    "done" => break,
                    "error" => bail!("warm-up stream failed: {}", t.as_str()),
                    _ => {}
                }
            }
            Some(Ok(_)) => {}
            Some(Err(e)) => return Err(e.into()),
            None => bail!("closed during warm-up"),
        }
    }
    let _ = tokio::time::timeout(Duration::from_secs(2), ws.close(None)).await;
    Ok(())
}

#[allow(clippy::too_many_arguments)]
async fn idle_conn(
    mut ws: Ws,
    mut rx: mpsc::Receiver<ConnCmd>,
    hard: Instant,
    live_started: &AtomicUsize,
    live_failed: &AtomicUsize,
    dropped: &AtomicU64,
    body: &str,
    model: &str,
) {
    let mut open = false;
    let mut counted = false;
    loop {
        tokio::select! {
            // Reading is what answers the gateway's pings.
            msg = ws.next() => match msg {
                Some(Ok(Message::Text(t))) => {
                    let Ok(f) = serde_json::from_str::<Frame<'_>>(t.as_str()) else { continue };
                    match f.kind.as_ref() {
                        "delta" if !counted => {
                            counted = true;
                            live_started.fetch_add(1, Ordering::Relaxed);
                        }
                        "error" if open && !counted => {
                            counted = true;
                            live_failed.fetch_add(1, Ordering::Relaxed);
                        }
                        _ => {}
                    }
                }
                Some(Ok(_)) => {}
                Some(Err(_)) | None => {
                    dropped.fetch_add(1, Ordering::Relaxed);
                    if open && !counted {
                        live_failed.fetch_add(1, Ordering::Relaxed);
                    }
                    return;
                }
            },
            cmd = rx.recv() => match cmd {
                Some(ConnCmd::OpenLive) => {
                    open = true;
                    let frame = format!(r#"{{"type":"open","id":"live","model":{model},"messages":{body}}}"#);
                    if ws.send(Message::Text(frame.into())).await.is_err() {
                        live_failed.fetch_add(1, Ordering::Relaxed);
                        counted = true;
                    }
                }
                Some(ConnCmd::Close) | None => {
                    if open {
                        let _ = ws.send(Message::Text(r#"{"type":"cancel","id":"live"}"#.into())).await;
                    }
                    let _ = tokio::time::timeout(Duration::from_secs(2), ws.close(None)).await;
                    return;
                }
            },
            _ = sleep_until(hard) => return,
        }
    }
}

// ---------------------------------------------------------------------------------------
// `report`

// ---------------------------------------------------------------------------------------
// `relay`

/// One connection's streams, opened on the owner and, with a reader, resumed there after their
/// first chunk (the owner connection closed), then read through the window. Returns the
/// chunks read in the window and whether every stream's seq stayed contiguous.
async fn relay_conn(
    a: &RelayArgs,
    token: String,
    conn: usize,
    ready: Arc<tokio::sync::Barrier>,
    window: Arc<tokio::sync::RwLock<Option<(Instant, Instant)>>>,
) -> Result<(u64, bool)> {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut ws = ws_connect(&a.owner_url, &token, deadline).await?;
    let n = a.per_conn.min(a.streams - conn * a.per_conn);
    // Long enough that no stream ends inside the run: the window measures the relay alone.
    let total_s = a.warmup_s + a.duration_s + 120.0;
    let chunks = (total_s * 1000.0 / a.delay_ms.max(1) as f64).ceil() as u64;
    for i in 0..n {
        let open = json!({"type": "open", "id": format!("{i}:1"), "model": a.model,
            "messages": [{"role": "user", "content": format!("relay {conn}/{i} [[mock chunks={chunks} delay_ms={}]]", a.delay_ms)}]});
        ws.send(Message::Text(open.to_string().into())).await?;
    }
    let mut last = vec![0u64; n];
    let mut ok = true;
    // Reads one frame; records its seq. Returns false when the connection ended.
    async fn read(ws: &mut Ws, last: &mut [u64], ok: &mut bool, deadline: Instant) -> Result<u64> {
        let msg = timeout_at(deadline, ws.next())
            .await
            .context("no frame in time")?;
        let text = match msg {
            Some(Ok(Message::Text(t))) => t,
            Some(Ok(_)) => return Ok(0),
            other => bail!("connection ended: {other:?}"),
        };
        let f: Frame<'_> = serde_json::from_str(text.as_str())?;
        match f.kind.as_ref() {
            "delta" => {
                let i: usize =
                    f.id.as_deref()
                        .and_then(|id| id.split(':').next())
                        .and_then(|s| s.parse().ok())
                        .context("delta id")?;
                let seq = f.seq.context("delta seq")?;
                *ok &= seq == last[i] + 1;
                last[i] = seq;
                Ok(1)
            }
            "error" | "done" => bail!("a stream ended early: {}", text.as_str()),
            _ => Ok(0),
        }
    }
    while last.contains(&0) {
        read(&mut ws, &mut last, &mut ok, deadline).await?;
    }
    if let Some(reader) = &a.reader_url {
        let resume: Vec<Value> = last
            .iter()
            .enumerate()
            .map(|(i, s)| json!({"id": format!("{i}:1"), "after": s}))
            .collect();
        let moved = ws_connect_resuming(reader, &token, &json!(resume), deadline).await?;
        let _ = std::mem::replace(&mut ws, moved).close(None).await;
    }
    ready.wait().await;
    let (warm, end) = loop {
        if let Some(w) = *window.read().await {
            break w;
        }
        read(&mut ws, &mut last, &mut ok, deadline).await?;
    };
    let mut in_window = 0;
    loop {
        let now = Instant::now();
        if now >= end {
            break;
        }
        let got = read(&mut ws, &mut last, &mut ok, end + Duration::from_secs(10)).await?;
        if Instant::now() >= warm && Instant::now() < end {
            in_window += got;
        }
    }
    for i in 0..n {
        let cancel = json!({"type": "cancel", "id": format!("{i}:1")});
        let _ = ws.feed(Message::Text(cancel.to_string().into())).await;
    }
    let _ = tokio::time::timeout(Duration::from_secs(2), ws.flush()).await;
    let _ = tokio::time::timeout(Duration::from_secs(2), ws.close(None)).await;
    Ok((in_window, ok))
}

async fn relay_cmd(a: RelayArgs) -> Result<()> {
    if a.streams == 0 || a.streams > 5_000 || a.duration_s > 120.0 || a.warmup_s > 60.0 {
        bail!("--streams in 1..=5000, --duration-s ≤ 120, --warmup-s ≤ 60");
    }
    let tag: Value = serde_json::from_str(&a.tag).context("--tag must be a JSON object")?;
    let per = a.per_conn.clamp(1, 32);
    let a = RelayArgs { per_conn: per, ..a };
    let conns = a.streams.div_ceil(per);
    let ready = Arc::new(tokio::sync::Barrier::new(conns + 1));
    let window = Arc::new(tokio::sync::RwLock::new(None));
    let cfg = Arc::new(a.clone());
    let mut tasks = Vec::with_capacity(conns);
    for c in 0..conns {
        // Users (and so stream ids) of their own per run: a cancelled stream of the previous
        // run is still kept for replay, and reopening its id would be `duplicate_id`.
        let user = format!("bench-relay-{}-{c}", std::process::id());
        let tok = token(&a.secret, &user, &a.tier)?;
        let (cfg, ready, window) = (cfg.clone(), ready.clone(), window.clone());
        tasks.push(tokio::spawn(async move {
            let out = relay_conn(&cfg, tok, c, ready, window).await;
            if let Err(e) = &out {
                eprintln!("relay connection {c}: {e:#}");
            }
            out
        }));
    }
    // Every stream is open (and moved) before the window starts; a connection that failed
    // before getting there ends the run here, bounded.
    tokio::time::timeout(Duration::from_secs(90), ready.wait())
        .await
        .context("the streams did not all open and move within 90 s")?;
    let warm = Instant::now() + Duration::from_secs_f64(a.warmup_s);
    let end = warm + Duration::from_secs_f64(a.duration_s);
    *window.write().await = Some((warm, end));
    let cpu = |pids: &[u32]| pids.iter().map(|p| tree_cpu_ticks(*p)).sum::<u64>();
    sleep_until(warm).await;
    let c0 = cpu(&a.server_pid);
    let t0 = Instant::now();
    sleep_until(end).await;
    let c1 = cpu(&a.server_pid);
    let window_s = t0.elapsed().as_secs_f64();
    let (mut chunks, mut seq_ok, mut errors) = (0u64, true, Vec::new());
    for t in tasks {
        match t.await? {
            Ok((n, ok)) => {
                chunks += n;
                seq_ok &= ok;
            }
            Err(e) => errors.push(format!("{e:#}")),
        }
    }
    let cpu_s = c1.saturating_sub(c0) as f64 / a.clk_tck as f64;
    let mut result = json!({
        "kind": "relay",
        "label": a.label,
        "streams": a.streams,
        "conns": conns,
        "delay_ms": a.delay_ms,
        "moved": a.reader_url.is_some(),
        "window_s": window_s,
        "chunks_window": chunks,
        "chunks_per_s": chunks as f64 / window_s,
        "offered_chunks_per_s": a.streams as f64 * 1000.0 / a.delay_ms.max(1) as f64,
        "server_cpu_s": cpu_s,
        "server_cpu_s_per_100k": (chunks > 0).then(|| cpu_s / chunks as f64 * 1e5),
        "seq_ok": seq_ok,
        "errors": errors,
    });
    if let (Some(obj), Value::Object(extra)) = (result.as_object_mut(), tag) {
        obj.extend(extra);
    }
    emit(&result, a.out.as_ref())?;
    eprintln!(
        "{:>12} K={:<5} {:>8.0} chunks/s | gateways' cpu {} s/100k | seq ok {seq_ok} | errors {}",
        a.label,
        a.streams,
        chunks as f64 / window_s,
        result["server_cpu_s_per_100k"]
            .as_f64()
            .map_or("-".into(), |v| format!("{v:.3}")),
        result["errors"].as_array().map_or(0, Vec::len),
    );
    Ok(())
}

fn report_cmd(a: &ReportArgs) -> Result<()> {
    let text = std::fs::read_to_string(&a.results)
        .with_context(|| format!("cannot read {}", a.results.display()))?;
    let rows: Vec<Value> = text
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()?;
    let mut out = String::new();
    render(&rows, &mut out);
    std::io::stdout().lock().write_all(out.as_bytes())?;
    Ok(())
}

fn f(v: &Value, digits: usize) -> String {
    match v.as_f64() {
        Some(x) if x.is_finite() => format!("{x:.digits$}"),
        _ => "—".into(),
    }
}

fn msv(v: &Value) -> String {
    match v.as_f64() {
        Some(x) => format!("{:.3}", x / 1000.0),
        None => "—".into(),
    }
}

fn ratio(a: &Value, b: &Value) -> String {
    match (a.as_f64(), b.as_f64()) {
        (Some(x), Some(y)) if y > 0.0 => format!("{:.2}×", x / y),
        _ => "—".into(),
    }
}

fn errs(r: &Value) -> String {
    let n = |k: &str| r[k].as_u64().unwrap_or(0);
    let (err, short, unf) = (n("streams_err"), n("streams_short"), n("unfinished"));
    if err + short + unf == 0 {
        return format!("{} ok, 0 failed", n("streams_ok"));
    }
    let mut s = format!(
        "{} ok, {err} errors, {short} short, {unf} unfinished",
        n("streams_ok")
    );
    if let Some(map) = r["errors"].as_object() {
        let top: Vec<String> = map
            .iter()
            .take(2)
            .map(|(k, v)| format!("`{}` ×{v}", k.replace('|', "/")))
            .collect();
        if !top.is_empty() {
            s.push_str(&format!(" ({})", top.join(", ")));
        }
    }
    s
}

/// Paths in the side-by-side table, in this order.
const LABELS: [&str; 4] = ["direct", "muxgate", "muxgate-nodelay", "litellm"];

fn render(rows: &[Value], out: &mut String) {
    use std::fmt::Write as _;
    render_hotpath(rows, out);
    let streams: Vec<&Value> = rows.iter().filter(|r| r["kind"] == "stream").collect();
    let side: Vec<&Value> = streams
        .iter()
        .copied()
        .filter(|r| r["phase"] == "side")
        .collect();
    let find = |label: &str, k: u64| {
        side.iter()
            .copied()
            .find(|r| r["label"] == label && r["streams"].as_u64() == Some(k))
    };
    let mut ks: Vec<u64> = side.iter().filter_map(|r| r["streams"].as_u64()).collect();
    ks.sort_unstable();
    ks.dedup();
    if !side.is_empty() {
        let r0 = side[0];
        let _ = writeln!(
            out,
            "### Side by side (each stream: {} chunks, {} ms apart; {:.0} s measured after warm-up)\n",
            r0["chunks"], r0["delay_ms"], r0["window_s"].as_f64().unwrap_or(0.0)
        );
        let _ = writeln!(out, "| streams | path | conns | TTFT p50 ms | TTFT p99 ms | gap p50 ms | gap p99 ms | chunks/s (offered) | server CPU s / 100k chunks | server CPU % | mock CPU s / 100k | streams | load avg |");
        let _ = writeln!(
            out,
            "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|"
        );
        for &k in &ks {
            for label in LABELS {
                let Some(r) = find(label, k) else { continue };
                let _ = writeln!(
                    out,
                    "| {k} | {label} | {} | {} | {} | {} | {} | {} ({}) | {} | {} | {} | {} | {} |",
                    r["conns"],
                    msv(&r["ttft_us"]["p50"]),
                    msv(&r["ttft_us"]["p99"]),
                    msv(&r["gap_us"]["p50"]),
                    msv(&r["gap_us"]["p99"]),
                    f(&r["chunks_per_s"], 0),
                    f(&r["offered_chunks_per_s"], 0),
                    f(&r["server_cpu_s_per_100k"], 3),
                    f(&r["server_cpu_pct"], 0),
                    f(&r["mock_cpu_s_per_100k"], 3),
                    errs(r),
                    r["loadavg"].as_str().unwrap_or("—"),
                );
            }
        }
        let _ = writeln!(out, "\n### Ratios\n");
        let _ = writeln!(out, "| streams | gateway | added TTFT p50 ms (vs direct) | added TTFT p99 ms | TTFT p99 ÷ direct | TTFT p99 ÷ LiteLLM | gap p99 ÷ direct | gap p99 ÷ LiteLLM | chunks per CPU second ÷ LiteLLM's |");
        let _ = writeln!(out, "|---:|---|---:|---:|---:|---:|---:|---:|---:|");
        for &k in &ks {
            let (d, l) = (find("direct", k), find("litellm", k));
            for label in ["muxgate", "muxgate-nodelay"] {
                let Some(m) = find(label, k) else { continue };
                let m = Some(m);
                let g = |r: Option<&Value>, a: &str, b: &str| {
                    r.map_or(Value::Null, |r| r[a][b].clone())
                };
                let sub = |x: &Value, y: &Value| match (x.as_f64(), y.as_f64()) {
                    (Some(x), Some(y)) => format!("{:.3}", (x - y) / 1000.0),
                    _ => "—".into(),
                };
                let per_cpu = |r: Option<&Value>| {
                    r.and_then(|r| r["server_cpu_s_per_100k"].as_f64())
                        .filter(|v| *v > 0.0)
                        .map_or(Value::Null, |v| json!(1e5 / v))
                };
                let _ = writeln!(
                    out,
                    "| {k} | {label} | {} | {} | {} | {} | {} | {} | {} |",
                    sub(&g(m, "ttft_us", "p50"), &g(d, "ttft_us", "p50")),
                    sub(&g(m, "ttft_us", "p99"), &g(d, "ttft_us", "p99")),
                    ratio(&g(m, "ttft_us", "p99"), &g(d, "ttft_us", "p99")),
                    ratio(&g(m, "ttft_us", "p99"), &g(l, "ttft_us", "p99")),
                    ratio(&g(m, "gap_us", "p99"), &g(d, "gap_us", "p99")),
                    ratio(&g(m, "gap_us", "p99"), &g(l, "gap_us", "p99")),
                    ratio(&per_cpu(m), &per_cpu(l)),
                );
            }
        }
    }
    let scale: Vec<&Value> = streams
        .iter()
        .copied()
        .filter(|r| r["phase"] == "scale")
        .collect();
    if !scale.is_empty() {
        let _ = writeln!(out, "\n### How far muxgate scales (same stream shape)\n");
        let _ = writeln!(out, "| streams | conns | chunks/s (offered) | gateway CPU % | gateway CPU s / 100k | TTFT p50 ms | TTFT p99 ms | gap p50 ms | gap p99 ms | gateway RSS MiB | streams |");
        let _ = writeln!(
            out,
            "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"
        );
        for r in scale {
            let _ = writeln!(
                out,
                "| {} | {} | {} ({}) | {} | {} | {} | {} | {} | {} | {} | {} |",
                r["streams"],
                r["conns"],
                f(&r["chunks_per_s"], 0),
                f(&r["offered_chunks_per_s"], 0),
                f(&r["server_cpu_pct"], 0),
                f(&r["server_cpu_s_per_100k"], 3),
                msv(&r["ttft_us"]["p50"]),
                msv(&r["ttft_us"]["p99"]),
                msv(&r["gap_us"]["p50"]),
                msv(&r["gap_us"]["p99"]),
                r["server_rss_kb"]
                    .as_f64()
                    .map_or("—".into(), |v| format!("{:.1}", v / 1024.0)),
                errs(r),
            );
        }
    }
    render_cluster(rows, out);
    for idle in rows.iter().filter(|r| r["kind"] == "idle") {
        let _ = writeln!(
            out,
            "\n### Resident memory of the gateway{}\n",
            idle["label"]
                .as_str()
                .map_or(String::new(), |l| format!(" ({l})"))
        );
        let _ = writeln!(out, "| state | connections | live streams | RSS MiB | fds | per item over previous row | per item over 0 connections |");
        let _ = writeln!(out, "|---|---:|---:|---:|---:|---:|---:|");
        if let Some(fresh) = idle["rss_fresh_kb"].as_f64() {
            let _ = writeln!(
                out,
                "| fresh, before the first connection | 0 | 0 | {:.1} | — | — | — |",
                fresh / 1024.0
            );
        }
        let rss0 = idle["rss0_kb"].as_f64().unwrap_or(0.0);
        let mut prev: Option<(f64, f64)> = None;
        let mut conns_max = 0.0;
        for s in idle["steps"].as_array().into_iter().flatten() {
            let n = s["conns"].as_f64().unwrap_or(0.0);
            let rss = s["rss_kb"].as_f64().unwrap_or(0.0);
            let marginal = prev
                .filter(|(pn, _)| n > *pn)
                .map_or("—".into(), |(pn, pr)| {
                    format!("{:.1} KiB / conn", (rss - pr) / (n - pn))
                });
            let overall = if n > 0.0 {
                format!("{:.1} KiB / conn", (rss - rss0) / n)
            } else {
                "—".into()
            };
            let _ = writeln!(
                out,
                "| idle | {n} | 0 | {:.1} | {} | {marginal} | {overall} |",
                rss / 1024.0,
                s["fds"]
            );
            prev = Some((n, rss));
            conns_max = n;
        }
        let base = idle["idle_rss_kb"].as_f64().unwrap_or(0.0);
        let mut prev_live: Option<(f64, f64)> = None;
        for s in idle["live"].as_array().into_iter().flatten() {
            let n = s["live"].as_f64().unwrap_or(0.0);
            let rss = s["rss_kb"].as_f64().unwrap_or(0.0);
            let marginal = prev_live
                .filter(|(pn, _)| n > *pn)
                .map_or("—".into(), |(pn, pr)| {
                    format!("{:.1} KiB / stream", (rss - pr) / (n - pn))
                });
            let overall = if n > 0.0 {
                format!("{:.1} KiB / stream (over idle)", (rss - base) / n)
            } else {
                "—".into()
            };
            let _ = writeln!(
                out,
                "| live | {conns_max} | {n} | {:.1} | {} | {marginal} | {overall} |",
                rss / 1024.0,
                s["fds"]
            );
            prev_live = Some((n, rss));
        }
        let _ = writeln!(
            out,
            "\nPeak RSS (VmHWM) {:.1} MiB; connections dropped while idle: {}.",
            idle["hwm_kb"].as_f64().unwrap_or(0.0) / 1024.0,
            idle["dropped_while_idle"]
        );
    }
}

/// The cluster phase (`phase: cluster`): each run of cluster mode beside the run of one process
/// just before it, in alternation, so each ratio compares runs under the same machine load.
/// `single`/`cluster`: the relay load, CPU per chunk; `open-single`/`open-cluster`: short
/// streams back to back, the time to first token being mostly the stream's opening.
fn render_cluster(rows: &[Value], out: &mut String) {
    use std::fmt::Write as _;
    let runs = |label: &str| -> Vec<&Value> {
        rows.iter()
            .filter(|r| r["phase"] == "cluster" && r["label"] == label)
            .collect()
    };
    let pairs =
        |a: &str, b: &str| -> Vec<(&Value, &Value)> { runs(a).into_iter().zip(runs(b)).collect() };
    let relay = pairs("single", "cluster");
    let opens = pairs("open-single", "open-cluster");
    if relay.is_empty() && opens.is_empty() {
        return;
    }
    let _ = writeln!(
        out,
        "\n### Cluster mode (Redis) against one process, runs alternated\n"
    );
    let _ = writeln!(out, "| pair | path | streams | chunks/s (offered) | gateway CPU s / 100k chunks | TTFT p50 ms | TTFT p99 ms | streams | load avg |");
    let _ = writeln!(out, "|---:|---|---:|---:|---:|---:|---:|---|---|");
    for (i, (a, b)) in relay.iter().chain(&opens).enumerate() {
        for r in [a, b] {
            let _ = writeln!(
                out,
                "| {} | {} | {} | {} ({}) | {} | {} | {} | {} | {} |",
                i + 1,
                r["label"].as_str().unwrap_or("?"),
                r["streams"],
                f(&r["chunks_per_s"], 0),
                f(&r["offered_chunks_per_s"], 0),
                f(&r["server_cpu_s_per_100k"], 3),
                msv(&r["ttft_us"]["p50"]),
                msv(&r["ttft_us"]["p99"]),
                errs(r),
                r["loadavg"].as_str().unwrap_or("—"),
            );
        }
    }
    let _ = writeln!(out, "\n| pair | gateway CPU per chunk, cluster ÷ one process | TTFT p50 added by Redis, ms | TTFT p99 added, ms |");
    let _ = writeln!(out, "|---:|---:|---:|---:|");
    let added = |a: &Value, b: &Value, q: &str| match (
        a["ttft_us"][q].as_f64(),
        b["ttft_us"][q].as_f64(),
    ) {
        (Some(x), Some(y)) => format!("{:.3}", (y - x) / 1000.0),
        _ => "—".into(),
    };
    for (i, (a, b)) in relay.iter().chain(&opens).enumerate() {
        let cpu = if i < relay.len() {
            ratio(&b["server_cpu_s_per_100k"], &a["server_cpu_s_per_100k"])
        } else {
            "—".into()
        };
        let _ = writeln!(
            out,
            "| {} | {cpu} | {} | {} |",
            i + 1,
            added(a, b, "p50"),
            added(a, b, "p99"),
        );
    }
    let relays = pairs("relay-local", "relay-remote");
    if relays.is_empty() {
        return;
    }
    let _ = writeln!(out, "\n### A chunk relayed between instances (long streams opened on A; read on A, or moved to B)\n");
    let _ = writeln!(out, "| pair | read | streams | chunks/s (offered) | both gateways' CPU s / 100k chunks | seq contiguous | errors | added per chunk, µs | remote ÷ local |");
    let _ = writeln!(out, "|---:|---|---:|---:|---:|---|---|---:|---:|");
    for (i, (local, remote)) in relays.iter().enumerate() {
        let added = match (
            local["server_cpu_s_per_100k"].as_f64(),
            remote["server_cpu_s_per_100k"].as_f64(),
        ) {
            (Some(l), Some(r)) => format!("{:.2}", (r - l) * 10.0),
            _ => "—".into(),
        };
        for (r, what) in [(local, "on A"), (remote, "on B")] {
            let last = r["label"] == "relay-remote";
            let _ = writeln!(
                out,
                "| {} | {what} | {} | {} ({}) | {} | {} | {} | {} | {} |",
                i + 1,
                r["streams"],
                f(&r["chunks_per_s"], 0),
                f(&r["offered_chunks_per_s"], 0),
                f(&r["server_cpu_s_per_100k"], 3),
                r["seq_ok"],
                r["errors"].as_array().map_or(0, Vec::len),
                if last { added.clone() } else { String::new() },
                if last {
                    ratio(
                        &remote["server_cpu_s_per_100k"],
                        &local["server_cpu_s_per_100k"],
                    )
                } else {
                    String::new()
                },
            );
        }
    }
}

// ---------------------------------------------------------------------------------------
// `scripts/bench --hotpath`: issue 15's figures in one block

/// The gateway paths of a hot-path run: the build measured and, when given, the one it is
/// compared with. Their order is the summary's column order after nginx / direct.
const HOTPATH_GATEWAYS: [(&str, &str); 2] = [("muxgate-before", "before"), ("muxgate", "after")];

/// Summed over every round of one path, so rounds interleaved with the other paths count as
/// one longer run (CPU readings are whole clock ticks: more chunks, less rounding).
#[derive(Default)]
struct Pooled {
    cpu_s: f64,
    chunks: f64,
    runs: u64,
    /// Streams that failed, came back short, or were left unfinished, over all rounds.
    bad_streams: u64,
}

impl Pooled {
    fn of(rows: &[&Value], phase: &str, label: &str, k: u64) -> Option<Pooled> {
        let mut p = Pooled::default();
        for r in rows.iter().filter(|r| {
            r["phase"] == phase && r["label"] == label && r["streams"].as_u64() == Some(k)
        }) {
            p.cpu_s += r["server_cpu_s"].as_f64()?;
            p.chunks += r["chunks_window"].as_f64().unwrap_or(0.0);
            p.runs += 1;
            p.bad_streams += ["streams_err", "streams_short", "unfinished"]
                .iter()
                .map(|k| r[*k].as_u64().unwrap_or(0))
                .sum::<u64>();
        }
        (p.runs > 0 && p.chunks > 0.0).then_some(p)
    }

    /// CPU milliseconds per 1,000 relayed chunks (the issue's unit).
    fn ms_per_1000(&self) -> f64 {
        self.cpu_s / self.chunks * 1e6
    }
}

fn median(mut v: Vec<f64>) -> Option<f64> {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    match n {
        0 => None,
        _ if n % 2 == 1 => Some(v[n / 2]),
        _ => Some((v[n / 2 - 1] + v[n / 2]) / 2.0),
    }
}

fn times(x: Option<f64>) -> String {
    x.filter(|v| v.is_finite())
        .map_or("—".into(), |v| format!("{v:.2}×"))
}

fn num(x: Option<f64>, digits: usize) -> String {
    x.filter(|v| v.is_finite())
        .map_or("—".into(), |v| format!("{v:.digits$}"))
}

fn render_hotpath(rows: &[Value], out: &mut String) {
    use std::fmt::Write as _;
    let hp: Vec<&Value> = rows
        .iter()
        .filter(|r| r["phase"].as_str().is_some_and(|p| p.starts_with("hp-")))
        .collect();
    if hp.is_empty() {
        return;
    }
    let gateways: Vec<(&str, &str)> = HOTPATH_GATEWAYS
        .into_iter()
        .filter(|(label, _)| hp.iter().any(|r| r["label"] == *label))
        .collect();
    let rounds = hp
        .iter()
        .filter_map(|r| r["round"].as_u64())
        .max()
        .unwrap_or(1);
    let _ = writeln!(
        out,
        "### Issue 15: hot path ({rounds} interleaved rounds)\n"
    );
    let mut head = String::from("| metric | target | nginx / direct |");
    let mut rule = String::from("|---|---|---:|");
    for (_, col) in &gateways {
        head.push_str(&format!(" {col} |"));
        rule.push_str("---:|");
    }
    if gateways.len() == 2 {
        head.push_str(" after ÷ before |");
        rule.push_str("---:|");
    }
    let _ = writeln!(out, "{head}\n{rule}");
    let mut row = |metric: &str, target: &str, base: String, vals: Vec<Option<f64>>, digits| {
        let mut line = format!("| {metric} | {target} | {base} |");
        for v in &vals {
            line.push_str(&format!(" {} |", num(*v, digits)));
        }
        if let [Some(before), Some(after)] = vals[..] {
            line.push_str(&format!(" {} |", times(Some(after / before))));
        } else if vals.len() == 2 {
            line.push_str(" — |");
        }
        let _ = writeln!(out, "{line}");
    };

    // CPU per relayed chunk against nginx, pooled over the rounds.
    let mut bad = Vec::new();
    let shapes: Vec<(&str, u64, String)> = {
        let mut v: Vec<(&str, u64, String)> = Vec::new();
        let mut ks: Vec<u64> = hp
            .iter()
            .filter(|r| r["phase"] == "hp-ratio")
            .filter_map(|r| r["streams"].as_u64())
            .collect();
        ks.sort_unstable();
        ks.dedup();
        for k in ks {
            v.push(("hp-ratio", k, format!("{k} streams")));
        }
        if let Some(r) = hp.iter().find(|r| r["phase"] == "hp-issue") {
            let k = r["streams"].as_u64().unwrap_or(0);
            v.push((
                "hp-issue",
                k,
                format!("issue's shape: {k} streams, {} ms apart", r["delay_ms"]),
            ));
        }
        v
    };
    for (phase, k, name) in &shapes {
        let per_conn = hp
            .iter()
            .find(|r| {
                r["phase"] == *phase && r["target"] == "ws" && r["streams"].as_u64() == Some(*k)
            })
            .and_then(|r| Some(r["streams"].as_f64()? / r["conns"].as_f64()?));
        let nginx = Pooled::of(&hp, phase, "nginx", *k);
        let gws: Vec<Option<Pooled>> = gateways
            .iter()
            .map(|(label, _)| Pooled::of(&hp, phase, label, *k))
            .collect();
        for (label, p) in std::iter::once(("nginx", &nginx))
            .chain(gateways.iter().map(|(l, _)| *l).zip(gws.iter()))
        {
            if let Some(p) = p.as_ref().filter(|p| p.bad_streams > 0) {
                bad.push(format!(
                    "{label} at {name}: {} streams failed, short or unfinished",
                    p.bad_streams
                ));
            }
        }
        let nginx_ms = nginx.as_ref().map(Pooled::ms_per_1000);
        row(
            &format!(
                "CPU ms per 1,000 relayed chunks, {name} ({} per WebSocket)",
                num(per_conn, 0)
            ),
            "—",
            num(nginx_ms, 1),
            gws.iter()
                .map(|p| p.as_ref().map(Pooled::ms_per_1000))
                .collect(),
            1,
        );
        row(
            &format!("… ÷ nginx's, {name}"),
            "≤ 1.25",
            "1.00".into(),
            gws.iter()
                .map(|p| Some(p.as_ref()?.ms_per_1000() / nginx_ms?))
                .collect(),
            2,
        );
    }

    // Added TTFT with the gateway pinned: each round against its own direct run.
    let pinned: Vec<&Value> = hp
        .iter()
        .copied()
        .filter(|r| r["phase"] == "hp-pinned")
        .collect();
    if !pinned.is_empty() {
        let k = pinned[0]["streams"].as_u64().unwrap_or(0);
        for (q, target) in [("p99", "< 1"), ("p50", "—")] {
            let direct: Vec<f64> = pinned
                .iter()
                .filter(|r| r["label"] == "direct")
                .filter_map(|r| r["ttft_us"][q].as_f64())
                .collect();
            let added = |label: &str| -> Vec<f64> {
                pinned
                    .iter()
                    .filter(|r| r["label"] == label)
                    .filter_map(|r| {
                        let d = pinned
                            .iter()
                            .find(|d| d["label"] == "direct" && d["round"] == r["round"])?;
                        Some((r["ttft_us"][q].as_f64()? - d["ttft_us"][q].as_f64()?) / 1000.0)
                    })
                    .collect()
            };
            row(
                &format!("added TTFT {q} ms over direct, {k} streams, gateway pinned to core 0 (median of rounds)"),
                target,
                format!("{} (direct's own)", num(median(direct).map(|v| v / 1000.0), 3)),
                gateways.iter().map(|(l, _)| median(added(l))).collect(),
                3,
            );
        }
        for r in &pinned {
            let n = ["streams_err", "streams_short", "unfinished"]
                .iter()
                .map(|k| r[*k].as_u64().unwrap_or(0))
                .sum::<u64>();
            if n > 0 {
                bad.push(format!(
                    "{} pinned, round {}: {n} streams failed, short or unfinished",
                    r["label"].as_str().unwrap_or("?"),
                    r["round"]
                ));
            }
        }
    }

    // Memory of a fresh gateway.
    let idle = |label: &str| {
        hp.iter()
            .find(|r| r["phase"] == "hp-idle" && r["label"] == label)
    };
    if gateways.iter().any(|(l, _)| idle(l).is_some()) {
        let mib = |key: &'static str| {
            gateways
                .iter()
                .map(|(l, _)| Some(idle(l)?[key].as_f64()? / 1024.0))
                .collect::<Vec<_>>()
        };
        row(
            "idle RSS MiB before the first connection",
            "≤ 20 MB (19.1 MiB)",
            "—".into(),
            mib("rss_fresh_kb"),
            1,
        );
        row(
            "idle RSS MiB after one stream (lazy tables loaded)",
            "—",
            "—".into(),
            mib("rss0_kb"),
            1,
        );
        let per_conn = |r: &Value| -> Option<(f64, f64)> {
            let last = r["steps"].as_array()?.last()?;
            let n = last["conns"].as_f64().filter(|n| *n > 0.0)?;
            Some((n, (last["rss_kb"].as_f64()? - r["rss0_kb"].as_f64()?) / n))
        };
        let conns = gateways
            .iter()
            .find_map(|(l, _)| per_conn(idle(l)?))
            .map_or(0.0, |(n, _)| n);
        row(
            &format!("KiB per idle connection ({conns:.0} connections)"),
            "≤ 16",
            "—".into(),
            gateways
                .iter()
                .map(|(l, _)| Some(per_conn(idle(l)?)?.1))
                .collect(),
            1,
        );
    }
    if bad.is_empty() {
        let _ = writeln!(
            out,
            "\nEvery stream of every run was complete (all chunks, in order, none unfinished)."
        );
    } else {
        let _ = writeln!(out, "\nNot clean: {}.", bad.join("; "));
    }

    // Every run, so a reader can see the spread between rounds.
    let _ = writeln!(out, "\n#### Runs, in the order they ran\n");
    let _ = writeln!(out, "| round | phase | streams | path | conns | CPU ms / 1,000 chunks | chunks/s (offered) | TTFT p50 ms | TTFT p99 ms | gap p99 ms | streams | load avg |");
    let _ = writeln!(
        out,
        "|---:|---|---:|---|---:|---:|---:|---:|---:|---:|---|---|"
    );
    for r in hp.iter().filter(|r| r["kind"] == "stream") {
        let cpu = r["server_cpu_s"]
            .as_f64()
            .zip(r["chunks_window"].as_f64().filter(|c| *c > 0.0))
            .map(|(s, c)| s / c * 1e6);
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} | {} | {} ({}) | {} | {} | {} | {} | {} |",
            r["round"],
            r["phase"].as_str().unwrap_or("?").trim_start_matches("hp-"),
            r["streams"],
            r["label"].as_str().unwrap_or("?"),
            r["conns"],
            num(cpu, 1),
            f(&r["chunks_per_s"], 0),
            f(&r["offered_chunks_per_s"], 0),
            msv(&r["ttft_us"]["p50"]),
            msv(&r["ttft_us"]["p99"]),
            msv(&r["gap_us"]["p99"]),
            errs(r),
            r["loadavg"].as_str().unwrap_or("—"),
        );
    }
    let _ = writeln!(out);
}
