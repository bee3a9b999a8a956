//! One shard file: writer and defensive parser (SPEC.md, "Shard file").

use crate::codec;
use crate::dtype::ArraySpec;
use crate::error::{Result, StoreError};
use crate::stats::Stats;
use memmap2::Mmap;
use serde::{Deserialize, Serialize};
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

pub const MAGIC: &[u8; 8] = b"DMSAESHD";
pub const END_MAGIC: &[u8; 8] = b"DMSAEEND";
pub const FORMAT_VERSION: u32 = 1;
pub const MAX_HEADER_LEN: usize = 65_536;
pub const MAX_ARRAYS: usize = 32;
pub const MAX_WIDTH: usize = 1 << 20;
pub const MAX_CHUNK_TOKENS: usize = 1 << 20;
pub const MAX_BLOCK_RAW: usize = 1 << 30;
pub const SHARD_EXT: &str = "dmss";
const PREAMBLE: usize = 16;
const HASH: usize = 32;
const TRAILER: usize = 72;

/// The JSON header of a shard.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ShardHeader {
    pub chunk_tokens: usize,
    pub level: i32,
    pub writer: String,
    pub seq: u64,
    pub arrays: Vec<ArraySpec>,
    /// The producer's provenance, repeated in every shard so `finalize` can rebuild the manifest.
    #[serde(default)]
    pub provenance: serde_json::Map<String, serde_json::Value>,
}

impl ShardHeader {
    /// The SPEC.md limits; `what` is the error text.
    pub fn check(&self) -> std::result::Result<(), String> {
        if self.chunk_tokens == 0 || self.chunk_tokens > MAX_CHUNK_TOKENS {
            return Err(format!(
                "chunk_tokens {} outside 1..={MAX_CHUNK_TOKENS}",
                self.chunk_tokens
            ));
        }
        if self.arrays.is_empty() || self.arrays.len() > MAX_ARRAYS {
            return Err(format!(
                "{} arrays, expected 1..={MAX_ARRAYS}",
                self.arrays.len()
            ));
        }
        for (i, a) in self.arrays.iter().enumerate() {
            if self.arrays[..i].iter().any(|b| b.name == a.name) {
                return Err(format!("array name {:?} appears twice", a.name));
            }
            if a.width == 0 || a.width > MAX_WIDTH {
                return Err(format!(
                    "array {:?}: width {} outside 1..={MAX_WIDTH}",
                    a.name, a.width
                ));
            }
            if self.chunk_tokens * a.row_bytes() > MAX_BLOCK_RAW {
                return Err(format!(
                    "array {:?}: a chunk would decode to more than {MAX_BLOCK_RAW} bytes",
                    a.name
                ));
            }
            if a.codec == crate::Codec::Expsplit && !a.dtype.is_float() {
                return Err(format!(
                    "array {:?}: expsplit needs a float dtype, not {}",
                    a.name,
                    a.dtype.name()
                ));
            }
        }
        Ok(())
    }

    pub fn index_record_len(&self) -> usize {
        8 + 40 * self.arrays.len()
    }

    pub fn stats_len(&self) -> usize {
        self.arrays
            .iter()
            .filter(|a| a.dtype.is_float())
            .map(|a| Stats::encoded_len(a.width))
            .sum()
    }
}

/// A compressed chunk, ready to be written: one block per array, and the chunk's stats.
pub struct EncodedChunk {
    pub n_tokens: usize,
    pub blocks: Vec<Vec<u8>>,
    /// Each block's BLAKE3, for the index: computed here, in the parallel part of the writer,
    /// rather than in `write_chunk`, which writes chunks one after another.
    pub hashes: Vec<blake3::Hash>,
    /// One per float array, in header order.
    pub stats: Vec<Stats>,
}

impl EncodedChunk {
    /// Compress `n` rows; `cols[i]` holds array i's rows.
    pub fn encode(header: &ShardHeader, cols: &[&[u8]], n: usize) -> EncodedChunk {
        let blocks = header
            .arrays
            .iter()
            .zip(cols)
            .map(|(a, c)| codec::encode(a, header.level, c, n))
            .collect::<Vec<_>>();
        let hashes = blocks.iter().map(|b| blake3::hash(b)).collect();
        let stats = header
            .arrays
            .iter()
            .zip(cols)
            .filter(|(a, _)| a.dtype.is_float())
            .map(|(a, c)| Stats::of_rows(a.dtype, a.width, c, n))
            .collect();
        EncodedChunk {
            n_tokens: n,
            blocks,
            hashes,
            stats,
        }
    }
}

/// What the manifest records of a committed shard.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ShardInfo {
    pub file: String,
    pub tokens: u64,
    pub bytes: u64,
    pub blake3: String,
}

/// Writes one shard to `<name>.tmp`; `finish` makes it visible under its final name.
pub struct ShardWriter {
    path: PathBuf,
    tmp: PathBuf,
    out: BufWriter<File>,
    hasher: blake3::Hasher,
    header: ShardHeader,
    index: Vec<u8>,
    stats: Vec<Stats>,
    n_chunks: u64,
    n_tokens: u64,
    bytes: u64,
    last_partial: bool,
}

impl ShardWriter {
    pub fn try_new(path: &Path, header: ShardHeader) -> Result<ShardWriter> {
        header.check().map_err(|e| StoreError::format(path, e))?;
        let tmp = path.with_extension(format!("{SHARD_EXT}.tmp"));
        let file = File::create(&tmp).map_err(|e| StoreError::io(&tmp, e))?;
        let json = serde_json::to_vec(&header).expect("header serialises");
        let mut head = Vec::with_capacity(PREAMBLE + json.len() + HASH);
        head.extend_from_slice(MAGIC);
        head.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
        head.extend_from_slice(&(json.len() as u32).to_le_bytes());
        head.extend_from_slice(&json);
        let h = blake3::hash(&head);
        head.extend_from_slice(h.as_bytes());
        let stats = header
            .arrays
            .iter()
            .filter(|a| a.dtype.is_float())
            .map(|a| Stats::empty(a.width))
            .collect();
        let mut w = ShardWriter {
            path: path.to_path_buf(),
            tmp,
            out: BufWriter::with_capacity(1 << 20, file),
            hasher: blake3::Hasher::new(),
            header,
            index: Vec::new(),
            stats,
            n_chunks: 0,
            n_tokens: 0,
            bytes: 0,
            last_partial: false,
        };
        w.put(&head)?;
        Ok(w)
    }

    fn put(&mut self, b: &[u8]) -> Result<()> {
        // On the store writer's shard thread, beside rayon's threads encoding the next chunks:
        // splitting the hash across rayon's queued it behind them.
        self.hasher.update(b);
        self.bytes += b.len() as u64;
        self.out
            .write_all(b)
            .map_err(|e| StoreError::io(&self.tmp, e))
    }

    pub fn tokens(&self) -> u64 {
        self.n_tokens
    }

    pub fn write_chunk(&mut self, c: &EncodedChunk) -> Result<()> {
        if self.last_partial || c.n_tokens == 0 || c.n_tokens > self.header.chunk_tokens {
            return Err(StoreError::Usage(format!(
                "{}: only a shard's last chunk may hold fewer than {} tokens",
                self.tmp.display(),
                self.header.chunk_tokens
            )));
        }
        self.last_partial = c.n_tokens < self.header.chunk_tokens;
        self.index
            .extend_from_slice(&(c.n_tokens as u32).to_le_bytes());
        self.index.extend_from_slice(&0u32.to_le_bytes());
        for (b, h) in c.blocks.iter().zip(&c.hashes) {
            self.index
                .extend_from_slice(&(b.len() as u64).to_le_bytes());
            self.index.extend_from_slice(h.as_bytes());
        }
        for b in &c.blocks {
            self.put(b)?;
        }
        for (s, o) in self.stats.iter_mut().zip(&c.stats) {
            s.merge(o);
        }
        self.n_chunks += 1;
        self.n_tokens += c.n_tokens as u64;
        Ok(())
    }

    /// Index, stats, trailer; fsync; rename into place; fsync the directory.
    pub fn finish(mut self) -> Result<ShardInfo> {
        if self.n_chunks == 0 {
            return Err(StoreError::Usage(format!(
                "{}: a shard needs at least one chunk",
                self.path.display()
            )));
        }
        let mut footer = std::mem::take(&mut self.index);
        for s in &self.stats {
            s.write_to(&mut footer);
        }
        let index_len = self.n_chunks as usize * self.header.index_record_len();
        for v in [
            self.n_chunks,
            self.n_tokens,
            index_len as u64,
            self.header.stats_len() as u64,
        ] {
            footer.extend_from_slice(&v.to_le_bytes());
        }
        let fh = blake3::hash(&footer);
        footer.extend_from_slice(fh.as_bytes());
        footer.extend_from_slice(END_MAGIC);
        self.put(&footer)?;
        let file = self
            .out
            .into_inner()
            .map_err(|e| StoreError::io(&self.tmp, e.into_error()))?;
        file.sync_all().map_err(|e| StoreError::io(&self.tmp, e))?;
        drop(file);
        std::fs::rename(&self.tmp, &self.path).map_err(|e| StoreError::io(&self.path, e))?;
        crate::sync_dir(self.path.parent().unwrap_or(Path::new(".")))?;
        Ok(ShardInfo {
            file: self
                .path
                .file_name()
                .unwrap()
                .to_string_lossy()
                .into_owned(),
            tokens: self.n_tokens,
            bytes: self.bytes,
            blake3: self.hasher.finalize().to_hex().to_string(),
        })
    }
}

/// Where one block lives in the file.
#[derive(Clone, Debug)]
pub struct BlockEntry {
    pub offset: usize,
    pub len: usize,
    pub hash: [u8; 32],
}

#[derive(Clone, Debug)]
pub struct ChunkEntry {
    pub first_token: u64,
    pub n_tokens: usize,
    pub blocks: Vec<BlockEntry>,
}

/// Everything in a shard but its blocks, checked as SPEC.md orders.
#[derive(Clone, Debug)]
pub struct ShardMeta {
    pub header: ShardHeader,
    pub chunks: Vec<ChunkEntry>,
    pub n_tokens: u64,
    /// One per float array, in header order.
    pub stats: Vec<Stats>,
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
}
fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
}

/// Parse a shard's structure from its bytes. Never panics, never allocates more than the
/// input justifies; `path` only names the file in errors.
pub fn parse(path: &Path, b: &[u8]) -> Result<ShardMeta> {
    let bad = |what: String| StoreError::format(path, what);
    let len = b.len();
    if len < PREAMBLE + 2 + HASH + TRAILER {
        return Err(bad(format!(
            "{len} bytes is too short to be a shard (truncated?)"
        )));
    }
    if &b[..8] != MAGIC {
        return Err(bad("not a dmsae shard (wrong magic)".into()));
    }
    let version = u32_at(b, 8);
    if version != FORMAT_VERSION {
        return Err(bad(format!(
            "shard format version {version}, this build reads {FORMAT_VERSION}"
        )));
    }
    let h = u32_at(b, 12) as usize;
    if !(2..=MAX_HEADER_LEN).contains(&h) || PREAMBLE + h + HASH + TRAILER > len {
        return Err(bad(format!(
            "header length {h} does not fit a {len}-byte file"
        )));
    }
    let head_end = PREAMBLE + h;
    let got = blake3::hash(&b[..head_end]);
    if got.as_bytes() != &b[head_end..head_end + HASH] {
        return Err(StoreError::Checksum {
            path: path.into(),
            region: "header".into(),
            expected: hex(&b[head_end..head_end + HASH]),
            got: got.to_hex().to_string(),
        });
    }
    let header: ShardHeader = serde_json::from_slice(&b[PREAMBLE..head_end])
        .map_err(|e| bad(format!("header JSON: {e}")))?;
    header.check().map_err(|e| bad(format!("header: {e}")))?;
    let blocks_start = head_end + HASH;

    let t = len - TRAILER;
    if &b[t + 64..] != END_MAGIC {
        return Err(bad(
            "trailer magic missing (truncated or unfinished shard)".into()
        ));
    }
    let (n_chunks, n_tokens, index_len, stats_len) = (
        u64_at(b, t),
        u64_at(b, t + 8),
        u64_at(b, t + 16),
        u64_at(b, t + 24),
    );
    let rec = header.index_record_len() as u64;
    if n_chunks == 0 || n_chunks.checked_mul(rec) != Some(index_len) {
        return Err(bad(format!(
            "trailer: {n_chunks} chunks do not make an index of {index_len} bytes"
        )));
    }
    if stats_len != header.stats_len() as u64 {
        return Err(bad(format!(
            "trailer: stats length {stats_len}, header implies {}",
            header.stats_len()
        )));
    }
    let footer_len = index_len
        .checked_add(stats_len)
        .filter(|&f| f <= (t - blocks_start) as u64);
    let Some(footer_len) = footer_len else {
        return Err(bad(format!(
            "index and stats ({index_len} + {stats_len} bytes) do not fit the file"
        )));
    };
    let index_start = t - footer_len as usize;
    let got = blake3::hash(&b[index_start..t + 32]);
    if got.as_bytes() != &b[t + 32..t + 64] {
        return Err(StoreError::Checksum {
            path: path.into(),
            region: "index/stats/trailer".into(),
            expected: hex(&b[t + 32..t + 64]),
            got: got.to_hex().to_string(),
        });
    }

    let mut chunks = Vec::with_capacity(n_chunks as usize);
    let mut at = blocks_start;
    let mut first = 0u64;
    let arrays = header.arrays.len();
    for c in 0..n_chunks as usize {
        let r = index_start + c * rec as usize;
        let n = u32_at(b, r) as usize;
        let last = c + 1 == n_chunks as usize;
        if n == 0
            || n > header.chunk_tokens
            || (!last && n != header.chunk_tokens)
            || u32_at(b, r + 4) != 0
        {
            return Err(bad(format!(
                "chunk {c}: {n} tokens breaks the chunk rules (chunk_tokens {})",
                header.chunk_tokens
            )));
        }
        let mut blocks = Vec::with_capacity(arrays);
        for a in 0..arrays {
            let e = r + 8 + 40 * a;
            let l = u64_at(b, e);
            let end = (at as u64)
                .checked_add(l)
                .filter(|&x| x <= index_start as u64)
                .ok_or_else(|| {
                    bad(format!(
                        "chunk {c}, array {}: block of {l} bytes runs past the index",
                        header.arrays[a].name
                    ))
                })?;
            blocks.push(BlockEntry {
                offset: at,
                len: l as usize,
                hash: b[e + 8..e + 40].try_into().unwrap(),
            });
            at = end as usize;
        }
        chunks.push(ChunkEntry {
            first_token: first,
            n_tokens: n,
            blocks,
        });
        first += n as u64;
    }
    if at != index_start {
        return Err(bad(format!(
            "{} bytes between the last block and the index",
            index_start - at
        )));
    }
    if first != n_tokens {
        return Err(bad(format!(
            "chunks hold {first} tokens, trailer says {n_tokens}"
        )));
    }
    let mut stats = Vec::new();
    let mut s = index_start + index_len as usize;
    for a in header.arrays.iter().filter(|a| a.dtype.is_float()) {
        let l = Stats::encoded_len(a.width);
        stats.push(Stats::read_from(&b[s..s + l], a.width));
        s += l;
    }
    Ok(ShardMeta {
        header,
        chunks,
        n_tokens,
        stats,
    })
}

pub(crate) fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// A shard opened for reading through a memory map.
pub struct Shard {
    pub path: PathBuf,
    pub meta: ShardMeta,
    map: Mmap,
}

impl Shard {
    pub fn open(path: &Path) -> Result<Shard> {
        let file = File::open(path).map_err(|e| StoreError::io(path, e))?;
        // SAFETY: shards are immutable once renamed into place; a writer never reopens one.
        let map = unsafe { Mmap::map(&file) }.map_err(|e| StoreError::io(path, e))?;
        let meta = parse(path, &map)?;
        Ok(Shard {
            path: path.to_path_buf(),
            meta,
            map,
        })
    }

    pub fn file_name(&self) -> String {
        self.path
            .file_name()
            .map(|f| f.to_string_lossy().into_owned())
            .unwrap_or_default()
    }

    pub fn len_bytes(&self) -> usize {
        self.map.len()
    }

    pub fn bytes(&self) -> &[u8] {
        &self.map
    }

    /// The stored (compressed) bytes of one block, after checking its hash when `verify`.
    pub fn stored_block(&self, chunk: usize, array: usize, verify: bool) -> Result<&[u8]> {
        let e = &self.meta.chunks[chunk].blocks[array];
        let stored = &self.map[e.offset..e.offset + e.len];
        if verify {
            let got = blake3::hash(stored);
            if got.as_bytes() != &e.hash {
                return Err(StoreError::Checksum {
                    path: self.path.clone(),
                    region: format!(
                        "chunk {chunk}, array {}",
                        self.meta.header.arrays[array].name
                    ),
                    expected: hex(&e.hash),
                    got: got.to_hex().to_string(),
                });
            }
        }
        Ok(stored)
    }

    /// Decode one block to its rows (little-endian, row-major).
    pub fn read_block(&self, chunk: usize, array: usize, verify: bool) -> Result<Vec<u8>> {
        let mut out = Vec::new();
        self.read_block_into(chunk, array, verify, &mut out)?;
        Ok(out)
    }

    /// `read_block` into `out` (resized to the rows' bytes), whose memory is used again.
    pub fn read_block_into(
        &self,
        chunk: usize,
        array: usize,
        verify: bool,
        out: &mut Vec<u8>,
    ) -> Result<()> {
        let stored = self.stored_block(chunk, array, verify)?;
        let spec = &self.meta.header.arrays[array];
        codec::decode_into(spec, stored, self.meta.chunks[chunk].n_tokens, out).map_err(|what| {
            StoreError::Decode {
                path: self.path.clone(),
                chunk,
                array: spec.name.clone(),
                what,
            }
        })
    }

    pub fn array_index(&self, name: &str) -> Option<usize> {
        self.meta.header.arrays.iter().position(|a| a.name == name)
    }
}
