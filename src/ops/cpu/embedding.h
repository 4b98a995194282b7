// Token + learned position embedding, and the tied LM head with cross-entropy.
//
//   embed:  e[b][t] = wte[token[b][t]] + wpe[t]
//           backward accumulates dwte[token] += de, dwpe[t] += de (deterministic order)
//   head:   logits = h wte^T [rows, V];  loss = mean_rows( logsumexp(logits) - logits[target] )
//           forward saves the softmax probabilities in `probs` [rows, V]; backward
//           accumulates dh += dlogits wte and dwte += dlogits^T h, dlogits = (probs - onehot)/rows
#pragma once
#include <cstdint>

namespace mhc::cpu {

template <typename T>
void embedding_forward(const int32_t* tokens, const T* wte, const T* wpe, int64_t batch, int64_t seq, int64_t C, T* e);
template <typename T>
void embedding_backward(const T* grad_e, const int32_t* tokens, int64_t batch, int64_t seq, int64_t C, T* grad_wte,
                        T* grad_wpe);

// Returns the mean loss.
template <typename T>
double lm_head_forward(const T* h, const T* wte, const int32_t* targets, int64_t rows, int64_t C, int64_t V, T* probs);
// Turns probs into dlogits in place, then accumulates dh and dwte.
template <typename T>
void lm_head_backward(T* probs, const T* h, const T* wte, const int32_t* targets, int64_t rows, int64_t C, int64_t V,
                      T* grad_h, T* grad_wte);

}  // namespace mhc::cpu
