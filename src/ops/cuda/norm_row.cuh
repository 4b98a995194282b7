// A pre-norm's row on one warp (ops/cuda/norm.h has the math), shared by the norm kernels
// and the kernels that make a row and normalise it in the same pass (the same arithmetic
// in the same order: the same bits).
#pragma once
#include <cuda_bf16.h>

#include <cstdint>

#include "ops/cuda/kernel_utils.cuh"

namespace mhc::cuda::detail {

// Each lane takes VEC adjacent columns a step (16-byte accesses when VEC = 8); f(c, step),
// the steps unrolled when a row has at most STEPS of them (the register cache below).
template <int VEC, int STEPS, typename F> __device__ void for_row(int64_t C, int lane, F f) {
  if constexpr (STEPS > 0) {
#pragma unroll
    for (int step = 0; step < STEPS; ++step) {
      const int64_t c = (static_cast<int64_t>(lane) + 32 * step) * VEC;
      if (c < C) f(c, step);
    }
  } else {
    for (int64_t c = static_cast<int64_t>(lane) * VEC; c < C; c += 32 * VEC) f(c, 0);
  }
}

template <int VEC> __device__ inline void load_f32(const float* p, float (&out)[VEC]) {
  if constexpr (VEC % 4 == 0) {
#pragma unroll
    for (int k = 0; k < VEC; k += 4) *reinterpret_cast<float4*>(out + k) = *reinterpret_cast<const float4*>(p + k);
  } else {
#pragma unroll
    for (int k = 0; k < VEC; ++k) out[k] = p[k];
  }
}

// A lane's part of a bf16 row: with STEPS > 0 (rows of at most 32 VEC STEPS values) read
// from memory once and then kept in registers; with 0 read from memory at every use.
template <int VEC, int STEPS> struct RowCache {
  const __nv_bfloat16* row;
  float v[STEPS > 0 ? STEPS : 1][VEC];
  __device__ void get(int64_t c, int step, bool first_use, float (&out)[VEC]) {
    if constexpr (STEPS > 0) {
      if (first_use) load_bf16<VEC>(row + c, v[step]);
#pragma unroll
      for (int k = 0; k < VEC; ++k) out[k] = v[step][k];
    } else {
      load_bf16<VEC>(row + c, out);
    }
  }
};
// Register-held rows up to 4 steps of a warp (C up to 1024 with 16-byte accesses).
constexpr int kCachedSteps = 4;
constexpr int64_t kWarpRowWidth = 32 * 8 * kCachedSteps;
// Rows that a warp holds in registers with 16-byte accesses: where kernels that make a row
// can normalise it (or take its norm's gradient) in the same pass.
inline bool warp_row_fits(int64_t C) { return C % 8 == 0 && C <= kWarpRowWidth; }

// A row that is the aggregate sum_j gate[j] x_j of one token's N streams xt
// (aggregate_values: every kernel's bits), as stored in bf16. With STEPS > 0 it is made on
// first use, kept in registers and, where agg is not null, stored there; with 0 it is made
// again at every use (from x, which the kernels using it read anyway) and never stored.
template <int N, int VEC, int STEPS>
struct AggregateRow {
  const __nv_bfloat16* xt;
  const float* gate;
  int64_t C;
  __nv_bfloat16* agg;
  float v[STEPS > 0 ? STEPS : 1][VEC];
  __device__ void get(int64_t c, int step, bool first_use, float (&out)[VEC]) {
    if (STEPS > 0 && !first_use) {
#pragma unroll
      for (int k = 0; k < VEC; ++k) out[k] = v[step][k];
      return;
    }
    float acc[VEC];
    aggregate_values<N, VEC>(xt, gate, C, c, acc);
    if (STEPS > 0 && agg) store_bf16<VEC>(agg + c, acc);
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      out[k] = __bfloat162float(__float2bfloat16(acc[k]));
      if constexpr (STEPS > 0) v[step][k] = out[k];
    }
  }
};

// out = (x - mean) rstd w + b (LayerNorm; RMSNorm: mean 0, no b) of the row that `row`
// gives (get(c, step, first_use, values)); *mean (when not null) and *rstd from lane 0.
template <int VEC, int STEPS, class Row>
__device__ void norm_row_forward(Row& row, const float* __restrict__ weight, const float* __restrict__ bias, int64_t C,
                                 float eps, bool rms, int lane, __nv_bfloat16* __restrict__ out, float* mean,
                                 float* rstd) {
  const float inv_c = 1.0f / static_cast<float>(C);
  float sum = 0;
  for_row<VEC, STEPS>(C, lane, [&](int64_t c, int step) {
    float v[VEC];
    row.get(c, step, true, v);
#pragma unroll
    for (int k = 0; k < VEC; ++k) sum += v[k];
  });
  const float m = rms ? 0.0f : warp_sum(sum) * inv_c;
  float var = 0;
  for_row<VEC, STEPS>(C, lane, [&](int64_t c, int step) {
    float v[VEC];
    row.get(c, step, false, v);
#pragma unroll
    for (int k = 0; k < VEC; ++k) var += (v[k] - m) * (v[k] - m);
  });
  const float s = rsqrtf(warp_sum(var) * inv_c + eps);
  for_row<VEC, STEPS>(C, lane, [&](int64_t c, int step) {
    float v[VEC], w[VEC], b[VEC] = {};
    row.get(c, step, false, v);
    load_f32<VEC>(weight + c, w);
    if (bias) load_f32<VEC>(bias + c, b);
#pragma unroll
    for (int k = 0; k < VEC; ++k) v[k] = (v[k] - m) * s * w[k] + b[k];
    store_bf16<VEC>(out + c, v);
  });
  if (lane == 0) {
    if (mean) *mean = m;
    *rstd = s;
  }
}

// The backward's row means of one row (g: the output's gradient, x: the input):
// mean(g w) (0 for RMSNorm) and mean(g w xhat).
template <int VEC, int STEPS, class GradRow, class InputRow>
__device__ void norm_row_grad_means(GradRow& g, InputRow& x, const float* __restrict__ weight, int64_t C, float m,
                                    float s, bool rms, int lane, float& mean_gw, float& mean_gw_xhat) {
  const float inv_c = 1.0f / static_cast<float>(C);
  float sum_gw = 0, sum_gw_xhat = 0;
  for_row<VEC, STEPS>(C, lane, [&](int64_t c, int step) {
    float gv[VEC], xv[VEC], w[VEC];
    g.get(c, step, true, gv);
    x.get(c, step, true, xv);
    load_f32<VEC>(weight + c, w);
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      const float gw = gv[k] * w[k];
      sum_gw += gw;
      sum_gw_xhat += gw * (xv[k] - m) * s;
    }
  });
  mean_gw = rms ? 0.0f : warp_sum(sum_gw) * inv_c;
  mean_gw_xhat = warp_sum(sum_gw_xhat) * inv_c;
}

// The input gradient of VEC columns, added to dx: rstd (g w - mean(g w) - xhat mean(g w xhat)).
template <int VEC>
__device__ inline void add_norm_input_grad(const float (&gv)[VEC], const float (&xv)[VEC], const float (&w)[VEC],
                                           float m, float s, float mean_gw, float mean_gw_xhat, float (&dx)[VEC]) {
#pragma unroll
  for (int k = 0; k < VEC; ++k) dx[k] += s * (gv[k] * w[k] - mean_gw - (xv[k] - m) * s * mean_gw_xhat);
}

// Column sums in a row pass (norm.h, NormParamRuns): the weight and bias gradients (g xhat
// and g) and, in a plain residual's norm backward, the column sums of the dx it adds to
// (V = 3). A block of kNormParamWarps warps takes a run of rows, warp w the rows w,
// w + warps, ... of it; each warp adds its rows' values into its own [V][span] floats of
// shared memory (in row order), then the block adds its warps' sums in order into its
// partial [V][C]. Rows of 8 columns a lane step (warp_row_fits); a warp's sums lie
// interleaved by lane, a lane's 8 columns of a step as two float4s with the warp's 32
// lanes adjacent, so that the accesses are 16 bytes and free of bank conflicts
// (lane-contiguous columns were 8-way conflicts: the norm's backward 40 -> 83 us a call).
constexpr int kNormParamWarps = 8;
__host__ __device__ inline int64_t norm_param_span(int64_t C) { return (C + 255) / 256 * 256; }
inline size_t norm_param_shared_bytes(int64_t C, int V) {
  return static_cast<size_t>(kNormParamWarps) * V * norm_param_span(C) * sizeof(float);
}
// Where column c's sum lies in a warp's span.
__device__ inline int64_t norm_param_slot(int64_t c) {
  const int64_t step = c / 256, lane = c / 8 % 32, k = c % 8;
  return ((step * 2 + k / 4) * 32 + lane) * 4 + k % 4;
}

// The calling warp's V sums in the block's shared memory.
template <int V>
__device__ inline float* norm_param_row(float* shared, int64_t C) {
  return shared + threadIdx.x / 32 * V * norm_param_span(C);
}
// Zeroes the calling warp's V sums (no block barrier: only the warp uses them until the end).
template <int V>
__device__ inline void zero_norm_param_row(float* row, int64_t C, int lane) {
  for (int64_t k = lane; k < V * norm_param_span(C); k += 32) row[k] = 0.0f;
  __syncwarp();
}
// Adds the 8 values of the columns from c to sum v of the warp's sums.
__device__ inline void add_norm_column_values(float* row, int64_t C, int v, int64_t c, const float (&values)[8]) {
  float* const at = row + v * norm_param_span(C) + norm_param_slot(c);
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    float4* const sum = reinterpret_cast<float4*>(at + half * 128);
    float4 t = *sum;
    const float* in = values + 4 * half;
    t.x += in[0], t.y += in[1], t.z += in[2], t.w += in[3];
    *sum = t;
  }
}
// Adds (g xhat, g) of the 8 columns from c to sums 0 and 1.
__device__ inline void add_norm_param_grads(float* row, int64_t C, int64_t c, const float (&g)[8], const float (&x)[8],
                                            float m, float s) {
  float g_xhat[8];
#pragma unroll
  for (int k = 0; k < 8; ++k) g_xhat[k] = g[k] * (x[k] - m) * s;
  add_norm_column_values(row, C, 0, c, g_xhat);
  add_norm_column_values(row, C, 1, c, g);
}
// The block's partial [V][C]: its warps' sums added in order (every thread of the block
// calls it).
template <int V>
__device__ inline void write_norm_param_partial(const float* rows, int64_t C, float* partial) {
  __syncthreads();
  const int64_t span = norm_param_span(C);
  for (int64_t k = threadIdx.x; k < V * C; k += blockDim.x) {
    const int64_t at = k / C * span + norm_param_slot(k % C);
    float sum = 0;
    for (int w = 0; w < kNormParamWarps; ++w) sum += rows[w * V * span + at];
    partial[k] = sum;
  }
}

// The block's run of rows (blockIdx.x's rows_per_run of `rows`), warp w taking the rows w,
// w + warps, ...: row(r, sums) for each, sums the warp's V sums in `shared` (unused where V
// is 0), then the block's partial written to partials[blockIdx.x].
template <int V, typename Row>
__device__ inline void for_norm_param_run(float* shared, int64_t C, int64_t rows, int64_t rows_per_run, float* partials,
                                          Row&& row) {
  float* const sums = norm_param_row<V>(shared, C);
  if constexpr (V > 0) zero_norm_param_row<V>(sums, C, static_cast<int>(threadIdx.x % 32));
  const int64_t first = static_cast<int64_t>(blockIdx.x) * rows_per_run, end = min(rows, first + rows_per_run);
  for (int64_t r = first + threadIdx.x / 32; r < end; r += blockDim.x / 32) row(r, sums);
  if constexpr (V > 0) write_norm_param_partial<V>(shared, C, partials + static_cast<int64_t>(blockIdx.x) * V * C);
}

}  // namespace mhc::cuda::detail
