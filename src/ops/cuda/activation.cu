#include "ops/cuda/activation.h"

#include "core/cuda/device.h"
#include "ops/cuda/column_sums.cuh"
#include "ops/cuda/kernel_utils.cuh"

namespace mhc::cuda {
namespace {

__device__ inline float gaussian_cdf(float x) { return 0.5f * (1.0f + erff(x * 0.70710678118654752f)); }
// exp on the special function unit (about 2^-22 relative, far below the bf16 output's
// rounding) instead of expf, whose range reduction cost the backward several instructions
// an element.
__device__ inline float gaussian_pdf(float x) {
  return detail::exp2_fast(-0.72134752044448170f * x * x) * 0.39894228040143268f;
}
__device__ inline float sigmoid(float x) { return 1.0f / (1.0f + expf(-x)); }

// The gradients at one element: dgate (gelu: dx) and dup (swiglu's up half).
__device__ inline void activation_grad_at(bool gelu, float g, float v, float up, float& dgate, float& dup) {
  if (gelu) {
    dgate = g * (gaussian_cdf(v) + v * gaussian_pdf(v));
    return;
  }
  const float sg = sigmoid(v);
  dgate = g * up * sg * (1.0f + v * (1.0f - sg));
  dup = g * v * sg;
}

// One thread VEC adjacent outputs (r, f..f+VEC) (16-byte accesses when VEC = 8). GeLU's
// arrays are all [rows, F]: a thread's elements start at VEC e in each, with no 64-bit
// division of e into (r, f).
template <bool BACKWARD, int VEC>
__global__ void activation_kernel(cpu::Activation a, const bf16* __restrict__ grad_out, const bf16* __restrict__ x,
                                  int64_t rows, int64_t F, bf16* __restrict__ out) {
  const int64_t groups = F / VEC;
  const int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (e >= rows * groups) return;
  float v[VEC], g[VEC], result[VEC];
  if (a == cpu::Activation::Gelu) {
    const int64_t at = e * VEC;
    detail::load_bf16<VEC>(x + at, v);
    if constexpr (BACKWARD) detail::load_bf16<VEC>(grad_out + at, g);
    float unused;
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      if constexpr (BACKWARD) activation_grad_at(true, g[k], v[k], 0.0f, result[k], unused);
      else result[k] = v[k] * gaussian_cdf(v[k]);
    }
    detail::store_bf16<VEC>(out + at, result);
    return;
  }
  // SwiGLU: x is [rows, 2F] (gate, up), as is the backward's output.
  const int64_t r = e / groups, f = e % groups * VEC, width = 2 * F;
  detail::load_bf16<VEC>(x + r * width + f, v);
  if constexpr (BACKWARD) detail::load_bf16<VEC>(grad_out + r * F + f, g);
  float up[VEC];
  detail::load_bf16<VEC>(x + r * width + F + f, up);
  if constexpr (!BACKWARD) {
#pragma unroll
    for (int k = 0; k < VEC; ++k) result[k] = v[k] * sigmoid(v[k]) * up[k];
    detail::store_bf16<VEC>(out + r * F + f, result);
  } else {
    float dup[VEC];
#pragma unroll
    for (int k = 0; k < VEC; ++k) activation_grad_at(false, g[k], v[k], up[k], result[k], dup[k]);
    detail::store_bf16<VEC>(out + r * width + f, result);
    detail::store_bf16<VEC>(out + r * width + F + f, dup);
  }
}

// The backward as a column-sum value (ops/cuda/column_sums.cuh): writes dx at (r, c..) and
// gives what it stored (bf16-rounded) for the bias gradient: V = 1 (gelu), or 2 (swiglu:
// the gate column c and the up column F + c).
template <int V> struct ActivationGrad {
  bool gelu;
  const bf16 *grad_out, *x;
  int64_t F;
  bf16* grad_x;
  template <int COLS> __device__ void operator()(int64_t r, int64_t c, float (&out)[V][COLS]) const {
    const int64_t width = V * F;
    float g[COLS], v[COLS], up[COLS] = {};
    detail::load_bf16<COLS>(grad_out + r * F + c, g);
    detail::load_bf16<COLS>(x + r * width + c, v);
    if constexpr (V == 2) detail::load_bf16<COLS>(x + r * width + F + c, up);
    float dup[COLS] = {};
#pragma unroll
    for (int k = 0; k < COLS; ++k) activation_grad_at(gelu, g[k], v[k], up[k], out[0][k], dup[k]);
    detail::store_bf16<COLS>(grad_x + r * width + c, out[0]);
    if constexpr (V == 2) detail::store_bf16<COLS>(grad_x + r * width + F + c, dup);
#pragma unroll
    for (int k = 0; k < COLS; ++k) {
      out[0][k] = __bfloat162float(__float2bfloat16(out[0][k]));
      if constexpr (V == 2) out[1][k] = __bfloat162float(__float2bfloat16(dup[k]));
    }
  }
};

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

size_t activation_backward_workspace_floats(cpu::Activation a, int64_t rows, int64_t F) {
  return detail::column_sums_workspace_floats(a == cpu::Activation::Gelu ? 1 : 2, rows, F);
}

void activation_backward(cpu::Activation a, const bf16* grad_out, const bf16* x, int64_t rows, int64_t F,
                         bf16* grad_x, float* grad_bias, float* workspace, cudaStream_t stream) {
  if (!grad_bias) {
    launch<true>(a, grad_out, x, rows, F, grad_x, stream);
    return;
  }
  if (a == cpu::Activation::Gelu)
    detail::column_sums<1>(ActivationGrad<1>{true, grad_out, x, F, grad_x}, rows, F, {grad_bias}, workspace, stream);
  else
    detail::column_sums<2>(ActivationGrad<2>{false, grad_out, x, F, grad_x}, rows, F, {grad_bias, grad_bias + F},
                           workspace, stream);
}

}  // namespace mhc::cuda
