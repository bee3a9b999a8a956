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

// f(i, j) for each kept entry of this thread's run i0.. (shorter at the end), in order; j is
// entry i's column.
template <typename T, typename F>
__device__ __forceinline__ void sel_run(const T *p, long long n, long long width, long long c,
                                        const float *thr, float cut, long long i0, F f) {
  constexpr int W = PackLen<T>::n;
  long long j = i0 % width;
  if (i0 + SEL_RUN <= n && aligned(p + i0, 16)) {
#pragma unroll
    for (int q = 0; q < SEL_RUN / W; q++) {
      const Pack<T, W> v = pack_at<T, W>(p + i0, q);
#pragma unroll
      for (int k = 0; k < W; k++) {
        if (sel_kept(v.v[k], j, c, thr, cut)) f(i0 + q * W + k, j);
        if (++j == width) j = 0;
      }
    }
  } else {
    for (long long i = i0; i < n && i < i0 + SEL_RUN; i++) {
      if (sel_kept(p[i], j, c, thr, cut)) f(i, j);
      if (++j == width) j = 0;
    }
  }
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
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int m = sel_count_run(p, n, width, c, thr, cut);
  // Inclusive sum of m over the warp's lanes up to this one, then over the warps before.
  int before = m;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const int y = from_lane(before, lane >= o ? lane - o : lane);
    if (lane >= o) before += y;
  }
  if (lane == 31) warps[warp] = before;
  __syncthreads();
  long long at = starts[blockIdx.x] + before - m;
  for (int w = 0; w < warp; w++) at += warps[w];
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
