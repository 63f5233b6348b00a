//! Configuration: a strict TOML file, then environment overrides.
//!
//! Unknown keys are errors that name the file, line and column. Every default is written in the
//! doc comment of the field that has it; `muxgate.example.toml` shows them all.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

// Each section is declared beside the code it configures; re-exported here so that the whole
// configuration is one public module an embedder can build in code.
pub use crate::billing::BudgetConfig;
pub use crate::breaker::BreakerConfig;
pub use crate::cluster::{ClusterConfig, OnRedisError};
pub use crate::limits::LimitsConfig;
pub use crate::retry::RetryConfig;
pub use crate::scheduler::SchedulerConfig;
pub use crate::tiers::{default_tiers, OnLimit, TierConfig};

/// Why the configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("environment variable {name}: {message}")]
    Env { name: &'static str, message: String },
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

/// The whole configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Address to listen on. Default `127.0.0.1:8080`. Env `MUXGATE_LISTEN`.
    pub listen: SocketAddr,
    /// Dev mode: signs demo tokens at `GET /dev/token`, uses a random JWT secret when none is
    /// set, and routes to the built-in simulated provider when no provider is configured. Refuses
    /// a non-loopback `listen`. Default: on exactly when no JWT secret is configured. Env
    /// `MUXGATE_DEV`.
    pub dev: Option<bool>,
    /// Directory served at `/` (the demo chat and the shim). Default: `web` in the working
    /// directory if it exists, else the `web/` of the source tree. Env `MUXGATE_STATIC_DIR`.
    pub static_dir: Option<PathBuf>,
    /// Browser origins allowed to open a WebSocket or call `/v1/chat/completions` and
    /// `/v1/models` (CORS) besides the gateway's own (see
    /// `server.public_origins`), e.g. `["https://chat.example.com"]`; `"*"` allows any. Default
    /// empty. Env `MUXGATE_ALLOWED_ORIGINS` (comma-separated).
    pub allowed_origins: Vec<String>,
    /// Bearer token for `/admin/*`. Default: none, and the admin routes answer 404. Env
    /// `MUXGATE_ADMIN_TOKEN`.
    pub admin_token: Option<String>,
    pub auth: AuthConfig,
    pub server: ServerConfig,
    pub session: SessionConfig,
    pub retry: RetryConfig,
    /// Upstream providers; a stream's `model` picks the first provider that lists it.
    pub providers: Vec<ProviderConfig>,
    /// Tiers by name; a token's `tier` must be one of them. Default: free, pro and enterprise
    /// with the seed's limits (see [`default_tiers`]).
    pub tiers: BTreeMap<String, TierConfig>,
    pub limits: LimitsConfig,
    pub scheduler: SchedulerConfig,
    pub breaker: BreakerConfig,
    /// Limits on what any upstream may send (event size, stream duration).
    pub upstream: UpstreamConfig,
    /// Daily spend limits per user and per tier (USD, UTC days). Default: none.
    pub budgets: BudgetConfig,
    /// Models tried, in order, when a model's provider is open-circuit or out of retries
    /// before the first token, e.g. `"gpt-4.1" = ["claude-sonnet-4.5"]`. Default none.
    pub fallbacks: BTreeMap<String, Vec<String>>,
    /// Keys of `open.params` passed to the upstream; any other key is refused with
    /// `bad_request` (`n` is apart: 1 is accepted, anything else refused). Default: the
    /// sampling, output, tool-calling and logprobs parameters of the OpenAI chat API (see
    /// [`default_allowed_params`]).
    pub allowed_params: Vec<String>,
    /// Price per model in USD per million tokens (`input`, `output`, optional `cached_input`
    /// for the prompt tokens the upstream reports cached), for `done.cost_usd`. Default: the
    /// seed's table (gpt-4.1, claude-sonnet-4.5, gemini-2.5-flash, deepseek-v3.2), no
    /// `cached_input`.
    pub pricing: BTreeMap<String, Price>,
    /// Shutdown: how long streams may run after `goaway` before they are aborted.
    /// Default 10000 ms.
    pub drain_timeout_ms: u64,
    /// Redis URL (`redis://host:6379/0`, `rediss://` for TLS): set, it turns on cluster mode,
    /// where every instance using the same Redis and `cluster.key_prefix` shares rate limits,
    /// budgets and the per-user connection and stream caps. Default none: one process, all
    /// state in memory. Env `MUXGATE_REDIS_URL`.
    pub redis_url: Option<String>,
    /// Cluster mode's settings (used only with `redis_url`).
    pub cluster: ClusterConfig,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            dev: None,
            static_dir: None,
            allowed_origins: Vec::new(),
            admin_token: None,
            auth: AuthConfig::default(),
            server: ServerConfig::default(),
            session: SessionConfig::default(),
            retry: RetryConfig::default(),
            providers: Vec::new(),
            tiers: default_tiers(),
            limits: LimitsConfig::default(),
            scheduler: SchedulerConfig::default(),
            breaker: BreakerConfig::default(),
            upstream: UpstreamConfig::default(),
            budgets: BudgetConfig::default(),
            fallbacks: BTreeMap::new(),
            allowed_params: default_allowed_params(),
            pricing: default_pricing(),
            drain_timeout_ms: 10_000,
            redis_url: None,
            cluster: ClusterConfig::default(),
        }
    }
}

/// Token verification.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// The HS256 secret. Prefer `jwt_secret_env`. Env `MUXGATE_JWT_SECRET` overrides both.
    pub jwt_secret: Option<String>,
    /// Name of an environment variable holding the secret. Default none.
    pub jwt_secret_env: Option<String>,
    /// Clock skew tolerated on `exp`, in seconds. Default 30.
    pub leeway_secs: u64,
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig {
            jwt_secret: None,
            jwt_secret_env: None,
            leeway_secs: 30,
        }
    }
}

/// The HTTP edge: who may talk to the gateway and how many sockets it holds before a
/// WebSocket is authenticated.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// The origins the gateway itself is served at in production, e.g.
    /// `["https://chat.example.com"]`: a browser page from one of them may open a WebSocket, as
    /// may one from `allowed_origins`. The request's `Host` is never trusted for this (DNS
    /// rebinding). Dev mode instead answers only loopback `Host` names, and there a page from
    /// the gateway's own loopback origin is always allowed. Default empty. Env
    /// `MUXGATE_PUBLIC_ORIGINS` (comma-separated).
    pub public_origins: Vec<String>,
    /// A client must send a request's whole header within this time, counted from its first
    /// byte or, on a keep-alive connection, from the end of the previous response; else the
    /// connection is closed. Bounds slowloris and idle keep-alive sockets. Default 10000 ms.
    pub header_read_timeout_ms: u64,
    /// Open TCP connections, WebSockets included; beyond it a new connection gets a 503 and is
    /// closed. Keep it under the process's file descriptor limit. Default 20000.
    pub max_connections: usize,
    /// HTTP connections not (yet) upgraded to a WebSocket; beyond it a new connection gets a
    /// 503 and is closed. Default 1024.
    pub max_pending_connections: usize,
    /// The same, per client IP address. Behind a reverse proxy every client shares the proxy's
    /// address: raise it (or set it equal to `max_pending_connections`). Default 64.
    pub max_pending_connections_per_ip: usize,
    /// Threads serving connections, each a single-threaded runtime that keeps a connection,
    /// its streams and their upstream reads together, so a relayed chunk never wakes another
    /// thread (see `src/workers.rs`). 0 means one per CPU the process may use (`taskset` and
    /// cgroup limits count). Default 0. Env `MUXGATE_WORKERS`.
    pub workers: usize,
}

impl ServerConfig {
    /// `workers` resolved: how many worker threads, and upstream pools per provider, there are.
    pub fn worker_count(&self) -> usize {
        match self.workers {
            0 => crate::workers::default_count(),
            n => n,
        }
    }
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            public_origins: Vec::new(),
            header_read_timeout_ms: 10_000,
            max_connections: 20_000,
            max_pending_connections: 1_024,
            max_pending_connections_per_ip: 64,
            workers: 0,
        }
    }
}

/// One WebSocket connection and its streams.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SessionConfig {
    /// The first frame must be `hello` within this time, else close 4401. Default 5000 ms.
    pub hello_timeout_ms: u64,
    /// WebSocket ping interval; a connection that sends nothing (not even a pong) for two
    /// intervals is dropped. Default 15000 ms.
    pub heartbeat_ms: u64,
    /// Largest client frame accepted; a larger one gets `bad_request` and the connection lives.
    /// Default 1048576 (1 MiB).
    pub max_frame_bytes: usize,
    /// Largest `hello` frame, and so the most an unauthenticated socket can make the gateway
    /// read and buffer: past it the socket is not read further and gets 4401. Room for a token
    /// and a `resume` list of some 600 streams. Default 65536 (64 KiB); at most
    /// `max_frame_bytes`.
    pub max_hello_bytes: usize,
    /// Live streams per user, over all their connections. Default 32.
    pub max_streams: usize,
    /// How long a dropped connection's streams keep running, waiting for a `hello` with
    /// `resume`. Default 30000 ms.
    pub resume_window_ms: u64,
    /// Frames kept per stream for replay, in bytes. Frames already written are dropped from the
    /// front beyond it; when what is unwritten alone reaches it, the stream stops reading its
    /// upstream until the client catches up. Default 1048576 (1 MiB).
    pub stream_buffer_bytes: usize,
    /// A socket write that takes longer than this closes the connection (4408, slow consumer);
    /// its streams wait for a resume. Default 10000 ms.
    pub write_timeout_ms: u64,
    /// Bad frames a connection may send per minute before it is closed with 4400. Default 20.
    pub max_bad_frames_per_minute: u32,
    /// Once the connection's token is past its `exp` by more than this, `open` is refused with
    /// `unauthorized` until a `refresh` frame brings a new token. Default 5000 ms.
    pub token_leeway_ms: u64,
    /// A connection whose token is past its `exp` by this much without a valid `refresh` is
    /// closed with 4401; its streams stay resumable. Default 60000 ms.
    pub token_grace_ms: u64,
    /// Bytes of finished streams' replay logs kept per user for a resume. Past it, the user's
    /// oldest finished streams are forgotten before the resume window ends (a resume of one gets
    /// `not_found`), so finished streams cannot pin more memory than this per user. Live
    /// streams do not count: `max_streams` bounds them. Default 8388608 (8 MiB).
    pub retained_bytes_per_user: usize,
}

impl Default for SessionConfig {
    fn default() -> Self {
        SessionConfig {
            hello_timeout_ms: 5_000,
            heartbeat_ms: 15_000,
            max_frame_bytes: 1 << 20,
            max_hello_bytes: 64 << 10,
            max_streams: 32,
            resume_window_ms: 30_000,
            stream_buffer_bytes: 1 << 20,
            write_timeout_ms: 10_000,
            max_bad_frames_per_minute: 20,
            token_leeway_ms: 5_000,
            token_grace_ms: 60_000,
            retained_bytes_per_user: 8 << 20,
        }
    }
}

/// Limits on what any upstream may send, for every provider.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct UpstreamConfig {
    /// Largest SSE event (its `data` lines plus the line being read) accepted from an
    /// upstream; a larger one ends the stream with `upstream_error`, and the gateway stops
    /// reading that response. Default 4194304 (4 MiB).
    pub max_event_bytes: usize,
    /// Longest a stream may run, from its `open` to its last token, whatever the upstream
    /// sends (keep-alive events reset the idle timer, not this one); beyond it the stream ends
    /// with `upstream_timeout`. Default 1800000 ms (30 minutes).
    pub max_stream_duration_ms: u64,
}

impl Default for UpstreamConfig {
    fn default() -> Self {
        UpstreamConfig {
            max_event_bytes: 4 << 20,
            max_stream_duration_ms: 30 * 60 * 1000,
        }
    }
}

/// One OpenAI-compatible upstream.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProviderConfig {
    /// Name used in logs and metrics.
    pub name: String,
    /// Base URL up to and including `/v1`; the gateway posts to `{base_url}/chat/completions`.
    pub base_url: String,
    /// Environment variable holding the API key (sent as `Authorization: Bearer`). Default none.
    #[serde(default)]
    pub api_key_env: Option<String>,
    /// Model names this provider serves; `"*"` serves any. Required.
    pub models: Vec<String>,
    /// TCP connect timeout. Default 5000 ms.
    #[serde(default = "default_connect_timeout_ms")]
    pub connect_timeout_ms: u64,
    /// Time from sending the request to the first token. Default 60000 ms.
    #[serde(default = "default_first_token_timeout_ms")]
    pub first_token_timeout_ms: u64,
    /// Longest silence between two chunks once streaming. Default 60000 ms.
    #[serde(default = "default_idle_timeout_ms")]
    pub idle_timeout_ms: u64,
    /// Streams this provider runs at once; the rest queue by priority. Default 50 (the seed's).
    #[serde(default = "default_max_concurrent")]
    pub max_concurrent: usize,
    /// Idle keep-alive connections kept per host, by each worker (each has its own pool).
    /// Past it, a connection freed when a stream ends is closed, and a later stream pays a new
    /// TCP handshake: at thousands of streams per provider, raise it toward `max_concurrent`
    /// divided by the workers. Default 64.
    #[serde(default = "default_pool_max_idle")]
    pub pool_max_idle_per_host: usize,
    /// For an `http://` base_url: HTTP/1.1 with the connection read by the stream's own task
    /// (one task wake-up per chunk instead of three), its keep-alive pool sized by
    /// `pool_max_idle_per_host`. Not used for `https://`, nor when `HTTP_PROXY` or
    /// `ALL_PROXY` is set (reqwest's proxy then applies). `false` sends every request through
    /// reqwest. Default true.
    #[serde(default = "default_true")]
    pub direct_http1: bool,
    /// The API key itself, resolved from `api_key_env` or `MUXGATE_UPSTREAM_API_KEY` at load.
    #[serde(skip)]
    pub api_key: Option<String>,
}

fn default_connect_timeout_ms() -> u64 {
    5_000
}
fn default_first_token_timeout_ms() -> u64 {
    60_000
}
fn default_idle_timeout_ms() -> u64 {
    60_000
}
fn default_max_concurrent() -> usize {
    50
}
fn default_pool_max_idle() -> usize {
    64
}
fn default_true() -> bool {
    true
}

impl ProviderConfig {
    /// A provider that serves every model, as set by `MUXGATE_UPSTREAM_BASE_URL`.
    pub fn catch_all(name: &str, base_url: String, api_key: Option<String>) -> Self {
        ProviderConfig {
            name: name.to_string(),
            base_url,
            api_key_env: None,
            models: vec!["*".into()],
            connect_timeout_ms: default_connect_timeout_ms(),
            first_token_timeout_ms: default_first_token_timeout_ms(),
            idle_timeout_ms: default_idle_timeout_ms(),
            max_concurrent: default_max_concurrent(),
            pool_max_idle_per_host: default_pool_max_idle(),
            direct_http1: true,
            api_key,
        }
    }

    /// `{base_url}/chat/completions`, parsed: the one URL this provider is posted to. Parsed
    /// once, when the configuration is checked and when the provider is built, so a request
    /// hands reqwest a `Url` instead of a string it would parse again per request.
    pub fn chat_completions_url(&self) -> Result<reqwest::Url, String> {
        if !(self.base_url.starts_with("http://") || self.base_url.starts_with("https://")) {
            return Err(format!(
                "provider `{}`: base_url `{}` must start with http:// or https://",
                self.name, self.base_url
            ));
        }
        let url = format!("{}/chat/completions", self.base_url.trim_end_matches('/'));
        match reqwest::Url::parse(&url) {
            Ok(url) if url.has_host() => Ok(url),
            Ok(_) => Err(format!(
                "provider `{}`: base_url `{}` has no host",
                self.name, self.base_url
            )),
            Err(e) => Err(format!(
                "provider `{}`: base_url `{}` is not a valid URL: {e}",
                self.name, self.base_url
            )),
        }
    }

    pub fn serves(&self, model: &str) -> bool {
        self.models.iter().any(|m| m == "*" || m == model)
    }
}

/// USD per million tokens: `input`, `output`, and the optional `cached_input` (default none:
/// cached prompt tokens cost `input`). Billing's type, read here.
pub use crate::billing::Price;

/// The `open.params` keys passed upstream unless the config says otherwise.
pub fn default_allowed_params() -> Vec<String> {
    [
        "temperature",
        "top_p",
        "max_tokens",
        "max_completion_tokens",
        "stop",
        "presence_penalty",
        "frequency_penalty",
        "seed",
        "logit_bias",
        "response_format",
        "reasoning_effort",
        "user",
        "tools",
        "tool_choice",
        "parallel_tool_calls",
        "logprobs",
        "top_logprobs",
        "modalities",
        "prediction",
        "store",
        "metadata",
        "service_tier",
    ]
    .into_iter()
    .map(String::from)
    .collect()
}

/// The seed article's price table, USD per million tokens.
pub fn default_pricing() -> BTreeMap<String, Price> {
    [
        ("gpt-4.1", 2.00, 8.00),
        ("claude-sonnet-4.5", 3.00, 15.00),
        ("gemini-2.5-flash", 0.30, 2.50),
        ("deepseek-v3.2", 0.10, 0.42),
    ]
    .into_iter()
    .map(|(m, input, output)| {
        let price = Price {
            input,
            output,
            cached_input: None,
        };
        (m.to_string(), price)
    })
    .collect()
}

/// Where environment values come from; a function so tests need not touch the process env.
pub type EnvLookup<'a> = &'a dyn Fn(&str) -> Option<String>;

impl Config {
    /// Reads `path` if given, then applies the process environment.
    pub fn load(path: Option<&Path>) -> Result<Config, ConfigError> {
        Config::load_with_env(path, &|name| std::env::var(name).ok())
    }

    pub fn load_with_env(path: Option<&Path>, env: EnvLookup<'_>) -> Result<Config, ConfigError> {
        let mut config = match path {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                    path: path.to_path_buf(),
                    source,
                })?;
                Config::from_toml(&text).map_err(|message| ConfigError::Parse {
                    path: path.to_path_buf(),
                    message,
                })?
            }
            None => Config::default(),
        };
        config.apply_env(env)?;
        config.validate()?;
        Ok(config)
    }

    /// Parses TOML text; the error names line and column.
    pub fn from_toml(text: &str) -> Result<Config, String> {
        toml::from_str(text).map_err(|e: toml::de::Error| {
            let message = e.message().to_string();
            match e.span() {
                Some(span) => {
                    let (line, col) = line_col(text, span.start);
                    format!("line {line}, column {col}: {message}")
                }
                None => message,
            }
        })
    }

    fn apply_env(&mut self, env: EnvLookup<'_>) -> Result<(), ConfigError> {
        let get = |name: &str| env(name).filter(|v| !v.trim().is_empty());
        if let Some(v) = get("MUXGATE_LISTEN") {
            self.listen = v.trim().parse().map_err(|e| ConfigError::Env {
                name: "MUXGATE_LISTEN",
                message: format!("`{v}` is not an address like 127.0.0.1:8080 ({e})"),
            })?;
        }
        if let Some(v) = get("MUXGATE_DEV") {
            self.dev = Some(parse_bool(&v).ok_or_else(|| ConfigError::Env {
                name: "MUXGATE_DEV",
                message: format!("`{v}` is not true/false/1/0"),
            })?);
        }
        if let Some(v) = get("MUXGATE_STATIC_DIR") {
            self.static_dir = Some(PathBuf::from(v));
        }
        if let Some(v) = get("MUXGATE_ALLOWED_ORIGINS") {
            self.allowed_origins = origin_list(&v);
        }
        if let Some(v) = get("MUXGATE_PUBLIC_ORIGINS") {
            self.server.public_origins = origin_list(&v);
        }
        if let Some(v) = get("MUXGATE_WORKERS") {
            self.server.workers = v.trim().parse().map_err(|_| ConfigError::Env {
                name: "MUXGATE_WORKERS",
                message: format!("`{v}` is not a number of threads (0: one per CPU)"),
            })?;
        }
        if let Some(v) = get("MUXGATE_ADMIN_TOKEN") {
            self.admin_token = Some(v);
        }
        if let Some(name) = self.auth.jwt_secret_env.clone() {
            if let Some(v) = get(&name) {
                self.auth.jwt_secret = Some(v);
            }
        }
        if let Some(v) = get("MUXGATE_JWT_SECRET") {
            self.auth.jwt_secret = Some(v);
        }
        for provider in &mut self.providers {
            if let Some(name) = &provider.api_key_env {
                provider.api_key = get(name);
            }
        }
        if let Some(v) = get("MUXGATE_REDIS_URL") {
            self.redis_url = Some(v);
        }
        if let Some(v) = get("MUXGATE_INSTANCE_ID") {
            self.cluster.instance_id = Some(v);
        }
        if let Some(base_url) = get("MUXGATE_UPSTREAM_BASE_URL") {
            // The environment alone sets one provider that serves every model, ahead of any
            // from the file.
            let key = get("MUXGATE_UPSTREAM_API_KEY");
            self.providers
                .insert(0, ProviderConfig::catch_all("upstream", base_url, key));
        }
        Ok(())
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |m: String| Err(ConfigError::Invalid(m));
        if self.is_dev() && !self.listen.ip().is_loopback() {
            return invalid(format!(
                "dev mode refuses to listen on non-loopback address {}: set MUXGATE_JWT_SECRET (or auth.jwt_secret_env) to run in production",
                self.listen
            ));
        }
        if let Some(secret) = &self.auth.jwt_secret {
            if secret.len() < 16 {
                return invalid("the JWT secret must be at least 16 bytes".into());
            }
        }
        for p in &self.providers {
            if let Err(message) = p.chat_completions_url() {
                return invalid(message);
            }
            if p.models.is_empty() {
                return invalid(format!("provider `{}` lists no models", p.name));
            }
        }
        let s = &self.session;
        if s.max_streams == 0 || s.max_frame_bytes < 1024 || s.stream_buffer_bytes < 1024 {
            return invalid(
                "session.max_streams must be > 0, max_frame_bytes and stream_buffer_bytes >= 1024"
                    .into(),
            );
        }
        if s.max_hello_bytes < 1024 || s.max_hello_bytes > s.max_frame_bytes {
            return invalid(
                "session.max_hello_bytes must be >= 1024 and <= session.max_frame_bytes".into(),
            );
        }
        if s.heartbeat_ms == 0 || s.hello_timeout_ms == 0 || s.write_timeout_ms == 0 {
            return invalid("session timeouts must be > 0".into());
        }
        if s.token_grace_ms < s.token_leeway_ms {
            return invalid("session.token_grace_ms must be >= session.token_leeway_ms".into());
        }
        let e = &self.server;
        if e.header_read_timeout_ms == 0
            || e.max_connections == 0
            || e.max_pending_connections == 0
            || e.max_pending_connections_per_ip == 0
        {
            return invalid(
                "server.header_read_timeout_ms and the server connection limits must be > 0".into(),
            );
        }
        if e.workers > 1024 {
            return invalid("server.workers must be at most 1024 (0: one per CPU)".into());
        }
        if self.retry.max_attempts == 0 {
            return invalid("retry.max_attempts must be at least 1".into());
        }
        if self.tiers.is_empty() {
            return invalid("[tiers] must name at least one tier".into());
        }
        for (name, t) in &self.tiers {
            if t.user_rpm == 0 || t.rpm == 0 || t.tpm == 0 || t.max_connections == 0 {
                return invalid(format!(
                    "tier `{name}`: user_rpm, rpm, tpm and max_connections must be > 0"
                ));
            }
        }
        if self.limits.global_rpm == 0 || self.limits.global_tpm == 0 {
            return invalid("limits.global_rpm and limits.global_tpm must be > 0".into());
        }
        if let Err(e) = self.budgets.validate() {
            return invalid(format!("budgets: {e}"));
        }
        if self.upstream.max_event_bytes < 1024 || self.upstream.max_stream_duration_ms == 0 {
            return invalid(
                "upstream.max_event_bytes must be >= 1024 and max_stream_duration_ms > 0".into(),
            );
        }
        if self.providers.iter().any(|p| p.max_concurrent == 0) {
            return invalid("providers.max_concurrent must be > 0".into());
        }
        let c = &self.cluster;
        if c.key_prefix.is_empty() || c.key_prefix.contains(['{', '}']) {
            // A brace would move every key's hash tag off the user or tier it names.
            return invalid("cluster.key_prefix must be non-empty, without `{` or `}`".into());
        }
        if c.redis_timeout_ms == 0 || c.lease_ms < 3 {
            return invalid(
                "cluster.redis_timeout_ms must be > 0 and cluster.lease_ms >= 3".into(),
            );
        }
        Ok(())
    }

    /// Dev mode, explicit or implied by a missing secret.
    pub fn is_dev(&self) -> bool {
        self.dev.unwrap_or(self.auth.jwt_secret.is_none())
    }

    pub fn static_dir(&self) -> PathBuf {
        if let Some(dir) = &self.static_dir {
            return dir.clone();
        }
        let local = PathBuf::from("web");
        if local.join("index.html").is_file() {
            return local;
        }
        PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/web"))
    }
}

/// A comma-separated list of origins, without trailing slashes.
fn origin_list(v: &str) -> Vec<String> {
    v.split(',')
        .map(|s| s.trim().trim_end_matches('/').to_string())
        .filter(|s| !s.is_empty())
        .collect()
}

fn parse_bool(v: &str) -> Option<bool> {
    match v.trim().to_ascii_lowercase().as_str() {
        "1" | "true" | "yes" | "on" => Some(true),
        "0" | "false" | "no" | "off" => Some(false),
        _ => None,
    }
}

fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let col = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
    (line, col)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn no_env(_: &str) -> Option<String> {
        None
    }

    #[test]
    fn unknown_key_names_line() {
        let text = "listen = \"127.0.0.1:9000\"\n\n[session]\nheartbeat_ms = 100\nheartbeet = 3\n";
        let err = Config::from_toml(text).expect_err("unknown key");
        assert!(err.starts_with("line 5, column 1"), "{err}");
        assert!(err.contains("heartbeet"), "{err}");
    }

    #[test]
    fn file_error_names_path() {
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join("m.toml");
        std::fs::write(
            &path,
            "[[providers]]\nname = \"a\"\nbase_url = \"http://x/v1\"\nmodels = [\"m\"]\nkey = 1\n",
        )
        .expect("write");
        let err = Config::load_with_env(Some(&path), &no_env).expect_err("bad");
        let msg = err.to_string();
        assert!(msg.contains("m.toml") && msg.contains("line 5"), "{msg}");
    }

    #[test]
    fn defaults_and_env() {
        let c = Config::load_with_env(None, &no_env).expect("defaults");
        assert!(c.is_dev());
        assert_eq!(c.redis_url, None, "one process unless Redis is configured");
        assert_eq!(c.cluster, crate::cluster::ClusterConfig::default());
        assert_eq!(c.session.max_streams, 32);
        assert_eq!(
            c.pricing["deepseek-v3.2"],
            Price {
                input: 0.10,
                output: 0.42,
                cached_input: None,
            }
        );

        let env = |name: &str| match name {
            "MUXGATE_LISTEN" => Some("0.0.0.0:9999".to_string()),
            "MUXGATE_JWT_SECRET" => Some("0123456789abcdef0123".to_string()),
            "MUXGATE_UPSTREAM_BASE_URL" => Some("http://127.0.0.1:1/v1".to_string()),
            "MUXGATE_UPSTREAM_API_KEY" => Some("sk-test".to_string()),
            "MUXGATE_ALLOWED_ORIGINS" => Some("https://a.example, https://b.example/".to_string()),
            "MUXGATE_PUBLIC_ORIGINS" => Some("https://gw.example/".to_string()),
            "MUXGATE_REDIS_URL" => Some("redis://127.0.0.1:6379/0".to_string()),
            "MUXGATE_INSTANCE_ID" => Some("gw-a".to_string()),
            "MUXGATE_WORKERS" => Some("3".to_string()),
            _ => None,
        };
        let c = Config::load_with_env(None, &env).expect("env");
        assert_eq!(c.server.worker_count(), 3);
        assert_eq!(c.redis_url.as_deref(), Some("redis://127.0.0.1:6379/0"));
        assert_eq!(c.cluster.instance_id.as_deref(), Some("gw-a"));
        assert!(!c.is_dev());
        assert_eq!(c.listen.port(), 9999);
        assert_eq!(c.providers[0].api_key.as_deref(), Some("sk-test"));
        assert!(c.providers[0].serves("anything"));
        assert_eq!(
            c.allowed_origins,
            vec!["https://a.example", "https://b.example"]
        );
        assert_eq!(c.server.public_origins, vec!["https://gw.example"]);
    }

    #[test]
    fn bad_upstream_url_is_a_config_error() {
        let provider = |base_url: &str| {
            format!("[[providers]]\nname = \"p\"\nbase_url = \"{base_url}\"\nmodels = [\"m\"]\n")
        };
        let good = Config::from_toml(&provider("http://127.0.0.1:9/v1/")).expect("parses");
        good.validate().expect("valid");
        assert_eq!(
            good.providers[0]
                .chat_completions_url()
                .expect("url")
                .as_str(),
            "http://127.0.0.1:9/v1/chat/completions"
        );
        for (bad, says) in [
            ("ftp://h/v1", "must start with http"),
            ("http://exa mple.com/v1", "not a valid URL"),
            ("http://:80/v1", "not a valid URL"),
            ("http://127.0.0.1:99999/v1", "not a valid URL"),
        ] {
            let c = Config::from_toml(&provider(bad)).expect("parses");
            let err = c.validate().expect_err(bad).to_string();
            assert!(
                err.contains("provider `p`") && err.contains(says),
                "{bad}: {err}"
            );
        }
    }

    #[test]
    fn dev_mode_refuses_public_address() {
        let env = |name: &str| (name == "MUXGATE_LISTEN").then(|| "0.0.0.0:8080".to_string());
        let err = Config::load_with_env(None, &env).expect_err("dev on 0.0.0.0");
        assert!(err.to_string().contains("dev mode refuses"), "{err}");
    }

    #[test]
    fn cluster_settings_are_checked() {
        let c = Config::from_toml(
            "redis_url = \"redis://127.0.0.1/\"\n[cluster]\nkey_prefix = \"gw\"\non_redis_error = \"fail_closed\"\nredis_timeout_ms = 100\n",
        )
        .expect("parses");
        assert_eq!(
            c.cluster.on_redis_error,
            crate::cluster::OnRedisError::FailClosed
        );
        c.validate().expect("valid");
        for bad in [
            "[cluster]\nkey_prefix = \"a{b}\"",
            "[cluster]\nredis_timeout_ms = 0",
        ] {
            let c = Config::from_toml(bad).expect("parses");
            assert!(c.validate().is_err(), "{bad}");
        }
        assert!(Config::from_toml("[cluster]\non_redis_error = \"maybe\"").is_err());
    }

    #[test]
    fn example_config_parses() {
        let text = include_str!("../muxgate.example.toml");
        let c = Config::from_toml(text).expect("example parses");
        assert!(!c.providers.is_empty());
        assert_eq!(
            c.allowed_params,
            default_allowed_params(),
            "the example shows the defaults"
        );
        assert_eq!(c.pricing["gpt-4.1"].cached_input, Some(0.50));
    }
}
