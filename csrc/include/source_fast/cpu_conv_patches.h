// Patch rows of a convolution input's channels on CPU, shared by the kernels that read them without writing the
// [B, positions, C·K] patch-row tensor (conv_patch_covariance, conv_group_grads): a channel's patch row k = (kh, kw)
// over a block of whole output rows is a contiguous run of floats, either a slice of the channel's columns gathered
// once per kernel column (`gather_columns`, row stride 1) or copied per block (`patch_block`); `dots_into` and
// `sum_into` add their products to lane sums held in registers.
#pragma once

#include <algorithm>

#include "conv_patch_rows/conv_patch_rows.h"
#include "source_fast/cpu_microkernel.h"

namespace sf {
namespace conv_patches {

constexpr index_t kBlockBytes = 16384;  // per patch row and block of output rows

// Output columns [lo, hi) whose kernel column kw reads inside the image (the rest read padding zeros).
struct ColumnRange {
  index_t iw0, lo, hi;  // iw0: input column of output column 0
};

inline ColumnRange columns_inside(const ConvGeometry& geo, index_t W, index_t kw) {
  const index_t iw0 = kw * geo.dil_w - geo.pad_left;
  const index_t lo = std::min(geo.OW, first_at_least(iw0, geo.stride_w, 0));
  const index_t hi = std::max(lo, std::min(geo.OW, first_at_least(iw0, geo.stride_w, W)));
  return {iw0, lo, hi};
}

#if defined(__GNUC__) && !defined(__clang__)
// GCC turns these short copies into memmove/memset calls (loop distribution), which cost more than the copies.
#define SF_NO_LIBCALLS __attribute__((optimize("no-tree-loop-distribute-patterns")))
#else
#define SF_NO_LIBCALLS
#endif

// d[0, OW) = input row s (column stride sw) as kernel column kw reads it for the OW output columns, zeros outside.
SF_NO_LIBCALLS inline void output_row(const float* s, index_t sw, index_t stride_w, const ColumnRange& cr,
                                      index_t OW, float* __restrict d) {
  for (index_t ow = 0; ow < cr.lo; ++ow) d[ow] = 0.0f;
  index_t ow = cr.lo;
  if (stride_w == 1 && sw == 1) {
    const float* src = s + cr.iw0;
    for (; ow + cpu::VL <= cr.hi; ow += cpu::VL) cpu::storeu(d + ow, cpu::loadu(src + ow));
    for (; ow < cr.hi; ++ow) d[ow] = src[ow];
  } else {
    for (; ow < cr.hi; ++ow) d[ow] = s[(cr.iw0 + ow * stride_w) * sw];
  }
  for (ow = cr.hi; ow < OW; ++ow) d[ow] = 0.0f;
}

// Row stride 1: z[kw · rows_z · OW + j · OW + ow] = the value kernel column kw reads for output column ow from
// padded input row j (input row j - pad_top; zero rows outside the image), j < rows_z. Patch row (kh, kw) over
// output rows [oh0, oh1) is then the contiguous run z_kw + (oh0 + kh·dil_h)·OW of (oh1 - oh0)·OW values.
SF_NO_LIBCALLS inline void gather_columns(const float* xc, index_t H, index_t W, index_t sh, index_t sw,
                                   const ConvGeometry& geo, index_t rows_z, float* __restrict z) {
  for (index_t kw = 0; kw < geo.KW; ++kw) {
    const ColumnRange cr = columns_inside(geo, W, kw);
    float* d = z + kw * rows_z * geo.OW;
    for (index_t j = 0; j < rows_z; ++j, d += geo.OW) {
      const index_t ih = j - geo.pad_top;
      if (ih < 0 || ih >= H) {
        for (index_t ow = 0; ow < geo.OW; ++ow) d[ow] = 0.0f;
      } else {
        output_row(xc + ih * sh, sw, geo.stride_w, cr, geo.OW, d);
      }
    }
  }
}

// Any row stride: rows[k · stride + (oh - oh0) · OW + ow] for k = kh·KW + kw over output rows [oh0, oh1).
SF_NO_LIBCALLS inline void patch_block(const float* xc, index_t H, index_t W, index_t sh, index_t sw,
                                const ConvGeometry& geo, index_t oh0, index_t oh1, index_t stride,
                                float* __restrict rows) {
  for (index_t kw = 0; kw < geo.KW; ++kw) {
    const ColumnRange cr = columns_inside(geo, W, kw);
    for (index_t kh = 0; kh < geo.KH; ++kh) {
      float* d = rows + (kh * geo.KW + kw) * stride;
      for (index_t oh = oh0; oh < oh1; ++oh, d += geo.OW) {
        const index_t ih = oh * geo.stride_h - geo.pad_top + kh * geo.dil_h;
        if (ih < 0 || ih >= H) {
          for (index_t ow = 0; ow < geo.OW; ++ow) d[ow] = 0.0f;
        } else {
          output_row(xc + ih * sh, sw, geo.stride_w, cr, geo.OW, d);
        }
      }
    }
  }
}

// acc[i·VL, (i + 1)·VL) += the lanes of Σ_v a[v]·b_i[v] over n values for the N rows b_i = b[i] against row a:
// lane sums in registers (vector types: GCC kept arrays of lanes on the stack), row a loaded once for the N
// products; the n % VL last products are added to lane 0.
template <int N>
inline void dots_into(const float* a, const float* const* b, index_t n, float* acc) {
  cpu::vf s[N];
  for (int i = 0; i < N; ++i) s[i] = cpu::vf{};
  index_t v = 0;
  for (; v + cpu::VL <= n; v += cpu::VL) {
    const cpu::vf av = cpu::loadu(a + v);
    for (int i = 0; i < N; ++i) s[i] += av * cpu::loadu(b[i] + v);
  }
  for (int i = 0; i < N; ++i) {
    float tail = 0.0f;
    for (index_t t = v; t < n; ++t) tail += a[t] * b[i][t];
    cpu::storeu(acc + i * cpu::VL, cpu::loadu(acc + i * cpu::VL) + s[i]);
    acc[i * cpu::VL] += tail;
  }
}

// acc[0, VL) += the lanes of Σ_v a[v] over n values (the bias row's products with row a).
inline void sum_into(const float* a, index_t n, float* acc) {
  cpu::vf s = cpu::vf{};
  index_t v = 0;
  for (; v + cpu::VL <= n; v += cpu::VL) s += cpu::loadu(a + v);
  float tail = 0.0f;
  for (; v < n; ++v) tail += a[v];
  cpu::storeu(acc, cpu::loadu(acc) + s);
  acc[0] += tail;
}

// row[k] (k < KH·KW): channel xc's patch rows over output rows [oh0, oh1), (oh1 - oh0)·OW values each: slices of its
// gathered columns z when `gathered` (row stride 1; `gather_columns` filled z for this channel), else copied into z
// by `patch_block`.
inline void block_patch_rows(bool gathered, const float* xc, index_t H, index_t W, index_t sh, index_t sw,
                             const ConvGeometry& geo, index_t rows_z, index_t oh0, index_t oh1, float* z,
                             const float** row) {
  const index_t K = geo.KH * geo.KW, n = (oh1 - oh0) * geo.OW;
  if (gathered) {
    for (index_t k = 0; k < K; ++k)
      row[k] = z + (k % geo.KW) * rows_z * geo.OW + (oh0 + (k / geo.KW) * geo.dil_h) * geo.OW;
  } else {
    patch_block(xc, H, W, sh, sw, geo, oh0, oh1, n, z);
    for (index_t k = 0; k < K; ++k) row[k] = z + k * n;
  }
}

// Whole output rows per block: kBlockBytes of values per patch row (at least one row).
inline index_t block_rows(const ConvGeometry& geo) {
  const index_t ow = std::max<index_t>(geo.OW, 1);
  return std::max<index_t>(1, std::min(geo.OH, kBlockBytes / static_cast<index_t>(sizeof(float)) / ow));
}

}  // namespace conv_patches
}  // namespace sf
