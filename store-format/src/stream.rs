//! The training stream: batches of N tokens in a seeded shuffled order, decoded in parallel
//! ahead of the consumer through a bounded queue.
//!
//! Order: the split's chunks are shuffled (ChaCha8 seeded by `seed` and `epoch`), decoded a
//! group at a time, and their rows pass through a shuffle buffer that emits uniformly random
//! rows once it holds `shuffle_tokens`. The same options give the same batches, whatever the
//! thread count.

use crate::dtype::{ArraySpec, DType};
use crate::error::{Result, StoreError};
use crate::reader::{ChunkRef, Store};
use crossbeam_channel::{bounded, Receiver};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;
use std::sync::{Arc, Mutex};

/// Which tokens a stream yields.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Split {
    All,
    Train,
    Eval,
}

#[derive(Clone, Debug)]
pub struct StreamOptions {
    /// Arrays to decode (others are never read).
    pub arrays: Vec<String>,
    pub batch_tokens: usize,
    pub seed: u64,
    pub epoch: u64,
    pub split: Split,
    /// Fraction of chunks held out for evaluation, chosen by a hash of (shard file, chunk).
    pub eval_fraction: f64,
    /// Drop BOS rows: `flags` bit 2, or `position == 0` when the store has no flags.
    pub drop_bos: bool,
    /// Keep only rows whose `grads` are valid (`flags` bit 0).
    pub require_grads: bool,
    pub shuffle: bool,
    pub shuffle_tokens: usize,
    /// Batches decoded ahead of the consumer.
    pub prefetch: usize,
    pub drop_last: bool,
    pub verify: bool,
}

impl Default for StreamOptions {
    fn default() -> Self {
        StreamOptions {
            arrays: vec!["acts".into()],
            batch_tokens: 4096,
            seed: 0,
            epoch: 0,
            split: Split::All,
            eval_fraction: 0.01,
            drop_bos: true,
            require_grads: false,
            shuffle: true,
            shuffle_tokens: 1 << 16,
            prefetch: 4,
            drop_last: false,
            verify: true,
        }
    }
}

/// `n` rows of each requested array, in request order.
#[derive(Debug)]
pub struct Batch {
    pub n: usize,
    pub arrays: Vec<(ArraySpec, Vec<u8>)>,
    /// Where the buffers go when the batch is dropped: back to the store's streams.
    buffers: Arc<Buffers>,
}

impl Drop for Batch {
    fn drop(&mut self) {
        self.arrays
            .drain(..)
            .for_each(|(_, b)| self.buffers.keep(b));
    }
}

/// Buffers of a store's streams, handed back for reuse: batches' rows once the consumer drops
/// them, decoded chunks once their rows are in the shuffle buffer, shuffle buffers once their
/// stream ends. At Gemma-2-2B's width a batch of 4,096 rows is 19 MB, a chunk 4.7 MB and a
/// shuffle buffer 300 MB; allocated fresh, each is zeroed, and the kernel faults in and
/// clears its pages (over half the stream's CPU time on the 2-core box, `stream_rate` over a
/// store of five shuffle buffers: a training run opens a stream an epoch). Kept while the
/// store is open, at most `Buffers::KEEP` bytes.
#[derive(Default, Debug)]
pub(crate) struct Buffers(Mutex<Vec<Vec<u8>>>);

impl Buffers {
    const KEEP: usize = 4 << 30;

    /// The smallest kept buffer that holds `len` bytes without growing and is not twice as
    /// large (a shuffle buffer must not become a batch), else a new one.
    fn take(&self, len: usize) -> Vec<u8> {
        let mut kept = self.0.lock().unwrap();
        let best = (0..kept.len())
            .filter(|&i| (len..=2 * len).contains(&kept[i].capacity()))
            .min_by_key(|&i| kept[i].capacity());
        best.map(|i| kept.swap_remove(i)).unwrap_or_default()
    }

    fn keep(&self, buf: Vec<u8>) {
        let mut kept = self.0.lock().unwrap();
        let held: usize = kept.iter().map(Vec::capacity).sum();
        if buf.capacity() > 0 && held + buf.capacity() <= Self::KEEP {
            kept.push(buf);
        }
    }
}

impl Batch {
    pub fn get(&self, name: &str) -> Option<&[u8]> {
        self.arrays
            .iter()
            .find(|(a, _)| a.name == name)
            .map(|(_, b)| b.as_slice())
    }
    /// An array as f32, row-major.
    pub fn f32(&self, name: &str) -> Option<Vec<f32>> {
        let (a, b) = self.arrays.iter().find(|(a, _)| a.name == name)?;
        let mut out = Vec::new();
        a.dtype.extend_f32(b, &mut out);
        Some(out)
    }
}

/// Is this chunk held out? A hash of the shard's file name and chunk index, so the split does
/// not move when shards are added or the store is re-finalised.
pub fn is_eval_chunk(file: &str, chunk: usize, eval_fraction: f64) -> bool {
    let mut h = blake3::Hasher::new();
    h.update(file.as_bytes());
    h.update(&(chunk as u64).to_le_bytes());
    let x = u64::from_le_bytes(h.finalize().as_bytes()[..8].try_into().unwrap());
    (x as f64 / u64::MAX as f64) < eval_fraction
}

pub struct BatchStream {
    rx: Receiver<Result<Batch>>,
    /// Nanoseconds the consumer spent blocked on the queue (the trainer logs it).
    pub waited_ns: u64,
}

impl Iterator for BatchStream {
    type Item = Result<Batch>;
    fn next(&mut self) -> Option<Result<Batch>> {
        let t = std::time::Instant::now();
        let r = self.rx.recv().ok();
        self.waited_ns += t.elapsed().as_nanos() as u64;
        r
    }
}

/// The shuffle buffer. Rows stay where they were copied in (a slab per array) and `order` lists
/// them as a swap-remove buffer would hold them, so a row leaves by moving a u32 rather than
/// its bytes, and the next row in takes its place. The copies in and out run on rayon. (One
/// thread moving each row twice a batch, the second time a swap-remove in a 300 MB buffer,
/// and the trainer's late opening of each epoch: the H200 bench's steps waited 0.617 s for data
/// over 120 steps; 0.001 s with this and the epoch opened ahead.)
struct Pool {
    specs: Vec<ArraySpec>,
    /// Rows past the last in use may hold anything: only `order` and `free` rows are read.
    slabs: Vec<Vec<u8>>,
    /// Buffer position -> slab row; every slab row is in `order` or in `free`.
    order: Vec<u32>,
    free: Vec<u32>,
    /// Where buffers come from and go back to: the store's (see `Buffers`).
    buffers: Arc<Buffers>,
}

impl Drop for Pool {
    fn drop(&mut self) {
        self.slabs.drain(..).for_each(|s| self.buffers.keep(s));
    }
}

impl Pool {
    /// A pool of up to `rows` rows, reserved at once (pages are touched as rows arrive), so
    /// that a slab never moves and has the same size when the next stream takes it.
    fn new(specs: &[ArraySpec], rows: usize, buffers: Arc<Buffers>) -> Pool {
        Pool {
            specs: specs.to_vec(),
            slabs: specs
                .iter()
                .map(|a| {
                    let mut slab = buffers.take(rows * a.row_bytes());
                    slab.reserve_exact((rows * a.row_bytes()).saturating_sub(slab.len()));
                    slab
                })
                .collect(),
            order: Vec::new(),
            free: Vec::new(),
            buffers,
        }
    }

    fn len(&self) -> usize {
        self.order.len()
    }

    /// Append rows `ts` of a decoded chunk (`src[i]` holds array i), in that order.
    fn push(&mut self, src: &[Vec<u8>], ts: &[u32]) {
        let mut from = Vec::with_capacity(ts.len());
        for &t in ts {
            // A new slab row when none is free: its index is the slab's row count.
            let r = self.free.pop().unwrap_or(self.order.len() as u32);
            self.order.push(r);
            from.push((r, t));
        }
        // A slab row is written by at most one task: sorted by slab row, `from` splits the
        // slab into disjoint pieces.
        from.sort_unstable();
        let rows = self.order.len() + self.free.len();
        for ((slab, s), a) in self.slabs.iter_mut().zip(src).zip(&self.specs) {
            let rb = a.row_bytes();
            if slab.len() < rows * rb {
                slab.resize(rows * rb, 0);
            }
            scatter(slab, 0, rb, &from, s);
        }
    }

    /// Take k rows: uniformly at random (swap-remove, as `rng` draws) or the first k.
    fn emit(&mut self, k: usize, shuffle: bool, rng: &mut ChaCha8Rng) -> Batch {
        let taken: Vec<u32> = if shuffle {
            (0..k)
                .map(|_| {
                    let i = rng.gen_range(0..self.order.len());
                    self.order.swap_remove(i)
                })
                .collect()
        } else {
            self.order.drain(..k).collect()
        };
        let arrays = self
            .specs
            .iter()
            .zip(&self.slabs)
            .map(|(a, slab)| {
                let rb = a.row_bytes();
                // Every byte is written below: a kept buffer's old rows never show.
                let mut out = self.buffers.take(k * rb);
                out.resize(k * rb, 0);
                out.par_chunks_mut(rb)
                    .with_min_len(64)
                    .zip(taken.par_iter())
                    .for_each(|(dst, &r)| {
                        dst.copy_from_slice(&slab[r as usize * rb..(r as usize + 1) * rb])
                    });
                (a.clone(), out)
            })
            .collect();
        self.free.extend(&taken);
        Batch {
            n: k,
            arrays,
            buffers: self.buffers.clone(),
        }
    }
}

/// Row `t` of `src` into row `r` of `slab` for each (r, t) of `from` (sorted by r, each r
/// once), in parallel; `slab` starts at row `first`. Halving `from` splits the slab into
/// disjoint pieces.
fn scatter(slab: &mut [u8], first: usize, rb: usize, from: &[(u32, u32)], src: &[u8]) {
    if from.len() <= 64 {
        for &(r, t) in from {
            let (r, t) = (r as usize - first, t as usize);
            slab[r * rb..(r + 1) * rb].copy_from_slice(&src[t * rb..(t + 1) * rb]);
        }
        return;
    }
    let (lo_f, hi_f) = from.split_at(from.len() / 2);
    let split = hi_f[0].0 as usize;
    let (lo, hi) = slab.split_at_mut((split - first) * rb);
    rayon::join(
        || scatter(lo, first, rb, lo_f, src),
        || scatter(hi, split, rb, hi_f, src),
    );
}

impl Store {
    /// Start a stream. The store is shared with the decoding thread.
    pub fn stream(self: &Arc<Self>, opts: StreamOptions) -> Result<BatchStream> {
        if opts.batch_tokens == 0 {
            return Err(StoreError::Usage("batch_tokens must be at least 1".into()));
        }
        let wanted: Vec<usize> = opts
            .arrays
            .iter()
            .map(|n| self.array(n).map(|(i, _)| i))
            .collect::<Result<_>>()?;
        let flags = self.array("flags").ok().map(|(i, _)| i);
        let position = self.array("position").ok().map(|(i, _)| i);
        if opts.require_grads && flags.is_none() {
            return Err(StoreError::Usage(format!(
                "{}: require_grads needs a `flags` array",
                self.dir.display()
            )));
        }
        let mut chunks: Vec<ChunkRef> = self
            .chunks()
            .into_iter()
            .filter(|c| match opts.split {
                Split::All => true,
                s => {
                    is_eval_chunk(
                        &self.shards[c.shard].file_name(),
                        c.chunk,
                        opts.eval_fraction,
                    ) == (s == Split::Eval)
                }
            })
            .collect();
        let mut rng =
            ChaCha8Rng::seed_from_u64(opts.seed ^ opts.epoch.wrapping_mul(0x9E37_79B9_7F4A_7C15));
        if opts.shuffle {
            chunks.shuffle(&mut rng);
        }
        let (tx, rx) = bounded(opts.prefetch.max(1));
        let store = Arc::clone(self);
        let specs: Vec<ArraySpec> = wanted
            .iter()
            .map(|&i| store.manifest.arrays[i].clone())
            .collect();
        let mut decode: Vec<usize> = wanted.clone();
        for f in [flags, position].into_iter().flatten() {
            if !decode.contains(&f) {
                decode.push(f);
            }
        }
        let stream_rows: usize = chunks.iter().map(|&c| store.chunk_tokens(c)).sum();
        // Groups of chunks decode on a thread of their own, one group ahead of the shuffle.
        let groups = decoded_groups(&store, chunks, decode.clone(), opts.verify);
        std::thread::spawn(move || {
            let cap = if opts.shuffle {
                opts.shuffle_tokens.max(opts.batch_tokens)
            } else {
                opts.batch_tokens
            };
            // It holds below `cap` rows when a chunk comes in, and never more than the stream.
            let rows = (cap + store.manifest.chunk_tokens).min(stream_rows);
            let mut pool = Pool::new(&specs, rows, store.buffers.clone());
            let send = |b: Batch| tx.send(Ok(b)).is_ok();
            for group in groups {
                let group = match group {
                    Ok(g) => g,
                    Err(e) => {
                        let _ = tx.send(Err(e));
                        return;
                    }
                };
                for (c, cols) in group {
                    let n = store.chunk_tokens(c);
                    let col = |i: usize| decode.iter().position(|&a| a == i).map(|p| &cols[p]);
                    let (fl, pos) = (flags.and_then(col), position.and_then(col));
                    let kept: Vec<u32> = (0..n)
                        .filter(|&t| {
                            let bos = match (fl, pos) {
                                (Some(f), _) => f[t] & 4 != 0,
                                (None, Some(p)) => p[4 * t..4 * t + 4] == [0, 0, 0, 0],
                                _ => false,
                            };
                            !((opts.drop_bos && bos)
                                || (opts.require_grads && fl.is_some_and(|f| f[t] & 1 == 0)))
                        })
                        .map(|t| t as u32)
                        .collect();
                    pool.push(&cols[..wanted.len()], &kept);
                    cols.into_iter().for_each(|b| store.buffers.keep(b));
                    while pool.len() >= cap {
                        if !send(pool.emit(opts.batch_tokens, opts.shuffle, &mut rng)) {
                            return;
                        }
                    }
                }
            }
            while pool.len() >= opts.batch_tokens || (pool.len() > 0 && !opts.drop_last) {
                let k = pool.len().min(opts.batch_tokens);
                if !send(pool.emit(k, opts.shuffle, &mut rng)) {
                    return;
                }
            }
        });
        Ok(BatchStream { rx, waited_ns: 0 })
    }
}

/// A chunk's decoded arrays, in the order asked for.
type Decoded = (ChunkRef, Vec<Vec<u8>>);

/// `chunks` decoded a group at a time (twice rayon's threads, in parallel), in order, on a
/// thread of its own that runs one group ahead of the receiver; it stops at the first error
/// or when the receiver hangs up.
fn decoded_groups(
    store: &Arc<Store>,
    chunks: Vec<ChunkRef>,
    arrays: Vec<usize>,
    verify: bool,
) -> Receiver<Result<Vec<Decoded>>> {
    let (tx, rx) = bounded(1);
    let store = Arc::clone(store);
    std::thread::spawn(move || {
        let group = rayon::current_num_threads().max(1) * 2;
        for g in chunks.chunks(group) {
            let decoded: Result<Vec<Decoded>> = g
                .par_iter()
                .map(|&c| {
                    let rows = store.chunk_tokens(c);
                    let cols = arrays
                        .iter()
                        .map(|&a| {
                            let spec = &store.manifest.arrays[a];
                            let mut buf = store.buffers.take(rows * spec.row_bytes());
                            store.shards[c.shard].read_block_into(c.chunk, a, verify, &mut buf)?;
                            Ok(buf)
                        })
                        .collect::<Result<Vec<_>>>()?;
                    Ok((c, cols))
                })
                .collect();
            let failed = decoded.is_err();
            if tx.send(decoded).is_err() || failed {
                return;
            }
        }
    });
    rx
}

/// Convenience for tests and tools: rows of a float array as f32.
pub fn to_f32(dtype: DType, bytes: &[u8]) -> Vec<f32> {
    let mut v = Vec::new();
    dtype.extend_f32(bytes, &mut v);
    v
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dtype::Codec;

    /// A stream whose buffers come from the store's stash (holding another stream's batches,
    /// chunks and shuffle buffers, of other sizes, and their old bytes) gives the batches a
    /// fresh store handle gives.
    #[test]
    fn streams_on_reused_buffers_give_the_same_batches() {
        let tmp = tempfile::tempdir().unwrap();
        let specs = vec![
            ArraySpec::new("acts", DType::Bf16, 5, Codec::Expsplit),
            ArraySpec::new("grads", DType::F32, 3, Codec::Bytesplit),
        ];
        let opts = crate::WriterOptions {
            chunk_tokens: 16,
            shard_tokens: 64,
            ..Default::default()
        };
        let mut w = crate::StoreWriter::create(tmp.path(), specs, opts).unwrap();
        let mut rng = ChaCha8Rng::seed_from_u64(9);
        let mut bytes = |n: usize| (0..n).map(|_| rng.gen()).collect::<Vec<u8>>();
        let (acts, grads) = (bytes(201 * 10), bytes(201 * 12));
        w.append(&[&acts, &grads]).unwrap();
        w.finish().unwrap();
        let batches = |store: &Arc<Store>, arrays: &[&str], batch_tokens: usize, epoch: u64| {
            let opts = StreamOptions {
                arrays: arrays.iter().map(|a| a.to_string()).collect(),
                batch_tokens,
                epoch,
                shuffle_tokens: 50,
                ..Default::default()
            };
            store
                .stream(opts)
                .unwrap()
                .map(|b| b.unwrap().arrays.iter().flat_map(|a| a.1.clone()).collect())
                .collect::<Vec<Vec<u8>>>()
        };
        let fresh = |epoch| {
            let store = Arc::new(Store::open(tmp.path()).unwrap());
            batches(&store, &["acts", "grads"], 7, epoch)
        };
        let store = Arc::new(Store::open(tmp.path()).unwrap());
        for epoch in 0..3 {
            batches(&store, &["grads"], 13, epoch + 10);
            assert!(!store.buffers.0.lock().unwrap().is_empty());
            assert_eq!(batches(&store, &["acts", "grads"], 7, epoch), fresh(epoch));
        }
        assert_ne!(fresh(0), fresh(1));
    }

    /// The pool against the buffer it replaced, whose rows moved by swap-remove: the same rows
    /// in the same batches, through pushes of varied sizes (more than `scatter` splits), freed
    /// places refilled, shuffled and in order. Row bytes name their source row.
    #[test]
    fn the_pool_emits_what_a_swap_remove_buffer_emits() {
        let specs = vec![
            ArraySpec::new("a", DType::U32, 3, Codec::Raw),
            ArraySpec::new("b", DType::U8, 1, Codec::Raw),
        ];
        for shuffle in [true, false] {
            let mut pool = Pool::new(&specs, 0, Default::default());
            let mut reference: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
            let (mut rng, mut ref_rng) =
                (ChaCha8Rng::seed_from_u64(7), ChaCha8Rng::seed_from_u64(7));
            let mut sizes = ChaCha8Rng::seed_from_u64(1);
            let mut next = 0u32;
            for _ in 0..40 {
                let n = sizes.gen_range(0..300usize);
                // A chunk of 2n rows, each filled with its own number, every other one kept.
                let a: Vec<u8> = (next..next + 2 * n as u32)
                    .flat_map(|i| [i; 3])
                    .flat_map(u32::to_le_bytes)
                    .collect();
                next += 2 * n as u32;
                let b: Vec<u8> = (0..2 * n).map(|i| i as u8).collect();
                let kept: Vec<u32> = (0..n as u32).map(|i| 2 * i + 1).collect();
                for &t in &kept {
                    let t = t as usize;
                    reference.push((a[12 * t..12 * t + 12].to_vec(), vec![b[t]]));
                }
                pool.push(&[a, b], &kept);
                let k = sizes.gen_range(1..200usize).min(pool.len());
                if k == 0 {
                    continue;
                }
                let got = pool.emit(k, shuffle, &mut rng);
                let want: Vec<(Vec<u8>, Vec<u8>)> = (0..k)
                    .map(|_| match shuffle {
                        true => {
                            let i = ref_rng.gen_range(0..reference.len());
                            reference.swap_remove(i)
                        }
                        false => reference.remove(0),
                    })
                    .collect();
                assert_eq!(got.n, k);
                assert_eq!(
                    got.arrays[0].1,
                    want.iter().flat_map(|r| r.0.clone()).collect::<Vec<_>>()
                );
                assert_eq!(
                    got.arrays[1].1,
                    want.iter().flat_map(|r| r.1.clone()).collect::<Vec<_>>()
                );
                assert_eq!(pool.len(), reference.len());
            }
        }
    }
}
