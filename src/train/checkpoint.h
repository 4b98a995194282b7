// Checkpoints: one safetensors file holding the model parameters (Megatron names, F32),
// the AdamW state (`optimizer.exp_avg.<name>`, `optimizer.exp_avg_sq.<name>`) and, in the
// metadata, the step, the data position, the optimizer's step count and the resolved
// configuration. The dropout masks are a function of (seed, layer, step, site), so the
// seed in the configuration and the step are the whole random state. Written atomically.
#pragma once
#include <cstdint>
#include <string>

#include "nn/gpt.h"
#include "train/optimizer.h"
#include "train/train_config.h"

namespace mhc {

struct TrainingState {
  int64_t step = 0;            // optimizer steps completed
  uint64_t data_position = 0;  // the batcher's position
};

void save_checkpoint(const std::string& path, const TrainConfig& config, Gpt<float>& model, const AdamW* optimizer,
                     const TrainingState& state);

// The configuration stored in a checkpoint (to build the model before loading it).
TrainConfig checkpoint_config(const std::string& path);

// Loads parameters (and the optimizer when given); errors name the file and any tensor
// that is missing or whose shape does not match the configuration.
TrainingState load_checkpoint(const std::string& path, Gpt<float>& model, AdamW* optimizer);

}  // namespace mhc
