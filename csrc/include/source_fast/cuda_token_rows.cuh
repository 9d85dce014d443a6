// Torch-free CUDA helpers for kernels that contract a tile of token rows with a per-query factor
// (score_lowrank: g U_q and a W_q; score_per_token: a V_qᵀ). Include from .cu files only.
//
// A tile is kTile (64) token rows whose element offsets are staged in shared memory (row_off[r] < 0
// marks a padding row, read as zeros), times a [K, kTile]-column slice of a factor F (per-query,
// strided). The product is the 64 x 64 register tile of cuda_common.cuh (256 threads, 4 x 4 each,
// kBK = 16 reduction steps through shared memory), accumulated in fp32 in a fixed order, so every
// result is bitwise reproducible. Offsets are int64.
#pragma once

#include "source_fast/cuda_common.cuh"

namespace sf {
namespace cuda {

// acc[i][j] = Σ_k x[row_off[4ty+i] + k·sxk] · f[k·sfk + (c0 + 4tx + j)·sfc] for k < K and columns
// c0 + 4tx + j < C (else 0). x and f have storage type TIn; Xs, Fs are shared [kBK][kTile + 4] buffers.
// Must be called by all kThreads threads of the block (it synchronises).
template <typename TIn>
__device__ __forceinline__ void token_rows_times_factor(const TIn* __restrict__ x, const index_t* row_off,
                                                        index_t sxk, index_t K, const TIn* __restrict__ f,
                                                        index_t sfk, index_t sfc, index_t c0, index_t C,
                                                        float (*Xs)[kTile + 4], float (*Fs)[kTile + 4], int tid,
                                                        int tx, int ty, float acc[4][4]) {
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) acc[i][j] = 0.0f;
  const bool f_col_fast = (sfc == 1) || (sfk != 1);  // coalesced loading order of the factor slice
  for (index_t k0 = 0; k0 < K; k0 += kBK) {
    for (int e = tid; e < kTile * kBK; e += kThreads) {
      const int rr = e / kBK, kk = e % kBK;  // k fastest: contiguous along the features of a row
      const index_t k = k0 + kk;
      const index_t off = row_off[rr];
      Xs[kk][rr] = (k < K && off >= 0) ? to_f32(x[off + k * sxk]) : 0.0f;
    }
    for (int e = tid; e < kTile * kBK; e += kThreads) {
      int cc, kk;
      if (f_col_fast) {
        cc = e % kTile;
        kk = e / kTile;
      } else {
        kk = e % kBK;
        cc = e / kBK;
      }
      const index_t k = k0 + kk, c = c0 + cc;
      Fs[kk][cc] = (k < K && c < C) ? to_f32(f[k * sfk + c * sfc]) : 0.0f;
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < kBK; ++kk) {
      float xv[4], fv[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) xv[i] = Xs[kk][ty * 4 + i];
#pragma unroll
      for (int j = 0; j < 4; ++j) fv[j] = Fs[kk][tx * 4 + j];
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(xv[i], fv[j], acc[i][j]);
    }
    __syncthreads();
  }
}

// Adds, for each of the tile's kTile rows, the sum of the 16 per-thread partials part_in[i] (thread
// (ty, tx) holds rows 4ty + i) to row_acc, owned by thread `row` (tid < kTile). The 16 column
// groups are summed in tx order: deterministic. part is a shared [kTile][17] buffer.
__device__ __forceinline__ void reduce_row_partials(const float part_in[4], float (*part)[17], int tid, int tx, int ty,
                                                    float* row_acc) {
#pragma unroll
  for (int i = 0; i < 4; ++i) part[ty * 4 + i][tx] = part_in[i];
  __syncthreads();
  if (tid < kTile) {
    float s = 0.0f;
    for (int k = 0; k < 16; ++k) s += part[tid][k];
    *row_acc += s;
  }
  __syncthreads();
}

// Grid axis y is limited to kMaxGridYZ blocks: launch queries in chunks of that size.
inline index_t query_chunk(index_t Q, index_t q0) { return Q - q0 < kMaxGridYZ ? Q - q0 : kMaxGridYZ; }

}  // namespace cuda
}  // namespace sf
