#include "ops/cpu/stream_expand.h"

#include "ops/cpu/parallel.h"

namespace mhc::cpu {

template <typename T> void stream_expand_forward(const T* e, int64_t tokens, int n, int64_t C, T* x) {
#pragma omp parallel for schedule(static) if (tokens * n * C >= kParallelMinWork)
  for (int64_t t = 0; t < tokens; ++t)
    for (int i = 0; i < n; ++i)
      for (int64_t c = 0; c < C; ++c) x[(t * n + i) * C + c] = e[t * C + c];
}

template <typename T> void stream_expand_backward(const T* grad_x, int64_t tokens, int n, int64_t C, T* grad_e) {
#pragma omp parallel for schedule(static) if (tokens * n * C >= kParallelMinWork)
  for (int64_t t = 0; t < tokens; ++t)
    for (int64_t c = 0; c < C; ++c) {
      T sum = 0;
      for (int i = 0; i < n; ++i) sum += grad_x[(t * n + i) * C + c];
      grad_e[t * C + c] = sum;
    }
}

template <typename T> void stream_contract_forward(const T* x, int64_t tokens, int n, int64_t C, T* out) {
#pragma omp parallel for schedule(static) if (tokens * n * C >= kParallelMinWork)
  for (int64_t t = 0; t < tokens; ++t)
    for (int64_t c = 0; c < C; ++c) {
      T sum = 0;
      for (int i = 0; i < n; ++i) sum += x[(t * n + i) * C + c];
      out[t * C + c] = sum / T(n);
    }
}

template <typename T> void stream_contract_backward(const T* grad_out, int64_t tokens, int n, int64_t C, T* grad_x) {
#pragma omp parallel for schedule(static) if (tokens * n * C >= kParallelMinWork)
  for (int64_t t = 0; t < tokens; ++t)
    for (int i = 0; i < n; ++i)
      for (int64_t c = 0; c < C; ++c) grad_x[(t * n + i) * C + c] = grad_out[t * C + c] / T(n);
}

#define MHC_INSTANTIATE(T)                                                                \
  template void stream_expand_forward<T>(const T*, int64_t, int, int64_t, T*);            \
  template void stream_expand_backward<T>(const T*, int64_t, int, int64_t, T*);           \
  template void stream_contract_forward<T>(const T*, int64_t, int, int64_t, T*);          \
  template void stream_contract_backward<T>(const T*, int64_t, int, int64_t, T*);
MHC_INSTANTIATE(float)
MHC_INSTANTIATE(double)
#undef MHC_INSTANTIATE

}  // namespace mhc::cpu
