// A named trainable tensor and its gradient (host, float or double). Names follow
// Megatron's state dict so checkpoints map one to one.
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "core/rng.h"
#include "ops/cpu/parallel.h"

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
  // Normal(0, std) from the Philox stream `key` (Box-Muller on pairs of uniforms): value i
  // takes uniforms 2i and 2i + 1, so one Philox call (four uniforms) makes two values.
  void fill_normal(uint64_t key, T std) {
    fill_from_blocks(key, 2, [std](const Philox4x32& r, int h) {
      const double u1 = 1.0 - static_cast<double>(uint_to_unit_float(r.v[2 * h]));  // (0, 1]
      const double u2 = static_cast<double>(uint_to_unit_float(r.v[2 * h + 1]));
      return static_cast<T>(std * std::sqrt(-2.0 * std::log(u1)) * std::cos(6.283185307179586 * u2));
    });
  }
  // Uniform in [-bound, bound) from the Philox stream `key`: value i is uniform i.
  void fill_uniform(uint64_t key, T bound) {
    fill_from_blocks(
        key, 4, [bound](const Philox4x32& r, int h) { return (T(2) * T(uint_to_unit_float(r.v[h])) - T(1)) * bound; });
  }

 private:
  // value[per k + h] = make(Philox block k of `key`, h), the blocks on all cores: each value
  // is a function of its index alone, so the bits do not depend on the threads. (One
  // thread, a Philox call a uniform, took 7-9 s for the 85M values of GPT-2 small at vocab 256.)
  template <typename Make>
  void fill_from_blocks(uint64_t key, int per, Make make) {
    const int64_t count = size(), blocks = (count + per - 1) / per;
#pragma omp parallel for schedule(static) if (count >= cpu::kParallelMinWork)
    for (int64_t k = 0; k < blocks; ++k) {
      const Philox4x32 r = philox4x32(static_cast<uint64_t>(k), 0, key);
      for (int h = 0; h < per && per * k + h < count; ++h) value[static_cast<size_t>(per * k + h)] = make(r, h);
    }
  }
};

}  // namespace mhc
