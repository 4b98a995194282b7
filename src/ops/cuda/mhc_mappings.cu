#include <algorithm>

#include "core/cuda/device.h"
#include "ops/cuda/gemm.h"
#include "ops/cuda/column_sums.cuh"
#include "ops/cuda/kernel_utils.cuh"
#include "ops/cuda/mhc_mappings.h"

namespace mhc::cuda {

namespace {

using detail::kBlockThreads;
using detail::kBlockWarps;

constexpr float kNormEps = 1e-6f, kSinkhornEps = 1e-6f;

template <int N> constexpr int width() { return N * N + 2 * N; }


// ---- Sinkhorn in registers, a lane a row ------------------------------------------------
//
// Per-token work runs on a group of G = row_lanes<N>() adjacent lanes of a warp (the power
// of two at or above N); lane i holds row i of the token's N x N matrices, lanes i >= N
// hold rows of zeros. Row sums are the lane's own, column sums a butterfly over the group
// (every lane gets the same bits), so a token's chain is N times shorter than one thread's
// and a warp serves 32 / G tokens.

template <int N> constexpr int row_lanes() { return N <= 1 ? 1 : N <= 2 ? 2 : N <= 4 ? 4 : 8; }

template <int G> __device__ inline float lanes_sum(float v) {
#pragma unroll
  for (int offset = G / 2; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// A lane's token and row. Lanes past the last token work on the last token (every lane
// must take part in the shuffles) and store nothing.
template <int N> struct RowLane {
  int64_t token;  // clamped to the last token
  int row;        // row_lanes<N>() lanes a token; rows >= N idle
  bool store;     // a real token and row
};
template <int N> __device__ inline RowLane<N> row_lane(int64_t tokens) {
  constexpr int G = row_lanes<N>();
  const int64_t id = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t t = id / G;
  const int row = static_cast<int>(id % G);
  return {t < tokens ? t : tokens - 1, row, t < tokens && row < N};
}

// The lane's row of exp(L - row max), zeros for an idle row.
template <int N> __device__ void exp_shifted(const float (&l)[N], bool active, float (&m)[N]) {
  float mx = l[0];
#pragma unroll
  for (int j = 1; j < N; ++j) mx = fmaxf(mx, l[j]);
#pragma unroll
  for (int j = 0; j < N; ++j) m[j] = active ? expf(l[j] - mx) : 0.0f;
}

// One half step: rows (step even) or columns (odd) divided by max(sum, eps). Returns the
// divisor of the lane's row (rows) or of column `row` (columns).
template <int N> __device__ float normalise(float (&m)[N], bool rows, int row) {
  constexpr int G = row_lanes<N>();
  if (rows) {
    float s = 0;
#pragma unroll
    for (int b = 0; b < N; ++b) s += m[b];
    s = fmaxf(s, kSinkhornEps);
    // One reciprocal a row, then products: within an ulp of dividing each entry (the CPU
    // reference divides). __frcp_rn is correctly rounded: the bits of 1.0f / s, without
    // the division routine's extra steps.
    const float inverse = __frcp_rn(s);
#pragma unroll
    for (int b = 0; b < N; ++b) m[b] *= inverse;
    return s;
  }
  float own = 0;
#pragma unroll
  for (int b = 0; b < N; ++b) {
    const float s = fmaxf(lanes_sum<G>(m[b]), kSinkhornEps);
    m[b] *= __frcp_rn(s);
    if (b == row) own = s;
  }
  return own;
}

template <int N> __device__ void sinkhorn_forward(const float (&l)[N], int row, int iterations, float (&m)[N]) {
  exp_shifted(l, row < N, m);
  for (int h = 0; h < 2 * iterations; ++h) normalise(m, h % 2 == 0, row);
}

// g holds the lane's row of dM on entry and of dL on exit. Forward is re-run once, keeping
// only each half step's divisor of the lane (kMaxIterations x 2 floats in local memory; a
// column step's other divisors come from their lanes by shuffle); walking back, the state
// before a half step is its output times those divisors (exact up to rounding, also where
// a sum was clamped to eps). Same zero-entry rule as the CPU reference.
constexpr int kMaxIterations = 64;
template <int N> __device__ void sinkhorn_backward(const float (&l)[N], int row, int iterations, float (&g)[N]) {
  constexpr int G = row_lanes<N>();
  const int group_base = static_cast<int>(threadIdx.x % 32) & ~(G - 1);
  float m0[N], y[N], sums[2 * kMaxIterations];
  exp_shifted(l, row < N, m0);
#pragma unroll
  for (int j = 0; j < N; ++j) y[j] = m0[j];
  for (int h = 0; h < 2 * iterations; ++h) sums[h] = normalise(y, h % 2 == 0, row);
  for (int half = 2 * iterations - 1; half >= 0; --half) {
    // y is the output of this half step: back-propagate through it, then undo it.
    if (half % 2 == 0) {
      const float s = sums[half];
      float dot = 0;
#pragma unroll
      for (int b = 0; b < N; ++b)
        if (y[b] != 0.0f) dot += g[b] * y[b];
      if (!(s > kSinkhornEps)) dot = 0;
      const float inverse = __frcp_rn(s);
#pragma unroll
      for (int b = 0; b < N; ++b) {
        g[b] = y[b] != 0.0f ? (g[b] - dot) * inverse : 0.0f;
        y[b] *= s;
      }
    } else {
      const float own = sums[half];
#pragma unroll
      for (int a = 0; a < N; ++a) {
        const float s = __shfl_sync(0xffffffffu, own, group_base + a);
        float dot = lanes_sum<G>(y[a] != 0.0f ? g[a] * y[a] : 0.0f);
        if (!(s > kSinkhornEps)) dot = 0;
        g[a] = y[a] != 0.0f ? (g[a] - dot) * __frcp_rn(s) : 0.0f;
        y[a] *= s;
      }
    }
  }
#pragma unroll
  for (int j = 0; j < N; ++j) g[j] *= m0[j];
}

// ---- the split of fp32 values into three bf16 parts -------------------------------------
//
// The products with W run on tensor cores in bf16 with fp32 sums. A fp32 value v is split
// as v = hi + mid + lo (three bf16, exact to about 2^-24 relative), so a product with a
// bf16 operand (x) keeps fp32 accuracy: it is three bf16 products summed.

// The 3m parts padded to a multiple of 8 (16-byte rows of bf16 for the tensor cores).
__host__ __device__ constexpr int64_t split_width(int64_t m) { return (3 * m + 7) / 8 * 8; }

__device__ inline void split3(float v, bf16* hi, bf16* mid, bf16* lo) {
  const bf16 h = __float2bfloat16(v);
  const float rest = v - __bfloat162float(h);
  const bf16 m = __float2bfloat16(rest);
  *hi = h;
  *mid = m;
  *lo = __float2bfloat16(rest - __bfloat162float(m));
}

// W [m, K] (fp32) -> [hi; mid; lo] rows [split_width(m), K] of bf16, the padding rows zero.
__global__ void split_weight_kernel(const float* weight, int64_t m, int64_t K, bf16* split) {
  const int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t rows = split_width(m);
  if (e >= rows * K) return;
  if (e >= 3 * m * K) {
    split[e] = __float2bfloat16(0.0f);
    return;
  }
  if (e >= m * K) return;  // the mid and lo rows are written by the hi row's thread
  split3(weight[e], &split[e], &split[m * K + e], &split[2 * m * K + e]);
}

void split_weight(const float* weight, int64_t m, int64_t K, bf16* split, cudaStream_t stream) {
  split_weight_kernel<<<detail::blocks_for(split_width(m) * K, kBlockThreads), kBlockThreads, 0, stream>>>(weight, m,
                                                                                                          K, split);
  MHC_CUDA_CHECK(cudaGetLastError());
}

// ---- forward ---------------------------------------------------------------------------

// ||x_t||^2 of each token row of K bf16 values, one block a token, fixed-order sums.
template <int VEC> __global__ void row_sumsq_kernel(const bf16* x, int64_t K, float* sumsq) {
  const bf16* row = x + static_cast<int64_t>(blockIdx.x) * K;
  float s[1] = {0};
  for (int64_t k = threadIdx.x * VEC; k < K; k += blockDim.x * VEC) {
    float v[VEC];
    detail::load_bf16<VEC>(row + k, v);
#pragma unroll
    for (int i = 0; i < VEC; ++i) s[0] += v[i] * v[i];
  }
  detail::group_sum<1>(s, static_cast<int>(blockDim.x));
  if (threadIdx.x == 0) sumsq[blockIdx.x] = s[0];
}

// Per token, a lane a row (see row_lanes): proj = hi + mid + lo parts of the product, r
// from ||x||^2, then the gates, Sinkhorn in registers, H_pre, H_post, H_res. Lane i owns
// the outputs of row i: proj entries i, N + i and the row 2N + iN.., H_pre[i], H_post[i],
// H_res[i][..].
template <int N>
__global__ void finish_kernel(const float* parts, int64_t parts_stride, const float* sumsq, int64_t K,
                              const float* alpha, const float* bias, int64_t tokens, int iterations, float* proj,
                              float* r, float* h_pre, float* h_post, float* h_res) {
  constexpr int M = width<N>();
  const RowLane<N> lane = row_lane<N>(tokens);
  const int64_t t = lane.token;
  const int i = lane.row < N ? lane.row : 0;
  const float* part = parts + t * parts_stride;
  auto projection = [&](int o) {
    const float p = part[o] + part[M + o] + part[2 * M + o];
    if (lane.store) proj[t * M + o] = p;
    return p;
  };
  const float rt = 1.0f / (sqrtf(sumsq[t]) / sqrtf(static_cast<float>(K)) + kNormEps);
  const float p_pre = projection(i), p_post = projection(N + i);
  float l[N], h[N];
#pragma unroll
  for (int j = 0; j < N; ++j) l[j] = rt * projection(2 * N + i * N + j) * alpha[2] + bias[2 * N + i * N + j];
  if (iterations > 0) {
    sinkhorn_forward(l, lane.row, iterations, h);
  } else {
#pragma unroll
    for (int j = 0; j < N; ++j) h[j] = l[j] + (i == j ? 1.0f : 0.0f);
  }
  if (!lane.store) return;
  if (lane.row == 0) r[t] = rt;
  h_pre[t * N + i] = 1.0f / (1.0f + expf(-(rt * p_pre * alpha[0] + bias[i])));
  h_post[t * N + i] = 2.0f / (1.0f + expf(-(rt * p_post * alpha[1] + bias[N + i])));
#pragma unroll
  for (int j = 0; j < N; ++j) h_res[t * N * N + i * N + j] = h[j];
}

// ---- dx on tensor cores -------------------------------------------------------------------
//
// dx[t][k] += sum_o dproj[t][o] W[o][k] + coef[t] x[t][k] as bf16 mma.sync (m16n8k16, fp32
// sums) with tokens as the rows: A = [dp_hi | dp_hi | dp_mid] (16 tokens x 3m), B = [W_hi;
// W_mid; W_hi] (3m x 8 columns), i.e. dp_hi W_hi + dp_hi W_mid + dp_mid W_hi, accurate to
// about 2^-16, far below dx's bf16 rounding. Each warp owns 8 J columns of K for its life
// (B in registers, loaded once) and walks its tokens 16 at a time; A comes from an array
// grad_h writes in fragment order (one 16-byte load per lane and k step). The columns are
// permuted inside the warp's block so that each lane's accumulators are 2 J adjacent
// columns of two tokens: the x and dx accesses are 16-byte vectors. A block's warps take
// adjacent columns and the same tokens, streamed through a ring of kDxStages stages in
// shared memory filled by cp.async (the next groups' loads in flight while one is
// computed); A's fragments are copied once per block, not once per warp (they were most of
// the L2 traffic).

template <int N> constexpr int dx_ksteps() { return (3 * width<N>() + 15) / 16; }
// n8 column tiles per warp: fewer for wide m, so that B (J x ksteps x 2 registers) fits.
template <int N> constexpr int dx_tiles() { return dx_ksteps<N>() <= 5 ? 8 : dx_ksteps<N>() <= 9 ? 4 : 2; }
#ifndef MHC_DX_STAGES
#define MHC_DX_STAGES 3
#endif
constexpr int kDxWarps = 4, kDxStages = MHC_DX_STAGES;
// One stage of a block's ring (see grad_x_kernel), bytes.
template <int N> constexpr int dx_stage_bytes() {
  return dx_ksteps<N>() * 32 * 16 + kDxWarps * (2 * (2 * 32 * 2 * dx_tiles<N>()) * 2 + 2 * 32 * 4);
}
template <int N> constexpr int dx_smem_bytes() { return kDxStages * dx_stage_bytes<N>(); }


// Position in the fragment-ordered A array of token t's value kk (of 16 ksteps).
__host__ __device__ inline int64_t dx_fragment_index(int64_t t, int kk, int ksteps) {
  const int64_t group = t / 16;
  const int r = static_cast<int>(t % 16), s = kk / 16, k = kk % 16;
  const int lane = (r % 8) * 4 + (k % 8) / 2, reg = (k / 8) * 2 + r / 8;
  return ((group * ksteps + s) * 32 + lane) * 8 + reg * 2 + k % 2;
}

template <int N, int VEC>
__global__ void __launch_bounds__(kDxWarps * 32) grad_x_kernel(const bf16* x, const bf16* weight_split,
                                                               const bf16* grad_proj_fragments, const float* coef,
                                                               int64_t tokens, int64_t K, int64_t tokens_per_block,
                                                               bf16* grad_x) {
  constexpr int M = width<N>(), KS = dx_ksteps<N>(), J = dx_tiles<N>(), COLS = 2 * J;
  static_assert(VEC == COLS || VEC == 1, "a lane's columns are one vector or scalars");
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, g = lane / 4, tig = lane % 4;
  // (A warp past K still takes part in the copies and barriers of its block.)
  const int64_t base = (static_cast<int64_t>(blockIdx.x) * kDxWarps + warp) * 8 * J;
  // Logical column (tile j, 2 q + e) of the warp's block is physical column base + 2 J q + 2 j + e.
  uint32_t b[J][KS][2];
  {
#pragma unroll
    for (int j = 0; j < J; ++j) {
      const int64_t col = base + 2 * J * (g / 2) + 2 * j + g % 2;  // this lane's B column: n = g
#pragma unroll
      for (int s = 0; s < KS; ++s)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          bf16 pair[2];
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            const int kk = s * 16 + h * 8 + 2 * tig + e;
            // B rows [W_hi; W_mid; W_hi]: parts 0, 1, 0 of the [hi; mid; lo] split.
            const int part = kk / M == 1 ? 1 : 0, o = kk % M;
            pair[e] = kk < 3 * M && col < K ? weight_split[(part * M + o) * K + col] : __float2bfloat16(0.0f);
          }
          b[j][s][h] = *reinterpret_cast<const uint32_t*>(pair);
        }
    }
  }
  const int64_t begin = static_cast<int64_t>(blockIdx.y) * tokens_per_block;
  const int64_t end = min(tokens, begin + tokens_per_block);
  const int64_t col0 = base + COLS * tig;  // this lane's first column
  const bool lane_in = col0 < K;
  // A stage of the block's ring: A's fragments [KS][32] (16 bytes a lane; shared by the
  // block's warps, which take the same tokens), then per warp this lane's x and dx
  // [2][32][COLS] of its tokens g and g + 8 and their coef [2][32].
  constexpr int kWarpPart = 2 * (2 * 32 * COLS * 2) + 2 * 32 * 4;
  constexpr int kX = KS * 32 * 16, kDx = kX + 2 * 32 * COLS * 2, kCoef = kDx + 2 * 32 * COLS * 2;
  static_assert(kCoef + 2 * 32 * 4 - kX == kWarpPart, "stage layout");
  extern __shared__ __align__(16) unsigned char dx_ring[];
  const int groups = static_cast<int>((end - begin + 15) / 16);
  // The next group to copy: its stage, its A fragments, and this lane's token g of it.
  int next_stage = 0;
  int64_t next_token = begin + g;
  const uint4* next_fragments = reinterpret_cast<const uint4*>(grad_proj_fragments) + (begin / 16) * KS * 32;
  auto issue_next = [&]() {
    unsigned char* st = dx_ring + next_stage * dx_stage_bytes<N>();
    for (int e = threadIdx.x; e < KS * 32; e += kDxWarps * 32) detail::copy_async<16>(st + e * 16, next_fragments + e, true);
    unsigned char* mine = st + warp * kWarpPart;
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int64_t t = next_token + 8 * h, at = t * K + col0;
      const bool valid = t < end;
      detail::copy_async<4>(mine + kCoef + (h * 32 + lane) * 4, valid ? coef + t : coef, valid);
      bf16* xs = reinterpret_cast<bf16*>(mine + kX) + (h * 32 + lane) * COLS;
      bf16* dxs = reinterpret_cast<bf16*>(mine + kDx) + (h * 32 + lane) * COLS;
      if constexpr (VEC == COLS) {
        const bool in = valid && lane_in;
        detail::copy_async<2 * COLS>(xs, in ? x + at : x, in);
        detail::copy_async<2 * COLS>(dxs, in ? grad_x + at : grad_x, in);
      } else {
#pragma unroll
        for (int v = 0; v < COLS; ++v) {
          const bool in = valid && col0 + v < K;
          xs[v] = in ? x[at + v] : __float2bfloat16(0.0f);
          dxs[v] = in ? grad_x[at + v] : __float2bfloat16(0.0f);
        }
      }
    }
    next_stage = next_stage + 1 == kDxStages ? 0 : next_stage + 1;
    next_token += 16;
    next_fragments += KS * 32;
  };
  for (int group = 0; group < kDxStages - 1; ++group) {
    if (group < groups) issue_next();
    detail::commit_async();
  }
  int stage = 0;
  int64_t token = begin + g;
  for (int group = 0; group < groups; ++group) {
    detail::wait_async<kDxStages - 2>();  // this thread's copies of the group have landed
    __syncthreads();              // everyone's have, and everyone is done with the previous group
    if (group + kDxStages - 1 < groups) issue_next();  // refills the previous group's stage
    detail::commit_async();
    const unsigned char* st = dx_ring + stage * dx_stage_bytes<N>();
    const unsigned char* mine = st + warp * kWarpPart;
    float c[J][4] = {};
#pragma unroll
    for (int s = 0; s < KS; ++s) {
      const uint4 a4 = *reinterpret_cast<const uint4*>(st + (s * 32 + lane) * 16);
      const uint32_t a[4] = {a4.x, a4.y, a4.z, a4.w};
#pragma unroll
      for (int j = 0; j < J; ++j) detail::mma_bf16(c[j], a, b[j][s][0], b[j][s][1]);
    }
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int64_t t = token + 8 * h, at = t * K + col0;
      if (t >= end || !lane_in) continue;
      float xv[COLS], gx[COLS];
      detail::load_bf16<COLS>(reinterpret_cast<const bf16*>(mine + kX) + (h * 32 + lane) * COLS, xv);
      detail::load_bf16<COLS>(reinterpret_cast<const bf16*>(mine + kDx) + (h * 32 + lane) * COLS, gx);
      const float ct = *reinterpret_cast<const float*>(mine + kCoef + (h * 32 + lane) * 4);
#pragma unroll
      for (int j = 0; j < J; ++j)
#pragma unroll
        for (int e = 0; e < 2; ++e) gx[2 * j + e] += c[j][2 * h + e] + ct * xv[2 * j + e];
      if constexpr (VEC == COLS) {
        detail::store_bf16<COLS>(grad_x + at, gx);
      } else {
#pragma unroll
        for (int v = 0; v < COLS; ++v)
          if (col0 + v < K) grad_x[at + v] = __float2bfloat16(gx[v]);
      }
    }
    stage = stage + 1 == kDxStages ? 0 : stage + 1;
    token += 16;
  }
}

// ---- backward --------------------------------------------------------------------------

// Per token, a lane a row (see row_lanes): the row [dh, alpha terms (dh r proj summed by
// gate)] of width M + 3 (summed over tokens into dbias and dalpha), dproj = dh r a (also
// split into bf16 parts for dW and in fragment order for dx), and the coefficient of x in
// dx from r: -dr r^2 / (sqrt(K) ||x||). Lane i owns entries i, N + i and 2N + iN.. of dh.
template <int N>
__global__ void grad_h_kernel(const float* proj, const float* r, const float* alpha, const float* bias,
                              const float* h_pre, const float* h_post, const float* grad_h_pre,
                              const float* grad_h_post, const float* grad_h_res, int64_t tokens, int64_t K,
                              int iterations, float* grad_h, bf16* grad_proj_split,
                              bf16* grad_proj_fragments, float* coef) {
  constexpr int M = width<N>(), G = row_lanes<N>(), KS = dx_ksteps<N>();
  const int64_t split_stride = split_width(M);
  const RowLane<N> lane = row_lane<N>(tokens);
  const int64_t t = lane.token;
  const bool active = lane.row < N;
  const int i = active ? lane.row : 0;
  const float rt = r[t];
  const float* p = proj + t * M;
  const float pre = h_pre[t * N + i], post = h_post[t * N + i];
  const float dh_pre = grad_h_pre[t * N + i] * pre * (1.0f - pre);
  const float dh_post = grad_h_post[t * N + i] * post * (1.0f - 0.5f * post);
  float g[N];
#pragma unroll
  for (int j = 0; j < N; ++j) g[j] = grad_h_res[t * N * N + i * N + j];
  if (iterations > 0) {
    float l[N];
#pragma unroll
    for (int j = 0; j < N; ++j) l[j] = rt * p[2 * N + i * N + j] * alpha[2] + bias[2 * N + i * N + j];
    sinkhorn_backward(l, lane.row, iterations, g);
  }
  // The lane's N + 2 entries of dh: k = i (gate 0), N + i (gate 1), 2N + iN + j (gate 2).
  float dr = 0, terms[3] = {0, 0, 0};
  bf16* split = grad_proj_split + t * split_stride;
  auto entry = [&](int k, int gate, float dh) {
    if (!active) return;
    dr += dh * p[k] * alpha[gate];
    terms[gate] += dh * rt * p[k];
    if (!lane.store) return;
    grad_h[t * (M + 3) + k] = dh;
    split3(dh * rt * alpha[gate], &split[k], &split[M + k], &split[2 * M + k]);
    // dx's A operand: [hi | hi | mid] (see grad_x_kernel)
    grad_proj_fragments[dx_fragment_index(t, k, KS)] = split[k];
    grad_proj_fragments[dx_fragment_index(t, M + k, KS)] = split[k];
    grad_proj_fragments[dx_fragment_index(t, 2 * M + k, KS)] = split[M + k];
  };
  entry(i, 0, dh_pre);
  entry(N + i, 1, dh_post);
#pragma unroll
  for (int j = 0; j < N; ++j) entry(2 * N + i * N + j, 2, g[j]);
  dr = lanes_sum<G>(dr);
#pragma unroll
  for (int k = 0; k < 3; ++k) terms[k] = lanes_sum<G>(terms[k]);
  if (!lane.store || lane.row != 0) return;
  for (int kk = 3 * M; kk < KS * 16; ++kk) grad_proj_fragments[dx_fragment_index(t, kk, KS)] = __float2bfloat16(0.0f);
  for (int64_t k = 3 * M; k < split_stride; ++k) split[k] = __float2bfloat16(0.0f);
#pragma unroll
  for (int k = 0; k < 3; ++k) grad_h[t * (M + 3) + M + k] = terms[k];
  const float sqrt_k = sqrtf(static_cast<float>(K));
  const float norm = sqrt_k * (1.0f / rt - kNormEps);
  coef[t] = norm > 0.0f ? -dr * rt * rt / (sqrt_k * norm) : 0.0f;
}

// out[c] += sum over rows of in[row * stride + c], rows in order.
__global__ void sum_rows_kernel(const float* in, int64_t rows, int64_t cols, int64_t stride, float* out) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= cols) return;
  float s = 0;
  for (int64_t row = 0; row < rows; ++row) s += in[row * stride + c];
  out[c] += s;
}

// Columns [offset, offset + cols) of grad_h's rows [dh, alpha terms], for column_sums.
struct GradHColumns {
  const float* grad_h;
  int64_t row_width, offset;
  template <int COLS> __device__ void operator()(int64_t r, int64_t c, float (&out)[1][COLS]) const {
#pragma unroll
    for (int k = 0; k < COLS; ++k) out[0][k] = grad_h[r * row_width + offset + c + k];
  }
};

// Workspace offsets in floats, each a multiple of 4 (16-byte aligned for cuBLASLt).
inline size_t aligned(size_t floats) { return (floats + 3) / 4 * 4; }

struct ForwardLayout {
  int64_t M, K, split_stride;
  size_t parts, split_weight, sumsq, total;
};

ForwardLayout forward_layout_of(const MappingsArgs& a) {
  ForwardLayout l{};
  l.M = static_cast<int64_t>(a.n) * a.n + 2 * a.n;
  l.K = a.n * a.C;
  l.split_stride = split_width(l.M);
  l.parts = 0;
  l.split_weight = aligned(l.parts + a.tokens * l.split_stride);
  l.sumsq = aligned(l.split_weight + (l.split_stride * l.K + 1) / 2);
  l.total = l.sumsq + a.tokens;
  return l;
}

struct Layout {
  int64_t M, K, split_stride;
  size_t grad_h, coef, chunk_sums, grad_proj_split, grad_proj_fragments, weight_split, weight_parts, total;
};

Layout layout_of(const MappingsArgs& a) {
  Layout l{};
  l.M = static_cast<int64_t>(a.n) * a.n + 2 * a.n;
  l.K = a.n * a.C;
  l.split_stride = split_width(l.M);
  l.grad_h = 0;
  l.coef = l.grad_h + a.tokens * (l.M + 3);
  l.chunk_sums = l.coef + a.tokens;
  // column sums of grad_h's first M columns, then of its last 3
  const size_t chunk_floats = std::max(detail::column_sums_workspace_floats(1, a.tokens, l.M),
                                       detail::column_sums_workspace_floats(1, a.tokens, 3));
  l.grad_proj_split = aligned(l.chunk_sums + chunk_floats);
  l.grad_proj_fragments = aligned(l.grad_proj_split + (a.tokens * l.split_stride + 1) / 2);
  const int64_t fragment_values = ((a.tokens + 15) / 16 * 16) * ((3 * l.M + 15) / 16 * 16);
  l.weight_split = aligned(l.grad_proj_fragments + (fragment_values + 1) / 2);
  l.weight_parts = aligned(l.weight_split + (l.split_stride * l.K + 1) / 2);
  l.total = l.weight_parts + l.split_stride * l.K;
  return l;
}

void check_args(const MappingsArgs& a) {
  check(a.tokens >= 1 && a.C >= 1, "mhc mappings: empty input");
  check(a.sinkhorn_iterations >= 0 && a.sinkhorn_iterations <= kMaxIterations,
        "mhc_sinkhorn_iterations: the CUDA kernels take 0 (HC) to " + std::to_string(kMaxIterations) + ", got " +
            std::to_string(a.sinkhorn_iterations));
}

}  // namespace

size_t mappings_forward_workspace_floats(const MappingsArgs& a) {
  check_args(a);
  return forward_layout_of(a).total;
}

void row_sumsq(const bf16* x, int64_t tokens, int64_t K, float* sumsq, cudaStream_t stream) {
  const unsigned blocks = detail::blocks_for(tokens, 1);
  if (K % 8 == 0) row_sumsq_kernel<8><<<blocks, kBlockThreads, 0, stream>>>(x, K, sumsq);
  else row_sumsq_kernel<1><<<blocks, kBlockThreads, 0, stream>>>(x, K, sumsq);
  MHC_CUDA_CHECK(cudaGetLastError());
}

void mhc_mappings_forward(const MappingsArgs& a, const bf16* x, const float* x_sumsq, const float* weight,
                          const float* alpha, const float* bias, float* proj, float* r, float* h_pre, float* h_post,
                          float* h_res, float* workspace, cudaStream_t stream) {
  check_args(a);
  const ForwardLayout l = forward_layout_of(a);
  float* parts = workspace + l.parts;
  bf16* split = reinterpret_cast<bf16*>(workspace + l.split_weight);
  split_weight(weight, l.M, l.K, split, stream);
  // parts [tokens, split_stride] = x [tokens, K] times the split W^T; column-major: the
  // [split_stride, tokens] product of split (K x split_stride, transposed) and x (K x tokens).
  Gemm g;
  g.trans_a = true;
  g.m = l.split_stride, g.n = a.tokens, g.k = l.K;
  g.a = split, g.lda = l.K;
  g.b = x, g.ldb = l.K;
  g.d = parts, g.ldd = l.split_stride;
  gemm(g, stream);
  if (!x_sumsq) {
    row_sumsq(x, a.tokens, l.K, workspace + l.sumsq, stream);
    x_sumsq = workspace + l.sumsq;
  }
  detail::dispatch_streams(a.n, [&](auto Ns) {
    constexpr int N = decltype(Ns)::value;
    finish_kernel<N><<<detail::blocks_for(a.tokens * row_lanes<N>(), 128), 128, 0, stream>>>(
        parts, l.split_stride, x_sumsq, l.K, alpha, bias, a.tokens, a.sinkhorn_iterations, proj, r, h_pre, h_post,
        h_res);
  });
  MHC_CUDA_CHECK(cudaGetLastError());
}

size_t mappings_backward_workspace_floats(const MappingsArgs& a) { return layout_of(a).total; }

void mhc_mappings_backward(const MappingsArgs& a, const bf16* x, const float* weight, const float* alpha,
                           const float* bias, const float* proj, const float* r, const float* h_pre,
                           const float* h_post, const float* grad_h_pre, const float* grad_h_post,
                           const float* grad_h_res, bf16* grad_x, float* grad_weight, float* grad_alpha,
                           float* grad_bias, float* workspace, cudaStream_t stream) {
  check_args(a);
  const Layout l = layout_of(a);
  float* grad_h = workspace + l.grad_h;
  float* coef = workspace + l.coef;
  float* chunk_sums = workspace + l.chunk_sums;
  bf16* grad_proj_split = reinterpret_cast<bf16*>(workspace + l.grad_proj_split);
  bf16* grad_proj_fragments = reinterpret_cast<bf16*>(workspace + l.grad_proj_fragments);
  bf16* weight_split = reinterpret_cast<bf16*>(workspace + l.weight_split);
  float* weight_parts = workspace + l.weight_parts;
  detail::dispatch_streams(a.n, [&](auto Ns) {
    constexpr int N = decltype(Ns)::value;
    grad_h_kernel<N><<<detail::blocks_for(a.tokens * row_lanes<N>(), 128), 128, 0, stream>>>(
        proj, r, alpha, bias, h_pre, h_post, grad_h_pre, grad_h_post, grad_h_res, a.tokens, l.K,
        a.sinkhorn_iterations, grad_h, grad_proj_split, grad_proj_fragments, coef);
    MHC_CUDA_CHECK(cudaGetLastError());
    split_weight(weight, l.M, l.K, weight_split, stream);
    // Column blocks of kDxWarps warps; token runs (multiples of 16) for about 2000 blocks.
    const int64_t columns_per_block = kDxWarps * 8 * dx_tiles<N>();
    const int64_t column_blocks = (l.K + columns_per_block - 1) / columns_per_block;
    const int64_t runs = std::clamp<int64_t>(2048 / column_blocks, 1, (a.tokens + 15) / 16);
    const int64_t tokens_per_block = ((a.tokens + runs - 1) / runs + 15) / 16 * 16;
    const dim3 grid(detail::blocks_for(l.K, columns_per_block), detail::blocks_for(a.tokens, tokens_per_block));
    auto launch = [&](auto kernel) {
      MHC_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, dx_smem_bytes<N>()));
      kernel<<<grid, kDxWarps * 32, dx_smem_bytes<N>(), stream>>>(x, weight_split, grad_proj_fragments, coef, a.tokens,
                                                                  l.K, tokens_per_block, grad_x);
    };
    if (l.K % (2 * dx_tiles<N>()) == 0) launch(grad_x_kernel<N, 2 * dx_tiles<N>()>);
    else launch(grad_x_kernel<N, 1>);
    MHC_CUDA_CHECK(cudaGetLastError());
  });
  // weight_parts [split_stride, K] = split dproj^T x, reduced over tokens on tensor cores;
  // column-major: the [K, split_stride] product of x (K x tokens) and the split dproj
  // (split_stride x tokens, transposed). Then dW += hi + mid + lo parts.
  Gemm g;
  g.trans_b = true;
  g.m = l.K, g.n = l.split_stride, g.k = a.tokens;
  g.a = x, g.lda = l.K;
  g.b = grad_proj_split, g.ldb = l.split_stride;
  g.d = weight_parts, g.ldd = l.K;
  gemm(g, stream);
  sum_rows_kernel<<<detail::blocks_for(l.M * l.K, kBlockThreads), kBlockThreads, 0, stream>>>(
      weight_parts, 3, l.M * l.K, l.M * l.K, grad_weight);
  const int64_t row = l.M + 3;  // [dh, alpha terms]
  // dbias and dalpha: grad_h's columns summed over tokens in a fixed order
  detail::column_sums<1>(GradHColumns{grad_h, row, 0}, a.tokens, l.M, {grad_bias}, chunk_sums, stream);
  detail::column_sums<1>(GradHColumns{grad_h, row, l.M}, a.tokens, 3, {grad_alpha}, chunk_sums, stream);
  MHC_CUDA_CHECK(cudaGetLastError());
}

}  // namespace mhc::cuda
