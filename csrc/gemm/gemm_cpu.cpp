// gemm on CPU: packed B blocks of KC x NC, MR-row tiles of A packed per task, the MR x NR micro-kernel of
// cpu_microkernel.h, C tiles accumulated across K blocks in order (so the result does not depend on the
// thread count). Two schedules:
//   * many independent entries (batch >= threads, B not shared): each thread runs whole single-threaded
//     products on its own entries (private buffers, no barriers);
//   * otherwise: every B block is packed once by all threads (a shared B is packed once for the whole
//     batch) and the tasks are (batch entry, MR-row tile).
#include "gemm/gemm.h"

#include <algorithm>

#include "source_fast/cpu_microkernel.h"

namespace sf {
namespace {

using namespace cpu;
constexpr index_t KC = 384;        // depth of one packed block (an A tile of KC x MR stays in L1)
constexpr index_t NC_PANELS = 16;  // NR-column panels per B block (KC x 16·NR floats stay in L2)
constexpr index_t NC = NC_PANELS * NR;

struct Operand {
  const float* p;
  index_t s0, s1;  // element strides of the two matrix dimensions
};

// Panel p of the B block (rows k0..k0+kc, columns n0..): [kc][NR], zero beyond N.
inline void pack_b_panel(Operand B, index_t N, index_t k0, index_t kc, index_t n0, index_t p, float* Bp) {
  float* d = Bp + p * kc * NR;
  const index_t c0 = n0 + p * NR, cols = std::min<index_t>(NR, N - c0);
  for (index_t k = 0; k < kc; ++k) {
    const float* src = B.p + (k0 + k) * B.s0 + c0 * B.s1;
    float* row = d + k * NR;
    index_t j = 0;
    if (B.s1 == 1)
      for (; j < cols; ++j) row[j] = src[j];
    else
      for (; j < cols; ++j) row[j] = src[j * B.s1];
    for (; j < NR; ++j) row[j] = 0.0f;
  }
}

// Rows m0..m0+MR of C (+)= A[rows, k0:k0+kc] · B block (packed, `panels` panels from column n0).
inline void row_tile(Operand A, float* C, index_t scm, index_t scn, index_t M, index_t N, index_t k0, index_t kc,
                     index_t n0, index_t panels, index_t m0, const float* Bp, float* Ap) {
  const index_t rows = std::min<index_t>(MR, M - m0);
  pack_a_panel(A.p + m0 * A.s0 + k0 * A.s1, A.s0, A.s1, rows, kc, Ap);
  for (index_t p = 0; p < panels; ++p) {
    const index_t c0 = n0 + p * NR, cols = std::min<index_t>(NR, N - c0);
    float* cp = C + m0 * scm + c0 * scn;
    if (cols <= VL) {  // a last panel of at most VL columns: half the tile or less (narrow_tile)
      alignas(64) float tile[MR * VL] = {};
      if (k0 > 0)
        for (index_t m = 0; m < rows; ++m)
          for (index_t j = 0; j < cols; ++j) tile[m * VL + j] = cp[m * scm + j * scn];
      narrow_tile(kc, Ap, Bp + p * kc * NR, NR, cols, tile);
      for (index_t m = 0; m < rows; ++m)
        for (index_t j = 0; j < cols; ++j) cp[m * scm + j * scn] = tile[m * VL + j];
      continue;
    }
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
}

}  // namespace

Status gemm_batched_cpu(index_t batch, const float* A, index_t sab, index_t sam, index_t sak, const float* B,
                        index_t sbb, index_t sbk, index_t sbn, float* C, index_t scb, index_t scm, index_t scn,
                        index_t M, index_t N, index_t K, int num_threads) {
  if (batch < 0) return invalid_argument("batch: expected >= 0, got ", batch);
  SF_RETURN_IF_ERROR(check_strided("A", {M, K}, {sam, sak}));
  SF_RETURN_IF_ERROR(check_strided("B", {K, N}, {sbk, sbn}));
  SF_RETURN_IF_ERROR(check_strided("C", {M, N}, {scm, scn}));
  if (sab < 0 || sbb < 0 || scb < 0)
    return invalid_argument("batch strides: expected >= 0, got ", sab, ", ", sbb, ", ", scb);
  SF_RETURN_IF_ERROR(check_ptr("A", A, batch * M * K));
  SF_RETURN_IF_ERROR(check_ptr("B", B, batch * K * N));
  SF_RETURN_IF_ERROR(check_ptr("C", C, batch * M * N));
  if (batch == 0 || M == 0 || N == 0) return Status();
  // A short, wide product (a last, partial batch of token rows rotated by a 785 x 785 eigenbasis): computed
  // as Cᵀ = Bᵀ Aᵀ, so the wide operand gives the row tiles the threads split and the short one is packed as
  // the panel. Each element is the same sum in the same order (bitwise equal). In-process A/B on Zen 4,
  // 2 threads: 1.04-1.39x at 16-64 rows of 513-785 columns; even at 96-128 rows, worse at 192-256 rows and
  // below ~384 columns.
  if (batch == 1 && N >= 384 && 8 * M <= N)
    return gemm_batched_cpu(1, B, sbb, sbn, sbk, A, sab, sak, sam, C, scb, scn, scm, N, M, K, num_threads);

  const index_t m_tiles = ceil_div(M, MR);
  const index_t k_end = std::max<index_t>(K, 1);  // one (empty) block when K == 0: C is zero-filled
  // Depth blocks of equal size (785 = 262 + 262 + 261, not 384 + 384 + 17: a thin last block reloads and
  // stores every C tile for little work).
  const index_t kb = ceil_div(ceil_div(k_end, ceil_div(k_end, KC)), 4) * 4;
  // One thread below ~20 MFLOP: a parallel region with two barriers per block costs more than it saves.
  const int nt = threads_for(static_cast<double>(batch) * M * N * std::max<index_t>(K, 1), 1.0e7, num_threads);
  const bool shared_b = sbb == 0 || batch == 1;
  const bool per_entry = !shared_b && batch >= nt;
  const std::size_t b_block = static_cast<std::size_t>(std::min(K, KC) * NC + NR);  // kb <= KC
  AlignedBuffer shared_buf(per_entry ? 0 : b_block);
  if (!per_entry && !shared_buf.data()) return Status(Code::kUnsupported, "gemm_batched_cpu: out of memory");
  int alloc_failed = 0;

#pragma omp parallel num_threads(nt)
  {
    AlignedBuffer abuf(static_cast<std::size_t>(KC * MR));
    AlignedBuffer own_b(per_entry ? b_block : 0);
    float* Ap = abuf.data();
    float* Bp = per_entry ? own_b.data() : shared_buf.data();
    if (!Ap || !Bp) {
#pragma omp atomic write
      alloc_failed = 1;
    }
    if (per_entry) {
#pragma omp for schedule(static)
      for (index_t b = 0; b < batch; ++b) {
        if (!Ap || !Bp) continue;
        const Operand Ab{A + b * sab, sam, sak}, Bb{B + b * sbb, sbk, sbn};
        for (index_t n0 = 0; n0 < N; n0 += NC) {
          const index_t panels = ceil_div(std::min(NC, N - n0), NR);
          for (index_t k0 = 0; k0 < k_end; k0 += kb) {
            const index_t kc = std::min(kb, K - k0);
            for (index_t p = 0; p < panels; ++p) pack_b_panel(Bb, N, k0, kc, n0, p, Bp);
            for (index_t mt = 0; mt < m_tiles; ++mt)
              row_tile(Ab, C + b * scb, scm, scn, M, N, k0, kc, n0, panels, mt * MR, Bp, Ap);
          }
        }
      }
    } else {
      const index_t outer = shared_b ? 1 : batch, inner = shared_b ? batch : 1;
      for (index_t ob = 0; ob < outer; ++ob) {
        const Operand Bb{B + ob * sbb, sbk, sbn};
        for (index_t n0 = 0; n0 < N; n0 += NC) {
          const index_t panels = ceil_div(std::min(NC, N - n0), NR);
          for (index_t k0 = 0; k0 < k_end; k0 += kb) {
            const index_t kc = std::min(kb, K - k0);
#pragma omp for schedule(static)
            for (index_t p = 0; p < panels; ++p) pack_b_panel(Bb, N, k0, kc, n0, p, Bp);
            // implicit barrier: the block is packed
#pragma omp for schedule(static)
            for (index_t task = 0; task < inner * m_tiles; ++task) {
              if (!Ap) continue;
              const index_t b = shared_b ? task / m_tiles : ob;
              row_tile(Operand{A + b * sab, sam, sak}, C + b * scb, scm, scn, M, N, k0, kc, n0, panels,
                       (task % m_tiles) * MR, Bp, Ap);
            }
            // implicit barrier: Bp may be repacked
          }
        }
      }
    }
  }
  if (alloc_failed) return Status(Code::kUnsupported, "gemm_batched_cpu: out of memory for packing");
  return Status();
}

}  // namespace sf
