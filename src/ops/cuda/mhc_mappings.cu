#include <algorithm>

#include "core/cuda/device.h"
#include "ops/cuda/column_sums.cuh"
#include "ops/cuda/gemm.h"
#include "ops/cuda/kernel_utils.cuh"
#include "ops/cuda/mhc_mappings.h"
#include "ops/cuda/norm_row.cuh"

namespace mhc::cuda {

namespace {

using detail::kBlockThreads;
using detail::lanes_sum;

constexpr float kNormEps = 1e-6f, kSinkhornEps = 1e-6f;

template <int N> constexpr int width() { return N * N + 2 * N; }


// ---- Sinkhorn in registers, lanes of a token ------------------------------------------
//
// Per-token work runs on L = G x S adjacent lanes of a warp (TokenLanes<N, S>): G = the
// power of two at or above N rows, each split over S lanes; the lane (row i, split k) holds
// the entries (i, k + S c) of the token's N x N matrices for c < CPL (its "columns");
// entries past N are padding and hold zeros. Row sums are the lane's own plus a butterfly
// over the S lanes of the row, column sums a butterfly over the G rows (every lane gets the
// same bits). More lanes a token shorten its chain; fewer make fewer instructions a token
// (a row's sum and reciprocal made once, not once per lane of the row). Each kernel picks
// its S (measured at n = 4, GPT-2 width): finish_kernel one lane a row at n <= 4
// (FinishLanes; 19.7 -> 16.3 us a call after projection_kernel, the same 16.1 after
// cuBLASLt), grad_h_kernel two at n = 4 (GradHLanes; 36.3 -> 32.7 us against four, and
// its dbias/dalpha partials fewer; one lane a row was slower: 4x the divisors in shared
// memory a block, longer chains).
template <int N_, int S_> struct TokenLanes {
  static constexpr int N = N_, S = S_;
  static constexpr int G = N <= 1 ? 1 : N <= 2 ? 2 : N <= 4 ? 4 : 8;
  static constexpr int L = G * S, CPL = (N + S - 1) / S;
  static_assert(32 % L == 0, "a token's lanes within a warp");
};
template <int N> using FinishLanes = TokenLanes<N, N <= 4 ? 1 : 4>;
template <int N> using GradHLanes = TokenLanes<N, N <= 1 ? 1 : N <= 4 ? 2 : 4>;

template <class Lanes> __device__ inline float row_sum(float v) { return lanes_sum<1, Lanes::S>(v); }
template <class Lanes> __device__ inline float column_sum(float v) {
  return lanes_sum<Lanes::S, Lanes::G>(v);
}

// A lane's token and entries. Lanes past the last token work on the last token (every
// lane must take part in the shuffles) and store nothing.
template <class Lanes> struct TokenLane {
  static constexpr int N = Lanes::N;
  int64_t token;  // clamped to the last token
  int row, split;
  bool store;  // a real token and row
  // column of the lane's entry c, and whether it is a real entry
  __device__ int column(int c) const { return split + Lanes::S * c; }
  __device__ bool holds(int c) const { return row < N && column(c) < N; }
};
template <class Lanes> __device__ inline TokenLane<Lanes> token_lane(int64_t tokens) {
  constexpr int N = Lanes::N, S = Lanes::S, L = Lanes::L;
  const int64_t id = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t t = id / L;
  const int lane = static_cast<int>(id % L);
  return {t < tokens ? t : tokens - 1, lane / S, lane % S, t < tokens && lane / S < N};
}

// The lane's entries of exp(L - row max), zeros for padding.
template <class Lanes, int CPL>
__device__ void exp_shifted(const TokenLane<Lanes>& lane, const float (&l)[CPL], float (&m)[CPL]) {
  float mx = -INFINITY;
#pragma unroll
  for (int c = 0; c < CPL; ++c)
    if (lane.holds(c)) mx = fmaxf(mx, l[c]);
#pragma unroll
  for (int offset = Lanes::S / 2; offset >= 1; offset /= 2)
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, offset));
#pragma unroll
  for (int c = 0; c < CPL; ++c) m[c] = lane.holds(c) ? expf(l[c] - mx) : 0.0f;
}

// 1 / s correctly rounded (the bits of __frcp_rn(s)) for the sums Sinkhorn divides by: they
// lie in [kSinkhornEps, N] (entries of exp(L - row max) are at most 1, sums are clamped
// below), where __frcp_rn's range check always passes and its fast path (an approximate
// reciprocal and one Newton step) is its result; alone it saves the check, the branch and
// the reconvergence around it, 7 of 10 instructions (a quarter of grad_h's). Every float in
// [2^-20, 2^7) gives __frcp_rn's bits (all 226M of them, checked on an H100).
__device__ inline float sinkhorn_reciprocal(float s) {
  float r;
  asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(s));
  return __fmaf_rn(r, __fmaf_rn(-s, r, 1.0f), r);
}

// One half step: rows (ROWS) or columns divided by max(sum, eps); the divisors of the
// lane's entries go to `divisors` (a row step's is the same for all: [0]). The kind of
// step is a template parameter: a runtime one cost a branch and its reconvergence around
// every step (a fifth of grad_h's instructions).
template <class Lanes, bool ROWS, int CPL> __device__ void normalise(float (&m)[CPL], float (&divisors)[CPL]) {
  if constexpr (ROWS) {
    float s = 0;
#pragma unroll
    for (int c = 0; c < CPL; ++c) s += m[c];
    s = fmaxf(row_sum<Lanes>(s), kSinkhornEps);
    // One reciprocal a row, then products: within an ulp of dividing each entry (the CPU
    // reference divides). The reciprocal is correctly rounded: the bits of 1.0f / s,
    // without the division routine's extra steps.
    const float inverse = sinkhorn_reciprocal(s);
#pragma unroll
    for (int c = 0; c < CPL; ++c) m[c] *= inverse;
    divisors[0] = s;
  } else {
#pragma unroll
    for (int c = 0; c < CPL; ++c) {
      const float s = fmaxf(column_sum<Lanes>(m[c]), kSinkhornEps);
      m[c] *= sinkhorn_reciprocal(s);
      divisors[c] = s;
    }
  }
}

template <class Lanes, int CPL>
__device__ void sinkhorn_forward(const TokenLane<Lanes>& lane, const float (&l)[CPL], int iterations, float (&m)[CPL]) {
  exp_shifted(lane, l, m);
  float unused[CPL];
  for (int it = 0; it < iterations; ++it) {
    normalise<Lanes, true>(m, unused);
    normalise<Lanes, false>(m, unused);
  }
}

// Back through one half step (ROWS or columns) whose output is y and whose divisors are
// the token's `divisors` of that step: g (dL of its output) becomes dL of its input, and y
// its input. Padding entries (zeros) read a real divisor, so that they stay zeros.
template <class Lanes, bool ROWS, int CPL>
__device__ void normalise_backward(const TokenLane<Lanes>& lane, const float* divisors, float (&y)[CPL], float (&g)[CPL]) {
  constexpr int N = Lanes::N;
  float dot[CPL];
  if constexpr (ROWS) {
    float partial = 0;
#pragma unroll
    for (int c = 0; c < CPL; ++c)
      if (y[c] != 0.0f) partial += g[c] * y[c];
    dot[0] = row_sum<Lanes>(partial);
  } else {
#pragma unroll
    for (int c = 0; c < CPL; ++c) dot[c] = column_sum<Lanes>(y[c] != 0.0f ? g[c] * y[c] : 0.0f);
  }
#pragma unroll
  for (int c = 0; c < CPL; ++c) {
    const float s = divisors[ROWS ? min(lane.row, N - 1) : min(lane.column(c), N - 1)];
    const float d = s > kSinkhornEps ? dot[ROWS ? 0 : c] : 0.0f;
    g[c] = y[c] != 0.0f ? (g[c] - d) * sinkhorn_reciprocal(s) : 0.0f;
    y[c] *= s;
  }
}

// g holds the lane's entries of dM on entry and of dL on exit. Forward is re-run once,
// keeping each half step's divisors (a row's or a column's sum) in `divisors`, the token's
// [2 iterations][N] floats of shared memory (as per-lane arrays they were local memory:
// 16 copies a token at n = 4, spilling from L1, a load on the chain at every step back);
// walking back, the state before a half step is its output times those divisors (exact up
// to rounding, also where a sum was clamped to eps). Same zero-entry rule as the CPU
// reference.
constexpr int kMaxIterations = 64;
template <class Lanes, int CPL>
__device__ void sinkhorn_backward(const TokenLane<Lanes>& lane, const float (&l)[CPL], int iterations, float (&g)[CPL],
                                  float* divisors) {
  constexpr int N = Lanes::N;
  float m0[CPL], y[CPL];
  exp_shifted(lane, l, m0);
#pragma unroll
  for (int c = 0; c < CPL; ++c) y[c] = m0[c];
  for (int it = 0; it < iterations; ++it) {
    float d[CPL];
    normalise<Lanes, true>(y, d);
    if (lane.row < N && lane.split == 0) divisors[2 * it * N + lane.row] = d[0];
    normalise<Lanes, false>(y, d);
#pragma unroll
    for (int c = 0; c < CPL; ++c)
      if (lane.row == 0 && lane.holds(c)) divisors[(2 * it + 1) * N + lane.column(c)] = d[c];
  }
  __syncwarp();
  for (int it = iterations - 1; it >= 0; --it) {
    normalise_backward<Lanes, false>(lane, divisors + (2 * it + 1) * N, y, g);
    normalise_backward<Lanes, true>(lane, divisors + 2 * it * N, y, g);
  }
#pragma unroll
  for (int c = 0; c < CPL; ++c) g[c] *= m0[c];
}

// Shared memory of grad_h_kernel: each of a block's tokens its Sinkhorn divisors.
constexpr int kGradHThreads = 256;
template <int N> size_t grad_h_shared_bytes(int iterations) {
  return static_cast<size_t>(kGradHThreads / GradHLanes<N>::L) * 2 * iterations * N * sizeof(float);
}

// ---- the split of fp32 values into three bf16 parts -------------------------------------
//
// The products with W run on tensor cores in bf16 with fp32 sums. A fp32 value v is split
// as v = hi + mid + lo (three bf16, exact to about 2^-24 relative), so a product with a
// bf16 operand (x) keeps fp32 accuracy: it is three bf16 products summed.

// Each part's m rows padded to a multiple of 8 (whole n8 tiles, 16-byte rows of bf16).
__host__ __device__ constexpr int64_t split_part(int64_t m) { return (m + 7) / 8 * 8; }
__host__ __device__ constexpr int64_t split_rows(int64_t m) { return 3 * split_part(m); }

__device__ inline void split3(float v, bf16* hi, bf16* mid, bf16* lo) {
  const bf16 h = __float2bfloat16(v);
  const float rest = v - __bfloat162float(h);
  const bf16 m = __float2bfloat16(rest);
  *hi = h;
  *mid = m;
  *lo = __float2bfloat16(rest - __bfloat162float(m));
}

// W [m, K] (fp32) -> [hi; mid; lo] parts of split_part(m) rows each, [split_rows(m), K] of
// bf16, the padding rows zero: several W of one shape a launch (blockIdx.y), a thread one
// entry's three parts.
constexpr int kSplitsALaunch = 32;
struct WeightSplits {
  const float* weight[kSplitsALaunch];
  bf16* split[kSplitsALaunch];
};
__global__ void split_weight_kernel(WeightSplits w, int64_t m, int64_t K) {
  const int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t part = split_part(m) * K;
  if (e >= part) return;
  const float* weight = w.weight[blockIdx.y];
  bf16* split = w.split[blockIdx.y];
  if (e < m * K) {
    split3(weight[e], &split[e], &split[part + e], &split[2 * part + e]);
  } else {
    split[e] = split[part + e] = split[2 * part + e] = __float2bfloat16(0.0f);
  }
}

void split_weights(const float* const* weights, bf16* const* splits, int count, int64_t m, int64_t K,
                   cudaStream_t stream) {
  for (int first = 0; first < count; first += kSplitsALaunch) {
    const int here = std::min(kSplitsALaunch, count - first);
    WeightSplits w{};
    for (int i = 0; i < here; ++i) w.weight[i] = weights[first + i], w.split[i] = splits[first + i];
    const dim3 grid(detail::blocks_for(split_part(m) * K, kBlockThreads), static_cast<unsigned>(here));
    split_weight_kernel<<<grid, kBlockThreads, 0, stream>>>(w, m, K);
    MHC_CUDA_CHECK(cudaGetLastError());
  }
}
// W's split: the one given (made by split_mappings_weights), else made here into `own`.
const bf16* given_or_split(const bf16* given, const float* weight, int64_t m, int64_t K, bf16* own,
                           cudaStream_t stream) {
  if (given) return given;
  split_weights(&weight, &own, 1, m, K, stream);
  return own;
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
  detail::group_sum<1>(s, static_cast<int>(blockDim.x), [&](int, float total) { sumsq[blockIdx.x] = total; });
}

// The projection, one pass over x: parts[s][t][o] = the sum over K range s of x[t][k]
// W[o][k] (W as its bf16 parts hi, mid, lo, each times x on tensor cores, the three summed
// in fp32 at the end; finish_kernel sums the ranges in order) and, unless given, range s's
// share of ||x_t||^2. mma.sync m16n8k16 with tokens as the rows: a block is kProjWarps
// warps of MT m16 tiles, over its K range in chunks of kProjChunk through a cp.async ring
// (the x rows of the block's tokens and all of W_split's rows). W comes from L2 once a
// block and each B fragment serves a warp's MT tiles, so a block takes as many tokens as
// fit (W's traffic is 3 split_part(m) / (16 MT kProjWarps) of x's: 28% at n = 4) and the K
// ranges fill the grid. Long chunks: a block barrier each (64 with 3 stages measured
// slower). ||x||^2 from the A fragments in registers: each lane squares its 4 of every 16
// k of rows g and g + 8, a chunk at a time (short chains), then the 4 lanes of a row.
constexpr int kProjWarps = 8, kProjChunk = 128, kProjStages = 2, kMaxProjRanges = 8;
constexpr int kProjRow = kProjChunk + 8;  // bf16; the padding puts ldmatrix's 8 rows on distinct banks
template <int N> constexpr int proj_tiles() { return width<N>() <= 24 ? 2 : 1; }  // accumulators in registers
template <int N> constexpr int proj_tokens() { return 16 * proj_tiles<N>() * kProjWarps; }
template <int N> constexpr int proj_stage_rows() { return proj_tokens<N>() + static_cast<int>(split_rows(width<N>())); }
template <int N> constexpr int proj_shared_bytes() { return kProjStages * proj_stage_rows<N>() * kProjRow * 2; }

template <int N, bool VEC>
__global__ void __launch_bounds__(kProjWarps * 32)
    projection_kernel(const bf16* x, const bf16* weight_split, int64_t tokens, int64_t K, float* parts,
                      float* sumsq) {
  constexpr int M = width<N>(), PT = split_part(M) / 8, NT = 3 * PT;  // n8 tiles: a part's, all
  constexpr int MT = proj_tiles<N>(), BT = proj_tokens<N>();
  constexpr int KS = kProjChunk / 16, kAhead = kProjStages - 1, kRows = proj_stage_rows<N>();
  constexpr int kSegments = kProjChunk / 8;  // 16-byte pieces of a row's chunk
  extern __shared__ __align__(16) unsigned char proj_ring[];
  const bf16* ring = reinterpret_cast<const bf16*>(proj_ring);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int64_t first = static_cast<int64_t>(blockIdx.x) * BT;
  const int64_t all_chunks = (K + kProjChunk - 1) / kProjChunk;
  const int64_t chunk0 = all_chunks * blockIdx.y / gridDim.y;
  const int chunks = static_cast<int>(all_chunks * (blockIdx.y + 1) / gridDim.y - chunk0);
  // A thread copies the same 16-byte piece of the same rows of every chunk: rows r0 +
  // kRowStep i, the block's x rows (a token's, while there are tokens) and then W_split's.
  constexpr int kThreads = kProjWarps * 32, kRowStep = kThreads / kSegments;
  constexpr int kCopies = (kRows + kRowStep - 1) / kRowStep, kXCopies = BT / kRowStep;
  static_assert(kThreads % kSegments == 0 && BT % kRowStep == 0 && kCopies <= 32, "whole rows a pass");
  const int r0 = threadIdx.x / kSegments, piece = threadIdx.x % kSegments * 8;
  uint32_t row_valid = 0;  // bit i: row r0 + kRowStep i is real
#pragma unroll
  for (int i = 0; i < kCopies; ++i) {
    const int row = r0 + kRowStep * i;
    if (row < kRows && (row >= BT || first + row < tokens)) row_valid |= 1u << i;
  }
  auto issue = [&](int chunk) {
    bf16* st = reinterpret_cast<bf16*>(proj_ring) + (chunk % kProjStages) * kRows * kProjRow + piece;
    const int64_t k = (chunk0 + chunk) * kProjChunk + piece;
#pragma unroll
    for (int i = 0; i < kCopies; ++i) {
      const int row = r0 + kRowStep * i;
      if (kRows % kRowStep != 0 && row >= kRows) break;
      const bool real = row_valid >> i & 1u;
      const bf16* from = !real       ? x
                         : i < kXCopies ? x + (first + row) * K
                                        : weight_split + static_cast<int64_t>(row - BT) * K;
      bf16* dst = st + row * kProjRow;
      if constexpr (VEC) {
        const bool valid = real && k < K;
        detail::copy_async<16>(dst, valid ? from + k : x, valid);
      } else {
#pragma unroll
        for (int v = 0; v < 8; ++v) dst[v] = real && k + v < K ? from[k + v] : __float2bfloat16(0.0f);
      }
    }
  };
  for (int c = 0; c < kAhead; ++c) {
    if (c < chunks) issue(c);
    detail::commit_async();
  }
  float acc[MT][NT][4] = {}, squares[MT][2] = {};
  for (int c = 0; c < chunks; ++c) {
    detail::wait_async<kAhead - 1>();
    __syncthreads();  // chunk c is in; every warp is done with chunk c - 1, whose stage is refilled next
    if (c + kAhead < chunks) issue(c + kAhead);
    detail::commit_async();
    const bf16* st = ring + (c % kProjStages) * kRows * kProjRow;
    float chunk_squares[MT][2] = {};
#pragma unroll
    for (int half = 0; half < KS / 2; ++half) {  // two k steps: A of the warp's tiles, then W's tiles
      uint32_t a[MT][2][4];
#pragma unroll
      for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int kk = 0; kk < 2; ++kk) {
          const int row = (warp * MT + mt) * 16 + lane % 8 + 8 * (lane / 8 % 2);
          detail::ldmatrix<4, false>(a[mt][kk], st + row * kProjRow + 16 * (2 * half + kk) + 8 * (lane / 16));
          if (!sumsq) continue;
#pragma unroll
          for (int r = 0; r < 4; ++r) {  // a0, a2: row g; a1, a3: row g + 8
            float first, second;
            detail::unpack_bf16x2(a[mt][kk][r], first, second);
            chunk_squares[mt][r % 2] += first * first + second * second;
          }
        }
#pragma unroll
      for (int j = 0; j < NT; ++j) {
        uint32_t b[4];  // W rows 8 j.. at k 32 half + 0, 8, 16, 24: b0, b1 of the two k steps
        detail::ldmatrix<4, false>(b, st + (BT + 8 * j + lane % 8) * kProjRow + 32 * half + 8 * (lane / 8));
#pragma unroll
        for (int kk = 0; kk < 2; ++kk)
#pragma unroll
          for (int mt = 0; mt < MT; ++mt) detail::mma_bf16(acc[mt][j], a[mt][kk], b[2 * kk], b[2 * kk + 1]);
      }
    }
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int h = 0; h < 2; ++h) squares[mt][h] += chunk_squares[mt][h];
  }
  const int g = lane / 4, tig = lane % 4;
  float* out = parts + blockIdx.y * tokens * M;
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int64_t t = first + (warp * MT + mt) * 16 + g + 8 * h;
      if (sumsq) {
        const float s = lanes_sum<1, 4>(squares[mt][h]);
        if (tig == 0 && t < tokens) sumsq[blockIdx.y * tokens + t] = s;
      }
      if (t >= tokens) continue;
#pragma unroll
      for (int j = 0; j < PT; ++j)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int o = 8 * j + 2 * tig + e;
          const int r = 2 * h + e;  // the entry of hi, mid and lo
          if (o < M) out[t * M + o] = acc[mt][j][r] + acc[mt][PT + j][r] + acc[mt][2 * PT + j][r];
        }
    }
}

// The sum, in order, of the count (1 to kMaxProjRanges) floats `step` apart from p, all
// loaded at once (a loop's loads waited for one another).
__device__ inline float sum_spaced(const float* p, int count, int64_t step) {
  float v[kMaxProjRanges];
#pragma unroll
  for (int i = 0; i < kMaxProjRanges; ++i) v[i] = i < count ? p[i * step] : 0.0f;
  float total = v[0];
#pragma unroll
  for (int i = 1; i < kMaxProjRanges; ++i)
    if (i < count) total += v[i];
  return total;
}

// A token's projection from its pieces: cuBLASLt's products by W's hi, mid and lo parts
// ([tokens][3 split_part(m)], ||x||^2 given) or, with RANGES, projection_kernel's K ranges
// ([ranges][tokens][m], ||x||^2 the ranges' shares), summed in order; r from ||x||^2.
template <int N, bool RANGES> struct ProjectionPieces {
  static constexpr bool kRanges = RANGES;
  const float* parts;
  int ranges;
  const float* sumsq;
  int64_t K, tokens;
  __device__ float entry(int64_t t, int o) const {
    constexpr int M = width<N>(), P = split_part(M);
    if constexpr (RANGES) return sum_spaced(parts + t * M + o, ranges, tokens * M);
    const float* part = parts + t * 3 * P + o;
    return part[0] + part[P] + part[2 * P];
  }
  __device__ float r(int64_t t) const {
    const float x_sumsq = RANGES ? sum_spaced(sumsq + t, ranges, tokens) : sumsq[t];
    return 1.0f / (sqrtf(x_sumsq) / sqrtf(static_cast<float>(K)) + kNormEps);
  }
};
// H_pre[i] from r, proj entry i, alpha_pre and bias[i] (one expression for every kernel
// that makes it: the same bits).
__device__ inline float pre_gate(float rt, float p, float alpha, float bias) {
  return 1.0f / (1.0f + expf(-(rt * p * alpha + bias)));
}

// What the finish writes: proj, r, H_pre, H_post, H_res ([tokens] rows of each).
struct FinishOutputs {
  float *proj, *r, *h_pre, *h_post, *h_res;
};

// One token on its lanes (FinishLanes): proj and r from the pieces, the gates, Sinkhorn in
// registers, H_pre, H_post, H_res. The lane (i, k) owns the outputs of its entries (proj
// 2N + iN + j, H_res[i][j]); split 0 of row i also those of the row's gates (proj i and
// N + i, H_pre[i], H_post[i]).
template <int N, bool RANGES>
__device__ void finish_token(const TokenLane<FinishLanes<N>>& lane, const ProjectionPieces<N, RANGES>& pieces,
                             const float* alpha, const float* bias, int iterations, const FinishOutputs& out) {
  constexpr int M = width<N>(), CPL = FinishLanes<N>::CPL;
  const int64_t t = lane.token;
  const int i = lane.row < N ? lane.row : 0;
  auto projection = [&](int o) {
    const float p = pieces.entry(t, o);
    if (lane.store) out.proj[t * M + o] = p;
    return p;
  };
  const float rt = pieces.r(t);
  float l[CPL], h[CPL];
#pragma unroll
  for (int c = 0; c < CPL; ++c) {
    const int o = 2 * N + i * N + lane.column(c);
    l[c] = lane.holds(c) ? rt * projection(o) * alpha[2] + bias[o] : 0.0f;
  }
  if (iterations > 0) {
    sinkhorn_forward(lane, l, iterations, h);
  } else {
#pragma unroll
    for (int c = 0; c < CPL; ++c) h[c] = l[c] + (i == lane.column(c) ? 1.0f : 0.0f);
  }
  if (!lane.store) return;
#pragma unroll
  for (int c = 0; c < CPL; ++c)
    if (lane.holds(c)) out.h_res[t * N * N + i * N + lane.column(c)] = h[c];
  if (lane.split != 0) return;
  if (i == 0) out.r[t] = rt;
  out.h_pre[t * N + i] = pre_gate(rt, projection(i), alpha[0], bias[i]);
  out.h_post[t * N + i] = 2.0f / (1.0f + expf(-(rt * projection(N + i) * alpha[1] + bias[N + i])));
}

template <int N, bool RANGES>
__global__ void finish_kernel(ProjectionPieces<N, RANGES> pieces, const float* alpha, const float* bias,
                              int iterations, FinishOutputs out) {
  finish_token(token_lane<FinishLanes<N>>(pieces.tokens), pieces, alpha, bias, iterations, out);
}

// Token t's aggregate (stored where agg is not null) and its pre-norm, on one warp: the row
// made once and kept in registers for the norm's passes (norm_row_forward: norm_forward's
// bits).
template <int N, int VEC>
__device__ __forceinline__ void aggregate_norm_token(const bf16* x, const float (&gate)[N], int64_t t, int64_t C,
                                                     int lane, bf16* agg, const AggregateNorm& norm) {
  detail::AggregateRow<N, VEC, detail::kCachedSteps> row{x + t * N * C, gate, C, agg ? agg + t * C : nullptr};
  detail::norm_row_forward<VEC, detail::kCachedSteps>(row, norm.weight, norm.rms ? nullptr : norm.bias, C, norm.eps,
                                                      norm.rms, lane, norm.out + t * C,
                                                      norm.rms || !norm.mean ? nullptr : norm.mean + t, norm.rstd + t);
}

// The finish and the aggregate in one launch: the first `finish_blocks` blocks are the
// finish's (Sinkhorn chains, latency-bound: launched first, they run beside the rest), the
// others the aggregate's (TokenGroup of block blockIdx.x - finish_blocks), each token's
// group making H_pre itself (pre_gate: the finish's bits) and agg = sum_j H_pre[j] x_j
// (aggregate_values: aggregate_forward's bits). 49.5 us a call at GPT-2 width in the
// training step (Nsight Compute) against 16 + 42 for the two kernels; with the chains on
// the aggregate's own warps instead (a warp of each block), each block lived as long as
// its chain: 55 us. NORM (a warp a token, rows of at most kCachedSteps warp steps): also the
// sublayer's pre-norm of agg, from the row in registers (norm_row_forward: norm_forward's
// bits), saving the norm's pass over agg.
template <int N, int VEC, bool RANGES, bool NORM>
__device__ __forceinline__ void finish_aggregate(ProjectionPieces<N, RANGES> pieces, const float* alpha,
                                                 const float* bias, int iterations, FinishOutputs out,
                                                 unsigned finish_blocks, const bf16* x, int64_t C, int lanes, bf16* agg,
                                                 AggregateNorm norm) {
  if (blockIdx.x < finish_blocks) {
    finish_token(token_lane<FinishLanes<N>>(pieces.tokens), pieces, alpha, bias, iterations, out);
    return;
  }
  const detail::TokenGroup tg = detail::token_group(lanes, blockIdx.x - finish_blocks);
  const int64_t t = tg.token;
  if (t >= pieces.tokens) return;
  const float rt = pieces.r(t);
  float gate[N];
#pragma unroll
  for (int j = 0; j < N; ++j) gate[j] = pre_gate(rt, pieces.entry(t, j), alpha[0], bias[j]);
  if constexpr (NORM) {
    aggregate_norm_token<N, VEC>(x, gate, t, C, tg.lane, agg, norm);
  } else {
    detail::aggregate_row<N, VEC>(x + t * N * C, gate, C, tg, agg + t * C);
  }
}
template <int N, int VEC, bool RANGES>
__global__ void finish_aggregate_kernel(ProjectionPieces<N, RANGES> pieces, const float* alpha, const float* bias,
                                        int iterations, FinishOutputs out, unsigned finish_blocks, const bf16* x,
                                        int64_t C, int lanes, bf16* agg, AggregateNorm norm) {
  finish_aggregate<N, VEC, RANGES, false>(pieces, alpha, bias, iterations, out, finish_blocks, x, C, lanes, agg, norm);
}
// With the pre-norm: held to four blocks a multiprocessor (64 registers, a few bytes
// spilled; at 78 it ran three and waited on its loads: 61.0 -> 55.6 us a call at GPT-2
// width, session 14). A kernel of its own: the bound on the shared template changed the
// other variants' register allocation too.
template <int N, int VEC, bool RANGES>
__global__ void __launch_bounds__(detail::kBlockThreads, 4)
    finish_aggregate_norm_kernel(ProjectionPieces<N, RANGES> pieces, const float* alpha, const float* bias,
                                 int iterations, FinishOutputs out, unsigned finish_blocks, const bf16* x, int64_t C,
                                 int lanes, bf16* agg, AggregateNorm norm) {
  finish_aggregate<N, VEC, RANGES, true>(pieces, alpha, bias, iterations, out, finish_blocks, x, C, lanes, agg, norm);
}

// The aggregate of given gates h_pre and its pre-norm (aggregate_norm_forward), a warp a
// token: the bits of the finish-aggregate-norm pass that made them from the projection.
template <int N>
__global__ void __launch_bounds__(detail::kBlockThreads, 4)
    aggregate_norm_kernel(const bf16* x, const float* h_pre, int64_t tokens, int64_t C, AggregateNorm norm) {
  const detail::TokenGroup tg = detail::token_group(32);
  const int64_t t = tg.token;
  if (t >= tokens) return;
  float gate[N];
#pragma unroll
  for (int j = 0; j < N; ++j) gate[j] = h_pre[t * N + j];
  aggregate_norm_token<N, 8>(x, gate, t, C, tg.lane, nullptr, norm);
}

// ---- dx and dW on tensor cores, one pass over x ---------------------------------------------
//
// dx[t][k] += sum_o dproj[t][o] W[o][k] + coef[t] x[t][k] as bf16 mma.sync (m16n8k16, fp32
// sums) with tokens as the rows: A = [dp_hi | dp_hi | dp_mid] (16 tokens x 3m), B = [W_hi;
// W_mid; W_hi] (3m x 8 columns), i.e. dp_hi W_hi + dp_hi W_mid + dp_mid W_hi, accurate to
// about 2^-16, far below dx's bf16 rounding. A block has N warps, warp s on stream s: its
// 8 J channels of the block's channel range (B in registers, loaded once), its tokens 16 at
// a time; A comes from an array grad_h writes in fragment order (one 16-byte load per lane
// and k step). The columns are permuted inside the warp's range so that each lane's
// accumulators are 2 J adjacent channels of two tokens: the x and dx accesses are 16-byte
// vectors. The block's tokens are streamed through a ring of dx_stages() stages in shared
// memory filled by cp.async (the next groups' loads in flight while one is computed; with
// MIX the group's contiguous arrays by bulk copies); A's fragments are copied once per
// block, not once per warp (they were most of the L2 traffic).
//
// dW from the same x in shared memory (x is read once for both): the warp's channels as
// rows, the 16 tokens as k, dproj's bf16 parts [hi; mid; lo] as three k steps, so that
// x (hi + mid + lo) keeps fp32 accuracy: dW[o][k] = sum_t dproj[t][o] x[t][k]. Each block
// sums its tokens in registers and writes them to partials[run] (its token run), which
// are then summed over the runs in order (deterministic).
//
// MIX (the model's path): dx is written, not read and accumulated, with the stream mixing's
// and the aggregate's terms added: dx_s += sum_i H_res[i][s] dout_i + H_pre[s] dagg. Warp s
// copies dout_s of its channels into the stage, so every warp finds the dout of all N
// streams of its channels there; that is why a block's warps are the N streams.
//
// NEXT (with MIX, vectors): also dy' = sum_s H_post'[s] dx_s (dx as stored) of the hyper
// connection below, whose dout this dx is (saves h_post_bda_grad_y a pass over dx): each
// warp leaves its stream's dx of a group in its own x rows of the stage (only it reads
// them), and after the next group's barrier, before the stage is refilled, the block sums
// them over the streams in order and writes dy'. No barrier of its own but one at the end.
// With a bias gradient, dy''s column sums too: per thread over its run, then in order.

template <int N> constexpr int dx_ksteps() { return (3 * width<N>() + 15) / 16; }
// n8 column tiles per warp: fewer for wide m, so that B (J x ksteps x 2 registers) fits.
template <int N> constexpr int dx_tiles() { return dx_ksteps<N>() <= 5 ? 8 : dx_ksteps<N>() <= 9 ? 4 : 2; }
template <int N> constexpr int dx_channels() { return 8 * dx_tiles<N>(); }  // a block's channel range
// dproj's parts as grad_h writes them for dW: [hi | mid | lo] each padded to a multiple of 8.
template <int N> constexpr int dproj_part() { return (width<N>() + 7) / 8 * 8; }
// Groups in flight ahead of the one computed; NEXT keeps one more stage (a group's dx is
// summed into dy' one iteration later, so its stage is refilled one later).
constexpr int kDxAhead = 2;
template <bool NEXT> constexpr int dx_stages() { return kDxAhead + (NEXT ? 2 : 1); }

// One stage of a block's ring, in bytes: A's fragments [KS][32] (16 bytes a lane), dproj's
// parts of the 16 tokens [16][3 P], then a part per warp (x [16 tokens][8 J channels],
// rows padded by 16 bytes so that ldmatrix reads hit distinct banks; the lane's source,
// dx or dout, [2][32][COLS] for its tokens g and g + 8; their coef [2][32]); with MIX also
// dagg [2][32][COLS] and the 16 tokens' H_res [16][N N], H_pre [16][N] (and with NEXT the
// H_post [16][N] of the hyper connection below), each as it lies in memory.
template <int N, bool MIX, bool NEXT> struct DxStage {
  static constexpr int kCols = 2 * dx_tiles<N>(), kRowBytes = 2 * 32 * kCols * 2;
  static constexpr int kXRow = 16 * dx_tiles<N>() + 16;
  static constexpr int kFragments = 0, kProj = dx_ksteps<N>() * 32 * 16, kProjRow = 3 * dproj_part<N>() * 2;
  static constexpr int kWarps = kProj + 16 * kProjRow;
  static constexpr int kX = 0, kSource = 16 * kXRow, kCoef = kSource + kRowBytes, kWarpBytes = kCoef + 2 * 32 * 4;
  static constexpr int kGradAgg = kWarps + N * kWarpBytes, kMixing = kGradAgg + kRowBytes;
  static constexpr int kPre = kMixing + 16 * N * N * 4, kPost = kPre + 16 * N * 4;
  static constexpr int kBytes = MIX ? kPost + (NEXT ? 16 * N * 4 : 0) : kGradAgg;
  static_assert(kProj % 16 == 0 && kWarps % 16 == 0 && kXRow % 16 == 0 && kWarpBytes % 16 == 0 && kMixing % 16 == 0,
                "16-byte copies");
};

// The token runs of the dx/dW kernel (its grid's rows, a dW partial each): run y's groups
// of 16 tokens are G - 1 - y run_step - k group_step for k < groups, down to group 0 (G
// groups in all). From the top down, so that the kernel starts on the tokens the pass before
// it (the reductions) read last, still in L2. Where the grid is one wave, the runs
// interleave (run_step 1, group_step the run count) and sweep the tokens together: every
// block starts on those tokens (the kernel 141 -> 132 us a call at GPT-2 width, Nsight
// Compute without cache flushes). Over several waves each run is a range (group_step 1):
// interleaved runs measured about 1% slower there (sublayer 7.25 -> 7.33 ms, one call).
struct DxRuns {
  int64_t run_step, group_step, groups;
};

// Position in the fragment-ordered A array of token t's value kk (of 16 ksteps).
__host__ __device__ inline int64_t dx_fragment_index(int64_t t, int kk, int ksteps) {
  const int64_t group = t / 16;
  const int r = static_cast<int>(t % 16), s = kk / 16, k = kk % 16;
  const int lane = (r % 8) * 4 + (k % 8) / 2, reg = (k / 8) * 2 + r / 8;
  return ((group * ksteps + s) * 32 + lane) * 8 + reg * 2 + k % 2;
}

template <int N, bool NEXT> constexpr int dx_shared_bytes(bool mix) {
  return dx_stages<NEXT>() * (mix ? DxStage<N, true, NEXT>::kBytes : DxStage<N, false, false>::kBytes);
}

template <int N, int VEC, bool MIX, bool NEXT>
__global__ void __launch_bounds__(N * 32)
    grad_x_kernel(const bf16* x, const bf16* weight_split, const bf16* grad_proj_fragments, const bf16* grad_proj_parts,
                  const float* coef, StreamMixGrad mix, NextGradY next, const float* h_pre, int64_t tokens, int64_t C,
                  DxRuns runs, bf16* grad_x, float* weight_partials, float* bias_partials) {
  using Stage = DxStage<N, MIX, NEXT>;
  constexpr int M = width<N>(), KS = dx_ksteps<N>(), J = dx_tiles<N>(), COLS = Stage::kCols;
  constexpr int P = dproj_part<N>(), WM = J / 2, WN = P / 8;  // dW: m16 tiles of channels, n8 tiles of outputs
  static_assert(VEC == COLS || VEC == 1, "a lane's columns are one vector or scalars");
  static_assert(!NEXT || (MIX && VEC == COLS && COLS % 4 == 0), "NEXT: the model's path, vectors");
  const int lane = threadIdx.x % 32, s = threadIdx.x / 32, g = lane / 4, tig = lane % 4;
  const int64_t K = N * C, base = static_cast<int64_t>(blockIdx.x) * dx_channels<N>();
  // Logical column (tile j, 2 q + e) of the warp's range is channel base + 2 J q + 2 j + e.
  uint32_t b[J][KS][2];
  {
#pragma unroll
    for (int j = 0; j < J; ++j) {
      const int64_t channel = base + 2 * J * (g / 2) + 2 * j + g % 2;  // this lane's B column: n = g
#pragma unroll
      for (int k = 0; k < KS; ++k)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          bf16 pair[2];
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            const int kk = k * 16 + h * 8 + 2 * tig + e;
            // B rows [W_hi; W_mid; W_hi]: parts 0, 1, 0 of the [hi; mid; lo] split.
            const int part = kk / M == 1 ? 1 : 0, o = kk % M;
            pair[e] = kk < 3 * M && channel < C ? weight_split[(part * P + o) * K + s * C + channel]
                                                : __float2bfloat16(0.0f);
          }
          b[j][k][h] = *reinterpret_cast<const uint32_t*>(pair);
        }
    }
  }
  float dw[WM][WN][4] = {};
  const int64_t top = (tokens + 15) / 16 - 1 - blockIdx.y * runs.run_step;  // the run's first group
  const int64_t channel0 = base + COLS * tig;  // this lane's first channel
  const int64_t column0 = s * C + channel0;
  const bool lane_in = channel0 < C;
  const bf16* source = MIX ? mix.grad_out : grad_x;  // what this warp copies besides x
  extern __shared__ __align__(16) unsigned char dx_ring[];
  const int groups = top < 0 ? 0 : static_cast<int>(min(runs.groups, top / runs.group_step + 1));
  // This lane's COLS values from `from` (its first channel) to `to` (zeros where not valid).
  auto copy_lane = [&](unsigned char* to, const bf16* from, bool valid) {
    bf16* dst = reinterpret_cast<bf16*>(to);
    if constexpr (VEC == COLS) {
      const bool in = valid && lane_in;
      detail::copy_async<2 * COLS>(dst, in ? from : x, in);
    } else {
#pragma unroll
      for (int v = 0; v < COLS; ++v) dst[v] = valid && channel0 + v < C ? from[v] : __float2bfloat16(0.0f);
    }
  };
  // The next group to copy: its stage and first token, and where this thread's copies come
  // from, set once a group (no index arithmetic a copy: it was a quarter of the kernel's
  // instructions). A lane copies its tokens g and g + 8.
  constexpr int kStages = dx_stages<NEXT>();
  constexpr int kFragmentChunks = KS * 32, kPartChunks = Stage::kProjRow / 16;  // 16-byte chunks
  int next_stage = 0;
  int64_t next_begin = 16 * top;
  // With MIX a whole group's fragments, parts and H arrays, contiguous in memory, come in
  // bulk copies issued by thread 0 and land on the stage's barrier (7.5% fewer
  // instructions, 2% less time for the model's variant on the H200; without MIX, whose stage
  // is a third smaller, 2% more: not used there); a partial group's (the top one where
  // tokens % 16 != 0) come in 16-byte chunks with zeros past the tokens.
  constexpr bool kBulk = detail::kBulkCopies && MIX;
  __shared__ uint64_t stage_landed[kStages];
  if constexpr (kBulk) {
    if (threadIdx.x == 0)
      for (int k = 0; k < kStages; ++k) detail::barrier_init(&stage_landed[k], 1);
    __syncthreads();
  }
  auto issue_next = [&]() {
    unsigned char* st = dx_ring + next_stage * Stage::kBytes;
    const int64_t t = next_begin + g;
    const uint4* fragments_from =
        reinterpret_cast<const uint4*>(grad_proj_fragments) + next_begin / 16 * kFragmentChunks;
    const uint4* parts_from = reinterpret_cast<const uint4*>(grad_proj_parts + next_begin * 3 * P);
    const bf16* x_from = x + t * K + column0;
    const bf16* source_from = source + t * K + column0;
    const bf16* agg_from = MIX ? mix.grad_agg + t * C + channel0 : nullptr;
    const float* coef_from = coef + t;
    const int rows = static_cast<int>(min(static_cast<int64_t>(16), tokens - next_begin));  // the group's tokens
    if (kBulk && rows == 16) {
      if (threadIdx.x == 0) {
        constexpr unsigned kFragmentBytes = kFragmentChunks * 16, kPartBytes = 16 * Stage::kProjRow;
        constexpr unsigned kResBytes = 16 * N * N * 4, kGateBytes = 16 * N * 4;
        uint64_t* landed = &stage_landed[next_stage];
        detail::barrier_arrive(landed, kFragmentBytes + kPartBytes + kResBytes + (NEXT ? 2 : 1) * kGateBytes);
        detail::copy_bulk(st + Stage::kFragments, fragments_from, kFragmentBytes, landed);
        detail::copy_bulk(st + Stage::kProj, parts_from, kPartBytes, landed);
        detail::copy_bulk(st + Stage::kMixing, mix.h_res + next_begin * N * N, kResBytes, landed);
        detail::copy_bulk(st + Stage::kPre, h_pre + next_begin * N, kGateBytes, landed);
        if constexpr (NEXT) detail::copy_bulk(st + Stage::kPost, next.h_post + next_begin * N, kGateBytes, landed);
      }
    } else {
      if constexpr (kBulk)
        if (threadIdx.x == 0) detail::barrier_arrive(&stage_landed[next_stage], 0);
      for (int e = threadIdx.x; e < kFragmentChunks; e += N * 32)
        detail::copy_async<16>(st + Stage::kFragments + e * 16, fragments_from + e, true);
      for (int e = threadIdx.x; e < 16 * kPartChunks; e += N * 32) {
        const bool valid = e < rows * kPartChunks;
        detail::copy_async<16>(st + Stage::kProj + e * 16, valid ? parts_from + e : parts_from, valid);
      }
      if constexpr (MIX) {
        // H_res, H_pre (and H_post below) of the 16 tokens: three runs of 16-byte chunks, the
        // last token's chunk cut at the array's end.
        constexpr int kRes = 4 * N * N, kPre = kRes + 4 * N, kChunks = kPre + (NEXT ? 4 * N : 0);
        for (int e = threadIdx.x; e < kChunks; e += N * 32) {
          const bool res = e < kRes, pre = !res && e < kPre;
          const int width = res ? N * N : N;
          const float* array = res ? mix.h_res : pre ? h_pre : next.h_post;
          const int offset = 4 * (e - (res ? 0 : pre ? kRes : kPre));  // floats into the group's run
          const int bytes = max(0, min(16, 4 * (rows * width - offset)));
          detail::copy_async_prefix(st + Stage::kMixing + e * 16,
                                    bytes > 0 ? array + next_begin * width + offset : h_pre, bytes);
        }
      }
    }
    unsigned char* mine = st + Stage::kWarps + s * Stage::kWarpBytes;
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const bool valid = g + 8 * h < rows;
      const int at = (h * 32 + lane) * COLS * 2;  // this lane's bytes in a [2][32][COLS] array
      detail::copy_async<4>(mine + Stage::kCoef + (h * 32 + lane) * 4, valid ? coef_from + 8 * h : coef, valid);
      copy_lane(mine + Stage::kX + (8 * h + g) * Stage::kXRow + tig * COLS * 2, x_from + 8 * h * K, valid);
      copy_lane(mine + Stage::kSource + at, source_from + 8 * h * K, valid);
      if constexpr (MIX)
        if (s == 0) copy_lane(st + Stage::kGradAgg + at, agg_from + 8 * h * C, valid);
    }
    next_stage = next_stage + 1 == kStages ? 0 : next_stage + 1;
    next_begin -= 16 * runs.group_step;
  };
  for (int group = 0; group < kDxAhead; ++group) {
    if (group < groups) issue_next();
    detail::commit_async();
  }
  int stage = 0;
  unsigned landed_parity = 0;  // bit k: the parity of stage k's next phase
  int64_t token = 16 * top + g;
  // NEXT: dy' of the previous group, whose stage holds its dx (in the warps' x rows). A
  // thread always has the same 8 channels (16 J items over N 32 threads, a multiple of J),
  // so it sums dy' as stored over its tokens of the run for the bias gradient.
  float bias_sum[8] = {};
  auto write_next_grad_y = [&]() {
    const unsigned char* st = dx_ring + (stage == 0 ? kStages - 1 : stage - 1) * Stage::kBytes;
    const int64_t first = token - g + 16 * runs.group_step;
    for (int e = threadIdx.x; e < 16 * J; e += N * 32) {
      const int u = e / J, v = e % J;  // token of the group, its channels 8 v..
      const int64_t t = first + u, channel = base + 8 * v;
      if (t >= tokens || channel >= C) continue;
      const float* post = reinterpret_cast<const float*>(st + Stage::kPost) + u * N;
      float dy[8] = {}, dx[8];
#pragma unroll
      for (int i = 0; i < N; ++i) {
        detail::load_bf16<8>(reinterpret_cast<const bf16*>(st + Stage::kWarps + i * Stage::kWarpBytes + Stage::kX +
                                                           u * Stage::kXRow) + 8 * v, dx);
#pragma unroll
        for (int k = 0; k < 8; ++k) dy[k] += post[i] * dx[k];
      }
      detail::store_bf16<8>(next.grad_y + t * C + channel, dy);
#pragma unroll
      for (int k = 0; k < 8; ++k) bias_sum[k] += __bfloat162float(__float2bfloat16(dy[k]));
    }
  };
  for (int group = 0; group < groups; ++group) {
    detail::wait_async<kDxAhead - 1>();  // this thread's copies of the group have landed
    __syncthreads();                     // everyone's have, and everyone is done with the previous group
    if constexpr (kBulk) {               // and the stage's bulk copies
      detail::barrier_wait(&stage_landed[stage], (landed_parity >> stage) & 1u);
      landed_parity ^= 1u << stage;
    }
    if constexpr (NEXT)
      if (group > 0) write_next_grad_y();
    // Refills the stage of the group kStages - kDxAhead back, which nobody reads any more.
    if (group + kDxAhead < groups) issue_next();
    detail::commit_async();
    unsigned char* st = dx_ring + stage * Stage::kBytes;
    const unsigned char* warps = st + Stage::kWarps;
    unsigned char* xs = st + Stage::kWarps + s * Stage::kWarpBytes + Stage::kX;
    // dW: A = x^T of the warp's channels (ldmatrix.trans of x [token][channel]), B = the
    // tokens' dproj parts (ldmatrix.trans of [token][output]), one k step a part.
    {
      uint32_t a[WM][4];
#pragma unroll
      for (int mt = 0; mt < WM; ++mt)
        detail::ldmatrix<4, true>(a[mt], xs + (lane / 16 * 8 + lane % 8) * Stage::kXRow + (mt * 16 + (lane / 8) % 2 * 8) * 2);
#pragma unroll
      for (int part = 0; part < 3; ++part)
#pragma unroll
        for (int nt = 0; nt < WN; ++nt) {
          uint32_t bw[2];
          detail::ldmatrix<2, true>(bw, st + Stage::kProj + ((lane / 8) % 2 * 8 + lane % 8) * Stage::kProjRow +
                                            (part * P + nt * 8) * 2);
#pragma unroll
          for (int mt = 0; mt < WM; ++mt) detail::mma_bf16(dw[mt][nt], a[mt], bw[0], bw[1]);
        }
    }
    float c[J][4] = {};
#pragma unroll
    for (int k = 0; k < KS; ++k) {
      const uint4 a4 = *reinterpret_cast<const uint4*>(st + Stage::kFragments + (k * 32 + lane) * 16);
      const uint32_t a[4] = {a4.x, a4.y, a4.z, a4.w};
#pragma unroll
      for (int j = 0; j < J; ++j) detail::mma_bf16(c[j], a, b[j][k][0], b[j][k][1]);
    }
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int64_t t = token + 8 * h;
      if (t >= tokens || !lane_in) continue;
      const int row = (h * 32 + lane) * COLS;  // this lane's values in a [2][32][COLS] array
      auto values = [&](const unsigned char* array, float (&out)[COLS]) {
        detail::load_bf16<COLS>(reinterpret_cast<const bf16*>(array) + row, out);
      };
      float xv[COLS], gx[COLS];
      detail::load_bf16<COLS>(reinterpret_cast<const bf16*>(xs + (8 * h + g) * Stage::kXRow) + tig * COLS, xv);
      if constexpr (MIX) {
        const float* res = reinterpret_cast<const float*>(st + Stage::kMixing) + (g + 8 * h) * N * N;
        const float* pre = reinterpret_cast<const float*>(st + Stage::kPre) + (g + 8 * h) * N;
        float v[COLS];
        values(st + Stage::kGradAgg, v);
#pragma unroll
        for (int e = 0; e < COLS; ++e) gx[e] = pre[s] * v[e];
#pragma unroll
        for (int i = 0; i < N; ++i) {
          values(warps + i * Stage::kWarpBytes + Stage::kSource, v);
#pragma unroll
          for (int e = 0; e < COLS; ++e) gx[e] += res[i * N + s] * v[e];
        }
      } else {
        values(warps + s * Stage::kWarpBytes + Stage::kSource, gx);
      }
      const float ct = *reinterpret_cast<const float*>(warps + s * Stage::kWarpBytes + Stage::kCoef + (h * 32 + lane) * 4);
#pragma unroll
      for (int j = 0; j < J; ++j)
#pragma unroll
        for (int e = 0; e < 2; ++e) gx[2 * j + e] += c[j][2 * h + e] + ct * xv[2 * j + e];
      const int64_t at = t * K + column0;
      // NEXT: this lane's dx over its own x (read above; row 8 h + g, its columns only)
      if constexpr (NEXT) detail::store_bf16<COLS>(reinterpret_cast<bf16*>(xs + (8 * h + g) * Stage::kXRow) + tig * COLS, gx);
      if constexpr (VEC == COLS) {
        detail::store_bf16<COLS>(grad_x + at, gx);
      } else {
#pragma unroll
        for (int e = 0; e < COLS; ++e)
          if (channel0 + e < C) grad_x[at + e] = __float2bfloat16(gx[e]);
      }
    }
    stage = stage + 1 == kStages ? 0 : stage + 1;
    token -= 16 * runs.group_step;
  }
  if constexpr (NEXT) {
    __syncthreads();  // the last group's dx is in every warp's rows
    if (groups > 0) write_next_grad_y();
    if (next.grad_y_bias) {  // the run's column sums of dy': the threads of a channel in order
      static_assert(N * 32 % J == 0, "a thread's items share their channels");
      static_assert(kStages * Stage::kBytes >= N * 32 * 8 * 4, "the sums fit in the ring");
      __syncthreads();  // the ring is free
      float* sums = reinterpret_cast<float*>(dx_ring);
#pragma unroll
      for (int k = 0; k < 8; ++k) sums[threadIdx.x * 8 + k] = bias_sum[k];
      __syncthreads();
      for (int e = threadIdx.x; e < 8 * J; e += N * 32) {
        float total = 0;
        for (int from = e / 8; from < N * 32; from += J) total += sums[from * 8 + e % 8];
        if (base + e < C) bias_partials[static_cast<int64_t>(blockIdx.y) * C + base + e] = total;
      }
    }
  }
  // The run's dW: accumulator (mt, nt, r) is channel mt 16 + g (+ 8 for r >= 2), output
  // nt 8 + 2 tig (+ 1 for odd r).
  float* partial = weight_partials + static_cast<int64_t>(blockIdx.y) * M * K;
#pragma unroll
  for (int mt = 0; mt < WM; ++mt)
#pragma unroll
    for (int nt = 0; nt < WN; ++nt)
#pragma unroll
      for (int r = 0; r < 4; ++r) {
        const int64_t channel = base + mt * 16 + g + (r / 2) * 8;
        const int o = nt * 8 + 2 * tig + r % 2;
        if (channel < C && o < M) partial[o * K + s * C + channel] = dw[mt][nt][r];
      }
}

// ---- backward --------------------------------------------------------------------------

// Per token, on its lanes (GradHLanes): the row [dh, alpha terms (dh r proj summed by
// gate)] of width M + 3, dproj = dh r a (also split into bf16 parts for dW and in fragment
// order for dx), and the coefficient of x in dx from r: -dr r^2 / (sqrt(K) ||x||). The lane
// (i, k) owns dh's entries 2N + iN + j of its columns j; split 0 of row i also entries i
// and N + i (the gates). The rows stay in shared memory: each block writes their sum over
// its tokens, in order, to partials[block] (then summed over blocks into dbias, dalpha).
template <int N>
__global__ void __launch_bounds__(kGradHThreads)
    grad_h_kernel(const float* proj, const float* r, const float* alpha, const float* bias, const float* h_pre,
                  const float* h_post, const float* grad_h_pre, const float* grad_h_post, const float* grad_h_res,
                  int64_t tokens, int64_t K, int iterations, float* partials, bf16* grad_proj_parts,
                  bf16* grad_proj_fragments, float* coef) {
  constexpr int M = width<N>(), CPL = GradHLanes<N>::CPL, KS = dx_ksteps<N>();
  constexpr int P = dproj_part<N>();
  const TokenLane<GradHLanes<N>> lane = token_lane<GradHLanes<N>>(tokens);
  const int64_t t = lane.token;
  const int i = lane.row < N ? lane.row : 0;
  const float rt = r[t];
  const float* p = proj + t * M;
  float g[CPL], l[CPL];
#pragma unroll
  for (int c = 0; c < CPL; ++c) {
    const int j = lane.column(c);
    g[c] = lane.holds(c) ? grad_h_res[t * N * N + i * N + j] : 0.0f;
    l[c] = lane.holds(c) ? rt * p[2 * N + i * N + j] * alpha[2] + bias[2 * N + i * N + j] : 0.0f;
  }
  extern __shared__ float sinkhorn_divisors[];
  if (iterations > 0)
    sinkhorn_backward(lane, l, iterations, g,
                      sinkhorn_divisors + (threadIdx.x / GradHLanes<N>::L) * 2 * iterations * N);
  constexpr int L = GradHLanes<N>::L, kTokens = kGradHThreads / L;
  __shared__ float rows[kTokens][M + 3];  // the block's tokens' [dh, alpha terms]
  float* row = rows[threadIdx.x / L];
  float dr = 0, terms[3] = {0, 0, 0};
  bf16* split = grad_proj_parts + t * 3 * P;  // [hi | mid | lo], each P wide
  auto entry = [&](int k, int gate, float dh) {
    dr += dh * p[k] * alpha[gate];
    terms[gate] += dh * rt * p[k];
    if (!lane.store) return;
    row[k] = dh;
    split3(dh * rt * alpha[gate], &split[k], &split[P + k], &split[2 * P + k]);
    // dx's A operand: [hi | hi | mid] (see grad_x_kernel)
    grad_proj_fragments[dx_fragment_index(t, k, KS)] = split[k];
    grad_proj_fragments[dx_fragment_index(t, M + k, KS)] = split[k];
    grad_proj_fragments[dx_fragment_index(t, 2 * M + k, KS)] = split[P + k];
  };
  if (lane.row < N && lane.split == 0) {
    const float pre = h_pre[t * N + i], post = h_post[t * N + i];
    entry(i, 0, grad_h_pre[t * N + i] * pre * (1.0f - pre));
    entry(N + i, 1, grad_h_post[t * N + i] * post * (1.0f - 0.5f * post));
  }
#pragma unroll
  for (int c = 0; c < CPL; ++c)
    if (lane.holds(c)) entry(2 * N + i * N + lane.column(c), 2, g[c]);
  dr = lanes_sum<1, L>(dr);
#pragma unroll
  for (int k = 0; k < 3; ++k) terms[k] = lanes_sum<1, L>(terms[k]);
  if (lane.store && lane.row == 0 && lane.split == 0) {
    for (int kk = 3 * M; kk < KS * 16; ++kk) grad_proj_fragments[dx_fragment_index(t, kk, KS)] = __float2bfloat16(0.0f);
    for (int part = 0; part < 3; ++part)
      for (int k = M; k < P; ++k) split[part * P + k] = __float2bfloat16(0.0f);
#pragma unroll
    for (int k = 0; k < 3; ++k) row[M + k] = terms[k];
    const float sqrt_k = sqrtf(static_cast<float>(K));
    const float norm = sqrt_k * (1.0f / rt - kNormEps);
    coef[t] = norm > 0.0f ? -dr * rt * rt / (sqrt_k * norm) : 0.0f;
  }
  __syncthreads();
  const int64_t first = static_cast<int64_t>(blockIdx.x) * kTokens;
  const int count = static_cast<int>(min(static_cast<int64_t>(kTokens), tokens - first));
  for (int k = threadIdx.x; k < M + 3; k += kGradHThreads) {
    float sum = 0;
    for (int u = 0; u < count; ++u) sum += rows[u][k];
    partials[blockIdx.x * (M + 3) + k] = sum;
  }
}

// Workspace offsets in floats, each a multiple of 4 (16-byte aligned for cuBLASLt).
inline size_t aligned(size_t floats) { return (floats + 3) / 4 * 4; }

// The projection's grid: token blocks x K ranges, about one block a multiprocessor (one
// is resident at a time), at most kMaxProjRanges ranges.
struct ProjGrid {
  int64_t blocks, ranges;
};
template <int N> ProjGrid proj_grid(int64_t tokens, int64_t K) {
  const int64_t blocks = (tokens + proj_tokens<N>() - 1) / proj_tokens<N>(), chunks = (K + kProjChunk - 1) / kProjChunk;
  return {blocks, std::max<int64_t>(1, std::min({int64_t{kMaxProjRanges}, chunks, multiprocessor_count() / blocks}))};
}

struct ForwardLayout {
  int64_t M, K;
  ProjGrid grid;
  size_t parts, split_weight, sumsq, total;
};

ForwardLayout forward_layout_of(const MappingsArgs& a) {
  ForwardLayout l{};
  l.M = static_cast<int64_t>(a.n) * a.n + 2 * a.n;
  l.K = a.n * a.C;
  detail::dispatch_streams(a.n, [&](auto N) { l.grid = proj_grid<N.value>(a.tokens, l.K); });
  l.parts = 0;  // [ranges][tokens][M], or cuBLASLt's [tokens][split_rows(M)]
  l.split_weight = aligned(l.parts + a.tokens * std::max(l.grid.ranges * l.M, split_rows(l.M)));
  l.sumsq = aligned(l.split_weight + (split_rows(l.M) * l.K + 1) / 2);  // [ranges][tokens]
  l.total = l.sumsq + l.grid.ranges * a.tokens;
  return l;
}

// The dx/dW kernel's grid: channel ranges x token runs (DxRuns says which tokens a run takes);
// each run writes its own dW partial. The run count r minimises the modelled time: the kernel's
// streams (about 8 bytes a token and column: x, the source, dx, in whole waves of resident
// blocks) plus the partials written and read again (8 M bytes a column a run). More runs
// fill the last wave better and cost partial traffic (GPT-2 width: 22 runs, one wave;
// 8192,4,4,7168: 7 runs, three waves).
struct DxGrid {
  int64_t channel_blocks, runs;
  DxRuns order;
};
// Blocks of the model's variant of grad_x_kernel<N> resident at once on the current
// device (queried once a device).
template <int N> int64_t dx_resident_blocks() {
  const int per_sm =
      resident_blocks_per_sm(reinterpret_cast<const void*>(grad_x_kernel<N, 2 * dx_tiles<N>(), true, true>), N * 32,
                             dx_shared_bytes<N, true>(true));
  return std::max<int64_t>(1, static_cast<int64_t>(per_sm) * multiprocessor_count());
}

template <int N> DxGrid dx_grid(int64_t tokens, int64_t C) {
  const int64_t resident = dx_resident_blocks<N>();
  DxGrid d{};
  d.channel_blocks = (C + dx_channels<N>() - 1) / dx_channels<N>();
  double best = 0;
  for (int64_t r = 1; r <= std::min<int64_t>((tokens + 15) / 16, 4096); ++r) {
    const int64_t per_run = ((tokens + r - 1) / r + 15) / 16 * 16, runs = (tokens + per_run - 1) / per_run;
    const int64_t waves = (d.channel_blocks * runs + resident - 1) / resident;
    const double cost = 8.0 * static_cast<double>(waves * resident * per_run) / static_cast<double>(d.channel_blocks) +
                        8.0 * width<N>() * static_cast<double>(runs);
    if (r == 1 || cost < best) best = cost, d.runs = runs, d.order = {per_run / 16, 1, per_run / 16};
  }
  const int64_t groups = (tokens + 15) / 16;
  if (d.channel_blocks * d.runs <= resident) d.order = {1, d.runs, (groups + d.runs - 1) / d.runs};
  return d;
}

struct Layout {
  int64_t M, K, P;
  int64_t grad_h_blocks;  // grad_h_kernel's grid, a partial row a block
  DxGrid grid;
  size_t grad_h_partials, coef, grad_proj_parts, grad_proj_fragments, weight_split, weight_partials, bias_partials,
      total;
};

Layout layout_of(const MappingsArgs& a) {
  Layout l{};
  l.M = static_cast<int64_t>(a.n) * a.n + 2 * a.n;
  l.K = a.n * a.C;
  detail::dispatch_streams(a.n, [&](auto N) {
    l.P = dproj_part<N.value>();
    l.grad_h_blocks = detail::blocks_for(a.tokens * GradHLanes<N.value>::L, kGradHThreads);
    l.grid = dx_grid<N.value>(a.tokens, a.C);
  });
  l.grad_h_partials = 0;  // a row a grad_h block, at most one a token
  l.coef = l.grad_h_partials + a.tokens * (l.M + 3);
  l.grad_proj_parts = aligned(l.coef + a.tokens);
  l.grad_proj_fragments = aligned(l.grad_proj_parts + (a.tokens * 3 * l.P + 1) / 2);
  const int64_t fragment_values = ((a.tokens + 15) / 16 * 16) * ((3 * l.M + 15) / 16 * 16);
  l.weight_split = aligned(l.grad_proj_fragments + (fragment_values + 1) / 2);
  l.weight_partials = aligned(l.weight_split + (split_rows(l.M) * l.K + 1) / 2);
  l.bias_partials = aligned(l.weight_partials + l.grid.runs * l.M * l.K);
  l.total = l.bias_partials + l.grid.runs * a.C;
  return l;
}

// The parameter gradients from the partials the backward's kernels left in the workspace:
// dW (the token runs' partials), the next dy's bias gradient (the runs' column sums) and
// dbias, dalpha (the grad_h blocks' [dh, alpha terms] rows), each summed in a fixed order,
// in one launch.
void add_parameter_sums(const MappingsArgs& a, const Layout& l, float* grad_weight, float* grad_alpha,
                        float* grad_bias, float* grad_y_bias, const float* workspace, cudaStream_t stream) {
  const float* grad_h_rows = workspace + l.grad_h_partials;  // [dbias | dalpha] a block
  detail::add_chunk_sums({{workspace + l.weight_partials, l.grid.runs, l.M * l.K, 0, l.M * l.K, grad_weight},
                          {workspace + l.bias_partials, l.grid.runs, a.C, 0, a.C, grad_y_bias},
                          {grad_h_rows, l.grad_h_blocks, l.M + 3, 0, l.M, grad_bias},
                          {grad_h_rows, l.grad_h_blocks, l.M + 3, l.M, 3, grad_alpha}},
                         stream);
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

bool aggregate_norm_supported(int64_t C) { return detail::warp_row_fits(C); }

namespace {
void check_aggregate_norm(int64_t C, const char* op) {
  check(aggregate_norm_supported(C), std::string(op) + ": the aggregate's norm needs C a multiple of 8, at most " +
                                         std::to_string(detail::kWarpRowWidth) + " (got " + std::to_string(C) + ")");
}
}  // namespace

void aggregate_norm_forward(const bf16* x, const float* h_pre, int64_t tokens, int n, int64_t C,
                            const AggregateNorm& norm, cudaStream_t stream) {
  check_aggregate_norm(C, "aggregate_norm_forward");
  check(tokens >= 1 && tokens <= 0x7fffffff, "aggregate_norm_forward: token count out of range");
  detail::dispatch_streams(n, [&](auto N) {
    aggregate_norm_kernel<N.value>
        <<<detail::blocks_for(tokens, detail::kBlockThreads / 32), detail::kBlockThreads, 0, stream>>>(x, h_pre, tokens,
                                                                                                       C, norm);
  });
  MHC_CUDA_CHECK(cudaGetLastError());
}

size_t mappings_weight_split_elements(const MappingsArgs& a) {
  check_args(a);
  const int64_t m = static_cast<int64_t>(a.n) * a.n + 2 * a.n;
  return static_cast<size_t>(split_rows(m) * a.n * a.C);
}

void split_mappings_weights(const MappingsArgs& a, const float* const* weights, bf16* const* splits, int count,
                            cudaStream_t stream) {
  check_args(a);
  check(count >= 0, "split_mappings_weights: a negative count");
  split_weights(weights, splits, count, static_cast<int64_t>(a.n) * a.n + 2 * a.n, static_cast<int64_t>(a.n) * a.C,
                stream);
}

void row_sumsq(const bf16* x, int64_t tokens, int64_t K, float* sumsq, cudaStream_t stream) {
  const unsigned blocks = detail::blocks_for(tokens, 1);
  if (K % 8 == 0) row_sumsq_kernel<8><<<blocks, kBlockThreads, 0, stream>>>(x, K, sumsq);
  else row_sumsq_kernel<1><<<blocks, kBlockThreads, 0, stream>>>(x, K, sumsq);
  MHC_CUDA_CHECK(cudaGetLastError());
}

void mhc_mappings_forward(const MappingsArgs& a, const bf16* x, const float* x_sumsq, const float* weight,
                          const float* alpha, const float* bias, float* proj, float* r, float* h_pre, float* h_post,
                          float* h_res, float* workspace, cudaStream_t stream, const bf16* weight_split, bf16* agg,
                          const AggregateNorm* norm) {
  check_args(a);
  if (norm) check_aggregate_norm(a.C, "mhc mappings");
  const ForwardLayout l = forward_layout_of(a);
  const bf16* split =
      given_or_split(weight_split, weight, l.M, l.K, reinterpret_cast<bf16*>(workspace + l.split_weight), stream);
  float* const parts = workspace + l.parts;
  detail::dispatch_streams(a.n, [&](auto Ns) {
    constexpr int N = decltype(Ns)::value;
    const FinishOutputs out{proj, r, h_pre, h_post, h_res};
    // The finish after the products: alone, or with the aggregate in its pass over x.
    auto finish = [&](const auto& pieces) {
      constexpr bool kRanges = std::decay_t<decltype(pieces)>::kRanges;
      if (!agg && !norm) {
        finish_kernel<N, kRanges><<<detail::blocks_for(a.tokens * FinishLanes<N>::L, 128), 128, 0, stream>>>(
            pieces, alpha, bias, a.sinkhorn_iterations, out);
        return;
      }
      auto launch = [&](auto kernel, detail::TokenLaunch launch) {
        const unsigned finish_blocks = detail::blocks_for(a.tokens * FinishLanes<N>::L, launch.threads);
        check(launch.grid <= 0x7fffffffu - finish_blocks, "mhc mappings: too many tokens for one launch");
        kernel<<<finish_blocks + launch.grid, launch.threads, 0, stream>>>(
            pieces, alpha, bias, a.sinkhorn_iterations, out, finish_blocks, x, a.C, launch.lanes, agg,
            norm ? *norm : AggregateNorm{});
      };
      if (norm)
        launch(finish_aggregate_norm_kernel<N, 8, kRanges>, detail::token_launch(a.tokens, a.C, 8));
      else
        detail::launch_by_width(a.tokens, a.C, finish_aggregate_kernel<N, 8, kRanges>,
                                finish_aggregate_kernel<N, 1, kRanges>, launch);
    };
    if (x_sumsq) {
      // ||x||^2 given (the model's path): cuBLASLt's product streams x faster at GPT-2
      // widths (40 against 48 us a call). parts [tokens, split_rows] = x [tokens, K] times
      // the split W^T; column-major: the [split_rows, tokens] product of split (K x
      // split_rows, transposed) and x (K x tokens).
      Gemm g;
      g.trans_a = true;
      g.m = split_rows(l.M), g.n = a.tokens, g.k = l.K;
      g.a = split, g.lda = l.K;
      g.b = x, g.ldb = l.K;
      g.d = parts, g.ldd = split_rows(l.M);
      gemm(g, stream);
      finish(ProjectionPieces<N, false>{parts, 1, x_sumsq, l.K, a.tokens});
    } else {
      // ||x||^2 from the projection's pass; scalar copies where rows are not 16-byte aligned
      float* sumsq = workspace + l.sumsq;
      const auto kernel = l.K % 8 == 0 ? projection_kernel<N, true> : projection_kernel<N, false>;
      constexpr int bytes = proj_shared_bytes<N>();
      allow_shared_bytes(kernel, bytes);
      const dim3 grid(detail::blocks_for(l.grid.blocks, 1), detail::blocks_for(l.grid.ranges, 1));
      kernel<<<grid, kProjWarps * 32, bytes, stream>>>(x, split, a.tokens, l.K, parts, sumsq);
      MHC_CUDA_CHECK(cudaGetLastError());
      finish(ProjectionPieces<N, true>{parts, static_cast<int>(l.grid.ranges), sumsq, l.K, a.tokens});
    }
  });
  MHC_CUDA_CHECK(cudaGetLastError());
}

size_t mappings_backward_workspace_floats(const MappingsArgs& a) { return layout_of(a).total; }

bool next_grad_y_supported(const MappingsArgs& a) {
  bool supported = false;
  detail::dispatch_streams(a.n, [&](auto N) { supported = a.C % std::max(2 * dx_tiles<N.value>(), 8) == 0; });
  return supported;
}

void mhc_mappings_backward(const MappingsArgs& a, const bf16* x, const float* weight, const float* alpha,
                           const float* bias, const float* proj, const float* r, const float* h_pre,
                           const float* h_post, const float* grad_h_pre, const float* grad_h_post,
                           const float* grad_h_res, bf16* grad_x, float* grad_weight, float* grad_alpha,
                           float* grad_bias, float* workspace, const StreamMixGrad* mix, const NextGradY* next,
                           cudaStream_t stream, const bf16* weight_split, bool sums_later) {
  check_args(a);
  check(!next || (mix && next_grad_y_supported(a)), "mhc_mappings_backward: NextGradY needs StreamMixGrad and next_grad_y_supported");
  // the mixing values are copied in 16-byte chunks
  auto aligned16 = [](const void* p) { return detail::is_aligned(p, 16); };
  check(!mix || (aligned16(mix->h_res) && aligned16(h_pre) && (!next || aligned16(next->h_post))),
        "mhc_mappings_backward: with StreamMixGrad, h_res, h_pre and NextGradY's h_post must be 16-byte aligned");
  const Layout l = layout_of(a);
  float* grad_h_partials = workspace + l.grad_h_partials;
  float* coef = workspace + l.coef;
  bf16* grad_proj_parts = reinterpret_cast<bf16*>(workspace + l.grad_proj_parts);
  bf16* grad_proj_fragments = reinterpret_cast<bf16*>(workspace + l.grad_proj_fragments);
  float* weight_partials = workspace + l.weight_partials;
  float* bias_partials = workspace + l.bias_partials;
  detail::dispatch_streams(a.n, [&](auto Ns) {
    constexpr int N = decltype(Ns)::value;
    const size_t divisor_bytes = grad_h_shared_bytes<N>(a.sinkhorn_iterations);
    allow_shared_bytes(grad_h_kernel<N>, divisor_bytes);  // past 48 KB: n = 1 past 24 iterations, 2 and 4 past 48
    grad_h_kernel<N><<<static_cast<unsigned>(l.grad_h_blocks), kGradHThreads, divisor_bytes, stream>>>(
        proj, r, alpha, bias, h_pre, h_post, grad_h_pre, grad_h_post, grad_h_res, a.tokens, l.K,
        a.sinkhorn_iterations, grad_h_partials, grad_proj_parts, grad_proj_fragments, coef);
    MHC_CUDA_CHECK(cudaGetLastError());
    const bf16* split =
        given_or_split(weight_split, weight, l.M, l.K, reinterpret_cast<bf16*>(workspace + l.weight_split), stream);
    // Blocks of N warps over dx_channels<N>() channels, a token run each (DxGrid).
    const dim3 grid(detail::blocks_for(l.grid.channel_blocks, 1), detail::blocks_for(l.grid.runs, 1));
    auto launch = [&](auto kernel, auto with_mix, auto with_next) {
      constexpr int bytes = dx_shared_bytes<N, decltype(with_next)::value>(decltype(with_mix)::value);
      allow_shared_bytes(kernel, bytes);
      kernel<<<grid, N * 32, bytes, stream>>>(x, split, grad_proj_fragments, grad_proj_parts, coef,
                                              mix ? *mix : StreamMixGrad{}, next ? *next : NextGradY{}, h_pre, a.tokens,
                                              a.C, l.grid.order, grad_x, weight_partials, bias_partials);
    };
    constexpr int COLS = 2 * dx_tiles<N>();
    const bool vectors = a.C % COLS == 0;
    const std::true_type yes;
    const std::false_type no;
    if (next) launch(grad_x_kernel<N, COLS, true, true>, yes, yes);
    else if (mix && vectors) launch(grad_x_kernel<N, COLS, true, false>, yes, no);
    else if (mix) launch(grad_x_kernel<N, 1, true, false>, yes, no);
    else if (vectors) launch(grad_x_kernel<N, COLS, false, false>, no, no);
    else launch(grad_x_kernel<N, 1, false, false>, no, no);
    MHC_CUDA_CHECK(cudaGetLastError());
  });
  if (!sums_later) add_parameter_sums(a, l, grad_weight, grad_alpha, grad_bias, next ? next->grad_y_bias : nullptr,
                                      workspace, stream);
}

void mhc_mappings_backward_sums(const MappingsArgs& a, float* grad_weight, float* grad_alpha, float* grad_bias,
                                float* grad_y_bias, const float* workspace, cudaStream_t stream) {
  check_args(a);
  add_parameter_sums(a, layout_of(a), grad_weight, grad_alpha, grad_bias, grad_y_bias, workspace, stream);
}

}  // namespace mhc::cuda
