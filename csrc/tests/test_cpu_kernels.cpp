// Host C++ test of the CPU kernels against naive double-precision loops (run by ctest).
// Odd shapes around the register-tile sizes, strided (column-major) inputs, masks, accumulation,
// and bitwise reproducibility across thread counts.
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <string>
#include <vector>

#include "conv_group_grads/conv_group_grads.h"
#include "conv_patch_covariance/conv_patch_covariance.h"
#include "conv_patch_rows/conv_patch_rows.h"
#include "covariance/covariance.h"
#include "lambda_accum/lambda_accum.h"
#include "rank_one_product/rank_one_product.h"
#include "score_pairwise/score_pairwise.h"
#include "score_self/score_self.h"
#include "to_queries_innermost/to_queries_innermost.h"

using sf::index_t;

namespace {

int g_failures = 0;
std::mt19937 g_rng(1234);

std::vector<float> randn(index_t n) {
  std::normal_distribution<float> d(0.0f, 1.0f);
  std::vector<float> v(static_cast<std::size_t>(n));
  for (auto& x : v) x = d(g_rng);
  return v;
}

void expect_ok(const sf::Status& s, const std::string& what) {
  if (!s.ok()) {
    std::printf("FAIL %s: status %d: %s\n", what.c_str(), static_cast<int>(s.code()), s.message().c_str());
    ++g_failures;
  }
}

// max |got - want| <= tol * max |want|
void expect_close(const std::vector<float>& got, const std::vector<double>& want, double tol, const std::string& what) {
  double err = 0, scale = 1e-30;
  for (std::size_t k = 0; k < want.size(); ++k) {
    err = std::fmax(err, std::fabs(got[k] - want[k]));
    scale = std::fmax(scale, std::fabs(want[k]));
  }
  bool ok = err <= tol * scale && std::isfinite(err);
  std::printf("%s %s: max err %.3g (scale %.3g)\n", ok ? "ok  " : "FAIL", what.c_str(), err, scale);
  if (!ok) ++g_failures;
}

void expect_equal(const std::vector<float>& x, const std::vector<float>& y, const std::string& what) {
  bool ok = x.size() == y.size();
  for (std::size_t k = 0; ok && k < x.size(); ++k) ok = (x[k] == y[k]);
  std::printf("%s %s\n", ok ? "ok  " : "FAIL", what.c_str());
  if (!ok) ++g_failures;
}

void test_covariance(index_t R, index_t D, bool masked, bool col_major, bool accumulate) {
  // x stored row-major [R, D] or column-major (strides (1, R)).
  std::vector<float> x = randn(R * D);
  const index_t sxr = col_major ? 1 : D, sxc = col_major ? R : 1;
  std::vector<float> mask(static_cast<std::size_t>(R));
  for (index_t r = 0; r < R; ++r) mask[r] = masked ? static_cast<float>((r % 3) * 0.5) : 1.0f;
  std::vector<float> out = randn(D * D);
  std::vector<double> want(static_cast<std::size_t>(D * D));
  for (index_t i = 0; i < D; ++i)
    for (index_t j = 0; j < D; ++j) {
      double s = accumulate ? 0.5 * (static_cast<double>(out[i * D + j]) + out[j * D + i]) : 0.0;
      for (index_t r = 0; r < R; ++r) s += static_cast<double>(mask[r]) * x[r * sxr + i * sxc] * x[r * sxr + j * sxc];
      want[i * D + j] = s;
    }
  std::vector<float> out2 = out;
  std::string name = "covariance R=" + std::to_string(R) + " D=" + std::to_string(D) + (masked ? " mask" : "") +
                     (col_major ? " colmajor" : "") + (accumulate ? " accumulate" : "");
  expect_ok(sf::covariance_cpu(x.data(), R, D, sxr, sxc, masked ? mask.data() : nullptr, 1, out.data(), D, accumulate, 2),
            name);
  expect_close(out, want, 1e-5, name);
  bool sym = true;
  for (index_t i = 0; i < D; ++i)
    for (index_t j = 0; j < D; ++j) sym = sym && out[i * D + j] == out[j * D + i];
  if (!sym) {
    std::printf("FAIL %s: not exactly symmetric\n", name.c_str());
    ++g_failures;
  }
  expect_ok(sf::covariance_cpu(x.data(), R, D, sxr, sxc, masked ? mask.data() : nullptr, 1, out2.data(), D, accumulate, 1),
            name);
  expect_equal(out, out2, name + " 1 thread == 2 threads (bitwise)");
}

// gs [N, T, O], as [N, T, I] rotated tokens (contiguous).
std::vector<double> naive_rotated_grads(const std::vector<float>& gs, const std::vector<float>& as, index_t N, index_t T,
                                        index_t O, index_t I) {
  std::vector<double> r(static_cast<std::size_t>(N * O * I), 0.0);
  for (index_t n = 0; n < N; ++n)
    for (index_t o = 0; o < O; ++o)
      for (index_t i = 0; i < I; ++i) {
        double s = 0;
        for (index_t t = 0; t < T; ++t) s += static_cast<double>(gs[(n * T + t) * O + o]) * as[(n * T + t) * I + i];
        r[(n * O + o) * I + i] = s;
      }
  return r;
}

void test_lambda(index_t N, index_t T, index_t O, index_t I) {
  std::vector<float> gs = randn(N * T * O), as = randn(N * T * I), out = randn(O * I);
  std::vector<double> grads = naive_rotated_grads(gs, as, N, T, O, I);
  std::vector<double> want(out.begin(), out.end());
  for (index_t n = 0; n < N; ++n)
    for (index_t k = 0; k < O * I; ++k) want[k] += grads[n * O * I + k] * grads[n * O * I + k];
  std::vector<float> out2 = out;
  std::string name = "lambda_accum N=" + std::to_string(N) + " T=" + std::to_string(T) + " O=" + std::to_string(O) +
                     " I=" + std::to_string(I);
  expect_ok(sf::lambda_accum_rotated_cpu(gs.data(), T * O, O, 1, as.data(), T * I, I, 1, N, T, O, I, out.data(), I, 2),
            name);
  expect_close(out, want, 1e-5, name);
  expect_ok(sf::lambda_accum_rotated_cpu(gs.data(), T * O, O, 1, as.data(), T * I, I, 1, N, T, O, I, out2.data(), I, 1),
            name);
  expect_equal(out, out2, name + " 1 thread == 2 threads (bitwise)");
}

void test_score_self(index_t N, index_t T, index_t O, index_t I) {
  std::vector<float> gs = randn(N * T * O), as = randn(N * T * I), w = randn(O * I);
  for (auto& x : w) x = std::fabs(x);
  std::vector<double> grads = naive_rotated_grads(gs, as, N, T, O, I);
  std::vector<double> want(static_cast<std::size_t>(N), 0.0);
  for (index_t n = 0; n < N; ++n)
    for (index_t k = 0; k < O * I; ++k) want[n] += w[k] * grads[n * O * I + k] * grads[n * O * I + k];
  // Weights passed transposed-strided: w_t[i][o] with strides (1, O) reading w[o][i] = w_t[i * O + o].
  std::vector<float> wt(static_cast<std::size_t>(O * I));
  for (index_t o = 0; o < O; ++o)
    for (index_t i = 0; i < I; ++i) wt[i * O + o] = w[o * I + i];
  std::vector<float> out(static_cast<std::size_t>(N), NAN), out2(static_cast<std::size_t>(N), NAN);
  std::string name = "score_self N=" + std::to_string(N) + " T=" + std::to_string(T) + " O=" + std::to_string(O) +
                     " I=" + std::to_string(I);
  expect_ok(sf::score_self_rotated_cpu(gs.data(), T * O, O, 1, as.data(), T * I, I, 1, N, T, O, I, wt.data(), 1, O,
                                       out.data(), 1, 2),
            name);
  expect_close(out, want, 1e-5, name);
  expect_ok(sf::score_self_rotated_cpu(gs.data(), T * O, O, 1, as.data(), T * I, I, 1, N, T, O, I, wt.data(), 1, O,
                                       out2.data(), 1, 1),
            name);
  expect_equal(out, out2, name + " 1 thread == 2 threads (bitwise)");
}

void test_score_pairwise(index_t Q, index_t N, index_t T, index_t O, index_t I) {
  std::vector<float> v = randn(Q * O * I), a = randn(N * T * I), g = randn(N * T * O);
  std::vector<double> want(static_cast<std::size_t>(Q * N), 0.0);
  for (index_t q = 0; q < Q; ++q)
    for (index_t n = 0; n < N; ++n) {
      double s = 0;
      for (index_t t = 0; t < T; ++t)
        for (index_t o = 0; o < O; ++o) {
          double va = 0;
          for (index_t i = 0; i < I; ++i) va += static_cast<double>(v[(q * O + o) * I + i]) * a[(n * T + t) * I + i];
          s += va * g[(n * T + t) * O + o];
        }
      want[q * N + n] = s;
    }
  // Both strategies (token-wise, materialised); output written transposed (strides (1, Q)) to exercise
  // output strides.
  for (auto fn : {&sf::score_pairwise_cpu, &sf::score_pairwise_materialized_cpu}) {
    std::vector<float> out_t(static_cast<std::size_t>(Q * N), NAN), out2(static_cast<std::size_t>(Q * N), NAN);
    std::string name = std::string(fn == &sf::score_pairwise_cpu ? "score_pairwise" : "score_pairwise_materialized") +
                       " Q=" + std::to_string(Q) + " N=" + std::to_string(N) + " T=" + std::to_string(T) +
                       " O=" + std::to_string(O) + " I=" + std::to_string(I);
    expect_ok(fn(v.data(), O * I, I, 1, a.data(), T * I, I, 1, g.data(), T * O, O, 1, Q, N, T, O, I, out_t.data(), 1,
                 Q, 2),
              name);
    std::vector<float> out(static_cast<std::size_t>(Q * N));
    for (index_t q = 0; q < Q; ++q)
      for (index_t n = 0; n < N; ++n) out[q * N + n] = out_t[n * Q + q];
    expect_close(out, want, 1e-5, name);
    expect_ok(fn(v.data(), O * I, I, 1, a.data(), T * I, I, 1, g.data(), T * O, O, 1, Q, N, T, O, I, out2.data(), N, 1,
                 1),
              name);
    expect_equal(out, out2, name + " 1 thread == 2 threads (bitwise)");
  }
}

// out[p, i, q] = a[q,i] Σ_o L[p,o] g[q,o] w[o,i], queries innermost with qs padded lanes (zeroed); L column-major.
void test_rank_one_product(index_t P, index_t Q, index_t O, index_t I) {
  std::vector<float> L = randn(P * O), g = randn(Q * O), a = randn(Q * I), w = randn(O * I);
  const index_t qs = (Q + 15) / 16 * 16;
  std::vector<double> want(static_cast<std::size_t>(P * I * qs), 0.0);
  for (index_t p = 0; p < P; ++p)
    for (index_t i = 0; i < I; ++i)
      for (index_t q = 0; q < Q; ++q) {
        double s = 0;
        for (index_t o = 0; o < O; ++o) s += static_cast<double>(L[o * P + p]) * g[q * O + o] * w[o * I + i];
        want[(p * I + i) * qs + q] = s * a[q * I + i];
      }
  const std::string name = "rank_one_product P=" + std::to_string(P) + " Q=" + std::to_string(Q) +
                           " O=" + std::to_string(O) + " I=" + std::to_string(I);
  std::vector<float> out(want.size(), NAN), out1(want.size(), NAN);
  expect_ok(sf::rank_one_product_cpu(L.data(), 1, P, g.data(), O, 1, a.data(), I, 1, w.data(), I, 1, P, Q, O, I,
                                     out.data(), I * qs, qs, qs, 2),
            name);
  expect_close(out, want, 1e-5, name);
  expect_ok(sf::rank_one_product_cpu(L.data(), 1, P, g.data(), O, 1, a.data(), I, 1, w.data(), I, 1, P, Q, O, I,
                                     out1.data(), I * qs, qs, qs, 1),
            name);
  expect_equal(out, out1, name + " 1 thread == 2 threads (bitwise)");
}

// out[c][q] = x[q][c] · r[c] (the same bits as the product), lanes Q..qs zero, lanes beyond qs untouched.
void test_to_queries_innermost(index_t Q, index_t C) {
  std::vector<float> x = randn(Q * C), r = randn(C);
  const index_t qs = (Q + 15) / 16 * 16, ldo = qs + 16;
  std::vector<float> out(static_cast<std::size_t>(C * ldo), NAN);
  expect_ok(sf::to_queries_innermost_cpu(x.data(), C, r.data(), Q, C, out.data(), ldo, qs, 2), "to_queries_innermost");
  bool ok = true;
  for (index_t c = 0; c < C; ++c)
    for (index_t q = 0; q < ldo; ++q) {
      const float got = out[c * ldo + q];
      if (q < Q) ok = ok && got == x[q * C + c] * r[c];
      else if (q < qs) ok = ok && got == 0.0f;
      else ok = ok && std::isnan(got);
    }
  std::printf("%s to_queries_innermost Q=%lld C=%lld\n", ok ? "ok  " : "FAIL", static_cast<long long>(Q),
              static_cast<long long>(C));
  if (!ok) ++g_failures;
}

// Patch rows against a naive loop over (b, oh, ow, c, kh, kw): the same bits (copies, zeros, ones).
void test_conv_patch_rows(index_t B, index_t C, index_t H, index_t W, const sf::ConvGeometry& geo, bool bias) {
  std::vector<float> x = randn(B * C * H * W);
  const index_t ck = C * geo.KH * geo.KW, I = ck + (bias ? 1 : 0), rows = B * geo.OH * geo.OW;
  std::vector<float> out(static_cast<std::size_t>(rows * I), NAN);
  expect_ok(sf::conv_patch_rows_cpu(x.data(), B, C, H, W, C * H * W, H * W, W, 1, geo, bias, out.data(), 2),
            "conv_patch_rows");
  bool ok = true;
  for (index_t b = 0; b < B; ++b)
    for (index_t oh = 0; oh < geo.OH; ++oh)
      for (index_t ow = 0; ow < geo.OW; ++ow) {
        const float* row = out.data() + ((b * geo.OH + oh) * geo.OW + ow) * I;
        for (index_t c = 0; c < C; ++c)
          for (index_t kh = 0; kh < geo.KH; ++kh)
            for (index_t kw = 0; kw < geo.KW; ++kw) {
              const index_t ih = oh * geo.stride_h - geo.pad_top + kh * geo.dil_h;
              const index_t iw = ow * geo.stride_w - geo.pad_left + kw * geo.dil_w;
              const bool inside = ih >= 0 && ih < H && iw >= 0 && iw < W;
              const float want = inside ? x[((b * C + c) * H + ih) * W + iw] : 0.0f;
              ok = ok && row[(c * geo.KH + kh) * geo.KW + kw] == want;
            }
        if (bias) ok = ok && row[ck] == 1.0f;
      }
  std::printf("%s conv_patch_rows B=%lld C=%lld %lldx%lld kernel %lldx%lld\n", ok ? "ok  " : "FAIL",
              static_cast<long long>(B), static_cast<long long>(C), static_cast<long long>(H),
              static_cast<long long>(W), static_cast<long long>(geo.KH), static_cast<long long>(geo.KW));
  if (!ok) ++g_failures;
}

// r[kh·KW + kw] = the value image plane `plane` of x [.., H, W] (contiguous) holds at kernel offset (kh, kw) for
// output position (oh, ow), 0 in the padding: the naive patch the conv kernels' tests compare against.
void patch_values(const float* x, index_t plane, index_t H, index_t W, const sf::ConvGeometry& geo, index_t oh,
                  index_t ow, double* r) {
  for (index_t kh = 0; kh < geo.KH; ++kh)
    for (index_t kw = 0; kw < geo.KW; ++kw) {
      const index_t ih = oh * geo.stride_h - geo.pad_top + kh * geo.dil_h;
      const index_t iw = ow * geo.stride_w - geo.pad_left + kw * geo.dil_w;
      const bool inside = ih >= 0 && ih < H && iw >= 0 && iw < W;
      r[kh * geo.KW + kw] = inside ? x[(plane * H + ih) * W + iw] : 0.0;
    }
}

// Per-channel patch covariances against a naive float64 loop over (b, oh, ow) of each channel's patch (+1).
void test_conv_patch_covariance(index_t B, index_t C, index_t H, index_t W, const sf::ConvGeometry& geo, bool bias) {
  std::vector<float> x = randn(B * C * H * W);
  const index_t K = geo.KH * geo.KW, D = K + (bias ? 1 : 0);
  std::vector<float> out(static_cast<std::size_t>(C * D * D), NAN);
  expect_ok(sf::conv_patch_covariance_cpu(x.data(), B, C, H, W, C * H * W, H * W, W, 1, geo, bias, out.data(), 2),
            "conv_patch_covariance");
  bool ok = true;
  std::vector<double> r(static_cast<std::size_t>(D));
  for (index_t c = 0; c < C; ++c) {
    std::vector<double> want(static_cast<std::size_t>(D * D), 0.0);
    for (index_t b = 0; b < B; ++b)
      for (index_t oh = 0; oh < geo.OH; ++oh)
        for (index_t ow = 0; ow < geo.OW; ++ow) {
          patch_values(x.data(), b * C + c, H, W, geo, oh, ow, r.data());
          if (bias) r[K] = 1.0;
          for (index_t i = 0; i < D; ++i)
            for (index_t j = 0; j < D; ++j) want[i * D + j] += r[i] * r[j];
        }
    for (index_t i = 0; i < D * D; ++i)
      ok = ok && std::fabs(out[c * D * D + i] - want[i]) <= 1e-4 * (1.0 + std::fabs(want[i]));
  }
  std::printf("%s conv_patch_covariance B=%lld C=%lld %lldx%lld kernel %lldx%lld\n", ok ? "ok  " : "FAIL",
              static_cast<long long>(B), static_cast<long long>(C), static_cast<long long>(H),
              static_cast<long long>(W), static_cast<long long>(geo.KH), static_cast<long long>(geo.KW));
  if (!ok) ++g_failures;
}

// Per-example gradients of one-channel groups against a naive float64 loop over (b, c, j, oh, ow) and the kernel.
void test_conv_group_grads(index_t B, index_t C, index_t M, index_t H, index_t W, const sf::ConvGeometry& geo,
                           bool bias) {
  std::vector<float> x = randn(B * C * H * W), gy = randn(B * C * M * geo.OH * geo.OW);
  const index_t K = geo.KH * geo.KW, D = K + (bias ? 1 : 0), P = geo.OH * geo.OW;
  std::vector<float> out(static_cast<std::size_t>(B * C * M * D), NAN);
  expect_ok(sf::conv_group_grads_cpu(x.data(), B, C, H, W, C * H * W, H * W, W, 1, gy.data(), M, C * M * P, P, geo,
                                     bias, out.data(), 2),
            "conv_group_grads");
  bool ok = true;
  std::vector<double> r(static_cast<std::size_t>(K));
  for (index_t b = 0; b < B; ++b)
    for (index_t c = 0; c < C; ++c)
      for (index_t j = 0; j < M; ++j) {
        std::vector<double> want(static_cast<std::size_t>(D), 0.0);
        const float* g = gy.data() + (b * C * M + c * M + j) * P;
        for (index_t oh = 0; oh < geo.OH; ++oh)
          for (index_t ow = 0; ow < geo.OW; ++ow) {
            patch_values(x.data(), b * C + c, H, W, geo, oh, ow, r.data());
            for (index_t k = 0; k < K; ++k) want[k] += static_cast<double>(g[oh * geo.OW + ow]) * r[k];
            if (bias) want[K] += g[oh * geo.OW + ow];
          }
        const float* o = out.data() + ((b * C + c) * M + j) * D;
        for (index_t k = 0; k < D; ++k) ok = ok && std::fabs(o[k] - want[k]) <= 1e-4 * (1.0 + std::fabs(want[k]));
      }
  std::printf("%s conv_group_grads B=%lld C=%lld M=%lld %lldx%lld kernel %lldx%lld\n", ok ? "ok  " : "FAIL",
              static_cast<long long>(B), static_cast<long long>(C), static_cast<long long>(M),
              static_cast<long long>(H), static_cast<long long>(W), static_cast<long long>(geo.KH),
              static_cast<long long>(geo.KW));
  if (!ok) ++g_failures;
}

void test_errors() {
  float x[4] = {0, 0, 0, 0};
  sf::Status s = sf::covariance_cpu(x, 2, 2, -1, 1, nullptr, 0, x, 2, false, 1);
  bool ok = !s.ok() && s.code() == sf::Code::kInvalidArgument && s.message().find("x") != std::string::npos;
  std::printf("%s negative stride rejected: %s\n", ok ? "ok  " : "FAIL", s.message().c_str());
  if (!ok) ++g_failures;
  s = sf::covariance_cpu(x, 2, 2, 2, 1, nullptr, 0, x, 1, false, 1);
  ok = !s.ok() && s.message().find("out") != std::string::npos;
  std::printf("%s short leading dimension rejected: %s\n", ok ? "ok  " : "FAIL", s.message().c_str());
  if (!ok) ++g_failures;
}

}  // namespace

int main() {
  for (index_t D : {1, 7, 33, 61})
    for (index_t R : {1, 5, 300}) test_covariance(R, D, false, false, false);
  test_covariance(517, 45, true, true, true);
  test_covariance(1000, 70, true, false, false);  // above the OpenMP threshold: 2 threads really run
  test_covariance(0, 9, false, false, true);
  for (index_t T : {1, 3})
    for (index_t O : {1, 13})
      for (index_t I : {1, 37}) test_lambda(11, T, O, I);
  test_lambda(300, 1, 29, 70);
  test_lambda(40, 9, 29, 70);
  test_lambda(200, 4, 45, 90);   // multi-threaded
  test_lambda(700, 1, 45, 90);
  for (index_t T : {1, 4}) {
    test_score_self(1, T, 5, 3);
    test_score_self(19, T, 13, 41);
  }
  test_score_self(150, 4, 40, 130);  // multi-threaded
  test_score_self(700, 1, 40, 130);
  test_score_pairwise(1, 1, 1, 1, 1);
  test_score_pairwise(3, 17, 1, 13, 37);
  test_score_pairwise(2, 9, 3, 30, 11);
  test_score_pairwise(5, 70, 2, 7, 65);
  test_score_pairwise(4, 100, 2, 30, 170);  // multi-threaded
  test_score_pairwise(27, 300, 3, 9, 21);   // several query and column blocks
  test_rank_one_product(1, 1, 1, 1);
  test_rank_one_product(13, 17, 9, 33);
  test_rank_one_product(40, 50, 30, 100);  // multi-threaded, several query lines and panels
  test_to_queries_innermost(1, 1);
  test_to_queries_innermost(37, 300);
  test_to_queries_innermost(200, 5000);  // multi-threaded
  test_conv_patch_rows(2, 3, 7, 9, {3, 3, 1, 1, 1, 1, 1, 1, 7, 9}, true);      // "same" 3x3
  test_conv_patch_rows(3, 2, 8, 7, {3, 2, 2, 1, 2, 3, 1, 2, 4, 5}, false);     // strided, dilated, padded
  test_conv_patch_rows(64, 16, 16, 16, {3, 3, 1, 1, 1, 1, 1, 1, 16, 16}, true);  // multi-threaded
  test_conv_patch_covariance(5, 3, 7, 9, {3, 3, 1, 1, 1, 1, 1, 1, 7, 9}, true);      // "same" 3x3
  test_conv_patch_covariance(3, 2, 8, 7, {3, 2, 2, 1, 2, 3, 1, 2, 4, 5}, false);     // strided, dilated, padded
  test_conv_patch_covariance(9, 4, 3, 40, {1, 3, 1, 1, 1, 1, 0, 1, 3, 40}, true);     // 1x3, rows of 40 outputs
  test_conv_group_grads(5, 3, 1, 7, 9, {3, 3, 1, 1, 1, 1, 1, 1, 7, 9}, true);        // depthwise "same" 3x3
  test_conv_group_grads(3, 2, 2, 8, 7, {3, 2, 2, 1, 2, 3, 1, 2, 4, 5}, false);       // multiplier 2, row stride 2
  test_conv_group_grads(4, 3, 1, 33, 33, {3, 3, 1, 1, 1, 1, 1, 1, 33, 33}, true);    // rows beyond one vector
  test_errors();
  if (g_failures) {
    std::printf("%d FAILURES\n", g_failures);
    return 1;
  }
  std::printf("all CPU kernel tests passed\n");
  return 0;
}
