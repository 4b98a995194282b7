// CUDA kernels of the per-token n-stream ops (bf16 activations, fp32 H_pre/H_res/H_post,
// fp32 accumulation), the GPU counterparts of ops/cpu/aggregate.h and ops/cpu/h_post_bda.h
// with the same math, the same dropout stream and the same accumulate/overwrite rules:
//
//   aggregate:   agg[c] = sum_j H_pre[j] x[j][c]
//                backward: dx[j][c] += H_pre[j] dagg[c] (bf16 read-add-write), dH_pre[j] = sum_c dagg x[j]
//   h_post_bda:  out[i][c] = sum_j H_res[i][j] x[j][c] + D[i][c] H_post[i] (y[c] + y_bias[c])
//                backward: dx[j][c] = sum_i H_res[i][j] dout[i][c]         (overwrites;
//                          + H_pre[j] dagg[c] when fused with the aggregate's backward)
//                          dH_res[i][j] = sum_c dout[i][c] x[j][c],  dH_post[i] = sum_c dout D (y + y_bias)
//                          dy[c] = sum_i dout[i][c] D H_post[i]   (dy_bias = the column sums of dy:
//                          cuda::accumulate_column_sums of ops/cuda/linear.h)
//
// One thread block per token; per-token reductions are block reductions in a fixed order,
// so every
// output is deterministic. n is a template parameter (1, 2, 4, 6, 8 supported).
#pragma once
#include <cuda_bf16.h>

#include <cstdint>

#include "ops/cpu/h_post_bda.h"

namespace mhc::cuda {

using bf16 = __nv_bfloat16;

bool stream_count_supported(int n);

// Block entry and exit (ops/cpu/stream_expand.h): x[i][c] = e[c]; backward de[c] = sum_i dx[i][c].
// out[c] = mean_i x[i][c]; backward dx[i][c] = dout[c] / n. All overwrite.
void stream_expand_forward(const bf16* e, int64_t tokens, int n, int64_t C, bf16* x, cudaStream_t stream = nullptr);
void stream_expand_backward(const bf16* grad_x, int64_t tokens, int n, int64_t C, bf16* grad_e,
                            cudaStream_t stream = nullptr);
void stream_contract_forward(const bf16* x, int64_t tokens, int n, int64_t C, bf16* out, cudaStream_t stream = nullptr);
void stream_contract_backward(const bf16* grad_out, int64_t tokens, int n, int64_t C, bf16* grad_x,
                              cudaStream_t stream = nullptr);

void aggregate_forward(const bf16* x, const float* h_pre, int64_t tokens, int n, int64_t C, bf16* agg,
                       cudaStream_t stream = nullptr);
void aggregate_backward(const bf16* grad_agg, const bf16* x, const float* h_pre, int64_t tokens, int n, int64_t C,
                        bf16* grad_x, float* grad_h_pre, cudaStream_t stream = nullptr);

// out_sumsq, when not null, receives ||out_t||^2 of each token's row as stored (bf16), the
// next hyper connection's mappings input (saves that op a pass over out).
void h_post_bda_forward(const bf16* x, const float* h_res, const float* h_post, const bf16* y, const bf16* y_bias,
                        int64_t tokens, int n, int64_t C, cpu::DropoutSpec dropout, bf16* out,
                        float* out_sumsq = nullptr, cudaStream_t stream = nullptr);
// dy alone (dy[c] = sum_i dout[i][c] D H_post[i]; overwrites), and when grad_y_bias is
// not null dy_bias += dy's column sums (of dy as stored, fixed order) in the same pass: in
// a model the sublayer's backward needs dy before the aggregate's gradient exists, so dy
// comes first and h_post_bda_backward fused with the aggregate's (below) runs after the
// sublayer's backward with a null grad_y. The workspace holds
// h_post_bda_grad_y_workspace_floats(tokens, C) floats.
size_t h_post_bda_grad_y_workspace_floats(int64_t tokens, int64_t C);
void h_post_bda_grad_y(const bf16* grad_out, const float* h_post, int64_t tokens, int n, int64_t C,
                       cpu::DropoutSpec dropout, bf16* grad_y, float* grad_y_bias, float* workspace,
                       cudaStream_t stream = nullptr);

// The aggregate's backward of the same hyper connection (same x), for fusing into
// h_post_bda_backward: then dx = H_res^T dout + H_pre dagg is written once and dH_pre is
// reduced alongside dH_res and dH_post.
// The sublayer's pre-norm backward made in the reductions' pass, where the aggregate's
// gradient is the norm's input gradient: dagg = the norm's dx of grad_out given its input
// (the aggregate, made again from x and H_pre with aggregate_forward's bits, so that the
// forward need not keep it), mean and rstd (ops/cuda/norm.h, not accumulated:
// norm_backward's bits), written to grad_x and used as the aggregate's gradient; the norm's
// weight and bias gradients' sums are made in the same pass (param_partials).
struct NormInputGrad {
  const bf16* grad_out;
  const float* weight;
  const float* mean;  // null for RMSNorm
  const float* rstd;
  bool rms;
  bf16* grad_x;
  // The weight and bias gradients' sums of the same pass: [norm_input_grad_runs(tokens)][2][C]
  // (ops/cuda/norm.h: add_norm_param_partials adds them to the gradients).
  float* param_partials;
};
// Where NormInputGrad can be fused: the reductions alone (no dx), C a multiple of 8 and at
// most 1024 (a warp a token), no dropout or its kept bits.
bool norm_input_grad_supported(int64_t C, cpu::DropoutSpec dropout);
int64_t norm_input_grad_runs(int64_t tokens);

struct AggregateGrad {
  const bf16* grad_agg;  // unused with `norm`: the kernel makes dagg
  const float* h_pre;
  float* grad_h_pre;
  const NormInputGrad* norm = nullptr;
};

// `aggregate` may be null (h_post_bda alone); so may grad_y (dy not written) and, with
// `aggregate`, grad_x (dx not written: mhc_mappings_backward given a StreamMixGrad adds
// these terms and writes dx once, which saves writing and reading it again; the model's
// path).
void h_post_bda_backward(const bf16* grad_out, const bf16* x, const float* h_res, const float* h_post, const bf16* y,
                         const bf16* y_bias, int64_t tokens, int n, int64_t C, cpu::DropoutSpec dropout, bf16* grad_x,
                         float* grad_h_res, float* grad_h_post, bf16* grad_y,
                         const AggregateGrad* aggregate = nullptr, cudaStream_t stream = nullptr);

}  // namespace mhc::cuda
