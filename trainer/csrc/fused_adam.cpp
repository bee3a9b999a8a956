// torch's fused Adam kernel (what `torch.optim.Adam(fused=True)` calls), which tch's generated
// bindings leave out: one pass over each parameter, its gradient and both moments, where Adam
// written with single tensor operations takes seven. On a GPU the optimizer is memory-bound.
#include <ATen/ops/_fused_adam.h>

#include <cstdio>
#include <vector>

namespace {
// The CPU kernel walks raw pointers over each parameter's elements without checking the
// others' layout (the CUDA one checks), so check here: one wrong moment would be a wild write.
void check_like(const at::Tensor &p, const at::Tensor &t, const char *what) {
  TORCH_CHECK(t.sizes() == p.sizes() && t.strides() == p.strides() &&
                  t.scalar_type() == p.scalar_type() && t.device() == p.device(),
              what, " is not laid out as its parameter");
}

void check_scalar(const at::Tensor &p, const at::Tensor &t, const char *what) {
  TORCH_CHECK(t.numel() == 1 && t.scalar_type() == at::kFloat && t.device() == p.device(),
              what, " must be one float32 on the parameters' device");
}
}  // namespace

// Tensors are tch's handles (torch_api.h: `typedef torch::Tensor *tensor`). The update writes
// through them in place. A non-null grad_scale divides every gradient first (the clip, without
// a pass of its own). Returns 0, or 1 with the message in err.
extern "C" int dmsae_fused_adam(at::Tensor **params, at::Tensor **grads, at::Tensor **exp_avgs,
                                at::Tensor **exp_avg_sqs, int n, at::Tensor *step, double lr,
                                double beta1, double beta2, double eps, at::Tensor *grad_scale,
                                char *err, size_t err_len) {
  try {
    TORCH_CHECK(n > 0, "no parameters");
    std::vector<at::Tensor> p, g, m, v, steps;
    for (int i = 0; i < n; i++) {
      check_like(*params[i], *grads[i], "gradient");
      check_like(*params[i], *exp_avgs[i], "first moment");
      check_like(*params[i], *exp_avg_sqs[i], "second moment");
      check_scalar(*params[i], *step, "step");
      p.push_back(*params[i]);
      g.push_back(*grads[i]);
      m.push_back(*exp_avgs[i]);
      v.push_back(*exp_avg_sqs[i]);
      steps.push_back(*step);
    }
    std::optional<at::Tensor> scale;
    if (grad_scale != nullptr) {
      check_scalar(*params[0], *grad_scale, "gradient divisor");
      scale = *grad_scale;
    }
    at::_fused_adam_(p, g, m, v, {}, steps, lr, beta1, beta2, /*weight_decay=*/0.0, eps,
                     /*amsgrad=*/false, /*maximize=*/false, scale);
    return 0;
  } catch (const c10::Error &e) {
    std::snprintf(err, err_len, "%s", e.what_without_backtrace());
  } catch (const std::exception &e) {
    std::snprintf(err, err_len, "%s", e.what());
  } catch (...) {
    std::snprintf(err, err_len, "unknown C++ exception");
  }
  return 1;
}
