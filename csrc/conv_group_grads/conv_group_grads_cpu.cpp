// conv_group_grads on CPU (see conv_group_grads.h). A task owns one (image, channel): its patch rows over a block of
// output rows (all of them when the row stride is 1: slices of the channel's gathered columns) against the same
// block of each of its M output-gradient planes, by `dots_into` (the plane's values loaded once for up to four patch
// rows), lane sums in registers, one horizontal sum per output at the end.
#include "conv_group_grads/conv_group_grads.h"

#include <algorithm>
#include <vector>

#include "source_fast/cpu_conv_patches.h"
#include "source_fast/cpu_microkernel.h"

namespace sf {

Status conv_group_grads_cpu(const float* x, index_t B, index_t C, index_t H, index_t W, index_t sb, index_t sc,
                            index_t sh, index_t sw, const float* gy, index_t M, index_t gsb, index_t gsc,
                            const ConvGeometry& geo, bool bias, float* out, int num_threads) {
  using conv_patches::dots_into;
  const index_t KH = geo.KH, KW = geo.KW;
  SF_RETURN_IF_ERROR(check_conv_input(geo, B, C, H, W, sb, sc, sh, sw));
  SF_CHECK_ARG(M >= 1, "M (outputs per channel): expected >= 1, got ", M);
  const index_t plane = geo.OH * geo.OW;
  SF_RETURN_IF_ERROR(check_strided("gy", {B, C * M, plane}, {gsb, gsc, 1}));
  index_t K = 0, total = 0;
  SF_RETURN_IF_ERROR(checked_numel("KH*KW", {KH, KW}, &K));
  const index_t D = K + (bias ? 1 : 0);
  SF_RETURN_IF_ERROR(checked_numel("out", {B, C, M, D}, &total));
  SF_RETURN_IF_ERROR(check_ptr("x", x, B * C * H * W));
  SF_RETURN_IF_ERROR(check_ptr("gy", gy, B * C * M * plane));
  SF_RETURN_IF_ERROR(check_ptr("out", out, total));
  if (total == 0) return Status();
  if (plane == 0) {
    std::fill(out, out + total, 0.0f);
    return Status();
  }

  constexpr index_t kLanes = cpu::VL;
  const bool gathered = geo.stride_h == 1;  // patch rows are slices of the gathered columns: one block
  const index_t rows_z = geo.OH + (KH - 1) * geo.dil_h;
  const index_t block_rows = gathered ? geo.OH : conv_patches::block_rows(geo);
  const index_t scratch = gathered ? KW * rows_z * geo.OW : K * block_rows * geo.OW;
  const index_t n_tasks = B * C, lanes = M * D * kLanes;
  const double work = static_cast<double>(B) * C * M * plane * static_cast<double>(D);
  const int nt = cpu::threads_for(work, 1.0e6, num_threads);
  std::vector<float> scratch_all, lanes_all;
  std::vector<const float*> row_all;
  try {
    scratch_all.assign(static_cast<size_t>(nt * scratch), 0.0f);
    lanes_all.assign(static_cast<size_t>(nt * lanes), 0.0f);
    row_all.assign(static_cast<size_t>(nt * K), nullptr);
  } catch (const std::bad_alloc&) {
    return Status(Code::kUnsupported, "conv_group_grads_cpu: out of memory");
  }
#pragma omp parallel for num_threads(nt) schedule(static)
  for (index_t task = 0; task < n_tasks; ++task) {
    const index_t b = task / C, c = task % C;
    const index_t thread = cpu::thread_index();
    float* z = scratch_all.data() + thread * scratch;
    float* acc = lanes_all.data() + thread * lanes;  // [M][D][lanes]
    const float** row = row_all.data() + thread * K;
    std::fill(acc, acc + lanes, 0.0f);
    const float* xc = x + b * sb + c * sc;
    if (gathered) conv_patches::gather_columns(xc, H, W, sh, sw, geo, rows_z, z);
    for (index_t oh0 = 0; oh0 < geo.OH; oh0 += block_rows) {
      const index_t oh1 = std::min(geo.OH, oh0 + block_rows), n = (oh1 - oh0) * geo.OW;
      conv_patches::block_patch_rows(gathered, xc, H, W, sh, sw, geo, rows_z, oh0, oh1, z, row);
      for (index_t j = 0; j < M; ++j) {
        const float* g = gy + b * gsb + (c * M + j) * gsc + oh0 * geo.OW;
        float* a = acc + j * D * kLanes;
        index_t k = 0;
        for (; k + 4 <= K; k += 4) dots_into<4>(g, row + k, n, a + k * kLanes);
        switch (K - k) {
          case 3: dots_into<3>(g, row + k, n, a + k * kLanes); break;
          case 2: dots_into<2>(g, row + k, n, a + k * kLanes); break;
          case 1: dots_into<1>(g, row + k, n, a + k * kLanes); break;
          default: break;
        }
        if (bias) conv_patches::sum_into(g, n, a + K * kLanes);
      }
    }
    float* o = out + task * M * D;  // out[b, c] is task b·C + c
    for (index_t s = 0; s < M * D; ++s) {
      float lane_total = 0.0f;
      for (index_t l = 0; l < kLanes; ++l) lane_total += acc[s * kLanes + l];
      o[s] = lane_total;
    }
  }
  return Status();
}

}  // namespace sf
