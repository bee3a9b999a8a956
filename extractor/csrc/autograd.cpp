// dmsae's kernels (kernels/softcap_softmax.cu, rms_norm.cu, geglu.cu, rope.cu, and the
// trainer's bag_decode.cu and encoder_grad.cu) as autograd functions, so layers above the stored one keep autograd for everything else. tch cannot
// define one; the C++ API can. The kernels are launched by kernels.rs (NVRTC and the driver) on CUDA tensors,
// and run by the CPU emulator (cuda_emulator.cpp) on CPU tensors, which is how CI tests this.
#include <ATen/Parallel.h>
#include <torch/csrc/autograd/custom_function.h>

#include <cstdio>
#include <algorithm>
#include <cstring>
#include <utility>
#include <vector>

// kernels.rs: launch `kernel` (with `n_args` arguments) on CUDA device `device`; 0, or 1 and why.
extern "C" int dmsae_launch(const char *kernel, unsigned grid, unsigned block, void **args,
                            size_t n_args, int device, char *err, size_t err_len);
// cuda_emulator.cpp: the same kernel on the CPU.
extern "C" void dmsae_emulate(const char *kernel, unsigned grid, unsigned block, void **args);

namespace {
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// `kernel` over grid x block on `like`'s device: the GPU through kernels.rs, or the emulator.
template <size_t N>
void dispatch(const std::string &kernel, const at::Tensor &like, unsigned grid, unsigned block,
              void *(&args)[N]) {
  if (like.is_cuda()) {
    char err[512] = {0};
    const int rc = dmsae_launch(kernel.c_str(), grid, block, args, N, like.get_device(), err,
                                sizeof err);
    TORCH_CHECK(rc == 0, err);
  } else {
    dmsae_emulate(kernel.c_str(), grid, block, args);
  }
}

// Warps (rows) per block.
constexpr unsigned kRowsPerBlock = 8;

// One warp a row.
template <size_t N>
void launch(const std::string &kernel, const at::Tensor &like, int64_t rows, void *(&args)[N]) {
  const unsigned grid = (unsigned)((rows + kRowsPerBlock - 1) / kRowsPerBlock);
  dispatch(kernel, like, grid, 32 * kRowsPerBlock, args);
}

// n threads (grid-stride beyond 2^16 blocks).
template <size_t N>
void launch_elementwise(const std::string &kernel, const at::Tensor &like, int64_t n,
                        void *(&args)[N]) {
  constexpr int64_t kThreads = 256, kMaxBlocks = 1 << 16;
  const unsigned grid = (unsigned)std::min((n + kThreads - 1) / kThreads, kMaxBlocks);
  dispatch(kernel, like, grid, (unsigned)kThreads, args);
}

// How many threads an elementwise kernel of n elements like `t` wants: one a 16-byte pack when
// n is a whole number of packs (the kernel reads packs when every array lines up too, and
// strides over the elements otherwise), else one an element.
int64_t pack_threads(const at::Tensor &t, int64_t n) {
  const int64_t w = 16 / t.element_size();
  return n % w == 0 ? n / w : n;
}

// Where each group of the sorted indices `idx` (values in 0..n) starts, [n + 1]. A scatter of
// ones rather than bincount, which on CUDA reads its input's extremes back to the host first
// and so stalls the queue; integer adds give the same counts in any order.
at::Tensor group_offsets(const at::Tensor &idx, int64_t n) {
  const auto counts = at::zeros({n}, idx.options()).index_add_(0, idx, at::ones_like(idx));
  return at::cat({at::zeros({1}, idx.options()), counts.cumsum(0)});
}

// The entries grouped by latent for a W gradient: their order sorted by `cols` (stable, so
// entry order within a latent) and where each of the n latents' groups starts. The decoder's
// backward and the encoder's ask for the same codes' grouping in one step, so the last one is
// kept (with its `cols`, whose memory then cannot be reused while it is): one sort a step.
std::pair<at::Tensor, at::Tensor> by_latent(const at::Tensor &cols, int64_t n) {
  struct Last {
    at::Tensor cols, perm, offsets;
    int64_t n = -1, version = 0;
  };
  // Never destroyed: tensors freed after the allocator's own teardown at exit would crash.
  static thread_local Last &last = *new Last;
  const bool same = last.cols.defined() && last.n == n &&
                    last.cols.data_ptr() == cols.data_ptr() &&
                    last.cols.sizes() == cols.sizes() && last.cols.strides() == cols.strides() &&
                    last.cols.device() == cols.device() &&
                    last.cols.dtype() == cols.dtype() && last.version == cols._version();
  if (!same) {
    last = {cols, at::argsort(cols, /*stable=*/true), group_offsets(cols, n), n,
            (int64_t)cols._version()};
  }
  return {last.perm, last.offsets};
}

std::string suffix(const at::Tensor &t) {
  TORCH_CHECK(t.scalar_type() == at::kBFloat16 || t.scalar_type() == at::kFloat,
              "dmsae kernels take bfloat16 or float32, not ", t.scalar_type());
  return t.scalar_type() == at::kBFloat16 ? "_bf16" : "_f32";
}

struct SoftcapSoftmax : public torch::autograd::Function<SoftcapSoftmax> {
  static at::Tensor forward(AutogradContext *ctx, const at::Tensor &s, const at::Tensor &mask,
                            double cap) {
    const int64_t t_len = s.size(-1), rows = s.numel() / t_len;
    TORCH_CHECK(s.is_contiguous(), "softcap_softmax: scores must be contiguous");
    TORCH_CHECK(mask.scalar_type() == at::kBool && mask.is_contiguous() && mask.dim() == 2 &&
                    mask.size(0) == t_len && mask.size(1) == t_len && mask.device() == s.device(),
                "softcap_softmax: the mask must be a contiguous bool [T, T] beside the scores");
    TORCH_CHECK(rows % t_len == 0, "softcap_softmax: scores must be [..., T, T]");
    const std::string kernel = "softcap_softmax_fwd" + suffix(s);
    auto p = at::empty_like(s);
    auto stats = at::empty({rows, 2}, s.options().dtype(at::kFloat));
    void *ps = s.data_ptr(), *pm = mask.data_ptr(), *pp = p.data_ptr(), *pst = stats.data_ptr();
    long long r = rows, t = t_len;
    float c = (float)cap;
    void *args[] = {&ps, &pm, &pp, &pst, &r, &t, &c};
    launch(kernel, s, rows, args);
    ctx->save_for_backward({s, mask, stats});
    ctx->saved_data["cap"] = cap;
    return p;
  }

  static variable_list backward(AutogradContext *ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &s = saved[0], &mask = saved[1], &stats = saved[2];
    const at::Tensor dp = grads[0].to(s.scalar_type()).contiguous();
    const int64_t t_len = s.size(-1), rows = s.numel() / t_len;
    auto ds = at::empty_like(s);
    void *ps = s.data_ptr(), *pm = mask.data_ptr(), *pst = stats.data_ptr(),
         *pdp = dp.data_ptr(), *pds = ds.data_ptr();
    long long r = rows, t = t_len;
    float c = (float)ctx->saved_data["cap"].toDouble();
    void *args[] = {&ps, &pm, &pst, &pdp, &pds, &r, &t, &c};
    launch("softcap_softmax_bwd" + suffix(s), s, rows, args);
    return {ds, at::Tensor(), at::Tensor()};
  }
};
// rms_norm(x) * scale, or with `res` defined res + that (rms_norm.cu), differentiable in x and
// res (RmsNormAdd). An undefined tensor cannot be an autograd argument, hence two Functions.
struct RmsNorm : public torch::autograd::Function<RmsNorm> {
  static at::Tensor run(AutogradContext *ctx, const at::Tensor &x, const at::Tensor &scale,
                        const at::Tensor &res, double eps) {
    const int64_t d = x.size(-1), rows = x.numel() / d;
    TORCH_CHECK(x.is_contiguous(), "rms_norm: the input must be contiguous");
    TORCH_CHECK(scale.scalar_type() == at::kFloat && scale.is_contiguous() && scale.dim() == 1 &&
                    scale.size(0) == d && scale.device() == x.device(),
                "rms_norm: the scale must be a contiguous float32 [", d, "] beside the input");
    TORCH_CHECK(!res.defined() || (res.is_contiguous() && res.sizes() == x.sizes() &&
                                   res.scalar_type() == x.scalar_type() &&
                                   res.device() == x.device()),
                "rms_norm: the residual must be contiguous and shaped as the input, beside it");
    const std::string kernel = "rms_norm_fwd" + suffix(x);
    auto y = at::empty_like(x);
    auto rstd = at::empty({rows}, x.options().dtype(at::kFloat));
    void *px = x.data_ptr(), *pw = scale.data_ptr(), *pres = res.defined() ? res.data_ptr() : nullptr,
         *py = y.data_ptr(), *pr = rstd.data_ptr();
    long long r = rows, n = d;
    float e = (float)eps;
    void *args[] = {&px, &pw, &pres, &py, &pr, &r, &n, &e};
    launch(kernel, x, rows, args);
    ctx->save_for_backward({x, scale, rstd});
    return y;
  }

  // d(loss)/dx from d(loss)/dy, plus `res_grad` where defined (x's gradient along the
  // residual stream, for PreNorm).
  static at::Tensor input_grad(AutogradContext *ctx, const at::Tensor &grad,
                               const at::Tensor &res_grad = at::Tensor()) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &x = saved[0], &scale = saved[1], &rstd = saved[2];
    const at::Tensor dy = grad.to(x.scalar_type()).contiguous();
    const at::Tensor dres =
        res_grad.defined() ? res_grad.to(x.scalar_type()).contiguous() : at::Tensor();
    const int64_t d = x.size(-1), rows = x.numel() / d;
    auto dx = at::empty_like(x);
    void *px = x.data_ptr(), *pw = scale.data_ptr(), *pr = rstd.data_ptr(), *pdy = dy.data_ptr(),
         *pdres = dres.defined() ? dres.data_ptr() : nullptr, *pdx = dx.data_ptr();
    long long r = rows, n = d;
    void *args[] = {&px, &pw, &pr, &pdy, &pdres, &pdx, &r, &n};
    launch("rms_norm_bwd" + suffix(x), x, rows, args);
    return dx;
  }

  static at::Tensor forward(AutogradContext *ctx, const at::Tensor &x, const at::Tensor &scale,
                            double eps) {
    return run(ctx, x, scale, at::Tensor(), eps);
  }

  static variable_list backward(AutogradContext *ctx, variable_list grads) {
    return {input_grad(ctx, grads[0]), at::Tensor(), at::Tensor()};
  }
};

// A pre-norm: rms_norm(x) * scale, and x itself as the residual stream goes on with it. The
// two outputs' gradients meet in the norm's backward kernel, which adds the stream's to its
// own, where autograd summed the two gradients of x in a pass of its own.
struct PreNorm : public torch::autograd::Function<PreNorm> {
  static variable_list forward(AutogradContext *ctx, const at::Tensor &x,
                               const at::Tensor &scale, double eps) {
    // x returned unmodified: autograd hands it on as a view of itself with this node's edge.
    return {RmsNorm::run(ctx, x, scale, at::Tensor(), eps), x};
  }

  static variable_list backward(AutogradContext *ctx, variable_list grads) {
    return {RmsNorm::input_grad(ctx, grads[0], grads[1]), at::Tensor(), at::Tensor()};
  }
};

struct RmsNormAdd : public torch::autograd::Function<RmsNormAdd> {
  static at::Tensor forward(AutogradContext *ctx, const at::Tensor &res, const at::Tensor &x,
                            const at::Tensor &scale, double eps) {
    return RmsNorm::run(ctx, x, scale, res, eps);
  }

  static variable_list backward(AutogradContext *ctx, variable_list grads) {
    return {grads[0], RmsNorm::input_grad(ctx, grads[0]), at::Tensor(), at::Tensor()};
  }
};

// gelu(gate) * up from gu [..., 2f], gate then up in each row (the one product makes both):
// [..., f], differentiable in gu, whose gradient comes laid out as gu (geglu.cu).
struct Geglu : public torch::autograd::Function<Geglu> {
  static at::Tensor forward(AutogradContext *ctx, const at::Tensor &gu, double tanh_approx) {
    TORCH_CHECK(gu.is_contiguous() && gu.dim() >= 1 && gu.size(-1) % 2 == 0 &&
                    gu.numel() / 2 < (int64_t(1) << 32),
                "geglu: gate and up must be contiguous [..., 2 f], gate first, under 2^33 "
                "elements");
    auto sizes = gu.sizes().vec();
    sizes.back() /= 2;
    auto h = at::empty(sizes, gu.options());
    void *pg = gu.data_ptr(), *ph = h.data_ptr();
    long long n = h.numel(), f = sizes.back();
    int approx = tanh_approx != 0.0;
    void *args[] = {&pg, &ph, &n, &f, &approx};
    if (n > 0) launch_elementwise("geglu_fwd" + suffix(gu), gu, pack_threads(gu, n), args);
    ctx->save_for_backward({gu});
    ctx->saved_data["tanh"] = tanh_approx;
    return h;
  }

  static variable_list backward(AutogradContext *ctx, variable_list grads) {
    const at::Tensor gu = ctx->get_saved_variables()[0];
    const at::Tensor dh = grads[0].to(gu.scalar_type()).contiguous();
    auto d_gu = at::empty_like(gu);
    void *pg = gu.data_ptr(), *pdh = dh.data_ptr(), *pdg = d_gu.data_ptr();
    long long n = dh.numel(), f = dh.size(-1);
    int approx = ctx->saved_data["tanh"].toDouble() != 0.0;
    void *args[] = {&pg, &pdh, &pdg, &n, &f, &approx};
    if (n > 0) launch_elementwise("geglu_bwd" + suffix(gu), gu, pack_threads(gu, n), args);
    return {d_gu, at::Tensor()};
  }
};

void check_rope_tables(const at::Tensor &cs, const at::Tensor &x, int64_t t_len, int64_t dh) {
  TORCH_CHECK(cs.is_contiguous() && cs.dim() == 3 && cs.size(0) == 2 && cs.size(1) == t_len &&
                  cs.size(2) == dh && cs.scalar_type() == x.scalar_type() &&
                  cs.device() == x.device(),
              "rope: cos and sin must be stacked as [2, T, Dh] beside x, in its dtype");
}

// rope.cu's rope_fwd or rope_bwd (`kernel`) from `in` to `out` over `tokens` tokens of `heads`
// heads of Dh = cs.size(2) columns, the tokens-first side's tokens `ld` elements apart.
void rope_launch(const std::string &kernel, const at::Tensor &in, const at::Tensor &cs,
                 const at::Tensor &out, int64_t tokens, int64_t heads, int64_t t_len,
                 int64_t ld, double pre) {
  void *pi = in.data_ptr(), *pc = cs.data_ptr(), *po = out.data_ptr();
  long long nt = tokens, dh = cs.size(2), h = heads, t = t_len, l = ld;
  float p = (float)pre;
  void *args[] = {&pi, &pc, &po, &nt, &dh, &h, &t, &l, &p};
  // A block a token, a thread a column pair (rope.cu), in whole warps.
  const unsigned threads = (unsigned)std::min<int64_t>(128, (dh / 2 + 31) / 32 * 32);
  if (tokens > 0)
    dispatch(kernel + suffix(in), in, (unsigned)std::min<int64_t>(tokens, 1 << 16), threads, args);
}

// rope.cu's swap_heads: src [B, A, C, D] to dst [B, C, A, D], src's rows (b, a) src_ld elements
// apart and dst's rows (b, c) dst_ld apart.
void swap_launch(const at::Tensor &src, const at::Tensor &dst, int64_t b, int64_t a, int64_t c,
                 int64_t d, int64_t src_ld, int64_t dst_ld) {
  const int64_t n = b * a * c * d;
  TORCH_CHECK(n < (int64_t(1) << 32), "swap_heads: under 2^32 elements");
  void *pi = src.data_ptr(), *po = dst.data_ptr();
  long long aa = a, cc = c, dd = d, nn = n, sl = src_ld, dl = dst_ld;
  void *args[] = {&pi, &po, &aa, &cc, &dd, &nn, &sl, &dl};
  if (n > 0) launch_elementwise("swap_heads" + suffix(src), src, pack_threads(src, n), args);
}

// RoPE from [B, T, heads, Dh] to [B, heads, T, Dh] (rope.cu), and back for the gradient.
struct Rope : public torch::autograd::Function<Rope> {
  static at::Tensor forward(AutogradContext *ctx, const at::Tensor &x, const at::Tensor &cs,
                            double pre) {
    TORCH_CHECK(x.is_contiguous() && x.dim() == 4 && x.size(3) % 2 == 0,
                "rope: x must be contiguous [B, T, heads, Dh] with Dh even");
    check_rope_tables(cs, x, x.size(1), x.size(3));
    auto out = at::empty({x.size(0), x.size(2), x.size(1), x.size(3)}, x.options());
    const int64_t heads = x.size(2);
    rope_launch("rope_fwd", x, cs, out, x.size(0) * x.size(1), heads, x.size(1),
                heads * x.size(3), pre);
    ctx->save_for_backward({cs});
    ctx->saved_data["pre"] = pre;
    return out;
  }

  static variable_list backward(AutogradContext *ctx, variable_list grads) {
    const at::Tensor cs = ctx->get_saved_variables()[0];
    const at::Tensor dout = grads[0].to(cs.scalar_type()).contiguous();
    const int64_t b = dout.size(0), heads = dout.size(1), t = dout.size(2), dh = dout.size(3);
    auto dx = at::empty({b, t, heads, dh}, dout.options());
    rope_launch("rope_bwd", dout, cs, dx, b * t, heads, t, heads * dh,
                ctx->saved_data["pre"].toDouble());
    return {dx, at::Tensor(), at::Tensor()};
  }
};

// x [B, A, C, D] as [B, C, A, D] contiguous (rope.cu's swap_heads), the gradient swapped back.
struct SwapHeads : public torch::autograd::Function<SwapHeads> {
  static at::Tensor run(const at::Tensor &x) {
    TORCH_CHECK(x.is_contiguous() && x.dim() == 4, "swap_heads: x must be contiguous [B, A, C, D]");
    const int64_t b = x.size(0), a = x.size(1), c = x.size(2), d = x.size(3);
    auto out = at::empty({b, c, a, d}, x.options());
    swap_launch(x, out, b, a, c, d, c * d, a * d);
    return out;
  }

  static at::Tensor forward(AutogradContext *, const at::Tensor &x) { return run(x); }

  static variable_list backward(AutogradContext *, variable_list grads) {
    return {run(grads[0].contiguous())};
  }
};

// q, k and v heads first, [B, n, T, Dh] contiguous each, from the one product that makes them,
// qkv [B, T, (H + 2 KV) Dh] (a token's H query heads, then KV key heads, then KV value heads):
// q and k under RoPE, q times pre, as Rope gives them, v as SwapHeads does. The backward writes
// the three gradients into one tensor laid out as qkv, so the product's input gradient is one
// [B T, (H + 2 KV) Dh] x [(H + 2 KV) Dh, d] product rather than three and two sums.
struct QkvHeads : public torch::autograd::Function<QkvHeads> {
  static variable_list forward(AutogradContext *ctx, const at::Tensor &qkv, const at::Tensor &cs,
                               double pre, int64_t heads, int64_t kv) {
    TORCH_CHECK(cs.dim() == 3, "qkv_heads: cos and sin must be stacked as [2, T, Dh]");
    const int64_t dh = cs.size(2);
    TORCH_CHECK(qkv.is_contiguous() && qkv.dim() == 3 && dh % 2 == 0 &&
                    qkv.size(2) == (heads + 2 * kv) * dh,
                "qkv_heads: qkv must be contiguous [B, T, (heads + 2 kv_heads) Dh], Dh even");
    const int64_t b = qkv.size(0), t = qkv.size(1), ld = qkv.size(2);
    check_rope_tables(cs, qkv, t, dh);
    auto q = at::empty({b, heads, t, dh}, qkv.options());
    auto k = at::empty({b, kv, t, dh}, qkv.options()), v = at::empty_like(k);
    rope_launch("rope_fwd", qkv, cs, q, b * t, heads, t, ld, pre);
    rope_launch("rope_fwd", qkv.narrow(2, heads * dh, kv * dh), cs, k, b * t, kv, t, ld, 1.0);
    swap_launch(qkv.narrow(2, (heads + kv) * dh, kv * dh), v, b, t, kv, dh, ld, t * dh);
    ctx->save_for_backward({cs});
    ctx->saved_data["pre"] = pre;
    return {q, k, v};
  }

  // The three gradients come materialised (zeros for an output the loss did not use: torch's
  // default for custom functions), heads first.
  static variable_list backward(AutogradContext *ctx, variable_list grads) {
    const at::Tensor cs = ctx->get_saved_variables()[0];
    const at::Tensor dq = grads[0].to(cs.scalar_type()).contiguous(),
                     dk = grads[1].to(cs.scalar_type()).contiguous(),
                     dv = grads[2].to(cs.scalar_type()).contiguous();
    const int64_t heads = dq.size(1), kv = dk.size(1), b = dq.size(0), t = cs.size(1),
                  dh = cs.size(2), ld = (heads + 2 * kv) * dh;
    auto dqkv = at::empty({b, t, ld}, cs.options());
    const auto part = [&](int64_t first, int64_t n) { return dqkv.narrow(2, first * dh, n * dh); };
    rope_launch("rope_bwd", dq, cs, part(0, heads), b * t, heads, t, ld,
                ctx->saved_data["pre"].toDouble());
    rope_launch("rope_bwd", dk, cs, part(heads, kv), b * t, kv, t, ld, 1.0);
    swap_launch(dv, part(heads + kv, kv), b, kv, t, dh, t * dh, ld);
    return {dqkv, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

// The attention scores q k^T over the last two dimensions, with k's gradient made as ds^T q,
// contiguous like k: autograd's matmul makes it as the transpose of q^T ds, which the RoPE
// backward then copied (13 transposing copies, 0.68 ms, a batch of the Gemma-2-2B bench on the
// H200). The same products otherwise; the transposed operand is a flag to cuBLAS, not a copy.
struct Scores : public torch::autograd::Function<Scores> {
  static at::Tensor forward(AutogradContext *ctx, const at::Tensor &q, const at::Tensor &k) {
    ctx->save_for_backward({q, k});
    return at::matmul(q, k.transpose(-1, -2));
  }

  static variable_list backward(AutogradContext *ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &q = saved[0], &k = saved[1], &ds = grads[0];
    return {at::matmul(ds, k), at::matmul(ds.transpose(-1, -2), q)};
  }
};

// x w^T (a bias-free linear layer, w [out, in]) whose input gradient dy w is made as dy wt^T,
// wt = w^T kept contiguous [in, out]: both products then read their weight along the summed
// dimension, the layout cuBLAS runs fastest. On the H200 (Gemma-2-2B, batch 8 x 1,024) the
// backward's dy w ran at 655-720 TFLOP/s against the forward's 770-820 for the same shapes;
// from wt a layer's four took 1,771 us where they took 1,833.
// No weight gradient: the weights are constants of the extraction.
struct LinearT : public torch::autograd::Function<LinearT> {
  static at::Tensor forward(AutogradContext *ctx, const at::Tensor &x, const at::Tensor &w,
                            const at::Tensor &wt) {
    TORCH_CHECK(w.dim() == 2 && wt.dim() == 2 && wt.size(0) == w.size(1) &&
                    wt.size(1) == w.size(0) && wt.is_contiguous(),
                "linear_t: wt must be w^T, contiguous");
    ctx->save_for_backward({wt});
    return at::linear(x, w);
  }

  static variable_list backward(AutogradContext *ctx, variable_list grads) {
    const at::Tensor wt = ctx->get_saved_variables()[0];
    return {at::matmul(grads[0], wt.t()), at::Tensor(), at::Tensor()};
  }
};

// sum of vals[e] w[cols[e]] over each bag's entries, [n_bags, d], differentiable in w and vals;
// `bags` gives each entry's bag, non-decreasing. Float32 (the trainer's parameters). `stats`,
// unless empty, is float64 [spans, 3, rows] (spans = ceil(d / 256)) that the backward fills with
// each span's dw.dw, dw.w and w.w a row (bag_decode.cu): the W gradient's figures for the
// update, while this is all that W's gradient comes from. `wh`, unless empty, is W in bf16 (as
// W rounds to nearest), which the forward reads instead of W; the backward reads W. `out16`:
// the output in bf16 (each float32 sum rounded once), and so its gradient, which the backward
// reads as it comes.
struct BagDecode : public torch::autograd::Function<BagDecode> {
  static at::Tensor forward(AutogradContext *ctx, const at::Tensor &w, const at::Tensor &vals,
                            const at::Tensor &cols, const at::Tensor &bags, int64_t n_bags,
                            const at::Tensor &stats, const at::Tensor &wh,
                            const at::Tensor &sink, bool out16) {
    TORCH_CHECK(w.scalar_type() == at::kFloat && w.dim() == 2 && w.is_contiguous(),
                "bag_decode: W must be a contiguous float32 [rows, d]");
    const int64_t n = vals.numel();
    for (const at::Tensor *t : {&vals, &cols, &bags})
      TORCH_CHECK(t->dim() == 1 && t->numel() == n && t->is_contiguous() &&
                      t->device() == w.device(),
                  "bag_decode: vals, cols and bags must be contiguous [n] beside W");
    TORCH_CHECK(vals.scalar_type() == at::kFloat && cols.scalar_type() == at::kLong &&
                    bags.scalar_type() == at::kLong,
                "bag_decode: vals float32, cols and bags int64");
    const int64_t d = w.size(1);
    const bool half = wh.numel() > 0;
    TORCH_CHECK(!half || (wh.scalar_type() == at::kBFloat16 && wh.sizes() == w.sizes() &&
                          wh.is_contiguous() && wh.device() == w.device()),
                "bag_decode: W's bf16 copy must be contiguous bf16 shaped as W, beside it");
    auto out = at::empty({n_bags, d}, w.options().dtype(out16 ? at::kBFloat16 : at::kFloat));
    if (n_bags > 0) {
      const auto offsets = group_offsets(bags, n_bags);
      void *pw = half ? wh.data_ptr() : w.data_ptr(), *pv = vals.data_ptr(),
           *pc = cols.data_ptr(), *po = offsets.data_ptr(), *pout = out.data_ptr();
      long long nb = n_bags, dd = d;
      void *args[] = {&pw, &pv, &pc, &po, &pout, &nb, &dd};
      const std::string name =
          std::string("bag_decode_fwd") + (half ? "_bf16" : "") + (out16 ? "_o16" : "");
      launch(name, w, n_bags, args);
    }
    if (stats.numel() > 0) {
      TORCH_CHECK(stats.scalar_type() == at::kDouble && stats.is_contiguous() &&
                      stats.device() == w.device() &&
                      stats.sizes() == at::IntArrayRef({(d + 255) / 256, 3, w.size(0)}),
                  "bag_decode: stats must be a contiguous float64 [ceil(d / 256), 3, rows]");
      ctx->saved_data["stats"] = stats;
    }
    if (sink.numel() > 0) {
      TORCH_CHECK(sink.scalar_type() == at::kBFloat16 && sink.sizes() == w.sizes() &&
                      sink.is_contiguous() && sink.device() == w.device(),
                  "bag_decode: the sink must be a contiguous bf16 tensor of W's shape");
      ctx->saved_data["sink"] = sink;
    }
    ctx->save_for_backward({w, vals, cols, bags});
    return out;
  }

  static variable_list backward(AutogradContext *ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &w = saved[0], &vals = saved[1], &cols = saved[2], &bags = saved[3];
    const bool d16 = grads[0].scalar_type() == at::kBFloat16;
    const at::Tensor dout = (d16 ? grads[0] : grads[0].to(at::kFloat)).contiguous();
    const int64_t rows = w.size(0), d = w.size(1), n = vals.numel();
    const auto [perm, col_offsets] = by_latent(cols, rows);
    const auto sink = ctx->saved_data.find("sink");
    const bool g16 = sink != ctx->saved_data.end();
    auto dw = g16 ? sink->second.toTensor() : at::empty_like(w);
    // A warp a span of 256 columns of a row (bag_decode.cu's DW_SPAN), each writing its part
    // of every one of the row's entries' value gradients.
    const int64_t spans = (d + 255) / 256;
    auto part = at::empty({spans, n}, vals.options());
    long long r = rows, dd = d, nn = n;
    void *pw = w.data_ptr(), *pdout = dout.data_ptr(), *pv = vals.data_ptr(),
         *pb = bags.data_ptr(), *pp = perm.data_ptr(), *pco = col_offsets.data_ptr(),
         *pdw = dw.data_ptr(), *ppart = part.data_ptr();
    const auto stats = ctx->saved_data.find("stats");
    void *pst = stats == ctx->saved_data.end() ? nullptr : stats->second.toTensor().data_ptr();
    void *args[] = {&pw, &pdout, &pv, &pb, &pp, &pco, &pdw, &ppart, &r, &dd, &nn, &pst};
    const std::string name =
        std::string("bag_decode_bwd") + (g16 ? "_g16" : "") + (d16 ? "_d16" : "");
    launch(name, w, rows * spans, args);
    const at::Tensor dvals = part.sum(0);
    // With a sink, dW is there, and W gets none through autograd.
    if (g16) dw = at::Tensor();
    return {dw,           dvals,        at::Tensor(), at::Tensor(), at::Tensor(),
            at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

// Per token, the sum over prefixes p >= 1 of |x - core - b_dec - part_0 - ... - part_p|^2,
// with parts [B, P, d]: the Matryoshka loss before its mean (kernels/matryoshka_l2.cu),
// float32, differentiable in b_dec, parts and core (x is data). `core` [B, d] (empty: none) is
// the core's part where the trainer decodes it as a dense block: it enters where part_0 does,
// so its gradient is part_0's. The parts may be bf16 (BagDecode's out16), and then their
// gradient is too (each rounded once), and b_dec's and the core's are part_0's rounded one.
struct MatryoshkaL2 : public torch::autograd::Function<MatryoshkaL2> {
  static at::Tensor forward(AutogradContext *ctx, const at::Tensor &x_in, const at::Tensor &b_dec,
                            const at::Tensor &parts, const at::Tensor &core) {
    TORCH_CHECK(parts.dim() == 3 && x_in.dim() == 2 && b_dec.dim() == 1 &&
                    x_in.size(0) == parts.size(0) && x_in.size(1) == parts.size(2) &&
                    b_dec.size(0) == x_in.size(1) &&
                    (core.numel() == 0 ||
                     (core.sizes() == x_in.sizes() && core.scalar_type() == at::kFloat)),
                "matryoshka_l2: x [B, d], b_dec [d], parts [B, P, d], core [B, d] or none");
    for (const at::Tensor *t : {&x_in, &b_dec, &parts})
      TORCH_CHECK((t->scalar_type() == at::kFloat ||
                   (t == &parts && t->scalar_type() == at::kBFloat16)) &&
                      t->is_contiguous() && t->device() == x_in.device(),
                  "matryoshka_l2: contiguous float32 tensors (parts float32 or bf16) on one "
                  "device");
    const bool has_core = core.numel() > 0;
    const at::Tensor x = has_core ? x_in.sub(core).contiguous() : x_in;
    ctx->saved_data["core"] = has_core;
    const int64_t n = x.size(0);
    auto sq = at::empty({n}, x.options());
    if (n > 0) {
      void *px = x.data_ptr(), *pb = b_dec.data_ptr(), *pp = parts.data_ptr(),
           *ps = sq.data_ptr();
      long long nn = n, np = parts.size(1), d = x.size(1);
      void *args[] = {&px, &pb, &pp, &ps, &nn, &np, &d};
      launch(parts.scalar_type() == at::kBFloat16 ? "matryoshka_l2_fwd_bf16" : "matryoshka_l2_fwd",
             x, n, args);
    }
    ctx->save_for_backward({x, b_dec, parts});
    return sq;
  }

  static variable_list backward(AutogradContext *ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &x = saved[0], &b_dec = saved[1], &parts = saved[2];
    const at::Tensor dsq = grads[0].to(at::kFloat).contiguous();
    const int64_t n = x.size(0);
    auto dparts = at::empty_like(parts);
    if (n > 0) {
      void *px = x.data_ptr(), *pb = b_dec.data_ptr(), *pp = parts.data_ptr(),
           *pd = dsq.data_ptr(), *pg = dparts.data_ptr();
      long long nn = n, np = parts.size(1), d = x.size(1);
      void *args[] = {&px, &pb, &pp, &pd, &pg, &nn, &np, &d};
      launch(parts.scalar_type() == at::kBFloat16 ? "matryoshka_l2_bwd_bf16" : "matryoshka_l2_bwd",
             x, n, args);
    }
    // b_dec (and the core) enter every residual where part_0 does.
    const at::Tensor d0 = dparts.select(1, 0);
    return {at::Tensor(), d0.sum(0, false, at::kFloat), dparts,
            ctx->saved_data["core"].toBool() ? d0 : at::Tensor()};
  }
};

// The codes' values `vals` (taken from pre-activations computed without a graph) made
// differentiable again: as if vals[e] = xc[rows[e]] . w[:, cols[e]] + bias[cols[e]], with w
// [d, W] and bias [W] float32, and xc = x - b_dec (given: float32, or bf16 as the forward's
// product read it; b_dec [d] is its centre). The backward never builds the dense [B, W]
// gradient (kernels/encoder_grad.cu), and b_dec's is -w db, where the caller had added b_dec's
// zero term (b_dec.detach() - b_dec) w to the bias for autograd to find it: a product over
// W_enc each forward, whose value was zero. `sq`, when not empty, gets each encoder_grad
// block's sum of squares of W's gradient, columns from `sq_from` on (`host`, the loop:
// all of it in the first block's place).
struct EncoderEntries : public torch::autograd::Function<EncoderEntries> {
  static at::Tensor forward(AutogradContext *ctx, const at::Tensor &w, const at::Tensor &bias,
                            const at::Tensor &b_dec, const at::Tensor &xc, const at::Tensor &vals,
                            const at::Tensor &rows, const at::Tensor &cols,
                            const at::Tensor &sq, int64_t sq_from, const at::Tensor &sink,
                            bool host) {
    TORCH_CHECK(w.scalar_type() == at::kFloat && w.dim() == 2 && w.is_contiguous(),
                "encoder_entries: W must be a contiguous float32 [d, W]");
    const int64_t d = w.size(0), width = w.size(1), n = vals.numel();
    TORCH_CHECK(bias.scalar_type() == at::kFloat && bias.dim() == 1 && bias.size(0) == width &&
                    bias.device() == w.device(),
                "encoder_entries: bias must be float32 [W] beside W");
    TORCH_CHECK(b_dec.scalar_type() == at::kFloat && b_dec.dim() == 1 && b_dec.size(0) == d &&
                    b_dec.device() == w.device(),
                "encoder_entries: b_dec must be float32 [d] beside W");
    TORCH_CHECK((xc.scalar_type() == at::kFloat || xc.scalar_type() == at::kBFloat16) &&
                    xc.dim() == 2 && xc.size(1) == d && xc.is_contiguous() &&
                    xc.device() == w.device(),
                "encoder_entries: xc must be a contiguous float32 or bf16 [B, d] beside W");
    for (const at::Tensor *t : {&rows, &cols})
      TORCH_CHECK(t->scalar_type() == at::kLong && t->dim() == 1 && t->numel() == n &&
                      t->is_contiguous() && t->device() == w.device(),
                  "encoder_entries: rows and cols must be contiguous int64 [n] beside W");
    if (sq.numel() > 0) {
      TORCH_CHECK(sq.scalar_type() == at::kFloat && sq.is_contiguous() &&
                      sq.device() == w.device() &&
                      sq.numel() == (width + 31) / 32 * ((d + 255) / 256),
                  "encoder_entries: sq must be a contiguous float32 [ceil(W / 32) * "
                  "ceil(d / 256)]");
      ctx->saved_data["sq"] = sq;
      ctx->saved_data["sq_from"] = sq_from;
    }
    if (sink.numel() > 0) {
      TORCH_CHECK(!host, "encoder_entries: a bf16 sink for dW is the kernel's, not the host's");
      TORCH_CHECK(sink.scalar_type() == at::kBFloat16 && sink.sizes() == w.sizes() &&
                      sink.is_contiguous() && sink.device() == w.device(),
                  "encoder_entries: the sink must be a contiguous bf16 tensor of W's shape");
      ctx->saved_data["sink"] = sink;
    }
    ctx->save_for_backward({w, xc, rows, cols});
    ctx->saved_data["width"] = width;
    ctx->saved_data["host"] = host;
    return vals.to(at::kFloat).clone();
  }

  static variable_list backward(AutogradContext *ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &w_enc = saved[0], &xc = saved[1], &rows = saved[2], &cols = saved[3];
    const at::Tensor dv = grads[0].to(at::kFloat).contiguous();
    const int64_t width = ctx->saved_data["width"].toInt(), d = xc.size(1);
    const auto sq = ctx->saved_data.find("sq");
    const auto sink = ctx->saved_data.find("sink");
    const auto [perm, col_offsets] = by_latent(cols, width);
    auto dw = sink == ctx->saved_data.end() ? at::empty({d, width}, w_enc.options())
                                            : sink->second.toTensor();
    auto db = at::empty({width}, w_enc.options());
    if (ctx->saved_data["host"].toBool()) {
      // The CPU's: encoder_grad.cu's sums (latent by latent, entries in order) as a loop over
      // tiles of 32 latents, each written out as columns of dW, so the entries' scaled rows
      // are never copied out (index_add's way: two passes over [k*B, d] more).
      const at::Tensor x = xc.to(at::kFloat).contiguous();
      const float *px = x.data_ptr<float>(), *pv = dv.data_ptr<float>();
      const int64_t *pr = rows.data_ptr<int64_t>(), *pp = perm.data_ptr<int64_t>(),
                    *po = col_offsets.data_ptr<int64_t>();
      float *pw = dw.data_ptr<float>(), *pb = db.data_ptr<float>();
      constexpr int64_t kTile = 32;
      at::parallel_for(0, (width + kTile - 1) / kTile, 1, [&](int64_t t0, int64_t t1) {
        std::vector<float> acc(kTile * d);
        for (int64_t t = t0; t < t1; t++) {
          const int64_t j0 = t * kTile, n = std::min(kTile, width - j0);
          std::fill(acc.begin(), acc.end(), 0.f);
          for (int64_t i = 0; i < n; i++) {
            float *a = acc.data() + i * d, s = 0.f;
            for (int64_t e = po[j0 + i]; e < po[j0 + i + 1]; e++) {
              const float v = pv[pp[e]], *xr = px + pr[pp[e]] * d;
              for (int64_t k = 0; k < d; k++) a[k] += v * xr[k];
              s += v;
            }
            pb[j0 + i] = s;
          }
          for (int64_t k = 0; k < d; k++)
            for (int64_t i = 0; i < n; i++) pw[k * width + j0 + i] = acc[i * d + k];
        }
      });
      if (sq != ctx->saved_data.end()) {
        const at::Tensor s = sq->second.toTensor().zero_();
        const int64_t from = ctx->saved_data["sq_from"].toInt();
        s.narrow(0, 0, 1).copy_(dw.narrow(1, from, width - from).square().sum());
      }
    } else {
      void *px = xc.data_ptr(), *pdv = dv.data_ptr(), *pr = rows.data_ptr(),
           *pp = perm.data_ptr(), *pco = col_offsets.data_ptr(), *pdw = dw.data_ptr(),
           *pdb = db.data_ptr();
      long long w = width, dd = d;
      void *psq = sq == ctx->saved_data.end() ? nullptr : sq->second.toTensor().data_ptr();
      long long from = psq ? ctx->saved_data["sq_from"].toInt() : 0;
      void *args[] = {&px, &pdv, &pr, &pp, &pco, &pdw, &pdb, &w, &dd, &psq, &from};
      // A block a tile of 32 latents (a warp each) and 256 rows (encoder_grad.cu's tile).
      const int64_t blocks = (width + 31) / 32 * ((d + 255) / 256);
      const bool h = xc.scalar_type() == at::kBFloat16;
      const std::string g16 = sink == ctx->saved_data.end() ? "" : "_g16";
      dispatch((h ? "encoder_grad_bf16" : "encoder_grad_f32") + g16, xc, (unsigned)blocks, 1024,
               args);
    }
    const at::Tensor d_b_dec =
        ctx->needs_input_grad(2) ? at::mv(w_enc, db).neg() : at::Tensor();
    // With a sink, dW is there, and W gets none through autograd.
    if (sink != ctx->saved_data.end()) dw = at::Tensor();
    return {dw,           db,           d_b_dec,      at::Tensor(), at::Tensor(), at::Tensor(),
            at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

// Runs `f`; 0, or 1 with the message in err.
template <typename F>
int caught(F f, char *err, size_t err_len) {
  try {
    f();
    return 0;
  } catch (const c10::Error &e) {
    std::snprintf(err, err_len, "%s", e.what_without_backtrace());
  } catch (const std::exception &e) {
    std::snprintf(err, err_len, "%s", e.what());
  }
  return 1;
}

// Runs `f`, which makes the output tensor; 0 and *out set, or 1 with the message in err.
template <typename F>
int guarded(F f, at::Tensor **out, char *err, size_t err_len) {
  return caught([&] { *out = new at::Tensor(f()); }, err, err_len);
}

// Runs `f`, which makes the output tensors; 0 and out[0..] set, or 1 with the message in err.
template <typename F>
int guarded_list(F f, at::Tensor **out, char *err, size_t err_len) {
  return caught(
      [&] {
        const variable_list r = f();
        for (size_t i = 0; i < r.size(); i++) out[i] = new at::Tensor(r[i]);
      },
      err, err_len);
}
}  // namespace

// RMSNorm of the last dimension of `x` with the float32 `scale` (1 + weight), differentiable in
// x; as dmsae_softcap_softmax below.
extern "C" int dmsae_rms_norm(at::Tensor *x, at::Tensor *scale, double eps, at::Tensor **out,
                              char *err, size_t err_len) {
  return guarded([&] { return RmsNorm::apply(*x, *scale, eps); }, out, err, err_len);
}

// PreNorm above: the norm into out[0], x's stream into out[1]; 0, or 1 with the message in err.
extern "C" int dmsae_pre_norm(at::Tensor *x, at::Tensor *scale, double eps, at::Tensor **out,
                              char *err, size_t err_len) {
  return guarded_list([&] { return PreNorm::apply(*x, *scale, eps); }, out, err, err_len);
}

// res + the RMSNorm of x, differentiable in both; as dmsae_softcap_softmax below.
extern "C" int dmsae_rms_norm_add(at::Tensor *res, at::Tensor *x, at::Tensor *scale, double eps,
                                  at::Tensor **out, char *err, size_t err_len) {
  return guarded([&] { return RmsNormAdd::apply(*res, *x, *scale, eps); }, out, err, err_len);
}

// gelu(gate) * up from gu [..., 2f] (gate, then up), gelu's tanh form when tanh_approx != 0,
// differentiable in gu; as dmsae_softcap_softmax below.
extern "C" int dmsae_geglu(at::Tensor *gu, double tanh_approx, at::Tensor **out, char *err,
                           size_t err_len) {
  return guarded([&] { return Geglu::apply(*gu, tanh_approx); }, out, err, err_len);
}

// q, k and v heads first from the one product's qkv [B, T, (heads + 2 kv) Dh] (QkvHeads above),
// into out[0..3]; 0, or 1 with the message in err.
extern "C" int dmsae_qkv_heads(at::Tensor *qkv, at::Tensor *cs, double pre, int64_t heads,
                               int64_t kv, at::Tensor **out, char *err, size_t err_len) {
  return guarded_list([&] { return QkvHeads::apply(*qkv, *cs, pre, heads, kv); }, out, err,
                      err_len);
}

// RoPE of x [B, T, heads, Dh] with cos and sin stacked as cs [2, T, Dh], times pre,
// differentiable in x; as dmsae_softcap_softmax below.
extern "C" int dmsae_rope(at::Tensor *x, at::Tensor *cs, double pre, at::Tensor **out, char *err,
                          size_t err_len) {
  return guarded([&] { return Rope::apply(*x, *cs, pre); }, out, err, err_len);
}

// q k^T, differentiable in both (Scores above); as dmsae_softcap_softmax below.
extern "C" int dmsae_scores(at::Tensor *q, at::Tensor *k, at::Tensor **out, char *err,
                            size_t err_len) {
  return guarded([&] { return Scores::apply(*q, *k); }, out, err, err_len);
}

// x w^T, differentiable in x, its gradient through wt = w^T (LinearT above); as
// dmsae_softcap_softmax below.
extern "C" int dmsae_linear_t(at::Tensor *x, at::Tensor *w, at::Tensor *wt, at::Tensor **out,
                              char *err, size_t err_len) {
  return guarded([&] { return LinearT::apply(*x, *w, *wt); }, out, err, err_len);
}

// x [B, A, C, D] as [B, C, A, D], differentiable; as dmsae_softcap_softmax below.
extern "C" int dmsae_swap_heads(at::Tensor *x, at::Tensor **out, char *err, size_t err_len) {
  return guarded([&] { return SwapHeads::apply(*x); }, out, err, err_len);
}

// EncoderEntries above; as dmsae_softcap_softmax below.
// `sq` may be null (none); `host`: the backward as a loop on the host, not the kernel (the
// CPU's).
extern "C" int dmsae_encoder_entries(at::Tensor *w, at::Tensor *bias, at::Tensor *b_dec,
                                     at::Tensor *xc, at::Tensor *vals, at::Tensor *rows,
                                     at::Tensor *cols, at::Tensor *sq, int64_t sq_from,
                                     at::Tensor *sink, int64_t host, at::Tensor **out, char *err,
                                     size_t err_len) {
  return guarded(
      [&] {
        const at::Tensor none = at::empty({0}, w->options());
        return EncoderEntries::apply(*w, *bias, *b_dec, *xc, *vals, *rows, *cols,
                                     sq ? *sq : none, sq_from, sink ? *sink : none, host != 0);
      },
      out, err, err_len);
}

// MatryoshkaL2 above; as dmsae_softcap_softmax below.
// `core` may be null (none).
extern "C" int dmsae_matryoshka_l2(at::Tensor *x, at::Tensor *b_dec, at::Tensor *parts,
                                   at::Tensor *core, at::Tensor **out, char *err,
                                   size_t err_len) {
  return guarded(
      [&] {
        const at::Tensor none = at::empty({0}, x->options());
        return MatryoshkaL2::apply(*x, *b_dec, *parts, core ? *core : none);
      },
      out, err, err_len);
}

// BagDecode above; as dmsae_softcap_softmax below.
// `stats`, `wh` and `sink` may be null (none).
extern "C" int dmsae_bag_decode(at::Tensor *w, at::Tensor *vals, at::Tensor *cols,
                                at::Tensor *bags, int64_t n_bags, at::Tensor *stats,
                                at::Tensor *wh, at::Tensor *sink, int64_t out16, at::Tensor **out,
                                char *err, size_t err_len) {
  return guarded(
      [&] {
        // None as an empty tensor: autograd's apply asks every tensor argument its device.
        const auto none = [&](at::Tensor *t, at::ScalarType k) {
          return t ? *t : at::empty({0}, w->options().dtype(k));
        };
        return BagDecode::apply(*w, *vals, *cols, *bags, n_bags, none(stats, at::kDouble),
                                none(wh, at::kBFloat16), none(sink, at::kBFloat16),
                                out16 != 0);
      },
      out, err, err_len);
}

// An uninitialised page-locked host tensor shaped and typed as `t`, from torch's caching host
// allocator (kernels.rs's HostCopies copies into it on a stream of its own): the copy runs at
// full PCIe speed, and its buffers come back batch after batch instead of fresh pages the
// kernel must fault in, which on the H200 VM held the extraction's store writer to 1.5 GB/s.
extern "C" int dmsae_empty_pinned(at::Tensor *t, at::Tensor **out, char *err, size_t err_len) {
  return guarded(
      [&] { return at::empty(t->sizes(), t->options().device(at::kCPU).pinned_memory(true)); },
      out, err, err_len);
}

// The version counter of `t`: how many in-place changes it has seen through ATen (a kernel
// writing its memory directly leaves it as it was).
extern "C" int64_t dmsae_tensor_version(at::Tensor *t) { return (int64_t)t->_version(); }

// The host tensor `t` in page-locked memory, for a non-blocking upload: Tensor::pin_memory()
// without the device argument, which torch 2.11 deprecates with a warning at every call.
extern "C" int dmsae_pin_memory(at::Tensor *t, at::Tensor **out, char *err, size_t err_len) {
  return guarded([&] { return t->pin_memory(); }, out, err, err_len);
}

// softmax(mask(c * tanh(s))) over the last dimension, differentiable in s; cap <= 0 for none.
// Tensors are tch's handles; *out gets a new one. Returns 0, or 1 with the message in err.
extern "C" int dmsae_softcap_softmax(at::Tensor *s, at::Tensor *mask, double cap,
                                     at::Tensor **out, char *err, size_t err_len) {
  return guarded([&] { return SoftcapSoftmax::apply(*s, *mask, cap); }, out, err, err_len);
}
