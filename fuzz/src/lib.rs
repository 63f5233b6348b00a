//! The fuzz targets' bodies, shared by the libFuzzer binaries (`fuzz_targets/`) and the plain
//! random-input loop (`src/bin/fuzz_loop.rs`). Each checks properties, not only "no panic".

use std::collections::VecDeque;

use muxgate::test_support::{
    parse_client_frame, parse_chunk, upstream_body, validate_open, ClientFrame, Event, Parser,
    Redactor,
};

/// A configured upstream key the chunk target plants in its input.
pub const KEY: &str = "sk-fuzz-upstream-key-4b1d";

/// Client frames: any text is refused with a message or parsed; an `open` that parses is
/// validated and turned into an upstream body without panicking.
pub fn client_frame(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    match parse_client_frame(&text) {
        Ok(ClientFrame::Open(req)) => {
            let allowed = muxgate::config::default_allowed_params();
            if validate_open(&req, &allowed).is_ok() {
                let body = upstream_body(&req, &req.model, "user-hash")
                    .expect("a validated open always serializes");
                let v: serde_json::Value =
                    serde_json::from_slice(&body).expect("the upstream body is JSON");
                assert_eq!(v["user"], "user-hash", "the gateway's user id, always");
                assert_eq!(v["stream"], true);
            }
        }
        Ok(_) => {}
        Err(e) => assert!(!e.0.is_empty()),
    }
}

fn feed(chunks: &[&[u8]], max: usize) -> (Vec<Event>, Option<usize>) {
    let mut p = Parser::new(max);
    let mut out = VecDeque::new();
    for c in chunks {
        if let Err(limit) = p.feed(c, &mut out) {
            return (out.into(), Some(limit));
        }
    }
    (out.into(), None)
}

/// The SSE parser: the same events (and the same size error) whatever the chunking, and no
/// event over the limit. The first byte sets the limit (small, so the bound is exercised),
/// the second the chunk size.
pub fn sse(data: &[u8]) {
    let [a, b, input @ ..] = data else {
        return;
    };
    let max = 16 + usize::from(*a) * 8;
    let step = usize::from(*b % 17) + 1;
    let whole = feed(&[input], max);
    let chunks: Vec<&[u8]> = input.chunks(step).collect();
    assert_eq!(feed(&chunks, max), whole, "chunking changed the events");
    let bytes: Vec<&[u8]> = input.chunks(1).collect();
    assert_eq!(feed(&bytes, max), whole, "byte-by-byte changed the events");
    for e in &whole.0 {
        assert!(e.data.len() <= max, "an event over the limit");
    }
}

/// Chunks: parse or fail; a failure's message never holds the configured key (planted at a
/// position the first byte picks) nor a control character.
pub fn chunk(data: &[u8]) {
    let [at, rest @ ..] = data else {
        return;
    };
    let mut text = String::from_utf8_lossy(rest).into_owned();
    let mut at = usize::from(*at).min(text.len());
    while !text.is_char_boundary(at) {
        at -= 1;
    }
    text.insert_str(at, KEY);
    let redactor = Redactor::new([KEY]);
    for candidate in [
        text.clone(),
        format!(r#"{{"error":{{"message":{}}}}}"#, json_str(&text)),
    ] {
        if let Err(e) = parse_chunk(&candidate, &redactor) {
            let m = e.to_string();
            assert!(!m.contains(KEY), "the key leaked: {m}");
            assert!(!m.chars().any(char::is_control), "a control char: {m:?}");
        }
    }
    let cleaned = redactor.clean(&text, 64);
    assert!(!cleaned.contains(KEY) && !cleaned.chars().any(char::is_control));
}

fn json_str(s: &str) -> String {
    serde_json::Value::String(s.to_string()).to_string()
}

/// Starting inputs for the random loop (libFuzzer builds its own corpus).
pub fn seeds(target: &str) -> Vec<Vec<u8>> {
    let s: &[&str] = match target {
        "client_frame" => &[
            r#"{"type":"hello","token":"abc","client":"x","resume":[{"id":"t1:1","after":3}]}"#,
            r#"{"type":"open","id":"t1:8","model":"m","messages":[{"role":"user","content":"hi"}],"params":{"temperature":0.7,"max_tokens":256,"user":"x"}}"#,
            r#"{"type":"cancel","id":"t1:8"}"#,
            r#"{"type":"ping","ts":1732650000000}"#,
        ],
        "sse" => &[
            "\u{0}\u{3}\u{feff}data: a\r\n\r\ndata: b\rdata\r\revent: x\nid: 1\nretry: 10\ndata:  c\n\n",
            "\u{4}\u{1}: comment\ndata: {\"choices\":[]}\n\ndata: [DONE]\n\n",
            "\u{1}\u{7}data: xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx",
        ],
        "chunk" => &[
            "\u{5}{\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Hel\"},\"finish_reason\":null}]}",
            "\u{20}{\"error\":{\"message\":\"Incorrect API key provided: \",\"code\":401}}",
            "\u{0}{\"choices\":[],\"usage\":{\"prompt_tokens\":1,\"completion_tokens\":2}}",
            "\u{9}not json \u{1b}[2J\n",
        ],
        _ => &[],
    };
    s.iter().map(|s| s.as_bytes().to_vec()).collect()
}
