//! What one plain text chunk costs on the relay's hot path: `upstream::parse_chunk`, then the
//! `delta` frame, as `relay_once` does them per chunk. Run under callgrind for a count that does
//! not depend on the machine's load:
//!
//!   cargo build --release --example chunk_cost
//!   valgrind --tool=callgrind --callgrind-out-file=/tmp/cg.out target/release/examples/chunk_cost 100000
//!   (the "Collected" total / 100000 = instructions per chunk, start-up included)
//!
//! Without valgrind it prints wall-clock nanoseconds per chunk (noisy on a shared machine).
#![allow(clippy::print_stdout, clippy::unwrap_used, clippy::expect_used)]

use std::hint::black_box;
use std::time::Instant;

use muxgate::test_support::{chunk_ids, delta_parts, parse_chunk, Redactor};

/// OpenAI's own chunk shape (every field it sends on a text chunk).
const CHUNK: &str = r#"{"id":"chatcmpl-B9MBs8CjcvOU2jLn4n570S5qMJKcT","object":"chat.completion.chunk","created":1741570283,"model":"gpt-4o-2024-08-06","service_tier":"default","system_fingerprint":"fp_fc9f1d7035","choices":[{"index":0,"delta":{"content":" Hello there"},"logprobs":null,"finish_reason":null}]}"#;

fn main() {
    let n: u64 = std::env::args()
        .nth(1)
        .map_or(1_000_000, |a| a.parse().expect("a count"));
    let redactor = Redactor::default();
    let mut completion_id: Option<String> = None;
    let mut fingerprint: Option<String> = None;
    let mut generated = String::new();
    let started = Instant::now();
    for seq in 1..=n {
        let chunk = parse_chunk(black_box(CHUNK), &redactor).expect("chunk");
        // As relay_once: the ids read from the first chunk (and the last ones), one frame per
        // chunk with a part.
        if completion_id.is_none() {
            let ids = chunk_ids(CHUNK);
            completion_id = ids.id().map(str::to_owned);
            fingerprint = ids.system_fingerprint().map(str::to_owned);
        }
        if chunk.has_part() {
            let parts = chunk.parts();
            generated.push_str(parts.text);
            black_box(delta_parts("t1:8", seq, &parts));
        }
        if generated.len() > 1 << 20 {
            generated.clear();
        }
    }
    let took = started.elapsed();
    println!(
        "{n} chunks, {:.0} ns per chunk ({completion_id:?}, {fingerprint:?})",
        took.as_nanos() as f64 / n as f64
    );
}
