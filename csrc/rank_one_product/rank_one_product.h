// rank_one_product: the output-side rotation of rank-one query directions, written queries-innermost.
//
//   out[p, i, q] = a[q, i] · Σ_o L[p, o] · g[q, o] · w[o, i]      (= (L @ (w ⊙ g_q a_qᵀ))[p, i])
//
// With one token per query an influence direction is W_q = w ⊙ (g_q a_qᵀ) in the eigenbasis (g, a the
// query's rotated gradients, w = 1/(Λ + δ)), and the pipeline's "output" plan scores V'_q = Q_S W_q against
// training rows whose output gradients keep their exact zeros. Folding g and a into the operands saves
// forming w ⊙ g aᵀ (two passes over a block the size of the result), and the result is written directly
// queries-innermost, the layout the sparse scoring kernel reads.
#pragma once

#include "source_fast/common.h"

namespace sf {

// CPU, float32. L [P, O], g [Q, O], a [Q, I], w [O, I] or null (all ones); every stride in elements.
// out: element (p, i, q) at out[p * sop + i * soi + q] (queries innermost), Q <= qs <= soi: lanes q < Q
// are written, lanes Q <= q < qs set to zero (the padding the sparse scoring kernel reads), others untouched.
// Each element is summed over o in increasing order in one task: bitwise independent of the thread count.
Status rank_one_product_cpu(const float* L, index_t sLp, index_t sLo, const float* g, index_t sgq, index_t sgo,
                            const float* a, index_t saq, index_t sai, const float* w, index_t swo, index_t swi,
                            index_t P, index_t Q, index_t O, index_t I, float* out, index_t sop, index_t soi,
                            index_t qs, int num_threads);

}  // namespace sf
