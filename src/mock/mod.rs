//! An OpenAI-compatible mock upstream, used by the integration tests, the
//! benchmarks and the offline demo (`muxgate mock-upstream`).
//!
//! It answers `POST /v1/chat/completions` either as an OpenAI-style SSE stream
//! (`"stream": true`) or as one `chat.completion` JSON document, and exposes
//! `GET /mock/stats`, `POST /mock/reset` and `GET /healthz`. Its behaviour is
//! steered per request by *directives*, taken from the `x-mock` header and from
//! a `[[mock key=value ...]]` block anywhere in the last user message (the block
//! is removed from the prompt; when both give a key, the header wins):
//!
//! | directive          | effect                                                                       |
//! |--------------------|------------------------------------------------------------------------------|
//! | `chunks=N`         | word mode: exactly N content chunks, see [`word_chunks`] (0..=1000000)       |
//! | (no `chunks`)      | prose mode: a short readable demo answer, one chunk per word                 |
//! | `delay_ms=D`       | pause between content chunks (default 0 in word mode, 30 in prose mode)      |
//! | `chunk_bytes=B`    | pad each word-mode chunk with `.` before its trailing space up to B bytes    |
//! | `fail=STATUS`      | answer HTTP STATUS (400..=599) with an OpenAI-style error body, ...          |
//! | `fail_times=K`     | ... for the first K requests sharing a failure key (default 1)               |
//! | `key=NAME`         | the failure key (default: prompt text plus the raw directive text)           |
//! | `retry_after_ms=M` | on 429/503: `Retry-After: ceil(M/1000)`, `retry-after-ms: M` (default 100)   |
//! | `cut=K`            | break the connection after K content chunks: no finish chunk, no `[DONE]`    |
//! | `stall_ms=S`       | wait S ms after the 200 headers before the first content chunk               |
//! | `finish=REASON`    | `finish_reason` of the final chunk (default `stop`)                          |
//!
//! Directives are `key=value` pairs separated by whitespace or commas; an
//! unknown key or a bad value is a 400. `max_tokens` (or
//! `max_completion_tokens`) below the number of chunks truncates the answer
//! with `finish_reason: "length"`; a `cut` beyond the answer cuts just before
//! the finish chunk. Non-streaming answers wait `stall_ms` plus an explicit
//! `delay_ms` per gap between chunks, and `cut` there sends half of the JSON
//! before breaking the connection. Usage counts whitespace-separated words of
//! all messages as prompt tokens (raw text, blocks included) and content
//! chunks as completion tokens. Array contents join their text parts with `\n`.
//!
//! Streams are generated lazily, one chunk per poll of the response body, so a
//! client that stops reading back-pressures the mock instead of making it
//! buffer the whole answer; `chunks_sent` counts chunks handed to the body.
//!
//! Layout: `directives` (the `x-mock` header and `[[mock ...]]` blocks), `content` (what the
//! answer says: word mode and prose mode), `request` (the fields of a request the mock reads),
//! `plan` (one answer, computed once per request, and its events), `body` (the lazy SSE
//! body and the JSON answer), `stats` (the counters), `server` (routes, failures, spawn).

mod body;
mod content;
mod directives;
mod plan;
mod request;
mod server;
mod stats;

pub use content::{word_chunks, WORDS};
pub use directives::{parse_directives, Directives};
pub use server::{router, run, spawn, MockHandle, MockState};
pub use stats::{MockStats, MockStatsSnapshot};
