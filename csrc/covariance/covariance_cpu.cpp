// covariance on CPU: a blocked SYRK that computes only the upper triangle (half of a GEMM's flops),
// accumulates in fp32 registers and mirrors at the end. Bitwise deterministic: every output element
// is summed over rows in the same order whatever the thread count.
#include "covariance/covariance.h"

#include <algorithm>
#include <vector>

#include "source_fast/cpu_microkernel.h"

namespace sf {
namespace {

constexpr index_t KC = 256;  // rows per packed chunk: one B panel (KC x NR) stays in L1

}  // namespace

Status covariance_cpu(const float* x, index_t R, index_t D, index_t sxr, index_t sxc, const float* mask,
                      index_t smask, float* out, index_t ldo, bool accumulate, int num_threads) {
  using namespace cpu;
  SF_CHECK_ARG(R >= 0 && D >= 0, "x: expected sizes >= 0, got [", R, ", ", D, "]");
  SF_RETURN_IF_ERROR(check_strided("x", {R, D}, {sxr, sxc}));
  SF_CHECK_ARG(ldo >= D, "out: expected leading dimension >= ", D, ", got ", ldo);
  SF_RETURN_IF_ERROR(check_strided("mask", {R}, {smask}));
  SF_RETURN_IF_ERROR(check_ptr("x", x, R * D));
  SF_RETURN_IF_ERROR(check_ptr("out", out, D * D));
  if (D == 0) return Status();

  const index_t n_row_tiles = ceil_div(D, MR);
  const index_t n_panels = ceil_div(D, NR);
  // Tiles touching the upper triangle (col end > row start), panel-major so a B panel is reused.
  std::vector<std::pair<index_t, index_t>> tiles;
  for (index_t p = 0; p < n_panels; ++p)
    for (index_t it = 0; it < n_row_tiles; ++it)
      if (p * NR + NR > it * MR) tiles.emplace_back(it, p);
  const index_t n_tiles = static_cast<index_t>(tiles.size());

  const index_t kc_max = std::min<index_t>(KC, std::max<index_t>(R, 1));
  AlignedBuffer apack(static_cast<std::size_t>(n_row_tiles * MR * kc_max));
  AlignedBuffer bpack(static_cast<std::size_t>(n_panels * NR * kc_max));
  if (!apack.data() || !bpack.data()) return Status(Code::kUnsupported, "covariance_cpu: out of memory for packing");
  float* Ap = apack.data();
  float* Bp = bpack.data();

  const int nt = threads_for(static_cast<double>(R) * D * D, 2.0e6, num_threads);
#pragma omp parallel num_threads(nt)
  {
    // Prologue: symmetrise (accumulate) or clear the upper triangle, which is accumulated into.
#pragma omp for schedule(static)
    for (index_t i = 0; i < D; ++i) {
      float* row = out + i * ldo;
      if (accumulate) {
        for (index_t j = i; j < D; ++j) row[j] = (row[j] + out[j * ldo + i]) * 0.5f;
      } else {
        for (index_t j = i; j < D; ++j) row[j] = 0.0f;
      }
    }
    for (index_t r0 = 0; r0 < R; r0 += KC) {
      const index_t kc = std::min(KC, R - r0);
      // Pack B (masked rows) panel-major [panel][k][NR] and A [tile][k][MR], zero padded.
#pragma omp for schedule(static)
      for (index_t p = 0; p < n_panels; ++p) {
        float* dst = Bp + p * NR * kc;
        const index_t j0 = p * NR, jn = std::min<index_t>(NR, D - j0);
        for (index_t k = 0; k < kc; ++k) {
          const float* src = x + (r0 + k) * sxr + j0 * sxc;
          const float m = mask ? mask[(r0 + k) * smask] : 1.0f;
          float* d = dst + k * NR;
          index_t j = 0;
          if (sxc == 1)
            for (; j < jn; ++j) d[j] = m * src[j];
          else
            for (; j < jn; ++j) d[j] = m * src[j * sxc];
          for (; j < NR; ++j) d[j] = 0.0f;
        }
      }
#pragma omp for schedule(static)
      for (index_t it = 0; it < n_row_tiles; ++it) {
        float* dst = Ap + it * MR * kc;
        const index_t i0 = it * MR, in = std::min<index_t>(MR, D - i0);
        pack_a_panel(x + r0 * sxr + i0 * sxc, sxc, sxr, in, kc, dst);
      }
#pragma omp for schedule(static)
      for (index_t t = 0; t < n_tiles; ++t) {
        const index_t it = tiles[t].first, p = tiles[t].second;
        if (D - p * NR <= VL) {  // a last panel of at most VL columns (narrow_tile; D = 513: 1 column)
          const index_t i0 = it * MR, j0 = p * NR;
          alignas(64) float tile[MR * VL] = {};
          narrow_tile(kc, Ap + it * MR * kc, Bp + p * NR * kc, NR, D - j0, tile);
          for (index_t m = 0; m < MR && i0 + m < D; ++m)
            for (index_t j = std::max(i0 + m, j0); j < D; ++j) out[(i0 + m) * ldo + j] += tile[m * VL + j - j0];
          continue;
        }
        vf acc[MR][NV];
        zero_tile(acc);
        gemm_tile<MR>(kc, Ap + it * MR * kc, Bp + p * NR * kc, acc);
        const index_t i0 = it * MR, j0 = p * NR;
        for (int m = 0; m < MR; ++m) {
          const index_t i = i0 + m;
          if (i >= D) break;
          float* row = out + i * ldo;
          if (j0 >= i && j0 + NR <= D) {
            for (int v = 0; v < NV; ++v) storeu(row + j0 + v * VL, loadu(row + j0 + v * VL) + acc[m][v]);
          } else {
            float vals[NR];
            std::memcpy(vals, acc[m], sizeof(vals));
            for (index_t j = std::max(i, j0); j < std::min(D, j0 + NR); ++j) row[j] += vals[j - j0];
          }
        }
      }
    }
    // Mirror the upper triangle into the lower one.
#pragma omp for schedule(static)
    for (index_t i = 0; i < D; ++i)
      for (index_t j = 0; j < i; ++j) out[i * ldo + j] = out[j * ldo + i];
  }
  return Status();
}

}  // namespace sf
