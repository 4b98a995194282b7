#include <gtest/gtest.h>

#include <nlohmann/json.hpp>

#include "core/config.h"
#include "core/error.h"

namespace mhc {
namespace {

// The error raised by validating `config` after applying `overrides`, or "" if valid.
std::string error_after(const std::vector<std::string>& overrides) {
  try {
    ModelConfig config;
    for (const std::string& o : overrides) apply_config_override(config, o);
    config.validate();
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}

TEST(Config, DefaultsAreValid) { EXPECT_EQ(error_after({}), ""); }

TEST(Config, EachRuleNamesItsField) {
  const std::pair<std::vector<std::string>, const char*> cases[] = {
      {{"mhc_sinkhorn_iterations=0"}, "mhc_sinkhorn_iterations"},
      {{"mhc_init_gating_factor=-0.5"}, "mhc_init_gating_factor"},
      {{"mhc_recompute_layer_num=0"}, "mhc_recompute_layer_num"},
      {{"mhc_recompute_layer_num=-3"}, "mhc_recompute_layer_num"},
      {{"num_residual_streams=0"}, "num_residual_streams"},
      {{"hidden_size=100", "num_attention_heads=3"}, "num_attention_heads"},
      {{"connection=residual", "recompute=mhc"}, "recompute"},
      {{"recompute=full"}, "recompute"},
      {{"fp32_residual_connection=true"}, "fp32_residual_connection"},
      {{"mtp_num_layers=1"}, "mtp_num_layers"},
      {{"pipeline_model_parallel_size=2"}, "pipeline_model_parallel_size"},
      {{"connection=dense"}, "connection"},
      {{"normalization=BatchNorm"}, "normalization"},
      {{"hidden_dropout=1.5"}, "hidden_dropout"},
      {{"num_layers=0"}, "num_layers"},
  };
  for (const auto& [overrides, field] : cases) {
    const std::string message = error_after(overrides);
    EXPECT_NE(message.find(field), std::string::npos) << "expected an error naming " << field << ", got '" << message
                                                      << "'";
  }
}

TEST(Config, RulesThatMustPass) {
  EXPECT_EQ(error_after({"mhc_recompute_layer_num=2", "recompute=mhc"}), "");
  EXPECT_EQ(error_after({"connection=hc", "recompute=mhc"}), "");
  EXPECT_EQ(error_after({"connection=residual", "recompute=full"}), "");
  EXPECT_EQ(error_after({"num_residual_streams=1"}), "");
  EXPECT_EQ(error_after({"mhc_init_gating_factor=0"}), "");
  EXPECT_EQ(error_after({"mhc_recompute_layer_num=null"}), "");
  // Plain residual models ignore the mHC-only restrictions.
  EXPECT_EQ(error_after({"connection=residual", "fp32_residual_connection=true"}), "");
}

TEST(Config, UnknownKeysAndBadTypesAreErrors) {
  EXPECT_NE(error_after({"mhc_sinkhorn_iteration=20"}).find("unknown configuration key 'mhc_sinkhorn_iteration'"),
            std::string::npos);
  EXPECT_NE(error_after({"num_layers=two"}).find("num_layers"), std::string::npos);
  EXPECT_NE(error_after({"num_layers=2.5"}).find("num_layers"), std::string::npos);
  EXPECT_NE(error_after({"add_bias_linear=1"}).find("add_bias_linear"), std::string::npos);
  EXPECT_NE(error_after({"no_equals_sign"}).find("key=value"), std::string::npos);
  EXPECT_THROW(config_from_json(nlohmann::json{{"hidden_size", 64}, {"bogus", 1}}), Error);
}

TEST(Config, JsonRoundTrip) {
  ModelConfig c;
  apply_config_override(c, "hidden_size=96");
  apply_config_override(c, "connection=hc");
  apply_config_override(c, "mhc_recompute_layer_num=3");
  const ModelConfig back = config_from_json(config_to_json(c));
  EXPECT_EQ(config_to_json(back), config_to_json(c));
  EXPECT_EQ(back.hidden_size, 96);
  EXPECT_EQ(back.connection, "hc");
  EXPECT_EQ(back.mhc_recompute_layer_num, 3);
}

}  // namespace
}  // namespace mhc
