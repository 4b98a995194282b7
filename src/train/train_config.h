// The run configuration: the model (ModelConfig) plus the training settings, one flat
// namespace of keys so that `--set key=value` and config.json read the same way.
// Unknown keys and invalid values are errors naming the key.
#pragma once
#include <cstdint>
#include <string>

#include <nlohmann/json_fwd.hpp>

#include "core/config.h"

namespace mhc {

struct TrainConfig {
  ModelConfig model;
  int64_t steps = 300;            // train until this step (--steps)
  int64_t batch_size = 8;         // sequences per micro-batch
  int64_t grad_accumulation = 1;  // micro-batches per optimizer step
  double learning_rate = 3e-3;
  double min_learning_rate = 3e-4;
  int64_t warmup_steps = 30;
  int64_t lr_decay_steps = 0;  // cosine from warmup to here; 0: the first run's `steps`
  double weight_decay = 0.1;
  double adam_beta1 = 0.9, adam_beta2 = 0.95, adam_eps = 1e-8;
  double grad_clip = 1.0;  // global gradient norm; 0 disables
  int64_t eval_every = 50, eval_batches = 8;
  int64_t checkpoint_every = 100;
  int64_t log_every = 10;
  int64_t seed = 1337;
  std::string data;  // empty: the built-in corpus
  std::string device = "cpu";  // cpu | cuda (the whole step on one GPU, nn/gpt_cuda.h)
  // cuda: each micro-batch replayed as one CUDA graph (the step's dropout keys made in it
  // on the device); false launches the kernels one by one (same results, bitwise).
  bool cuda_graphs = true;

  void validate() const;  // model rules and the training ones
};

// Defaults: a small mHC GPT (n = 4) on byte tokens that learns the built-in corpus in
// a couple of minutes on 2 CPU cores.
TrainConfig default_train_config();
void set_train_field(TrainConfig& config, const std::string& key, const nlohmann::json& value);
void apply_train_override(TrainConfig& config, const std::string& assignment);
TrainConfig train_config_from_json(const nlohmann::json& json);  // defaults, then every key
nlohmann::json train_config_to_json(const TrainConfig& config);

}  // namespace mhc
