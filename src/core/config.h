// The model configuration: one struct, Megatron's field names where one exists, the
// validation rules of DESIGN.md §3 (each error names its field), JSON in and out, and
// `key=value` overrides. Unknown keys are errors.
#pragma once
#include <cstdint>
#include <optional>
#include <string>

#include <nlohmann/json_fwd.hpp>

namespace mhc {

struct ModelConfig {
  // transformer
  int64_t num_layers = 4;
  int64_t hidden_size = 128;
  int64_t num_attention_heads = 4;
  int64_t ffn_hidden_size = 0;  // 0: 4 * hidden_size
  int64_t vocab_size = 256;
  int64_t seq_length = 128;
  std::string normalization = "LayerNorm";  // LayerNorm | RMSNorm
  std::string activation = "gelu";          // gelu | swiglu
  bool add_bias_linear = true;
  double hidden_dropout = 0.0;
  double attention_dropout = 0.0;
  double layernorm_epsilon = 1e-5;
  double init_method_std = 0.02;

  // residual connection: residual (plain), hc (Hyper-Connections, H_res unconstrained),
  // mhc (H_res projected by Sinkhorn-Knopp). Megatron's enable_hyper_connections = mhc.
  std::string connection = "mhc";
  int64_t num_residual_streams = 4;
  int64_t mhc_sinkhorn_iterations = 20;
  double mhc_init_gating_factor = 0.01;
  std::optional<int64_t> mhc_recompute_layer_num;  // unset: one recompute block

  // recompute: none | mhc (Megatron's selective recompute of module "mhc") | full
  std::string recompute = "none";

  // accepted for Megatron compatibility, checked against what mHC supports
  bool fp32_residual_connection = false;
  int64_t mtp_num_layers = 0;
  int64_t pipeline_model_parallel_size = 1;

  bool hyper_connections() const { return connection != "residual"; }
  int64_t streams() const { return hyper_connections() ? num_residual_streams : 1; }
  int64_t ffn_size() const { return ffn_hidden_size > 0 ? ffn_hidden_size : 4 * hidden_size; }

  void validate() const;  // throws Error naming the first offending field
};

ModelConfig config_from_json(const nlohmann::json& json);  // unknown keys are errors
nlohmann::json config_to_json(const ModelConfig& config);
// Sets one field from "key=value"; the value is parsed as JSON, else taken as a string.
void apply_config_override(ModelConfig& config, const std::string& assignment);
void set_config_field(ModelConfig& config, const std::string& key, const nlohmann::json& value);

}  // namespace mhc
