// Gemma's GeGLU product h = gelu(gate) * up, elementwise, and its backward, where ATen runs
// gelu and a multiply forward (5 passes over the [tokens, 9216] intermediates) and two
// multiplies and gelu's backward (9) backward; here 3 and 5. Each step rounds as that sequence
// does: g = gelu(gate) in the model dtype, then g * up; backward d_g = dh * up and d_up = dh * g,
// then d_gate = d_g * gelu'(gate). gelu is ATen's formula, tanh (`tanh`) or erf (`erf`); the
// tanh form's tanh is within 1e-7 of tanhf's rather than equal to it, so a float32 result
// can differ from ATen's in its last bits and a bf16 one, rarely, by one rounding.

#include "common.cuh"

#define K_BETA 0.7978845608028654f  // sqrt(2) * (2 / sqrt(pi)) / 2
#define K_KAPPA 0.044715f
#define K_SQRT1_2 0.7071067811865476f
#define K_ALPHA 0.3989422804014327f  // (2 / sqrt(pi)) * sqrt(1/2) / 2

// The form is a template argument: as a run-time one, both forms were computed an element and
// one selected (91 and 176 SASS instructions an element forward and backward, NVRTC 13).
// gelu's transcendental term: for the tanh form tanh(inner) as common.cuh's TanhParts (one
// exp and one reciprocal where tanhf took 20-odd instructions and both of its branches), for
// the erf form erf(x / sqrt 2) in .r.
template <int TANH> __device__ __forceinline__ TanhParts gelu_term(float x) {
  if (TANH) return tanh_parts((2.f * LOG2E * K_BETA) * (x + K_KAPPA * (x * x * x)));
  TanhParts t = {erff(x * K_SQRT1_2), 0.f};
  return t;
}

template <int TANH> __device__ __forceinline__ float gelu(float x, TanhParts term) {
  if (TANH) return x * one_minus_r(term);  // (1 + tanh) / 2, accurate in gelu's left tail
  return x * 0.5f * (1.f + term.r);
}

// dy * gelu'(x), from the same term (the backward computes it once for both gradients).
template <int TANH>
__device__ __forceinline__ float gelu_grad(float dy, float x, TanhParts term) {
  if (TANH) {
    const float x_sq = x * x;
    const float left_derivative = one_minus_r(term);
    const float right_derivative = 0.5f * x * tanh_slope(term);
    const float inner_derivative = K_BETA * (1.f + 3.f * K_KAPPA * x_sq);
    return dy * (left_derivative + right_derivative * inner_derivative);
  }
  const float cdf = 0.5f * (1.f + term.r);
  const float pdf = expf(-0.5f * x * x) * K_ALPHA;
  return dy * (cdf + x * pdf);
}

template <typename T, int W, int TANH>
__device__ void geglu_fwd_packs(const T *gate, const T *up, T *h, long long n) {
  FOR_EACH_ELEMENT(j, n / W) {
    const Pack<T, W> a = pack_at<T, W>(gate, j), b = pack_at<T, W>(up, j);
    Pack<T, W> out;
#pragma unroll
    for (int k = 0; k < W; k++) {
      const float x = to_f(a.v[k]);
      const float g = rnd<T>(gelu<TANH>(x, gelu_term<TANH>(x)));
      put(&out.v[k], g * to_f(b.v[k]));
    }
    store_pack<T, W>(h, j, out);
  }
}

template <typename T, int W, int TANH>
__device__ void geglu_bwd_packs(const T *gate, const T *up, const T *dh, T *d_gate, T *d_up,
                                long long n) {
  FOR_EACH_ELEMENT(j, n / W) {
    const Pack<T, W> a = pack_at<T, W>(gate, j), b = pack_at<T, W>(up, j),
                     c = pack_at<T, W>(dh, j);
    Pack<T, W> dg, du;
#pragma unroll
    for (int k = 0; k < W; k++) {
      const float x = to_f(a.v[k]), dy = to_f(c.v[k]);
      const TanhParts term = gelu_term<TANH>(x);
      const float g = rnd<T>(gelu<TANH>(x, term));
      put(&du.v[k], dy * g);
      put(&dg.v[k], gelu_grad<TANH>(rnd<T>(dy * to_f(b.v[k])), x, term));
    }
    store_pack<T, W>(d_gate, j, dg);
    store_pack<T, W>(d_up, j, du);
  }
}

template <typename T, int W>
__device__ void geglu_fwd_w(const T *gate, const T *up, T *h, long long n, int tanh_approx) {
  if (tanh_approx)
    geglu_fwd_packs<T, W, 1>(gate, up, h, n);
  else
    geglu_fwd_packs<T, W, 0>(gate, up, h, n);
}

template <typename T, int W>
__device__ void geglu_bwd_w(const T *gate, const T *up, const T *dh, T *d_gate, T *d_up,
                            long long n, int tanh_approx) {
  if (tanh_approx)
    geglu_bwd_packs<T, W, 1>(gate, up, dh, d_gate, d_up, n);
  else
    geglu_bwd_packs<T, W, 0>(gate, up, dh, d_gate, d_up, n);
}

// In 16-byte packs where every array lines up (the launch then sizes the grid for n / W
// threads), else an element at a time.
template <typename T>
__device__ void geglu_fwd(const T *gate, const T *up, T *h, long long n, int tanh_approx) {
  if (packs_fit<T>(gate, n) && aligned(up, 16) && aligned(h, 16))
    geglu_fwd_w<T, PackLen<T>::n>(gate, up, h, n, tanh_approx);
  else
    geglu_fwd_w<T, 1>(gate, up, h, n, tanh_approx);
}

template <typename T>
__device__ void geglu_bwd(const T *gate, const T *up, const T *dh, T *d_gate, T *d_up,
                          long long n, int tanh_approx) {
  if (packs_fit<T>(gate, n) && aligned(up, 16) && aligned(dh, 16) && aligned(d_gate, 16) &&
      aligned(d_up, 16))
    geglu_bwd_w<T, PackLen<T>::n>(gate, up, dh, d_gate, d_up, n, tanh_approx);
  else
    geglu_bwd_w<T, 1>(gate, up, dh, d_gate, d_up, n, tanh_approx);
}

extern "C" __global__ void geglu_fwd_bf16(const bf16 *gate, const bf16 *up, bf16 *h, long long n,
                                         int tanh_approx) {
  geglu_fwd<bf16>(gate, up, h, n, tanh_approx);
}

extern "C" __global__ void geglu_fwd_f32(const float *gate, const float *up, float *h,
                                        long long n, int tanh_approx) {
  geglu_fwd<float>(gate, up, h, n, tanh_approx);
}

extern "C" __global__ void geglu_bwd_bf16(const bf16 *gate, const bf16 *up, const bf16 *dh,
                                         bf16 *d_gate, bf16 *d_up, long long n, int tanh_approx) {
  geglu_bwd<bf16>(gate, up, dh, d_gate, d_up, n, tanh_approx);
}

extern "C" __global__ void geglu_bwd_f32(const float *gate, const float *up, const float *dh,
                                        float *d_gate, float *d_up, long long n,
                                        int tanh_approx) {
  geglu_bwd<float>(gate, up, dh, d_gate, d_up, n, tanh_approx);
}
