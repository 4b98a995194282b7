// CUDA causal multi-head self-attention (ops/cpu/attention.h has the math), bf16 q, k, v
// and output, fp32 scores and softmax:
//
//   S = q k^T (per batch b and head h, cuBLASLt strided-batched over heads)
//   P = softmax_u(S / sqrt(d)) over u <= t, saved for backward [B, H, T, T] (bf16)
//   out = (D . P) v, D the dropout multipliers of the CPU reference's Philox stream
//   backward: dV = (D P)^T dout, dP = dout v^T, dS = P (D dP - rowsum(P D dP)) / sqrt(d),
//             dQ = dS k, dK = dS^T q (dqkv overwritten)
//
// This version materialises the T x T scores of one batch row at a time (workspace
// H T T fp32 + H T T bf16) and saves P: memory grows with T^2. A fused (flash) kernel that
// keeps the scores on chip is the next step.
#pragma once
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "ops/cpu/attention.h"

namespace mhc::cuda {

using bf16 = __nv_bfloat16;

size_t attention_workspace_bytes(const cpu::AttentionShape& s);

void attention_forward(const cpu::AttentionShape& s, const bf16* qkv, cpu::DropoutSpec dropout, bf16* probs,
                       bf16* out, void* workspace, cudaStream_t stream = nullptr);
void attention_backward(const cpu::AttentionShape& s, const bf16* grad_out, const bf16* qkv, const bf16* probs,
                        cpu::DropoutSpec dropout, bf16* grad_qkv, void* workspace, cudaStream_t stream = nullptr);

}  // namespace mhc::cuda
