// score_pairwise on CPU for output gradients with many exact zeros (ReLU-gated layers: about half of
// g is 0.0): scores[q, n] = Σ_o V[q,o,:] · R_{n,o}, with R_{n,o} = Σ_t g[n,t,o] a[n,t,:] the row o of
// G_n = Σ_t g aᵀ, computed only for the (n, o) where some g[n,t,o] is nonzero: (Q + T)·I flops per such
// row instead of Q·N·O·I (+ T·N·O·I) in all.
//
// T == 1 is a ReLU layer's rows; T > 1 e.g. a SOURCE segment's checkpoints stacked as tokens. ReLU
// patterns barely move between nearby checkpoints (≈ 52 % of (n, o) nonzero for two checkpoints at
// 50 % each), so the stacked case also about halves the dense materialised contraction.
//
// A task owns a block of examples (their g transposed, [t][o][example], for 16-wide nonzero masks) and
// a group of query panels. For each output o it lists the examples with a nonzero g[n, :, o], forms
// their rows R (vectorised over i, a read in place) and multiplies them by V[o] with the broadcast
// micro-kernel (MR rows of R x NR queries, K = I), adding each tile row into its example's scores.
// Every score is summed in one task, over o in increasing order: bitwise independent of the thread
// count and block size.
//
// V is read as [O][I][queries] (queries innermost, rows of at least ceil(Q / VL) · VL readable
// floats) when it comes that way (svq == 1, svi >= that, svo == I · svi: the pipeline stores it so);
// otherwise it is packed once per call.
//
// score_pairwise_sparse_ag_cpu (second half of the file) also skips a's exact zeros (a ReLU layer's inputs,
// unrotated: about half of a): each example's a is compressed to the columns where any token is nonzero,
// and every nonzero row of G_n, in that compressed form, is contracted with the matching rows of V only
// (Q·nnz(a) flops per (n, o) instead of Q·I). Rows of V are gathered and each is used by one example, so it
// runs at about half the rate per flop of the tile kernel above: worth it below ≈ 55 % nonzero a at I = 129
// (fewer as I grows; the cost model is _extension.sparse_ag_relative_time). Same tasks, same fixed order.
#include <algorithm>
#include <cstring>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "score_pairwise/score_pairwise.h"
#include "source_fast/cpu_microkernel.h"

namespace sf {
namespace {

using namespace cpu;
constexpr index_t SP_CHUNK = 16;        // examples per nonzero mask
constexpr index_t SP_MAX_EXAMPLES = 512;  // examples per block, at most (V streams once per block)

// Bit j: x[j] != 0 (16 examples' g at one output).
static inline uint32_t nonzero_mask(const float* x) {
#if defined(__AVX512F__)
  return _mm512_cmp_ps_mask(_mm512_loadu_ps(x), _mm512_setzero_ps(), _CMP_NEQ_UQ);
#else
  uint32_t m = 0;
  for (int j = 0; j < SP_CHUNK; ++j) m |= static_cast<uint32_t>(x[j] != 0.0f) << j;
  return m;
#endif
}

// g of examples n0 .. n0 + nb transposed per token, examples innermost and zero-padded to RBp: Gt[t][o][j]
// (the masks read 16 examples). Written in order, read strided: scattered loads from the block of g in cache
// cost less than scattered stores (about 7 % of the kernel at I = 65 the other way round).
static void transpose_g(const float* g, index_t sgn, index_t sgt, index_t sgo, index_t n0, index_t nb, index_t T,
                        index_t O, index_t RBp, float* Gt) {
  for (index_t t = 0; t < T; ++t)
    for (index_t o = 0; o < O; ++o) {
      float* gt = Gt + (t * O + o) * RBp;
      const float* gc = g + n0 * sgn + t * sgt + o * sgo;
      index_t j = 0;
      for (; j < nb; ++j) gt[j] = gc[j * sgn];
      for (; j < RBp; ++j) gt[j] = 0.0f;
    }
}

// The examples of the block (j < RBp) with a nonzero g[j, :, o], in increasing order, into idx; their count.
static index_t nonzero_examples(const float* Gt, index_t T, index_t O, index_t o, index_t RBp, index_t* idx) {
  index_t cnt = 0;
  for (index_t c = 0; c < RBp / SP_CHUNK; ++c) {
    uint32_t m = 0;
    for (index_t t = 0; t < T; ++t) m |= nonzero_mask(Gt + (t * O + o) * RBp + c * SP_CHUNK);
    for (uint32_t bits = m; bits; bits &= bits - 1) idx[cnt++] = c * SP_CHUNK + __builtin_ctz(bits);
  }
  return cnt;
}

// What both kernels share: V read in place when it comes queries-innermost, else packed once ([O][I][Qp]), and
// tasks of (a block of examples, a group of query vectors). Neither size changes the result.
struct SparsePlan {
  index_t Qp = 0;                          // queries padded to whole vectors
  bool v_direct = false;                   // V read in place
  index_t ldv = 0, vo = 0;                 // strides of V's rows (i) and outputs (o) as read
  int nt = 1;                              // threads
  index_t NB = 1, n_blocks = 1, RBp = 0;   // examples per block, blocks, examples per block padded to whole masks
};

static SparsePlan sparse_plan(index_t Q, index_t N, index_t T, index_t O, index_t I, index_t svq, index_t svo,
                              index_t svi, int num_threads) {
  SparsePlan p;
  p.Qp = ceil_div(Q, VL) * VL;  // whole vectors; a last half-width panel when Qp % NR != 0
  p.v_direct = svq == 1 && svi >= p.Qp && svo == I * svi;
  p.ldv = p.v_direct ? svi : p.Qp;
  p.vo = p.v_direct ? svo : I * p.Qp;
  p.nt = threads_for(static_cast<double>(Q) * N * T * O * I, 2.0e6, num_threads);
  // Few, large example blocks (V is read once per block), a multiple of nt of equal size (5000 examples on 2
  // threads: 6 of 834, not 1024 x 4 + 904: the static schedule would leave one thread a block behind).
  const index_t n_blocks0 = ceil_div(std::max<index_t>(ceil_div(N, SP_MAX_EXAMPLES), p.nt), p.nt) * p.nt;
  p.NB = std::max<index_t>(1, ceil_div(N, n_blocks0));
  p.n_blocks = ceil_div(N, p.NB);
  p.RBp = ceil_div(p.NB, SP_CHUNK) * SP_CHUNK;
  return p;
}

// V as the kernels read it: v itself, or `buf` sized for the packed copy (pack_v fills it in the parallel region);
// null when that allocation fails.
static const float* v_source(const SparsePlan& p, const float* v, index_t O, index_t I, AlignedBuffer& buf) {
  if (p.v_direct) return v;
  return buf.reset(static_cast<std::size_t>(O * I * p.Qp)) ? buf.data() : nullptr;
}

// Inside a parallel region, shared by its threads: V [Q, O, I] (any strides) packed as [O][I][Qp], zero past Q.
static void pack_v(const float* v, index_t svq, index_t svo, index_t svi, index_t Q, index_t O, index_t I,
                   index_t Qp, float* Vp) {
#pragma omp for schedule(static)
  for (index_t o = 0; o < O; ++o)
    for (index_t i = 0; i < I; ++i) {
      float* d = Vp + (o * I + i) * Qp;
      for (index_t q = 0; q < Q; ++q) d[q] = v[q * svq + o * svo + i * svi];
      for (index_t q = Q; q < Qp; ++q) d[q] = 0.0f;
    }
}

// A task's scores of queries [q0, q1) for examples [n0, n0 + nb), S [nb][Qp], into out (stores in order along the
// score rows, loads strided).
static void store_scores(const float* S, index_t Qp, index_t q0, index_t q1, index_t n0, index_t nb, float* out,
                         index_t so_q, index_t so_n) {
  for (index_t q = q0; q < q1; ++q)
    for (index_t j = 0; j < nb; ++j) out[q * so_q + (n0 + j) * so_n] = S[j * Qp + q];
}

// Every score zero when there are no tokens, outputs or inputs; whether that was the case.
static bool zero_scores_if_empty(index_t Q, index_t N, index_t T, index_t O, index_t I, float* out, index_t so_q,
                                 index_t so_n) {
  if (T != 0 && O != 0 && I != 0) return false;
  for (index_t q = 0; q < Q; ++q)
    for (index_t n = 0; n < N; ++n) out[q * so_q + n * so_n] = 0.0f;
  return true;
}

// S[idx[m]][0 .. W·VL) += Σ_i R[m][i] · V[i][0 .. W·VL) for the rows m < rows of one panel of MR formed
// rows (R with row stride ldr, V with row stride ldv).
template <int W>
static inline void sparse_tile(index_t I, const float* __restrict b, index_t ldv, const float* __restrict r,
                               index_t ldr, const index_t* idx, index_t rows, float* __restrict S, index_t lds) {
  vf acc[MR][W] = {};
  strided_tile<W>(I, r, 1, ldr, b, ldv, acc);
  for (index_t m = 0; m < rows; ++m) {
    float* s = S + idx[m] * lds;
    for (int w = 0; w < W; ++w) storeu(s + w * VL, loadu(s + w * VL) + acc[m][w]);
  }
}

#if defined(__AVX512F__)
// The last query panel when at most 8 of its 16 lanes are queries (Q = 200: six 32-wide panels and 8 more):
// 256-bit FMAs. Zen 4 runs two of those per cycle but one 512-bit FMA, so this takes half the cycles of the
// 16-lane tile for the same useful work (elsewhere about the same).
typedef float vf8 __attribute__((vector_size(8 * sizeof(float))));
typedef float vf8u __attribute__((vector_size(8 * sizeof(float)), aligned(4), may_alias));

static inline void sparse_tile_8(index_t I, const float* __restrict b, index_t ldv, const float* __restrict r,
                                 index_t ldr, const index_t* idx, index_t rows, float* __restrict S, index_t lds) {
  vf8 acc[MR] = {};
  for (index_t k = 0; k < I; ++k) {
    const vf8 bk = *reinterpret_cast<const vf8u*>(b + k * ldv);
#pragma GCC unroll 16
    for (int m = 0; m < MR; ++m) acc[m] += reinterpret_cast<vf8>(_mm256_set1_ps(r[m * ldr + k])) * bk;
  }
  for (index_t m = 0; m < rows; ++m) {
    vf8u* s = reinterpret_cast<vf8u*>(S + idx[m] * lds);
    *s = *s + acc[m];
  }
}
#endif

// One task: examples n0 .. n0 + nb, query panels [qp0, qp1); S[j][q] is set (see the header).
static void score_block(const float* a, index_t san, index_t sat, index_t sai, const float* g, index_t sgn,
                        index_t sgt, index_t sgo, index_t n0, index_t nb, index_t T, index_t O, index_t I,
                        index_t RBp, index_t LDR, const float* VT, index_t vo, index_t ldv, index_t qp0, index_t qp1,
                        index_t Q, index_t Qp, float* Ar, float* Gt, float* R, float* S, index_t* idx) {
  transpose_g(g, sgn, sgt, sgo, n0, nb, T, O, RBp, Gt);
  // a rows with unit stride: read in place when they are, else copied once ([j][t][i]).
  const bool a_direct = sai == 1;
  if (!a_direct)
    for (index_t j = 0; j < nb; ++j)
      for (index_t t = 0; t < T; ++t)
        for (index_t i = 0; i < I; ++i) Ar[(j * T + t) * I + i] = a[(n0 + j) * san + t * sat + i * sai];
  const float* a0 = a_direct ? a + n0 * san : Ar;
  const index_t a_n = a_direct ? san : T * I, a_t = a_direct ? sat : I;
  std::memset(S, 0, sizeof(float) * nb * Qp);
  for (index_t o = 0; o < O; ++o) {
    const index_t cnt = nonzero_examples(Gt, T, O, o, RBp, idx);
    if (cnt == 0) continue;
    const index_t cntp = ceil_div(cnt, MR) * MR;
    for (index_t k = 0; k < cnt; ++k) {  // fixed order over t
      const index_t j = idx[k];
      float* row = R + k * LDR;
      const float* aj = a0 + j * a_n;
      const vf g0 = splat(Gt[o * RBp + j]);
      index_t i = 0;
      for (; i + VL <= I; i += VL) {
        vf acc = g0 * loadu(aj + i);
        for (index_t t = 1; t < T; ++t) acc += splat(Gt[(t * O + o) * RBp + j]) * loadu(aj + t * a_t + i);
        storeu(row + i, acc);
      }
      for (; i < I; ++i) {
        float acc = Gt[o * RBp + j] * aj[i];
        for (index_t t = 1; t < T; ++t) acc += Gt[(t * O + o) * RBp + j] * aj[t * a_t + i];
        row[i] = acc;
      }
    }
    for (index_t k = cnt; k < cntp; ++k) std::memset(R + k * LDR, 0, sizeof(float) * I);
    const float* vo_ptr = VT + o * vo;
    for (index_t q0 = qp0; q0 < qp1; q0 += NR) {
      for (index_t p = 0; p < cntp; p += MR) {
        const index_t rows = std::min<index_t>(MR, cnt - p);
        if (q0 + NR <= Qp)
          sparse_tile<NV>(I, vo_ptr + q0, ldv, R + p * LDR, LDR, idx + p, rows, S + q0, Qp);
#if defined(__AVX512F__)
        else if (Q - q0 <= 8)
          sparse_tile_8(I, vo_ptr + q0, ldv, R + p * LDR, LDR, idx + p, rows, S + q0, Qp);
#endif
        else
          sparse_tile<1>(I, vo_ptr + q0, ldv, R + p * LDR, LDR, idx + p, rows, S + q0, Qp);
      }
    }
  }
}

// ---- a and g both sparse (score_pairwise_sparse_ag_cpu) ----

// s[0 .. W·VL) += scale · Σ_k r[k] · V[idx[k]][0 .. W·VL): one formed row of G_n (compressed to its nonzero
// columns idx) times the matching rows of V (row stride ldv). U accumulator sets (k mod U) keep U·W FMA
// chains in flight; the order is fixed by the shapes alone.
template <int W, int U>
static inline void gather_row(const float* __restrict V, index_t ldv, const int32_t* __restrict idx,
                              const float* __restrict r, index_t nnz, float scale, float* __restrict s) {
  vf acc[U][W] = {};
  index_t k = 0;
  for (; k + U <= nnz; k += U) {
#pragma GCC unroll 8
    for (int u = 0; u < U; ++u) {
      const float* vr = V + static_cast<index_t>(idx[k + u]) * ldv;
      const vf x = splat(r[k + u]);
#pragma GCC unroll 16
      for (int w = 0; w < W; ++w) acc[u][w] += x * loadu(vr + w * VL);
    }
  }
  for (int u = 0; k < nnz; ++k, ++u) {
    const float* vr = V + static_cast<index_t>(idx[k]) * ldv;
    const vf x = splat(r[k]);
#pragma GCC unroll 16
    for (int w = 0; w < W; ++w) acc[u][w] += x * loadu(vr + w * VL);
  }
  const vf sc = splat(scale);
#pragma GCC unroll 16
  for (int w = 0; w < W; ++w) {
    vf t = acc[0][w];
#pragma GCC unroll 8
    for (int u = 1; u < U; ++u) t += acc[u][w];
    storeu(s + w * VL, loadu(s + w * VL) + sc * t);
  }
}

static inline void gather_row_any(int w, const float* V, index_t ldv, const int32_t* idx, const float* r,
                                  index_t nnz, float scale, float* s) {
  switch (w) {
    case 1: return gather_row<1, 8>(V, ldv, idx, r, nnz, scale, s);
    case 2: return gather_row<2, 4>(V, ldv, idx, r, nnz, scale, s);
    case 3: return gather_row<3, 3>(V, ldv, idx, r, nnz, scale, s);
    default: return gather_row<4, 2>(V, ldv, idx, r, nnz, scale, s);
  }
}

// Query vectors per pass over one output's listed examples: V[o]'s slice for the pass stays in cache (about
// L1-sized at I = 129). 4 measured fastest of 1..8 at I = 65..513 (host B, Zen 4); fewer vectors pay the
// per-row overhead (index, broadcast, the scores' load and store) more often, more leave the slice in L2.
constexpr index_t AG_PANEL = 4;
// Columns of a (rows of V) per pass: a wider layer's compressed rows are contracted one block of about 128
// columns at a time (each pass over the examples then reads about as many rows of V's slice as at I = 129; the
// blocks are equal, so 129 or 257 columns, with their bias column, make one and two blocks, not a 1-column
// tail). In one process, alternating, the time over the sparse-g kernel's went 0.86-0.91 -> 0.80-0.81 at
// I = 257 and 1.06-1.22 -> 0.94-1.02 at I = 513 (40-50 % nonzero a); the same within noise at I = 1025, 30 %.
constexpr index_t AG_COLUMN_BLOCK = 128;
static inline index_t ag_column_blocks(index_t I) {
  return std::max<index_t>(1, (I + AG_COLUMN_BLOCK / 2) / AG_COLUMN_BLOCK);
}

// One task of the sparse-a-and-g kernel: examples n0 .. n0 + nb, query vectors [qv0, qv1). S[j][q] is set.
static void score_block_ag(const float* a, index_t san, index_t sat, index_t sai, const float* g, index_t sgn,
                           index_t sgt, index_t sgo, index_t n0, index_t nb, index_t T, index_t O, index_t I,
                           index_t RBp, index_t LDC, const float* VT, index_t vo, index_t ldv, index_t qv0,
                           index_t qv1, index_t Qp, float* Gt, int32_t* cidx, float* cval, index_t* bnd, float* R,
                           float* S, index_t* idx) {
  const index_t n_ib = ag_column_blocks(I), IB = ceil_div(I, n_ib);
  transpose_g(g, sgn, sgt, sgo, n0, nb, T, O, RBp, Gt);
  // Each example's a compressed to the columns where any token is nonzero: cidx[j][k], cval[j][t][k]; bj[b]: the
  // first k of column block b (columns b·IB ..), bj[n_ib] the example's count.
  for (index_t j = 0; j < nb; ++j) {
    const float* aj = a + (n0 + j) * san;
    int32_t* ci = cidx + j * LDC;
    float* cv = cval + j * T * LDC;
    index_t* bj = bnd + j * (n_ib + 1);
    index_t k = 0;
    for (index_t b = 0; b < n_ib; ++b) {
      bj[b] = k;
      for (index_t i = b * IB; i < std::min(I, (b + 1) * IB); ++i) {
        bool any = false;
        for (index_t t = 0; t < T; ++t) any |= aj[t * sat + i * sai] != 0.0f;
        if (!any) continue;
        ci[k] = static_cast<int32_t>(i);
        for (index_t t = 0; t < T; ++t) cv[t * LDC + k] = aj[t * sat + i * sai];
        ++k;
      }
    }
    bj[n_ib] = k;
  }
  std::memset(S, 0, sizeof(float) * nb * Qp);
  for (index_t o = 0; o < O; ++o) {
    const index_t cnt = nonzero_examples(Gt, T, O, o, RBp, idx);
    if (cnt == 0) continue;
    if (T > 1)  // the compressed rows of G_n: R[k][·] = Σ_t g[j, t, o] · cval[j][t][·] (fixed order over t)
      for (index_t k = 0; k < cnt; ++k) {
        const index_t j = idx[k];
        float* row = R + k * LDC;
        const float* cv = cval + j * T * LDC;
        const index_t nz = bnd[j * (n_ib + 1) + n_ib];
        const float g0 = Gt[o * RBp + j];
        for (index_t e = 0; e < nz; ++e) row[e] = g0 * cv[e];
        for (index_t t = 1; t < T; ++t) {
          const float gt = Gt[(t * O + o) * RBp + j];
          for (index_t e = 0; e < nz; ++e) row[e] += gt * cv[t * LDC + e];
        }
      }
    const float* vo_ptr = VT + o * vo;
    for (index_t b = 0; b < n_ib; ++b)
      for (index_t qv = qv0; qv < qv1; qv += AG_PANEL) {
        const int w = static_cast<int>(std::min<index_t>(AG_PANEL, qv1 - qv));
        const float* vpanel = vo_ptr + qv * VL;
        for (index_t k = 0; k < cnt; ++k) {
          const index_t j = idx[k];
          const index_t* bj = bnd + j * (n_ib + 1);
          const index_t e0 = bj[b], e1 = bj[b + 1];
          if (e0 == e1) continue;
          float* s = S + j * Qp + qv * VL;
          if (T == 1)  // the row is g[j, o] · a_j: a's compressed values, scaled once at the end
            gather_row_any(w, vpanel, ldv, cidx + j * LDC + e0, cval + j * LDC + e0, e1 - e0, Gt[o * RBp + j], s);
          else
            gather_row_any(w, vpanel, ldv, cidx + j * LDC + e0, R + k * LDC + e0, e1 - e0, 1.0f, s);
        }
      }
  }
}

}  // namespace

Status score_pairwise_sparse_g_cpu(const float* v, index_t svq, index_t svo, index_t svi, const float* a,
                                   index_t san, index_t sat, index_t sai, const float* g, index_t sgn, index_t sgt,
                                   index_t sgo, index_t Q, index_t N, index_t T, index_t O, index_t I, float* out,
                                   index_t so_q, index_t so_n, int num_threads) {
  SF_RETURN_IF_ERROR(check_pairwise_args(v, svq, svo, svi, a, san, sat, sai, g, sgn, sgt, sgo, Q, N, T, O, I, out,
                                         so_q, so_n));
  if (Q == 0 || N == 0 || zero_scores_if_empty(Q, N, T, O, I, out, so_q, so_n)) return Status();
  const SparsePlan plan = sparse_plan(Q, N, T, O, I, svq, svo, svi, num_threads);
  const index_t Qp = plan.Qp, NB = plan.NB, n_blocks = plan.n_blocks, RBp = plan.RBp, ldv = plan.ldv, vo = plan.vo;
  AlignedBuffer vpack;
  const float* VT = v_source(plan, v, O, I, vpack);
  if (!VT) return Status(Code::kUnsupported, "score_pairwise_sparse_g_cpu: out of memory");
  const index_t n_qpanels = ceil_div(Qp, NR);
  const index_t n_groups = std::min<index_t>(n_qpanels, ceil_div(2 * plan.nt, n_blocks));
  const index_t n_tasks = n_blocks * n_groups;
  const index_t LDR = ceil_div(I, VL) * VL;  // one formed row of G_n
  int alloc_failed = 0;

#pragma omp parallel num_threads(plan.nt)
  {
    if (!plan.v_direct) pack_v(v, svq, svo, svi, Q, O, I, Qp, vpack.data());
    // Gt[t][o][j] (j = example in the block), a copied to Ar only when its rows are strided, formed rows R.
    AlignedBuffer ar_buf(static_cast<std::size_t>(sai == 1 ? 1 : NB * T * I));
    AlignedBuffer gt_buf(static_cast<std::size_t>(T * O * RBp));
    AlignedBuffer r_buf(static_cast<std::size_t>((RBp + MR) * LDR));
    AlignedBuffer s_buf(static_cast<std::size_t>(NB * Qp));
    std::unique_ptr<index_t[]> idx(new (std::nothrow) index_t[RBp + MR]);
    float *Ar = ar_buf.data(), *Gt = gt_buf.data(), *Rf = r_buf.data(), *S = s_buf.data();
    const bool ok = Ar && Gt && Rf && S && idx;
    if (!ok) {
#pragma omp atomic write
      alloc_failed = 1;
    }
#pragma omp for schedule(static)
    for (index_t task = 0; task < n_tasks; ++task) {
      if (!ok) continue;
      const index_t blk = task / n_groups, grp = task % n_groups;
      const index_t n0 = blk * NB, nb = std::min(NB, N - n0);
      const index_t qp0 = grp * n_qpanels / n_groups * NR;
      const index_t qp1 = std::min(Qp, (grp + 1) * n_qpanels / n_groups * NR);
      score_block(a, san, sat, sai, g, sgn, sgt, sgo, n0, nb, T, O, I, RBp, LDR, VT, vo, ldv, qp0, qp1, Q, Qp, Ar, Gt,
                  Rf, S, idx.get());
      store_scores(S, Qp, qp0, std::min(qp1, Q), n0, nb, out, so_q, so_n);
    }
  }
  if (alloc_failed) return Status(Code::kUnsupported, "score_pairwise_sparse_g_cpu: out of memory");
  return Status();
}

Status score_pairwise_sparse_ag_cpu(const float* v, index_t svq, index_t svo, index_t svi, const float* a,
                                    index_t san, index_t sat, index_t sai, const float* g, index_t sgn, index_t sgt,
                                    index_t sgo, index_t Q, index_t N, index_t T, index_t O, index_t I, float* out,
                                    index_t so_q, index_t so_n, int num_threads) {
  SF_RETURN_IF_ERROR(check_pairwise_args(v, svq, svo, svi, a, san, sat, sai, g, sgn, sgt, sgo, Q, N, T, O, I, out,
                                         so_q, so_n));
  if (Q == 0 || N == 0 || zero_scores_if_empty(Q, N, T, O, I, out, so_q, so_n)) return Status();
  if (I > INT32_MAX) return Status(Code::kUnsupported, "score_pairwise_sparse_ag_cpu: I exceeds int32");
  const SparsePlan plan = sparse_plan(Q, N, T, O, I, svq, svo, svi, num_threads);
  const index_t Qp = plan.Qp, NB = plan.NB, n_blocks = plan.n_blocks, RBp = plan.RBp, ldv = plan.ldv, vo = plan.vo;
  AlignedBuffer vpack;
  const float* VT = v_source(plan, v, O, I, vpack);
  if (!VT) return Status(Code::kUnsupported, "score_pairwise_sparse_ag_cpu: out of memory");
  const index_t n_qvecs = Qp / VL;
  const index_t n_groups = std::min<index_t>(n_qvecs, ceil_div(2 * plan.nt, n_blocks));
  const index_t n_tasks = n_blocks * n_groups;
  const index_t LDC = ceil_div(I, VL) * VL;  // one compressed row
  const index_t n_ib = ag_column_blocks(I);
  int alloc_failed = 0;

#pragma omp parallel num_threads(plan.nt)
  {
    if (!plan.v_direct) pack_v(v, svq, svo, svi, Q, O, I, Qp, vpack.data());
    AlignedBuffer gt_buf(static_cast<std::size_t>(T * O * RBp));
    AlignedBuffer cval_buf(static_cast<std::size_t>(NB * T * LDC));
    AlignedBuffer r_buf(static_cast<std::size_t>(T > 1 ? RBp * LDC : 1));
    AlignedBuffer s_buf(static_cast<std::size_t>(NB * Qp));
    std::unique_ptr<int32_t[]> cidx(new (std::nothrow) int32_t[NB * LDC]);
    std::unique_ptr<index_t[]> bnd(new (std::nothrow) index_t[NB * (n_ib + 1)]);
    std::unique_ptr<index_t[]> idx(new (std::nothrow) index_t[RBp]);
    float *Gt = gt_buf.data(), *Cv = cval_buf.data(), *Rf = r_buf.data(), *S = s_buf.data();
    const bool ok = Gt && Cv && Rf && S && cidx && bnd && idx;
    if (!ok) {
#pragma omp atomic write
      alloc_failed = 1;
    }
#pragma omp for schedule(static)
    for (index_t task = 0; task < n_tasks; ++task) {
      if (!ok) continue;
      const index_t blk = task / n_groups, grp = task % n_groups;
      const index_t n0 = blk * NB, nb = std::min(NB, N - n0);
      const index_t qv0 = grp * n_qvecs / n_groups, qv1 = (grp + 1) * n_qvecs / n_groups;
      score_block_ag(a, san, sat, sai, g, sgn, sgt, sgo, n0, nb, T, O, I, RBp, LDC, VT, vo, ldv, qv0, qv1, Qp, Gt,
                     cidx.get(), Cv, bnd.get(), Rf, S, idx.get());
      store_scores(S, Qp, qv0 * VL, std::min(qv1 * VL, Q), n0, nb, out, so_q, so_n);
    }
  }
  if (alloc_failed) return Status(Code::kUnsupported, "score_pairwise_sparse_ag_cpu: out of memory");
  return Status();
}

}  // namespace sf
