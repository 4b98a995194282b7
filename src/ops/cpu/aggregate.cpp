#include "ops/cpu/aggregate.h"

#include "ops/cpu/parallel.h"

namespace mhc::cpu {

template <typename T> void aggregate_forward(const T* x, const T* h_pre, int64_t tokens, int n, int64_t C, T* agg) {
#pragma omp parallel for schedule(static) if (tokens * n * C >= kParallelMinWork)
  for (int64_t t = 0; t < tokens; ++t) {
    T* out = agg + t * C;
    for (int64_t c = 0; c < C; ++c) out[c] = 0;
    for (int j = 0; j < n; ++j) {
      const T gate = h_pre[t * n + j];
      const T* xj = x + (t * n + j) * C;
      for (int64_t c = 0; c < C; ++c) out[c] += gate * xj[c];
    }
  }
}

template <typename T>
void aggregate_backward(const T* grad_agg, const T* x, const T* h_pre, int64_t tokens, int n, int64_t C, T* grad_x,
                        T* grad_h_pre) {
#pragma omp parallel for schedule(static) if (tokens * n * C >= kParallelMinWork)
  for (int64_t t = 0; t < tokens; ++t) {
    const T* g = grad_agg + t * C;
    for (int j = 0; j < n; ++j) {
      const T gate = h_pre[t * n + j];
      const T* xj = x + (t * n + j) * C;
      T* gxj = grad_x + (t * n + j) * C;
      double dot = 0;
      for (int64_t c = 0; c < C; ++c) {
        dot += static_cast<double>(g[c]) * xj[c];
        gxj[c] += gate * g[c];
      }
      grad_h_pre[t * n + j] = static_cast<T>(dot);
    }
  }
}

template void aggregate_forward<float>(const float*, const float*, int64_t, int, int64_t, float*);
template void aggregate_forward<double>(const double*, const double*, int64_t, int, int64_t, double*);
template void aggregate_backward<float>(const float*, const float*, const float*, int64_t, int, int64_t, float*,
                                        float*);
template void aggregate_backward<double>(const double*, const double*, const double*, int64_t, int, int64_t,
                                         double*, double*);

}  // namespace mhc::cpu
