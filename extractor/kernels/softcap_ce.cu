// Next-token cross-entropy fused with the final logit soft-cap, one block per row of the
// [rows, vocab] pre-cap logits the head product just wrote. With `grad`, d(CE)/d(pre-cap
// logits) overwrites the row in place, ready for the head's backward product.
//
// Everything between the logits and the gradient is float32: z = c * tanh(s / c) (ATen on
// CUDA divides by a scalar as a multiply by its float reciprocal), log-softmax, and
// (softmax - onehot) * (1 - t^2); only the gradient is rounded to the model dtype, to be
// stored. Mirroring ATen's bf16 chain instead (z rounded to bf16, its ulp 0.125 at Gemma's
// cap, and four more roundings an element) took 180 instructions an element and made the
// kernel bound by them: 13.3 ms a batch of 8 x 1,024 at Gemma's vocabulary on an H200,
// against 2.6 ms of traffic. The row is read twice and written once; the second pass
// computes t again rather than reading it back.

#include "common.cuh"

// The capped logit z and d z / d s = 1 - t^2 (cap <= 0: no soft-cap, z = s, slope 1).
__device__ __forceinline__ float capped(float s, float cap, float inv_cap, float *slope) {
  if (cap <= 0.f) {
    *slope = 1.f;
    return s;
  }
  const float t = tanhf(s * inv_cap);
  *slope = 1.f - t * t;
  return t * cap;
}

// The first pass over a row in packs of W: the MaxSum of its capped logits, and z at the
// target (element `tk` of pack `tp`; tp < 0: none in the row) into *z_target.
template <typename T, int W>
__device__ MaxSum ce_first_pass(const T *row, int v, int tp, int tk, float cap, float inv_cap,
                                float *z_target) {
  const Pack<T, W> *packs = (const Pack<T, W> *)row;
  MaxSum acc = {NEG_INF, 0.f};
  for (int j = threadIdx.x; j < v / W; j += blockDim.x) {
    const Pack<T, W> in = packs[j];
    float z[W];
#pragma unroll
    for (int k = 0; k < W; k++) {
      float slope;
      z[k] = capped(to_f(in.v[k]), cap, inv_cap, &slope);
      if (j == tp && k == tk) *z_target = z[k];
    }
    push(acc, z);
  }
  return acc;
}

// The second pass in packs of W: each element becomes its gradient,
// w * (softmax - onehot) * slope, with softmax = exp((z - m) - log_sum) (folding m into
// log_sum first would cost float32's last bits when m is large).
template <typename T, int W>
__device__ void ce_second_pass(T *row, int v, int tp, int tk, float w, float cap,
                               float inv_cap, float m, float log_sum) {
  Pack<T, W> *packs = (Pack<T, W> *)row;
  for (int j = threadIdx.x; j < v / W; j += blockDim.x) {
    const Pack<T, W> in = packs[j];
    Pack<T, W> out;
#pragma unroll
    for (int k = 0; k < W; k++) {
      float slope;
      const float z = capped(to_f(in.v[k]), cap, inv_cap, &slope);
      float p = expf((z - m) - log_sum) * w;
      if (j == tp && k == tk) p -= w;
      put(&out.v[k], p * slope);
    }
    packs[j] = out;
  }
}

// loss[row] = -log_softmax(z)[target] * has[row]; with grad, the row becomes
// (softmax(z) - onehot(target)) * has[row] * (1 - t^2).
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

  // A vocabulary fits an int. Element-at-a-time loads made each thread wait on 250 dependent
  // loads a pass at Gemma's vocabulary; packs make that 31.
  const int v = (int)vocab;
  const bool packed = packs_fit<T>(logits, vocab);
  const int W = packed ? PackLen<T>::n : 1;
  const bool in_row = target >= 0 && target < vocab;
  const int tp = in_row ? (int)target / W : -1, tk = in_row ? (int)target % W : 0;
  MaxSum acc = packed ? ce_first_pass<T, PackLen<T>::n>(row, v, tp, tk, cap, inv_cap, &z_target)
                      : ce_first_pass<T, 1>(row, v, tp, tk, cap, inv_cap, &z_target);
  acc = block_merge(acc);
  // log_softmax(z) = (z - m) - log(sum), as ATen forms it.
  const float log_sum = logf(acc.s);
  if (threadIdx.x == 0) loss[blockIdx.x] = -((z_target - acc.m) - log_sum) * w;
  if (!grad) return;
  // Each thread rewrites only the elements it read above.
  if (packed)
    ce_second_pass<T, PackLen<T>::n>(row, v, tp, tk, w, cap, inv_cap, acc.m, log_sum);
  else
    ce_second_pass<T, 1>(row, v, tp, tk, w, cap, inv_cap, acc.m, log_sum);
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
