#include "ops/cuda/attention.h"

#include <cmath>

#include "core/cuda/device.h"
#include "core/rng.h"
#include "ops/cuda/gemm.h"
#include "ops/cuda/kernel_utils.cuh"

namespace mhc::cuda {
namespace {

constexpr int kRowsPerBlock = 4;  // one warp a (head, query) row

struct Geometry {
  int64_t T, C, H, d;
  size_t scores_bytes;  // fp32 [H][T][T]
};
Geometry geometry_of(const cpu::AttentionShape& s) {
  check(s.batch >= 1 && s.seq >= 1 && s.heads >= 1 && s.C % s.heads == 0, "attention: bad shape");
  const int64_t T = s.seq;
  return {T, s.C, s.heads, s.C / s.heads, static_cast<size_t>(s.heads * T * T) * sizeof(float)};
}

// Row (h, t) of one batch row b: P = softmax(scale S) over u <= t (zeros after), and
// `dropped` = D P when dropout is on.
__global__ void softmax_kernel(const float* scores, int64_t T, int64_t H, int64_t b, float scale,
                               cpu::DropoutSpec dropout, bf16* probs, bf16* dropped) {
  const int lane = threadIdx.x % 32;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + threadIdx.x / 32;  // h T + t
  if (row >= H * T) return;
  const int64_t t = row % T;
  const float* s = scores + row * T;
  float mx = -INFINITY;
  for (int64_t u = lane; u <= t; u += 32) mx = fmaxf(mx, s[u] * scale);
  for (int offset = 16; offset > 0; offset /= 2) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, offset));
  float sum = 0;
  for (int64_t u = lane; u <= t; u += 32) sum += expf(s[u] * scale - mx);
  sum = detail::warp_sum(sum);
  const float inverse = 1.0f / sum;
  const uint64_t mask_base = static_cast<uint64_t>((b * H * T + row) * T);
  for (int64_t u = lane; u < T; u += 32) {
    const float p = u <= t ? expf(s[u] * scale - mx) * inverse : 0.0f;
    probs[row * T + u] = __float2bfloat16(p);
    if (dropped) dropped[row * T + u] = __float2bfloat16(p * dropout_scale<float>(dropout.key, mask_base + u, dropout.p));
  }
}

// D P, for the backward's dV.
__global__ void apply_dropout_kernel(const bf16* probs, int64_t T, int64_t H, int64_t b, cpu::DropoutSpec dropout,
                                     bf16* dropped) {
  const int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (e >= H * T * T) return;
  const uint64_t index = static_cast<uint64_t>(b * H * T * T + e);
  dropped[e] = __float2bfloat16(__bfloat162float(probs[e]) * dropout_scale<float>(dropout.key, index, dropout.p));
}

// dS = scale P (D dP - sum_u P D dP) for row (h, t); dP arrives in `grad` (fp32).
__global__ void softmax_backward_kernel(const float* grad, const bf16* probs, int64_t T, int64_t H, int64_t b,
                                        float scale, cpu::DropoutSpec dropout, bf16* grad_scores) {
  const int lane = threadIdx.x % 32;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + threadIdx.x / 32;
  if (row >= H * T) return;
  const int64_t t = row % T;
  const uint64_t mask_base = static_cast<uint64_t>((b * H * T + row) * T);
  auto dp = [&](int64_t u) { return grad[row * T + u] * dropout_scale<float>(dropout.key, mask_base + u, dropout.p); };
  float dot = 0;
  for (int64_t u = lane; u <= t; u += 32) dot += __bfloat162float(probs[row * T + u]) * dp(u);
  dot = detail::warp_sum(dot);
  for (int64_t u = lane; u < T; u += 32)
    grad_scores[row * T + u] =
        __float2bfloat16(u <= t ? scale * __bfloat162float(probs[row * T + u]) * (dp(u) - dot) : 0.0f);
}

// One strided-batched product over the heads of batch row b. Operands are column-major
// views: a head's q, k, v or dout block [d, T] (ld = the row width), or a [T, T] matrix.
struct HeadOperand {
  const bf16* p;
  int64_t ld, stride;
};
void heads_product(bool ta, bool tb, int64_t m, int64_t n, int64_t k, HeadOperand a, HeadOperand b, void* d,
                   int64_t ldd, int64_t stride_d, GemmOutput output, int64_t heads, cudaStream_t stream) {
  Gemm g;
  g.trans_a = ta, g.trans_b = tb;
  g.m = m, g.n = n, g.k = k;
  g.a = a.p, g.lda = a.ld, g.stride_a = a.stride;
  g.b = b.p, g.ldb = b.ld, g.stride_b = b.stride;
  g.d = d, g.ldd = ldd, g.stride_d = stride_d;
  g.output = output;
  g.batch = static_cast<int>(heads);
  gemm(g, stream);
}

}  // namespace

size_t attention_workspace_bytes(const cpu::AttentionShape& s) {
  const Geometry g = geometry_of(s);
  return g.scores_bytes + static_cast<size_t>(g.H * g.T * g.T) * sizeof(bf16);
}

void attention_forward(const cpu::AttentionShape& s, const bf16* qkv, cpu::DropoutSpec dropout, bf16* probs,
                       bf16* out, void* workspace, cudaStream_t stream) {
  const Geometry g = geometry_of(s);
  const int64_t T = g.T, C = g.C, H = g.H, d = g.d, row = 3 * C;
  float* scores = static_cast<float*>(workspace);
  bf16* dropped = reinterpret_cast<bf16*>(static_cast<char*>(workspace) + g.scores_bytes);
  const float scale = 1.0f / std::sqrt(static_cast<float>(d));
  const bool drop = dropout.p > 0.0f;
  for (int64_t b = 0; b < s.batch; ++b) {
    const bf16* base = qkv + b * T * row;
    bf16* pb = probs + b * H * T * T;
    // S^T as column-major [u, t]: k [u, d] times q^T.
    heads_product(true, false, T, T, d, {base + C, row, d}, {base, row, d}, scores, T, T * T, GemmOutput::Fp32, H,
                  stream);
    softmax_kernel<<<detail::blocks_for(H * T, kRowsPerBlock), kRowsPerBlock * 32, 0, stream>>>(
        scores, T, H, b, scale, dropout, pb, drop ? dropped : nullptr);
    MHC_CUDA_CHECK(cudaGetLastError());
    // out^T [d, t] = v^T [d, u] (D P)^T [u, t]
    heads_product(false, false, d, T, T, {base + 2 * C, row, d}, {drop ? dropped : pb, T, T * T}, out + b * T * C,
                  C, d, GemmOutput::Bf16, H, stream);
  }
}

void attention_backward(const cpu::AttentionShape& s, const bf16* grad_out, const bf16* qkv, const bf16* probs,
                        cpu::DropoutSpec dropout, bf16* grad_qkv, void* workspace, cudaStream_t stream) {
  const Geometry g = geometry_of(s);
  const int64_t T = g.T, C = g.C, H = g.H, d = g.d, row = 3 * C;
  float* grad_p = static_cast<float*>(workspace);
  bf16* scratch = reinterpret_cast<bf16*>(static_cast<char*>(workspace) + g.scores_bytes);
  const float scale = 1.0f / std::sqrt(static_cast<float>(d));
  const bool drop = dropout.p > 0.0f;
  for (int64_t b = 0; b < s.batch; ++b) {
    const bf16* base = qkv + b * T * row;
    const bf16* pb = probs + b * H * T * T;
    const bf16* gob = grad_out + b * T * C;
    bf16* gb = grad_qkv + b * T * row;
    if (drop) {
      apply_dropout_kernel<<<detail::blocks_for(H * T * T, 256), 256, 0, stream>>>(pb, T, H, b, dropout, scratch);
      MHC_CUDA_CHECK(cudaGetLastError());
    }
    // dV^T [d, u] = dout^T [d, t] (D P) [t, u]
    heads_product(false, true, d, T, T, {gob, C, d}, {drop ? scratch : pb, T, T * T}, gb + 2 * C, row, d,
                  GemmOutput::Bf16, H, stream);
    // dP^T as column-major [u, t]: v [u, d] times dout^T
    heads_product(true, false, T, T, d, {base + 2 * C, row, d}, {gob, C, d}, grad_p, T, T * T, GemmOutput::Fp32, H,
                  stream);
    softmax_backward_kernel<<<detail::blocks_for(H * T, kRowsPerBlock), kRowsPerBlock * 32, 0, stream>>>(
        grad_p, pb, T, H, b, scale, dropout, scratch);
    MHC_CUDA_CHECK(cudaGetLastError());
    // dQ^T [d, t] = k^T [d, u] dS^T [u, t];  dK^T [d, u] = q^T [d, t] dS [t, u]
    heads_product(false, false, d, T, T, {base + C, row, d}, {scratch, T, T * T}, gb, row, d, GemmOutput::Bf16, H,
                  stream);
    heads_product(false, true, d, T, T, {base, row, d}, {scratch, T, T * T}, gb + C, row, d, GemmOutput::Bf16, H,
                  stream);
  }
}

}  // namespace mhc::cuda
