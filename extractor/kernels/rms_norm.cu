// Gemma's RMSNorm on rows of the model dtype, one warp a row: y = x * rsqrt(mean(x^2) + eps)
// * scale in float32 (scale = 1 + weight, float32), rounded once to the model dtype, where ATen
// runs a cast to float32, its fused rms_norm and a cast back (16 bytes a bf16 element against
// 4 here). The forward keeps each row's rsqrt for the backward, which is the same chain's:
// dx = r (dy scale) - x r^3 mean(dy scale x), in float32, rounded once. The scale is frozen
// (no gradient).

#include "common.cuh"

template <typename T>
__device__ void rms_norm_fwd(const T *x, const float *scale, T *y, float *rstd, long long rows,
                             long long d, float eps) {
  const long long row = (long long)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
  if (row >= rows) return;  // the whole warp: rows are warp-uniform
  const int lane = threadIdx.x & 31;
  const T *xr = x + row * d;
  T *yr = y + row * d;
  float ss = 0.f;
  for (long long j = lane; j < d; j += 32) {
    const float v = to_f(xr[j]);
    ss += v * v;
  }
  const float r = rsqrtf(warp_sum(ss) / (float)d + eps);
  for (long long j = lane; j < d; j += 32) put(&yr[j], to_f(xr[j]) * r * scale[j]);
  if (lane == 0) rstd[row] = r;
}

template <typename T>
__device__ void rms_norm_bwd(const T *x, const float *scale, const float *rstd, const T *dy,
                             T *dx, long long rows, long long d) {
  const long long row = (long long)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
  if (row >= rows) return;
  const int lane = threadIdx.x & 31;
  const T *xr = x + row * d, *dyr = dy + row * d;
  T *dxr = dx + row * d;
  const float r = rstd[row];
  float a = 0.f;
  for (long long j = lane; j < d; j += 32) a += to_f(dyr[j]) * scale[j] * to_f(xr[j]);
  const float c = warp_sum(a) / (float)d * r * r * r;
  for (long long j = lane; j < d; j += 32)
    put(&dxr[j], r * (to_f(dyr[j]) * scale[j]) - to_f(xr[j]) * c);
}

extern "C" __global__ void rms_norm_fwd_bf16(const bf16 *x, const float *scale, bf16 *y,
                                            float *rstd, long long rows, long long d, float eps) {
  rms_norm_fwd<bf16>(x, scale, y, rstd, rows, d, eps);
}

extern "C" __global__ void rms_norm_fwd_f32(const float *x, const float *scale, float *y,
                                           float *rstd, long long rows, long long d, float eps) {
  rms_norm_fwd<float>(x, scale, y, rstd, rows, d, eps);
}

extern "C" __global__ void rms_norm_bwd_bf16(const bf16 *x, const float *scale,
                                            const float *rstd, const bf16 *dy, bf16 *dx,
                                            long long rows, long long d) {
  rms_norm_bwd<bf16>(x, scale, rstd, dy, dx, rows, d);
}

extern "C" __global__ void rms_norm_bwd_f32(const float *x, const float *scale,
                                           const float *rstd, const float *dy, float *dx,
                                           long long rows, long long d) {
  rms_norm_bwd<float>(x, scale, rstd, dy, dx, rows, d);
}
