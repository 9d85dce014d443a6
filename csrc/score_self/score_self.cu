// score_self on CUDA: rotation GEMMs into fp32 workspace, then one block per (example, group of
// 64 x 64 (o, i) tiles): R = Σ_t gs_t ⊗ as_t in registers, Σ W ⊙ R² reduced by a fixed-order tree
// in shared memory; tile groups are summed in order by a second kernel. Deterministic.
#include "score_self/score_self.h"
#include "source_fast/cuda_common.cuh"

namespace sf {
namespace {

using namespace cuda;

index_t tile_groups(index_t N, index_t O, index_t I) {
  const index_t tiles = ceil_div(O, kTile) * ceil_div(I, kTile);
  return choose_splits(N, tiles, 1);
}

__global__ void __launch_bounds__(kThreads) score_self_kernel(const float* __restrict__ gs, const float* __restrict__ as,
                                                              const float* __restrict__ w, index_t sw0, index_t sw1,
                                                              index_t T, index_t O, index_t I, index_t groups,
                                                              index_t N, float* __restrict__ part) {
  __shared__ float Gs[kBK][kTile + 4];
  __shared__ float Xs[kBK][kTile + 4];
  __shared__ float red[kThreads];
  const index_t n = blockIdx.x;
  const index_t y = blockIdx.y;
  const int tid = threadIdx.x, tx = tid % 16, ty = tid / 16;
  const index_t tiles_i = ceil_div(I, kTile);
  const index_t tiles = ceil_div(O, kTile) * tiles_i;
  float local = 0.0f;
  for (index_t tile = y; tile < tiles; tile += groups) {
    const index_t o0 = (tile / tiles_i) * kTile, i0 = (tile % tiles_i) * kTile;
    float r[4][4];
    example_gradient_tile(gs, as, n, T, O, I, o0, i0, Gs, Xs, tid, tx, ty, r);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const index_t o = o0 + ty * 4 + i;
      if (o >= O) continue;
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const index_t c = i0 + tx * 4 + j;
        if (c < I) local = fmaf(w[o * sw0 + c * sw1], r[i][j] * r[i][j], local);
      }
    }
  }
  red[tid] = local;
  __syncthreads();
  for (int width = kThreads / 2; width > 0; width /= 2) {
    if (tid < width) red[tid] += red[tid + width];
    __syncthreads();
  }
  if (tid == 0) part[y * N + n] = red[0];
}

}  // namespace

index_t score_self_cuda_workspace(index_t N, index_t T, index_t O, index_t I) {
  return N * T * (O + I) + tile_groups(N, O, I) * N;
}

Status score_self_cuda(const void* a, index_t san, index_t sat, index_t sai, const void* g, index_t sgn, index_t sgt,
                       index_t sgo, int dtype, const float* q_s, index_t sqs0, index_t sqs1, const float* q_a,
                       index_t sqa0, index_t sqa1, const float* w, index_t sw0, index_t sw1, index_t N, index_t T,
                       index_t O, index_t I, float* out, index_t so, float* workspace, index_t workspace_numel,
                       std::intptr_t stream_handle) {
  SF_RETURN_IF_ERROR(check_strided("a", {N, T, I}, {san, sat, sai}));
  SF_RETURN_IF_ERROR(check_strided("g", {N, T, O}, {sgn, sgt, sgo}));
  SF_RETURN_IF_ERROR(check_strided("q_s", {O, O}, {sqs0, sqs1}));
  SF_RETURN_IF_ERROR(check_strided("q_a", {I, I}, {sqa0, sqa1}));
  SF_RETURN_IF_ERROR(check_strided("weights", {O, I}, {sw0, sw1}));
  SF_RETURN_IF_ERROR(check_strided("out", {N}, {so}));
  SF_RETURN_IF_ERROR(check_ptr("a", a, N * T * I));
  SF_RETURN_IF_ERROR(check_ptr("g", g, N * T * O));
  SF_RETURN_IF_ERROR(check_ptr("weights", w, O * I));
  SF_RETURN_IF_ERROR(check_ptr("out", out, N));
  if (N == 0) return Status();
  cudaStream_t stream = reinterpret_cast<cudaStream_t>(stream_handle);
  if (T == 0 || O == 0 || I == 0) {
    if (so == 1) {
      SF_CUDA_CHECK(cudaMemsetAsync(out, 0, sizeof(float) * N, stream));
      return Status();
    }
    return invalid_argument("out: expected a contiguous output for an empty reduction, got stride ", so);
  }
  SF_CHECK_ARG(N <= 2147483647, "a: expected N <= 2^31 - 1 examples per call, got ", N);
  index_t ra = 0, rg = 0;
  SF_RETURN_IF_ERROR(flat_row_stride("a", N, T, san, sat, &ra));
  SF_RETURN_IF_ERROR(flat_row_stride("g", N, T, sgn, sgt, &rg));
  const index_t groups = tile_groups(N, O, I);
  SF_RETURN_IF_ERROR(check_workspace(workspace_numel, score_self_cuda_workspace(N, T, O, I), workspace));
  SF_RETURN_IF_ERROR(check_grid_dim("score_self (tile groups)", groups));
  float* gs = workspace;
  float* as = gs + N * T * O;
  float* part = as + N * T * I;
  return dispatch_float(dtype, "a/g", [&](auto tag) -> Status {
    using TT = typename decltype(tag)::type;
    SF_RETURN_IF_ERROR(rotate_tokens(static_cast<const TT*>(g), rg, sgo, q_s, sqs0, sqs1, N * T, O, gs, stream));
    SF_RETURN_IF_ERROR(rotate_tokens(static_cast<const TT*>(a), ra, sai, q_a, sqa0, sqa1, N * T, I, as, stream));
    dim3 grid(static_cast<unsigned>(N), static_cast<unsigned>(groups), 1);
    score_self_kernel<<<grid, kThreads, 0, stream>>>(gs, as, w, sw0, sw1, T, O, I, groups, N, part);
    SF_CUDA_CHECK_LAUNCH("score_self_kernel");
    return launch_reduce_splits(part, groups, N, N, out, so, /*accumulate=*/false, stream);
  });
}

}  // namespace sf
