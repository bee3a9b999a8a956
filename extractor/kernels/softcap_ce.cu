// Next-token cross-entropy fused with the final logit soft-cap, one block per row of the
// [rows, vocab] pre-cap logits the head product just wrote. With `grad`, d(CE)/d(pre-cap
// logits) overwrites the row in place, ready for the head's backward product.
//
// It follows the ATen sequence in `ce_rows` (models/common.rs) step for step, rounding to the model
// dtype where that sequence does: z = c * tanh(s / c) in the model dtype (as transformers;
// ATen on CUDA divides by a scalar as a multiply by its float reciprocal), log-softmax in
// float32, g = softmax - onehot rounded to the model dtype, then g - (g * t) * t. The row is
// read twice and written twice (8 bytes a bf16 logit), where that sequence moves about 52.

#include "common.cuh"

// The capped logit z and its tanh t (cap <= 0: no soft-cap, z = s).
template <typename T>
__device__ __forceinline__ float capped(float s, float cap, float inv_cap, float *t) {
  if (cap <= 0.f) {
    *t = 0.f;
    return s;
  }
  *t = rnd<T>(tanhf(rnd<T>(s * inv_cap)));
  return rnd<T>(*t * cap);
}

// The first pass over a row in packs of W: the MaxSum of its capped logits, z at the target into
// *z_target, and with `keep_t` t written over each logit for the second pass.
template <typename T, int W>
__device__ MaxSum ce_first_pass(T *row, int v, long long target, float cap, float inv_cap,
                                bool keep_t, float *z_target) {
  Pack<T, W> *packs = (Pack<T, W> *)row;
  MaxSum acc = {NEG_INF, 0.f};
  for (int j = threadIdx.x; j < v / W; j += blockDim.x) {
    const Pack<T, W> in = packs[j];
    Pack<T, W> out;
    float z[W];
#pragma unroll
    for (int k = 0; k < W; k++) {
      float t;
      z[k] = capped<T>(to_f(in.v[k]), cap, inv_cap, &t);
      if ((long long)j * W + k == target) *z_target = z[k];
      put(&out.v[k], t);
    }
    push(acc, z);
    if (keep_t) packs[j] = out;
  }
  return acc;
}

// The second pass in packs of W: each element becomes its gradient.
template <typename T, int W>
__device__ void ce_second_pass(T *row, int v, long long target, float w, float cap, bool keep_t,
                               MaxSum acc, float log_sum) {
  Pack<T, W> *packs = (Pack<T, W> *)row;
  for (int j = threadIdx.x; j < v / W; j += blockDim.x) {
    const Pack<T, W> in = packs[j];
    Pack<T, W> out;
#pragma unroll
    for (int k = 0; k < W; k++) {
      float z, t = 0.f;
      if (keep_t) {
        t = to_f(in.v[k]);
        z = rnd<T>(t * cap);
      } else {
        z = to_f(in.v[k]);
      }
      float p = expf((z - acc.m) - log_sum) * w;
      if ((long long)j * W + k == target) p += -w;
      float g = rnd<T>(p);
      if (cap > 0.f) {
        float u = rnd<T>(g * t);
        u = rnd<T>(u * t);
        g = rnd<T>(g - u);
      }
      put(&out.v[k], g);
    }
    packs[j] = out;
  }
}

// loss[row] = -log_softmax(z)[target] * has[row]; with grad, the row becomes
// ((softmax(z) - onehot(target)) * has[row]) * (1 - t^2), each step rounded as ATen rounds it.
template <typename T>
__device__ void softcap_ce(T *logits, const long long *targets, const float *has, float *loss,
                           long long vocab, float cap, int grad) {
  __shared__ float z_target;
  T *row = logits + (long long)blockIdx.x * vocab;
  const long long target = targets[blockIdx.x];
  const float w = has[blockIdx.x];
  const float inv_cap = cap > 0.f ? 1.0f / cap : 0.f;
  // A target outside the row (none of dmsae's) leaves the loss NaN, never a stale value.
  if (threadIdx.x == 0) z_target = __int_as_float(0x7fc00000);
  __syncthreads();

  // With the cap and a gradient to write, the first pass leaves t (exact in T: it is rounded
  // to T) in the row for the second, which then skips the division, the tanh and two
  // roundings an element. A vocabulary fits an int. Element-at-a-time loads made each thread
  // wait on 250 dependent loads a pass at Gemma's vocabulary (18 ms a batch of 8 x 1,024
  // against 2 ms of traffic, H200); packs make that 31.
  const int v = (int)vocab;
  const bool keep_t = grad && cap > 0.f;
  const bool packed = packs_fit<T>(logits, vocab);
  const int W = PackLen<T>::n;
  MaxSum acc = packed ? ce_first_pass<T, W>(row, v, target, cap, inv_cap, keep_t, &z_target)
                      : ce_first_pass<T, 1>(row, v, target, cap, inv_cap, keep_t, &z_target);
  acc = block_merge(acc);
  // log_softmax(z) = (z - m) - log(sum), as ATen forms it.
  const float log_sum = logf(acc.s);
  if (threadIdx.x == 0) loss[blockIdx.x] = -((z_target - acc.m) - log_sum) * w;
  if (!grad) return;
  // Each thread rewrites only the elements it read (and, with the cap, wrote t into) above.
  if (packed)
    ce_second_pass<T, W>(row, v, target, w, cap, keep_t, acc, log_sum);
  else
    ce_second_pass<T, 1>(row, v, target, w, cap, keep_t, acc, log_sum);
}

extern "C" __global__ void softcap_ce_bf16(bf16 *logits, const long long *targets,
                                           const float *has, float *loss, long long vocab,
                                           float cap, int grad) {
  softcap_ce<bf16>(logits, targets, has, loss, vocab, cap, grad);
}

extern "C" __global__ void softcap_ce_f32(float *logits, const long long *targets,
                                          const float *has, float *loss, long long vocab,
                                          float cap, int grad) {
  softcap_ce<float>(logits, targets, has, loss, vocab, cap, grad);
}
