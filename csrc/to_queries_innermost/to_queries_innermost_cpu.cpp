// to_queries_innermost on CPU (see to_queries_innermost.h). A task owns a block of columns; per block of 16
// queries it reads 16 row pieces of 16 floats, transposes them in registers (cpu::transpose16x16), scales
// each column by r and writes it as one 64-byte line (streamed past 64 MiB: the scoring kernel reads the
// result much later). Every element is one product, so the result does not depend on the thread count.
#include "to_queries_innermost/to_queries_innermost.h"

#include <algorithm>
#include <cstdint>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "source_fast/cpu_microkernel.h"

namespace sf {
namespace {

using namespace cpu;
constexpr index_t COLS_PER_TASK = 256;
constexpr index_t QB = 16;  // queries per line
constexpr double STREAM_MIN_BYTES = 64.0 * (1 << 20);

// Columns [c0, c1) of queries [q0, q0 + lanes), one element at a time (edges, and builds without AVX-512).
inline void columns_scalar(const float* x, index_t sxq, const float* r, index_t q0, index_t nq, index_t lanes,
                           index_t c0, index_t c1, float* out, index_t ldo) {
  for (index_t c = c0; c < c1; ++c) {
    float* d = out + c * ldo + q0;
    const float s = r ? r[c] : 1.0f;
    index_t j = 0;
    for (; j < nq; ++j) d[j] = r ? x[(q0 + j) * sxq + c] * s : x[(q0 + j) * sxq + c];
    for (; j < lanes; ++j) d[j] = 0.0f;
  }
}

}  // namespace

Status to_queries_innermost_cpu(const float* x, index_t sxq, const float* r, index_t Q, index_t C, float* out,
                                index_t ldo, index_t qs, int num_threads) {
  SF_RETURN_IF_ERROR(check_strided("x", {Q, C}, {sxq, 1}));
  SF_RETURN_IF_ERROR(check_strided("out", {C, qs}, {ldo, 1}));
  if (qs < Q) return invalid_argument("qs: expected >= Q = ", Q, ", got ", qs);
  if (C > 1 && ldo < qs) return invalid_argument("ldo: expected >= qs = ", qs, " (rows must not overlap), got ", ldo);
  if (Q > 1 && sxq < C) return invalid_argument("sxq: expected >= C = ", C, " (rows must not overlap), got ", sxq);
  SF_RETURN_IF_ERROR(check_ptr("x", x, Q * C));
  SF_RETURN_IF_ERROR(check_ptr("out", out, C * qs));
  if (C == 0 || qs == 0) return Status();
  const int nt = threads_for(static_cast<double>(Q) * C, 1.0e6, num_threads);
  const index_t n_tasks = ceil_div(C, COLS_PER_TASK);
#if defined(__AVX512F__)
  const bool stream = static_cast<double>(C) * qs * sizeof(float) > STREAM_MIN_BYTES;
#endif

#pragma omp parallel num_threads(nt)
  {
#pragma omp for schedule(static)
    for (index_t task = 0; task < n_tasks; ++task) {
      const index_t c0 = task * COLS_PER_TASK, c1 = std::min(C, c0 + COLS_PER_TASK);
      for (index_t q0 = 0; q0 < qs; q0 += QB) {
        const index_t nq = std::clamp<index_t>(Q - q0, 0, QB), lanes = std::min<index_t>(QB, qs - q0);
        index_t c = c0;
#if defined(__AVX512F__)
        if (lanes == QB) {
          for (; c + 16 <= c1; c += 16) {
            __m512 v[16];
            for (index_t j = 0; j < 16; ++j)
              v[j] = j < nq ? _mm512_loadu_ps(x + (q0 + j) * sxq + c) : _mm512_setzero_ps();
            transpose16x16(v);
            float* d = out + c * ldo + q0;
            const bool aligned =
                (reinterpret_cast<std::uintptr_t>(d) | static_cast<std::uintptr_t>(ldo * 4)) % 64 == 0;
            for (int e = 0; e < 16; ++e) {
              const __m512 s = r ? _mm512_mul_ps(v[e], _mm512_set1_ps(r[c + e])) : v[e];
              if (stream && aligned)
                _mm512_stream_ps(d + e * ldo, s);
              else
                _mm512_storeu_ps(d + e * ldo, s);
            }
          }
        }
#endif
        columns_scalar(x, sxq, r, q0, nq, lanes, c, c1, out, ldo);
      }
    }
#if defined(__AVX512F__)
    _mm_sfence();  // the streamed lines are visible before the caller reads the result
#endif
  }
  return Status();
}

}  // namespace sf
