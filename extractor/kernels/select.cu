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

// The sum of m over the block's threads before this one; `warps` a __shared__ int per warp,
// read after the barrier here with none after it: a second call needs arrays of its own.
__device__ __forceinline__ long long block_before(int m, int *warps) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  // Inclusive sum of m over the warp's lanes up to this one, then over the warps before.
  int before = m;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const int y = from_lane(before, lane >= o ? lane - o : lane);
    if (lane >= o) before += y;
  }
  if (lane == 31) warps[warp] = before;
  __syncthreads();
  long long at = before - m;
  for (int w = 0; w < warp; w++) at += warps[w];
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

#define TOP_BINS 4096
#define TOP_KEYS 0x8000u  // every key is below this
#define TOP_THREADS 256   // select_top_init and select_top_find's block
#define TOP_PER (TOP_BINS / TOP_THREADS)  // bins a thread of select_top_find

// The state the rounds pass on (long long [8]).
enum { ST_DONE, ST_LEVEL, ST_LO, ST_HI, ST_SHIFT, ST_T, ST_GT, ST_QUOTA };

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
}

// This round's histogram: keys in [lo, hi) by bins of 2^shift, keys >= hi in the last slot,
// key 0 nowhere (its count is what the rest leave; counted, about half of all entries would
// meet at one bin's atomics). A grid-stride loop over p's entries.
extern "C" __global__ void select_top_hist(const bf16 *p, long long n, long long width,
                                           long long c, const long long *st,
                                           unsigned long long *hist) {
  __shared__ unsigned h[TOP_BINS + 1];
  if (st[ST_DONE]) return;  // the same in every thread
  const unsigned lo = (unsigned)st[ST_LO], hi = (unsigned)st[ST_HI];
  const int shift = (int)st[ST_SHIFT];
  const int bins = (int)((hi - lo + (1u << shift) - 1) >> shift);
  for (int b = threadIdx.x; b < bins; b += blockDim.x) h[b] = 0;
  if (threadIdx.x == 0) h[TOP_BINS] = 0;
  __syncthreads();
  unsigned above = 0;
  const long long stride = (long long)gridDim.x * blockDim.x * SEL_RUN;
  for (long long i0 = ((long long)blockIdx.x * blockDim.x + threadIdx.x) * SEL_RUN; i0 < n;
       i0 += stride)
    top_run(p, n, width, c, i0, [&](long long, long long, unsigned k) {
      if (k >= hi)
        above++;
      else if (k >= lo && k != 0)
        atomicAdd(&h[(k - lo) >> shift], 1u);
    });
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

// Each block's count of entries with key > t and with key == t (blocks as select_count's).
extern "C" __global__ void select_top_count(const bf16 *p, long long n, long long width,
                                            long long c, const long long *st, long long *gt,
                                            long long *eq) {
  __shared__ int wg[SEL_THREADS / 32], we[SEL_THREADS / 32];
  const unsigned t = (unsigned)st[ST_T];
  const long long i0 = ((long long)blockIdx.x * blockDim.x + threadIdx.x) * SEL_RUN;
  int mg, me;
  top_run_counts(p, n, width, c, i0, t, mg, me);
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
    gt[blockIdx.x] = sg;
    eq[blockIdx.x] = se;
  }
}

// The kept entries' (row, column), in row-major order, given each block's first place among
// the entries with key > t and among those with key == t: an entry's place is the count of
// the first before it plus the count of the second, up to the quota.
extern "C" __global__ void select_top_write(const bf16 *p, long long n, long long width,
                                            long long c, const long long *st,
                                            const long long *gt_starts,
                                            const long long *eq_starts, long long *rows,
                                            long long *cols) {
  __shared__ int wg[SEL_THREADS / 32], we[SEL_THREADS / 32];
  const unsigned t = (unsigned)st[ST_T];
  const long long quota = st[ST_QUOTA];
  const long long i0 = ((long long)blockIdx.x * blockDim.x + threadIdx.x) * SEL_RUN;
  int mg, me;
  top_run_counts(p, n, width, c, i0, t, mg, me);
  long long ng = gt_starts[blockIdx.x] + block_before(mg, wg);
  long long ne = eq_starts[blockIdx.x] + block_before(me, we);
  if (i0 < n)
    top_run(p, n, width, c, i0, [&](long long i, long long j, unsigned k) {
      long long at = -1;
      if (k > t) {
        at = ng + (ne < quota ? ne : quota);
        ng++;
      } else if (k == t) {
        if (ne < quota) at = ng + ne;
        ne++;
      }
      if (at >= 0) {
        rows[at] = i / width;
        cols[at] = j;
      }
    });
}
