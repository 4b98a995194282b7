// A named trainable tensor and its gradient (host, float or double). Names follow
// Megatron's state dict so checkpoints map one to one.
#pragma once
#include <algorithm>
#include <cmath>
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
  // Normal(0, std) from the Philox stream `key` (Box-Muller on pairs of uniforms).
  void fill_normal(uint64_t key, T std) {
    for (size_t i = 0; i < value.size(); ++i) {
      const double u1 = 1.0 - static_cast<double>(rng_uniform(key, 2 * i));  // (0, 1]
      const double u2 = static_cast<double>(rng_uniform(key, 2 * i + 1));
      value[i] = static_cast<T>(std * std::sqrt(-2.0 * std::log(u1)) * std::cos(6.283185307179586 * u2));
    }
  }
  // Uniform in [-bound, bound) from the Philox stream `key`.
  void fill_uniform(uint64_t key, T bound) {
    for (size_t i = 0; i < value.size(); ++i) value[i] = (T(2) * T(rng_uniform(key, i)) - T(1)) * bound;
  }
};

}  // namespace mhc
