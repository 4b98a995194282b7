// AdamW with decoupled weight decay (Loshchilov & Hutter), the learning-rate schedule
// (linear warmup, then cosine decay to a floor) and clipping by the global gradient norm.
// Weight decay applies to matrices only: not to norms, biases, the position table or the
// mHC gates (DESIGN.md, issue 4).
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "nn/parameter.h"
#include "train/train_config.h"

namespace mhc {

bool decays(const std::string& parameter_name);

double learning_rate_at(const TrainConfig& config, int64_t step);

// Scales every gradient by `scale`, then returns the global L2 norm (before clipping) and
// clips to config.grad_clip.
double scale_and_clip_gradients(const std::vector<Parameter<float>*>& parameters, float scale, double clip);

// The scalars of one AdamW step (`steps_taken` counts this step), shared with the CUDA
// optimizer (ops/cuda/adamw.h). decay multiplies the parameters that decay.
struct AdamWScalars {
  float beta1, beta2, eps, step_size, sqrt_correction2, decay;
};
AdamWScalars adamw_scalars(const TrainConfig& config, double lr, int64_t steps_taken);

class AdamW {
 public:
  explicit AdamW(const std::vector<Parameter<float>*>& parameters);
  void step(const TrainConfig& config, double lr);
  int64_t steps_taken = 0;  // for bias correction; saved in checkpoints
  std::vector<std::vector<float>> exp_avg, exp_avg_sq;

 private:
  std::vector<Parameter<float>*> parameters_;
  std::vector<bool> decay_;
};

}  // namespace mhc
