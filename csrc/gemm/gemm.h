// gemm: C[b] = A[b] · B[b] in fp32 on CPU, the building block of the Kronecker rotations (kron_project,
// the rotated query walk, rotating token rows into an eigenbasis).
//
// Why not BLAS: the MKL that ships with torch takes its AVX2 path on AMD CPUs and reaches about half of
// an AVX-512 core's fp32 peak; this GotoBLAS-style loop around the register-blocked micro-kernel of
// cpu_microkernel.h runs the AVX-512 path on any CPU that has it (see benchmarks/bench_gemm.py).
#pragma once

#include "source_fast/common.h"

namespace sf {

// C[b] (overwritten) = A[b] @ B[b] for b < batch; A [M, K], B [K, N], C [M, N], every stride in
// elements (a batch stride of 0 broadcasts that operand). Sums over k run in a fixed order: the result
// is bitwise independent of the thread count.
Status gemm_batched_cpu(index_t batch, const float* A, index_t sab, index_t sam, index_t sak, const float* B,
                        index_t sbb, index_t sbk, index_t sbn, float* C, index_t scb, index_t scm, index_t scn,
                        index_t M, index_t N, index_t K, int num_threads);

}  // namespace sf
