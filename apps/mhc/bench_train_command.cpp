// `mhc bench train`: the whole training step on one GPU (nn/gpt_cuda.h) for a plain
// residual GPT, mHC without recompute and mHC with selective recompute: step time,
// tokens/s and peak GPU memory, a table, then one JSON line per row.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <memory>
#include <string>
#include <vector>
#include <nlohmann/json.hpp>

#include "apps/mhc/commands.h"
#include "apps/mhc/gpt_shape.h"
#include "core/error.h"
#include "core/rng.h"
#include "train/train_config.h"
#if MHC_WITH_CUDA
#include <cuda_runtime.h>

#include "core/cuda/device.h"
#include "nn/gpt_cuda.h"
#endif

namespace mhc::app {
namespace {

struct BenchTrainOptions : GptShape {
  int64_t recompute_layers = 1;  // mhc_recompute_layer_num of the recompute row
  int steps = 10, warmup = 3;
  double dropout = 0;   // hidden and attention dropout
  bool graphs = true;   // each micro-batch as one CUDA graph (nn/gpt_cuda.h)
  bool overlap = true;  // the backward's weight gradients on a second stream (nn/gpt_cuda.h)
  std::vector<std::string> variants{"residual", "mhc", "mhc-recompute"};
};

#if MHC_WITH_CUDA
size_t used_device_bytes() {
  size_t free = 0, total = 0;
  MHC_CUDA_CHECK(cudaMemGetInfo(&free, &total));
  return total - free;
}

int run_bench_train(const BenchTrainOptions& o) {
  check(cuda::device_available(), "bench train: no CUDA device");
  cudaDeviceProp prop{};
  MHC_CUDA_CHECK(cudaGetDeviceProperties(&prop, 0));
  std::printf(
      "device: %s; GPT %lld layers, C=%lld, %lld heads, T=%lld, micro-batch %lld, vocab %lld; "
      "dropout %g; median of %d steps after %d warm-up steps; %s; %s\n",
      prop.name, static_cast<long long>(o.layers), static_cast<long long>(o.hidden), static_cast<long long>(o.heads),
      static_cast<long long>(o.seq), static_cast<long long>(o.batch), static_cast<long long>(o.vocab), o.dropout,
      o.steps, o.warmup, o.graphs ? "each micro-batch one CUDA graph" : "kernels launched one by one (--no-graphs)",
      o.overlap ? "weight gradients on a second stream" : "one stream (--no-overlap)");
  std::printf("%-26s %10s %12s %10s %10s %10s\n", "variant", "step ms", "tokens/s", "peak GiB", "step x res",
              "mem x res");
  struct Variant {
    std::string key, name, connection, recompute;
  };
  const Variant all[] = {{"residual", "residual", "residual", "none"},
                         {"mhc", "mhc n=" + std::to_string(o.streams), "mhc", "none"},
                         {"mhc-recompute",
                          "mhc n=" + std::to_string(o.streams) + " recompute k=" + std::to_string(o.recompute_layers),
                          "mhc", "mhc"}};
  std::vector<Variant> variants;
  for (const Variant& v : all)
    if (std::find(o.variants.begin(), o.variants.end(), v.key) != o.variants.end()) variants.push_back(v);
  std::vector<nlohmann::json> rows;
  double residual_ms = 0;
  double residual_gib = 0;
  for (const Variant& v : variants) {
    TrainConfig config = default_train_config();
    ModelConfig& m = config.model;
    o.apply(m);
    m.connection = v.connection;
    m.recompute = v.recompute;
    if (v.recompute == "mhc") m.mhc_recompute_layer_num = o.recompute_layers;
    m.hidden_dropout = m.attention_dropout = o.dropout;
    config.batch_size = o.batch;
    config.validate();
    const std::string& label = v.name;
    std::unique_ptr<GptCuda> model;
    MHC_CUDA_CHECK(cudaDeviceSynchronize());
    const size_t before = used_device_bytes();
    try {
      model = std::make_unique<GptCuda>(config.model, o.batch, o.seq);
    } catch (const Error& e) {
      std::printf("%-26s %s\n", label.c_str(), e.what());
      rows.push_back({{"variant", label}, {"error", e.what()}, {"device", prop.name}});
      continue;
    }
    model->init(1);
    model->set_graphs(o.graphs);
    model->set_overlap(o.overlap);
    const int64_t N = o.batch * o.seq;
    std::vector<int32_t> tokens(N), targets(N);
    for (int64_t i = 0; i < N; ++i) {
      tokens[i] = static_cast<int32_t>(rng_uniform(rng_key(7, 1), static_cast<uint64_t>(i)) * o.vocab) % o.vocab;
      targets[i] = static_cast<int32_t>(rng_uniform(rng_key(7, 2), static_cast<uint64_t>(i)) * o.vocab) % o.vocab;
    }
    std::vector<double> times;
    size_t peak = 0;
    for (int step = 0; step < o.warmup + o.steps; ++step) {
      MHC_CUDA_CHECK(cudaDeviceSynchronize());
      const auto start = std::chrono::steady_clock::now();
      model->zero_grad();
      model->forward_backward(tokens.data(), targets.data(), static_cast<uint64_t>(step));
      model->step(config, 1e-4);
      MHC_CUDA_CHECK(cudaDeviceSynchronize());
      const double ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count();
      peak = std::max(peak, used_device_bytes() - before);
      if (step >= o.warmup) times.push_back(ms);
    }
    std::sort(times.begin(), times.end());
    const double ms = times[times.size() / 2];
    const double gib = static_cast<double>(peak) / (1u << 30);
    if (v.connection == "residual") residual_ms = ms, residual_gib = gib;
    const double tokens_per_s = static_cast<double>(N) / (ms / 1e3);
    auto ratio = [](double value, double base) { return base > 0 ? std::to_string(value / base).substr(0, 5) : "-"; };
    std::printf("%-26s %10.2f %12.0f %10.2f %10s %10s\n", label.c_str(), ms, tokens_per_s, gib,
                ratio(ms, residual_ms).c_str(), ratio(gib, residual_gib).c_str());
    rows.push_back({{"variant", label},
                    {"step_ms", ms},
                    {"tokens_per_s", tokens_per_s},
                    {"peak_gib", gib},
                    {"step_vs_residual", residual_ms > 0 ? ms / residual_ms : 0.0},
                    {"memory_vs_residual", residual_gib > 0 ? gib / residual_gib : 0.0},
                    {"layers", o.layers},
                    {"hidden", o.hidden},
                    {"heads", o.heads},
                    {"seq", o.seq},
                    {"batch", o.batch},
                    {"streams", o.streams},
                    {"recompute_layers", v.recompute == "mhc" ? o.recompute_layers : 0},
                    {"dropout", o.dropout},
                    {"graphs", o.graphs},
                    {"overlap", o.overlap},
                    {"device", prop.name}});
  }
  for (const auto& r : rows) std::printf("%s\n", r.dump().c_str());
  return 0;
}
#endif

}  // namespace

Command add_bench_train_command(CLI::App& bench) {
  auto o = std::make_shared<BenchTrainOptions>();
  CLI::App* cmd = bench.add_subcommand(
      "train",
      "Times the whole training step (forward, backward, clipping, AdamW) on one GPU for a plain residual GPT, mHC "
      "and mHC with selective recompute, on synthetic tokens: step time, tokens/s, peak GPU memory (memory in use "
      "after each step minus before the model). Defaults: GPT-2 small. Needs a CUDA build and a GPU.");
  o->add_options(cmd);
  cmd->add_option("--recompute-layers", o->recompute_layers,
                  "layers per recompute block in the recompute row (mhc_recompute_layer_num)")
      ->check(at_least(1, true))
      ->capture_default_str();
  cmd->add_option("--steps", o->steps, "timed steps (median reported)")
      ->check(at_least(1, true))
      ->capture_default_str();
  cmd->add_option("--warmup", o->warmup, "untimed steps first")->check(at_least(0, true))->capture_default_str();
  cmd->add_option("--dropout", o->dropout, "hidden and attention dropout probability")
      ->check(CLI::Range(0.0, 0.99))
      ->capture_default_str();
  cmd->add_flag("!--no-graphs", o->graphs,
               "launch the kernels one by one instead of replaying each micro-batch as a CUDA graph");
  cmd->add_flag("!--no-overlap", o->overlap,
               "run the backward's weight gradients on the main stream instead of a second one beside it");
  cmd->add_option("--variants", o->variants, "which rows to run (separated by spaces or commas)")
      ->delimiter(',')
      ->check(CLI::IsMember({"residual", "mhc", "mhc-recompute"}))
      ->capture_default_str();
  return [cmd, o]() -> int {
    if (!cmd->parsed()) return -1;
#if MHC_WITH_CUDA
    return run_bench_train(*o);
#else
    fail("bench train: this mhc was built without CUDA (no nvcc at configure time, or -DMHC_CUDA=OFF)");
#endif
  };
}

}  // namespace mhc::app
