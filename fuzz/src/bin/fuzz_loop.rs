//! A bounded random-input loop over the fuzz targets, for machines where libFuzzer cannot run
//! (stable Rust only, no sanitizer flags). Mutates the seeds and every input it has tried
//! (bit flips, byte edits, splices, inserted tokens the parsers care about) with a seeded RNG,
//! for `SECONDS` per target. No coverage feedback: weaker than libFuzzer, but it runs the same
//! target bodies and their property checks. On a panic it writes the input to
//! `fuzz/artifacts/<target>/crash-<n>` and exits non-zero.
//!
//! `cargo run --release --no-default-features --bin fuzz_loop -- TARGET SECONDS [SEED]`
#![allow(clippy::print_stdout)]

use std::panic::{self, AssertUnwindSafe};
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const TOKENS: &[&[u8]] = &[
    b"\r",
    b"\n",
    b"\r\n",
    b"\n\n",
    b":",
    b": ",
    b"data:",
    b"data: ",
    b"event:",
    b"id:",
    b"retry:",
    b"\xEF\xBB\xBF",
    b"{",
    b"}",
    b"[",
    b"]",
    b"\"",
    b"\\",
    b"\\u0000",
    b"\\ud800",
    b"\x1b",
    b"\0",
    b"\xff",
    b"sk-",
    b"Bearer ",
    b"\"type\":",
    b"\"open\"",
    b"\"messages\":",
    b"\"params\":",
    b"\"error\":",
    b"\"message\":",
    b"\"choices\":",
    b"\"delta\":",
    b"\"content\":",
    b"null",
    b"true",
    b"1e999",
    b"-0",
];

fn mutate(rng: &mut StdRng, input: &mut Vec<u8>, pool: &[Vec<u8>]) {
    for _ in 0..rng.gen_range(1..=4) {
        match rng.gen_range(0..7) {
            0 if !input.is_empty() => {
                let i = rng.gen_range(0..input.len());
                input[i] ^= 1 << rng.gen_range(0..8);
            }
            1 if !input.is_empty() => {
                let i = rng.gen_range(0..input.len());
                input[i] = rng.gen();
            }
            2 if !input.is_empty() => {
                let i = rng.gen_range(0..input.len());
                let n = rng.gen_range(1..=(input.len() - i).min(16));
                input.drain(i..i + n);
            }
            3 => {
                let i = rng.gen_range(0..=input.len());
                let t = TOKENS[rng.gen_range(0..TOKENS.len())];
                input.splice(i..i, t.iter().copied());
            }
            4 if !pool.is_empty() => {
                let other = &pool[rng.gen_range(0..pool.len())];
                if !other.is_empty() {
                    let a = rng.gen_range(0..other.len());
                    let b = rng.gen_range(a..=other.len());
                    let i = rng.gen_range(0..=input.len());
                    input.splice(i..i, other[a..b].iter().copied());
                }
            }
            5 if !input.is_empty() && input.len() < 1 << 16 => {
                // Repeat a slice: long lines, deep nesting, many events.
                let a = rng.gen_range(0..input.len());
                let b = rng.gen_range(a..=input.len().min(a + 64));
                let slice = input[a..b].to_vec();
                for _ in 0..rng.gen_range(1..64) {
                    input.splice(b..b, slice.iter().copied());
                }
            }
            _ => {
                let i = rng.gen_range(0..=input.len());
                input.insert(i, rng.gen());
            }
        }
    }
    input.truncate(1 << 18);
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let (Some(target), Some(seconds)) = (args.get(1), args.get(2)) else {
        eprintln!("usage: fuzz_loop TARGET SECONDS [SEED]   (targets: client_frame sse chunk)");
        std::process::exit(2);
    };
    let run: fn(&[u8]) = match target.as_str() {
        "client_frame" => muxgate_fuzz::client_frame,
        "sse" => muxgate_fuzz::sse,
        "chunk" => muxgate_fuzz::chunk,
        other => {
            eprintln!("unknown target `{other}`");
            std::process::exit(2);
        }
    };
    let seconds: u64 = seconds.parse().expect("SECONDS is a number");
    let seed: u64 = args
        .get(3)
        .map_or_else(rand::random, |s| s.parse().expect("SEED is a number"));
    let mut rng = StdRng::seed_from_u64(seed);
    let mut pool = muxgate_fuzz::seeds(target);
    let deadline = Instant::now() + Duration::from_secs(seconds);
    panic::set_hook(Box::new(|_| {}));
    let mut runs = 0u64;
    while Instant::now() < deadline {
        let mut input = pool[rng.gen_range(0..pool.len())].clone();
        mutate(&mut rng, &mut input, &pool);
        if panic::catch_unwind(AssertUnwindSafe(|| run(&input))).is_err() {
            let _ = panic::take_hook();
            let dir = format!("{}/artifacts/{target}", env!("CARGO_MANIFEST_DIR"));
            std::fs::create_dir_all(&dir).expect("artifacts dir");
            let path = format!("{dir}/crash-{seed}-{runs}");
            std::fs::write(&path, &input).expect("write the crash input");
            // Run it again with the default hook, so the panic message is shown.
            eprintln!("{target}: crash after {runs} runs (seed {seed}); input in {path}");
            run(&input);
            std::process::exit(1);
        }
        runs += 1;
        // Keep a bounded, varied pool: later mutations build on earlier ones.
        if pool.len() < 4096 {
            pool.push(input);
        } else {
            let i = rng.gen_range(0..pool.len());
            pool[i] = input;
        }
    }
    println!("{target}: {runs} runs in {seconds} s (seed {seed}), no failure");
}
