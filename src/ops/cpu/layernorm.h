// Pre-norms, per row of C values (LayerNorm, or RMSNorm when `rms`):
//
//   LayerNorm: y = (x - mean) * rstd * w + b,  rstd = 1/sqrt(var + eps)   (biased variance)
//   RMSNorm:   y = x * rstd * w,               rstd = 1/sqrt(mean(x^2) + eps)
//
// Saves mean (LayerNorm only) and rstd per row; x is kept by the caller. Backward
// accumulates (+=) into dx, dw and db (db may be null; RMSNorm has none).
#pragma once
#include <cstdint>

namespace mhc::cpu {

template <typename T>
void norm_forward(const T* x, const T* weight, const T* bias, int64_t rows, int64_t C, double eps, bool rms, T* out,
                  T* mean, T* rstd);

template <typename T>
void norm_backward(const T* grad_out, const T* x, const T* weight, const T* mean, const T* rstd, int64_t rows,
                   int64_t C, bool rms, T* grad_x, T* grad_weight, T* grad_bias);

}  // namespace mhc::cpu
