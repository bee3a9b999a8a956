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

// Round to nearest even, NaN kept quiet: c10::BFloat16's conversion. On the GPU one cvt
// instruction (the same rounding; a NaN comes out as 0x7fff rather than 0x7fc0), where the
// integer form took five an element.
#ifdef DMSAE_EMULATOR
__device__ __forceinline__ bf16 bf16_of(float x) {
  unsigned u = __float_as_uint(x);
  if ((u & 0x7fffffffu) > 0x7f800000u) return (bf16)0x7fc0;
  return (bf16)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}
#else
__device__ __forceinline__ bf16 bf16_of(float x) {
  bf16 r;
  asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(r) : "f"(x));
  return r;
}
#endif

__device__ __forceinline__ void put(float *p, float x) { *p = x; }
__device__ __forceinline__ void put(bf16 *p, float x) { *p = bf16_of(x); }

// W elements of T moved as one access: 16 bytes (W = PACK<T>) where a row lines up, so a warp's
// load moves 512 bytes rather than 64 (bf16) and each thread runs W times fewer dependent
// rounds of a loop; W = 1 is the element-at-a-time fallback.
template <typename T, int W> struct alignas(W * sizeof(T)) Pack {
  T v[W];
};
template <typename T> struct PackLen {
  static const int n = 16 / sizeof(T);
};

// Floats a 16-byte pack holds.
static const int kFloatPack = PackLen<float>::n;

// Pack j of W elements: elements W * j to W * j + W - 1.
template <typename T, int W>
__device__ __forceinline__ Pack<T, W> pack_at(const T *p, long long j) {
  return ((const Pack<T, W> *)p)[j];
}

template <typename T, int W>
__device__ __forceinline__ void store_pack(T *p, long long j, const Pack<T, W> &v) {
  ((Pack<T, W> *)p)[j] = v;
}

// Whether p is aligned to `bytes` (a power of 2).
__device__ __forceinline__ bool aligned(const void *p, unsigned bytes) {
  return ((unsigned long long)p & (bytes - 1)) == 0;
}

// Whether rows of n elements of T from p can be read in 16-byte packs (never, compiled with
// DMSAE_NO_PACKS: kernels.rs's DMSAE_PACKS=0, for timing one way against the other).
template <typename T> __device__ __forceinline__ bool packs_fit(const void *p, long long n) {
#ifdef DMSAE_NO_PACKS
  return false;
#endif
  return n % PackLen<T>::n == 0 && aligned(p, 16);
}

// 2^x and 1/x as one special-function instruction each (ex2.approx: 2^-22 relative;
// rcp.approx: 1 ulp; both flush subnormals). expf and tanhf's accurate paths cost 10 and 20-odd
// instructions and were what bound the soft-cap kernels. The emulator (csrc/cuda_emulator.cpp)
// defines DMSAE_EMULATOR and computes them exactly.
#ifdef DMSAE_EMULATOR
__device__ __forceinline__ float ex2_fast(float x) { return exp2f(x); }
__device__ __forceinline__ float rcp_fast(float x) { return 1.f / x; }
#else
__device__ __forceinline__ float ex2_fast(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}
__device__ __forceinline__ float rcp_fast(float x) {
  float y;
  asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}
#endif

#define LOG2E 1.4426950408889634f

// tanh(x) as 1 - 2r with r = 1 / (1 + e^(2x)): what a soft-cap c * tanh(x) needs, in three
// instructions. c * (tanh - 1) = -2 c r is formed without cancellation, so exp(z - c) and
// 1 - tanh^2 = 4 r (1 - r) keep float32's relative precision; tanh itself is within 1e-7 of the
// exact value. x = +-inf give r = 0 and 1; NaN stays NaN. Callers pass y = 2 log2(e) x, the
// factor folded into whatever x is scaled by already.
struct TanhParts {
  float r, e;  // r, and e^(2x)
};
__device__ __forceinline__ TanhParts tanh_parts(float y) {
  const float e = ex2_fast(y);
  TanhParts p = {rcp_fast(1.f + e), e};
  return p;
}
// 1 - r = (1 + tanh) / 2, as e r where r is near 1 (e < 1) and the subtraction would cancel.
__device__ __forceinline__ float one_minus_r(TanhParts p) {
  return p.e < 1.f ? p.e * p.r : 1.f - p.r;
}
// 1 - tanh^2 = 4 r (1 - r).
__device__ __forceinline__ float tanh_slope(TanhParts p) { return 4.f * p.r * one_minus_r(p); }

// x as the storage type T would hold it.
template <typename T> __device__ __forceinline__ float rnd(float x);
template <> __device__ __forceinline__ float rnd<float>(float x) { return x; }
template <> __device__ __forceinline__ float rnd<bf16>(float x) { return to_f(bf16_of(x)); }

// A running (max m, sum of exp(x - m)): the softmax denominator in one pass.
struct MaxSum {
  float m, s;
};

// acc with W more values z: one rescale to their largest rather than a comparison a value. A
// masked value given as -inf adds exactly 0 beside any finite one.
template <int W> __device__ __forceinline__ void push(MaxSum &acc, const float (&z)[W]) {
  float top = NEG_INF;
#pragma unroll
  for (int k = 0; k < W; k++) top = fmaxf(top, z[k]);
  if (top > acc.m) {
    acc.s *= expf(acc.m - top);
    acc.m = top;
  }
#pragma unroll
  for (int k = 0; k < W; k++) acc.s += expf(z[k] - acc.m);
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

// Lane t's v, in every lane of the warp (all 32 take part).
template <typename T> __device__ __forceinline__ T from_lane(T v, int t) {
  return __shfl_sync(0xffffffffu, v, t);
}

template <typename T> __device__ __forceinline__ T warp_sum(T a) {
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
