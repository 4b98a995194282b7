// CUDA token + position embedding and the cross-entropy of the LM head's logits
// (ops/cpu/embedding.h has the math):
//
//   embed:   e[b][t] = wte[token[b][t]] + wpe[t]              (fp32 tables, bf16 e)
//            backward: dwte[v] += sum of de over the positions holding token v (positions
//            sorted by token with a stable radix sort; each token's run summed in chunks of
//            32 positions, in position order, then the chunks in order);
//            dwpe[t] += sum_b de[b][t]                              (fp32, deterministic)
//   loss:    per row, loss = logsumexp(logits) - logits[target] from bf16 logits (fp32
//            arithmetic); the logits' gradient dlogits = (softmax - onehot) * scale
//            overwrites them (bf16), for the head's backward products. One block a row,
//            fixed-order reductions; the row is read from memory once when it fits in
//            shared memory (V up to about 110k on an H100), twice otherwise.
#pragma once
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace mhc::cuda {

using bf16 = __nv_bfloat16;

void embedding_forward(const int32_t* tokens, const float* wte, const float* wpe, int64_t batch, int64_t seq,
                       int64_t C, bf16* e, cudaStream_t stream = nullptr);

size_t embedding_backward_workspace_bytes(int64_t batch, int64_t seq, int64_t C);

// `vocab` bounds the token ids (the sort looks at their low bits only).
void embedding_backward(const bf16* grad_e, const int32_t* tokens, int64_t batch, int64_t seq, int64_t C,
                        int64_t vocab, float* grad_wte, float* grad_wpe, void* workspace,
                        cudaStream_t stream = nullptr);

// losses[r] (fp32), and logits[r] overwritten by (softmax(logits[r]) - onehot(target[r])) * scale.
void cross_entropy(bf16* logits, const int32_t* targets, int64_t rows, int64_t V, float scale, float* losses,
                   cudaStream_t stream = nullptr);

}  // namespace mhc::cuda
