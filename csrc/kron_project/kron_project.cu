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

// C[q] = A[q] · B[q] for q < Q with C [Q, O, I] contiguous (every GEMM of the op writes that layout);
// A is M=O rows by K, B is K by N=I, given by strides (batch stride 0: shared by every q). `bscale`
// [K, I] (row-major) multiplies B elementwise as it is loaded (the spectral epilogue).
template <typename TA>
Status batched_rotation(const TA* A, index_t sAb, index_t sAm, index_t sAk, const float* B, index_t sBb, index_t sBk,
                        index_t sBn, index_t K, float* C, index_t Q, index_t O, index_t I, cudaStream_t stream,
                        const float* bscale = nullptr) {
  GemmParams<TA, float> p;
  p.A = A;
  p.sAb = sAb;
  p.sAm = sAm;
  p.sAk = sAk;
  p.B = B;
  p.sBb = sBb;
  p.sBk = sBk;
  p.sBn = sBn;
  p.bscale = bscale;
  p.sbk = bscale ? I : 0;
  p.sbn = bscale ? 1 : 0;
  p.C = C;
  p.sCb = O * I;
  p.sCm = I;
  p.sCn = 1;
  p.M = O;
  p.N = I;
  p.K = K;
  p.batch = Q;
  return launch_gemm(p, stream);
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
    const index_t OI = O * I;
    // t1[q] = V[q] Q_A, then rot[q] = Q_Sᵀ t1[q] (A(m, k) = Q_S[k, m])
    SF_RETURN_IF_ERROR(batched_rotation(static_cast<const TT*>(v), svq, svo, svi, q_a, 0, sqa0, sqa1, I, t1, Q, O, I,
                                        stream));
    SF_RETURN_IF_ERROR(batched_rotation(q_s, 0, sqs1, sqs0, t1, OI, I, 1, O, rot, Q, O, I, stream));
    for (int k = 0; k < n_fns; ++k) {
      const SpectralF32 f = to_f32_spec(fns[k]);
      spectral_weights_kernel<<<static_cast<unsigned>(ceil_div(O * I, 256)), 256, 0, stream>>>(f, lam, sl0, sl1, O, I,
                                                                                              wts);
      SF_CUDA_CHECK_LAUNCH("spectral_weights_kernel");
      // t1[q] = Q_S (f(Λ) ⊙ rot[q]), then outs[k][q] = t1[q] Q_Aᵀ (B(k, n) = Q_A[n, k])
      SF_RETURN_IF_ERROR(batched_rotation(q_s, 0, sqs0, sqs1, rot, OI, I, 1, O, t1, Q, O, I, stream, wts));
      SF_RETURN_IF_ERROR(batched_rotation(static_cast<const float*>(t1), OI, I, 1, q_a, 0, sqa1, sqa0, I, outs[k], Q, O,
                                          I, stream));
    }
    return Status();
  });
}

}  // namespace sf
