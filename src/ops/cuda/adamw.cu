#include "ops/cuda/adamw.h"

#include "core/cuda/device.h"
#include "ops/cuda/kernel_utils.cuh"

namespace mhc::cuda {
namespace {

using detail::is_aligned;
using detail::load_floats;
using detail::store_floats;

// Enough blocks to fill every multiprocessor (the sum is bandwidth-bound).
constexpr int kNormBlocks = 1024, kNormThreads = 256;

// partial[b] = sum over this block's grid-stride elements of (scale g)^2, in a fixed order:
// each thread VEC adjacent elements a step (16-byte loads at VEC = 4, in VEC sums), the
// tensor's last size % VEC elements by its first threads.
template <int VEC>
__global__ void sum_squares_kernel(const float* grad, int64_t size, float scale, double* partial) {
  __shared__ double warp_sums[kNormThreads / 32];
  double sums[VEC] = {};
  const int64_t first = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x, vectors = size / VEC;
#pragma unroll 4
  for (int64_t i = first; i < vectors; i += stride) {
    float g[VEC];
    load_floats<VEC>(grad + i * VEC, g);
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      const double d = static_cast<double>(scale * g[k]);
      sums[k] += d * d;
    }
  }
  if (first < size - vectors * VEC) {
    const double d = static_cast<double>(scale * grad[vectors * VEC + first]);
    sums[0] += d * d;
  }
  double s = 0;
#pragma unroll
  for (int k = 0; k < VEC; ++k) s += sums[k];
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

// One thread VEC adjacent elements (16-byte accesses at VEC = 4; the tensor's last
// elements one at a time).
template <int VEC>
__global__ void adamw_kernel(AdamWStep s, const float* grad, const float* clip_factor, int64_t size, float* param,
                             float* m, float* v, bf16* param_bf16) {
  const int64_t first = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) * VEC;
  if (first >= size) return;
  auto update = [&](float g, float& p, float& mi, float& vi) {
    g *= s.grad_scale;
    if (clip_factor) g *= *clip_factor;
    mi = s.beta1 * mi + (1.0f - s.beta1) * g;
    vi = s.beta2 * vi + (1.0f - s.beta2) * g * g;
    p = p * s.decay - s.step_size * mi / (sqrtf(vi) / s.sqrt_correction2 + s.eps);
  };
  if (first + VEC > size) {
    for (int64_t i = first; i < size; ++i) {
      update(grad[i], param[i], m[i], v[i]);
      if (param_bf16) param_bf16[i] = __float2bfloat16(param[i]);
    }
    return;
  }
  float g[VEC], p[VEC], mi[VEC], vi[VEC];
  load_floats<VEC>(grad + first, g);
  load_floats<VEC>(param + first, p);
  load_floats<VEC>(m + first, mi);
  load_floats<VEC>(v + first, vi);
#pragma unroll
  for (int k = 0; k < VEC; ++k) update(g[k], p[k], mi[k], vi[k]);
  store_floats<VEC>(param + first, p);
  store_floats<VEC>(m + first, mi);
  store_floats<VEC>(v + first, vi);
  if (param_bf16) detail::store_bf16<VEC>(param_bf16 + first, p);
}

}  // namespace

size_t grad_norm_workspace_doubles(size_t tensors) { return tensors * kNormBlocks; }

void grad_norm(const std::vector<GradTensor>& tensors, float scale, float clip, double* workspace, float* result,
               cudaStream_t stream) {
  check(!tensors.empty(), "grad_norm: no tensors");
  for (size_t k = 0; k < tensors.size(); ++k) {
    const auto kernel = is_aligned(tensors[k].grad, 16) ? sum_squares_kernel<4> : sum_squares_kernel<1>;
    kernel<<<kNormBlocks, kNormThreads, 0, stream>>>(tensors[k].grad, tensors[k].size, scale,
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
  const bool vectors = is_aligned(grad, 16) && is_aligned(param, 16) && is_aligned(exp_avg, 16) &&
                       is_aligned(exp_avg_sq, 16) && is_aligned(param_bf16, 8);
  const int vec = vectors ? 4 : 1;
  const auto kernel = vectors ? adamw_kernel<4> : adamw_kernel<1>;
  kernel<<<detail::blocks_for((size + vec - 1) / vec, 256), 256, 0, stream>>>(s, grad, clip_factor, size, param,
                                                                              exp_avg, exp_avg_sq, param_bf16);
  MHC_CUDA_CHECK(cudaGetLastError());
}

}  // namespace mhc::cuda
