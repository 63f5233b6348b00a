//! muxgate: any number of streamed LLM answers over one WebSocket per user.
//!
//! A browser tab (through the `web/` shim) or any client opens `GET /v1/ws`, says `hello`
//! with a JWT, then opens logical streams by id. Each stream becomes one upstream
//! OpenAI-compatible chat-completions SSE call; its chunks come back as `delta` frames on the
//! shared socket. Streams outlive their connection for a resume window, so a dropped socket
//! (or a browser tab handing leadership to another) loses no token.
//!
//! # Layout
//! - [`protocol`]: wire frames, error codes, close codes, stream id rules (`docs/protocol.md`).
//! - [`config`]: strict TOML config with environment overrides and documented defaults.
//! - [`auth`]: HS256 JWT tokens (`sub`, `tier`, `exp`).
//! - [`gateway`]: the state one process shares, below the router, sessions and streams.
//! - [`session`]: one WebSocket connection: handshake, reader, writer, heartbeats, written over
//!   any sink and source of messages so its rules are unit-tested through channels.
//! - [`stream`]: one logical stream's replay log and its hand-off to a connection.
//! - [`hub`]: the registry of streams and connections by user, for limits and resume.
//! - [`relay`]: a stream's task: limits, queue, upstream call, retries, fallbacks, frames.
//! - [`tiers`]: each plan's priority, limits and caps, resolved once at `hello`.
//! - [`cluster`]: cluster mode: the limits, budgets and caps several instances share in Redis.
//! - [`limits`]: token buckets per user, tier and process (requests and tokens per minute).
//! - [`retry`]: the retry policy of an upstream call (eligibility, full-jitter backoff).
//! - [`scheduler`]: per-provider upstream slots and the priority queue with aging.
//! - [`breaker`]: per-provider circuit breaker.
//! - [`metrics`]: Prometheus metrics (`docs/metrics.md`).
//! - [`billing`]: token counts (`tokens`), daily budgets (`budgets`), and a stream's price and
//!   settlement at its end (`settlement`).
//! - [`upstream`]: providers, pooled HTTP clients, SSE chunk parsing, upstream errors.
//! - [`sse`]: the server-sent events parser: linear time, bounded event size.
//! - [`redact`]: the one path upstream text takes to a frame or a log (keys, controls).
//! - [`server`]: the router, its handlers and graceful shutdown.
//! - [`accept`]: the accept loop: header-read timeout, connection caps, shutdown by a deadline.
//! - [`preauth`]: the read budget of a WebSocket that has not said `hello` yet.
//! - [`mock`]: the OpenAI-compatible mock upstream (tests, benchmarks, offline demo): its
//!   directives, content, per-request plan, response bodies and server, one file each.

pub mod accept;
pub mod auth;
pub mod billing;
pub mod breaker;
pub mod cluster;
pub mod config;
pub mod gateway;
pub mod hub;
pub mod limits;
pub mod metrics;
pub mod mock;
pub mod preauth;
pub mod protocol;
pub mod redact;
pub mod relay;
pub mod retry;
pub mod scheduler;
pub mod server;
pub mod session;
pub mod sse;
pub mod stream;
pub mod tiers;
pub mod upstream;

pub use config::Config;
pub use gateway::{Gateway, StartError};
pub use server::{app, serve};
