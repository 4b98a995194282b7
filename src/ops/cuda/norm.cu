#include "ops/cuda/norm.h"

#include "ops/cuda/column_sums.cuh"

namespace mhc::cuda {
namespace {

constexpr int kRowsPerBlock = 4;  // one warp a row

// Sum over the row of f(c) for this lane's columns, then over the warp.
template <typename F> __device__ float row_sum(int64_t C, int lane, F f) {
  float s = 0;
  for (int64_t c = lane; c < C; c += 32) s += f(c);
  return detail::warp_sum(s);
}

__global__ void norm_forward_kernel(const bf16* x, const float* weight, const float* bias, int64_t rows, int64_t C,
                                    float eps, bool rms, bf16* out, float* mean, float* rstd) {
  const int lane = threadIdx.x % 32;
  const int64_t r = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + threadIdx.x / 32;
  if (r >= rows) return;
  const bf16* xr = x + r * C;
  const float inv_c = 1.0f / static_cast<float>(C);
  const float m = rms ? 0.0f : row_sum(C, lane, [&](int64_t c) { return __bfloat162float(xr[c]); }) * inv_c;
  const float var = row_sum(C, lane, [&](int64_t c) {
                      const float d = __bfloat162float(xr[c]) - m;
                      return d * d;
                    }) *
                    inv_c;
  const float s = rsqrtf(var + eps);
  for (int64_t c = lane; c < C; c += 32)
    out[r * C + c] = __float2bfloat16((__bfloat162float(xr[c]) - m) * s * weight[c] + (bias ? bias[c] : 0.0f));
  if (lane == 0) {
    if (mean) mean[r] = m;
    rstd[r] = s;
  }
}

__global__ void norm_backward_kernel(const bf16* grad_out, const bf16* x, const float* weight, const float* mean,
                                     const float* rstd, int64_t rows, int64_t C, bool rms, bf16* grad_x) {
  const int lane = threadIdx.x % 32;
  const int64_t r = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + threadIdx.x / 32;
  if (r >= rows) return;
  const bf16 *g = grad_out + r * C, *xr = x + r * C;
  const float m = rms ? 0.0f : mean[r], s = rstd[r], inv_c = 1.0f / static_cast<float>(C);
  const float mean_gw =
      rms ? 0.0f : row_sum(C, lane, [&](int64_t c) { return __bfloat162float(g[c]) * weight[c]; }) * inv_c;
  const float mean_gw_xhat = row_sum(C, lane, [&](int64_t c) {
                               return __bfloat162float(g[c]) * weight[c] * (__bfloat162float(xr[c]) - m) * s;
                             }) *
                             inv_c;
  for (int64_t c = lane; c < C; c += 32) {
    const float xhat = (__bfloat162float(xr[c]) - m) * s;
    const float dx = s * (__bfloat162float(g[c]) * weight[c] - mean_gw - xhat * mean_gw_xhat);
    grad_x[r * C + c] = __float2bfloat16(__bfloat162float(grad_x[r * C + c]) + dx);
  }
}

// (g xhat, g) at (row, column), for the weight and bias gradients.
struct NormParameterGrads {
  const bf16 *grad_out, *x;
  const float *mean, *rstd;
  int64_t C;
  __device__ detail::ColumnValues<2> operator()(int64_t r, int64_t c) const {
    const float g = __bfloat162float(grad_out[r * C + c]);
    const float xhat = (__bfloat162float(x[r * C + c]) - (mean ? mean[r] : 0.0f)) * rstd[r];
    return {{g * xhat, g}};
  }
};

}  // namespace

void norm_forward(const bf16* x, const float* weight, const float* bias, int64_t rows, int64_t C, float eps, bool rms,
                  bf16* out, float* mean, float* rstd, cudaStream_t stream) {
  check(rows >= 1 && C >= 1, "norm: empty input");
  norm_forward_kernel<<<detail::blocks_for(rows, kRowsPerBlock), kRowsPerBlock * 32, 0, stream>>>(
      x, weight, rms ? nullptr : bias, rows, C, eps, rms, out, rms ? nullptr : mean, rstd);
  MHC_CUDA_CHECK(cudaGetLastError());
}

size_t norm_backward_workspace_floats(int64_t rows, int64_t C) {
  return detail::column_sums_workspace_floats(2, rows, C);
}

void norm_backward(const bf16* grad_out, const bf16* x, const float* weight, const float* mean, const float* rstd,
                   int64_t rows, int64_t C, bool rms, bf16* grad_x, float* grad_weight, float* grad_bias,
                   float* workspace, cudaStream_t stream) {
  check(rows >= 1 && C >= 1, "norm: empty input");
  if (rms) mean = nullptr, grad_bias = nullptr;
  norm_backward_kernel<<<detail::blocks_for(rows, kRowsPerBlock), kRowsPerBlock * 32, 0, stream>>>(
      grad_out, x, weight, mean, rstd, rows, C, rms, grad_x);
  MHC_CUDA_CHECK(cudaGetLastError());
  detail::column_sums<2>(NormParameterGrads{grad_out, x, mean, rstd, C}, rows, C, {grad_weight, grad_bias}, workspace,
                         stream);
}

}  // namespace mhc::cuda
