#include "ops/cpu/activation.h"

#include <cmath>
#include <numbers>

#include "ops/cpu/parallel.h"

namespace mhc::cpu {

namespace {
template <typename T> T gaussian_cdf(T x) { return T(0.5) * (T(1) + std::erf(x / std::numbers::sqrt2_v<T>)); }
template <typename T> T gaussian_pdf(T x) { return std::exp(T(-0.5) * x * x) / std::sqrt(T(2) * std::numbers::pi_v<T>); }
template <typename T> T sigmoid(T x) { return T(1) / (T(1) + std::exp(-x)); }
}  // namespace

template <typename T> void activation_forward(Activation a, const T* x, int64_t rows, int64_t F, T* out) {
  const int64_t width = activation_input_width(a, F);
#pragma omp parallel for schedule(static) if (rows * width >= kParallelMinWork)
  for (int64_t r = 0; r < rows; ++r) {
    const T* xr = x + r * width;
    for (int64_t f = 0; f < F; ++f)
      out[r * F + f] = a == Activation::Gelu ? xr[f] * gaussian_cdf(xr[f]) : xr[f] * sigmoid(xr[f]) * xr[F + f];
  }
}

template <typename T>
void activation_backward(Activation a, const T* grad_out, const T* x, int64_t rows, int64_t F, T* grad_x) {
  const int64_t width = activation_input_width(a, F);
#pragma omp parallel for schedule(static) if (rows * width >= kParallelMinWork)
  for (int64_t r = 0; r < rows; ++r) {
    const T* xr = x + r * width;
    T* gx = grad_x + r * width;
    for (int64_t f = 0; f < F; ++f) {
      const T g = grad_out[r * F + f];
      if (a == Activation::Gelu) {
        gx[f] = g * (gaussian_cdf(xr[f]) + xr[f] * gaussian_pdf(xr[f]));
      } else {
        const T s = sigmoid(xr[f]);
        gx[f] = g * xr[F + f] * s * (T(1) + xr[f] * (T(1) - s));
        gx[F + f] = g * xr[f] * s;
      }
    }
  }
}

#define MHC_INSTANTIATE(T)                                                                  \
  template void activation_forward<T>(Activation, const T*, int64_t, int64_t, T*);          \
  template void activation_backward<T>(Activation, const T*, const T*, int64_t, int64_t, T*);
MHC_INSTANTIATE(float)
MHC_INSTANTIATE(double)
#undef MHC_INSTANTIATE

}  // namespace mhc::cpu
