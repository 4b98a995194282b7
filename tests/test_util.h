// Helpers for the tests: seeded random vectors and central finite differences.
#pragma once
#include <cmath>
#include <cstdint>
#include <functional>
#include <random>
#include <vector>

namespace mhc::test {

inline std::vector<double> random_vector(size_t count, uint64_t seed, double lo = -1.0, double hi = 1.0) {
  std::mt19937_64 gen(seed);
  std::uniform_real_distribution<double> dist(lo, hi);
  std::vector<double> v(count);
  for (double& x : v) x = dist(gen);
  return v;
}

inline double dot(const std::vector<double>& a, const std::vector<double>& b) {
  double s = 0;
  for (size_t i = 0; i < a.size(); ++i) s += a[i] * b[i];
  return s;
}

// Central differences of the scalar `loss()` with respect to every element of `v`.
inline std::vector<double> numeric_gradient(std::vector<double>& v, const std::function<double()>& loss,
                                            double step = 1e-6) {
  std::vector<double> grad(v.size());
  for (size_t i = 0; i < v.size(); ++i) {
    const double saved = v[i];
    v[i] = saved + step;
    const double up = loss();
    v[i] = saved - step;
    const double down = loss();
    v[i] = saved;
    grad[i] = (up - down) / (2 * step);
  }
  return grad;
}

// ||a - b|| / max(||b||, floor): relative error with a floor for near-zero gradients.
inline double relative_error(const std::vector<double>& a, const std::vector<double>& b, double floor = 1e-8) {
  double diff = 0, norm = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    diff += (a[i] - b[i]) * (a[i] - b[i]);
    norm += b[i] * b[i];
  }
  return std::sqrt(diff) / std::max(std::sqrt(norm), floor);
}

}  // namespace mhc::test
