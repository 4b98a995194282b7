// MLP activations, elementwise per row:
//
//   gelu:    out[f] = x[f] * Phi(x[f])          (exact, erf form: PyTorch's default F.gelu)
//   swiglu:  out[f] = silu(x[f]) * x[F + f]     (input rows are [gate | up], 2F wide)
//
// Save nothing (the input is kept by the caller). Backward overwrites dx.
#pragma once
#include <cstdint>

namespace mhc::cpu {

enum class Activation { Gelu, SwiGlu };

inline int64_t activation_input_width(Activation a, int64_t F) { return a == Activation::SwiGlu ? 2 * F : F; }

template <typename T> void activation_forward(Activation a, const T* x, int64_t rows, int64_t F, T* out);
template <typename T>
void activation_backward(Activation a, const T* grad_out, const T* x, int64_t rows, int64_t F, T* grad_x);

}  // namespace mhc::cpu
