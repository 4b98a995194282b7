// CUDA kernels of the mHC mappings (ops/cpu/mhc_mappings.h has the math), x bf16, the
// parameters and every mapping value fp32, all sums fp32:
//
//   forward:  project    W x on tensor cores (projection_kernel): W split into bf16
//                        hi + mid + lo, the three products summed in fp32, so the result
//                        is fp32-accurate; blocks of tokens x ranges of K, the ranges
//                        summed in order                                      (one pass over x)
//             ||x||^2    given by the producer of x (h_post_bda_forward, expand), else
//                        from the same pass
//             finish     proj, r; gates, Sinkhorn in registers -> H_pre, H_post, H_res
//   backward: grad_h     dh (sigmoid and Sinkhorn backward, the iterations recomputed in
//                        registers), dproj = dh r a, the per-token dr coefficient, and
//                        per-block sums of the [dh, alpha terms] rows (dbias, dalpha)
//             grad_x     one pass over x for both: dx += dproj W + coef x (dproj and W
//                        split into bf16 hi + mid) and dW += dproj^T x (dproj split into
//                        hi + mid + lo: fp32-accurate), on tensor cores; dW summed per
//                        token run, then the runs in order (deterministic); with the
//                        stream mixing's and the aggregate's terms (StreamMixGrad) dx is
//                        written once, and the next hyper connection's dy can come too
//                        (NextGradY)                                         (one pass over x)
//
// Saved for backward: proj [tokens, m] and r [tokens], fp32. n is a template parameter
// (1, 2, 4, 6, 8); the workspaces are mappings_{forward,backward}_workspace_floats() floats.
#pragma once
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace mhc::cuda {

using bf16 = __nv_bfloat16;

struct MappingsArgs {
  int64_t tokens;
  int n;
  int64_t C;
  int sinkhorn_iterations;  // 0: unconstrained HC mixing, H_res = I + logits
};

size_t mappings_forward_workspace_floats(const MappingsArgs& a);

// W's split into bf16 parts hi, mid, lo ([3][m rounded up to 8][K] bf16) that the products
// use: made by split_mappings_weights (several W of one shape in one launch: the model's,
// once a forward), which the forward and backward of that W then take instead of
// splitting W again in their workspace.
size_t mappings_weight_split_elements(const MappingsArgs& a);
// splits[i] (mappings_weight_split_elements) = the split of weights[i], i < count.
void split_mappings_weights(const MappingsArgs& a, const float* const* weights, bf16* const* splits, int count,
                            cudaStream_t stream = nullptr);

// ||x_t||^2 of each row of K bf16 values (fp32, fixed-order sums).
void row_sumsq(const bf16* x, int64_t tokens, int64_t K, float* sumsq, cudaStream_t stream = nullptr);

// The sublayer's pre-norm (ops/cuda/norm.h) of the aggregate, made in the aggregate's pass:
// out, mean (LayerNorm; null for RMSNorm) and rstd per token, norm_forward's bits.
struct AggregateNorm {
  const float* weight = nullptr;
  const float* bias = nullptr;  // LayerNorm only
  float eps = 0;
  bool rms = false;
  bf16* out = nullptr;
  float* mean = nullptr;
  float* rstd = nullptr;
};
// Where the aggregate's norm can be fused: C a multiple of 8, at most 1024 (a row held in a
// warp's registers).
bool aggregate_norm_supported(int64_t C);
// The aggregate sum_j h_pre[j] x_j of kept gates and its pre-norm in one pass, the
// aggregate not stored: the bits of mhc_mappings_forward's (selective recompute's restore).
// Where aggregate_norm_supported.
void aggregate_norm_forward(const bf16* x, const float* h_pre, int64_t tokens, int n, int64_t C,
                            const AggregateNorm& norm, cudaStream_t stream = nullptr);

// x_sumsq: ||x_t||^2 of each token's n-stream row when its producer computed it, else null
// (computed here, in the projection's pass over x). weight_split: W's split from
// split_mappings_weights, or null (split here). agg: when given, also the aggregate sum_j H_pre[j] x_j
// ([tokens, C], the bits of aggregate_forward), made in the gates' and Sinkhorn's launch;
// norm (where aggregate_norm_supported): also its pre-norm, of the aggregate made in that
// launch, which is then stored only where agg is given (h_post_bda_backward's NormInputGrad
// makes it again from x).
void mhc_mappings_forward(const MappingsArgs& a, const bf16* x, const float* x_sumsq, const float* weight,
                          const float* alpha, const float* bias, float* proj, float* r, float* h_pre, float* h_post,
                          float* h_res, float* workspace, cudaStream_t stream = nullptr,
                          const bf16* weight_split = nullptr, bf16* agg = nullptr, const AggregateNorm* norm = nullptr);

size_t mappings_backward_workspace_floats(const MappingsArgs& a);

// The hyper connection's other terms of dx: dx_j = sum_i H_res[i][j] dout_i + H_pre[j] dagg
// (h_post_bda's and the aggregate's backward, whose reductions h_post_bda_backward makes
// with a null grad_x). Given to mhc_mappings_backward, dx is written once with all terms.
struct StreamMixGrad {
  const bf16* grad_out;  // [tokens, n, C]
  const float* h_res;    // [tokens, n, n]
  const bf16* grad_agg;  // [tokens, C]
};

// The hyper connection below this one in the backward order, whose dout is this dx, when
// its sublayer has no dropout: its dy = sum_i H_post[i] dx_i (of dx as stored, fp32 sums)
// is written while dx is on chip, instead of by h_post_bda_grad_y reading dx again, and
// with grad_y_bias so are dy's column sums (the sublayer's output bias gradient; of dy as
// stored, a fixed order).
struct NextGradY {
  const float* h_post;  // [tokens, n], of the hyper connection below
  bf16* grad_y;         // [tokens, C], overwritten
  float* grad_y_bias = nullptr;  // [C], accumulated, when not null
};
// Whether NextGradY can be given (with StreamMixGrad): C a multiple of 16 (8 for n = 8).
bool next_grad_y_supported(const MappingsArgs& a);

// grad_x accumulates (bf16), or with `mix` is overwritten by all of dx (one rounding; then
// mix->h_res, h_pre and next->h_post must be 16-byte aligned, as cudaMalloc's are);
// grad_weight, grad_alpha [3], grad_bias accumulate (fp32). weight_split: W's split from
// split_mappings_weights, or null (W is split here). sums_later: the parameter gradients (and
// NextGradY's grad_y_bias) are left as partials in the workspace, for
// mhc_mappings_backward_sums.
void mhc_mappings_backward(const MappingsArgs& a, const bf16* x, const float* weight, const float* alpha,
                           const float* bias, const float* proj, const float* r, const float* h_pre,
                           const float* h_post, const float* grad_h_pre, const float* grad_h_post,
                           const float* grad_h_res, bf16* grad_x, float* grad_weight, float* grad_alpha,
                           float* grad_bias, float* workspace, const StreamMixGrad* mix = nullptr,
                           const NextGradY* next = nullptr, cudaStream_t stream = nullptr,
                           const bf16* weight_split = nullptr, bool sums_later = false);

// The last step of mhc_mappings_backward with sums_later: dW, dalpha, dbias and grad_y_bias
// (or null) accumulated from the workspace's partials in a fixed order. On any stream
// ordered after that call, and before the workspace is used again (dx needs none of it).
void mhc_mappings_backward_sums(const MappingsArgs& a, float* grad_weight, float* grad_alpha, float* grad_bias,
                                float* grad_y_bias, const float* workspace, cudaStream_t stream = nullptr);

}  // namespace mhc::cuda
