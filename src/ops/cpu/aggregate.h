// Aggregate: the sublayer input as a gated sum of the n streams, per token
//
//   agg[c] = sum_j H_pre[j] * x[j][c]                 x [tokens, n, C], agg [tokens, C]
//
// Saves nothing of its own (x and H_pre are kept by the caller). Reductions over C
// accumulate in double, also for T = float. Backward:
//   dx[j][c] += H_pre[j] * dagg[c]        (accumulates: x also feeds the mappings and H_res)
//   dH_pre[j] = sum_c dagg[c] * x[j][c]   (overwrites)
#pragma once
#include <cstdint>

namespace mhc::cpu {

template <typename T> void aggregate_forward(const T* x, const T* h_pre, int64_t tokens, int n, int64_t C, T* agg);

template <typename T>
void aggregate_backward(const T* grad_agg, const T* x, const T* h_pre, int64_t tokens, int n, int64_t C, T* grad_x,
                        T* grad_h_pre);

}  // namespace mhc::cpu
