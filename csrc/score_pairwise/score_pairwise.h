// score_pairwise: scores[q, n] = ⟨V_q, G_n⟩ = Σ_t g_{n,t}ᵀ V_q a_{n,t} (SOURCE_MATH.md §7).
#pragma once

#include <cstdint>

#include "source_fast/common.h"

namespace sf {

// Shapes, strides and pointers of the score_pairwise arguments (shared by every backend's entry point).
inline Status check_pairwise_args(const void* v, index_t svq, index_t svo, index_t svi, const void* a, index_t san,
                                  index_t sat, index_t sai, const void* g, index_t sgn, index_t sgt, index_t sgo,
                                  index_t Q, index_t N, index_t T, index_t O, index_t I, const void* out,
                                  index_t so_q, index_t so_n) {
  SF_RETURN_IF_ERROR(check_strided("v", {Q, O, I}, {svq, svo, svi}));
  SF_RETURN_IF_ERROR(check_strided("a", {N, T, I}, {san, sat, sai}));
  SF_RETURN_IF_ERROR(check_strided("g", {N, T, O}, {sgn, sgt, sgo}));
  SF_RETURN_IF_ERROR(check_strided("out", {Q, N}, {so_q, so_n}));
  SF_RETURN_IF_ERROR(check_ptr("v", v, Q * O * I));
  SF_RETURN_IF_ERROR(check_ptr("a", a, N * T * I));
  SF_RETURN_IF_ERROR(check_ptr("g", g, N * T * O));
  return check_ptr("out", out, Q * N);
}

// CPU, float32, token-wise contraction (Q·N·T·O·I flops, no G_n): v [Q, O, I], a [N, T, I], g [N, T, O]
// (strides in elements); out [Q, N] (strides so_q, so_n) is overwritten.
Status score_pairwise_cpu(const float* v, index_t svq, index_t svo, index_t svi, const float* a, index_t san,
                          index_t sat, index_t sai, const float* g, index_t sgn, index_t sgt, index_t sgo,
                          index_t Q, index_t N, index_t T, index_t O, index_t I, float* out, index_t so_q,
                          index_t so_n, int num_threads);

// CPU, float32, materialised strategy (Q·N·O·I + T·N·O·I flops; rows of G_n are formed per block of
// examples in cache, never all of G): the better choice for T > 1 unless Q is tiny. Same arguments.
Status score_pairwise_materialized_cpu(const float* v, index_t svq, index_t svo, index_t svi, const float* a,
                                       index_t san, index_t sat, index_t sai, const float* g, index_t sgn,
                                       index_t sgt, index_t sgo, index_t Q, index_t N, index_t T, index_t O,
                                       index_t I, float* out, index_t so_q, index_t so_n, int num_threads);

// CPU, float32, for output gradients with many exact zeros (ReLU-gated layers): Q·I·nnz(g) flops.
// Same arguments; fastest with v stored queries-innermost ([O][I][Qs], svq == 1, svi == Qs, svo == I·Qs,
// Qs >= Q rounded up to 16, every row's Qs floats readable), else V is packed once per call.
Status score_pairwise_sparse_g_cpu(const float* v, index_t svq, index_t svo, index_t svi, const float* a,
                                   index_t san, index_t sat, index_t sai, const float* g, index_t sgn, index_t sgt,
                                   index_t sgo, index_t Q, index_t N, index_t T, index_t O, index_t I, float* out,
                                   index_t so_q, index_t so_n, int num_threads);

// CPU, float32, for activations and output gradients both with many exact zeros (a ReLU layer's inputs and
// output gradients): each example's a is compressed to its nonzero columns and each nonzero row of G_n is
// contracted with the matching rows of V only: Q·nnz(a)·nnz(g) flops. Same arguments and V layout as above.
Status score_pairwise_sparse_ag_cpu(const float* v, index_t svq, index_t svo, index_t svi, const float* a,
                                    index_t san, index_t sat, index_t sai, const float* g, index_t sgn, index_t sgt,
                                    index_t sgo, index_t Q, index_t N, index_t T, index_t O, index_t I, float* out,
                                    index_t so_q, index_t so_n, int num_threads);

// CUDA: G_n tiles are formed on the fly in shared memory (no N x O x I buffer) and contracted with
// V; v, a, g of dtype `dtype`; out float32 [Q, N] overwritten. workspace:
// score_pairwise_cuda_workspace(Q, N, T, O, I) floats.
index_t score_pairwise_cuda_workspace(index_t Q, index_t N, index_t T, index_t O, index_t I);
Status score_pairwise_cuda(const void* v, index_t svq, index_t svo, index_t svi, const void* a, index_t san,
                           index_t sat, index_t sai, const void* g, index_t sgn, index_t sgt, index_t sgo,
                           int dtype, index_t Q, index_t N, index_t T, index_t O, index_t I, float* out,
                           index_t so_q, index_t so_n, float* workspace, index_t workspace_numel,
                           std::intptr_t stream);

}  // namespace sf
