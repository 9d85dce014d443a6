// to_queries_innermost: out[c][q] = x[q][c] · r[c], the walk's accumulation term W = r(Λ) ⊙ ũ ([Q, O, I],
// c = (o, i)) written in the queries-innermost layout the sparse scoring kernel reads ([O, I, Qs]).
//
// torch.mul(x, r, out=<that layout>) walks the output in order and reads x with a stride of O·I floats
// (a new page per element): about 7 GB/s. Here 16 queries x 16 columns are read as 16 lines, transposed
// in registers and written as 16 lines.
#pragma once

#include "source_fast/common.h"

namespace sf {

// CPU, float32. x [Q, C] with unit column stride (row stride sxq >= C); r [C] contiguous, or null (ones);
// out row c at out + c * ldo, lanes q < Q written (one rounding: the same bits as x * r), lanes Q <= q < qs
// set to zero, lanes beyond qs untouched (qs <= ldo).
Status to_queries_innermost_cpu(const float* x, index_t sxq, const float* r, index_t Q, index_t C, float* out,
                                index_t ldo, index_t qs, int num_threads);

}  // namespace sf
