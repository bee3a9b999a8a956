// Runs the CUDA kernels of extractor/kernels/ on the CPU, so their logic is tested where there
// is no GPU (CI): each CUDA thread of a block is an OS thread, __syncthreads a barrier over
// the block, a warp shuffle an exchange through memory between two barriers over the warp.
// Blocks run one after another, so a __shared__ variable becomes a static one. The kernels'
// own text is compiled, not a copy of it; only the CUDA built-ins below are stand-ins.
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <type_traits>
#include <vector>

namespace emu {
struct Dim3 {
  unsigned x = 0, y = 0, z = 0;
};

class Barrier {
 public:
  explicit Barrier(unsigned n) : n_(n) {}
  void wait() {
    std::unique_lock<std::mutex> lock(m_);
    const unsigned gen = gen_;
    if (++arrived_ == n_) {
      arrived_ = 0;
      ++gen_;
      cv_.notify_all();
    } else {
      cv_.wait(lock, [&] { return gen_ != gen; });
    }
  }

 private:
  std::mutex m_;
  std::condition_variable cv_;
  unsigned n_, arrived_ = 0, gen_ = 0;
};

thread_local Dim3 thread_idx;
Dim3 block_idx, block_dim, grid_dim;
std::unique_ptr<Barrier> block_barrier;
std::vector<std::unique_ptr<Barrier>> warp_barriers;
std::vector<unsigned long long> lanes;  // one slot per thread, for shuffles
}  // namespace emu

#define DMSAE_EMULATOR
#define __global__
#define __device__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static
#define threadIdx (emu::thread_idx)
#define blockIdx (emu::block_idx)
#define blockDim (emu::block_dim)
#define gridDim (emu::grid_dim)

static inline float __uint_as_float(unsigned u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
static inline float __int_as_float(int i) { return __uint_as_float((unsigned)i); }
static inline unsigned __float_as_uint(float f) {
  unsigned u;
  std::memcpy(&u, &f, 4);
  return u;
}
static inline float rsqrtf(float x) { return 1.f / std::sqrt(x); }
static inline float __fmul_rn(float a, float b) { return a * b; }
static inline void __syncthreads() { emu::block_barrier->wait(); }
// Lane `src_of(lane)`'s v in every lane of the warp (all 32 call it, as on the GPU).
template <typename T, typename F>
static inline T exchange(T v, F src_of) {
  static_assert(sizeof(T) <= sizeof(unsigned long long), "a shuffle moves 8 bytes at most");
  const unsigned t = threadIdx.x, warp = t / 32;
  std::memcpy(&emu::lanes[t], &v, sizeof(T));
  emu::warp_barriers[warp]->wait();
  T r;
  std::memcpy(&r, &emu::lanes[(t & ~31u) | (src_of(t & 31u) & 31u)], sizeof(T));
  emu::warp_barriers[warp]->wait();
  return r;
}
template <typename T>
static inline T __shfl_xor_sync(unsigned, T v, int lane_mask) {
  return exchange(v, [=](unsigned lane) { return lane ^ (unsigned)lane_mask; });
}
template <typename T>
static inline T __shfl_sync(unsigned, T v, int src_lane) {
  return exchange(v, [=](unsigned) { return (unsigned)src_lane; });
}
// Integer sums only (select.cu's histograms), the same whatever the order.
static inline unsigned atomicAdd(unsigned *a, unsigned v) {
  return __atomic_fetch_add(a, v, __ATOMIC_RELAXED);
}
static inline unsigned long long atomicAdd(unsigned long long *a, unsigned long long v) {
  return __atomic_fetch_add(a, v, __ATOMIC_RELAXED);
}
static inline int __popc(unsigned x) { return __builtin_popcount(x); }
#include "../kernels/softcap_ce.cu"
#include "../kernels/softcap_softmax.cu"
#include "../kernels/rms_norm.cu"
#include "../kernels/geglu.cu"
#include "../kernels/rope.cu"
#include "../kernels/adam.cu"
#include "../kernels/bag_decode.cu"
#include "../kernels/encoder_grad.cu"
#include "../kernels/matryoshka_l2.cu"
#include "../kernels/select.cu"

namespace {
// Launch `kernel` over `blocks` blocks of `threads` threads (a multiple of 32).
template <typename F>
void launch(unsigned blocks, unsigned threads, F kernel) {
  emu::block_dim.x = threads;
  emu::grid_dim.x = blocks;
  emu::lanes.assign(threads, 0);
  emu::warp_barriers.clear();
  for (unsigned w = 0; w < threads / 32; w++) emu::warp_barriers.emplace_back(new emu::Barrier(32));
  for (unsigned b = 0; b < blocks; b++) {
    emu::block_idx.x = b;
    emu::block_barrier.reset(new emu::Barrier(threads));
    std::vector<std::thread> pool;
    for (unsigned t = 0; t < threads; t++)
      pool.emplace_back([t, &kernel] {
        emu::thread_idx.x = t;
        kernel();
      });
    for (auto &th : pool) th.join();
  }
}
}  // namespace

// Argument i of a launch, as the kernel declares it.
template <typename A>
A arg(void **args, int i) {
  return *static_cast<A *>(args[i]);
}

// Whether kernel name k ends in s: the `_g16` kernels take a bf16 gradient.
bool ends_with(const std::string &k, const char *s) {
  const std::string t = s;
  return k.size() >= t.size() && k.compare(k.size() - t.size(), t.size(), t) == 0;
}

// f(g, m, v) with adam.cu's gradient (argument 1) and moments (2, 3) typed as kernel k's name
// says: {decoder_adam,adam_flat}_{f32,bf16}[_g16], the moments' kind, then a bf16 gradient.
template <typename F>
void adam_typed(const std::string &k, void **a, F f) {
  const bool mh = k.find("_bf16") != std::string::npos;
  void *g = arg<void *>(a, 1), *m = arg<void *>(a, 2), *v = arg<void *>(a, 3);
  auto by_m = [&](auto *gt) { mh ? f(gt, (bf16 *)m, (bf16 *)v) : f(gt, (float *)m, (float *)v); };
  ends_with(k, "_g16") ? by_m((const bf16 *)g) : by_m((const float *)g);
}

// Run kernel `name` of extractor/kernels/ with cuLaunchKernel's argument array. For tests;
// one launch at a time.
extern "C" void dmsae_emulate(const char *name, unsigned grid, unsigned block, void **a) {
  static std::mutex one_at_a_time;
  std::lock_guard<std::mutex> lock(one_at_a_time);
  using u8 = unsigned char;
  using ll = long long;
  const std::string k = name;
  if (k == "softcap_ce_bf16") {
    launch(grid, block, [=] {
      softcap_ce_bf16(arg<bf16 *>(a, 0), arg<const ll *>(a, 1), arg<const float *>(a, 2),
                      arg<float *>(a, 3), arg<ll>(a, 4), arg<float>(a, 5), arg<int>(a, 6));
    });
  } else if (k == "softcap_ce_f32") {
    launch(grid, block, [=] {
      softcap_ce_f32(arg<float *>(a, 0), arg<const ll *>(a, 1), arg<const float *>(a, 2),
                     arg<float *>(a, 3), arg<ll>(a, 4), arg<float>(a, 5), arg<int>(a, 6));
    });
  } else if (k == "softcap_softmax_fwd_bf16") {
    launch(grid, block, [=] {
      softcap_softmax_fwd_bf16(arg<const bf16 *>(a, 0), arg<const u8 *>(a, 1), arg<bf16 *>(a, 2),
                               arg<float *>(a, 3), arg<ll>(a, 4), arg<ll>(a, 5), arg<float>(a, 6));
    });
  } else if (k == "softcap_softmax_fwd_f32") {
    launch(grid, block, [=] {
      softcap_softmax_fwd_f32(arg<const float *>(a, 0), arg<const u8 *>(a, 1), arg<float *>(a, 2),
                              arg<float *>(a, 3), arg<ll>(a, 4), arg<ll>(a, 5), arg<float>(a, 6));
    });
  } else if (k == "softcap_softmax_bwd_bf16") {
    launch(grid, block, [=] {
      softcap_softmax_bwd_bf16(arg<const bf16 *>(a, 0), arg<const u8 *>(a, 1),
                               arg<const float *>(a, 2), arg<const bf16 *>(a, 3),
                               arg<bf16 *>(a, 4), arg<ll>(a, 5), arg<ll>(a, 6), arg<float>(a, 7));
    });
  } else if (k == "softcap_softmax_bwd_f32") {
    launch(grid, block, [=] {
      softcap_softmax_bwd_f32(arg<const float *>(a, 0), arg<const u8 *>(a, 1),
                              arg<const float *>(a, 2), arg<const float *>(a, 3),
                              arg<float *>(a, 4), arg<ll>(a, 5), arg<ll>(a, 6), arg<float>(a, 7));
    });
  } else if (k == "rms_norm_fwd_bf16") {
    launch(grid, block, [=] {
      rms_norm_fwd_bf16(arg<const bf16 *>(a, 0), arg<const float *>(a, 1),
                        arg<const bf16 *>(a, 2), arg<bf16 *>(a, 3), arg<float *>(a, 4),
                        arg<ll>(a, 5), arg<ll>(a, 6), arg<float>(a, 7));
    });
  } else if (k == "rms_norm_fwd_f32") {
    launch(grid, block, [=] {
      rms_norm_fwd_f32(arg<const float *>(a, 0), arg<const float *>(a, 1),
                       arg<const float *>(a, 2), arg<float *>(a, 3), arg<float *>(a, 4),
                       arg<ll>(a, 5), arg<ll>(a, 6), arg<float>(a, 7));
    });
  } else if (k == "rms_norm_bwd_bf16") {
    launch(grid, block, [=] {
      rms_norm_bwd_bf16(arg<const bf16 *>(a, 0), arg<const float *>(a, 1),
                        arg<const float *>(a, 2), arg<const bf16 *>(a, 3),
                        arg<const bf16 *>(a, 4), arg<bf16 *>(a, 5), arg<ll>(a, 6),
                        arg<ll>(a, 7));
    });
  } else if (k == "rms_norm_bwd_f32") {
    launch(grid, block, [=] {
      rms_norm_bwd_f32(arg<const float *>(a, 0), arg<const float *>(a, 1),
                       arg<const float *>(a, 2), arg<const float *>(a, 3),
                       arg<const float *>(a, 4), arg<float *>(a, 5), arg<ll>(a, 6),
                       arg<ll>(a, 7));
    });
  } else if (k == "geglu_fwd_bf16") {
    launch(grid, block, [=] {
      geglu_fwd_bf16(arg<const bf16 *>(a, 0), arg<bf16 *>(a, 1), arg<ll>(a, 2), arg<ll>(a, 3),
                     arg<int>(a, 4));
    });
  } else if (k == "geglu_fwd_f32") {
    launch(grid, block, [=] {
      geglu_fwd_f32(arg<const float *>(a, 0), arg<float *>(a, 1), arg<ll>(a, 2), arg<ll>(a, 3),
                    arg<int>(a, 4));
    });
  } else if (k == "geglu_bwd_bf16") {
    launch(grid, block, [=] {
      geglu_bwd_bf16(arg<const bf16 *>(a, 0), arg<const bf16 *>(a, 1), arg<bf16 *>(a, 2),
                     arg<ll>(a, 3), arg<ll>(a, 4), arg<int>(a, 5));
    });
  } else if (k == "geglu_bwd_f32") {
    launch(grid, block, [=] {
      geglu_bwd_f32(arg<const float *>(a, 0), arg<const float *>(a, 1), arg<float *>(a, 2),
                    arg<ll>(a, 3), arg<ll>(a, 4), arg<int>(a, 5));
    });
  } else if (k == "rope_fwd_bf16" || k == "rope_bwd_bf16") {
    auto f = k == "rope_fwd_bf16" ? rope_fwd_bf16 : rope_bwd_bf16;
    launch(grid, block, [=] {
      f(arg<const bf16 *>(a, 0), arg<const bf16 *>(a, 1), arg<bf16 *>(a, 2), arg<ll>(a, 3),
        arg<ll>(a, 4), arg<ll>(a, 5), arg<ll>(a, 6), arg<ll>(a, 7), arg<float>(a, 8));
    });
  } else if (k == "rope_fwd_f32" || k == "rope_bwd_f32") {
    auto f = k == "rope_fwd_f32" ? rope_fwd_f32 : rope_bwd_f32;
    launch(grid, block, [=] {
      f(arg<const float *>(a, 0), arg<const float *>(a, 1), arg<float *>(a, 2), arg<ll>(a, 3),
        arg<ll>(a, 4), arg<ll>(a, 5), arg<ll>(a, 6), arg<ll>(a, 7), arg<float>(a, 8));
    });
  } else if (k == "swap_heads_bf16") {
    launch(grid, block, [=] {
      swap_heads_bf16(arg<const bf16 *>(a, 0), arg<bf16 *>(a, 1), arg<ll>(a, 2), arg<ll>(a, 3),
                      arg<ll>(a, 4), arg<ll>(a, 5), arg<ll>(a, 6), arg<ll>(a, 7));
    });
  } else if (k == "swap_heads_f32") {
    launch(grid, block, [=] {
      swap_heads_f32(arg<const float *>(a, 0), arg<float *>(a, 1), arg<ll>(a, 2), arg<ll>(a, 3),
                     arg<ll>(a, 4), arg<ll>(a, 5), arg<ll>(a, 6), arg<ll>(a, 7));
    });
  } else if (k == "decoder_grad_stats") {
    launch(grid, block, [=] {
      decoder_grad_stats(arg<const float *>(a, 0), arg<const float *>(a, 1), arg<float *>(a, 2),
                         arg<float *>(a, 3), arg<ll>(a, 4), arg<ll>(a, 5));
    });
  } else if (k.rfind("decoder_adam_", 0) == 0) {
    launch(grid, block, [=] {
      adam_typed(k, a, [&](auto *g, auto *m, auto *v) {
        decoder_adam(arg<float *>(a, 0), g, m, v, arg<const float *>(a, 4), arg<bf16 *>(a, 5),
                     arg<ll>(a, 6), arg<ll>(a, 7), arg<AdamArgs>(a, 8));
      });
    });
  } else if (k.rfind("adam_flat_", 0) == 0) {
    launch(grid, block, [=] {
      adam_typed(k, a, [&](auto *g, auto *m, auto *v) {
        adam_flat(arg<float *>(a, 0), g, m, v, arg<bf16 *>(a, 4), arg<ll>(a, 5),
                  arg<AdamArgs>(a, 6));
      });
    });
  } else if (k.rfind("matryoshka_l2_", 0) == 0) {
    // matryoshka_l2_{fwd,bwd}[_bf16]: the parts' kind.
    const bool fwd = k.rfind("matryoshka_l2_fwd", 0) == 0, h = ends_with(k, "_bf16");
    launch(grid, block, [=] {
      auto f = [&](auto *parts) {
        using P = std::remove_const_t<std::remove_pointer_t<decltype(parts)>>;
        if (fwd)
          matryoshka_fwd(arg<const float *>(a, 0), arg<const float *>(a, 1), parts,
                         arg<float *>(a, 3), arg<ll>(a, 4), arg<ll>(a, 5), arg<ll>(a, 6));
        else
          matryoshka_bwd(arg<const float *>(a, 0), arg<const float *>(a, 1), parts,
                         arg<const float *>(a, 3), arg<P *>(a, 4), arg<ll>(a, 5),
                         arg<ll>(a, 6), arg<ll>(a, 7));
      };
      h ? f(arg<const bf16 *>(a, 2)) : f(arg<const float *>(a, 2));
    });
  } else if (k.rfind("bag_decode_fwd", 0) == 0) {
    // bag_decode_fwd[_bf16][_o16]: W's rows' kind, then out's.
    const bool h = k.rfind("bag_decode_fwd_bf16", 0) == 0, o16 = ends_with(k, "_o16");
    launch(grid, block, [=] {
      auto f = [&](auto *w, auto *out) {
        using T = std::remove_const_t<std::remove_pointer_t<decltype(w)>>;
        constexpr int C = sizeof(T) == 2 ? DEC_PACKS_BF16 : DEC_PACKS;
        bag_decode_rows<T, C>(w, arg<const float *>(a, 1), arg<const ll *>(a, 2),
                              arg<const ll *>(a, 3), out, arg<ll>(a, 5), arg<ll>(a, 6));
      };
      auto g = [&](auto *w) {
        o16 ? f(w, arg<bf16 *>(a, 4)) : f(w, arg<float *>(a, 4));
      };
      h ? g(arg<const bf16 *>(a, 0)) : g(arg<const float *>(a, 0));
    });
  } else if (k.rfind("bag_decode_bwd", 0) == 0) {
    // bag_decode_bwd[_g16][_d16]: dW's kind, then dout's.
    const bool g16 = k.find("_g16") != std::string::npos, d16 = ends_with(k, "_d16");
    launch(grid, block, [=] {
      void *dw = arg<void *>(a, 6);
      auto f = [&](auto *dout, auto *o) {
        bag_decode_bwd_rows(arg<const float *>(a, 0), dout, arg<const float *>(a, 2),
                            arg<const ll *>(a, 3), arg<const ll *>(a, 4), arg<const ll *>(a, 5),
                            o, arg<float *>(a, 7), arg<ll>(a, 8), arg<ll>(a, 9), arg<ll>(a, 10),
                            arg<double *>(a, 11));
      };
      auto g = [&](auto *dout) { g16 ? f(dout, (bf16 *)dw) : f(dout, (float *)dw); };
      d16 ? g(arg<const bf16 *>(a, 1)) : g(arg<const float *>(a, 1));
    });
  } else if (k == "select_count_bf16" || k == "select_count_f32") {
    const bool h = k == "select_count_bf16";
    launch(grid, block, [=] {
      const void *p = arg<const void *>(a, 0);
      auto f = [&](auto *t) {
        select_count(t, arg<ll>(a, 1), arg<ll>(a, 2), arg<ll>(a, 3), arg<const float *>(a, 4),
                     arg<const float *>(a, 5), arg<ll *>(a, 6));
      };
      h ? f((const bf16 *)p) : f((const float *)p);
    });
  } else if (k == "select_write_bf16" || k == "select_write_f32") {
    const bool h = k == "select_write_bf16";
    launch(grid, block, [=] {
      const void *p = arg<const void *>(a, 0);
      auto f = [&](auto *t) {
        select_write(t, arg<ll>(a, 1), arg<ll>(a, 2), arg<ll>(a, 3), arg<const float *>(a, 4),
                     arg<const float *>(a, 5), arg<const ll *>(a, 6), arg<ll *>(a, 7),
                     arg<ll *>(a, 8));
      };
      h ? f((const bf16 *)p) : f((const float *)p);
    });
  } else if (k == "select_top_init") {
    launch(grid, block, [=] {
      select_top_init(arg<const float *>(a, 0), arg<ll *>(a, 1), arg<unsigned long long *>(a, 2));
    });
  } else if (k == "select_top_hist") {
    launch(grid, block, [=] {
      select_top_hist(arg<const bf16 *>(a, 0), arg<ll>(a, 1), arg<ll>(a, 2), arg<ll>(a, 3),
                      arg<ll *>(a, 4), arg<unsigned long long *>(a, 5), arg<ll>(a, 6),
                      arg<unsigned *>(a, 7), arg<int *>(a, 8), arg<unsigned *>(a, 9));
    });
  } else if (k == "select_top_find") {
    launch(grid, block, [=] {
      select_top_find(arg<ll>(a, 0), arg<ll *>(a, 1), arg<unsigned long long *>(a, 2));
    });
  } else if (k == "select_top_count") {
    launch(grid, block, [=] {
      select_top_count(arg<const bf16 *>(a, 0), arg<ll>(a, 1), arg<ll>(a, 2), arg<ll>(a, 3),
                       arg<const ll *>(a, 4), arg<const unsigned *>(a, 5), arg<ll *>(a, 6),
                       arg<ll *>(a, 7));
    });
  } else if (k == "select_top_write") {
    launch(grid, block, [=] {
      select_top_write(arg<const bf16 *>(a, 0), arg<ll>(a, 1), arg<ll>(a, 2), arg<ll>(a, 3),
                       arg<const ll *>(a, 4), arg<const unsigned *>(a, 5), arg<const ll *>(a, 6),
                       arg<const ll *>(a, 7), arg<ll *>(a, 8), arg<ll *>(a, 9));
    });
  } else if (k == "select_top_slot_count") {
    launch(grid, block, [=] {
      select_top_slot_count(arg<const ll *>(a, 0), arg<ll>(a, 1), arg<ll>(a, 2),
                            arg<const unsigned *>(a, 3), arg<const int *>(a, 4), arg<ll *>(a, 5),
                            arg<ll *>(a, 6));
    });
  } else if (k == "select_top_slot_write") {
    launch(grid, block, [=] {
      select_top_slot_write(arg<const ll *>(a, 0), arg<ll>(a, 1), arg<ll>(a, 2),
                            arg<const unsigned *>(a, 3), arg<const int *>(a, 4),
                            arg<const ll *>(a, 5), arg<const ll *>(a, 6), arg<ll>(a, 7),
                            arg<ll *>(a, 8), arg<ll *>(a, 9));
    });
  } else if (k.rfind("encoder_grad_", 0) == 0) {
    // encoder_grad_{f32,bf16}[_g16]: xc's kind, then a bf16 dW.
    const bool h = k.rfind("encoder_grad_bf16", 0) == 0, g16 = ends_with(k, "_g16");
    launch(grid, block, [=] {
      const void *x = arg<const void *>(a, 0);
      void *dw = arg<void *>(a, 5);
      auto f = [&](auto *t, auto *o) {
        encoder_grad_tiles(t, arg<const float *>(a, 1), arg<const ll *>(a, 2),
                           arg<const ll *>(a, 3), arg<const ll *>(a, 4), o, arg<float *>(a, 6),
                           arg<ll>(a, 7), arg<ll>(a, 8), arg<float *>(a, 9), arg<ll>(a, 10));
      };
      auto g = [&](auto *t) { g16 ? f(t, (bf16 *)dw) : f(t, (float *)dw); };
      h ? g((const bf16 *)x) : g((const float *)x);
    });
  } else {
    std::fprintf(stderr, "dmsae_emulate: no kernel %s\n", name);
    std::abort();
  }
}
