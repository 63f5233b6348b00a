//! The state one gateway process shares: configuration, authenticator, upstreams, limits,
//! budgets, metrics, the hub, and the signals and task trackers of shutdown.
//!
//! It sits below everything that uses it: `server` (the router), `session` (a connection)
//! and `relay` (a stream) all import it, and it imports none of them.
//!
//! Its fields are the crate's; an embedder sees [`Gateway::start`] and a few methods an
//! operator would also want (tokens, per-user counters, the metrics text).

use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::auth::{AuthError, Authenticator, Claims};
use crate::billing::Budgets;
use crate::cluster::{self, Cluster, ClusterError};
use crate::config::{Config, ProviderConfig};
use crate::handoff::Handoff;
use crate::hub::{Hub, UserStats};
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
    #[error("{0}")]
    Provider(#[from] crate::upstream::ProviderError),
    #[error("cannot start the simulated provider: {0}")]
    Simulated(#[from] std::io::Error),
    #[error("cluster mode: {0}")]
    Cluster(#[from] ClusterError),
}

/// Everything the connections and streams of one gateway process share.
pub struct Gateway {
    /// The validated configuration, read by every layer (timeouts, limits, tiers, origins).
    pub(crate) config: Config,
    /// Verifies the JWT of every `hello`; one per process so its key is parsed once.
    pub(crate) auth: Authenticator,
    /// The providers and their pooled HTTP clients, breakers and upstream slots.
    pub(crate) upstreams: Upstreams,
    /// The configured tiers, resolved once: a connection looks its tier up here at `hello`.
    pub(crate) tiers: Tiers,
    /// Token buckets shared by every connection.
    pub(crate) limits: RateLimiter,
    /// Daily spend per user and tier, and their limits.
    pub(crate) budgets: Budgets,
    /// Cluster mode (`redis_url` set): the Redis store the limits, budgets and per-user caps of
    /// every instance share. `None`: one process, everything in memory.
    pub(crate) cluster: Option<Arc<Cluster>>,
    /// Cluster mode: streams relayed between this instance and others, for clients that
    /// resumed them away from the instance running them.
    pub(crate) handoff: Option<Arc<Handoff>>,
    /// The Prometheus registry; behind an `Arc` so a connection's writer task holds only it.
    pub(crate) metrics: Arc<Metrics>,
    /// Streams and connections by user: limits, resume after a reconnect, admin views. Behind
    /// an `Arc` so a finished stream's linger task can drop it from the registry later.
    pub(crate) hub: Arc<Hub>,
    /// Cancelled when shutdown begins: connections get `goaway` and refuse new streams.
    pub(crate) draining: CancellationToken,
    /// Cancelled when the drain is over: connections close with 1001.
    pub(crate) closing: CancellationToken,
    /// Every stream's task, so shutdown can wait for them.
    pub(crate) stream_tasks: TaskTracker,
    /// Every connection's task.
    pub(crate) sessions: TaskTracker,
    /// The dev-mode simulated provider, kept alive as long as the gateway.
    simulated: Option<mock::MockHandle>,
    /// Whether the JWT secret was generated at start (dev mode without a secret).
    pub(crate) ephemeral_secret: bool,
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
        let hub = Arc::new(Hub::new());
        let handoff = cluster.clone().map(|c| Arc::new(Handoff::new(c)));
        // Both tokenizers take a moment to build; not on the first stream's time.
        tokio::task::spawn_blocking(crate::billing::warm_up);
        let gw = Arc::new(Gateway {
            config,
            auth,
            upstreams,
            tiers,
            limits,
            budgets,
            cluster,
            handoff,
            metrics,
            hub,
            draining: CancellationToken::new(),
            closing: CancellationToken::new(),
            stream_tasks: TaskTracker::new(),
            sessions: TaskTracker::new(),
            simulated,
            ephemeral_secret,
        });
        if let Some(cluster) = &gw.cluster {
            let hub = gw.hub.clone();
            // Weak: the subscription ends with the cluster, which the gateway holds.
            let weak = Arc::downgrade(&gw);
            cluster.subscribe(
                move |user| hub.goaway_user(user),
                move |message| Handoff::on_message(&weak, message),
            );
        }
        Ok(gw)
    }

    /// The configuration it runs with: the loaded one, plus the simulated provider in dev mode.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The simulated provider's address, in dev mode without a real provider.
    pub fn simulated_upstream(&self) -> Option<String> {
        self.simulated.as_ref().map(|h| h.base_url())
    }

    /// Whether the JWT secret was generated at start (dev mode without a secret): tokens are
    /// only good for this process.
    pub fn has_ephemeral_secret(&self) -> bool {
        self.ephemeral_secret
    }

    /// A token for `user` in `tier`, valid for `ttl`, signed with this gateway's secret: what a
    /// login service embedding the gateway hands its clients for `hello`.
    pub fn issue_token(&self, user: &str, tier: &str, ttl: Duration) -> Result<String, AuthError> {
        self.auth.issue(user, tier, ttl)
    }

    /// Checks a token as `hello` and `refresh` do (signature, expiry with the configured
    /// leeway, known tier) and returns its claims.
    pub fn verify_token(&self, token: &str) -> Result<Claims, AuthError> {
        self.auth.verify(token)
    }

    /// A user's connections and live streams now, as `GET /admin/users/{user}` shows them;
    /// `None` for a user the gateway holds nothing for.
    pub fn user_stats(&self, user: &str) -> Option<UserStats> {
        self.hub.user_stats(user)
    }

    /// The Prometheus text exposition that `GET /metrics` serves (`docs/metrics.md`).
    /// Gauges of state that changes with time alone (a breaker due for its probe) or under
    /// locks the hot path holds (queue depths) are read here, at scrape time.
    pub fn metrics_text(&self) -> String {
        for p in self.upstreams.all() {
            self.metrics
                .set_breaker_state(&p.name, p.breaker.state().as_gauge());
            let (_, _, by_tier) = p.scheduler.load();
            for tier in self.config.tiers.keys() {
                let depth = by_tier
                    .iter()
                    .find(|(t, _)| &**t == tier)
                    .map_or(0, |(_, n)| *n);
                self.metrics.set_queue_depth(&p.name, tier, depth);
            }
        }
        self.metrics.encode()
    }
}
