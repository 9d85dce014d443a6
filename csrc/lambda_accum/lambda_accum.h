// lambda_accum: Λ += Σ_n (Q_Sᵀ G_n Q_A)², G_n = Σ_t g_{n,t} a_{n,t}ᵀ (SOURCE_MATH.md §3 step 3, §7).
#pragma once

#include <cstdint>

#include "source_fast/common.h"

namespace sf {

// CPU, float32, on already rotated tokens: gs = g Q_S [N, T, O], as = a Q_A [N, T, I] (strides in
// elements). out [O, I] row-major (leading dimension ldo) is accumulated in place:
//   out[o, i] += Σ_n (Σ_t gs[n, t, o] as[n, t, i])².
// Per-example gradients are never formed: each O x I tile lives in registers for one example.
Status lambda_accum_rotated_cpu(const float* gs, index_t sgn, index_t sgt, index_t sgo, const float* as,
                                index_t san, index_t sat, index_t sai, index_t N, index_t T, index_t O,
                                index_t I, float* out, index_t ldo, int num_threads);

// CUDA, complete op (rotation GEMMs + fused square-reduce). a [N, T, I], g [N, T, O] of dtype
// `dtype` (float32/float16/bfloat16) with strides; q_a [I, I], q_s [O, O] float32 with strides
// (column-major eigenvectors are fine); out float32 [O, I] (ldo) accumulated in place.
// workspace: lambda_accum_cuda_workspace(N, T, O, I) floats.
index_t lambda_accum_cuda_workspace(index_t N, index_t T, index_t O, index_t I);
Status lambda_accum_cuda(const void* a, index_t san, index_t sat, index_t sai, const void* g, index_t sgn,
                         index_t sgt, index_t sgo, int dtype, const float* q_a, index_t sqa0, index_t sqa1,
                         const float* q_s, index_t sqs0, index_t sqs1, index_t N, index_t T,
                         index_t O, index_t I, float* out, index_t ldo, float* workspace,
                         index_t workspace_numel, std::intptr_t stream);

}  // namespace sf
