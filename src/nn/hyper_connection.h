// One hyper-connection module (Megatron's HyperConnectionModule): the mapping
// parameters and the three steps around a sublayer F,
//
//   forward:   mappings (H_pre, H_post, H_res) from x, then agg = sum_j H_pre[j] x[j]
//   residual:  out = H_res @ x + dropout(H_post^T (y + y_bias))   (after y = F(agg))
//
// Backward runs in the opposite order: residual_backward (gradients of x, y, y_bias and
// of H_res/H_post into the activations' scratch), then backward (aggregate and mappings;
// accumulates dx and the parameter gradients). Parameter names follow DESIGN.md §4.
#pragma once
#include <cstdint>
#include <vector>

#include "nn/parameter.h"
#include "ops/cpu/h_post_bda.h"
#include "ops/cpu/mhc_mappings.h"

namespace mhc {

// What one forward keeps for backward, plus backward's scratch; sized once per token count.
template <typename T> struct HcActivations {
  int64_t tokens = 0;
  std::vector<T> proj, r, h_pre, h_post, h_res;                       // saved by forward
  std::vector<T> grad_h_pre, grad_h_post, grad_h_res, mapping_scratch;  // backward scratch
  void resize(int64_t tokens, int n);
  int64_t saved_bytes() const;  // the bytes forward keeps for backward
};

template <typename T> class HyperConnection {
 public:
  HyperConnection(int n, int64_t C, cpu::ResMapping res_mapping, int sinkhorn_iterations);

  // Xavier-uniform mapping weight from the Philox stream `key`, gates = gating_factor, bias 0.
  void init(uint64_t key, double gating_factor);

  int streams() const { return n_; }
  int64_t hidden() const { return C_; }
  Parameter<T> weight, alpha_pre, alpha_post, alpha_res, bias;
  std::vector<Parameter<T>*> parameters();  // in state-dict order

  void forward(const T* x, int64_t tokens, HcActivations<T>& act, T* aggregated) const;
  // The aggregate alone from kept mappings (selective recompute restores it this way).
  void aggregate(const T* x, const HcActivations<T>& act, T* aggregated) const;
  void residual_forward(const T* x, const HcActivations<T>& act, const T* y, const T* y_bias,
                        cpu::DropoutSpec dropout, T* out) const;

  // grad_x accumulates, grad_y is overwritten, grad_y_bias (nullable) accumulates.
  void residual_backward(const T* grad_out, const T* x, HcActivations<T>& act, const T* y, const T* y_bias,
                         cpu::DropoutSpec dropout, T* grad_x, T* grad_y, T* grad_y_bias) const;
  // Needs residual_backward's H_res/H_post gradients in `act`; grad_x and parameter grads accumulate.
  void backward(const T* grad_aggregated, const T* x, HcActivations<T>& act, T* grad_x);

 private:
  cpu::MappingShape shape(int64_t tokens) const { return {tokens, n_, C_, res_mapping_, iterations_}; }
  int n_;
  int64_t C_;
  cpu::ResMapping res_mapping_;
  int iterations_;
};

}  // namespace mhc
