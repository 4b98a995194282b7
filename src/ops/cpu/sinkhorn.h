// Sinkhorn-Knopp projection of n×n logits onto (approximately) doubly stochastic
// matrices, exactly Megatron's finite algorithm:
//
//   M = exp(L - rowmax(L))
//   repeat T times:  M[i][j] /= max(sum_j M[i][j], eps)   (rows)
//                    M[i][j] /= max(sum_i M[i][j], eps)   (columns),  eps = 1e-6
//
// Backward stores nothing from forward: it recomputes the T iterations from L into a
// per-thread scratch, back-propagates through each normalisation
//   y = v / s,  s = max(sum v, eps):  dv = (dy - [s >= eps] * sum(dy * y)) / s
// and finishes with dL = dM0 * M0 (the row-max shift is constant: a per-row scale is
// cancelled by the first row normalisation). dL is overwritten. Entries exactly zero in
// forward (exp underflow at large logit gaps) get a zero gradient, not inf * 0 = NaN.
#pragma once
#include <cstdint>

namespace mhc::cpu {

inline constexpr double kSinkhornEps = 1e-6;

template <typename T> void sinkhorn_forward(const T* logits, int n, int iterations, T* out);
template <typename T> void sinkhorn_backward(const T* logits, const T* grad_out, int n, int iterations, T* grad_logits);

// `count` independent matrices, [count, n, n], in parallel.
template <typename T> void sinkhorn_forward_batch(const T* logits, int64_t count, int n, int iterations, T* out);
template <typename T>
void sinkhorn_backward_batch(const T* logits, const T* grad_out, int64_t count, int n, int iterations, T* grad_logits);

}  // namespace mhc::cpu
