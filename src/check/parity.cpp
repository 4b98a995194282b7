#include "check/parity.h"

#include <cmath>
#include <map>
#include <set>

#include "core/error.h"
#include "nn/hyper_connection.h"
#include "ops/cpu/sinkhorn.h"

namespace mhc {

namespace {

int64_t metadata_int(const Safetensors& file, const std::string& key, const std::string& origin) {
  auto it = file.metadata.find(key);
  check(it != file.metadata.end(), origin + ": metadata has no '" + key + "'");
  try {
    size_t used = 0;
    const long long value = std::stoll(it->second, &used);
    check(used == it->second.size(), "");
    return value;
  } catch (const std::exception&) {
    fail(origin + ": metadata '" + key + "' = '" + it->second + "' is not an integer");
  }
}

template <typename T>
std::vector<T> input(const Safetensors& file, const std::string& name, int64_t expected, const std::string& origin) {
  check(file.has(name), origin + ": missing tensor '" + name + "'");
  const HostTensor& t = file.at(name);
  check(t.numel() == expected, origin + ": tensor '" + name + "' has shape " + t.shape_string() + ", expected " +
                                   std::to_string(expected) + " elements");
  try {
    return t.to_vector<T>();
  } catch (const Error& e) {
    fail(origin + ": tensor '" + name + "': " + e.what());
  }
}

using Outputs = std::map<std::string, std::vector<double>>;

template <typename T> std::vector<double> widen(const std::vector<T>& v) { return {v.begin(), v.end()}; }

template <typename T>
Outputs hyper_connection_outputs(const Safetensors& file, const std::string& origin, std::set<std::string>& inputs) {
  const int64_t n = metadata_int(file, "n", origin), C = metadata_int(file, "hidden_size", origin);
  const int64_t iterations = metadata_int(file, "sinkhorn_iterations", origin);
  check(n >= 1 && n <= 64, origin + ": metadata n = " + std::to_string(n) + " is out of range");
  check(C >= 1, origin + ": metadata hidden_size must be >= 1");
  check(iterations >= 1, origin + ": metadata sinkhorn_iterations must be >= 1");
  check(file.has("x"), origin + ": missing tensor 'x'");
  const int64_t x_numel = file.at("x").numel();
  check(x_numel > 0 && x_numel % (n * C) == 0,
        origin + ": tensor 'x' of shape " + file.at("x").shape_string() + " is not [tokens, n*hidden_size]");
  const int64_t tokens = x_numel / (n * C), K = n * C;

  HyperConnection<T> hc(static_cast<int>(n), C, cpu::ResMapping::Sinkhorn, static_cast<int>(iterations));
  for (Parameter<T>* p : hc.parameters()) {
    p->value = input<T>(file, p->name, p->size(), origin);
    inputs.insert(p->name);
  }
  const std::vector<T> x = input<T>(file, "x", tokens * K, origin);
  const std::vector<T> y = input<T>(file, "y", tokens * C, origin);
  const std::vector<T> g_out = input<T>(file, "g_out", tokens * K, origin);
  const std::vector<T> g_agg = input<T>(file, "g_agg", tokens * C, origin);
  const bool has_bias = file.has("y_bias");
  const std::vector<T> y_bias = has_bias ? input<T>(file, "y_bias", C, origin) : std::vector<T>();
  inputs.insert({"x", "y", "y_bias", "g_out", "g_agg"});

  HcActivations<T> act;
  std::vector<T> aggregated(tokens * C), out(tokens * K);
  hc.forward(x.data(), tokens, act, aggregated.data());
  const T* bias_ptr = has_bias ? y_bias.data() : nullptr;
  hc.residual_forward(x.data(), act, y.data(), bias_ptr, {}, out.data());

  std::vector<T> grad_x(tokens * K, T(0)), grad_y(tokens * C), grad_y_bias(C, T(0));
  hc.residual_backward(g_out.data(), x.data(), act, y.data(), bias_ptr, {}, grad_x.data(), grad_y.data(),
                       has_bias ? grad_y_bias.data() : nullptr);
  hc.backward(g_agg.data(), x.data(), act, grad_x.data());

  Outputs outputs{{"h_pre", widen(act.h_pre)},   {"h_post", widen(act.h_post)}, {"h_res", widen(act.h_res)},
                  {"aggregated", widen(aggregated)}, {"out", widen(out)},         {"grad.x", widen(grad_x)},
                  {"grad.y", widen(grad_y)}};
  if (has_bias) outputs["grad.y_bias"] = widen(grad_y_bias);
  for (Parameter<T>* p : hc.parameters()) outputs["grad." + p->name] = widen(p->grad);
  return outputs;
}

template <typename T>
Outputs sinkhorn_outputs(const Safetensors& file, const std::string& origin, std::set<std::string>& inputs) {
  const int64_t iterations = metadata_int(file, "sinkhorn_iterations", origin);
  check(iterations >= 1, origin + ": metadata sinkhorn_iterations must be >= 1");
  check(file.has("logits"), origin + ": missing tensor 'logits'");
  const HostTensor& logits_tensor = file.at("logits");
  check(logits_tensor.shape.size() >= 2 && logits_tensor.shape.back() == logits_tensor.shape[logits_tensor.shape.size() - 2] &&
            logits_tensor.shape.back() >= 1,
        origin + ": tensor 'logits' of shape " + logits_tensor.shape_string() + " is not [..., n, n]");
  const int n = static_cast<int>(logits_tensor.shape.back());
  const int64_t count = logits_tensor.numel() / (n * n);
  const std::vector<T> logits = input<T>(file, "logits", count * n * n, origin);
  const std::vector<T> g = input<T>(file, "g", count * n * n, origin);
  inputs.insert({"logits", "g"});
  std::vector<T> M(logits.size()), grad(logits.size());
  cpu::sinkhorn_forward_batch(logits.data(), count, n, static_cast<int>(iterations), M.data());
  cpu::sinkhorn_backward_batch(logits.data(), g.data(), count, n, static_cast<int>(iterations), grad.data());
  return {{"M", widen(M)}, {"grad.logits", widen(grad)}};
}

TensorError compare(const std::string& name, const std::vector<double>& ours, const std::vector<double>& ref) {
  double diff = 0, norm = 0;
  for (size_t i = 0; i < ref.size(); ++i) {
    diff += (ours[i] - ref[i]) * (ours[i] - ref[i]);
    norm += ref[i] * ref[i];
  }
  if (norm == 0) return {name, std::sqrt(diff), false};
  return {name, std::sqrt(diff) / std::sqrt(norm), true};
}

}  // namespace

const TensorError& ParityResult::worst() const {
  check(!errors.empty(), "no tensor was compared");
  const TensorError* worst = &errors.front();
  for (const TensorError& e : errors)
    if (std::isnan(e.error) || (!std::isnan(worst->error) && e.error > worst->error)) worst = &e;
  return *worst;
}

template <typename T> ParityResult check_parity(const Safetensors& file, const std::string& origin) {
  auto kind_it = file.metadata.find("kind");
  check(kind_it != file.metadata.end(), origin + ": metadata has no 'kind'");
  ParityResult result;
  result.kind = kind_it->second;
  std::set<std::string> inputs;
  Outputs outputs;
  if (result.kind == "hyper_connection") outputs = hyper_connection_outputs<T>(file, origin, inputs);
  else if (result.kind == "sinkhorn") outputs = sinkhorn_outputs<T>(file, origin, inputs);
  else fail(origin + ": unknown kind '" + result.kind + "' (expected hyper_connection or sinkhorn)");

  for (const auto& entry : file.tensors) {
    const std::string& name = entry.first;
    const HostTensor& tensor = entry.second;
    if (inputs.count(name)) continue;
    auto it = outputs.find(name);
    if (it == outputs.end()) {
      result.ignored.push_back(name);
      continue;
    }
    check(tensor.numel() == static_cast<int64_t>(it->second.size()),
          origin + ": tensor '" + name + "' has shape " + tensor.shape_string() + ", expected " +
              std::to_string(it->second.size()) + " elements");
    result.errors.push_back(compare(name, it->second, tensor.to_vector<double>()));
  }
  check(!result.errors.empty(), origin + ": holds no output or gradient tensor to compare");
  return result;
}

template ParityResult check_parity<float>(const Safetensors&, const std::string&);
template ParityResult check_parity<double>(const Safetensors&, const std::string&);

}  // namespace mhc
