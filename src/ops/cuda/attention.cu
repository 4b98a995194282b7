#include "ops/cuda/attention.h"

#include <algorithm>
#include <cmath>

#include "core/cuda/device.h"
#include "core/rng.h"
#include "ops/cuda/kernel_utils.cuh"

namespace mhc::cuda {
namespace {

using detail::exp2_fast;
using detail::ldmatrix_x4;
using detail::mma_bf16;
using detail::pack_bf16;

// A block's warps own 16 rows each (kWarps * 16 queries, or keys in dK/dV): the other
// side streams through shared memory in tiles of 64 rows. A tile row is D bf16 plus 8 of
// padding, so that the 8 rows an ldmatrix reads fall in distinct banks.
constexpr int kBlock = 64, kWarps = 8, kThreads = 32 * kWarps, kOwnRows = 16 * kWarps;
constexpr float kLog2e = 1.4426950408889634f;
template <int D> constexpr int kStride = D + 8;
template <int D> constexpr int kTileElems = kBlock * kStride<D>;

// Starts copying rows [row0, row0 + ROWS) of a matrix (row stride ld, D columns from
// `base`) into a tile (cp.async), zeros past `rows`; the caller commits and waits.
// Each thread copies 16 bytes of every kThreads / (D / 8)-th row, unrolled: the copies sit
// in the kernels' main loops, where index arithmetic would cost as much as the math.
template <int D, int ROWS = kBlock>
__device__ void load_tile(const bf16* base, int64_t ld, int64_t row0, int64_t rows, bf16* tile) {
  constexpr int kPerRow = D / 8, kRowStep = kThreads / kPerRow, kSteps = (ROWS + kRowStep - 1) / kRowStep;
  static_assert(kThreads % kPerRow == 0, "whole rows per pass");
  const int r = static_cast<int>(threadIdx.x) / kPerRow, c = static_cast<int>(threadIdx.x) % kPerRow * 8;
#pragma unroll
  for (int i = 0; i < kSteps; ++i) {
    const int tile_row = r + i * kRowStep;
    if (ROWS % kRowStep != 0 && tile_row >= ROWS) break;
    const int64_t row = row0 + tile_row;
    const bool valid = row < rows;
    detail::copy_async<16>(tile + tile_row * kStride<D> + c, base + (valid ? row : 0) * ld + c, valid);
  }
}

// A fragment: rows [r0, r0 + 16), columns [16 ks, 16 ks + 16) of a row-major tile.
template <int D> __device__ void load_a(const bf16* tile, int r0, int ks, uint32_t (&a)[4]) {
  const int lane = threadIdx.x % 32;
  ldmatrix_x4<false>(a, tile + (r0 + lane % 8 + (lane / 8) % 2 * 8) * kStride<D> + ks * 16 + lane / 16 * 8);
}
// B fragments of two n8 tiles (b[0..1]: columns n0.., b[2..3]: n0 + 8..), k rows
// [16 ks, 16 ks + 16), from a tile stored [n][k] (B^T row-major, e.g. K for q k^T).
template <int D> __device__ void load_b_nk(const bf16* tile, int n0, int ks, uint32_t (&b)[4]) {
  const int lane = threadIdx.x % 32;
  ldmatrix_x4<false>(b, tile + (n0 + lane % 8 + lane / 16 * 8) * kStride<D> + ks * 16 + (lane / 8) % 2 * 8);
}
// The same from a tile stored [k][n] (B row-major, e.g. V for P v).
template <int D> __device__ void load_b_kn(const bf16* tile, int ks, int n0, uint32_t (&b)[4]) {
  const int lane = threadIdx.x % 32;
  ldmatrix_x4<true>(b, tile + (ks * 16 + lane % 8 + (lane / 8) % 2 * 8) * kStride<D> + n0 + lane / 16 * 8);
}
// Column of accumulator element e of n8 tile j (C layout) within its 64-column block.
__device__ inline int accumulator_column(int j, int e) { return j * 8 + 2 * static_cast<int>(threadIdx.x % 4) + e % 2; }

// Sets the scores of keys a query may not see (later keys, keys past T) to `hidden`.
// Accumulator tiles of a [query][key] block (TRANSPOSED: [key][query]): row r is this
// lane's row (g or g + 8 of the warp's 16, at `own[r]`), column u0 + accumulator_column.
template <bool TRANSPOSED>
__device__ inline void mask_scores(float (&p)[8][4], const int (&own)[2], int u0, int T, float hidden) {
#pragma unroll
  for (int j = 0; j < 8; ++j)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int mine = own[e / 2], other = u0 + accumulator_column(j, e);
      const int t = TRANSPOSED ? other : mine, u = TRANSPOSED ? mine : other;
      if (u > t || u >= T) p[j][e] = hidden;
    }
}

// The A fragment of k step ks from accumulator tiles [16 rows][8 j + ...] (C layout).
__device__ inline void accumulators_as_a(const float (&c)[8][4], int ks, uint32_t (&a)[4]) {
  a[0] = pack_bf16(c[2 * ks][0], c[2 * ks][1]);
  a[1] = pack_bf16(c[2 * ks][2], c[2 * ks][3]);
  a[2] = pack_bf16(c[2 * ks + 1][0], c[2 * ks + 1][1]);
  a[3] = pack_bf16(c[2 * ks + 1][2], c[2 * ks + 1][3]);
}

// acc [16 rows][64 columns] = A (registers, D/16 k steps) times the tile stored [n][k].
template <int D> __device__ void product_nk(const uint32_t (&a)[D / 16][4], const bf16* tile, float (&acc)[8][4]) {
#pragma unroll
  for (int j = 0; j < 8; ++j)
#pragma unroll
    for (int e = 0; e < 4; ++e) acc[j][e] = 0;
#pragma unroll
  for (int ks = 0; ks < D / 16; ++ks)
#pragma unroll
    for (int j = 0; j < 8; j += 2) {
      uint32_t b[4];
      load_b_nk<D>(tile, j * 8, ks, b);
      mma_bf16(acc[j], a[ks], b[0], b[1]);
      mma_bf16(acc[j + 1], a[ks], b[2], b[3]);
    }
}
// acc [16 rows][D] += (accumulator tiles as A, 64 columns) times the tile stored [k][n].
template <int D> __device__ void accumulate_kn(const float (&p)[8][4], const bf16* tile, float (&acc)[D / 8][4]) {
#pragma unroll
  for (int ks = 0; ks < 4; ++ks) {
    uint32_t a[4];
    accumulators_as_a(p, ks, a);
#pragma unroll
    for (int dt = 0; dt < D / 8; dt += 2) {
      uint32_t b[4];
      load_b_kn<D>(tile, ks, dt * 8, b);
      mma_bf16(acc[dt], a, b[0], b[1]);
      mma_bf16(acc[dt + 1], a, b[2], b[3]);
    }
  }
}

// Starts copying key tile kb's k and v (this head's columns of the qkv rows at `base`).
template <int D>
__device__ void load_kv(const bf16* base, int64_t row, int64_t C, int64_t kb, int64_t T, bf16* k_tile, bf16* v_tile) {
  load_tile<D>(base + C, row, kb * kBlock, T, k_tile);
  load_tile<D>(base + 2 * C, row, kb * kBlock, T, v_tile);
}

// Stores this lane's accumulator rows (C layout: rows g and g + 8 of the warp's 16) as
// bf16, each times its factor; a null row is skipped (past the sequence).
template <int D>
__device__ void store_rows(const float (&acc)[D / 8][4], bf16* const (&rows)[2], const float (&factor)[2]) {
  const int q4 = threadIdx.x % 4;
#pragma unroll
  for (int hh = 0; hh < 2; ++hh) {
    if (!rows[hh]) continue;
#pragma unroll
    for (int dt = 0; dt < D / 8; ++dt)
      *reinterpret_cast<uint32_t*>(rows[hh] + dt * 8 + 2 * q4) =
          pack_bf16(acc[dt][2 * hh] * factor[hh], acc[dt][2 * hh + 1] * factor[hh]);
  }
}

struct Head {
  int64_t T, C, H, b, h, bh;
};
// Grid (batch x heads, row blocks): every head's blocks of one weight launch together,
// the heaviest first (see own_rows), so the light ones fill the tail.
__device__ inline Head head_of(int64_t T, int64_t C, int64_t H) {
  const int64_t bh = blockIdx.x;
  return {T, C, H, bh / H, bh % H, bh};
}
// The block's first own row. Causal work grows with the query and shrinks with the key:
// query blocks (LATER_FIRST) are taken from the end of the sequence, key blocks from the
// start.
template <bool LATER_FIRST> __device__ inline int64_t own_rows() {
  const int64_t block = LATER_FIRST ? gridDim.y - 1 - blockIdx.y : blockIdx.y;
  return block * kOwnRows;
}
__device__ inline float drop(const Head& s, cpu::DropoutSpec dropout, int64_t t, int64_t u) {
  return dropout_scale<float>(dropout.key, static_cast<uint64_t>((s.bh * s.T + t) * s.T + u), dropout.p);
}

// Forward: a block takes kOwnRows queries, the key tiles up to its last query.
template <int D, bool DROPOUT>
__global__ void __launch_bounds__(kThreads, 2) flash_forward_kernel(const bf16* qkv, int64_t T, int64_t C, int64_t H,
                                                                 float scale, cpu::DropoutSpec dropout, bf16* out,
                                                                 float* lse) {
  // q, then two buffers of k and v: the next key tile is copied while this one is used.
  extern __shared__ __align__(16) bf16 shared[];
  bf16* q_tile = shared;
  auto k_tile = [&](int buffer) { return shared + kOwnRows * kStride<D> + buffer * kTileElems<D>; };
  auto v_tile = [&](int buffer) { return k_tile(2 + buffer); };
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, g = lane / 4, q4 = lane % 4;
  const Head s = head_of(T, C, H);
  const int64_t row = 3 * C, t0 = own_rows<true>();
  const bf16* base = qkv + s.b * T * row + s.h * D;
  const float scale2 = scale * kLog2e;  // scores in log2 units: exp2 is the fast path
  load_tile<D, kOwnRows>(base, row, t0, T, q_tile);
  load_kv<D>(base, row, C, 0, T, k_tile(0), v_tile(0));
  detail::commit_async();
  uint32_t qa[D / 16][4];
  float o[D / 8][4] = {}, m[2] = {-INFINITY, -INFINITY}, l[2] = {0, 0};
  const int first = static_cast<int>(t0) + warp * 16;  // this warp's first query
  const int tq[2] = {first + g, first + g + 8};
  const int last_tile = static_cast<int>(((t0 + kOwnRows < T ? t0 + kOwnRows : T) - 1) / kBlock);
  for (int kb = 0; kb <= last_tile; ++kb) {
    const int buffer = kb & 1;
    if (kb < last_tile) load_kv<D>(base, row, C, kb + 1, T, k_tile(buffer ^ 1), v_tile(buffer ^ 1));
    detail::commit_async();
    detail::wait_async<1>();
    __syncthreads();
    if (kb == 0)
#pragma unroll
      for (int ks = 0; ks < D / 16; ++ks) load_a<D>(q_tile, warp * 16, ks, qa[ks]);
    const int u0 = kb * kBlock;
    if (u0 <= first + 15) {  // else every key of the tile is after this warp's queries
      float p[8][4];
      product_nk<D>(qa, k_tile(buffer), p);
      // Only the tile reaching this warp's queries (or past T) needs the mask.
      if (u0 + kBlock - 1 > first || u0 + kBlock > T)
        mask_scores<false>(p, tq, u0, static_cast<int>(T), -INFINITY);
      // m is in scaled log2 units. Key 0 precedes every query, so after the first tile every
      // row's max is finite; before it m = -inf and the correction is exp2(-inf) = 0.
      float mx[2] = {p[0][0], p[0][2]};
#pragma unroll
      for (int j = 0; j < 8; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) mx[e / 2] = fmaxf(mx[e / 2], p[j][e]);
#pragma unroll
      for (int hh = 0; hh < 2; ++hh) {
        mx[hh] = fmaxf(mx[hh], __shfl_xor_sync(0xffffffffu, mx[hh], 1));
        mx[hh] = fmaxf(mx[hh], __shfl_xor_sync(0xffffffffu, mx[hh], 2));
        const float m_new = fmaxf(m[hh], mx[hh] * scale2);
        const float correction = exp2_fast(m[hh] - m_new);
        l[hh] *= correction;
#pragma unroll
        for (int dt = 0; dt < D / 8; ++dt) o[dt][2 * hh] *= correction, o[dt][2 * hh + 1] *= correction;
        m[hh] = m_new;
      }
#pragma unroll
      for (int j = 0; j < 8; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int hh = e / 2;
          const float pe = exp2_fast(fmaf(p[j][e], scale2, -m[hh]));
          l[hh] += pe;  // the normaliser is over P before dropout
          p[j][e] = pe;
          if constexpr (DROPOUT) p[j][e] *= drop(s, dropout, tq[hh], u0 + accumulator_column(j, e));
        }
      accumulate_kn<D>(p, v_tile(buffer), o);
    }
    __syncthreads();  // this buffer is refilled next iteration
  }
  bf16* rows[2];
  float inverse[2];
#pragma unroll
  for (int hh = 0; hh < 2; ++hh) {
    l[hh] += __shfl_xor_sync(0xffffffffu, l[hh], 1);
    l[hh] += __shfl_xor_sync(0xffffffffu, l[hh], 2);
    rows[hh] = tq[hh] < T ? out + (s.b * T + tq[hh]) * C + s.h * D : nullptr;
    inverse[hh] = 1.0f / l[hh];
    if (q4 == 0 && tq[hh] < T) lse[s.bh * T + tq[hh]] = m[hh] + log2f(l[hh]);  // log2 units
  }
  store_rows<D>(o, rows, inverse);
}

// dK, dV: a block takes kOwnRows keys, the query tiles from its first key on.
template <int D, bool DROPOUT>
__global__ void __launch_bounds__(kThreads) flash_backward_kv_kernel(const bf16* qkv, const bf16* grad_out,
                                                                     const float* lse, const float* delta, int64_t T,
                                                                     int64_t C, int64_t H, float scale,
                                                                     cpu::DropoutSpec dropout, bf16* grad_qkv) {
  // two buffers of q, dout, lse and delta (the q buffers first bring this block's k and v)
  __shared__ __align__(16) bf16 q_tile[2][kTileElems<D>], do_tile[2][kTileElems<D>];
  __shared__ float lse_s[2][kBlock], delta_s[2][kBlock];
  static_assert(kOwnRows <= 2 * kBlock, "the block's keys are staged through the two q buffers");
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, g = lane / 4;
  const Head s = head_of(T, C, H);
  const int64_t row = 3 * C, k0 = own_rows<false>();
  const bf16* base = qkv + s.b * T * row + s.h * D;
  const bf16* go = grad_out + s.b * T * C + s.h * D;
  const float scale2 = scale * kLog2e;
  uint32_t ka[D / 16][4], va[D / 16][4];
#pragma unroll
  for (int which = 0; which < 2; ++which) {
    load_tile<D, kOwnRows>(base + (1 + which) * C, row, k0, T, q_tile[0]);
    detail::commit_async();
    detail::wait_async<0>();
    __syncthreads();
#pragma unroll
    for (int ks = 0; ks < D / 16; ++ks) load_a<D>(q_tile[0], warp * 16, ks, which == 0 ? ka[ks] : va[ks]);
    __syncthreads();
  }
  auto issue = [&](int qb, int buffer) {
    load_tile<D>(base, row, static_cast<int64_t>(qb) * kBlock, T, q_tile[buffer]);
    load_tile<D>(go, C, static_cast<int64_t>(qb) * kBlock, T, do_tile[buffer]);
    if (threadIdx.x < 2 * kBlock) {  // lse by the first kBlock threads, delta by the next
      const int local = static_cast<int>(threadIdx.x) % kBlock;
      const int64_t t = static_cast<int64_t>(qb) * kBlock + local;
      const float* source = threadIdx.x < kBlock ? lse : delta;
      float* target = threadIdx.x < kBlock ? lse_s[buffer] : delta_s[buffer];
      detail::copy_async<4>(target + local, source + s.bh * T + (t < T ? t : 0), t < T);
    }
  };
  float dk[D / 8][4] = {}, dv[D / 8][4] = {};
  const int first = static_cast<int>(k0) + warp * 16;  // this warp's first key
  const int ku[2] = {first + g, first + g + 8};
  const int first_tile = static_cast<int>(k0 / kBlock), query_tiles = static_cast<int>((T + kBlock - 1) / kBlock);
  issue(first_tile, 0);
  detail::commit_async();
  for (int qb = first_tile; qb < query_tiles; ++qb) {
    const int buffer = (qb - first_tile) & 1;
    if (qb + 1 < query_tiles) issue(qb + 1, buffer ^ 1);
    detail::commit_async();
    detail::wait_async<1>();
    __syncthreads();
    const int t0 = qb * kBlock;
    if (t0 + kBlock - 1 >= first) {  // else every query of the tile is before this warp's keys
      // P^T [keys][queries] and, for dV, D P^T. Only tiles reaching back to this warp's
      // keys (or past T) need the mask. (Rows past T are zeros: no contribution.)
      float p[8][4], pd[8][4];
      product_nk<D>(ka, q_tile[buffer], p);
      if (t0 < first + 15 || t0 + kBlock > T || first + 16 > T)
        mask_scores<true>(p, ku, t0, static_cast<int>(T), -INFINITY);
#pragma unroll
      for (int j = 0; j < 8; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int local = accumulator_column(j, e);
          p[j][e] = exp2_fast(fmaf(p[j][e], scale2, -lse_s[buffer][local]));
          pd[j][e] = p[j][e];
          if constexpr (DROPOUT) pd[j][e] *= drop(s, dropout, t0 + local, ku[e / 2]);
        }
      accumulate_kn<D>(pd, do_tile[buffer], dv);
      // dP^T = v dout^T; dS^T = P^T (D dP^T - delta) (times scale when dK is stored)
      product_nk<D>(va, do_tile[buffer], pd);
#pragma unroll
      for (int j = 0; j < 8; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int local = accumulator_column(j, e);
          float dp = pd[j][e];
          if constexpr (DROPOUT) dp *= drop(s, dropout, t0 + local, ku[e / 2]);
          pd[j][e] = p[j][e] * (dp - delta_s[buffer][local]);
        }
      accumulate_kn<D>(pd, q_tile[buffer], dk);
    }
    __syncthreads();  // this buffer is refilled next iteration
  }
  bf16 *k_rows[2], *v_rows[2];
  const float one[2] = {1.0f, 1.0f}, scaled[2] = {scale, scale};
#pragma unroll
  for (int hh = 0; hh < 2; ++hh) {
    bf16* grow = ku[hh] < T ? grad_qkv + (s.b * T + ku[hh]) * row + s.h * D : nullptr;
    k_rows[hh] = grow ? grow + C : nullptr;
    v_rows[hh] = grow ? grow + 2 * C : nullptr;
  }
  store_rows<D>(dk, k_rows, scaled);
  store_rows<D>(dv, v_rows, one);
}

// delta_t = dout_t . out_t (= sum_u P_tu D_tu dP_tu, the softmax backward's row term) of
// this warp's 16 rows from `first`: two lanes a row, each half of it, one shuffle; every
// lane gets its rows' values (its accumulator rows g and g + 8); lanes 0, 2, .. store them.
template <int D>
__device__ void row_deltas(const bf16* grad_out, const bf16* out, int64_t row0, int64_t ld, int first, int64_t T,
                           float* delta, float (&mine)[2]) {
  const int lane = threadIdx.x % 32, t = first + lane / 2, d0 = lane % 2 * (D / 2);
  float sum = 0;
  if (t < T)
#pragma unroll
    for (int d = d0; d < d0 + D / 2; d += 8) {
      float a[8], b[8];
      detail::load_bf16<8>(grad_out + (row0 + t) * ld + d, a);
      detail::load_bf16<8>(out + (row0 + t) * ld + d, b);
#pragma unroll
      for (int k = 0; k < 8; ++k) sum += a[k] * b[k];
    }
  sum += __shfl_xor_sync(0xffffffffu, sum, 1);
  if (lane % 2 == 0 && t < T) delta[t] = sum;
  const int g = lane / 4;
  mine[0] = __shfl_sync(0xffffffffu, sum, 2 * g);
  mine[1] = __shfl_sync(0xffffffffu, sum, 2 * g + 16);
}

// dQ (and delta, which the dK/dV kernel reads after it): a block takes kOwnRows queries,
// the key tiles up to its last query.
template <int D, bool DROPOUT>
__global__ void __launch_bounds__(kThreads) flash_backward_q_kernel(const bf16* qkv, const bf16* grad_out,
                                                                    const bf16* out, const float* lse, int64_t T,
                                                                    int64_t C, int64_t H, float scale,
                                                                    cpu::DropoutSpec dropout, float* delta,
                                                                    bf16* grad_qkv) {
  // two buffers of k and v (the k buffers first bring this block's q, the v buffers its dout)
  __shared__ __align__(16) bf16 k_tile[2][kTileElems<D>], v_tile[2][kTileElems<D>];
  static_assert(kOwnRows <= 2 * kBlock, "the block's queries are staged through the two k buffers");
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, g = lane / 4;
  const Head s = head_of(T, C, H);
  const int64_t row = 3 * C, t0 = own_rows<true>();
  const bf16* base = qkv + s.b * T * row + s.h * D;
  const float scale2 = scale * kLog2e;
  uint32_t qa[D / 16][4], doa[D / 16][4];
  load_tile<D, kOwnRows>(base, row, t0, T, k_tile[0]);
  load_tile<D, kOwnRows>(grad_out + s.b * T * C + s.h * D, C, t0, T, v_tile[0]);
  detail::commit_async();
  detail::wait_async<0>();
  __syncthreads();
#pragma unroll
  for (int ks = 0; ks < D / 16; ++ks) {
    load_a<D>(k_tile[0], warp * 16, ks, qa[ks]);
    load_a<D>(v_tile[0], warp * 16, ks, doa[ks]);
  }
  __syncthreads();
  const int first = static_cast<int>(t0) + warp * 16;  // this warp's first query
  const int tq[2] = {first + g, first + g + 8};
  float row_lse[2], row_delta[2];
  row_deltas<D>(grad_out + s.h * D, out + s.h * D, s.b * T, C, first, T, delta + s.bh * T, row_delta);
#pragma unroll
  for (int hh = 0; hh < 2; ++hh) row_lse[hh] = tq[hh] < T ? lse[s.bh * T + tq[hh]] : 0.0f;
  float dq[D / 8][4] = {};
  const int last_tile = static_cast<int>(((t0 + kOwnRows < T ? t0 + kOwnRows : T) - 1) / kBlock);
  load_kv<D>(base, row, C, 0, T, k_tile[0], v_tile[0]);
  detail::commit_async();
  for (int kb = 0; kb <= last_tile; ++kb) {
    const int buffer = kb & 1;
    if (kb < last_tile) load_kv<D>(base, row, C, kb + 1, T, k_tile[buffer ^ 1], v_tile[buffer ^ 1]);
    detail::commit_async();
    detail::wait_async<1>();
    __syncthreads();
    const int u0 = kb * kBlock;
    if (u0 <= first + 15) {  // else every key of the tile is after this warp's queries
      float p[8][4], ds[8][4];
      product_nk<D>(qa, k_tile[buffer], p);
      if (u0 + kBlock - 1 > first || u0 + kBlock > T)
        mask_scores<false>(p, tq, u0, static_cast<int>(T), -INFINITY);
      product_nk<D>(doa, v_tile[buffer], ds);  // dP = dout v^T
#pragma unroll
      for (int j = 0; j < 8; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int hh = e / 2;
          const float pe = exp2_fast(fmaf(p[j][e], scale2, -row_lse[hh]));
          float dp = ds[j][e];
          if constexpr (DROPOUT) dp *= drop(s, dropout, tq[hh], u0 + accumulator_column(j, e));
          ds[j][e] = pe * (dp - row_delta[hh]);  // times scale when dQ is stored
        }
      accumulate_kn<D>(ds, k_tile[buffer], dq);
    }
    __syncthreads();  // this buffer is refilled next iteration
  }
  bf16* q_rows[2];
  const float scaled[2] = {scale, scale};
#pragma unroll
  for (int hh = 0; hh < 2; ++hh) q_rows[hh] = tq[hh] < T ? grad_qkv + (s.b * T + tq[hh]) * row + s.h * D : nullptr;
  store_rows<D>(dq, q_rows, scaled);
}

struct Geometry {
  int64_t T, C, H, d;
};
Geometry geometry_of(const cpu::AttentionShape& s) {
  check(s.batch >= 1 && s.seq >= 1 && s.heads >= 1 && s.C % s.heads == 0, "attention: bad shape");
  check(s.seq <= int64_t{65535} * kOwnRows, "attention: sequence length out of range");
  check(attention_head_dim_supported(s.C / s.heads),
        "hidden_size / num_attention_heads: the CUDA attention takes head dims 16, 32 or 64, got " +
            std::to_string(s.C / s.heads));
  return {s.seq, s.C, s.heads, s.C / s.heads};
}

// launch(head dim, dropout on) as integral constants.
template <typename Launch> void dispatch_kernel(int64_t d, cpu::DropoutSpec dropout, Launch&& launch) {
  auto with_dropout = [&](auto D) {
    if (dropout.p > 0.0f) launch(D, std::true_type{});
    else launch(D, std::false_type{});
  };
  switch (d) {
    case 16: with_dropout(std::integral_constant<int, 16>{}); break;
    case 32: with_dropout(std::integral_constant<int, 32>{}); break;
    default: with_dropout(std::integral_constant<int, 64>{}); break;
  }
}

}  // namespace

bool attention_head_dim_supported(int64_t d) { return d == 16 || d == 32 || d == 64; }

size_t attention_workspace_bytes(const cpu::AttentionShape& s) {
  return static_cast<size_t>(s.batch * s.heads * s.seq) * sizeof(float);
}

void attention_forward(const cpu::AttentionShape& s, const bf16* qkv, cpu::DropoutSpec dropout, float* lse, bf16* out,
                       cudaStream_t stream) {
  const Geometry g = geometry_of(s);
  const dim3 grid(detail::blocks_for(s.batch * g.H, 1), detail::blocks_for(g.T, kOwnRows));
  const float scale = 1.0f / std::sqrt(static_cast<float>(g.d));
  dispatch_kernel(g.d, dropout, [&](auto Dc, auto drop) {
    constexpr int D = decltype(Dc)::value;
    const auto kernel = flash_forward_kernel<D, decltype(drop)::value>;
    const int shared = (kOwnRows + 4 * kBlock) * kStride<D> * static_cast<int>(sizeof(bf16));
    MHC_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, shared));
    kernel<<<grid, kThreads, shared, stream>>>(qkv, g.T, g.C, g.H, scale, dropout, out, lse);
  });
  MHC_CUDA_CHECK(cudaGetLastError());
}

void attention_backward(const cpu::AttentionShape& s, const bf16* grad_out, const bf16* qkv, const bf16* out,
                        const float* lse, cpu::DropoutSpec dropout, bf16* grad_qkv, void* workspace,
                        cudaStream_t stream) {
  const Geometry g = geometry_of(s);
  float* delta = static_cast<float*>(workspace);
  const dim3 grid(detail::blocks_for(s.batch * g.H, 1), detail::blocks_for(g.T, kOwnRows));
  const float scale = 1.0f / std::sqrt(static_cast<float>(g.d));
  dispatch_kernel(g.d, dropout, [&](auto Dc, auto drop) {
    constexpr int D = decltype(Dc)::value;
    constexpr bool DROPOUT = decltype(drop)::value;
    flash_backward_q_kernel<D, DROPOUT><<<grid, kThreads, 0, stream>>>(qkv, grad_out, out, lse, g.T, g.C, g.H,
                                                                       scale, dropout, delta, grad_qkv);
    MHC_CUDA_CHECK(cudaGetLastError());
    flash_backward_kv_kernel<D, DROPOUT><<<grid, kThreads, 0, stream>>>(qkv, grad_out, lse, delta, g.T, g.C, g.H,
                                                                        scale, dropout, grad_qkv);
  });
  MHC_CUDA_CHECK(cudaGetLastError());
}

}  // namespace mhc::cuda
