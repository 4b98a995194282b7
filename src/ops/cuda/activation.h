// CUDA MLP activations (ops/cpu/activation.h has the math), elementwise, bf16 in and out,
// fp32 arithmetic:
//
//   gelu:    out[f] = x[f] Phi(x[f])               (exact erf form)
//   swiglu:  out[f] = silu(x[f]) x[F + f]           (input rows [gate | up], 2F wide)
//
// Save nothing (the input is kept by the caller). Backward overwrites dx; given grad_bias
// (the preceding linear's bias, width F or 2F) it also adds dx's column sums (of dx as
// stored, in a fixed order) in the same pass over the rows.
#pragma once
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "ops/cpu/activation.h"

namespace mhc::cuda {

using bf16 = __nv_bfloat16;

void activation_forward(cpu::Activation a, const bf16* x, int64_t rows, int64_t F, bf16* out,
                        cudaStream_t stream = nullptr);
size_t activation_backward_workspace_floats(cpu::Activation a, int64_t rows, int64_t F);
// grad_bias may be null (then no workspace is needed).
void activation_backward(cpu::Activation a, const bf16* grad_out, const bf16* x, int64_t rows, int64_t F,
                         bf16* grad_x, float* grad_bias = nullptr, float* workspace = nullptr,
                         cudaStream_t stream = nullptr);

}  // namespace mhc::cuda
