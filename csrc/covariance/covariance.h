// covariance: C = sum_r m_r x_r x_r^T over rows of x [R, D] (SOURCE_MATH.md §7, SYRK).
// Torch-free entry points; tensors cross as pointers + sizes + strides (elements, not bytes).
#pragma once

#include <cstdint>

#include "source_fast/common.h"

namespace sf {

// CPU, float32. x: [R, D] with strides (sxr, sxc); mask: [R] float32 weights with stride smask, or
// null; out: [D, D] row-major with leading dimension ldo (column stride 1).
// accumulate=true:  out <- (out + out^T) / 2 + C   (the torch backend's symmetrised in-place update)
// accumulate=false: out <- C                       (out need not be initialised)
Status covariance_cpu(const float* x, index_t R, index_t D, index_t sxr, index_t sxc, const float* mask,
                      index_t smask, float* out, index_t ldo, bool accumulate, int num_threads);

// CUDA. x: [R, D] of dtype x_dtype (float32/float16/bfloat16); mask: float32 [R] or null; out: float32
// [D, D], leading dimension ldo. `workspace` holds covariance_cuda_workspace(R, D) floats (may be null
// when that is 0). `stream` is a cudaStream_t passed as an integer.
index_t covariance_cuda_workspace(index_t R, index_t D);
Status covariance_cuda(const void* x, int x_dtype, index_t R, index_t D, index_t sxr, index_t sxc,
                       const float* mask, index_t smask, float* out, index_t ldo, bool accumulate,
                       float* workspace, index_t workspace_numel, std::intptr_t stream);

}  // namespace sf
