// Entry and exit of the n-stream residual (the transformer block's input_expand and
// output_contract), per token:
//
//   expand:    x[i][c] = e[c] for every stream i      backward: de[c] = sum_i dx[i][c]   (overwrites)
//   contract:  o[c] = (1/n) sum_i x[i][c]             backward: dx[i][c] = do[c] / n    (overwrites)
//
// Neither saves anything for backward.
#pragma once
#include <cstdint>

namespace mhc::cpu {

template <typename T> void stream_expand_forward(const T* e, int64_t tokens, int n, int64_t C, T* x);
template <typename T> void stream_expand_backward(const T* grad_x, int64_t tokens, int n, int64_t C, T* grad_e);
template <typename T> void stream_contract_forward(const T* x, int64_t tokens, int n, int64_t C, T* out);
template <typename T> void stream_contract_backward(const T* grad_out, int64_t tokens, int n, int64_t C, T* grad_x);

}  // namespace mhc::cpu
