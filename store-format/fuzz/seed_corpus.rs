//! Writes small sound shards (every codec and float dtype, a short last chunk) into
//! `corpus/parse_shard/`, the seed corpus of the `parse_shard` fuzz target.
//! Run from this folder: `cargo run --release --example seed_corpus`.

use dmsae_store::{ArraySpec, Codec, DType, StoreWriter, WriterOptions};
use std::path::Path;

fn main() {
    let out = Path::new("corpus/parse_shard");
    std::fs::create_dir_all(out).unwrap();
    let tmp = std::env::temp_dir().join(format!("dmsae-fuzz-seeds-{}", std::process::id()));
    let configs = [(DType::Bf16, Codec::Expsplit), (DType::F16, Codec::Bytesplit), (DType::F32, Codec::Raw), (DType::F32, Codec::Expsplit)];
    for (i, (dtype, codec)) in configs.into_iter().enumerate() {
        let dir = tmp.join(i.to_string());
        let arrays = vec![
            ArraySpec::new("acts", dtype, 6, codec),
            ArraySpec::new("tokens", DType::U32, 1, codec),
            ArraySpec::new("loss", DType::F32, 1, Codec::Bytesplit),
        ];
        let n = 11;
        let acts: Vec<u8> = (0..n * 6 * dtype.size()).map(|k| (k * 37 % 61) as u8 ^ 0x38).collect();
        let tokens: Vec<u8> = (0..n as u32).flat_map(|t| (t * 7919).to_le_bytes()).collect();
        let loss: Vec<u8> = (0..n).flat_map(|t| (t as f32 * 0.5).to_le_bytes()).collect();
        let opts = WriterOptions { chunk_tokens: 4, writer: format!("seed{i}"), ..Default::default() };
        let mut w = StoreWriter::create(&dir, arrays, opts).unwrap();
        w.append(&[&acts, &tokens, &loss]).unwrap();
        for s in w.finish().unwrap() {
            std::fs::copy(dir.join(&s.file), out.join(&s.file)).unwrap();
            println!("{}", out.join(&s.file).display());
        }
    }
    std::fs::remove_dir_all(&tmp).unwrap();
}
