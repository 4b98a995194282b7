// The CPU GPT: whole-model gradient checks, selective recompute (plan and bitwise
// equality), stability metrics.
#include <gtest/gtest.h>

#include <cstring>

#include "check/gradcheck.h"
#include "core/error.h"
#include "nn/gpt.h"
#include "nn/recompute_plan.h"

namespace mhc {
namespace {

TEST(ModelGradient, EveryConnectionAndStreamCount) {
  for (const char* connection : {"residual", "hc", "mhc"})
    for (int64_t streams : {1, 2, 4}) {
      if (std::string(connection) == "residual" && streams > 1) continue;  // one stream by definition
      GradCheckOptions o;
      o.connection = connection;
      o.streams = streams;
      o.samples_per_tensor = 6;
      for (const GradCheckEntry& e : check_model_gradients(o))
        EXPECT_LT(e.error, 1e-6) << connection << " n=" << streams << " " << e.name;
    }
}

TEST(ModelGradient, WithRecompute) {
  GradCheckOptions o;
  o.recompute_layers = 2;
  o.samples_per_tensor = 6;
  for (const GradCheckEntry& e : check_model_gradients(o)) EXPECT_LT(e.error, 1e-6) << e.name;
}

TEST(ModelGradient, RmsNormSwiGluWithoutBiases) {
  for (const char* connection : {"residual", "mhc"}) {
    GradCheckOptions o;
    o.connection = connection;
    o.samples_per_tensor = 6;
    o.overrides = {"normalization=RMSNorm", "activation=swiglu", "add_bias_linear=false"};
    const auto entries = check_model_gradients(o);
    for (const GradCheckEntry& e : entries) {
      EXPECT_LT(e.error, 1e-6) << connection << " " << e.name;
      if (e.name.find("hyper_connection") == std::string::npos) {
        EXPECT_EQ(e.name.find(".bias"), std::string::npos) << "unexpected bias " << e.name;
      }
    }
  }
}

TEST(RecomputePlan, BlockEnds) {
  auto ends = [](int layers, std::optional<int64_t> k) {
    const RecomputePlan plan(layers, k);
    std::vector<int> out;
    for (int l = 0; l < layers; ++l)
      if (plan.ends_block(l)) out.push_back(l);
    return out;
  };
  EXPECT_EQ(ends(4, std::nullopt), (std::vector<int>{3}));
  EXPECT_EQ(ends(4, 1), (std::vector<int>{0, 1, 2, 3}));
  EXPECT_EQ(ends(5, 2), (std::vector<int>{1, 3, 4}));
  EXPECT_EQ(ends(6, 3), (std::vector<int>{2, 5}));
  EXPECT_EQ(ends(3, 7), (std::vector<int>{2}));
  EXPECT_EQ(ends(12, 5), (std::vector<int>{4, 9, 11}));
  const RecomputePlan plan(5, 2);
  EXPECT_EQ(plan.max_block_size(), 2);
  EXPECT_EQ(plan.slot(3), 1);
  EXPECT_EQ(plan.block_of(4).first, 4);
  EXPECT_THROW(RecomputePlan(4, 0), Error);
}

ModelConfig small_config() {
  ModelConfig c;
  c.hidden_size = 16;
  c.num_attention_heads = 2;
  c.vocab_size = 29;
  c.seq_length = 8;
  c.hidden_dropout = 0.2;
  c.attention_dropout = 0.1;
  c.num_residual_streams = 3;
  return c;
}

struct RunResult {
  double loss;
  std::vector<std::vector<float>> grads;
  int64_t kept_bytes;
};

RunResult run(const ModelConfig& c, int steps) {
  const int64_t batch = 3, seq = c.seq_length, N = batch * seq;
  Gpt<float> model(c, batch, seq);
  model.init(42);
  std::vector<int32_t> tokens(N), targets(N);
  for (int64_t i = 0; i < N; ++i) {
    tokens[i] = static_cast<int32_t>((i * 7 + 3) % c.vocab_size);
    targets[i] = static_cast<int32_t>((i * 5 + 1) % c.vocab_size);
  }
  RunResult r{0, {}, model.bytes().kept};
  model.zero_grad();
  for (int s = 0; s < steps; ++s) {  // several steps accumulate: different dropout masks each
    r.loss = model.forward(tokens.data(), targets.data(), s);
    model.backward();
  }
  for (Parameter<float>* p : model.parameters()) r.grads.push_back(p->grad);
  return r;
}

TEST(Recompute, BitwiseEqualLossAndGradients) {
  for (const auto& [layers, k] : {std::pair<int64_t, int64_t>{3, 1}, {3, 2}, {4, 3}, {5, 2}, {4, 0}, {2, 2}})
    for (const char* connection : {"mhc", "hc"}) {
      ModelConfig plain = small_config();
      plain.num_layers = layers;
      plain.connection = connection;
      ModelConfig recompute = plain;
      recompute.recompute = "mhc";
      if (k > 0) recompute.mhc_recompute_layer_num = k;
      const RunResult a = run(plain, 2), b = run(recompute, 2);
      const std::string label = std::string(connection) + " layers=" + std::to_string(layers) + " k=" + std::to_string(k);
      EXPECT_EQ(std::memcmp(&a.loss, &b.loss, sizeof(double)), 0) << label;
      ASSERT_EQ(a.grads.size(), b.grads.size());
      for (size_t i = 0; i < a.grads.size(); ++i)
        EXPECT_EQ(std::memcmp(a.grads[i].data(), b.grads[i].data(), a.grads[i].size() * sizeof(float)), 0)
            << label << " parameter " << i;
      EXPECT_LT(b.kept_bytes, a.kept_bytes) << label;  // discarded tensors are not held
    }
}

TEST(Recompute, SameSeedSameRunDifferentStepDifferentMasks) {
  ModelConfig c = small_config();
  const RunResult a = run(c, 1), b = run(c, 1), d = run(c, 2);
  EXPECT_EQ(a.loss, b.loss);
  EXPECT_EQ(a.grads, b.grads);
  EXPECT_NE(a.loss, d.loss);
}

TEST(StabilityMetrics, IdentityResidualMixingHasUnitGains) {
  for (const char* connection : {"hc", "mhc"}) {
    ModelConfig c = small_config();
    c.connection = connection;
    c.num_layers = 3;
    c.num_residual_streams = 4;
    Gpt<double> model(c, 2, c.seq_length);
    model.init(1);
    for (Parameter<double>* p : model.parameters()) {
      if (p->name.find("hyper_connection.mapping_proj.weight") != std::string::npos)
        std::fill(p->value.begin(), p->value.end(), 0.0);
      if (p->name.find("hyper_connection.bias") != std::string::npos)
        for (int i = 0; i < 4; ++i) p->value[8 + i * 4 + i] = std::string(connection) == "mhc" ? 60.0 : 0.0;
    }
    std::vector<int32_t> tokens(2 * c.seq_length, 1);
    model.forward(tokens.data(), tokens.data(), 0);
    ASSERT_EQ(model.gains().size(), 6u);
    for (const GainStats& g : model.gains())
      for (double v : {g.forward_max, g.forward_mean, g.backward_max, g.backward_mean, g.composite_forward_max,
                       g.composite_forward_mean, g.composite_backward_max, g.composite_backward_mean})
        EXPECT_NEAR(v, 1.0, 1e-12) << connection;
  }
}

TEST(StabilityMetrics, MhcGainsStayNearOneWhileHcGrows) {
  // With random mappings, Sinkhorn keeps every composite gain near 1 (columns sum to 1);
  // unconstrained HC mixing does not.
  double mhc_backward = 0, hc_forward = 0;
  for (const char* connection : {"hc", "mhc"}) {
    ModelConfig c = small_config();
    c.connection = connection;
    c.num_layers = 4;
    c.num_residual_streams = 4;
    c.mhc_init_gating_factor = 1.0;
    Gpt<double> model(c, 2, c.seq_length);
    model.init(3);
    for (Parameter<double>* p : model.parameters())
      if (p->name.find("hyper_connection.bias") != std::string::npos)
        for (size_t i = 8; i < p->value.size(); ++i) p->value[i] = 0.5 * std::sin(static_cast<double>(i));
    std::vector<int32_t> tokens(2 * c.seq_length, 2);
    model.forward(tokens.data(), tokens.data(), 0);
    const GainStats& last = model.gains().back();
    if (std::string(connection) == "mhc") mhc_backward = last.composite_backward_max;
    else hc_forward = last.composite_forward_max;
  }
  EXPECT_NEAR(mhc_backward, 1.0, 1e-6);
  EXPECT_GT(hc_forward, 1.5);
}

TEST(Model, RejectsBadShapesAndTokens) {
  ModelConfig c = small_config();
  EXPECT_THROW(Gpt<float>(c, 2, c.seq_length + 1), Error);
  EXPECT_THROW(Gpt<float>(c, 0, 4), Error);
  c.mhc_sinkhorn_iterations = 0;
  EXPECT_THROW(Gpt<float>(c, 1, 4), Error);
  ModelConfig ok = small_config();
  Gpt<float> model(ok, 1, 4);
  model.init(0);
  std::vector<int32_t> bad = {0, 1, 2, 999};
  EXPECT_THROW(model.forward(bad.data(), bad.data(), 0), Error);
  // The message names the first id out, its position and whose it is.
  const std::vector<int32_t> good = {0, 1, 2, 3}, negative = {0, -1, 2, 3};
  auto message = [&](const std::vector<int32_t>& tokens, const std::vector<int32_t>& targets) {
    try {
      model.forward(tokens.data(), targets.data(), 0);
    } catch (const Error& e) {
      return std::string(e.what());
    }
    return std::string("no error");
  };
  EXPECT_EQ(message(bad, good),
            "token id 999 at position 3 is outside the vocabulary [0, " + std::to_string(ok.vocab_size) + ")");
  EXPECT_EQ(message(good, negative),
            "target id -1 at position 1 is outside the vocabulary [0, " + std::to_string(ok.vocab_size) + ")");
  EXPECT_EQ(message(good, good), "no error");
}

TEST(Model, ParameterNamesFollowMegatron) {
  ModelConfig c = small_config();
  c.num_layers = 2;
  Gpt<float> model(c, 1, 4);
  std::set<std::string> names;
  for (Parameter<float>* p : model.parameters()) names.insert(p->name);
  for (const char* expected :
       {"embedding.word_embeddings.weight", "embedding.position_embeddings.weight",
        "decoder.layers.1.self_attention_hyper_connection.mapping_proj.weight",
        "decoder.layers.1.mlp_hyper_connection.alpha_res", "decoder.layers.0.self_attention.linear_qkv.weight",
        "decoder.layers.0.mlp.linear_fc2.bias", "decoder.layers.0.input_layernorm.weight",
        "decoder.final_layernorm.bias"})
    EXPECT_TRUE(names.count(expected)) << expected;
}

}  // namespace
}  // namespace mhc
