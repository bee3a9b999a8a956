// Attention probabilities from raw scores, one warp per row of the [rows, T] scores (row r is
// query position r % T): Gemma-2's soft-cap z = c * tanh(s), the causal or sliding-window mask
// (`mask` [T, T], nonzero = masked), and the softmax, where ATen runs tanh, a multiply,
// masked_fill, a float32 softmax and a cast, and as many passes back. The scores come from q
// already divided by c (models/common.rs), so the cap needs no division.
//
// Float32 from the scores to what is stored: the probabilities, and in the backward the score
// gradient p * (dp - sum(p dp)) * c * (1 - t^2), each rounded once to the model dtype. ATen's
// chain rounds t, z and three steps of the backward to bf16 as well (z's ulp near the cap is
// 0.25). The forward keeps each row's (max, sum of exp), so the backward recomputes the
// probabilities, bit for bit as the forward made them, from the scores instead of a [rows, T]
// float32 copy (attn_prob, one expression for both). A row of up to 32 * 4 packs (1,024 bf16
// scores) is held in registers, a pack of W per lane and step: read once, one tanh and one exp
// an element (common.cuh's fast forms); longer rows take two passes over memory. Mirroring
// ATen's bf16 rounding took 177 and 279 SASS instructions an element, two passes with tanhf
// and expf about 80: 7.0 and 5.2 ms forward a batch of 8 x 1,024 on an H200, all 26 layers.

#include "common.cuh"

// log2(e) times the capped score z (cap > 0: z = c tanh(s); otherwise z = s), and with the cap
// the slope c (1 - t^2) into *slope. capl = c log2(e).
template <int CAP> __device__ __forceinline__ float attn_zl(float s, float capl, float *slope) {
  if (!CAP) return s * LOG2E;
  const TanhParts th = tanh_parts(s * (2.f * LOG2E));
  *slope = tanh_slope(th);
  return capl - 2.f * capl * th.r;
}

// The probability of score s in a row with stats (mx, 1 / sum), and its slope into *slope.
template <int CAP>
__device__ __forceinline__ float attn_prob(float s, float capl, float mx, float inv_s,
                                           float *slope) {
  return ex2_fast(attn_zl<CAP>(s, capl, slope) - mx) * inv_s;
}

// Whether any of a pack's W positions is unmasked: a causal row's packs past the diagonal are
// skipped whole.
template <int W> __device__ __forceinline__ bool any_open(const Pack<unsigned char, W> &m) {
  bool open = false;
#pragma unroll
  for (int k = 0; k < W; k++) open |= !m.v[k];
  return open;
}

template <typename T, int W> __device__ __forceinline__ void store_zeros(T *p, long long j) {
  Pack<T, W> out;
#pragma unroll
  for (int k = 0; k < W; k++) put(&out.v[k], 0.f);
  store_pack<T, W>(p, j, out);
}

__device__ __forceinline__ float warp_max(float a) {
  for (int o = 16; o > 0; o >>= 1) a = fmaxf(a, __shfl_xor_sync(0xffffffffu, a, o));
  return a;
}

// Of a row of `packs` packs, this lane's j = lane + 32 i (i < NP): open[i], whether any of
// pack j's positions is unmasked, and f(i, mask pack, score pack) for those that are.
template <typename T, int W, int NP, typename F>
__device__ __forceinline__ void read_open_packs(const T *sr, const unsigned char *mr, int packs,
                                                int lane, bool (&open)[NP], F f) {
#pragma unroll
  for (int i = 0; i < NP; i++) {
    const int j = lane + 32 * i;
    open[i] = false;
    if (j < packs) {
      const Pack<unsigned char, W> m = pack_at<unsigned char, W>(mr, j);
      open[i] = any_open(m);
      if (open[i]) f(i, m, pack_at<T, W>(sr, j));
    }
  }
}

// This lane's packs of the output row: f(i) the values of an open one, zeros for the rest.
template <typename T, int W, int NP, typename F>
__device__ __forceinline__ void write_packs(T *out, int packs, int lane, const bool (&open)[NP],
                                            F f) {
#pragma unroll
  for (int i = 0; i < NP; i++) {
    const int j = lane + 32 * i;
    if (j >= packs) continue;
    if (open[i]) {
      Pack<T, W> o;
#pragma unroll
      for (int k = 0; k < W; k++) put(&o.v[k], f(i, k));
      store_pack<T, W>(out, j, o);
    } else {
      store_zeros<T, W>(out, j);
    }
  }
}

// A row of at most 32 NP packs of W, pack j = lane + 32 i held by this lane as zl[i].
template <typename T, int W, int NP, int CAP>
__device__ void softmax_fwd_regs(const T *sr, const unsigned char *mr, T *pr, float *stats,
                                 int packs, float capl, int lane) {
  float zl[NP][W], mx = NEG_INF, slope;
  bool open[NP];
  read_open_packs<T, W, NP>(sr, mr, packs, lane, open,
                            [&](int i, const Pack<unsigned char, W> &m, const Pack<T, W> &a) {
#pragma unroll
                              for (int k = 0; k < W; k++) {
                                zl[i][k] =
                                    m.v[k] ? NEG_INF : attn_zl<CAP>(to_f(a.v[k]), capl, &slope);
                                mx = fmaxf(mx, zl[i][k]);
                              }
                            });
  mx = warp_max(mx);
  float sum = 0.f;
#pragma unroll
  for (int i = 0; i < NP; i++)
    if (open[i]) {
#pragma unroll
      for (int k = 0; k < W; k++) {
        zl[i][k] = ex2_fast(zl[i][k] - mx);
        sum += zl[i][k];
      }
    }
  sum = warp_sum(sum);
  const float inv_s = 1.f / sum;
  write_packs<T, W, NP>(pr, packs, lane, open, [&](int i, int k) { return zl[i][k] * inv_s; });
  if (lane == 0) {
    stats[0] = mx;
    stats[1] = sum;
  }
}

// The same for a row of any length, in two passes over it.
template <typename T, int W, int CAP>
__device__ void softmax_fwd_passes(const T *sr, const unsigned char *mr, T *pr, float *stats,
                                   int packs, float capl, int lane) {
  float mx = NEG_INF, slope;
  for (int j = lane; j < packs; j += 32) {
    const Pack<unsigned char, W> m = pack_at<unsigned char, W>(mr, j);
    if (!any_open(m)) continue;
    const Pack<T, W> a = pack_at<T, W>(sr, j);
#pragma unroll
    for (int k = 0; k < W; k++)
      if (!m.v[k]) mx = fmaxf(mx, attn_zl<CAP>(to_f(a.v[k]), capl, &slope));
  }
  mx = warp_max(mx);
  float sum = 0.f;
  for (int j = lane; j < packs; j += 32) {
    const Pack<unsigned char, W> m = pack_at<unsigned char, W>(mr, j);
    if (!any_open(m)) continue;
    const Pack<T, W> a = pack_at<T, W>(sr, j);
#pragma unroll
    for (int k = 0; k < W; k++)
      if (!m.v[k]) sum += ex2_fast(attn_zl<CAP>(to_f(a.v[k]), capl, &slope) - mx);
  }
  sum = warp_sum(sum);
  const float inv_s = 1.f / sum;
  for (int j = lane; j < packs; j += 32) {
    const Pack<unsigned char, W> m = pack_at<unsigned char, W>(mr, j);
    if (!any_open(m)) {
      store_zeros<T, W>(pr, j);
      continue;
    }
    const Pack<T, W> a = pack_at<T, W>(sr, j);
    Pack<T, W> out;
#pragma unroll
    for (int k = 0; k < W; k++)
      put(&out.v[k], m.v[k] ? 0.f : attn_prob<CAP>(to_f(a.v[k]), capl, mx, inv_s, &slope));
    store_pack<T, W>(pr, j, out);
  }
  if (lane == 0) {
    stats[0] = mx;
    stats[1] = sum;
  }
}

// The backward of a row of at most 32 NP packs: p c (1 - t^2) kept in registers between the
// dot product and the gradient, dp as read (a third float an element held the kernel to two
// blocks an SM).
template <typename T, int W, int NP, int CAP>
__device__ void softmax_bwd_regs(const T *sr, const unsigned char *mr, float mx, float sum,
                                 const T *dpr, T *dsr, int packs, float cap, float capl,
                                 int lane) {
  const float inv_s = 1.f / sum;
  float q[NP][W];
  Pack<T, W> dp[NP];
  bool open[NP];
  float dot = 0.f;
  read_open_packs<T, W, NP>(
      sr, mr, packs, lane, open,
      [&](int i, const Pack<unsigned char, W> &m, const Pack<T, W> &a) {
        dp[i] = pack_at<T, W>(dpr, lane + 32 * i);
#pragma unroll
        for (int k = 0; k < W; k++) {
          float sl = 1.f;
          const float p = m.v[k] ? 0.f : attn_prob<CAP>(to_f(a.v[k]), capl, mx, inv_s, &sl);
          dot += p * to_f(dp[i].v[k]);
          q[i][k] = CAP ? p * (cap * sl) : p;
        }
      });
  dot = warp_sum(dot);
  write_packs<T, W, NP>(dsr, packs, lane, open,
                        [&](int i, int k) { return q[i][k] * (to_f(dp[i].v[k]) - dot); });
}

// The same for a row of any length, in two passes over it.
template <typename T, int W, int CAP>
__device__ void softmax_bwd_passes(const T *sr, const unsigned char *mr, float mx, float sum,
                                   const T *dpr, T *dsr, int packs, float cap, float capl,
                                   int lane) {
  const float inv_s = 1.f / sum;
  float dot = 0.f, slope;
  for (int j = lane; j < packs; j += 32) {
    const Pack<unsigned char, W> m = pack_at<unsigned char, W>(mr, j);
    if (!any_open(m)) continue;
    const Pack<T, W> a = pack_at<T, W>(sr, j), dp = pack_at<T, W>(dpr, j);
#pragma unroll
    for (int k = 0; k < W; k++)
      if (!m.v[k]) dot += attn_prob<CAP>(to_f(a.v[k]), capl, mx, inv_s, &slope) * to_f(dp.v[k]);
  }
  dot = warp_sum(dot);
  for (int j = lane; j < packs; j += 32) {
    const Pack<unsigned char, W> m = pack_at<unsigned char, W>(mr, j);
    if (!any_open(m)) {
      store_zeros<T, W>(dsr, j);
      continue;
    }
    const Pack<T, W> a = pack_at<T, W>(sr, j), dp = pack_at<T, W>(dpr, j);
    Pack<T, W> out;
#pragma unroll
    for (int k = 0; k < W; k++) {
      float g = 0.f, sl = 1.f;
      if (!m.v[k]) {
        const float pj = attn_prob<CAP>(to_f(a.v[k]), capl, mx, inv_s, &sl);
        g = pj * (to_f(dp.v[k]) - dot);
        if (CAP) g *= cap * sl;
      }
      put(&out.v[k], g);
    }
    store_pack<T, W>(dsr, j, out);
  }
}

// A forward row: in registers when it fits 32 NP packs (NP = 1, 2 or 4: 8 held every row's
// kernel to two blocks an SM for its registers), else two passes.
template <typename T, int W, int CAP>
__device__ void softmax_fwd_row(const T *sr, const unsigned char *mr, T *pr, float *stats,
                                int packs, float capl, int lane) {
  if (packs <= 32)
    softmax_fwd_regs<T, W, 1, CAP>(sr, mr, pr, stats, packs, capl, lane);
  else if (packs <= 64)
    softmax_fwd_regs<T, W, 2, CAP>(sr, mr, pr, stats, packs, capl, lane);
  else if (packs <= 128)
    softmax_fwd_regs<T, W, 4, CAP>(sr, mr, pr, stats, packs, capl, lane);
  else
    softmax_fwd_passes<T, W, CAP>(sr, mr, pr, stats, packs, capl, lane);
}

// A backward row: in registers up to 32 * 4 packs (two values an element held), else two
// passes.
template <typename T, int W, int CAP>
__device__ void softmax_bwd_row(const T *sr, const unsigned char *mr, float mx, float sum,
                                const T *dpr, T *dsr, int packs, float cap, float capl,
                                int lane) {
  if (packs <= 32)
    softmax_bwd_regs<T, W, 1, CAP>(sr, mr, mx, sum, dpr, dsr, packs, cap, capl, lane);
  else if (packs <= 64)
    softmax_bwd_regs<T, W, 2, CAP>(sr, mr, mx, sum, dpr, dsr, packs, cap, capl, lane);
  else if (packs <= 128)
    softmax_bwd_regs<T, W, 4, CAP>(sr, mr, mx, sum, dpr, dsr, packs, cap, capl, lane);
  else
    softmax_bwd_passes<T, W, CAP>(sr, mr, mx, sum, dpr, dsr, packs, cap, capl, lane);
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
  float *st = stats + 2 * row;
  const float capl = cap * LOG2E;
  constexpr int P = PackLen<T>::n;
  const int n = (int)t_len;
  if (scores_in_packs(s, p, mask, t_len)) {
    if (cap > 0.f)
      softmax_fwd_row<T, P, 1>(sr, mr, pr, st, n / P, capl, lane);
    else
      softmax_fwd_row<T, P, 0>(sr, mr, pr, st, n / P, capl, lane);
  } else if (cap > 0.f) {
    softmax_fwd_row<T, 1, 1>(sr, mr, pr, st, n, capl, lane);
  } else {
    softmax_fwd_row<T, 1, 0>(sr, mr, pr, st, n, capl, lane);
  }
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
  const float capl = cap * LOG2E;
  constexpr int P = PackLen<T>::n;
  const int n = (int)t_len;
  if (scores_in_packs(s, dp, mask, t_len) && aligned(ds, 16)) {
    if (cap > 0.f)
      softmax_bwd_row<T, P, 1>(sr, mr, m, sum, dpr, dsr, n / P, cap, capl, lane);
    else
      softmax_bwd_row<T, P, 0>(sr, mr, m, sum, dpr, dsr, n / P, cap, capl, lane);
  } else if (cap > 0.f) {
    softmax_bwd_row<T, 1, 1>(sr, mr, m, sum, dpr, dsr, n, cap, capl, lane);
  } else {
    softmax_bwd_row<T, 1, 0>(sr, mr, m, sum, dpr, dsr, n, cap, capl, lane);
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

// Three blocks of 8 rows an SM (csrc/autograd.cpp's launch), where 89 registers a thread
// allowed two.
extern "C" __global__ void __launch_bounds__(256, 3) softcap_softmax_bwd_bf16(const bf16 *s, const unsigned char *mask,
                                                   const float *stats, const bf16 *dp, bf16 *ds,
                                                   long long rows, long long t_len, float cap) {
  softcap_softmax_bwd<bf16>(s, mask, stats, dp, ds, rows, t_len, cap);
}

extern "C" __global__ void softcap_softmax_bwd_f32(const float *s, const unsigned char *mask,
                                                  const float *stats, const float *dp, float *ds,
                                                  long long rows, long long t_len, float cap) {
  softcap_softmax_bwd<float>(s, mask, stats, dp, ds, rows, t_len, cap);
}
