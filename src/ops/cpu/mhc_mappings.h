// The mHC mappings of each token (Megatron's compute_mappings). With K = n*C and
// m = n*n + 2n, per token of the n-stream input x [K]:
//
//   r      = 1 / (||x||_2 / sqrt(K) + 1e-6)
//   proj   = W @ x                                    W [m, K], no bias
//   h      = r * proj * a + bias,  a = [alpha_pre]*n ++ [alpha_post]*n ++ [alpha_res]*n*n
//   H_pre  = sigmoid(h[0:n]),  H_post = 2 * sigmoid(h[n:2n])
//   H_res  = Sinkhorn(h[2n:] as n×n, T)               (ResMapping::Sinkhorn, mHC)
//          = I + h[2n:] as n×n                        (ResMapping::Unconstrained, HC)
//
// Saved for backward: proj [tokens, m] and r [tokens] (h is rebuilt from them; Sinkhorn
// recomputes its iterations). Backward accumulates (+=) into dx, dW, dalpha [3] and
// dbias; it needs a scratch of mhc_mappings_scratch_size(tokens, n) elements.
#pragma once
#include <cstdint>

namespace mhc::cpu {

enum class ResMapping { Sinkhorn, Unconstrained };

inline constexpr double kMappingNormEps = 1e-6;

inline int64_t mhc_mapping_width(int n) { return static_cast<int64_t>(n) * n + 2 * n; }
inline int64_t mhc_mappings_scratch_size(int64_t tokens, int n) { return tokens * (mhc_mapping_width(n) + 1); }

struct MappingShape {
  int64_t tokens;
  int n;
  int64_t C;
  ResMapping res_mapping;
  int sinkhorn_iterations;
};

template <typename T>
void mhc_mappings_forward(const MappingShape& s, const T* x, const T* weight, const T* alpha, const T* bias,
                          T* proj, T* r, T* h_pre, T* h_post, T* h_res);

template <typename T>
void mhc_mappings_backward(const MappingShape& s, const T* x, const T* weight, const T* alpha, const T* bias,
                           const T* proj, const T* r, const T* h_pre, const T* h_post, const T* grad_h_pre,
                           const T* grad_h_post, const T* grad_h_res, T* grad_x, T* grad_weight, T* grad_alpha,
                           T* grad_bias, T* scratch);

}  // namespace mhc::cpu
