#include "nn/hyper_connection.h"

#include <cmath>

#include "core/error.h"
#include "ops/cpu/aggregate.h"

namespace mhc {

template <typename T> void HcActivations<T>::resize(int64_t token_count, int n) {
  tokens = token_count;
  const auto width = static_cast<size_t>(cpu::mhc_mapping_width(n));
  const auto nt = static_cast<size_t>(token_count);
  proj.resize(nt * width);
  r.resize(nt);
  h_pre.resize(nt * n);
  h_post.resize(nt * n);
  h_res.resize(nt * n * n);
  grad_h_pre.resize(nt * n);
  grad_h_post.resize(nt * n);
  grad_h_res.resize(nt * n * n);
  mapping_scratch.resize(static_cast<size_t>(cpu::mhc_mappings_scratch_size(token_count, n)));
}

template <typename T> int64_t HcActivations<T>::saved_bytes() const {
  return static_cast<int64_t>((proj.size() + r.size() + h_pre.size() + h_post.size() + h_res.size()) * sizeof(T));
}

template <typename T>
HyperConnection<T>::HyperConnection(int n, int64_t C, cpu::ResMapping res_mapping, int sinkhorn_iterations)
    : weight("mapping_proj.weight", {cpu::mhc_mapping_width(n), n * C}),
      alpha_pre("alpha_pre", {1}),
      alpha_post("alpha_post", {1}),
      alpha_res("alpha_res", {1}),
      bias("bias", {cpu::mhc_mapping_width(n)}),
      n_(n),
      C_(C),
      res_mapping_(res_mapping),
      iterations_(sinkhorn_iterations) {
  check(n >= 1, "num_residual_streams: must be >= 1, got " + std::to_string(n));
  check(C >= 1, "hidden_size: must be >= 1, got " + std::to_string(C));
  check(res_mapping != cpu::ResMapping::Sinkhorn || sinkhorn_iterations >= 1,
        "mhc_sinkhorn_iterations: must be >= 1, got " + std::to_string(sinkhorn_iterations));
}

template <typename T> void HyperConnection<T>::init(uint64_t key, double gating_factor) {
  const double fan_in = static_cast<double>(n_ * C_), fan_out = static_cast<double>(cpu::mhc_mapping_width(n_));
  weight.fill_uniform(key, static_cast<T>(std::sqrt(6.0 / (fan_in + fan_out))));
  for (Parameter<T>* gate : {&alpha_pre, &alpha_post, &alpha_res}) gate->value[0] = static_cast<T>(gating_factor);
  std::fill(bias.value.begin(), bias.value.end(), T(0));
}

template <typename T> std::vector<Parameter<T>*> HyperConnection<T>::parameters() {
  return {&weight, &alpha_pre, &alpha_post, &alpha_res, &bias};
}

template <typename T>
void HyperConnection<T>::forward(const T* x, int64_t tokens, HcActivations<T>& act, T* aggregated) const {
  if (act.tokens != tokens) act.resize(tokens, n_);
  const T alpha[3] = {alpha_pre.value[0], alpha_post.value[0], alpha_res.value[0]};
  cpu::mhc_mappings_forward(shape(tokens), x, weight.value.data(), alpha, bias.value.data(), act.proj.data(),
                            act.r.data(), act.h_pre.data(), act.h_post.data(), act.h_res.data());
  aggregate(x, act, aggregated);
}

template <typename T>
void HyperConnection<T>::aggregate(const T* x, const HcActivations<T>& act, T* aggregated) const {
  cpu::aggregate_forward(x, act.h_pre.data(), act.tokens, n_, C_, aggregated);
}

template <typename T>
void HyperConnection<T>::residual_forward(const T* x, const HcActivations<T>& act, const T* y, const T* y_bias,
                                          cpu::DropoutSpec dropout, T* out) const {
  cpu::h_post_bda_forward(x, act.h_res.data(), act.h_post.data(), y, y_bias, act.tokens, n_, C_, dropout, out);
}

template <typename T>
void HyperConnection<T>::residual_backward(const T* grad_out, const T* x, HcActivations<T>& act, const T* y,
                                           const T* y_bias, cpu::DropoutSpec dropout, T* grad_x, T* grad_y,
                                           T* grad_y_bias) const {
  cpu::h_post_bda_backward(grad_out, x, act.h_res.data(), act.h_post.data(), y, y_bias, act.tokens, n_, C_, dropout,
                           grad_x, act.grad_h_res.data(), act.grad_h_post.data(), grad_y, grad_y_bias);
}

template <typename T>
void HyperConnection<T>::backward(const T* grad_aggregated, const T* x, HcActivations<T>& act, T* grad_x) {
  cpu::aggregate_backward(grad_aggregated, x, act.h_pre.data(), act.tokens, n_, C_, grad_x, act.grad_h_pre.data());
  const T alpha[3] = {alpha_pre.value[0], alpha_post.value[0], alpha_res.value[0]};
  T grad_alpha[3] = {0, 0, 0};
  cpu::mhc_mappings_backward(shape(act.tokens), x, weight.value.data(), alpha, bias.value.data(), act.proj.data(),
                             act.r.data(), act.h_pre.data(), act.h_post.data(), act.grad_h_pre.data(),
                             act.grad_h_post.data(), act.grad_h_res.data(), grad_x, weight.grad.data(), grad_alpha,
                             bias.grad.data(), act.mapping_scratch.data());
  alpha_pre.grad[0] += grad_alpha[0];
  alpha_post.grad[0] += grad_alpha[1];
  alpha_res.grad[0] += grad_alpha[2];
}

template struct HcActivations<float>;
template struct HcActivations<double>;
template class HyperConnection<float>;
template class HyperConnection<double>;

}  // namespace mhc
