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
// tokens): scores[q, n] = Σ_o Σ_i V[q,o,i] G_n[o,i] with G_n = Σ_t g_{n,t} a_{n,t}ᵀ. FMO rows of G for
// a block of panels of NR examples are formed at a time in a per-task buffer (never N x O x I in
// memory) by a register-tiled rank-T update (examples along the vector lanes, so the rows come out
// in the B-panel layout [i][NR]) and contracted with MR queries at a time by the micro-kernel:
// Q·N·O·I + T·N·O·I flops instead of the token-wise Q·N·T·O·I.
//
// Tasks are (column block, group of G rows); with few column blocks the rows o are split into groups
// (a number fixed by the shapes only) whose partial scores are summed in group order at the end, so
// the result is bitwise independent of the thread count.
namespace sf {
namespace {

// Register tile of the G formation: FMO rows x FMI columns x VL examples (24 of 32 zmm on AVX-512).
constexpr index_t FMO = VL >= 16 ? 4 : 3;
constexpr index_t FMI = VL >= 16 ? 6 : 4;
constexpr index_t MAT_MAX_NCB = 8;                   // panels per column block, at most
constexpr std::size_t MAT_ROWBUF_BYTES = 256 << 10;  // FMO G rows of a column block stay in L2
constexpr index_t MAT_TARGET_TASKS = 8;              // split O when there are fewer column blocks

// dst[m][i][NR] = Σ_t g[m][t][NR] ⊙ a[i][t][NR] for m < FMO, i < I_pad (lanes are examples).
// ap: [I_pad][T][NR]; gp: [FMO][T][NR] (the panel's first row); dst rows dst_m apart. Token-major
// within a row keeps every stream of the rank-T update contiguous (no 4 KiB-strided set conflicts).
static inline void form_g_rows(index_t T, index_t I_pad, const float* __restrict ap, const float* __restrict gp,
                               float* __restrict dst, index_t dst_m) {
  for (int w = 0; w < NV; ++w)
    for (index_t i0 = 0; i0 < I_pad; i0 += FMI) {
      vf acc[FMO][FMI];
#pragma GCC unroll 8
      for (index_t m = 0; m < FMO; ++m)
#pragma GCC unroll 8
        for (index_t k = 0; k < FMI; ++k) acc[m][k] = vf{};
      for (index_t t = 0; t < T; ++t) {
        const float* at = ap + (i0 * T + t) * NR + w * VL;
        const float* gt = gp + t * NR + w * VL;
        vf gv[FMO];
#pragma GCC unroll 8
        for (index_t m = 0; m < FMO; ++m) gv[m] = loada(gt + m * T * NR);
#pragma GCC unroll 8
        for (index_t k = 0; k < FMI; ++k) {
          const vf av = loada(at + k * T * NR);
#pragma GCC unroll 8
          for (index_t m = 0; m < FMO; ++m) acc[m][k] += gv[m] * av;
        }
      }
#pragma GCC unroll 8
      for (index_t m = 0; m < FMO; ++m)
#pragma GCC unroll 8
        for (index_t k = 0; k < FMI; ++k)
          *reinterpret_cast<vf*>(dst + m * dst_m + (i0 + k) * NR + w * VL) = acc[m][k];
    }
}

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

  const index_t I_pad = ceil_div(I, FMI) * FMI, O_pad = ceil_div(O, FMO) * FMO;
  const index_t n_panels = ceil_div(N, NR);
  const index_t panel_bytes = FMO * I_pad * NR * static_cast<index_t>(sizeof(float));
  const index_t ncb = std::max<index_t>(1, std::min<index_t>(MAT_MAX_NCB, MAT_ROWBUF_BYTES / panel_bytes));
  const index_t n_cb = ceil_div(n_panels, ncb);
  const index_t n_qb = ceil_div(Q, MR);
  const index_t n_ob = O_pad / FMO;
  // Row groups: a function of the shapes only (never of the thread count), for bitwise reproducibility.
  const index_t n_og = std::max<index_t>(1, std::min<index_t>(n_ob, ceil_div(MAT_TARGET_TASKS, n_cb)));
  const int nt = threads_for(static_cast<double>(Q + T) * N * O * I, 2.0e6, num_threads);
  AlignedBuffer apack(static_cast<std::size_t>(n_panels * I_pad * T * NR));  // [panel][i][t][NR]
  AlignedBuffer gpack(static_cast<std::size_t>(n_panels * O_pad * T * NR));  // [panel][o][t][NR]
  const std::size_t c_group = static_cast<std::size_t>(n_qb * n_panels * MR * NR);
  AlignedBuffer cbuf(n_og * c_group);  // [group][qb][panel][MR][NR]
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
      float* ad = Ap + p * I_pad * T * NR;
      float* gd = Gp + p * O_pad * T * NR;
      // Examples innermost: each write is a contiguous NR-float row; padding (examples beyond N, rows
      // beyond O, columns beyond I) is zero.
      const int valid = static_cast<int>(std::min<index_t>(NR, N - p * NR));
      for (index_t t = 0; t < T; ++t) {
        const float* ar = a + p * NR * san + t * sat;
        const float* gr = g + p * NR * sgn + t * sgt;
        for (index_t i = 0; i < I_pad; ++i) {
          float* d = ad + (i * T + t) * NR;
          if (i < I) {
            int j = 0;
            for (; j < valid; ++j) d[j] = ar[j * san + i * sai];
            for (; j < NR; ++j) d[j] = 0.0f;
          } else {
            for (int j = 0; j < NR; ++j) d[j] = 0.0f;
          }
        }
        for (index_t o = 0; o < O_pad; ++o) {
          float* d = gd + (o * T + t) * NR;
          if (o < O) {
            int j = 0;
            for (; j < valid; ++j) d[j] = gr[j * sgn + o * sgo];
            for (; j < NR; ++j) d[j] = 0.0f;
          } else {
            for (int j = 0; j < NR; ++j) d[j] = 0.0f;
          }
        }
      }
    }
    AlignedBuffer rowbuf(static_cast<std::size_t>(FMO * ncb * I_pad * NR));  // G rows: [m][pp][i][NR]
    AlignedBuffer abuf(static_cast<std::size_t>(I * MR));                    // V rows o of MR queries: [i][MR]
    float* B = rowbuf.data();
    float* A = abuf.data();
    if (!A || !B) {
#pragma omp atomic write
      alloc_failed = 1;
    }
#pragma omp for schedule(static)
    for (index_t task = 0; task < n_cb * n_og; ++task) {
      if (!A || !B) continue;
      const index_t cb = task / n_og, grp = task % n_og;
      const index_t p0 = cb * ncb, np = std::min(ncb, n_panels - p0);
      const index_t ob0 = grp * n_ob / n_og, ob1 = (grp + 1) * n_ob / n_og;
      float* Cg = C + grp * c_group;
      for (index_t ob = ob0; ob < ob1; ++ob) {
        const index_t o0 = ob * FMO;
        for (index_t pp = 0; pp < np; ++pp)
          form_g_rows(T, I_pad, Ap + (p0 + pp) * I_pad * T * NR, Gp + ((p0 + pp) * O_pad + o0) * T * NR,
                      B + pp * I_pad * NR, ncb * I_pad * NR);
        for (index_t m = 0; m < FMO && o0 + m < O; ++m) {
          const index_t o = o0 + m;
          const bool first = o == ob0 * FMO;
          for (index_t qb = 0; qb < n_qb; ++qb) {
            const index_t q0 = qb * MR, rows = std::min<index_t>(MR, Q - q0);
            pack_a_panel(v + q0 * svq + o * svo, svq, svi, rows, I, A);
            for (index_t pp = 0; pp < np; ++pp) {
              float* c = Cg + (qb * n_panels + p0 + pp) * MR * NR;
              vf acc[MR][NV];
              if (first) {
                zero_tile(acc);
              } else {
                for (int r = 0; r < MR; ++r)
                  for (int w = 0; w < NV; ++w) acc[r][w] = loada(c + r * NR + w * VL);
              }
              gemm_tile<MR>(I, A, B + (m * ncb + pp) * I_pad * NR, acc);
              for (int r = 0; r < MR; ++r)
                for (int w = 0; w < NV; ++w) *reinterpret_cast<vf*>(c + r * NR + w * VL) = acc[r][w];
            }
          }
        }
      }
    }
#pragma omp for schedule(static)
    for (index_t q = 0; q < Q; ++q) {
      const index_t qb = q / MR, r = q % MR;
      for (index_t n = 0; n < N; ++n) {
        const std::size_t at = static_cast<std::size_t>(((qb * n_panels + n / NR) * MR + r) * NR + n % NR);
        float total = C[at];
        for (index_t grp = 1; grp < n_og; ++grp) total += C[grp * c_group + at];
        out[q * so_q + n * so_n] = total;
      }
    }
  }
  if (alloc_failed) return Status(Code::kUnsupported, "score_pairwise_materialized_cpu: out of memory for packing");
  return Status();
}

}  // namespace sf
