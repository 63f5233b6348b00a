//! One answer, computed once per request, and the SSE events and JSON document it makes.

use std::{
    fmt::Write as _,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use axum::body::Bytes;
use serde_json::{json, Value};

use crate::protocol::push_json_string;

use super::{
    content::{prompt_hash, prose_chunks, Content},
    directives::Directives,
    request::ChatRequest,
};

const DEFAULT_PROSE_DELAY_MS: u64 = 30;

/// Everything a response needs, computed once per request.
pub(super) struct Plan {
    /// `data: {"id":..,"object":..,"created":..,"model":..,` shared by every event.
    head: String,
    id: String,
    created: u64,
    model: String,
    content: Content,
    /// Number of content chunks to send (after `max_tokens`).
    pub(super) limit: usize,
    finish: String,
    pub(super) delay: Duration,
    pub(super) stall: Duration,
    /// Chunk count after which to cut; never beyond `limit` so that a cut
    /// always happens once asked for.
    pub(super) cut_at: Option<usize>,
    pub(super) include_usage: bool,
    prompt_tokens: u64,
}

impl Plan {
    pub(super) fn new(id_number: u64, req: ChatRequest, d: &Directives) -> Plan {
        let created = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |t| t.as_secs());
        let id = format!("chatcmpl-mock-{id_number}");
        let (content, default_delay) = match d.chunks {
            Some(n) => (
                Content::Words {
                    h: prompt_hash(&req.prompt),
                    pad_to: d.chunk_bytes.unwrap_or(0),
                    n,
                },
                0,
            ),
            None => (
                Content::Prose(prose_chunks(&req.prompt)),
                DEFAULT_PROSE_DELAY_MS,
            ),
        };
        let total = content.len();
        let limit = req.max_tokens.map_or(total, |m| {
            total.min(usize::try_from(m).unwrap_or(usize::MAX))
        });
        let finish = if limit < total {
            "length".to_owned()
        } else {
            d.finish.clone().unwrap_or_else(|| "stop".to_owned())
        };
        let mut head = String::with_capacity(128 + req.model.len());
        let _ = write!(
            head,
            "data: {{\"id\":\"{id}\",\"object\":\"chat.completion.chunk\",\"created\":{created},\"model\":"
        );
        push_json_string(&mut head, &req.model);
        head.push(',');
        Plan {
            head,
            id,
            created,
            model: req.model,
            content,
            limit,
            finish,
            delay: Duration::from_millis(d.delay_ms.unwrap_or(default_delay)),
            stall: Duration::from_millis(d.stall_ms.unwrap_or(0)),
            cut_at: d.cut.map(|c| c.min(limit)),
            include_usage: req.include_usage,
            prompt_tokens: req.prompt_tokens,
        }
    }

    fn choice_event(
        &self,
        extra: usize,
        delta: impl FnOnce(&mut String),
        finish: Option<&str>,
    ) -> Bytes {
        let mut out = String::with_capacity(self.head.len() + 96 + extra);
        out.push_str(&self.head);
        out.push_str("\"choices\":[{\"index\":0,\"delta\":");
        delta(&mut out);
        out.push_str(",\"finish_reason\":");
        match finish {
            Some(reason) => push_json_string(&mut out, reason),
            None => out.push_str("null"),
        }
        out.push_str("}]}\n\n");
        Bytes::from(out)
    }

    pub(super) fn role_event(&self) -> Bytes {
        self.choice_event(
            0,
            |out| out.push_str("{\"role\":\"assistant\",\"content\":\"\"}"),
            None,
        )
    }

    pub(super) fn content_event(&self, k: usize) -> Bytes {
        let extra = match &self.content {
            Content::Words { pad_to, .. } => *pad_to + 24,
            Content::Prose(chunks) => chunks[k].len() + 8,
        };
        self.choice_event(
            extra,
            |out| {
                out.push_str("{\"content\":");
                self.content.push_json(out, k);
                out.push('}');
            },
            None,
        )
    }

    pub(super) fn finish_event(&self) -> Bytes {
        self.choice_event(
            self.finish.len(),
            |out| out.push_str("{}"),
            Some(&self.finish),
        )
    }

    fn usage_json(&self) -> Value {
        let completion = self.limit as u64;
        json!({
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": completion,
            "total_tokens": self.prompt_tokens + completion,
        })
    }

    pub(super) fn usage_event(&self) -> Bytes {
        let mut out = String::with_capacity(self.head.len() + 128);
        out.push_str(&self.head);
        let _ = write!(out, "\"choices\":[],\"usage\":{}}}\n\n", self.usage_json());
        Bytes::from(out)
    }

    pub(super) fn completion_json(&self) -> Value {
        json!({
            "id": self.id,
            "object": "chat.completion",
            "created": self.created,
            "model": self.model,
            "choices": [{
                "index": 0,
                "message": { "role": "assistant", "content": self.content.text(self.limit) },
                "finish_reason": self.finish,
            }],
            "usage": self.usage_json(),
        })
    }
}
