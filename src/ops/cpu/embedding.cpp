#include "ops/cpu/embedding.h"

#include <algorithm>
#include <cmath>
#include <vector>

#include "ops/cpu/gemm.h"
#include "ops/cpu/parallel.h"

namespace mhc::cpu {

template <typename T>
void embedding_forward(const int32_t* tokens, const T* wte, const T* wpe, int64_t batch, int64_t seq, int64_t C, T* e) {
#pragma omp parallel for schedule(static) if (batch * seq * C >= kParallelMinWork)
  for (int64_t r = 0; r < batch * seq; ++r) {
    const T* tok = wte + static_cast<int64_t>(tokens[r]) * C;
    const T* pos = wpe + (r % seq) * C;
    for (int64_t c = 0; c < C; ++c) e[r * C + c] = tok[c] + pos[c];
  }
}

template <typename T>
void embedding_backward(const T* grad_e, const int32_t* tokens, int64_t batch, int64_t seq, int64_t C, T* grad_wte,
                        T* grad_wpe) {
  // Parallel over channels: each thread owns columns, rows are visited in order.
#pragma omp parallel for schedule(static) if (batch * seq * C >= kParallelMinWork)
  for (int64_t c = 0; c < C; ++c)
    for (int64_t r = 0; r < batch * seq; ++r) {
      grad_wte[static_cast<int64_t>(tokens[r]) * C + c] += grad_e[r * C + c];
      grad_wpe[(r % seq) * C + c] += grad_e[r * C + c];
    }
}

template <typename T>
double lm_head_forward(const T* h, const T* wte, const int32_t* targets, int64_t rows, int64_t C, int64_t V, T* probs) {
  gemm<T>(false, true, rows, V, C, T(1), h, C, wte, C, T(0), probs, V);
  thread_local std::vector<double> row_loss;  // summed in order below: the loss is deterministic
  row_loss.resize(static_cast<size_t>(rows));
  double* losses = row_loss.data();
#pragma omp parallel for schedule(static) if (rows * V >= kParallelMinWork)
  for (int64_t r = 0; r < rows; ++r) {
    T* p = probs + r * V;
    const T max_logit = *std::max_element(p, p + V);
    const double target_logit = static_cast<double>(p[targets[r]] - max_logit);
    double sum = 0;
    for (int64_t v = 0; v < V; ++v) sum += (p[v] = std::exp(p[v] - max_logit));
    losses[r] = std::log(sum) - target_logit;
    for (int64_t v = 0; v < V; ++v) p[v] = static_cast<T>(p[v] / sum);
  }
  double loss = 0;
  for (int64_t r = 0; r < rows; ++r) loss += losses[r];
  return loss / static_cast<double>(rows);
}

template <typename T>
void lm_head_backward(T* probs, const T* h, const T* wte, const int32_t* targets, int64_t rows, int64_t C, int64_t V,
                      T* grad_h, T* grad_wte) {
  const T inv_rows = T(1) / static_cast<T>(rows);
#pragma omp parallel for schedule(static) if (rows * V >= kParallelMinWork)
  for (int64_t r = 0; r < rows; ++r) {
    T* p = probs + r * V;
    p[targets[r]] -= T(1);
    for (int64_t v = 0; v < V; ++v) p[v] *= inv_rows;
  }
  gemm<T>(false, false, rows, C, V, T(1), probs, V, wte, C, T(1), grad_h, C);
  gemm<T>(true, false, V, C, rows, T(1), probs, V, h, C, T(1), grad_wte, C);
}

#define MHC_INSTANTIATE(T)                                                                                       \
  template void embedding_forward<T>(const int32_t*, const T*, const T*, int64_t, int64_t, int64_t, T*);         \
  template void embedding_backward<T>(const T*, const int32_t*, int64_t, int64_t, int64_t, T*, T*);              \
  template double lm_head_forward<T>(const T*, const T*, const int32_t*, int64_t, int64_t, int64_t, T*);         \
  template void lm_head_backward<T>(T*, const T*, const T*, const int32_t*, int64_t, int64_t, int64_t, T*, T*);
MHC_INSTANTIATE(float)
MHC_INSTANTIATE(double)
#undef MHC_INSTANTIATE

}  // namespace mhc::cpu
