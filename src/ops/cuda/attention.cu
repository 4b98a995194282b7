#include "ops/cuda/attention.h"

#include <cmath>

#include "core/cuda/device.h"
#include "core/rng.h"
#include "ops/cuda/kernel_utils.cuh"

namespace mhc::cuda {
namespace {

using detail::ldmatrix_x4;
using detail::mma_bf16;
using detail::pack_bf16;

// Tiles of 64 queries or keys; four warps, 16 rows each. A tile row is D bf16 plus 8 of
// padding, so that the 8 rows an ldmatrix reads fall in distinct banks.
constexpr int kBlock = 64, kThreads = 128;
constexpr float kLog2e = 1.4426950408889634f;
template <int D> constexpr int kStride = D + 8;

// Starts copying rows [row0, row0 + 64) of a matrix (row stride ld, D columns from
// `base`) into a tile (cp.async), zeros past `rows`; the caller commits and waits.
template <int D> __device__ void load_tile(const bf16* base, int64_t ld, int64_t row0, int64_t rows, bf16* tile) {
  for (int e = threadIdx.x; e < kBlock * D / 8; e += kThreads) {
    const int r = e / (D / 8), c = e % (D / 8) * 8;
    const bool valid = row0 + r < rows;
    detail::copy_async<16>(tile + r * kStride<D> + c, valid ? base + (row0 + r) * ld + c : base, valid);
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
__device__ inline Head head_of(int64_t T, int64_t C, int64_t H) {
  const int64_t bh = blockIdx.y;
  return {T, C, H, bh / H, bh % H, bh};
}
__device__ inline float drop(const Head& s, cpu::DropoutSpec dropout, int64_t t, int64_t u) {
  return dropout_scale<float>(dropout.key, static_cast<uint64_t>((s.bh * s.T + t) * s.T + u), dropout.p);
}

template <int D>
__global__ void __launch_bounds__(kThreads) flash_forward_kernel(const bf16* qkv, int64_t T, int64_t C, int64_t H,
                                                                 float scale, cpu::DropoutSpec dropout, bf16* out,
                                                                 float* lse) {
  // q, then two buffers of k and v: the next key tile is copied while this one is used.
  __shared__ __align__(16) bf16 q_tile[kBlock * kStride<D>], k_tile[2][kBlock * kStride<D>],
      v_tile[2][kBlock * kStride<D>];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, g = lane / 4, q4 = lane % 4;
  const Head s = head_of(T, C, H);
  const int64_t row = 3 * C, qb = blockIdx.x, t0 = qb * kBlock;
  const bf16* base = qkv + s.b * T * row + s.h * D;
  const float scale2 = scale * kLog2e;  // scores in log2 units: exp2 is the fast path
  load_tile<D>(base, row, t0, T, q_tile);
  load_kv<D>(base, row, C, 0, T, k_tile[0], v_tile[0]);
  detail::commit_async();
  uint32_t qa[D / 16][4];
  float o[D / 8][4] = {}, m[2] = {-INFINITY, -INFINITY}, l[2] = {0, 0};
  const int64_t tq[2] = {t0 + warp * 16 + g, t0 + warp * 16 + g + 8};
  for (int64_t kb = 0; kb <= qb; ++kb) {
    const int buffer = static_cast<int>(kb & 1);
    if (kb < qb) load_kv<D>(base, row, C, kb + 1, T, k_tile[buffer ^ 1], v_tile[buffer ^ 1]);
    detail::commit_async();
    detail::wait_async<1>();
    __syncthreads();
    if (kb == 0)
#pragma unroll
      for (int ks = 0; ks < D / 16; ++ks) load_a<D>(q_tile, warp * 16, ks, qa[ks]);
    float p[8][4];
    product_nk<D>(qa, k_tile[buffer], p);
    float mx[2] = {-INFINITY, -INFINITY};
#pragma unroll
    for (int j = 0; j < 8; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int hh = e / 2;
        const int64_t u = kb * kBlock + accumulator_column(j, e);
        p[j][e] = u > tq[hh] || u >= T ? -INFINITY : p[j][e] * scale2;
        mx[hh] = fmaxf(mx[hh], p[j][e]);
      }
#pragma unroll
    for (int hh = 0; hh < 2; ++hh) {
      mx[hh] = fmaxf(mx[hh], __shfl_xor_sync(0xffffffffu, mx[hh], 1));
      mx[hh] = fmaxf(mx[hh], __shfl_xor_sync(0xffffffffu, mx[hh], 2));
      const float m_new = fmaxf(m[hh], mx[hh]);
      const float correction = m_new == -INFINITY ? 1.0f : exp2f(m[hh] - m_new);
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
        const float pe = m[hh] == -INFINITY ? 0.0f : exp2f(p[j][e] - m[hh]);
        l[hh] += pe;  // the normaliser is over P before dropout
        p[j][e] = pe * drop(s, dropout, tq[hh], kb * kBlock + accumulator_column(j, e));
      }
    accumulate_kn<D>(p, v_tile[buffer], o);
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
    if (q4 == 0 && tq[hh] < T) lse[s.bh * T + tq[hh]] = (m[hh] + log2f(l[hh])) / kLog2e;  // natural log
  }
  store_rows<D>(o, rows, inverse);
}

// delta[b h][t] = dout_t . out_t (= sum_u P_tu D_tu dP_tu, the softmax backward's row term).
template <int D>
__global__ void delta_kernel(const bf16* grad_out, const bf16* out, int64_t rows, int64_t T, int64_t C, int64_t H,
                             float* delta) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;  // (b h) T + t
  if (i >= rows) return;
  const int64_t bh = i / T, t = i % T, b = bh / H, h = bh % H;
  const int64_t at = (b * T + t) * C + h * D;
  float sum = 0;
  for (int d = 0; d < D; d += 8) {
    float x[8], y[8];
    detail::load_bf16<8>(grad_out + at + d, x);
    detail::load_bf16<8>(out + at + d, y);
    for (int k = 0; k < 8; ++k) sum += x[k] * y[k];
  }
  delta[i] = sum;
}

template <int D>
__global__ void __launch_bounds__(kThreads) flash_backward_kv_kernel(const bf16* qkv, const bf16* grad_out,
                                                                     const float* lse, const float* delta, int64_t T,
                                                                     int64_t C, int64_t H, float scale,
                                                                     cpu::DropoutSpec dropout, bf16* grad_qkv) {
  // this block's k and v (through one tile), then two buffers of q, dout, lse and delta
  __shared__ __align__(16) bf16 kv_tile[kBlock * kStride<D>], q_tile[2][kBlock * kStride<D>],
      do_tile[2][kBlock * kStride<D>];
  __shared__ float lse_s[2][kBlock], delta_s[2][kBlock];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, g = lane / 4;
  const Head s = head_of(T, C, H);
  const int64_t row = 3 * C, kb = blockIdx.x;
  const bf16* base = qkv + s.b * T * row + s.h * D;
  const bf16* go = grad_out + s.b * T * C + s.h * D;
  const float scale2 = scale * kLog2e;
  uint32_t ka[D / 16][4], va[D / 16][4];
#pragma unroll
  for (int which = 0; which < 2; ++which) {
    load_tile<D>(base + (1 + which) * C, row, kb * kBlock, T, kv_tile);
    detail::commit_async();
    detail::wait_async<0>();
    __syncthreads();
#pragma unroll
    for (int ks = 0; ks < D / 16; ++ks) load_a<D>(kv_tile, warp * 16, ks, which == 0 ? ka[ks] : va[ks]);
    __syncthreads();
  }
  auto issue = [&](int64_t qb, int buffer) {
    load_tile<D>(base, row, qb * kBlock, T, q_tile[buffer]);
    load_tile<D>(go, C, qb * kBlock, T, do_tile[buffer]);
    if (threadIdx.x < kBlock) {
      const int64_t t = qb * kBlock + threadIdx.x;
      lse_s[buffer][threadIdx.x] = t < T ? lse[s.bh * T + t] * kLog2e : 0.0f;
      delta_s[buffer][threadIdx.x] = t < T ? delta[s.bh * T + t] : 0.0f;
    }
  };
  float dk[D / 8][4] = {}, dv[D / 8][4] = {};
  const int64_t ku[2] = {kb * kBlock + warp * 16 + g, kb * kBlock + warp * 16 + g + 8};
  const int64_t query_blocks = (T + kBlock - 1) / kBlock;
  issue(kb, 0);
  detail::commit_async();
  for (int64_t qb = kb; qb < query_blocks; ++qb) {
    const int buffer = static_cast<int>((qb - kb) & 1);
    if (qb + 1 < query_blocks) issue(qb + 1, buffer ^ 1);
    detail::commit_async();
    detail::wait_async<1>();
    __syncthreads();
    // P^T [keys][queries] and, for dV, D P^T.
    float p[8][4], pd[8][4];
    product_nk<D>(ka, q_tile[buffer], p);
#pragma unroll
    for (int j = 0; j < 8; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int local = accumulator_column(j, e);
        const int64_t t = qb * kBlock + local, u = ku[e / 2];
        p[j][e] = t >= T || t < u || u >= T ? 0.0f : exp2f(p[j][e] * scale2 - lse_s[buffer][local]);
        pd[j][e] = p[j][e] * drop(s, dropout, t, u);
      }
    accumulate_kn<D>(pd, do_tile[buffer], dv);
    // dP^T = v dout^T; dS^T = P^T (D dP^T - delta) scale
    product_nk<D>(va, do_tile[buffer], pd);
#pragma unroll
    for (int j = 0; j < 8; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int local = accumulator_column(j, e);
        const int64_t t = qb * kBlock + local, u = ku[e / 2];
        pd[j][e] =
            p[j][e] == 0.0f ? 0.0f : p[j][e] * (pd[j][e] * drop(s, dropout, t, u) - delta_s[buffer][local]) * scale;
      }
    accumulate_kn<D>(pd, q_tile[buffer], dk);
    __syncthreads();  // this buffer is refilled next iteration
  }
  bf16 *k_rows[2], *v_rows[2];
  const float one[2] = {1.0f, 1.0f};
#pragma unroll
  for (int hh = 0; hh < 2; ++hh) {
    bf16* grow = ku[hh] < T ? grad_qkv + (s.b * T + ku[hh]) * row + s.h * D : nullptr;
    k_rows[hh] = grow ? grow + C : nullptr;
    v_rows[hh] = grow ? grow + 2 * C : nullptr;
  }
  store_rows<D>(dk, k_rows, one);
  store_rows<D>(dv, v_rows, one);
}

template <int D>
__global__ void __launch_bounds__(kThreads) flash_backward_q_kernel(const bf16* qkv, const bf16* grad_out,
                                                                    const float* lse, const float* delta, int64_t T,
                                                                    int64_t C, int64_t H, float scale,
                                                                    cpu::DropoutSpec dropout, bf16* grad_qkv) {
  // two buffers of k and v (the first one also brings this block's q and dout)
  __shared__ __align__(16) bf16 k_tile[2][kBlock * kStride<D>], v_tile[2][kBlock * kStride<D>];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, g = lane / 4;
  const Head s = head_of(T, C, H);
  const int64_t row = 3 * C, qb = blockIdx.x, t0 = qb * kBlock;
  const bf16* base = qkv + s.b * T * row + s.h * D;
  const float scale2 = scale * kLog2e;
  uint32_t qa[D / 16][4], doa[D / 16][4];
  load_tile<D>(base, row, t0, T, k_tile[0]);
  load_tile<D>(grad_out + s.b * T * C + s.h * D, C, t0, T, v_tile[0]);
  detail::commit_async();
  detail::wait_async<0>();
  __syncthreads();
#pragma unroll
  for (int ks = 0; ks < D / 16; ++ks) {
    load_a<D>(k_tile[0], warp * 16, ks, qa[ks]);
    load_a<D>(v_tile[0], warp * 16, ks, doa[ks]);
  }
  __syncthreads();
  const int64_t tq[2] = {t0 + warp * 16 + g, t0 + warp * 16 + g + 8};
  float row_lse[2], row_delta[2];
#pragma unroll
  for (int hh = 0; hh < 2; ++hh) {
    row_lse[hh] = tq[hh] < T ? lse[s.bh * T + tq[hh]] * kLog2e : 0.0f;
    row_delta[hh] = tq[hh] < T ? delta[s.bh * T + tq[hh]] : 0.0f;
  }
  float dq[D / 8][4] = {};
  load_kv<D>(base, row, C, 0, T, k_tile[0], v_tile[0]);
  detail::commit_async();
  for (int64_t kb = 0; kb <= qb; ++kb) {
    const int buffer = static_cast<int>(kb & 1);
    if (kb < qb) load_kv<D>(base, row, C, kb + 1, T, k_tile[buffer ^ 1], v_tile[buffer ^ 1]);
    detail::commit_async();
    detail::wait_async<1>();
    __syncthreads();
    float p[8][4], ds[8][4];
    product_nk<D>(qa, k_tile[buffer], p);
    product_nk<D>(doa, v_tile[buffer], ds);  // dP = dout v^T
#pragma unroll
    for (int j = 0; j < 8; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int hh = e / 2;
        const int64_t u = kb * kBlock + accumulator_column(j, e);
        const float pe = u > tq[hh] || u >= T || tq[hh] >= T ? 0.0f : exp2f(p[j][e] * scale2 - row_lse[hh]);
        ds[j][e] = pe == 0.0f ? 0.0f : pe * (ds[j][e] * drop(s, dropout, tq[hh], u) - row_delta[hh]) * scale;
      }
    accumulate_kn<D>(ds, k_tile[buffer], dq);
    __syncthreads();  // this buffer is refilled next iteration
  }
  bf16* q_rows[2];
  const float one[2] = {1.0f, 1.0f};
#pragma unroll
  for (int hh = 0; hh < 2; ++hh) q_rows[hh] = tq[hh] < T ? grad_qkv + (s.b * T + tq[hh]) * row + s.h * D : nullptr;
  store_rows<D>(dq, q_rows, one);
}

struct Geometry {
  int64_t T, C, H, d;
};
Geometry geometry_of(const cpu::AttentionShape& s) {
  check(s.batch >= 1 && s.seq >= 1 && s.heads >= 1 && s.C % s.heads == 0, "attention: bad shape");
  check(attention_head_dim_supported(s.C / s.heads),
        "hidden_size / num_attention_heads: the CUDA attention takes head dims 16, 32 or 64, got " +
            std::to_string(s.C / s.heads));
  return {s.seq, s.C, s.heads, s.C / s.heads};
}

template <typename Launch> void dispatch_head_dim(int64_t d, Launch&& launch) {
  switch (d) {
    case 16: launch(std::integral_constant<int, 16>{}); break;
    case 32: launch(std::integral_constant<int, 32>{}); break;
    default: launch(std::integral_constant<int, 64>{}); break;
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
  const dim3 grid(detail::blocks_for(g.T, kBlock), static_cast<unsigned>(s.batch * g.H));
  const float scale = 1.0f / std::sqrt(static_cast<float>(g.d));
  dispatch_head_dim(g.d, [&](auto Dc) {
    constexpr int D = decltype(Dc)::value;
    flash_forward_kernel<D><<<grid, kThreads, 0, stream>>>(qkv, g.T, g.C, g.H, scale, dropout, out, lse);
  });
  MHC_CUDA_CHECK(cudaGetLastError());
}

void attention_backward(const cpu::AttentionShape& s, const bf16* grad_out, const bf16* qkv, const bf16* out,
                        const float* lse, cpu::DropoutSpec dropout, bf16* grad_qkv, void* workspace,
                        cudaStream_t stream) {
  const Geometry g = geometry_of(s);
  float* delta = static_cast<float*>(workspace);
  const dim3 grid(detail::blocks_for(g.T, kBlock), static_cast<unsigned>(s.batch * g.H));
  const float scale = 1.0f / std::sqrt(static_cast<float>(g.d));
  dispatch_head_dim(g.d, [&](auto Dc) {
    constexpr int D = decltype(Dc)::value;
    const int64_t rows = s.batch * g.H * g.T;
    delta_kernel<D><<<detail::blocks_for(rows, 256), 256, 0, stream>>>(grad_out, out, rows, g.T, g.C, g.H, delta);
    MHC_CUDA_CHECK(cudaGetLastError());
    flash_backward_kv_kernel<D><<<grid, kThreads, 0, stream>>>(qkv, grad_out, lse, delta, g.T, g.C, g.H, scale,
                                                               dropout, grad_qkv);
    MHC_CUDA_CHECK(cudaGetLastError());
    flash_backward_q_kernel<D><<<grid, kThreads, 0, stream>>>(qkv, grad_out, lse, delta, g.T, g.C, g.H, scale,
                                                              dropout, grad_qkv);
  });
  MHC_CUDA_CHECK(cudaGetLastError());
}

}  // namespace mhc::cuda
