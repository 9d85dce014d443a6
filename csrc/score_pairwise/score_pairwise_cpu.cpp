// score_pairwise on CPU: a register-blocked GEMM VA[(q,o), (n,t)] = Σ_i V[q,o,i] a[n,t,i] whose
// epilogue contracts each tile with g[n,t,o] straight away, so VA is never written to memory.
//
// Tasks are (column block, q): each owns scores[q, columns of the block]; rows o of one q are
// visited in a fixed order of MR-row tiles, so the result is bitwise independent of the thread count.
// With fewer outputs than tile rows (a regression head: O = 1) a tile holds the rows of several whole
// queries instead (MR / O of them), which would otherwise leave most of its rows zero.
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
  const index_t qpt = O < MR ? MR / std::max<index_t>(O, 1) : 1;  // queries per task (whole queries per tile)
  const index_t n_qgroups = ceil_div(Q, qpt);
  const index_t n_tasks = n_cb * n_qgroups;
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
    AlignedBuffer svbuf(static_cast<std::size_t>(qpt * NCB * NR));
    float* A = apack.data();
    float* sv = svbuf.data();
    if (!A || !sv) {
#pragma omp atomic write
      alloc_failed = 1;
    }
#pragma omp for schedule(static)
    for (index_t task = 0; task < n_tasks; ++task) {
      if (!A || !sv) continue;
      const index_t cb = task / n_qgroups, q = (task % n_qgroups) * qpt;  // column-block-major: B stays in cache
      const index_t p0 = cb * NCB, np = std::min(NCB, n_panels - p0);
      if (qpt > 1) {  // the rows (q', o) of queries q .. q + qn in one tile
        const index_t qn = std::min(qpt, Q - q), rows = qn * O;
        std::memset(sv, 0, sizeof(float) * qn * NCB * NR);
        for (index_t i = 0; i < I; ++i)
          for (index_t m = 0; m < MR; ++m)
            A[i * MR + m] = m < rows ? v[(q + m / O) * svq + (m % O) * svo + i * svi] : 0.0f;
        for (index_t pp = 0; pp < np; ++pp) {
          const index_t p = p0 + pp;
          vf acc[MR][NV];
          zero_tile(acc);
          gemm_tile<MR>(I, A, Bp + p * I * NR, acc);
          const float* gt = Gp + p * o_pad * NR;
#pragma GCC unroll 16
          for (int m = 0; m < MR; ++m) {
            if (m >= rows) break;
            float* s = sv + (m / O) * NCB * NR + pp * NR;
            const float* gm = gt + (m % O) * NR;
            for (int v2 = 0; v2 < NV; ++v2)
              *reinterpret_cast<vf*>(s + v2 * VL) = loada(s + v2 * VL) + acc[m][v2] * loada(gm + v2 * VL);
          }
        }
        for (index_t j = 0; j < qn; ++j)
          std::memcpy(S + (q + j) * nt_pad + p0 * NR, sv + j * NCB * NR, sizeof(float) * np * NR);
        continue;
      }
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
// tokens): scores[q, n] = Σ_o Σ_i V[q,o,i] G_n[o,i] with G_n = Σ_t g_{n,t} a_{n,t}ᵀ, never N x O x I in
// memory: Q·N·O·I + T·N·O·I flops instead of the token-wise Q·N·T·O·I. Two layouts, by T:
//
// * "lanes": examples along the vector lanes. One row o of G for a block of
//   panels is formed in cache (T·I per example, the tokens summed in registers; from 8 tokens on, LANES_MO rows
//   per read of a) and contracted with MR queries at a time by the
//   broadcast micro-kernel, V packed per (row, query block): near peak when Q·O·I is large (the
//   MLP's SOURCE segments: T = 2, Q = 200, O·I = 400k).
// * "rows": a task owns a block of examples; each example's G rows are formed
//   by the register-tiled micro-kernel straight from its rows (K = T), then contracted by a
//   dot-product tile (MQ queries x MN examples, vectors along k). 2-3x faster than "lanes" for long
//   token rows and small layers (GPT-2 benchmark: T = 80, O·I = 12k-16k), where forming G dominates,
//   and up to 10x for few queries (Q = 16). use_rows_layout() picks by the shapes only.
//
// Both sum every score in a fixed order that depends on the shapes only: bitwise independent of the
// thread count.
namespace sf {
namespace {

// The "rows" layout streams V once per block of examples: it wins while V stays in cache or forming G
// dominates (measured on 2 Zen 5 cores: equal at T = 2 with a 2.4 MB V, 2.3-5x faster at T >= 4 or
// Q = 16; 1.4-2.3x slower for Q = 200 and a 321 MB V up to T = 16).
constexpr double MAT_ROWS_MAX_V_BYTES = 8.0 * (1 << 20);
static inline bool use_rows_layout(index_t Q, index_t T, index_t O, index_t I) {
  return 4.0 * static_cast<double>(Q) * O * I <= MAT_ROWS_MAX_V_BYTES || 4 * T >= Q;
}
constexpr index_t MAT_NCB = 8;  // panels per column block: one G row block is I x 8·NR floats (L2)
// Rows o and inputs i per formed tile, one vector of lanes at a time (MO x IB accumulators in registers, plus MO
// vectors of g): each load of a serves MO rows, so a panel's a (T·I·NR floats, 1 MB at T = 16 and I = 513: from L3)
// is read O / MO times instead of O. With fewer than LANES_MO_MIN_T tokens, one row at a time (see `group`).
constexpr index_t LANES_MO_MIN_T = 8;
#if defined(__AVX512F__)
constexpr int LANES_MO = 8, LANES_IB = 2;  // 16 accumulators + 8 g + 1 a of 32 zmm
#else
constexpr int LANES_MO = 4, LANES_IB = 2;  // 8 accumulators + 4 g + 1 a of 16 ymm
#endif

// dst[m][b][:] = Σ_t g[m][t][:] ⊙ a[b][t][:] for m < MO rows and b < IB inputs of one panel (NR examples along the
// lanes): the sums over the tokens stay in registers (each term costs an FMA; the G rows are written once, not
// read and written per token). a[b][t] at ap + b * sab + t * NR, g[m][t] at gp + m * sgm + t * NR (tokens
// innermost: contiguous reads), dst[m][b] at dst + m * drow + b * NR; t = 0 first, then in order.
template <int MO, int IB>
static inline __attribute__((always_inline)) void form_lanes(index_t T, const float* __restrict ap, index_t sab,
                                                             const float* __restrict gp, index_t sgm,
                                                             float* __restrict dst, index_t drow) {
  for (int w = 0; w < NV; ++w) {  // one vector of lanes at a time: MO x IB accumulators
    vf acc[MO][IB];
    for (int m = 0; m < MO; ++m) {
      const vf gv = loada(gp + m * sgm + w * VL);
      for (int b = 0; b < IB; ++b) acc[m][b] = gv * loada(ap + b * sab + w * VL);
    }
    for (index_t t = 1; t < T; ++t) {
      vf gv[MO];
      for (int m = 0; m < MO; ++m) gv[m] = loada(gp + m * sgm + t * NR + w * VL);
      for (int b = 0; b < IB; ++b) {
        const vf av = loada(ap + b * sab + t * NR + w * VL);
        for (int m = 0; m < MO; ++m) acc[m][b] += gv[m] * av;
      }
    }
    for (int m = 0; m < MO; ++m)
      for (int b = 0; b < IB; ++b) *reinterpret_cast<vf*>(dst + m * drow + b * NR + w * VL) = acc[m][b];
  }
}

// Rows [o0, o0 + MO) of G for one panel into dst (row m at dst + m * drow, [i][NR] each); ad = the panel's packed
// a ([i][t][NR]), gt = its packed g from row o0 ([o][t][NR]).
template <int MO>
static inline void form_rows(index_t T, index_t I, const float* ad, const float* gt, float* dst, index_t drow) {
  index_t i = 0;
  for (; i + LANES_IB <= I; i += LANES_IB)
    form_lanes<MO, LANES_IB>(T, ad + i * T * NR, T * NR, gt, T * NR, dst + i * NR, drow);
  for (; i < I; ++i) form_lanes<MO, 1>(T, ad + i * T * NR, T * NR, gt, T * NR, dst + i * NR, drow);
}

}  // namespace

static Status materialized_lanes(const float* v, index_t svq, index_t svo, index_t svi, const float* a,
                                       index_t san, index_t sat, index_t sai, const float* g, index_t sgn,
                                       index_t sgt, index_t sgo, index_t Q, index_t N, index_t T, index_t O,
                                       index_t I, float* out, index_t so_q, index_t so_n, int num_threads) {

  const index_t n_panels = ceil_div(N, NR);
  const index_t n_cb = ceil_div(n_panels, MAT_NCB);
  const index_t n_qb = ceil_div(Q, MR);
  const int nt = threads_for(static_cast<double>(Q) * N * O * I, 2.0e6, num_threads);
  // Tasks are whole column blocks when there are enough of them (the G rows of a block are formed once,
  // T·I per example and row o); with fewer blocks than threads the query blocks are split into groups,
  // each re-forming the block's G rows (overhead T / (MR · query blocks per group)).
  const index_t n_groups = n_cb >= nt ? 1 : std::min<index_t>(n_qb, nt);
  // G rows formed per read of a: LANES_MO from LANES_MO_MIN_T tokens on (a is then large and forming dominates);
  // one below, where a group's rows would only make a round trip through L3 before their contraction.
  const index_t group = T >= LANES_MO_MIN_T ? LANES_MO : 1;
  // Tokens innermost: forming a tile of G rows reads each input's (and row's) T·NR floats contiguously.
  AlignedBuffer apack(static_cast<std::size_t>(n_panels * T * I * NR));  // [panel][i][t][NR]
  AlignedBuffer gpack(static_cast<std::size_t>(n_panels * T * O * NR));  // [panel][o][t][NR]
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
        float* ad = Ap + p * T * I * NR + t * NR;
        float* gd = Gp + p * T * O * NR + t * NR;
        for (int j = 0; j < NR; ++j) {
          const index_t n = p * NR + j;
          const bool valid = n < N;  // padded examples are zero: their G is zero
          const float* ar = a + (valid ? n : 0) * san + t * sat;
          const float* gr = g + (valid ? n : 0) * sgn + t * sgt;
          for (index_t i = 0; i < I; ++i) ad[i * T * NR + j] = valid ? ar[i * sai] : 0.0f;
          for (index_t o = 0; o < O; ++o) gd[o * T * NR + j] = valid ? gr[o * sgo] : 0.0f;
        }
      }
    }
    AlignedBuffer rowbuf(static_cast<std::size_t>(group * MAT_NCB * I * NR));  // G rows: [m][pp][i][NR]
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
        // Rows o.. o + group - 1 of G_n for the block's examples, when o starts a group: Σ_t g[n,t,o] a[n,t,:],
        // vectorised over examples. Row o of panel pp is at B + ((o % group) · np + pp) · I · NR.
        const index_t grow = (o % group) * np * I * NR;
        if (o % group == 0) {
          const index_t mo = std::min<index_t>(group, O - o);
          for (index_t pp = 0; pp < np; ++pp) {
            const float* ad = Ap + (p0 + pp) * T * I * NR;              // [i][t][NR]
            const float* gt = Gp + ((p0 + pp) * O + o) * T * NR;        // [o][t][NR] from row o
            float* dst = B + pp * I * NR;
            if (mo == LANES_MO) {  // a whole group (mo <= group)
              form_rows<LANES_MO>(T, I, ad, gt, dst, np * I * NR);
            } else {
              for (index_t m = 0; m < mo; ++m) form_rows<1>(T, I, ad, gt + m * T * NR, dst + m * np * I * NR, 0);
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
            gemm_tile<MR>(I, A, B + grow + pp * I * NR, acc);
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

namespace sf {
namespace {

#if defined(__AVX512F__)
constexpr index_t MQ = 4, MN = 6;  // 24 accumulators + 6 G vectors + 1 V vector of 32 zmm
#else
constexpr index_t MQ = 2, MN = 4;  // 8 accumulators + 4 + 1 of 16 ymm
#endif
constexpr index_t MAT_KC = 1024;                      // k per contraction step: MN + MQ rows of 4 KiB in L1
constexpr std::size_t MAT_BLOCK_BYTES = 1536 << 10;   // G rows of one task's chunk (L2)
constexpr index_t MAT_MAX_NB = 96;                    // examples per task, at most

// dst[m][w] = Σ_t g[t, m] a[t, w] for m < M rows of g (gp[t * sgt + m * sgo]) and W vectors of a
// (ap[t * sat + w * VL]); rows m >= rows are not stored.
template <int W>
static inline void form_tile(index_t T, const float* __restrict gp, index_t sgt, index_t sgo,
                             const float* __restrict ap, index_t sat, float* __restrict dst, index_t dst_row,
                             index_t rows) {
  vf acc[MR][W] = {};
  strided_tile<W>(T, gp, sgt, sgo, ap, sat, acc);
  for (index_t m = 0; m < rows; ++m)
    for (int w = 0; w < W; ++w) storeu(dst + m * dst_row + w * VL, acc[m][w]);
}

// acc[x][j] += Σ_k v_x[k] ⊙ g_j[k] over k < kc (a multiple of VL), lane-wise.
static inline void dot_tile(index_t kc, const float* const* __restrict vr, const float* const* __restrict gr,
                            vf (&acc)[MQ][MN]) {
  for (index_t k = 0; k < kc; k += VL) {
    vf gv[MN];
#pragma GCC unroll 8
    for (index_t j = 0; j < MN; ++j) gv[j] = loadu(gr[j] + k);
#pragma GCC unroll 8
    for (index_t x = 0; x < MQ; ++x) {
      const vf v = loadu(vr[x] + k);
#pragma GCC unroll 8
      for (index_t j = 0; j < MN; ++j) acc[x][j] += v * gv[j];
    }
  }
}

}  // namespace

static Status materialized_rows(const float* v, index_t svq, index_t svo, index_t svi, const float* a,
                                       index_t san, index_t sat, index_t sai, const float* g, index_t sgn,
                                       index_t sgt, index_t sgo, index_t Q, index_t N, index_t T, index_t O,
                                       index_t I, float* out, index_t so_q, index_t so_n, int num_threads) {

  // Columns padded to whole vectors. a is read in place when its rows already are (else copied per
  // example, zero-padded); V likewise (else packed once, zero-padded, [Q][O][IP]).
  const index_t IP = ceil_div(I, VL) * VL;
  const bool a_direct = sai == 1 && IP == I;
  const bool v_direct = svi == 1 && svo == I && IP == I;
  const int nt = threads_for(static_cast<double>(Q + T) * N * O * I, 2.0e6, num_threads);
  const index_t row_bytes = IP * static_cast<index_t>(sizeof(float));
  const index_t nb_mem = std::max<index_t>(MN, static_cast<index_t>(MAT_BLOCK_BYTES) / (MR * row_bytes) / MN * MN);
  const index_t NB = std::min({ceil_div(ceil_div(N, nt), MN) * MN, nb_mem, MAT_MAX_NB});
  const index_t OC = std::min(ceil_div(O, MR) * MR,
                              std::max<index_t>(MR, static_cast<index_t>(MAT_BLOCK_BYTES) / (NB * row_bytes) / MR * MR));
  const index_t n_tasks = ceil_div(N, NB);
  AlignedBuffer vpack(v_direct ? 0 : static_cast<std::size_t>(Q * O * IP));
  if (!v_direct && !vpack.data())
    return Status(Code::kUnsupported, "score_pairwise_materialized_cpu: out of memory for packing");
  float* Vp = vpack.data();
  int alloc_failed = 0;

#pragma omp parallel num_threads(nt)
  {
    if (!v_direct) {
#pragma omp for schedule(static)
      for (index_t q = 0; q < Q; ++q)
        for (index_t o = 0; o < O; ++o) {
          float* d = Vp + (q * O + o) * IP;
          const float* src = v + q * svq + o * svo;
          for (index_t i = 0; i < I; ++i) d[i] = src[i * svi];
          for (index_t i = I; i < IP; ++i) d[i] = 0.0f;
        }
    }
    AlignedBuffer gbuf(static_cast<std::size_t>(NB * OC * IP));  // G_n rows of the chunk: [j][o][IP]
    AlignedBuffer abuf(a_direct ? 1 : static_cast<std::size_t>(T * IP));
    AlignedBuffer tailbuf(static_cast<std::size_t>(T * MR));  // the last, partial row block of g, [t][MR]
    AlignedBuffer cbuf(static_cast<std::size_t>(Q * NB * VL));  // vector partial sums [q][j][VL]
    AlignedBuffer zbuf(static_cast<std::size_t>(MAT_KC));
    float *Gb = gbuf.data(), *Ab = abuf.data(), *Tb = tailbuf.data(), *Cv = cbuf.data(), *Z = zbuf.data();
    if (!Gb || !Ab || !Tb || !Cv || !Z) {
#pragma omp atomic write
      alloc_failed = 1;
    } else {
      std::memset(Z, 0, sizeof(float) * MAT_KC);
    }
#pragma omp for schedule(static)
    for (index_t task = 0; task < n_tasks; ++task) {
      if (!Gb || !Ab || !Tb || !Cv || !Z) continue;
      const index_t n0 = task * NB, nb = std::min(NB, N - n0);
      std::memset(Cv, 0, sizeof(float) * Q * NB * VL);
      for (index_t oc0 = 0; oc0 < O; oc0 += OC) {
        const index_t orows = std::min(OC, O - oc0);
        for (index_t j = 0; j < nb; ++j) {
          const index_t n = n0 + j;
          const float* an = a + n * san;
          index_t a_row = sat;
          if (!a_direct) {
            for (index_t t = 0; t < T; ++t) {
              float* d = Ab + t * IP;
              for (index_t i = 0; i < I; ++i) d[i] = an[t * sat + i * sai];
              for (index_t i = I; i < IP; ++i) d[i] = 0.0f;
            }
            an = Ab;
            a_row = IP;
          }
          float* gj = Gb + j * OC * IP;
          for (index_t o = oc0; o < oc0 + orows; o += MR) {
            const index_t rows = std::min<index_t>(MR, O - o);
            const float* gp = g + n * sgn + o * sgo;
            index_t g_t = sgt, g_o = sgo;
            if (rows < MR) {  // zero-padded copy: the tile reads MR rows
              pack_a_panel(gp, sgo, sgt, rows, T, Tb);
              gp = Tb;
              g_t = MR;
              g_o = 1;
            }
            float* dst = gj + (o - oc0) * IP;
            index_t i0 = 0;
            for (; i0 + 2 * VL <= IP; i0 += 2 * VL) form_tile<2>(T, gp, g_t, g_o, an + i0, a_row, dst + i0, IP, rows);
            if (i0 < IP) form_tile<1>(T, gp, g_t, g_o, an + i0, a_row, dst + i0, IP, rows);
          }
        }
        const index_t K = orows * IP;  // this chunk's k, contiguous in G rows and in V rows
        for (index_t k0 = 0; k0 < K; k0 += MAT_KC) {
          const index_t kc = std::min(MAT_KC, K - k0);
          for (index_t j0 = 0; j0 < nb; j0 += MN) {
            const float* gr[MN];
            for (index_t jj = 0; jj < MN; ++jj) gr[jj] = j0 + jj < nb ? Gb + (j0 + jj) * OC * IP + k0 : Z;
            for (index_t q0 = 0; q0 < Q; q0 += MQ) {
              const float* vr[MQ];
              for (index_t x = 0; x < MQ; ++x) {
                const index_t q = q0 + x;
                vr[x] = q >= Q ? Z : (v_direct ? v + q * svq : Vp + q * O * IP) + oc0 * IP + k0;
              }
              vf acc[MQ][MN];
              for (index_t x = 0; x < MQ; ++x)
                for (index_t jj = 0; jj < MN; ++jj)
                  acc[x][jj] = (q0 + x < Q && j0 + jj < nb) ? loada(Cv + ((q0 + x) * NB + j0 + jj) * VL) : vf{};
              dot_tile(kc, vr, gr, acc);
              for (index_t x = 0; x < MQ; ++x)
                for (index_t jj = 0; jj < MN; ++jj)
                  if (q0 + x < Q && j0 + jj < nb)
                    *reinterpret_cast<vf*>(Cv + ((q0 + x) * NB + j0 + jj) * VL) = acc[x][jj];
            }
          }
        }
      }
      for (index_t q = 0; q < Q; ++q)
        for (index_t j = 0; j < nb; ++j) out[q * so_q + (n0 + j) * so_n] = hsum(loada(Cv + (q * NB + j) * VL));
    }
  }
  if (alloc_failed) return Status(Code::kUnsupported, "score_pairwise_materialized_cpu: out of memory for packing");
  return Status();
}

}  // namespace sf

namespace sf {

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
  auto kernel = use_rows_layout(Q, T, O, I) ? materialized_rows : materialized_lanes;
  return kernel(v, svq, svo, svi, a, san, sat, sai, g, sgn, sgt, sgo, Q, N, T, O, I, out, so_q, so_n, num_threads);
}

}  // namespace sf
