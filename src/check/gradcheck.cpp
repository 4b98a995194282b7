#include "check/gradcheck.h"

#include <algorithm>
#include <cmath>

#include "core/rng.h"
#include "nn/gpt.h"

namespace mhc {

ModelConfig gradcheck_config(const GradCheckOptions& o) {
  ModelConfig c;
  c.num_layers = 3;
  c.hidden_size = 12;
  c.num_attention_heads = 2;
  c.vocab_size = 13;
  c.seq_length = 6;
  c.connection = o.connection;
  c.num_residual_streams = o.streams;
  c.mhc_sinkhorn_iterations = 6;
  c.mhc_init_gating_factor = 0.5;  // gates large enough that the mappings matter
  c.hidden_dropout = 0.1;          // fixed Philox masks: the loss stays a smooth function
  c.attention_dropout = 0.1;
  c.init_method_std = 0.3;
  if (o.recompute_layers) {
    c.recompute = "mhc";
    c.mhc_recompute_layer_num = o.recompute_layers;
  }
  for (const std::string& assignment : o.overrides) apply_config_override(c, assignment);
  c.validate();
  return c;
}

std::vector<GradCheckEntry> check_model_gradients(const GradCheckOptions& o) {
  const ModelConfig config = gradcheck_config(o);
  const int64_t batch = 2, seq = config.seq_length, N = batch * seq;
  Gpt<double> model(config, batch, seq);
  model.init(o.seed);
  // Move every parameter off its symmetric initial value (unit norms, zero biases).
  uint64_t site = 0;
  for (Parameter<double>* p : model.parameters())
    for (size_t i = 0; i < p->value.size(); ++i)
      p->value[i] += 0.2 * (2.0 * rng_uniform(rng_key(o.seed, 0xBEEF, site), i) - 1.0), ++site;
  std::vector<int32_t> tokens(N), targets(N);
  for (int64_t i = 0; i < N; ++i) {
    tokens[i] = static_cast<int32_t>(philox4x32(i, 0, rng_key(o.seed, 1)).v[0] % config.vocab_size);
    targets[i] = static_cast<int32_t>(philox4x32(i, 0, rng_key(o.seed, 2)).v[0] % config.vocab_size);
  }
  const uint64_t step = 7;
  // Fourth-order central difference: truncation O(h^4), rounding about 1e-16 * loss / h.
  auto derivative = [](double& v, const auto& loss) {
    const double h = 1e-4, saved = v;
    double f[4];
    const double offsets[4] = {2 * h, h, -h, -2 * h};
    for (int k = 0; k < 4; ++k) {
      v = saved + offsets[k];
      f[k] = loss();
    }
    v = saved;
    return (-f[0] + 8 * f[1] - 8 * f[2] + f[3]) / (12 * h);
  };
  auto sample = [&](int64_t size, uint64_t key) {
    std::vector<int64_t> idx;
    if (size <= o.samples_per_tensor) {
      for (int64_t i = 0; i < size; ++i) idx.push_back(i);
    } else {
      for (int64_t k = 0; k < o.samples_per_tensor; ++k)
        idx.push_back(static_cast<int64_t>(philox4x32(k, 0, key).v[0] % static_cast<uint64_t>(size)));
    }
    return idx;
  };
  auto relative = [](const std::vector<double>& a, const std::vector<double>& b) {
    double diff = 0, norm = 0;
    for (size_t i = 0; i < a.size(); ++i) {
      diff += (a[i] - b[i]) * (a[i] - b[i]);
      norm += b[i] * b[i];
    }
    return std::sqrt(diff) / std::max(std::sqrt(norm), kGradientFloor);
  };

  std::vector<GradCheckEntry> entries;
  model.zero_grad();
  model.forward(tokens.data(), targets.data(), step);
  model.backward();
  uint64_t tensor_index = 0;
  for (Parameter<double>* p : model.parameters()) {
    std::vector<double> analytic, numeric;
    for (int64_t i : sample(p->size(), rng_key(o.seed, 3, tensor_index++))) {
      analytic.push_back(p->grad[i]);
      numeric.push_back(derivative(p->value[i], [&] { return model.forward(tokens.data(), targets.data(), step); }));
    }
    entries.push_back({p->name, relative(analytic, numeric), static_cast<int64_t>(analytic.size())});
  }

  // The input embeddings e = wte[tokens] + wpe, perturbed directly.
  model.forward(tokens.data(), targets.data(), step);
  std::vector<double> e = model.embeddings();
  model.zero_grad();
  model.forward(tokens.data(), targets.data(), step, e.data());
  model.backward();
  const std::vector<double> grad_e = model.grad_embeddings();
  std::vector<double> analytic, numeric;
  for (int64_t i : sample(static_cast<int64_t>(e.size()), rng_key(o.seed, 4))) {
    analytic.push_back(grad_e[i]);
    numeric.push_back(derivative(e[i], [&] { return model.forward(tokens.data(), targets.data(), step, e.data()); }));
  }
  entries.push_back({"input embeddings", relative(analytic, numeric), static_cast<int64_t>(analytic.size())});
  return entries;
}

}  // namespace mhc
