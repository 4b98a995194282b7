// Linear layer, Megatron's convention W [out, in]:  y = x W^T (+ b)   x [rows, in], y [rows, out]
//
// Saves nothing (x is kept by the caller). Backward: dx += dy W, dW += dy^T x,
// db += column sums of dy (db may be null). Bias is optional in forward too; Megatron
// returns the output projections' bias separately to the fused bias-dropout-add, so those
// callers pass no bias here.
#pragma once
#include <cstdint>

namespace mhc::cpu {

template <typename T>
void linear_forward(const T* x, const T* weight, const T* bias, int64_t rows, int64_t in, int64_t out, T* y);

template <typename T>
void linear_backward(const T* grad_y, const T* x, const T* weight, int64_t rows, int64_t in, int64_t out, T* grad_x,
                     T* grad_weight, T* grad_bias);

// db += column sums of dy [rows, C], deterministic.
template <typename T> void accumulate_column_sums(const T* grad_y, int64_t rows, int64_t C, T* grad_bias);

}  // namespace mhc::cpu
