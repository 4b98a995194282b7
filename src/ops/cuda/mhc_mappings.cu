#include <algorithm>

#include "core/cuda/device.h"
#include "ops/cuda/kernel_utils.cuh"
#include "ops/cuda/mhc_mappings.h"

namespace mhc::cuda {

namespace {

using detail::kBlockThreads;
using detail::kBlockWarps;

constexpr float kNormEps = 1e-6f, kSinkhornEps = 1e-6f;

template <int N> constexpr int width() { return N * N + 2 * N; }
// Tokens per warp in the projection kernels: at most 4, and about 96 fp32 accumulators.
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

// ---- forward ---------------------------------------------------------------------------

// The projection kernels cut K into slices of kSlice columns: a block holds its slice of
// W in shared memory for its whole life and walks a run of tokens, each warp TT tokens at
// a time, each lane 8 (or, when K % 8 != 0, 1) adjacent columns per step. W is read from
// L2 once per block instead of once per token group.
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

// Sums R = 32 Q values over the warp, leaving lane l the totals of [Q l, Q l + Q) in v[0, Q):
// five halving exchange steps, R - Q shuffles instead of 5 R.
template <int R, int OFFSET = 16> __device__ void warp_reduce_scatter(float (&v)[R], int lane) {
  constexpr int half = R * OFFSET / 32;  // values still exchanged at this step, halved each step
  const bool upper = lane & OFFSET;
#pragma unroll
  for (int i = 0; i < half; ++i) {
    const float send = upper ? v[i] : v[i + half], keep = upper ? v[i + half] : v[i];
    v[i] = keep + __shfl_xor_sync(0xffffffffu, send, OFFSET);
  }
  if constexpr (OFFSET > 1) warp_reduce_scatter<R, OFFSET / 2>(v, lane);
}

// Loads VEC columns of a token row at col (zeros past K or past the last token).
template <int VEC>
__device__ inline void load_columns(const bf16* row, int64_t col, int64_t K, bool valid, float (&out)[VEC]) {
  if (valid && col + VEC <= K) {
    detail::load_bf16<VEC>(row + col, out);
  } else {
#pragma unroll
    for (int v = 0; v < VEC; ++v) out[v] = valid && col + v < K ? __bfloat162float(row[col + v]) : 0.0f;
  }
}

// partial[slice][t] = [W_slice x_slice (M values), ||x_slice||^2].
template <int N, int VEC>
__global__ void __launch_bounds__(kSliceThreads) project_kernel(const bf16* x, const float* weight, int64_t tokens,
                                                                int64_t K, int64_t tokens_per_block,
                                                                float* partial) {
  constexpr int M = width<N>(), TT = tokens_per_warp<N>(), R = (TT * M + 31) / 32 * 32, Q = R / 32;
  extern __shared__ float tile[];  // [M][kSlice]
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const SliceBlock b = enter_slice<M>(weight, K, tokens, tokens_per_block, tile);
  const int64_t k0 = b.k0, begin = b.begin, end = b.end;
  for (int64_t first = begin + warp * TT; first < end; first += kSliceWarps * TT) {
    float acc[R], ss[TT];
#pragma unroll
    for (int i = 0; i < R; ++i) acc[i] = 0;
#pragma unroll
    for (int i = 0; i < TT; ++i) ss[i] = 0;
#pragma unroll 1
    for (int j = lane * VEC; j < kSlice; j += 32 * VEC) {
      float xv[TT][VEC];
#pragma unroll
      for (int i = 0; i < TT; ++i) {
        load_columns<VEC>(x + (first + i) * K, k0 + j, K, first + i < end, xv[i]);
#pragma unroll
        for (int v = 0; v < VEC; ++v) ss[i] += xv[i][v] * xv[i][v];
      }
#pragma unroll
      for (int o = 0; o < M; ++o) {
        float w[VEC];
#pragma unroll
        for (int v = 0; v < VEC; ++v) w[v] = tile[o * kSlice + j + v];
#pragma unroll
        for (int i = 0; i < TT; ++i)
#pragma unroll
          for (int v = 0; v < VEC; ++v) acc[i * M + o] += w[v] * xv[i][v];
      }
    }
    warp_reduce_scatter<R>(acc, lane);
    float* out = partial + (static_cast<int64_t>(blockIdx.x) * tokens) * (M + 1);
#pragma unroll
    for (int q = 0; q < Q; ++q) {
      const int index = lane * Q + q, i = index / M, o = index % M;
      if (index < TT * M && first + i < end) out[(first + i) * (M + 1) + o] = acc[q];
    }
#pragma unroll
    for (int i = 0; i < TT; ++i) {
      const float total = detail::warp_sum(ss[i]);
      if (lane == 0 && first + i < end) out[(first + i) * (M + 1) + M] = total;
    }
  }
}

// ---- the projection on tensor cores ------------------------------------------------------
//
// Where K % 16 == 0, proj = W x runs as bf16 mma.sync (m16n8k16, fp32 accumulate) with W
// split into three bf16 parts, W = hi + mid + lo (exact to about 2^-24 relative, so the
// result is fp32-accurate; x is bf16 already): the B operand holds the 3m rows
// [hi; mid; lo], and the three partial columns of each output are summed afterwards.
// Each 128-thread block keeps its K slice of the split W in shared memory; each warp takes
// 16 tokens at a time.

template <int N> constexpr int split_rows() { return (3 * width<N>() + 7) / 8 * 8; }
template <int N> constexpr int mma_slice() { return 256; }
// +32 bf16 (64 bytes): consecutive rows start half a 128-byte wavefront apart, so the
// 16-byte loads of a quarter warp (2 rows x 4 lanes) hit distinct banks.
template <int N> constexpr int mma_row_stride() { return mma_slice<N>() + 32; }
template <int N> constexpr size_t mma_smem_bytes() {
  return sizeof(bf16) * split_rows<N>() * mma_row_stride<N>() + sizeof(float) * kSliceWarps * 16 * split_rows<N>();
}
template <int N> SliceGrid forward_grid(int64_t tokens, int64_t K) {
  if (K % 16 == 0) return slice_grid(tokens, K, mma_slice<N>(), kSliceWarps * 16);
  return slice_grid(tokens, K, kSlice, kSliceWarps * tokens_per_warp<N>());
}

// W (fp32 [M, K]) -> [hi; mid; lo] bf16 rows, zero rows up to split_rows.
template <int N> __global__ void split_weight_kernel(const float* weight, int64_t K, bf16* split) {
  constexpr int M = width<N>();
  const int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (e >= static_cast<int64_t>(M) * K) return;
  const int64_t o = e / K, k = e % K;
  const float w = weight[e];
  const bf16 hi = __float2bfloat16(w);
  const bf16 mid = __float2bfloat16(w - __bfloat162float(hi));
  const bf16 lo = __float2bfloat16(w - __bfloat162float(hi) - __bfloat162float(mid));
  split[o * K + k] = hi;
  split[(M + o) * K + k] = mid;
  split[(2 * M + o) * K + k] = lo;
}

__device__ inline void mma_bf16(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

template <int N>
__global__ void __launch_bounds__(kSliceThreads) project_mma_kernel(const bf16* x, const bf16* split, int64_t tokens,
                                                                    int64_t K, int64_t tokens_per_block,
                                                                    float* partial) {
  constexpr int M = width<N>(), S = split_rows<N>(), NT = S / 8, KS = mma_slice<N>(), RS = mma_row_stride<N>();
  extern __shared__ __align__(16) unsigned char smem[];
  bf16* tile = reinterpret_cast<bf16*>(smem);                                    // [S][RS]
  float* staged = reinterpret_cast<float*>(smem + sizeof(bf16) * S * RS);       // [warps][16][S]
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, g = lane / 4, tig = lane % 4;
  const int64_t k0 = static_cast<int64_t>(blockIdx.x) * KS;
  const int width_here = static_cast<int>(min(static_cast<int64_t>(KS), K - k0));  // a multiple of 16
  for (int e = threadIdx.x; e < S * (KS / 2); e += blockDim.x) {
    const int row = e / (KS / 2), pair = e % (KS / 2);
    uint32_t v = 0;
    if (2 * pair < width_here) v = *reinterpret_cast<const uint32_t*>(split + row * K + k0 + 2 * pair);
    *reinterpret_cast<uint32_t*>(tile + row * RS + 2 * pair) = v;
  }
  __syncthreads();
  const int64_t begin = static_cast<int64_t>(blockIdx.y) * tokens_per_block;
  const int64_t end = min(tokens, begin + tokens_per_block);
  float* mine = staged + warp * 16 * S;
  for (int64_t first = begin + warp * 16; first < end; first += kSliceWarps * 16) {
    float c[NT][4] = {};
    float ss[2] = {0, 0};  // rows g and g + 8
    const int64_t row0 = first + g, row1 = first + g + 8;
    const bf16* x0 = x + row0 * K + k0;
    const bf16* x1 = x + row1 * K + k0;
    // K is walked 32 columns at a time, each lane loading 8 adjacent columns (16 bytes) of
    // its two rows. The sum over k does not care about order, so the fragment's k positions
    // are remapped: in step s of the two, logical columns (2 tig, 2 tig + 1) are physical
    // 8 tig + 4 s + (0, 1) and (2 tig + 8, 2 tig + 9) are 8 tig + 4 s + (2, 3); B uses the
    // same map, so its two registers of a step come from one 8-byte part of a 16-byte load.
    // Fully unrolled over the slice: all its x loads can be in flight at once.
#pragma unroll
    for (int kb = 0; kb < KS; kb += 32) {
      if (kb >= width_here) break;
      const int col = kb + 8 * tig;
      uint4 r0 = {0, 0, 0, 0}, r1 = {0, 0, 0, 0};
      if (col < width_here) {
        if (row0 < end) r0 = *reinterpret_cast<const uint4*>(x0 + col);
        if (row1 < end) r1 = *reinterpret_cast<const uint4*>(x1 + col);
      }
      const uint32_t words[2][4] = {{r0.x, r0.y, r0.z, r0.w}, {r1.x, r1.y, r1.z, r1.w}};
#pragma unroll
      for (int h = 0; h < 2; ++h)
#pragma unroll
        for (int q = 0; q < 4; ++q) {
          const float2 f = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&words[h][q]));
          ss[h] += f.x * f.x + f.y * f.y;
        }
      const uint32_t a_step[2][4] = {{r0.x, r1.x, r0.y, r1.y}, {r0.z, r1.z, r0.w, r1.w}};
#pragma unroll
      for (int j = 0; j < NT; ++j) {
        uint4 b = {0, 0, 0, 0};
        if (col < width_here) b = *reinterpret_cast<const uint4*>(tile + (j * 8 + g) * RS + col);
        mma_bf16(c[j], a_step[0], b.x, b.y);
        mma_bf16(c[j], a_step[1], b.z, b.w);
      }
    }
    // Stage the 16 x S block, then sum the three parts of each output (and finish ||x||^2).
#pragma unroll
    for (int j = 0; j < NT; ++j) {
      mine[g * S + j * 8 + 2 * tig] = c[j][0];
      mine[g * S + j * 8 + 2 * tig + 1] = c[j][1];
      mine[(g + 8) * S + j * 8 + 2 * tig] = c[j][2];
      mine[(g + 8) * S + j * 8 + 2 * tig + 1] = c[j][3];
    }
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      ss[h] += __shfl_xor_sync(0xffffffffu, ss[h], 1);
      ss[h] += __shfl_xor_sync(0xffffffffu, ss[h], 2);
    }
    __syncwarp();
    float* out = partial + static_cast<int64_t>(blockIdx.x) * tokens * (M + 1);
    for (int e = lane; e < 16 * M; e += 32) {
      const int row = e / M, o = e % M;
      if (first + row < end)
        out[(first + row) * (M + 1) + o] = mine[row * S + o] + mine[row * S + M + o] + mine[row * S + 2 * M + o];
    }
    if (tig == 0) {
      if (row0 < end) out[row0 * (M + 1) + M] = ss[0];
      if (row1 < end) out[row1 * (M + 1) + M] = ss[1];
    }
    __syncwarp();
  }
}

// Per token: proj and r from the slices' partial sums (in slice order), then the gates,
// Sinkhorn in registers, H_pre, H_post, H_res.
template <int N>
__global__ void finish_kernel(const float* partial, int64_t slices, int64_t K, const float* alpha, const float* bias,
                              int64_t tokens, int iterations, float* proj, float* r, float* h_pre, float* h_post,
                              float* h_res) {
  constexpr int M = width<N>();
  const int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (t >= tokens) return;
  float p[M], ss = 0;
#pragma unroll
  for (int o = 0; o < M; ++o) p[o] = 0;
  for (int64_t slice = 0; slice < slices; ++slice) {
    const float* part = partial + (slice * tokens + t) * (M + 1);
#pragma unroll
    for (int o = 0; o < M; ++o) p[o] += part[o];
    ss += part[M];
  }
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
// over tokens into dbias and dalpha), dproj = dh r a, and the coefficient of x in dx from
// r: -dr r^2 / (sqrt(K) ||x||).
template <int N>
__global__ void grad_h_kernel(const float* proj, const float* r, const float* alpha, const float* bias,
                              const float* h_pre, const float* h_post, const float* grad_h_pre,
                              const float* grad_h_post, const float* grad_h_res, int64_t tokens, int64_t K,
                              int iterations, float* grad_h, float* grad_proj, float* coef) {
  constexpr int M = width<N>();
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
    grad_proj[t * M + k] = dh[k] * rt * alpha[g];
  }
#pragma unroll
  for (int g = 0; g < 3; ++g) grad_h[t * (M + 3) + M + g] = terms[g];
  const float sqrt_k = sqrtf(static_cast<float>(K));
  const float norm = sqrt_k * (1.0f / rt - kNormEps);
  coef[t] = norm > 0.0f ? -dr * rt * rt / (sqrt_k * norm) : 0.0f;
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

// Segment `blockIdx.y` of the tokens: partial[seg][o][k] = sum_t dproj[t][o] x[t][k], each
// thread owning KV columns. dproj comes through shared memory 32 tokens at a time, and x
// is loaded 8 tokens ahead so that several loads are in flight.
template <int N, int KV>
__global__ void __launch_bounds__(kBlockThreads) grad_w_partial_kernel(const bf16* x, const float* grad_proj,
                                                                       int64_t tokens, int64_t K,
                                                                       int64_t tokens_per_segment, float* partial) {
  constexpr int M = width<N>(), kChunk = 32, kAhead = 8;
  __shared__ float dp[kChunk][M];
  const int64_t k = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) * KV;
  const int64_t begin = blockIdx.y * tokens_per_segment;
  const int64_t end = min(tokens, begin + tokens_per_segment);
  float acc[M][KV];
#pragma unroll
  for (int o = 0; o < M; ++o)
#pragma unroll
    for (int v = 0; v < KV; ++v) acc[o][v] = 0;
  for (int64_t t0 = begin; t0 < end; t0 += kChunk) {
    const int64_t count = min(static_cast<int64_t>(kChunk), end - t0);
    __syncthreads();
    for (int e = threadIdx.x; e < kChunk * M; e += blockDim.x)
      dp[e / M][e % M] = e / M < count ? grad_proj[(t0 + e / M) * M + e % M] : 0.0f;
    __syncthreads();
    if (k >= K) continue;
    for (int tt = 0; tt < count; tt += kAhead) {
      float xv[kAhead][KV];
#pragma unroll
      for (int u = 0; u < kAhead; ++u) {
        const int64_t t = t0 + tt + u;
        if (tt + u < count) {
          if constexpr (KV == 2) {
            const float2 f = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(x + t * K + k));
            xv[u][0] = f.x;
            xv[u][1] = f.y;
          } else {
            xv[u][0] = __bfloat162float(x[t * K + k]);
          }
        } else {
#pragma unroll
          for (int v = 0; v < KV; ++v) xv[u][v] = 0;
        }
      }
#pragma unroll
      for (int u = 0; u < kAhead; ++u)
#pragma unroll
        for (int o = 0; o < M; ++o)
#pragma unroll
          for (int v = 0; v < KV; ++v) acc[o][v] += dp[tt + u][o] * xv[u][v];
    }
  }
  if (k >= K) return;
  float* out = partial + static_cast<int64_t>(blockIdx.y) * M * K;
#pragma unroll
  for (int o = 0; o < M; ++o)
#pragma unroll
    for (int v = 0; v < KV; ++v) out[o * K + k + v] = acc[o][v];
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

struct Layout {
  int64_t M, K, segments, tokens_per_segment, chunks;
  size_t grad_h, grad_proj, coef, chunk_sums, partial, total;  // offsets in floats
};

Layout layout_of(const MappingsArgs& a) {
  Layout l{};
  l.M = static_cast<int64_t>(a.n) * a.n + 2 * a.n;
  l.K = a.n * a.C;
  const int kv = (l.K % 2 == 0 && l.M <= 48) ? 2 : 1;
  const int64_t column_blocks = (l.K / kv + kBlockThreads - 1) / kBlockThreads;
  // Enough blocks for about four waves of 132 multiprocessors; a pure function of the shape.
  l.segments = std::clamp<int64_t>((528 + column_blocks - 1) / column_blocks, 1, std::max<int64_t>(a.tokens, 1));
  l.tokens_per_segment = (a.tokens + l.segments - 1) / l.segments;
  l.segments = (a.tokens + l.tokens_per_segment - 1) / l.tokens_per_segment;
  l.chunks = (a.tokens + kChunkRows - 1) / kChunkRows;
  l.grad_h = 0;
  l.grad_proj = l.grad_h + a.tokens * (l.M + 3);
  l.coef = l.grad_proj + a.tokens * l.M;
  l.chunk_sums = l.coef + a.tokens;
  l.partial = l.chunk_sums + l.chunks * (l.M + 3);
  l.total = l.partial + l.segments * l.M * l.K;
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
  size_t floats = 0;
  detail::dispatch_streams(a.n, [&](auto Ns) {
    constexpr int N = decltype(Ns)::value;
    const int64_t K = a.n * a.C;
    floats = static_cast<size_t>(forward_grid<N>(a.tokens, K).slices * a.tokens * (width<N>() + 1));
    if (K % 16 == 0) floats += static_cast<size_t>(split_rows<N>() * K + 1) / 2;  // the split W, bf16
  });
  return floats;
}

void mhc_mappings_forward(const MappingsArgs& a, const bf16* x, const float* weight, const float* alpha,
                          const float* bias, float* proj, float* r, float* h_pre, float* h_post, float* h_res,
                          float* workspace, cudaStream_t stream) {
  check_args(a);
  const int64_t K = a.n * a.C;
  detail::dispatch_streams(a.n, [&](auto Ns) {
    constexpr int N = decltype(Ns)::value;
    const SliceGrid g = forward_grid<N>(a.tokens, K);
    const dim3 grid(static_cast<unsigned>(g.slices), static_cast<unsigned>(g.token_blocks));
    if (K % 16 == 0) {
      // workspace: [slices][tokens][M + 1] partials, then the split W
      bf16* split = reinterpret_cast<bf16*>(workspace + g.slices * a.tokens * (width<N>() + 1));
      MHC_CUDA_CHECK(cudaMemsetAsync(split, 0, sizeof(bf16) * split_rows<N>() * K, stream));
      split_weight_kernel<N><<<detail::blocks_for(width<N>() * K, 256), 256, 0, stream>>>(weight, K, split);
      MHC_CUDA_CHECK(cudaGetLastError());
      enable_slice_memory(project_mma_kernel<N>, mma_smem_bytes<N>());
      project_mma_kernel<N><<<grid, kSliceThreads, mma_smem_bytes<N>(), stream>>>(x, split, a.tokens, K,
                                                                                   g.tokens_per_block, workspace);
    } else if (K % 8 == 0) {
      enable_slice_memory(project_kernel<N, 8>, slice_bytes<N>());
      project_kernel<N, 8><<<grid, kSliceThreads, slice_bytes<N>(), stream>>>(x, weight, a.tokens, K,
                                                                               g.tokens_per_block, workspace);
    } else {
      enable_slice_memory(project_kernel<N, 1>, slice_bytes<N>());
      project_kernel<N, 1><<<grid, kSliceThreads, slice_bytes<N>(), stream>>>(x, weight, a.tokens, K,
                                                                               g.tokens_per_block, workspace);
    }
    MHC_CUDA_CHECK(cudaGetLastError());
    finish_kernel<N><<<detail::blocks_for(a.tokens, 128), 128, 0, stream>>>(
        workspace, g.slices, K, alpha, bias, a.tokens, a.sinkhorn_iterations, proj, r, h_pre, h_post, h_res);
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
  float* partial = workspace + l.partial;
  detail::dispatch_streams(a.n, [&](auto Ns) {
    constexpr int N = decltype(Ns)::value;
    grad_h_kernel<N><<<detail::blocks_for(a.tokens, 128), 128, 0, stream>>>(
        proj, r, alpha, bias, h_pre, h_post, grad_h_pre, grad_h_post, grad_h_res, a.tokens, l.K,
        a.sinkhorn_iterations, grad_h, grad_proj, coef);
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
    const bool pairs = l.K % 2 == 0 && l.M <= 48;
    const dim3 grid(detail::blocks_for(l.K / (pairs ? 2 : 1), kBlockThreads), static_cast<unsigned>(l.segments));
    if (pairs)
      grad_w_partial_kernel<N, 2><<<grid, kBlockThreads, 0, stream>>>(x, grad_proj, a.tokens, l.K,
                                                                      l.tokens_per_segment, partial);
    else
      grad_w_partial_kernel<N, 1><<<grid, kBlockThreads, 0, stream>>>(x, grad_proj, a.tokens, l.K,
                                                                      l.tokens_per_segment, partial);
    MHC_CUDA_CHECK(cudaGetLastError());
  });
  sum_rows_kernel<<<detail::blocks_for(l.M * l.K, kBlockThreads), kBlockThreads, 0, stream>>>(
      partial, l.segments, l.M * l.K, l.M * l.K, grad_weight);
  const int64_t row = l.M + 3;  // [dh, alpha terms]
  column_chunk_sums_kernel<<<dim3(detail::blocks_for(row, 32), static_cast<unsigned>(l.chunks)), dim3(32, 8), 0,
                             stream>>>(grad_h, a.tokens, row, chunk_sums);
  sum_rows_kernel<<<1, 128, 0, stream>>>(chunk_sums, l.chunks, l.M, row, grad_bias);
  sum_rows_kernel<<<1, 32, 0, stream>>>(chunk_sums + l.M, l.chunks, 3, row, grad_alpha);
  MHC_CUDA_CHECK(cudaGetLastError());
}

}  // namespace mhc::cuda
