#include "ops/cpu/h_post_bda.h"

#include "core/rng.h"
#include "ops/cpu/parallel.h"

namespace mhc::cpu {

template <typename T>
void h_post_bda_forward(const T* x, const T* h_res, const T* h_post, const T* y, const T* y_bias, int64_t tokens,
                        int n, int64_t C, DropoutSpec dropout, T* out) {
#pragma omp parallel for schedule(static) if (tokens * n * C >= kParallelMinWork)
  for (int64_t t = 0; t < tokens; ++t) {
    const T* xt = x + t * n * C;
    const T* yt = y + t * C;
    for (int i = 0; i < n; ++i) {
      T* o = out + (t * n + i) * C;
      const T post = h_post ? h_post[t * n + i] : T(1);
      const uint64_t base = static_cast<uint64_t>(t * n + i) * C;
      for (int64_t c = 0; c < C; ++c) {
        const T sublayer = yt[c] + (y_bias ? y_bias[c] : T(0));
        o[c] = dropout_scale<T>(dropout.key, base + c, dropout.p) * post * sublayer;
      }
      for (int j = 0; j < n; ++j) {
        const T mix = h_res ? h_res[(t * n + i) * n + j] : T(i == j);
        const T* xj = xt + j * C;
        for (int64_t c = 0; c < C; ++c) o[c] += mix * xj[c];
      }
    }
  }
}

template <typename T>
void h_post_bda_backward(const T* grad_out, const T* x, const T* h_res, const T* h_post, const T* y, const T* y_bias,
                         int64_t tokens, int n, int64_t C, DropoutSpec dropout, T* grad_x, T* grad_h_res,
                         T* grad_h_post, T* grad_y, T* grad_y_bias) {
#pragma omp parallel for schedule(static) if (tokens * n * C >= kParallelMinWork)
  for (int64_t t = 0; t < tokens; ++t) {
    const T* xt = x + t * n * C;
    const T* yt = y + t * C;
    T* gy = grad_y + t * C;
    for (int64_t c = 0; c < C; ++c) gy[c] = 0;
    for (int i = 0; i < n; ++i) {
      const T* go = grad_out + (t * n + i) * C;
      const T post = h_post ? h_post[t * n + i] : T(1);
      const uint64_t base = static_cast<uint64_t>(t * n + i) * C;
      double dpost = 0;  // reductions over C accumulate in double (float parity)
      for (int64_t c = 0; c < C; ++c) {
        const T masked = go[c] * dropout_scale<T>(dropout.key, base + c, dropout.p);
        dpost += static_cast<double>(masked) * (yt[c] + (y_bias ? y_bias[c] : T(0)));
        gy[c] += masked * post;
      }
      if (grad_h_post) grad_h_post[t * n + i] = static_cast<T>(dpost);
      for (int j = 0; j < n; ++j) {
        const T mix = h_res ? h_res[(t * n + i) * n + j] : T(i == j);
        const T* xj = xt + j * C;
        T* gxj = grad_x + (t * n + j) * C;
        double dmix = 0;
        for (int64_t c = 0; c < C; ++c) {
          dmix += static_cast<double>(go[c]) * xj[c];
          gxj[c] += mix * go[c];
        }
        if (grad_h_res) grad_h_res[(t * n + i) * n + j] = static_cast<T>(dmix);
      }
    }
  }
  if (grad_y_bias)
    for (int64_t t = 0; t < tokens; ++t)
      for (int64_t c = 0; c < C; ++c) grad_y_bias[c] += grad_y[t * C + c];
}

#define MHC_INSTANTIATE(T)                                                                                        \
  template void h_post_bda_forward<T>(const T*, const T*, const T*, const T*, const T*, int64_t, int, int64_t,    \
                                      DropoutSpec, T*);                                                           \
  template void h_post_bda_backward<T>(const T*, const T*, const T*, const T*, const T*, const T*, int64_t, int,  \
                                       int64_t, DropoutSpec, T*, T*, T*, T*, T*);
MHC_INSTANTIATE(float)
MHC_INSTANTIATE(double)
#undef MHC_INSTANTIATE

}  // namespace mhc::cpu
