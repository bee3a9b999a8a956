// Gemma's RMSNorm on rows of the model dtype, one warp a row: y = x * rsqrt(mean(x^2) + eps)
// * scale in float32 (scale = 1 + weight, float32), rounded once to the model dtype, where ATen
// runs a cast to float32, its fused rms_norm and a cast back (16 bytes a bf16 element against
// 4 here). The forward keeps each row's rsqrt for the backward, which is the same chain's:
// dx = r (dy scale) - x r^3 mean(dy scale x), in float32, rounded once; plus, where x is also
// the residual stream's (a pre-norm), that stream's gradient, in the same rounding where
// autograd's sum of the two took a pass of its own. The scale is frozen (no gradient).

#include "common.cuh"

// A row in packs of W (the scale too, as float32 packs); with a residual row `res`, y is
// res + the norm, the norm rounded to T first as ATen's add of the two would find it (Gemma's
// post-attention and post-feedforward norms feed the residual stream: one pass where a norm
// and an add were three). __fmul_rn keeps the product from fusing into the add (float32).
// Loops unrolled three ways (Gemma-2-2B's rows are 9 packs a lane), the rows __restrict__, so
// that a lane has three packs' loads in flight rather than one.
template <typename T, int W, bool RES>
__device__ void rms_norm_fwd_row(const T *__restrict__ xr, const float *__restrict__ scale,
                                 const T *__restrict__ res, T *__restrict__ yr, float *rstd,
                                 long long d, float eps, int lane) {
  float ss = 0.f;
#pragma unroll 3
  for (long long j = lane; j < d / W; j += 32) {
    const Pack<T, W> a = pack_at<T, W>(xr, j);
#pragma unroll
    for (int k = 0; k < W; k++) {
      const float v = to_f(a.v[k]);
      ss += v * v;
    }
  }
  const float r = rsqrtf(warp_sum(ss) / (float)d + eps);
#pragma unroll 3
  for (long long j = lane; j < d / W; j += 32) {
    const Pack<T, W> a = pack_at<T, W>(xr, j);
    const Pack<float, W> s = pack_at<float, W>(scale, j);
    Pack<T, W> out;
    if (RES) {
      const Pack<T, W> h = pack_at<T, W>(res, j);
#pragma unroll
      for (int k = 0; k < W; k++)
        put(&out.v[k], to_f(h.v[k]) + rnd<T>(__fmul_rn(to_f(a.v[k]) * r, s.v[k])));
    } else {
#pragma unroll
      for (int k = 0; k < W; k++) put(&out.v[k], to_f(a.v[k]) * r * s.v[k]);
    }
    store_pack<T, W>(yr, j, out);
  }
  if (lane == 0) *rstd = r;
}

template <typename T, int W, bool RES>
__device__ void rms_norm_bwd_row(const T *__restrict__ xr, const float *__restrict__ scale,
                                 float r, const T *__restrict__ dyr,
                                 const T *__restrict__ dresr, T *__restrict__ dxr, long long d,
                                 int lane) {
  float a = 0.f;
#pragma unroll 3
  for (long long j = lane; j < d / W; j += 32) {
    const Pack<T, W> x = pack_at<T, W>(xr, j), dy = pack_at<T, W>(dyr, j);
    const Pack<float, W> s = pack_at<float, W>(scale, j);
#pragma unroll
    for (int k = 0; k < W; k++) a += to_f(dy.v[k]) * s.v[k] * to_f(x.v[k]);
  }
  const float c = warp_sum(a) / (float)d * r * r * r;
#pragma unroll 3
  for (long long j = lane; j < d / W; j += 32) {
    const Pack<T, W> x = pack_at<T, W>(xr, j), dy = pack_at<T, W>(dyr, j);
    const Pack<float, W> s = pack_at<float, W>(scale, j);
    Pack<T, W> out;
    float v[W];
#pragma unroll
    for (int k = 0; k < W; k++) v[k] = r * (to_f(dy.v[k]) * s.v[k]) - to_f(x.v[k]) * c;
    if (RES) {
      const Pack<T, W> g = pack_at<T, W>(dresr, j);
#pragma unroll
      for (int k = 0; k < W; k++) v[k] += to_f(g.v[k]);
    }
#pragma unroll
    for (int k = 0; k < W; k++) put(&out.v[k], v[k]);
    store_pack<T, W>(dxr, j, out);
  }
}

// In 16-byte packs of T when rows line up (and the scale, in packs of as many floats), else an
// element at a time. Rows are warp-uniform, so is the choice.
template <typename T>
__device__ bool rows_in_packs(const T *a, const T *b, const float *scale, long long d) {
  const int w = PackLen<T>::n;
  return packs_fit<T>(a, d) && aligned(b, 16) && aligned(scale, w * sizeof(float));
}

// res: null, or the residual [rows, d] y adds the norm to.
template <typename T>
__device__ void rms_norm_fwd(const T *x, const float *scale, const T *res, T *y, float *rstd,
                             long long rows, long long d, float eps) {
  const long long row = warp_index();
  if (row >= rows) return;  // the whole warp: rows are warp-uniform
  const int lane = threadIdx.x & 31;
  const T *xr = x + row * d, *rr = res ? res + row * d : res;
  T *yr = y + row * d;
  const bool packed = rows_in_packs(x, y, scale, d) && aligned(res, 16);
  constexpr int P = PackLen<T>::n;
  if (packed && res)
    rms_norm_fwd_row<T, P, true>(xr, scale, rr, yr, rstd + row, d, eps, lane);
  else if (packed)
    rms_norm_fwd_row<T, P, false>(xr, scale, rr, yr, rstd + row, d, eps, lane);
  else if (res)
    rms_norm_fwd_row<T, 1, true>(xr, scale, rr, yr, rstd + row, d, eps, lane);
  else
    rms_norm_fwd_row<T, 1, false>(xr, scale, rr, yr, rstd + row, d, eps, lane);
}

// dres: null, or the residual stream's gradient [rows, d] dx adds.
template <typename T>
__device__ void rms_norm_bwd(const T *x, const float *scale, const float *rstd, const T *dy,
                             const T *dres, T *dx, long long rows, long long d) {
  const long long row = warp_index();
  if (row >= rows) return;
  const int lane = threadIdx.x & 31;
  const T *xr = x + row * d, *dyr = dy + row * d, *gr = dres ? dres + row * d : dres;
  T *dxr = dx + row * d;
  const bool packed = rows_in_packs(x, dy, scale, d) && aligned(dx, 16) && aligned(dres, 16);
  constexpr int P = PackLen<T>::n;
  const float r = rstd[row];
  if (packed && dres)
    rms_norm_bwd_row<T, P, true>(xr, scale, r, dyr, gr, dxr, d, lane);
  else if (packed)
    rms_norm_bwd_row<T, P, false>(xr, scale, r, dyr, gr, dxr, d, lane);
  else if (dres)
    rms_norm_bwd_row<T, 1, true>(xr, scale, r, dyr, gr, dxr, d, lane);
  else
    rms_norm_bwd_row<T, 1, false>(xr, scale, r, dyr, gr, dxr, d, lane);
}

extern "C" __global__ void rms_norm_fwd_bf16(const bf16 *x, const float *scale, const bf16 *res,
                                            bf16 *y, float *rstd, long long rows, long long d,
                                            float eps) {
  rms_norm_fwd<bf16>(x, scale, res, y, rstd, rows, d, eps);
}

extern "C" __global__ void rms_norm_fwd_f32(const float *x, const float *scale, const float *res,
                                           float *y, float *rstd, long long rows, long long d,
                                           float eps) {
  rms_norm_fwd<float>(x, scale, res, y, rstd, rows, d, eps);
}

extern "C" __global__ void rms_norm_bwd_bf16(const bf16 *x, const float *scale,
                                            const float *rstd, const bf16 *dy,
                                            const bf16 *dres, bf16 *dx, long long rows,
                                            long long d) {
  rms_norm_bwd<bf16>(x, scale, rstd, dy, dres, dx, rows, d);
}

extern "C" __global__ void rms_norm_bwd_f32(const float *x, const float *scale,
                                           const float *rstd, const float *dy,
                                           const float *dres, float *dx, long long rows,
                                           long long d) {
  rms_norm_bwd<float>(x, scale, rstd, dy, dres, dx, rows, d);
}
