// Attention probabilities from raw scores in one pass each way, one warp per row of the
// [rows, T] scores (row r is query position r % T): Gemma-2's soft-cap z = c * tanh(s), the
// causal or sliding-window mask (`mask` [T, T], nonzero = masked), and the softmax, where ATen
// runs tanh, a multiply, masked_fill, a float32 softmax and a cast, and as many passes back.
// The scores come from q already divided by c (models/common.rs), so the cap needs no division.
//
// Each step rounds as that ATen sequence rounds: t and z in the model dtype, the softmax in
// float32, rounded once to the model dtype. The forward keeps each row's (max, sum of exp), so
// the backward recomputes the float32 probabilities the ATen graph would have saved, bit for bit
// as the forward made them, from the scores instead of a [rows, T] float32 copy. The backward
// is ATen's chain: softmax's p * (dp - sum(p dp)) rounded to the model dtype, zero where
// masked, times c, times 1 - t^2, each rounded.

#include "common.cuh"

// The capped score z and its tanh t (cap <= 0: no soft-cap, z = s).
template <typename T>
__device__ __forceinline__ float attn_score(float s, float cap, float *t) {
  if (cap <= 0.f) {
    *t = 0.f;
    return s;
  }
  *t = rnd<T>(tanhf(s));
  return rnd<T>(*t * cap);
}

template <typename T>
__device__ void softcap_softmax_fwd(const T *s, const unsigned char *mask, T *p, float *stats,
                                    long long rows, long long t_len, float cap) {
  const long long row = (long long)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
  if (row >= rows) return;  // the whole warp: rows are warp-uniform
  const int lane = threadIdx.x & 31;
  const T *sr = s + row * t_len;
  T *pr = p + row * t_len;
  const unsigned char *mr = mask + (row % t_len) * t_len;
  MaxSum acc = {NEG_INF, 0.f};
  float t;
  for (long long j = lane; j < t_len; j += 32) {
    if (mr[j]) continue;
    const float z = attn_score<T>(to_f(sr[j]), cap, &t);
    push(acc, z);
  }
  acc = warp_merge(acc);
  for (long long j = lane; j < t_len; j += 32) {
    const float v = mr[j] ? 0.f : expf(attn_score<T>(to_f(sr[j]), cap, &t) - acc.m) / acc.s;
    put(&pr[j], v);
  }
  if (lane == 0) {
    stats[2 * row] = acc.m;
    stats[2 * row + 1] = acc.s;
  }
}

template <typename T>
__device__ void softcap_softmax_bwd(const T *s, const unsigned char *mask, const float *stats,
                                    const T *dp, T *ds, long long rows, long long t_len,
                                    float cap) {
  const long long row = (long long)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
  if (row >= rows) return;
  const int lane = threadIdx.x & 31;
  const T *sr = s + row * t_len, *dpr = dp + row * t_len;
  T *dsr = ds + row * t_len;
  const unsigned char *mr = mask + (row % t_len) * t_len;
  const float m = stats[2 * row], sum = stats[2 * row + 1];
  float t, dot = 0.f;
  for (long long j = lane; j < t_len; j += 32) {
    if (mr[j]) continue;
    dot += expf(attn_score<T>(to_f(sr[j]), cap, &t) - m) / sum * to_f(dpr[j]);
  }
  dot = warp_sum(dot);
  for (long long j = lane; j < t_len; j += 32) {
    float g = 0.f;
    if (!mr[j]) {
      const float pj = expf(attn_score<T>(to_f(sr[j]), cap, &t) - m) / sum;
      g = rnd<T>(pj * (to_f(dpr[j]) - dot));
      if (cap > 0.f) {
        g = rnd<T>(g * cap);
        g = rnd<T>(g * (1.f - t * t));
      }
    }
    put(&dsr[j], g);
  }
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
