// score_self on CPU (the rotations are GEMMs done by the caller, see source_fast/_extension.py).
//
// T > 1: blocks of NB examples are independent tasks. For each MR2 x NR tile of (o, i) the weights are
// loaded once and, per example, the tile R = Σ_t gs_t ⊗ as_t is formed in registers and W ⊙ R ⊙ R
// is added to that example's vector accumulator. Per example the tiles are visited in a fixed
// order: bitwise deterministic whatever the thread count.
#include "score_self/score_self.h"

#include <algorithm>

#include "source_fast/cpu_microkernel.h"

namespace sf {
namespace {

using namespace cpu;
constexpr index_t NB = 8;  // examples per task (the weight tile is reused NB times from registers/L1)

// One token per example: s[n] = Σ_i as[n,i]² Σ_o gs[n,o]² W[o,i]. A register-blocked GEMM of
// gs² [N, O] with W [O, I] (MR examples x NR inputs per tile, K = O) whose epilogue multiplies by
// as² and reduces over i at once: one FMA per (n, o, i), nothing of size N x I is written.
Status score_self_rank_one(const float* gs, index_t sgn, index_t sgo, const float* as, index_t san, index_t sai,
                           index_t N, index_t O, index_t I, const float* w, index_t sw0, index_t sw1, float* out,
                           index_t so, int nt) {
  const index_t n_panels = ceil_div(I, NR), i_pad = n_panels * NR;
  const index_t n_tiles = ceil_div(N, MR);
  AlignedBuffer wpack(static_cast<std::size_t>(n_panels * O * NR));  // [panel][O][NR]
  if (!wpack.data()) return Status(Code::kUnsupported, "score_self_cpu: out of memory for packing");
  float* Wp = wpack.data();
  int alloc_failed = 0;
#pragma omp parallel num_threads(nt)
  {
#pragma omp for schedule(static)
    for (index_t p = 0; p < n_panels; ++p)
      for (index_t o = 0; o < O; ++o)
        for (int j = 0; j < NR; ++j) {
          const index_t i = p * NR + j;
          Wp[(p * O + o) * NR + j] = i < I ? w[o * sw0 + i * sw1] : 0.0f;
        }
    AlignedBuffer apack(static_cast<std::size_t>(O * MR));      // gs² [O][MR]
    AlignedBuffer bsq(static_cast<std::size_t>(MR * i_pad));    // as² [MR][i_pad]
    float* A = apack.data();
    float* Bq = bsq.data();
    if (!A || !Bq) {
#pragma omp atomic write
      alloc_failed = 1;
    }
#pragma omp for schedule(static)
    for (index_t tile = 0; tile < n_tiles; ++tile) {
      if (!A || !Bq) continue;
      const index_t n0 = tile * MR, rows = std::min<index_t>(MR, N - n0);
      for (index_t o = 0; o < O; ++o)
        for (int m = 0; m < MR; ++m) {
          const float val = m < rows ? gs[(n0 + m) * sgn + o * sgo] : 0.0f;
          A[o * MR + m] = val * val;
        }
      for (int m = 0; m < MR; ++m)
        for (index_t i = 0; i < i_pad; ++i) {
          const float val = (m < rows && i < I) ? as[(n0 + m) * san + i * sai] : 0.0f;
          Bq[m * i_pad + i] = val * val;
        }
      vf sacc[MR];
      for (int m = 0; m < MR; ++m) sacc[m] = vf{};
      for (index_t p = 0; p < n_panels; ++p) {
        vf acc[MR][NV];
        zero_tile(acc);
        gemm_tile<MR>(O, A, Wp + p * O * NR, acc);
        for (int m = 0; m < MR; ++m)
          for (int v = 0; v < NV; ++v) sacc[m] += acc[m][v] * loada(Bq + m * i_pad + p * NR + v * VL);
      }
      for (index_t m = 0; m < rows; ++m) out[(n0 + m) * so] = hsum(sacc[m]);
    }
  }
  if (alloc_failed) return Status(Code::kUnsupported, "score_self_cpu: out of memory for packing");
  return Status();
}

}  // namespace

Status score_self_rotated_cpu(const float* gs, index_t sgn, index_t sgt, index_t sgo, const float* as,
                              index_t san, index_t sat, index_t sai, index_t N, index_t T, index_t O, index_t I,
                              const float* w, index_t sw0, index_t sw1, float* out, index_t so, int num_threads) {
  SF_RETURN_IF_ERROR(check_strided("gs", {N, T, O}, {sgn, sgt, sgo}));
  SF_RETURN_IF_ERROR(check_strided("as", {N, T, I}, {san, sat, sai}));
  SF_RETURN_IF_ERROR(check_strided("weights", {O, I}, {sw0, sw1}));
  SF_RETURN_IF_ERROR(check_strided("out", {N}, {so}));
  SF_RETURN_IF_ERROR(check_ptr("gs", gs, N * T * O));
  SF_RETURN_IF_ERROR(check_ptr("as", as, N * T * I));
  SF_RETURN_IF_ERROR(check_ptr("weights", w, O * I));
  SF_RETURN_IF_ERROR(check_ptr("out", out, N));
  if (N == 0) return Status();
  if (T == 0 || O == 0 || I == 0) {
    for (index_t n = 0; n < N; ++n) out[n * so] = 0.0f;
    return Status();
  }

  const int nt = threads_for(static_cast<double>(N) * T * O * I, 2.0e6, num_threads);
  if (T == 1) return score_self_rank_one(gs, sgn, sgo, as, san, sai, N, O, I, w, sw0, sw1, out, so, nt);

  const index_t n_row_tiles = ceil_div(O, MR2);
  const index_t n_panels = ceil_div(I, NR);
  const index_t o_pad = n_row_tiles * MR2, i_pad = n_panels * NR;
  // Weights packed tile by tile: Wp[it][p][MR2][NR], zero padded.
  AlignedBuffer wpack(static_cast<std::size_t>(o_pad * i_pad));
  if (!wpack.data()) return Status(Code::kUnsupported, "score_self_cpu: out of memory for packing");
  float* Wp = wpack.data();
  const index_t n_blocks = ceil_div(N, NB);
  int alloc_failed = 0;

#pragma omp parallel num_threads(nt)
  {
#pragma omp for schedule(static)
    for (index_t it = 0; it < n_row_tiles; ++it)
      for (index_t p = 0; p < n_panels; ++p) {
        float* dst = Wp + (it * n_panels + p) * MR2 * NR;
        for (int m = 0; m < MR2; ++m)
          for (int j = 0; j < NR; ++j) {
            const index_t o = it * MR2 + m, i = p * NR + j;
            dst[m * NR + j] = (o < O && i < I) ? w[o * sw0 + i * sw1] : 0.0f;
          }
      }
    // Per-thread packed tokens for one block: A [n][it][T][MR2], B [n][p][T][NR].
    AlignedBuffer apack(static_cast<std::size_t>(NB * o_pad * T));
    AlignedBuffer bpack(static_cast<std::size_t>(NB * i_pad * T));
    float* Ap = apack.data();
    float* Bp = bpack.data();
    if (!Ap || !Bp) {
#pragma omp atomic write
      alloc_failed = 1;
    }
#pragma omp for schedule(static)
    for (index_t blk = 0; blk < n_blocks; ++blk) {
      if (!Ap || !Bp) continue;  // reported after the region
      const index_t n0 = blk * NB, nb = std::min(NB, N - n0);
      for (index_t n = 0; n < nb; ++n) {
        for (index_t it = 0; it < n_row_tiles; ++it)
          for (index_t t = 0; t < T; ++t) {
            float* d = Ap + ((n * n_row_tiles + it) * T + t) * MR2;
            const float* src = gs + (n0 + n) * sgn + t * sgt;
            for (int m = 0; m < MR2; ++m) {
              const index_t o = it * MR2 + m;
              d[m] = o < O ? src[o * sgo] : 0.0f;
            }
          }
        for (index_t p = 0; p < n_panels; ++p)
          for (index_t t = 0; t < T; ++t) {
            float* d = Bp + ((n * n_panels + p) * T + t) * NR;
            const float* src = as + (n0 + n) * san + t * sat;
            for (int j = 0; j < NR; ++j) {
              const index_t i = p * NR + j;
              d[j] = i < I ? src[i * sai] : 0.0f;
            }
          }
      }
      vf sacc[NB];
      for (index_t n = 0; n < NB; ++n) sacc[n] = vf{};
      for (index_t it = 0; it < n_row_tiles; ++it)
        for (index_t p = 0; p < n_panels; ++p) {
          const float* W = Wp + (it * n_panels + p) * MR2 * NR;
          for (index_t n = 0; n < nb; ++n) {
            vf r[MR2][NV];
            zero_tile(r);
            gemm_tile<MR2>(T, Ap + (n * n_row_tiles + it) * T * MR2, Bp + (n * n_panels + p) * T * NR, r);
            vf s = vf{};
            for (int m = 0; m < MR2; ++m)
              for (int v = 0; v < NV; ++v) s += loada(W + m * NR + v * VL) * (r[m][v] * r[m][v]);
            sacc[n] += s;
          }
        }
      for (index_t n = 0; n < nb; ++n) out[(n0 + n) * so] = hsum(sacc[n]);
    }
  }
  if (alloc_failed) return Status(Code::kUnsupported, "score_self_cpu: out of memory for packing");
  return Status();
}

}  // namespace sf
