//! The fast path of [`super::parse_chunk`]: one pass over the bytes of a chunk whose shape is
//! the common one (a text, reasoning or refusal delta, or a finish reason, in one choice),
//! borrowing its text as the full parse does. serde's derived parse costs about 4,400
//! instructions on an OpenAI text chunk, most of it walking fields muxgate never reads.
//!
//! The rule is exactness: [`chunk`] answers only when the full parse would accept the payload
//! and yield the same [`Chunk`]; for anything else it answers `None` and the full parse decides
//! (and words the error). So it gives up rather than guess: a key with an escape (it could
//! spell a known one), a known key twice (serde's derive refuses duplicates), more than one
//! choice, a non-null `usage`, `error`, `logprobs` or non-empty `tool_calls`, a value of the
//! wrong type, nesting deeper than [`MAX_DEPTH`], any syntax error. Strings with escapes are
//! decoded, and skipped ones checked, by serde_json itself on the string alone, so escapes,
//! `\u` and surrogate pairs follow its rules exactly.

use std::borrow::Cow;

use super::Chunk;
use crate::protocol::plain_run_end;

/// How deep a skipped value may nest before the full parse is left to judge it (serde_json's
/// own limit is 128).
const MAX_DEPTH: u32 = 16;

/// The chunk `data` is, when it has the common shape; `None` means "ask the full parse".
pub(super) fn chunk(data: &str) -> Option<Chunk<'_>> {
    let mut c = Cursor { s: data, i: 0 };
    let mut chunk = Chunk::default();
    let mut seen = Seen::default();
    c.ws();
    c.object(|c, key| match key {
        "choices" => {
            seen.once(0)?;
            c.choices(&mut chunk)
        }
        // Non-null only on the last chunks (or a failure): the full parse reads them.
        "usage" => {
            seen.once(1)?;
            c.null()
        }
        "error" => {
            seen.once(2)?;
            c.null()
        }
        _ => c.skip(0),
    })?;
    c.ws();
    (c.i == data.len()).then_some(chunk)
}

/// Which known keys of one object were read: serde's derive refuses a duplicate field.
#[derive(Default)]
struct Seen(u8);

impl Seen {
    fn once(&mut self, bit: u8) -> Option<()> {
        let mask = 1 << bit;
        if self.0 & mask != 0 {
            return None;
        }
        self.0 |= mask;
        Some(())
    }
}

struct Cursor<'a> {
    s: &'a str,
    i: usize,
}

/// A string token: its content between the quotes, and whether it has an escape.
struct Token {
    start: usize,
    end: usize,
    escaped: bool,
}

impl<'a> Cursor<'a> {
    fn peek(&self) -> Option<u8> {
        self.s.as_bytes().get(self.i).copied()
    }

    /// JSON's whitespace, as serde_json skips it.
    fn ws(&mut self) {
        while let Some(b' ' | b'\t' | b'\n' | b'\r') = self.peek() {
            self.i += 1;
        }
    }

    fn eat(&mut self, byte: u8) -> Option<()> {
        (self.peek()? == byte).then(|| self.i += 1)
    }

    /// After a member or element: `Some(true)` past a `,` (and the whitespace after it),
    /// `Some(false)` past `close`, `None` on anything else.
    fn more(&mut self, close: u8) -> Option<bool> {
        match self.peek()? {
            b',' => {
                self.i += 1;
                self.ws();
                Some(true)
            }
            b if b == close => {
                self.i += 1;
                Some(false)
            }
            _ => None,
        }
    }

    fn literal(&mut self, word: &str) -> Option<()> {
        let rest = self.s.as_bytes().get(self.i..)?;
        rest.starts_with(word.as_bytes())
            .then(|| self.i += word.len())
    }

    fn null(&mut self) -> Option<()> {
        self.literal("null")
    }

    /// `{ "key": value, ... }`, `on_key` reading each value; keys with an escape give up.
    fn object(&mut self, mut on_key: impl FnMut(&mut Self, &'a str) -> Option<()>) -> Option<()> {
        self.eat(b'{')?;
        self.ws();
        if self.eat(b'}').is_some() {
            return Some(());
        }
        loop {
            let key = self.string()?;
            if key.escaped {
                return None;
            }
            self.ws();
            self.eat(b':')?;
            self.ws();
            let s = self.s;
            on_key(self, &s[key.start..key.end])?;
            self.ws();
            if !self.more(b'}')? {
                return Some(());
            }
        }
    }

    /// Scans a string token from its opening quote. Control characters are a syntax error;
    /// what an escape means is left to serde_json (see [`Self::text`] and [`Self::skip`]).
    fn string(&mut self) -> Option<Token> {
        self.eat(b'"')?;
        let bytes = self.s.as_bytes();
        let start = self.i;
        let mut escaped = false;
        let mut i = start;
        loop {
            i = plain_run_end(bytes, i);
            match *bytes.get(i)? {
                b'"' => break,
                b'\\' => {
                    escaped = true;
                    // The escaped byte cannot end the string; if the escape is malformed,
                    // serde_json's check of the whole token says so.
                    i += 2;
                }
                0..=0x1f => return None,
                _ => i += 1,
            }
        }
        self.i = i + 1;
        Some(Token {
            start,
            end: i,
            escaped,
        })
    }

    /// A string or `null`, as serde reads an `Option<Cow<str>>`: borrowed when it has no
    /// escape, decoded by serde_json when it has.
    fn text(&mut self) -> Option<Option<Cow<'a, str>>> {
        if self.peek()? == b'n' {
            return self.null().map(|()| None);
        }
        let token = self.string()?;
        let s = self.s;
        if !token.escaped {
            return Some(Some(Cow::Borrowed(&s[token.start..token.end])));
        }
        let quoted = &s[token.start - 1..=token.end];
        serde_json::from_str::<String>(quoted)
            .ok()
            .map(|s| Some(Cow::Owned(s)))
    }

    /// `"choices": [ choice ]`: none or one; more, the full parse reads.
    fn choices(&mut self, chunk: &mut Chunk<'a>) -> Option<()> {
        self.eat(b'[')?;
        self.ws();
        if self.eat(b']').is_some() {
            return Some(());
        }
        let mut seen = Seen::default();
        self.object(|c, key| match key {
            "delta" => {
                seen.once(0)?;
                if c.peek()? == b'n' {
                    return c.null();
                }
                c.delta(chunk)
            }
            "finish_reason" => {
                seen.once(1)?;
                chunk.finish_reason = c.text()?;
                Some(())
            }
            "logprobs" => {
                seen.once(2)?;
                c.null()
            }
            _ => c.skip(0),
        })?;
        self.ws();
        self.eat(b']')
    }

    /// A choice's `delta`: its text parts, kept as `parse_chunk` keeps them (none when empty,
    /// `reasoning_content` before `reasoning`).
    fn delta(&mut self, chunk: &mut Chunk<'a>) -> Option<()> {
        let mut seen = Seen::default();
        let (mut reasoning_content, mut reasoning) = (None, None);
        self.object(|c, key| {
            let slot = match key {
                "content" => {
                    seen.once(0)?;
                    &mut chunk.content
                }
                "reasoning_content" => {
                    seen.once(1)?;
                    &mut reasoning_content
                }
                "reasoning" => {
                    seen.once(2)?;
                    &mut reasoning
                }
                "refusal" => {
                    seen.once(3)?;
                    &mut chunk.refusal
                }
                "tool_calls" => {
                    seen.once(4)?;
                    // `null` or `[]` carry no call; a fragment list the full parse keeps raw.
                    if c.peek()? == b'n' {
                        return c.null();
                    }
                    c.eat(b'[')?;
                    c.ws();
                    return c.eat(b']');
                }
                _ => return c.skip(0),
            };
            *slot = c.text()?.filter(|s| !s.is_empty());
            Some(())
        })?;
        chunk.reasoning = reasoning_content
            .filter(|s: &Cow<'_, str>| !s.is_empty())
            .or(reasoning.filter(|s: &Cow<'_, str>| !s.is_empty()));
        Some(())
    }

    /// Steps over a value muxgate does not read, checking its syntax as serde_json does.
    fn skip(&mut self, depth: u32) -> Option<()> {
        match self.peek()? {
            b'"' => {
                let token = self.string()?;
                if token.escaped {
                    let quoted = &self.s[token.start - 1..=token.end];
                    serde_json::from_str::<serde::de::IgnoredAny>(quoted).ok()?;
                }
                Some(())
            }
            b'-' | b'0'..=b'9' => self.number(),
            b't' => self.literal("true"),
            b'f' => self.literal("false"),
            b'n' => self.null(),
            b'{' if depth < MAX_DEPTH => self.object(|c, _| c.skip(depth + 1)),
            b'[' if depth < MAX_DEPTH => {
                self.i += 1;
                self.ws();
                if self.eat(b']').is_some() {
                    return Some(());
                }
                loop {
                    self.skip(depth + 1)?;
                    self.ws();
                    if !self.more(b']')? {
                        return Some(());
                    }
                }
            }
            _ => None,
        }
    }

    /// JSON's number grammar: `-? (0 | [1-9][0-9]*) (. [0-9]+)? ([eE] [+-]? [0-9]+)?`.
    fn number(&mut self) -> Option<()> {
        let _ = self.eat(b'-');
        match self.peek()? {
            b'0' => self.i += 1,
            b'1'..=b'9' => self.digits(),
            _ => return None,
        }
        if self.eat(b'.').is_some() {
            self.peek().filter(u8::is_ascii_digit)?;
            self.digits();
        }
        if let Some(b'e' | b'E') = self.peek() {
            self.i += 1;
            if let Some(b'+' | b'-') = self.peek() {
                self.i += 1;
            }
            self.peek().filter(u8::is_ascii_digit)?;
            self.digits();
        }
        // `01` or `1x`: whatever follows a number must end it.
        match self.peek() {
            Some(b'0'..=b'9') => None,
            _ => Some(()),
        }
    }

    fn digits(&mut self) {
        while self.peek().is_some_and(|b| b.is_ascii_digit()) {
            self.i += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use rand::rngs::StdRng;
    use rand::seq::SliceRandom;
    use rand::{Rng, SeedableRng};

    use super::*;
    use crate::redact::Redactor;
    use crate::upstream::parse_full;

    /// Everything a `Chunk` holds, borrowed-or-owned included.
    fn view(c: &Chunk<'_>) -> String {
        let cow = |t: &Option<Cow<'_, str>>| match t {
            None => "-".to_owned(),
            Some(Cow::Borrowed(s)) => format!("b{s:?}"),
            Some(Cow::Owned(s)) => format!("o{s:?}"),
        };
        format!(
            "content={} reasoning={} refusal={} tool_calls={:?} logprobs={:?} finish={} usage={:?}",
            cow(&c.content),
            cow(&c.reasoning),
            cow(&c.refusal),
            c.tool_calls.map(|r| r.get()),
            c.logprobs.map(|r| r.get()),
            cow(&c.finish_reason),
            c.usage,
        )
    }

    /// Whether the fast path answered; panics when its answer is not the full parse's.
    fn check(data: &str) -> bool {
        let Some(fast) = chunk(data) else {
            return false;
        };
        match parse_full(data, &Redactor::default()) {
            Ok(full) => assert_eq!(view(&fast), view(&full), "for {data:?}"),
            Err(e) => panic!("the fast path accepted {data:?}, the full parse said {e}"),
        }
        true
    }

    #[test]
    fn takes_the_common_shapes() {
        let shapes = [
            // OpenAI, every field of a text chunk.
            r#"{"id":"chatcmpl-B9MBs8CjcvOU2jLn4n570S5qMJKcT","object":"chat.completion.chunk","created":1741570283,"model":"gpt-4o-2024-08-06","service_tier":"default","system_fingerprint":"fp_fc9f1d7035","choices":[{"index":0,"delta":{"content":" Hello there"},"logprobs":null,"finish_reason":null}]}"#,
            // OpenAI with `stream_options.include_usage`: `usage` null until the last chunk.
            r#"{"id":"c","object":"chat.completion.chunk","created":1,"model":"m","choices":[{"index":0,"delta":{"content":"Hi"},"logprobs":null,"finish_reason":null}],"usage":null,"obfuscation":"x1"}"#,
            // The mock's role, text, reasoning, refusal and finish chunks.
            r#"{"id":"mock-1","object":"chat.completion.chunk","created":1,"model":"m","choices":[{"index":0,"delta":{"role":"assistant","content":""},"finish_reason":null}]}"#,
            r#"{"id":"mock-1","object":"chat.completion.chunk","created":1,"model":"m","system_fingerprint":"fp","choices":[{"index":0,"delta":{"content":"alpha0 "},"finish_reason":null}]}"#,
            r#"{"id":"mock-1","object":"chat.completion.chunk","created":1,"model":"m","choices":[{"index":0,"delta":{"reasoning_content":"think"},"finish_reason":null}]}"#,
            r#"{"id":"mock-1","object":"chat.completion.chunk","created":1,"model":"m","choices":[{"index":0,"delta":{"refusal":"no"},"finish_reason":null}]}"#,
            r#"{"id":"mock-1","object":"chat.completion.chunk","created":1,"model":"m","choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}"#,
            // Escaped text, decoded as serde decodes it.
            r#"{"choices":[{"index":0,"delta":{"content":"line\n\"quoted\" caf\u00e9 \ud83d\ude00"},"finish_reason":null}]}"#,
            // Azure: content filter results beside the delta.
            r#"{"choices":[{"content_filter_results":{"hate":{"filtered":false,"severity":"safe"}},"delta":{"content":"x"},"finish_reason":null,"index":0,"logprobs":null}],"created":1,"id":"a","model":"m","object":"chat.completion.chunk","system_fingerprint":"fp"}"#,
            // vLLM / OpenRouter extras; `tool_calls` empty.
            " {\n \"choices\": [ { \"index\": 0, \"delta\": { \"content\": \"y\", \"tool_calls\": [ ] }, \"stop_reason\": null, \"native_finish_reason\": null } ] } \n",
            r#"{"choices":[]}"#,
        ];
        for shape in shapes {
            assert!(check(shape), "not taken: {shape}");
        }
    }

    #[test]
    fn leaves_other_shapes_to_serde() {
        let others = [
            r#"{"choices":[{"delta":{"tool_calls":[{"index":0,"function":{"arguments":"{"}}]}}]}"#,
            r#"{"choices":[{"delta":{"content":"a"},"logprobs":{"content":[]}}]}"#,
            r#"{"choices":[],"usage":{"prompt_tokens":1,"completion_tokens":2,"total_tokens":3}}"#,
            r#"{"error":{"message":"boom"}}"#,
            r#"{"choices":[{"delta":{"content":"a"}},{"delta":{"content":"b"}}]}"#,
            r#"{"choices":[{"delta":{"content":"a","content":"b"}}]}"#,
            r#"{"cho\u0069ces":[{"delta":{"content":"a"}}]}"#,
            r#"{"choices":[{"delta":{"content":"a\ud800"}}]}"#,
            r#"{"choices":[{"delta":{"content":"a\q"}}]}"#,
            "{\"choices\":[{\"delta\":{\"content\":\"a\u{1}\"}}]}",
            r#"{"choices":[{"delta":{"content":5}}]}"#,
            r#"{"choices":null}"#,
            r#"{"created":01,"choices":[]}"#,
            r#"{"choices":[]} x"#,
            r#"[[],null,null]"#,
        ];
        for other in others {
            assert!(chunk(other).is_none(), "taken: {other}");
        }
    }

    /// Pieces a chunk is made of: the first list of each pair valid, the second not (or not
    /// what the full parse accepts in every place).
    const TEXTS: (&[&str], &[&str]) = (
        &[
            r#""hello""#,
            r#""""#,
            "null",
            r#""with \"quotes\" and \\ backslash""#,
            r#""tab\tnew\nline\r\/ \b\f""#,
            r#""\u00e9\u20AC""#,
            r#""\ud83d\ude00 pair""#,
            "\"caf\u{e9} \u{20ac} \u{1f600}\"",
            r#""trailing\\""#,
            r#""\"""#,
        ],
        &[
            r#""\ud800 lone""#,
            r#""\udc00 lone low""#,
            r#""\uZZZZ""#,
            r#""\x""#,
            "\"raw\u{1}control\"",
            "5",
            "true",
            r#"{"content":"nested"}"#,
            r#"["content"]"#,
        ],
    );

    const SKIPPED: (&[&str], &[&str]) = (
        &[
            r#""chatcmpl-1""#,
            "0",
            "-1",
            "1741570283",
            "1.5e-3",
            "2E+10",
            "true",
            "false",
            "null",
            r#""esc \" \u00e9""#,
            r#""\ud800""#,
            r#"{"content":"x","a":[1,{"b":null}]}"#,
            r#"[]"#,
            r#"[[[[[[[[[[[[[[[1]]]]]]]]]]]]]]]"#,
        ],
        &[
            // Valid, but left to serde: too deep, a key with an escape.
            r#"[[[[[[[[[[[[[[[[[[[[1]]]]]]]]]]]]]]]]]]]"#,
            r#"{"k\u0065y":1}"#,
            "01",
            "1.",
            "-",
            ".5",
            "1e",
            "nul",
            r#""\uZZ""#,
            r#"[1,]"#,
            r#"{"a":1,}"#,
        ],
    );

    const SPACES: (&[&str], &[&str]) = (
        &["", "", "", "", " ", "\n", "\t", "\r\n"],
        &["\u{a0}", "\u{feff}", "\u{b}"],
    );

    struct Gen {
        rng: StdRng,
        /// How often a piece is taken from the invalid list, set per chunk.
        wild: f64,
    }

    impl Gen {
        fn pick<'s>(&mut self, from: &[&'s str]) -> &'s str {
            from.choose(&mut self.rng).copied().unwrap_or_default()
        }

        fn pick2<'s>(&mut self, (good, bad): (&[&'s str], &[&'s str])) -> &'s str {
            if self.rng.gen_bool(self.wild) {
                self.pick(bad)
            } else {
                self.pick(good)
            }
        }

        fn ws(&mut self) -> &'static str {
            self.pick2(SPACES)
        }

        fn object(&mut self, mut fields: Vec<(String, String)>) -> String {
            fields.shuffle(&mut self.rng);
            if !fields.is_empty() && self.rng.gen_bool(0.05) {
                let twice = fields[self.rng.gen_range(0..fields.len())].clone();
                fields.push(twice);
            }
            let mut out = format!("{{{}", self.ws());
            for (n, (key, value)) in fields.iter().enumerate() {
                if n > 0 {
                    out.push_str(&format!("{},{}", self.ws(), self.ws()));
                }
                out.push_str(&format!("\"{key}\"{}:{}{value}", self.ws(), self.ws()));
            }
            out.push_str(&format!("{}}}", self.ws()));
            out
        }

        fn maybe(&mut self, fields: &mut Vec<(String, String)>, key: &str, p: f64, v: String) {
            if self.rng.gen_bool(p) {
                fields.push((key.to_owned(), v));
            }
        }

        fn delta(&mut self) -> String {
            let mut fields = Vec::new();
            for key in ["content", "reasoning_content", "reasoning", "refusal"] {
                let text = self.pick2(TEXTS).to_owned();
                self.maybe(&mut fields, key, 0.4, text);
            }
            let role = self.pick(&[r#""assistant""#, "null", "1"]).to_owned();
            self.maybe(&mut fields, "role", 0.3, role);
            let calls = self
                .pick(&["null", "[]", "[ ]", r#"[{"index":0}]"#, "{}", "[1"])
                .to_owned();
            self.maybe(&mut fields, "tool_calls", 0.15, calls);
            let other = self.pick2(SKIPPED).to_owned();
            self.maybe(&mut fields, "function_call", 0.1, other);
            self.object(fields)
        }

        fn choice(&mut self) -> String {
            let mut fields = Vec::new();
            let index = self.pick(&["0", "1", "-0", "0.0"]).to_owned();
            self.maybe(&mut fields, "index", 0.8, index);
            let delta = match self.rng.gen_range(0..10) {
                0 => "null".to_owned(),
                1 => r#""text""#.to_owned(),
                _ => self.delta(),
            };
            self.maybe(&mut fields, "delta", 0.9, delta);
            let finish = self
                .pick(&["null", r#""stop""#, r#""""#, r#""le\u006egth""#, "0"])
                .to_owned();
            self.maybe(&mut fields, "finish_reason", 0.8, finish);
            let logprobs = self
                .pick(&["null", "null", r#"{"content":[]}"#, "[]"])
                .to_owned();
            self.maybe(&mut fields, "logprobs", 0.4, logprobs);
            let nested = format!(r#"{{"content":{}}}"#, self.pick2(TEXTS));
            self.maybe(&mut fields, "content_filter_results", 0.2, nested);
            let skipped = self.pick2(SKIPPED).to_owned();
            self.maybe(&mut fields, "stop_reason", 0.2, skipped);
            self.object(fields)
        }

        fn chunk(&mut self) -> String {
            let mut fields = Vec::new();
            for key in ["id", "object", "created", "model", "system_fingerprint"] {
                let value = self.pick2(SKIPPED).to_owned();
                self.maybe(&mut fields, key, 0.7, value);
            }
            let choices = match self.rng.gen_range(0..12) {
                0 => "[]".to_owned(),
                1 => "null".to_owned(),
                2 => format!("[{},{}]", self.choice(), self.choice()),
                3 => self.choice(),
                _ => format!("[{}{}{}]", self.ws(), self.choice(), self.ws()),
            };
            self.maybe(&mut fields, "choices", 0.95, choices);
            let usage = self
                .pick(&[
                    "null",
                    "null",
                    r#"{"prompt_tokens":1,"completion_tokens":2,"total_tokens":3}"#,
                    "1",
                ])
                .to_owned();
            self.maybe(&mut fields, "usage", 0.3, usage);
            let error = self
                .pick(&["null", "null", r#"{"message":"boom"}"#, r#""bad""#])
                .to_owned();
            self.maybe(&mut fields, "error", 0.1, error);
            let nested = format!(r#"{{"delta":{{"content":{}}}}}"#, self.pick2(TEXTS));
            self.maybe(&mut fields, "x_extra", 0.1, nested);
            format!("{}{}{}", self.ws(), self.object(fields), self.ws())
        }

        /// A few random edits, on character boundaries, for shapes no list above spells.
        fn mutate(&mut self, s: &str) -> String {
            let mut chars: Vec<char> = s.chars().collect();
            for _ in 0..self.rng.gen_range(1..=3) {
                let at = self.rng.gen_range(0..=chars.len());
                match self.rng.gen_range(0..3) {
                    0 if at < chars.len() => {
                        chars.remove(at);
                    }
                    1 => {
                        let c = *b"{}[],:\"\\ 0e-nu".choose(&mut self.rng).unwrap_or(&b' ');
                        chars.insert(at, char::from(c));
                    }
                    _ if at < chars.len() => {
                        let end = self.rng.gen_range(at..chars.len().min(at + 12) + 1);
                        let piece: Vec<char> = chars[at..end].to_vec();
                        chars.splice(at..at, piece);
                    }
                    _ => {}
                }
            }
            chars.into_iter().collect()
        }
    }

    /// Many generated chunks, and random edits of them, through both paths: wherever the fast
    /// path answers, its answer is the full parse's.
    #[test]
    fn answers_as_the_full_parse_does() {
        let mut g = Gen {
            rng: StdRng::seed_from_u64(15),
            wild: 0.0,
        };
        let (mut taken, mut total) = (0, 0);
        for _ in 0..25_000 {
            g.wild = *[0.0, 0.0, 0.01, 0.05, 0.2]
                .choose(&mut g.rng)
                .unwrap_or(&0.0);
            let data = g.chunk();
            let mutated = g.mutate(&data);
            for data in [data, mutated] {
                total += 1;
                if check(&data) {
                    taken += 1;
                }
            }
        }
        // The generator is meant to hit the fast path often, not only its refusals.
        assert!(taken * 10 > total, "the fast path took {taken} of {total}");
    }
}
