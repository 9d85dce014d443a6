// Torch-free CUDA building blocks shared by csrc/<op>/<op>.cu (include from .cu files only).
//
// * Error handling: every launch is followed by SF_CUDA_CHECK_LAUNCH(), which returns the error as
//   a sf::Status (never prints and continues).
// * Inputs of float32 / float16 / bfloat16 are read through to_f32(); accumulation is fp32.
// * A generic tiled shared-memory GEMM (64 x 64 tile, BK = 16, 256 threads, 4 x 4 per thread) with
//   arbitrary element strides, batch and split-K, optional per-k and elementwise scaling of B and an
//   "upper triangle only" mode. Correctness first: no tensor cores.
// * Determinism: no atomics anywhere. Each output element (or split-K partial) is summed by one
//   thread in a fixed order, and split partials are reduced in split order by a separate kernel.
//   The number of splits depends only on the shapes, never on the device, so results are bitwise
//   reproducible run to run.
// * Offsets are int64.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "source_fast/common.h"

#define SF_CUDA_CHECK(expr)                                                                          \
  do {                                                                                               \
    cudaError_t sf_err_ = (expr);                                                                    \
    if (sf_err_ != cudaSuccess)                                                                      \
      return ::sf::Status(::sf::Code::kCudaError, ::sf::str_cat(__FILE__, ":", __LINE__, ": ", #expr, \
                                                              " failed: ", cudaGetErrorName(sf_err_), \
                                                              ": ", cudaGetErrorString(sf_err_)));   \
  } while (0)

// After a <<<...>>> launch: configuration errors surface here, asynchronous faults at the next sync.
#define SF_CUDA_CHECK_LAUNCH(kernel_name)                                                              \
  do {                                                                                                \
    cudaError_t sf_err_ = cudaGetLastError();                                                         \
    if (sf_err_ != cudaSuccess)                                                                       \
      return ::sf::Status(::sf::Code::kCudaError, ::sf::str_cat("launch of ", kernel_name, " failed: ", \
                                                              cudaGetErrorName(sf_err_), ": ",        \
                                                              cudaGetErrorString(sf_err_)));          \
  } while (0)

namespace sf {
namespace cuda {

__device__ __forceinline__ float to_f32(float x) { return x; }
__device__ __forceinline__ float to_f32(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_f32(__nv_bfloat16 x) { return __bfloat162float(x); }

// fp32 -> a storage type: itself, or a 16-bit one rounded to nearest even (what torch's .to() and Triton's casts do).
template <typename T>
__device__ __forceinline__ T from_f32(float x);
template <>
__device__ __forceinline__ float from_f32<float>(float x) {
  return x;
}
template <>
__device__ __forceinline__ __half from_f32<__half>(float x) {
  return __float2half_rn(x);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

template <typename T>
struct TypeTag {
  using type = T;
};

// Calls fn(TypeTag<T>{}) for the storage type of `code` (float32/float16/bfloat16).
template <typename Fn>
inline Status dispatch_float(int code, const char* name, Fn&& fn) {
  switch (code) {
    case kFloat32: return fn(TypeTag<float>{});
    case kFloat16: return fn(TypeTag<__half>{});
    case kBFloat16: return fn(TypeTag<__nv_bfloat16>{});
    default:
      return invalid_argument(name, ": expected dtype in {float32, float16, bfloat16}, got ", dtype_name(code),
                              " (code ", code, ")");
  }
}

constexpr int kTile = 64;     // output tile edge
constexpr int kBK = 16;       // reduction step held in shared memory
constexpr int kThreads = 256; // 16 x 16 threads, 4 x 4 outputs each
constexpr int kPromoteSteps = 16;  // K-steps per partial sum before it joins the running total
constexpr int kMaxGridYZ = 65535;

inline Status check_grid_dim(const char* what, index_t blocks) {
  if (blocks > kMaxGridYZ)
    return invalid_argument(what, ": needs ", blocks, " thread blocks in a grid dimension limited to ", kMaxGridYZ);
  return Status();
}

// Split count for a reduction of length K over `tiles` output tiles: enough blocks to fill a large
// GPU (~264 blocks) while keeping >= min_chunk reduction steps per split. Depends on shapes only.
inline index_t choose_splits(index_t tiles, index_t K, index_t min_chunk) {
  if (tiles <= 0 || K <= 0) return 1;
  index_t want = ceil_div(264, tiles);
  index_t cap = ceil_div(K, min_chunk);
  index_t s = want < cap ? want : cap;
  if (s < 1) s = 1;
  if (s > 1024) s = 1024;
  return s;
}

// C[b, s][m, n] = alpha * Σ_{k in split s} A[b](m, k) * B'[b](k, n)  (+ C when accumulate), where
// B'(k, n) = B(k, n) * kscale[k] * bscale[k, n] (each scale optional).
template <typename TA, typename TB>
struct GemmParams {
  const TA* A = nullptr;
  index_t sAb = 0, sAm = 0, sAk = 0;
  const TB* B = nullptr;
  index_t sBb = 0, sBk = 0, sBn = 0;
  const float* kscale = nullptr;  // [K], stride sks
  index_t sks = 0;
  const float* bscale = nullptr;  // [K, N], strides sbk, sbn (shared by all batches)
  index_t sbk = 0, sbn = 0;
  float* C = nullptr;
  index_t sCb = 0, sCs = 0, sCm = 0, sCn = 0;  // batch, split, row, col strides
  index_t M = 0, N = 0, K = 0;
  index_t batch = 1;
  index_t splits = 1;
  index_t k_per_split = 0;  // multiple of kBK (0: whole K)
  float alpha = 1.0f;
  bool accumulate = false;
  bool upper_only = false;  // skip (m > n) outputs and tiles entirely below the diagonal
};

template <typename TA, typename TB>
__global__ void __launch_bounds__(kThreads) gemm_kernel(GemmParams<TA, TB> p, index_t batch_offset) {
  __shared__ float As[kBK][kTile + 4];
  __shared__ float Bs[kBK][kTile + 4];
  const index_t m0 = static_cast<index_t>(blockIdx.x) * kTile;
  const index_t n0 = static_cast<index_t>(blockIdx.y) * kTile;
  if (p.upper_only && n0 + kTile <= m0) return;  // every (m, n) of the tile has n < m
  const index_t z = static_cast<index_t>(blockIdx.z);
  const index_t b = batch_offset + z / p.splits;
  const index_t s = z % p.splits;
  const index_t kps = p.k_per_split > 0 ? p.k_per_split : p.K;
  const index_t k_begin = s * kps;
  const index_t k_end = k_begin + kps < p.K ? k_begin + kps : p.K;
  const TA* A = p.A + b * p.sAb;
  const TB* B = p.B + b * p.sBb;
  const int tid = threadIdx.x;
  const int tx = tid % 16, ty = tid / 16;
  // Two-level sum: `part` over kPromoteSteps K-steps, then added to `acc`, so no single fp32 chain runs over
  // a whole split (a 4M-row covariance exceeded its bound on an H200 with one accumulator).
  float acc[4][4], part[4][4];
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) acc[i][j] = part[i][j] = 0.0f;
  int steps = 0;

  const bool a_k_fast = (p.sAk == 1);  // choose the coalesced loading order
  const bool b_n_fast = (p.sBn == 1) || (p.sBk != 1);
  for (index_t k0 = k_begin; k0 < k_end; k0 += kBK) {
    for (int e = tid; e < kTile * kBK; e += kThreads) {
      int mm, kk;
      if (a_k_fast) {
        kk = e % kBK;
        mm = e / kBK;
      } else {
        mm = e % kTile;
        kk = e / kTile;
      }
      const index_t m = m0 + mm, k = k0 + kk;
      As[kk][mm] = (m < p.M && k < k_end) ? to_f32(A[m * p.sAm + k * p.sAk]) : 0.0f;
    }
    for (int e = tid; e < kTile * kBK; e += kThreads) {
      int nn, kk;
      if (b_n_fast) {
        nn = e % kTile;
        kk = e / kTile;
      } else {
        kk = e % kBK;
        nn = e / kBK;
      }
      const index_t n = n0 + nn, k = k0 + kk;
      float val = 0.0f;
      if (n < p.N && k < k_end) {
        val = to_f32(B[k * p.sBk + n * p.sBn]);
        if (p.kscale) val *= p.kscale[k * p.sks];
        if (p.bscale) val *= p.bscale[k * p.sbk + n * p.sbn];
      }
      Bs[kk][nn] = val;
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < kBK; ++kk) {
      float a[4], bb[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) a[i] = As[kk][ty * 4 + i];
#pragma unroll
      for (int j = 0; j < 4; ++j) bb[j] = Bs[kk][tx * 4 + j];
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) part[i][j] = fmaf(a[i], bb[j], part[i][j]);
    }
    __syncthreads();
    if (++steps == kPromoteSteps) {
      steps = 0;
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          acc[i][j] += part[i][j];
          part[i][j] = 0.0f;
        }
    }
  }
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) acc[i][j] += part[i][j];
  float* C = p.C + b * p.sCb + s * p.sCs;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const index_t m = m0 + ty * 4 + i;
    if (m >= p.M) continue;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const index_t n = n0 + tx * 4 + j;
      if (n >= p.N || (p.upper_only && n < m)) continue;
      float* dst = C + m * p.sCm + n * p.sCn;
      const float v = p.alpha * acc[i][j];
      *dst = p.accumulate ? *dst + v : v;
    }
  }
}

template <typename TA, typename TB>
inline Status launch_gemm(GemmParams<TA, TB> p, cudaStream_t stream) {
  if (p.M <= 0 || p.N <= 0 || p.batch <= 0) return Status();
  if (p.splits < 1) p.splits = 1;
  if (p.k_per_split <= 0 || p.splits == 1) p.k_per_split = p.K;
  if (p.splits > 1 && p.k_per_split % kBK != 0)
    return invalid_argument("gemm: k_per_split must be a multiple of ", kBK, ", got ", p.k_per_split);
  const index_t gx = ceil_div(p.M, kTile), gy = ceil_div(p.N, kTile);
  if (gx > 2147483647) return invalid_argument("gemm: M = ", p.M, " needs too many thread blocks");
  SF_RETURN_IF_ERROR(check_grid_dim("gemm (N tiles)", gy));
  if (p.splits > kMaxGridYZ) return invalid_argument("gemm: splits = ", p.splits, " exceeds ", kMaxGridYZ);
  if (p.K <= 0) {
    // Empty reduction: the result is 0 (or C unchanged when accumulating).
    if (p.accumulate) return Status();
    p.K = 0;
  }
  const index_t batches_per_launch = kMaxGridYZ / p.splits;
  for (index_t b0 = 0; b0 < p.batch; b0 += batches_per_launch) {
    const index_t nb = (p.batch - b0) < batches_per_launch ? (p.batch - b0) : batches_per_launch;
    dim3 grid(static_cast<unsigned>(gx), static_cast<unsigned>(gy), static_cast<unsigned>(nb * p.splits));
    gemm_kernel<TA, TB><<<grid, kThreads, 0, stream>>>(p, b0);
    SF_CUDA_CHECK_LAUNCH("gemm_kernel");
  }
  return Status();
}

// out[i] (+)= Σ_s part[s * stride_s + i] for i < n, summed in split order.
static __global__ void __launch_bounds__(256) reduce_splits_kernel(const float* __restrict__ part, index_t splits,
                                                            index_t stride_s, index_t n, float* __restrict__ out,
                                                            index_t stride_out, bool accumulate) {
  const index_t i = static_cast<index_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n) return;
  float total = 0.0f;
  for (index_t s = 0; s < splits; ++s) total += part[s * stride_s + i];
  float* dst = out + i * stride_out;
  *dst = accumulate ? *dst + total : total;
}

inline Status launch_reduce_splits(const float* part, index_t splits, index_t stride_s, index_t n, float* out,
                                   index_t stride_out, bool accumulate, cudaStream_t stream) {
  if (n <= 0) return Status();
  const index_t blocks = ceil_div(n, 256);
  if (blocks > 2147483647) return invalid_argument("reduce: n = ", n, " is too large");
  reduce_splits_kernel<<<static_cast<unsigned>(blocks), 256, 0, stream>>>(part, splits, stride_s, n, out, stride_out,
                                                                         accumulate);
  SF_CUDA_CHECK_LAUNCH("reduce_splits_kernel");
  return Status();
}

// 2D variant for a strided [rows, cols] output: out[r, c] (+)= Σ_s part[s][r * cols + c].
static __global__ void __launch_bounds__(256) reduce_splits_2d_kernel(const float* __restrict__ part, index_t splits,
                                                               index_t rows, index_t cols, float* __restrict__ out,
                                                               index_t so_r, index_t so_c, bool accumulate) {
  const index_t i = static_cast<index_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const index_t n = rows * cols;
  if (i >= n) return;
  float total = 0.0f;
  for (index_t s = 0; s < splits; ++s) total += part[s * n + i];
  float* dst = out + (i / cols) * so_r + (i % cols) * so_c;
  *dst = accumulate ? *dst + total : total;
}

inline Status launch_reduce_splits_2d(const float* part, index_t splits, index_t rows, index_t cols, float* out,
                                      index_t so_r, index_t so_c, bool accumulate, cudaStream_t stream) {
  if (rows <= 0 || cols <= 0) return Status();
  const index_t blocks = ceil_div(rows * cols, 256);
  if (blocks > 2147483647) return invalid_argument("reduce: ", rows, " x ", cols, " is too large");
  reduce_splits_2d_kernel<<<static_cast<unsigned>(blocks), 256, 0, stream>>>(part, splits, rows, cols, out, so_r, so_c,
                                                                            accumulate);
  SF_CUDA_CHECK_LAUNCH("reduce_splits_2d_kernel");
  return Status();
}

inline Status check_workspace(index_t have, index_t need, const float* ptr) {
  if (have < need)
    return invalid_argument("workspace: expected at least ", need, " float32 elements, got ", have);
  if (need > 0 && ptr == nullptr) return invalid_argument("workspace: expected a non-null pointer, got null");
  return Status();
}

// Per-example gradient tile in registers: r[i][j] = Σ_t gs[n,t,o0+4ty+i] · as[n,t,i0+4tx+j] for one
// example n, tokens staged kBK at a time through shared memory (Gs, Xs). Shared by lambda_accum
// (which squares and sums r over examples) and score_self (which weighs r² and sums per example).
__device__ __forceinline__ void example_gradient_tile(const float* __restrict__ gs, const float* __restrict__ as,
                                                      index_t n, index_t T, index_t O, index_t I, index_t o0,
                                                      index_t i0, float (*Gs)[kTile + 4], float (*Xs)[kTile + 4],
                                                      int tid, int tx, int ty, float r[4][4]) {
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) r[i][j] = 0.0f;
  for (index_t t0 = 0; t0 < T; t0 += kBK) {
    const int tc = static_cast<int>(T - t0 < kBK ? T - t0 : kBK);
    for (int e = tid; e < kTile * tc; e += kThreads) {
      const int tt = e / kTile, cc = e % kTile;
      const index_t row = n * T + t0 + tt;
      Gs[tt][cc] = (o0 + cc < O) ? gs[row * O + o0 + cc] : 0.0f;
      Xs[tt][cc] = (i0 + cc < I) ? as[row * I + i0 + cc] : 0.0f;
    }
    __syncthreads();
    for (int tt = 0; tt < tc; ++tt) {
      float a[4], b[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) a[i] = Gs[tt][ty * 4 + i];
#pragma unroll
      for (int j = 0; j < 4; ++j) b[j] = Xs[tt][tx * 4 + j];
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) r[i][j] = fmaf(a[i], b[j], r[i][j]);
    }
    __syncthreads();
  }
}

}  // namespace cuda
}  // namespace sf

namespace sf {
namespace cuda {

// Row stride of the [N*T, F] view of a [N, T, F] token tensor, or an error when it is not flattenable.
inline Status flat_row_stride(const char* name, index_t N, index_t T, index_t sn, index_t st, index_t* row_stride) {
  if (T == 1 || N <= 1) {
    *row_stride = (T == 1) ? sn : st;
    return Status();
  }
  if (sn != T * st)
    return invalid_argument(name, ": expected (example, token) dimensions that flatten (stride(0) == ", T,
                            " * stride(1) = ", T * st, "), got stride(0) = ", sn, "; pass a contiguous tensor");
  *row_stride = st;
  return Status();
}

// Rotates tokens: out[r, :] = x[r, :] @ q for the N*T rows of x [N, T, F] (dtype T_in); q [F, F] float32
// with strides; out [N*T, F] float32 contiguous.
template <typename TIn>
inline Status rotate_tokens(const TIn* x, index_t row_stride, index_t sf_, const float* q, index_t sq0, index_t sq1,
                            index_t rows, index_t F, float* out, cudaStream_t stream) {
  GemmParams<TIn, float> p;
  p.A = x;
  p.sAm = row_stride;
  p.sAk = sf_;
  p.B = q;
  p.sBk = sq0;
  p.sBn = sq1;
  p.C = out;
  p.sCm = F;
  p.sCn = 1;
  p.M = rows;
  p.N = F;
  p.K = F;
  return launch_gemm(p, stream);
}

}  // namespace cuda
}  // namespace sf
