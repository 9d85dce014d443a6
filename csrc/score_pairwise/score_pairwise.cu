// score_pairwise on CUDA: scores = V_flat [Q, O·I] · G_flatᵀ [O·I, N] where each 16-wide slice of
// G_n = Σ_t g_{n,t} a_{n,t}ᵀ is formed on the fly in shared memory (never written to global memory).
// Split-K over O·I with partials reduced in split order: deterministic.
#include "score_pairwise/score_pairwise.h"
#include "source_fast/cuda_common.cuh"

namespace sf {
namespace {

using namespace cuda;

struct PairPlan {
  index_t splits, k_per_split;
};

PairPlan plan(index_t Q, index_t N, index_t O, index_t I) {
  const index_t K = O * I;
  const index_t tiles = ceil_div(Q, kTile) * ceil_div(N, kTile);
  PairPlan p;
  p.splits = choose_splits(tiles, K, 256);
  p.k_per_split = ceil_div(ceil_div(K, p.splits), kBK) * kBK;
  if (p.k_per_split == 0) p.k_per_split = kBK;
  p.splits = K > 0 ? ceil_div(K, p.k_per_split) : 1;
  return p;
}

template <typename TIn>
__global__ void __launch_bounds__(kThreads) pairwise_kernel(const TIn* __restrict__ v, index_t svq, index_t svo,
                                                            index_t svi, const TIn* __restrict__ a, index_t san,
                                                            index_t sat, index_t sai, const TIn* __restrict__ g,
                                                            index_t sgn, index_t sgt, index_t sgo, index_t Q,
                                                            index_t N, index_t T, index_t O, index_t I,
                                                            index_t k_per_split, float* __restrict__ part) {
  __shared__ float Vs[kBK][kTile + 4];
  __shared__ float Gs[kBK][kTile + 4];
  const index_t n0 = static_cast<index_t>(blockIdx.x) * kTile;
  const index_t q0 = static_cast<index_t>(blockIdx.y) * kTile;
  const index_t s = blockIdx.z;
  const index_t K = O * I;
  const index_t k_begin = s * k_per_split;
  const index_t k_end = k_begin + k_per_split < K ? k_begin + k_per_split : K;
  const int tid = threadIdx.x, tx = tid % 16, ty = tid / 16;
  float acc[4][4];
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) acc[i][j] = 0.0f;

  for (index_t k0 = k_begin; k0 < k_end; k0 += kBK) {
    for (int e = tid; e < kTile * kBK; e += kThreads) {
      const int rr = e / kBK, kk = e % kBK;  // k fastest: contiguous along i
      const index_t k = k0 + kk;
      const bool kin = k < k_end;
      const index_t o = kin ? k / I : 0, i = kin ? k % I : 0;
      const index_t q = q0 + rr;
      Vs[kk][rr] = (kin && q < Q) ? to_f32(v[q * svq + o * svo + i * svi]) : 0.0f;
      const index_t n = n0 + rr;
      float gv = 0.0f;
      if (kin && n < N) {
        const TIn* gp = g + n * sgn + o * sgo;
        const TIn* ap = a + n * san + i * sai;
        for (index_t t = 0; t < T; ++t) gv = fmaf(to_f32(gp[t * sgt]), to_f32(ap[t * sat]), gv);
      }
      Gs[kk][rr] = gv;
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < kBK; ++kk) {
      float x[4], y[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) x[i] = Vs[kk][ty * 4 + i];
#pragma unroll
      for (int j = 0; j < 4; ++j) y[j] = Gs[kk][tx * 4 + j];
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(x[i], y[j], acc[i][j]);
    }
    __syncthreads();
  }
  float* P = part + s * Q * N;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const index_t q = q0 + ty * 4 + i;
    if (q >= Q) continue;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const index_t n = n0 + tx * 4 + j;
      if (n < N) P[q * N + n] = acc[i][j];
    }
  }
}

}  // namespace

index_t score_pairwise_cuda_workspace(index_t Q, index_t N, index_t T, index_t O, index_t I) {
  return plan(Q, N, O, I).splits * Q * N;
}

Status score_pairwise_cuda(const void* v, index_t svq, index_t svo, index_t svi, const void* a, index_t san,
                           index_t sat, index_t sai, const void* g, index_t sgn, index_t sgt, index_t sgo, int dtype,
                           index_t Q, index_t N, index_t T, index_t O, index_t I, float* out, index_t so_q,
                           index_t so_n, float* workspace, index_t workspace_numel, std::intptr_t stream_handle) {
  SF_RETURN_IF_ERROR(check_pairwise_args(v, svq, svo, svi, a, san, sat, sai, g, sgn, sgt, sgo, Q, N, T, O, I, out,
                                         so_q, so_n));
  if (Q == 0 || N == 0) return Status();
  const PairPlan pl = plan(Q, N, O, I);
  SF_RETURN_IF_ERROR(check_workspace(workspace_numel, pl.splits * Q * N, workspace));
  SF_RETURN_IF_ERROR(check_grid_dim("score_pairwise (Q tiles)", ceil_div(Q, kTile)));
  SF_RETURN_IF_ERROR(check_grid_dim("score_pairwise (splits)", pl.splits));
  cudaStream_t stream = reinterpret_cast<cudaStream_t>(stream_handle);
  return dispatch_float(dtype, "v/a/g", [&](auto tag) -> Status {
    using TT = typename decltype(tag)::type;
    dim3 grid(static_cast<unsigned>(ceil_div(N, kTile)), static_cast<unsigned>(ceil_div(Q, kTile)),
              static_cast<unsigned>(pl.splits));
    pairwise_kernel<TT><<<grid, kThreads, 0, stream>>>(
        static_cast<const TT*>(v), svq, svo, svi, static_cast<const TT*>(a), san, sat, sai, static_cast<const TT*>(g),
        sgn, sgt, sgo, Q, N, T, O, I, pl.k_per_split, workspace);
    SF_CUDA_CHECK_LAUNCH("pairwise_kernel");
    return launch_reduce_splits_2d(workspace, pl.splits, Q, N, out, so_q, so_n, /*accumulate=*/false, stream);
  });
}

}  // namespace sf
