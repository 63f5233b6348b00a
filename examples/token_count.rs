//! What counting tokens costs, before and after issue 15: `tiktoken-rs` (the counter muxgate
//! used before) beside muxgate's own (`src/billing/tokens.rs`), per MiB of prose and of
//! adversarial text, and the memory each one's tables take.
//!
//! ```text
//! cargo run --release --example token_count
//! ```
//!
//! For each input: milliseconds per MiB (best of 3 runs, wall clock on one thread; the machine
//! is shared, so compare within a run), the token counts (equal: the counter is exact), and
//! what the reservation's bounded count (`count_prompt` with 1 MiB, the
//! default `limits.prompt_count_bytes` of 256 KiB, and 64 KiB) merges and returns. Then the process's RSS
//! (`/proc/self/status`) at start, after muxgate's counter has counted everything, and after
//! `tiktoken-rs` has built its two encoders. muxgate's counter is loaded and run first, so its
//! figure does not include the other's.
//!
//! The gateway binary's own idle RSS is measured from outside by
//! `cargo run --release --example hostile_load -- BINARY idle`.
#![allow(clippy::print_stdout, clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashSet;
use std::time::{Duration, Instant};

use muxgate::test_support::{count_prompt, count_tokens, warm_up};
use serde_json::{json, Value};

const MIB: usize = 1 << 20;

fn inputs() -> Vec<(&'static str, String)> {
    let prose = "The quick brown fox jumps over the lazy dog; it's 3.14 km away, isn't it? \
        Then: fn main() { println!(\"{}\", x); }\n";
    // Pseudo-random characters from several scripts (a fixed-seed LCG).
    let mut random = String::new();
    let mut state: u64 = 1;
    while random.len() < MIB {
        state = state
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        let c = char::from_u32(((state >> 33) % 0x3000) as u32 + 0x20).unwrap_or('?');
        random.push(c);
    }
    vec![
        ("prose", prose.repeat(MIB / prose.len())),
        ("one letter", "a".repeat(MIB)),
        ("one punctuation", "!".repeat(MIB)),
        (
            "31-byte pieces",
            format!("{} ", "!".repeat(30)).repeat(MIB / 31),
        ),
        (
            "99-byte pieces",
            format!("{} ", "!".repeat(98)).repeat(MIB / 99),
        ),
        (
            "4 KiB pieces",
            format!("{} ", "!".repeat(4095)).repeat(MIB / 4096),
        ),
        (
            "4 KiB space runs",
            format!("{}x", " ".repeat(4095)).repeat(MIB / 4096),
        ),
        ("spaces", " ".repeat(MIB - 1) + "x"),
        ("digits", "7".repeat(MIB)),
        ("newline+space", " \n".repeat(MIB / 2)),
        ("random unicode", random),
    ]
}

fn best_of_3<T>(mut f: impl FnMut() -> T) -> (T, Duration) {
    let mut best = Duration::MAX;
    let mut out = None;
    for _ in 0..3 {
        let t = Instant::now();
        out = Some(f());
        best = best.min(t.elapsed());
    }
    (out.unwrap(), best)
}

fn per_mib(took: Duration, bytes: usize) -> f64 {
    took.as_secs_f64() * 1e3 * MIB as f64 / bytes as f64
}

fn rss() -> String {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    ["VmRSS", "RssAnon", "RssFile"]
        .iter()
        .map(|key| {
            let kib: f64 = status
                .lines()
                .find_map(|l| l.strip_prefix(&format!("{key}:")))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
                .unwrap_or(0.0);
            format!("{key} {:.1} MiB", kib / 1024.0)
        })
        .collect::<Vec<_>>()
        .join(", ")
}

fn main() {
    let model = std::env::args().nth(1).unwrap_or_else(|| "gpt-4o".into());
    let inputs = inputs();
    let rss_start = rss();
    warm_up();
    println!("model {model}; ms per MiB, best of 3\n");
    println!(
        "| input | MiB | muxgate ms/MiB | tokens | prompt count, 1 MiB allowance: ms, merged KiB, tokens | 256 KiB (the default) | 64 KiB |"
    );
    println!("|---|---:|---:|---:|---|---|---|");
    let mut ours = Vec::new();
    for (name, text) in &inputs {
        let (tokens, took) = best_of_3(|| count_tokens(&model, text));
        let messages = [json!({"role": "user", "content": text})];
        let bounded = [MIB, 256 * 1024, 64 * 1024].map(|allowance| {
            let (count, took) =
                best_of_3(|| count_prompt(&model, &messages, &Value::Null, allowance));
            format!(
                "{:.1} ms, {} KiB, {}",
                took.as_secs_f64() * 1e3,
                count.merged / 1024,
                count.tokens
            )
        });
        println!(
            "| {name} | {:.2} | {:.1} | {tokens} | {} | {} | {} |",
            text.len() as f64 / MIB as f64,
            per_mib(took, text.len()),
            bounded[0],
            bounded[1],
            bounded[2]
        );
        ours.push(tokens);
    }
    let rss_ours = rss();

    let t = Instant::now();
    let reference = if model.starts_with("gpt-4o") {
        tiktoken_rs::o200k_base()
    } else {
        tiktoken_rs::cl100k_base()
    }
    .expect("tiktoken-rs loads");
    let other = if model.starts_with("gpt-4o") {
        tiktoken_rs::cl100k_base()
    } else {
        tiktoken_rs::o200k_base()
    }
    .expect("tiktoken-rs loads");
    let built = t.elapsed();
    let rss_tiktoken = rss();
    println!("\ntiktoken-rs 0.12 (before), the same inputs:\n");
    println!("| input | tiktoken-rs ms/MiB | tokens |");
    println!("|---|---:|---:|");
    for ((name, text), ours) in inputs.iter().zip(ours) {
        let (tokens, took) = best_of_3(|| {
            reference
                .encode(text, &HashSet::new())
                .map(|(tokens, _)| tokens.len() as u64)
        });
        let tokens = match tokens {
            Ok(n) => {
                assert_eq!(n, ours, "{name}: muxgate's count differs");
                n.to_string()
            }
            Err(_) => "gives up (regex backtrack limit)".into(),
        };
        println!("| {name} | {:.1} | {tokens} |", per_mib(took, text.len()));
    }
    drop(other);
    println!("\nRSS at start: {rss_start}");
    println!("RSS after muxgate's counter counted every input: {rss_ours}");
    println!(
        "RSS after tiktoken-rs built cl100k_base and o200k_base ({:.0} ms): {rss_tiktoken}",
        built.as_secs_f64() * 1e3
    );
}
