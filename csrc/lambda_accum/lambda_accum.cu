// lambda_accum on CUDA: rotation GEMMs (gs = g Q_S, as = a Q_A into fp32 workspace), then a fused
// kernel where each block owns a 64 x 64 tile of Λ and a contiguous range of examples: per example
// R = Σ_t gs_t ⊗ as_t is formed in registers (tokens staged in shared memory) and R² is accumulated.
// Example ranges (splits) are summed in order by a second kernel into `out`: deterministic.
#include "lambda_accum/lambda_accum.h"
#include "source_fast/cuda_common.cuh"

namespace sf {
namespace {

using namespace cuda;

struct LambdaPlan {
  index_t splits, n_per_split;
};

LambdaPlan plan(index_t N, index_t O, index_t I) {
  const index_t tiles = ceil_div(O, kTile) * ceil_div(I, kTile);
  LambdaPlan p;
  p.splits = choose_splits(tiles, N, 4);
  p.n_per_split = N > 0 ? ceil_div(N, p.splits) : 1;
  p.splits = N > 0 ? ceil_div(N, p.n_per_split) : 1;
  return p;
}

__global__ void __launch_bounds__(kThreads) lambda_fused_kernel(const float* __restrict__ gs,
                                                                const float* __restrict__ as, index_t N, index_t T,
                                                                index_t O, index_t I, index_t n_per_split,
                                                                float* __restrict__ part) {
  __shared__ float Gs[kBK][kTile + 4];
  __shared__ float Xs[kBK][kTile + 4];
  const index_t i0 = static_cast<index_t>(blockIdx.x) * kTile;
  const index_t o0 = static_cast<index_t>(blockIdx.y) * kTile;
  const index_t s = blockIdx.z;
  const index_t n_begin = s * n_per_split;
  const index_t n_end = n_begin + n_per_split < N ? n_begin + n_per_split : N;
  const int tid = threadIdx.x, tx = tid % 16, ty = tid / 16;
  float acc[4][4];
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) acc[i][j] = 0.0f;

  for (index_t n = n_begin; n < n_end; ++n) {
    float r[4][4];
    example_gradient_tile(gs, as, n, T, O, I, o0, i0, Gs, Xs, tid, tx, ty, r);
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(r[i][j], r[i][j], acc[i][j]);
  }
  float* P = part + s * O * I;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const index_t o = o0 + ty * 4 + i;
    if (o >= O) continue;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const index_t c = i0 + tx * 4 + j;
      if (c < I) P[o * I + c] = acc[i][j];
    }
  }
}

}  // namespace

index_t lambda_accum_cuda_workspace(index_t N, index_t T, index_t O, index_t I) {
  return N * T * (O + I) + plan(N, O, I).splits * O * I;
}

Status lambda_accum_cuda(const void* a, index_t san, index_t sat, index_t sai, const void* g, index_t sgn,
                         index_t sgt, index_t sgo, int dtype, const float* q_a, index_t sqa0, index_t sqa1,
                         const float* q_s, index_t sqs0, index_t sqs1, index_t N, index_t T, index_t O, index_t I,
                         float* out, index_t ldo, float* workspace, index_t workspace_numel,
                         std::intptr_t stream_handle) {
  SF_RETURN_IF_ERROR(check_strided("a", {N, T, I}, {san, sat, sai}));
  SF_RETURN_IF_ERROR(check_strided("g", {N, T, O}, {sgn, sgt, sgo}));
  SF_RETURN_IF_ERROR(check_strided("q_a", {I, I}, {sqa0, sqa1}));
  SF_RETURN_IF_ERROR(check_strided("q_s", {O, O}, {sqs0, sqs1}));
  SF_CHECK_ARG(ldo >= I, "out: expected leading dimension >= ", I, ", got ", ldo);
  SF_RETURN_IF_ERROR(check_ptr("a", a, N * T * I));
  SF_RETURN_IF_ERROR(check_ptr("g", g, N * T * O));
  SF_RETURN_IF_ERROR(check_ptr("out", out, O * I));
  if (N == 0 || T == 0 || O == 0 || I == 0) return Status();
  index_t ra = 0, rg = 0;
  SF_RETURN_IF_ERROR(flat_row_stride("a", N, T, san, sat, &ra));
  SF_RETURN_IF_ERROR(flat_row_stride("g", N, T, sgn, sgt, &rg));
  const LambdaPlan pl = plan(N, O, I);
  SF_RETURN_IF_ERROR(check_workspace(workspace_numel, lambda_accum_cuda_workspace(N, T, O, I), workspace));
  SF_RETURN_IF_ERROR(check_grid_dim("lambda_accum (O tiles)", ceil_div(O, kTile)));
  SF_RETURN_IF_ERROR(check_grid_dim("lambda_accum (splits)", pl.splits));
  cudaStream_t stream = reinterpret_cast<cudaStream_t>(stream_handle);
  float* gs = workspace;
  float* as = gs + N * T * O;
  float* part = as + N * T * I;
  return dispatch_float(dtype, "a/g", [&](auto tag) -> Status {
    using TT = typename decltype(tag)::type;
    SF_RETURN_IF_ERROR(rotate_tokens(static_cast<const TT*>(g), rg, sgo, q_s, sqs0, sqs1, N * T, O, gs, stream));
    SF_RETURN_IF_ERROR(rotate_tokens(static_cast<const TT*>(a), ra, sai, q_a, sqa0, sqa1, N * T, I, as, stream));
    dim3 grid(static_cast<unsigned>(ceil_div(I, kTile)), static_cast<unsigned>(ceil_div(O, kTile)),
              static_cast<unsigned>(pl.splits));
    lambda_fused_kernel<<<grid, kThreads, 0, stream>>>(gs, as, N, T, O, I, pl.n_per_split, part);
    SF_CUDA_CHECK_LAUNCH("lambda_fused_kernel");
    return launch_reduce_splits_2d(part, pl.splits, O, I, out, ldo, 1, /*accumulate=*/true, stream);
  });
}

}  // namespace sf
