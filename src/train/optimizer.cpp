#include "train/optimizer.h"

#include <cmath>

namespace mhc {

namespace {
bool ends_with(const std::string& s, const std::string& suffix) {
  return s.size() >= suffix.size() && s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}
}  // namespace

bool decays(const std::string& name) {
  if (ends_with(name, ".bias") || name.find("layernorm") != std::string::npos) return false;
  if (name == "embedding.position_embeddings.weight") return false;
  if (ends_with(name, ".alpha_pre") || ends_with(name, ".alpha_post") || ends_with(name, ".alpha_res")) return false;
  return true;
}

double learning_rate_at(const TrainConfig& c, int64_t step) {
  if (step < c.warmup_steps) return c.learning_rate * static_cast<double>(step + 1) / static_cast<double>(c.warmup_steps);
  const int64_t decay_end = std::max(c.lr_decay_steps, c.warmup_steps + 1);
  if (step >= decay_end) return c.min_learning_rate;
  const double progress =
      static_cast<double>(step - c.warmup_steps) / static_cast<double>(decay_end - c.warmup_steps);
  const double cosine = 0.5 * (1.0 + std::cos(3.14159265358979323846 * progress));
  return c.min_learning_rate + cosine * (c.learning_rate - c.min_learning_rate);
}

double scale_and_clip_gradients(const std::vector<Parameter<float>*>& parameters, float scale, double clip) {
  double sum_sq = 0;
  for (Parameter<float>* p : parameters)
    for (float& g : p->grad) {
      g *= scale;
      sum_sq += static_cast<double>(g) * g;
    }
  const double norm = std::sqrt(sum_sq);
  if (clip > 0 && norm > clip) {
    const auto factor = static_cast<float>(clip / norm);
    for (Parameter<float>* p : parameters)
      for (float& g : p->grad) g *= factor;
  }
  return norm;
}

AdamW::AdamW(const std::vector<Parameter<float>*>& parameters) : parameters_(parameters) {
  for (Parameter<float>* p : parameters) {
    exp_avg.emplace_back(p->value.size(), 0.0f);
    exp_avg_sq.emplace_back(p->value.size(), 0.0f);
    decay_.push_back(decays(p->name));
  }
}

AdamWScalars adamw_scalars(const TrainConfig& c, double lr, int64_t steps_taken) {
  const double correction1 = 1.0 - std::pow(c.adam_beta1, static_cast<double>(steps_taken));
  const double correction2 = 1.0 - std::pow(c.adam_beta2, static_cast<double>(steps_taken));
  return {static_cast<float>(c.adam_beta1),       static_cast<float>(c.adam_beta2),
          static_cast<float>(c.adam_eps),         static_cast<float>(lr / correction1),
          static_cast<float>(std::sqrt(correction2)), static_cast<float>(1.0 - lr * c.weight_decay)};
}

void AdamW::step(const TrainConfig& c, double lr) {
  ++steps_taken;
  const AdamWScalars s = adamw_scalars(c, lr, steps_taken);
  const float b1 = s.beta1, b2 = s.beta2, step_size = s.step_size, sqrt_c2 = s.sqrt_correction2, eps = s.eps;
  for (size_t k = 0; k < parameters_.size(); ++k) {
    Parameter<float>& p = *parameters_[k];
    const float decay = decay_[k] ? s.decay : 1.0f;
    float* m = exp_avg[k].data();
    float* v = exp_avg_sq[k].data();
#pragma omp parallel for schedule(static)
    for (size_t i = 0; i < p.value.size(); ++i) {
      const float g = p.grad[i];
      m[i] = b1 * m[i] + (1.0f - b1) * g;
      v[i] = b2 * v[i] + (1.0f - b2) * g * g;
      p.value[i] = p.value[i] * decay - step_size * m[i] / (std::sqrt(v[i]) / sqrt_c2 + eps);
    }
  }
}

}  // namespace mhc
