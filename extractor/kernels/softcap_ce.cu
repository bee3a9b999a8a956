// Next-token cross-entropy fused with the final logit soft-cap, one block per row of the
// [rows, vocab] pre-cap logits the head product just wrote. With `grad`, d(CE)/d(pre-cap
// logits) overwrites the row in place, ready for the head's backward product.
//
// Everything between the logits and the gradient is float32: z = c * tanh(s / c), log-softmax,
// and (softmax - onehot) * (1 - t^2); only the gradient is rounded to the model dtype, to be
// stored. Mirroring ATen's bf16 chain instead (z rounded to bf16, its ulp 0.125 at Gemma's
// cap, and four more roundings an element) took 180 instructions an element; tanhf and expf
// done accurately, about 80, and both bound the kernel by its arithmetic (13.3 and 7.2 ms a
// batch of 8 x 1,024 at Gemma's vocabulary on an H200, against 2.6 ms of traffic). With a cap,
// z <= c, so the softmax is taken against c rather than a running maximum: exp(z - c) =
// exp(-2 c r) (common.cuh's tanh_parts) needs no rescaling, and for c <= 40 (kernels.rs
// checks) it cannot underflow (e^-80 is a normal float). The row is read twice and written
// once; the second pass computes r again rather than reading it back.

#include "common.cuh"

// Without a cap: the MaxSum of a row's logits in packs of W (ATen's log-softmax recipe), and
// the logit at the target (element `tk` of pack `tp`; tp < 0: none in the row) into *z_target.
template <typename T, int W>
__device__ MaxSum ce_first_pass(const T *row, int v, int tp, int tk, float *z_target) {
  MaxSum acc = {NEG_INF, 0.f};
  for (int j = threadIdx.x; j < v / W; j += blockDim.x) {
    const Pack<T, W> in = pack_at<T, W>(row, j);
    float z[W];
#pragma unroll
    for (int k = 0; k < W; k++) {
      z[k] = to_f(in.v[k]);
      if (j == tp && k == tk) *z_target = z[k];
    }
    push(acc, z);
  }
  return acc;
}

// With a cap c: the sum of exp(z - c) over the row, and r (tanh_parts) at the target.
// k = 2 log2(e) / c, so tanh_parts(k s) is tanh(s / c)'s; c2 = -2 c log2(e), so
// exp(z - c) = 2^(c2 r).
template <typename T, int W>
__device__ float ce_capped_first_pass(const T *row, int v, int tp, int tk, float k_in, float c2,
                                      float *r_target) {
  float sum = 0.f;
  for (int j = threadIdx.x; j < v / W; j += blockDim.x) {
    const Pack<T, W> in = pack_at<T, W>(row, j);
    float r[W];
#pragma unroll
    for (int k = 0; k < W; k++) {
      r[k] = tanh_parts(to_f(in.v[k]) * k_in).r;
      sum += ex2_fast(c2 * r[k]);
    }
    if (j == tp) {
#pragma unroll
      for (int k = 0; k < W; k++)
        if (k == tk) *r_target = r[k];
    }
  }
  return sum;
}

// The second pass in packs of W: each element becomes its gradient,
// w * (softmax - onehot) * slope. Without a cap, softmax = exp((z - m) - log_sum) (folding m
// into log_sum first would cost float32's last bits when m is large); with one,
// 2^(c2 r - log2 of the sum of exp(z - c)).
template <typename T, int W, int CAP>
__device__ void ce_second_pass(T *row, int v, int tp, int tk, float w, float k_in, float c2,
                               float m, float log_sum) {
  for (int j = threadIdx.x; j < v / W; j += blockDim.x) {
    const Pack<T, W> in = pack_at<T, W>(row, j);
    Pack<T, W> out;
#pragma unroll
    for (int k = 0; k < W; k++) {
      float p, slope = 1.f;
      if (CAP) {
        const TanhParts th = tanh_parts(to_f(in.v[k]) * k_in);
        p = ex2_fast(c2 * th.r - log_sum);
        slope = tanh_slope(th);
      } else {
        p = expf((to_f(in.v[k]) - m) - log_sum);
      }
      if (j == tp && k == tk) p -= 1.f;
      put(&out.v[k], p * (w * slope));
    }
    store_pack<T, W>(row, j, out);
  }
}

// The block's sum of a float, in every thread.
__device__ float block_sum(float a) {
  MaxSum m = {0.f, a};
  return block_merge(m).s;
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
  const float k_in = cap > 0.f ? 2.f * LOG2E / cap : 0.f;
  // A target outside the row (none of dmsae's) leaves the loss NaN, never a stale value
  // (z_target holds r at the target when capped).
  if (threadIdx.x == 0) z_target = __int_as_float(0x7fc00000);
  __syncthreads();

  // A vocabulary fits an int. Element-at-a-time loads made each thread wait on 250 dependent
  // loads a pass at Gemma's vocabulary; packs make that 31.
  const int v = (int)vocab;
  const bool packed = packs_fit<T>(logits, vocab);
  const int W = packed ? PackLen<T>::n : 1;
  const bool in_row = target >= 0 && target < vocab;
  const int tp = in_row ? (int)target / W : -1, tk = in_row ? (int)target % W : 0;
  constexpr int P = PackLen<T>::n;
  float m = 0.f, log_sum;
  if (cap > 0.f) {
    const float c2 = -2.f * cap * LOG2E;
    float sum = packed ? ce_capped_first_pass<T, P>(row, v, tp, tk, k_in, c2, &z_target)
                       : ce_capped_first_pass<T, 1>(row, v, tp, tk, k_in, c2, &z_target);
    sum = block_sum(sum);
    // -log_softmax(z)[target] = log(sum of exp(z - c)) - (z_t - c), and z_t - c = -2 c r_t.
    if (threadIdx.x == 0) loss[blockIdx.x] = (logf(sum) + 2.f * cap * z_target) * w;
    if (!grad) return;
    log_sum = log2f(sum);
    if (packed)
      ce_second_pass<T, P, 1>(row, v, tp, tk, w, k_in, c2, m, log_sum);
    else
      ce_second_pass<T, 1, 1>(row, v, tp, tk, w, k_in, c2, m, log_sum);
    return;
  }
  MaxSum acc = packed ? ce_first_pass<T, P>(row, v, tp, tk, &z_target)
                      : ce_first_pass<T, 1>(row, v, tp, tk, &z_target);
  acc = block_merge(acc);
  // log_softmax(z) = (z - m) - log(sum), as ATen forms it.
  m = acc.m;
  log_sum = logf(acc.s);
  if (threadIdx.x == 0) loss[blockIdx.x] = -((z_target - m) - log_sum) * w;
  if (!grad) return;
  // Each thread rewrites only the elements it read above.
  if (packed)
    ce_second_pass<T, P, 0>(row, v, tp, tk, w, 0.f, 0.f, m, log_sum);
  else
    ce_second_pass<T, 1, 0>(row, v, tp, tk, w, 0.f, 0.f, m, log_sum);
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
