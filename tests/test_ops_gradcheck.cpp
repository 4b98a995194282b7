// Finite-difference checks (double) of every mHC op's backward at random shapes,
// including n = 1, n = 6, C not a multiple of 8 and T = 1.
#include <gtest/gtest.h>

#include "nn/hyper_connection.h"
#include "ops/cpu/aggregate.h"
#include "ops/cpu/h_post_bda.h"
#include "ops/cpu/mhc_mappings.h"
#include "ops/cpu/stream_expand.h"
#include "test_util.h"

namespace mhc {
namespace {

using test::dot;
using test::numeric_gradient;
using test::random_vector;
using test::relative_error;

constexpr double kTolerance = 1e-6;

struct MappingCase {
  int64_t tokens;
  int n;
  int64_t C;
  int iterations;
  cpu::ResMapping res_mapping;
};

class MappingsGradient : public ::testing::TestWithParam<MappingCase> {};

TEST_P(MappingsGradient, MatchesFiniteDifferences) {
  const MappingCase c = GetParam();
  const cpu::MappingShape s{c.tokens, c.n, c.C, c.res_mapping, c.iterations};
  const int64_t K = c.n * c.C, m = cpu::mhc_mapping_width(c.n);
  auto x = random_vector(c.tokens * K, 1, -2, 2);
  auto W = random_vector(m * K, 2, -0.3, 0.3);
  auto alpha = random_vector(3, 3, 0.3, 1.2);
  auto bias = random_vector(m, 4, -1, 1);
  const auto g_pre = random_vector(c.tokens * c.n, 5), g_post = random_vector(c.tokens * c.n, 6);
  const auto g_res = random_vector(c.tokens * c.n * c.n, 7);
  std::vector<double> proj(c.tokens * m), r(c.tokens), h_pre(c.tokens * c.n), h_post(c.tokens * c.n),
      h_res(c.tokens * c.n * c.n);
  auto loss = [&] {
    cpu::mhc_mappings_forward(s, x.data(), W.data(), alpha.data(), bias.data(), proj.data(), r.data(), h_pre.data(),
                              h_post.data(), h_res.data());
    return dot(h_pre, g_pre) + dot(h_post, g_post) + dot(h_res, g_res);
  };
  loss();
  std::vector<double> dx(x.size(), 0), dW(W.size(), 0), dalpha(3, 0), dbias(m, 0),
      scratch(cpu::mhc_mappings_scratch_size(c.tokens, c.n));
  cpu::mhc_mappings_backward(s, x.data(), W.data(), alpha.data(), bias.data(), proj.data(), r.data(), h_pre.data(),
                             h_post.data(), g_pre.data(), g_post.data(), g_res.data(), dx.data(), dW.data(),
                             dalpha.data(), dbias.data(), scratch.data());
  EXPECT_LT(relative_error(dx, numeric_gradient(x, loss)), kTolerance) << "x";
  EXPECT_LT(relative_error(dW, numeric_gradient(W, loss)), kTolerance) << "W";
  EXPECT_LT(relative_error(dalpha, numeric_gradient(alpha, loss)), kTolerance) << "alpha";
  EXPECT_LT(relative_error(dbias, numeric_gradient(bias, loss)), kTolerance) << "bias";
}

INSTANTIATE_TEST_SUITE_P(Shapes, MappingsGradient,
                         ::testing::Values(MappingCase{3, 1, 5, 1, cpu::ResMapping::Sinkhorn},
                                           MappingCase{2, 6, 7, 3, cpu::ResMapping::Sinkhorn},
                                           MappingCase{4, 4, 8, 20, cpu::ResMapping::Sinkhorn},
                                           MappingCase{3, 2, 13, 1, cpu::ResMapping::Sinkhorn},
                                           MappingCase{3, 4, 9, 0, cpu::ResMapping::Unconstrained},
                                           MappingCase{2, 1, 3, 0, cpu::ResMapping::Unconstrained}),
                         [](const auto& param_info) {
                           const MappingCase& c = param_info.param;
                           return "tokens" + std::to_string(c.tokens) + "_n" + std::to_string(c.n) + "_C" +
                                  std::to_string(c.C) + "_T" + std::to_string(c.iterations) +
                                  (c.res_mapping == cpu::ResMapping::Sinkhorn ? "_mhc" : "_hc");
                         });

struct StreamCase {
  int64_t tokens;
  int n;
  int64_t C;
};

class StreamOpsGradient : public ::testing::TestWithParam<StreamCase> {};

TEST_P(StreamOpsGradient, Aggregate) {
  const auto [tokens, n, C] = GetParam();
  auto x = random_vector(tokens * n * C, 11), h_pre = random_vector(tokens * n, 12, 0, 1);
  const auto g = random_vector(tokens * C, 13);
  std::vector<double> agg(tokens * C);
  auto loss = [&] {
    cpu::aggregate_forward(x.data(), h_pre.data(), tokens, n, C, agg.data());
    return dot(agg, g);
  };
  std::vector<double> dx(x.size(), 0.5), dh(h_pre.size(), 99.0);  // dx accumulates, dh is overwritten
  cpu::aggregate_backward(g.data(), x.data(), h_pre.data(), tokens, n, C, dx.data(), dh.data());
  for (double& v : dx) v -= 0.5;
  EXPECT_LT(relative_error(dx, numeric_gradient(x, loss)), kTolerance);
  EXPECT_LT(relative_error(dh, numeric_gradient(h_pre, loss)), kTolerance);
}

TEST_P(StreamOpsGradient, HPostBiasDropoutAdd) {
  const auto [tokens, n, C] = GetParam();
  for (bool with_bias : {true, false})
    for (float p : {0.0f, 0.3f}) {
      const cpu::DropoutSpec dropout{p, 1234};
      auto x = random_vector(tokens * n * C, 21), h_res = random_vector(tokens * n * n, 22);
      auto h_post = random_vector(tokens * n, 23, 0, 2), y = random_vector(tokens * C, 24);
      auto y_bias = random_vector(C, 25);
      const auto g = random_vector(tokens * n * C, 26);
      std::vector<double> out(x.size());
      const double* bias_ptr = with_bias ? y_bias.data() : nullptr;
      auto loss = [&] {
        cpu::h_post_bda_forward(x.data(), h_res.data(), h_post.data(), y.data(), bias_ptr, tokens, n, C, dropout,
                                out.data());
        return dot(out, g);
      };
      std::vector<double> dx(x.size(), 0), dres(h_res.size(), 99), dpost(h_post.size(), 99), dy(y.size(), 99),
          dbias(C, 0);
      cpu::h_post_bda_backward(g.data(), x.data(), h_res.data(), h_post.data(), y.data(), bias_ptr, tokens, n, C,
                               dropout, dx.data(), dres.data(), dpost.data(), dy.data(),
                               with_bias ? dbias.data() : nullptr);
      const std::string label = "p=" + std::to_string(p) + (with_bias ? " bias" : " no bias");
      EXPECT_LT(relative_error(dx, numeric_gradient(x, loss)), kTolerance) << label;
      EXPECT_LT(relative_error(dres, numeric_gradient(h_res, loss)), kTolerance) << label;
      EXPECT_LT(relative_error(dpost, numeric_gradient(h_post, loss)), kTolerance) << label;
      EXPECT_LT(relative_error(dy, numeric_gradient(y, loss)), kTolerance) << label;
      if (with_bias) {
        EXPECT_LT(relative_error(dbias, numeric_gradient(y_bias, loss)), kTolerance) << label;
      }
    }
}

TEST_P(StreamOpsGradient, ExpandAndContract) {
  const auto [tokens, n, C] = GetParam();
  auto e = random_vector(tokens * C, 31);
  const auto gx = random_vector(tokens * n * C, 32);
  std::vector<double> x(tokens * n * C);
  auto expand_loss = [&] {
    cpu::stream_expand_forward(e.data(), tokens, n, C, x.data());
    return dot(x, gx);
  };
  std::vector<double> de(e.size(), 99);
  cpu::stream_expand_backward(gx.data(), tokens, n, C, de.data());
  EXPECT_LT(relative_error(de, numeric_gradient(e, expand_loss)), kTolerance);

  auto xs = random_vector(tokens * n * C, 33);
  const auto go = random_vector(tokens * C, 34);
  std::vector<double> o(tokens * C);
  auto contract_loss = [&] {
    cpu::stream_contract_forward(xs.data(), tokens, n, C, o.data());
    return dot(o, go);
  };
  std::vector<double> dxs(xs.size(), 99);
  cpu::stream_contract_backward(go.data(), tokens, n, C, dxs.data());
  EXPECT_LT(relative_error(dxs, numeric_gradient(xs, contract_loss)), kTolerance);
}

INSTANTIATE_TEST_SUITE_P(Shapes, StreamOpsGradient,
                         ::testing::Values(StreamCase{3, 1, 5}, StreamCase{2, 6, 7}, StreamCase{5, 4, 8},
                                           StreamCase{1, 2, 13}),
                         [](const auto& param_info) {
                           return "tokens" + std::to_string(param_info.param.tokens) + "_n" + std::to_string(param_info.param.n) +
                                  "_C" + std::to_string(param_info.param.C);
                         });

// The whole module: loss = sum(out * g_out) + sum(aggregated * g_agg), y an independent input.
TEST(HyperConnectionGradient, WholeModuleMatchesFiniteDifferences) {
  for (const auto& [n, C, iterations] : {std::tuple{1, 7, 1}, std::tuple{6, 5, 4}, std::tuple{4, 9, 20}}) {
    const int64_t tokens = 3, K = n * C;
    HyperConnection<double> hc(n, C, cpu::ResMapping::Sinkhorn, iterations);
    hc.init(rng_key(9, n), 0.0);
    hc.alpha_pre.value[0] = 0.7;
    hc.alpha_post.value[0] = 0.4;
    hc.alpha_res.value[0] = 0.9;
    hc.bias.value = random_vector(hc.bias.size(), 40 + n);
    auto x = random_vector(tokens * K, 41), y = random_vector(tokens * C, 42), y_bias = random_vector(C, 43);
    const auto g_out = random_vector(tokens * K, 44), g_agg = random_vector(tokens * C, 45);
    HcActivations<double> act;
    std::vector<double> agg(tokens * C), out(tokens * K);
    auto loss = [&] {
      hc.forward(x.data(), tokens, act, agg.data());
      hc.residual_forward(x.data(), act, y.data(), y_bias.data(), {}, out.data());
      return dot(out, g_out) + dot(agg, g_agg);
    };
    loss();
    std::vector<double> dx(x.size(), 0), dy(y.size()), dyb(C, 0);
    hc.residual_backward(g_out.data(), x.data(), act, y.data(), y_bias.data(), {}, dx.data(), dy.data(), dyb.data());
    hc.backward(g_agg.data(), x.data(), act, dx.data());
    const std::string label = "n=" + std::to_string(n);
    EXPECT_LT(relative_error(dx, numeric_gradient(x, loss)), kTolerance) << label;
    EXPECT_LT(relative_error(dy, numeric_gradient(y, loss)), kTolerance) << label;
    EXPECT_LT(relative_error(dyb, numeric_gradient(y_bias, loss)), kTolerance) << label;
    for (Parameter<double>* p : hc.parameters())
      EXPECT_LT(relative_error(p->grad, numeric_gradient(p->value, loss)), kTolerance) << label << " " << p->name;
  }
}

}  // namespace
}  // namespace mhc
