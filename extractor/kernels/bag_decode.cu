// The trainer's sparse decoder (trainer/src/sae.rs, `Sae::decode_bags`) and its backward, in
// float32: out[b] = sum of vals[e] W[cols[e]] over the entries e of bag b, where entries are
// grouped by bag (offsets[b]..offsets[b + 1]). It replaces `embedding_bag` with per-sample
// weights, whose backward sorts the indices, writes a zeroed dense W gradient, scatters into
// it, and computes the weights' gradient in a pass of its own.
//
// bag_decode_fwd, one warp a bag (bag_decode_fwd_bf16 the same over a bf16 copy of W, the
// sums in float32: half the bytes of the forward's row reads, 2.4 GB a step at the paper's
// sizes in float32; _o16, out in bf16, each sum rounded once: the trainer's Matryoshka parts,
// [B, 1 + G, d], whose gradient dout then comes back in bf16 too, and the backward's _d16
// kernels read it: each entry reads a row of dout, 2.4 GB a step in float32 at the paper's
// sizes); bag_decode_bwd, one warp a span of 256 columns of a row of
// W: the row's gradient from its entries (grouped by column through `perm`, in entry order),
// written once, zeros for a latent that did not fire; and, from the same reads of dout, each
// entry's part of W[cols[e]] . dout[b] over the span, which the caller sums over the spans
// (a kernel of its own re-read a W row and a dout row an entry: 0.57 ms of a 12.8 ms step on
// the H200), and the span's figures for the update (see the kernel). No atomics: each output
// has one writer, and its sum runs in a fixed order.

#include "common.cuh"

// Each warp reads its entries' indices and values 32 at a time, lane i entry i, and the loop
// over them takes each from its lane (`from_lane`): no global read of an index stands between
// one entry's row loads and the next's, where each entry waited on cols[e] before its row.
//
// Columns a lane sums at once, DEC_COLS loads of W floats each (W = 4: 16-byte packs where W's
// rows line up): each entry's row is read as DEC_COLS independent coalesced loads in flight,
// where a column at a time waited on one load per entry per column (2.7 ms of an 18.6 ms step,
// H200, d 2304, width 65,536, batch 4,096). The sums run over the entries in order, as before:
// the same bits.
#define DEC_COLS 8
#define DEC_PACKS 6
// A bf16 pack holds 8 columns, so 3 cover the same 768 columns a pass as 6 float packs.
#define DEC_PACKS_BF16 3

template <typename T, int W, int C, typename O>
__device__ void bag_decode_bag(const T *w, const float *vals, const long long *cols,
                               long long lo, long long hi, O *out, long long d, int lane) {
  for (long long k0 = 0; k0 < d; k0 += 32 * W * C) {
    float acc[C][W];
#pragma unroll
    for (int i = 0; i < C; i++)
#pragma unroll
      for (int q = 0; q < W; q++) acc[i][q] = 0.f;
    for (long long e0 = lo; e0 < hi; e0 += 32) {
      const int n = (int)(hi - e0 < 32 ? hi - e0 : 32);
      const float my_v = lane < n ? vals[e0 + lane] : 0.f;
      const long long my_c = lane < n ? cols[e0 + lane] : 0;
#pragma unroll 4
      for (int t = 0; t < n; t++) {
        const float v = from_lane(my_v, t);
        const T *row = w + from_lane(my_c, t) * d;
#pragma unroll
        for (int i = 0; i < C; i++) {
          const long long k = k0 + W * (32 * i + lane);
          if (k < d) {
            const Pack<T, W> p = pack_at<T, W>(row, k / W);
#pragma unroll
            for (int q = 0; q < W; q++) acc[i][q] += v * to_f(p.v[q]);
          }
        }
      }
    }
#pragma unroll
    for (int i = 0; i < C; i++) {
      const long long k = k0 + W * (32 * i + lane);
      if (k < d) {
        // In packs of at most 16 bytes: a bf16 pack's 8 columns go out as two of floats.
        const int P = W < PackLen<O>::n ? W : PackLen<O>::n;
#pragma unroll
        for (int h = 0; h < W / P; h++) {
          Pack<O, P> p;
#pragma unroll
          for (int q = 0; q < P; q++) put(&p.v[q], acc[i][h * P + q]);
          store_pack<O, P>(out, (k + h * P) / P, p);
        }
      }
    }
  }
}

// One warp a bag, over W's rows in T: 16-byte packs where they line up (768 columns a pass
// either way: 6 packs of 4 floats, 3 of 8 bf16), a column at a time otherwise.
template <typename T, int C, typename O>
__device__ void bag_decode_rows(const T *w, const float *vals, const long long *cols,
                                const long long *offsets, O *out, long long n_bags,
                                long long d) {
  const long long b = warp_index();
  if (b >= n_bags) return;  // the whole warp
  const int lane = threadIdx.x & 31;
  const long long lo = offsets[b], hi = offsets[b + 1];
  if (packs_fit<T>(w, d) && aligned(out, 16))
    bag_decode_bag<T, PackLen<T>::n, C>(w, vals, cols, lo, hi, out + b * d, d, lane);
  else
    bag_decode_bag<T, 1, DEC_COLS>(w, vals, cols, lo, hi, out + b * d, d, lane);
}

// bag_decode_fwd[_bf16][_o16]: W's rows in T, out in O.
#define BAG_DECODE_FWD(name, T, C, O)                                                  \
  extern "C" __global__ void name(const T *w, const float *vals, const long long *cols, \
                                  const long long *offsets, O *out, long long n_bags,    \
                                  long long d) {                                         \
    bag_decode_rows<T, C>(w, vals, cols, offsets, out, n_bags, d);                       \
  }
BAG_DECODE_FWD(bag_decode_fwd, float, DEC_PACKS, float)
BAG_DECODE_FWD(bag_decode_fwd_bf16, bf16, DEC_PACKS_BF16, float)
BAG_DECODE_FWD(bag_decode_fwd_o16, float, DEC_PACKS, bf16)
BAG_DECODE_FWD(bag_decode_fwd_bf16_o16, bf16, DEC_PACKS_BF16, bf16)

// Rows of dw a warp writes: a core latent fires on most tokens, and its thousands of entries
// would hold one warp (and the kernel) far longer than the rest if it had the whole row.
#define DW_SPAN 256

// Step O of `lanes_sum_each`: each lane keeps the half of its 2 O values its lane bit O picks
// and adds the partner lane's (lane ^ O) copy of that half.
template <int O> __device__ __forceinline__ void halve(float (&p)[32], int lane) {
  const bool up = lane & O;
#pragma unroll
  for (int i = 0; i < O; i++) {
    const float keep = up ? p[i + O] : p[i], send = up ? p[i] : p[i + O];
    p[i] = keep + __shfl_xor_sync(0xffffffffu, send, O);
  }
}

// p[t] summed over the warp's lanes, for t = this lane: 32 sums in 31 shuffles, where a
// warp_sum each took 160.
__device__ __forceinline__ float lanes_sum_each(float (&p)[32], int lane) {
  halve<16>(p, lane);
  halve<8>(p, lane);
  halve<4>(p, lane);
  halve<2>(p, lane);
  halve<1>(p, lane);
  return p[0];
}

// part [spans, n]: part[s][e] = W[cols[e]] . dout[bags[e]] over span s's columns. stats
// (unless null) [spans, 3, rows], float64: span s's dw.dw, dw.w and w.w of each row, which the
// update's projection and clip need (adam.cu's decoder_grad_stats otherwise reads W_dec and
// its gradient once more). A row without entries has dw = 0 and leaves w unread: zeros, which
// give its projected gradient 0 all the same. dw in float32, or in bf16 (bag_decode_bwd_g16:
// the update reads a bf16 gradient, 4 bytes fewer a parameter each way), each sum rounded
// once and the figures those of the rounded gradient, the one the update sees.
template <typename O, typename G>
__device__ void bag_decode_bwd_rows(const float *w, const G *dout, const float *vals,
                                    const long long *bags, const long long *perm,
                                    const long long *col_offsets, O *dw, float *part,
                                    long long rows, long long d, long long n_entries,
                                    double *stats) {
  const long long spans = (d + DW_SPAN - 1) / DW_SPAN, warp = warp_index();
  const long long j = warp / spans, k0 = (warp % spans) * DW_SPAN;
  if (j >= rows) return;
  const int lane = threadIdx.x & 31;
  const long long lo = col_offsets[j], hi = col_offsets[j + 1];
  float *part_s = part + (warp % spans) * n_entries;
  // The span's DW_SPAN / 32 columns a lane in registers, each entry's dout row read once
  // (as in bag_decode_fwd); the sums run over the entries in order.
  float acc[DW_SPAN / 32], wj[DW_SPAN / 32];
#pragma unroll
  for (int c = 0; c < DW_SPAN / 32; c++) {
    const long long k = k0 + 32 * c + lane;
    acc[c] = 0.f;
    wj[c] = hi > lo && k < d ? w[j * d + k] : 0.f;
  }
  for (long long i0 = lo; i0 < hi; i0 += 32) {
    const int n = (int)(hi - i0 < 32 ? hi - i0 : 32);
    float my_v = 0.f;
    long long my_e = 0, my_b = 0;
    if (lane < n) {
      my_e = perm[i0 + lane];
      my_v = vals[my_e];
      my_b = bags[my_e];
    }
    float dot[32];
#pragma unroll
    for (int t = 0; t < 32; t++) {
      dot[t] = 0.f;
      if (t < n) {  // the same for the whole warp
        const float v = from_lane(my_v, t);
        const G *g = dout + from_lane(my_b, t) * d;
#pragma unroll
        for (int c = 0; c < DW_SPAN / 32; c++) {
          const long long k = k0 + 32 * c + lane;
          if (k < d) {
            const float gk = to_f(g[k]);
            acc[c] += v * gk;
            dot[t] += wj[c] * gk;
          }
        }
      }
    }
    const float mine = lanes_sum_each(dot, lane);
    if (lane < n) part_s[my_e] = mine;
  }
#pragma unroll
  for (int c = 0; c < DW_SPAN / 32; c++) {
    const long long k = k0 + 32 * c + lane;
    acc[c] = rnd<O>(acc[c]);
    if (k < d) put(&dw[j * d + k], acc[c]);
  }
  if (stats) {
    double gg = 0.0, gw = 0.0, ww = 0.0;
#pragma unroll
    for (int c = 0; c < DW_SPAN / 32; c++) {
      gg += (double)acc[c] * acc[c];
      gw += (double)acc[c] * wj[c];
      ww += (double)wj[c] * wj[c];
    }
    gg = warp_sum(gg);
    gw = warp_sum(gw);
    ww = warp_sum(ww);
    if (lane == 0) {
      double *st = stats + (warp % spans) * 3 * rows + j;
      st[0] = gg;
      st[rows] = gw;
      st[2 * rows] = ww;
    }
  }
}

// bag_decode_bwd[_g16][_d16]: dw in O, dout in G.
#define BAG_DECODE_BWD(name, O, G)                                                           \
  extern "C" __global__ void name(const float *w, const G *dout, const float *vals,          \
                                  const long long *bags, const long long *perm,              \
                                  const long long *col_offsets, O *dw, float *part,          \
                                  long long rows, long long d, long long n_entries,          \
                                  double *stats) {                                           \
    bag_decode_bwd_rows(w, dout, vals, bags, perm, col_offsets, dw, part, rows, d, n_entries, \
                        stats);                                                              \
  }
BAG_DECODE_BWD(bag_decode_bwd, float, float)
BAG_DECODE_BWD(bag_decode_bwd_g16, bf16, float)
BAG_DECODE_BWD(bag_decode_bwd_d16, float, bf16)
BAG_DECODE_BWD(bag_decode_bwd_g16_d16, bf16, bf16)
