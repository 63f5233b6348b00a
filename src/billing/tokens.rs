//! Token counts, for a stream whose upstream sends no `usage` and for the reservation made
//! before the upstream call: a real BPE tokenizer (`tiktoken-rs`), its rank files compiled into
//! the binary, run off the async workers in a bounded pool and warmed up at start.
//!
//! OpenAI's models get their own encoding; every other model is counted with `cl100k_base`, an
//! estimate (Claude, Gemini and DeepSeek tokenizers differ by some percent), which is why a
//! counted figure is always labelled `estimated` in the metrics.

use std::collections::HashSet;
use std::fmt;
use std::sync::LazyLock;
use std::time::Duration;

use serde_json::Value;
use tiktoken_rs::CoreBPE;

/// The BPE encoding used to count a model's tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Encoding {
    /// GPT-3.5, GPT-4 and, as an estimate, every model not known to use `o200k_base`.
    Cl100kBase,
    /// GPT-4o, GPT-4.1, GPT-4.5, GPT-5, the o-series and gpt-oss.
    O200kBase,
}

/// Model name prefixes counted with `o200k_base`, as in OpenAI's `tiktoken` model table. A
/// prefix matches the whole name or a name continuing with a non-alphanumeric character, so
/// `gpt-4o-mini` and `o3-2025-04-16` match but `o1x` does not.
const O200K_PREFIXES: [&str; 10] = [
    "gpt-4o",
    "chatgpt-4o",
    "gpt-4.1",
    "gpt-4.5",
    "gpt-5",
    "o1",
    "o3",
    "o4",
    "gpt-oss",
    "codex-mini",
];

/// Framing tokens around each message (`<|start|>{role}<|message|>…<|end|>`), per OpenAI's
/// counting rule for current chat models.
const TOKENS_PER_MESSAGE: u64 = 3;
/// A `name` field costs one token beyond its text.
const TOKENS_PER_NAME: u64 = 1;
/// Every reply is primed with `<|start|>assistant<|message|>`.
const REPLY_PRIMING: u64 = 3;

/// When the pre-tokenizer's backtracking gives up on pathological input (a huge run of
/// whitespace, say), the text is counted in slices of this size instead.
const SLICE_BYTES: usize = 16 * 1024;

static CL100K: LazyLock<Option<CoreBPE>> =
    LazyLock::new(|| load("cl100k_base", tiktoken_rs::cl100k_base));
static O200K: LazyLock<Option<CoreBPE>> =
    LazyLock::new(|| load("o200k_base", tiktoken_rs::o200k_base));

fn load<E: fmt::Display>(name: &str, build: fn() -> Result<CoreBPE, E>) -> Option<CoreBPE> {
    match build() {
        Ok(bpe) => Some(bpe),
        Err(err) => {
            // The ranks are compiled in, so this means a broken build; counting falls back to
            // the other encoding, and a broken build is caught by the unit tests.
            tracing::error!(encoding = name, error = %err, "tokenizer failed to load");
            None
        }
    }
}

/// Tokenizer calls running at once, process-wide: at most half the CPUs (at least one), so
/// counting hostile prompts can never take every core from the streams being relayed.
static COUNTING: LazyLock<tokio::sync::Semaphore> = LazyLock::new(|| {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    tokio::sync::Semaphore::new((cpus / 2).max(1))
});

/// Runs `count` (a tokenizer call) over what `input` copies out, on a blocking thread, once
/// one of the process's few counting permits is free; `None` if the blocking task failed.
/// Never tokenize on an async worker thread: a megabyte of adversarial text costs ~0.6 CPU-s
/// and would stall every connection that worker serves. `input` runs only once the permit is
/// held, so the permits bound both the CPU and the memory (the copies of the text) counting
/// takes at once; callers wait in line, first come first served. Returns what `count` returned
/// and the time it ran.
pub async fn count_off_runtime<A, T>(
    input: impl FnOnce() -> A,
    count: impl FnOnce(A) -> T + Send + 'static,
) -> Option<(T, Duration)>
where
    A: Send + 'static,
    T: Send + 'static,
{
    let _permit = COUNTING.acquire().await.ok()?;
    let input = input();
    tokio::task::spawn_blocking(move || {
        let started = std::time::Instant::now();
        let out = count(input);
        (out, started.elapsed())
    })
    .await
    .ok()
}

/// Bytes of every string in `messages`: what [`count_prompt_tokens`] runs the tokenizer over,
/// near enough (it also counts the JSON of unusual structures).
pub fn prompt_text_bytes(messages: &[Value]) -> usize {
    fn walk(v: &Value) -> usize {
        match v {
            Value::String(s) => s.len(),
            Value::Array(items) => items.iter().map(walk).sum(),
            Value::Object(fields) => fields.values().map(walk).sum(),
            _ => 0,
        }
    }
    messages.iter().map(walk).sum()
}

/// Builds both encoders now rather than on the first stream that needs one. Takes a few hundred
/// milliseconds of CPU: call it from `tokio::task::spawn_blocking` at startup.
pub fn warm_up() {
    LazyLock::force(&CL100K);
    LazyLock::force(&O200K);
}

/// The encoding [`count_tokens`] uses for `model`. A provider prefix (`openai/gpt-4o`) is
/// ignored and case does not matter.
pub fn encoding_for_model(model: &str) -> Encoding {
    let name = model.rsplit('/').next().unwrap_or(model).as_bytes();
    let is_o200k = O200K_PREFIXES.iter().any(|prefix| {
        let prefix = prefix.as_bytes();
        name.len() >= prefix.len()
            && name[..prefix.len()].eq_ignore_ascii_case(prefix)
            && name
                .get(prefix.len())
                .is_none_or(|next| !next.is_ascii_alphanumeric())
    });
    if is_o200k {
        Encoding::O200kBase
    } else {
        Encoding::Cl100kBase
    }
}

fn encoder(encoding: Encoding) -> Option<&'static CoreBPE> {
    let (wanted, other) = match encoding {
        Encoding::Cl100kBase => (&CL100K, &O200K),
        Encoding::O200kBase => (&O200K, &CL100K),
    };
    wanted.as_ref().or(other.as_ref())
}

/// Tokens in `text` as `model`'s tokenizer would count them (see `encoding_for_model`; for
/// non-OpenAI models an estimate). Special-token markers such as `<|endoftext|>` in the text
/// are counted as the plain text they are, as the API does for message content.
///
/// Cost, measured in release builds: 25–45 ms per MiB of prose, up to 0.6 s per MiB of
/// adversarial text (a long run of one character). Call it through `count_off_runtime`, never
/// on an async worker thread. Count a
/// completion once at the end, not chunk by chunk: that would also miscount the tokens that
/// span chunk boundaries.
pub fn count_tokens(model: &str, text: &str) -> u64 {
    count_with(encoder(encoding_for_model(model)), text)
}

fn count_with(bpe: Option<&CoreBPE>, text: &str) -> u64 {
    if text.is_empty() {
        return 0;
    }
    let Some(bpe) = bpe else {
        // Both encoders failed to load (see `load`). Byte-level BPE never makes more tokens than
        // bytes, so this bounds the count from above instead of guessing it.
        return text.len() as u64;
    };
    match encode_len(bpe, text) {
        Some(n) => n,
        None => count_in_slices(bpe, text),
    }
}

fn encode_len(bpe: &CoreBPE, text: &str) -> Option<u64> {
    // `encode` reports a regex failure where `encode_ordinary` panics on it; with no special
    // token allowed, both encode exactly the same tokens.
    bpe.encode(text, &HashSet::new())
        .ok()
        .map(|(tokens, _)| tokens.len() as u64)
}

/// Counts `text` in slices of at most [`SLICE_BYTES`], cut at character boundaries. Only the
/// tokens spanning a cut are miscounted (by one or two each), which is close enough for input
/// that defeats the tokenizer as a whole.
fn count_in_slices(bpe: &CoreBPE, text: &str) -> u64 {
    let mut total = 0;
    let mut rest = text;
    while !rest.is_empty() {
        let mut cut = rest.len().min(SLICE_BYTES);
        while !rest.is_char_boundary(cut) {
            cut -= 1;
        }
        let (slice, tail) = rest.split_at(cut);
        total += encode_len(bpe, slice).unwrap_or(slice.len() as u64);
        rest = tail;
    }
    total
}

/// Prompt tokens of a chat completion request's `messages`, by OpenAI's counting rule: 3
/// framing tokens per message, the tokens of each of its string fields (role, content, name,
/// tool call id…), 1 more for a `name`, and 3 priming the reply. Content given as parts counts
/// its text parts; images, audio and files are not text and count 0. Tool calls count their
/// function name and arguments. An estimate for non-OpenAI models, and as costly per byte, as
/// [`count_tokens`] is.
pub fn count_prompt_tokens(model: &str, messages: &[Value]) -> u64 {
    let bpe = encoder(encoding_for_model(model));
    let count = |s: &str| count_with(bpe, s);
    let mut total = REPLY_PRIMING;
    for message in messages {
        total += TOKENS_PER_MESSAGE;
        let Some(fields) = message.as_object() else {
            total += count(&message.to_string());
            continue;
        };
        for (key, value) in fields {
            total += match (key.as_str(), value) {
                (_, Value::String(s)) => count(s),
                ("content", Value::Array(parts)) => parts
                    .iter()
                    .map(|part| {
                        ["text", "refusal"]
                            .iter()
                            .filter_map(|k| part.get(k).and_then(Value::as_str))
                            .map(count)
                            .sum::<u64>()
                    })
                    .sum(),
                ("tool_calls", Value::Array(calls)) => calls
                    .iter()
                    .map(|call| function_tokens(call.get("function"), &count))
                    .sum(),
                ("function_call", call) => function_tokens(Some(call), &count),
                (_, Value::Null | Value::Bool(_) | Value::Number(_)) => 0,
                // Any other structure reaches the model as text of some form: its JSON is the
                // closest stand-in.
                (_, other) => count(&other.to_string()),
            };
            if key == "name" {
                total += TOKENS_PER_NAME;
            }
        }
    }
    total
}

/// Prompt tokens of a request's tool definitions (`params.tools`). The model reads them as
/// text the provider renders from their schemas (OpenAI's is not published); their compact
/// JSON is the closest stand-in, and errs high rather than letting tools go uncounted.
pub fn count_tools_tokens(model: &str, tools: &Value) -> u64 {
    match tools {
        Value::Null => 0,
        Value::Array(items) if items.is_empty() => 0,
        tools => count_tokens(model, &tools.to_string()),
    }
}

fn function_tokens(function: Option<&Value>, count: &impl Fn(&str) -> u64) -> u64 {
    let Some(function) = function else {
        return 0;
    };
    ["name", "arguments"]
        .iter()
        .filter_map(|k| function.get(k).and_then(Value::as_str))
        .map(count)
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn tool_definitions_count() {
        let tools = json!([{"type":"function","function":{"name":"get_weather",
            "parameters":{"type":"object","properties":{"city":{"type":"string"}}}}}]);
        let n = count_tools_tokens("gpt-4o", &tools);
        assert_eq!(n, count_tokens("gpt-4o", &tools.to_string()));
        assert!(n > 10, "{n}");
        assert_eq!(count_tools_tokens("gpt-4o", &json!([])), 0);
        assert_eq!(count_tools_tokens("gpt-4o", &Value::Null), 0);
    }

    #[test]
    fn known_token_counts() {
        // Published counts: tiktoken's README and the tiktoken-rs test vectors.
        for model in ["gpt-4", "gpt-4o", "deepseek-v3.2"] {
            assert_eq!(count_tokens(model, "hello world"), 2, "{model}");
            assert_eq!(count_tokens(model, "tiktoken is great!"), 6, "{model}");
            assert_eq!(
                count_tokens(model, "This is a test         with a lot of spaces"),
                10,
                "{model}"
            );
            assert_eq!(count_tokens(model, ""), 0);
        }
    }

    #[test]
    fn encodings_differ_where_they_should() {
        // "ひらがなカタカナ漢字" is one of the round-trip vectors; o200k's larger vocabulary
        // needs fewer tokens for Japanese than cl100k's.
        let text = "ひらがなカタカナ漢字";
        assert!(count_tokens("gpt-4o", text) < count_tokens("gpt-4", text));
    }

    #[test]
    fn encoding_by_model() {
        use Encoding::*;
        for (model, want) in [
            ("gpt-4.1", O200kBase),
            ("gpt-4.1-mini", O200kBase),
            ("gpt-4o", O200kBase),
            ("gpt-4o-2024-08-06", O200kBase),
            ("GPT-4o-mini", O200kBase),
            ("openai/gpt-4o", O200kBase),
            ("chatgpt-4o-latest", O200kBase),
            ("gpt-5", O200kBase),
            ("gpt-5.1", O200kBase),
            ("o1", O200kBase),
            ("o3-mini", O200kBase),
            ("o4-mini-2025-04-16", O200kBase),
            ("gpt-oss-120b", O200kBase),
            ("gpt-4", Cl100kBase),
            ("gpt-4-turbo", Cl100kBase),
            ("gpt-3.5-turbo", Cl100kBase),
            ("claude-sonnet-4.5", Cl100kBase),
            ("gemini-2.5-flash", Cl100kBase),
            ("deepseek-v3.2", Cl100kBase),
            ("o1x", Cl100kBase),
            ("", Cl100kBase),
        ] {
            assert_eq!(encoding_for_model(model), want, "{model}");
        }
    }

    /// The OpenAI cookbook's "How to count tokens with tiktoken" example, whose counts the API
    /// itself confirmed: 129 prompt tokens for gpt-4 (cl100k_base), 124 for gpt-4o (o200k_base).
    fn cookbook_messages() -> Vec<Value> {
        vec![
            json!({"role": "system", "content": "You are a helpful, pattern-following assistant that translates corporate jargon into plain English."}),
            json!({"role": "system", "name": "example_user", "content": "New synergies will help drive top-line growth."}),
            json!({"role": "system", "name": "example_assistant", "content": "Things working well together will increase revenue."}),
            json!({"role": "system", "name": "example_user", "content": "Let's circle back when we have more bandwidth to touch base on opportunities for increased leverage."}),
            json!({"role": "system", "name": "example_assistant", "content": "Let's talk later when we're less busy about how to do better."}),
            json!({"role": "user", "content": "This late pivot means we don't have time to boil the ocean for the client deliverable."}),
        ]
    }

    #[test]
    fn prompt_tokens_match_the_api() {
        assert_eq!(count_prompt_tokens("gpt-4", &cookbook_messages()), 129);
        assert_eq!(
            count_prompt_tokens("gpt-3.5-turbo", &cookbook_messages()),
            129
        );
        assert_eq!(count_prompt_tokens("gpt-4o", &cookbook_messages()), 124);
        assert_eq!(count_prompt_tokens("gpt-4o", &[]), REPLY_PRIMING);
    }

    #[test]
    fn prompt_parts_and_tool_calls() {
        let plain = [json!({"role": "user", "content": "hello world"})];
        // 3 per message + "user" (1) + "hello world" (2) + 3 priming.
        assert_eq!(count_prompt_tokens("gpt-4", &plain), 9);
        let parts = [json!({"role": "user", "content": [
            {"type": "text", "text": "hello world"},
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}
        ]})];
        assert_eq!(count_prompt_tokens("gpt-4", &parts), 9);

        let call = [json!({"role": "assistant", "content": null, "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "hello", "arguments": "world"}}
        ]})];
        let expected = TOKENS_PER_MESSAGE
            + count_tokens("gpt-4", "assistant")
            + count_tokens("gpt-4", "hello")
            + count_tokens("gpt-4", "world")
            + REPLY_PRIMING;
        assert_eq!(count_prompt_tokens("gpt-4", &call), expected);
    }

    #[test]
    fn special_token_text_is_plain_text() {
        let n = count_tokens("gpt-4", "<|endoftext|>");
        assert!(n > 1, "{n}");
    }

    #[test]
    fn pathological_input_does_not_panic() {
        // A 1 MiB run of spaces is the known input on which the pre-tokenizer's backtracking
        // gives up (where `encode_ordinary` would panic); it is counted in slices instead.
        let text = " ".repeat(1 << 20) + "x";
        let bpe = encoder(Encoding::Cl100kBase).expect("loaded");
        assert_eq!(encode_len(bpe, &text), None);
        let n = count_tokens("gpt-4", &text);
        assert!(n > 0 && n <= text.len() as u64, "{n}");
    }

    #[test]
    fn slices_cut_at_char_boundaries() {
        let bpe = encoder(Encoding::O200kBase).expect("loaded");
        let text = "漢字".repeat(SLICE_BYTES);
        let n = count_in_slices(bpe, &text);
        assert!(n > 0 && n <= text.len() as u64);
    }

    #[test]
    fn both_encoders_load_from_the_crate() {
        warm_up();
        assert!(CL100K.is_some());
        assert!(O200K.is_some());
    }
}
