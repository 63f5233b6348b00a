//! The fields of a chat-completion request the mock reads.

use std::borrow::Cow;

use serde_json::Value;

use super::directives::extract_blocks;

/// Text of one message: a string, or the `text` parts of an array joined with
/// `\n` (a separator keeps the words of adjacent parts apart).
fn message_text(message: &Value) -> Cow<'_, str> {
    match message.get("content") {
        Some(Value::String(s)) => Cow::Borrowed(s.as_str()),
        Some(Value::Array(parts)) => Cow::Owned(
            parts
                .iter()
                .filter(|p| p.get("type").and_then(Value::as_str).unwrap_or("text") == "text")
                .filter_map(|p| p.get("text").and_then(Value::as_str))
                .collect::<Vec<_>>()
                .join("\n"),
        ),
        _ => Cow::Borrowed(""),
    }
}

/// The fields of a chat-completion request the mock cares about.
pub(super) struct ChatRequest {
    pub(super) model: String,
    pub(super) stream: bool,
    pub(super) include_usage: bool,
    pub(super) max_tokens: Option<u64>,
    /// Last user message, blocks removed, trimmed.
    pub(super) prompt: String,
    /// Insides of the message's `[[mock ...]]` blocks, space-joined.
    pub(super) block_directives: String,
    pub(super) prompt_tokens: u64,
}

pub(super) fn parse_request(body: &Value) -> Result<ChatRequest, String> {
    if !body.is_object() {
        return Err("the request body must be a JSON object".to_owned());
    }
    let model = body
        .get("model")
        .and_then(Value::as_str)
        .ok_or("`model` is required and must be a string")?
        .to_owned();
    let messages = body
        .get("messages")
        .and_then(Value::as_array)
        .ok_or("`messages` is required and must be an array")?;
    let mut max_tokens = None;
    for field in ["max_completion_tokens", "max_tokens"] {
        match body.get(field) {
            None | Some(Value::Null) => {}
            Some(v) => {
                let n = v
                    .as_u64()
                    .ok_or_else(|| format!("`{field}` must be a non-negative integer"))?;
                max_tokens.get_or_insert(n);
            }
        }
    }
    // Counted on the raw text, directive blocks included: the mock reports
    // what it was sent, like a real provider would.
    let prompt_tokens = messages
        .iter()
        .map(|m| message_text(m).split_whitespace().count() as u64)
        .sum();
    let last_user = messages
        .iter()
        .rev()
        .find(|m| m.get("role").and_then(Value::as_str) == Some("user"));
    let (prompt, block_directives) = match last_user {
        Some(m) => {
            let text = message_text(m);
            let (rest, blocks) = extract_blocks(&text)?;
            (rest.trim().to_owned(), blocks.join(" "))
        }
        None => (String::new(), String::new()),
    };
    Ok(ChatRequest {
        model,
        stream: body.get("stream").and_then(Value::as_bool).unwrap_or(false),
        include_usage: body
            .pointer("/stream_options/include_usage")
            .and_then(Value::as_bool)
            .unwrap_or(false),
        max_tokens,
        prompt,
        block_directives,
        prompt_tokens,
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn message_text_joins_text_parts() {
        let m = json!({"role":"user","content":[
            {"type":"text","text":"Hello"},
            {"type":"image_url","image_url":{"url":"x"}},
            {"type":"text","text":"world"}
        ]});
        assert_eq!(message_text(&m), "Hello\nworld");
        assert_eq!(
            message_text(&json!({"role":"assistant","content":null})),
            ""
        );
    }
}
