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

// h [rows, f] from gu [rows, 2f], gate in the first f columns of a row and up in the last (one
// product makes both), in packs of W: pack j of h has its gate pack at j + row fp, fp = f / W
// the packs of half a row, and its up pack fp further. 32-bit division: under 2^32 packs
// (csrc/autograd.cpp checks).
__device__ __forceinline__ unsigned long long gate_pack(unsigned j, unsigned fp) {
  return (unsigned long long)(j / fp) * fp + j;
}

template <typename T, int W, int TANH>
__device__ void geglu_fwd_packs(const T *gu, T *h, unsigned n, unsigned fp) {
  FOR_EACH_ELEMENT(j, n) {
    const unsigned long long at = gate_pack((unsigned)j, fp);
    const Pack<T, W> a = pack_at<T, W>(gu, at), b = pack_at<T, W>(gu, at + fp);
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

// d_gu laid out as gu: the gate's and up's gradients side by side, so that the product's input
// gradient is one [rows, 2f] x [2f, d] product (no sum of two).
template <typename T, int W, int TANH>
__device__ void geglu_bwd_packs(const T *gu, const T *dh, T *d_gu, unsigned n, unsigned fp) {
  FOR_EACH_ELEMENT(j, n) {
    const unsigned long long at = gate_pack((unsigned)j, fp);
    const Pack<T, W> a = pack_at<T, W>(gu, at), b = pack_at<T, W>(gu, at + fp),
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
    store_pack<T, W>(d_gu, at, dg);
    store_pack<T, W>(d_gu, at + fp, du);
  }
}

template <typename T, int W>
__device__ void geglu_fwd_w(const T *gu, T *h, long long n, long long f, int tanh_approx) {
  if (tanh_approx)
    geglu_fwd_packs<T, W, 1>(gu, h, (unsigned)(n / W), (unsigned)(f / W));
  else
    geglu_fwd_packs<T, W, 0>(gu, h, (unsigned)(n / W), (unsigned)(f / W));
}

template <typename T, int W>
__device__ void geglu_bwd_w(const T *gu, const T *dh, T *d_gu, long long n, long long f,
                            int tanh_approx) {
  if (tanh_approx)
    geglu_bwd_packs<T, W, 1>(gu, dh, d_gu, (unsigned)(n / W), (unsigned)(f / W));
  else
    geglu_bwd_packs<T, W, 0>(gu, dh, d_gu, (unsigned)(n / W), (unsigned)(f / W));
}

// In 16-byte packs where half rows are whole packs and every array lines up (the launch then
// sizes the grid for n / W threads), else an element at a time. n = rows f, h's elements.
template <typename T>
__device__ void geglu_fwd(const T *gu, T *h, long long n, long long f, int tanh_approx) {
  if (packs_fit<T>(gu, f) && aligned(h, 16))
    geglu_fwd_w<T, PackLen<T>::n>(gu, h, n, f, tanh_approx);
  else
    geglu_fwd_w<T, 1>(gu, h, n, f, tanh_approx);
}

template <typename T>
__device__ void geglu_bwd(const T *gu, const T *dh, T *d_gu, long long n, long long f,
                          int tanh_approx) {
  if (packs_fit<T>(gu, f) && aligned(dh, 16) && aligned(d_gu, 16))
    geglu_bwd_w<T, PackLen<T>::n>(gu, dh, d_gu, n, f, tanh_approx);
  else
    geglu_bwd_w<T, 1>(gu, dh, d_gu, n, f, tanh_approx);
}

extern "C" __global__ void geglu_fwd_bf16(const bf16 *gu, bf16 *h, long long n, long long f,
                                         int tanh_approx) {
  geglu_fwd<bf16>(gu, h, n, f, tanh_approx);
}

extern "C" __global__ void geglu_fwd_f32(const float *gu, float *h, long long n, long long f,
                                        int tanh_approx) {
  geglu_fwd<float>(gu, h, n, f, tanh_approx);
}

extern "C" __global__ void geglu_bwd_bf16(const bf16 *gu, const bf16 *dh, bf16 *d_gu,
                                         long long n, long long f, int tanh_approx) {
  geglu_bwd<bf16>(gu, dh, d_gu, n, f, tanh_approx);
}

extern "C" __global__ void geglu_bwd_f32(const float *gu, const float *dh, float *d_gu,
                                        long long n, long long f, int tanh_approx) {
  geglu_bwd<float>(gu, dh, d_gu, n, f, tanh_approx);
}
