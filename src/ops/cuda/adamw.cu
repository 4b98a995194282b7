#include "ops/cuda/adamw.h"

#include "core/cuda/device.h"
#include "ops/cuda/kernel_utils.cuh"

namespace mhc::cuda {
namespace {

// Enough blocks to fill every multiprocessor (the sum is bandwidth-bound).
constexpr int kNormBlocks = 1024, kNormThreads = 256;

// partial[b] = sum over this block's grid-stride elements of (scale g)^2, in a fixed order.
__global__ void sum_squares_kernel(const float* grad, int64_t size, float scale, double* partial) {
  __shared__ double warp_sums[kNormThreads / 32];
  double s = 0;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < size;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const double g = static_cast<double>(scale * grad[i]);
    s += g * g;
  }
  for (int offset = 16; offset > 0; offset /= 2) s += __shfl_xor_sync(0xffffffffu, s, offset);
  if (threadIdx.x % 32 == 0) warp_sums[threadIdx.x / 32] = s;
  __syncthreads();
  if (threadIdx.x == 0) {
    double total = 0;
    for (int w = 0; w < kNormThreads / 32; ++w) total += warp_sums[w];
    partial[blockIdx.x] = total;
  }
}

// One block of kNormThreads: each thread sums a strided share of the partials, then the
// threads' sums in a fixed order.
__global__ void finish_norm_kernel(const double* partial, int64_t count, float clip, float* result) {
  __shared__ double thread_sums[kNormThreads];
  double s = 0;
  for (int64_t i = threadIdx.x; i < count; i += kNormThreads) s += partial[i];
  thread_sums[threadIdx.x] = s;
  __syncthreads();
  if (threadIdx.x != 0) return;
  double total = 0;
  for (int t = 0; t < kNormThreads; ++t) total += thread_sums[t];
  const double norm = sqrt(total);
  result[0] = static_cast<float>(norm);
  result[1] = clip > 0 && norm > clip ? static_cast<float>(clip / norm) : 1.0f;
}

__global__ void adamw_kernel(AdamWStep s, const float* grad, const float* clip_factor, int64_t size, float* param,
                             float* m, float* v, bf16* param_bf16) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= size) return;
  float g = s.grad_scale * grad[i];
  if (clip_factor) g *= *clip_factor;
  m[i] = s.beta1 * m[i] + (1.0f - s.beta1) * g;
  v[i] = s.beta2 * v[i] + (1.0f - s.beta2) * g * g;
  const float p = param[i] * s.decay - s.step_size * m[i] / (sqrtf(v[i]) / s.sqrt_correction2 + s.eps);
  param[i] = p;
  if (param_bf16) param_bf16[i] = __float2bfloat16(p);
}

}  // namespace

size_t grad_norm_workspace_doubles(size_t tensors) { return tensors * kNormBlocks; }

void grad_norm(const std::vector<GradTensor>& tensors, float scale, float clip, double* workspace, float* result,
               cudaStream_t stream) {
  check(!tensors.empty(), "grad_norm: no tensors");
  for (size_t k = 0; k < tensors.size(); ++k) {
    sum_squares_kernel<<<kNormBlocks, kNormThreads, 0, stream>>>(tensors[k].grad, tensors[k].size, scale,
                                                                 workspace + k * kNormBlocks);
    MHC_CUDA_CHECK(cudaGetLastError());
  }
  finish_norm_kernel<<<1, kNormThreads, 0, stream>>>(workspace, static_cast<int64_t>(tensors.size()) * kNormBlocks, clip,
                                          result);
  MHC_CUDA_CHECK(cudaGetLastError());
}

void adamw_update(const AdamWStep& s, const float* grad, const float* clip_factor, int64_t size, float* param,
                  float* exp_avg, float* exp_avg_sq, bf16* param_bf16, cudaStream_t stream) {
  if (size == 0) return;
  adamw_kernel<<<detail::blocks_for(size, 256), 256, 0, stream>>>(s, grad, clip_factor, size, param, exp_avg,
                                                                  exp_avg_sq, param_bf16);
  MHC_CUDA_CHECK(cudaGetLastError());
}

}  // namespace mhc::cuda
