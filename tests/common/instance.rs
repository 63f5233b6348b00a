//! A real `muxgate serve` process (the binary cargo built for this test), configured as an
//! operator would: a config file plus `MUXGATE_*` variables. For what only separate processes
//! show: SIGTERM and its drain, a load balancer in front, instances on one Redis.

use std::net::SocketAddr;
use std::process::Stdio;
use std::time::Duration;

use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

use super::{admin_request, sign, Client, ADMIN_TOKEN, API_KEY, SECRET};
use tokio_tungstenite::tungstenite::Message;

/// How long a gateway may take to print its listening line (a debug build loads its
/// tokenizers first).
const START_WAIT: Duration = Duration::from_secs(60);

pub struct Instance {
    pub id: String,
    pub addr: SocketAddr,
    dir: tempfile::TempDir,
    child: Child,
}

impl Instance {
    /// Starts `muxgate serve` as `id` on a free loopback port, relaying to `upstream` (a mock's
    /// base URL), in cluster mode on `redis_url` when given, with `config` (TOML) as its file.
    pub async fn start(
        id: &str,
        upstream: &str,
        redis_url: Option<&str>,
        config: &str,
    ) -> Instance {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        Instance::start_on(id, port, upstream, redis_url, config).await
    }

    /// The same on `port` (a restarted instance comes back where the load balancer expects it).
    pub async fn start_on(
        id: &str,
        port: u16,
        upstream: &str,
        redis_url: Option<&str>,
        config: &str,
    ) -> Instance {
        let dir = tempfile::tempdir().unwrap();
        let config_path = dir.path().join("muxgate.toml");
        std::fs::write(&config_path, config).unwrap();
        let log = std::fs::File::create(dir.path().join("muxgate.log")).unwrap();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_muxgate"));
        cmd.arg("serve")
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("MUXGATE_CONFIG", &config_path)
            .env("MUXGATE_LISTEN", format!("127.0.0.1:{port}"))
            .env("MUXGATE_JWT_SECRET", SECRET)
            .env("MUXGATE_ADMIN_TOKEN", ADMIN_TOKEN)
            .env("MUXGATE_UPSTREAM_BASE_URL", upstream)
            .env("MUXGATE_UPSTREAM_API_KEY", API_KEY)
            .env("MUXGATE_INSTANCE_ID", id)
            // Warnings only, printed when a test fails; MUXGATE_TEST_LOG=info shows each
            // connection and stream moving when one has to find out why.
            .env(
                "MUXGATE_LOG",
                std::env::var("MUXGATE_TEST_LOG").unwrap_or("warn".into()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log)
            .kill_on_drop(true);
        if let Some(url) = redis_url {
            cmd.env("MUXGATE_REDIS_URL", url);
        }
        let mut child = cmd.spawn().unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let wait = async {
            while let Some(line) = lines.next_line().await.unwrap() {
                if let Some(addr) = line.strip_prefix("muxgate: listening on http://") {
                    return Some(addr.parse::<SocketAddr>().unwrap());
                }
            }
            None
        };
        let addr = match tokio::time::timeout(START_WAIT, wait).await {
            Ok(Some(addr)) => addr,
            outcome => panic!(
                "{id} did not start ({}): {}",
                if outcome.is_err() {
                    "timed out"
                } else {
                    "exited"
                },
                std::fs::read_to_string(dir.path().join("muxgate.log")).unwrap_or_default()
            ),
        };
        // Its later announcements must find a reader: a closed pipe would fail its writes.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        let instance = Instance {
            id: id.to_string(),
            addr,
            dir,
            child,
        };
        instance.warm_up().await;
        instance
    }

    /// Runs one stream to its end: the tokenizers load once per process (seconds in a debug
    /// build, more on a loaded machine) and the first streams would otherwise wait that out,
    /// past a test's frame timeout. Its upstream request counts in the mock's stats.
    async fn warm_up(&self) {
        use futures_util::StreamExt;
        let run = async {
            let (ws, _) = tokio_tungstenite::connect_async(format!("ws://{}/v1/ws", self.addr))
                .await
                .unwrap();
            let mut c = Client { ws };
            let user = format!("warm-up-{}", self.id);
            c.send(json!({"type":"hello","token":token(&user, "pro"),"client":"test/1"}))
                .await;
            c.open("warm-up", "warm up [[mock chunks=1]]").await;
            // Read directly: the frames may take longer than FRAME_WAIT here.
            while let Some(Ok(msg)) = c.ws.next().await {
                let Message::Text(t) = msg else { continue };
                let f: Value = serde_json::from_str(&t).unwrap();
                match f["type"].as_str() {
                    Some("done") => return c.close().await,
                    Some("error") => panic!("{}: warm-up {f}", self.id),
                    _ => {}
                }
            }
            panic!("{}: closed during the warm-up", self.id);
        };
        if tokio::time::timeout(START_WAIT, run).await.is_err() {
            panic!(
                "{} did not run a first stream within {START_WAIT:?}:\n{}",
                self.id,
                self.log()
            );
        }
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    pub fn pid(&self) -> u32 {
        self.child.id().unwrap()
    }

    /// What it logged (warnings and errors), for failure messages.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("muxgate.log")).unwrap_or_default()
    }

    /// Sends SIGTERM, as a rolling restart does: the instance drains and exits.
    pub fn terminate(&self) {
        let status = std::process::Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .status()
            .unwrap();
        assert!(status.success(), "kill -TERM {}", self.pid());
    }

    /// Waits (bounded) for the process to exit; its exit status.
    pub async fn exited(&mut self, within: Duration) -> std::process::ExitStatus {
        match tokio::time::timeout(within, self.child.wait()).await {
            Ok(status) => status.unwrap(),
            Err(_) => panic!(
                "{} still running after {within:?}:\n{}",
                self.id,
                self.log()
            ),
        }
    }

    /// GET an admin route as JSON (directly, not through the load balancer).
    pub async fn admin(&self, path: &str) -> Value {
        admin_request(self.addr, reqwest::Method::GET, path).await
    }
}

/// A token for `user` of `tier`, valid ten minutes, signed with the instances' secret.
pub fn token(user: &str, tier: &str) -> String {
    let exp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 600;
    sign(&json!({"sub": user, "tier": tier, "exp": exp}))
}
