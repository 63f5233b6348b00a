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

/// One entry of the request's `tools`.
#[derive(Debug)]
pub(super) struct Tool {
    pub(super) name: String,
    /// `function.parameters`, the JSON schema arguments are built from (`Null` when absent).
    pub(super) parameters: Value,
}

/// The request's `tool_choice`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum ToolChoice {
    Auto,
    None,
    Required,
    /// `{"type":"function","function":{"name":..}}`: index into `tools`.
    Named(usize),
}

/// The fields of a chat-completion request the mock cares about.
#[derive(Debug)]
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
    pub(super) tools: Vec<Tool>,
    pub(super) tool_choice: ToolChoice,
    /// `logprobs: true`: every content chunk carries `choices[0].logprobs`.
    pub(super) logprobs: bool,
    pub(super) top_logprobs: usize,
    /// The content of the last message when it is a `role: "tool"` result.
    pub(super) tool_result: Option<String>,
}

fn parse_tools(body: &Value) -> Result<Vec<Tool>, String> {
    let tools = match body.get("tools") {
        None | Some(Value::Null) => return Ok(Vec::new()),
        Some(Value::Array(tools)) => tools,
        Some(_) => return Err("`tools` must be an array".to_owned()),
    };
    tools
        .iter()
        .enumerate()
        .map(|(i, tool)| {
            let name = tool
                .pointer("/function/name")
                .and_then(Value::as_str)
                .filter(|n| !n.is_empty())
                .ok_or_else(|| format!("`tools[{i}].function.name` must be a non-empty string"))?;
            Ok(Tool {
                name: name.to_owned(),
                parameters: tool
                    .pointer("/function/parameters")
                    .cloned()
                    .unwrap_or(Value::Null),
            })
        })
        .collect()
}

fn parse_tool_choice(body: &Value, tools: &[Tool]) -> Result<ToolChoice, String> {
    match body.get("tool_choice") {
        None | Some(Value::Null) => Ok(ToolChoice::Auto),
        Some(Value::String(s)) => match s.as_str() {
            "auto" => Ok(ToolChoice::Auto),
            "none" => Ok(ToolChoice::None),
            "required" => Ok(ToolChoice::Required),
            other => Err(format!(
                "`tool_choice` \"{other}\" is not one of none, auto, required"
            )),
        },
        Some(choice) => {
            let name = choice
                .pointer("/function/name")
                .and_then(Value::as_str)
                .ok_or("`tool_choice` must be a string or {\"type\":\"function\",\"function\":{\"name\":..}}")?;
            tools
                .iter()
                .position(|t| t.name == name)
                .map(ToolChoice::Named)
                .ok_or_else(|| format!("`tool_choice` names `{name}`, which is not in `tools`"))
        }
    }
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
    let tools = parse_tools(body)?;
    let tool_choice = parse_tool_choice(body, &tools)?;
    let tool_result = messages
        .last()
        .filter(|m| m.get("role").and_then(Value::as_str) == Some("tool"))
        .map(|m| message_text(m).into_owned());
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
        tools,
        tool_choice,
        logprobs: body
            .get("logprobs")
            .and_then(Value::as_bool)
            .unwrap_or(false),
        top_logprobs: body
            .get("top_logprobs")
            .and_then(Value::as_u64)
            .map_or(0, |n| usize::try_from(n.min(20)).unwrap_or(20)),
        tool_result,
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

    #[test]
    fn tools_and_tool_choice_are_read() {
        let base = json!({"model":"m","messages":[{"role":"user","content":"hi"}],
            "tools":[{"type":"function","function":{"name":"a"}},
                     {"type":"function","function":{"name":"b","parameters":{"type":"object"}}}]});
        let req = parse_request(&base).unwrap();
        assert_eq!(req.tools.len(), 2);
        assert_eq!(req.tools[1].parameters, json!({"type":"object"}));
        assert_eq!(req.tool_choice, ToolChoice::Auto);
        for (choice, want) in [
            (json!("none"), ToolChoice::None),
            (json!("required"), ToolChoice::Required),
            (
                json!({"type":"function","function":{"name":"b"}}),
                ToolChoice::Named(1),
            ),
        ] {
            let mut body = base.clone();
            body["tool_choice"] = choice;
            assert_eq!(parse_request(&body).unwrap().tool_choice, want);
        }
        for bad in [
            json!("sometimes"),
            json!({"type":"function","function":{"name":"zzz"}}),
            json!(3),
        ] {
            let mut body = base.clone();
            body["tool_choice"] = bad;
            assert!(parse_request(&body).is_err());
        }
        let mut body = base.clone();
        body["tools"] = json!({"a":1});
        assert!(parse_request(&body).unwrap_err().contains("tools"));
        body["tools"] = json!([{"type":"function","function":{}}]);
        assert!(parse_request(&body).unwrap_err().contains("tools[0]"));
    }

    #[test]
    fn a_trailing_tool_message_is_a_tool_result() {
        let body = json!({"model":"m","messages":[
            {"role":"user","content":"weather?"},
            {"role":"assistant","content":null,"tool_calls":[{"id":"c","type":"function",
                "function":{"name":"w","arguments":"{}"}}]},
            {"role":"tool","tool_call_id":"c","content":"sunny, 21 C"}]});
        let req = parse_request(&body).unwrap();
        assert_eq!(req.tool_result.as_deref(), Some("sunny, 21 C"));
        assert_eq!(req.prompt, "weather?");
    }
}
