#include "ops/cpu/layernorm.h"

#include <cmath>

#include "ops/cpu/parallel.h"

namespace mhc::cpu {

template <typename T>
void norm_forward(const T* x, const T* weight, const T* bias, int64_t rows, int64_t C, double eps, bool rms, T* out,
                  T* mean, T* rstd) {
#pragma omp parallel for schedule(static) if (rows * C >= kParallelMinWork)
  for (int64_t r = 0; r < rows; ++r) {
    const T* xr = x + r * C;
    double mu = 0, var = 0;
    if (!rms) {
      for (int64_t c = 0; c < C; ++c) mu += xr[c];
      mu /= static_cast<double>(C);
    }
    for (int64_t c = 0; c < C; ++c) var += (xr[c] - mu) * (xr[c] - mu);
    const T s = static_cast<T>(1.0 / std::sqrt(var / static_cast<double>(C) + eps));
    const T m = static_cast<T>(mu);
    for (int64_t c = 0; c < C; ++c) out[r * C + c] = (xr[c] - m) * s * weight[c] + (bias ? bias[c] : T(0));
    if (mean) mean[r] = m;
    rstd[r] = s;
  }
}

template <typename T>
void norm_backward(const T* grad_out, const T* x, const T* weight, const T* mean, const T* rstd, int64_t rows,
                   int64_t C, bool rms, T* grad_x, T* grad_weight, T* grad_bias) {
#pragma omp parallel for schedule(static) if (rows * C >= kParallelMinWork)
  for (int64_t r = 0; r < rows; ++r) {
    const T* g = grad_out + r * C;
    const T* xr = x + r * C;
    const T m = rms ? T(0) : mean[r], s = rstd[r];
    // dx = s * (g w - mean(g w) - xhat * mean(g w xhat)); RMSNorm drops the mean(g w) term.
    double sum_gw = 0, sum_gw_xhat = 0;
    for (int64_t c = 0; c < C; ++c) {
      const double gw = static_cast<double>(g[c]) * weight[c];
      sum_gw += gw;
      sum_gw_xhat += gw * ((xr[c] - m) * s);
    }
    const T mean_gw = rms ? T(0) : static_cast<T>(sum_gw / static_cast<double>(C));
    const T mean_gw_xhat = static_cast<T>(sum_gw_xhat / static_cast<double>(C));
    for (int64_t c = 0; c < C; ++c) {
      const T xhat = (xr[c] - m) * s;
      grad_x[r * C + c] += s * (g[c] * weight[c] - mean_gw - xhat * mean_gw_xhat);
    }
  }
  // Parameter gradients: one column per thread, rows summed in order (deterministic).
#pragma omp parallel for schedule(static) if (rows * C >= kParallelMinWork)
  for (int64_t c = 0; c < C; ++c) {
    double dw = 0, db = 0;
    for (int64_t r = 0; r < rows; ++r) {
      const T m = rms ? T(0) : mean[r];
      dw += static_cast<double>(grad_out[r * C + c]) * ((x[r * C + c] - m) * rstd[r]);
      db += grad_out[r * C + c];
    }
    grad_weight[c] += static_cast<T>(dw);
    if (grad_bias) grad_bias[c] += static_cast<T>(db);
  }
}

#define MHC_INSTANTIATE(T)                                                                                  \
  template void norm_forward<T>(const T*, const T*, const T*, int64_t, int64_t, double, bool, T*, T*, T*); \
  template void norm_backward<T>(const T*, const T*, const T*, const T*, const T*, int64_t, int64_t, bool, T*, T*, T*);
MHC_INSTANTIATE(float)
MHC_INSTANTIATE(double)
#undef MHC_INSTANTIATE

}  // namespace mhc::cpu
