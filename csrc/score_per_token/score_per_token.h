// score_per_token: per-token scores out[q, n, t] = g_{n,t}ᵀ V_q a_{n,t} (SOURCE_MATH.md §7); their sum
// over t is score_pairwise.
#pragma once

#include <cstdint>

#include "source_fast/common.h"

namespace sf {

// CUDA: v [Q, O, I], a [N, T, I], g [N, T, O], all of dtype `dtype` (float32, float16 or bfloat16;
// strides in elements, any non-negative strides); out float32 [Q, N, T] (strides so_q, so_n, so_t) is
// overwritten. Fused per (query, tile of 64 token rows): fp32 accumulation, no workspace, no atomics
// (bitwise reproducible).
Status score_per_token_cuda(const void* v, index_t svq, index_t svo, index_t svi, const void* a, index_t san,
                            index_t sat, index_t sai, const void* g, index_t sgn, index_t sgt, index_t sgo, int dtype,
                            index_t Q, index_t N, index_t T, index_t O, index_t I, float* out, index_t so_q,
                            index_t so_n, index_t so_t, std::intptr_t stream);

}  // namespace sf
