// CUDA optimizer step (train/optimizer.h has the rules), fp32 master weights and moments:
//
//   grad_norm:  norm = || scale g || over every tensor, in a fixed order (per tensor,
//               per-block partial sums in double, then everything summed in order), and
//               the clipping factor min(1, clip / norm) (1 when clip <= 0), both left on
//               the device: no host round trip per step
//   adamw:      g' = scale * factor * g;  m = b1 m + (1 - b1) g';  v = b2 v + (1 - b2) g'^2
//               p = p * decay - step_size * m / (sqrt(v) / sqrt(c2) + eps)
//               and the bf16 working copy of p, when there is one
#pragma once
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <vector>

namespace mhc::cuda {

using bf16 = __nv_bfloat16;

struct GradTensor {
  const float* grad;
  int64_t size;
};

size_t grad_norm_workspace_doubles(size_t tensors);

// result[0] = the norm, result[1] = the clipping factor (device floats).
void grad_norm(const std::vector<GradTensor>& tensors, float scale, float clip, double* workspace, float* result,
               cudaStream_t stream = nullptr);

struct AdamWStep {
  float beta1, beta2, eps, step_size, sqrt_correction2, decay, grad_scale;
};

// clip_factor: a device float multiplying the gradient (grad_norm's result[1]); may be null.
void adamw_update(const AdamWStep& s, const float* grad, const float* clip_factor, int64_t size, float* param,
                  float* exp_avg, float* exp_avg_sq, bf16* param_bf16, cudaStream_t stream = nullptr);

}  // namespace mhc::cuda
