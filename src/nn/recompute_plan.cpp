#include "nn/recompute_plan.h"

#include <algorithm>

#include "core/error.h"

namespace mhc {

RecomputePlan::RecomputePlan(int layers, std::optional<int64_t> layers_per_block) {
  check(layers >= 1, "num_layers: must be >= 1");
  check(!layers_per_block || *layers_per_block >= 1, "mhc_recompute_layer_num: must be a positive integer when set");
  int first = 0;
  for (int l = 0; l < layers; ++l) {
    block_index_.push_back(static_cast<int>(blocks_.size()));
    const bool boundary = (layers_per_block && (l + 1) % *layers_per_block == 0) || l == layers - 1;
    if (boundary) {
      blocks_.push_back({first, l});
      first = l + 1;
    }
  }
}

int RecomputePlan::max_block_size() const {
  int largest = 0;
  for (const RecomputeBlock& b : blocks_) largest = std::max(largest, b.size());
  return largest;
}

}  // namespace mhc
