// Helpers of the CUDA tests: bf16 random data with its exact double values, poisoned
// device outputs, widening to double for comparison with the CPU reference.
#pragma once
#include <bit>
#include <cstring>
#include <vector>

#include "core/cuda/device.h"
#include "core/tensor.h"
#include "ops/cuda/stream_mix.h"
#include "test_util.h"

namespace mhc::test {

using cuda::bf16;
using cuda::DeviceBuffer;

inline constexpr double kBf16Tolerance = 1e-2, kFp32Tolerance = 2e-5;

// Random values exactly representable in bf16, as bf16 bits and as doubles.
struct Bf16Data {
  std::vector<bf16> bits;
  std::vector<double> values;
};
inline Bf16Data random_bf16(size_t count, uint64_t seed) {
  Bf16Data d;
  for (double v : random_vector(count, seed)) {
    const uint16_t b = float_to_bf16(static_cast<float>(v));
    d.bits.push_back(std::bit_cast<bf16>(b));
    d.values.push_back(bf16_to_float(b));
  }
  return d;
}
inline std::vector<float> random_float(size_t count, uint64_t seed, double lo = -1, double hi = 1) {
  const auto v = random_vector(count, seed, lo, hi);
  return {v.begin(), v.end()};
}
inline std::vector<double> widen(const std::vector<float>& v) { return {v.begin(), v.end()}; }
inline std::vector<double> widen(const std::vector<bf16>& v) {
  std::vector<double> out;
  for (bf16 b : v) out.push_back(bf16_to_float(std::bit_cast<uint16_t>(b)));
  return out;
}
template <typename T> DeviceBuffer<T> poisoned(size_t count) {
  DeviceBuffer<T> b(count);
  b.fill_bytes(0xFF);
  return b;
}

}  // namespace mhc::test
