//! Streaming store writer: the extractor appends batches of rows; full chunks are compressed
//! in parallel and written in order; every `shard_tokens` a shard is committed to the manifest.

use crate::dtype::ArraySpec;
use crate::error::{Result, StoreError};
use crate::manifest::{self, Manifest};
use crate::shard::{EncodedChunk, Shard, ShardHeader, ShardInfo, ShardWriter, SHARD_EXT};
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
    /// Rows handed to the open shard, while one is open.
    current: Option<u64>,
    next_seq: u64,
    shards: ShardThread,
    /// Rows in this writer's shards already in the store when it was opened.
    resumed_rows: u64,
    adopted: Vec<String>,
}

impl StoreWriter {
    /// Open `dir` for appending (created if missing). Shard numbering continues after this
    /// writer's committed shards; its leftover `.tmp` files (a killed run) are removed, and its
    /// complete shards that the manifest lacks (a kill between a shard's rename and the
    /// manifest update, or an update lost without file locking) are added to it, so a resumed
    /// run skips their rows instead of writing them twice.
    pub fn create(dir: &Path, arrays: Vec<ArraySpec>, opts: WriterOptions) -> Result<StoreWriter> {
        if !manifest::valid_writer_name(&opts.writer) {
            return Err(StoreError::Usage(format!(
                "writer name {:?} must be 1-32 of [A-Za-z0-9_]",
                opts.writer
            )));
        }
        if !dir.is_dir() {
            std::fs::create_dir_all(dir).map_err(|e| StoreError::io(dir, e))?;
            if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
                crate::sync_dir(parent)?;
            }
        }
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
        let existing = if Manifest::path(dir).exists() {
            Some(Manifest::load(dir)?)
        } else {
            None
        };
        if let Some(m) = &existing {
            if m.arrays != header.arrays || m.chunk_tokens != header.chunk_tokens {
                return Err(StoreError::manifest(
                    Manifest::path(dir),
                    "the store holds different arrays or chunk size than this writer would write",
                ));
            }
        }
        let prefix = format!("{}-", opts.writer);
        let mut next_seq = 0;
        let mut own = Vec::new();
        for name in manifest::list_shards(dir)? {
            if let Some(seq) = name
                .strip_prefix(&prefix)
                .and_then(|r| r.strip_suffix(&format!(".{SHARD_EXT}")))
            {
                if let Ok(s) = seq.parse::<u64>() {
                    next_seq = next_seq.max(s + 1);
                    own.push(name);
                }
            }
        }
        let (adopted, resumed_rows) = adopt(dir, existing.as_ref(), &own, &header)?;
        let partial = format!("{}{}.", crate::partial::PREFIX, opts.writer);
        for e in std::fs::read_dir(dir)
            .map_err(|e| StoreError::io(dir, e))?
            .flatten()
        {
            let name = e.file_name().to_string_lossy().into_owned();
            if (name.starts_with(&prefix) || name.starts_with(&partial)) && name.ends_with(".tmp") {
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
            shards: ShardThread::start(dir.to_path_buf()),
            resumed_rows,
            adopted,
        })
    }

    /// Rows this writer had written before (its shards in the store when it was opened):
    /// where a resumed producer starts.
    pub fn resumed_rows(&self) -> u64 {
        self.resumed_rows
    }

    /// This writer's shards that were on disk but not in the manifest, added when it opened.
    pub fn adopted(&self) -> &[String] {
        &self.adopted
    }

    pub fn arrays(&self) -> &[ArraySpec] {
        &self.header.arrays
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
        let room = self.shard_tokens - self.current.unwrap_or(0);
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
            self.shards
                .send(ToShards::Open(Box::new(ShardWriter::try_new(&path, h)?)))?;
            self.next_seq += 1;
        }
        self.shards.send(ToShards::Chunks(encoded))?;
        let written = self.current.get_or_insert(0);
        *written += rows as u64;
        let full = *written >= self.shard_tokens;
        for (a, p) in self.header.arrays.iter().zip(self.pending.iter_mut()) {
            p.drain(..rows * a.row_bytes());
        }
        self.pending_rows -= rows;
        if full || (all && self.pending_rows == 0) || rows % ct != 0 {
            self.commit()?;
        }
        Ok(())
    }

    /// Close the current shard: the shard thread hands it to the committer.
    fn commit(&mut self) -> Result<()> {
        if self.current.take().is_some() {
            let mut h = self.header.clone();
            h.seq = self.next_seq - 1;
            self.shards.send(ToShards::Commit(h))?;
        }
        Ok(())
    }

    /// Write everything pending, commit the last shard and wait for every commit. Returns the
    /// shards this writer committed.
    pub fn finish(mut self) -> Result<Vec<ShardInfo>> {
        while self.pending_rows > 0 {
            self.flush_chunks(true)?;
        }
        self.commit()?;
        self.shards.wait()
    }
}

/// What the shard thread is handed, in order.
enum ToShards {
    /// The next shard, its file created (so a bad path fails at once, on the caller).
    Open(Box<ShardWriter>),
    /// Encoded chunks for the open shard.
    Chunks(Vec<EncodedChunk>),
    /// The open shard is complete: to the committer.
    Commit(ShardHeader),
}

/// The shard thread writes encoded chunks into the open shard, so that the next chunks encode
/// while these are written: on the caller, the writes (the kernel's copy into the page cache,
/// the file's BLAKE3) held rayon's threads idle between groups of chunks, a quarter of
/// `writer_rate`'s CPU time on the 2-core box and a part that did not shrink with more cores.
/// It hands finished shards to the committer, a thread of its own: footer, fsync, rename,
/// manifest. The fsync of a 1.6 GB shard takes seconds on some disks, and on the writer's
/// thread the extraction waited for it: 8.7 of 42.4 s over 1M tokens of Gemma-2-2B shapes on
/// an H100 host. One group of chunks waits while another is written, one finished shard while
/// another commits, so memory stays bounded.
type ShardThread = Worker<ToShards>;

impl ShardThread {
    fn start(dir: PathBuf) -> ShardThread {
        Worker::spawn(move |rx| {
            let mut committer = Worker::spawn(move |rx| {
                let mut committed = Vec::new();
                for (w, h) in rx {
                    let info = ShardWriter::finish(w)?;
                    manifest::commit_shard(&dir, &h, info.clone())?;
                    committed.push(info);
                }
                Ok(committed)
            });
            let mut open = None;
            for m in rx {
                match m {
                    ToShards::Open(w) => open = Some(w),
                    ToShards::Chunks(chunks) => {
                        let w = open.as_mut().expect("a shard is open before its chunks");
                        chunks.iter().try_for_each(|c| w.write_chunk(c))?;
                    }
                    ToShards::Commit(h) => {
                        let w = open.take().expect("a shard is open before its commit");
                        committer.send((*w, h))?;
                    }
                }
            }
            committer.wait()
        })
    }
}

/// A thread that takes messages in order through a queue of one; the first error ends it and
/// comes back from the next `send` or from `wait`.
struct Worker<M> {
    tx: Option<crossbeam_channel::Sender<M>>,
    thread: Option<std::thread::JoinHandle<Result<Vec<ShardInfo>>>>,
}

impl<M: Send + 'static> Worker<M> {
    fn spawn(
        work: impl FnOnce(crossbeam_channel::Receiver<M>) -> Result<Vec<ShardInfo>> + Send + 'static,
    ) -> Worker<M> {
        let (tx, rx) = crossbeam_channel::bounded::<M>(1);
        Worker {
            tx: Some(tx),
            thread: Some(std::thread::spawn(move || work(rx))),
        }
    }

    fn send(&mut self, m: M) -> Result<()> {
        let tx = self.tx.as_ref().expect("worker open until wait");
        match tx.send(m) {
            Ok(()) => Ok(()),
            // The thread ended on an error: that error, not the failed send.
            Err(_) => self.wait().map(|_| ()),
        }
    }

    /// Close the queue and wait for the thread: what it returns, or its first error.
    fn wait(&mut self) -> Result<Vec<ShardInfo>> {
        drop(self.tx.take());
        match self.thread.take() {
            Some(t) => t.join().unwrap_or_else(|p| std::panic::resume_unwind(p)),
            None => Err(StoreError::Usage(
                "the store writer was already finished".into(),
            )),
        }
    }
}

impl<M> Drop for Worker<M> {
    /// A writer dropped without `finish` (an error upstream) still completes the shards it
    /// handed over, so none is left half-committed by the process exiting under it; the open
    /// one stays a `.tmp` file, which the next writer of this name removes.
    fn drop(&mut self) {
        drop(self.tx.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Add `own` shards missing from the manifest to it. A shard is renamed into place only
/// complete and fsynced, so it is whole; it must come from the same producer (provenance).
/// Returns the names added and the rows in all of `own`, counted from the files' entries, not
/// from the manifest after the additions (without file locking another writer's update can
/// drop an entry again).
fn adopt(
    dir: &Path,
    manifest: Option<&Manifest>,
    own: &[String],
    header: &ShardHeader,
) -> Result<(Vec<String>, u64)> {
    let listed: std::collections::HashMap<&str, u64> = manifest
        .map(|m| {
            m.shards
                .iter()
                .map(|s| (s.file.as_str(), s.tokens))
                .collect()
        })
        .unwrap_or_default();
    let (mut adopted, mut rows) = (Vec::new(), 0);
    for name in own {
        if let Some(tokens) = listed.get(name.as_str()) {
            rows += tokens;
            continue;
        }
        let path = dir.join(name);
        let shard = Shard::open(&path)?;
        if shard.meta.header.provenance != header.provenance {
            return Err(StoreError::manifest(
                &path,
                "a shard of this writer missing from the manifest, written by another run (its provenance differs); move it away or use a new directory",
            ));
        }
        manifest::commit_shard(dir, &shard.meta.header, manifest::entry_of(&shard))?;
        rows += shard.meta.n_tokens;
        adopted.push(name.clone());
    }
    Ok((adopted, rows))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Codec, DType};

    fn opts(provenance: &str) -> WriterOptions {
        let mut p = serde_json::Map::new();
        p.insert("run".into(), provenance.into());
        WriterOptions {
            chunk_tokens: 4,
            shard_tokens: 8,
            provenance: p,
            ..Default::default()
        }
    }

    fn arrays() -> Vec<ArraySpec> {
        vec![ArraySpec::new("acts", DType::F32, 3, Codec::Bytesplit)]
    }

    /// 20 rows in shards of 8, 8, 4.
    fn write(dir: &Path) {
        let rows: Vec<u8> = (0..20 * 3).flat_map(|i| (i as f32).to_le_bytes()).collect();
        let mut w = StoreWriter::create(dir, arrays(), opts("a")).unwrap();
        w.append(&[&rows]).unwrap();
        assert_eq!(w.finish().unwrap().len(), 3);
    }

    /// A commit fails on the committer's thread (here the manifest's path is a directory):
    /// the writer reports it, naming the manifest, and no later shard is committed.
    #[test]
    fn a_failed_commit_comes_back_from_the_writer() {
        let tmp = tempfile::tempdir().unwrap();
        let rows: Vec<u8> = (0..20 * 3).flat_map(|i| (i as f32).to_le_bytes()).collect();
        let mut w = StoreWriter::create(tmp.path(), arrays(), opts("a")).unwrap();
        std::fs::create_dir(Manifest::path(tmp.path())).unwrap();
        let err = match w.append(&[&rows]) {
            Err(e) => e,
            Ok(()) => w.finish().unwrap_err(),
        };
        assert!(err.to_string().contains("manifest.json"), "{err}");
        assert!(Manifest::path(tmp.path()).is_dir());
    }

    /// A kill between a shard's rename and its manifest entry (or before the first manifest):
    /// reopening the writer lists the shard and resumes after its rows, not before them.
    #[test]
    fn a_shard_missing_from_the_manifest_is_adopted() {
        for lose_manifest in [false, true] {
            let tmp = tempfile::tempdir().unwrap();
            write(tmp.path());
            let whole = Manifest::load(tmp.path()).unwrap();
            if lose_manifest {
                std::fs::remove_file(Manifest::path(tmp.path())).unwrap();
            } else {
                let mut m = whole.clone();
                m.shards.pop();
                m.refresh(tmp.path()).unwrap();
                m.save(tmp.path()).unwrap();
            }
            let w = StoreWriter::create(tmp.path(), arrays(), opts("a")).unwrap();
            assert_eq!(w.resumed_rows(), 20, "lose_manifest {lose_manifest}");
            let expect: Vec<String> = if lose_manifest {
                whole.shards.iter().map(|s| s.file.clone()).collect()
            } else {
                vec![whole.shards[2].file.clone()]
            };
            assert_eq!(w.adopted(), &expect[..]);
            assert_eq!(Manifest::load(tmp.path()).unwrap(), whole);
            assert_eq!(crate::verify(tmp.path()), Vec::<String>::new());
        }
    }

    #[test]
    fn a_missing_shard_of_another_run_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        write(tmp.path());
        std::fs::remove_file(Manifest::path(tmp.path())).unwrap();
        let e = StoreWriter::create(tmp.path(), arrays(), opts("b"))
            .err()
            .unwrap()
            .to_string();
        assert!(
            e.contains("w0000-000000.dmss") && e.contains("another run"),
            "{e}"
        );
    }

    /// `store inspect` prints the first 16 hex digits: a short or non-ASCII hash is refused
    /// at load, naming the manifest, instead of panicking there.
    #[test]
    fn a_manifest_hash_that_is_not_hex_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        write(tmp.path());
        let good = Manifest::load(tmp.path()).unwrap();
        for bad in ["\u{e9}", "ABCDEF", &"0".repeat(63)] {
            let mut m = good.clone();
            m.shards[0].blake3 = bad.into();
            m.save(tmp.path()).unwrap();
            let e = Manifest::load(tmp.path()).unwrap_err().to_string();
            assert!(
                e.contains("manifest.json") && e.contains("64 lowercase hex"),
                "{e}"
            );
        }
    }
}
