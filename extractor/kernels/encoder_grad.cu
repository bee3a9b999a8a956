// The trainer's W_enc and b_enc gradients from the codes alone (trainer/src/sae.rs), in float32:
// dW[:, j] = sum of dv[e] xc[rows[e]] and db[j] = sum of dv[e] over the entries e on latent j,
// where ATen builds a dense [B, W] gradient of the pre-activations (zeros, then a scatter) and
// multiplies it out: at the paper's sizes a 1.2 TFLOP product and three passes over [B, W] for
// the k*B = 262k entries that are not zero.
//
// One block a tile of 32 latents and 256 rows of W_enc, one warp a latent. W_enc is [d, W]
// row-major, so a latent's gradient is a column: each warp sums its 256 rows into shared
// memory, and the block writes the tile out a row at a time, 32 adjacent latents per 128-byte
// line.
// Entries are grouped by latent through `perm` (col_offsets[j]..col_offsets[j + 1]) and summed
// in entry order: no atomics, the same bits every run.
// xc in float32 (encoder_grad_f32), or in bf16 (encoder_grad_bf16) where the forward's product
// read it so (the trainer's bf16 encoder): the gradient of the product as computed, and half
// the 2.4 GB of row reads at the paper's sizes (each entry reads d of them).
// dW in float32, or in bf16 (the `_g16` kernels: the update reads a bf16 gradient, 4 bytes
// fewer a parameter written here and read there; each sum rounded once, the squares below
// those of the rounded values, the gradient the update sees).
// `sq` (may be null): each block writes its tile's sum of squares there, latents from `sq_from`
// on, so the update's clip has ||dW|| without a pass that reads the 0.6 GB gradient back (the
// trainer sums the blocks, and adds the columns below `sq_from`: the core's, which gain a term
// through the bias outside this kernel).

#include "common.cuh"

constexpr int kEncTile = 32;    // latents a block (warps)
constexpr int kEncChunk = 256;  // rows of W_enc a block (8 a lane)

template <typename T, typename O>
__device__ __forceinline__ void encoder_grad_tiles(const T *xc, const float *dv,
                                                   const long long *rows, const long long *perm,
                                                   const long long *col_offsets, O *dw,
                                                   float *db, long long width, long long d,
                                                   float *sq, long long sq_from) {
  __shared__ float tile[kEncTile][kEncChunk + 1];  // +1: a row's lanes fall in different banks
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  // Block b: latents tile b / chunks, rows chunk b % chunks. A core latent fires on most
  // tokens; split this way its entries are summed by d / 256 blocks at once, not one.
  const long long chunks = (d + kEncChunk - 1) / kEncChunk;
  const long long j0 = (long long)blockIdx.x / chunks * kEncTile, j = j0 + warp;
  const long long k0 = (long long)blockIdx.x % chunks * kEncChunk;
  // A warp past the last latent still reaches every barrier.
  const long long lo = j < width ? col_offsets[j] : 0, hi = j < width ? col_offsets[j + 1] : 0;
  // Entries 32 at a time, lane i reading entry i's row and value, each then taken from its lane
  // (bag_decode.cu's read-ahead): no chain of perm, rows and then x reads an entry. Every lane
  // sums the values in entry order for db, as lane 0 alone did: the same bits.
  float acc[kEncChunk / 32], s = 0.f;
  for (int t = 0; t < kEncChunk / 32; t++) acc[t] = 0.f;
  for (long long i0 = lo; i0 < hi; i0 += 32) {
    const int n = (int)(hi - i0 < 32 ? hi - i0 : 32);
    float my_v = 0.f;
    long long my_r = 0;
    if (lane < n) {
      const long long e = perm[i0 + lane];
      my_v = dv[e];
      my_r = rows[e];
    }
#pragma unroll 4
    for (int u = 0; u < n; u++) {
      const float v = from_lane(my_v, u);
      const T *x = xc + from_lane(my_r, u) * d + k0;
      s += v;
#pragma unroll
      for (int t = 0; t < kEncChunk / 32; t++) {
        const long long k = lane + 32 * t;
        if (k0 + k < d) acc[t] += v * to_f(x[k]);
      }
    }
  }
  if (k0 == 0 && lane == 0 && j < width) db[j] = s;
  for (int t = 0; t < kEncChunk / 32; t++) {
    acc[t] = rnd<O>(acc[t]);
    tile[warp][lane + 32 * t] = acc[t];
  }
  if (sq != nullptr) {
    // Rows past d and latents past W summed nothing: their zeros add nothing.
    __shared__ float warp_sq[kEncTile];
    float s2 = 0.f;
    if (j >= sq_from)
      for (int t = 0; t < kEncChunk / 32; t++) s2 += acc[t] * acc[t];
    s2 = warp_sum(s2);
    if (lane == 0) warp_sq[warp] = s2;
    __syncthreads();
    if (warp == 0) {
      const float all = warp_sum(warp_sq[lane]);
      if (lane == 0) sq[blockIdx.x] = all;
    }
  }
  __syncthreads();
  // Warp w writes rows k0 + w, k0 + w + 32, ...; lane l the tile's latent l.
  for (int t = 0; t < kEncChunk / 32; t++) {
    const long long k = k0 + warp + 32 * t;
    if (k < d && j0 + lane < width) put(&dw[k * width + j0 + lane], tile[lane][warp + 32 * t]);
  }
}

// Launched 1,024 threads a block: at most 64 registers a thread, or the launch would fail.
#define ENCODER_GRAD_KERNEL(NAME, T, O)                                                       \
  extern "C" __global__ void __launch_bounds__(1024)                                          \
      NAME(const T *xc, const float *dv, const long long *rows, const long long *perm,        \
           const long long *col_offsets, O *dw, float *db, long long width, long long d,      \
           float *sq, long long sq_from) {                                                    \
    encoder_grad_tiles(xc, dv, rows, perm, col_offsets, dw, db, width, d, sq, sq_from);       \
  }

ENCODER_GRAD_KERNEL(encoder_grad_f32, float, float)
ENCODER_GRAD_KERNEL(encoder_grad_bf16, bf16, float)
ENCODER_GRAD_KERNEL(encoder_grad_f32_g16, float, bf16)
ENCODER_GRAD_KERNEL(encoder_grad_bf16_g16, bf16, bf16)
