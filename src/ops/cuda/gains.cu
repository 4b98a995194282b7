#include "ops/cuda/gains.h"

#include "core/cuda/device.h"
#include "ops/cuda/kernel_utils.cuh"

namespace mhc::cuda {
namespace {

// Largest absolute row sum (rows) or column sum of an n x n matrix.
template <int N> __device__ float max_abs_sum(const float (&M)[N][N], bool rows) {
  float best = 0;
#pragma unroll
  for (int a = 0; a < N; ++a) {
    float s = 0;
#pragma unroll
    for (int b = 0; b < N; ++b) s += fabsf(rows ? M[a][b] : M[b][a]);
    best = fmaxf(best, s);
  }
  return best;
}

// per_token[(m * 4 + k) * tokens + t], k: forward, backward, composite forward, composite backward.
template <int N>
__global__ void token_gains_kernel(const float* const* h_res, int64_t modules, int64_t tokens, float* per_token) {
  const int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (t >= tokens) return;
  float P[N][N];
#pragma unroll
  for (int i = 0; i < N; ++i)
#pragma unroll
    for (int j = 0; j < N; ++j) P[i][j] = i == j ? 1.0f : 0.0f;
  for (int64_t m = 0; m < modules; ++m) {
    float H[N][N], Q[N][N];
    const float* h = h_res[m] + t * N * N;
#pragma unroll
    for (int i = 0; i < N; ++i)
#pragma unroll
      for (int j = 0; j < N; ++j) H[i][j] = h[i * N + j];
#pragma unroll
    for (int i = 0; i < N; ++i)
#pragma unroll
      for (int j = 0; j < N; ++j) {
        float s = 0;
#pragma unroll
        for (int k = 0; k < N; ++k) s += H[i][k] * P[k][j];
        Q[i][j] = s;
      }
#pragma unroll
    for (int i = 0; i < N; ++i)
#pragma unroll
      for (int j = 0; j < N; ++j) P[i][j] = Q[i][j];
    per_token[(m * 4 + 0) * tokens + t] = max_abs_sum(H, true);
    per_token[(m * 4 + 1) * tokens + t] = max_abs_sum(H, false);
    per_token[(m * 4 + 2) * tokens + t] = max_abs_sum(P, true);
    per_token[(m * 4 + 3) * tokens + t] = max_abs_sum(P, false);
  }
}

// Block b reduces row b of per_token: stats[2 b] = max, stats[2 b + 1] = mean.
__global__ void max_mean_kernel(const float* per_token, int64_t tokens, float* stats) {
  const float* row = per_token + static_cast<int64_t>(blockIdx.x) * tokens;
  float v[2] = {0, 0};  // max (values are >= 0), sum
  for (int64_t t = threadIdx.x; t < tokens; t += blockDim.x) {
    v[0] = fmaxf(v[0], row[t]);
    v[1] += row[t];
  }
  __shared__ float maxima[detail::kBlockWarps];
  float m = v[0];
  for (int offset = 16; offset > 0; offset /= 2) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, offset));
  if (threadIdx.x % 32 == 0) maxima[threadIdx.x / 32] = m;
  float s[1] = {v[1]};
  // thread 0, after the block's barrier: maxima is complete too
  detail::group_sum<1>(s, static_cast<int>(blockDim.x), [&](int, float sum) {
    float best = 0;
    for (int w = 0; w < detail::kBlockWarps; ++w) best = fmaxf(best, maxima[w]);
    stats[2 * blockIdx.x] = best;
    stats[2 * blockIdx.x + 1] = sum / static_cast<float>(tokens);
  });
}

}  // namespace

size_t gains_workspace_floats(int64_t modules, int64_t tokens) { return static_cast<size_t>(modules * 4 * tokens); }

void hc_gains(const float* const* h_res, int64_t modules, int64_t tokens, int n, float* workspace, float* stats,
              cudaStream_t stream) {
  check(modules >= 1 && tokens >= 1, "hc_gains: nothing to measure");
  detail::dispatch_streams(n, [&](auto Ns) {
    constexpr int N = decltype(Ns)::value;
    token_gains_kernel<N><<<detail::blocks_for(tokens, 128), 128, 0, stream>>>(h_res, modules, tokens, workspace);
  });
  MHC_CUDA_CHECK(cudaGetLastError());
  max_mean_kernel<<<static_cast<unsigned>(modules * 4), detail::kBlockThreads, 0, stream>>>(workspace, tokens, stats);
  MHC_CUDA_CHECK(cudaGetLastError());
}

}  // namespace mhc::cuda
