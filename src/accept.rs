//! The accept loop: HTTP/1.1 connections with a header-read timeout, caps on connections (in
//! all, and before the WebSocket upgrade per client address), and a shutdown that ends every
//! HTTP connection by a deadline whatever its client does.
//!
//! `axum::serve` has none of these knobs, and its graceful shutdown waits for every connection,
//! so one client holding a half-sent request could stall a SIGTERM forever.

use std::collections::HashMap;
use std::future::Future;
use std::net::{IpAddr, Ipv6Addr};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::ConnectInfo;
use axum::Router;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use parking_lot::Mutex;
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::ServerConfig;
use crate::preauth::{Gate, PreAuth, PreAuthIo};
use crate::workers::Workers;

/// How long connections cut at the deadline get to go.
const ABORT_GRACE: Duration = Duration::from_millis(500);

/// The HTTP connections being served (WebSockets excluded: they leave at their upgrade).
pub struct HttpConnections {
    tasks: TaskTracker,
    /// Asks each connection to finish its request in flight and close.
    graceful: CancellationToken,
    /// Drops each connection where it stands.
    abort: CancellationToken,
}

impl HttpConnections {
    /// Closes idle connections now, lets requests in flight finish until `deadline`, then cuts
    /// what is left.
    pub async fn shutdown(self, deadline: Instant) {
        self.graceful.cancel();
        self.tasks.close();
        if tokio::time::timeout_at(deadline, self.tasks.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                connections = self.tasks.len(),
                "drain timeout: closing HTTP connections still open"
            );
            self.abort.cancel();
            let _ = tokio::time::timeout(ABORT_GRACE, self.tasks.wait()).await;
        }
    }
}

/// Accepts and serves connections until `shutdown` resolves; the listener is closed then.
/// `websockets` tracks the upgraded connections, counted against `max_connections`. With
/// `workers`, each connection is served on the next worker's runtime, else on this one.
pub async fn serve_until(
    listener: TcpListener,
    app: Router,
    config: &ServerConfig,
    websockets: TaskTracker,
    workers: Option<&Workers>,
    shutdown: impl Future<Output = ()>,
) -> HttpConnections {
    let mut http = http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(Duration::from_millis(config.header_read_timeout_ms));
    let conns = HttpConnections {
        tasks: TaskTracker::new(),
        graceful: CancellationToken::new(),
        abort: CancellationToken::new(),
    };
    let pending = Arc::new(Pending::new(config));
    tokio::pin!(shutdown);
    loop {
        let (tcp, peer) = tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    on_accept_error(e).await;
                    continue;
                }
            },
        };
        let guard = match pending.admit(client_key(peer.ip()), websockets.len()) {
            Ok(guard) => guard,
            Err(why) => {
                refuse(&tcp, why);
                continue;
            }
        };
        // Frames are small and latency-bound: without TCP_NODELAY, Nagle's algorithm holds a
        // stream's first token until the client's delayed ACK (~40 ms).
        let _ = tcp.set_nodelay(true);
        let connection = Connection {
            http: http.clone(),
            app: app.clone(),
            graceful: conns.graceful.clone(),
            abort: conns.abort.clone(),
            guard,
        };
        let Some(workers) = workers else {
            conns.tasks.spawn(connection.serve(tcp));
            continue;
        };
        // Handed over as a plain socket: a tokio socket stays registered with the reactor of
        // the runtime that made it, and would wake this thread for every read.
        let tcp = match tcp.into_std() {
            Ok(tcp) => tcp,
            Err(e) => {
                tracing::warn!(error = %e, "could not hand a connection to a worker");
                continue;
            }
        };
        conns.tasks.spawn_on(
            async move {
                match TcpStream::from_std(tcp) {
                    Ok(tcp) => connection.serve(tcp).await,
                    Err(e) => tracing::warn!(error = %e, "could not hand a connection to a worker"),
                }
            },
            workers.next(),
        );
    }
    conns
}

/// One accepted connection, ready to be served on whichever runtime it was handed to.
struct Connection {
    http: http1::Builder,
    app: Router,
    graceful: CancellationToken,
    abort: CancellationToken,
    /// Held until the connection ends or is upgraded: an upgraded connection's future
    /// completes once the socket is handed to the WebSocket.
    guard: PendingGuard,
}

impl Connection {
    async fn serve(self, tcp: TcpStream) {
        let _guard = self.guard;
        let (io, gate) = PreAuthIo::new(tcp);
        let service = WithGate {
            app: TowerToHyperService::new(self.app),
            gate,
        };
        let conn = self
            .http
            .serve_connection(TokioIo::new(io), service)
            .with_upgrades();
        tokio::pin!(conn);
        tokio::select! {
            _ = conn.as_mut() => return,
            () = self.graceful.cancelled() => conn.as_mut().graceful_shutdown(),
        }
        tokio::select! {
            _ = conn.as_mut() => {}
            () = self.abort.cancelled() => {}
        }
    }
}

/// The app, with the connection's pre-`hello` read budget in every request's extensions: the
/// WebSocket upgrade hands it to the session (see `preauth`).
#[derive(Clone)]
struct WithGate {
    app: TowerToHyperService<Router>,
    gate: Arc<Gate>,
}

impl hyper::service::Service<hyper::Request<Incoming>> for WithGate {
    type Response = <TowerToHyperService<Router> as hyper::service::Service<
        hyper::Request<Incoming>,
    >>::Response;
    type Error =
        <TowerToHyperService<Router> as hyper::service::Service<hyper::Request<Incoming>>>::Error;
    type Future =
        <TowerToHyperService<Router> as hyper::service::Service<hyper::Request<Incoming>>>::Future;

    fn call(&self, mut req: hyper::Request<Incoming>) -> Self::Future {
        req.extensions_mut()
            .insert(ConnectInfo(PreAuth(self.gate.clone())));
        self.app.call(req)
    }
}

/// Accept errors are either about one connection (the client gave up) or about the process
/// (out of file descriptors): then wait a little instead of spinning.
async fn on_accept_error(e: std::io::Error) {
    use std::io::ErrorKind::*;
    if matches!(
        e.kind(),
        ConnectionRefused | ConnectionAborted | ConnectionReset
    ) {
        return;
    }
    tracing::warn!(error = %e, "accept failed");
    tokio::time::sleep(Duration::from_millis(100)).await;
}

/// Answers a refused connection with a 503 and closes it. The socket is fresh, so its send
/// buffer has room and a non-blocking write goes out whole; if not, closing is answer enough.
fn refuse(tcp: &TcpStream, why: Refused) {
    let body = match why {
        Refused::Total => "too many connections\n",
        Refused::Pending => "too many connections waiting for a request\n",
        Refused::PerClient => "too many connections from your address\n",
    };
    tracing::debug!(reason = body.trim_end(), "connection refused");
    let response = format!(
        "HTTP/1.1 503 Service Unavailable\r\nconnection: close\r\ncontent-type: text/plain\r\n\
         retry-after: 1\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    let _ = tcp.try_write(response.as_bytes());
}

/// One client for the per-address cap: an IPv4 address, or an IPv6 /64 (one host usually holds
/// a whole /64, so counting addresses in it would not bound it).
fn client_key(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V6(v6) => {
            let s = v6.segments();
            IpAddr::V6(Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
        }
        v4 => v4,
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Refused {
    Total,
    Pending,
    PerClient,
}

/// Connections not yet upgraded, in all and per client.
struct Pending {
    max_total: usize,
    max_pending: usize,
    max_per_client: usize,
    /// Per client key; a key leaves the map with its last connection, so the map is bounded
    /// by `max_pending`.
    by_client: Mutex<HashMap<IpAddr, usize>>,
    count: Mutex<usize>,
}

impl Pending {
    fn new(config: &ServerConfig) -> Self {
        Pending {
            max_total: config.max_connections,
            max_pending: config.max_pending_connections,
            max_per_client: config.max_pending_connections_per_ip,
            by_client: Mutex::new(HashMap::new()),
            count: Mutex::new(0),
        }
    }

    fn admit(self: &Arc<Self>, client: IpAddr, websockets: usize) -> Result<PendingGuard, Refused> {
        let mut count = self.count.lock();
        if *count + websockets >= self.max_total {
            return Err(Refused::Total);
        }
        if *count >= self.max_pending {
            return Err(Refused::Pending);
        }
        let mut by_client = self.by_client.lock();
        let n = by_client.entry(client).or_insert(0);
        if *n >= self.max_per_client {
            return Err(Refused::PerClient);
        }
        *n += 1;
        *count += 1;
        Ok(PendingGuard {
            pending: self.clone(),
            client,
        })
    }
}

struct PendingGuard {
    pending: Arc<Pending>,
    client: IpAddr,
}

impl Drop for PendingGuard {
    fn drop(&mut self) {
        let mut count = self.pending.count.lock();
        *count -= 1;
        let mut by_client = self.pending.by_client.lock();
        if let Some(n) = by_client.get_mut(&self.client) {
            *n -= 1;
            if *n == 0 {
                by_client.remove(&self.client);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pending(total: usize, pending: usize, per_client: usize) -> Arc<Pending> {
        Arc::new(Pending::new(&ServerConfig {
            max_connections: total,
            max_pending_connections: pending,
            max_pending_connections_per_ip: per_client,
            ..Default::default()
        }))
    }

    #[test]
    fn caps_per_client_pending_and_total() {
        let a: IpAddr = "10.0.0.1".parse().expect("ip");
        let b: IpAddr = "10.0.0.2".parse().expect("ip");
        let p = pending(10, 3, 2);
        let a1 = p.admit(a, 0).expect("a1");
        let _a2 = p.admit(a, 0).expect("a2");
        assert_eq!(p.admit(a, 0).err(), Some(Refused::PerClient));
        let b1 = p.admit(b, 0).expect("b1");
        assert_eq!(p.admit(b, 0).err(), Some(Refused::Pending));
        drop(a1);
        let _a3 = p.admit(a, 0).expect("a3 after a1 left");
        drop(b1);
        assert_eq!(p.admit(b, 8).err(), Some(Refused::Total));
        assert!(
            !p.by_client.lock().contains_key(&b),
            "an idle client is forgotten"
        );
    }

    #[test]
    fn ipv6_clients_are_counted_per_64() {
        let k = |s: &str| client_key(s.parse().expect("ip"));
        assert_eq!(k("2001:db8:1:2:aaaa::1"), k("2001:db8:1:2:bbbb::2"));
        assert_ne!(k("2001:db8:1:2::1"), k("2001:db8:1:3::1"));
        assert_eq!(k("::ffff:10.0.0.1"), k("10.0.0.1"));
    }
}
