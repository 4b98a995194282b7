// The fused residual update of an mHC sublayer (Megatron's fused_h_res_h_post_bda):
// H_res mixing + H_post expansion + bias + dropout + add, per token
//
//   out[i][c] = sum_j H_res[i][j] x[j][c] + D[i][c] * H_post[i] * (y[c] + y_bias[c])
//
// with D the inverted-dropout multiplier of element (t*n + i)*C + c of the Philox stream
// `dropout.key` (0 or 1/(1-p); 1 when p = 0). y_bias may be null. Null h_res and h_post
// mean the identity and ones: the plain residual out = x + dropout(y + y_bias) (n = 1),
// and their gradients are then not produced. Saves nothing: the
// mask is replayed from its key. Reductions over C accumulate in double. Backward:
//   dx[j][c]     += sum_i H_res[i][j] dout[i][c]          (accumulates)
//   dH_res[i][j]  = sum_c dout[i][c] x[j][c]              (overwrites)
//   dH_post[i]    = sum_c dout[i][c] D[i][c] (y + y_bias)[c]
//   dy[c]         = sum_i dout[i][c] D[i][c] H_post[i]    (overwrites)
//   dy_bias[c]   += sum over tokens of dy[c]               (accumulates; skipped if null)
#pragma once
#include <cstdint>

namespace mhc::cpu {

struct DropoutSpec {
  float p = 0.0f;
  uint64_t key = 0;
  // CUDA ops only: when set, the key is read from this device address when the kernels run
  // (made on the device for the step, so that a captured CUDA graph replays any step).
  const uint64_t* key_on_device = nullptr;
  // CUDA hyper-connection ops only (C % 8 == 0): the mask as bits, bit e % 8 of byte e / 8
  // for element e of the [tokens, n, C] tensor (1: kept), n C / 8 bytes a token. When set,
  // h_post_bda's forward writes it from the Philox stream and the backward kernels read it.
  uint8_t* kept = nullptr;
};

template <typename T>
void h_post_bda_forward(const T* x, const T* h_res, const T* h_post, const T* y, const T* y_bias, int64_t tokens,
                        int n, int64_t C, DropoutSpec dropout, T* out);

template <typename T>
void h_post_bda_backward(const T* grad_out, const T* x, const T* h_res, const T* h_post, const T* y, const T* y_bias,
                         int64_t tokens, int n, int64_t C, DropoutSpec dropout, T* grad_x, T* grad_h_res,
                         T* grad_h_post, T* grad_y, T* grad_y_bias);

}  // namespace mhc::cpu
