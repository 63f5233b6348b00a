//! Test harness: the real gateway and the real mock upstream, in-process on loopback port 0,
//! and a WebSocket client over tokio-tungstenite.
#![allow(dead_code, clippy::unwrap_used)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use muxgate::{mock, Config, Gateway};
use serde_json::{json, Value};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

pub mod instance;
pub mod nginx;
pub mod redis_server;

pub const SECRET: &str = "test-secret-0123456789abcdef";
pub const API_KEY: &str = "sk-upstream-secret-7f3a9c";
/// The admin routes' bearer token of every gateway the tests start.
pub const ADMIN_TOKEN: &str = "admin-test-token";
/// How long a test waits for any one frame before failing.
pub const FRAME_WAIT: Duration = Duration::from_secs(10);

pub struct Harness {
    pub gw: Arc<Gateway>,
    pub addr: SocketAddr,
    pub mock: mock::MockHandle,
    shutdown: Option<oneshot::Sender<()>>,
    pub server: Option<JoinHandle<std::io::Result<()>>>,
}

impl Harness {
    pub async fn start() -> Harness {
        Harness::start_with(|_| {}).await
    }

    /// Starts the mock upstream (requiring [`API_KEY`]) and a gateway relaying to it, after
    /// `tweak` has adjusted the config.
    pub async fn start_with(tweak: impl FnOnce(&mut Config)) -> Harness {
        Harness::start_on(None, tweak).await
    }

    /// As [`Harness::start_with`], with the gateway serving its connections on `workers`
    /// worker threads (`muxgate::serve_on`), as the binary does.
    pub async fn start_on_workers(workers: usize, tweak: impl FnOnce(&mut Config)) -> Harness {
        Harness::start_on(Some(workers), tweak).await
    }

    async fn start_on(workers: Option<usize>, tweak: impl FnOnce(&mut Config)) -> Harness {
        // The tokenizers load once per process; a debug build takes seconds for it, which the
        // first stream of a test would otherwise wait out (past FRAME_WAIT on a loaded machine).
        tokio::task::spawn_blocking(muxgate::test_support::warm_up)
            .await
            .unwrap();
        let mock = spawn_mock(Some(API_KEY)).await;
        let env = |name: &str| match name {
            "MUXGATE_JWT_SECRET" => Some(SECRET.to_string()),
            "MUXGATE_LISTEN" => Some("127.0.0.1:0".to_string()),
            _ => None,
        };
        let mut config = Config::load_with_env(None, &env).unwrap();
        config.providers = vec![muxgate::config::ProviderConfig::catch_all(
            "mock",
            mock.base_url(),
            Some(API_KEY.to_string()),
        )];
        config.retry.base_delay_ms = 10;
        config.retry.max_delay_ms = 50;
        config.admin_token = Some(ADMIN_TOKEN.into());
        if let Some(n) = workers {
            config.server.workers = n;
        }
        tweak(&mut config);
        let listener = TcpListener::bind(config.listen).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let gw = Gateway::start(config).await.unwrap();
        let (tx, rx) = oneshot::channel();
        let shutdown = async move {
            let _ = rx.await;
        };
        let server = match workers {
            None => tokio::spawn(muxgate::serve(listener, gw.clone(), shutdown)),
            Some(n) => {
                let workers = muxgate::Workers::start(n).unwrap();
                let gw = gw.clone();
                tokio::spawn(
                    async move { muxgate::serve_on(listener, gw, &workers, shutdown).await },
                )
            }
        };
        Harness {
            gw,
            addr,
            mock,
            shutdown: Some(tx),
            server: Some(server),
        }
    }

    pub fn token(&self, user: &str, tier: &str) -> String {
        self.gw
            .issue_token(user, tier, Duration::from_secs(600))
            .unwrap()
    }

    pub fn ws_url(&self) -> String {
        format!("ws://{}/v1/ws", self.addr)
    }

    /// A socket with no `hello` sent yet.
    pub async fn connect_raw(&self) -> Client {
        let (ws, _) = tokio_tungstenite::connect_async(self.ws_url())
            .await
            .unwrap();
        Client { ws }
    }

    /// A socket after `hello` (with `resume`) and `welcome`.
    pub async fn connect_resume(&self, user: &str, resume: Value) -> (Client, Value) {
        self.connect_as(user, "pro", resume).await
    }

    /// A socket of a `tier` user after `hello` and `welcome`.
    pub async fn connect_tier(&self, user: &str, tier: &str) -> Client {
        self.connect_as(user, tier, json!([])).await.0
    }

    async fn connect_as(&self, user: &str, tier: &str, resume: Value) -> (Client, Value) {
        let mut c = self.connect_raw().await;
        c.send(json!({"type":"hello","token":self.token(user, tier),"client":"test/1","resume":resume}))
            .await;
        let welcome = c.recv().await;
        assert_eq!(welcome["type"], "welcome", "{welcome}");
        (c, welcome)
    }

    pub async fn connect(&self, user: &str) -> Client {
        self.connect_resume(user, json!([])).await.0
    }

    /// GET an admin route as JSON.
    pub async fn admin(&self, path: &str) -> Value {
        self.admin_call(reqwest::Method::GET, path).await
    }

    /// POST to an admin route; its JSON answer.
    pub async fn admin_post(&self, path: &str) -> Value {
        self.admin_call(reqwest::Method::POST, path).await
    }

    async fn admin_call(&self, method: reqwest::Method, path: &str) -> Value {
        admin_request(self.addr, method, path).await
    }

    pub fn shutdown(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        self.shutdown();
        if let Some(server) = self.server.take() {
            server.abort();
        }
    }
}

pub struct Client {
    pub ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
}

impl Client {
    pub async fn send(&mut self, v: Value) {
        self.ws
            .send(Message::Text(v.to_string().into()))
            .await
            .unwrap();
    }

    pub async fn send_text(&mut self, s: &str) {
        self.ws
            .send(Message::Text(s.to_string().into()))
            .await
            .unwrap();
    }

    /// The next JSON frame; fails the test after [`FRAME_WAIT`] or on close.
    pub async fn recv(&mut self) -> Value {
        match self.next_event().await {
            Event::Frame(v) => v,
            Event::Closed(code) => {
                panic!("connection closed ({code:?}) while a frame was expected")
            }
        }
    }

    /// The next frame or the close code.
    pub async fn next_event(&mut self) -> Event {
        loop {
            let msg = tokio::time::timeout(FRAME_WAIT, self.ws.next())
                .await
                .expect("no frame within FRAME_WAIT");
            match msg {
                Some(Ok(Message::Text(t))) => {
                    return Event::Frame(serde_json::from_str(&t).unwrap())
                }
                Some(Ok(Message::Close(frame))) => {
                    return Event::Closed(frame.map(|f: CloseFrame| u16::from(f.code)))
                }
                Some(Ok(_)) => continue,
                Some(Err(_)) | None => return Event::Closed(None),
            }
        }
    }

    /// The next text message as JSON, whatever its shape: one frame or (after `hello.batch`)
    /// an array of frames. Fails the test after [`FRAME_WAIT`] or on close.
    pub async fn recv_message(&mut self) -> Value {
        loop {
            let msg = tokio::time::timeout(FRAME_WAIT, self.ws.next())
                .await
                .expect("no message within FRAME_WAIT");
            match msg {
                Some(Ok(Message::Text(t))) => return serde_json::from_str(&t).unwrap(),
                Some(Ok(Message::Close(_))) | Some(Err(_)) | None => {
                    panic!("connection closed while a message was expected")
                }
                Some(Ok(_)) => continue,
            }
        }
    }

    /// A connection over the user's cap: `too_many_streams`, then close 4429.
    pub async fn expect_too_many_connections(&mut self) {
        let e = self.recv().await;
        assert_eq!(e["code"], "too_many_streams", "{e}");
        match self.next_event().await {
            Event::Closed(code) => assert_eq!(code, Some(4429)),
            Event::Frame(f) => panic!("expected close 4429, got {f}"),
        }
    }

    /// Reads frames until one of `type` for stream `id` (or any id when None) arrives.
    pub async fn recv_until(&mut self, kind: &str, id: Option<&str>) -> Value {
        loop {
            let f = self.recv().await;
            if f["type"] == kind && id.is_none_or(|id| f["id"] == id) {
                return f;
            }
        }
    }

    pub async fn open(&mut self, id: &str, prompt: &str) {
        self.send(json!({"type":"open","id":id,"model":"deepseek-v3.2",
            "messages":[{"role":"user","content":prompt}]}))
            .await;
    }

    /// Reads until every stream in `ids` has ended; returns each one's record.
    pub async fn collect(&mut self, ids: &[String]) -> HashMap<String, StreamRecord> {
        let mut records: HashMap<String, StreamRecord> = ids
            .iter()
            .map(|id| (id.clone(), StreamRecord::default()))
            .collect();
        while records.values().any(|r| r.end.is_none()) {
            let f = self.recv().await;
            let Some(id) = f["id"].as_str() else { continue };
            if let Some(r) = records.get_mut(id) {
                r.take(f);
            }
        }
        records
    }

    /// Expects `error` `unauthorized` (id null), then close 4401; returns the error's message.
    pub async fn expect_unauthorized_close(&mut self) -> String {
        let e = self.recv().await;
        assert_eq!(
            (e["type"].as_str(), e["code"].as_str()),
            (Some("error"), Some("unauthorized")),
            "{e}"
        );
        assert!(e["id"].is_null());
        match self.next_event().await {
            Event::Closed(code) => assert_eq!(code, Some(4401)),
            Event::Frame(f) => panic!("expected close 4401, got {f}"),
        }
        e["message"].as_str().unwrap().to_string()
    }

    pub async fn close(mut self) {
        let _ = self.ws.close(None).await;
    }
}

pub enum Event {
    Frame(Value),
    Closed(Option<u16>),
}

/// Everything one stream sent, checked for seq order as it arrives.
#[derive(Default, Debug)]
pub struct StreamRecord {
    pub text: String,
    pub last_seq: u64,
    pub deltas: u64,
    pub started: bool,
    pub end: Option<Value>,
}

impl StreamRecord {
    pub fn take(&mut self, f: Value) {
        assert!(self.end.is_none(), "frame after the stream's end: {f}");
        match f["type"].as_str().unwrap() {
            "start" => self.started = true,
            "delta" => {
                let seq = f["seq"].as_u64().unwrap();
                assert_eq!(seq, self.last_seq + 1, "seq gap or repeat: {f}");
                self.last_seq = seq;
                self.deltas += 1;
                self.text.push_str(f["text"].as_str().unwrap());
            }
            "done" => {
                assert_eq!(
                    f["seq"].as_u64().unwrap(),
                    self.last_seq + 1,
                    "done seq: {f}"
                );
                self.end = Some(f);
            }
            "error" => self.end = Some(f),
            "queued" => {}
            other => panic!("unexpected frame type {other}: {f}"),
        }
    }

    pub fn end_type(&self) -> &str {
        self.end
            .as_ref()
            .and_then(|e| e["type"].as_str())
            .unwrap_or("")
    }

    pub fn error_code(&self) -> &str {
        self.end
            .as_ref()
            .and_then(|e| e["code"].as_str())
            .unwrap_or("")
    }
}

/// Reads the frames of `ids` on `client` until each has sent a delta: the records so far.
pub async fn until_first_delta(client: &mut Client, ids: &[&str]) -> HashMap<String, StreamRecord> {
    let mut records: HashMap<String, StreamRecord> = ids
        .iter()
        .map(|id| (id.to_string(), StreamRecord::default()))
        .collect();
    while records.values().any(|r| r.deltas == 0) {
        let f = client.recv().await;
        if let Some(r) = f["id"].as_str().and_then(|id| records.get_mut(id)) {
            r.take(f);
            assert!(r.end.is_none(), "{:?}", r.end);
        }
    }
    records
}

/// Reads on `client` until every one of `records` has ended.
pub async fn finish(
    client: &mut Client,
    mut records: HashMap<String, StreamRecord>,
) -> HashMap<String, StreamRecord> {
    while records.values().any(|r| r.end.is_none()) {
        let f = client.recv().await;
        if let Some(r) = f["id"].as_str().and_then(|id| records.get_mut(id)) {
            r.take(f);
        }
    }
    records
}

/// The exact text the mock sends for `prompt` with `n` chunks (directives stripped).
pub fn expected(prompt: &str, n: usize) -> String {
    mock::word_chunks(prompt, n).concat()
}

/// A mock upstream alone on a loopback port; with `Some(key)` it requires that API key.
pub async fn spawn_mock(api_key: Option<&str>) -> mock::MockHandle {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    mock::spawn(listener, api_key.map(str::to_owned))
        .await
        .unwrap()
}

/// An admin route of the gateway at `addr`, with the admin token: its JSON answer.
pub async fn admin_request(addr: SocketAddr, method: reqwest::Method, path: &str) -> Value {
    http_client()
        .request(method, format!("http://{addr}{path}"))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

/// An HTTP client for loopback: a proxy from the environment must not intercept its requests.
pub fn http_client() -> reqwest::Client {
    reqwest::Client::builder().no_proxy().build().unwrap()
}

/// Polls the harness's mock stats until `pred` holds, or fails after 10 s.
pub async fn wait_for_mock(
    h: &Harness,
    what: &str,
    pred: impl Fn(&mock::MockStatsSnapshot) -> bool,
) {
    wait_for_stats(&h.mock, what, pred).await;
}

/// Opens `id` as a long stream on `c`, cancels it after its first delta and waits until it
/// ended `cancelled` and the mock saw its upstream request aborted.
pub async fn cancel_mid_stream(h: &Harness, c: &mut Client, id: &str) {
    c.open(id, "[[mock chunks=1000 delay_ms=20]]").await;
    c.recv_until("delta", Some(id)).await;
    c.send(serde_json::json!({"type":"cancel","id":id})).await;
    let end = c.recv_until("error", Some(id)).await;
    assert_eq!(end["code"], "cancelled", "{end}");
    wait_for_mock(h, "aborted == 1", |s| s.aborted == 1 && s.in_flight == 0).await;
}

/// Polls `mock`'s stats until `pred` holds, or fails after 10 s.
pub async fn wait_for_stats(
    mock: &mock::MockHandle,
    what: &str,
    pred: impl Fn(&mock::MockStatsSnapshot) -> bool,
) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let s = mock.stats();
        if pred(&s) {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "mock never reached: {what}; stats {s:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A token signed with the harness's secret carrying exactly `claims`, checked or not.
pub fn sign(claims: &Value) -> String {
    jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        claims,
        &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap()
}

/// Sends `request` as is on a fresh connection to `addr` and returns the answer's status code
/// (0 if the gateway closed without answering).
pub async fn raw_http_status(addr: SocketAddr, request: &str) -> u16 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    tcp.write_all(request.as_bytes()).await.unwrap();
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    while !head.windows(2).any(|w| w == b"\r\n") {
        match tokio::time::timeout(FRAME_WAIT, tcp.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => head.extend_from_slice(&buf[..n]),
            Ok(_) => break,
            Err(_) => panic!("no answer within FRAME_WAIT"),
        }
    }
    let line = String::from_utf8_lossy(&head);
    line.split(' ')
        .nth(1)
        .and_then(|c| c.trim().parse().ok())
        .unwrap_or(0)
}

/// A WebSocket handshake request with an `Origin` header.
pub fn request_with_origin(
    url: &str,
    origin: &str,
) -> tokio_tungstenite::tungstenite::handshake::client::Request {
    let mut req = url.into_client_request().unwrap();
    req.headers_mut().insert("origin", origin.parse().unwrap());
    req
}

/// A log writer that keeps every byte, for tests that read what the gateway logged.
#[derive(Clone, Default)]
pub struct Captured(pub Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Every log line of this test binary from the first call on, as JSON. A process-wide
/// subscriber: a thread-scoped one misses events whose callsites other tests' threads
/// registered first.
pub fn captured_logs() -> &'static Captured {
    static LOGS: std::sync::OnceLock<Captured> = std::sync::OnceLock::new();
    LOGS.get_or_init(|| {
        let captured = Captured::default();
        let writer = captured.clone();
        tracing_subscriber::fmt()
            .json()
            .with_env_filter("debug")
            .with_writer(move || writer.clone())
            .init();
        captured
    })
}

/// `n` stream ids `prefix:0` … `prefix:{n-1}`.
pub fn ids(prefix: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{prefix}:{i}")).collect()
}

/// `/metrics` as a map from `name{labels}` to value.
pub async fn scrape_metrics(h: &Harness) -> HashMap<String, f64> {
    let resp = reqwest::get(format!("http://{}/metrics", h.addr))
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert!(resp.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/plain"));
    resp.text()
        .await
        .unwrap()
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| {
            let (k, v) = l.rsplit_once(' ').unwrap();
            (k.to_string(), v.parse().unwrap())
        })
        .collect()
}

pub fn metric(m: &HashMap<String, f64>, key: &str) -> f64 {
    *m.get(key).unwrap_or_else(|| {
        let family = key.split('{').next().unwrap_or(key);
        let mut near: Vec<&String> = m.keys().filter(|k| k.starts_with(family)).collect();
        near.sort();
        panic!("no series {key}; {family} has {near:?}")
    })
}
