// CUDA causal multi-head self-attention (ops/cpu/attention.h has the math), fused in the
// manner of FlashAttention-2: the T x T scores never reach memory.
//
//   forward:  per (batch, head, 128 queries: 4 warps of two m16 tiles), keys in tiles of
//             64 used 32 at a time: S = q k^T / sqrt(d) on tensor cores (bf16 mma, fp32
//             sums), the causal mask, an online softmax (a running max and sum per row),
//             out += (D . P) v with D the dropout multipliers of the CPU reference's Philox
//             stream; saves the per-row log-sum-exp lse [B, H, T] (fp32, in log2 units of
//             the scaled scores: the backward's exp2 argument) and reads q, k, v once per
//             tile pass.
//   backward: per 128 queries dQ over the key tiles (and delta_t = dout_t . out_t), then
//             per 128 keys dK, dV over the query tiles (P recomputed from lse; no atomics, so
//             deterministic): dV = (D P)^T dout, dS = P (D dout v^T - delta) / sqrt(d),
//             dK = dS^T q, dQ = dS k. dqkv is overwritten.
//
// Blocks are launched heaviest first (late queries, early keys). Head dims 16, 32 and 64.
// On Hopper (sm_90a builds) head dim 64 runs on warpgroup products (wgmma), the streamed
// tiles of 64 used whole: the forward and dQ as the same blocks of two warpgroups of 64
// queries, dK/dV as blocks of one warpgroup of 64 keys (set_attention_wgmma).
#pragma once
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "ops/cpu/attention.h"

namespace mhc::cuda {

using bf16 = __nv_bfloat16;

bool attention_head_dim_supported(int64_t head_dim);

// Builds for sm_90a run the kernels of head dim 64 on Hopper's warpgroup products (wgmma)
// on a device of compute capability 9.0, the mma.sync kernels otherwise; false keeps the
// mma.sync kernels everywhere (the tests check both paths). Not thread-safe: set it before
// launching.
void set_attention_wgmma(bool allowed);

// Backward's workspace (delta), bytes.
size_t attention_workspace_bytes(const cpu::AttentionShape& s);

// With dropout, given keep_mask (attention_keep_mask_words(s) words: T^2 / 8 bytes a
// sequence and head, 1/16 of the bf16 scores) the forward first makes the mask as bits in
// a kernel of its own, and the forward and then the backward read them instead of each
// making the mask from the Philox stream inside their tiles (where it held registers and
// issue slots the products needed). Without it (null) every kernel makes the same mask
// itself: memory stays linear in T.
size_t attention_keep_mask_words(const cpu::AttentionShape& s);

void attention_forward(const cpu::AttentionShape& s, const bf16* qkv, cpu::DropoutSpec dropout, float* lse, bf16* out,
                       cudaStream_t stream = nullptr, uint32_t* keep_mask = nullptr);
void attention_backward(const cpu::AttentionShape& s, const bf16* grad_out, const bf16* qkv, const bf16* out,
                        const float* lse, cpu::DropoutSpec dropout, bf16* grad_qkv, void* workspace,
                        cudaStream_t stream = nullptr, const uint32_t* keep_mask = nullptr);

}  // namespace mhc::cuda
