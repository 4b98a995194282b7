#include "ops/cpu/mhc_mappings.h"

#include <cmath>
#include <vector>

#include "ops/cpu/gemm.h"
#include "ops/cpu/parallel.h"
#include "ops/cpu/sinkhorn.h"

namespace mhc::cpu {

namespace {

// The gate group (0 pre, 1 post, 2 res) of mapping output k.
inline int gate_of(int64_t k, int n) { return k < n ? 0 : (k < 2 * n ? 1 : 2); }

// h[2n:] of one token rebuilt from proj and r.
template <typename T>
void res_logits(const MappingShape& s, const T* proj, T r, const T* alpha, const T* bias, T* logits) {
  const int n = s.n;
  for (int k = 0; k < n * n; ++k) logits[k] = r * proj[2 * n + k] * alpha[2] + bias[2 * n + k];
}

template <typename T> T l2_norm(const T* v, int64_t length) {
  double sum_sq = 0;
  for (int64_t k = 0; k < length; ++k) sum_sq += static_cast<double>(v[k]) * v[k];
  return static_cast<T>(std::sqrt(sum_sq));
}

}  // namespace

template <typename T>
void mhc_mappings_forward(const MappingShape& s, const T* x, const T* weight, const T* alpha, const T* bias,
                          T* proj, T* r, T* h_pre, T* h_post, T* h_res) {
  const int n = s.n;
  const int64_t K = n * s.C, m = mhc_mapping_width(n);
  gemm<T>(false, true, s.tokens, m, K, T(1), x, K, weight, K, T(0), proj, m);
  const T sqrt_k = std::sqrt(static_cast<T>(K));
#pragma omp parallel for schedule(static) if (s.tokens * K >= kParallelMinWork)
  for (int64_t t = 0; t < s.tokens; ++t) {
    const T* xt = x + t * K;
    const T* p = proj + t * m;
    const T rt = T(1) / (l2_norm(xt, K) / sqrt_k + T(kMappingNormEps));
    r[t] = rt;
    for (int i = 0; i < n; ++i) {
      h_pre[t * n + i] = T(1) / (T(1) + std::exp(-(rt * p[i] * alpha[0] + bias[i])));
      h_post[t * n + i] = T(2) / (T(1) + std::exp(-(rt * p[n + i] * alpha[1] + bias[n + i])));
    }
    T* hr = h_res + t * n * n;
    thread_local std::vector<T> logits;
    logits.resize(static_cast<size_t>(n) * n);
    res_logits(s, p, rt, alpha, bias, logits.data());
    if (s.res_mapping == ResMapping::Sinkhorn) {
      sinkhorn_forward(logits.data(), n, s.sinkhorn_iterations, hr);
    } else {
      for (int k = 0; k < n * n; ++k) hr[k] = logits[k] + (k / n == k % n ? T(1) : T(0));
    }
  }
}

template <typename T>
void mhc_mappings_backward(const MappingShape& s, const T* x, const T* weight, const T* alpha, const T* bias,
                           const T* proj, const T* r, const T* h_pre, const T* h_post, const T* grad_h_pre,
                           const T* grad_h_post, const T* grad_h_res, T* grad_x, T* grad_weight, T* grad_alpha,
                           T* grad_bias, T* scratch) {
  const int n = s.n;
  const int64_t K = n * s.C, m = mhc_mapping_width(n);
  T* grad_h = scratch;                  // [tokens, m]: d loss / d h
  T* grad_r = scratch + s.tokens * m;   // [tokens]
  const T sqrt_k = std::sqrt(static_cast<T>(K));
#pragma omp parallel for schedule(static) if (s.tokens * K >= kParallelMinWork)
  for (int64_t t = 0; t < s.tokens; ++t) {
    T* gh = grad_h + t * m;
    for (int i = 0; i < n; ++i) {
      const T pre = h_pre[t * n + i], post = h_post[t * n + i];
      gh[i] = grad_h_pre[t * n + i] * pre * (T(1) - pre);
      gh[n + i] = grad_h_post[t * n + i] * post * (T(1) - post / T(2));
    }
    if (s.res_mapping == ResMapping::Sinkhorn) {
      thread_local std::vector<T> logits;
      logits.resize(static_cast<size_t>(n) * n);
      res_logits(s, proj + t * m, r[t], alpha, bias, logits.data());
      sinkhorn_backward(logits.data(), grad_h_res + t * n * n, n, s.sinkhorn_iterations, gh + 2 * n);
    } else {
      for (int k = 0; k < n * n; ++k) gh[2 * n + k] = grad_h_res[t * n * n + k];
    }
    // d r = sum_k dh_k * proj_k * a_k; then dh becomes d proj = dh * r * a (in place).
    T dr = 0;
    for (int64_t k = 0; k < m; ++k) dr += gh[k] * proj[t * m + k] * alpha[gate_of(k, n)];
    grad_r[t] = dr;
  }
  // Parameter gradients reduced over tokens in a fixed order (deterministic).
  // Accumulated in double: the sums over tokens cancel heavily, and float must stay near 1e-6.
  std::vector<double> bias_sum(static_cast<size_t>(m), 0.0);
  double alpha_sum[3] = {0, 0, 0};
  for (int64_t t = 0; t < s.tokens; ++t)
    for (int64_t k = 0; k < m; ++k) {
      bias_sum[k] += grad_h[t * m + k];
      alpha_sum[gate_of(k, n)] += static_cast<double>(grad_h[t * m + k]) * r[t] * proj[t * m + k];
    }
  for (int64_t k = 0; k < m; ++k) grad_bias[k] += static_cast<T>(bias_sum[k]);
  for (int g = 0; g < 3; ++g) grad_alpha[g] += static_cast<T>(alpha_sum[g]);
#pragma omp parallel for schedule(static) if (s.tokens * K >= kParallelMinWork)
  for (int64_t t = 0; t < s.tokens; ++t) {
    for (int64_t k = 0; k < m; ++k) grad_h[t * m + k] *= r[t] * alpha[gate_of(k, n)];
    // r = 1/(||x||/sqrt(K) + eps):  dr/dx = -r^2 x / (sqrt(K) ||x||); ||x|| = 0 gives 0, as in PyTorch
    const T norm = l2_norm(x + t * K, K);
    if (norm > T(0)) {
      const T coefficient = -grad_r[t] * r[t] * r[t] / (sqrt_k * norm);
      for (int64_t k = 0; k < K; ++k) grad_x[t * K + k] += coefficient * x[t * K + k];
    }
  }
  gemm<T>(false, false, s.tokens, K, m, T(1), grad_h, m, weight, K, T(1), grad_x, K);       // dx += dproj @ W
  gemm<T>(true, false, m, K, s.tokens, T(1), grad_h, m, x, K, T(1), grad_weight, K);        // dW += dproj^T @ x
}

#define MHC_INSTANTIATE(T)                                                                                     \
  template void mhc_mappings_forward<T>(const MappingShape&, const T*, const T*, const T*, const T*, T*, T*, T*, \
                                        T*, T*);                                                               \
  template void mhc_mappings_backward<T>(const MappingShape&, const T*, const T*, const T*, const T*, const T*,  \
                                         const T*, const T*, const T*, const T*, const T*, const T*, T*, T*, T*, \
                                         T*, T*);
MHC_INSTANTIATE(float)
MHC_INSTANTIATE(double)
#undef MHC_INSTANTIATE

}  // namespace mhc::cpu
