#include <algorithm>

#include "core/cuda/device.h"
#include "core/rng.h"
#include "ops/cuda/kernel_utils.cuh"
#include "ops/cuda/stream_mix.h"

namespace mhc::cuda {

namespace {

using detail::block_sum;
using detail::dispatch_streams;
// Threads of a token's block: enough whole warps for its groups of `vec` channels, at most
// 256 (GPT-2 width, C = 768 in groups of 8, needs 96).
unsigned threads_for(int64_t C, int vec) {
  const int64_t groups = C / vec;
  return static_cast<unsigned>(std::clamp<int64_t>((groups + 31) / 32 * 32, 32, detail::kBlockThreads));
}

// Every kernel takes VEC adjacent channels per thread step: 8 (16-byte loads and stores)
// when C % 8 == 0, else 1.
template <int N, int VEC>
__global__ void aggregate_forward_kernel(const bf16* x, const float* h_pre, int64_t C, bf16* agg) {
  const int64_t t = blockIdx.x;
  float gate[N];
#pragma unroll
  for (int j = 0; j < N; ++j) gate[j] = h_pre[t * N + j];
  const bf16* xt = x + t * N * C;
  for (int64_t c = threadIdx.x * VEC; c < C; c += blockDim.x * VEC) {
    float acc[VEC] = {}, xs[VEC];
#pragma unroll
    for (int j = 0; j < N; ++j) {
      detail::load_bf16<VEC>(xt + j * C + c, xs);
#pragma unroll
      for (int v = 0; v < VEC; ++v) acc[v] += gate[j] * xs[v];
    }
    detail::store_bf16<VEC>(agg + t * C + c, acc);
  }
}

template <int N, int VEC>
__global__ void aggregate_backward_kernel(const bf16* grad_agg, const bf16* x, const float* h_pre, int64_t C,
                                          bf16* grad_x, float* grad_h_pre) {
  const int64_t t = blockIdx.x;
  float gate[N], dot[N];
#pragma unroll
  for (int j = 0; j < N; ++j) {
    gate[j] = h_pre[t * N + j];
    dot[j] = 0;
  }
  const bf16* xt = x + t * N * C;
  bf16* gxt = grad_x + t * N * C;
  for (int64_t c = threadIdx.x * VEC; c < C; c += blockDim.x * VEC) {
    float g[VEC];
    detail::load_bf16<VEC>(grad_agg + t * C + c, g);
#pragma unroll
    for (int j = 0; j < N; ++j) {
      float xs[VEC], gx[VEC];
      detail::load_bf16<VEC>(xt + j * C + c, xs);
      detail::load_bf16<VEC>(gxt + j * C + c, gx);
#pragma unroll
      for (int v = 0; v < VEC; ++v) {
        dot[j] += g[v] * xs[v];
        gx[v] += gate[j] * g[v];
      }
      detail::store_bf16<VEC>(gxt + j * C + c, gx);
    }
  }
  __shared__ float sums[N];
  block_sum<N>(dot, sums);
  if (threadIdx.x < N) grad_h_pre[t * N + threadIdx.x] = sums[threadIdx.x];
}

// y + y_bias for VEC channels from c.
template <int VEC>
__device__ inline void load_sublayer(const bf16* y, const bf16* y_bias, int64_t c, float (&out)[VEC]) {
  detail::load_bf16<VEC>(y + c, out);
  if (!y_bias) return;
  float b[VEC];
  detail::load_bf16<VEC>(y_bias + c, b);
#pragma unroll
  for (int v = 0; v < VEC; ++v) out[v] += b[v];
}

template <int N, int VEC>
__global__ void h_post_bda_forward_kernel(const bf16* x, const float* h_res, const float* h_post, const bf16* y,
                                          const bf16* y_bias, int64_t C, float p, uint64_t key, bf16* out,
                                          float* out_sumsq) {
  const int64_t t = blockIdx.x;
  float sumsq[1] = {0};
  float mix[N][N], post[N];
#pragma unroll
  for (int i = 0; i < N; ++i) {
    post[i] = h_post[t * N + i];
#pragma unroll
    for (int j = 0; j < N; ++j) mix[i][j] = h_res[(t * N + i) * N + j];
  }
  const bf16* xt = x + t * N * C;
  for (int64_t c = threadIdx.x * VEC; c < C; c += blockDim.x * VEC) {
    float sublayer[VEC], xs[N][VEC];
    load_sublayer<VEC>(y + t * C, y_bias, c, sublayer);
#pragma unroll
    for (int j = 0; j < N; ++j) detail::load_bf16<VEC>(xt + j * C + c, xs[j]);
#pragma unroll
    for (int i = 0; i < N; ++i) {
      float acc[VEC];
#pragma unroll
      for (int v = 0; v < VEC; ++v) {
        const uint64_t index = static_cast<uint64_t>(t * N + i) * C + c + v;
        acc[v] = dropout_scale<float>(key, index, p) * post[i] * sublayer[v];
#pragma unroll
        for (int j = 0; j < N; ++j) acc[v] += mix[i][j] * xs[j][v];
        if (out_sumsq) {
          const float stored = __bfloat162float(__float2bfloat16(acc[v]));
          sumsq[0] += stored * stored;
        }
      }
      detail::store_bf16<VEC>(out + (t * N + i) * C + c, acc);
    }
  }
  if (out_sumsq) {
    __shared__ float total[1];
    detail::block_sum<1>(sumsq, total);
    if (threadIdx.x == 0) out_sumsq[t] = total[0];
  }
}

// AGG: also the aggregate's backward on the same x (dx += H_pre dagg, dH_pre), so that
// dx is written once.
// AGG: fused with the aggregate's backward; DY_ONLY: only dy (no x, dx or reductions).
template <int N, int VEC, bool AGG, bool DY_ONLY = false>
__global__ void h_post_bda_backward_kernel(const bf16* grad_out, const bf16* x, const float* h_res,
                                           const float* h_post, const bf16* y, const bf16* y_bias, int64_t C,
                                           float p, uint64_t key, bf16* grad_x, float* grad_h_res,
                                           float* grad_h_post, bf16* grad_y, const bf16* grad_agg,
                                           const float* h_pre, float* grad_h_pre) {
  constexpr int P = N * N + N + (AGG ? N : 0);
  const int64_t t = blockIdx.x;
  float mix[N][N], post[N], pre[N];
  float partial[P];  // dH_res row-major, then dH_post, then dH_pre
#pragma unroll
  for (int i = 0; i < N; ++i) {
    post[i] = h_post[t * N + i];
#pragma unroll
    for (int j = 0; j < N; ++j) mix[i][j] = DY_ONLY ? 0.0f : h_res[(t * N + i) * N + j];
  }
#pragma unroll
  for (int j = 0; j < N; ++j) pre[j] = AGG ? h_pre[t * N + j] : 0.0f;
#pragma unroll
  for (int k = 0; k < P; ++k) partial[k] = 0;
  const bf16* xt = x + t * N * C;
  for (int64_t c = threadIdx.x * VEC; c < C; c += blockDim.x * VEC) {
    float sublayer[VEC] = {}, g[N][VEC], xs[N][VEC], dy[VEC] = {}, dagg[VEC] = {};
    if constexpr (!DY_ONLY) load_sublayer<VEC>(y + t * C, y_bias, c, sublayer);
    if constexpr (AGG) detail::load_bf16<VEC>(grad_agg + t * C + c, dagg);
#pragma unroll
    for (int i = 0; i < N; ++i) {
      detail::load_bf16<VEC>(grad_out + (t * N + i) * C + c, g[i]);
      if constexpr (!DY_ONLY) detail::load_bf16<VEC>(xt + i * C + c, xs[i]);
#pragma unroll
      for (int v = 0; v < VEC; ++v) {
        const float masked = g[i][v] * dropout_scale<float>(key, static_cast<uint64_t>(t * N + i) * C + c + v, p);
        dy[v] += masked * post[i];
        partial[N * N + i] += masked * sublayer[v];
      }
    }
    if constexpr (!DY_ONLY) {
#pragma unroll
      for (int j = 0; j < N; ++j) {
        float dx[VEC];
#pragma unroll
        for (int v = 0; v < VEC; ++v) {
          dx[v] = pre[j] * dagg[v];
          if constexpr (AGG) partial[N * N + N + j] += dagg[v] * xs[j][v];
        }
#pragma unroll
        for (int i = 0; i < N; ++i)
#pragma unroll
          for (int v = 0; v < VEC; ++v) {
            dx[v] += mix[i][j] * g[i][v];
            partial[i * N + j] += g[i][v] * xs[j][v];
          }
        detail::store_bf16<VEC>(grad_x + (t * N + j) * C + c, dx);
      }
    }
    if (grad_y) detail::store_bf16<VEC>(grad_y + t * C + c, dy);
  }
  if constexpr (DY_ONLY) return;
  __shared__ float sums[P];
  block_sum<P>(partial, sums);
  for (int k = threadIdx.x; k < N * N; k += blockDim.x) grad_h_res[t * N * N + k] = sums[k];
  for (int i = threadIdx.x; i < N; i += blockDim.x) grad_h_post[t * N + i] = sums[N * N + i];
  if constexpr (AGG)
    for (int j = threadIdx.x; j < N; j += blockDim.x) grad_h_pre[t * N + j] = sums[N * N + N + j];
}

// One token's row: `to_streams` replicates a [C] row into n streams scaled by `scale`
// (expand: 1, contract's backward: 1/n); otherwise sums the n streams times `scale`
// (expand's backward: 1, contract: 1/n).
template <int N, int VEC, bool TO_STREAMS>
__global__ void stream_copy_kernel(const bf16* in, int64_t C, float scale, bf16* out) {
  const int64_t t = blockIdx.x;
  for (int64_t c = threadIdx.x * VEC; c < C; c += blockDim.x * VEC) {
    float v[VEC];
    if constexpr (TO_STREAMS) {
      detail::load_bf16<VEC>(in + t * C + c, v);
#pragma unroll
      for (int k = 0; k < VEC; ++k) v[k] *= scale;
#pragma unroll
      for (int i = 0; i < N; ++i) detail::store_bf16<VEC>(out + (t * N + i) * C + c, v);
    } else {
      float sum[VEC] = {};
#pragma unroll
      for (int i = 0; i < N; ++i) {
        detail::load_bf16<VEC>(in + (t * N + i) * C + c, v);
#pragma unroll
        for (int k = 0; k < VEC; ++k) sum[k] += v[k];
      }
#pragma unroll
      for (int k = 0; k < VEC; ++k) sum[k] *= scale;
      detail::store_bf16<VEC>(out + t * C + c, sum);
    }
  }
}


unsigned grid_of(int64_t tokens) {
  check(tokens >= 1 && tokens <= 0x7fffffff, "token count out of range for the CUDA kernels");
  return static_cast<unsigned>(tokens);
}

template <bool TO_STREAMS>
void stream_copy(const bf16* in, int64_t tokens, int n, int64_t C, float scale, bf16* out, cudaStream_t stream) {
  dispatch_streams(n, [&](auto N) {
    if (C % 8 == 0)
      stream_copy_kernel<N.value, 8, TO_STREAMS><<<grid_of(tokens), threads_for(C, 8), 0, stream>>>(in, C, scale, out);
    else
      stream_copy_kernel<N.value, 1, TO_STREAMS><<<grid_of(tokens), threads_for(C, 1), 0, stream>>>(in, C, scale, out);
  });
  MHC_CUDA_CHECK(cudaGetLastError());
}

}  // namespace

void stream_expand_forward(const bf16* e, int64_t tokens, int n, int64_t C, bf16* x, cudaStream_t stream) {
  stream_copy<true>(e, tokens, n, C, 1.0f, x, stream);
}
void stream_expand_backward(const bf16* grad_x, int64_t tokens, int n, int64_t C, bf16* grad_e, cudaStream_t stream) {
  stream_copy<false>(grad_x, tokens, n, C, 1.0f, grad_e, stream);
}
void stream_contract_forward(const bf16* x, int64_t tokens, int n, int64_t C, bf16* out, cudaStream_t stream) {
  stream_copy<false>(x, tokens, n, C, 1.0f / static_cast<float>(n), out, stream);
}
void stream_contract_backward(const bf16* grad_out, int64_t tokens, int n, int64_t C, bf16* grad_x,
                              cudaStream_t stream) {
  stream_copy<true>(grad_out, tokens, n, C, 1.0f / static_cast<float>(n), grad_x, stream);
}

bool stream_count_supported(int n) { return n == 1 || n == 2 || n == 4 || n == 6 || n == 8; }

void aggregate_forward(const bf16* x, const float* h_pre, int64_t tokens, int n, int64_t C, bf16* agg,
                       cudaStream_t stream) {
  dispatch_streams(n, [&](auto N) {
    if (C % 8 == 0) aggregate_forward_kernel<N.value, 8><<<grid_of(tokens), threads_for(C, 8), 0, stream>>>(x, h_pre, C, agg);
    else aggregate_forward_kernel<N.value, 1><<<grid_of(tokens), threads_for(C, 1), 0, stream>>>(x, h_pre, C, agg);
  });
  MHC_CUDA_CHECK(cudaGetLastError());
}

void aggregate_backward(const bf16* grad_agg, const bf16* x, const float* h_pre, int64_t tokens, int n, int64_t C,
                        bf16* grad_x, float* grad_h_pre, cudaStream_t stream) {
  dispatch_streams(n, [&](auto N) {
    if (C % 8 == 0)
      aggregate_backward_kernel<N.value, 8><<<grid_of(tokens), threads_for(C, 8), 0, stream>>>(grad_agg, x, h_pre, C, grad_x,
                                                                                      grad_h_pre);
    else
      aggregate_backward_kernel<N.value, 1><<<grid_of(tokens), threads_for(C, 1), 0, stream>>>(grad_agg, x, h_pre, C, grad_x,
                                                                                      grad_h_pre);
  });
  MHC_CUDA_CHECK(cudaGetLastError());
}

void h_post_bda_forward(const bf16* x, const float* h_res, const float* h_post, const bf16* y, const bf16* y_bias,
                        int64_t tokens, int n, int64_t C, cpu::DropoutSpec dropout, bf16* out, float* out_sumsq,
                        cudaStream_t stream) {
  dispatch_streams(n, [&](auto N) {
    if (C % 8 == 0)
      h_post_bda_forward_kernel<N.value, 8><<<grid_of(tokens), threads_for(C, 8), 0, stream>>>(
          x, h_res, h_post, y, y_bias, C, dropout.p, dropout.key, out, out_sumsq);
    else
      h_post_bda_forward_kernel<N.value, 1><<<grid_of(tokens), threads_for(C, 1), 0, stream>>>(
          x, h_res, h_post, y, y_bias, C, dropout.p, dropout.key, out, out_sumsq);
  });
  MHC_CUDA_CHECK(cudaGetLastError());
}

void h_post_bda_grad_y(const bf16* grad_out, const float* h_post, int64_t tokens, int n, int64_t C,
                       cpu::DropoutSpec dropout, bf16* grad_y, cudaStream_t stream) {
  dispatch_streams(n, [&](auto N) {
    auto launch = [&](auto kernel, int vec) {
      kernel<<<grid_of(tokens), threads_for(C, vec), 0, stream>>>(grad_out, nullptr, nullptr, h_post, nullptr, nullptr,
                                                                 C, dropout.p, dropout.key, nullptr, nullptr, nullptr,
                                                                 grad_y, nullptr, nullptr, nullptr);
    };
    if (C % 8 == 0) launch(h_post_bda_backward_kernel<N.value, 8, false, true>, 8);
    else launch(h_post_bda_backward_kernel<N.value, 1, false, true>, 1);
  });
  MHC_CUDA_CHECK(cudaGetLastError());
}

void h_post_bda_backward(const bf16* grad_out, const bf16* x, const float* h_res, const float* h_post, const bf16* y,
                         const bf16* y_bias, int64_t tokens, int n, int64_t C, cpu::DropoutSpec dropout, bf16* grad_x,
                         float* grad_h_res, float* grad_h_post, bf16* grad_y, const AggregateGrad* aggregate,
                         cudaStream_t stream) {
  const bf16* grad_agg = aggregate ? aggregate->grad_agg : nullptr;
  const float* h_pre = aggregate ? aggregate->h_pre : nullptr;
  float* grad_h_pre = aggregate ? aggregate->grad_h_pre : nullptr;
  dispatch_streams(n, [&](auto N) {
    const int vec = C % 4 == 0 ? 4 : 1;
    auto launch = [&](auto kernel) {
      kernel<<<grid_of(tokens), threads_for(C, vec), 0, stream>>>(grad_out, x, h_res, h_post, y, y_bias, C, dropout.p,
                                                             dropout.key, grad_x, grad_h_res, grad_h_post, grad_y,
                                                             grad_agg, h_pre, grad_h_pre);
    };
    // 4 channels a step: 8 make the fused kernel need 225 registers (one block per multiprocessor).
    if (C % 4 == 0) {
      if (aggregate) launch(h_post_bda_backward_kernel<N.value, 4, true>);
      else launch(h_post_bda_backward_kernel<N.value, 4, false>);
    } else {
      if (aggregate) launch(h_post_bda_backward_kernel<N.value, 1, true>);
      else launch(h_post_bda_backward_kernel<N.value, 1, false>);
    }
  });
  MHC_CUDA_CHECK(cudaGetLastError());
}

}  // namespace mhc::cuda
