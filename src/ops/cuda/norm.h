// CUDA pre-norms (ops/cpu/layernorm.h has the math), per row of C values: bf16 x and out,
// fp32 weight, bias, mean and rstd, fp32 sums.
//
//   forward:  out = (x - mean) rstd w + b  (LayerNorm), x rstd w (RMSNorm, mean null);
//             saves mean and rstd per row (x is kept by the caller)
//   backward: dx += rstd (g w - mean(g w) - xhat mean(g w xhat))   (bf16 accumulate,
//             or dx = ... with accumulate false: dx is then not read)
//             dw += sum_rows g xhat, db += sum_rows g                 (fp32, deterministic)
//
// One warp a row; the column sums over rows go through chunks summed in order.
#pragma once
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace mhc::cuda {

using bf16 = __nv_bfloat16;

void norm_forward(const bf16* x, const float* weight, const float* bias, int64_t rows, int64_t C, float eps, bool rms,
                  bf16* out, float* mean, float* rstd, cudaStream_t stream = nullptr);

size_t norm_backward_workspace_floats(int64_t rows, int64_t C);

// grad_bias may be null (RMSNorm has none); grad_x may be null: the weight and bias
// gradients only (the input gradient made elsewhere: stream_mix.h's NormInputGrad).
void norm_backward(const bf16* grad_out, const bf16* x, const float* weight, const float* mean, const float* rstd,
                   int64_t rows, int64_t C, bool rms, bf16* grad_x, float* grad_weight, float* grad_bias,
                   float* workspace, bool accumulate = true, cudaStream_t stream = nullptr);

}  // namespace mhc::cuda
