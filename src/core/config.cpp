#include "core/config.h"

#include <nlohmann/json.hpp>

#include "core/config_fields.h"

#include "core/error.h"

namespace mhc {

namespace {

// The one list of fields: JSON reading, writing and overrides all walk it.
template <typename Config, typename Visit> void visit_model_fields(Config& c, Visit&& visit) {
  visit("num_layers", c.num_layers);
  visit("hidden_size", c.hidden_size);
  visit("num_attention_heads", c.num_attention_heads);
  visit("ffn_hidden_size", c.ffn_hidden_size);
  visit("vocab_size", c.vocab_size);
  visit("seq_length", c.seq_length);
  visit("normalization", c.normalization);
  visit("activation", c.activation);
  visit("add_bias_linear", c.add_bias_linear);
  visit("hidden_dropout", c.hidden_dropout);
  visit("attention_dropout", c.attention_dropout);
  visit("layernorm_epsilon", c.layernorm_epsilon);
  visit("init_method_std", c.init_method_std);
  visit("connection", c.connection);
  visit("num_residual_streams", c.num_residual_streams);
  visit("mhc_sinkhorn_iterations", c.mhc_sinkhorn_iterations);
  visit("mhc_init_gating_factor", c.mhc_init_gating_factor);
  visit("mhc_recompute_layer_num", c.mhc_recompute_layer_num);
  visit("recompute", c.recompute);
  visit("fp32_residual_connection", c.fp32_residual_connection);
  visit("mtp_num_layers", c.mtp_num_layers);
  visit("pipeline_model_parallel_size", c.pipeline_model_parallel_size);
}

void require(bool ok, const char* field, const std::string& rule) {
  check(ok, std::string(field) + ": " + rule);
}

void require_one_of(const std::string& value, const char* field, std::initializer_list<const char*> allowed) {
  std::string list;
  for (const char* a : allowed) {
    if (value == a) return;
    list += (list.empty() ? "" : ", ") + std::string(a);
  }
  fail(std::string(field) + ": '" + value + "' is not one of " + list);
}

}  // namespace

void ModelConfig::validate() const {
  require(num_layers >= 1, "num_layers", "must be >= 1, got " + std::to_string(num_layers));
  require(hidden_size >= 1, "hidden_size", "must be >= 1, got " + std::to_string(hidden_size));
  require(num_attention_heads >= 1, "num_attention_heads", "must be >= 1, got " + std::to_string(num_attention_heads));
  require(hidden_size % num_attention_heads == 0, "num_attention_heads",
          "hidden_size " + std::to_string(hidden_size) + " is not divisible by " + std::to_string(num_attention_heads));
  require(ffn_hidden_size >= 0, "ffn_hidden_size", "must be >= 0 (0 means 4 * hidden_size)");
  require(vocab_size >= 2, "vocab_size", "must be >= 2, got " + std::to_string(vocab_size));
  require(seq_length >= 1, "seq_length", "must be >= 1, got " + std::to_string(seq_length));
  require_one_of(normalization, "normalization", {"LayerNorm", "RMSNorm"});
  require_one_of(activation, "activation", {"gelu", "swiglu"});
  require(hidden_dropout >= 0 && hidden_dropout < 1, "hidden_dropout", "must be in [0, 1)");
  require(attention_dropout >= 0 && attention_dropout < 1, "attention_dropout", "must be in [0, 1)");
  require(layernorm_epsilon > 0, "layernorm_epsilon", "must be > 0");
  require(init_method_std > 0, "init_method_std", "must be > 0");
  require_one_of(connection, "connection", {"residual", "hc", "mhc"});
  require(num_residual_streams >= 1, "num_residual_streams",
          "must be >= 1, got " + std::to_string(num_residual_streams));
  require(mhc_sinkhorn_iterations >= 1, "mhc_sinkhorn_iterations",
          "must be >= 1, got " + std::to_string(mhc_sinkhorn_iterations));
  require(mhc_init_gating_factor >= 0, "mhc_init_gating_factor", "must be >= 0");
  require(!mhc_recompute_layer_num || *mhc_recompute_layer_num >= 1, "mhc_recompute_layer_num",
          "must be a positive integer when set");
  require_one_of(recompute, "recompute", {"none", "mhc", "full"});
  require(recompute != "mhc" || hyper_connections(), "recompute",
          "'mhc' needs hyper connections (connection hc or mhc)");
  require(!(recompute == "full" && hyper_connections()), "recompute",
          "full-layer recompute is not supported with hyper connections (use 'mhc')");
  require(!(fp32_residual_connection && hyper_connections()), "fp32_residual_connection",
          "not supported with hyper connections");
  require(mtp_num_layers >= 0, "mtp_num_layers", "must be >= 0");
  require(!(mtp_num_layers > 0 && hyper_connections()), "mtp_num_layers",
          "multi-token prediction is not supported with hyper connections");
  require(pipeline_model_parallel_size == 1, "pipeline_model_parallel_size",
          "pipeline parallelism is not implemented yet; must be 1");
}

void set_config_field(ModelConfig& config, const std::string& key, const nlohmann::json& value) {
  check(fields::set(config, [](auto& c, auto&& v) { visit_model_fields(c, v); }, key, value),
        "unknown configuration key '" + key + "'");
}

ModelConfig config_from_json(const nlohmann::json& json) {
  check(json.is_object(), "configuration must be a JSON object");
  ModelConfig config;
  for (const auto& [key, value] : json.items()) set_config_field(config, key, value);
  return config;
}

nlohmann::json config_to_json(const ModelConfig& config) {
  nlohmann::json json = nlohmann::json::object();
  fields::to_json(config, [](auto& c, auto&& v) { visit_model_fields(c, v); }, json);
  return json;
}

void apply_config_override(ModelConfig& config, const std::string& assignment) {
  const auto [key, value] = fields::parse_assignment(assignment);
  set_config_field(config, key, value);
}

}  // namespace mhc
