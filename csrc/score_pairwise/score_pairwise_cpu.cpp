// score_pairwise on CPU: a register-blocked GEMM VA[(q,o), (n,t)] = Σ_i V[q,o,i] a[n,t,i] whose
// epilogue contracts each tile with g[n,t,o] straight away, so VA is never written to memory.
//
// Tasks are (column block, q): each owns scores[q, columns of the block]; rows o of one q are
// visited in a fixed order of MR-row tiles, so the result is bitwise independent of the thread count.
#include "score_pairwise/score_pairwise.h"

#include <algorithm>

#include "source_fast/cpu_microkernel.h"

namespace sf {
namespace {

using namespace cpu;
constexpr index_t NCB = 8;  // B panels per column block (I x NCB*NR floats stay in L2)

}  // namespace

Status score_pairwise_cpu(const float* v, index_t svq, index_t svo, index_t svi, const float* a, index_t san,
                          index_t sat, index_t sai, const float* g, index_t sgn, index_t sgt, index_t sgo,
                          index_t Q, index_t N, index_t T, index_t O, index_t I, float* out, index_t so_q,
                          index_t so_n, int num_threads) {
  SF_RETURN_IF_ERROR(check_pairwise_args(v, svq, svo, svi, a, san, sat, sai, g, sgn, sgt, sgo, Q, N, T, O, I, out,
                                         so_q, so_n));
  if (Q == 0 || N == 0) return Status();

  const index_t NT = N * T;
  const index_t n_panels = std::max<index_t>(1, ceil_div(NT, NR));
  const index_t nt_pad = n_panels * NR;
  const index_t o_pad = ceil_div(std::max<index_t>(O, 1), MR) * MR;
  const index_t n_cb = ceil_div(n_panels, NCB);
  AlignedBuffer bpack(static_cast<std::size_t>(nt_pad * std::max<index_t>(I, 1)));
  AlignedBuffer gpack(static_cast<std::size_t>(nt_pad * o_pad));
  AlignedBuffer sbuf(static_cast<std::size_t>(Q * nt_pad));
  if (!bpack.data() || !gpack.data() || !sbuf.data())
    return Status(Code::kUnsupported, "score_pairwise_cpu: out of memory for packing");
  float* Bp = bpack.data();  // [panel][I][NR]: a[(n,t)][i]
  float* Gp = gpack.data();  // [panel][o_pad][NR]: g[(n,t)][o], zero rows beyond O
  float* S = sbuf.data();    // [Q][nt_pad]: Σ_o g ⊙ VA per token column
  const index_t n_tasks = n_cb * Q;
  const int nt = threads_for(static_cast<double>(Q) * NT * O * I, 2.0e6, num_threads);
  int alloc_failed = 0;

#pragma omp parallel num_threads(nt)
  {
#pragma omp for schedule(static)
    for (index_t p = 0; p < n_panels; ++p) {
      float* bd = Bp + p * I * NR;
      float* gd = Gp + p * o_pad * NR;
      for (int j = 0; j < NR; ++j) {
        const index_t c = p * NR + j;
        const bool valid = c < NT;
        const index_t n = valid ? c / T : 0, t = valid ? c % T : 0;
        const float* ar = a + n * san + t * sat;
        const float* gr = g + n * sgn + t * sgt;
        for (index_t i = 0; i < I; ++i) bd[i * NR + j] = valid ? ar[i * sai] : 0.0f;
        for (index_t o = 0; o < o_pad; ++o) gd[o * NR + j] = (valid && o < O) ? gr[o * sgo] : 0.0f;
      }
    }
    AlignedBuffer apack(static_cast<std::size_t>(std::max<index_t>(I, 1) * MR));
    AlignedBuffer svbuf(static_cast<std::size_t>(NCB * NR));
    float* A = apack.data();
    float* sv = svbuf.data();
    if (!A || !sv) {
#pragma omp atomic write
      alloc_failed = 1;
    }
#pragma omp for schedule(static)
    for (index_t task = 0; task < n_tasks; ++task) {
      if (!A || !sv) continue;
      const index_t cb = task / Q, q = task % Q;  // column-block-major: the B block stays in cache
      const index_t p0 = cb * NCB, np = std::min(NCB, n_panels - p0);
      std::memset(sv, 0, sizeof(float) * NCB * NR);
      const float* vq = v + q * svq;
      for (index_t o0 = 0; o0 < O; o0 += MR) {
        const index_t rows = std::min<index_t>(MR, O - o0);
        pack_a_panel(vq + o0 * svo, svo, svi, rows, I, A);
        for (index_t pp = 0; pp < np; ++pp) {
          const index_t p = p0 + pp;
          vf acc[MR][NV];
          zero_tile(acc);
          gemm_tile<MR>(I, A, Bp + p * I * NR, acc);
          const float* gt = Gp + (p * o_pad + o0) * NR;
          float* s = sv + pp * NR;
          for (int v2 = 0; v2 < NV; ++v2) {
            vf sum = loada(s + v2 * VL);
            for (int m = 0; m < MR; ++m) sum += acc[m][v2] * loada(gt + m * NR + v2 * VL);
            *reinterpret_cast<vf*>(s + v2 * VL) = sum;
          }
        }
      }
      std::memcpy(S + q * nt_pad + p0 * NR, sv, sizeof(float) * np * NR);
    }
    // scores[q, n] = Σ_t S[q, n*T + t], in token order.
#pragma omp for schedule(static)
    for (index_t q = 0; q < Q; ++q)
      for (index_t n = 0; n < N; ++n) {
        const float* s = S + q * nt_pad + n * T;
        float total = 0.0f;
        for (index_t t = 0; t < T; ++t) total += s[t];
        out[q * so_q + n * so_n] = total;
      }
  }
  if (alloc_failed) return Status(Code::kUnsupported, "score_pairwise_cpu: out of memory for packing");
  return Status();
}

}  // namespace sf

// ------------------------------------------------------------------------------------------------
// Materialised strategy, for T > 1 (sequences, or the checkpoints of one SOURCE segment stacked as
// tokens): scores[q, n] = Σ_o Σ_i V[q,o,i] G_n[o,i] with G_n = Σ_t g_{n,t} a_{n,t}ᵀ. One row o of
// G for a block of MAT_NCB panels of examples is formed at a time in a per-task buffer (never
// N x O x I in memory) and contracted with MR queries at a time by the micro-kernel:
// Q·N·O·I + T·N·O·I flops instead of the token-wise Q·N·T·O·I.
//
// Tasks are (column block, group of query blocks); each owns its scores and sums over o then i in a
// fixed order, so the result is bitwise independent of the thread count.
namespace sf {
namespace {

constexpr index_t MAT_NCB = 8;  // panels per column block: one G row block is I x 8·NR floats (L2)

}  // namespace

Status score_pairwise_materialized_cpu(const float* v, index_t svq, index_t svo, index_t svi, const float* a,
                                       index_t san, index_t sat, index_t sai, const float* g, index_t sgn,
                                       index_t sgt, index_t sgo, index_t Q, index_t N, index_t T, index_t O,
                                       index_t I, float* out, index_t so_q, index_t so_n, int num_threads) {
  SF_RETURN_IF_ERROR(check_pairwise_args(v, svq, svo, svi, a, san, sat, sai, g, sgn, sgt, sgo, Q, N, T, O, I, out,
                                         so_q, so_n));
  if (Q == 0 || N == 0) return Status();
  if (T == 0 || O == 0 || I == 0) {
    for (index_t q = 0; q < Q; ++q)
      for (index_t n = 0; n < N; ++n) out[q * so_q + n * so_n] = 0.0f;
    return Status();
  }

  const index_t n_panels = ceil_div(N, NR);
  const index_t n_cb = ceil_div(n_panels, MAT_NCB);
  const index_t n_qb = ceil_div(Q, MR);
  const int nt = threads_for(static_cast<double>(Q) * N * O * I, 2.0e6, num_threads);
  // Tasks are whole column blocks when there are enough of them (the G rows of a block are formed once,
  // T·I per example and row o); with fewer blocks than threads the query blocks are split into groups,
  // each re-forming the block's G rows (overhead T / (MR · query blocks per group)).
  const index_t n_groups = n_cb >= nt ? 1 : std::min<index_t>(n_qb, nt);
  AlignedBuffer apack(static_cast<std::size_t>(n_panels * T * I * NR));  // [panel][t][i][NR]
  AlignedBuffer gpack(static_cast<std::size_t>(n_panels * T * O * NR));  // [panel][t][o][NR]
  AlignedBuffer cbuf(static_cast<std::size_t>(n_qb * n_panels * MR * NR));  // [qb][panel][MR][NR]
  if (!apack.data() || !gpack.data() || !cbuf.data())
    return Status(Code::kUnsupported, "score_pairwise_materialized_cpu: out of memory for packing");
  float* Ap = apack.data();
  float* Gp = gpack.data();
  float* C = cbuf.data();
  int alloc_failed = 0;

#pragma omp parallel num_threads(nt)
  {
#pragma omp for schedule(static)
    for (index_t p = 0; p < n_panels; ++p) {
      for (index_t t = 0; t < T; ++t) {
        float* ad = Ap + (p * T + t) * I * NR;
        float* gd = Gp + (p * T + t) * O * NR;
        for (int j = 0; j < NR; ++j) {
          const index_t n = p * NR + j;
          const bool valid = n < N;  // padded examples are zero: their G is zero
          const float* ar = a + (valid ? n : 0) * san + t * sat;
          const float* gr = g + (valid ? n : 0) * sgn + t * sgt;
          for (index_t i = 0; i < I; ++i) ad[i * NR + j] = valid ? ar[i * sai] : 0.0f;
          for (index_t o = 0; o < O; ++o) gd[o * NR + j] = valid ? gr[o * sgo] : 0.0f;
        }
      }
    }
    AlignedBuffer rowbuf(static_cast<std::size_t>(MAT_NCB * I * NR));  // G rows: [pp][i][NR]
    AlignedBuffer abuf(static_cast<std::size_t>(I * MR));             // V rows o of MR queries: [i][MR]
    float* B = rowbuf.data();
    float* A = abuf.data();
    if (!A || !B) {
#pragma omp atomic write
      alloc_failed = 1;
    }
#pragma omp for schedule(static)
    for (index_t task = 0; task < n_cb * n_groups; ++task) {
      if (!A || !B) continue;
      const index_t cb = task / n_groups, grp = task % n_groups;
      const index_t p0 = cb * MAT_NCB, np = std::min(MAT_NCB, n_panels - p0);
      const index_t qb0 = grp * n_qb / n_groups, qb1 = (grp + 1) * n_qb / n_groups;
      for (index_t o = 0; o < O; ++o) {
        // Row o of G_n for the block's examples: Σ_t g[n,t,o] a[n,t,:], vectorised over examples.
        for (index_t pp = 0; pp < np; ++pp) {
          float* bd = B + pp * I * NR;
          for (index_t t = 0; t < T; ++t) {
            const float* ad = Ap + ((p0 + pp) * T + t) * I * NR;
            const float* gt = Gp + ((p0 + pp) * T + t) * O * NR + o * NR;
            vf gv[NV];
            for (int w = 0; w < NV; ++w) gv[w] = loada(gt + w * VL);
            for (index_t i = 0; i < I; ++i)
              for (int w = 0; w < NV; ++w) {
                vf* d = reinterpret_cast<vf*>(bd + i * NR + w * VL);
                const vf x = gv[w] * loada(ad + i * NR + w * VL);
                *d = t == 0 ? x : *d + x;
              }
          }
        }
        for (index_t qb = qb0; qb < qb1; ++qb) {
          const index_t q0 = qb * MR, rows = std::min<index_t>(MR, Q - q0);
          pack_a_panel(v + q0 * svq + o * svo, svq, svi, rows, I, A);
          for (index_t pp = 0; pp < np; ++pp) {
            float* c = C + (qb * n_panels + p0 + pp) * MR * NR;
            vf acc[MR][NV];
            if (o == 0) {
              zero_tile(acc);
            } else {
              for (int m = 0; m < MR; ++m)
                for (int w = 0; w < NV; ++w) acc[m][w] = loada(c + m * NR + w * VL);
            }
            gemm_tile<MR>(I, A, B + pp * I * NR, acc);
            for (int m = 0; m < MR; ++m)
              for (int w = 0; w < NV; ++w) *reinterpret_cast<vf*>(c + m * NR + w * VL) = acc[m][w];
          }
        }
      }
    }
#pragma omp for schedule(static)
    for (index_t q = 0; q < Q; ++q) {
      const index_t qb = q / MR, m = q % MR;
      for (index_t n = 0; n < N; ++n)
        out[q * so_q + n * so_n] = C[((qb * n_panels + n / NR) * MR + m) * NR + n % NR];
    }
  }
  if (alloc_failed) return Status(Code::kUnsupported, "score_pairwise_materialized_cpu: out of memory for packing");
  return Status();
}

}  // namespace sf
