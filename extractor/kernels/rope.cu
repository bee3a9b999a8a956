// Rotary embedding of q or k, [B, T, heads, Dh] contiguous, with q's score scaling `pre` folded
// in: out = (x cos + rotate_half(x) sin) pre, rotate_half(x) = (-x2, x1). ATen runs narrow,
// neg, cat, two multiplies, an add and the scaling, each a pass over q (and back); here one
// each way. Each step rounds as that sequence does (pre = 1 multiplies exactly); the backward
// is the chain's: d = dout pre, then d cos plus the rotated d sin, each product rounded, then
// their sum. cos and sin come stacked, cs [2, T, Dh].

#include "common.cuh"

// Element i's column in its row, and the cos and sin rows of its position.
template <typename T>
__device__ __forceinline__ long long rope_at(long long i, const T *cs, long long dh,
                                             long long heads, long long t_len, const T **cos,
                                             const T **sin) {
  const long long pos = (i / dh / heads) % t_len;
  *cos = cs + pos * dh;
  *sin = cs + (t_len + pos) * dh;
  return i % dh;
}

template <typename T>
__device__ void rope_fwd(const T *x, const T *cs, T *out, long long n, long long dh,
                         long long heads, long long t_len, float pre) {
  const long long half = dh / 2;
  FOR_EACH_ELEMENT(i, n) {
    const T *cos, *sin;
    const long long j = rope_at(i, cs, dh, heads, t_len, &cos, &sin);
    const float rot = j < half ? -to_f(x[i + half]) : to_f(x[i - half]);
    const float a = rnd<T>(to_f(x[i]) * to_f(cos[j])), b = rnd<T>(rot * to_f(sin[j]));
    put(&out[i], rnd<T>(a + b) * pre);
  }
}

template <typename T>
__device__ void rope_bwd(const T *dout, const T *cs, T *dx, long long n, long long dh,
                         long long heads, long long t_len, float pre) {
  const long long half = dh / 2;
  FOR_EACH_ELEMENT(i, n) {
    const T *cos, *sin;
    const long long j = rope_at(i, cs, dh, heads, t_len, &cos, &sin);
    const float a = rnd<T>(rnd<T>(to_f(dout[i]) * pre) * to_f(cos[j]));
    // x[j] is rot[j + half] (first half) or -rot[j - half] (second half).
    const long long k = j < half ? i + half : i - half, jk = j < half ? j + half : j - half;
    const float b = rnd<T>(rnd<T>(to_f(dout[k]) * pre) * to_f(sin[jk]));
    put(&dx[i], j < half ? a + b : a - b);
  }
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
