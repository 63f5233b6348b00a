//! The state one gateway process shares: configuration, authenticator, upstreams, limits,
//! budgets, metrics, the hub, and the signals and task trackers of shutdown.
//!
//! It sits below everything that uses it: `server` (the router), `session` (a connection)
//! and `relay` (a stream) all import it, and it imports none of them.

use std::sync::Arc;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::auth::Authenticator;
use crate::billing::Budgets;
use crate::cluster::{self, Cluster, ClusterError};
use crate::config::{Config, ProviderConfig};
use crate::hub::Hub;
use crate::limits::RateLimiter;
use crate::metrics::Metrics;
use crate::mock;
use crate::tiers::Tiers;
use crate::upstream::Upstreams;

/// Why the gateway could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("no upstream provider configured: set MUXGATE_UPSTREAM_BASE_URL or [[providers]], or run in dev mode")]
    NoProvider,
    #[error("cannot build the HTTP client: {0}")]
    Client(#[from] reqwest::Error),
    #[error("cannot start the simulated provider: {0}")]
    Simulated(#[from] std::io::Error),
    #[error("cluster mode: {0}")]
    Cluster(#[from] ClusterError),
}

/// Everything the connections and streams of one gateway process share.
pub struct Gateway {
    /// The validated configuration, read by every layer (timeouts, limits, tiers, origins).
    pub config: Config,
    /// Verifies the JWT of every `hello`; one per process so its key is parsed once.
    pub auth: Authenticator,
    /// The providers and their pooled HTTP clients, breakers and upstream slots.
    pub upstreams: Upstreams,
    /// The configured tiers, resolved once: a connection looks its tier up here at `hello`.
    pub tiers: Tiers,
    /// Token buckets shared by every connection.
    pub limits: RateLimiter,
    /// Daily spend per user and tier, and their limits.
    pub budgets: Budgets,
    /// Cluster mode (`redis_url` set): the Redis store the limits, budgets and per-user caps of
    /// every instance share. `None`: one process, everything in memory.
    pub cluster: Option<Arc<Cluster>>,
    /// The Prometheus registry; behind an `Arc` so a connection's writer task holds only it.
    pub metrics: Arc<Metrics>,
    /// Streams and connections by user: limits, resume after a reconnect, admin views. Behind
    /// an `Arc` so a finished stream's linger task can drop it from the registry later.
    pub hub: Arc<Hub>,
    /// Cancelled when shutdown begins: connections get `goaway` and refuse new streams.
    pub draining: CancellationToken,
    /// Cancelled when the drain is over: connections close with 1001.
    pub closing: CancellationToken,
    /// Every stream's task, so shutdown can wait for them.
    pub stream_tasks: TaskTracker,
    /// Every connection's task.
    pub sessions: TaskTracker,
    /// The dev-mode simulated provider, kept alive as long as the gateway.
    simulated: Option<mock::MockHandle>,
    /// Whether the JWT secret was generated at start (dev mode without a secret).
    pub ephemeral_secret: bool,
}

impl Gateway {
    /// Builds the shared state. In dev mode with no provider, starts the built-in simulated
    /// provider on a loopback port, so the demo runs the real HTTP path with no API key.
    pub async fn start(mut config: Config) -> Result<Arc<Gateway>, StartError> {
        let mut simulated = None;
        if config.providers.is_empty() {
            if !config.is_dev() {
                return Err(StartError::NoProvider);
            }
            let listener = TcpListener::bind(("127.0.0.1", 0)).await?;
            let handle = mock::spawn(listener, None).await?;
            config.providers.push(ProviderConfig::catch_all(
                "simulated",
                handle.base_url(),
                None,
            ));
            simulated = Some(handle);
        }
        let ephemeral_secret = config.auth.jwt_secret.is_none();
        let secret = match &config.auth.jwt_secret {
            Some(secret) => secret.as_bytes().to_vec(),
            None => rand::random::<[u8; 32]>().to_vec(),
        };
        let auth = Authenticator::new(
            &secret,
            config.auth.leeway_secs,
            config.tiers.keys().cloned().collect(),
        );
        let upstreams = Upstreams::new(&config, &secret)?;
        let tiers = Tiers::new(&config.tiers, config.session.max_streams);
        let mut limits = RateLimiter::new(config.limits.clone(), &tiers);
        let mut budgets = Budgets::new(config.budgets.clone());
        let (metrics, cluster) = match &config.redis_url {
            None => (Arc::new(Metrics::new()), None),
            Some(url) => {
                let metrics = Arc::new(Metrics::with_redis());
                let id = config
                    .cluster
                    .instance_id
                    .clone()
                    .unwrap_or_else(|| cluster::default_instance_id(config.listen.port()));
                let cluster = Cluster::start(url, &config.cluster, id, metrics.clone())?;
                tracing::info!(instance = %cluster.instance(), "cluster mode: limits, budgets and per-user caps are shared through Redis");
                limits = limits.shared(cluster.clone());
                budgets = budgets.shared(cluster.clone());
                (metrics, Some(cluster))
            }
        };
        // Both tokenizers take a moment to build; not on the first stream's time.
        tokio::task::spawn_blocking(crate::billing::warm_up);
        Ok(Arc::new(Gateway {
            config,
            auth,
            upstreams,
            tiers,
            limits,
            budgets,
            cluster,
            metrics,
            hub: Arc::new(Hub::new()),
            draining: CancellationToken::new(),
            closing: CancellationToken::new(),
            stream_tasks: TaskTracker::new(),
            sessions: TaskTracker::new(),
            simulated,
            ephemeral_secret,
        }))
    }

    /// The simulated provider's address, in dev mode without a real provider.
    pub fn simulated_upstream(&self) -> Option<String> {
        self.simulated.as_ref().map(|h| h.base_url())
    }
}
