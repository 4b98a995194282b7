#include <string>

#include "core/cuda/device.h"
#include "core/rng.h"
#include "ops/cuda/column_sums.cuh"
#include "ops/cuda/kernel_utils.cuh"
#include "ops/cuda/norm.h"
#include "ops/cuda/norm_row.cuh"
#include "ops/cuda/stream_mix.h"

namespace mhc::cuda {

namespace {

using detail::dispatch_drop;
using detail::dispatch_streams;
using detail::Drop;
using detail::group_sum;
using detail::launch_by_width;
using detail::token_launch;
using detail::TokenGroup;
using detail::TokenLaunch;

// The dropout keep-scale of one element.
template <bool DROPOUT> __device__ inline float keep_scale(uint64_t key, uint64_t index, float p) {
  if constexpr (DROPOUT) return dropout_scale<float>(key, index, p);
  else return 1.0f;
}
// The keep-scales of VEC consecutive elements from `first` (VEC 4 or 8 from a multiple of
// VEC: within one byte of the kept bits).
template <int VEC>
__device__ inline void kept_scales(const uint8_t* kept, uint64_t first, float p, float (&scales)[VEC]) {
  const float scale = dropout_kept_scale<float>(p);
  if constexpr (VEC == 4 || VEC == 8) {
    const uint32_t bits = kept[first / 8] >> (first % 8);
#pragma unroll
    for (int v = 0; v < VEC; ++v) scales[v] = bits >> v & 1u ? scale : 0.0f;
  } else {
#pragma unroll
    for (int v = 0; v < VEC; ++v) scales[v] = kept[(first + v) / 8] >> ((first + v) % 8) & 1u ? scale : 0.0f;
  }
}
void check_kept(const cpu::DropoutSpec& d, int64_t C, const char* op) {
  check(!d.kept || C % 8 == 0,
        std::string(op) + ": dropout's kept bits need C a multiple of 8 (got " + std::to_string(C) + ")");
}
// The keep-scales of VEC consecutive elements from `first`: one Philox call a group of four
// where the groups are whole (each call gives four consecutive elements), else one each.
template <bool DROPOUT, int VEC>
__device__ inline void keep_scales(uint64_t key, uint64_t first, float p, float (&scales)[VEC]) {
  if constexpr (DROPOUT && VEC % 4 == 0) {
    if (first % 4 == 0) {
      const float kept = dropout_kept_scale<float>(p);
#pragma unroll
      for (int v = 0; v < VEC; v += 4) {
        const uint32_t bits = dropout_keep_bits4(key, first + v, p);
#pragma unroll
        for (int q = 0; q < 4; ++q) scales[v + q] = bits >> q & 1u ? kept : 0.0f;
      }
      return;
    }
  }
#pragma unroll
  for (int v = 0; v < VEC; ++v) scales[v] = keep_scale<DROPOUT>(key, first + v, p);
}
// The keep-scales of VEC consecutive elements from `first` from where DROP says: the kept
// bits, the Philox stream (under `key`), or none.
template <Drop DROP, int VEC>
__device__ inline void drop_scales(const cpu::DropoutSpec& d, uint64_t key, uint64_t first, float (&scales)[VEC]) {
  if constexpr (DROP == Drop::kBits) kept_scales<VEC>(d.kept, first, d.p, scales);
  else keep_scales<DROP == Drop::kPhilox, VEC>(key, first, d.p, scales);
}

// Every kernel takes VEC adjacent channels per thread step: 8 (16-byte loads and stores)
// when C % 8 == 0, else 1.
template <int N, int VEC>
__global__ void aggregate_forward_kernel(const bf16* x, const float* h_pre, int64_t tokens, int64_t C, int lanes,
                                         bf16* agg) {
  const TokenGroup tg = detail::token_group(lanes);
  const int64_t t = tg.token;
  if (t >= tokens) return;
  float gate[N];
#pragma unroll
  for (int j = 0; j < N; ++j) gate[j] = h_pre[t * N + j];
  detail::aggregate_row<N, VEC>(x + t * N * C, gate, C, tg, agg + t * C);
}

template <int N, int VEC>
__global__ void aggregate_backward_kernel(const bf16* grad_agg, const bf16* x, const float* h_pre, int64_t tokens,
                                          int64_t C, int lanes, bf16* grad_x, float* grad_h_pre) {
  const TokenGroup tg = detail::token_group(lanes);
  const int64_t t = tg.token;
  if (t >= tokens) return;
  float gate[N], dot[N];
#pragma unroll
  for (int j = 0; j < N; ++j) {
    gate[j] = h_pre[t * N + j];
    dot[j] = 0;
  }
  const bf16* xt = x + t * N * C;
  bf16* gxt = grad_x + t * N * C;
  for (int64_t c = tg.lane * VEC; c < C; c += tg.lanes * VEC) {
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
  group_sum<N>(dot, lanes, [&](int j, float total) { grad_h_pre[t * N + j] = total; });
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

// Three blocks a multiprocessor without dropout (80 registers, no spills; at its own 91, two
// blocks: too few loads in flight for an H200's bandwidth); two with dropout (128 registers
// and 8 bytes of spills, against one block at its own 158; three spill hundreds of bytes).
template <int N, int VEC, bool DROPOUT>
__global__ void __launch_bounds__(detail::kBlockThreads, DROPOUT ? 2 : 3)
    h_post_bda_forward_kernel(const bf16* x, const float* h_res, const float* h_post, const bf16* y, const bf16* y_bias,
                              int64_t tokens, int64_t C, int lanes, cpu::DropoutSpec dropout, bf16* out,
                              float* out_sumsq) {
  const float p = dropout.p;
  const uint64_t key = DROPOUT ? detail::dropout_key(dropout) : 0;
  const TokenGroup tg = detail::token_group(lanes);
  const int64_t t = tg.token;
  if (t >= tokens) return;
  float sumsq[1] = {0};
  float mix[N][N], post[N];
#pragma unroll
  for (int i = 0; i < N; ++i) {
    post[i] = h_post[t * N + i];
#pragma unroll
    for (int j = 0; j < N; ++j) mix[i][j] = h_res[(t * N + i) * N + j];
  }
  const bf16* xt = x + t * N * C;
  for (int64_t c = tg.lane * VEC; c < C; c += tg.lanes * VEC) {
    float sublayer[VEC], xs[N][VEC];
    load_sublayer<VEC>(y + t * C, y_bias, c, sublayer);
#pragma unroll
    for (int j = 0; j < N; ++j) detail::load_bf16<VEC>(xt + j * C + c, xs[j]);
#pragma unroll
    for (int i = 0; i < N; ++i) {
      float acc[VEC], keep[VEC];
      const uint64_t first = static_cast<uint64_t>(t * N + i) * C + c;
      keep_scales<DROPOUT, VEC>(key, first, p, keep);
      if constexpr (DROPOUT && VEC == 8)
        if (dropout.kept) {
          uint32_t bits = 0;
#pragma unroll
          for (int v = 0; v < VEC; ++v) bits |= static_cast<uint32_t>(keep[v] != 0.0f) << v;
          dropout.kept[first / 8] = static_cast<uint8_t>(bits);
        }
#pragma unroll
      for (int v = 0; v < VEC; ++v) {
        acc[v] = keep[v] * post[i] * sublayer[v];
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
    group_sum<1>(sumsq, lanes, [&](int, float total) { out_sumsq[t] = total; });
  }
}

// AGG: also the aggregate's backward on the same x (dx += H_pre dagg, dH_pre), so that
// dx is written once. DX false: the reductions only, dx left to the mappings' backward
// (StreamMixGrad). NORM (with AGG, a warp a token): dagg made here as the pre-norm's input
// gradient (NormInputGrad: its row means first, then dagg a step at a time, written and
// used as stored). Two blocks a multiprocessor where n <= 4 fits 128 registers without
// spilling. With NORM a block takes a run of tokens (whole waves of two blocks a
// multiprocessor) and also sums the norm's weight and bias gradients.
constexpr int kReductionBlocksPerSm = 2;
template <int N, int VEC, bool AGG, bool DX, Drop DROP, bool NORM>
__global__ void __launch_bounds__(detail::kBlockThreads, N <= 4 ? kReductionBlocksPerSm : 1)
    h_post_bda_backward_kernel(const bf16* grad_out, const bf16* x, const float* h_res, const float* h_post,
                               const bf16* y, const bf16* y_bias, int64_t tokens, int64_t C, int lanes,
                               cpu::DropoutSpec dropout, bf16* grad_x, float* grad_h_res, float* grad_h_post,
                               bf16* grad_y, const bf16* grad_agg, const float* h_pre, float* grad_h_pre,
                               NormInputGrad norm, int64_t tokens_per_run) {
  static_assert(!NORM || AGG, "the norm's input gradient is the aggregate's");
  const uint64_t key = DROP == Drop::kPhilox ? detail::dropout_key(dropout) : 0;
  constexpr int P = N * N + N + (AGG ? N : 0);
  const TokenGroup tg = detail::token_group(lanes);
  // One token's reductions; NORM: `sums` the warp's row of the norm's parameter sums.
  auto reduce_token = [&](const int64_t t, float* sums) {
    float mix[N][N], post[N], pre[N];
#pragma unroll
    for (int j = 0; j < N; ++j) pre[j] = AGG ? h_pre[t * N + j] : 0.0f;
    const bf16* xt = x + t * N * C;
    float norm_m = 0, norm_s = 0, mean_gw = 0, mean_gw_xhat = 0;
    if constexpr (NORM) {  // the row means first, of the aggregate made from x (read again below, from cache)
      detail::AggregateRow<N, VEC, 0> agg{xt, pre, C, nullptr};
      detail::RowCache<VEC, 0> g{norm.grad_out + t * C};
      norm_m = norm.rms ? 0.0f : norm.mean[t];
      norm_s = norm.rstd[t];
      detail::norm_row_grad_means<VEC, 0>(g, agg, norm.weight, C, norm_m, norm_s, norm.rms, tg.lane, mean_gw,
                                          mean_gw_xhat);
    }
    float partial[P];  // dH_res row-major, then dH_post, then dH_pre
#pragma unroll
    for (int i = 0; i < N; ++i) {
      post[i] = h_post[t * N + i];
#pragma unroll
      for (int j = 0; j < N; ++j) mix[i][j] = h_res[(t * N + i) * N + j];
    }
#pragma unroll
    for (int k = 0; k < P; ++k) partial[k] = 0;
    for (int64_t c = tg.lane * VEC; c < C; c += tg.lanes * VEC) {
      float sublayer[VEC] = {}, g[N][VEC], xs[N][VEC], dy[VEC] = {}, dagg[VEC] = {};
      load_sublayer<VEC>(y + t * C, y_bias, c, sublayer);
      if constexpr (AGG && !NORM) detail::load_bf16<VEC>(grad_agg + t * C + c, dagg);
#pragma unroll
      for (int i = 0; i < N; ++i) {
        detail::load_bf16<VEC>(grad_out + (t * N + i) * C + c, g[i]);
        detail::load_bf16<VEC>(xt + i * C + c, xs[i]);
        float keep[VEC];
        drop_scales<DROP, VEC>(dropout, key, static_cast<uint64_t>(t * N + i) * C + c, keep);
#pragma unroll
        for (int v = 0; v < VEC; ++v) {
          const float masked = g[i][v] * keep[v];
          dy[v] += masked * post[i];
          partial[N * N + i] += masked * sublayer[v];
        }
      }
      if constexpr (NORM) {  // dagg, the norm's input (the aggregate) made from the streams just read
        float gv[VEC], xv[VEC], w[VEC];
        detail::aggregate_of<N, VEC>(xs, pre, xv);
#pragma unroll
        for (int v = 0; v < VEC; ++v) xv[v] = __bfloat162float(__float2bfloat16(xv[v]));
        detail::load_bf16<VEC>(norm.grad_out + t * C + c, gv);
        detail::load_f32<VEC>(norm.weight + c, w);
        detail::add_norm_input_grad<VEC>(gv, xv, w, norm_m, norm_s, mean_gw, mean_gw_xhat, dagg);
        detail::store_bf16<VEC>(norm.grad_x + t * C + c, dagg);
        detail::add_norm_param_grads(sums, C, c, gv, xv, norm_m, norm_s);
#pragma unroll
        for (int v = 0; v < VEC; ++v) dagg[v] = __bfloat162float(__float2bfloat16(dagg[v]));
      }
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
            if constexpr (DX) dx[v] += mix[i][j] * g[i][v];
            partial[i * N + j] += g[i][v] * xs[j][v];
          }
        if constexpr (DX) detail::store_bf16<VEC>(grad_x + (t * N + j) * C + c, dx);
      }
      if (grad_y) detail::store_bf16<VEC>(grad_y + t * C + c, dy);
    }
    group_sum<P>(partial, lanes, [&](int k, float total) {
      if (k < N * N)
        grad_h_res[t * N * N + k] = total;
      else if (k < N * N + N)
        grad_h_post[t * N + k - N * N] = total;
      else
        grad_h_pre[t * N + k - N * N - N] = total;
    });
  };
  if constexpr (NORM) {  // the block's run of tokens, a warp a token at a time (norm.h, NormParamRuns)
    static_assert(detail::kBlockWarps == detail::kNormParamWarps, "a block of the norm's parameter sums");
    extern __shared__ float param_rows[];
    detail::for_norm_param_run<2>(param_rows, C, tokens, tokens_per_run, norm.param_partials, reduce_token);
  } else if (tg.token < tokens) {
    reduce_token(tg.token, nullptr);
  }
}

// dy alone as a column-sum value (ops/cuda/column_sums.cuh): writes dy at (t, c..) and
// gives it as stored (bf16-rounded) for dy_bias. The same arithmetic, in the same order,
// as h_post_bda_backward_kernel's dy.
template <int N, Drop DROP>
struct GradY {
  const bf16* grad_out;
  const float* h_post;
  int64_t C;
  cpu::DropoutSpec dropout;
  bf16* grad_y;
  template <int COLS> __device__ void operator()(int64_t t, int64_t c, float (&out)[1][COLS]) const {
    const uint64_t key = DROP == Drop::kPhilox ? detail::dropout_key(dropout) : 0;
    float dy[COLS] = {};
#pragma unroll
    for (int i = 0; i < N; ++i) {
      float g[COLS];
      detail::load_bf16<COLS>(grad_out + (t * N + i) * C + c, g);
      const float post = h_post[t * N + i];
      float keep[COLS];
      drop_scales<DROP, COLS>(dropout, key, static_cast<uint64_t>(t * N + i) * C + c, keep);
#pragma unroll
      for (int v = 0; v < COLS; ++v) {
        const float masked = g[v] * keep[v];
        dy[v] += masked * post;
      }
    }
    detail::store_bf16<COLS>(grad_y + t * C + c, dy);
#pragma unroll
    for (int v = 0; v < COLS; ++v) out[0][v] = __bfloat162float(__float2bfloat16(dy[v]));
  }
};

// One token's row: `to_streams` replicates a [C] row into n streams scaled by `scale`
// (expand: 1, contract's backward: 1/n); otherwise sums the n streams times `scale`
// (expand's backward: 1, contract: 1/n).
template <int N, int VEC, bool TO_STREAMS>
__global__ void stream_copy_kernel(const bf16* in, int64_t tokens, int64_t C, int lanes, float scale, bf16* out) {
  const TokenGroup tg = detail::token_group(lanes);
  const int64_t t = tg.token;
  if (t >= tokens) return;
  for (int64_t c = tg.lane * VEC; c < C; c += tg.lanes * VEC) {
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


template <bool TO_STREAMS>
void stream_copy(const bf16* in, int64_t tokens, int n, int64_t C, float scale, bf16* out, cudaStream_t stream) {
  dispatch_streams(n, [&](auto N) {
    launch_by_width(tokens, C, stream_copy_kernel<N.value, 8, TO_STREAMS>, stream_copy_kernel<N.value, 1, TO_STREAMS>,
                    [&](auto kernel, TokenLaunch l) {
                      kernel<<<l.grid, l.threads, 0, stream>>>(in, tokens, C, l.lanes, scale, out);
                    });
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
    launch_by_width(tokens, C, aggregate_forward_kernel<N.value, 8>, aggregate_forward_kernel<N.value, 1>,
                    [&](auto kernel, TokenLaunch l) {
                      kernel<<<l.grid, l.threads, 0, stream>>>(x, h_pre, tokens, C, l.lanes, agg);
                    });
  });
  MHC_CUDA_CHECK(cudaGetLastError());
}

void aggregate_backward(const bf16* grad_agg, const bf16* x, const float* h_pre, int64_t tokens, int n, int64_t C,
                        bf16* grad_x, float* grad_h_pre, cudaStream_t stream) {
  dispatch_streams(n, [&](auto N) {
    launch_by_width(tokens, C, aggregate_backward_kernel<N.value, 8>, aggregate_backward_kernel<N.value, 1>,
                    [&](auto kernel, TokenLaunch l) {
                      kernel<<<l.grid, l.threads, 0, stream>>>(grad_agg, x, h_pre, tokens, C, l.lanes, grad_x,
                                                               grad_h_pre);
                    });
  });
  MHC_CUDA_CHECK(cudaGetLastError());
}

void h_post_bda_forward(const bf16* x, const float* h_res, const float* h_post, const bf16* y, const bf16* y_bias,
                        int64_t tokens, int n, int64_t C, cpu::DropoutSpec dropout, bf16* out, float* out_sumsq,
                        cudaStream_t stream) {
  check_kept(dropout, C, "h_post_bda_forward");
  dispatch_streams(n, [&](auto N) {
    // The forward makes its mask from the Philox stream (and stores it as bits when asked).
    dispatch_drop(dropout.p, /*bits=*/false, [&](auto drop) {
      constexpr bool DROPOUT = decltype(drop)::value != Drop::kOff;
      launch_by_width(tokens, C, h_post_bda_forward_kernel<N.value, 8, DROPOUT>,
                      h_post_bda_forward_kernel<N.value, 1, DROPOUT>, [&](auto kernel, TokenLaunch l) {
                        kernel<<<l.grid, l.threads, 0, stream>>>(x, h_res, h_post, y, y_bias, tokens, C, l.lanes,
                                                                 dropout, out, out_sumsq);
                      });
    });
  });
  MHC_CUDA_CHECK(cudaGetLastError());
}

size_t h_post_bda_grad_y_workspace_floats(int64_t tokens, int64_t C) {
  return detail::column_sums_workspace_floats(1, tokens, C);
}

void h_post_bda_grad_y(const bf16* grad_out, const float* h_post, int64_t tokens, int n, int64_t C,
                       cpu::DropoutSpec dropout, bf16* grad_y, float* grad_y_bias, float* workspace,
                       cudaStream_t stream) {
  check(tokens >= 1 && C >= 1, "h_post_bda_grad_y: empty input");
  check_kept(dropout, C, "h_post_bda_grad_y");
  dispatch_streams(n, [&](auto N) {
    dispatch_drop(dropout.p, dropout.kept != nullptr, [&](auto drop) {
      detail::column_sums<1>(GradY<N.value, decltype(drop)::value>{grad_out, h_post, C, dropout, grad_y}, tokens, C,
                             {grad_y_bias}, workspace, stream);
    });
  });
}

bool norm_input_grad_supported(int64_t C, cpu::DropoutSpec dropout) {
  return detail::warp_row_fits(C) && (dropout.p <= 0.0f || dropout.kept);
}

int64_t norm_input_grad_runs(int64_t tokens) { return norm_param_runs(tokens, kReductionBlocksPerSm).runs; }

void h_post_bda_backward(const bf16* grad_out, const bf16* x, const float* h_res, const float* h_post, const bf16* y,
                         const bf16* y_bias, int64_t tokens, int n, int64_t C, cpu::DropoutSpec dropout, bf16* grad_x,
                         float* grad_h_res, float* grad_h_post, bf16* grad_y, const AggregateGrad* aggregate,
                         cudaStream_t stream) {
  check(grad_x || aggregate, "h_post_bda_backward: a null grad_x needs the aggregate's gradient (AggregateGrad)");
  const bf16* grad_agg = aggregate ? aggregate->grad_agg : nullptr;
  const float* h_pre = aggregate ? aggregate->h_pre : nullptr;
  float* grad_h_pre = aggregate ? aggregate->grad_h_pre : nullptr;
  const NormInputGrad* norm = aggregate ? aggregate->norm : nullptr;
  check(!norm || (!grad_x && norm_input_grad_supported(C, dropout)),
        "h_post_bda_backward: the norm's input gradient is fused only into the reductions alone (no dx), without "
        "dropout or with its kept bits, for C a multiple of 8 up to " +
            std::to_string(detail::kWarpRowWidth) + " (got " + std::to_string(C) + ")");
  check(!norm || norm->param_partials, "h_post_bda_backward: NormInputGrad needs param_partials");
  check_kept(dropout, C, "h_post_bda_backward");
  dispatch_streams(n, [&](auto N) {
    auto launch = [&](auto kernel, int vec) {
      const TokenLaunch l = token_launch(tokens, C, vec);
      kernel<<<l.grid, l.threads, 0, stream>>>(grad_out, x, h_res, h_post, y, y_bias, tokens, C, l.lanes, dropout,
                                               grad_x, grad_h_res, grad_h_post, grad_y, grad_agg, h_pre, grad_h_pre,
                                               NormInputGrad{}, 0);
    };
    // With dx, 4 channels a step: 8 make the fused kernel need 225 registers (one block per
    // multiprocessor); the reductions alone take 8 but with the Philox stream (spills).
    dispatch_drop(dropout.p, dropout.kept != nullptr, [&](auto drop) {
      constexpr Drop DROP = decltype(drop)::value;
      if constexpr (DROP != Drop::kPhilox) {
        if (norm) {  // (C % 8 == 0): a block a run of tokens, the norm's parameter sums in shared memory
          const auto kernel = h_post_bda_backward_kernel<N.value, 8, true, false, DROP, true>;
          const int bytes = static_cast<int>(detail::norm_param_shared_bytes(C, 2));
          allow_shared_bytes(kernel, bytes);
          const NormParamRuns runs = norm_param_runs(tokens, kReductionBlocksPerSm);
          kernel<<<detail::blocks_for(runs.runs, 1), detail::kBlockThreads, bytes, stream>>>(
              grad_out, x, h_res, h_post, y, y_bias, tokens, C, 32, dropout, grad_x, grad_h_res, grad_h_post, grad_y,
              grad_agg, h_pre, grad_h_pre, *norm, runs.rows_per_run);
          return;
        }
      }
      if (!grad_x) {
        constexpr int kVec = DROP == Drop::kPhilox ? 4 : 8;
        if (C % kVec == 0)
          launch(h_post_bda_backward_kernel<N.value, kVec, true, false, DROP, false>, kVec);
        else
          launch(h_post_bda_backward_kernel<N.value, 1, true, false, DROP, false>, 1);
      } else if (C % 4 == 0) {
        if (aggregate)
          launch(h_post_bda_backward_kernel<N.value, 4, true, true, DROP, false>, 4);
        else
          launch(h_post_bda_backward_kernel<N.value, 4, false, true, DROP, false>, 4);
      } else {
        if (aggregate)
          launch(h_post_bda_backward_kernel<N.value, 1, true, true, DROP, false>, 1);
        else
          launch(h_post_bda_backward_kernel<N.value, 1, false, true, DROP, false>, 1);
      }
    });
  });
  MHC_CUDA_CHECK(cudaGetLastError());
}

}  // namespace mhc::cuda
