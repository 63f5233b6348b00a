//! Directives: `key=value` pairs from the `x-mock` header and from `[[mock ...]]` blocks in
//! the last user message.

const MAX_CHUNKS: u64 = 1_000_000;
/// Upper bound for every `*_ms` directive: long enough for any test, short
/// enough that a typo cannot park a connection for days.
const MAX_MS: u64 = 3_600_000;
const MAX_CHUNK_BYTES: u64 = 1 << 20;
const MAX_FAIL_TIMES: u64 = 1_000_000;
const MAX_TOOL_CALLS: u64 = 16;
const MAX_REASONING: u64 = 100_000;
const MAX_CACHED: u64 = 1_000_000_000;
const BLOCK_OPEN: &str = "[[mock";
const BLOCK_CLOSE: &str = "]]";

/// Per-request directives; `None` means "not given" so that header and
/// message directives can be merged key by key.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Directives {
    pub chunks: Option<usize>,
    pub delay_ms: Option<u64>,
    pub chunk_bytes: Option<usize>,
    pub fail: Option<u16>,
    pub fail_times: Option<u32>,
    pub retry_after_ms: Option<u64>,
    pub key: Option<String>,
    pub cut: Option<usize>,
    pub stall_ms: Option<u64>,
    pub finish: Option<String>,
    /// Number of tool calls the answer makes (1..=16).
    pub tools: Option<usize>,
    /// Number of reasoning chunks before the content.
    pub reasoning: Option<usize>,
    /// The delta field reasoning travels in.
    pub reasoning_field: Option<ReasoningField>,
    /// The answer is a refusal.
    pub refusal: Option<bool>,
    /// Cached prompt tokens to report in the usage.
    pub cached: Option<u64>,
    /// `error.code` of an injected error (HTTP `fail` or in-stream `error_event`).
    pub fail_code: Option<String>,
    /// `error.type` of an injected error.
    pub fail_type: Option<String>,
    /// `error.param` of an injected error.
    pub fail_param: Option<String>,
    /// Parts after which the stream carries an SSE `error` event and ends.
    pub error_event: Option<usize>,
    /// `system_fingerprint` of every chunk and of the JSON answer.
    pub fingerprint: Option<String>,
}

/// Where reasoning text goes: OpenAI-compatible servers disagree (DeepSeek and vLLM say
/// `reasoning_content`, OpenRouter and Ollama say `reasoning`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum ReasoningField {
    #[default]
    ReasoningContent,
    Reasoning,
}

impl ReasoningField {
    pub fn name(self) -> &'static str {
        match self {
            ReasoningField::ReasoningContent => "reasoning_content",
            ReasoningField::Reasoning => "reasoning",
        }
    }
}

impl Directives {
    /// Combinations that make no answer; checked again after header and message merge.
    pub fn check(&self) -> Result<(), String> {
        if self.refusal == Some(true) && self.tools.is_some() {
            return Err("mock directives refusal=1 and tools=N exclude each other".to_owned());
        }
        Ok(())
    }

    /// Every key given in `self` wins over the same key in `base`.
    pub fn overriding(self, base: Directives) -> Directives {
        Directives {
            chunks: self.chunks.or(base.chunks),
            delay_ms: self.delay_ms.or(base.delay_ms),
            chunk_bytes: self.chunk_bytes.or(base.chunk_bytes),
            fail: self.fail.or(base.fail),
            fail_times: self.fail_times.or(base.fail_times),
            retry_after_ms: self.retry_after_ms.or(base.retry_after_ms),
            key: self.key.or(base.key),
            cut: self.cut.or(base.cut),
            stall_ms: self.stall_ms.or(base.stall_ms),
            finish: self.finish.or(base.finish),
            tools: self.tools.or(base.tools),
            reasoning: self.reasoning.or(base.reasoning),
            reasoning_field: self.reasoning_field.or(base.reasoning_field),
            refusal: self.refusal.or(base.refusal),
            cached: self.cached.or(base.cached),
            fail_code: self.fail_code.or(base.fail_code),
            fail_type: self.fail_type.or(base.fail_type),
            fail_param: self.fail_param.or(base.fail_param),
            error_event: self.error_event.or(base.error_event),
            fingerprint: self.fingerprint.or(base.fingerprint),
        }
    }
}

/// Parses `key=value` pairs separated by whitespace or commas; a later
/// duplicate key wins.
pub fn parse_directives(s: &str) -> Result<Directives, String> {
    let mut d = Directives::default();
    let tokens = s
        .split(|c: char| c.is_whitespace() || c == ',')
        .filter(|t| !t.is_empty());
    for token in tokens {
        let Some((key, value)) = token.split_once('=') else {
            return Err(format!(
                "mock directive `{token}` is not of the form key=value"
            ));
        };
        match key {
            "chunks" => d.chunks = Some(to_usize(number(key, value, 0, MAX_CHUNKS)?)),
            "delay_ms" => d.delay_ms = Some(number(key, value, 0, MAX_MS)?),
            "chunk_bytes" => {
                d.chunk_bytes = Some(to_usize(number(key, value, 0, MAX_CHUNK_BYTES)?));
            }
            "fail" => d.fail = Some(number(key, value, 400, 599)? as u16),
            "fail_times" => d.fail_times = Some(number(key, value, 0, MAX_FAIL_TIMES)? as u32),
            "retry_after_ms" => d.retry_after_ms = Some(number(key, value, 0, MAX_MS)?),
            "key" => d.key = Some(non_empty(key, value)?),
            "cut" => d.cut = Some(to_usize(number(key, value, 0, MAX_CHUNKS)?)),
            "stall_ms" => d.stall_ms = Some(number(key, value, 0, MAX_MS)?),
            "finish" => d.finish = Some(non_empty(key, value)?),
            "tools" => d.tools = Some(to_usize(number(key, value, 1, MAX_TOOL_CALLS)?)),
            "reasoning" => d.reasoning = Some(to_usize(number(key, value, 0, MAX_REASONING)?)),
            "reasoning_field" => {
                d.reasoning_field = Some(match value {
                    "reasoning_content" => ReasoningField::ReasoningContent,
                    "reasoning" => ReasoningField::Reasoning,
                    _ => {
                        return Err(format!(
                            "mock directive {key}={value}: expected reasoning_content or reasoning"
                        ))
                    }
                });
            }
            "refusal" => d.refusal = Some(number(key, value, 0, 1)? == 1),
            "cached" => d.cached = Some(number(key, value, 0, MAX_CACHED)?),
            "fail_code" => d.fail_code = Some(non_empty(key, value)?),
            "fail_type" => d.fail_type = Some(non_empty(key, value)?),
            "fail_param" => d.fail_param = Some(non_empty(key, value)?),
            "error_event" => d.error_event = Some(to_usize(number(key, value, 0, MAX_CHUNKS)?)),
            "fingerprint" => d.fingerprint = Some(non_empty(key, value)?),
            _ => {
                return Err(format!(
                    "unknown mock directive `{key}` (known: chunks, delay_ms, chunk_bytes, fail, \
                     fail_times, retry_after_ms, key, cut, stall_ms, finish, tools, reasoning, \
                     reasoning_field, refusal, cached, fail_code, fail_type, fail_param, \
                     error_event, fingerprint)"
                ))
            }
        }
    }
    d.check()?;
    Ok(d)
}

fn number(key: &str, value: &str, min: u64, max: u64) -> Result<u64, String> {
    value
        .parse::<u64>()
        .ok()
        .filter(|n| (min..=max).contains(n))
        .ok_or_else(|| {
            format!("mock directive {key}={value}: expected an integer in {min}..={max}")
        })
}

fn non_empty(key: &str, value: &str) -> Result<String, String> {
    if value.is_empty() {
        Err(format!("mock directive {key}= needs a value"))
    } else {
        Ok(value.to_owned())
    }
}

fn to_usize(n: u64) -> usize {
    // Only reachable on targets narrower than the directive limits.
    usize::try_from(n).unwrap_or(usize::MAX)
}

/// Removes every `[[mock ...]]` block from `text`, returning the remaining text
/// and the blocks' insides in order. The block is cut out verbatim, nothing
/// replaces it: the JavaScript re-implementation of the prompt hash relies on it.
pub(super) fn extract_blocks(text: &str) -> Result<(String, Vec<&str>), String> {
    let mut rest = String::with_capacity(text.len());
    let mut blocks = Vec::new();
    let mut pos = 0;
    let mut search_from = 0;
    while let Some(found) = text[search_from..].find(BLOCK_OPEN) {
        let open = search_from + found;
        let inner_start = open + BLOCK_OPEN.len();
        let after = &text[inner_start..];
        // `[[mockingbird]]` is prose, not a block.
        if !(after.starts_with(char::is_whitespace) || after.starts_with(BLOCK_CLOSE)) {
            search_from = inner_start;
            continue;
        }
        let Some(close) = after.find(BLOCK_CLOSE) else {
            return Err("unterminated [[mock ...]] block in the last user message".to_owned());
        };
        rest.push_str(&text[pos..open]);
        blocks.push(&after[..close]);
        pos = inner_start + close + BLOCK_CLOSE.len();
        search_from = pos;
    }
    rest.push_str(&text[pos..]);
    Ok((rest, blocks))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_directive() {
        let d = parse_directives(
            "chunks=5 delay_ms=10 chunk_bytes=64 fail=429 fail_times=2 retry_after_ms=1500 \
             key=abc cut=3 stall_ms=7 finish=content_filter",
        )
        .unwrap();
        assert_eq!(
            d,
            Directives {
                chunks: Some(5),
                delay_ms: Some(10),
                chunk_bytes: Some(64),
                fail: Some(429),
                fail_times: Some(2),
                retry_after_ms: Some(1500),
                key: Some("abc".into()),
                cut: Some(3),
                stall_ms: Some(7),
                finish: Some("content_filter".into()),
                ..Directives::default()
            }
        );
        let d = parse_directives(
            "tools=3 reasoning=100000 reasoning_field=reasoning refusal=0 cached=8 \
             fail_code=context_length_exceeded fail_type=invalid_request_error \
             fail_param=messages error_event=2 fingerprint=fp_1",
        )
        .unwrap();
        assert_eq!(
            d,
            Directives {
                tools: Some(3),
                reasoning: Some(100_000),
                reasoning_field: Some(ReasoningField::Reasoning),
                refusal: Some(false),
                cached: Some(8),
                fail_code: Some("context_length_exceeded".into()),
                fail_type: Some("invalid_request_error".into()),
                fail_param: Some("messages".into()),
                error_event: Some(2),
                fingerprint: Some("fp_1".into()),
                ..Directives::default()
            }
        );
        assert_eq!(
            parse_directives("reasoning_field=reasoning_content")
                .unwrap()
                .reasoning_field,
            Some(ReasoningField::ReasoningContent)
        );
    }

    #[test]
    fn parse_accepts_empty_commas_and_duplicates() {
        assert_eq!(parse_directives("").unwrap(), Directives::default());
        assert_eq!(parse_directives("  \t ").unwrap(), Directives::default());
        let d = parse_directives("chunks=1, chunks=2,delay_ms=0").unwrap();
        assert_eq!(d.chunks, Some(2));
        assert_eq!(d.delay_ms, Some(0));
        assert_eq!(
            parse_directives("chunks=1000000").unwrap().chunks,
            Some(1_000_000)
        );
    }

    #[test]
    fn parse_rejects_bad_input() {
        for bad in [
            "chunks",
            "chunks=",
            "chunks=-1",
            "chunks=abc",
            "chunks=1000001",
            "fail=200",
            "fail=600",
            "bogus=1",
            "key=",
            "finish=",
            "delay_ms=1.5",
            "tools=0",
            "tools=17",
            "reasoning=100001",
            "reasoning_field=thoughts",
            "refusal=2",
            "fail_code=",
            "error_event=x",
            "refusal=1 tools=1",
        ] {
            let err = parse_directives(bad).unwrap_err();
            assert!(err.contains("mock directive"), "{bad}: {err}");
        }
        assert!(parse_directives("bogus=1").unwrap_err().contains("unknown"));
        assert!(parse_directives("chunks=abc")
            .unwrap_err()
            .contains("chunks"));
    }

    #[test]
    fn header_directives_override_message_directives() {
        let header = parse_directives("chunks=3").unwrap();
        let message = parse_directives("chunks=9 delay_ms=4").unwrap();
        let merged = header.overriding(message);
        assert_eq!(merged.chunks, Some(3));
        assert_eq!(merged.delay_ms, Some(4));
    }

    #[test]
    fn blocks_are_removed_verbatim() {
        let (rest, blocks) = extract_blocks("hi [[mock chunks=3]] there [[mock cut=1]]").unwrap();
        assert_eq!(rest, "hi  there ");
        assert_eq!(blocks, vec![" chunks=3", " cut=1"]);
        let (rest, blocks) = extract_blocks("[[mock]]x").unwrap();
        assert_eq!((rest.as_str(), blocks), ("x", vec![""]));
        let (rest, blocks) = extract_blocks("a [[mockingbird]] b").unwrap();
        assert_eq!(rest, "a [[mockingbird]] b");
        assert!(blocks.is_empty());
        assert!(extract_blocks("x [[mock chunks=3").is_err());
    }
}
