// kron_project on CUDA: R = Q_Sᵀ (V Q_A) once (two batched GEMMs), then for each f:
// out_f = Q_S [f(Λ) ⊙ R] Q_Aᵀ, with f(Λ) evaluated by a small kernel and applied while the next
// GEMM loads R (the "spectral epilogue" fused into the operand load). fp32 accumulation throughout.
#include "kron_project/kron_project.h"
#include "source_fast/cuda_common.cuh"
#include "source_fast/spectral.h"

namespace sf {
namespace {

using namespace cuda;

__global__ void __launch_bounds__(256) spectral_weights_kernel(SpectralF32 f, const float* __restrict__ lam,
                                                               index_t sl0, index_t sl1, index_t O, index_t I,
                                                               float* __restrict__ w) {
  const index_t e = static_cast<index_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (e >= O * I) return;
  const index_t o = e / I, i = e % I;
  w[e] = spectral_eval(f, lam[o * sl0 + i * sl1]);
}

}  // namespace

index_t kron_project_cuda_workspace(index_t Q, index_t O, index_t I) { return 2 * Q * O * I + O * I; }

Status kron_project_cuda(const void* v, index_t svq, index_t svo, index_t svi, int dtype, const float* q_s,
                         index_t sqs0, index_t sqs1, const float* q_a, index_t sqa0, index_t sqa1, const float* lam,
                         index_t sl0, index_t sl1, const SpectralSpec* fns, int n_fns, index_t Q, index_t O, index_t I,
                         float* const* outs, float* workspace, index_t workspace_numel, std::intptr_t stream_handle) {
  SF_RETURN_IF_ERROR(check_strided("v", {Q, O, I}, {svq, svo, svi}));
  SF_RETURN_IF_ERROR(check_strided("q_s", {O, O}, {sqs0, sqs1}));
  SF_RETURN_IF_ERROR(check_strided("q_a", {I, I}, {sqa0, sqa1}));
  SF_RETURN_IF_ERROR(check_strided("lam", {O, I}, {sl0, sl1}));
  SF_CHECK_ARG(n_fns >= 1, "fns: expected at least one spectral function, got ", n_fns);
  for (int k = 0; k < n_fns; ++k) {
    SF_RETURN_IF_ERROR(check_spectral(fns[k], k));
    SF_RETURN_IF_ERROR(check_ptr("outs", outs[k], Q * O * I));
  }
  SF_RETURN_IF_ERROR(check_ptr("v", v, Q * O * I));
  if (Q == 0 || O == 0 || I == 0) return Status();
  SF_RETURN_IF_ERROR(check_workspace(workspace_numel, kron_project_cuda_workspace(Q, O, I), workspace));
  cudaStream_t stream = reinterpret_cast<cudaStream_t>(stream_handle);
  const index_t QOI = Q * O * I;
  float* t1 = workspace;        // V Q_A, later reused for Q_S [f(Λ) ⊙ R]
  float* rot = t1 + QOI;        // R = Q_Sᵀ V Q_A
  float* wts = rot + QOI;       // f(Λ)
  return dispatch_float(dtype, "v", [&](auto tag) -> Status {
    using TT = typename decltype(tag)::type;
    {  // t1[q] = V[q] Q_A
      GemmParams<TT, float> p;
      p.A = static_cast<const TT*>(v);
      p.sAb = svq;
      p.sAm = svo;
      p.sAk = svi;
      p.B = q_a;
      p.sBk = sqa0;
      p.sBn = sqa1;
      p.C = t1;
      p.sCb = O * I;
      p.sCm = I;
      p.sCn = 1;
      p.M = O;
      p.N = I;
      p.K = I;
      p.batch = Q;
      SF_RETURN_IF_ERROR(launch_gemm(p, stream));
    }
    {  // rot[q] = Q_Sᵀ t1[q]
      GemmParams<float, float> p;
      p.A = q_s;  // A(m, k) = Q_S[k, m]
      p.sAm = sqs1;
      p.sAk = sqs0;
      p.B = t1;
      p.sBb = O * I;
      p.sBk = I;
      p.sBn = 1;
      p.C = rot;
      p.sCb = O * I;
      p.sCm = I;
      p.sCn = 1;
      p.M = O;
      p.N = I;
      p.K = O;
      p.batch = Q;
      SF_RETURN_IF_ERROR(launch_gemm(p, stream));
    }
    for (int k = 0; k < n_fns; ++k) {
      const SpectralF32 f = to_f32_spec(fns[k]);
      spectral_weights_kernel<<<static_cast<unsigned>(ceil_div(O * I, 256)), 256, 0, stream>>>(f, lam, sl0, sl1, O, I,
                                                                                              wts);
      SF_CUDA_CHECK_LAUNCH("spectral_weights_kernel");
      {  // t1[q] = Q_S (f(Λ) ⊙ rot[q])
        GemmParams<float, float> p;
        p.A = q_s;
        p.sAm = sqs0;
        p.sAk = sqs1;
        p.B = rot;
        p.sBb = O * I;
        p.sBk = I;
        p.sBn = 1;
        p.bscale = wts;
        p.sbk = I;
        p.sbn = 1;
        p.C = t1;
        p.sCb = O * I;
        p.sCm = I;
        p.sCn = 1;
        p.M = O;
        p.N = I;
        p.K = O;
        p.batch = Q;
        SF_RETURN_IF_ERROR(launch_gemm(p, stream));
      }
      {  // outs[k][q] = t1[q] Q_Aᵀ
        GemmParams<float, float> p;
        p.A = t1;
        p.sAb = O * I;
        p.sAm = I;
        p.sAk = 1;
        p.B = q_a;  // B(k, n) = Q_A[n, k]
        p.sBk = sqa1;
        p.sBn = sqa0;
        p.C = outs[k];
        p.sCb = O * I;
        p.sCm = I;
        p.sCn = 1;
        p.M = O;
        p.N = I;
        p.K = I;
        p.batch = Q;
        SF_RETURN_IF_ERROR(launch_gemm(p, stream));
      }
    }
    return Status();
  });
}

}  // namespace sf
