#include "ops/cpu/linear.h"

#include "ops/cpu/gemm.h"
#include "ops/cpu/parallel.h"

namespace mhc::cpu {

template <typename T>
void linear_forward(const T* x, const T* weight, const T* bias, int64_t rows, int64_t in, int64_t out, T* y) {
  gemm<T>(false, true, rows, out, in, T(1), x, in, weight, in, T(0), y, out);
  if (!bias) return;
#pragma omp parallel for schedule(static) if (rows * out >= kParallelMinWork)
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t o = 0; o < out; ++o) y[r * out + o] += bias[o];
}

template <typename T> void accumulate_column_sums(const T* grad_y, int64_t rows, int64_t C, T* grad_bias) {
#pragma omp parallel for schedule(static) if (rows * C >= kParallelMinWork)
  for (int64_t c = 0; c < C; ++c) {
    double sum = 0;
    for (int64_t r = 0; r < rows; ++r) sum += grad_y[r * C + c];
    grad_bias[c] += static_cast<T>(sum);
  }
}

template <typename T>
void linear_backward(const T* grad_y, const T* x, const T* weight, int64_t rows, int64_t in, int64_t out, T* grad_x,
                     T* grad_weight, T* grad_bias) {
  gemm<T>(false, false, rows, in, out, T(1), grad_y, out, weight, in, T(1), grad_x, in);
  gemm<T>(true, false, out, in, rows, T(1), grad_y, out, x, in, T(1), grad_weight, in);
  if (grad_bias) accumulate_column_sums(grad_y, rows, out, grad_bias);
}

#define MHC_INSTANTIATE(T)                                                                                 \
  template void linear_forward<T>(const T*, const T*, const T*, int64_t, int64_t, int64_t, T*);           \
  template void linear_backward<T>(const T*, const T*, const T*, int64_t, int64_t, int64_t, T*, T*, T*);  \
  template void accumulate_column_sums<T>(const T*, int64_t, int64_t, T*);
MHC_INSTANTIATE(float)
MHC_INSTANTIATE(double)
#undef MHC_INSTANTIATE

}  // namespace mhc::cpu
