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
use std::sync::Arc;

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

/// Rows that pass the filters, kept as one byte buffer per array.
struct Rows {
    specs: Vec<ArraySpec>,
    data: Vec<Vec<u8>>,
    n: usize,
}

impl Rows {
    fn new(specs: &[ArraySpec]) -> Rows {
        Rows {
            specs: specs.to_vec(),
            data: vec![Vec::new(); specs.len()],
            n: 0,
        }
    }
    fn push_row(&mut self, src: &[Vec<u8>], t: usize) {
        for ((d, s), a) in self.data.iter_mut().zip(src).zip(&self.specs) {
            let rb = a.row_bytes();
            d.extend_from_slice(&s[t * rb..(t + 1) * rb]);
        }
        self.n += 1;
    }
    /// Move row `i` out (the last row takes its place).
    fn swap_take(&mut self, i: usize, out: &mut Rows) {
        let last = self.n - 1;
        for ((d, o), a) in self
            .data
            .iter_mut()
            .zip(out.data.iter_mut())
            .zip(&self.specs)
        {
            let rb = a.row_bytes();
            o.extend_from_slice(&d[i * rb..(i + 1) * rb]);
            d.copy_within(last * rb..(last + 1) * rb, i * rb);
            d.truncate(last * rb);
        }
        self.n -= 1;
        out.n += 1;
    }
    fn take_front(&mut self, k: usize) -> Rows {
        let mut out = Rows::new(&self.specs);
        for ((d, o), a) in self
            .data
            .iter_mut()
            .zip(out.data.iter_mut())
            .zip(&self.specs)
        {
            o.extend(d.drain(..k * a.row_bytes()));
        }
        self.n -= k;
        out.n = k;
        out
    }
    fn into_batch(self) -> Batch {
        Batch {
            n: self.n,
            arrays: self.specs.into_iter().zip(self.data).collect(),
        }
    }
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
        std::thread::spawn(move || {
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
            let group = rayon::current_num_threads().max(1) * 2;
            let mut buf = Rows::new(&specs);
            let cap = if opts.shuffle {
                opts.shuffle_tokens.max(opts.batch_tokens)
            } else {
                opts.batch_tokens
            };
            let send = |b: Batch| tx.send(Ok(b)).is_ok();
            for g in chunks.chunks(group) {
                let decoded: Result<Vec<Vec<Vec<u8>>>> = g
                    .par_iter()
                    .map(|&c| {
                        decode
                            .iter()
                            .map(|&a| store.shards[c.shard].read_block(c.chunk, a, opts.verify))
                            .collect::<Result<Vec<_>>>()
                    })
                    .collect();
                let decoded = match decoded {
                    Ok(d) => d,
                    Err(e) => {
                        let _ = tx.send(Err(e));
                        return;
                    }
                };
                for (c, cols) in g.iter().zip(decoded) {
                    let n = store.chunk_tokens(*c);
                    let col = |i: usize| decode.iter().position(|&a| a == i).map(|p| &cols[p]);
                    let (fl, pos) = (flags.and_then(col), position.and_then(col));
                    for t in 0..n {
                        let bos = match (fl, pos) {
                            (Some(f), _) => f[t] & 4 != 0,
                            (None, Some(p)) => p[4 * t..4 * t + 4] == [0, 0, 0, 0],
                            _ => false,
                        };
                        if (opts.drop_bos && bos)
                            || (opts.require_grads && fl.is_some_and(|f| f[t] & 1 == 0))
                        {
                            continue;
                        }
                        buf.push_row(&cols[..wanted.len()], t);
                    }
                    while buf.n >= cap {
                        let b = emit(&mut buf, opts.batch_tokens, opts.shuffle, &mut rng);
                        if !send(b) {
                            return;
                        }
                    }
                }
            }
            while buf.n >= opts.batch_tokens || (buf.n > 0 && !opts.drop_last) {
                let k = buf.n.min(opts.batch_tokens);
                let b = emit(&mut buf, k, opts.shuffle, &mut rng);
                if !send(b) {
                    return;
                }
            }
        });
        Ok(BatchStream { rx, waited_ns: 0 })
    }
}

fn emit(buf: &mut Rows, k: usize, shuffle: bool, rng: &mut ChaCha8Rng) -> Batch {
    if !shuffle {
        return buf.take_front(k).into_batch();
    }
    let mut out = Rows::new(&buf.specs);
    for _ in 0..k {
        let i = rng.gen_range(0..buf.n);
        buf.swap_take(i, &mut out);
    }
    out.into_batch()
}

/// Convenience for tests and tools: rows of a float array as f32.
pub fn to_f32(dtype: DType, bytes: &[u8]) -> Vec<f32> {
    let mut v = Vec::new();
    dtype.extend_f32(bytes, &mut v);
    v
}
