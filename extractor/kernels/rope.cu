// Rotary embedding of q or k, [B, T, heads, Dh] contiguous, with q's score scaling `pre` folded
// in: out = (x cos + rotate_half(x) sin) pre, rotate_half(x) = (-x2, x1), written heads first,
// [B, heads, T, Dh] contiguous: attention's layout, so that grouped query heads meet their KV
// head as one [G T, Dh] x [Dh, T] product without copies (the backward reads its gradient in
// that layout and writes [B, T, heads, Dh]). ATen runs narrow,
// neg, cat, two multiplies, an add and the scaling, each a pass over q (and back); here one
// each way. Each step rounds as that sequence does (pre = 1 multiplies exactly); the backward
// is the chain's: d = dout pre, then d cos plus the rotated d sin, each product rounded, then
// their sum. cos and sin come stacked, cs [2, T, Dh].

#include "common.cuh"

// A block a token (grid-stride) and a thread a column pair (j, j + Dh/2) of each of its heads:
// the position is found once a token. With a thread an element, three 64-bit divisions an
// element held rope_fwd to a sixth of memory speed (0.10 ms for q's 34 MB, H200, batch 8 of
// 1,024). For j < Dh/2: out_j = x_j cos_j - x_{j+h} sin_j, out_{j+h} = x_{j+h} cos_{j+h} +
// x_j sin_{j+h}, h = Dh/2.
// f(in_row, out_row, cos, sin, j, half) for each column pair j < half = Dh/2 of each (token,
// head) row of in and out, each [B, T, heads, Dh] or, if its HEADS_FIRST, [B, heads, T, Dh].
template <bool IN_HEADS_FIRST, bool OUT_HEADS_FIRST, typename T, typename F>
__device__ void for_each_pair(const T *in, const T *cs, T *out, long long n, long long dh,
                              long long heads, long long t_len, F f) {
  const long long half = dh / 2, tokens = n / (dh * heads);
  for (long long tok = blockIdx.x; tok < tokens; tok += gridDim.x) {
    const long long pos = tok % t_len, b = tok / t_len;
    const T *cos = cs + pos * dh, *sin = cs + (t_len + pos) * dh;
    for (long long h = 0; h < heads; h++) {
      const long long tokens_first = (tok * heads + h) * dh;
      const long long heads_first = ((b * heads + h) * t_len + pos) * dh;
      const long long in_at = IN_HEADS_FIRST ? heads_first : tokens_first;
      const long long out_at = OUT_HEADS_FIRST ? heads_first : tokens_first;
      for (long long j = threadIdx.x; j < half; j += blockDim.x)
        f(in + in_at, out + out_at, cos, sin, j, half);
    }
  }
}

template <typename T>
__device__ void rope_fwd(const T *x, const T *cs, T *out, long long n, long long dh,
                         long long heads, long long t_len, float pre) {
  for_each_pair<false, true>(x, cs, out, n, dh, heads, t_len,
                [=](const T *xr, T *o, const T *cos, const T *sin, long long j, long long half) {
                  const float x1 = to_f(xr[j]), x2 = to_f(xr[j + half]);
                  const float a1 = rnd<T>(x1 * to_f(cos[j])), b1 = rnd<T>(-x2 * to_f(sin[j]));
                  const float a2 = rnd<T>(x2 * to_f(cos[j + half]));
                  const float b2 = rnd<T>(x1 * to_f(sin[j + half]));
                  put(&o[j], rnd<T>(a1 + b1) * pre);
                  put(&o[j + half], rnd<T>(a2 + b2) * pre);
                });
}

// The transpose of the above on d = dout pre: dx_j = d_j cos_j + d_{j+h} sin_{j+h},
// dx_{j+h} = d_{j+h} cos_{j+h} - d_j sin_j; dout heads first, dx tokens first.
template <typename T>
__device__ void rope_bwd(const T *dout, const T *cs, T *dx, long long n, long long dh,
                         long long heads, long long t_len, float pre) {
  for_each_pair<true, false>(dout, cs, dx, n, dh, heads, t_len,
                [=](const T *g, T *o, const T *cos, const T *sin, long long j, long long half) {
                  const float d1 = rnd<T>(to_f(g[j]) * pre), d2 = rnd<T>(to_f(g[j + half]) * pre);
                  put(&o[j], rnd<T>(d1 * to_f(cos[j])) + rnd<T>(d2 * to_f(sin[j + half])));
                  put(&o[j + half],
                      rnd<T>(d2 * to_f(cos[j + half])) - rnd<T>(d1 * to_f(sin[j])));
                });
}

extern "C" __global__ void rope_fwd_bf16(const bf16 *x, const bf16 *cs, bf16 *out, long long n,
                                        long long dh, long long heads, long long t_len,
                                        float pre) {
  rope_fwd<bf16>(x, cs, out, n, dh, heads, t_len, pre);
}

extern "C" __global__ void rope_fwd_f32(const float *x, const float *cs, float *out, long long n,
                                       long long dh, long long heads, long long t_len,
                                       float pre) {
  rope_fwd<float>(x, cs, out, n, dh, heads, t_len, pre);
}

extern "C" __global__ void rope_bwd_bf16(const bf16 *dout, const bf16 *cs, bf16 *dx, long long n,
                                        long long dh, long long heads, long long t_len,
                                        float pre) {
  rope_bwd<bf16>(dout, cs, dx, n, dh, heads, t_len, pre);
}

extern "C" __global__ void rope_bwd_f32(const float *dout, const float *cs, float *dx,
                                       long long n, long long dh, long long heads,
                                       long long t_len, float pre) {
  rope_bwd<float>(dout, cs, dx, n, dh, heads, t_len, pre);
}
