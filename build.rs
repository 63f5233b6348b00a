//! Writes the BPE vocabularies the token counter reads (`src/billing/ranks.rs`) into `OUT_DIR`,
//! from the rank files `tiktoken-rs` ships, so the binary carries them ready to read in place
//! instead of rebuilding hash maps from base64 at every start.

use std::path::PathBuf;

#[allow(dead_code)]
#[path = "src/billing/ranks.rs"]
mod ranks;

fn main() {
    println!("cargo::rerun-if-changed=build.rs");
    println!("cargo::rerun-if-changed=src/billing/ranks.rs");
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    write(
        &out,
        "cl100k_base",
        tiktoken_rs::cl100k_base().expect("cl100k_base loads"),
        100_256,
    );
    write(
        &out,
        "o200k_base",
        tiktoken_rs::o200k_base().expect("o200k_base loads"),
        199_998,
    );
}

/// Ranks run from 0 without a gap up to the special tokens, which the table leaves out: the
/// gateway counts special-token markers in a message as the plain text they are.
fn write(out: &std::path::Path, name: &str, bpe: tiktoken_rs::CoreBPE, expected: u32) {
    let tokens: Vec<Vec<u8>> = (0..)
        .map_while(|rank| bpe.decode_bytes(&[rank]).ok())
        .collect();
    assert_eq!(
        tokens.len(),
        expected as usize,
        "{name}: tokens before the first gap"
    );
    let table = ranks::build(&tokens);
    ranks::Ranks::parse(&table).expect("the table just built parses");
    std::fs::write(out.join(format!("{name}.ranks")), table).expect("OUT_DIR is writable");
}
