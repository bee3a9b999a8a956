// What the kernels of this folder share: bf16 as its bits, rounding as ATen rounds, and the
// running (max, sum of exp) that gives a softmax denominator in one pass. No CUDA header is
// included, so NVRTC compiles these as they are (kernels.rs passes this file as a header).
#pragma once

typedef unsigned short bf16;

#define NEG_INF __int_as_float(0xff800000)

// A grid-stride loop over n elements, for the elementwise kernels.
#define FOR_EACH_ELEMENT(i, n)                                                      \
  for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < (n); \
       i += (long long)gridDim.x * blockDim.x)

// This thread's warp across the grid: the row of a one-warp-a-row kernel.
__device__ __forceinline__ long long warp_index() {
  return (long long)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
}

__device__ __forceinline__ float to_f(float x) { return x; }
__device__ __forceinline__ float to_f(bf16 x) { return __uint_as_float(((unsigned)x) << 16); }

// Round to nearest even, NaN kept quiet: c10::BFloat16's conversion.
__device__ __forceinline__ bf16 bf16_of(float x) {
  unsigned u = __float_as_uint(x);
  if ((u & 0x7fffffffu) > 0x7f800000u) return (bf16)0x7fc0;
  return (bf16)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

__device__ __forceinline__ void put(float *p, float x) { *p = x; }
__device__ __forceinline__ void put(bf16 *p, float x) { *p = bf16_of(x); }

// x as the storage type T would hold it.
template <typename T> __device__ __forceinline__ float rnd(float x);
template <> __device__ __forceinline__ float rnd<float>(float x) { return x; }
template <> __device__ __forceinline__ float rnd<bf16>(float x) { return to_f(bf16_of(x)); }

// A running (max m, sum of exp(x - m)): the softmax denominator in one pass.
struct MaxSum {
  float m, s;
};

// acc with one more value z.
__device__ __forceinline__ void push(MaxSum &acc, float z) {
  if (z > acc.m) {
    acc.s = acc.s * expf(acc.m - z) + 1.f;
    acc.m = z;
  } else {
    acc.s += expf(z - acc.m);
  }
}

__device__ __forceinline__ MaxSum merge(MaxSum a, MaxSum b) {
  float m = fmaxf(a.m, b.m);
  if (m == NEG_INF) return a;
  MaxSum r = {m, a.s * expf(a.m - m) + b.s * expf(b.m - m)};
  return r;
}

__device__ __forceinline__ MaxSum warp_merge(MaxSum a) {
  for (int o = 16; o > 0; o >>= 1) {
    MaxSum b = {__shfl_xor_sync(0xffffffffu, a.m, o), __shfl_xor_sync(0xffffffffu, a.s, o)};
    a = merge(a, b);
  }
  return a;
}

__device__ __forceinline__ float warp_sum(float a) {
  for (int o = 16; o > 0; o >>= 1) a += __shfl_xor_sync(0xffffffffu, a, o);
  return a;
}

// The whole block's MaxSum, in every thread. blockDim.x is a multiple of 32, at most 1024.
__device__ MaxSum block_merge(MaxSum a) {
  __shared__ float ms[32], ss[32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  a = warp_merge(a);
  if (lane == 0) {
    ms[warp] = a.m;
    ss[warp] = a.s;
  }
  __syncthreads();
  if (warp == 0) {
    MaxSum b = {NEG_INF, 0.f};
    if (lane < warps) {
      b.m = ms[lane];
      b.s = ss[lane];
    }
    b = warp_merge(b);
    if (lane == 0) {
      ms[0] = b.m;
      ss[0] = b.s;
    }
  }
  __syncthreads();
  MaxSum r = {ms[0], ss[0]};
  return r;
}
