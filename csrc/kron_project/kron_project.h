// kron_project: f(H) V = Q_S [f(Λ) ⊙ (Q_Sᵀ V Q_A)] Q_Aᵀ for a batch of V (SOURCE_MATH.md §3 step 4).
//
// CPU: no C++ GEMM. The op is four GEMMs (two shared, two per f) around an O x I elementwise
// epilogue; source_fast/_extension.py runs the GEMMs with torch (BLAS) and takes only f(Λ) from the
// module (spectral_eval in source_fast/spectral.h, the code the CUDA epilogue runs).
#pragma once

#include <cstdint>

#include "source_fast/common.h"

namespace sf {

// CUDA. v [Q, O, I] of dtype `dtype` (float32/float16/bfloat16) with strides; q_s [O, O], q_a [I, I],
// lam [O, I] float32 with strides; fns: n_fns spectral functions; outs: n_fns float32 [Q, O, I]
// contiguous outputs (overwritten). workspace: kron_project_cuda_workspace(Q, O, I) floats.
index_t kron_project_cuda_workspace(index_t Q, index_t O, index_t I);
Status kron_project_cuda(const void* v, index_t svq, index_t svo, index_t svi, int dtype, const float* q_s,
                         index_t sqs0, index_t sqs1, const float* q_a, index_t sqa0, index_t sqa1,
                         const float* lam, index_t sl0, index_t sl1, const SpectralSpec* fns, int n_fns, index_t Q,
                         index_t O, index_t I, float* const* outs, float* workspace, index_t workspace_numel,
                         std::intptr_t stream);

}  // namespace sf
