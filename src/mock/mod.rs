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
//! | directive            | effect                                                                     |
//! |----------------------|----------------------------------------------------------------------------|
//! | `chunks=N`           | word mode: exactly N content chunks, see [`word_chunks`] (0..=1000000)     |
//! | (no `chunks`)        | prose mode: a short readable demo answer, one chunk per word               |
//! | `delay_ms=D`         | pause between parts (default 0 in word mode, 30 in prose mode)             |
//! | `chunk_bytes=B`      | pad each word-mode chunk with `.` before its trailing space up to B bytes  |
//! | `fail=STATUS`        | answer HTTP STATUS (400..=599) with an OpenAI-style error body, ...        |
//! | `fail_times=K`       | ... for the first K requests sharing a failure key (default 1)             |
//! | `key=NAME`           | the failure key (default: prompt text plus the raw directive text)         |
//! | `retry_after_ms=M`   | on 429/503: `Retry-After: ceil(M/1000)`, `retry-after-ms: M` (default 100) |
//! | `fail_code=CODE`     | `error.code` of `fail` and `error_event` (defaults below)                  |
//! | `fail_type=TYPE`     | `error.type` of `fail` and `error_event` (defaults below)                  |
//! | `fail_param=PARAM`   | `error.param` of `fail` and `error_event` (default `null`)                 |
//! | `cut=K`              | break the connection after K parts: no finish chunk, no `[DONE]`           |
//! | `error_event=K`      | after K parts send `data: {"error":{..}}` and end: no finish, no `[DONE]`  |
//! | `stall_ms=S`         | wait S ms after the 200 headers before the first part                      |
//! | `finish=REASON`      | `finish_reason` of the final chunk (default `stop`, or `tool_calls`)       |
//! | `tools=N`            | N tool calls (1..=16) after the content (none in prose mode), see below    |
//! | `reasoning=N`        | N reasoning chunks (0..=100000) first, see [`reasoning_chunks`]            |
//! | `reasoning_field=F`  | `reasoning_content` (default) or `reasoning`: the delta field of reasoning |
//! | `refusal=1`          | the answer is [`REFUSAL_TEXT`] in `delta.refusal` pieces, no content       |
//! | `cached=K`           | usage: `prompt_tokens_details.cached_tokens = min(K, prompt_tokens)`       |
//! | `fingerprint=FP`     | `system_fingerprint` of every chunk (after `model`) and of the JSON answer |
//!
//! A *part* is one chunk carrying content, reasoning, refusal or one tool-call fragment; an
//! answer sends its reasoning, then its content or refusal, then its tool calls, each part in its
//! own chunk. `refusal=1` and `tools=N` exclude each other.
//!
//! Tool calls: call i has the id `call_<n>_<i>` (n: the number in the answer's id
//! `chatcmpl-mock-<n>`) and the name of the request's tool i (cycling through `tools`), or
//! `tool_<i>` when the request has none. Its first fragment is
//! `{"index":i,"id":..,"type":"function","function":{"name":..,"arguments":""}}`, then its
//! arguments follow in pieces of at most 8 characters, `{"index":i,"function":{"arguments":..}}`.
//! Arguments are built from the tool's JSON schema: each required property gets a string (a word
//! of the prompt, from its end), a number `1`, a boolean `true`, an empty array or object; a
//! tool the request did not define gets `{"index":i,"query":<the prompt's first 40 characters>}`.
//! *Automatic tool use*: in prose mode without `tools=`, `refusal=1`, a request with `tools`
//! whose `tool_choice` is not `"none"` and whose last message is not a tool result gets ONE call
//! (the `tool_choice` function, else the first tool) and no content; a request whose last message
//! is `role: "tool"` gets prose that quotes the tool's result. Non-streaming answers carry the
//! same in `message.tool_calls` (`content: null` when there is no content), the reasoning in
//! `message.reasoning_content` (or `message.reasoning`) and the refusal in `message.refusal`
//! (`content: null`).
//!
//! Errors: `fail` answers `{"error":{"message","type","param","code"}}` with type and code
//! `rate_limit_error`/`rate_limit_exceeded` on 429, `server_error`/`mock_injected_failure` on
//! 5xx, else `invalid_request_error`/`mock_injected_failure`. `error_event` sends
//! `{"error":{..}}` of type `server_error` and code `mock_stream_error` unless overridden; a
//! non-streaming request with `error_event` gets that body with HTTP 500.
//!
//! Directives are `key=value` pairs separated by whitespace or commas; an
//! unknown key or a bad value is a 400. `max_tokens` (or
//! `max_completion_tokens`) below the number of reasoning plus content chunks truncates the
//! answer (reasoning first) with `finish_reason: "length"` and no tool calls; a `cut` or
//! `error_event` beyond the answer happens just before the finish chunk. Non-streaming answers
//! wait `stall_ms` plus an explicit `delay_ms` per gap between parts, and `cut` there sends
//! half of the JSON before breaking the connection. Usage counts whitespace-separated words of
//! all messages as prompt tokens (raw text, blocks included) and parts as completion tokens,
//! `total_tokens` always; reasoning chunks also as
//! `completion_tokens_details.reasoning_tokens` when there are any. Array contents join their
//! text parts with `\n`. With `logprobs: true` in the request every content chunk carries
//! `choices[0].logprobs = {"content":[{"token":<the chunk>,"logprob","bytes","top_logprobs"}]}`
//! (`top_logprobs` entries: the chunk itself, then `alt<j> `; logprob `-0.125 * (1 + k % 4)`
//! for chunk k); the non-streaming answer carries all of them. The mock accepts every other
//! request field (`n`, `parallel_tool_calls`, `response_format`, ...) and ignores it.
//!
//! Streams are generated lazily, one chunk per poll of the response body, so a
//! client that stops reading back-pressures the mock instead of making it
//! buffer the whole answer; `chunks_sent` counts parts handed to the body.
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

pub use content::{reasoning_chunks, word_chunks, REFUSAL_TEXT, WORDS};
pub use directives::{parse_directives, Directives, ReasoningField};
pub use server::{router, run, spawn, MockHandle, MockState};
pub use stats::{MockStats, MockStatsSnapshot};
