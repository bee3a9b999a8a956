//! Streaming store writer: the extractor appends batches of rows; full chunks are compressed
//! in parallel and written in order; every `shard_tokens` a shard is committed to the manifest.

use crate::dtype::ArraySpec;
use crate::error::{Result, StoreError};
use crate::manifest::{self, Manifest};
use crate::shard::{EncodedChunk, ShardHeader, ShardInfo, ShardWriter, SHARD_EXT};
use rayon::prelude::*;
use std::path::{Path, PathBuf};

#[derive(Clone, Debug)]
pub struct WriterOptions {
    /// Rows per chunk, the unit of random access and of checksums.
    pub chunk_tokens: usize,
    /// Rows per shard; rounded up to whole chunks.
    pub shard_tokens: u64,
    pub level: i32,
    /// Names this writer's shards (`<writer>-<seq>.dmss`); distinct per SLURM task.
    pub writer: String,
    /// Chunks compressed at once; bounds memory to about this many chunks of raw rows.
    pub parallel_chunks: usize,
    pub provenance: serde_json::Map<String, serde_json::Value>,
}

impl Default for WriterOptions {
    fn default() -> Self {
        WriterOptions {
            chunk_tokens: 1024,
            shard_tokens: 1 << 18,
            level: 3,
            writer: "w0000".into(),
            parallel_chunks: 2 * rayon::current_num_threads(),
            provenance: Default::default(),
        }
    }
}

pub struct StoreWriter {
    dir: PathBuf,
    header: ShardHeader,
    shard_tokens: u64,
    parallel_chunks: usize,
    /// Raw rows waiting to be chunked, one buffer per array.
    pending: Vec<Vec<u8>>,
    pending_rows: usize,
    current: Option<ShardWriter>,
    next_seq: u64,
    committed: Vec<ShardInfo>,
}

impl StoreWriter {
    /// Open `dir` for appending (created if missing). Shard numbering continues after this
    /// writer's committed shards; its leftover `.tmp` files (a killed run) are removed.
    pub fn create(dir: &Path, arrays: Vec<ArraySpec>, opts: WriterOptions) -> Result<StoreWriter> {
        if !manifest::valid_writer_name(&opts.writer) {
            return Err(StoreError::Usage(format!(
                "writer name {:?} must be 1-32 of [A-Za-z0-9_]",
                opts.writer
            )));
        }
        std::fs::create_dir_all(dir).map_err(|e| StoreError::io(dir, e))?;
        let header = ShardHeader {
            chunk_tokens: opts.chunk_tokens,
            level: opts.level,
            writer: opts.writer.clone(),
            seq: 0,
            arrays,
            provenance: opts.provenance.clone(),
        };
        header
            .check()
            .map_err(|e| StoreError::Usage(format!("{}: {e}", dir.display())))?;
        if !header.arrays.iter().any(|a| a.name == "acts") {
            return Err(StoreError::Usage("a store needs an `acts` array".into()));
        }
        if Manifest::path(dir).exists() {
            let m = Manifest::load(dir)?;
            if m.arrays != header.arrays || m.chunk_tokens != header.chunk_tokens {
                return Err(StoreError::manifest(
                    Manifest::path(dir),
                    "the store holds different arrays or chunk size than this writer would write",
                ));
            }
        }
        let prefix = format!("{}-", opts.writer);
        let mut next_seq = 0;
        for name in manifest::list_shards(dir)? {
            if let Some(seq) = name
                .strip_prefix(&prefix)
                .and_then(|r| r.strip_suffix(&format!(".{SHARD_EXT}")))
            {
                if let Ok(s) = seq.parse::<u64>() {
                    next_seq = next_seq.max(s + 1);
                }
            }
        }
        for e in std::fs::read_dir(dir)
            .map_err(|e| StoreError::io(dir, e))?
            .flatten()
        {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with(&prefix) && name.ends_with(".tmp") {
                std::fs::remove_file(e.path()).map_err(|err| StoreError::io(e.path(), err))?;
            }
        }
        let chunk = opts.chunk_tokens as u64;
        Ok(StoreWriter {
            dir: dir.to_path_buf(),
            pending: vec![Vec::new(); header.arrays.len()],
            header,
            shard_tokens: opts.shard_tokens.max(1).div_ceil(chunk) * chunk,
            parallel_chunks: opts.parallel_chunks.max(1),
            pending_rows: 0,
            current: None,
            next_seq,
            committed: Vec::new(),
        })
    }

    pub fn arrays(&self) -> &[ArraySpec] {
        &self.header.arrays
    }

    /// Shards committed by this writer so far.
    pub fn committed(&self) -> &[ShardInfo] {
        &self.committed
    }

    /// Append rows: `cols[i]` holds the rows of array i (header order), little-endian.
    pub fn append(&mut self, cols: &[&[u8]]) -> Result<()> {
        if cols.len() != self.header.arrays.len() {
            return Err(StoreError::Usage(format!(
                "append got {} arrays, the store has {}",
                cols.len(),
                self.header.arrays.len()
            )));
        }
        let a0 = &self.header.arrays[0];
        let n = cols[0].len() / a0.row_bytes();
        for (a, c) in self.header.arrays.iter().zip(cols) {
            if c.len() != n * a.row_bytes() {
                return Err(StoreError::Usage(format!(
                    "array {}: {} bytes is not {n} rows of {} bytes",
                    a.name,
                    c.len(),
                    a.row_bytes()
                )));
            }
        }
        for (p, c) in self.pending.iter_mut().zip(cols) {
            p.extend_from_slice(c);
        }
        self.pending_rows += n;
        while self.pending_rows >= self.header.chunk_tokens * self.parallel_chunks {
            self.flush_chunks(false)?;
        }
        Ok(())
    }

    /// Compress and write pending full chunks (and, when `all`, the partial rest), up to the
    /// current shard's end; commits the shard when it is full.
    fn flush_chunks(&mut self, all: bool) -> Result<()> {
        let ct = self.header.chunk_tokens;
        let room = self.shard_tokens - self.current.as_ref().map_or(0, |w| w.tokens());
        let rows = if all {
            self.pending_rows
        } else {
            self.pending_rows / ct * ct
        };
        let rows = rows.min(room as usize).min(ct * self.parallel_chunks);
        if rows == 0 {
            return Ok(());
        }
        let header = &self.header;
        let pending = &self.pending;
        let encoded: Vec<EncodedChunk> = (0..rows.div_ceil(ct))
            .into_par_iter()
            .map(|c| {
                let (lo, hi) = (c * ct, ((c + 1) * ct).min(rows));
                let cols: Vec<&[u8]> = header
                    .arrays
                    .iter()
                    .zip(pending)
                    .map(|(a, p)| &p[lo * a.row_bytes()..hi * a.row_bytes()])
                    .collect();
                EncodedChunk::encode(header, &cols, hi - lo)
            })
            .collect();
        if self.current.is_none() {
            let mut h = self.header.clone();
            h.seq = self.next_seq;
            let path = self
                .dir
                .join(format!("{}-{:06}.{SHARD_EXT}", h.writer, h.seq));
            self.current = Some(ShardWriter::try_new(&path, h)?);
            self.next_seq += 1;
        }
        let w = self.current.as_mut().unwrap();
        for c in &encoded {
            w.write_chunk(c)?;
        }
        for (a, p) in self.header.arrays.iter().zip(self.pending.iter_mut()) {
            p.drain(..rows * a.row_bytes());
        }
        self.pending_rows -= rows;
        if w.tokens() >= self.shard_tokens || (all && self.pending_rows == 0) || rows % ct != 0 {
            self.commit()?;
        }
        Ok(())
    }

    fn commit(&mut self) -> Result<()> {
        if let Some(w) = self.current.take() {
            let mut h = self.header.clone();
            h.seq = self.next_seq - 1;
            let info = w.finish()?;
            manifest::commit_shard(&self.dir, &h, info.clone())?;
            self.committed.push(info);
        }
        Ok(())
    }

    /// Write everything pending and commit the last shard. Returns the shards this writer committed.
    pub fn finish(mut self) -> Result<Vec<ShardInfo>> {
        while self.pending_rows > 0 {
            self.flush_chunks(true)?;
        }
        self.commit()?;
        Ok(self.committed)
    }
}
