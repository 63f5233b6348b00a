//! A BPE vocabulary as one flat table, built by `build.rs` and compiled into the binary: the
//! tokens' bytes end to end, their offsets, and an open-addressing hash index from bytes to rank.
//!
//! Why not `tiktoken-rs`'s `CoreBPE`: it keeps three copies of the vocabulary (an encoder and a
//! decoder `HashMap` with one heap `Vec<u8>` per token, plus a sorted list), rebuilt from base64
//! at every start: ~70 MB resident for `cl100k_base` and `o200k_base` before the first request.
//! This table is read in place from the binary's read-only data: it costs nothing until a count
//! touches it, then only the pages touched, which the kernel may drop and reload at will.
//!
//! Layout, every integer a little-endian `u32`:
//!
//! | bytes | what |
//! |---|---|
//! | 16 | header: `MAGIC`, token count `n`, index bits `b`, longest token in bytes |
//! | 4 × (n + 1) | offsets: token `r` is `blob[offsets[r]..offsets[r + 1]]` |
//! | 4 × 2^b | index slots: 0 empty, else rank + 1; linear probing from `hash(bytes)` |
//! | rest | blob: every token's bytes, in rank order |
//!
//! This file is also compiled into `build.rs` (`#[path]`), so the table is written and read by
//! one definition of its layout and hash.

/// The table's first four bytes; a table from another layout is refused, not misread.
pub const MAGIC: [u8; 4] = *b"MXR1";

const HEADER: usize = 16;

/// Hash of a token's bytes: FxHash's multiply-rotate over 8-byte words, then the length. The
/// index is taken from the top bits, where the multiplications mix best.
pub fn hash(bytes: &[u8]) -> u64 {
    const K: u64 = 0x517c_c1b7_2722_0a95;
    let mut h: u64 = 0;
    let mut chunks = bytes.chunks_exact(8);
    for chunk in &mut chunks {
        let mut word = [0u8; 8];
        word.copy_from_slice(chunk);
        h = (h.rotate_left(5) ^ u64::from_le_bytes(word)).wrapping_mul(K);
    }
    let tail = chunks.remainder();
    if !tail.is_empty() {
        let mut word = [0u8; 8];
        word[..tail.len()].copy_from_slice(tail);
        h = (h.rotate_left(5) ^ u64::from_le_bytes(word)).wrapping_mul(K);
    }
    (h.rotate_left(5) ^ bytes.len() as u64).wrapping_mul(K)
}

/// The table for `tokens`, `tokens[r]` being the bytes of rank `r`. Used by `build.rs`.
#[allow(dead_code)]
pub fn build(tokens: &[Vec<u8>]) -> Vec<u8> {
    let n = tokens.len();
    // At most half full, so a miss (the common case while merging) ends after a probe or two.
    let bits = (2 * n).next_power_of_two().trailing_zeros().max(4);
    let slots = 1usize << bits;
    let longest = tokens.iter().map(Vec::len).max().unwrap_or(0);
    let blob_len: usize = tokens.iter().map(Vec::len).sum();
    let mut out = Vec::with_capacity(HEADER + 4 * (n + 1) + 4 * slots + blob_len);
    out.extend_from_slice(&MAGIC);
    for v in [n, bits as usize, longest] {
        out.extend_from_slice(&to_u32(v).to_le_bytes());
    }
    let mut offset = 0;
    out.extend_from_slice(&0u32.to_le_bytes());
    for token in tokens {
        offset += token.len();
        out.extend_from_slice(&to_u32(offset).to_le_bytes());
    }
    let mut index = vec![0u32; slots];
    let mask = slots - 1;
    for (rank, token) in tokens.iter().enumerate() {
        let mut i = (hash(token) >> (64 - bits)) as usize;
        while index[i] != 0 {
            i = (i + 1) & mask;
        }
        index[i] = to_u32(rank + 1);
    }
    for slot in index {
        out.extend_from_slice(&slot.to_le_bytes());
    }
    for token in tokens {
        out.extend_from_slice(token);
    }
    out
}

#[allow(dead_code)]
fn to_u32(v: usize) -> u32 {
    u32::try_from(v).unwrap_or(u32::MAX)
}

/// A table read in place (see the module's layout).
#[derive(Debug, Clone, Copy)]
pub struct Ranks<'a> {
    offsets: &'a [u8],
    index: &'a [u8],
    blob: &'a [u8],
    len: usize,
    bits: u32,
    longest: usize,
}

#[allow(dead_code)]
impl<'a> Ranks<'a> {
    /// The table in `bytes`, or `None` if it is not one (wrong magic, truncated, or offsets
    /// past its end).
    pub fn parse(bytes: &'a [u8]) -> Option<Self> {
        let (header, rest) = bytes.split_at_checked(HEADER)?;
        if header[..4] != MAGIC {
            return None;
        }
        let field = |i: usize| read_u32(header, i);
        let (len, bits, longest) = (field(1), field(2) as u32, field(3));
        if !(4..=31).contains(&bits) || len >= (1 << bits) {
            return None;
        }
        let (offsets, rest) = rest.split_at_checked(4 * (len + 1))?;
        let (index, blob) = rest.split_at_checked(4 << bits)?;
        if read_u32(offsets, len) != blob.len() {
            return None;
        }
        Some(Ranks {
            offsets,
            index,
            blob,
            len,
            bits,
            longest,
        })
    }

    /// Tokens in the vocabulary.
    pub fn len(&self) -> usize {
        self.len
    }

    /// The bytes of token `rank`.
    pub fn token(&self, rank: u32) -> &'a [u8] {
        let r = rank as usize;
        let (start, end) = (read_u32(self.offsets, r), read_u32(self.offsets, r + 1));
        self.blob.get(start..end).unwrap_or_default()
    }

    /// The rank of the token whose bytes are `piece`, if there is one.
    #[inline]
    pub fn get(&self, piece: &[u8]) -> Option<u32> {
        if piece.is_empty() || piece.len() > self.longest {
            return None;
        }
        let mask = (1usize << self.bits) - 1;
        let mut i = (hash(piece) >> (64 - self.bits)) as usize;
        loop {
            let slot = read_u32(self.index, i);
            if slot == 0 {
                return None;
            }
            let rank = (slot - 1) as u32;
            if self.token(rank) == piece {
                return Some(rank);
            }
            i = (i + 1) & mask;
        }
    }
}

#[inline]
fn read_u32(bytes: &[u8], i: usize) -> usize {
    bytes
        .get(4 * i..4 * i + 4)
        .and_then(|b| b.try_into().ok())
        .map_or(0, |b| u32::from_le_bytes(b) as usize)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let tokens: Vec<Vec<u8>> = (0u8..=255)
            .map(|b| vec![b])
            .chain([b"ab".to_vec(), b"hello world".to_vec(), vec![0xe6, 0xbc]])
            .collect();
        let table = build(&tokens);
        let ranks = Ranks::parse(&table).expect("parses");
        assert_eq!(ranks.len(), tokens.len());
        for (rank, token) in tokens.iter().enumerate() {
            assert_eq!(ranks.get(token), Some(rank as u32));
            assert_eq!(ranks.token(rank as u32), token.as_slice());
        }
        assert_eq!(ranks.get(b"abc"), None);
        assert_eq!(ranks.get(b""), None);
        assert_eq!(ranks.get(b"hello world and more"), None);
    }

    #[test]
    fn refuses_what_is_not_a_table() {
        let table = build(&[b"a".to_vec(), b"b".to_vec()]);
        assert!(Ranks::parse(&table[..table.len() - 1]).is_none());
        let mut wrong = table.clone();
        wrong[0] = b'X';
        assert!(Ranks::parse(&wrong).is_none());
        assert!(Ranks::parse(b"MXR1").is_none());
    }
}
