#include "ops/cuda/activation.h"

#include "core/cuda/device.h"
#include "ops/cuda/kernel_utils.cuh"

namespace mhc::cuda {
namespace {

__device__ inline float gaussian_cdf(float x) { return 0.5f * (1.0f + erff(x * 0.70710678118654752f)); }
__device__ inline float gaussian_pdf(float x) { return expf(-0.5f * x * x) * 0.39894228040143268f; }
__device__ inline float sigmoid(float x) { return 1.0f / (1.0f + expf(-x)); }

// One thread VEC adjacent outputs (r, f..f+VEC) (16-byte accesses when VEC = 8).
template <bool BACKWARD, int VEC>
__global__ void activation_kernel(cpu::Activation a, const bf16* __restrict__ grad_out, const bf16* __restrict__ x,
                                  int64_t rows, int64_t F, bf16* __restrict__ out) {
  const int64_t groups = F / VEC;
  const int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (e >= rows * groups) return;
  const int64_t r = e / groups, f = e % groups * VEC;
  const bool gelu = a == cpu::Activation::Gelu;
  const int64_t width = gelu ? F : 2 * F;
  float v[VEC], g[VEC], result[VEC];
  detail::load_bf16<VEC>(x + r * width + f, v);
  if constexpr (BACKWARD) detail::load_bf16<VEC>(grad_out + r * F + f, g);
  if (gelu) {
#pragma unroll
    for (int k = 0; k < VEC; ++k)
      result[k] = BACKWARD ? g[k] * (gaussian_cdf(v[k]) + v[k] * gaussian_pdf(v[k])) : v[k] * gaussian_cdf(v[k]);
    detail::store_bf16<VEC>(out + (BACKWARD ? r * width : r * F) + f, result);
    return;
  }
  float up[VEC];
  detail::load_bf16<VEC>(x + r * width + F + f, up);
  if constexpr (!BACKWARD) {
#pragma unroll
    for (int k = 0; k < VEC; ++k) result[k] = v[k] * sigmoid(v[k]) * up[k];
    detail::store_bf16<VEC>(out + r * F + f, result);
  } else {
    float dup[VEC];
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      const float sg = sigmoid(v[k]);
      result[k] = g[k] * up[k] * sg * (1.0f + v[k] * (1.0f - sg));
      dup[k] = g[k] * v[k] * sg;
    }
    detail::store_bf16<VEC>(out + r * width + f, result);
    detail::store_bf16<VEC>(out + r * width + F + f, dup);
  }
}

template <bool BACKWARD>
void launch(cpu::Activation a, const bf16* grad_out, const bf16* x, int64_t rows, int64_t F, bf16* out,
            cudaStream_t stream) {
  if (F % 8 == 0)
    activation_kernel<BACKWARD, 8><<<detail::blocks_for(rows * F / 8, 256), 256, 0, stream>>>(a, grad_out, x, rows, F,
                                                                                              out);
  else
    activation_kernel<BACKWARD, 1><<<detail::blocks_for(rows * F, 256), 256, 0, stream>>>(a, grad_out, x, rows, F, out);
  MHC_CUDA_CHECK(cudaGetLastError());
}

}  // namespace

void activation_forward(cpu::Activation a, const bf16* x, int64_t rows, int64_t F, bf16* out, cudaStream_t stream) {
  launch<false>(a, nullptr, x, rows, F, out, stream);
}

void activation_backward(cpu::Activation a, const bf16* grad_out, const bf16* x, int64_t rows, int64_t F,
                         bf16* grad_x, cudaStream_t stream) {
  launch<true>(a, grad_out, x, rows, F, grad_x, stream);
}

}  // namespace mhc::cuda
