//! Hostile bytes as a shard. `shard::parse` must accept or refuse them without panicking and
//! without allocating more than the input justifies.
//!
//! Random mutations almost never carry valid BLAKE3 hashes, so each input is parsed twice: as it
//! is, and with its header and footer hashes recomputed, so that mutations also reach the
//! structure checks behind the checksums (header JSON and limits, trailer, index). When that
//! parses, every block whose decoded size is small is decoded as if its hash had matched.
#![no_main]

use dmsae_store::{codec, shard};
use libfuzzer_sys::fuzz_target;
use std::path::Path;

/// Blocks that would decode to more than this are skipped (honest shards may decode to 1 GiB).
const MAX_DECODED: usize = 1 << 20;

fuzz_target!(|data: &[u8]| {
    let _ = shard::parse(Path::new("fuzz"), data);
    let fixed = with_hashes_recomputed(data);
    if let Ok(meta) = shard::parse(Path::new("fuzz"), &fixed) {
        for chunk in &meta.chunks {
            for (spec, block) in meta.header.arrays.iter().zip(&chunk.blocks) {
                if chunk.n_tokens * spec.row_bytes() <= MAX_DECODED {
                    let stored = &fixed[block.offset..block.offset + block.len];
                    let _ = codec::decode(spec, stored, chunk.n_tokens);
                }
            }
        }
    }
});

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
}

/// The input with the header hash (after `16 + H` bytes) and the footer hash (over index, stats
/// and the trailer's counts) rewritten wherever the lengths it states leave room for them.
fn with_hashes_recomputed(data: &[u8]) -> Vec<u8> {
    let mut b = data.to_vec();
    if b.len() >= 16 {
        let h = u32::from_le_bytes(b[12..16].try_into().unwrap()) as usize;
        if h.checked_add(48).is_some_and(|end| end <= b.len()) {
            let hash = blake3::hash(&b[..16 + h]);
            b[16 + h..48 + h].copy_from_slice(hash.as_bytes());
        }
    }
    if b.len() >= 72 {
        let t = b.len() - 72;
        let footer = u64_at(&b, t + 16).checked_add(u64_at(&b, t + 24)).filter(|&f| f <= t as u64);
        if let Some(f) = footer {
            let hash = blake3::hash(&b[t - f as usize..t + 32]);
            b[t + 32..t + 64].copy_from_slice(hash.as_bytes());
        }
    }
    b
}
