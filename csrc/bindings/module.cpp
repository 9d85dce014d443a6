// The only PYBIND11_MODULE of source_fast: `source_fast._C`.
//
// Torch-free by design (BUILD_NOTES.md): tensors cross as integer data pointers, sizes, strides in
// elements and dtype codes (sf::DType), CUDA streams as integers. source_fast/_extension.py is the
// torch-side layer that allocates outputs and workspaces and calls these functions.
// Failed structural checks raise ValueError naming the argument, expected and got; CUDA and other
// runtime failures raise RuntimeError. The GIL is released while kernels run.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <tuple>
#include <vector>

#include "covariance/covariance.h"
#include "gemm/gemm.h"
#include "kron_project/kron_project.h"
#include "lambda_accum/lambda_accum.h"
#include "rank_one_product/rank_one_product.h"
#include "score_lowrank/score_lowrank.h"
#include "score_pairwise/score_pairwise.h"
#include "score_per_token/score_per_token.h"
#include "score_self/score_self.h"
#include "source_fast/common.h"
#include "to_queries_innermost/to_queries_innermost.h"
#include "conv_group_grads/conv_group_grads.h"
#include "conv_patch_covariance/conv_patch_covariance.h"
#include "conv_patch_rows/conv_patch_rows.h"
#include "source_fast/cpu_microkernel.h"
#include "source_fast/spectral.h"

namespace py = pybind11;
using sf::index_t;
using ptr_t = std::uintptr_t;

namespace {

#ifdef SOURCE_FAST_WITH_CUDA
constexpr bool kHasCuda = true;
#define SF_CUDA_ONLY(expr) (expr)
#define SF_CUDA_ONLY_VALUE(expr) (expr)
#else
constexpr bool kHasCuda = false;
#define SF_CUDA_ONLY(expr)                                                                                 \
  ::sf::Status(::sf::Code::kUnsupported,                                                                  \
               "source_fast._C was built without CUDA; rebuild with SOURCE_FAST_BUILD_CUDA=1 and nvcc on " \
               "PATH: pip install --no-build-isolation -e .")
#define SF_CUDA_ONLY_VALUE(expr) (throw std::runtime_error("source_fast._C was built without CUDA"), index_t{0})
#endif

void raise_if_error(const sf::Status& s) {
  if (s.ok()) return;
  if (s.code() == sf::Code::kInvalidArgument || s.code() == sf::Code::kOverflow) throw py::value_error(s.message());
  throw std::runtime_error(s.message());
}

void check_dtype(const char* name, int code, std::initializer_list<int> allowed) {
  raise_if_error(sf::check_dtype(name, code, allowed));
}

void check_threads(int n) {
  if (n < 1) throw py::value_error(sf::str_cat("num_threads: expected >= 1, got ", n));
}

template <typename T>
T* as_ptr(ptr_t p) {
  return reinterpret_cast<T*>(p);
}

constexpr std::initializer_list<int> kCudaDtypes = {sf::kFloat32, sf::kFloat16, sf::kBFloat16};

std::vector<sf::SpectralSpec> parse_fns(const std::vector<std::tuple<int, double, double, double, std::int64_t>>& fns) {
  if (fns.empty()) throw py::value_error("fns: expected a non-empty list of (kind, c, damping, eta, steps), got []");
  std::vector<sf::SpectralSpec> out;
  for (std::size_t k = 0; k < fns.size(); ++k) {
    sf::SpectralSpec s{std::get<0>(fns[k]), std::get<1>(fns[k]), std::get<2>(fns[k]), std::get<3>(fns[k]),
                       std::get<4>(fns[k])};
    raise_if_error(sf::check_spectral(s, static_cast<int>(k)));
    out.push_back(s);
  }
  return out;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "source_fast compiled kernels (torch-free; see source_fast/_extension.py for the torch layer)";
  m.attr("HAS_CUDA") = py::bool_(kHasCuda);
  m.attr("CPU_VECTOR_WIDTH") = py::int_(sf::cpu::VL);
#ifdef _OPENMP
  m.attr("HAS_OPENMP") = py::bool_(true);
#else
  m.attr("HAS_OPENMP") = py::bool_(false);
#endif
  m.attr("DTYPE_FLOAT32") = py::int_(static_cast<int>(sf::kFloat32));
  m.attr("DTYPE_FLOAT16") = py::int_(static_cast<int>(sf::kFloat16));
  m.attr("DTYPE_BFLOAT16") = py::int_(static_cast<int>(sf::kBFloat16));
  m.attr("DTYPE_FLOAT64") = py::int_(static_cast<int>(sf::kFloat64));

  // ------------------------------------------------------------------ CPU (float32)
  m.def(
      "covariance_cpu",
      [](ptr_t x, index_t R, index_t D, index_t sxr, index_t sxc, int x_dtype, ptr_t mask, index_t smask,
         int mask_dtype, ptr_t out, index_t ldo, int out_dtype, bool accumulate, int num_threads) {
        check_dtype("x", x_dtype, {sf::kFloat32});
        if (mask) check_dtype("mask", mask_dtype, {sf::kFloat32});
        check_dtype("out", out_dtype, {sf::kFloat32});
        check_threads(num_threads);
        sf::Status s;
        {
          py::gil_scoped_release release;
          s = sf::covariance_cpu(as_ptr<const float>(x), R, D, sxr, sxc, as_ptr<const float>(mask), smask,
                                 as_ptr<float>(out), ldo, accumulate, num_threads);
        }
        raise_if_error(s);
      },
      py::arg("x"), py::arg("R"), py::arg("D"), py::arg("sxr"), py::arg("sxc"), py::arg("x_dtype"), py::arg("mask"),
      py::arg("smask"), py::arg("mask_dtype"), py::arg("out"), py::arg("ldo"), py::arg("out_dtype"),
      py::arg("accumulate"), py::arg("num_threads"),
      "out[D, D] (+)= Σ_r mask_r x_r x_rᵀ (accumulate also symmetrises out first).");

  m.def(
      "lambda_accum_rotated_cpu",
      [](ptr_t gs, index_t sgn, index_t sgt, index_t sgo, ptr_t as, index_t san, index_t sat, index_t sai, int dtype,
         index_t N, index_t T, index_t O, index_t I, ptr_t out, index_t ldo, int out_dtype, int num_threads) {
        check_dtype("gs/as", dtype, {sf::kFloat32});
        check_dtype("out", out_dtype, {sf::kFloat32});
        check_threads(num_threads);
        sf::Status s;
        {
          py::gil_scoped_release release;
          s = sf::lambda_accum_rotated_cpu(as_ptr<const float>(gs), sgn, sgt, sgo, as_ptr<const float>(as), san, sat,
                                           sai, N, T, O, I, as_ptr<float>(out), ldo, num_threads);
        }
        raise_if_error(s);
      },
      py::arg("gs"), py::arg("sgn"), py::arg("sgt"), py::arg("sgo"), py::arg("as_"), py::arg("san"), py::arg("sat"),
      py::arg("sai"), py::arg("dtype"), py::arg("N"), py::arg("T"), py::arg("O"), py::arg("I"), py::arg("out"),
      py::arg("ldo"), py::arg("out_dtype"), py::arg("num_threads"),
      "out[O, I] += Σ_n (Σ_t gs[n,t,:] ⊗ as[n,t,:])² on rotated tokens gs = g Q_S, as = a Q_A.");

  m.def(
      "score_self_rotated_cpu",
      [](ptr_t gs, index_t sgn, index_t sgt, index_t sgo, ptr_t as, index_t san, index_t sat, index_t sai, int dtype,
         index_t N, index_t T, index_t O, index_t I, ptr_t w, index_t sw0, index_t sw1, int w_dtype, ptr_t out,
         index_t so, int out_dtype, int num_threads) {
        check_dtype("gs/as", dtype, {sf::kFloat32});
        check_dtype("weights", w_dtype, {sf::kFloat32});
        check_dtype("out", out_dtype, {sf::kFloat32});
        check_threads(num_threads);
        sf::Status s;
        {
          py::gil_scoped_release release;
          s = sf::score_self_rotated_cpu(as_ptr<const float>(gs), sgn, sgt, sgo, as_ptr<const float>(as), san, sat, sai,
                                         N, T, O, I, as_ptr<const float>(w), sw0, sw1, as_ptr<float>(out), so,
                                         num_threads);
        }
        raise_if_error(s);
      },
      py::arg("gs"), py::arg("sgn"), py::arg("sgt"), py::arg("sgo"), py::arg("as_"), py::arg("san"), py::arg("sat"),
      py::arg("sai"), py::arg("dtype"), py::arg("N"), py::arg("T"), py::arg("O"), py::arg("I"), py::arg("w"),
      py::arg("sw0"), py::arg("sw1"), py::arg("w_dtype"), py::arg("out"), py::arg("so"), py::arg("out_dtype"),
      py::arg("num_threads"), "out[n] = Σ_ij W_ij (Σ_t gs[n,t,i] as[n,t,j])² on rotated tokens.");

  m.def(
      "gemm_batched_cpu",
      [](index_t batch, ptr_t a, index_t sab, index_t sam, index_t sak, ptr_t b, index_t sbb, index_t sbk,
         index_t sbn, ptr_t c, index_t scb, index_t scm, index_t scn, index_t M, index_t N, index_t K,
         int num_threads) {
        check_threads(num_threads);
        sf::Status s;
        {
          py::gil_scoped_release release;
          s = sf::gemm_batched_cpu(batch, as_ptr<const float>(a), sab, sam, sak, as_ptr<const float>(b), sbb, sbk,
                                   sbn, as_ptr<float>(c), scb, scm, scn, M, N, K, num_threads);
        }
        raise_if_error(s);
      },
      py::arg("batch"), py::arg("a"), py::arg("sab"), py::arg("sam"), py::arg("sak"), py::arg("b"), py::arg("sbb"),
      py::arg("sbk"), py::arg("sbn"), py::arg("c"), py::arg("scb"), py::arg("scm"), py::arg("scn"), py::arg("M"),
      py::arg("N"), py::arg("K"), py::arg("num_threads"), "C[b] = A[b] @ B[b] (float32; batch stride 0 broadcasts).");

  m.def(
      "rank_one_product_cpu",
      [](ptr_t l, index_t slp, index_t slo, ptr_t g, index_t sgq, index_t sgo, ptr_t a, index_t saq, index_t sai,
         ptr_t w, index_t swo, index_t swi, index_t P, index_t Q, index_t O, index_t I, ptr_t out, index_t sop,
         index_t soi, index_t qs, int num_threads) {
        check_threads(num_threads);
        sf::Status s;
        {
          py::gil_scoped_release release;
          s = sf::rank_one_product_cpu(as_ptr<const float>(l), slp, slo, as_ptr<const float>(g), sgq, sgo,
                                       as_ptr<const float>(a), saq, sai, as_ptr<const float>(w), swo, swi, P, Q, O, I,
                                       as_ptr<float>(out), sop, soi, qs, num_threads);
        }
        raise_if_error(s);
      },
      py::arg("l"), py::arg("slp"), py::arg("slo"), py::arg("g"), py::arg("sgq"), py::arg("sgo"), py::arg("a"),
      py::arg("saq"), py::arg("sai"), py::arg("w"), py::arg("swo"), py::arg("swi"), py::arg("P"), py::arg("Q"),
      py::arg("O"), py::arg("I"), py::arg("out"), py::arg("sop"), py::arg("soi"), py::arg("qs"),
      py::arg("num_threads"),
      "out[p, i, q] = a[q,i] Σ_o L[p,o] g[q,o] w[o,i] (float32; queries innermost; w = 0: ones).");

  m.def(
      "to_queries_innermost_cpu",
      [](ptr_t x, index_t sxq, ptr_t r, index_t Q, index_t C, ptr_t out, index_t ldo, index_t qs, int num_threads) {
        check_threads(num_threads);
        sf::Status s;
        {
          py::gil_scoped_release release;
          s = sf::to_queries_innermost_cpu(as_ptr<const float>(x), sxq, as_ptr<const float>(r), Q, C,
                                           as_ptr<float>(out), ldo, qs, num_threads);
        }
        raise_if_error(s);
      },
      py::arg("x"), py::arg("sxq"), py::arg("r"), py::arg("Q"), py::arg("C"), py::arg("out"), py::arg("ldo"),
      py::arg("qs"), py::arg("num_threads"),
      "out[c, q] = x[q, c] r[c] (float32; lanes Q..qs zeroed; r = 0: ones).");

  // The kernels of a convolution input share one signature (x, its sizes and strides, the geometry, bias, out).
  using ConvCpuFn = sf::Status (*)(const float*, index_t, index_t, index_t, index_t, index_t, index_t, index_t,
                                   index_t, const sf::ConvGeometry&, bool, float*, int);
  auto def_conv = [&m](const char* name, ConvCpuFn fn, const char* doc) {
    m.def(
        name,
        [fn](ptr_t x, index_t B, index_t C, index_t H, index_t W, index_t sb, index_t sc, index_t sh, index_t sw,
             index_t KH, index_t KW, index_t stride_h, index_t stride_w, index_t dil_h, index_t dil_w,
             index_t pad_top, index_t pad_left, index_t OH, index_t OW, bool bias, ptr_t out, int num_threads) {
          check_threads(num_threads);
          const sf::ConvGeometry geo{KH, KW, stride_h, stride_w, dil_h, dil_w, pad_top, pad_left, OH, OW};
          sf::Status s;
          {
            py::gil_scoped_release release;
            s = fn(as_ptr<const float>(x), B, C, H, W, sb, sc, sh, sw, geo, bias, as_ptr<float>(out), num_threads);
          }
          raise_if_error(s);
        },
        py::arg("x"), py::arg("B"), py::arg("C"), py::arg("H"), py::arg("W"), py::arg("sb"), py::arg("sc"),
        py::arg("sh"), py::arg("sw"), py::arg("KH"), py::arg("KW"), py::arg("stride_h"), py::arg("stride_w"),
        py::arg("dil_h"), py::arg("dil_w"), py::arg("pad_top"), py::arg("pad_left"), py::arg("OH"), py::arg("OW"),
        py::arg("bias"), py::arg("out"), py::arg("num_threads"), doc);
  };
  def_conv("conv_patch_rows_cpu", &sf::conv_patch_rows_cpu,
           "out[b, oh*OW + ow, (c, kh, kw)] = x[b, c, ih, iw] or 0 outside the image; out[..., -1] = 1 with bias "
           "(float32; out contiguous).");
  def_conv("conv_patch_covariance_cpu", &sf::conv_patch_covariance_cpu,
           "out[c] = sum over images and output positions of r r^T, r = (channel c's KH*KW patch, 1 with bias) "
           "(float32; out contiguous [C, D, D], overwritten).");
  m.def(
      "conv_group_grads_cpu",
      [](ptr_t x, index_t B, index_t C, index_t H, index_t W, index_t sb, index_t sc, index_t sh, index_t sw,
         ptr_t gy, index_t M, index_t gsb, index_t gsc, index_t KH, index_t KW, index_t stride_h, index_t stride_w,
         index_t dil_h, index_t dil_w, index_t pad_top, index_t pad_left, index_t OH, index_t OW, bool bias,
         ptr_t out, int num_threads) {
        check_threads(num_threads);
        const sf::ConvGeometry geo{KH, KW, stride_h, stride_w, dil_h, dil_w, pad_top, pad_left, OH, OW};
        sf::Status s;
        {
          py::gil_scoped_release release;
          s = sf::conv_group_grads_cpu(as_ptr<const float>(x), B, C, H, W, sb, sc, sh, sw, as_ptr<const float>(gy),
                                       M, gsb, gsc, geo, bias, as_ptr<float>(out), num_threads);
        }
        raise_if_error(s);
      },
      py::arg("x"), py::arg("B"), py::arg("C"), py::arg("H"), py::arg("W"), py::arg("sb"), py::arg("sc"),
      py::arg("sh"), py::arg("sw"), py::arg("gy"), py::arg("M"), py::arg("gsb"), py::arg("gsc"), py::arg("KH"),
      py::arg("KW"), py::arg("stride_h"), py::arg("stride_w"), py::arg("dil_h"), py::arg("dil_w"),
      py::arg("pad_top"), py::arg("pad_left"), py::arg("OH"), py::arg("OW"), py::arg("bias"), py::arg("out"),
      py::arg("num_threads"),
      "out[b, c, j, k] = sum over output positions of gy[b, c*M + j] times channel c's patch value k (k < KH*KW; "
      "k = KH*KW: gy's sum, with bias) (float32; gy planes contiguous; out contiguous [B, C, M, D], overwritten).");

  // The CPU strategies of score_pairwise share one signature.
  using PairwiseCpuFn = sf::Status (*)(const float*, index_t, index_t, index_t, const float*, index_t, index_t,
                                       index_t, const float*, index_t, index_t, index_t, index_t, index_t, index_t,
                                       index_t, index_t, float*, index_t, index_t, int);
  const std::tuple<const char*, PairwiseCpuFn, const char*> pairwise_cpu[] = {
      {"score_pairwise_cpu", &sf::score_pairwise_cpu, "out[q, n] = Σ_t g[n,t]ᵀ V_q a[n,t] (token-wise, fused)."},
      {"score_pairwise_materialized_cpu", &sf::score_pairwise_materialized_cpu,
       "out[q, n] = ⟨V_q, Σ_t g[n,t] a[n,t]ᵀ⟩ (rows of G_n formed in cache; for T > 1)."},
      {"score_pairwise_sparse_g_cpu", &sf::score_pairwise_sparse_g_cpu,
       "out[q, n] = Σ_t g[n,t]ᵀ V_q a[n,t] over the nonzero g[n,t,o] only (ReLU-gated layers)."},
      {"score_pairwise_sparse_ag_cpu", &sf::score_pairwise_sparse_ag_cpu,
       "out[q, n] = Σ_t g[n,t]ᵀ V_q a[n,t] over the nonzero a[n,t,i] and g[n,t,o] only (ReLU layers' inputs)."},
  };
  for (const auto& [name, fn, doc] : pairwise_cpu) {
    m.def(
        name,
        [fn](ptr_t v, index_t svq, index_t svo, index_t svi, ptr_t a, index_t san, index_t sat, index_t sai, ptr_t g,
             index_t sgn, index_t sgt, index_t sgo, int dtype, index_t Q, index_t N, index_t T, index_t O, index_t I,
             ptr_t out, index_t so_q, index_t so_n, int out_dtype, int num_threads) {
          check_dtype("v/a/g", dtype, {sf::kFloat32});
          check_dtype("out", out_dtype, {sf::kFloat32});
          check_threads(num_threads);
          sf::Status s;
          {
            py::gil_scoped_release release;
            s = fn(as_ptr<const float>(v), svq, svo, svi, as_ptr<const float>(a), san, sat, sai,
                   as_ptr<const float>(g), sgn, sgt, sgo, Q, N, T, O, I, as_ptr<float>(out), so_q, so_n, num_threads);
          }
          raise_if_error(s);
        },
        py::arg("v"), py::arg("svq"), py::arg("svo"), py::arg("svi"), py::arg("a"), py::arg("san"), py::arg("sat"),
        py::arg("sai"), py::arg("g"), py::arg("sgn"), py::arg("sgt"), py::arg("sgo"), py::arg("dtype"), py::arg("Q"),
        py::arg("N"), py::arg("T"), py::arg("O"), py::arg("I"), py::arg("out"), py::arg("so_q"), py::arg("so_n"),
        py::arg("out_dtype"), py::arg("num_threads"), doc);
  }

  m.def(
      "spectral_eval_cpu",
      [](const std::tuple<int, double, double, double, std::int64_t>& fn, ptr_t sigma, index_t n, index_t stride,
         int sigma_dtype, ptr_t out, int out_dtype) {
        check_dtype("sigma", sigma_dtype, {sf::kFloat32});
        check_dtype("out", out_dtype, {sf::kFloat32});
        const sf::SpectralF32 f = sf::to_f32_spec(parse_fns({fn})[0]);
        raise_if_error(sf::check_strided("sigma", {n}, {stride}));
        raise_if_error(sf::check_ptr("sigma", as_ptr<const float>(sigma), n));
        raise_if_error(sf::check_ptr("out", as_ptr<float>(out), n));
        const float* in = as_ptr<const float>(sigma);
        float* o = as_ptr<float>(out);
        py::gil_scoped_release release;
        for (index_t k = 0; k < n; ++k) o[k] = sf::spectral_eval(f, in[k * stride]);
      },
      py::arg("fn"), py::arg("sigma"), py::arg("n"), py::arg("stride"), py::arg("sigma_dtype"), py::arg("out"),
      py::arg("out_dtype"),
      "out[k] = f(sigma[k]) in fp32: the same code the CUDA epilogue runs (fn = (kind, c, damping, eta, steps)).");

  // ------------------------------------------------------------------ CUDA (fp32/fp16/bf16 in, fp32 out)
  m.def(
      "covariance_cuda_workspace",
      [](index_t R, index_t D) -> index_t { return SF_CUDA_ONLY_VALUE(sf::covariance_cuda_workspace(R, D)); },
      py::arg("R"), py::arg("D"));
  m.def(
      "covariance_cuda",
      [](ptr_t x, index_t R, index_t D, index_t sxr, index_t sxc, int x_dtype, ptr_t mask, index_t smask,
         int mask_dtype, ptr_t out, index_t ldo, int out_dtype, bool accumulate, ptr_t workspace,
         index_t workspace_numel, std::intptr_t stream) {
        check_dtype("x", x_dtype, kCudaDtypes);
        if (mask) check_dtype("mask", mask_dtype, {sf::kFloat32});
        check_dtype("out", out_dtype, {sf::kFloat32});
        sf::Status s;
        {
          py::gil_scoped_release release;
          s = SF_CUDA_ONLY(sf::covariance_cuda(as_ptr<const void>(x), x_dtype, R, D, sxr, sxc,
                                               as_ptr<const float>(mask), smask, as_ptr<float>(out), ldo, accumulate,
                                               as_ptr<float>(workspace), workspace_numel, stream));
        }
        raise_if_error(s);
      },
      py::arg("x"), py::arg("R"), py::arg("D"), py::arg("sxr"), py::arg("sxc"), py::arg("x_dtype"), py::arg("mask"),
      py::arg("smask"), py::arg("mask_dtype"), py::arg("out"), py::arg("ldo"), py::arg("out_dtype"),
      py::arg("accumulate"), py::arg("workspace"), py::arg("workspace_numel"), py::arg("stream"));

  m.def(
      "lambda_accum_cuda_workspace",
      [](index_t N, index_t T, index_t O, index_t I) -> index_t {
        return SF_CUDA_ONLY_VALUE(sf::lambda_accum_cuda_workspace(N, T, O, I));
      },
      py::arg("N"), py::arg("T"), py::arg("O"), py::arg("I"));
  m.def(
      "lambda_accum_cuda",
      [](ptr_t a, index_t san, index_t sat, index_t sai, ptr_t g, index_t sgn, index_t sgt, index_t sgo, int dtype,
         ptr_t q_a, index_t sqa0, index_t sqa1, ptr_t q_s, index_t sqs0, index_t sqs1, int q_dtype, index_t N,
         index_t T, index_t O, index_t I, ptr_t out, index_t ldo, int out_dtype, ptr_t workspace,
         index_t workspace_numel, std::intptr_t stream) {
        check_dtype("a/g", dtype, kCudaDtypes);
        check_dtype("q_a/q_s", q_dtype, {sf::kFloat32});
        check_dtype("out", out_dtype, {sf::kFloat32});
        sf::Status s;
        {
          py::gil_scoped_release release;
          s = SF_CUDA_ONLY(sf::lambda_accum_cuda(as_ptr<const void>(a), san, sat, sai, as_ptr<const void>(g), sgn, sgt,
                                                 sgo, dtype, as_ptr<const float>(q_a), sqa0, sqa1,
                                                 as_ptr<const float>(q_s), sqs0, sqs1, N, T, O, I, as_ptr<float>(out),
                                                 ldo, as_ptr<float>(workspace), workspace_numel, stream));
        }
        raise_if_error(s);
      },
      py::arg("a"), py::arg("san"), py::arg("sat"), py::arg("sai"), py::arg("g"), py::arg("sgn"), py::arg("sgt"),
      py::arg("sgo"), py::arg("dtype"), py::arg("q_a"), py::arg("sqa0"), py::arg("sqa1"), py::arg("q_s"),
      py::arg("sqs0"), py::arg("sqs1"), py::arg("q_dtype"), py::arg("N"), py::arg("T"), py::arg("O"), py::arg("I"),
      py::arg("out"), py::arg("ldo"), py::arg("out_dtype"), py::arg("workspace"), py::arg("workspace_numel"),
      py::arg("stream"));

  m.def(
      "score_self_cuda_workspace",
      [](index_t N, index_t T, index_t O, index_t I) -> index_t {
        return SF_CUDA_ONLY_VALUE(sf::score_self_cuda_workspace(N, T, O, I));
      },
      py::arg("N"), py::arg("T"), py::arg("O"), py::arg("I"));
  m.def(
      "score_self_cuda",
      [](ptr_t a, index_t san, index_t sat, index_t sai, ptr_t g, index_t sgn, index_t sgt, index_t sgo, int dtype,
         ptr_t q_s, index_t sqs0, index_t sqs1, ptr_t q_a, index_t sqa0, index_t sqa1, int q_dtype, ptr_t w,
         index_t sw0, index_t sw1, int w_dtype, index_t N, index_t T, index_t O, index_t I, ptr_t out, index_t so,
         int out_dtype, ptr_t workspace, index_t workspace_numel, std::intptr_t stream) {
        check_dtype("a/g", dtype, kCudaDtypes);
        check_dtype("q_s/q_a", q_dtype, {sf::kFloat32});
        check_dtype("weights", w_dtype, {sf::kFloat32});
        check_dtype("out", out_dtype, {sf::kFloat32});
        sf::Status s;
        {
          py::gil_scoped_release release;
          s = SF_CUDA_ONLY(sf::score_self_cuda(as_ptr<const void>(a), san, sat, sai, as_ptr<const void>(g), sgn, sgt,
                                               sgo, dtype, as_ptr<const float>(q_s), sqs0, sqs1,
                                               as_ptr<const float>(q_a), sqa0, sqa1, as_ptr<const float>(w), sw0, sw1,
                                               N, T, O, I, as_ptr<float>(out), so, as_ptr<float>(workspace),
                                               workspace_numel, stream));
        }
        raise_if_error(s);
      },
      py::arg("a"), py::arg("san"), py::arg("sat"), py::arg("sai"), py::arg("g"), py::arg("sgn"), py::arg("sgt"),
      py::arg("sgo"), py::arg("dtype"), py::arg("q_s"), py::arg("sqs0"), py::arg("sqs1"), py::arg("q_a"),
      py::arg("sqa0"), py::arg("sqa1"), py::arg("q_dtype"), py::arg("w"), py::arg("sw0"), py::arg("sw1"),
      py::arg("w_dtype"), py::arg("N"), py::arg("T"), py::arg("O"), py::arg("I"), py::arg("out"), py::arg("so"),
      py::arg("out_dtype"), py::arg("workspace"), py::arg("workspace_numel"), py::arg("stream"));

  m.def(
      "score_pairwise_cuda_workspace",
      [](index_t Q, index_t N, index_t T, index_t O, index_t I) -> index_t {
        return SF_CUDA_ONLY_VALUE(sf::score_pairwise_cuda_workspace(Q, N, T, O, I));
      },
      py::arg("Q"), py::arg("N"), py::arg("T"), py::arg("O"), py::arg("I"));
  m.def(
      "score_pairwise_cuda",
      [](ptr_t v, index_t svq, index_t svo, index_t svi, ptr_t a, index_t san, index_t sat, index_t sai, ptr_t g,
         index_t sgn, index_t sgt, index_t sgo, int dtype, index_t Q, index_t N, index_t T, index_t O, index_t I,
         ptr_t out, index_t so_q, index_t so_n, int out_dtype, ptr_t workspace, index_t workspace_numel,
         std::intptr_t stream) {
        check_dtype("v/a/g", dtype, kCudaDtypes);
        check_dtype("out", out_dtype, {sf::kFloat32});
        sf::Status s;
        {
          py::gil_scoped_release release;
          s = SF_CUDA_ONLY(sf::score_pairwise_cuda(as_ptr<const void>(v), svq, svo, svi, as_ptr<const void>(a), san,
                                                   sat, sai, as_ptr<const void>(g), sgn, sgt, sgo, dtype, Q, N, T, O, I,
                                                   as_ptr<float>(out), so_q, so_n, as_ptr<float>(workspace),
                                                   workspace_numel, stream));
        }
        raise_if_error(s);
      },
      py::arg("v"), py::arg("svq"), py::arg("svo"), py::arg("svi"), py::arg("a"), py::arg("san"), py::arg("sat"),
      py::arg("sai"), py::arg("g"), py::arg("sgn"), py::arg("sgt"), py::arg("sgo"), py::arg("dtype"), py::arg("Q"),
      py::arg("N"), py::arg("T"), py::arg("O"), py::arg("I"), py::arg("out"), py::arg("so_q"), py::arg("so_n"),
      py::arg("out_dtype"), py::arg("workspace"), py::arg("workspace_numel"), py::arg("stream"));

  m.def(
      "score_lowrank_cuda",
      [](ptr_t u, index_t suq, index_t suo, index_t sur, ptr_t w, index_t swq, index_t swi, index_t swr, ptr_t a,
         index_t san, index_t sat, index_t sai, ptr_t g, index_t sgn, index_t sgt, index_t sgo, int dtype, index_t Q,
         index_t N, index_t T, index_t O, index_t I, index_t R, ptr_t out, index_t so_q, index_t so_n, int out_dtype,
         std::intptr_t stream) {
        check_dtype("u/w/a/g", dtype, kCudaDtypes);
        check_dtype("out", out_dtype, {sf::kFloat32});
        sf::Status s;
        {
          py::gil_scoped_release release;
          s = SF_CUDA_ONLY(sf::score_lowrank_cuda(as_ptr<const void>(u), suq, suo, sur, as_ptr<const void>(w), swq,
                                                  swi, swr, as_ptr<const void>(a), san, sat, sai,
                                                  as_ptr<const void>(g), sgn, sgt, sgo, dtype, Q, N, T, O, I, R,
                                                  as_ptr<float>(out), so_q, so_n, stream));
        }
        raise_if_error(s);
      },
      py::arg("u"), py::arg("suq"), py::arg("suo"), py::arg("sur"), py::arg("w"), py::arg("swq"), py::arg("swi"),
      py::arg("swr"), py::arg("a"), py::arg("san"), py::arg("sat"), py::arg("sai"), py::arg("g"), py::arg("sgn"),
      py::arg("sgt"), py::arg("sgo"), py::arg("dtype"), py::arg("Q"), py::arg("N"), py::arg("T"), py::arg("O"),
      py::arg("I"), py::arg("R"), py::arg("out"), py::arg("so_q"), py::arg("so_n"), py::arg("out_dtype"),
      py::arg("stream"), "out[q, n] = Σ_t Σ_r (U_qᵀ g[n,t])_r (W_qᵀ a[n,t])_r (low-rank queries, fused).");

  m.def(
      "score_per_token_cuda",
      [](ptr_t v, index_t svq, index_t svo, index_t svi, ptr_t a, index_t san, index_t sat, index_t sai, ptr_t g,
         index_t sgn, index_t sgt, index_t sgo, int dtype, index_t Q, index_t N, index_t T, index_t O, index_t I,
         ptr_t out, index_t so_q, index_t so_n, index_t so_t, int out_dtype, std::intptr_t stream) {
        check_dtype("v/a/g", dtype, kCudaDtypes);
        check_dtype("out", out_dtype, {sf::kFloat32});
        sf::Status s;
        {
          py::gil_scoped_release release;
          s = SF_CUDA_ONLY(sf::score_per_token_cuda(as_ptr<const void>(v), svq, svo, svi, as_ptr<const void>(a), san,
                                                    sat, sai, as_ptr<const void>(g), sgn, sgt, sgo, dtype, Q, N, T,
                                                    O, I, as_ptr<float>(out), so_q, so_n, so_t, stream));
        }
        raise_if_error(s);
      },
      py::arg("v"), py::arg("svq"), py::arg("svo"), py::arg("svi"), py::arg("a"), py::arg("san"), py::arg("sat"),
      py::arg("sai"), py::arg("g"), py::arg("sgn"), py::arg("sgt"), py::arg("sgo"), py::arg("dtype"), py::arg("Q"),
      py::arg("N"), py::arg("T"), py::arg("O"), py::arg("I"), py::arg("out"), py::arg("so_q"), py::arg("so_n"),
      py::arg("so_t"), py::arg("out_dtype"), py::arg("stream"), "out[q, n, t] = g[n,t]ᵀ V_q a[n,t] (per token, fused).");

  m.def(
      "kron_project_cuda_workspace",
      [](index_t Q, index_t O, index_t I) -> index_t {
        return SF_CUDA_ONLY_VALUE(sf::kron_project_cuda_workspace(Q, O, I));
      },
      py::arg("Q"), py::arg("O"), py::arg("I"));
  m.def(
      "kron_project_cuda",
      [](ptr_t v, index_t svq, index_t svo, index_t svi, int dtype, ptr_t q_s, index_t sqs0, index_t sqs1, ptr_t q_a,
         index_t sqa0, index_t sqa1, ptr_t lam, index_t sl0, index_t sl1, int f32_dtype,
         const std::vector<std::tuple<int, double, double, double, std::int64_t>>& fns, index_t Q, index_t O,
         index_t I, const std::vector<ptr_t>& outs, int out_dtype, ptr_t workspace, index_t workspace_numel,
         std::intptr_t stream) {
        check_dtype("v", dtype, kCudaDtypes);
        check_dtype("q_s/q_a/lam", f32_dtype, {sf::kFloat32});
        check_dtype("outs", out_dtype, {sf::kFloat32});
        std::vector<sf::SpectralSpec> specs = parse_fns(fns);
        if (outs.size() != specs.size())
          throw py::value_error(sf::str_cat("outs: expected ", specs.size(), " output pointers (one per f), got ",
                                            outs.size()));
        std::vector<float*> out_ptrs;
        for (ptr_t p : outs) out_ptrs.push_back(as_ptr<float>(p));
        sf::Status s;
        {
          py::gil_scoped_release release;
          s = SF_CUDA_ONLY(sf::kron_project_cuda(as_ptr<const void>(v), svq, svo, svi, dtype,
                                                 as_ptr<const float>(q_s), sqs0, sqs1, as_ptr<const float>(q_a), sqa0,
                                                 sqa1, as_ptr<const float>(lam), sl0, sl1, specs.data(),
                                                 static_cast<int>(specs.size()), Q, O, I, out_ptrs.data(),
                                                 as_ptr<float>(workspace), workspace_numel, stream));
        }
        raise_if_error(s);
      },
      py::arg("v"), py::arg("svq"), py::arg("svo"), py::arg("svi"), py::arg("dtype"), py::arg("q_s"), py::arg("sqs0"),
      py::arg("sqs1"), py::arg("q_a"), py::arg("sqa0"), py::arg("sqa1"), py::arg("lam"), py::arg("sl0"),
      py::arg("sl1"), py::arg("f32_dtype"), py::arg("fns"), py::arg("Q"), py::arg("O"), py::arg("I"),
      py::arg("outs"), py::arg("out_dtype"), py::arg("workspace"), py::arg("workspace_numel"), py::arg("stream"));
}
