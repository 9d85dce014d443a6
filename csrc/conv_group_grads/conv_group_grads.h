// conv_group_grads: the per-example gradients of a convolution whose groups each read one input channel (a
// depthwise convolution's groups with channel multiplier M; or a convolution of one input channel), from its input
// and output gradient, without patch rows:
//   out[b, c, j, k] = Σ_{oh, ow} gy[b, c·M + j, oh, ow] · r_k(b, c, oh, ow),  k = kh·KW + kw < KH·KW,
//   out[b, c, j, KH·KW] = Σ_{oh, ow} gy[b, c·M + j, oh, ow]   (with bias),
// r_k the value channel c's patch holds at kernel offset k for output position (oh, ow) (zero padding).
//
// torch's form (one convolution of every (example, channel) image with its own output gradient as the kernel,
// groups = B·C·M) ran a 32×32 kernel at ≈ 4 GFLOP/s: 10 ms for 128 images × 32 channels, 22 ms channels-last (its
// reshapes copy). Here each channel's patch rows are slices of its gathered columns (as in conv_patch_covariance)
// and the KH·KW dot products with the output gradient run in vector lanes.
#pragma once

#include "conv_patch_rows/conv_patch_rows.h"
#include "source_fast/common.h"

namespace sf {

// CPU, float32 in and out, float32 lane sums (each output a sum over one channel's OH·OW positions), summed in a
// fixed order: the same bits at any thread count. x: any non-negative strides (sb, sc, sh, sw). gy: [B, C·M, OH, OW]
// with each (b, channel) plane contiguous (element (b, ch, oh, ow) at b·gsb + ch·gsc + oh·OW + ow). out:
// contiguous [B, C, M, KH·KW + (bias ? 1 : 0)], overwritten.
Status conv_group_grads_cpu(const float* x, index_t B, index_t C, index_t H, index_t W, index_t sb, index_t sc,
                            index_t sh, index_t sw, const float* gy, index_t M, index_t gsb, index_t gsc,
                            const ConvGeometry& geo, bool bias, float* out, int num_threads);

}  // namespace sf
