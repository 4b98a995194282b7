// CUDA linear layer (ops/cpu/linear.h has the math), Megatron's W [out, in]:
//
//   forward:  y = x W^T (+ b)                          (bf16 x, W, b and y; fp32 sums)
//   backward: dx = dy W (overwritten, bf16), dW += dy^T x (fp32), db += column sums of dy
//             (with accumulate false, dW = and db =: the first micro-batch of a step writes
//             the gradients, so that they need no zeroing)
//
// Products through cuBLASLt (the bias in its epilogue); db's column sums in a fixed order.
#pragma once
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace mhc::cuda {

using bf16 = __nv_bfloat16;

// y = x W^T (+ bias) (+ residual, a [rows, out] bf16 tensor other than y: a residual add
// fused into the product's epilogue, summed in fp32 and rounded once).
void linear_forward(const bf16* x, const bf16* weight, const bf16* bias, int64_t rows, int64_t in, int64_t out, bf16* y,
                    cudaStream_t stream = nullptr, const bf16* residual = nullptr);

size_t linear_backward_workspace_floats(int64_t rows, int64_t out);

// db += column sums of dy [rows, cols] (bf16), in a fixed order (db = without accumulate);
// the workspace holds column_sums_workspace_floats(rows, cols) floats.
size_t column_sums_workspace_floats(int64_t rows, int64_t cols);
void accumulate_column_sums(const bf16* grad_y, int64_t rows, int64_t cols, float* grad_bias, float* workspace,
                            cudaStream_t stream = nullptr, bool accumulate = true);

// The backward's two halves, which may run on different streams (each with a cuBLASLt
// workspace of its own where they run at once: bind_gemm_workspace in ops/cuda/gemm.h):
// dx (overwritten), and dW with db (when grad_bias is not null), accumulated or, with
// accumulate false, overwritten (not read).
void linear_backward_input(const bf16* grad_y, const bf16* weight, int64_t rows, int64_t in, int64_t out,
                           bf16* grad_x, cudaStream_t stream = nullptr);
void linear_backward_weight(const bf16* grad_y, const bf16* x, int64_t rows, int64_t in, int64_t out,
                            float* grad_weight, float* grad_bias, float* workspace, cudaStream_t stream = nullptr,
                            bool accumulate = true);

// Both halves. grad_x may be null (not wanted); grad_bias may be null.
void linear_backward(const bf16* grad_y, const bf16* x, const bf16* weight, int64_t rows, int64_t in, int64_t out,
                     bf16* grad_x, float* grad_weight, float* grad_bias, float* workspace,
                     cudaStream_t stream = nullptr, bool accumulate = true);

}  // namespace mhc::cuda
