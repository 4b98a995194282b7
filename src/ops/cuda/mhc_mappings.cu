#include <algorithm>

#include "core/cuda/device.h"
#include "ops/cuda/gemm.h"
#include "ops/cuda/kernel_utils.cuh"
#include "ops/cuda/mhc_mappings.h"

namespace mhc::cuda {

namespace {

using detail::kBlockThreads;
using detail::kBlockWarps;

constexpr float kNormEps = 1e-6f, kSinkhornEps = 1e-6f;

template <int N> constexpr int width() { return N * N + 2 * N; }
// Tokens per warp in the dx kernel: at most 4, and about 96 fp32 accumulators.
template <int N> constexpr int tokens_per_warp() { return width<N>() >= 48 ? 96 / width<N>() > 1 ? 2 : 1 : 4; }


// ---- Sinkhorn in registers -------------------------------------------------------------

template <int N> __device__ void exp_shifted(const float (&L)[N][N], float (&M)[N][N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) {
    float mx = L[i][0];
#pragma unroll
    for (int j = 1; j < N; ++j) mx = fmaxf(mx, L[i][j]);
#pragma unroll
    for (int j = 0; j < N; ++j) M[i][j] = expf(L[i][j] - mx);
  }
}

// One half step: rows (step even) or columns (odd) divided by max(sum, eps).
template <int N> __device__ void normalise(float (&M)[N][N], bool rows, float (&sums)[N]) {
#pragma unroll
  for (int a = 0; a < N; ++a) {
    float s = 0;
#pragma unroll
    for (int b = 0; b < N; ++b) s += rows ? M[a][b] : M[b][a];
    s = fmaxf(s, kSinkhornEps);
    sums[a] = s;
    // One division a row, then products: within an ulp of dividing each entry (the CPU
    // reference divides), and the per-token chains here are latency-bound.
    const float inverse = 1.0f / s;
#pragma unroll
    for (int b = 0; b < N; ++b) {
      if (rows) M[a][b] *= inverse;
      else M[b][a] *= inverse;
    }
  }
}

template <int N> __device__ void sinkhorn_forward(const float (&L)[N][N], int iterations, float (&M)[N][N]) {
  exp_shifted(L, M);
  float sums[N];
  for (int h = 0; h < 2 * iterations; ++h) normalise(M, h % 2 == 0, sums);
}

// G holds dM on entry and dL on exit. Forward is re-run once, keeping only each half
// step's divisors (kMaxIterations x 2 x N floats in local memory); walking back, the
// state before a half step is its output times those divisors (exact up to rounding,
// also where a sum was clamped to eps). Same zero-entry rule as the CPU reference.
constexpr int kMaxIterations = 64;
template <int N> __device__ void sinkhorn_backward(const float (&L)[N][N], int iterations, float (&G)[N][N]) {
  float M0[N][N], Y[N][N], sums[2 * kMaxIterations][N];
  exp_shifted(L, M0);
#pragma unroll
  for (int i = 0; i < N; ++i)
#pragma unroll
    for (int j = 0; j < N; ++j) Y[i][j] = M0[i][j];
  for (int h = 0; h < 2 * iterations; ++h) normalise(Y, h % 2 == 0, sums[h]);
  for (int half = 2 * iterations - 1; half >= 0; --half) {
    const bool rows = half % 2 == 0;
    // Y is the output of this half step: back-propagate through it, then undo it.
#pragma unroll
    for (int a = 0; a < N; ++a) {
      const float s = sums[half][a];
      float dot = 0;
#pragma unroll
      for (int b = 0; b < N; ++b) {
        const float y = rows ? Y[a][b] : Y[b][a], g = rows ? G[a][b] : G[b][a];
        if (y != 0.0f) dot += g * y;
      }
      if (!(s > kSinkhornEps)) dot = 0;
      const float inverse = 1.0f / s;
#pragma unroll
      for (int b = 0; b < N; ++b) {
        if (rows) {
          G[a][b] = Y[a][b] != 0.0f ? (G[a][b] - dot) * inverse : 0.0f;
          Y[a][b] *= s;
        } else {
          G[b][a] = Y[b][a] != 0.0f ? (G[b][a] - dot) * inverse : 0.0f;
          Y[b][a] *= s;
        }
      }
    }
  }
#pragma unroll
  for (int i = 0; i < N; ++i)
#pragma unroll
    for (int j = 0; j < N; ++j) G[i][j] *= M0[i][j];
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
  __shared__ float total[1];
  detail::block_sum<1>(s, total);
  if (threadIdx.x == 0) sumsq[blockIdx.x] = total[0];
}

// Per token: proj = hi + mid + lo parts of the product, r from ||x||^2, then the gates,
// Sinkhorn in registers, H_pre, H_post, H_res.
template <int N>
__global__ void finish_kernel(const float* parts, int64_t parts_stride, const float* sumsq, int64_t K,
                              const float* alpha, const float* bias, int64_t tokens, int iterations, float* proj,
                              float* r, float* h_pre, float* h_post, float* h_res) {
  constexpr int M = width<N>();
  const int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (t >= tokens) return;
  const float* part = parts + t * parts_stride;
  const float ss = sumsq[t];
  float p[M];
#pragma unroll
  for (int o = 0; o < M; ++o) p[o] = part[o] + part[M + o] + part[2 * M + o];
#pragma unroll
  for (int o = 0; o < M; ++o) proj[t * M + o] = p[o];
  const float rt = 1.0f / (sqrtf(ss) / sqrtf(static_cast<float>(K)) + kNormEps);
  r[t] = rt;
#pragma unroll
  for (int i = 0; i < N; ++i) {
    h_pre[t * N + i] = 1.0f / (1.0f + expf(-(rt * p[i] * alpha[0] + bias[i])));
    h_post[t * N + i] = 2.0f / (1.0f + expf(-(rt * p[N + i] * alpha[1] + bias[N + i])));
  }
  float L[N][N], H[N][N];
#pragma unroll
  for (int i = 0; i < N; ++i)
#pragma unroll
    for (int j = 0; j < N; ++j) L[i][j] = rt * p[2 * N + i * N + j] * alpha[2] + bias[2 * N + i * N + j];
  if (iterations > 0) {
    sinkhorn_forward(L, iterations, H);
  } else {
#pragma unroll
    for (int i = 0; i < N; ++i)
#pragma unroll
      for (int j = 0; j < N; ++j) H[i][j] = L[i][j] + (i == j ? 1.0f : 0.0f);
  }
#pragma unroll
  for (int i = 0; i < N; ++i)
#pragma unroll
    for (int j = 0; j < N; ++j) h_res[t * N * N + i * N + j] = H[i][j];
}

// ---- backward --------------------------------------------------------------------------

// Per token: the row [dh, alpha terms (dh r proj summed by gate)] of width M + 3 (summed
// over tokens into dbias and dalpha), dproj = dh r a (also split into bf16 parts for dW),
// and the coefficient of x in dx from r: -dr r^2 / (sqrt(K) ||x||).
template <int N>
__global__ void grad_h_kernel(const float* proj, const float* r, const float* alpha, const float* bias,
                              const float* h_pre, const float* h_post, const float* grad_h_pre,
                              const float* grad_h_post, const float* grad_h_res, int64_t tokens, int64_t K,
                              int iterations, float* grad_h, float* grad_proj, bf16* grad_proj_split,
                              float* coef) {
  constexpr int M = width<N>();
  const int64_t split_stride = split_width(M);
  const int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (t >= tokens) return;
  const float rt = r[t];
  const float* p = proj + t * M;
  float dh[M];
#pragma unroll
  for (int i = 0; i < N; ++i) {
    const float pre = h_pre[t * N + i], post = h_post[t * N + i];
    dh[i] = grad_h_pre[t * N + i] * pre * (1.0f - pre);
    dh[N + i] = grad_h_post[t * N + i] * post * (1.0f - 0.5f * post);
  }
  float G[N][N];
#pragma unroll
  for (int i = 0; i < N; ++i)
#pragma unroll
    for (int j = 0; j < N; ++j) G[i][j] = grad_h_res[t * N * N + i * N + j];
  if (iterations > 0) {
    float L[N][N];
#pragma unroll
    for (int i = 0; i < N; ++i)
#pragma unroll
      for (int j = 0; j < N; ++j) L[i][j] = rt * p[2 * N + i * N + j] * alpha[2] + bias[2 * N + i * N + j];
    sinkhorn_backward(L, iterations, G);
  }
#pragma unroll
  for (int i = 0; i < N; ++i)
#pragma unroll
    for (int j = 0; j < N; ++j) dh[2 * N + i * N + j] = G[i][j];
  float dr = 0, terms[3] = {0, 0, 0};
#pragma unroll
  for (int k = 0; k < M; ++k) {
    const int g = k < N ? 0 : (k < 2 * N ? 1 : 2);
    dr += dh[k] * p[k] * alpha[g];
    terms[g] += dh[k] * rt * p[k];
    grad_h[t * (M + 3) + k] = dh[k];
    const float dp = dh[k] * rt * alpha[g];
    grad_proj[t * M + k] = dp;
    bf16* split = grad_proj_split + t * split_stride;
    split3(dp, &split[k], &split[M + k], &split[2 * M + k]);
  }
  for (int64_t k = 3 * M; k < split_stride; ++k) grad_proj_split[t * split_stride + k] = __float2bfloat16(0.0f);
#pragma unroll
  for (int g = 0; g < 3; ++g) grad_h[t * (M + 3) + M + g] = terms[g];
  const float sqrt_k = sqrtf(static_cast<float>(K));
  const float norm = sqrt_k * (1.0f / rt - kNormEps);
  coef[t] = norm > 0.0f ? -dr * rt * rt / (sqrt_k * norm) : 0.0f;
}

// dx cuts K into slices of kSlice columns: a block holds its slice of W in shared memory
// for its whole life and walks a run of tokens, each warp TT tokens at a time, each lane 8
// (or, when K % 8 != 0, 1) adjacent columns per step. W is read from L2 once per block
// instead of once per token group.
constexpr int kSlice = 512, kSliceThreads = 128, kSliceWarps = kSliceThreads / 32;

template <int N> constexpr size_t slice_bytes() { return sizeof(float) * width<N>() * kSlice; }

struct SliceGrid {
  int64_t slices, tokens_per_block, token_blocks;
};

// A pure function of the shape: about 1000 blocks, whole token groups per block.
inline SliceGrid slice_grid(int64_t tokens, int64_t K, int64_t slice_width, int64_t group) {
  SliceGrid g{};
  g.slices = (K + slice_width - 1) / slice_width;
  g.tokens_per_block = std::clamp<int64_t>(tokens * g.slices / 1024 / group * group, group, 64 * group);
  g.token_blocks = (tokens + g.tokens_per_block - 1) / g.tokens_per_block;
  return g;
}

template <int M> __device__ void load_slice(const float* weight, int64_t K, int64_t k0, float* tile) {
  for (int e = threadIdx.x; e < M * kSlice; e += blockDim.x) {
    const int o = e / kSlice, kk = e % kSlice;
    tile[e] = k0 + kk < K ? weight[o * K + k0 + kk] : 0.0f;
  }
}

// The block's slice of K (loaded into `tile`) and its run of tokens [begin, end).
struct SliceBlock {
  int64_t k0, begin, end;
};
template <int M>
__device__ SliceBlock enter_slice(const float* weight, int64_t K, int64_t tokens, int64_t tokens_per_block,
                                  float* tile) {
  SliceBlock b;
  b.k0 = static_cast<int64_t>(blockIdx.x) * kSlice;
  load_slice<M>(weight, K, b.k0, tile);
  __syncthreads();
  b.begin = static_cast<int64_t>(blockIdx.y) * tokens_per_block;
  b.end = min(tokens, b.begin + tokens_per_block);
  return b;
}

// dx += dproj W + coef x over one slice of K per block (W's slice in shared memory), each
// warp TT tokens at a time: no reduction across lanes, each lane owns its columns.
template <int N, int VEC>
__global__ void __launch_bounds__(kSliceThreads) grad_x_kernel(const bf16* x, const float* weight,
                                                               const float* grad_proj, const float* coef,
                                                               int64_t tokens, int64_t K, int64_t tokens_per_block,
                                                               bf16* grad_x) {
  constexpr int M = width<N>(), TT = tokens_per_warp<N>();
  extern __shared__ float tile[];  // [M][kSlice]
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const SliceBlock b = enter_slice<M>(weight, K, tokens, tokens_per_block, tile);
  const int64_t k0 = b.k0, begin = b.begin, end = b.end;
  for (int64_t first = begin + warp * TT; first < end; first += kSliceWarps * TT) {
    float dp[TT][M], c[TT];
#pragma unroll
    for (int i = 0; i < TT; ++i) {
      const bool valid = first + i < end;
      c[i] = valid ? coef[first + i] : 0.0f;
#pragma unroll
      for (int o = 0; o < M; ++o) dp[i][o] = valid ? grad_proj[(first + i) * M + o] : 0.0f;
    }
#pragma unroll 2
    for (int j = lane * VEC; j < kSlice; j += 32 * VEC) {
      const int64_t col = k0 + j;
      if (col >= K) break;
      float acc[TT][VEC];
#pragma unroll
      for (int i = 0; i < TT; ++i)
#pragma unroll
        for (int v = 0; v < VEC; ++v) acc[i][v] = 0;
#pragma unroll
      for (int o = 0; o < M; ++o) {
        float w[VEC];
#pragma unroll
        for (int v = 0; v < VEC; ++v) w[v] = tile[o * kSlice + j + v];
#pragma unroll
        for (int i = 0; i < TT; ++i)
#pragma unroll
          for (int v = 0; v < VEC; ++v) acc[i][v] += dp[i][o] * w[v];
      }
#pragma unroll
      for (int i = 0; i < TT; ++i) {
        if (first + i >= end) continue;
        const int64_t at = (first + i) * K + col;
        if (VEC == 8 && col + VEC <= K) {
          float xv[VEC], gx[VEC];
          detail::load_bf16<VEC>(x + at, xv);
          detail::load_bf16<VEC>(grad_x + at, gx);
#pragma unroll
          for (int v = 0; v < VEC; ++v) gx[v] += acc[i][v] + c[i] * xv[v];
          detail::store_bf16<VEC>(grad_x + at, gx);
        } else {
#pragma unroll
          for (int v = 0; v < VEC; ++v)
            if (col + v < K)
              grad_x[at + v] = __float2bfloat16(__bfloat162float(grad_x[at + v]) + acc[i][v] +
                                                c[i] * __bfloat162float(x[at + v]));
        }
      }
    }
  }
}

// out[c] += sum over rows of in[row * stride + c], rows in order.
__global__ void sum_rows_kernel(const float* in, int64_t rows, int64_t cols, int64_t stride, float* out) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= cols) return;
  float s = 0;
  for (int64_t row = 0; row < rows; ++row) s += in[row * stride + c];
  out[c] += s;
}

// First pass of a long column sum: chunk blockIdx.y of kChunkRows rows, 32 columns per
// block, 8 rows of threads summed in order. partial[chunk][c].
constexpr int64_t kChunkRows = 256;
__global__ void column_chunk_sums_kernel(const float* in, int64_t rows, int64_t cols, float* partial) {
  __shared__ float sums[8][33];
  const int64_t c = static_cast<int64_t>(blockIdx.x) * 32 + threadIdx.x;
  const int64_t begin = blockIdx.y * kChunkRows, end = min(rows, begin + kChunkRows);
  float s = 0;
  if (c < cols)
    for (int64_t row = begin + threadIdx.y; row < end; row += 8) s += in[row * cols + c];
  sums[threadIdx.y][threadIdx.x] = s;
  __syncthreads();
  if (threadIdx.y == 0 && c < cols) {
    float total = 0;
    for (int k = 0; k < 8; ++k) total += sums[k][threadIdx.x];
    partial[blockIdx.y * cols + c] = total;
  }
}

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
  int64_t M, K, split_stride, chunks;
  size_t grad_h, grad_proj, coef, chunk_sums, grad_proj_split, weight_parts, total;
};

Layout layout_of(const MappingsArgs& a) {
  Layout l{};
  l.M = static_cast<int64_t>(a.n) * a.n + 2 * a.n;
  l.K = a.n * a.C;
  l.split_stride = split_width(l.M);
  l.chunks = (a.tokens + kChunkRows - 1) / kChunkRows;
  l.grad_h = 0;
  l.grad_proj = l.grad_h + a.tokens * (l.M + 3);
  l.coef = l.grad_proj + a.tokens * l.M;
  l.chunk_sums = l.coef + a.tokens;
  l.grad_proj_split = aligned(l.chunk_sums + l.chunks * (l.M + 3));
  l.weight_parts = aligned(l.grad_proj_split + (a.tokens * l.split_stride + 1) / 2);
  l.total = l.weight_parts + l.split_stride * l.K;
  return l;
}

// Slices above 48 KB (n = 6 and 8) need the kernel's opt-in to more shared memory.
template <typename Kernel> void enable_slice_memory(Kernel kernel, size_t bytes) {
  if (bytes > 48 * 1024)
    MHC_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)));
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
  split_weight_kernel<<<detail::blocks_for(l.split_stride * l.K, kBlockThreads), kBlockThreads, 0, stream>>>(
      weight, l.M, l.K, split);
  MHC_CUDA_CHECK(cudaGetLastError());
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
    finish_kernel<N><<<detail::blocks_for(a.tokens, 128), 128, 0, stream>>>(
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
  float* grad_proj = workspace + l.grad_proj;
  float* coef = workspace + l.coef;
  float* chunk_sums = workspace + l.chunk_sums;
  bf16* grad_proj_split = reinterpret_cast<bf16*>(workspace + l.grad_proj_split);
  float* weight_parts = workspace + l.weight_parts;
  detail::dispatch_streams(a.n, [&](auto Ns) {
    constexpr int N = decltype(Ns)::value;
    grad_h_kernel<N><<<detail::blocks_for(a.tokens, 128), 128, 0, stream>>>(
        proj, r, alpha, bias, h_pre, h_post, grad_h_pre, grad_h_post, grad_h_res, a.tokens, l.K,
        a.sinkhorn_iterations, grad_h, grad_proj, grad_proj_split, coef);
    MHC_CUDA_CHECK(cudaGetLastError());
    const SliceGrid g = slice_grid(a.tokens, l.K, kSlice, kSliceWarps * tokens_per_warp<N>());
    const dim3 slices(static_cast<unsigned>(g.slices), static_cast<unsigned>(g.token_blocks));
    if (l.K % 8 == 0) {
      enable_slice_memory(grad_x_kernel<N, 8>, slice_bytes<N>());
      grad_x_kernel<N, 8><<<slices, kSliceThreads, slice_bytes<N>(), stream>>>(x, weight, grad_proj, coef, a.tokens,
                                                                                l.K, g.tokens_per_block, grad_x);
    } else {
      enable_slice_memory(grad_x_kernel<N, 1>, slice_bytes<N>());
      grad_x_kernel<N, 1><<<slices, kSliceThreads, slice_bytes<N>(), stream>>>(x, weight, grad_proj, coef, a.tokens,
                                                                                l.K, g.tokens_per_block, grad_x);
    }
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
  column_chunk_sums_kernel<<<dim3(detail::blocks_for(row, 32), static_cast<unsigned>(l.chunks)), dim3(32, 8), 0,
                             stream>>>(grad_h, a.tokens, row, chunk_sums);
  sum_rows_kernel<<<1, 128, 0, stream>>>(chunk_sums, l.chunks, l.M, row, grad_bias);
  sum_rows_kernel<<<1, 32, 0, stream>>>(chunk_sums + l.M, l.chunks, 3, row, grad_alpha);
  MHC_CUDA_CHECK(cudaGetLastError());
}

}  // namespace mhc::cuda
