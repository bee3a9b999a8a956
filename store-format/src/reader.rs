//! Opening a store: random access by global token index, and `verify`.

use crate::dtype::ArraySpec;
use crate::error::{Result, StoreError};
use crate::manifest::{self, Manifest};
use crate::partial;
use crate::shard::{Shard, ShardMeta};
use rayon::prelude::*;
use std::ops::Range;
use std::path::{Path, PathBuf};

/// A store opened for reading. Shards are memory-mapped; nothing is decoded until asked.
pub struct Store {
    pub dir: PathBuf,
    pub manifest: Manifest,
    pub shards: Vec<Shard>,
    /// Global index of each shard's first token.
    starts: Vec<u64>,
    /// Check every block's BLAKE3 before decoding it (default on).
    pub verify: bool,
    /// Buffers its streams hand back for reuse (stream.rs).
    pub(crate) buffers: std::sync::Arc<crate::stream::Buffers>,
}

/// A chunk's place in the store.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChunkRef {
    pub shard: usize,
    pub chunk: usize,
}

impl Store {
    /// Open and cross-check manifest and shard structure (not the block contents: see `verify`).
    pub fn open(dir: &Path) -> Result<Store> {
        let manifest = Manifest::load(dir)?;
        let shards: Vec<Shard> = manifest
            .shards
            .par_iter()
            .map(|s| Shard::open(&dir.join(&s.file)))
            .collect::<Result<_>>()?;
        let mut starts = Vec::with_capacity(shards.len());
        let mut at = 0;
        for (info, sh) in manifest.shards.iter().zip(&shards) {
            let why = if sh.len_bytes() as u64 != info.bytes {
                Some(format!(
                    "is {} bytes, manifest says {}",
                    sh.len_bytes(),
                    info.bytes
                ))
            } else if sh.meta.n_tokens != info.tokens {
                Some(format!(
                    "holds {} tokens, manifest says {}",
                    sh.meta.n_tokens, info.tokens
                ))
            } else if sh.meta.header.arrays != manifest.arrays {
                Some("has other arrays than the manifest".to_string())
            } else {
                None
            };
            if let Some(why) = why {
                return Err(StoreError::manifest(
                    &sh.path,
                    format!("{why} (run `dmsae store verify`)"),
                ));
            }
            starts.push(at);
            at += info.tokens;
        }
        Ok(Store {
            dir: dir.to_path_buf(),
            manifest,
            shards,
            starts,
            verify: true,
            buffers: Default::default(),
        })
    }

    pub fn total_tokens(&self) -> u64 {
        self.manifest.total_tokens
    }

    pub fn array(&self, name: &str) -> Result<(usize, &ArraySpec)> {
        let i = self
            .manifest
            .arrays
            .iter()
            .position(|a| a.name == name)
            .ok_or_else(|| {
                let have: Vec<&str> = self
                    .manifest
                    .arrays
                    .iter()
                    .map(|a| a.name.as_str())
                    .collect();
                StoreError::Usage(format!(
                    "{}: no array {name:?} (has {})",
                    self.dir.display(),
                    have.join(", ")
                ))
            })?;
        Ok((i, &self.manifest.arrays[i]))
    }

    /// Every chunk of the store, in token order.
    pub fn chunks(&self) -> Vec<ChunkRef> {
        self.shards
            .iter()
            .enumerate()
            .flat_map(|(s, sh)| {
                (0..sh.meta.chunks.len()).map(move |c| ChunkRef { shard: s, chunk: c })
            })
            .collect()
    }

    pub fn chunk_tokens(&self, c: ChunkRef) -> usize {
        self.shards[c.shard].meta.chunks[c.chunk].n_tokens
    }

    /// Global index of a chunk's first token.
    pub fn chunk_start(&self, c: ChunkRef) -> u64 {
        self.starts[c.shard] + self.shards[c.shard].meta.chunks[c.chunk].first_token
    }

    pub fn read_chunk(&self, c: ChunkRef, array: usize) -> Result<Vec<u8>> {
        self.shards[c.shard].read_block(c.chunk, array, self.verify)
    }

    /// Rows `range` (global token indices) of one array, decoding only the chunks it touches,
    /// in parallel.
    pub fn read_rows(&self, name: &str, range: Range<u64>) -> Result<Vec<u8>> {
        let (ai, spec) = self.array(name)?;
        if range.start > range.end || range.end > self.total_tokens() {
            return Err(StoreError::Usage(format!(
                "{}: token range {}..{} outside 0..{}",
                self.dir.display(),
                range.start,
                range.end,
                self.total_tokens()
            )));
        }
        let rb = spec.row_bytes();
        let touched: Vec<(ChunkRef, u64)> = self
            .chunks()
            .into_iter()
            .map(|c| (c, self.chunk_start(c)))
            .filter(|&(c, s)| s < range.end && s + self.chunk_tokens(c) as u64 > range.start)
            .collect();
        let parts: Vec<Vec<u8>> = touched
            .par_iter()
            .map(|&(c, s)| {
                let rows = self.read_chunk(c, ai)?;
                let lo = range.start.saturating_sub(s) as usize;
                let hi = ((range.end - s) as usize).min(self.chunk_tokens(c));
                Ok(rows[lo * rb..hi * rb].to_vec())
            })
            .collect::<Result<_>>()?;
        Ok(parts.concat())
    }
}

/// Check everything: manifest against directory and shards, every hash, every block decodes,
/// stats reproduce. Returns every problem found (empty when the store is sound).
pub fn verify(dir: &Path) -> Vec<String> {
    let mut problems = Vec::new();
    let manifest = match Manifest::load(dir) {
        Ok(m) => m,
        Err(e) => return vec![e.to_string()],
    };
    match manifest::list_shards(dir) {
        Ok(names) => {
            for n in names
                .iter()
                .filter(|n| !manifest.shards.iter().any(|s| &s.file == *n))
            {
                problems.push(format!(
                    "{}: shard not in the manifest (run `dmsae store finalize`)",
                    dir.join(n).display()
                ));
            }
        }
        Err(e) => problems.push(e.to_string()),
    }
    let floats: Vec<&ArraySpec> = manifest
        .arrays
        .iter()
        .filter(|a| a.dtype.is_float())
        .collect();
    let per_shard: Vec<(Vec<String>, Option<ShardMeta>)> = manifest
        .shards
        .iter()
        .map(|info| {
            let path = dir.join(&info.file);
            let mut p = Vec::new();
            let sh = match Shard::open(&path) {
                Ok(sh) => sh,
                Err(e) => return (vec![e.to_string()], None),
            };
            let hash = blake3::Hasher::new()
                .update_rayon(sh.bytes())
                .finalize()
                .to_hex()
                .to_string();
            if hash != info.blake3 {
                p.push(format!(
                    "{}: file checksum mismatch: manifest {}, file {hash}",
                    path.display(),
                    info.blake3
                ));
            }
            if sh.len_bytes() as u64 != info.bytes {
                p.push(format!(
                    "{}: {} bytes, manifest says {}",
                    path.display(),
                    sh.len_bytes(),
                    info.bytes
                ));
            }
            if sh.meta.n_tokens != info.tokens {
                p.push(format!(
                    "{}: {} tokens, manifest says {}",
                    path.display(),
                    sh.meta.n_tokens,
                    info.tokens
                ));
            }
            if sh.meta.header.arrays != manifest.arrays
                || sh.meta.header.chunk_tokens != manifest.chunk_tokens
            {
                p.push(format!(
                    "{}: arrays or chunk size differ from the manifest",
                    path.display()
                ));
            }
            let blocks: Vec<(usize, usize)> = (0..sh.meta.chunks.len())
                .flat_map(|c| (0..sh.meta.header.arrays.len()).map(move |a| (c, a)))
                .collect();
            let errs: Vec<String> = blocks
                .par_iter()
                .filter_map(|&(c, a)| sh.read_block(c, a, true).err().map(|e| e.to_string()))
                .collect();
            p.extend(errs);
            (p, Some(sh.meta))
        })
        .collect();
    let mut metas = Vec::new();
    for (p, meta) in per_shard {
        problems.extend(p);
        metas.extend(meta);
    }
    // A shard that does not open is reported above; comparing the manifest's derived fields
    // with the rest would only add misleading problems.
    let all_opened = metas.len() == manifest.shards.len();
    let derived = all_opened
        .then(|| {
            let partials = partial::partials_of(&manifest.shards, &metas, &floats);
            partial::combine(&partials, &floats)
        })
        .flatten();
    let sum: u64 = manifest.shards.iter().map(|s| s.tokens).sum();
    if sum != manifest.total_tokens {
        problems.push(format!(
            "{}: total_tokens {} but shards hold {sum}",
            Manifest::path(dir).display(),
            manifest.total_tokens
        ));
    }
    let acts = manifest.array("acts");
    if acts.map(|a| (a.width, a.dtype, a.codec))
        != Some((manifest.d_model, manifest.dtype, manifest.codec))
    {
        problems.push(format!(
            "{}: d_model/dtype/codec disagree with the acts array",
            Manifest::path(dir).display()
        ));
    }
    let Some((level, provenance, stats)) = derived else {
        return problems;
    };
    if manifest.level != level || manifest.provenance != provenance {
        problems.push(format!(
            "{}: level or provenance differ from the shard headers (run `dmsae store finalize`)",
            Manifest::path(dir).display()
        ));
    }
    for (a, m) in floats.iter().zip(&stats) {
        if manifest.stats.get(&a.name) != Some(&m.summary()) {
            problems.push(format!(
                "{}: stats of {:?} do not match the shard footers (run `dmsae store finalize`)",
                Manifest::path(dir).display(),
                a.name
            ));
        }
    }
    problems
}
