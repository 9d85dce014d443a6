// conv_patch_rows on CPU (see conv_patch_rows.h). A task owns one (image, output row oh) and writes its OW rows
// of patches in order, each row front to back (stores in sequence: filling the block one kernel row at a time
// instead, 12 bytes into each of OW rows per pass, ran ≈ 3× slower for 16 channels at 16×16). An output
// column whose kernel lies inside the image in width copies KW values per (c, kh) without bounds tests
// (unrolled for the usual widths); the edge columns test each position; kernel rows outside the image are zeros.
#include "conv_patch_rows/conv_patch_rows.h"

#include <algorithm>

#include "source_fast/cpu_microkernel.h"

namespace sf {
namespace {

struct RowGeometry {  // one output row of one image
  const float* x;      // the image's channel 0
  index_t C, H, W, sc, sh, sw, KH, KW, dil_h, dil_w;
  index_t ih0;         // input row of kernel row 0 (may be negative)
  index_t kh_lo, kh_hi;  // kernel rows inside the image
};

// The C·KH·KW patch of output column iw0 (input column of kernel column 0) into d, whose kernel columns all lie
// inside the image. KW_ > 0: the kernel width known at compile time.
template <int KW_>
inline void interior_patch(const RowGeometry& r, index_t iw0, float* __restrict d) {
  const index_t KW = KW_ > 0 ? KW_ : r.KW;
  const index_t step = r.dil_w * r.sw;
  for (index_t c = 0; c < r.C; ++c) {
    const float* xc = r.x + c * r.sc + iw0 * r.sw;
    for (index_t kh = 0; kh < r.KH; ++kh, d += KW) {
      if (kh < r.kh_lo || kh >= r.kh_hi) {
        for (index_t kw = 0; kw < KW; ++kw) d[kw] = 0.0f;
        continue;
      }
      const float* s = xc + (r.ih0 + kh * r.dil_h) * r.sh;
      if (step == 1) {
        for (index_t kw = 0; kw < KW; ++kw) d[kw] = s[kw];
      } else {
        for (index_t kw = 0; kw < KW; ++kw) d[kw] = s[kw * step];
      }
    }
  }
}

// The same for an output column whose kernel reaches past the image's left or right edge.
inline void edge_patch(const RowGeometry& r, index_t iw0, float* __restrict d) {
  for (index_t c = 0; c < r.C; ++c) {
    const float* xc = r.x + c * r.sc;
    for (index_t kh = 0; kh < r.KH; ++kh, d += r.KW) {
      const bool row_inside = kh >= r.kh_lo && kh < r.kh_hi;
      const float* s = xc + (r.ih0 + kh * r.dil_h) * r.sh;
      for (index_t kw = 0; kw < r.KW; ++kw) {
        const index_t iw = iw0 + kw * r.dil_w;
        d[kw] = row_inside && iw >= 0 && iw < r.W ? s[iw * r.sw] : 0.0f;
      }
    }
  }
}

}  // namespace

Status conv_patch_rows_cpu(const float* x, index_t B, index_t C, index_t H, index_t W, index_t sb, index_t sc,
                           index_t sh, index_t sw, const ConvGeometry& geo, bool bias, float* out,
                           int num_threads) {
  const index_t KH = geo.KH, KW = geo.KW;
  SF_RETURN_IF_ERROR(check_conv_input(geo, B, C, H, W, sb, sc, sh, sw));
  index_t ck = 0, rows = 0, total = 0;
  SF_RETURN_IF_ERROR(checked_numel("C*KH*KW", {C, KH, KW}, &ck));
  const index_t I = ck + (bias ? 1 : 0);
  SF_RETURN_IF_ERROR(checked_numel("out", {B, geo.OH, geo.OW}, &rows));
  SF_RETURN_IF_ERROR(checked_numel("out", {rows, I}, &total));
  SF_RETURN_IF_ERROR(check_ptr("x", x, B * C * H * W));
  SF_RETURN_IF_ERROR(check_ptr("out", out, total));
  if (total == 0) return Status();

  const index_t OH = geo.OH, OW = geo.OW, n_tasks = B * OH;
  const index_t stw = geo.stride_w, dw = geo.dil_w, pl = geo.pad_left;
  // Output columns whose kernel lies inside the image in width: iw0 >= 0 and iw0 + (KW - 1)·dw < W.
  const index_t ow_lo = std::min(OW, first_at_least(-pl, stw, 0));
  const index_t ow_hi = std::max(ow_lo, std::min(OW, first_at_least(-pl + (KW - 1) * dw, stw, W)));
  const int nt = cpu::threads_for(static_cast<double>(total), 1.0e5, num_threads);
#pragma omp parallel for num_threads(nt) schedule(static)
  for (index_t task = 0; task < n_tasks; ++task) {
    const index_t b = task / OH, oh = task % OH;
    RowGeometry r{x + b * sb, C, H, W, sc, sh, sw, KH, KW, geo.dil_h, dw, oh * geo.stride_h - geo.pad_top, 0, 0};
    r.kh_lo = std::min(KH, first_at_least(r.ih0, r.dil_h, 0));
    r.kh_hi = std::max(r.kh_lo, std::min(KH, first_at_least(r.ih0, r.dil_h, H)));
    float* row = out + task * OW * I;
    for (index_t ow = 0; ow < OW; ++ow, row += I) {
      const index_t iw0 = ow * stw - pl;
      if (ow < ow_lo || ow >= ow_hi) {
        edge_patch(r, iw0, row);
      } else {
        switch (KW) {
          case 1: interior_patch<1>(r, iw0, row); break;
          case 2: interior_patch<2>(r, iw0, row); break;
          case 3: interior_patch<3>(r, iw0, row); break;
          case 5: interior_patch<5>(r, iw0, row); break;
          default: interior_patch<0>(r, iw0, row); break;
        }
      }
      if (bias) row[ck] = 1.0f;
    }
  }
  return Status();
}

}  // namespace sf
