//! The HTTP side: the router (`/v1/ws`, the OpenAI-compatible `/v1/chat/completions` and
//! `/v1/models`, dev token, admin, health, the static demo) and
//! [`serve`] with its two-step shutdown. The shared state is [`Gateway`], one module below.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::ws::WebSocketUpgrade;
use axum::extract::{ConnectInfo, Path, Query, Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Extension, Json, Router};
use serde::Deserialize;
use tokio::net::TcpListener;
use tokio::time::Instant;
use tower_http::services::ServeDir;

use crate::accept;
use crate::config::Config;
use crate::gateway::Gateway;
use crate::metrics;
use crate::preauth::PreAuth;
use crate::protocol::SUBPROTOCOL;
use crate::session;
use crate::workers::Workers;

/// The gateway's routes.
pub fn app(gw: Arc<Gateway>) -> Router {
    let mut router = Router::new()
        .route("/v1/ws", get(ws_upgrade))
        .merge(openai_routes(&gw))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics_text))
        .nest("/admin", admin_routes(gw.clone()));
    let dev = gw.config.is_dev();
    if dev {
        router = router.route("/dev/token", get(dev_token));
    }
    let router = router.fallback_service(ServeDir::new(gw.config.static_dir()));
    // Outermost, so it covers every route and the static files alike.
    let router = if dev {
        router.layer(middleware::from_fn(loopback_host_only))
    } else {
        router
    };
    router.with_state(gw)
}

/// Dev mode: refuses any request whose `Host` is not a loopback name. A dev gateway holds a
/// real upstream key and signs tokens for anyone who asks; without this, a page on another site
/// could rebind its own host name to 127.0.0.1 (DNS rebinding) and use both.
async fn loopback_host_only(req: Request, next: Next) -> Response {
    let host = req
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .or_else(|| req.uri().authority().map(|a| a.as_str()));
    match host {
        Some(host) if is_loopback_host(host) => next.run(req).await,
        other => {
            let named = other.map_or_else(
                || "no Host".to_string(),
                |h| format!("Host `{}`", crate::protocol::LogSafe(h)),
            );
            let body = format!(
                "dev mode answers only loopback host names (127.0.0.1, localhost, [::1]); this request named {named}\n"
            );
            (StatusCode::MISDIRECTED_REQUEST, body).into_response()
        }
    }
}

/// Whether a `Host` value (with or without a port) names this machine's loopback interface.
/// Only literal addresses and `localhost`: any other name could be rebound by its owner.
pub fn is_loopback_host(host: &str) -> bool {
    let (name, port) = match host.strip_prefix('[') {
        Some(rest) => match rest.split_once(']') {
            Some((v6, port)) => (v6, port),
            None => return false,
        },
        None => match host.rsplit_once(':') {
            Some((name, _)) => (name, &host[name.len()..]),
            None => (host, ""),
        },
    };
    let port_ok = port.is_empty()
        || port.strip_prefix(':').is_some_and(|p| {
            !p.is_empty() && p.len() <= 5 && p.bytes().all(|b| b.is_ascii_digit())
        });
    if !port_ok {
        return false;
    }
    if host.starts_with('[') {
        return name
            .parse::<std::net::Ipv6Addr>()
            .is_ok_and(|ip| ip.is_loopback());
    }
    name.eq_ignore_ascii_case("localhost")
        || name
            .parse::<std::net::Ipv4Addr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// The OpenAI-compatible HTTP front end, with its CORS and a request body bounded like a
/// WebSocket frame (`session.max_frame_bytes`).
fn openai_routes(gw: &Arc<Gateway>) -> Router<Arc<Gateway>> {
    Router::new()
        .route(
            "/v1/chat/completions",
            axum::routing::post(crate::openai::chat_completions),
        )
        .route("/v1/models", get(crate::openai::models))
        .layer(axum::extract::DefaultBodyLimit::max(
            gw.config.session.max_frame_bytes,
        ))
        .layer(crate::openai::cors(gw))
}

/// The operator's routes, all behind the admin bearer token.
fn admin_routes(gw: Arc<Gateway>) -> Router<Arc<Gateway>> {
    Router::new()
        .route("/users", get(admin_users))
        .route("/users/{user}", get(admin_user))
        .route("/users/{user}/goaway", axum::routing::post(admin_goaway))
        .route("/providers", get(admin_providers))
        .route_layer(middleware::from_fn_with_state(gw, require_admin))
}

/// Serves until `shutdown` resolves, then drains: stop accepting, `goaway` to every
/// connection, let streams and HTTP requests in flight finish for `drain_timeout_ms`, abort the
/// rest, close.
pub async fn serve(
    listener: TcpListener,
    gw: Arc<Gateway>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    serve_with(listener, gw, None, shutdown).await
}

/// As [`serve`], with each connection served whole (its streams and their upstream reads
/// too) on one of `workers`' threads, so a relayed chunk wakes no other thread. How the
/// binary runs; `serve` keeps everything on the caller's runtime.
pub async fn serve_on(
    listener: TcpListener,
    gw: Arc<Gateway>,
    workers: &Workers,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    serve_with(listener, gw, Some(workers), shutdown).await
}

async fn serve_with(
    listener: TcpListener,
    gw: Arc<Gateway>,
    workers: Option<&Workers>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let http = accept::serve_until(
        listener,
        app(gw.clone()),
        &gw.config.server,
        gw.sessions.clone(),
        workers,
        shutdown,
    )
    .await;
    gw.draining.cancel();
    tracing::info!("shutting down: draining streams");
    // One deadline for both: whatever the clients do, the drain ends on time.
    let deadline = Instant::now() + Duration::from_millis(gw.config.drain_timeout_ms);
    let streams = async {
        gw.stream_tasks.close();
        if tokio::time::timeout_at(deadline, gw.stream_tasks.wait())
            .await
            .is_err()
        {
            let live = gw.hub.live_streams();
            tracing::warn!(streams = live.len(), "drain timeout: aborting streams");
            for stream in live {
                stream.cancel(crate::stream::CancelReason::Shutdown);
            }
            let _ = tokio::time::timeout(Duration::from_secs(5), gw.stream_tasks.wait()).await;
        }
    };
    tokio::join!(streams, http.shutdown(deadline));
    gw.closing.cancel();
    gw.sessions.close();
    let _ = tokio::time::timeout(Duration::from_secs(5), gw.sessions.wait()).await;
    Ok(())
}

async fn ws_upgrade(
    State(gw): State<Arc<Gateway>>,
    headers: HeaderMap,
    preauth: Option<Extension<ConnectInfo<PreAuth>>>,
    ws: WebSocketUpgrade,
) -> Response {
    if !origin_allowed(&gw.config, &headers) {
        return (StatusCode::FORBIDDEN, "origin not allowed").into_response();
    }
    if gw.draining.is_cancelled() {
        return (StatusCode::SERVICE_UNAVAILABLE, "shutting down").into_response();
    }
    // tungstenite's own limit sits well above ours, so an oversize frame gets a `bad_request`
    // frame and the connection lives; only a grossly oversize one is cut at this limit.
    let hard_limit = gw
        .config
        .session
        .max_frame_bytes
        .saturating_mul(8)
        .max(1 << 20);
    let sessions = gw.sessions.clone();
    // Small read buffer: it grows for large frames, but an idle connection should cost a few
    // KiB, not tungstenite's default 128 KiB.
    ws.protocols([SUBPROTOCOL])
        .read_buffer_size(4 * 1024)
        .max_message_size(hard_limit)
        .max_frame_size(hard_limit)
        .on_upgrade(move |socket| {
            let gate = preauth.map(|Extension(ConnectInfo(PreAuth(gate)))| gate);
            sessions.track_future(session::run(gw, socket, gate))
        })
}

/// A browser's `Origin` must be one of the gateway's own (`server.public_origins`) or on the
/// allow-list; a client that sends no `Origin` (not a browser) is let through, its token
/// authenticates it. The request's `Host` proves nothing in production: under DNS rebinding it
/// is the attacker's name. Only in dev mode, where `Host` has been checked to be a loopback
/// name, does an `Origin` equal to it count as the gateway's own.
pub fn origin_allowed(config: &Config, headers: &HeaderMap) -> bool {
    let Some(origin) = headers.get(header::ORIGIN) else {
        return true;
    };
    let Ok(origin) = origin.to_str() else {
        return false;
    };
    let origin = origin.trim_end_matches('/');
    if config
        .allowed_origins
        .iter()
        .chain(&config.server.public_origins)
        .any(|a| a == "*" || a.eq_ignore_ascii_case(origin))
    {
        return true;
    }
    if !config.is_dev() {
        return false;
    }
    let authority = origin.split_once("://").map(|(_, rest)| rest);
    let host = headers.get(header::HOST).and_then(|h| h.to_str().ok());
    matches!((authority, host), (Some(a), Some(h)) if a.eq_ignore_ascii_case(h) && is_loopback_host(h))
}

#[derive(Deserialize)]
struct DevTokenQuery {
    user: Option<String>,
    tier: Option<String>,
}

/// Dev mode only: a token for the demo page.
async fn dev_token(State(gw): State<Arc<Gateway>>, Query(q): Query<DevTokenQuery>) -> Response {
    let user = q.user.unwrap_or_else(|| "demo".into());
    let tier = q.tier.unwrap_or_else(|| "pro".into());
    if user.is_empty() || user.len() > 64 || !crate::protocol::printable(&user) {
        return (
            StatusCode::BAD_REQUEST,
            "user must be 1-64 bytes of printable characters",
        )
            .into_response();
    }
    let ttl = Duration::from_secs(3600);
    match gw.auth.issue(&user, &tier, ttl) {
        Ok(token) => Json(serde_json::json!({
            "token": token, "user": user, "tier": tier, "expires_in": ttl.as_secs()
        }))
        .into_response(),
        Err(e) => (StatusCode::BAD_REQUEST, e.to_string()).into_response(),
    }
}

async fn admin_user(State(gw): State<Arc<Gateway>>, Path(user): Path<String>) -> Response {
    let stats = gw.hub.user_stats(&user).unwrap_or_default();
    let mut view = serde_json::json!({
        "user": user,
        "connections": stats.connections,
        "connections_total": stats.connections_total,
        "live_streams": stats.live_streams,
        "streams": gw.hub.live_stream_ids(&user),
        "spend_today_usd": gw.budgets.user_spent_today(&user),
    });
    let Some(cluster) = &gw.cluster else {
        return Json(view).into_response();
    };
    // Cluster mode: counts and spend of every instance; `streams` and `connections_total`
    // stay this instance's (the stream ids live where their upstream call runs).
    view["instance"] = cluster.instance().into();
    let shared = async {
        let leases = cluster.user_leases(&user).await?;
        let spend = gw.budgets.user_spent_today_everywhere(&user).await?;
        Ok::<_, crate::cluster::Unavailable>((leases, spend))
    };
    match shared.await {
        Ok((leases, spend)) => {
            view["connections"] = leases.values().map(|l| l.connections).sum::<usize>().into();
            view["live_streams"] = leases
                .values()
                .map(|l| l.live_streams)
                .sum::<usize>()
                .into();
            view["spend_today_usd"] = spend.into();
            view["instances"] = serde_json::json!(leases);
            Json(view).into_response()
        }
        Err(_) => {
            view["error"] =
                "the shared store (Redis) is unavailable: this instance's view only".into();
            (StatusCode::SERVICE_UNAVAILABLE, Json(view)).into_response()
        }
    }
}

/// Prometheus text; see [`Gateway::metrics_text`].
async fn metrics_text(State(gw): State<Arc<Gateway>>) -> Response {
    (
        [(header::CONTENT_TYPE, metrics::CONTENT_TYPE)],
        gw.metrics_text(),
    )
        .into_response()
}

async fn admin_users(State(gw): State<Arc<Gateway>>) -> Response {
    let spend = gw.budgets.snapshot();
    let users: Vec<_> = gw
        .hub
        .all_user_stats()
        .into_iter()
        .map(|(user, stats)| {
            serde_json::json!({
                "user": &*user,
                "connections": stats.connections,
                "connections_total": stats.connections_total,
                "live_streams": stats.live_streams,
                "spend_today_usd": spend.users.get(&*user).copied().unwrap_or(0.0),
            })
        })
        .collect();
    let (connections, live_streams) = gw.hub.totals();
    let mut view = serde_json::json!({
        "day": spend.day,
        "connections": connections,
        "live_streams": live_streams,
        "spend_today_usd_by_tier": spend.tiers,
        "users": users,
    });
    let Some(cluster) = &gw.cluster else {
        return Json(view).into_response();
    };
    view["instance"] = cluster.instance().into();
    match cluster_users(&gw, cluster, spend.users.keys()).await {
        Ok(cluster_view) => {
            for (key, value) in cluster_view {
                view[key] = value;
            }
            Json(view).into_response()
        }
        Err(_) => {
            view["error"] =
                "the shared store (Redis) is unavailable: this instance's view only".into();
            (StatusCode::SERVICE_UNAVAILABLE, Json(view)).into_response()
        }
    }
}

/// `/admin/users`' fields for the whole cluster: every user with a connection or stream on
/// some instance (from the leases) or spend on this one, each with its counts by instance and
/// its shared spend; the totals and the spend by tier from the shared store.
async fn cluster_users(
    gw: &Gateway,
    cluster: &crate::cluster::Cluster,
    spent_here: impl Iterator<Item = &String>,
) -> Result<Vec<(&'static str, serde_json::Value)>, crate::cluster::Unavailable> {
    let mut names: std::collections::BTreeSet<String> =
        cluster.users_with_leases().await?.into_iter().collect();
    names.extend(
        gw.hub
            .all_user_stats()
            .into_iter()
            .map(|(u, _)| u.to_string()),
    );
    names.extend(spent_here.cloned());
    let (mut connections, mut live_streams) = (0, 0);
    let mut users = Vec::with_capacity(names.len());
    for user in names {
        let leases = cluster.user_leases(&user).await?;
        let c: usize = leases.values().map(|l| l.connections).sum();
        let s: usize = leases.values().map(|l| l.live_streams).sum();
        connections += c;
        live_streams += s;
        users.push(serde_json::json!({
            "user": user,
            "connections": c,
            "live_streams": s,
            "instances": leases,
            "spend_today_usd": gw.budgets.user_spent_today_everywhere(&user).await?,
        }));
    }
    let mut by_tier = serde_json::Map::new();
    for tier in gw.config.tiers.keys() {
        let usd = gw.budgets.tier_spent_today_everywhere(tier).await?;
        if usd > 0.0 {
            by_tier.insert(tier.clone(), usd.into());
        }
    }
    Ok(vec![
        ("connections", connections.into()),
        ("live_streams", live_streams.into()),
        ("spend_today_usd_by_tier", by_tier.into()),
        ("users", users.into()),
    ])
}

/// Asks every connection of a user to move: each gets `goaway`, takes no new streams, and
/// closes (1001) once the client's new connection has resumed its streams. For rebalancing
/// users across instances, or draining one user.
async fn admin_goaway(State(gw): State<Arc<Gateway>>, Path(user): Path<String>) -> Response {
    let told = gw.hub.goaway_user(&user);
    let Some(cluster) = &gw.cluster else {
        return Json(serde_json::json!({ "user": user, "connections": told })).into_response();
    };
    // Every other instance applies it on its own connections when the message reaches it.
    match cluster.publish_goaway(&user).await {
        Ok(instances) => Json(serde_json::json!({
            "user": user, "connections": told, "instances": instances,
        }))
        .into_response(),
        Err(_) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(serde_json::json!({
                "user": user, "connections": told, "instances": null,
                "error": "the shared store (Redis) is unavailable: only this instance's connections were told",
            })),
        )
            .into_response(),
    }
}

/// Ready when the config is loaded (it is, or the process would not be serving) and at least
/// one provider's circuit is not open; not ready while draining.
async fn readyz(State(gw): State<Arc<Gateway>>) -> Response {
    if gw.draining.is_cancelled() {
        return (StatusCode::SERVICE_UNAVAILABLE, "draining").into_response();
    }
    let open: Vec<&str> = gw
        .upstreams
        .all()
        .iter()
        .filter(|p| p.breaker.open_for().is_some())
        .map(|p| p.name.as_str())
        .collect();
    if open.len() == gw.upstreams.all().len() {
        let body = format!(
            "not ready: every provider's circuit is open ({})",
            open.join(", ")
        );
        return (StatusCode::SERVICE_UNAVAILABLE, body).into_response();
    }
    "ready".into_response()
}

/// Each provider's circuit breaker and upstream slots.
async fn admin_providers(State(gw): State<Arc<Gateway>>) -> Response {
    let providers: Vec<_> = gw
        .upstreams
        .all()
        .iter()
        .map(|p| {
            let (active, queued, by_tier) = p.scheduler.load();
            let by_tier: serde_json::Map<String, serde_json::Value> = by_tier
                .into_iter()
                .map(|(t, n)| (t.to_string(), n.into()))
                .collect();
            serde_json::json!({
                "name": p.name,
                "breaker": p.breaker.state(),
                "active": active,
                "queued": queued,
                "queued_by_tier": by_tier,
            })
        })
        .collect();
    Json(serde_json::json!({ "providers": providers })).into_response()
}

/// Lets a request through with the admin token; without an admin token configured, the admin
/// routes do not exist (404).
async fn require_admin(State(gw): State<Arc<Gateway>>, req: Request, next: Next) -> Response {
    let Some(expected) = &gw.config.admin_token else {
        return StatusCode::NOT_FOUND.into_response();
    };
    let given = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    if constant_time_eq(given.as_bytes(), expected.as_bytes()) {
        next.run(req).await
    } else {
        (StatusCode::UNAUTHORIZED, "admin token required").into_response()
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(origin: Option<&str>, host: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(header::HOST, host.parse().expect("host"));
        if let Some(o) = origin {
            h.insert(header::ORIGIN, o.parse().expect("origin"));
        }
        h
    }

    fn config(dev: bool) -> Config {
        Config {
            dev: Some(dev),
            allowed_origins: vec!["https://chat.example.com".to_string()],
            server: crate::config::ServerConfig {
                public_origins: vec!["https://gw.example".to_string()],
                ..Default::default()
            },
            ..Default::default()
        }
    }

    #[test]
    fn origins() {
        for dev in [false, true] {
            let c = config(dev);
            assert!(origin_allowed(&c, &headers(None, "gw:8080")));
            assert!(origin_allowed(
                &c,
                &headers(Some("https://chat.example.com"), "gw:8080")
            ));
            assert!(origin_allowed(
                &c,
                &headers(Some("https://gw.example/"), "gw:8080")
            ));
            assert!(!origin_allowed(
                &c,
                &headers(Some("https://evil.example"), "gw:8080")
            ));
            assert!(!origin_allowed(&c, &headers(Some("null"), "gw:8080")));
            // The Host is the attacker's under DNS rebinding: never proof of same origin.
            assert!(!origin_allowed(
                &c,
                &headers(
                    Some("http://rebind.evil.example:8080"),
                    "rebind.evil.example:8080"
                )
            ));
        }
        let dev = config(true);
        assert!(origin_allowed(
            &dev,
            &headers(Some("http://127.0.0.1:8080"), "127.0.0.1:8080")
        ));
        assert!(!origin_allowed(
            &dev,
            &headers(Some("http://127.0.0.1:8081"), "127.0.0.1:8080")
        ));
        assert!(!origin_allowed(
            &config(false),
            &headers(Some("http://127.0.0.1:8080"), "127.0.0.1:8080")
        ));
    }

    #[test]
    fn loopback_hosts() {
        for host in [
            "127.0.0.1",
            "127.0.0.1:8080",
            "localhost",
            "LocalHost:3000",
            "[::1]",
            "[::1]:8080",
            "127.1.2.3:80",
        ] {
            assert!(is_loopback_host(host), "{host}");
        }
        for host in [
            "rebind.evil.example:8080",
            "localhost.evil.example",
            "127.0.0.1.nip.io",
            "10.0.0.1:8080",
            "[::2]:80",
            "[::1",
            "localhost:",
            "localhost:80:80",
            "localhost:http",
            "",
            "0.0.0.0:8080",
        ] {
            assert!(!is_loopback_host(host), "{host}");
        }
    }

    #[test]
    fn constant_time() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"abcd"));
    }
}
