// Register-blocked fp32 building blocks for the C++/OpenMP kernels (torch-free, host only).
//
// Layout convention (BLIS/GotoBLAS): an "A panel" holds MR rows broadcast one scalar at a time,
// packed k-major as [K][MR]; a "B panel" holds NR = NV * VL columns loaded as NV vectors, packed
// k-major as [K][NR] and 64-byte aligned. A micro-kernel keeps the MR x NR tile in registers.
// Vector width follows the target the module is compiled for (-march=native by default, see
// CMakeLists.txt SOURCE_FAST_CPU_NATIVE): AVX-512 16 lanes, AVX/AVX2 8, otherwise 4.
//
// Every reduction here runs in a fixed order that depends only on the shapes, never on the thread
// count or schedule: results are bitwise reproducible.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <new>

#include "source_fast/common.h"

#if defined(__AVX__) || defined(__SSE__)
#include <immintrin.h>
#endif

#ifdef _OPENMP
#include <omp.h>
#endif

namespace sf {
namespace cpu {

#if defined(__AVX512F__)
constexpr int VL = 16;
constexpr int MR = 12;  // 24 accumulators + 2 B vectors + 1 broadcast of 32 zmm
#elif defined(__AVX__)
constexpr int VL = 8;
constexpr int MR = 6;  // 12 accumulators of 16 ymm
#else
constexpr int VL = 4;
constexpr int MR = 4;
#endif
constexpr int NV = 2;
constexpr int NR = NV * VL;
// Rows of the "square" kernels, which hold two tiles (the product and its running square sum).
constexpr int MR2 = MR / 2;

typedef float vf __attribute__((vector_size(VL * sizeof(float))));
typedef float vfu __attribute__((vector_size(VL * sizeof(float)), aligned(4), may_alias));

static inline vf loadu(const float* p) { return *reinterpret_cast<const vfu*>(p); }
static inline vf loada(const float* p) { return *reinterpret_cast<const vf*>(__builtin_assume_aligned(p, 64)); }
static inline void storeu(float* p, vf v) { *reinterpret_cast<vfu*>(p) = v; }
// A broadcast, not `vf{} + x`: that adds +0.0 (which the compiler must keep, since -0.0 + 0.0 is +0.0), a
// scalar add before every register broadcast on the FP pipes the FMAs need; the intrinsic is one broadcast
// from memory, often folded into the FMA ({1to16}). (The sign of an exact zero can differ: nothing else.)
static inline vf splat(float x) {
#if defined(__AVX512F__)
  return reinterpret_cast<vf>(_mm512_set1_ps(x));
#elif defined(__AVX__)
  return reinterpret_cast<vf>(_mm256_set1_ps(x));
#elif defined(__SSE__)
  return reinterpret_cast<vf>(_mm_set1_ps(x));
#else
  return vf{} + x;
#endif
}
static inline float hsum(vf v) {
  // Fixed pairwise order: deterministic.
  float buf[VL];
  std::memcpy(buf, &v, sizeof(buf));
  for (int w = VL / 2; w >= 1; w /= 2)
    for (int j = 0; j < w; ++j) buf[j] += buf[j + w];
  return buf[0];
}

// 64-byte aligned scratch buffer (packing panels).
struct AlignedBuffer {
  float* ptr = nullptr;
  std::size_t n = 0;
  AlignedBuffer() = default;
  explicit AlignedBuffer(std::size_t count) { reset(count); }
  AlignedBuffer(const AlignedBuffer&) = delete;
  AlignedBuffer& operator=(const AlignedBuffer&) = delete;
  ~AlignedBuffer() { std::free(ptr); }
  bool reset(std::size_t count) {
    if (count <= n && ptr) return true;
    std::free(ptr);
    std::size_t bytes = ((count * sizeof(float) + 63) / 64) * 64;
    ptr = static_cast<float*>(std::aligned_alloc(64, bytes > 0 ? bytes : 64));
    n = ptr ? count : 0;
    return ptr != nullptr;
  }
  float* data() { return ptr; }
};

// Packs an A panel: dst[k][m] = src[m * s_row + k * s_k] for m < rows (zero rows up to MR), k < K.
static inline void pack_a_panel(const float* src, index_t s_row, index_t s_k, index_t rows, index_t K, float* dst) {
  for (index_t k = 0; k < K; ++k) {
    float* d = dst + k * MR;
    index_t m = 0;
    for (; m < rows; ++m) d[m] = src[m * s_row + k * s_k];
    for (; m < MR; ++m) d[m] = 0.0f;
  }
}

// c[m][v] (+)= sum_k A[k][m] * B[k][v*VL : (v+1)*VL]  for k in [0, K).
template <int M>
static inline __attribute__((always_inline)) void gemm_tile(index_t K, const float* __restrict A,
                                                              const float* __restrict B, vf (&c)[M][NV]) {
  for (index_t k = 0; k < K; ++k) {
    vf b[NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) b[v] = loada(B + k * NR + v * VL);
#pragma GCC unroll 16
    for (int m = 0; m < M; ++m) {
      vf a = splat(A[k * M + m]);
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) c[m][v] += a * b[v];
    }
  }
}

// c[m][w] (+)= sum_k A[k * a_k + m * a_m] * B[k * ldb + w * VL] for m < MR, w < W, k < K: the
// broadcast micro-kernel on operands read in place (strided A rows, unaligned B rows), for kernels
// whose operands are not packed panels (G formation from token rows, compressed sparse rows).
template <int W>
static inline __attribute__((always_inline)) void strided_tile(index_t K, const float* __restrict A, index_t a_k,
                                                                 index_t a_m, const float* __restrict B, index_t ldb,
                                                                 vf (&c)[MR][W]) {
  for (index_t k = 0; k < K; ++k) {
    vf b[W];
#pragma GCC unroll 2
    for (int w = 0; w < W; ++w) b[w] = loadu(B + k * ldb + w * VL);
    const float* ak = A + k * a_k;
#pragma GCC unroll 16
    for (int m = 0; m < MR; ++m) {
      const vf x = splat(ak[m * a_m]);
#pragma GCC unroll 2
      for (int w = 0; w < W; ++w) c[m][w] += x * b[w];
    }
  }
}

// tile[m][0 .. VL) += Σ_k A[k * MR + m] · B[k * ldb + (0 .. VL)] for m < MR, k < K, of which only columns
// < cols <= VL matter: the last panel of a product whose width is 32k + 1..16 (often an input dimension
// plus the bias column: 129, 257, 513), where the full NR-wide tile would compute mostly padding. With
// at most 8 columns on an AVX-512 build it runs 256-bit FMAs: Zen 4 issues two of those per cycle
// against one 512-bit FMA. A packed [K][MR], B rows readable for VL floats; tile 64-byte aligned.
static inline void narrow_tile(index_t K, const float* __restrict A, const float* __restrict B, index_t ldb,
                               index_t cols, float* __restrict tile) {
#if defined(__AVX512F__)
  if (cols <= 8) {
    typedef float vh __attribute__((vector_size(8 * sizeof(float))));
    typedef float vhu __attribute__((vector_size(8 * sizeof(float)), aligned(4), may_alias));
    vh c[MR];
    for (int m = 0; m < MR; ++m) c[m] = *reinterpret_cast<const vh*>(tile + m * VL);
    for (index_t k = 0; k < K; ++k) {
      const vh b = *reinterpret_cast<const vhu*>(B + k * ldb);
#pragma GCC unroll 16
      for (int m = 0; m < MR; ++m) c[m] += reinterpret_cast<vh>(_mm256_set1_ps(A[k * MR + m])) * b;
    }
    for (int m = 0; m < MR; ++m) *reinterpret_cast<vh*>(tile + m * VL) = c[m];
    return;
  }
#endif
  (void)cols;
  vf c[MR][1];
  for (int m = 0; m < MR; ++m) c[m][0] = loada(tile + m * VL);
  for (index_t k = 0; k < K; ++k) {
    const vf b = loadu(B + k * ldb);
#pragma GCC unroll 16
    for (int m = 0; m < MR; ++m) c[m][0] += splat(A[k * MR + m]) * b;
  }
  for (int m = 0; m < MR; ++m) *reinterpret_cast<vf*>(tile + m * VL) = c[m][0];
}

#if defined(__AVX512F__)
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic push
// GCC 12 reports the _mm512_undefined_ps() pass-through inside the unpack intrinsics as maybe-uninitialized.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
// r[j][e] -> r[e][j] for 16 vectors of 16 floats (unpack ps, unpack pd, two 128-bit lane shuffles): writing
// 16 queries of one row as one 64-byte line of a queries-innermost layout.
static inline void transpose16x16(__m512 (&r)[16]) {
  __m512 t[16];
  for (int k = 0; k < 8; ++k) {
    t[2 * k] = _mm512_unpacklo_ps(r[2 * k], r[2 * k + 1]);      // lane l: r0[4l] r1[4l] r0[4l+1] r1[4l+1]
    t[2 * k + 1] = _mm512_unpackhi_ps(r[2 * k], r[2 * k + 1]);  // lane l: r0[4l+2] r1[4l+2] r0[4l+3] r1[4l+3]
  }
  __m512 u[16];  // u[4b + c] lane l: rows 4b .. 4b+3 at element 4l + c
  for (int b = 0; b < 4; ++b) {
    const __m512d lo0 = _mm512_castps_pd(t[4 * b]), lo1 = _mm512_castps_pd(t[4 * b + 2]);
    const __m512d hi0 = _mm512_castps_pd(t[4 * b + 1]), hi1 = _mm512_castps_pd(t[4 * b + 3]);
    u[4 * b] = _mm512_castpd_ps(_mm512_unpacklo_pd(lo0, lo1));
    u[4 * b + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(lo0, lo1));
    u[4 * b + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(hi0, hi1));
    u[4 * b + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(hi0, hi1));
  }
  for (int c = 0; c < 4; ++c) {
    const __m512 v = _mm512_shuffle_f32x4(u[c], u[4 + c], 0x44), w = _mm512_shuffle_f32x4(u[c], u[4 + c], 0xEE);
    const __m512 x = _mm512_shuffle_f32x4(u[8 + c], u[12 + c], 0x44);
    const __m512 y = _mm512_shuffle_f32x4(u[8 + c], u[12 + c], 0xEE);
    r[c] = _mm512_shuffle_f32x4(v, x, 0x88);
    r[4 + c] = _mm512_shuffle_f32x4(v, x, 0xDD);
    r[8 + c] = _mm512_shuffle_f32x4(w, y, 0x88);
    r[12 + c] = _mm512_shuffle_f32x4(w, y, 0xDD);
  }
}
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic pop
#endif
#endif

template <int M>
static inline void zero_tile(vf (&c)[M][NV]) {
  for (int m = 0; m < M; ++m)
    for (int v = 0; v < NV; ++v) c[m][v] = vf{};
}

// Number of threads for an OpenMP region: 1 below `threshold` units of work (a parallel region on a
// tiny input costs ~100 us under load), else min(requested, available).
static inline int threads_for(double work, double threshold, int requested) {
  if (requested <= 1 || work < threshold) return 1;
#ifdef _OPENMP
  return requested;
#else
  return 1;
#endif
}

// This thread's index inside a parallel region (0 outside one or without OpenMP): per-thread scratch buffers.
static inline index_t thread_index() {
#ifdef _OPENMP
  return omp_get_thread_num();
#else
  return 0;
#endif
}

}  // namespace cpu
}  // namespace sf
