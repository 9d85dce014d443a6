// lambda_accum on CPU (the rotations are GEMMs done by the caller, see source_fast/_extension.py).
//
// T == 1: per-example gradients are rank one, so Σ_n (gs_n ⊗ as_n)² = (gs²)ᵀ (as²): a GEMM over n of
//         squared, packed inputs.
// T  > 1: for each example the O x I tile Σ_t gs_t ⊗ as_t is formed in registers, squared and added
//         to a second register tile; nothing of size N x O x I is ever written.
// Output tiles are owned by one thread; examples are visited in a fixed order: bitwise deterministic.
#include "lambda_accum/lambda_accum.h"

#include <algorithm>

#include "source_fast/cpu_microkernel.h"

namespace sf {
namespace {

using namespace cpu;

// Adds an M x NR register tile into out rows [i0, i0 + M) x cols [j0, j0 + NR), clipped to rows x cols.
template <int M>
inline void add_tile(float* out, index_t ldo, index_t i0, index_t j0, index_t rows, index_t cols, vf (&acc)[M][NV]) {
  for (int m = 0; m < M; ++m) {
    const index_t i = i0 + m;
    if (i >= rows) break;
    float* row = out + i * ldo + j0;
    if (j0 + NR <= cols) {
      for (int v = 0; v < NV; ++v) storeu(row + v * VL, loadu(row + v * VL) + acc[m][v]);
    } else {
      float vals[NR];
      std::memcpy(vals, acc[m], sizeof(vals));
      for (index_t j = 0; j < cols - j0; ++j) row[j] += vals[j];
    }
  }
}

// Packs rows n in [n0, n0 + nc), tokens t, features [f0, f0 + W) of x[n, t, f] into dst[n][t][W]
// (zero padded beyond `F`), optionally squared.
template <int W>
inline void pack_tokens(const float* x, index_t sn, index_t st, index_t sf, index_t n0, index_t nc, index_t T,
                        index_t f0, index_t F, bool square, float* dst) {
  const index_t fn = std::min<index_t>(W, F - f0);
  for (index_t n = 0; n < nc; ++n)
    for (index_t t = 0; t < T; ++t) {
      const float* src = x + (n0 + n) * sn + t * st + f0 * sf;
      float* d = dst + (n * T + t) * W;
      index_t f = 0;
      if (square)
        for (; f < fn; ++f) d[f] = src[f * sf] * src[f * sf];
      else
        for (; f < fn; ++f) d[f] = src[f * sf];
      for (; f < W; ++f) d[f] = 0.0f;
    }
}

}  // namespace

Status lambda_accum_rotated_cpu(const float* gs, index_t sgn, index_t sgt, index_t sgo, const float* as,
                                index_t san, index_t sat, index_t sai, index_t N, index_t T, index_t O,
                                index_t I, float* out, index_t ldo, int num_threads) {
  SF_RETURN_IF_ERROR(check_strided("gs", {N, T, O}, {sgn, sgt, sgo}));
  SF_RETURN_IF_ERROR(check_strided("as", {N, T, I}, {san, sat, sai}));
  SF_CHECK_ARG(ldo >= I, "out: expected leading dimension >= ", I, ", got ", ldo);
  SF_RETURN_IF_ERROR(check_ptr("gs", gs, N * T * O));
  SF_RETURN_IF_ERROR(check_ptr("as", as, N * T * I));
  SF_RETURN_IF_ERROR(check_ptr("out", out, O * I));
  if (N == 0 || T == 0 || O == 0 || I == 0) return Status();

  const bool rank_one = (T == 1);
  // Rank one: a plain GEMM of squares with MR rows. Else the square kernel with MR2 rows.
  const int mr = rank_one ? MR : MR2;
  // Examples per packed chunk: about 256 token rows, so one B panel chunk stays in L1.
  const index_t nc_max = std::min<index_t>(N, std::max<index_t>(1, 256 / T));
  const index_t n_row_tiles = ceil_div(O, mr);
  const index_t n_panels = ceil_div(I, NR);
  const index_t n_tiles = n_row_tiles * n_panels;
  AlignedBuffer apack(static_cast<std::size_t>(n_row_tiles * mr * nc_max * T));
  AlignedBuffer bpack(static_cast<std::size_t>(n_panels * NR * nc_max * T));
  if (!apack.data() || !bpack.data()) return Status(Code::kUnsupported, "lambda_accum_cpu: out of memory for packing");
  float* Ap = apack.data();
  float* Bp = bpack.data();

  const int nt = threads_for(static_cast<double>(N) * T * O * I, 2.0e6, num_threads);
#pragma omp parallel num_threads(nt)
  for (index_t n0 = 0; n0 < N; n0 += nc_max) {
    const index_t nc = std::min(nc_max, N - n0);
    const index_t kblk = nc * T;  // token rows in this chunk
#pragma omp for schedule(static) nowait
    for (index_t it = 0; it < n_row_tiles; ++it) {
      if (mr == MR)
        pack_tokens<MR>(gs, sgn, sgt, sgo, n0, nc, T, it * MR, O, rank_one, Ap + it * MR * kblk);
      else
        pack_tokens<MR2>(gs, sgn, sgt, sgo, n0, nc, T, it * MR2, O, rank_one, Ap + it * MR2 * kblk);
    }
#pragma omp for schedule(static)
    for (index_t p = 0; p < n_panels; ++p)
      pack_tokens<NR>(as, san, sat, sai, n0, nc, T, p * NR, I, rank_one, Bp + p * NR * kblk);
#pragma omp for schedule(static)
    for (index_t t = 0; t < n_tiles; ++t) {
      const index_t p = t / n_row_tiles, it = t % n_row_tiles;  // panel-major: reuse the B panel
      const float* B = Bp + p * NR * kblk;
      if (rank_one && I - p * NR <= VL) {  // a last panel of at most VL columns (narrow_tile)
        const index_t cols = I - p * NR;
        alignas(64) float tile[MR * VL] = {};
        narrow_tile(nc, Ap + it * MR * kblk, B, NR, cols, tile);
        for (index_t m = 0; m < MR && it * MR + m < O; ++m) {
          float* row = out + (it * MR + m) * ldo + p * NR;
          for (index_t j = 0; j < cols; ++j) row[j] += tile[m * VL + j];
        }
      } else if (rank_one) {
        vf acc[MR][NV];
        zero_tile(acc);
        gemm_tile<MR>(nc, Ap + it * MR * kblk, B, acc);
        add_tile<MR>(out, ldo, it * MR, p * NR, O, I, acc);
      } else {
        const float* A = Ap + it * MR2 * kblk;
        vf acc[MR2][NV];
        zero_tile(acc);
        for (index_t n = 0; n < nc; ++n) {
          vf r[MR2][NV];
          zero_tile(r);
          gemm_tile<MR2>(T, A + n * T * MR2, B + n * T * NR, r);
          for (int m = 0; m < MR2; ++m)
            for (int v = 0; v < NV; ++v) acc[m][v] += r[m][v] * r[m][v];
        }
        add_tile<MR2>(out, ldo, it * MR2, p * NR, O, I, acc);
      }
    }  // implicit barrier: the packed chunk is reused next iteration
  }
  return Status();
}

}  // namespace sf
