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

// W elements of T moved as one access: 16 bytes (W = PACK<T>) where a row lines up, so a warp's
// load moves 512 bytes rather than 64 (bf16) and each thread runs W times fewer dependent
// rounds of a loop; W = 1 is the element-at-a-time fallback.
template <typename T, int W> struct alignas(W * sizeof(T)) Pack {
  T v[W];
};
template <typename T> struct PackLen {
  static const int n = 16 / sizeof(T);
};

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
