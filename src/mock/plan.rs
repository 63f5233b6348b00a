//! One answer, computed once per request, and the SSE events and JSON document it makes.

use std::{
    fmt::Write as _,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use axum::body::Bytes;
use serde_json::{json, Map, Value};

use crate::protocol::push_json_string;

use super::{
    content::{
        arguments_from_schema, prompt_hash, prose_chunks, push_reasoning_chunk, reasoning_chunks,
        refusal_chunks, split_arguments, tool_result_chunks, Content,
    },
    directives::{Directives, ReasoningField},
    request::{ChatRequest, ToolChoice},
};

const DEFAULT_PROSE_DELAY_MS: u64 = 30;
/// Characters per streamed piece of tool-call arguments: small enough that every call's
/// arguments span several chunks, as with real providers.
const ARGUMENT_PIECE_CHARS: usize = 8;
/// Characters of the prompt quoted in the arguments of a call to a tool the request did
/// not define.
const QUERY_MAX_CHARS: usize = 40;

/// One tool call of the answer.
struct Call {
    id: String,
    name: String,
    arguments: String,
}

/// What the text parts of the answer are.
enum Text {
    Content(Content),
    /// `delta.refusal` pieces instead of content.
    Refusal(Vec<String>),
}

/// The part an answer sends at a given position: reasoning, then content or refusal, then
/// tool-call fragments.
enum Part<'a> {
    Reasoning(usize),
    Text(usize),
    Fragment(&'a str),
}

/// Everything a response needs, computed once per request.
pub(super) struct Plan {
    /// `data: {"id":..,"object":..,"created":..,"model":..,` shared by every event.
    head: String,
    id: String,
    created: u64,
    model: String,
    text: Text,
    /// Reasoning chunks to send (after `max_tokens`).
    reasoning: usize,
    reasoning_field: ReasoningField,
    /// Content (or refusal) chunks to send (after `max_tokens`).
    text_parts: usize,
    calls: Vec<Call>,
    /// The `choices[0].delta.tool_calls[0]` JSON of every tool-call chunk, in order.
    fragments: Vec<String>,
    /// Number of parts (reasoning, content or refusal, tool-call fragments) to send.
    pub(super) limit: usize,
    finish: String,
    pub(super) delay: Duration,
    pub(super) stall: Duration,
    /// Part count after which to cut; never beyond `limit` so that a cut
    /// always happens once asked for.
    pub(super) cut_at: Option<usize>,
    /// Part count after which an SSE `error` event ends the stream (same bound as `cut_at`).
    pub(super) error_at: Option<usize>,
    /// `{"error":{..}}` of `error_event`.
    pub(super) error_body: Value,
    pub(super) include_usage: bool,
    prompt_tokens: u64,
    cached: Option<u64>,
    logprobs: bool,
    top_logprobs: usize,
    fingerprint: Option<String>,
}

/// The `error` object the mock sends for an injected failure, shaped by `fail_type`,
/// `fail_code` and `fail_param`.
pub(super) fn error_json(
    message: &str,
    d: &Directives,
    default_type: &str,
    default_code: Option<&str>,
) -> Value {
    json!({
        "error": {
            "message": message,
            "type": d.fail_type.as_deref().unwrap_or(default_type),
            "param": d.fail_param.as_deref(),
            "code": d.fail_code.as_deref().or(default_code),
        }
    })
}

/// The tool calls the answer makes: `tools=N` calls, or one automatic call when the
/// request offers tools, lets the model use them and is not answering a tool result.
fn plan_calls(id_number: u64, req: &ChatRequest, d: &Directives) -> Vec<Call> {
    let automatic = d.tools.is_none()
        && d.chunks.is_none()
        && d.refusal != Some(true)
        && !req.tools.is_empty()
        && req.tool_choice != ToolChoice::None
        && req.tool_result.is_none();
    let (first, count) = match (d.tools, &req.tool_choice) {
        (Some(n), _) => (0, n),
        (None, ToolChoice::Named(i)) if automatic => (*i, 1),
        (None, _) if automatic => (0, 1),
        (None, _) => return Vec::new(),
    };
    (0..count)
        .map(|i| {
            let id = format!("call_{id_number}_{i}");
            match req.tools.get((first + i) % req.tools.len().max(1)) {
                Some(tool) => Call {
                    id,
                    name: tool.name.clone(),
                    arguments: arguments_from_schema(&tool.parameters, &req.prompt),
                },
                None => Call {
                    id,
                    name: format!("tool_{i}"),
                    arguments: json!({
                        "index": i,
                        "query": req.prompt.chars().take(QUERY_MAX_CHARS).collect::<String>(),
                    })
                    .to_string(),
                },
            }
        })
        .collect()
}

/// Written by hand rather than through `json!` to keep OpenAI's key order (`index`, `id`,
/// `type`, `function`), which `serde_json` would sort.
fn fragments_of(calls: &[Call]) -> Vec<String> {
    let mut fragments = Vec::new();
    for (i, call) in calls.iter().enumerate() {
        let mut first = format!("{{\"index\":{i},\"id\":");
        push_json_string(&mut first, &call.id);
        first.push_str(",\"type\":\"function\",\"function\":{\"name\":");
        push_json_string(&mut first, &call.name);
        first.push_str(",\"arguments\":\"\"}}");
        fragments.push(first);
        for piece in split_arguments(&call.arguments, ARGUMENT_PIECE_CHARS) {
            let mut next = format!("{{\"index\":{i},\"function\":{{\"arguments\":");
            push_json_string(&mut next, &piece);
            next.push_str("}}");
            fragments.push(next);
        }
    }
    fragments
}

impl Plan {
    pub(super) fn new(id_number: u64, req: ChatRequest, d: &Directives) -> Plan {
        let created = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |t| t.as_secs());
        let id = format!("chatcmpl-mock-{id_number}");
        let mut calls = plan_calls(id_number, &req, d);
        let (text, default_delay) = match (d.chunks, d.refusal == Some(true)) {
            (n, true) => (
                Text::Refusal(refusal_chunks()),
                if n.is_some() {
                    0
                } else {
                    DEFAULT_PROSE_DELAY_MS
                },
            ),
            (Some(n), false) => (
                Text::Content(Content::Words {
                    h: prompt_hash(&req.prompt),
                    pad_to: d.chunk_bytes.unwrap_or(0),
                    n,
                }),
                0,
            ),
            (None, false) => {
                let chunks = match &req.tool_result {
                    _ if !calls.is_empty() => Vec::new(),
                    Some(result) => tool_result_chunks(result),
                    None => prose_chunks(&req.prompt),
                };
                (
                    Text::Content(Content::Prose(chunks)),
                    DEFAULT_PROSE_DELAY_MS,
                )
            }
        };
        let text_total = match &text {
            Text::Content(content) => content.len(),
            Text::Refusal(pieces) => pieces.len(),
        };
        let reasoning_total = d.reasoning.unwrap_or(0);
        let budget = req
            .max_tokens
            .map_or(usize::MAX, |m| usize::try_from(m).unwrap_or(usize::MAX));
        let reasoning = reasoning_total.min(budget);
        let text_parts = text_total.min(budget - reasoning);
        let truncated = reasoning < reasoning_total || text_parts < text_total;
        let finish = if truncated {
            // Out of tokens before the calls: like a real model, no call is made.
            calls.clear();
            "length".to_owned()
        } else if let Some(finish) = &d.finish {
            finish.clone()
        } else if calls.is_empty() {
            "stop".to_owned()
        } else {
            "tool_calls".to_owned()
        };
        let fragments = fragments_of(&calls);
        let limit = reasoning + text_parts + fragments.len();
        let mut head = String::with_capacity(128 + req.model.len());
        let _ = write!(
            head,
            "data: {{\"id\":\"{id}\",\"object\":\"chat.completion.chunk\",\"created\":{created},\"model\":"
        );
        push_json_string(&mut head, &req.model);
        if let Some(fingerprint) = &d.fingerprint {
            head.push_str(",\"system_fingerprint\":");
            push_json_string(&mut head, fingerprint);
        }
        head.push(',');
        let error_at = d.error_event.map(|k| k.min(limit));
        let error_body = error_json(
            &format!(
                "mock: error event after {} parts",
                error_at.unwrap_or_default()
            ),
            d,
            "server_error",
            Some("mock_stream_error"),
        );
        Plan {
            head,
            id,
            created,
            model: req.model,
            text,
            reasoning,
            reasoning_field: d.reasoning_field.unwrap_or_default(),
            text_parts,
            calls,
            fragments,
            limit,
            finish,
            delay: Duration::from_millis(d.delay_ms.unwrap_or(default_delay)),
            stall: Duration::from_millis(d.stall_ms.unwrap_or(0)),
            cut_at: d.cut.map(|c| c.min(limit)),
            error_at,
            error_body,
            include_usage: req.include_usage,
            prompt_tokens: req.prompt_tokens,
            cached: d.cached,
            logprobs: req.logprobs,
            top_logprobs: req.top_logprobs,
            fingerprint: d.fingerprint.clone(),
        }
    }

    fn part(&self, k: usize) -> Part<'_> {
        if k < self.reasoning {
            Part::Reasoning(k)
        } else if k < self.reasoning + self.text_parts {
            Part::Text(k - self.reasoning)
        } else {
            Part::Fragment(&self.fragments[k - self.reasoning - self.text_parts])
        }
    }

    /// The `choices[0].logprobs` of content chunk k: one entry for the chunk as a token.
    fn logprobs_entry(&self, k: usize) -> Value {
        let Text::Content(content) = &self.text else {
            return Value::Null;
        };
        let token = content.chunk(k);
        // Exact binary fractions, so that they print the same in every language.
        let logprob = -0.125 * (1 + k % 4) as f64;
        let top: Vec<Value> = (0..self.top_logprobs)
            .map(|j| {
                let alternative = if j == 0 {
                    token.clone()
                } else {
                    format!("alt{j} ")
                };
                json!({
                    "token": alternative,
                    "logprob": logprob - j as f64,
                    "bytes": alternative.as_bytes(),
                })
            })
            .collect();
        json!({ "token": token, "logprob": logprob, "bytes": token.as_bytes(), "top_logprobs": top })
    }

    fn choice_event(
        &self,
        extra: usize,
        delta: impl FnOnce(&mut String),
        logprobs: Option<&Value>,
        finish: Option<&str>,
    ) -> Bytes {
        let mut out = String::with_capacity(self.head.len() + 96 + extra);
        out.push_str(&self.head);
        out.push_str("\"choices\":[{\"index\":0,\"delta\":");
        delta(&mut out);
        if let Some(logprobs) = logprobs {
            let _ = write!(out, ",\"logprobs\":{logprobs}");
        }
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
            None,
        )
    }

    /// The event of part k (`k < limit`).
    pub(super) fn part_event(&self, k: usize) -> Bytes {
        match self.part(k) {
            Part::Reasoning(k) => self.choice_event(
                32,
                |out| {
                    let _ = write!(out, "{{\"{}\":\"", self.reasoning_field.name());
                    push_reasoning_chunk(out, k);
                    out.push_str("\"}");
                },
                None,
                None,
            ),
            Part::Text(k) => match &self.text {
                Text::Content(content) => {
                    let extra = match content {
                        Content::Words { pad_to, .. } => *pad_to + 24,
                        Content::Prose(chunks) => chunks[k].len() + 8,
                    };
                    let logprobs = self
                        .logprobs
                        .then(|| json!({ "content": [self.logprobs_entry(k)] }));
                    self.choice_event(
                        extra,
                        |out| {
                            out.push_str("{\"content\":");
                            content.push_json(out, k);
                            out.push('}');
                        },
                        logprobs.as_ref(),
                        None,
                    )
                }
                Text::Refusal(pieces) => self.choice_event(
                    pieces[k].len() + 16,
                    |out| {
                        out.push_str("{\"refusal\":");
                        push_json_string(out, &pieces[k]);
                        out.push('}');
                    },
                    None,
                    None,
                ),
            },
            Part::Fragment(fragment) => self.choice_event(
                fragment.len() + 20,
                |out| {
                    let _ = write!(out, "{{\"tool_calls\":[{fragment}]}}");
                },
                None,
                None,
            ),
        }
    }

    pub(super) fn finish_event(&self) -> Bytes {
        self.choice_event(
            self.finish.len(),
            |out| out.push_str("{}"),
            None,
            Some(&self.finish),
        )
    }

    pub(super) fn error_event(&self) -> Bytes {
        Bytes::from(format!("data: {}\n\n", self.error_body))
    }

    fn usage_json(&self) -> Value {
        let completion = self.limit as u64;
        let mut usage = json!({
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": completion,
            "total_tokens": self.prompt_tokens + completion,
        });
        if let Some(cached) = self.cached {
            usage["prompt_tokens_details"] =
                json!({ "cached_tokens": cached.min(self.prompt_tokens) });
        }
        if self.reasoning > 0 {
            usage["completion_tokens_details"] =
                json!({ "reasoning_tokens": self.reasoning as u64 });
        }
        usage
    }

    pub(super) fn usage_event(&self) -> Bytes {
        let mut out = String::with_capacity(self.head.len() + 128);
        out.push_str(&self.head);
        let _ = write!(out, "\"choices\":[],\"usage\":{}}}\n\n", self.usage_json());
        Bytes::from(out)
    }

    pub(super) fn completion_json(&self) -> Value {
        let mut message = Map::new();
        message.insert("role".into(), "assistant".into());
        let content = match &self.text {
            Text::Refusal(_) => Value::Null,
            Text::Content(_) if self.text_parts == 0 && !self.calls.is_empty() => Value::Null,
            Text::Content(content) => content.text(self.text_parts).into(),
        };
        message.insert("content".into(), content);
        if self.reasoning > 0 {
            message.insert(
                self.reasoning_field.name().into(),
                reasoning_chunks(self.reasoning).concat().into(),
            );
        }
        if let Text::Refusal(pieces) = &self.text {
            message.insert("refusal".into(), pieces[..self.text_parts].concat().into());
        }
        if !self.calls.is_empty() {
            let calls: Vec<Value> = self
                .calls
                .iter()
                .map(|c| {
                    json!({
                        "id": c.id,
                        "type": "function",
                        "function": { "name": c.name, "arguments": c.arguments },
                    })
                })
                .collect();
            message.insert("tool_calls".into(), calls.into());
        }
        let mut choice = json!({
            "index": 0,
            "message": message,
            "finish_reason": self.finish,
        });
        if self.logprobs {
            let entries: Vec<Value> = match &self.text {
                Text::Content(_) => (0..self.text_parts)
                    .map(|k| self.logprobs_entry(k))
                    .collect(),
                Text::Refusal(_) => Vec::new(),
            };
            choice["logprobs"] = json!({ "content": entries });
        }
        let mut answer = json!({
            "id": self.id,
            "object": "chat.completion",
            "created": self.created,
            "model": self.model,
            "choices": [choice],
            "usage": self.usage_json(),
        });
        if let Some(fingerprint) = &self.fingerprint {
            answer["system_fingerprint"] = fingerprint.as_str().into();
        }
        answer
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::mock::{directives::parse_directives, request::parse_request};

    const WEATHER: &str = "get_weather";

    fn plan(body: Value, directives: &str) -> Plan {
        let req = parse_request(&body).unwrap();
        Plan::new(7, req, &parse_directives(directives).unwrap())
    }

    fn with_tools(extra: Value) -> Value {
        let mut body = json!({"model":"m","messages":[{"role":"user","content":"Weather in Oslo?"}],
            "tools":[
                {"type":"function","function":{"name":WEATHER,"parameters":{"type":"object",
                    "properties":{"city":{"type":"string"}},"required":["city"]}}},
                {"type":"function","function":{"name":"get_time"}}]});
        for (k, v) in extra.as_object().unwrap() {
            body[k] = v.clone();
        }
        body
    }

    fn call_names(p: &Plan) -> Vec<&str> {
        p.calls.iter().map(|c| c.name.as_str()).collect()
    }

    #[test]
    fn tool_choice_steers_the_automatic_call() {
        let p = plan(with_tools(json!({})), "");
        assert_eq!(call_names(&p), [WEATHER]);
        assert_eq!(p.calls[0].arguments, r#"{"city":"Oslo"}"#);
        assert_eq!((p.text_parts, p.finish.as_str()), (0, "tool_calls"));
        let p = plan(with_tools(json!({"tool_choice":"required"})), "");
        assert_eq!(call_names(&p), [WEATHER]);
        let named = json!({"tool_choice":{"type":"function","function":{"name":"get_time"}}});
        let p = plan(with_tools(named), "");
        assert_eq!(call_names(&p), ["get_time"]);
        assert_eq!(p.calls[0].arguments, "{}");
        let p = plan(with_tools(json!({"tool_choice":"none"})), "");
        assert!(p.calls.is_empty());
        assert!(p.text_parts > 0);
        assert_eq!(p.finish, "stop");
        // Word mode and refusals never call a tool on their own.
        assert!(plan(with_tools(json!({})), "chunks=2").calls.is_empty());
        assert!(plan(with_tools(json!({})), "refusal=1").calls.is_empty());
    }

    #[test]
    fn a_tool_result_is_answered_in_prose() {
        let messages = json!([
            {"role":"user","content":"Weather in Oslo?"},
            {"role":"assistant","content":null,"tool_calls":[{"id":"call_1_0","type":"function",
                "function":{"name":WEATHER,"arguments":"{\"city\":\"Oslo\"}"}}]},
            {"role":"tool","tool_call_id":"call_1_0","content":"rain, 4 C"}]);
        let p = plan(with_tools(json!({"messages":messages})), "");
        assert!(p.calls.is_empty());
        let Text::Content(content) = &p.text else {
            panic!("not content")
        };
        assert!(content
            .text(p.text_parts)
            .starts_with("The tool returned: “rain, 4 C”."));
    }

    #[test]
    fn tools_directive_cycles_names_and_splits_arguments() {
        let p = plan(with_tools(json!({})), "tools=3 chunks=2");
        assert_eq!(call_names(&p), [WEATHER, "get_time", WEATHER]);
        assert_eq!(
            p.calls.iter().map(|c| c.id.as_str()).collect::<Vec<_>>(),
            ["call_7_0", "call_7_1", "call_7_2"]
        );
        assert_eq!(p.text_parts, 2);
        assert_eq!(p.limit, 2 + p.fragments.len());
        // Each call: one head fragment, then its arguments in pieces.
        for (i, call) in p.calls.iter().enumerate() {
            let mine: Vec<Value> = p
                .fragments
                .iter()
                .map(|f| serde_json::from_str::<Value>(f).unwrap())
                .filter(|f| f["index"] == i)
                .collect();
            assert_eq!(mine[0]["id"], call.id.as_str());
            assert_eq!(mine[0]["function"]["name"], call.name.as_str());
            assert_eq!(mine[0]["function"]["arguments"], "");
            let joined: String = mine[1..]
                .iter()
                .map(|f| f["function"]["arguments"].as_str().unwrap())
                .collect();
            assert_eq!(joined, call.arguments);
            assert!(mine.len() >= 3, "{mine:?}");
        }
        let odd = json!({"model":"m","messages":[{"role":"user","content":"q"}],
            "tools":[{"type":"function","function":{"name":"a\"b\\c\n"}}]});
        let p = plan(odd, "tools=1");
        let head: Value = serde_json::from_str(&p.fragments[0]).unwrap();
        assert_eq!(head["function"]["name"], "a\"b\\c\n");
        let p = plan(
            json!({"model":"m","messages":[{"role":"user","content":"q"}]}),
            "tools=2",
        );
        assert_eq!(call_names(&p), ["tool_0", "tool_1"]);
        assert_eq!(p.calls[1].arguments, r#"{"index":1,"query":"q"}"#);
    }

    #[test]
    fn max_tokens_spends_reasoning_first_and_drops_calls() {
        let p = plan(with_tools(json!({"max_tokens": 3})), "reasoning=5");
        assert_eq!((p.reasoning, p.text_parts), (3, 0));
        assert!(p.calls.is_empty());
        assert_eq!((p.limit, p.finish.as_str()), (3, "length"));
        let p = plan(with_tools(json!({"max_tokens": 5})), "reasoning=2 chunks=4");
        assert_eq!((p.reasoning, p.text_parts, p.limit), (2, 3, 5));
        assert_eq!(p.finish, "length");
    }

    #[test]
    fn usage_details_appear_only_when_they_apply() {
        let body = json!({"model":"m","messages":[{"role":"user","content":"one two three"}]});
        let usage = plan(body.clone(), "chunks=2").usage_json();
        assert_eq!(
            usage,
            json!({"prompt_tokens":3,"completion_tokens":2,"total_tokens":5})
        );
        let usage = plan(body, "chunks=2 reasoning=4 cached=10").usage_json();
        assert_eq!(
            usage,
            json!({"prompt_tokens":3,"completion_tokens":6,"total_tokens":9,
                "prompt_tokens_details":{"cached_tokens":3},
                "completion_tokens_details":{"reasoning_tokens":4}})
        );
    }
}
