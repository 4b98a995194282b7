#include "ops/cuda/norm.h"

#include <algorithm>
#include <array>
#include <string>
#include <type_traits>

#include "core/cuda/device.h"
#include "ops/cuda/column_sums.cuh"
#include "ops/cuda/linear.h"
#include "ops/cuda/norm_row.cuh"

namespace mhc::cuda {
namespace {

using detail::for_row;
using detail::kCachedSteps;
using detail::load_f32;
using detail::RowCache;

constexpr int kRowsPerBlock = 4;  // one warp a row

template <int VEC, int STEPS>
__global__ void norm_forward_kernel(const bf16* __restrict__ x, const float* __restrict__ weight,
                                    const float* __restrict__ bias, int64_t rows, int64_t C, float eps, bool rms,
                                    bf16* __restrict__ out, float* __restrict__ mean, float* __restrict__ rstd) {
  const int lane = threadIdx.x % 32;
  const int64_t r = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + threadIdx.x / 32;
  if (r >= rows) return;
  RowCache<VEC, STEPS> xr{x + r * C};
  detail::norm_row_forward<VEC, STEPS>(xr, weight, bias, C, eps, rms, lane, out + r * C, mean ? mean + r : nullptr,
                                       rstd + r);
}

// A warp a row. SUMS 2 or 3: also the partials of the block's run of rows (norm_row.cuh)
// of the weight and bias gradients, and with 3 of dx's column sums as read (accumulate);
// SUMS 0: one row a warp.
template <int VEC, int STEPS, int SUMS>
__global__ void norm_backward_kernel(const bf16* __restrict__ grad_out, const bf16* __restrict__ x,
                                     const float* __restrict__ weight, const float* __restrict__ mean,
                                     const float* __restrict__ rstd, int64_t rows, int64_t C, bool rms, bool accumulate,
                                     bf16* __restrict__ grad_x, int64_t rows_per_block, float* __restrict__ partials) {
  extern __shared__ float param_rows[];
  const int lane = threadIdx.x % 32;
  detail::for_norm_param_run<SUMS>(param_rows, C, rows, rows_per_block, partials, [&](int64_t r, float* sums) {
    RowCache<VEC, STEPS> g{grad_out + r * C}, xr{x + r * C};
    const float m = rms ? 0.0f : mean[r], s = rstd[r];
    float mean_gw, mean_gw_xhat;
    detail::norm_row_grad_means<VEC, STEPS>(g, xr, weight, C, m, s, rms, lane, mean_gw, mean_gw_xhat);
    for_row<VEC, STEPS>(C, lane, [&](int64_t c, int step) {
      float gv[VEC], xv[VEC], w[VEC], dx[VEC] = {};
      g.get(c, step, false, gv);
      xr.get(c, step, false, xv);
      load_f32<VEC>(weight + c, w);
      if (accumulate) detail::load_bf16<VEC>(grad_x + r * C + c, dx);
      if constexpr (SUMS == 3) detail::add_norm_column_values(sums, C, 2, c, dx);
      detail::add_norm_input_grad<VEC>(gv, xv, w, m, s, mean_gw, mean_gw_xhat, dx);
      detail::store_bf16<VEC>(grad_x + r * C + c, dx);
      if constexpr (SUMS > 0) detail::add_norm_param_grads(sums, C, c, gv, xv, m, s);
    });
  });
}

// (g xhat, g) at (row, columns c..c + COLS), for the weight and bias gradients.
struct NormParameterGrads {
  const bf16 *grad_out, *x;
  const float *mean, *rstd;
  int64_t C;
  template <int COLS> __device__ void operator()(int64_t r, int64_t c, float (&out)[2][COLS]) const {
    float g[COLS], xv[COLS];
    detail::load_bf16<COLS>(grad_out + r * C + c, g);
    detail::load_bf16<COLS>(x + r * C + c, xv);
    const float m = mean ? mean[r] : 0.0f, s = rstd[r];
#pragma unroll
    for (int k = 0; k < COLS; ++k) {
      out[0][k] = g[k] * (xv[k] - m) * s;
      out[1][k] = g[k];
    }
  }
};

// launch(kernel) with kernel<VEC, STEPS>: 16-byte accesses when C % 8 == 0, rows held in
// registers when they fit kCachedSteps warp steps.
template <template <int, int> class Kernel, typename Launch> void dispatch_row(int64_t C, Launch&& launch) {
  if (C % 8 == 0) {
    if (detail::warp_row_fits(C)) launch(Kernel<8, kCachedSteps>::kernel);
    else launch(Kernel<8, 0>::kernel);
  } else {
    if (C <= 32 * kCachedSteps) launch(Kernel<1, kCachedSteps>::kernel);
    else launch(Kernel<1, 0>::kernel);
  }
}
template <int VEC, int STEPS> struct ForwardKernel {
  static constexpr auto kernel = norm_forward_kernel<VEC, STEPS>;
};
template <int VEC, int STEPS> struct BackwardKernel {
  static constexpr auto kernel = norm_backward_kernel<VEC, STEPS, 0>;
};

// The row pass that also sums the parameter gradients (C fits a warp's registers), and
// dx's column sums (3).
template <int SUMS>
constexpr auto kBackwardWithSums = norm_backward_kernel<8, kCachedSteps, SUMS>;
constexpr int kMaxNormParamBlocksPerSm = 4;

}  // namespace

void norm_forward(const bf16* x, const float* weight, const float* bias, int64_t rows, int64_t C, float eps, bool rms,
                  bf16* out, float* mean, float* rstd, cudaStream_t stream) {
  check(rows >= 1 && C >= 1, "norm: empty input");
  const unsigned blocks = detail::blocks_for(rows, kRowsPerBlock);
  dispatch_row<ForwardKernel>(C, [&](auto kernel) {
    kernel<<<blocks, kRowsPerBlock * 32, 0, stream>>>(x, weight, rms ? nullptr : bias, rows, C, eps, rms, out,
                                                      rms ? nullptr : mean, rstd);
  });
  MHC_CUDA_CHECK(cudaGetLastError());
}

NormParamRuns norm_param_runs(int64_t rows, int blocks_per_sm) {
  check(rows >= 1 && blocks_per_sm >= 1 && blocks_per_sm <= kMaxNormParamBlocksPerSm,
        "norm_param_runs: rows and 1 to " + std::to_string(kMaxNormParamBlocksPerSm) + " blocks a multiprocessor");
  const int64_t slots = static_cast<int64_t>(blocks_per_sm) * multiprocessor_count();
  constexpr int64_t W = detail::kNormParamWarps;
  const int64_t per_run = ((rows + slots - 1) / slots + W - 1) / W * W;
  return {(rows + per_run - 1) / per_run, per_run};
}

size_t norm_param_partials_floats(int64_t rows, int64_t C) {
  // the most runs: more blocks a multiprocessor make shorter runs
  return static_cast<size_t>(norm_param_runs(rows, kMaxNormParamBlocksPerSm).runs * 2 * C);
}

void add_norm_param_partials(const float* partials, int64_t runs, int64_t C, float* grad_weight, float* grad_bias,
                             cudaStream_t stream) {
  detail::add_column_chunk_sums<2>(partials, runs, C, {grad_weight, grad_bias}, stream);
}

size_t norm_backward_workspace_floats(int64_t rows, int64_t C) {
  // three sums where they are made in the row pass (with dx's column sums)
  return detail::warp_row_fits(C) ? norm_param_partials_floats(rows, C) / 2 * 3
                                  : detail::column_sums_workspace_floats(2, rows, C);
}

void norm_backward(const bf16* grad_out, const bf16* x, const float* weight, const float* mean, const float* rstd,
                   int64_t rows, int64_t C, bool rms, bf16* grad_x, float* grad_weight, float* grad_bias,
                   float* workspace, bool accumulate, cudaStream_t stream, float* grad_x_sums) {
  check(rows >= 1 && C >= 1, "norm: empty input");
  check(grad_x != nullptr, "norm_backward: grad_x is null");
  check(!grad_x_sums || accumulate, "norm_backward: grad_x's column sums need accumulate (dx is read)");
  if (rms) mean = nullptr, grad_bias = nullptr;
  if (detail::warp_row_fits(C)) {
    auto launch = [&](auto kernel, auto sums) {
      constexpr int V = decltype(sums)::value;
      const size_t bytes = detail::norm_param_shared_bytes(C, V);
      constexpr int kThreads = detail::kNormParamWarps * 32;
      const int per_sm = resident_blocks_per_sm(reinterpret_cast<const void*>(kernel), kThreads, bytes);
      const NormParamRuns runs = norm_param_runs(rows, std::clamp(per_sm, 1, kMaxNormParamBlocksPerSm));
      kernel<<<detail::blocks_for(runs.runs, 1), kThreads, bytes, stream>>>(
          grad_out, x, weight, mean, rstd, rows, C, rms, accumulate, grad_x, runs.rows_per_run, workspace);
      MHC_CUDA_CHECK(cudaGetLastError());
      std::array<float*, V> outputs{grad_weight, grad_bias};  // the partials' [run][V][C]
      if constexpr (V == 3) outputs[2] = grad_x_sums;
      detail::add_column_chunk_sums<V>(workspace, runs.runs, C, outputs, stream);
    };
    if (grad_x_sums)
      launch(kBackwardWithSums<3>, std::integral_constant<int, 3>{});
    else
      launch(kBackwardWithSums<2>, std::integral_constant<int, 2>{});
    return;
  }
  if (grad_x_sums) accumulate_column_sums(grad_x, rows, C, grad_x_sums, workspace, stream);
  dispatch_row<BackwardKernel>(C, [&](auto kernel) {
    kernel<<<detail::blocks_for(rows, kRowsPerBlock), kRowsPerBlock * 32, 0, stream>>>(
        grad_out, x, weight, mean, rstd, rows, C, rms, accumulate, grad_x, kRowsPerBlock, nullptr);
  });
  MHC_CUDA_CHECK(cudaGetLastError());
  detail::column_sums<2>(NormParameterGrads{grad_out, x, mean, rstd, C}, rows, C, {grad_weight, grad_bias}, workspace,
                         stream);
}

}  // namespace mhc::cuda
