// Causal multi-head self-attention core, per batch b and head h (head dim d = C/H):
//
//   P[t][u] = softmax_u( q_t . k_u / sqrt(d) )  over u <= t
//   out_t   = sum_u D[t][u] P[t][u] v_u
//
// qkv rows are [q | k | v], each C wide, head h at columns [h d, (h+1) d). D is the
// inverted-dropout multiplier of element ((b H + h) T + t) T + u of stream dropout.key.
// Saves P [B, H, T, T] (the mask is replayed). Backward overwrites dqkv.
#pragma once
#include <cstdint>

#include "ops/cpu/h_post_bda.h"

namespace mhc::cpu {

struct AttentionShape {
  int64_t batch, seq, heads, C;
};

template <typename T>
void attention_forward(const AttentionShape& s, const T* qkv, DropoutSpec dropout, T* probs, T* out);

template <typename T>
void attention_backward(const AttentionShape& s, const T* grad_out, const T* qkv, const T* probs, DropoutSpec dropout,
                        T* grad_qkv);

// One query (the token at `position`) against cached keys and values [position + 1, C] of
// one sequence, for generation with a key/value cache. No dropout, no backward.
template <typename T>
void attention_decode(const T* q, const T* k_cache, const T* v_cache, int64_t position, int64_t heads, int64_t C,
                      T* out);

}  // namespace mhc::cpu
