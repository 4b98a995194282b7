// Whole-model gradient check: a tiny GPT in double, every parameter tensor and the input
// embeddings, analytic gradients against central finite differences at sampled entries.
#pragma once
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "core/config.h"

namespace mhc {

struct GradCheckOptions {
  std::string connection = "mhc";
  int64_t streams = 4;
  std::optional<int64_t> recompute_layers;  // set: recompute = mhc with this many layers per block
  uint64_t seed = 1;
  int64_t samples_per_tensor = 16;
  std::vector<std::string> overrides;  // key=value applied last (e.g. normalization=RMSNorm)
};

// Gradients whose norm is below this floor are judged by absolute error: some are exactly
// zero (the last layer's alpha_res: a doubly stochastic H_res drops out of the stream
// mean), and finite differences of those are rounding noise of about 1e-11.
inline constexpr double kGradientFloor = 1e-4;

struct GradCheckEntry {
  std::string name;
  double error = 0;  // ||analytic - numeric|| / max(||numeric||, kGradientFloor) over the sampled entries
  int64_t checked = 0;
};

ModelConfig gradcheck_config(const GradCheckOptions& options);
std::vector<GradCheckEntry> check_model_gradients(const GradCheckOptions& options);

}  // namespace mhc
