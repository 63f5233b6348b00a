//! A stream's task: call the upstream, retry what may be retried, turn SSE chunks into
//! `delta` frames, and end with exactly one `done` or `error`.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use serde_json::{Map, Value};
use tokio::time::Instant;

use crate::config::{Price, RetryConfig};
use crate::protocol::{self, ErrorCode, OpenRequest, Usage};
use crate::stream::{CancelReason, Stream};
use crate::upstream::{self, Provider, UpstreamError};

/// Everything a stream's task needs besides the stream itself.
pub struct Job {
    pub stream: Arc<Stream>,
    pub provider: Arc<Provider>,
    /// The upstream request body, serialized once and reused by every attempt.
    pub body: Bytes,
    pub retry: RetryConfig,
    pub price: Option<Price>,
}

/// How a stream ended, for the caller's bookkeeping.
#[derive(Debug, PartialEq)]
pub enum Outcome {
    Done {
        finish_reason: String,
        usage: Option<Usage>,
    },
    Failed(ErrorCode),
    Cancelled(CancelReason),
}

/// Builds the upstream body: the client's messages and allowed params, with `stream` and
/// `stream_options.include_usage` always set by the gateway.
pub fn upstream_body(req: &OpenRequest) -> Result<Bytes, serde_json::Error> {
    let mut body = Map::with_capacity(req.params.len() + 4);
    for (k, v) in &req.params {
        body.insert(k.clone(), v.clone());
    }
    body.insert("model".into(), Value::String(req.model.clone()));
    body.insert("messages".into(), Value::Array(req.messages.clone()));
    body.insert("stream".into(), Value::Bool(true));
    body.insert(
        "stream_options".into(),
        serde_json::json!({ "include_usage": true }),
    );
    serde_json::to_vec(&body).map(Bytes::from)
}

/// Checks an `open` request's messages and params. The message text is the client's to
/// send; only the shape is checked.
pub fn validate_open(req: &OpenRequest, allowed_params: &[String]) -> Result<(), String> {
    if req.model.is_empty() || req.model.len() > 200 {
        return Err("`model` must be 1-200 characters".into());
    }
    if req.messages.is_empty() {
        return Err("`messages` must not be empty".into());
    }
    for (i, m) in req.messages.iter().enumerate() {
        let ok = m
            .as_object()
            .and_then(|o| o.get("role"))
            .is_some_and(Value::is_string);
        if !ok {
            return Err(format!(
                "`messages[{i}]` must be an object with a string `role`"
            ));
        }
    }
    for key in req.params.keys() {
        if !allowed_params.iter().any(|a| a == key) {
            return Err(format!("parameter `{key}` is not allowed"));
        }
    }
    Ok(())
}

/// Runs one stream to its end. Never returns before the terminal frame is in the log.
pub async fn run(job: Job) -> Outcome {
    let stream = &job.stream;
    stream.set_start(protocol::start(&stream.id, &stream.model));
    let outcome = attempt_all(&job).await;
    let last_seq = match &outcome {
        Ended::Done { seq, .. } | Ended::Failed { seq, .. } | Ended::Cancelled { seq } => *seq,
    };
    let key = last_seq + 1;
    match outcome {
        Ended::Done {
            seq,
            finish_reason,
            usage,
        } => {
            let cost = usage.zip(job.price).map(|(u, p)| cost_usd(u, p));
            stream.finish(
                key,
                protocol::done(&stream.id, seq + 1, &finish_reason, usage, cost),
            );
            Outcome::Done {
                finish_reason,
                usage,
            }
        }
        Ended::Failed { error, .. } => {
            let code = error.code();
            let retry_after = error.retry_after().map(|d| d.as_millis() as u64);
            stream.finish(
                key,
                protocol::error(Some(&stream.id), code, &error.to_string(), retry_after),
            );
            Outcome::Failed(code)
        }
        Ended::Cancelled { .. } => {
            let reason = stream.cancel_reason().unwrap_or(CancelReason::Client);
            let (code, message) = match reason {
                CancelReason::Client => (ErrorCode::Cancelled, "cancelled by the client"),
                CancelReason::ResumeExpired => {
                    (ErrorCode::Cancelled, "not resumed within the resume window")
                }
                CancelReason::Shutdown => (
                    ErrorCode::Internal,
                    "the gateway shut down before the stream finished",
                ),
            };
            stream.finish(key, protocol::error(Some(&stream.id), code, message, None));
            Outcome::Cancelled(reason)
        }
    }
}

/// USD for `usage` at `price` (per million tokens).
pub fn cost_usd(usage: Usage, price: Price) -> f64 {
    (usage.prompt_tokens as f64 * price.input + usage.completion_tokens as f64 * price.output)
        / 1_000_000.0
}

enum Ended {
    Done {
        seq: u64,
        finish_reason: String,
        usage: Option<Usage>,
    },
    Failed {
        seq: u64,
        error: UpstreamError,
    },
    Cancelled {
        seq: u64,
    },
}

async fn attempt_all(job: &Job) -> Ended {
    let stream = &job.stream;
    let mut retries = 0u32;
    loop {
        let mut seq = 0u64;
        let error = match attempt(job, &mut seq).await {
            Ok((finish_reason, usage)) => {
                return Ended::Done {
                    seq,
                    finish_reason,
                    usage,
                }
            }
            Err(Attempt::Cancelled) => return Ended::Cancelled { seq },
            Err(Attempt::Failed(e)) => e,
        };
        // Text already went out: another attempt would send it twice.
        let exhausted = retries + 1 >= job.retry.max_attempts;
        let retry_after = error.retry_after();
        let too_long =
            retry_after.is_some_and(|d| d > Duration::from_millis(job.retry.max_retry_after_ms));
        if seq > 0 || !error.retryable() || exhausted || too_long {
            tracing::warn!(stream = %stream.id, provider = %job.provider.name, kind = error.kind(), attempts = retries + 1, "upstream failed: {error}");
            return Ended::Failed { seq, error };
        }
        let wait = upstream::backoff(retries, &job.retry, retry_after, &mut rand::thread_rng());
        tracing::info!(stream = %stream.id, provider = %job.provider.name, kind = error.kind(), ?wait, "retrying upstream");
        retries += 1;
        if until_cancelled(stream, tokio::time::sleep(wait))
            .await
            .is_none()
        {
            return Ended::Cancelled { seq };
        }
    }
}

enum Attempt {
    Failed(UpstreamError),
    Cancelled,
}

/// Runs `f` unless the stream is cancelled first. Dropping `f` is what aborts an upstream
/// request at once: its connection is closed, not returned to the pool.
async fn until_cancelled<F: std::future::Future>(stream: &Stream, f: F) -> Option<F::Output> {
    tokio::select! {
        out = f => Some(out),
        _ = stream.cancelled().cancelled() => None,
    }
}

/// One upstream call. `seq` counts the deltas pushed, so the caller knows whether any text
/// went out.
async fn attempt(job: &Job, seq: &mut u64) -> Result<(String, Option<Usage>), Attempt> {
    let stream = &job.stream;
    let provider = &job.provider;
    let first_token_deadline = Instant::now() + provider.first_token_timeout;
    let first_token_timeout = || {
        Attempt::Failed(UpstreamError::FirstTokenTimeout(
            provider.first_token_timeout,
        ))
    };
    let opened = tokio::time::timeout_at(first_token_deadline, provider.open(job.body.clone()));
    let mut events = until_cancelled(stream, opened)
        .await
        .ok_or(Attempt::Cancelled)?
        .map_err(|_| first_token_timeout())?
        .map_err(Attempt::Failed)?;
    let mut finish_reason: Option<String> = None;
    let mut usage = None;
    loop {
        let next = if *seq == 0 {
            until_cancelled(
                stream,
                tokio::time::timeout_at(first_token_deadline, events.next()),
            )
            .await
        } else {
            until_cancelled(
                stream,
                tokio::time::timeout(provider.idle_timeout, events.next()),
            )
            .await
        };
        let event = match next.ok_or(Attempt::Cancelled)? {
            Err(_) if *seq == 0 => return Err(first_token_timeout()),
            Err(_) => {
                return Err(Attempt::Failed(UpstreamError::IdleTimeout(
                    provider.idle_timeout,
                )))
            }
            Ok(None) => {
                // A clean end without [DONE] is fine once the upstream said why it finished.
                return match finish_reason {
                    Some(reason) => Ok((reason, usage)),
                    None => Err(Attempt::Failed(UpstreamError::Broken(
                        "the upstream closed the stream before finishing".into(),
                    ))),
                };
            }
            Ok(Some(Err(e))) => {
                return Err(Attempt::Failed(UpstreamError::Broken(
                    provider.redact(&e.to_string()),
                )))
            }
            Ok(Some(Ok(event))) => event,
        };
        if event.data == "[DONE]" {
            return Ok((finish_reason.unwrap_or_else(|| "stop".into()), usage));
        }
        let chunk = upstream::parse_chunk(&event.data).map_err(Attempt::Failed)?;
        if let Some(u) = chunk.usage {
            usage = Some(u);
        }
        if let Some(reason) = chunk.finish_reason {
            finish_reason = Some(reason.into_owned());
        }
        if let Some(text) = chunk.content {
            *seq += 1;
            if !stream
                .push(*seq, protocol::delta(&stream.id, *seq, &text))
                .await
            {
                return Err(Attempt::Cancelled);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn open(params: Value) -> OpenRequest {
        serde_json::from_value(serde_json::json!({
            "id": "s", "model": "m", "messages": [{"role":"user","content":"hi"}], "params": params
        }))
        .expect("open")
    }

    #[test]
    fn body_forces_streaming_and_usage() {
        let req = open(serde_json::json!({"temperature": 0.5}));
        let body: Value =
            serde_json::from_slice(&upstream_body(&req).expect("body")).expect("json");
        assert_eq!(body["stream"], true);
        assert_eq!(body["stream_options"]["include_usage"], true);
        assert_eq!(body["temperature"], 0.5);
        assert_eq!(body["model"], "m");
    }

    #[test]
    fn validation() {
        let allowed = crate::config::default_allowed_params();
        assert!(validate_open(&open(serde_json::json!({"max_tokens": 5})), &allowed).is_ok());
        let e = validate_open(&open(serde_json::json!({"stream": false})), &allowed)
            .expect_err("stream");
        assert!(e.contains("`stream`"), "{e}");
        let mut req = open(serde_json::json!({}));
        req.messages = vec![serde_json::json!("hi")];
        assert!(validate_open(&req, &allowed).is_err());
        req.messages.clear();
        assert!(validate_open(&req, &allowed).is_err());
    }

    #[test]
    fn cost() {
        let price = Price {
            input: 0.10,
            output: 0.42,
        };
        let c = cost_usd(
            Usage {
                prompt_tokens: 1_000_000,
                completion_tokens: 1_000_000,
            },
            price,
        );
        assert!((c - 0.52).abs() < 1e-12);
    }
}
