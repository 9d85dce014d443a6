// rank_one_product on CPU (see rank_one_product.h): one GEMM per query with the rank-one factors folded
// into its operands, never forming w ⊙ g aᵀ in memory.
//
// A task owns MR rows of L (p) and 16 queries (one 64-byte line of the output per (p, i)). Per query it
// packs A_q[k][m] = L[p0 + m, k] · g[q, k] (g folded into the small operand: once per query, not once per
// product row), then for each 32-column panel of i runs the broadcast micro-kernel against w's rows (a copy
// padded to whole panels, shared by all tasks), scales the tile's columns by a[q, i] and parks it. When the
// 16 queries of a panel are done, their tiles are transposed in registers and written as whole lines: the
// queries-innermost layout comes out directly, with no transposing pass over the (hundreds of MB) result.
#include "rank_one_product/rank_one_product.h"

#include <algorithm>
#include <cstdint>
#include <memory>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "source_fast/cpu_microkernel.h"

namespace sf {
namespace {

using namespace cpu;
constexpr index_t QC = 16;  // queries per task
constexpr double STREAM_MIN_BYTES = 64.0 * (1 << 20);

// c[m][w] = Σ_k A[k][m] · B[k · ldb + w·VL + (0 .. VL)] for k < K (A packed [K][MR], B rows 64-byte aligned).
template <int W>
static inline __attribute__((always_inline)) void packed_a_tile(index_t K, const float* __restrict A,
                                                                  const float* __restrict B, index_t ldb,
                                                                  vf (&c)[MR][W]) {
  for (index_t k = 0; k < K; ++k) {
    const float* bk = B + k * ldb;
    vf b[W];
#pragma GCC unroll 2
    for (int w = 0; w < W; ++w) b[w] = loada(bk + w * VL);
#pragma GCC unroll 16
    for (int m = 0; m < MR; ++m) {
      const vf x = splat(A[k * MR + m]);
#pragma GCC unroll 2
      for (int w = 0; w < W; ++w) c[m][w] += x * b[w];
    }
  }
}

// One query's tile of one panel: tb[m][0 .. NR) = a[i0 ..] ⊙ Σ_k A[k][m] · Wp[k · ldw + i0 ..].
template <int W>
static inline void query_tile(index_t K, const float* A, const float* Wp, index_t ldw, const float* a_row,
                              float* tb) {
  vf acc[MR][W] = {};
  packed_a_tile<W>(K, A, Wp, ldw, acc);
  for (int w = 0; w < W; ++w) {
    const vf s = loada(a_row + w * VL);
    for (int m = 0; m < MR; ++m) *reinterpret_cast<vf*>(tb + m * NR + w * VL) = acc[m][w] * s;
  }
}

// The last panel when it holds at most VL columns (I = 32k + 1 with the bias column: one): through
// cpu::narrow_tile, which runs 256-bit FMAs for ≤ 8 columns (two per cycle on Zen 4 against one 512-bit).
static inline void narrow_query_tile(index_t K, const float* A, const float* Wp, index_t ldw, const float* a_row,
                                     index_t width, float* tb) {
  alignas(64) float t[MR * VL] = {};
  narrow_tile(K, A, Wp, ldw, width, t);
  const vf s = loada(a_row);
  for (int m = 0; m < MR; ++m) *reinterpret_cast<vf*>(tb + m * NR) = loada(t + m * VL) * s;
}

// Writes the parked tiles Tb[j][m][0 .. width) of queries q0 + j (j < nq; lanes nq <= j < `lanes` get
// zeros) to out rows p0 + m, columns i0 ..: one line of 16 queries per (p, i), transposed in registers
// and stored without reading the line first when `stream` (a result far larger than the caches).
static inline void write_tiles(const float* Tb, index_t rows, index_t width, index_t nq, index_t lanes, float* out,
                               index_t sop, index_t soi, bool stream) {
#if defined(__AVX512F__)
  if (lanes == QC) {
    for (index_t m = 0; m < rows; ++m)
      for (index_t h = 0; h * 16 < width; ++h) {
        __m512 r[16];
        for (index_t j = 0; j < 16; ++j)
          r[j] = j < nq ? _mm512_load_ps(Tb + (j * MR + m) * NR + h * 16) : _mm512_setzero_ps();
        transpose16x16(r);
        float* dst = out + m * sop + h * 16 * soi;
        const index_t cols = std::min<index_t>(16, width - h * 16);
        const bool aligned = (reinterpret_cast<std::uintptr_t>(dst) | static_cast<std::uintptr_t>(soi * 4)) % 64 == 0;
        if (stream && aligned)
          for (index_t e = 0; e < cols; ++e) _mm512_stream_ps(dst + e * soi, r[e]);
        else
          for (index_t e = 0; e < cols; ++e) _mm512_storeu_ps(dst + e * soi, r[e]);
      }
    return;
  }
#endif
  for (index_t m = 0; m < rows; ++m)
    for (index_t i = 0; i < width; ++i) {
      float* dst = out + m * sop + i * soi;
      const float* src = Tb + m * NR + i;
      index_t j = 0;
      for (; j < nq; ++j) dst[j] = src[j * MR * NR];
      for (; j < lanes; ++j) dst[j] = 0.0f;
    }
}

}  // namespace

Status rank_one_product_cpu(const float* L, index_t sLp, index_t sLo, const float* g, index_t sgq, index_t sgo,
                            const float* a, index_t saq, index_t sai, const float* w, index_t swo, index_t swi,
                            index_t P, index_t Q, index_t O, index_t I, float* out, index_t sop, index_t soi,
                            index_t qs, int num_threads) {
  SF_RETURN_IF_ERROR(check_strided("L", {P, O}, {sLp, sLo}));
  SF_RETURN_IF_ERROR(check_strided("g", {Q, O}, {sgq, sgo}));
  SF_RETURN_IF_ERROR(check_strided("a", {Q, I}, {saq, sai}));
  if (w) SF_RETURN_IF_ERROR(check_strided("w", {O, I}, {swo, swi}));
  SF_RETURN_IF_ERROR(check_strided("out", {P, I, qs}, {sop, soi, 1}));
  if (qs < Q) return invalid_argument("qs: expected >= Q = ", Q, ", got ", qs);
  if (I > 1 && soi < qs) return invalid_argument("soi: expected >= qs = ", qs, " (rows must not overlap), got ", soi);
  SF_RETURN_IF_ERROR(check_ptr("L", L, P * O));
  SF_RETURN_IF_ERROR(check_ptr("g", g, Q * O));
  SF_RETURN_IF_ERROR(check_ptr("a", a, Q * I));
  SF_RETURN_IF_ERROR(check_ptr("out", out, P * I * qs));
  if (P == 0 || I == 0 || qs == 0) return Status();

  const index_t Ip = ceil_div(I, NR) * NR;  // w and a rows padded to whole panels (aligned, zero beyond I)
  const index_t m_tiles = ceil_div(P, MR), chunks = ceil_div(qs, QC), n_tasks = m_tiles * chunks;
  AlignedBuffer w_buf(static_cast<std::size_t>(std::max<index_t>(O, 1) * Ip));
  AlignedBuffer a_buf(static_cast<std::size_t>(std::max<index_t>(Q, 1) * Ip));
  float *Wp = w_buf.data(), *Ap = a_buf.data();
  if (!Wp || !Ap) return Status(Code::kUnsupported, "rank_one_product_cpu: out of memory");
  const int nt = threads_for(static_cast<double>(P) * Q * O * I, 2.0e6, num_threads);
  // Lines written once and read much later (by the scoring kernel): past the last-level cache, streaming
  // them skips reading each line in before it is overwritten (half the memory traffic of the result).
  const bool stream = static_cast<double>(P) * I * qs * sizeof(float) > STREAM_MIN_BYTES;
  int alloc_failed = 0;

#pragma omp parallel num_threads(nt)
  {
#pragma omp for schedule(static) nowait
    for (index_t o = 0; o < O; ++o) {
      float* d = Wp + o * Ip;
      for (index_t i = 0; i < I; ++i) d[i] = w ? w[o * swo + i * swi] : 1.0f;
      for (index_t i = I; i < Ip; ++i) d[i] = 0.0f;
    }
#pragma omp for schedule(static)
    for (index_t q = 0; q < Q; ++q) {
      float* d = Ap + q * Ip;
      for (index_t i = 0; i < I; ++i) d[i] = a[q * saq + i * sai];
      for (index_t i = I; i < Ip; ++i) d[i] = 0.0f;
    }
    // implicit barrier: the padded operands are ready
    AlignedBuffer pack_buf(static_cast<std::size_t>(QC * std::max<index_t>(O, 1) * MR));  // A_q per query
    AlignedBuffer tile_buf(static_cast<std::size_t>(QC * MR * NR));                      // parked tiles
    float *Apk = pack_buf.data(), *Tb = tile_buf.data();
    if (!Apk || !Tb) {
#pragma omp atomic write
      alloc_failed = 1;
    }
#pragma omp for schedule(dynamic, 1)
    for (index_t task = 0; task < n_tasks; ++task) {
      if (!Apk || !Tb) continue;
      const index_t c = task / m_tiles, p0 = (task % m_tiles) * MR;
      const index_t q0 = c * QC, rows = std::min<index_t>(MR, P - p0);
      const index_t nq = std::clamp<index_t>(Q - q0, 0, QC), lanes = std::min<index_t>(QC, qs - q0);
      for (index_t j = 0; j < nq; ++j) {
        const float* gq = g + (q0 + j) * sgq;
        float* A = Apk + j * O * MR;
        for (index_t k = 0; k < O; ++k) {
          const float* col = L + k * sLo + p0 * sLp;
          const float x = gq[k * sgo];
          index_t m = 0;
          for (; m < rows; ++m) A[k * MR + m] = col[m * sLp] * x;
          for (; m < MR; ++m) A[k * MR + m] = 0.0f;
        }
      }
      for (index_t i0 = 0; i0 < I; i0 += NR) {
        const index_t width = std::min<index_t>(NR, I - i0);
        for (index_t j = 0; j < nq; ++j) {
          const index_t q = q0 + j;
          if (width > VL)
            query_tile<NV>(O, Apk + j * O * MR, Wp + i0, Ip, Ap + q * Ip + i0, Tb + j * MR * NR);
          else
            narrow_query_tile(O, Apk + j * O * MR, Wp + i0, Ip, Ap + q * Ip + i0, width, Tb + j * MR * NR);
        }
        write_tiles(Tb, rows, width, nq, lanes, out + p0 * sop + i0 * soi + q0, sop, soi, stream);
      }
    }
#if defined(__AVX512F__)
    _mm_sfence();  // the streamed lines are visible before the caller reads the result
#endif
  }
  if (alloc_failed) return Status(Code::kUnsupported, "rank_one_product_cpu: out of memory");
  return Status();
}

}  // namespace sf
