// mhc check-grad: finite-difference check of the whole tiny model's gradient in double.
#include <algorithm>
#include <cstdio>

#include "apps/mhc/commands.h"
#include "check/gradcheck.h"

namespace mhc::app {

namespace {

constexpr double kTolerance = 1e-6;

int run_check_grad(const GradCheckOptions& options) {
  const ModelConfig config = gradcheck_config(options);
  std::printf("tiny GPT: %lld layers, C=%lld, %lld heads, connection %s, n=%lld, recompute %s%s\n",
              static_cast<long long>(config.num_layers), static_cast<long long>(config.hidden_size),
              static_cast<long long>(config.num_attention_heads), config.connection.c_str(),
              static_cast<long long>(config.streams()), config.recompute.c_str(),
              options.recompute_layers ? (" (k=" + std::to_string(*options.recompute_layers) + ")").c_str() : "");
  const auto entries = check_model_gradients(options);
  double worst = 0;
  std::string worst_name;
  for (const GradCheckEntry& e : entries) {
    std::printf("  %-58s %3lld entries  rel err %.2e\n", e.name.c_str(), static_cast<long long>(e.checked), e.error);
    if (!(e.error <= worst)) {
      worst = e.error;
      worst_name = e.name;
    }
  }
  const bool ok = worst <= kTolerance;
  std::printf("worst relative error %.2e in %s over %zu tensors: %s (tolerance %.0e)\n", worst, worst_name.c_str(),
              entries.size(), ok ? "ok" : "FAIL", kTolerance);
  return ok ? 0 : 1;
}

}  // namespace

Command add_check_grad_command(CLI::App& app) {
  auto options = std::make_shared<GradCheckOptions>();
  auto recompute = std::make_shared<int64_t>(0);
  CLI::App* cmd = app.add_subcommand(
      "check-grad",
      "Finite-difference check (double) of a tiny GPT's loss gradient for every parameter tensor and the input "
      "embeddings; prints the worst relative error per tensor and overall. Exit 0 within 1e-6, else 1.");
  cmd->add_option("--connection", options->connection, "residual connection")
      ->check(CLI::IsMember({"residual", "hc", "mhc"}))
      ->capture_default_str();
  cmd->add_option("--streams", options->streams, "residual streams n (hc and mhc)")
      ->check(CLI::Range(1, 16))
      ->capture_default_str();
  cmd->add_option("--recompute-layers", *recompute, "selective mHC recompute with K layers per block (0: off)")
      ->check(at_least(0, true))
      ->capture_default_str();
  cmd->add_option("--seed", options->seed, "seed of the parameters, tokens and dropout masks")->capture_default_str();
  cmd->add_option("--samples", options->samples_per_tensor, "entries checked per tensor")->capture_default_str();
  return [cmd, options, recompute] {
    if (!cmd->parsed()) return -1;
    if (*recompute > 0) options->recompute_layers = *recompute;
    return run_check_grad(*options);
  };
}

}  // namespace mhc::app
