// score_pairwise on CPU for output gradients with many exact zeros (ReLU-gated layers: about half of
// g is 0.0): scores[q, n] = Σ_o V[q,o,:] · (Σ_t g[n,t,o] a[n,t,:]), computed only where g[n,:,o] is
// nonzero.
//
// T == 1: the rows of a whose g[n,o] is nonzero are compressed and contracted; the epilogue multiplies
// by g[n,o] (Q·I·nnz(g) flops instead of Q·N·O·I).
// T > 1 (e.g. a segment's checkpoints stacked as tokens): one row per example and output o where any
// g[n,t,o] is nonzero, formed as Σ_t g[n,t,o] a[n,t,:] (the row of G_n = Σ_t g aᵀ) and contracted:
// Q·I·nnz_n,o flops. ReLU patterns barely move between nearby checkpoints (≈ 52 % of (n, o) nonzero for
// two checkpoints at 50 % each), so this about halves the dense materialised contraction.
//
// A task owns a block of examples, with its token rows transposed ([i][row]). For each output row o,
// the rows whose g[., o] is nonzero are compressed into a contiguous buffer (AVX-512 vcompressps, one
// mask per 16 rows shared by every i) and multiplied by V[:, o, :] with the broadcast micro-kernel
// (MR compressed rows x NR queries, K = I); the epilogue adds g[r, o] · tile into the example's score
// row. Every score is summed in one task, over o then rows in increasing order: bitwise independent of
// the thread count and block size.
//
// V is read as [O][I][queries] (queries innermost, rows of at least ceil(Q / VL) · VL readable
// floats) when it comes that way (svq == 1, svi >= that, svo == I · svi: the pipeline stores it so);
// otherwise it is packed once per call.
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
constexpr index_t SP_CHUNK = 16;        // rows per compression mask
constexpr index_t SP_MAX_EXAMPLES = 512;  // examples per block, at most (V streams once per block)

// Rows r < R of chunk c whose g is nonzero: bit j of the mask = row c·16 + j.
static inline uint32_t nonzero_mask(const float* x) {
#if defined(__AVX512F__)
  return _mm512_cmp_ps_mask(_mm512_loadu_ps(x), _mm512_setzero_ps(), _CMP_NEQ_UQ);
#else
  uint32_t m = 0;
  for (int j = 0; j < SP_CHUNK; ++j) m |= static_cast<uint32_t>(x[j] != 0.0f) << j;
  return m;
#endif
}

// dst[0 .. popcount(mask)) = src[j] for the set bits j in order; may write up to 16 floats.
static inline void compress16(const float* src, uint32_t mask, float* dst) {
#if defined(__AVX512F__)
  _mm512_storeu_ps(dst, _mm512_maskz_compress_ps(static_cast<__mmask16>(mask), _mm512_loadu_ps(src)));
#else
  int k = 0;
  for (int j = 0; j < SP_CHUNK; ++j)
    if (mask >> j & 1u) dst[k++] = src[j];
#endif
}

// S[idx[m] / T][0 .. W·VL) += gv[m] · Σ_i C(i, m) · V[i][0 .. W·VL) for the rows m < rows of one
// panel of MR compressed rows, C(i, m) = c[i * c_i + m * c_m] (V with row stride ldv).
template <int W>
static inline void sparse_tile(index_t I, const float* __restrict b, index_t ldv, const float* __restrict c,
                               index_t c_i, index_t c_m, const index_t* idx, const float* gv, index_t rows,
                               index_t T, float* __restrict S, index_t lds) {
  vf acc[MR][W] = {};
  strided_tile<W>(I, c, c_i, c_m, b, ldv, acc);
  for (index_t m = 0; m < rows; ++m) {
    float* s = S + (idx[m] / T) * lds;
    const vf gk = splat(gv[m]);
    for (int w = 0; w < W; ++w) storeu(s + w * VL, loadu(s + w * VL) + gk * acc[m][w]);
  }
}

// One task of the grouped (T > 1) path: examples n0 .. n0 + nb, query panels [qp0, qp1); S[j][q] is set.
// Per output o, the examples with any nonzero g[n, :, o] get their row of G_n formed in place,
// R[k][i] = Σ_t g[n_k, t, o] a[n_k, t, i] (vectorised over i, a read as it is: T·I flops per row), and
// the rows are contracted with V[o] by the broadcast micro-kernel (MR rows of R x NR queries).
static void grouped_block(const float* a, index_t san, index_t sat, index_t sai, const float* g, index_t sgn,
                          index_t sgt, index_t sgo, index_t n0, index_t nb, index_t T, index_t O, index_t I,
                          index_t RBp, index_t LDR, const float* VT, index_t vo, index_t ldv, index_t qp0,
                          index_t qp1, index_t Qp, float* Ar, float* Gt, float* R, float* S, float* Gv, index_t* idx) {
  // g transposed per token, examples innermost and zero-padded: Gt[t][o][j] (the masks read 16 examples).
  for (index_t t = 0; t < T; ++t) {
    float* gt = Gt + t * O * RBp;
    for (index_t j = 0; j < RBp; ++j) {
      const bool valid = j < nb;
      const float* gr = g + (n0 + (valid ? j : 0)) * sgn + t * sgt;
      for (index_t o = 0; o < O; ++o) gt[o * RBp + j] = valid ? gr[o * sgo] : 0.0f;
    }
  }
  // a rows with unit stride: read in place when they are, else copied once ([j][t][i]).
  const bool a_direct = sai == 1;
  if (!a_direct)
    for (index_t j = 0; j < nb; ++j)
      for (index_t t = 0; t < T; ++t)
        for (index_t i = 0; i < I; ++i) Ar[(j * T + t) * I + i] = a[(n0 + j) * san + t * sat + i * sai];
  const float* a0 = a_direct ? a + n0 * san : Ar;
  const index_t a_n = a_direct ? san : T * I, a_t = a_direct ? sat : I;
  std::memset(S, 0, sizeof(float) * nb * Qp);
  const index_t n_chunks = RBp / SP_CHUNK;
  for (index_t k = 0; k < RBp + MR; ++k) Gv[k] = 1.0f;  // g is folded into the formed rows
  for (index_t o = 0; o < O; ++o) {
    index_t cnt = 0;
    for (index_t c = 0; c < n_chunks; ++c) {  // examples with any nonzero g[n, :, o]
      uint32_t m = 0;
      for (index_t t = 0; t < T; ++t) m |= nonzero_mask(Gt + (t * O + o) * RBp + c * SP_CHUNK);
      for (uint32_t bits = m; bits; bits &= bits - 1) idx[cnt++] = c * SP_CHUNK + __builtin_ctz(bits);
    }
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
          sparse_tile<NV>(I, vo_ptr + q0, ldv, R + p * LDR, 1, LDR, idx + p, Gv + p, rows, 1, S + q0, Qp);
        else
          sparse_tile<1>(I, vo_ptr + q0, ldv, R + p * LDR, 1, LDR, idx + p, Gv + p, rows, 1, S + q0, Qp);
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
  if (Q == 0 || N == 0) return Status();
  if (T == 0 || O == 0 || I == 0) {
    for (index_t q = 0; q < Q; ++q)
      for (index_t n = 0; n < N; ++n) out[q * so_q + n * so_n] = 0.0f;
    return Status();
  }
  const index_t Qp = ceil_div(Q, VL) * VL;  // whole vectors; a last half-width panel when Qp % NR != 0
  const bool v_direct = svq == 1 && svi >= Qp && svo == I * svi;
  AlignedBuffer vpack(v_direct ? 0 : static_cast<std::size_t>(O * I * Qp));
  if (!v_direct && !vpack.data()) return Status(Code::kUnsupported, "score_pairwise_sparse_g_cpu: out of memory");
  const float* VT = v_direct ? v : vpack.data();
  const index_t ldv = v_direct ? svi : Qp, vo = v_direct ? svo : I * Qp;
  const int nt = threads_for(static_cast<double>(Q) * N * T * O * I, 2.0e6, num_threads);
  // Tasks are (block of examples, group of query panels): few, large example blocks (V is read once
  // per block) and query groups for the threads. Neither size changes the result.
  // A multiple of nt blocks of equal size (5000 examples on 2 threads: 6 of 834, not 1024 x 4 + 904: the
  // static schedule would leave one thread a block behind).
  const index_t n_blocks0 = ceil_div(std::max<index_t>(ceil_div(N, SP_MAX_EXAMPLES), nt), nt) * nt;
  const index_t NB = std::max<index_t>(1, ceil_div(N, n_blocks0));
  const index_t n_blocks = ceil_div(N, NB), n_qpanels = ceil_div(Qp, NR);
  const index_t n_groups = std::min<index_t>(n_qpanels, ceil_div(2 * nt, n_blocks));
  const index_t n_tasks = n_blocks * n_groups;
  const bool grouped = T > 1;  // one formed row per (example, o), see the header
  // Rows per task, padded to whole masks: token rows (T == 1) or examples (grouped).
  const index_t RBp = grouped ? ceil_div(NB, SP_CHUNK) * SP_CHUNK : ceil_div(NB * T, SP_CHUNK) * SP_CHUNK;
  const index_t LDC = RBp + MR + SP_CHUNK;                   // compressed rows: padding to MR + store slack
  const index_t LDR = ceil_div(I, VL) * VL;                  // grouped: one formed row of G_n, [k][LDR]
  int alloc_failed = 0;

#pragma omp parallel num_threads(nt)
  {
    if (!v_direct) {
      float* Vp = vpack.data();
#pragma omp for schedule(static)
      for (index_t o = 0; o < O; ++o)
        for (index_t i = 0; i < I; ++i) {
          float* d = Vp + (o * I + i) * Qp;
          for (index_t q = 0; q < Q; ++q) d[q] = v[q * svq + o * svo + i * svi];
          for (index_t q = Q; q < Qp; ++q) d[q] = 0.0f;
        }
    }
    // T == 1: transposed token rows At[i][r], Gt[o][r] and compressed rows C[i][k]. Grouped: Gt[t][o][j]
    // (j = example), a copied to At only when its rows are strided, formed rows R[k][i] in C.
    const index_t tl = grouped ? T : 1;
    AlignedBuffer at_buf(static_cast<std::size_t>(grouped ? (sai == 1 ? 1 : NB * T * I) : I * RBp));
    AlignedBuffer gt_buf(static_cast<std::size_t>(tl * O * RBp));
    AlignedBuffer c_buf(static_cast<std::size_t>(grouped ? (RBp + MR) * LDR : I * LDC));
    AlignedBuffer s_buf(static_cast<std::size_t>(NB * Qp));
    AlignedBuffer gv_buf(static_cast<std::size_t>(LDC));  // >= RBp + MR
    std::unique_ptr<index_t[]> idx(new (std::nothrow) index_t[LDC]);
    std::unique_ptr<uint32_t[]> masks(new (std::nothrow) uint32_t[RBp / SP_CHUNK]);
    std::unique_ptr<index_t[]> pos(new (std::nothrow) index_t[RBp / SP_CHUNK]);
    float *At = at_buf.data(), *Gt = gt_buf.data(), *C = c_buf.data(), *S = s_buf.data(), *Gv = gv_buf.data();
    const bool ok = At && Gt && C && S && Gv && idx && masks && pos;
    if (!ok) {
#pragma omp atomic write
      alloc_failed = 1;
    }
#pragma omp for schedule(static)
    for (index_t task = 0; task < n_tasks; ++task) {
      if (!ok) continue;
      const index_t blk = task / n_groups, grp = task % n_groups;
      const index_t n0 = blk * NB, nb = std::min(NB, N - n0), R = nb * T;
      const index_t qp0 = grp * n_qpanels / n_groups * NR;
      const index_t qp1 = std::min(Qp, (grp + 1) * n_qpanels / n_groups * NR);
      if (grouped) {
        grouped_block(a, san, sat, sai, g, sgn, sgt, sgo, n0, nb, T, O, I, RBp, LDR, VT, vo, ldv, qp0, qp1, Qp, At,
                      Gt, C, S, Gv, idx.get());
        for (index_t j = 0; j < nb; ++j)
          for (index_t q = qp0; q < std::min(qp1, Q); ++q) out[q * so_q + (n0 + j) * so_n] = S[j * Qp + q];
        continue;
      }
      // Token rows of the block, transposed and zero-padded: At[i][r], Gt[o][r], r = (n - n0)·T + t.
      for (index_t r = 0; r < RBp; ++r) {
        const bool valid = r < R;
        const float* ar = a + (n0 + (valid ? r / T : 0)) * san + (valid ? r % T : 0) * sat;
        const float* gr = g + (n0 + (valid ? r / T : 0)) * sgn + (valid ? r % T : 0) * sgt;
        for (index_t i = 0; i < I; ++i) At[i * RBp + r] = valid ? ar[i * sai] : 0.0f;
        for (index_t o = 0; o < O; ++o) Gt[o * RBp + r] = valid ? gr[o * sgo] : 0.0f;
      }
      std::memset(S, 0, sizeof(float) * nb * Qp);
      const index_t n_chunks = RBp / SP_CHUNK;
      for (index_t o = 0; o < O; ++o) {
        const float* go = Gt + o * RBp;
        index_t cnt = 0;
        for (index_t c = 0; c < n_chunks; ++c) {
          const uint32_t m = nonzero_mask(go + c * SP_CHUNK);
          masks[c] = m;
          pos[c] = cnt;
          compress16(go + c * SP_CHUNK, m, Gv + cnt);
          for (uint32_t bits = m; bits; bits &= bits - 1) idx[cnt++] = c * SP_CHUNK + __builtin_ctz(bits);
        }
        if (cnt == 0) continue;
        const index_t cntp = ceil_div(cnt, MR) * MR;
        for (index_t i = 0; i < I; ++i) {
          const float* src = At + i * RBp;
          float* dst = C + i * LDC;
          for (index_t c = 0; c < n_chunks; ++c)
            if (masks[c]) compress16(src + c * SP_CHUNK, masks[c], dst + pos[c]);
          for (index_t k = cnt; k < cntp; ++k) dst[k] = 0.0f;
        }
        const float* vo_ptr = VT + o * vo;
        for (index_t q0 = qp0; q0 < qp1; q0 += NR) {  // V[:, o, q-panel] (I·NR floats) stays in L2
          for (index_t p = 0; p < cntp; p += MR) {
            if (q0 + NR <= Qp)
              sparse_tile<NV>(I, vo_ptr + q0, ldv, C + p, LDC, 1, idx.get() + p, Gv + p, std::min<index_t>(MR, cnt - p),
                              T, S + q0, Qp);
            else
              sparse_tile<1>(I, vo_ptr + q0, ldv, C + p, LDC, 1, idx.get() + p, Gv + p, std::min<index_t>(MR, cnt - p),
                             T, S + q0, Qp);
          }
        }
      }
      for (index_t j = 0; j < nb; ++j)
        for (index_t q = qp0; q < std::min(qp1, Q); ++q) out[q * so_q + (n0 + j) * so_n] = S[j * Qp + q];
    }
  }
  if (alloc_failed) return Status(Code::kUnsupported, "score_pairwise_sparse_g_cpu: out of memory");
  return Status();
}

}  // namespace sf
