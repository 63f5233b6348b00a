//! What an answer says: word mode (a deterministic function of the prompt that tests
//! re-compute) and prose mode (a short readable demo answer).

use std::fmt::Write as _;

use super::directives::extract_blocks;
use crate::protocol::push_json_string;

/// The words word mode cycles through; a JavaScript test re-implements
/// [`word_chunks`], so this list and its order are part of the contract.
pub const WORDS: [&str; 16] = [
    "alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india", "juliet",
    "kilo", "lima", "mike", "november", "oscar", "papa",
];

const ECHO_MAX_CHARS: usize = 80;

pub(super) fn prompt_hash(prompt: &str) -> usize {
    prompt
        .bytes()
        .fold(0usize, |h, b| h.wrapping_add(usize::from(b)))
}

fn push_word_chunk(out: &mut String, h: usize, k: usize, pad_to: usize) {
    let start = out.len();
    out.push_str(WORDS[h.wrapping_add(k) % WORDS.len()]);
    // Writing into a String cannot fail.
    let _ = write!(out, "{k}");
    let natural = out.len() - start + 1;
    out.extend(std::iter::repeat_n('.', pad_to.saturating_sub(natural)));
    out.push(' ');
}

/// The exact content chunks the mock sends in word mode for this prompt
/// (without `chunk_bytes`): chunk k is `WORDS[(h + k) % 16]` followed by k and
/// a space, where h is the sum of the UTF-8 bytes of the prompt after removing
/// any `[[mock ...]]` block and trimming whitespace.
pub fn word_chunks(prompt: &str, n: usize) -> Vec<String> {
    let cleaned = extract_blocks(prompt).map_or_else(|_| prompt.to_owned(), |(rest, _)| rest);
    let h = prompt_hash(cleaned.trim());
    (0..n)
        .map(|k| {
            let mut chunk = String::new();
            push_word_chunk(&mut chunk, h, k, 0);
            chunk
        })
        .collect()
}

const PROSE_CORE: [&str; 2] = [
    "This answer comes from muxgate's built-in simulated provider, so no real model or API key is involved.",
    "Every browser tab shares one WebSocket to the gateway, and each answer travels over it as its own multiplexed stream.",
];

const PROSE_EXTRA: [&str; 4] = [
    "You can ask several questions at once and watch their words arrive side by side without opening extra connections.",
    "Cancelling one question stops only that stream, while the others keep flowing over the same socket.",
    "The words arrive a few at a time, just as a real OpenAI-compatible upstream would send them.",
    "Point muxgate at a real provider in its configuration to get genuine answers instead of this demo text.",
];

/// The demo answer: an echo of the question, then 3 to 5 sentences chosen by
/// the prompt hash so that different questions get visibly different answers.
fn prose_text(prompt: &str) -> String {
    let mut text = String::new();
    let collapsed = prompt.split_whitespace().collect::<Vec<_>>().join(" ");
    if collapsed.is_empty() {
        text.push_str("You sent an empty message.");
    } else {
        let mut echo: String = collapsed.chars().take(ECHO_MAX_CHARS).collect();
        if echo.len() < collapsed.len() {
            echo.push('…');
        }
        let _ = write!(text, "You asked: “{echo}”.");
    }
    let h = prompt_hash(prompt);
    for sentence in PROSE_CORE {
        text.push(' ');
        text.push_str(sentence);
    }
    let extra = 1 + h % 3;
    for i in 0..extra {
        text.push(' ');
        text.push_str(PROSE_EXTRA[(h + i) % PROSE_EXTRA.len()]);
    }
    text
}

pub(super) fn prose_chunks(prompt: &str) -> Vec<String> {
    prose_text(prompt)
        .split_whitespace()
        .map(|w| format!("{w} "))
        .collect()
}

/// The words reasoning chunks cycle through; see [`reasoning_chunks`].
const REASONING_WORDS: [&str; 8] = [
    "Let", "me", "think", "this", "through", "step", "by", "step.",
];

/// Reasoning chunk k (ASCII, nothing to escape).
pub(super) fn push_reasoning_chunk(out: &mut String, k: usize) {
    out.push_str(REASONING_WORDS[k % REASONING_WORDS.len()]);
    out.push(' ');
}

/// The exact reasoning chunks of `reasoning=N`: chunk k is the k-th word (cycling) of
/// "Let me think this through step by step." followed by a space.
pub fn reasoning_chunks(n: usize) -> Vec<String> {
    (0..n)
        .map(|k| {
            let mut chunk = String::new();
            push_reasoning_chunk(&mut chunk, k);
            chunk
        })
        .collect()
}

/// The text of `refusal=1`, sent one word per chunk.
pub const REFUSAL_TEXT: &str = "I'm sorry, but I can't help with that request.";

fn words_of(text: &str) -> Vec<String> {
    text.split_whitespace().map(|w| format!("{w} ")).collect()
}

pub(super) fn refusal_chunks() -> Vec<String> {
    words_of(REFUSAL_TEXT)
}

/// The prose answer after a tool result: it quotes the result so that a tool loop's test
/// can see its value reached the model.
pub(super) fn tool_result_chunks(result: &str) -> Vec<String> {
    let collapsed = result.split_whitespace().collect::<Vec<_>>().join(" ");
    words_of(&format!(
        "The tool returned: “{collapsed}”. {}",
        PROSE_CORE[0]
    ))
}

/// Arguments for a call of a tool with this JSON schema: every required property gets a
/// value of its type (a string is a word of the prompt, taken from its end, where the
/// object of a question usually is; a number 1; a boolean true; an array or object empty).
pub(super) fn arguments_from_schema(parameters: &serde_json::Value, prompt: &str) -> String {
    use serde_json::{Map, Value};
    let words: Vec<&str> = prompt
        .split_whitespace()
        .rev()
        .map(|w| w.trim_matches(|c: char| !c.is_alphanumeric()))
        .filter(|w| !w.is_empty())
        .collect();
    let mut args = Map::new();
    let required = parameters
        .get("required")
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or_default();
    let mut strings = 0;
    for name in required.iter().filter_map(Value::as_str) {
        let kind = parameters
            .pointer(&format!(
                "/properties/{}",
                name.replace('~', "~0").replace('/', "~1")
            ))
            .and_then(|p| p.get("type"))
            .and_then(Value::as_str)
            .unwrap_or("string");
        let value = match kind {
            "number" | "integer" => Value::from(1),
            "boolean" => Value::Bool(true),
            "array" => Value::Array(Vec::new()),
            "object" => Value::Object(Map::new()),
            "null" => Value::Null,
            _ => {
                let word = words.get(strings).copied().unwrap_or("mock");
                strings += 1;
                Value::from(word)
            }
        };
        args.insert(name.to_owned(), value);
    }
    Value::Object(args).to_string()
}

/// Arguments split the way providers stream them: several pieces, never inside a UTF-8
/// character, at most `piece` characters each and at least two when there are two characters.
pub(super) fn split_arguments(arguments: &str, piece: usize) -> Vec<String> {
    let chars: Vec<char> = arguments.chars().collect();
    let size = piece.min(chars.len().div_ceil(2)).max(1);
    chars.chunks(size).map(|c| c.iter().collect()).collect()
}

/// The content chunks of one answer; word chunks are made as they are sent, not stored.
pub(super) enum Content {
    Words { h: usize, pad_to: usize, n: usize },
    Prose(Vec<String>),
}

impl Content {
    pub(super) fn len(&self) -> usize {
        match self {
            Content::Words { n, .. } => *n,
            Content::Prose(chunks) => chunks.len(),
        }
    }

    pub(super) fn push_json(&self, out: &mut String, k: usize) {
        match self {
            // Word chunks are ASCII letters, digits, dots and a space: nothing to escape.
            Content::Words { h, pad_to, .. } => {
                out.push('"');
                push_word_chunk(out, *h, k, *pad_to);
                out.push('"');
            }
            Content::Prose(chunks) => push_json_string(out, &chunks[k]),
        }
    }

    /// Chunk k as text (for logprobs, which name each chunk as a token).
    pub(super) fn chunk(&self, k: usize) -> String {
        match self {
            Content::Words { h, pad_to, .. } => {
                let mut chunk = String::new();
                push_word_chunk(&mut chunk, *h, k, *pad_to);
                chunk
            }
            Content::Prose(chunks) => chunks[k].clone(),
        }
    }

    pub(super) fn text(&self, limit: usize) -> String {
        match self {
            Content::Words { h, pad_to, .. } => {
                let mut text = String::new();
                for k in 0..limit {
                    push_word_chunk(&mut text, *h, k, *pad_to);
                }
                text
            }
            Content::Prose(chunks) => chunks[..limit].concat(),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn word_chunks_follow_the_documented_rule() {
        // h = 0 for the empty prompt.
        assert_eq!(word_chunks("", 3), vec!["alpha0 ", "bravo1 ", "charlie2 "]);
        // "a" = 97, 97 % 16 = 1.
        assert_eq!(word_chunks("a", 2), vec!["bravo0 ", "charlie1 "]);
        // Wraps around the word list.
        assert_eq!(word_chunks("", 18)[16..], ["alpha16 ", "bravo17 "]);
        // Trimming and block removal do not change the hash.
        assert_eq!(word_chunks("  a \n", 2), word_chunks("a", 2));
        assert_eq!(word_chunks("a [[mock chunks=2]]", 2), word_chunks("a", 2));
        // Multi-byte characters count every UTF-8 byte: "é" = 0xC3 + 0xA9 = 364, % 16 = 12.
        assert_eq!(word_chunks("é", 1), vec!["mike0 "]);
        assert!(word_chunks("x", 0).is_empty());
    }

    #[test]
    fn chunk_padding_reaches_the_requested_size() {
        let mut s = String::new();
        push_word_chunk(&mut s, 0, 0, 16);
        assert_eq!(s, "alpha0......... ");
        s.clear();
        push_word_chunk(&mut s, 0, 0, 3);
        assert_eq!(s, "alpha0 ");
    }

    #[test]
    fn prose_is_deterministic_and_readable() {
        let a = prose_text("What is muxgate?");
        assert_eq!(a, prose_text("What is muxgate?"));
        assert!(a.starts_with("You asked: “What is muxgate?”. "));
        assert!(a.contains("simulated provider"));
        assert!(a.contains("WebSocket"));
        let sentences = a.matches(". ").count() + 1;
        assert!((4..=6).contains(&sentences), "{sentences}: {a}");
        let long = "word ".repeat(50);
        assert!(prose_text(&long).contains("…”."));
        assert!(prose_text("").starts_with("You sent an empty message."));
        let chunks = prose_chunks("hi");
        assert!(chunks
            .iter()
            .all(|c| c.ends_with(' ') && !c.trim().is_empty()));
    }

    #[test]
    fn reasoning_refusal_and_tool_result_texts() {
        assert_eq!(
            reasoning_chunks(10).concat(),
            "Let me think this through step by step. Let me "
        );
        assert_eq!(refusal_chunks().concat().trim_end(), REFUSAL_TEXT);
        let quoted = tool_result_chunks("sunny,\n 21 C").concat();
        assert!(
            quoted.starts_with("The tool returned: “sunny, 21 C”. "),
            "{quoted}"
        );
    }

    #[test]
    fn arguments_follow_the_schema() {
        let schema = serde_json::json!({
            "type": "object",
            "properties": {
                "city": {"type": "string"}, "unit": {"type": "string"},
                "days": {"type": "integer"}, "exact": {"type": "boolean"},
                "tags": {"type": "array"}, "optional": {"type": "string"}
            },
            "required": ["city", "unit", "days", "exact", "tags"]
        });
        let args: serde_json::Value =
            serde_json::from_str(&arguments_from_schema(&schema, "Weather in Paris, today?"))
                .unwrap();
        assert_eq!(
            args,
            serde_json::json!({"city":"today","unit":"Paris","days":1,"exact":true,"tags":[]})
        );
        assert_eq!(arguments_from_schema(&serde_json::Value::Null, "x"), "{}");
        let args = arguments_from_schema(&schema, "");
        assert!(args.contains("\"city\":\"mock\""), "{args}");
    }

    #[test]
    fn arguments_split_into_several_pieces() {
        assert_eq!(split_arguments("{}", 8), vec!["{", "}"]);
        assert_eq!(split_arguments("", 8), Vec::<String>::new());
        let long = r#"{"city":"Zürich","days":1}"#;
        let pieces = split_arguments(long, 8);
        assert!(pieces.len() >= 3);
        assert!(pieces.iter().all(|p| p.chars().count() <= 8));
        assert_eq!(pieces.concat(), long);
    }

    #[test]
    fn json_strings_are_escaped() {
        let mut s = String::new();
        push_json_string(&mut s, "a\"b\\c\nd\u{1}é");
        assert_eq!(s, r#""a\"b\\c\nd\u0001é""#);
        let back: String = serde_json::from_str(&s).unwrap();
        assert_eq!(back, "a\"b\\c\nd\u{1}é");
    }
}
