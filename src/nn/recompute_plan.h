// The selective-recompute plan (our counterpart of Megatron's
// CheckpointWithoutOutputManager), DESIGN.md §2. With mhc_recompute_layer_num = k, layer l
// (0-based) ends a block when (l+1) % k == 0 or it is the last layer; unset k means one
// block for the whole stack. Inside a block the aggregates, the norms after them and the
// fused H_res/H_post/bias-dropout-add outputs are discarded in forward (they live in a
// workspace shared by all blocks) except the last layer's MLP output, the block boundary;
// the block's backward first restores them, once, by re-running those cheap ops in order.
#pragma once
#include <cstdint>
#include <optional>
#include <vector>

namespace mhc {

struct RecomputeBlock {
  int first, last;  // inclusive layer range
  int size() const { return last - first + 1; }
};

class RecomputePlan {
 public:
  RecomputePlan() = default;
  RecomputePlan(int layers, std::optional<int64_t> layers_per_block);
  const std::vector<RecomputeBlock>& blocks() const { return blocks_; }
  const RecomputeBlock& block_of(int layer) const { return blocks_[block_index_[layer]]; }
  bool ends_block(int layer) const { return block_of(layer).last == layer; }
  int slot(int layer) const { return layer - block_of(layer).first; }  // workspace slot of a layer
  int max_block_size() const;

 private:
  std::vector<RecomputeBlock> blocks_;
  std::vector<int> block_index_;
};

}  // namespace mhc
