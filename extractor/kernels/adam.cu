// The trainer's update (trainer/src/sae.rs) in two passes over the decoder and one over every
// other parameter, where the ATen sequence takes seven over the decoder: the gradient's
// component along each decoder row removed, the clip, Adam, and each row put back on the unit
// sphere. On a GPU the update is memory-bound (302M float32 parameters at the paper's width).
//
// decoder_grad_stats, one warp a row r of W_dec: dot_r = g_r . w_r and ||g_r - dot_r w_r||^2
// (the clip needs the norm of the projected gradient before any row is updated), in one pass.
// decoder_adam, one warp a row: g = (g_r - dot_r w_r) / div, Adam, then w_r / ||w_r||, and
// (shadow) the row in bf16 for the next step's decoder (bag_decode.cu's bag_decode_fwd_bf16);
// rows of up to 2,304 floats wait in shared memory for their norm, longer ones are read back.
// adam_flat, grid-stride: Adam on the other parameters.
// Each moves 16-byte packs (4 floats; bf16 moments 4 at a time) where its rows line up, an
// element at a time otherwise.
//
// Adam is torch's (fused, ORIGINAL mode, no weight decay) in float32: m = b1 m + (1 - b1) g,
// v = b2 v + (1 - b2) g^2, p -= step_size m / (sqrt(v) / bc2_sqrt + eps). The moments are
// stored as M: float32, or bf16 rounded stochastically. A moment rounded to nearest would
// stall: at b2 = 0.999 the step (1 - b2)(g^2 - v) is under half a bf16 ulp of v unless g^2 is
// about 2.5 v or more. The rounding bits are a hash of (seed, element), so a seeded run
// repeats itself.

#include "common.cuh"

// One step's constants; laid out as `AdamArgs` in trainer/src/sae.rs.
struct AdamArgs {
  // 1 / the clip's divisor (1 under the clip), on the device: it depends on the gradients'
  // norm, which the host then need not wait for.
  const float *inv_div;
  float step_size;  // lr / (1 - b1^t)
  float beta1, beta2;
  float bc2_sqrt;  // sqrt(1 - b2^t)
  float eps;
  unsigned seed;   // this step's and this tensor's rounding stream (bf16 moments)
};

// A 32-bit mix of (seed, i): the stochastic rounding's random bits.
__device__ __forceinline__ unsigned mix(unsigned seed, long long i) {
  unsigned h = seed ^ ((unsigned)i * 0x9E3779B1u) ^ ((unsigned)(i >> 32) * 0x85EBCA77u);
  h ^= h >> 16;
  h *= 0x85EBCA6Bu;
  h ^= h >> 13;
  h *= 0xC2B2AE35u;
  h ^= h >> 16;
  return h;
}

// x to bf16, rounded up with probability equal to the dropped fraction (E[rounded] = x).
__device__ __forceinline__ bf16 bf16_stochastic(float x, unsigned bits) {
  const unsigned u = __float_as_uint(x);
  if ((u & 0x7f800000u) == 0x7f800000u) return bf16_of(x);  // inf, NaN
  return (bf16)((u + (bits & 0xffffu)) >> 16);
}

__device__ __forceinline__ void store_moment(float *p, float x, unsigned) { *p = x; }
__device__ __forceinline__ void store_moment(bf16 *p, float x, unsigned bits) {
  *p = bf16_stochastic(x, bits);
}

// Adam on pack j of the moments, elements W j to W j + W - 1, given as loaded (mp, vp; g already
// divided): the parameters' new values; mp and vp become the new moments, to be stored. `base`
// + W j + k is element k's index in its parameter, which seeds its rounding bits: each
// element's arithmetic and bits are the same whatever W.
template <typename M, int W>
__device__ __forceinline__ Pack<float, W> adam_loaded(const Pack<float, W> &p,
                                                      const Pack<float, W> &g, Pack<M, W> &mp,
                                                      Pack<M, W> &vp, long long j,
                                                      long long base, const AdamArgs &a) {
  Pack<float, W> out;
#pragma unroll
  for (int k = 0; k < W; k++) {
    const long long i = base + j * W + k;
    const float gk = g.v[k];
    const float mi = a.beta1 * to_f(mp.v[k]) + (1.f - a.beta1) * gk;
    const float vi = a.beta2 * to_f(vp.v[k]) + (1.f - a.beta2) * gk * gk;
    store_moment(&mp.v[k], mi, mix(a.seed, 2 * i));
    store_moment(&vp.v[k], vi, mix(a.seed, 2 * i + 1));
    out.v[k] = p.v[k] - a.step_size * mi / (sqrtf(vi) / a.bc2_sqrt + a.eps);
  }
  return out;
}

// adam_loaded on pack j of the moments m and v, read and written here.
template <typename M, int W>
__device__ __forceinline__ Pack<float, W> adam_pack(const Pack<float, W> &p,
                                                    const Pack<float, W> &g, M *m, M *v,
                                                    long long j, long long base,
                                                    const AdamArgs &a) {
  Pack<M, W> mp = pack_at<M, W>(m, j), vp = pack_at<M, W>(v, j);
  const Pack<float, W> out = adam_loaded<M, W>(p, g, mp, vp, j, base, a);
  store_pack<M, W>(m, j, mp);
  store_pack<M, W>(v, j, vp);
  return out;
}

// Whether a row (or array) of n floats with gradients of G and moments of M goes in packs of
// kFloatPack.
template <typename M, typename G>
__device__ __forceinline__ bool adam_packs(const float *w, const G *g, const M *m, const M *v,
                                           long long n) {
  return packs_fit<float>(w, n) && aligned(g, kFloatPack * sizeof(G)) &&
         aligned(m, kFloatPack * sizeof(M)) &&
         aligned(v, kFloatPack * sizeof(M));
}

// One pass over the row: g.g, g.w and w.w, each lane's in float64, then
// ||g - c w||^2 = g.g - 2 c g.w + c^2 w.w with c = g.w. Summed in float32 the expansion could
// cancel where g lies along w; float64 keeps it to about 1e-16 of g.g. The two passes it
// replaced (c first, then the squares) read each row twice: 0.53 ms a step on the H200, at the
// paper's width, for 1.2 GB.
template <int W>
__device__ void grad_stats_row(const float *gr, const float *wr, long long d, int lane,
                               float *dot, float *sq) {
  double gg = 0.0, gw = 0.0, ww = 0.0;
  for (long long j = lane; j < d / W; j += 32) {
    const Pack<float, W> g = pack_at<float, W>(gr, j), w = pack_at<float, W>(wr, j);
#pragma unroll
    for (int k = 0; k < W; k++) {
      const double gk = g.v[k], wk = w.v[k];
      gg += gk * gk;
      gw += gk * wk;
      ww += wk * wk;
    }
  }
  gg = warp_sum(gg);
  gw = warp_sum(gw);
  ww = warp_sum(ww);
  if (lane == 0) {
    *dot = (float)gw;
    const double q = gg - 2.0 * gw * gw + gw * gw * ww;
    *sq = (float)(q > 0.0 ? q : 0.0);
  }
}

extern "C" __global__ void decoder_grad_stats(const float *g, const float *w, float *dot,
                                              float *sq, long long rows, long long d) {
  const long long row = warp_index();
  if (row >= rows) return;  // the whole warp
  const int lane = threadIdx.x & 31;
  const float *gr = g + row * d, *wr = w + row * d;
  if (packs_fit<float>(g, d) && aligned(w, 16))
    grad_stats_row<kFloatPack>(gr, wr, d, lane, dot + row, sq + row);
  else
    grad_stats_row<1>(gr, wr, d, lane, dot + row, sq + row);
}

// Rows of up to DEC_HELD floats are held in shared memory, DEC_HELD_WARPS rows a block
// (trainer/src/sae.rs launches decoder_adam with that many warps a block); longer rows, or
// larger blocks, are read back.
#define DEC_HELD 2304
#define DEC_HELD_WARPS 4

// What decoder_adam_row reads of pack j of a row; G: the gradient's kind (float32, or bf16 from
// bag_decode_bwd_g16).
template <typename M, typename G, int W> struct RowPack {
  Pack<float, W> w;
  Pack<G, W> g;
  Pack<M, W> m, v;
};

template <typename M, typename G, int W>
__device__ __forceinline__ RowPack<M, G, W> row_pack(const float *wr, const G *gr, const M *mr,
                                                     const M *vr, long long j) {
  RowPack<M, G, W> r;
  r.w = pack_at<float, W>(wr, j);
  r.g = pack_at<G, W>(gr, j);
  r.m = pack_at<M, W>(mr, j);
  r.v = pack_at<M, W>(vr, j);
  return r;
}

// The update of pack j (read as r): Adam's new values into `held`, the new moments stored; adds
// their squares to ss.
template <typename M, typename G, int W>
__device__ __forceinline__ void held_update(RowPack<M, G, W> &r, M *mr, M *vr, float *held,
                                            float c, long long j, long long at,
                                            const AdamArgs &a, float inv_div, float &ss) {
  Pack<float, W> gd;
#pragma unroll
  for (int k = 0; k < W; k++) gd.v[k] = (to_f(r.g.v[k]) - c * r.w.v[k]) * inv_div;
  const Pack<float, W> p = adam_loaded<M, W>(r.w, gd, r.m, r.v, j, at, a);
  store_pack<M, W>(mr, j, r.m);
  store_pack<M, W>(vr, j, r.v);
  store_pack<float, W>(held, j, p);
#pragma unroll
  for (int k = 0; k < W; k++) ss += p.v[k] * p.v[k];
}

// One row's update: Adam's new values go to `held` until the row's norm is known, then are
// rescaled into wr. `held` is shared memory for rows of up to DEC_HELD floats, so each value is
// written once; for longer rows it is wr itself, which is then written, read back and written
// again (1.2 GB more a step at the paper's sizes: with the rows held, the decoder's update
// should come near adam_flat's over the same bytes of W_enc, 1.00 ms against its 1.30 on the
// H200). Each lane reads two packs before storing either: the compiler keeps a pack's loads
// after the previous pack's stores, and this kernel has fewer warps an SM (4 a block, 6 blocks
// by shared memory). The same sums in the same order whatever `held`: the same bits.
template <typename M, typename G, int W>
__device__ void decoder_adam_row(float *wr, const G *gr, M *mr, M *vr, bf16 *sr, float c,
                                 long long at, long long d, int lane, const AdamArgs &a,
                                 float inv_div, float *held) {
  const long long n = d / W;
  float ss = 0.f;
  for (long long j = lane; j < n; j += 64) {
    const bool two = j + 32 < n;
    RowPack<M, G, W> r0 = row_pack<M, G, W>(wr, gr, mr, vr, j), r1;
    if (two) r1 = row_pack<M, G, W>(wr, gr, mr, vr, j + 32);
    held_update<M, G, W>(r0, mr, vr, held, c, j, at, a, inv_div, ss);
    if (two) held_update<M, G, W>(r1, mr, vr, held, c, j + 32, at, a, inv_div, ss);
  }
  // Each lane reads back what it wrote itself: no barrier.
  const float inv = 1.f / fmaxf(sqrtf(warp_sum(ss)), 1e-12f);
  for (long long j = lane; j < n; j += 32) {
    Pack<float, W> w = pack_at<float, W>(held, j);
#pragma unroll
    for (int k = 0; k < W; k++) w.v[k] *= inv;
    store_pack<float, W>(wr, j, w);
    if (sr) {
      Pack<bf16, W> h;
#pragma unroll
      for (int k = 0; k < W; k++) h.v[k] = bf16_of(w.v[k]);
      store_pack<bf16, W>(sr, j, h);
    }
  }
}

template <typename M, typename G>
__device__ void decoder_adam(float *w, const G *g, M *m, M *v, const float *dot,
                             bf16 *shadow, long long rows, long long d, AdamArgs a) {
  // Packs, so that a row's floats line up for 16-byte access at any d.
  __shared__ Pack<float, kFloatPack> held_rows[DEC_HELD_WARPS][DEC_HELD / kFloatPack];
  const long long row = warp_index();
  if (row >= rows) return;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const long long at = row * d;
  const float c = dot[row], inv_div = *a.inv_div;
  bf16 *sr = shadow ? shadow + at : nullptr;
  float *held = d <= DEC_HELD && blockDim.x <= 32 * DEC_HELD_WARPS
                    ? (float *)held_rows[warp]
                    : w + at;
  if (adam_packs(w, g, m, v, d) && (!shadow || aligned(shadow, kFloatPack * sizeof(bf16))))
    decoder_adam_row<M, G, kFloatPack>(w + at, g + at, m + at, v + at, sr, c, at, d, lane, a,
                                       inv_div, held);
  else
    decoder_adam_row<M, G, 1>(w + at, g + at, m + at, v + at, sr, c, at, d, lane, a, inv_div,
                              held);
}

// shadow (may be null): each new parameter value in bf16 too, rounded to nearest as ATen's
// cast rounds: the trainer's bf16 encoder product reads W_enc so, where a cast of its own read
// the float32 W_enc each step (0.6 GB at the paper's width). G: the gradient's kind, float32
// or bf16 (W_enc's from encoder_grad.cu's `_g16` kernels: 2 bytes read a parameter, not 4).
template <typename M, typename G, int W>
__device__ void adam_flat_packs(float *p, const G *g, M *m, M *v, bf16 *shadow, long long n,
                                AdamArgs a) {
  const float inv_div = *a.inv_div;
  FOR_EACH_ELEMENT(j, n / W) {
    const Pack<G, W> gp = pack_at<G, W>(g, j);
    Pack<float, W> gd;
#pragma unroll
    for (int k = 0; k < W; k++) gd.v[k] = to_f(gp.v[k]) * inv_div;
    const Pack<float, W> np = adam_pack<M, W>(pack_at<float, W>(p, j), gd, m, v, j, 0, a);
    store_pack<float, W>(p, j, np);
    if (shadow) {
      Pack<bf16, W> h;
#pragma unroll
      for (int k = 0; k < W; k++) h.v[k] = bf16_of(np.v[k]);
      store_pack<bf16, W>(shadow, j, h);
    }
  }
}

template <typename M, typename G>
__device__ void adam_flat(float *p, const G *g, M *m, M *v, bf16 *shadow, long long n,
                          AdamArgs a) {
  if (adam_packs(p, g, m, v, n) && (!shadow || aligned(shadow, kFloatPack * sizeof(bf16))))
    adam_flat_packs<M, G, kFloatPack>(p, g, m, v, shadow, n, a);
  else
    adam_flat_packs<M, G, 1>(p, g, m, v, shadow, n, a);
}

// decoder_adam_{moments}[_g16]: float32 or bf16 moments, then a bf16 gradient. Launched with
// 128 threads a block (256 with DMSAE_DECODER_HELD=0); the bound holds a thread to 85 registers,
// so that six 128-thread blocks, as many as the held rows' shared memory allows, fit an SM (bf16
// moments and gradient took 94 without it, five blocks).
#define DECODER_ADAM_KERNEL(NAME, M, G)                                              \
  extern "C" __global__ void __launch_bounds__(256, 3)                              \
      NAME(float *w, const G *g, M *m, M *v, const float *dot, bf16 *shadow,        \
           long long rows, long long d, AdamArgs a) {                               \
    decoder_adam<M, G>(w, g, m, v, dot, shadow, rows, d, a);                        \
  }

DECODER_ADAM_KERNEL(decoder_adam_f32, float, float)
DECODER_ADAM_KERNEL(decoder_adam_bf16, bf16, float)
DECODER_ADAM_KERNEL(decoder_adam_f32_g16, float, bf16)
DECODER_ADAM_KERNEL(decoder_adam_bf16_g16, bf16, bf16)

// adam_flat_{moments}[_g16]: float32 or bf16 moments, then a bf16 gradient.
#define ADAM_FLAT_KERNEL(NAME, M, G)                                                 \
  extern "C" __global__ void NAME(float *p, const G *g, M *m, M *v, bf16 *shadow,    \
                                  long long n, AdamArgs a) {                         \
    adam_flat<M, G>(p, g, m, v, shadow, n, a);                                       \
  }

ADAM_FLAT_KERNEL(adam_flat_f32, float, float)
ADAM_FLAT_KERNEL(adam_flat_bf16, bf16, float)
ADAM_FLAT_KERNEL(adam_flat_f32_g16, float, bf16)
ADAM_FLAT_KERNEL(adam_flat_bf16_g16, bf16, bf16)
