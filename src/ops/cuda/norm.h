// CUDA pre-norms (ops/cpu/layernorm.h has the math), per row of C values: bf16 x and out,
// fp32 weight, bias, mean and rstd, fp32 sums.
//
//   forward:  out = (x - mean) rstd w + b  (LayerNorm), x rstd w (RMSNorm, mean null);
//             saves mean and rstd per row (x is kept by the caller)
//   backward: dx += rstd (g w - mean(g w) - xhat mean(g w xhat))   (bf16 accumulate,
//             or dx = ... with accumulate false: dx is then not read)
//             dw += sum_rows g xhat, db += sum_rows g                 (fp32, deterministic)
//             optionally the column sums of dx as read, before the add   (fp32, deterministic)
//
// One warp a row. The weight and bias gradients: where a row fits a warp's registers (C a
// multiple of 8, at most 1024) summed in the same pass over the rows (NormParamRuns), else
// by a second pass of column sums; either way in a fixed order.
#pragma once
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace mhc::cuda {

using bf16 = __nv_bfloat16;

void norm_forward(const bf16* x, const float* weight, const float* bias, int64_t rows, int64_t C, float eps, bool rms,
                  bf16* out, float* mean, float* rstd, cudaStream_t stream = nullptr);

size_t norm_backward_workspace_floats(int64_t rows, int64_t C);

// grad_bias may be null (RMSNorm has none). grad_x_sums (with accumulate; may be null):
// += the column sums of grad_x as read, before the norm's gradient is added: a plain
// residual's output bias gradient, whose dy is the dout that the pre-norm's dx adds to.
void norm_backward(const bf16* grad_out, const bf16* x, const float* weight, const float* mean, const float* rstd,
                   int64_t rows, int64_t C, bool rms, bf16* grad_x, float* grad_weight, float* grad_bias,
                   float* workspace, bool accumulate = true, cudaStream_t stream = nullptr,
                   float* grad_x_sums = nullptr);

// A pass over the rows that makes the input gradient (norm_backward's, or stream_mix.h's
// NormInputGrad) also sums the weight and bias gradients where a row fits a warp: a block
// of 8 warps takes a run of rows, and writes the run's sums of g xhat and g as
// partials[run][2][C]; add_norm_param_partials adds the runs in order. Such a pass with
// `blocks_per_sm` (1 to 4) resident blocks a multiprocessor takes runs of rows_per_run
// rows (whole waves: the bits depend on the device's multiprocessor count).
struct NormParamRuns {
  int64_t runs, rows_per_run;
};
NormParamRuns norm_param_runs(int64_t rows, int blocks_per_sm);
// Enough partials for any such pass over `rows` rows.
size_t norm_param_partials_floats(int64_t rows, int64_t C);
// grad_weight += sum over the runs of partials[run][0], grad_bias (may be null) of [1].
void add_norm_param_partials(const float* partials, int64_t runs, int64_t C, float* grad_weight, float* grad_bias,
                             cudaStream_t stream = nullptr);

}  // namespace mhc::cuda
