// CUDA MLP activations (ops/cpu/activation.h has the math), elementwise, bf16 in and out,
// fp32 arithmetic:
//
//   gelu:    out[f] = x[f] Phi(x[f])               (exact erf form)
//   swiglu:  out[f] = silu(x[f]) x[F + f]           (input rows [gate | up], 2F wide)
//
// Save nothing (the input is kept by the caller). Backward overwrites dx.
#pragma once
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "ops/cpu/activation.h"

namespace mhc::cuda {

using bf16 = __nv_bfloat16;

void activation_forward(cpu::Activation a, const bf16* x, int64_t rows, int64_t F, bf16* out,
                        cudaStream_t stream = nullptr);
void activation_backward(cpu::Activation a, const bf16* grad_out, const bf16* x, int64_t rows, int64_t F,
                         bf16* grad_x, cudaStream_t stream = nullptr);

}  // namespace mhc::cuda
