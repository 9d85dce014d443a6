// covariance on CUDA: split-K SYRK on the generic tiled GEMM (upper-triangle tiles only), then one
// kernel that sums the split partials in order, symmetrises and writes both triangles.
#include "covariance/covariance.h"
#include "source_fast/cuda_common.cuh"

namespace sf {
namespace {

using namespace cuda;

struct CovPlan {
  index_t splits, k_per_split;
};

CovPlan plan(index_t R, index_t D) {
  const index_t t = ceil_div(D, kTile);
  const index_t upper_tiles = t * (t + 1) / 2;
  CovPlan p;
  p.splits = choose_splits(upper_tiles, R, 256);
  p.k_per_split = ceil_div(ceil_div(R, p.splits), kBK) * kBK;
  if (p.k_per_split == 0) p.k_per_split = kBK;
  p.splits = R > 0 ? ceil_div(R, p.k_per_split) : 1;
  return p;
}

// One thread per (i, j), i <= j: out[i, j] = out[j, i] = (sym(out) if accumulate) + Σ_s part[s, i, j].
__global__ void __launch_bounds__(256) sym_reduce_kernel(const float* __restrict__ part, index_t splits, index_t D,
                                                         float* __restrict__ out, index_t ldo, bool accumulate) {
  const index_t e = static_cast<index_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (e >= D * D) return;
  const index_t i = e / D, j = e % D;
  if (i > j) return;
  float c = 0.0f;
  for (index_t s = 0; s < splits; ++s) c += part[s * D * D + i * D + j];
  float v = c;
  if (accumulate) v = (out[i * ldo + j] + out[j * ldo + i]) * 0.5f + c;
  out[i * ldo + j] = v;
  out[j * ldo + i] = v;
}

}  // namespace

index_t covariance_cuda_workspace(index_t R, index_t D) { return plan(R, D).splits * D * D; }

Status covariance_cuda(const void* x, int x_dtype, index_t R, index_t D, index_t sxr, index_t sxc, const float* mask,
                       index_t smask, float* out, index_t ldo, bool accumulate, float* workspace,
                       index_t workspace_numel, std::intptr_t stream_handle) {
  SF_RETURN_IF_ERROR(check_strided("x", {R, D}, {sxr, sxc}));
  SF_RETURN_IF_ERROR(check_strided("mask", {R}, {smask}));
  SF_CHECK_ARG(ldo >= D, "out: expected leading dimension >= ", D, ", got ", ldo);
  SF_RETURN_IF_ERROR(check_ptr("x", x, R * D));
  SF_RETURN_IF_ERROR(check_ptr("out", out, D * D));
  if (D == 0) return Status();
  const CovPlan pl = plan(R, D);
  SF_RETURN_IF_ERROR(check_workspace(workspace_numel, pl.splits * D * D, workspace));
  cudaStream_t stream = reinterpret_cast<cudaStream_t>(stream_handle);
  return dispatch_float(x_dtype, "x", [&](auto tag) -> Status {
    using T = typename decltype(tag)::type;
    const T* xp = static_cast<const T*>(x);
    GemmParams<T, T> p;
    p.A = xp;  // A(m, k) = x[k, m]
    p.sAm = sxc;
    p.sAk = sxr;
    p.B = xp;  // B(k, n) = mask[k] x[k, n]
    p.sBk = sxr;
    p.sBn = sxc;
    p.kscale = mask;
    p.sks = smask;
    p.C = workspace;
    p.sCs = D * D;
    p.sCm = D;
    p.sCn = 1;
    p.M = D;
    p.N = D;
    p.K = R;
    p.splits = pl.splits;
    p.k_per_split = pl.k_per_split;
    p.upper_only = true;
    SF_RETURN_IF_ERROR(launch_gemm(p, stream));
    const index_t blocks = ceil_div(D * D, 256);
    sym_reduce_kernel<<<static_cast<unsigned>(blocks), 256, 0, stream>>>(workspace, pl.splits, D, out, ldo, accumulate);
    SF_CUDA_CHECK_LAUNCH("sym_reduce_kernel");
    return Status();
  });
}

}  // namespace sf
