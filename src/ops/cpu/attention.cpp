#include "ops/cpu/attention.h"

#include <algorithm>
#include <cmath>
#include <vector>

#include "core/rng.h"
#include "ops/cpu/parallel.h"

namespace mhc::cpu {

template <typename T>
void attention_forward(const AttentionShape& s, const T* qkv, DropoutSpec dropout, T* probs, T* out) {
  const int64_t T_ = s.seq, C = s.C, d = C / s.heads, row = 3 * C;
  const T scale = T(1) / std::sqrt(static_cast<T>(d));
#pragma omp parallel for collapse(2) schedule(static) if (s.batch * s.heads * T_ * T_ * d >= kParallelMinWork)
  for (int64_t b = 0; b < s.batch; ++b)
    for (int64_t h = 0; h < s.heads; ++h) {
      const T* base = qkv + b * T_ * row;
      for (int64_t t = 0; t < T_; ++t) {
        T* p = probs + ((b * s.heads + h) * T_ + t) * T_;
        const T* q = base + t * row + h * d;
        T max_score = -INFINITY;
        for (int64_t u = 0; u <= t; ++u) {
          const T* k = base + u * row + C + h * d;
          T dot = 0;
          for (int64_t i = 0; i < d; ++i) dot += q[i] * k[i];
          p[u] = dot * scale;
          max_score = std::max(max_score, p[u]);
        }
        T sum = 0;
        for (int64_t u = 0; u <= t; ++u) sum += (p[u] = std::exp(p[u] - max_score));
        for (int64_t u = 0; u <= t; ++u) p[u] /= sum;
        for (int64_t u = t + 1; u < T_; ++u) p[u] = 0;
        T* o = out + (b * T_ + t) * C + h * d;
        std::fill(o, o + d, T(0));
        const uint64_t mask_base = static_cast<uint64_t>(((b * s.heads + h) * T_ + t) * T_);
        for (int64_t u = 0; u <= t; ++u) {
          const T w = p[u] * dropout_scale<T>(dropout.key, mask_base + u, dropout.p);
          const T* v = base + u * row + 2 * C + h * d;
          for (int64_t i = 0; i < d; ++i) o[i] += w * v[i];
        }
      }
    }
}

template <typename T>
void attention_backward(const AttentionShape& s, const T* grad_out, const T* qkv, const T* probs, DropoutSpec dropout,
                        T* grad_qkv) {
  const int64_t T_ = s.seq, C = s.C, d = C / s.heads, row = 3 * C;
  const T scale = T(1) / std::sqrt(static_cast<T>(d));
#pragma omp parallel for collapse(2) schedule(static) if (s.batch * s.heads * T_ * T_ * d >= kParallelMinWork)
  for (int64_t b = 0; b < s.batch; ++b)
    for (int64_t h = 0; h < s.heads; ++h) {
      const T* base = qkv + b * T_ * row;
      T* gbase = grad_qkv + b * T_ * row;
      for (int64_t t = 0; t < T_; ++t)
        for (int64_t part = 0; part < 3; ++part) std::fill_n(gbase + t * row + part * C + h * d, d, T(0));
      thread_local std::vector<T> grad_p;
      grad_p.resize(static_cast<size_t>(T_));
      for (int64_t t = 0; t < T_; ++t) {
        const T* p = probs + ((b * s.heads + h) * T_ + t) * T_;
        const T* go = grad_out + (b * T_ + t) * C + h * d;
        const uint64_t mask_base = static_cast<uint64_t>(((b * s.heads + h) * T_ + t) * T_);
        T dot_pg = 0;
        for (int64_t u = 0; u <= t; ++u) {
          const T mask = dropout_scale<T>(dropout.key, mask_base + u, dropout.p);
          const T* v = base + u * row + 2 * C + h * d;
          T* gv = gbase + u * row + 2 * C + h * d;
          T g = 0;
          for (int64_t i = 0; i < d; ++i) {
            g += go[i] * v[i];
            gv[i] += mask * p[u] * go[i];
          }
          grad_p[u] = mask * g;
          dot_pg += p[u] * grad_p[u];
        }
        const T* q = base + t * row + h * d;
        T* gq = gbase + t * row + h * d;
        for (int64_t u = 0; u <= t; ++u) {
          const T grad_score = p[u] * (grad_p[u] - dot_pg) * scale;
          const T* k = base + u * row + C + h * d;
          T* gk = gbase + u * row + C + h * d;
          for (int64_t i = 0; i < d; ++i) {
            gq[i] += grad_score * k[i];
            gk[i] += grad_score * q[i];
          }
        }
      }
    }
}

template <typename T>
void attention_decode(const T* q, const T* k_cache, const T* v_cache, int64_t position, int64_t heads, int64_t C,
                      T* out) {
  const int64_t d = C / heads;
  const T scale = T(1) / std::sqrt(static_cast<T>(d));
  thread_local std::vector<T> p;
  p.resize(static_cast<size_t>(position + 1));
  for (int64_t h = 0; h < heads; ++h) {
    T max_score = -INFINITY;
    for (int64_t u = 0; u <= position; ++u) {
      T dot = 0;
      for (int64_t i = 0; i < d; ++i) dot += q[h * d + i] * k_cache[u * C + h * d + i];
      p[u] = dot * scale;
      max_score = std::max(max_score, p[u]);
    }
    T sum = 0;
    for (int64_t u = 0; u <= position; ++u) sum += (p[u] = std::exp(p[u] - max_score));
    T* o = out + h * d;
    std::fill(o, o + d, T(0));
    for (int64_t u = 0; u <= position; ++u)
      for (int64_t i = 0; i < d; ++i) o[i] += p[u] / sum * v_cache[u * C + h * d + i];
  }
}

template void attention_decode<float>(const float*, const float*, const float*, int64_t, int64_t, int64_t, float*);
template void attention_decode<double>(const double*, const double*, const double*, int64_t, int64_t, int64_t,
                                       double*);
template void attention_forward<float>(const AttentionShape&, const float*, DropoutSpec, float*, float*);
template void attention_forward<double>(const AttentionShape&, const double*, DropoutSpec, double*, double*);
template void attention_backward<float>(const AttentionShape&, const float*, const float*, const float*, DropoutSpec,
                                        float*);
template void attention_backward<double>(const AttentionShape&, const double*, const double*, const double*,
                                         DropoutSpec, double*);

}  // namespace mhc::cpu
