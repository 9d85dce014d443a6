// score_per_token on CUDA: one thread block per (query q, tile of 64 token rows of the flattened N·T
// rows). Per 64-wide slice of outputs o it forms va = a_rows V_q[o-slice, :]ᵀ (a 64 x 64 fp32 register
// tile through shared memory, reduction over I), multiplies it by the rows' g[o-slice] and reduces over
// o into one value per row, accumulated by the row's owner thread in slice order; each row's value is
// written once. No workspace, no atomics, every sum in a fixed order: bitwise reproducible.
#include "score_per_token/score_per_token.h"
#include "source_fast/cuda_token_rows.cuh"

namespace sf {
namespace {

using namespace cuda;

template <typename TIn>
__global__ void __launch_bounds__(kThreads)
    per_token_kernel(const TIn* __restrict__ v, index_t svq, index_t svo, index_t svi, const TIn* __restrict__ a,
                     index_t san, index_t sat, index_t sai, const TIn* __restrict__ g, index_t sgn, index_t sgt,
                     index_t sgo, index_t N, index_t T, index_t O, index_t I, float* __restrict__ out, index_t so_q,
                     index_t so_n, index_t so_t, index_t q0) {
  __shared__ float Xs[kBK][kTile + 4];
  __shared__ float Fs[kBK][kTile + 4];
  __shared__ float part[kTile][17];
  __shared__ index_t row_a[kTile];
  __shared__ index_t row_g[kTile];
  __shared__ index_t row_o[kTile];
  const index_t q = q0 + static_cast<index_t>(blockIdx.y);
  const index_t row0 = static_cast<index_t>(blockIdx.x) * kTile;
  const int tid = threadIdx.x, tx = tid % 16, ty = tid / 16;
  if (tid < kTile) {
    const index_t row = row0 + tid;
    const bool ok = row < N * T;
    const index_t n = ok ? row / T : 0, t = ok ? row % T : 0;
    row_a[tid] = ok ? n * san + t * sat : -1;
    row_g[tid] = ok ? n * sgn + t * sgt : -1;
    row_o[tid] = ok ? n * so_n + t * so_t : -1;
  }
  __syncthreads();
  const TIn* vq = v + q * svq;
  float row_acc = 0.0f;  // owned by thread tid < kTile: token row tid of the tile
  for (index_t c0 = 0; c0 < O; c0 += kTile) {
    float va[4][4], p[4];
    // va[i][j] = Σ_k a[row_i, k] V[q, c0 + 4tx + j, k]: the factor is V_qᵀ (k = input feature, column = output).
    token_rows_times_factor(a, row_a, sai, I, vq, svi, svo, c0, O, Xs, Fs, tid, tx, ty, va);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      p[i] = 0.0f;
      const index_t off = row_g[ty * 4 + i];
      if (off < 0) continue;
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const index_t o = c0 + tx * 4 + j;
        if (o < O) p[i] = fmaf(va[i][j], to_f32(g[off + o * sgo]), p[i]);
      }
    }
    reduce_row_partials(p, part, tid, tx, ty, &row_acc);
  }
  if (tid < kTile && row_o[tid] >= 0) out[q * so_q + row_o[tid]] = row_acc;
}

}  // namespace

Status score_per_token_cuda(const void* v, index_t svq, index_t svo, index_t svi, const void* a, index_t san,
                            index_t sat, index_t sai, const void* g, index_t sgn, index_t sgt, index_t sgo, int dtype,
                            index_t Q, index_t N, index_t T, index_t O, index_t I, float* out, index_t so_q,
                            index_t so_n, index_t so_t, std::intptr_t stream_handle) {
  SF_RETURN_IF_ERROR(check_strided("v", {Q, O, I}, {svq, svo, svi}));
  SF_RETURN_IF_ERROR(check_strided("a", {N, T, I}, {san, sat, sai}));
  SF_RETURN_IF_ERROR(check_strided("g", {N, T, O}, {sgn, sgt, sgo}));
  SF_RETURN_IF_ERROR(check_strided("out", {Q, N, T}, {so_q, so_n, so_t}));
  index_t numel = 0;
  SF_RETURN_IF_ERROR(checked_numel("v", {Q, O, I}, &numel));
  SF_RETURN_IF_ERROR(check_ptr("v", v, numel));
  SF_RETURN_IF_ERROR(checked_numel("a", {N, T, I}, &numel));
  SF_RETURN_IF_ERROR(check_ptr("a", a, numel));
  SF_RETURN_IF_ERROR(checked_numel("g", {N, T, O}, &numel));
  SF_RETURN_IF_ERROR(check_ptr("g", g, numel));
  index_t rows = 0;
  SF_RETURN_IF_ERROR(checked_numel("out", {Q, N, T}, &numel));
  SF_RETURN_IF_ERROR(check_ptr("out", out, numel));
  SF_RETURN_IF_ERROR(checked_numel("token rows", {N, T}, &rows));
  if (Q == 0 || rows == 0) return Status();
  const index_t blocks_x = ceil_div(rows, kTile);
  if (blocks_x > 2147483647) return invalid_argument("score_per_token: N·T = ", rows, " needs too many thread blocks");
  cudaStream_t stream = reinterpret_cast<cudaStream_t>(stream_handle);
  return dispatch_float(dtype, "v/a/g", [&](auto tag) -> Status {
    using TT = typename decltype(tag)::type;
    for (index_t q0 = 0; q0 < Q; q0 += kMaxGridYZ) {
      dim3 grid(static_cast<unsigned>(blocks_x), static_cast<unsigned>(query_chunk(Q, q0)));
      per_token_kernel<TT><<<grid, kThreads, 0, stream>>>(
          static_cast<const TT*>(v), svq, svo, svi, static_cast<const TT*>(a), san, sat, sai,
          static_cast<const TT*>(g), sgn, sgt, sgo, N, T, O, I, out, so_q, so_n, so_t, q0);
      SF_CUDA_CHECK_LAUNCH("per_token_kernel");
    }
    return Status();
  });
}

}  // namespace sf
