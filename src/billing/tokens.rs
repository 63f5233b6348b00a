//! Token counts, for a stream whose upstream sends no `usage` and for the reservation made
//! before the upstream call: byte-pair encoding exactly as OpenAI's `tiktoken` does it, over
//! vocabularies compiled into the binary as flat tables (`ranks`), run off the async workers in
//! a bounded pool (a short prompt excepted: counting it costs less than the trip there).
//!
//! OpenAI's models get their own encoding; every other model is counted with `cl100k_base`, an
//! estimate (Claude, Gemini and DeepSeek tokenizers differ by some percent), which is why a
//! counted figure is always labelled `estimated` in the metrics.
//!
//! Two stages, as in `tiktoken`: a pre-tokenizer splits the text into pieces (words, numbers,
//! runs of punctuation or of whitespace) with a DFA, linear in the text; then each piece is
//! merged pair by pair, lowest rank first, into tokens. The merges are the costly part, and
//! what text makes them costly is the client's choice (a megabyte-long piece of one repeated
//! character), so a prompt is merged for at most `limits.prompt_count_bytes`, in pieces of at
//! most 4 KiB, and the rest (and any longer piece) is counted at one token per byte: no token is
//! shorter than a byte, so the count stays an upper bound and never lets a prompt through under
//! its real size.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::sync::LazyLock;
use std::time::Duration;

use regex_automata::meta::Regex;
use regex_automata::{Anchored, Input};
use serde_json::Value;

use super::ranks::Ranks;

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

/// Pieces shorter than this are merged by rescanning a short vector after every merge, as
/// `tiktoken` does (cache-friendly, quadratic in the piece); longer ones with a heap, in
/// O(n log n). 100 bytes, as `tiktoken`: `examples/token_count.rs` measured 99-byte pieces at
/// half the cost through the vector as through the heap.
const SMALL_PIECE: usize = 100;

/// In a bounded count ([`count_prompt`]), a piece longer than this counts a token per byte,
/// unmerged: merging one long piece costs far more per byte than prose (a megabyte of one
/// repeated character, 0.3–0.8 CPU-s), and honest text has few pieces this long.
const MAX_BOUNDED_PIECE: usize = 4096;

static CL100K_RANKS: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/cl100k_base.ranks"));
static O200K_RANKS: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/o200k_base.ranks"));

/// `tiktoken`'s split patterns, with its one look-ahead, `\s+(?!\S)`, rewritten for a DFA
/// (which has no look-around) as in GitHub's `bpe-openai`: `\s+$` joins the first pattern, and
/// `\s+\s` is a pattern of its own whose last character is given back after a match. Patterns
/// are tried in order at the same start, so the split is the one `tiktoken` makes.
const CL100K_SPLIT: [&str; 3] = [
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+$",
    r"\s+\s",
    r"\s+",
];
const O200K_SPLIT: [&str; 3] = [
    concat!(
        r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
        r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
        r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+$",
    ),
    r"\s+\s",
    r"\s+",
];
/// Which of the split patterns ends in a look-ahead character (the second).
const LOOKAHEAD: [bool; 3] = [false, true, false];

/// One encoding: its vocabulary and its pre-tokenizer.
struct Tokenizer {
    ranks: Ranks<'static>,
    split: Regex,
}

static CL100K: LazyLock<Option<Tokenizer>> =
    LazyLock::new(|| load("cl100k_base", CL100K_RANKS, &CL100K_SPLIT));
static O200K: LazyLock<Option<Tokenizer>> =
    LazyLock::new(|| load("o200k_base", O200K_RANKS, &O200K_SPLIT));

fn load(name: &str, table: &'static [u8], split: &[&str]) -> Option<Tokenizer> {
    // Both are compiled in, so a failure here means a broken build: counting falls back to the
    // other encoding (or to bytes, an upper bound), and a broken build fails the unit tests.
    let Some(ranks) = Ranks::parse(table) else {
        tracing::error!(encoding = name, "tokenizer table is not readable");
        return None;
    };
    match Regex::new_many(split) {
        Ok(split) => Some(Tokenizer { ranks, split }),
        Err(err) => {
            tracing::error!(encoding = name, error = %err, "tokenizer split pattern failed to build");
            None
        }
    }
}

impl Tokenizer {
    /// The pieces of `text`, as `(start, end)` byte offsets, in order and covering it whole.
    fn pieces<'t>(&'t self, text: &'t str) -> impl Iterator<Item = (usize, usize)> + 't {
        let mut at = 0;
        std::iter::from_fn(move || {
            let found = self
                .split
                .find(Input::new(text).range(at..).anchored(Anchored::Yes))?;
            let start = at;
            let mut end = found.end();
            if LOOKAHEAD[found.pattern().as_usize()] {
                // `\s+\s` matches at least two characters; the last is the look-ahead.
                let last = text[start..end]
                    .chars()
                    .next_back()
                    .map_or(1, char::len_utf8);
                end -= last;
            }
            at = end;
            Some((start, end))
        })
    }

    /// Tokens `piece` merges into.
    fn merge(&self, piece: &[u8], scratch: &mut Vec<(usize, u32)>) -> u64 {
        if piece.len() <= 1 || self.ranks.get(piece).is_some() {
            return piece.len().min(1) as u64;
        }
        if piece.len() < SMALL_PIECE {
            merge_small(&self.ranks, piece, scratch)
        } else {
            merge_large(&self.ranks, piece)
        }
    }
}

/// `tiktoken`'s `_byte_pair_merge`, counting only: `parts[i]` is a token's start and the rank
/// of the pair starting there; the lowest rank merges first, the leftmost on a tie.
fn merge_small(ranks: &Ranks<'_>, piece: &[u8], parts: &mut Vec<(usize, u32)>) -> u64 {
    parts.clear();
    let mut min = (u32::MAX, usize::MAX);
    for i in 0..piece.len() - 1 {
        let rank = ranks.get(&piece[i..i + 2]).unwrap_or(u32::MAX);
        if rank < min.0 {
            min = (rank, i);
        }
        parts.push((i, rank));
    }
    parts.push((piece.len() - 1, u32::MAX));
    parts.push((piece.len(), u32::MAX));
    // The pair at `i` once `parts[i + 1]` is gone: from `parts[i]` to `parts[i + 3]`.
    let pair_after_merge = |parts: &[(usize, u32)], i: usize| {
        if i + 3 < parts.len() {
            ranks
                .get(&piece[parts[i].0..parts[i + 3].0])
                .unwrap_or(u32::MAX)
        } else {
            u32::MAX
        }
    };
    while min.0 != u32::MAX {
        let i = min.1;
        if i > 0 {
            parts[i - 1].1 = pair_after_merge(parts, i - 1);
        }
        parts[i].1 = pair_after_merge(parts, i);
        parts.remove(i + 1);
        min = (u32::MAX, usize::MAX);
        for (i, &(_, rank)) in parts[..parts.len() - 1].iter().enumerate() {
            if rank < min.0 {
                min = (rank, i);
            }
        }
    }
    (parts.len() - 1) as u64
}

/// `tiktoken`'s `_byte_pair_merge_large`, counting only: the same merges in the same order,
/// found with a heap of candidate pairs over a linked list of tokens.
fn merge_large(ranks: &Ranks<'_>, piece: &[u8]) -> u64 {
    /// The token starting at a byte: where it ends, the one before it, and the pair it would
    /// make with the next (its end and rank; `u32::MAX` for none or a stale one).
    struct Token {
        prev: usize,
        end: usize,
        next_end: usize,
        next_rank: u32,
    }
    let n = piece.len();
    let mut tokens: Vec<Token> = (0..n)
        .map(|i| Token {
            prev: i.wrapping_sub(1),
            end: i + 1,
            next_end: i + 2,
            next_rank: u32::MAX,
        })
        .collect();
    // Lowest rank first, then leftmost.
    let mut heap = BinaryHeap::with_capacity(n);
    for i in 0..n - 1 {
        if let Some(rank) = ranks.get(&piece[i..i + 2]) {
            heap.push(Reverse((rank, i)));
            tokens[i].next_rank = rank;
        }
    }
    let mut count = n as u64;
    while let Some(Reverse((rank, left))) = heap.pop() {
        if rank != tokens[left].next_rank {
            continue; // stale: one of its two tokens has merged since
        }
        let right = tokens[left].end;
        let right_end = tokens[left].next_end;
        let after = tokens[right].next_end;
        tokens[left].end = right_end;
        tokens[right].next_rank = u32::MAX;
        count -= 1;
        let mut candidate = |tokens: &mut Vec<Token>, start: usize, next_end: usize| {
            tokens[start].next_end = next_end;
            tokens[start].next_rank = u32::MAX;
            if next_end <= n {
                if let Some(rank) = ranks.get(&piece[start..next_end]) {
                    heap.push(Reverse((rank, start)));
                    tokens[start].next_rank = rank;
                }
            }
        };
        candidate(&mut tokens, left, after);
        if right_end < n {
            tokens[right_end].prev = left;
        }
        if left > 0 {
            let prev = tokens[left].prev;
            candidate(&mut tokens, prev, right_end);
        }
    }
    count
}

/// Counting one request's text: how much the tokenizer may still merge, and what it did.
struct Counter {
    tokenizer: Option<&'static Tokenizer>,
    /// Bytes the tokenizer may still merge; past them, text counts a token per byte.
    left: usize,
    /// Longest piece merged; a longer one counts a token per byte.
    max_piece: usize,
    /// Bytes merged into tokens.
    merged: usize,
    /// Bytes counted a token each, unread: past `left`, or with no tokenizer loaded.
    bounded: usize,
    scratch: Vec<(usize, u32)>,
}

impl Counter {
    /// A counter merging at most `max_merged` bytes; with `usize::MAX`, an exact one.
    fn new(model: &str, max_merged: usize) -> Self {
        Counter {
            tokenizer: tokenizer(encoding_for_model(model)),
            left: max_merged,
            max_piece: if max_merged == usize::MAX {
                usize::MAX
            } else {
                MAX_BOUNDED_PIECE
            },
            merged: 0,
            bounded: 0,
            scratch: Vec::new(),
        }
    }

    fn count(&mut self, text: &str) -> u64 {
        let mut tokens = 0;
        let mut read = 0;
        if let Some(tokenizer) = self.tokenizer {
            if self.left > 0 {
                for (start, end) in tokenizer.pieces(text) {
                    let len = end - start;
                    if len > self.left {
                        self.left = 0;
                        break;
                    }
                    read = end;
                    if len > self.max_piece {
                        // Byte-level BPE never makes more tokens than bytes.
                        self.bounded += len;
                        tokens += len as u64;
                        continue;
                    }
                    self.left -= len;
                    self.merged += len;
                    tokens += tokenizer.merge(&text.as_bytes()[start..end], &mut self.scratch);
                }
            }
        }
        // What is left unread: a token per byte, an upper bound as above.
        let rest = text.len() - read;
        self.bounded += rest;
        tokens + rest as u64
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
/// Never tokenize a long text on an async worker thread: even bounded, a prompt's count can take
/// milliseconds and would stall every connection that worker serves (a short prompt is the
/// exception, see [`count_small_prompt`]). `input` runs only once the permit is
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

/// Prompts with at most this many bytes of text (strings and keys of `messages` and `tools`)
/// are counted on the async worker opening the stream, by [`count_small_prompt`]. Merging this
/// much costs microseconds for ordinary text and about 0.15 ms for the costliest text measured
/// (`examples/token_count.rs`: 4 KiB pieces of punctuation, 36 ms per 255 KiB merged), the
/// order of what a blocking thread's round trip costs on a busy core anyway.
pub const SMALL_PROMPT_BYTES: usize = 1024;

/// [`count_prompt`] on the calling thread, with the time it took, for a prompt of at most
/// [`SMALL_PROMPT_BYTES`] of text; `None` for a larger one, to be counted through
/// [`count_off_runtime`]. Handing a short prompt to a blocking thread cost more than counting
/// it: the blocking thread and the worker take turns on the CPU, and the stream waits for the
/// worker's queue of ready tasks on the way back, and behind every other stream for the
/// process's counting permits. Deciding costs at most [`SMALL_PROMPT_BYTES`] steps, whatever
/// the prompt's size.
pub fn count_small_prompt(
    model: &str,
    messages: &[Value],
    tools: &Value,
    max_merged: usize,
) -> Option<(PromptCount, Duration)> {
    let mut left = SMALL_PROMPT_BYTES;
    if !messages.iter().all(|m| text_within(m, &mut left)) || !text_within(tools, &mut left) {
        return None;
    }
    let started = std::time::Instant::now();
    let count = count_prompt(model, messages, tools, max_merged);
    Some((count, started.elapsed()))
}

/// Takes the bytes of `value`'s strings and keys from `left`, and at least one per value (so
/// an array of a million `null`s is not small either); `false` once `left` runs out, without
/// walking further. serde_json's recursion limit bounds the depth.
fn text_within(value: &Value, left: &mut usize) -> bool {
    match value {
        Value::String(s) => take(left, s.len()),
        // Counted through their JSON text: a number's is at most about 24 bytes.
        Value::Number(_) | Value::Bool(_) | Value::Null => take(left, 24),
        Value::Array(items) => take(left, 1) && items.iter().all(|v| text_within(v, left)),
        Value::Object(fields) => {
            take(left, 1)
                && fields
                    .iter()
                    .all(|(k, v)| take(left, k.len()) && text_within(v, left))
        }
    }
}

/// Takes `n` from `left`; `false` (and `left` unchanged) when it has less.
fn take(left: &mut usize, n: usize) -> bool {
    match left.checked_sub(n) {
        Some(rest) => {
            *left = rest;
            true
        }
        None => false,
    }
}

/// Builds both split patterns now rather than on the first stream that needs one (a few
/// milliseconds; the vocabularies are read in place and need no building). Call it from
/// `tokio::task::spawn_blocking` at startup.
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

fn tokenizer(encoding: Encoding) -> Option<&'static Tokenizer> {
    let (wanted, other) = match encoding {
        Encoding::Cl100kBase => (&CL100K, &O200K),
        Encoding::O200kBase => (&O200K, &CL100K),
    };
    wanted.as_ref().or(other.as_ref())
}

/// Tokens in `text` as `model`'s tokenizer would count them (see `encoding_for_model`; for
/// non-OpenAI models an estimate), exactly, however long the text. Special-token markers such
/// as `<|endoftext|>` in the text are counted as the plain text they are, as the API does for
/// message content.
///
/// Cost, measured in release builds (`examples/token_count.rs`): linear in the text, up to
/// tens of milliseconds per MiB. Call it through `count_off_runtime`, never on an async worker
/// thread. Count a completion once at the end, not chunk by chunk: that would also miscount the
/// tokens that span chunk boundaries.
pub fn count_tokens(model: &str, text: &str) -> u64 {
    Counter::new(model, usize::MAX).count(text)
}

/// A request's prompt, counted for its reservation by [`count_prompt`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PromptCount {
    /// Prompt tokens: exact when `bounded` is 0, else an upper bound.
    pub tokens: u64,
    /// Bytes the tokenizer read and merged: the work the count cost.
    pub merged: usize,
    /// Bytes past the tokenizer's allowance, counted a token per byte without being read.
    pub bounded: usize,
}

/// The prompt tokens of a request's `messages` and tool definitions (`params.tools`, `Null`
/// for none), as [`count_prompt_tokens`] and [`count_tools_tokens`] count them, but merging at
/// most `max_merged` bytes of text, in pieces of at most 4 KiB (`MAX_BOUNDED_PIECE`): what lies
/// beyond, and any longer piece, counts a token per byte, so the result is exact for a prompt
/// within the allowance and an upper bound past it, and no prompt costs more than `max_merged`
/// bytes of merging short pieces.
pub fn count_prompt(
    model: &str,
    messages: &[Value],
    tools: &Value,
    max_merged: usize,
) -> PromptCount {
    let mut counter = Counter::new(model, max_merged);
    let tokens =
        prompt_tokens_with(&mut counter, messages) + tools_tokens_with(&mut counter, tools);
    PromptCount {
        tokens,
        merged: counter.merged,
        bounded: counter.bounded,
    }
}

/// Prompt tokens of a chat completion request's `messages`, by OpenAI's counting rule: 3
/// framing tokens per message, the tokens of each of its string fields (role, content, name,
/// tool call id…), 1 more for a `name`, and 3 priming the reply. Content given as parts counts
/// its text parts; images, audio and files are not text and count 0. Tool calls count their
/// function name and arguments. Exact, with no allowance (see [`count_prompt`]); an estimate
/// for non-OpenAI models.
pub fn count_prompt_tokens(model: &str, messages: &[Value]) -> u64 {
    prompt_tokens_with(&mut Counter::new(model, usize::MAX), messages)
}

fn prompt_tokens_with(counter: &mut Counter, messages: &[Value]) -> u64 {
    let mut total = REPLY_PRIMING;
    for message in messages {
        total += TOKENS_PER_MESSAGE;
        let Some(fields) = message.as_object() else {
            total += counter.count(&message.to_string());
            continue;
        };
        for (key, value) in fields {
            total += match (key.as_str(), value) {
                (_, Value::String(s)) => counter.count(s),
                ("content", Value::Array(parts)) => {
                    let mut sum = 0;
                    for part in parts {
                        for k in ["text", "refusal"] {
                            if let Some(s) = part.get(k).and_then(Value::as_str) {
                                sum += counter.count(s);
                            }
                        }
                    }
                    sum
                }
                ("tool_calls", Value::Array(calls)) => calls
                    .iter()
                    .map(|call| function_tokens(counter, call.get("function")))
                    .sum(),
                ("function_call", call) => function_tokens(counter, Some(call)),
                (_, Value::Null | Value::Bool(_) | Value::Number(_)) => 0,
                // Any other structure reaches the model as text of some form: its JSON is the
                // closest stand-in.
                (_, other) => counter.count(&other.to_string()),
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
    tools_tokens_with(&mut Counter::new(model, usize::MAX), tools)
}

fn tools_tokens_with(counter: &mut Counter, tools: &Value) -> u64 {
    match tools {
        Value::Null => 0,
        Value::Array(items) if items.is_empty() => 0,
        tools => counter.count(&tools.to_string()),
    }
}

fn function_tokens(counter: &mut Counter, function: Option<&Value>) -> u64 {
    let Some(function) = function else {
        return 0;
    };
    let mut sum = 0;
    for k in ["name", "arguments"] {
        if let Some(s) = function.get(k).and_then(Value::as_str) {
            sum += counter.count(s);
        }
    }
    sum
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
    fn pathological_input_is_counted_whole() {
        // A 1 MiB run of spaces is the input on which `tiktoken-rs`'s backtracking pre-tokenizer
        // gives up; the DFA splits it like any other: one piece of all but the last space, then
        // " x".
        let text = " ".repeat(1 << 20) + "x";
        let n = count_tokens("gpt-4", &text);
        let run = count_tokens("gpt-4", &" ".repeat((1 << 20) - 1));
        assert_eq!(n, run + count_tokens("gpt-4", " x"));
        assert!(n > 0 && n <= text.len() as u64, "{n}");
    }

    #[test]
    fn both_encoders_load_from_the_binary() {
        warm_up();
        let cl100k = CL100K.as_ref().expect("cl100k_base");
        let o200k = O200K.as_ref().expect("o200k_base");
        assert_eq!(cl100k.ranks.len(), 100_256);
        assert_eq!(o200k.ranks.len(), 199_998);
        assert_eq!(cl100k.ranks.get(b"hello"), Some(15339));
    }

    /// Text meant to reach every branch of the split patterns and of both merge loops: prose in
    /// several scripts, code, JSON, contractions in both cases, digits, whitespace of every
    /// kind at every position, long runs, and pseudo-random characters and tokens.
    fn corpus(ranks: &Ranks<'_>) -> Vec<String> {
        let mut texts: Vec<String> = [
            "Hello, world! I'm here; you'll see. THEY'RE HERE, isn'T it? We'VE 'll 's",
            "fn main() {\n    println!(\"{}\", 1 + 2);\n}\n\n\n",
            r#"{"role":"user","content":"What's the weather in Paris?","n":12345678}"#,
            "Les élèves ont été là. Ünïcödé façade — naïve “quotes” …",
            "ひらがなカタカナ漢字、中文字符，한국어 텍스트. Русский текст! العربية",
            "emoji 👍🏽👨‍👩‍👧 and combining e\u{301} a\u{308}\u{308} ZWJ\u{200d}x",
            "  leading\ttabs\t\t and trailing   ",
            "a\r\nb\r\n\r\n  \n \n\tc\u{a0}\u{a0}d\u{3000}e   \n",
            "1234567890 12 3.14159 1,000,000 ٣٤٥ ⅫⅩ",
            "   ",
            " ",
            "\n",
            "x",
            "<|endoftext|> <|fim_prefix|> <|endofprompt|>",
            "CamelCaseWordsAndALLCAPSWords mixedCASEwords ǅungla ǈ",
            "!!!???...,,,;;;::: ----- ===== ##### //// \\\\ ****",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        for (c, n) in [
            ('a', 5000),
            (' ', 3000),
            ('!', 999),
            ('1', 100),
            ('\n', 300),
            ('é', 700),
        ] {
            texts.push(std::iter::repeat_n(c, n).collect());
        }
        texts.push("ab ".repeat(2000));
        texts.push("\t \n".repeat(500));
        // A fixed-seed LCG: the same corpus every run.
        let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = move |bound: u64| {
            state = state
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            (state >> 33) % bound
        };
        let ranges: [(u32, u32); 6] = [
            (0x20, 0x7f),
            (0xa0, 0x250),
            (0x370, 0x530),
            (0x3040, 0x3100),
            (0x4e00, 0x4f00),
            (0x1f300, 0x1f650),
        ];
        for _ in 0..40 {
            let mut text = String::new();
            while text.len() < 2000 {
                let (lo, hi) = ranges[next(ranges.len() as u64) as usize];
                let c = char::from_u32(lo + next(u64::from(hi - lo)) as u32).unwrap_or(' ');
                text.push(c);
                if next(6) == 0 {
                    text.push([' ', '\n', '\t', '\''][next(4) as usize]);
                }
            }
            texts.push(text);
        }
        // Concatenated random tokens, as `bpe`'s own equivalence tests do: the merges then
        // have to find the token boundaries again.
        for _ in 0..40 {
            let mut bytes = Vec::new();
            while bytes.len() < 4000 {
                bytes.extend_from_slice(ranks.token(next(ranks.len() as u64) as u32));
            }
            texts.push(String::from_utf8_lossy(&bytes).into_owned());
        }
        texts
    }

    #[test]
    fn counts_match_tiktoken() {
        for (name, ours, reference) in [
            (
                "cl100k_base",
                CL100K.as_ref().expect("cl100k_base"),
                tiktoken_rs::cl100k_base().expect("tiktoken-rs cl100k_base"),
            ),
            (
                "o200k_base",
                O200K.as_ref().expect("o200k_base"),
                tiktoken_rs::o200k_base().expect("tiktoken-rs o200k_base"),
            ),
        ] {
            let mut counter = Counter {
                tokenizer: Some(ours),
                left: usize::MAX,
                max_piece: usize::MAX,
                merged: 0,
                bounded: 0,
                scratch: Vec::new(),
            };
            for text in corpus(&ours.ranks) {
                let want = reference.encode_ordinary(&text).len() as u64;
                assert_eq!(counter.count(&text), want, "{name}: {text:?}");
            }
            assert_eq!(counter.bounded, 0);
        }
    }

    #[test]
    fn prompt_count_is_bounded() {
        let messages = [
            json!({"role": "system", "content": "You are terse."}),
            json!({"role": "user", "content": "!".repeat(256 * 1024)}),
            json!({"role": "user", "content": "and then some prose after the flood"}),
        ];
        let tools = json!([{"type": "function", "function": {"name": "f"}}]);
        let exact = count_prompt_tokens("gpt-4o", &messages) + count_tools_tokens("gpt-4o", &tools);

        // Within the allowance: exact, and all of it read.
        let whole = count_prompt("gpt-4o", &messages, &tools, usize::MAX);
        assert_eq!(whole.tokens, exact);
        assert_eq!(whole.bounded, 0);
        assert!(whole.merged > 256 * 1024, "{whole:?}");

        // Past it: never more than the allowance merged, never fewer tokens than the exact count.
        for max_merged in [0, 1, 100, 4096, 64 * 1024] {
            let count = count_prompt("gpt-4o", &messages, &tools, max_merged);
            assert!(count.merged <= max_merged, "{max_merged}: {count:?}");
            assert!(count.bounded > 0, "{max_merged}: {count:?}");
            assert!(count.tokens >= exact, "{max_merged}: {count:?} < {exact}");
            assert!(
                count.tokens <= exact + count.bounded as u64,
                "{max_merged}: {count:?}"
            );
        }
        // Within the allowance but one piece longer than MAX_BOUNDED_PIECE: that piece counts a
        // token per byte, unmerged, and the prose after it is still merged.
        let count = count_prompt("gpt-4o", &messages, &tools, 1 << 20);
        assert_eq!(count.bounded, 256 * 1024, "{count:?}");
        assert!(count.merged < 1024, "{count:?}");
        assert!(count.tokens >= exact, "{count:?} < {exact}");
        let prose = [json!({"role": "user", "content": "one short piece after another"})];
        assert_eq!(
            count_prompt("gpt-4o", &prose, &Value::Null, 1 << 20).tokens,
            count_prompt_tokens("gpt-4o", &prose)
        );
        // The text before the flood fits a small allowance: counted exactly, not by its bytes.
        let small = count_prompt("gpt-4o", &messages[..1], &Value::Null, 100);
        assert_eq!(small.tokens, count_prompt_tokens("gpt-4o", &messages[..1]));
        assert_eq!(small.bounded, 0);
    }

    #[test]
    fn small_prompts_are_counted_in_place_and_large_ones_are_not() {
        let tools = json!([{"type": "function", "function": {"name": "get_weather",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]);
        let messages = [
            json!({"role": "system", "content": "You are terse."}),
            json!({"role": "user", "content": "What is the weather in Lyon?", "name": "ann"}),
        ];
        let (count, _took) =
            count_small_prompt("gpt-4o", &messages, &tools, 256 * 1024).expect("small");
        assert_eq!(count, count_prompt("gpt-4o", &messages, &tools, 256 * 1024));
        assert_eq!(
            count.tokens,
            count_prompt_tokens("gpt-4o", &messages) + count_tools_tokens("gpt-4o", &tools)
        );
        // The configured allowance still applies to a small prompt.
        let (count, _) = count_small_prompt("gpt-4o", &messages, &tools, 10).expect("small");
        assert_eq!(count, count_prompt("gpt-4o", &messages, &tools, 10));
        assert!(count.bounded > 0, "{count:?}");

        // Exactly at the limit and one byte past it: an object costs 1, its keys and strings
        // their bytes, `[]` 1, a literal 24.
        let empty = json!({"role": "", "content": ""});
        let base = SMALL_PROMPT_BYTES - 1 - "role".len() - "content".len() - 1;
        let at = [json!({"role": "", "content": "a".repeat(base)})];
        assert!(count_small_prompt("gpt-4o", &at, &json!([]), usize::MAX).is_some());
        assert!(count_small_prompt("gpt-4o", &at, &Value::Null, usize::MAX).is_none());
        let past = [json!({"role": "", "content": "a".repeat(base + 1)})];
        assert!(count_small_prompt("gpt-4o", &past, &json!([]), usize::MAX).is_none());
        let long_key = [json!({"role": "", "content": "", "x".repeat(SMALL_PROMPT_BYTES): 1})];
        assert!(count_small_prompt("gpt-4o", &long_key, &Value::Null, usize::MAX).is_none());
        let long_tools = json!([{"name": "f".repeat(SMALL_PROMPT_BYTES)}]);
        assert!(count_small_prompt(
            "gpt-4o",
            std::slice::from_ref(&empty),
            &long_tools,
            usize::MAX
        )
        .is_none());
        // Many values with no text are not small either.
        let nulls = [json!({"role": "user", "content": vec![Value::Null; SMALL_PROMPT_BYTES]})];
        assert!(count_small_prompt("gpt-4o", &nulls, &Value::Null, usize::MAX).is_none());
        let many = vec![empty; SMALL_PROMPT_BYTES];
        assert!(count_small_prompt("gpt-4o", &many, &Value::Null, usize::MAX).is_none());
    }
}
