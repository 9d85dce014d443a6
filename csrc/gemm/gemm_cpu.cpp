// gemm on CPU: packed B blocks of KC x NC shared by all threads, MR-row tiles of A packed per task,
// the MR x NR micro-kernel of cpu_microkernel.h, C tiles accumulated across K blocks in order.
#include "gemm/gemm.h"

#include <algorithm>

#include "source_fast/cpu_microkernel.h"

namespace sf {
namespace {

using namespace cpu;
constexpr index_t KC = 384;          // depth of one packed block (an A tile of KC x MR stays in L1)
constexpr index_t NC_PANELS = 16;    // NR-column panels per B block (KC x 16·NR floats stay in L2)

}  // namespace

Status gemm_batched_cpu(index_t batch, const float* A, index_t sab, index_t sam, index_t sak, const float* B,
                        index_t sbb, index_t sbk, index_t sbn, float* C, index_t scb, index_t scm, index_t scn,
                        index_t M, index_t N, index_t K, int num_threads) {
  if (batch < 0) return invalid_argument("batch: expected >= 0, got ", batch);
  SF_RETURN_IF_ERROR(check_strided("A", {M, K}, {sam, sak}));
  SF_RETURN_IF_ERROR(check_strided("B", {K, N}, {sbk, sbn}));
  SF_RETURN_IF_ERROR(check_strided("C", {M, N}, {scm, scn}));
  if (sab < 0 || sbb < 0 || scb < 0) return invalid_argument("batch strides: expected >= 0, got ", sab, ", ", sbb, ", ", scb);
  SF_RETURN_IF_ERROR(check_ptr("A", A, batch * M * K));
  SF_RETURN_IF_ERROR(check_ptr("B", B, batch * K * N));
  SF_RETURN_IF_ERROR(check_ptr("C", C, batch * M * N));
  if (batch == 0 || M == 0 || N == 0) return Status();

  const index_t NC = NC_PANELS * NR;
  const index_t m_tiles = ceil_div(M, MR);
  const int nt = threads_for(static_cast<double>(batch) * M * N * std::max<index_t>(K, 1), 2.0e6, num_threads);
  AlignedBuffer bbuf(static_cast<std::size_t>(std::min(K, KC) * NC + NR));
  if (!bbuf.data()) return Status(Code::kUnsupported, "gemm_batched_cpu: out of memory for packing");
  float* Bp = bbuf.data();  // [panel][k][NR]
  int alloc_failed = 0;

  // A shared B (batch stride 0, e.g. a basis matrix) is packed once per block for every batch entry, and
  // the tasks of a block are (batch entry, MR-row tile); otherwise each entry packs its own B.
  const bool shared_b = sbb == 0 || batch == 1;
  const index_t outer = shared_b ? 1 : batch, inner = shared_b ? batch : 1;

#pragma omp parallel num_threads(nt)
  {
    AlignedBuffer abuf(static_cast<std::size_t>(KC * MR));
    float* Ap = abuf.data();  // [k][MR]
    if (!Ap) {
#pragma omp atomic write
      alloc_failed = 1;
    }
    for (index_t ob = 0; ob < outer; ++ob) {
      const float* Bb = B + ob * sbb;
      for (index_t n0 = 0; n0 < N; n0 += NC) {
        const index_t nc = std::min(NC, N - n0), panels = ceil_div(nc, NR);
        for (index_t k0 = 0; k0 < std::max<index_t>(K, 1); k0 += KC) {
          const index_t kc = std::min(KC, K - k0);  // 0 when K == 0: C is zero-filled below
#pragma omp for schedule(static)
          for (index_t p = 0; p < panels; ++p) {
            float* d = Bp + p * kc * NR;
            const index_t c0 = n0 + p * NR, cols = std::min<index_t>(NR, N - c0);
            for (index_t k = 0; k < kc; ++k) {
              const float* src = Bb + (k0 + k) * sbk + c0 * sbn;
              float* row = d + k * NR;
              index_t j = 0;
              if (sbn == 1)
                for (; j < cols; ++j) row[j] = src[j];
              else
                for (; j < cols; ++j) row[j] = src[j * sbn];
              for (; j < NR; ++j) row[j] = 0.0f;
            }
          }  // implicit barrier: the block is packed
#pragma omp for schedule(static)
          for (index_t task = 0; task < inner * m_tiles; ++task) {
            if (!Ap) continue;
            const index_t b = shared_b ? task / m_tiles : ob, mt = task % m_tiles;
            const float* Ab = A + b * sab;
            float* Cb = C + b * scb;
            const index_t m0 = mt * MR, rows = std::min<index_t>(MR, M - m0);
            for (index_t k = 0; k < kc; ++k) {
              float* d = Ap + k * MR;
              index_t m = 0;
              for (; m < rows; ++m) d[m] = Ab[(m0 + m) * sam + (k0 + k) * sak];
              for (; m < MR; ++m) d[m] = 0.0f;
            }
            for (index_t p = 0; p < panels; ++p) {
              const index_t c0 = n0 + p * NR, cols = std::min<index_t>(NR, N - c0);
              float* cp = Cb + m0 * scm + c0 * scn;
              vf acc[MR][NV];
              const bool full = rows == MR && cols == NR && scn == 1;
              if (k0 == 0) {
                zero_tile(acc);
              } else if (full) {
                for (int m = 0; m < MR; ++m)
                  for (int w = 0; w < NV; ++w) acc[m][w] = loadu(cp + m * scm + w * VL);
              } else {
                alignas(64) float tile[MR * NR] = {};
                for (index_t m = 0; m < rows; ++m)
                  for (index_t j = 0; j < cols; ++j) tile[m * NR + j] = cp[m * scm + j * scn];
                for (int m = 0; m < MR; ++m)
                  for (int w = 0; w < NV; ++w) acc[m][w] = loada(tile + m * NR + w * VL);
              }
              gemm_tile<MR>(kc, Ap, Bp + p * kc * NR, acc);
              if (full) {
                for (int m = 0; m < MR; ++m)
                  for (int w = 0; w < NV; ++w) storeu(cp + m * scm + w * VL, acc[m][w]);
              } else {
                alignas(64) float tile[MR * NR];
                for (int m = 0; m < MR; ++m)
                  for (int w = 0; w < NV; ++w) *reinterpret_cast<vf*>(tile + m * NR + w * VL) = acc[m][w];
                for (index_t m = 0; m < rows; ++m)
                  for (index_t j = 0; j < cols; ++j) cp[m * scm + j * scn] = tile[m * NR + j];
              }
            }
          }  // implicit barrier: Bp may be repacked
        }
      }
    }
  }
  if (alloc_failed) return Status(Code::kUnsupported, "gemm_batched_cpu: out of memory for packing");
  return Status();
}

}  // namespace sf
