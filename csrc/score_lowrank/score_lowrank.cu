// score_lowrank on CUDA: one thread block per (query q, tile of examples). The tile's 64 token rows are
// ept examples x bt tokens (bt = min(next_pow2(T), 64), ept = 64 / bt); per token step and per 64-wide
// slice of ranks the block forms gu = g_rows U_q[:, slice] and aw = a_rows W_q[:, slice] (64 x 64 fp32
// register tiles through shared memory), reduces gu ⊙ aw over the ranks into one value per row, and
// accumulates it in the row's owner thread. At the end each example's bt rows are summed in token
// order and the score written once. V_q = U_q W_qᵀ and G_n are never formed; no workspace, no atomics,
// every sum in a fixed order: bitwise reproducible.
#include "score_lowrank/score_lowrank.h"
#include "source_fast/cuda_token_rows.cuh"

namespace sf {
namespace {

using namespace cuda;

template <typename TIn>
__global__ void __launch_bounds__(kThreads)
    lowrank_kernel(const TIn* __restrict__ u, index_t suq, index_t suo, index_t sur, const TIn* __restrict__ w,
                   index_t swq, index_t swi, index_t swr, const TIn* __restrict__ a, index_t san, index_t sat,
                   index_t sai, const TIn* __restrict__ g, index_t sgn, index_t sgt, index_t sgo, index_t N, index_t T,
                   index_t O, index_t I, index_t R, float* __restrict__ out, index_t so_q, index_t so_n, index_t q0,
                   int bt) {
  __shared__ float Xs[kBK][kTile + 4];
  __shared__ float Fs[kBK][kTile + 4];
  __shared__ float part[kTile][17];
  __shared__ float row_total[kTile];
  __shared__ index_t row_a[kTile];
  __shared__ index_t row_g[kTile];
  const int ept = kTile / bt;  // examples per tile
  const index_t q = q0 + static_cast<index_t>(blockIdx.y);
  const index_t e0 = static_cast<index_t>(blockIdx.x) * ept;
  const int tid = threadIdx.x, tx = tid % 16, ty = tid / 16;
  const TIn* uq = u + q * suq;
  const TIn* wq = w + q * swq;
  float row_acc = 0.0f;  // owned by thread tid < kTile: token row tid of the tile, over all token steps

  for (index_t t0 = 0; t0 < T; t0 += bt) {
    if (tid < kTile) {
      const index_t n = e0 + tid / bt, t = t0 + tid % bt;
      const bool ok = n < N && t < T;
      row_a[tid] = ok ? n * san + t * sat : -1;
      row_g[tid] = ok ? n * sgn + t * sgt : -1;
    }
    __syncthreads();
    for (index_t r0 = 0; r0 < R; r0 += kTile) {
      float gu[4][4], aw[4][4], p[4];
      token_rows_times_factor(g, row_g, sgo, O, uq, suo, sur, r0, R, Xs, Fs, tid, tx, ty, gu);
      token_rows_times_factor(a, row_a, sai, I, wq, swi, swr, r0, R, Xs, Fs, tid, tx, ty, aw);
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        p[i] = 0.0f;
#pragma unroll
        for (int j = 0; j < 4; ++j) p[i] = fmaf(gu[i][j], aw[i][j], p[i]);
      }
      reduce_row_partials(p, part, tid, tx, ty, &row_acc);
    }
  }
  if (tid < kTile) row_total[tid] = row_acc;
  __syncthreads();
  if (tid < ept) {
    const index_t n = e0 + tid;
    if (n < N) {
      float s = 0.0f;
      for (int k = 0; k < bt; ++k) s += row_total[tid * bt + k];
      out[q * so_q + n * so_n] = s;
    }
  }
}

}  // namespace

Status score_lowrank_cuda(const void* u, index_t suq, index_t suo, index_t sur, const void* w, index_t swq,
                          index_t swi, index_t swr, const void* a, index_t san, index_t sat, index_t sai,
                          const void* g, index_t sgn, index_t sgt, index_t sgo, int dtype, index_t Q, index_t N,
                          index_t T, index_t O, index_t I, index_t R, float* out, index_t so_q, index_t so_n,
                          std::intptr_t stream_handle) {
  SF_RETURN_IF_ERROR(check_strided("u", {Q, O, R}, {suq, suo, sur}));
  SF_RETURN_IF_ERROR(check_strided("w", {Q, I, R}, {swq, swi, swr}));
  SF_RETURN_IF_ERROR(check_strided("a", {N, T, I}, {san, sat, sai}));
  SF_RETURN_IF_ERROR(check_strided("g", {N, T, O}, {sgn, sgt, sgo}));
  SF_RETURN_IF_ERROR(check_strided("out", {Q, N}, {so_q, so_n}));
  index_t numel = 0;
  SF_RETURN_IF_ERROR(checked_numel("u", {Q, O, R}, &numel));
  SF_RETURN_IF_ERROR(check_ptr("u", u, numel));
  SF_RETURN_IF_ERROR(checked_numel("w", {Q, I, R}, &numel));
  SF_RETURN_IF_ERROR(check_ptr("w", w, numel));
  SF_RETURN_IF_ERROR(checked_numel("a", {N, T, I}, &numel));
  SF_RETURN_IF_ERROR(check_ptr("a", a, numel));
  SF_RETURN_IF_ERROR(checked_numel("g", {N, T, O}, &numel));
  SF_RETURN_IF_ERROR(check_ptr("g", g, numel));
  SF_RETURN_IF_ERROR(checked_numel("out", {Q, N}, &numel));
  SF_RETURN_IF_ERROR(check_ptr("out", out, numel));
  if (Q == 0 || N == 0) return Status();
  int bt = 1;
  while (bt < T && bt < kTile) bt *= 2;
  const index_t blocks_x = ceil_div(N, kTile / bt);
  if (blocks_x > 2147483647) return invalid_argument("score_lowrank: N = ", N, " needs too many thread blocks");
  cudaStream_t stream = reinterpret_cast<cudaStream_t>(stream_handle);
  return dispatch_float(dtype, "u/w/a/g", [&](auto tag) -> Status {
    using TT = typename decltype(tag)::type;
    for (index_t q0 = 0; q0 < Q; q0 += kMaxGridYZ) {
      dim3 grid(static_cast<unsigned>(blocks_x), static_cast<unsigned>(query_chunk(Q, q0)));
      lowrank_kernel<TT><<<grid, kThreads, 0, stream>>>(
          static_cast<const TT*>(u), suq, suo, sur, static_cast<const TT*>(w), swq, swi, swr,
          static_cast<const TT*>(a), san, sat, sai, static_cast<const TT*>(g), sgn, sgt, sgo, N, T, O, I, R, out,
          so_q, so_n, q0, bt);
      SF_CUDA_CHECK_LAUNCH("lowrank_kernel");
    }
    return Status();
  });
}

}  // namespace sf
