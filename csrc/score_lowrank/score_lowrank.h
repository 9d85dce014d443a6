// score_lowrank: scores for low-rank query directions V_q = U_q W_qᵀ (SOURCE_MATH.md §7):
// scores[q, n] = ⟨U_q W_qᵀ, G_n⟩ = Σ_t Σ_r (U_qᵀ g_{n,t})_r (W_qᵀ a_{n,t})_r, neither V_q nor G_n formed.
#pragma once

#include <cstdint>

#include "source_fast/common.h"

namespace sf {

// CUDA: u [Q, O, R], w [Q, I, R], a [N, T, I], g [N, T, O], all of dtype `dtype` (float32, float16 or
// bfloat16; strides in elements, any non-negative strides); out float32 [Q, N] (strides so_q, so_n)
// is overwritten. Fused per (query, tile of examples): fp32 accumulation, no workspace, no atomics
// (bitwise reproducible).
Status score_lowrank_cuda(const void* u, index_t suq, index_t suo, index_t sur, const void* w, index_t swq,
                          index_t swi, index_t swr, const void* a, index_t san, index_t sat, index_t sai,
                          const void* g, index_t sgn, index_t sgt, index_t sgo, int dtype, index_t Q, index_t N,
                          index_t T, index_t O, index_t I, index_t R, float* out, index_t so_q, index_t so_n,
                          std::intptr_t stream);

}  // namespace sf
