// The training loop's learner on one CUDA device (nn/gpt_cuda.h), for `--device cuda`.
#pragma once
#include <memory>

#include "train/learner.h"

namespace mhc {

std::unique_ptr<Learner> make_cuda_learner(const TrainConfig& config);

}  // namespace mhc
