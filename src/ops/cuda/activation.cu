#include "ops/cuda/activation.h"

#include "core/cuda/device.h"
#include "ops/cuda/kernel_utils.cuh"

namespace mhc::cuda {
namespace {

__device__ inline float gaussian_cdf(float x) { return 0.5f * (1.0f + erff(x * 0.70710678118654752f)); }
__device__ inline float gaussian_pdf(float x) { return expf(-0.5f * x * x) * 0.39894228040143268f; }
__device__ inline float sigmoid(float x) { return 1.0f / (1.0f + expf(-x)); }

// One thread an output element (r, f).
template <bool BACKWARD>
__global__ void activation_kernel(cpu::Activation a, const bf16* grad_out, const bf16* x, int64_t rows, int64_t F,
                                  bf16* out) {
  const int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (e >= rows * F) return;
  const int64_t r = e / F, f = e % F;
  const bool gelu = a == cpu::Activation::Gelu;
  const int64_t width = gelu ? F : 2 * F;
  const float v = __bfloat162float(x[r * width + f]);
  if (gelu) {
    out[e] = BACKWARD ? __float2bfloat16(__bfloat162float(grad_out[e]) * (gaussian_cdf(v) + v * gaussian_pdf(v)))
                      : __float2bfloat16(v * gaussian_cdf(v));
    return;
  }
  const float up = __bfloat162float(x[r * width + F + f]), s = sigmoid(v);
  if (!BACKWARD) {
    out[e] = __float2bfloat16(v * s * up);
    return;
  }
  const float g = __bfloat162float(grad_out[e]);
  out[r * width + f] = __float2bfloat16(g * up * s * (1.0f + v * (1.0f - s)));
  out[r * width + F + f] = __float2bfloat16(g * v * s);
}

}  // namespace

void activation_forward(cpu::Activation a, const bf16* x, int64_t rows, int64_t F, bf16* out, cudaStream_t stream) {
  activation_kernel<false><<<detail::blocks_for(rows * F, 256), 256, 0, stream>>>(a, nullptr, x, rows, F, out);
  MHC_CUDA_CHECK(cudaGetLastError());
}

void activation_backward(cpu::Activation a, const bf16* grad_out, const bf16* x, int64_t rows, int64_t F,
                         bf16* grad_x, cudaStream_t stream) {
  activation_kernel<true><<<detail::blocks_for(rows * F, 256), 256, 0, stream>>>(a, grad_out, x, rows, F, grad_x);
  MHC_CUDA_CHECK(cudaGetLastError());
}

}  // namespace mhc::cuda
