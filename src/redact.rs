//! The one path by which text an upstream wrote (error bodies and events, invalid chunks,
//! header values, transport errors) reaches a client frame or a log.
//!
//! An upstream is a third party: its error text can quote the API key it was sent ("Incorrect
//! API key provided: sk-…"), other credentials, or control characters that forge log lines or
//! terminal output. [`Redactor::clean`] removes, in this order: every configured upstream key,
//! credential-shaped words (see [`looks_secret`]), the word after `Bearer`/`Basic`, and control
//! characters (escaped as `\u{..}`); then bounds the length. Redaction runs over the whole text
//! before truncation, so a key cut in half by the bound cannot leak its first half.

/// What replaces a secret.
pub const REDACTED: &str = "[redacted]";

/// Removes secrets from upstream-derived text.
#[derive(Debug, Clone, Default)]
pub struct Redactor {
    /// The configured upstream API keys, longest first so a key containing another is
    /// removed whole.
    secrets: Vec<String>,
}

/// Shorter configured keys are not matched literally (they would redact ordinary words); the
/// shape rules still apply to them.
const MIN_SECRET_LEN: usize = 8;

impl Redactor {
    pub fn new<'a>(secrets: impl IntoIterator<Item = &'a str>) -> Self {
        let mut secrets: Vec<String> = secrets
            .into_iter()
            .map(str::trim)
            .filter(|s| s.len() >= MIN_SECRET_LEN)
            .map(str::to_string)
            .collect();
        secrets.sort_by_key(|s| std::cmp::Reverse(s.len()));
        secrets.dedup();
        Redactor { secrets }
    }

    /// `text` with secrets and control characters removed, at most `max_chars` characters
    /// (an ellipsis marks a cut).
    pub fn clean(&self, text: &str, max_chars: usize) -> String {
        let mut text = std::borrow::Cow::Borrowed(text);
        for secret in &self.secrets {
            if text.contains(secret.as_str()) {
                text = std::borrow::Cow::Owned(text.replace(secret.as_str(), REDACTED));
            }
        }
        escape_and_bound(&redact_words(&text), max_chars)
    }
}

/// Whether a word (a maximal run of `[A-Za-z0-9_-]`) is shaped like a credential:
/// - `sk-…`/`sk_…` (OpenAI, Anthropic `sk-ant-`, Stripe-style) of 10+ characters;
/// - other common key prefixes: `gsk_`, `xai-`, `AIza` (Google), `hf_`, `ghp_`/`github_pat_`;
/// - a JWT segment (`eyJ…`, 16+);
/// - any 32+ character word mixing letters and digits (hex or base64 keys, as Azure and many
///   others issue them). This also hides long request ids; a client never needs those.
pub fn looks_secret(word: &str) -> bool {
    const PREFIXES: [&str; 8] = [
        "sk-",
        "sk_",
        "gsk_",
        "xai-",
        "AIza",
        "hf_",
        "ghp_",
        "github_pat_",
    ];
    if word.len() >= 10 && PREFIXES.iter().any(|p| word.starts_with(p)) {
        return true;
    }
    if word.len() >= 16 && word.starts_with("eyJ") {
        return true;
    }
    word.len() >= 32
        && word.bytes().any(|b| b.is_ascii_digit())
        && word.bytes().any(|b| b.is_ascii_alphabetic())
}

fn is_word_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_' || b == b'-'
}

/// Replaces credential-shaped words, and the word after `Bearer`/`Basic`.
fn redact_words(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = String::with_capacity(text.len());
    let mut i = 0;
    let mut after_scheme = false;
    while i < bytes.len() {
        if !is_word_byte(bytes[i]) {
            // Word bytes are ASCII, so `i` is on a char boundary whenever a word starts.
            let start = i;
            while i < bytes.len() && !is_word_byte(bytes[i]) {
                i += 1;
            }
            let gap = &text[start..i];
            // `Bearer <token>`: only spaces between the scheme and the token.
            if !gap.chars().all(|c| c == ' ') {
                after_scheme = false;
            }
            out.push_str(gap);
            continue;
        }
        let start = i;
        while i < bytes.len() && is_word_byte(bytes[i]) {
            i += 1;
        }
        let word = &text[start..i];
        if after_scheme || looks_secret(word) {
            out.push_str(REDACTED);
        } else {
            out.push_str(word);
        }
        after_scheme = word.eq_ignore_ascii_case("bearer") || word.eq_ignore_ascii_case("basic");
    }
    out
}

/// Escapes control characters (C0, DEL, C1, and the bidi overrides that reorder what a
/// terminal shows) and keeps at most `max_chars` characters.
fn escape_and_bound(text: &str, max_chars: usize) -> String {
    let mut out = String::with_capacity(text.len().min(max_chars * 2));
    for (count, c) in text.chars().enumerate() {
        if count >= max_chars {
            out.push('…');
            break;
        }
        let dangerous = c.is_control()
            || matches!(c, '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}' | '\u{2028}' | '\u{2029}');
        if dangerous {
            use std::fmt::Write;
            let _ = write!(out, "\\u{{{:x}}}", c as u32);
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "sk-upstream-secret-7f3a9c";

    #[test]
    fn configured_key_and_key_shapes() {
        let r = Redactor::new([KEY, "short"]);
        let m = r.clean(
            &format!("Incorrect API key provided: {KEY}. See docs."),
            300,
        );
        assert_eq!(m, "Incorrect API key provided: [redacted]. See docs.");
        // A key of no known shape is still removed because it is configured.
        let odd = Redactor::new(["odd key with spaces!"]);
        assert_eq!(odd.clean("got odd key with spaces!", 100), "got [redacted]");
        for secret in [
            "sk-proj-abcdefABCDEF0123456789",
            "sk_live_0123456789abcdef",
            "sk-ant-api03-xyzXYZ012345",
            "AIzaSyD-0123456789abcdefghijklmnopqrstu",
            "gsk_0123456789abcdef",
            "eyJhbGciOiJIUzI1NiJ9",
            "0123456789abcdef0123456789abcdef",
            "a1b2c3d4e5f6a7b8c9d0a1b2c3d4e5f6a7b8",
        ] {
            let m = r.clean(&format!("key {secret} rejected"), 300);
            assert_eq!(m, "key [redacted] rejected", "{secret}");
        }
        // Ordinary words and masked keys stay.
        for plain in [
            "model gpt-4.1 overloaded",
            "sk-proj-****abcd",
            "Rate limit reached for requests",
            "http://127.0.0.1:9/v1/chat/completions",
        ] {
            assert_eq!(r.clean(plain, 300), plain);
        }
    }

    #[test]
    fn bearer_and_basic_tokens() {
        let r = Redactor::default();
        assert_eq!(
            r.clean("header Authorization: Bearer abc.def invalid", 300),
            "header Authorization: Bearer [redacted].def invalid"
        );
        assert_eq!(
            r.clean("BEARER   tok123 and basic dXNlcjpw", 300),
            "BEARER   [redacted] and basic [redacted]"
        );
        assert_eq!(r.clean("Bearer", 300), "Bearer");
    }

    #[test]
    fn control_characters_are_escaped() {
        let r = Redactor::default();
        assert_eq!(
            r.clean("a\nb\x1b[31mc\rd\u{202e}e\u{7f}", 300),
            "a\\u{a}b\\u{1b}[31mc\\u{d}d\\u{202e}e\\u{7f}"
        );
        assert_eq!(r.clean("tabs\tare too", 300), "tabs\\u{9}are too");
    }

    #[test]
    fn redaction_happens_before_the_cut() {
        let r = Redactor::new([KEY]);
        let text = format!("{}{KEY}", "x ".repeat(10));
        let m = r.clean(&text, 24);
        assert!(!m.contains("sk-up"), "{m}");
        assert!(m.ends_with('…'), "{m}");
        assert_eq!(r.clean("ééé", 2), "éé…");
        assert_eq!(r.clean("", 5), "");
    }
}
