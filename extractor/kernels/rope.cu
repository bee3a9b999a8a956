// Rotary embedding of q or k, [B, T, heads, Dh] (a token's heads contiguous; the tokens may be
// rows of the one product that makes q, k and v), with q's score scaling `pre` folded
// in: out = (x cos + rotate_half(x) sin) pre, rotate_half(x) = (-x2, x1), written heads first,
// [B, heads, T, Dh] contiguous: attention's layout, so that grouped query heads meet their KV
// head as one [G T, Dh] x [Dh, T] product without copies (the backward reads its gradient in
// that layout and writes [B, T, heads, Dh]). ATen runs narrow,
// neg, cat, two multiplies, an add and the scaling, each a pass over q (and back); here one
// each way. Each step rounds as that sequence does (pre = 1 multiplies exactly); the backward
// is the chain's: d = dout pre, then d cos plus the rotated d sin, each product rounded, then
// their sum. cos and sin come stacked, cs [2, T, Dh].

#include "common.cuh"

// A block a token (grid-stride), its threads over (head, pack of W column pairs): the position
// is found once a token. With a thread an element, three 64-bit divisions an element held
// rope_fwd to a sixth of memory speed (0.10 ms for q's 34 MB, H200, batch 8 of 1,024); with
// 2-byte accesses a thread a pair, to a fifth (52 us a call for q or k, the same). For
// j < h = Dh/2, in each (token, head) row of in and out (each [B, T, heads, Dh], a token's heads
// `ld` elements after the previous token's (heads Dh, or more where they are a slice of a row
// holding q, k and v), or, if its HEADS_FIRST, [B, heads, T, Dh] contiguous): (out_j, out_{j+h})
// = f(in_j, in_{j+h}, cos_j, cos_{j+h}, sin_j, sin_{j+h}), W pairs of columns at a time.
template <bool IN_HEADS_FIRST, bool OUT_HEADS_FIRST, int W, typename T, typename F>
__device__ void for_each_pair(const T *in, const T *cs, T *out, long long tokens, long long dh,
                              long long heads, long long t_len, long long ld, F f) {
  const int hp = (int)(dh / 2 / W), per_token = (int)heads * hp;
  for (long long tok = blockIdx.x; tok < tokens; tok += gridDim.x) {
    const long long pos = tok % t_len, b = tok / t_len;
    const T *cos = cs + pos * dh, *sin = cs + (t_len + pos) * dh;
    for (int i = threadIdx.x; i < per_token; i += blockDim.x) {
      const int h = i / hp, p = i - h * hp;
      const long long tokens_first = tok * ld + h * dh;
      const long long heads_first = ((b * heads + h) * t_len + pos) * dh;
      const T *ir = in + (IN_HEADS_FIRST ? heads_first : tokens_first);
      T *o = out + (OUT_HEADS_FIRST ? heads_first : tokens_first);
      const Pack<T, W> x1 = pack_at<T, W>(ir, p), x2 = pack_at<T, W>(ir, p + hp);
      const Pack<T, W> c1 = pack_at<T, W>(cos, p), c2 = pack_at<T, W>(cos, p + hp);
      const Pack<T, W> s1 = pack_at<T, W>(sin, p), s2 = pack_at<T, W>(sin, p + hp);
      Pack<T, W> o1, o2;
#pragma unroll
      for (int k = 0; k < W; k++) {
        float y1, y2;
        f(to_f(x1.v[k]), to_f(x2.v[k]), to_f(c1.v[k]), to_f(c2.v[k]), to_f(s1.v[k]),
          to_f(s2.v[k]), &y1, &y2);
        put(&o1.v[k], y1);
        put(&o2.v[k], y2);
      }
      store_pack<T, W>(o, p, o1);
      store_pack<T, W>(o, p + hp, o2);
    }
  }
}

// Rows of Dh/2 whole packs that line up go in 16-byte packs, else an element at a time.
template <typename T>
__device__ bool rope_in_packs(const T *in, const T *cs, const T *out, long long dh,
                              long long ld) {
  return packs_fit<T>(in, dh / 2) && ld % PackLen<T>::n == 0 && aligned(cs, 16) &&
         aligned(out, 16);
}

template <typename T, int W>
__device__ void rope_fwd_w(const T *x, const T *cs, T *out, long long tokens, long long dh,
                           long long heads, long long t_len, long long ld, float pre) {
  for_each_pair<false, true, W>(
      x, cs, out, tokens, dh, heads, t_len, ld,
      [=](float u, float v, float c1, float c2, float s1, float s2, float *y1, float *y2) {
        const float a1 = rnd<T>(u * c1), b1 = rnd<T>(-v * s1);
        const float a2 = rnd<T>(v * c2), b2 = rnd<T>(u * s2);
        *y1 = rnd<T>(a1 + b1) * pre;
        *y2 = rnd<T>(a2 + b2) * pre;
      });
}

template <typename T>
__device__ void rope_fwd(const T *x, const T *cs, T *out, long long tokens, long long dh,
                         long long heads, long long t_len, long long ld, float pre) {
  if (rope_in_packs(x, cs, out, dh, ld))
    rope_fwd_w<T, PackLen<T>::n>(x, cs, out, tokens, dh, heads, t_len, ld, pre);
  else
    rope_fwd_w<T, 1>(x, cs, out, tokens, dh, heads, t_len, ld, pre);
}

// The transpose of the above on d = dout pre: dx_j = d_j cos_j + d_{j+h} sin_{j+h},
// dx_{j+h} = d_{j+h} cos_{j+h} - d_j sin_j; dout heads first, dx tokens first.
template <typename T, int W>
__device__ void rope_bwd_w(const T *dout, const T *cs, T *dx, long long tokens, long long dh,
                           long long heads, long long t_len, long long ld, float pre) {
  for_each_pair<true, false, W>(
      dout, cs, dx, tokens, dh, heads, t_len, ld,
      [=](float g1, float g2, float c1, float c2, float s1, float s2, float *y1, float *y2) {
        const float d1 = rnd<T>(g1 * pre), d2 = rnd<T>(g2 * pre);
        *y1 = rnd<T>(d1 * c1) + rnd<T>(d2 * s2);
        *y2 = rnd<T>(d2 * c2) - rnd<T>(d1 * s1);
      });
}

template <typename T>
__device__ void rope_bwd(const T *dout, const T *cs, T *dx, long long tokens, long long dh,
                         long long heads, long long t_len, long long ld, float pre) {
  if (rope_in_packs(dout, cs, dx, dh, ld))
    rope_bwd_w<T, PackLen<T>::n>(dout, cs, dx, tokens, dh, heads, t_len, ld, pre);
  else
    rope_bwd_w<T, 1>(dout, cs, dx, tokens, dh, heads, t_len, ld, pre);
}

// The four entry points: rope_fwd and rope_bwd in bf16 and float32.
#define ROPE_KERNEL(NAME, FN, T)                                                            \
  extern "C" __global__ void NAME(const T *in, const T *cs, T *out, long long tokens,       \
                                  long long dh, long long heads, long long t_len,           \
                                  long long ld, float pre) {                                \
    FN<T>(in, cs, out, tokens, dh, heads, t_len, ld, pre);                                  \
  }
ROPE_KERNEL(rope_fwd_bf16, rope_fwd, bf16)
ROPE_KERNEL(rope_fwd_f32, rope_fwd, float)
ROPE_KERNEL(rope_bwd_bf16, rope_bwd, bf16)
ROPE_KERNEL(rope_bwd_f32, rope_bwd, float)

// v to heads first and the attention output back, with no RoPE: dst [B, C, A, D] = src
// [B, A, C, D], rows of D moved whole, W elements at a time, dst rows in order. A row (b, ai)
// of src starts src_ld elements after the one before it, a row (b, ci) of dst dst_ld after
// its (C D and A D contiguous; more where the tokens-first side is v's slice of a row holding
// q, k and v, or the gradient's). ATen's copy of the transposed view took three times what its
// bytes need at memory speed (91 copies, 3.8 ms a batch of 8 x 1,024 on an H200). Three 32-bit
// divisions a 16-byte pack; n (elements moved) under 2^32 (csrc/autograd.cpp checks).
template <typename T, int W>
__device__ void swap_heads_w(const T *src, T *dst, unsigned a, unsigned c, unsigned row_packs,
                             unsigned n_packs, unsigned long long src_ld,
                             unsigned long long dst_ld) {
  FOR_EACH_ELEMENT(i, n_packs) {
    const unsigned q = (unsigned)i;
    const unsigned row = q / row_packs, k = q - row * row_packs;
    const unsigned bc = row / a, ai = row - bc * a;  // dst row (b, ci, ai), bc = b C + ci
    const unsigned b = bc / c, ci = bc - b * c;
    const unsigned long long from = (b * a + ai) * src_ld + ci * row_packs + k;
    const unsigned long long to = bc * dst_ld + ai * row_packs + k;
    store_pack<T, W>(dst, to, pack_at<T, W>(src, from));
  }
}

template <typename T>
__device__ void swap_heads(const T *src, T *dst, long long a, long long c, long long d,
                           long long n, long long src_ld, long long dst_ld) {
  constexpr int P = PackLen<T>::n;
  if (packs_fit<T>(src, d) && aligned(dst, 16) && src_ld % P == 0 && dst_ld % P == 0)
    swap_heads_w<T, P>(src, dst, (unsigned)a, (unsigned)c, (unsigned)(d / P), (unsigned)(n / P),
                       src_ld / P, dst_ld / P);
  else
    swap_heads_w<T, 1>(src, dst, (unsigned)a, (unsigned)c, (unsigned)d, (unsigned)n, src_ld,
                       dst_ld);
}

extern "C" __global__ void swap_heads_bf16(const bf16 *src, bf16 *dst, long long a, long long c,
                                           long long d, long long n, long long src_ld,
                                           long long dst_ld) {
  swap_heads<bf16>(src, dst, a, c, d, n, src_ld, dst_ld);
}

extern "C" __global__ void swap_heads_f32(const float *src, float *dst, long long a,
                                          long long c, long long d, long long n,
                                          long long src_ld, long long dst_ld) {
  swap_heads<float>(src, dst, a, c, d, n, src_ld, dst_ld);
}
