#include "train/train_config.h"

#include <nlohmann/json.hpp>

#include "core/config_fields.h"
#include "core/error.h"

namespace mhc {

namespace {

template <typename Config, typename Visit> void visit_train_fields(Config& c, Visit&& visit) {
  visit("steps", c.steps);
  visit("batch_size", c.batch_size);
  visit("grad_accumulation", c.grad_accumulation);
  visit("learning_rate", c.learning_rate);
  visit("min_learning_rate", c.min_learning_rate);
  visit("warmup_steps", c.warmup_steps);
  visit("lr_decay_steps", c.lr_decay_steps);
  visit("weight_decay", c.weight_decay);
  visit("adam_beta1", c.adam_beta1);
  visit("adam_beta2", c.adam_beta2);
  visit("adam_eps", c.adam_eps);
  visit("grad_clip", c.grad_clip);
  visit("eval_every", c.eval_every);
  visit("eval_batches", c.eval_batches);
  visit("checkpoint_every", c.checkpoint_every);
  visit("log_every", c.log_every);
  visit("seed", c.seed);
  visit("data", c.data);
  visit("device", c.device);
  visit("cuda_graphs", c.cuda_graphs);
}

void require(bool ok, const char* field, const std::string& rule) { check(ok, std::string(field) + ": " + rule); }

}  // namespace

TrainConfig default_train_config() {
  TrainConfig c;
  c.model.num_layers = 4;
  c.model.hidden_size = 128;
  c.model.num_attention_heads = 4;
  c.model.vocab_size = 256;
  c.model.seq_length = 128;
  c.model.connection = "mhc";
  c.model.num_residual_streams = 4;
  return c;
}

void TrainConfig::validate() const {
  model.validate();
  require(steps >= 0, "steps", "must be >= 0");
  require(batch_size >= 1, "batch_size", "must be >= 1");
  require(grad_accumulation >= 1, "grad_accumulation", "must be >= 1");
  require(learning_rate > 0, "learning_rate", "must be > 0");
  require(min_learning_rate >= 0 && min_learning_rate <= learning_rate, "min_learning_rate",
          "must be in [0, learning_rate]");
  require(warmup_steps >= 0, "warmup_steps", "must be >= 0");
  require(lr_decay_steps >= 0, "lr_decay_steps", "must be >= 0");
  require(weight_decay >= 0, "weight_decay", "must be >= 0");
  require(adam_beta1 >= 0 && adam_beta1 < 1, "adam_beta1", "must be in [0, 1)");
  require(adam_beta2 >= 0 && adam_beta2 < 1, "adam_beta2", "must be in [0, 1)");
  require(adam_eps > 0, "adam_eps", "must be > 0");
  require(grad_clip >= 0, "grad_clip", "must be >= 0 (0 disables clipping)");
  require(eval_every >= 1, "eval_every", "must be >= 1");
  require(eval_batches >= 1, "eval_batches", "must be >= 1");
  require(checkpoint_every >= 1, "checkpoint_every", "must be >= 1");
  require(log_every >= 1, "log_every", "must be >= 1");
  require(device == "cpu" || device == "cuda", "device", "must be cpu or cuda, got \"" + device + "\"");
  require(seed >= 0, "seed", "must be >= 0");
}

void set_train_field(TrainConfig& config, const std::string& key, const nlohmann::json& value) {
  if (fields::set(config, [](auto& c, auto&& v) { visit_train_fields(c, v); }, key, value)) return;
  set_config_field(config.model, key, value);  // names the key if it is unknown there too
}

void apply_train_override(TrainConfig& config, const std::string& assignment) {
  const auto [key, value] = fields::parse_assignment(assignment);
  set_train_field(config, key, value);
}

TrainConfig train_config_from_json(const nlohmann::json& json) {
  check(json.is_object(), "configuration must be a JSON object");
  TrainConfig config = default_train_config();
  for (const auto& [key, value] : json.items()) set_train_field(config, key, value);
  return config;
}

nlohmann::json train_config_to_json(const TrainConfig& config) {
  nlohmann::json json = config_to_json(config.model);
  fields::to_json(config, [](auto& c, auto&& v) { visit_train_fields(c, v); }, json);
  return json;
}

}  // namespace mhc
