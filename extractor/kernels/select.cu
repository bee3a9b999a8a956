// The trainer's BatchTopK candidates (trainer/src/sae.rs, `train_entries`): the (row, column)
// of every entry of the pre-activations p [B, W] that is kept, in row-major order, as
// `nonzero` of the mask would list them. A core latent (column j < c) is kept where
// p > thr[j] and p > 0 (its JumpReLU), any other where p >= cut (the sampled cut). ATen made
// a [B, W] bool mask, then `nonzero` read it in two passes of its own and wrote int64 pairs:
// 0.81 ms of a 12.8 ms step on the H200 at the paper's sizes (268M entries).
//
// Two passes over p, no mask: select_count, each block's count of kept entries; then, given
// each block's first output place (the counts' exclusive sum), select_write puts them out.
// The cut is read on the device, so the host reads it back with the count, in one wait.
// A thread takes SEL_RUN consecutive entries (16-byte packs where p lines up), so a block's
// entries come out in order from a scan of its threads' counts, and the whole in order from
// the blocks' places: the same list every run, without atomics.

#include "common.cuh"

#define SEL_RUN 32       // entries a thread
#define SEL_THREADS 256  // threads a block (launches use this)

template <typename T>
__device__ __forceinline__ bool sel_kept(T x, long long j, long long c, const float *thr,
                                         float cut) {
  const float v = to_f(x);
  return j < c ? v > thr[j] && v > 0.f : v >= cut;
}

// f(i, j, x) for each entry x of this thread's run i0.. (shorter at the end), in order; j is
// entry i's column.
template <typename T, typename F>
__device__ __forceinline__ void run_entries(const T *p, long long n, long long width,
                                            long long i0, F f) {
  constexpr int W = PackLen<T>::n;
  long long j = i0 % width;
  if (i0 + SEL_RUN <= n && aligned(p + i0, 16)) {
#pragma unroll
    for (int q = 0; q < SEL_RUN / W; q++) {
      const Pack<T, W> v = pack_at<T, W>(p + i0, q);
#pragma unroll
      for (int k = 0; k < W; k++) {
        f(i0 + q * W + k, j, v.v[k]);
        if (++j == width) j = 0;
      }
    }
  } else {
    for (long long i = i0; i < n && i < i0 + SEL_RUN; i++) {
      f(i, j, p[i]);
      if (++j == width) j = 0;
    }
  }
}

// f(i, j) for each kept entry of this thread's run i0.., in order.
template <typename T, typename F>
__device__ __forceinline__ void sel_run(const T *p, long long n, long long width, long long c,
                                        const float *thr, float cut, long long i0, F f) {
  run_entries(p, n, width, i0, [&](long long i, long long j, T x) {
    if (sel_kept(x, j, c, thr, cut)) f(i, j);
  });
}

// The sum of m over the warp's lanes before this one (all 32 take part); *total, over all 32.
__device__ __forceinline__ int warp_before(int m, int *total) {
  const int lane = threadIdx.x & 31;
  int incl = m;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const int y = from_lane(incl, lane >= o ? lane - o : lane);
    if (lane >= o) incl += y;
  }
  *total = from_lane(incl, 31);
  return incl - m;
}

// The sum of m over the block's threads before this one; `warps` a __shared__ int per warp,
// read after the barrier here with none after it: a second call needs arrays of its own, or a
// barrier between.
__device__ __forceinline__ long long block_before(int m, int *warps) {
  int total;
  long long at = warp_before(m, &total);
  if ((threadIdx.x & 31) == 0) warps[threadIdx.x >> 5] = total;
  __syncthreads();
  for (int w = 0; w < (int)(threadIdx.x >> 5); w++) at += warps[w];
  return at;
}

// How many entries this thread keeps.
template <typename T>
__device__ __forceinline__ int sel_count_run(const T *p, long long n, long long width,
                                             long long c, const float *thr, float cut) {
  const long long i0 = ((long long)blockIdx.x * blockDim.x + threadIdx.x) * SEL_RUN;
  int m = 0;
  if (i0 < n) sel_run(p, n, width, c, thr, cut, i0, [&](long long, long long) { m++; });
  return m;
}

template <typename T>
__device__ void select_count(const T *p, long long n, long long width, long long c,
                             const float *thr, const float *cut_at, long long *counts) {
  __shared__ int warps[SEL_THREADS / 32];
  const float cut = *cut_at;
  const int m = warp_sum(sel_count_run(p, n, width, c, thr, cut));
  if ((threadIdx.x & 31) == 0) warps[threadIdx.x >> 5] = m;
  __syncthreads();
  if (threadIdx.x == 0) {
    long long s = 0;
    for (int w = 0; w < (int)(blockDim.x >> 5); w++) s += warps[w];
    counts[blockIdx.x] = s;
  }
}

template <typename T>
__device__ void select_write(const T *p, long long n, long long width, long long c,
                             const float *thr, const float *cut_at, const long long *starts,
                             long long *rows, long long *cols) {
  __shared__ int warps[SEL_THREADS / 32];
  const float cut = *cut_at;
  const int m = sel_count_run(p, n, width, c, thr, cut);
  long long at = starts[blockIdx.x] + block_before(m, warps);
  const long long i0 = ((long long)blockIdx.x * blockDim.x + threadIdx.x) * SEL_RUN;
  if (i0 < n)
    sel_run(p, n, width, c, thr, cut, i0, [&](long long i, long long j) {
      rows[at] = i / width;
      cols[at] = j;
      at++;
    });
}

extern "C" __global__ void select_count_bf16(const bf16 *p, long long n, long long width,
                                             long long c, const float *thr, const float *cut,
                                             long long *counts) {
  select_count(p, n, width, c, thr, cut, counts);
}

extern "C" __global__ void select_count_f32(const float *p, long long n, long long width,
                                            long long c, const float *thr, const float *cut,
                                            long long *counts) {
  select_count(p, n, width, c, thr, cut, counts);
}

extern "C" __global__ void select_write_bf16(const bf16 *p, long long n, long long width,
                                             long long c, const float *thr, const float *cut,
                                             const long long *starts, long long *rows,
                                             long long *cols) {
  select_write(p, n, width, c, thr, cut, starts, rows, cols);
}

extern "C" __global__ void select_write_f32(const float *p, long long n, long long width,
                                            long long c, const float *thr, const float *cut,
                                            const long long *starts, long long *rows,
                                            long long *cols) {
  select_write(p, n, width, c, thr, cut, starts, rows, cols);
}

// ---- BatchTopK without a wait for the host (`kernels::top_entries`) ----
// With bf16 pre-activations, the kept non-core entries are exactly `keep` (the k*B of
// BatchTopK), so the host knows every size and queues the step without reading anything back.
// The core's columns (j < c) are skipped: the trainer takes the core as a dense block.
// The keep-th largest key t comes from histograms on the device, then the entries with key > t
// and the first (keep - #(key > t)) with key == t in row-major order are written in row-major
// order. A key is a positive bf16's bits (1..0x7f80, ordered as the values); zero, negative
// and NaN entries share key 0, the bottom: BatchTopK keeps positive entries only, so these are
// taken (their values clamped to 0 by the trainer) only when fewer than `keep` are positive.
//
// t in at most three histogram rounds, each a pass over p; the rounds after t is found return
// at once. First TOP_BINS keys up from the sampled cut (the trainer's top-k over every 16th
// row: about 2 * keep entries reach it, so t is almost always there); failing that, keys by
// 256s, then the 256 keys of the chosen one. Integer counts summed by atomics: the same totals
// whatever their order, so the same entries every run.
//
// Counting and writing the kept entries took two more passes over p. So the first round also
// lists, for each chunk of SEL_CHUNK entries, its entries from the cut's key up (a few per
// chunk: about 2 * keep in all) in a slot of `cap`. When t is found in that round, every kept
// entry of a chunk is in its slot unless the chunk's list overflowed, and the slot kernels
// count and write from the slots; p is read again only for the chunks that overflowed (listed
// in `over`), or for all of them when t came from a later round: one pass over p, not three,
// in the usual case. The places still come from counts in chunk order, so the same list.

#define TOP_BINS 4096
#define TOP_KEYS 0x8000u  // every key is below this
#define TOP_THREADS 256   // select_top_init and select_top_find's block
#define TOP_PER (TOP_BINS / TOP_THREADS)  // bins a thread of select_top_find
#define SEL_CHUNK (SEL_THREADS * SEL_RUN)  // entries a chunk (a block's, one run a thread)
static_assert(SEL_RUN <= 32, "a run's candidates are a 32-bit mask");
static_assert(SEL_CHUNK <= 0x10000, "a slot's entry holds its place in the chunk in 16 bits");

// The state the rounds pass on (long long [ST_LEN]); ST_OVER, the overflowed chunks' count.
enum { ST_DONE, ST_LEVEL, ST_LO, ST_HI, ST_SHIFT, ST_T, ST_GT, ST_QUOTA, ST_OVER, ST_LEN };

__device__ __forceinline__ unsigned top_key(bf16 x) {
  return x >= 1u && x <= 0x7f80u ? (unsigned)x : 0u;
}

// f(i, j, key) for each entry of this thread's run i0.. outside the core's columns, in order.
template <typename F>
__device__ __forceinline__ void top_run(const bf16 *p, long long n, long long width, long long c,
                                        long long i0, F f) {
  if (c > 0)
    run_entries(p, n, width, i0, [&](long long i, long long j, bf16 x) {
      if (j >= c) f(i, j, top_key(x));
    });
  else  // no column tested: where f reads none either, the compiler drops their count
    run_entries(p, n, width, i0, [&](long long i, long long j, bf16 x) { f(i, j, top_key(x)); });
}

// The first round's range (keys from the cut up, or the whole range by 256s where the cut is
// not positive) and a zero histogram: hist [TOP_BINS + 1], its last slot the count above.
extern "C" __global__ void select_top_init(const float *cut, long long *st,
                                           unsigned long long *hist) {
  for (int b = threadIdx.x; b <= TOP_BINS; b += blockDim.x) hist[b] = 0;
  if (threadIdx.x != 0) return;
  const unsigned k = top_key(bf16_of(*cut));
  st[ST_DONE] = 0;
  st[ST_LEVEL] = k == 0 ? 1 : 0;
  st[ST_LO] = k;
  st[ST_HI] = k == 0 ? TOP_KEYS : (k + TOP_BINS < TOP_KEYS ? k + TOP_BINS : TOP_KEYS);
  st[ST_SHIFT] = k == 0 ? 8 : 0;
  st[ST_OVER] = 0;
}

// This round's histogram: keys in [lo, hi) by bins of 2^shift, keys >= hi in the last slot,
// key 0 nowhere (its count is what the rest leave; counted, about half of all entries would
// meet at one bin's atomics). The chunks in turn, grid-stride. In the first round (the cut's,
// level 0) each chunk's entries with key >= lo also go in its slot: slots [chunks * cap] as
// (place in the chunk << 16 | key), in order, their number in slot_n [chunks]; a chunk with
// more than cap goes on `over` [chunks] (in no set order) and counts in st[ST_OVER].
extern "C" __global__ void select_top_hist(const bf16 *p, long long n, long long width,
                                           long long c, long long *st,
                                           unsigned long long *hist, long long cap,
                                           unsigned *slots, int *slot_n, unsigned *over) {
  __shared__ unsigned h[TOP_BINS + 1];
  __shared__ int warps[SEL_THREADS / 32];
  if (st[ST_DONE]) return;  // the same in every thread
  const unsigned lo = (unsigned)st[ST_LO], hi = (unsigned)st[ST_HI];
  const int shift = (int)st[ST_SHIFT];
  const bool gather = st[ST_LEVEL] == 0;  // then lo >= 1
  const int bins = (int)((hi - lo + (1u << shift) - 1) >> shift);
  for (int b = threadIdx.x; b < bins; b += blockDim.x) h[b] = 0;
  if (threadIdx.x == 0) h[TOP_BINS] = 0;
  __syncthreads();
  unsigned above = 0;
  const long long chunks = (n + SEL_CHUNK - 1) / SEL_CHUNK;
  for (long long b = blockIdx.x; b < chunks; b += gridDim.x) {
    const long long i0 = b * SEL_CHUNK + (long long)threadIdx.x * SEL_RUN;
    unsigned mask = 0;  // the run's entries from lo up
    if (i0 < n)
      top_run(p, n, width, c, i0, [&](long long i, long long, unsigned k) {
        if (k >= hi)
          above++;
        else if (k >= lo && k != 0)
          atomicAdd(&h[(k - lo) >> shift], 1u);
        if (k >= lo && k != 0) mask |= 1u << (unsigned)(i - i0);
      });
    if (!gather) continue;
    const int m = __popc(mask);
    long long at = block_before(m, warps);
    if (threadIdx.x == blockDim.x - 1) {
      slot_n[b] = (int)(at + m);
      if (at + m > cap) over[atomicAdd((unsigned long long *)&st[ST_OVER], 1ull)] = (unsigned)b;
    }
    for (int q = 0; mask; q++, mask >>= 1)
      if (mask & 1) {
        if (at < cap) slots[b * cap + at] = (unsigned)(i0 + q - b * SEL_CHUNK) << 16 | top_key(p[i0 + q]);
        at++;
      }
    __syncthreads();  // warps: the next chunk's block_before writes it
  }
  above = warp_sum(above);
  if ((threadIdx.x & 31) == 0 && above) atomicAdd(&h[TOP_BINS], above);
  __syncthreads();
  for (int b = threadIdx.x; b < bins; b += blockDim.x)
    if (h[b]) atomicAdd(&hist[b], (unsigned long long)h[b]);
  if (threadIdx.x == 0 && h[TOP_BINS]) atomicAdd(&hist[TOP_BINS], (unsigned long long)h[TOP_BINS]);
}

// From this round's histogram: t (done), or the next round's range; the histogram zeroed for
// it. One block of TOP_THREADS, each thread TOP_PER bins counted from the top.
extern "C" __global__ void select_top_find(long long keep, long long *st,
                                           unsigned long long *hist) {
  __shared__ unsigned long long sums[TOP_THREADS / 32];
  __shared__ long long found[2];  // the bin where the count reaches keep, the count above it
  if (st[ST_DONE]) return;
  const unsigned lo = (unsigned)st[ST_LO], hi = (unsigned)st[ST_HI];
  const int shift = (int)st[ST_SHIFT];
  const int bins = (int)((hi - lo + (1u << shift) - 1) >> shift);
  const unsigned long long above = hist[TOP_BINS];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  // This thread's bins, top first: bins - 1 - TOP_PER t - q.
  unsigned long long mine[TOP_PER], s = 0;
#pragma unroll
  for (int q = 0; q < TOP_PER; q++) {
    const int b = bins - 1 - TOP_PER * (int)threadIdx.x - q;
    mine[q] = b >= 0 ? hist[b] : 0;
    s += mine[q];
  }
  // Exclusive sum of s over the threads before this one (those holding higher bins).
  unsigned long long incl = s;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const unsigned long long y = from_lane(incl, lane >= o ? lane - o : lane);
    if (lane >= o) incl += y;
  }
  if (lane == 31) sums[warp] = incl;
  if (threadIdx.x == 0) found[0] = -1;
  __syncthreads();
  unsigned long long before = above + incl - s;
  for (int w = 0; w < warp; w++) before += sums[w];
  const unsigned long long want = (unsigned long long)keep;
  if (before < want && before + s >= want) {
#pragma unroll
    for (int q = 0; q < TOP_PER; q++) {
      if (before + mine[q] >= want) {
        found[0] = bins - 1 - TOP_PER * (int)threadIdx.x - q;
        found[1] = (long long)before;
        break;
      }
      before += mine[q];
    }
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    unsigned long long total = above;
    for (int w = 0; w < (int)(blockDim.x >> 5); w++) total += sums[w];
    const long long b = found[0];
    if (b >= 0 && shift == 0) {  // t
      st[ST_DONE] = 1;
      st[ST_T] = lo + b;
      st[ST_GT] = found[1];
      st[ST_QUOTA] = keep - found[1];
    } else if (b >= 0) {  // the keys of bin b, one bin each
      st[ST_LEVEL] += 1;
      st[ST_LO] = lo + ((unsigned)b << shift);
      st[ST_HI] = st[ST_LO] + (1u << shift);
      st[ST_SHIFT] = 0;
    } else if (st[ST_LEVEL] == 0) {  // t is not within the cut's bins: the whole range
      st[ST_LEVEL] = 1;
      st[ST_LO] = 0;
      st[ST_HI] = TOP_KEYS;
      st[ST_SHIFT] = 8;
    } else {  // fewer than keep positive entries: t is key 0
      st[ST_DONE] = 1;
      st[ST_T] = 0;
      st[ST_GT] = (long long)total;
      st[ST_QUOTA] = keep - (long long)total;
    }
  }
  __syncthreads();
  for (int b = threadIdx.x; b <= TOP_BINS; b += blockDim.x) hist[b] = 0;
}

// Whether chunk b's kept entries are all in its slot: t came from the cut's round, and the
// chunk's list fitted.
__device__ __forceinline__ bool in_slot(const long long *st, const int *slot_n, long long cap,
                                        long long b) {
  return st[ST_LEVEL] == 0 && slot_n[b] <= cap;
}

// The chunks p must be read again for, grid-stride: f(chunk) for the overflowed ones, or for
// every chunk when t came from a later round. f ends with a barrier (its shared arrays).
template <typename F>
__device__ __forceinline__ void each_read_chunk(long long n, const long long *st,
                                                const unsigned *over, F f) {
  const bool slotted = st[ST_LEVEL] == 0;
  const long long todo = slotted ? st[ST_OVER] : (n + SEL_CHUNK - 1) / SEL_CHUNK;
  for (long long r = blockIdx.x; r < todo; r += gridDim.x) f(slotted ? (long long)over[r] : r);
}

// This thread's run's counts of entries with key > t (mg) and with key == t (me).
__device__ __forceinline__ void top_run_counts(const bf16 *p, long long n, long long width,
                                               long long c, long long i0, unsigned t, int &mg,
                                               int &me) {
  mg = me = 0;
  if (i0 < n)
    top_run(p, n, width, c, i0, [&](long long, long long, unsigned k) {
      mg += k > t;
      me += k == t;
    });
}

// Each chunk's count of entries with key > t and with key == t, for the chunks read again.
extern "C" __global__ void select_top_count(const bf16 *p, long long n, long long width,
                                            long long c, const long long *st,
                                            const unsigned *over, long long *gt, long long *eq) {
  __shared__ int wg[SEL_THREADS / 32], we[SEL_THREADS / 32];
  const unsigned t = (unsigned)st[ST_T];
  each_read_chunk(n, st, over, [&](long long b) {
    int mg, me;
    top_run_counts(p, n, width, c, b * SEL_CHUNK + (long long)threadIdx.x * SEL_RUN, t, mg, me);
    mg = warp_sum(mg);
    me = warp_sum(me);
    if ((threadIdx.x & 31) == 0) {
      wg[threadIdx.x >> 5] = mg;
      we[threadIdx.x >> 5] = me;
    }
    __syncthreads();
    if (threadIdx.x == 0) {
      long long sg = 0, se = 0;
      for (int w = 0; w < (int)(blockDim.x >> 5); w++) {
        sg += wg[w];
        se += we[w];
      }
      gt[b] = sg;
      eq[b] = se;
    }
    __syncthreads();
  });
}

// The place of an entry with key k, given the counts before it of entries with key > t (ng)
// and with key == t (ne): after those of both kinds, the ties up to the quota; -1 if not kept.
__device__ __forceinline__ long long top_place(unsigned k, unsigned t, long long ng,
                                               long long ne, long long quota) {
  if (k > t) return ng + (ne < quota ? ne : quota);
  if (k == t && ne < quota) return ng + ne;
  return -1;
}

// The kept entries' (row, column) of the chunks read again, given each chunk's first place
// among the entries with key > t and among those with key == t.
extern "C" __global__ void select_top_write(const bf16 *p, long long n, long long width,
                                            long long c, const long long *st,
                                            const unsigned *over, const long long *gt_starts,
                                            const long long *eq_starts, long long *rows,
                                            long long *cols) {
  __shared__ int wg[SEL_THREADS / 32], we[SEL_THREADS / 32];
  const unsigned t = (unsigned)st[ST_T];
  const long long quota = st[ST_QUOTA];
  each_read_chunk(n, st, over, [&](long long b) {
    const long long i0 = b * SEL_CHUNK + (long long)threadIdx.x * SEL_RUN;
    int mg, me;
    top_run_counts(p, n, width, c, i0, t, mg, me);
    long long ng = gt_starts[b] + block_before(mg, wg);
    long long ne = eq_starts[b] + block_before(me, we);
    if (i0 < n)
      top_run(p, n, width, c, i0, [&](long long i, long long j, unsigned k) {
        const long long at = top_place(k, t, ng, ne, quota);
        ng += k > t;
        ne += k == t;
        if (at >= 0) {
          rows[at] = i / width;
          cols[at] = j;
        }
      });
    __syncthreads();
  });
}

// The slotted chunks' counts, a warp a chunk (lanes over the slot's entries).
extern "C" __global__ void select_top_slot_count(const long long *st, long long chunks,
                                                 long long cap, const unsigned *slots,
                                                 const int *slot_n, long long *gt,
                                                 long long *eq) {
  const long long b = ((long long)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
  if (b >= chunks || !in_slot(st, slot_n, cap, b)) return;  // the same in the whole warp
  const unsigned t = (unsigned)st[ST_T];
  int mg = 0, me = 0;
  for (int s = threadIdx.x & 31; s < slot_n[b]; s += 32) {
    const unsigned k = slots[b * cap + s] & 0xffffu;
    mg += k > t;
    me += k == t;
  }
  mg = warp_sum(mg);
  me = warp_sum(me);
  if ((threadIdx.x & 31) == 0) {
    gt[b] = mg;
    eq[b] = me;
  }
}

// The slotted chunks' kept entries, a warp a chunk, 32 of the slot's entries a turn.
extern "C" __global__ void select_top_slot_write(const long long *st, long long chunks,
                                                 long long cap, const unsigned *slots,
                                                 const int *slot_n, const long long *gt_starts,
                                                 const long long *eq_starts, long long width,
                                                 long long *rows, long long *cols) {
  const long long b = ((long long)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
  if (b >= chunks || !in_slot(st, slot_n, cap, b)) return;  // the same in the whole warp
  const unsigned t = (unsigned)st[ST_T];  // >= the cut's key >= 1: no padding entry is kept
  const long long quota = st[ST_QUOTA];
  long long ng = gt_starts[b], ne = eq_starts[b];
  const int len = slot_n[b];
  for (int s0 = 0; s0 < len; s0 += 32) {
    const int s = s0 + (threadIdx.x & 31);
    const unsigned e = s < len ? slots[b * cap + s] : 0u, k = e & 0xffffu;
    int tg, te;
    const long long at = top_place(k, t, ng + warp_before(k > t, &tg),
                                   ne + warp_before(k == t, &te), quota);
    if (at >= 0) {
      const long long i = b * SEL_CHUNK + (e >> 16);
      rows[at] = i / width;
      cols[at] = i % width;
    }
    ng += tg;
    ne += te;
  }
}
