// conv_patch_covariance: the activation covariances of a convolution whose groups each read one input channel
// (a depthwise convolution's groups; or a convolution of one input channel) without its patch rows:
// out[c] = Σ_{b, oh, ow} r rᵀ with r = (the KH·KW patch of channel c at output position (oh, ow), 1 with bias),
// for every channel c of x [B, C, H, W].
//
// The patch rows of such a group hold KH·KW + 1 values per input value (10 for 3×3): writing them and reading them
// back for a [D, D] product of D = 10 is bandwidth-bound (≈ 0.66 ms per group per 128 images of 32×32 on a
// 2-core Zen 4 host). Here each image row is read once per output row and the products stay in L1.
#pragma once

#include "conv_patch_rows/conv_patch_rows.h"
#include "source_fast/common.h"

namespace sf {

// CPU, float32 in, float64 task sums, float32 out. x: any non-negative strides (sb, sc, sh, sw); out: contiguous
// [C, D, D], D = KH·KW + (bias ? 1 : 0), overwritten (symmetric). Images are split into tasks of a fixed size, summed
// in a fixed order: the same bits at any thread count.
Status conv_patch_covariance_cpu(const float* x, index_t B, index_t C, index_t H, index_t W, index_t sb,
                                 index_t sc, index_t sh, index_t sw, const ConvGeometry& geo, bool bias, float* out,
                                 int num_threads);

}  // namespace sf
