// A named trainable tensor and its gradient (host, float or double). Names follow
// Megatron's state dict so checkpoints map one to one.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "core/rng.h"

namespace mhc {

template <typename T> struct Parameter {
  std::string name;
  std::vector<int64_t> shape;
  std::vector<T> value;
  std::vector<T> grad;  // accumulated by backward, cleared by zero_grad

  Parameter() = default;
  Parameter(std::string name_, std::vector<int64_t> shape_, T fill = T(0)) : name(std::move(name_)), shape(std::move(shape_)) {
    int64_t count = 1;
    for (int64_t d : shape) count *= d;
    value.assign(static_cast<size_t>(count), fill);
    grad.assign(static_cast<size_t>(count), T(0));
  }
  int64_t size() const { return static_cast<int64_t>(value.size()); }
  void zero_grad() { std::fill(grad.begin(), grad.end(), T(0)); }
  // Uniform in [-bound, bound) from the Philox stream `key`.
  void fill_uniform(uint64_t key, T bound) {
    for (size_t i = 0; i < value.size(); ++i) value[i] = (T(2) * T(rng_uniform(key, i)) - T(1)) * bound;
  }
};

}  // namespace mhc
