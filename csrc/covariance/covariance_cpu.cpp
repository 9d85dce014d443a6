// covariance on CPU: a blocked SYRK that computes only the upper triangle (half of a GEMM's flops),
// accumulates in fp32 registers and mirrors at the end. Bitwise deterministic: every output element
// is summed over rows in the same order whatever the thread count (chunks of KC rows in order; for a
// narrow factor over many rows, groups of chunks summed apart and then in group order).
#include "covariance/covariance.h"

#include <algorithm>
#include <cstring>
#include <vector>

#include "source_fast/cpu_microkernel.h"

namespace sf {
namespace {

using namespace cpu;
constexpr index_t KC = 256;  // rows per packed chunk: one B panel (KC x NR) stays in L1
// Narrow factors (D up to a few hundred: a conv layer's patches, a small MLP) over many rows have too few
// tiles per chunk to share among threads, and a barrier per chunk costs more than the chunk's work (D = 16
// ran 2.8x slower that way). They are summed in groups of whole chunks instead, a group per task into its own
// partial, then the partials in group order. The group size depends on R only (about R / 16, 4 to 32
// chunks), so the bits are the same at any thread count.
constexpr index_t GROUPS_TARGET = 16, GROUP_CHUNKS_MIN = 4, GROUP_CHUNKS_MAX = 32;
constexpr index_t GROUPED_MAX_D = 256;
constexpr index_t WAVE_GROUPS = 64;  // partials in memory at once: <= 64 · 256² floats (16 MiB)

struct Plan {
  index_t n_row_tiles, n_panels;
  std::vector<std::pair<index_t, index_t>> tiles;  // (row tile, panel) touching the upper triangle
  explicit Plan(index_t d) : n_row_tiles(ceil_div(d, MR)), n_panels(ceil_div(d, NR)) {
    for (index_t p = 0; p < n_panels; ++p)  // panel-major, so a B panel is reused
      for (index_t it = 0; it < n_row_tiles; ++it)
        if (p * NR + NR > it * MR) tiles.emplace_back(it, p);
  }
};

// Pack rows [r0, r0 + kc): B panel p (masked rows) as [k][NR], zero padded.
static void pack_b(const float* x, index_t sxr, index_t sxc, const float* mask, index_t smask, index_t r0,
                   index_t kc, index_t D, index_t p, float* Bp) {
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

static void pack_a(const float* x, index_t sxr, index_t sxc, index_t r0, index_t kc, index_t D, index_t it, float* Ap) {
  const index_t i0 = it * MR, in = std::min<index_t>(MR, D - i0);
  pack_a_panel(x + r0 * sxr + i0 * sxc, sxc, sxr, in, kc, Ap + it * MR * kc);
}

// out's upper-triangle part of tile (it, p) += the packed chunk's product (kc rows).
static void add_tile(index_t it, index_t p, index_t kc, const float* Ap, const float* Bp, index_t D, float* out,
                     index_t ldo) {
  const index_t i0 = it * MR, j0 = p * NR;
  if (D - j0 <= VL) {  // a last panel of at most VL columns (narrow_tile; D = 513: 1 column)
    alignas(64) float tile[MR * VL] = {};
    narrow_tile(kc, Ap + it * MR * kc, Bp + p * NR * kc, NR, D - j0, tile);
    for (index_t m = 0; m < MR && i0 + m < D; ++m)
      for (index_t j = std::max(i0 + m, j0); j < D; ++j) out[(i0 + m) * ldo + j] += tile[m * VL + j - j0];
    return;
  }
  vf acc[MR][NV];
  zero_tile(acc);
  gemm_tile<MR>(kc, Ap + it * MR * kc, Bp + p * NR * kc, acc);
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

}  // namespace

Status covariance_cpu(const float* x, index_t R, index_t D, index_t sxr, index_t sxc, const float* mask,
                      index_t smask, float* out, index_t ldo, bool accumulate, int num_threads) {
  SF_CHECK_ARG(R >= 0 && D >= 0, "x: expected sizes >= 0, got [", R, ", ", D, "]");
  SF_RETURN_IF_ERROR(check_strided("x", {R, D}, {sxr, sxc}));
  SF_CHECK_ARG(ldo >= D, "out: expected leading dimension >= ", D, ", got ", ldo);
  SF_RETURN_IF_ERROR(check_strided("mask", {R}, {smask}));
  SF_RETURN_IF_ERROR(check_ptr("x", x, R * D));
  SF_RETURN_IF_ERROR(check_ptr("out", out, D * D));
  if (D == 0) return Status();

  const Plan plan(D);
  const index_t n_tiles = static_cast<index_t>(plan.tiles.size());
  const index_t group_chunks = std::clamp<index_t>(ceil_div(R, GROUPS_TARGET * KC), GROUP_CHUNKS_MIN, GROUP_CHUNKS_MAX);
  const index_t group_rows = group_chunks * KC, n_groups = ceil_div(R, group_rows);
  const bool grouped = D <= GROUPED_MAX_D && n_groups >= 2;
  const index_t kc_max = std::min<index_t>(KC, std::max<index_t>(R, 1));
  const int nt = threads_for(static_cast<double>(R) * D * D, 2.0e6, num_threads);
  // Shared packs (tile-parallel path), or one wave's group partials [WAVE_GROUPS][D][D] (upper triangles).
  AlignedBuffer apack(grouped ? 0 : static_cast<std::size_t>(plan.n_row_tiles * MR * kc_max));
  AlignedBuffer bpack(grouped ? 0 : static_cast<std::size_t>(plan.n_panels * NR * kc_max));
  AlignedBuffer partials(grouped ? static_cast<std::size_t>(std::min(n_groups, WAVE_GROUPS) * D * D) : 0);
  if (grouped ? !partials.data() : (!apack.data() || !bpack.data()))
    return Status(Code::kUnsupported, "covariance_cpu: out of memory for packing");
  int alloc_failed = 0;

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
    if (grouped) {
      AlignedBuffer a_local(static_cast<std::size_t>(plan.n_row_tiles * MR * KC));
      AlignedBuffer b_local(static_cast<std::size_t>(plan.n_panels * NR * KC));
      if (!a_local.data() || !b_local.data()) {
#pragma omp atomic write
        alloc_failed = 1;
      }
      // Waves of at most WAVE_GROUPS partials bound the memory; the partials still reach out in group order.
      for (index_t g0 = 0; g0 < n_groups; g0 += WAVE_GROUPS) {
        const index_t g1 = std::min(n_groups, g0 + WAVE_GROUPS);
#pragma omp for schedule(dynamic, 1)
        for (index_t g = g0; g < g1; ++g) {
          float* part = partials.data() + (g - g0) * D * D;
          std::fill(part, part + D * D, 0.0f);
          if (!a_local.data() || !b_local.data()) continue;
          const index_t r_end = std::min(R, (g + 1) * group_rows);
          for (index_t r0 = g * group_rows; r0 < r_end; r0 += KC) {
            const index_t kc = std::min(KC, r_end - r0);
            for (index_t p = 0; p < plan.n_panels; ++p) pack_b(x, sxr, sxc, mask, smask, r0, kc, D, p, b_local.data());
            for (index_t it = 0; it < plan.n_row_tiles; ++it) pack_a(x, sxr, sxc, r0, kc, D, it, a_local.data());
            for (const auto& [it, p] : plan.tiles) add_tile(it, p, kc, a_local.data(), b_local.data(), D, part, D);
          }
        }
        // implicit barrier: the wave's partials are complete; add them in group order
#pragma omp for schedule(static)
        for (index_t i = 0; i < D; ++i)
          for (index_t g = g0; g < g1; ++g) {
            const float* src = partials.data() + (g - g0) * D * D + i * D;
            float* row = out + i * ldo;
            for (index_t j = i; j < D; ++j) row[j] += src[j];
          }
      }
    } else {
      float *Ap = apack.data(), *Bp = bpack.data();
      for (index_t r0 = 0; r0 < R; r0 += KC) {
        const index_t kc = std::min(KC, R - r0);
#pragma omp for schedule(static)
        for (index_t p = 0; p < plan.n_panels; ++p) pack_b(x, sxr, sxc, mask, smask, r0, kc, D, p, Bp);
#pragma omp for schedule(static)
        for (index_t it = 0; it < plan.n_row_tiles; ++it) pack_a(x, sxr, sxc, r0, kc, D, it, Ap);
#pragma omp for schedule(static)
        for (index_t t = 0; t < n_tiles; ++t) add_tile(plan.tiles[t].first, plan.tiles[t].second, kc, Ap, Bp, D, out, ldo);
      }
    }
    // Mirror the upper triangle into the lower one.
#pragma omp for schedule(static)
    for (index_t i = 0; i < D; ++i)
      for (index_t j = 0; j < i; ++j) out[i * ldo + j] = out[j * ldo + i];
  }
  if (alloc_failed) return Status(Code::kUnsupported, "covariance_cpu: out of memory for packing");
  return Status();
}

}  // namespace sf
