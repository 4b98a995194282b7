#include "ops/cpu/sinkhorn.h"

#include <algorithm>
#include <cmath>
#include <vector>

#include "ops/cpu/parallel.h"

namespace mhc::cpu {

namespace {

// Normalises the rows (stride_major = n, stride_minor = 1) or the columns (n swapped with
// 1) of M in place; `sums` receives the clamped divisors.
template <typename T> void normalise(T* M, int n, int stride_major, int stride_minor, T* sums) {
  for (int a = 0; a < n; ++a) {
    T s = 0;
    for (int b = 0; b < n; ++b) s += M[a * stride_major + b * stride_minor];
    s = std::max(s, T(kSinkhornEps));
    for (int b = 0; b < n; ++b) M[a * stride_major + b * stride_minor] /= s;
    sums[a] = s;
  }
}

// dv = (dy - [s >= eps] * sum(dy * y)) / s for each row (or column), in place on dy.
// Entries that are exactly zero (exp underflow) stay zero through every step and end
// multiplied by M0 = 0: their gradient is 0, kept so rather than let clamped sums grow it
// by 1/eps per step into inf * 0 = NaN.
template <typename T> void normalise_backward(T* grad, const T* y, const T* sums, int n, int stride_major, int stride_minor) {
  for (int a = 0; a < n; ++a) {
    T dot = 0;
    for (int b = 0; b < n; ++b) {
      const int k = a * stride_major + b * stride_minor;
      if (y[k] != T(0)) dot += grad[k] * y[k];
    }
    // s > eps exactly when the clamp was inactive (an unclamped sum equal to eps is measure zero)
    if (!(sums[a] > T(kSinkhornEps))) dot = 0;
    for (int b = 0; b < n; ++b) {
      const int k = a * stride_major + b * stride_minor;
      grad[k] = y[k] != T(0) ? (grad[k] - dot) / sums[a] : T(0);
    }
  }
}

template <typename T> void exp_shifted(const T* logits, int n, T* M) {
  for (int i = 0; i < n; ++i) {
    T row_max = logits[i * n];
    for (int j = 1; j < n; ++j) row_max = std::max(row_max, logits[i * n + j]);
    for (int j = 0; j < n; ++j) M[i * n + j] = std::exp(logits[i * n + j] - row_max);
  }
}

}  // namespace

template <typename T> void sinkhorn_forward(const T* logits, int n, int iterations, T* out) {
  exp_shifted(logits, n, out);
  thread_local std::vector<T> sums;
  sums.resize(n);
  for (int t = 0; t < iterations; ++t) {
    normalise(out, n, n, 1, sums.data());
    normalise(out, n, 1, n, sums.data());
  }
}

template <typename T> void sinkhorn_backward(const T* logits, const T* grad_out, int n, int iterations, T* grad_logits) {
  const size_t nn = static_cast<size_t>(n) * n;
  // Scratch for the recomputed iterations: M0, then for each half step its output and sums.
  thread_local std::vector<T> scratch;
  scratch.resize(nn + 2 * static_cast<size_t>(iterations) * (nn + n));
  T* M0 = scratch.data();
  exp_shifted(logits, n, M0);
  const T* previous = M0;
  for (int half = 0; half < 2 * iterations; ++half) {
    T* y = M0 + nn + half * (nn + n);
    std::copy(previous, previous + nn, y);
    const bool rows = half % 2 == 0;
    normalise(y, n, rows ? n : 1, rows ? 1 : n, y + nn);
    previous = y;
  }
  std::copy(grad_out, grad_out + nn, grad_logits);
  for (int half = 2 * iterations - 1; half >= 0; --half) {
    const T* y = M0 + nn + half * (nn + n);
    const bool rows = half % 2 == 0;
    normalise_backward(grad_logits, y, y + nn, n, rows ? n : 1, rows ? 1 : n);
  }
  for (size_t k = 0; k < nn; ++k) grad_logits[k] *= M0[k];
}

template <typename T> void sinkhorn_forward_batch(const T* logits, int64_t count, int n, int iterations, T* out) {
  const int64_t nn = static_cast<int64_t>(n) * n;
#pragma omp parallel for schedule(static) if (count * nn * iterations >= kParallelMinWork)
  for (int64_t m = 0; m < count; ++m) sinkhorn_forward(logits + m * nn, n, iterations, out + m * nn);
}

template <typename T>
void sinkhorn_backward_batch(const T* logits, const T* grad_out, int64_t count, int n, int iterations, T* grad_logits) {
  const int64_t nn = static_cast<int64_t>(n) * n;
#pragma omp parallel for schedule(static) if (count * nn * iterations >= kParallelMinWork)
  for (int64_t m = 0; m < count; ++m)
    sinkhorn_backward(logits + m * nn, grad_out + m * nn, n, iterations, grad_logits + m * nn);
}

#define MHC_INSTANTIATE(T)                                                                     \
  template void sinkhorn_forward<T>(const T*, int, int, T*);                                   \
  template void sinkhorn_backward<T>(const T*, const T*, int, int, T*);                        \
  template void sinkhorn_forward_batch<T>(const T*, int64_t, int, int, T*);                    \
  template void sinkhorn_backward_batch<T>(const T*, const T*, int64_t, int, int, T*);
MHC_INSTANTIATE(float)
MHC_INSTANTIATE(double)
#undef MHC_INSTANTIATE

}  // namespace mhc::cpu
