// score_pairwise on CUDA: scores = V_flat [Q, O·I] · G_flatᵀ [O·I, N] where each slice of
// G_n = Σ_t g_{n,t} a_{n,t}ᵀ is formed on the fly in shared memory (never written to global memory).
// Split-K over O·I with partials reduced in split order: deterministic.
//
// Two kernels: fp32 inputs take the SIMT one (64 x 64 tiles, 16-wide k steps, fp32 FMAs); fp16/bf16 inputs on
// sm_80 and later take the tensor-core one (128 x 128 tiles, 32-wide k steps, WMMA 16 x 16 x 16 with fp32
// accumulators): the G slice is formed in fp32 and rounded to the inputs' dtype, as the Triton kernel's formed
// tile is, so both contract the same 16-bit G.
#include <mma.h>

#include <type_traits>

#include "score_pairwise/score_pairwise.h"
#include "source_fast/cuda_common.cuh"

namespace sf {
namespace {

using namespace cuda;

constexpr int kTcTile = 128;           // queries and examples per block of the tensor-core kernel
constexpr int kTcBK = 32;              // k = (o, i) pairs per step: two 16-deep WMMA steps
constexpr int kTcThreads = 256;        // 8 warps as 2 (queries) x 4 (examples), each 64 x 32 outputs
[[maybe_unused]] constexpr int kTcLd = kTcBK + 8;  // shared row pitch (elements): 80 B, a multiple of WMMA's 16 B

struct PairPlan {
  index_t splits, k_per_split;
};

// Split-K of the O·I reduction for output tiles of `tile` x `tile` and k steps of `bk`: shapes only, never the
// device, so the summation order is reproducible.
PairPlan plan(index_t Q, index_t N, index_t O, index_t I, index_t tile, index_t bk) {
  const index_t K = O * I;
  const index_t tiles = ceil_div(Q, tile) * ceil_div(N, tile);
  PairPlan p;
  p.splits = choose_splits(tiles, K, 256);
  p.k_per_split = ceil_div(ceil_div(K, p.splits), bk) * bk;
  if (p.k_per_split == 0) p.k_per_split = bk;
  p.splits = K > 0 ? ceil_div(K, p.k_per_split) : 1;
  return p;
}

// Both kernels' arguments (strides in elements; part: [splits, Q, N] fp32 partials) and what they share: the
// reduction range of a split, and the (row, k) entry a k step stages.
template <typename TIn>
struct PairArgs {
  const TIn* v;
  index_t svq, svo, svi;
  const TIn* a;
  index_t san, sat, sai;
  const TIn* g;
  index_t sgn, sgt, sgo;
  index_t Q, N, T, O, I, k_per_split;
  float* part;

  // [k_begin, k_end) of split s over k = (o, i) flattened.
  __device__ __forceinline__ void split_range(index_t s, index_t* k_begin, index_t* k_end) const {
    const index_t K = O * I;
    *k_begin = s * k_per_split;
    *k_end = *k_begin + k_per_split < K ? *k_begin + k_per_split : K;
  }

  struct Entry {
    TIn v;    // V[q, o, i] as stored (0 outside Q or the split)
    float g;  // G_n[o, i] = Σ_t g[n, t, o] a[n, t, i], formed in fp32 (0 outside N or the split)
  };

  // The entry at query row q, example row n and k = (o, i) flattened.
  __device__ __forceinline__ Entry stage(index_t q, index_t n, index_t k, index_t k_end) const {
    const bool kin = k < k_end;
    const index_t o = kin ? k / I : 0, i = kin ? k % I : 0;
    Entry e{(kin && q < Q) ? v[q * svq + o * svo + i * svi] : from_f32<TIn>(0.0f), 0.0f};
    if (kin && n < N) {
      const TIn* gp = g + n * sgn + o * sgo;
      const TIn* ap = a + n * san + i * sai;
      for (index_t t = 0; t < T; ++t) e.g = fmaf(to_f32(gp[t * sgt]), to_f32(ap[t * sat]), e.g);
    }
    return e;
  }
};

// The tensor-core kernel (TIn = __half or __nv_bfloat16; launched on sm_80+ only). Per k step of kTcBK: the block
// stages V[q-block, k-slice] (as stored) and G[n-block, k-slice] (formed over the tokens in fp32, rounded to TIn)
// in shared memory, then each warp adds its 4 x 2 fragments of V · Gᵀ (row-major A = V, column-major B = G rows).
// The fp32 accumulators go out through a per-warp 16 x 16 staging tile, bounds-checked, into this split's partial.
template <typename TIn>
__global__ void __launch_bounds__(kTcThreads) pairwise_tc_kernel(PairArgs<TIn> p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  using namespace nvcuda;
  __shared__ __align__(32) TIn Vs[kTcTile][kTcLd];
  __shared__ __align__(32) TIn Gs[kTcTile][kTcLd];
  __shared__ __align__(32) float Cs[kTcThreads / 32][16][16];
  const index_t n0 = static_cast<index_t>(blockIdx.x) * kTcTile;
  const index_t q0 = static_cast<index_t>(blockIdx.y) * kTcTile;
  const index_t s = blockIdx.z;
  index_t k_begin, k_end;
  p.split_range(s, &k_begin, &k_end);
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int wq = warp / 4, wn = warp % 4;  // the warp's outputs: queries wq*64 + [0, 64), examples wn*32 + [0, 32)
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[4][2];
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 2; ++j) wmma::fill_fragment(acc[i][j], 0.0f);

  for (index_t k0 = k_begin; k0 < k_end; k0 += kTcBK) {
    // a warp covers one row's kTcBK consecutive k: contiguous i, coalesced loads
    for (int e = tid; e < kTcTile * kTcBK; e += kTcThreads) {
      const int rr = e / kTcBK, kk = e % kTcBK;
      const auto entry = p.stage(q0 + rr, n0 + rr, k0 + kk, k_end);
      Vs[rr][kk] = entry.v;
      Gs[rr][kk] = from_f32<TIn>(entry.g);
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < kTcBK; kk += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, TIn, wmma::row_major> fa[4];
      wmma::fragment<wmma::matrix_b, 16, 16, 16, TIn, wmma::col_major> fb[2];
#pragma unroll
      for (int i = 0; i < 4; ++i) wmma::load_matrix_sync(fa[i], &Vs[wq * 64 + i * 16][kk], kTcLd);
#pragma unroll
      for (int j = 0; j < 2; ++j) wmma::load_matrix_sync(fb[j], &Gs[wn * 32 + j * 16][kk], kTcLd);
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 2; ++j) wmma::mma_sync(acc[i][j], fa[i], fb[j], acc[i][j]);
    }
    __syncthreads();
  }
  float* P = p.part + s * p.Q * p.N;
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      wmma::store_matrix_sync(&Cs[warp][0][0], acc[i][j], 16, wmma::mem_row_major);
      __syncwarp();
      for (int e = lane; e < 16 * 16; e += 32) {
        const int r = e / 16, c = e % 16;
        const index_t q = q0 + wq * 64 + i * 16 + r, n = n0 + wn * 32 + j * 16 + c;
        if (q < p.Q && n < p.N) P[q * p.N + n] = Cs[warp][r][c];
      }
      __syncwarp();
    }
#endif
}

// The SIMT kernel (any TIn; fp32 inputs, and 16-bit ones where the tensor-core build is not loaded): 64 x 64
// output tiles, kBK-wide k steps staged in fp32, 4 x 4 outputs per thread by FMAs.
template <typename TIn>
__global__ void __launch_bounds__(kThreads) pairwise_kernel(PairArgs<TIn> p) {
  __shared__ float Vs[kBK][kTile + 4];
  __shared__ float Gs[kBK][kTile + 4];
  const index_t n0 = static_cast<index_t>(blockIdx.x) * kTile;
  const index_t q0 = static_cast<index_t>(blockIdx.y) * kTile;
  const index_t s = blockIdx.z;
  index_t k_begin, k_end;
  p.split_range(s, &k_begin, &k_end);
  const int tid = threadIdx.x, tx = tid % 16, ty = tid / 16;
  float acc[4][4];
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) acc[i][j] = 0.0f;

  for (index_t k0 = k_begin; k0 < k_end; k0 += kBK) {
    for (int e = tid; e < kTile * kBK; e += kThreads) {
      const int rr = e / kBK, kk = e % kBK;  // k fastest: contiguous along i
      const auto entry = p.stage(q0 + rr, n0 + rr, k0 + kk, k_end);
      Vs[kk][rr] = to_f32(entry.v);
      Gs[kk][rr] = entry.g;
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < kBK; ++kk) {
      float x[4], y[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) x[i] = Vs[kk][ty * 4 + i];
#pragma unroll
      for (int j = 0; j < 4; ++j) y[j] = Gs[kk][tx * 4 + j];
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(x[i], y[j], acc[i][j]);
    }
    __syncthreads();
  }
  float* P = p.part + s * p.Q * p.N;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const index_t q = q0 + ty * 4 + i;
    if (q >= p.Q) continue;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const index_t n = n0 + tx * 4 + j;
      if (n < p.N) P[q * p.N + n] = acc[i][j];
    }
  }
}

}  // namespace

// Enough for either kernel (the workspace is asked for before the dtype is known).
index_t score_pairwise_cuda_workspace(index_t Q, index_t N, index_t T, index_t O, index_t I) {
  const index_t simt = plan(Q, N, O, I, kTile, kBK).splits, tc = plan(Q, N, O, I, kTcTile, kTcBK).splits;
  return (simt > tc ? simt : tc) * Q * N;
}

Status score_pairwise_cuda(const void* v, index_t svq, index_t svo, index_t svi, const void* a, index_t san,
                           index_t sat, index_t sai, const void* g, index_t sgn, index_t sgt, index_t sgo, int dtype,
                           index_t Q, index_t N, index_t T, index_t O, index_t I, float* out, index_t so_q,
                           index_t so_n, float* workspace, index_t workspace_numel, std::intptr_t stream_handle) {
  SF_RETURN_IF_ERROR(check_pairwise_args(v, svq, svo, svi, a, san, sat, sai, g, sgn, sgt, sgo, Q, N, T, O, I, out,
                                         so_q, so_n));
  if (Q == 0 || N == 0) return Status();
  cudaStream_t stream = reinterpret_cast<cudaStream_t>(stream_handle);
  return dispatch_float(dtype, "v/a/g", [&](auto tag) -> Status {
    using TT = typename decltype(tag)::type;
    // The tensor-core kernel runs where its build for sm_80 or later is the one loaded for this device (its body
    // is empty below sm_80: a build for older architectures only, or a device JIT-compiling such PTX, takes SIMT).
    bool tensor_cores = false;
    if constexpr (!std::is_same_v<TT, float>) {
      cudaFuncAttributes attr;
      SF_CUDA_CHECK(cudaFuncGetAttributes(&attr, pairwise_tc_kernel<TT>));
      tensor_cores = attr.binaryVersion >= 80;
    }
    const index_t tile = tensor_cores ? kTcTile : kTile;
    const PairPlan pl = plan(Q, N, O, I, tile, tensor_cores ? kTcBK : kBK);
    SF_RETURN_IF_ERROR(check_workspace(workspace_numel, pl.splits * Q * N, workspace));
    SF_RETURN_IF_ERROR(check_grid_dim("score_pairwise (Q tiles)", ceil_div(Q, tile)));
    SF_RETURN_IF_ERROR(check_grid_dim("score_pairwise (splits)", pl.splits));
    const PairArgs<TT> args{static_cast<const TT*>(v), svq, svo, svi, static_cast<const TT*>(a), san, sat, sai,
                            static_cast<const TT*>(g), sgn, sgt, sgo, Q, N, T, O, I, pl.k_per_split, workspace};
    dim3 grid(static_cast<unsigned>(ceil_div(N, tile)), static_cast<unsigned>(ceil_div(Q, tile)),
              static_cast<unsigned>(pl.splits));
    if constexpr (!std::is_same_v<TT, float>) {  // no fp32 instantiation: WMMA has no fp32 operand fragments
      if (tensor_cores) pairwise_tc_kernel<TT><<<grid, kTcThreads, 0, stream>>>(args);
    }
    if (!tensor_cores) pairwise_kernel<TT><<<grid, kThreads, 0, stream>>>(args);
    SF_CUDA_CHECK_LAUNCH(tensor_cores ? "pairwise_tc_kernel" : "pairwise_kernel");
    return launch_reduce_splits_2d(workspace, pl.splits, Q, N, out, so_q, so_n, /*accumulate=*/false, stream);
  });
}

}  // namespace sf
