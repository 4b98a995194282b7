// The training loop behind `mhc train`: data, model, AdamW, schedule, clipping, gradient
// accumulation, evaluation, metrics (DIR/metrics.jsonl), the resolved configuration
// (DIR/config.json) and atomic checkpoints (DIR/checkpoint.safetensors). Resuming from a
// run's checkpoint continues it bit for bit.
#pragma once
#include <cstdint>
#include <cstdio>
#include <string>
#include <vector>

#include "nn/gpt.h"
#include "train/data.h"
#include "train/learner.h"
#include "train/train_config.h"

namespace mhc {

struct TrainRunOptions {
  std::string out_dir;
  bool resume = false;         // continue the run in out_dir up to `steps`
  int64_t resume_steps = -1;   // with resume: the new target step (-1: the stored one)
  bool progress_bar = false;   // a live bar (stdout is a terminal) instead of log lines
  std::FILE* log = stdout;
  LearnerFactory cuda_learner;  // for device = cuda; empty in a build without CUDA
};

struct TrainSummary {
  int64_t first_step = 0, last_step = 0;
  std::vector<double> losses;  // one per step run now
  double val_loss = 0;
};

TrainSummary run_training(TrainConfig config, const TrainRunOptions& options);


}  // namespace mhc
