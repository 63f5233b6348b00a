//! muxgate: any number of streamed LLM answers over one WebSocket per user.
//!
//! A browser tab (through the `web/` shim) or any client opens `GET /v1/ws`, says `hello`
//! with a JWT, then opens logical streams by id. Each stream becomes one upstream
//! OpenAI-compatible chat-completions SSE call; its chunks come back as `delta` frames on the
//! shared socket. Streams outlive their connection for a resume window, so a dropped socket
//! (or a browser tab handing leadership to another) loses no token.
//!
//! # Public API
//! The crate root holds what an embedder or the `muxgate` binary uses: [`Gateway`] (the shared
//! state: [`Gateway::start`], and a few methods an operator wants too: tokens, per-user
//! counters, the metrics text), [`app`] and [`serve`] (or [`serve_on`] with [`Workers`]) to run it, [`Authenticator`] and
//! [`Claims`] to mint and check tokens without a gateway, and [`Config`]. Two modules are public
//! on purpose: [`config`], every section of the configuration, so it can be built in code, and
//! [`mock`], the mock upstream that `muxgate mock-upstream` runs. Every other module is private;
//! the fields of [`Gateway`] are the crate's.
//!
//! `test_support` (hidden from these docs) is not API: it exposes what only the tests, fuzz
//! targets and examples need (parsers, the token counter, views into the hub, limits and
//! queues). An item goes there when only a test would call it; it gets a root re-export or a
//! `Gateway` method, with docs, when an embedder or operator would want it too.
//!
//! # Layout
//! - `protocol`: wire frames, error codes, close codes, stream id rules (`docs/protocol.md`).
//! - [`config`]: strict TOML config with environment overrides and documented defaults.
//! - `auth`: HS256 JWT tokens (`sub`, `tier`, `exp`).
//! - `gateway`: the state one process shares, below the router, sessions and streams.
//! - `session`: one WebSocket connection: handshake, reader, writer, heartbeats, written over
//!   any sink and source of messages so its rules are unit-tested through channels.
//! - `stream`: one logical stream's replay log and its hand-off to a connection.
//! - `hub`: the registry of streams and connections by user, for limits and resume.
//! - `relay`: a stream's task: limits, queue, upstream call, retries, fallbacks, frames.
//! - `tiers`: each plan's priority, limits and caps, resolved once at `hello`.
//! - `cluster`: cluster mode: the limits, budgets and caps several instances share in Redis.
//! - `handoff`: cluster mode: a stream relayed from the instance running it to the one its
//!   client resumed on, through Redis pub/sub.
//! - `limits`: token buckets per user, tier and process (requests and tokens per minute).
//! - `retry`: the retry policy of an upstream call (eligibility, full-jitter backoff).
//! - `scheduler`: per-provider upstream slots and the priority queue with aging.
//! - `breaker`: per-provider circuit breaker.
//! - `metrics`: Prometheus metrics (`docs/metrics.md`).
//! - `billing`: token counts (`tokens`), daily budgets (`budgets`), and a stream's price and
//!   settlement at its end (`settlement`).
//! - `upstream`: providers, pooled HTTP clients, SSE chunk parsing, upstream errors;
//!   `upstream::h1`, plain-http upstreams' HTTP/1.1 connections read by the stream's task.
//! - `sse`: the server-sent events parser: linear time, bounded event size.
//! - `redact`: the one path upstream text takes to a frame or a log (keys, controls).
//! - `openai`: the OpenAI-compatible HTTP front end (`/v1/chat/completions`, `/v1/models`),
//!   each request one stream, encoded as `docs/openai-compat.md` says.
//! - `server`: the router, its handlers and graceful shutdown.
//! - `workers`: the worker threads, one single-threaded runtime each, that serve connections.
//! - `accept`: the accept loop: header-read timeout, connection caps, shutdown by a deadline.
//! - `preauth`: the read budget of a WebSocket that has not said `hello` yet.
//! - [`mock`]: the OpenAI-compatible mock upstream (tests, benchmarks, offline demo): its
//!   directives, content, per-request plan, response bodies and server, one file each.
//! - `test_support`: the hidden door for tests, fuzz targets and examples (see above).

mod accept;
mod auth;
mod billing;
mod breaker;
mod cluster;
pub mod config;
mod gateway;
mod handoff;
mod hub;
mod limits;
mod metrics;
pub mod mock;
mod openai;
mod preauth;
mod protocol;
mod redact;
mod relay;
mod retry;
mod scheduler;
mod server;
mod session;
mod sse;
mod stream;
mod tiers;
mod upstream;
mod workers;

#[doc(hidden)]
pub mod test_support;

pub use auth::{AuthError, Authenticator, Claims};
pub use config::Config;
pub use gateway::{Gateway, StartError};
pub use hub::UserStats;
pub use server::{app, serve, serve_on};
pub use workers::Workers;
