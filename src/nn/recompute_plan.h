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

// The tensors of a layer that selective recompute discards (the aggregates of the two
// hyper connections, the norm outputs, the two fused-add outputs), carved from one slab in
// this order; the aggregates only where `aggregates` (hyper connections whose model keeps
// them: the CPU's, the GPU's where its kernels cannot make them again in the backward).
// Both models (CPU, CUDA) use this layout.
template <typename T> struct RestorableTensors {
  T *agg1 = nullptr, *ln1_out = nullptr, *x_mid = nullptr, *agg2 = nullptr, *ln2_out = nullptr, *x_out = nullptr;
};

inline int64_t restorable_elements(int64_t tokens, int64_t C, int64_t n, bool aggregates) {
  return (aggregates ? 4 : 2) * tokens * C + 2 * tokens * n * C;
}

template <typename T>
RestorableTensors<T> carve_restorable(T* base, int64_t tokens, int64_t C, int64_t n, bool aggregates) {
  RestorableTensors<T> r;
  auto take = [&base](int64_t elements) {
    T* slice = base;
    base += elements;
    return slice;
  };
  if (aggregates) r.agg1 = take(tokens * C);
  r.ln1_out = take(tokens * C);
  r.x_mid = take(tokens * n * C);
  if (aggregates) r.agg2 = take(tokens * C);
  r.ln2_out = take(tokens * C);
  r.x_out = take(tokens * n * C);
  return r;
}

}  // namespace mhc
