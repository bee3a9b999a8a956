// Attention probabilities from raw scores in one pass each way, one warp per row of the
// [rows, T] scores (row r is query position r % T): Gemma-2's soft-cap z = c * tanh(s), the
// causal or sliding-window mask (`mask` [T, T], nonzero = masked), and the softmax, where ATen
// runs tanh, a multiply, masked_fill, a float32 softmax and a cast, and as many passes back.
// The scores come from q already divided by c (models/common.rs), so the cap needs no division.
//
// Float32 from the scores to what is stored: the probabilities, and in the backward the score
// gradient p * (dp - sum(p dp)) * c * (1 - t^2), each rounded once to the model dtype. ATen's
// chain rounds t, z and three steps of the backward to bf16 as well (z's ulp near the cap is
// 0.25); mirroring it made both kernels bound by their arithmetic (177 and 279 SASS
// instructions an element, 7.0 and 4.5 ms a batch of 8 x 1,024 on an H200). The forward keeps
// each row's (max, sum of exp), so the backward recomputes the probabilities, bit for bit as
// the forward made them, from the scores instead of a [rows, T] float32 copy.

#include "common.cuh"

// The capped score z and its tanh t (cap <= 0: no soft-cap, z = s).
__device__ __forceinline__ float attn_score(float s, float cap, float *t) {
  if (cap <= 0.f) {
    *t = 0.f;
    return s;
  }
  *t = tanhf(s);
  return *t * cap;
}

// Whether any of a pack's W positions is unmasked: a causal row's packs past the diagonal are
// skipped whole.
template <int W> __device__ __forceinline__ bool any_open(const Pack<unsigned char, W> &m) {
  bool open = false;
#pragma unroll
  for (int k = 0; k < W; k++) open |= !m.v[k];
  return open;
}

// A row of scores sr (mask row mr) in packs of W.
template <typename T, int W>
__device__ void softmax_fwd_row(const T *sr, const unsigned char *mr, T *pr, float *stats,
                                long long t_len, float cap, int lane) {
  MaxSum acc = {NEG_INF, 0.f};
  for (long long j = lane; j < t_len / W; j += 32) {
    const Pack<unsigned char, W> m = pack_at<unsigned char, W>(mr, j);
    if (!any_open(m)) continue;
    const Pack<T, W> a = pack_at<T, W>(sr, j);
    float z[W], t;
#pragma unroll
    for (int k = 0; k < W; k++) z[k] = m.v[k] ? NEG_INF : attn_score(to_f(a.v[k]), cap, &t);
    push(acc, z);
  }
  acc = warp_merge(acc);
  const float inv_s = 1.f / acc.s;
  for (long long j = lane; j < t_len / W; j += 32) {
    const Pack<unsigned char, W> m = pack_at<unsigned char, W>(mr, j);
    Pack<T, W> out;
    if (any_open(m)) {
      const Pack<T, W> a = pack_at<T, W>(sr, j);
      float t;
#pragma unroll
      for (int k = 0; k < W; k++)
        put(&out.v[k],
            m.v[k] ? 0.f : expf(attn_score(to_f(a.v[k]), cap, &t) - acc.m) * inv_s);
    } else {
#pragma unroll
      for (int k = 0; k < W; k++) put(&out.v[k], 0.f);
    }
    store_pack<T, W>(pr, j, out);
  }
  if (lane == 0) {
    stats[0] = acc.m;
    stats[1] = acc.s;
  }
}

template <typename T, int W>
__device__ void softmax_bwd_row(const T *sr, const unsigned char *mr, float m, float sum,
                                const T *dpr, T *dsr, long long t_len, float cap, int lane) {
  const float inv_s = 1.f / sum;
  float dot = 0.f;
  for (long long j = lane; j < t_len / W; j += 32) {
    const Pack<unsigned char, W> mk = pack_at<unsigned char, W>(mr, j);
    if (!any_open(mk)) continue;
    const Pack<T, W> a = pack_at<T, W>(sr, j), dp = pack_at<T, W>(dpr, j);
    float t;
#pragma unroll
    for (int k = 0; k < W; k++)
      if (!mk.v[k]) dot += expf(attn_score(to_f(a.v[k]), cap, &t) - m) * inv_s * to_f(dp.v[k]);
  }
  dot = warp_sum(dot);
  for (long long j = lane; j < t_len / W; j += 32) {
    const Pack<unsigned char, W> mk = pack_at<unsigned char, W>(mr, j);
    Pack<T, W> out;
    if (any_open(mk)) {
      const Pack<T, W> a = pack_at<T, W>(sr, j), dp = pack_at<T, W>(dpr, j);
#pragma unroll
      for (int k = 0; k < W; k++) {
        float g = 0.f, t;
        if (!mk.v[k]) {
          const float pj = expf(attn_score(to_f(a.v[k]), cap, &t) - m) * inv_s;
          g = pj * (to_f(dp.v[k]) - dot);
          if (cap > 0.f) g *= cap * (1.f - t * t);
        }
        put(&out.v[k], g);
      }
    } else {
#pragma unroll
      for (int k = 0; k < W; k++) put(&out.v[k], 0.f);
    }
    store_pack<T, W>(dsr, j, out);
  }
}

// Rows in 16-byte packs of T (their mask rows in packs of as many bytes) when they line up,
// else an element at a time. Warp-uniform, as rows are.
template <typename T>
__device__ bool scores_in_packs(const T *a, const T *b, const unsigned char *mask,
                                long long t_len) {
  return packs_fit<T>(a, t_len) && aligned(b, 16) && aligned(mask, PackLen<T>::n);
}

template <typename T>
__device__ void softcap_softmax_fwd(const T *s, const unsigned char *mask, T *p, float *stats,
                                    long long rows, long long t_len, float cap) {
  const long long row = warp_index();
  if (row >= rows) return;  // the whole warp: rows are warp-uniform
  const int lane = threadIdx.x & 31;
  const T *sr = s + row * t_len;
  T *pr = p + row * t_len;
  const unsigned char *mr = mask + (row % t_len) * t_len;
  if (scores_in_packs(s, p, mask, t_len))
    softmax_fwd_row<T, PackLen<T>::n>(sr, mr, pr, stats + 2 * row, t_len, cap, lane);
  else
    softmax_fwd_row<T, 1>(sr, mr, pr, stats + 2 * row, t_len, cap, lane);
}

template <typename T>
__device__ void softcap_softmax_bwd(const T *s, const unsigned char *mask, const float *stats,
                                    const T *dp, T *ds, long long rows, long long t_len,
                                    float cap) {
  const long long row = warp_index();
  if (row >= rows) return;
  const int lane = threadIdx.x & 31;
  const T *sr = s + row * t_len, *dpr = dp + row * t_len;
  T *dsr = ds + row * t_len;
  const unsigned char *mr = mask + (row % t_len) * t_len;
  const float m = stats[2 * row], sum = stats[2 * row + 1];
  if (scores_in_packs(s, dp, mask, t_len) && aligned(ds, 16))
    softmax_bwd_row<T, PackLen<T>::n>(sr, mr, m, sum, dpr, dsr, t_len, cap, lane);
  else
    softmax_bwd_row<T, 1>(sr, mr, m, sum, dpr, dsr, t_len, cap, lane);
}

extern "C" __global__ void softcap_softmax_fwd_bf16(const bf16 *s, const unsigned char *mask,
                                                   bf16 *p, float *stats, long long rows,
                                                   long long t_len, float cap) {
  softcap_softmax_fwd<bf16>(s, mask, p, stats, rows, t_len, cap);
}

extern "C" __global__ void softcap_softmax_fwd_f32(const float *s, const unsigned char *mask,
                                                  float *p, float *stats, long long rows,
                                                  long long t_len, float cap) {
  softcap_softmax_fwd<float>(s, mask, p, stats, rows, t_len, cap);
}

extern "C" __global__ void softcap_softmax_bwd_bf16(const bf16 *s, const unsigned char *mask,
                                                   const float *stats, const bf16 *dp, bf16 *ds,
                                                   long long rows, long long t_len, float cap) {
  softcap_softmax_bwd<bf16>(s, mask, stats, dp, ds, rows, t_len, cap);
}

extern "C" __global__ void softcap_softmax_bwd_f32(const float *s, const unsigned char *mask,
                                                  const float *stats, const float *dp, float *ds,
                                                  long long rows, long long t_len, float cap) {
  softcap_softmax_bwd<float>(s, mask, stats, dp, ds, rows, t_len, cap);
}
