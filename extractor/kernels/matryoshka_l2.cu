// The trainer's Matryoshka reconstruction loss (trainer/src/sae.rs, `loss_timed`) in one pass
// each way, float32. parts [B, P, d] holds each token's core part (p = 0) and the parts of
// groups 1..G = P - 1; prefix p's residual is r_p = x - part_0 - b_dec - part_1 - ... - part_p,
// and the loss sums r_p^2 over p >= 1. ATen took about 20 passes over [B, d] for this, each way
// (subtractions, squares, sums, and in the backward a zeroed [B, P, d] gradient filled a slice
// at a time and the residuals' gradients summed along the chain).
//
// One warp a token. Forward: sq[b] = sum over p >= 1 and k of r_p[b, k]^2 (a lane's columns in
// order, then the warp's lanes). Backward, given dsq [B]: part_q's gradient is
// -2 dsq[b] times the suffix sum of r_p over p >= max(q, 1). The parts in P: float32, or bf16
// (the _bf16 kernels: the trainer's `parts_bf16`, where the decoder writes them so), whose
// gradient is then bf16 too, each rounded once; the sums run in float32 either way.

#include "common.cuh"

template <typename P>
__device__ void matryoshka_fwd(const float *x, const float *b_dec, const P *parts, float *sq,
                               long long n, long long n_parts, long long d) {
  const long long b = warp_index();
  if (b >= n) return;  // the whole warp
  const int lane = threadIdx.x & 31;
  const float *xb = x + b * d;
  const P *pb = parts + b * n_parts * d;
  float acc = 0.f;
  for (long long k = lane; k < d; k += 32) {
    float r = xb[k] - to_f(pb[k]) - b_dec[k];
    for (long long p = 1; p < n_parts; p++) {
      r -= to_f(pb[p * d + k]);
      acc += r * r;
    }
  }
  acc = warp_sum(acc);
  if (lane == 0) sq[b] = acc;
}

template <typename P>
__device__ void matryoshka_bwd(const float *x, const float *b_dec, const P *parts,
                               const float *dsq, P *dparts, long long n, long long n_parts,
                               long long d) {
  const long long b = warp_index();
  if (b >= n) return;
  const int lane = threadIdx.x & 31;
  const float *xb = x + b * d;
  const P *pb = parts + b * n_parts * d;
  P *gb = dparts + b * n_parts * d;
  const float c = -2.f * dsq[b];
  for (long long k = lane; k < d; k += 32) {
    // The suffix sums of r_p over p = G..1 as p runs down: r_p again from r_G by adding the
    // parts back would round differently, so the chain runs forward into a total first.
    float r = xb[k] - to_f(pb[k]) - b_dec[k], total = 0.f;
    for (long long p = 1; p < n_parts; p++) {
      r -= to_f(pb[p * d + k]);
      total += r;
    }
    // S_1 = total; S_{p+1} = S_p - r_p.
    float s = total;
    r = xb[k] - to_f(pb[k]) - b_dec[k];
    put(&gb[k], c * s);
    for (long long p = 1; p < n_parts; p++) {
      put(&gb[p * d + k], c * s);
      r -= to_f(pb[p * d + k]);
      s -= r;
    }
  }
}

#define MATRYOSHKA_L2(suffix, P)                                                             \
  extern "C" __global__ void matryoshka_l2_fwd##suffix(const float *x, const float *b_dec,   \
                                                       const P *parts, float *sq, long long n, \
                                                       long long n_parts, long long d) {     \
    matryoshka_fwd(x, b_dec, parts, sq, n, n_parts, d);                                      \
  }                                                                                          \
  extern "C" __global__ void matryoshka_l2_bwd##suffix(                                      \
      const float *x, const float *b_dec, const P *parts, const float *dsq, P *dparts,       \
      long long n, long long n_parts, long long d) {                                         \
    matryoshka_bwd(x, b_dec, parts, dsq, dparts, n, n_parts, d);                             \
  }
MATRYOSHKA_L2(, float)
MATRYOSHKA_L2(_bf16, bf16)
