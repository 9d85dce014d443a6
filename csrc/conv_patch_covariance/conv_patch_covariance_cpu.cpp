// conv_patch_covariance on CPU (see conv_patch_covariance.h). A task owns one channel and a fixed run of images.
// Patch row k = (kh, kw) over a block of output positions (whole output rows, ≈ 16 KiB of values per row k) is a
// contiguous run of floats: with a row stride of 1, a slice of the image's columns gathered for kernel column kw
// (`gather_columns`: KW arrays of the image's rows, zero rows and columns for the padding), else copied per block
// (`patch_block`). Every dot product of two patch rows (l <= k, four at a time against one row k) and every row's
// sum (the bias row) runs in float32 vector lanes held in registers, added to the task's lane sums; the lanes are
// summed in float64 once per task. 128 images × 32 channels at 32×32, 2 threads, Zen 4: the torch path 300 ms; a
// first version, adding each output row's products to lane sums in memory, 63 ms; K patch rows copied per block
// and dot products in registers 10.5–12 ms (half of it the copies); the gathered columns ≈ 5 ms.
#include "conv_patch_covariance/conv_patch_covariance.h"

#include <algorithm>
#include <vector>

#include "source_fast/cpu_conv_patches.h"
#include "source_fast/cpu_microkernel.h"

namespace sf {
namespace {

using conv_patches::dots_into;
using conv_patches::gather_columns;
using conv_patches::sum_into;

constexpr index_t kLanes = cpu::VL;     // lane sums per product: one vector
constexpr index_t kImagesPerTask = 4;   // fixed: the task sums, and so the result, do not depend on threads

// The products of one block's K patch rows `row[k]` (n values each) into the task's lane sums.
void block_products(const float* const* row, index_t K, index_t n, float* acc) {
  const index_t pairs = K * (K + 1) / 2;
  for (index_t k = 0; k < K; ++k) {
    float* a = acc + k * (k + 1) / 2 * kLanes;  // pairs (k, 0..k) are consecutive
    index_t l = 0;
    for (; l + 4 <= k + 1; l += 4, a += 4 * kLanes) dots_into<4>(row[k], row + l, n, a);
    switch (k + 1 - l) {
      case 3: dots_into<3>(row[k], row + l, n, a); break;
      case 2: dots_into<2>(row[k], row + l, n, a); break;
      case 1: dots_into<1>(row[k], row + l, n, a); break;
      default: break;
    }
  }
  for (index_t k = 0; k < K; ++k) sum_into(row[k], n, acc + (pairs + k) * kLanes);
}

}  // namespace

Status conv_patch_covariance_cpu(const float* x, index_t B, index_t C, index_t H, index_t W, index_t sb,
                                 index_t sc, index_t sh, index_t sw, const ConvGeometry& geo, bool bias, float* out,
                                 int num_threads) {
  const index_t KH = geo.KH, KW = geo.KW;
  SF_RETURN_IF_ERROR(check_conv_input(geo, B, C, H, W, sb, sc, sh, sw));
  index_t K = 0, total = 0;
  SF_RETURN_IF_ERROR(checked_numel("KH*KW", {KH, KW}, &K));
  const index_t D = K + (bias ? 1 : 0);
  SF_RETURN_IF_ERROR(checked_numel("out", {C, D, D}, &total));
  SF_RETURN_IF_ERROR(check_ptr("x", x, B * C * H * W));
  SF_RETURN_IF_ERROR(check_ptr("out", out, total));
  if (total == 0) return Status();

  const index_t pairs = K * (K + 1) / 2, sums = pairs + K;  // the products l <= k, then the bias row
  const index_t image_tasks = ceil_div(B, kImagesPerTask), n_tasks = C * image_tasks;
  const index_t OW = std::max<index_t>(geo.OW, 1);
  const index_t block_rows = conv_patches::block_rows(geo);
  const bool gathered = geo.stride_h == 1;  // patch rows are slices of the gathered columns
  const index_t rows_z = geo.OH + (KH - 1) * geo.dil_h;  // padded input rows the output rows read
  const index_t scratch = gathered ? KW * rows_z * OW : K * block_rows * OW;
  const double work = static_cast<double>(B) * C * geo.OH * geo.OW * static_cast<double>(sums);
  const int nt = cpu::threads_for(work, 1.0e6, num_threads);
  std::vector<double> partial;
  std::vector<float> scratch_all, lanes_all;  // per thread: the patch values; the task's lane sums
  std::vector<const float*> row_all;           // per thread: the K patch rows of a block
  try {
    partial.assign(static_cast<size_t>(n_tasks * sums), 0.0);
    scratch_all.assign(static_cast<size_t>(nt * scratch), 0.0f);
    lanes_all.assign(static_cast<size_t>(nt * sums * kLanes), 0.0f);
    row_all.assign(static_cast<size_t>(nt * K), nullptr);
  } catch (const std::bad_alloc&) {
    return Status(Code::kUnsupported, "conv_patch_covariance_cpu: out of memory");
  }
#pragma omp parallel for num_threads(nt) schedule(static)
  for (index_t task = 0; task < n_tasks; ++task) {
    const index_t c = task / image_tasks, b0 = (task % image_tasks) * kImagesPerTask;
    const index_t b1 = std::min(B, b0 + kImagesPerTask);
    const index_t thread = cpu::thread_index();
    float* z = scratch_all.data() + thread * scratch;
    float* acc = lanes_all.data() + thread * sums * kLanes;
    const float** row = row_all.data() + thread * K;
    std::fill(acc, acc + sums * kLanes, 0.0f);
    for (index_t b = b0; b < b1; ++b) {
      const float* xc = x + b * sb + c * sc;
      if (gathered) gather_columns(xc, H, W, sh, sw, geo, rows_z, z);
      for (index_t oh0 = 0; oh0 < geo.OH; oh0 += block_rows) {
        const index_t oh1 = std::min(geo.OH, oh0 + block_rows), n = (oh1 - oh0) * geo.OW;
        conv_patches::block_patch_rows(gathered, xc, H, W, sh, sw, geo, rows_z, oh0, oh1, z, row);
        block_products(row, K, n, acc);
      }
    }
    double* p = partial.data() + task * sums;
    for (index_t s = 0; s < sums; ++s) {
      double lane_total = 0.0;
      for (index_t j = 0; j < kLanes; ++j) lane_total += acc[s * kLanes + j];
      p[s] = lane_total;
    }
  }

  const double count = static_cast<double>(B) * geo.OH * geo.OW;
  for (index_t c = 0; c < C; ++c) {
    std::vector<double> sum(static_cast<size_t>(sums), 0.0);
    for (index_t t = 0; t < image_tasks; ++t) {  // fixed order
      const double* p = partial.data() + (c * image_tasks + t) * sums;
      for (index_t s = 0; s < sums; ++s) sum[s] += p[s];
    }
    float* o = out + c * D * D;
    index_t s = 0;
    for (index_t k = 0; k < K; ++k) {
      for (index_t l = 0; l <= k; ++l, ++s) o[k * D + l] = o[l * D + k] = static_cast<float>(sum[s]);
    }
    if (bias) {
      for (index_t k = 0; k < K; ++k, ++s) o[K * D + k] = o[k * D + K] = static_cast<float>(sum[s]);
      o[K * D + K] = static_cast<float>(count);
    }
  }
  return Status();
}

}  // namespace sf
