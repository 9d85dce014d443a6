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
  SF_RETURN_IF_ERROR(check_strided("v", {Q, O, I}, {svq, svo, svi}));
  SF_RETURN_IF_ERROR(check_strided("a", {N, T, I}, {san, sat, sai}));
  SF_RETURN_IF_ERROR(check_strided("g", {N, T, O}, {sgn, sgt, sgo}));
  SF_RETURN_IF_ERROR(check_strided("out", {Q, N}, {so_q, so_n}));
  SF_RETURN_IF_ERROR(check_ptr("v", v, Q * O * I));
  SF_RETURN_IF_ERROR(check_ptr("a", a, N * T * I));
  SF_RETURN_IF_ERROR(check_ptr("g", g, N * T * O));
  SF_RETURN_IF_ERROR(check_ptr("out", out, Q * N));
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
        for (index_t i = 0; i < I; ++i) {
          float* d = A + i * MR;
          index_t m = 0;
          for (; m < rows; ++m) d[m] = vq[(o0 + m) * svo + i * svi];
          for (; m < MR; ++m) d[m] = 0.0f;
        }
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
