// score_self: s[n] = Σ_ij W_ij (Q_Sᵀ G_n Q_A)²_ij (self-influence of one EK-FAC operator, W = f(Λ)).
#pragma once

#include <cstdint>

#include "source_fast/common.h"

namespace sf {

// CPU, float32, on already rotated tokens gs = g Q_S [N, T, O], as = a Q_A [N, T, I]; w [O, I]
// (strides sw0, sw1); out [N] (stride so) is overwritten.
Status score_self_rotated_cpu(const float* gs, index_t sgn, index_t sgt, index_t sgo, const float* as,
                              index_t san, index_t sat, index_t sai, index_t N, index_t T, index_t O, index_t I,
                              const float* w, index_t sw0, index_t sw1, float* out, index_t so, int num_threads);

// CUDA, complete op. a [N, T, I], g [N, T, O] of dtype `dtype`; q_s [O, O], q_a [I, I] float32
// (any strides); weights float32 [O, I]; out float32 [N] (stride so) overwritten.
// workspace: score_self_cuda_workspace(N, T, O, I) floats.
index_t score_self_cuda_workspace(index_t N, index_t T, index_t O, index_t I);
Status score_self_cuda(const void* a, index_t san, index_t sat, index_t sai, const void* g, index_t sgn,
                       index_t sgt, index_t sgo, int dtype, const float* q_s, index_t sqs0, index_t sqs1,
                       const float* q_a, index_t sqa0, index_t sqa1, const float* w, index_t sw0,
                       index_t sw1, index_t N, index_t T, index_t O, index_t I, float* out, index_t so,
                       float* workspace, index_t workspace_numel, std::intptr_t stream);

}  // namespace sf
