// mhc bench memory: activation bytes kept for backward, residual vs mHC vs mHC with
// selective recompute, from the same sizes the CPU model allocates (fp32).
#include <cstdio>
#include <set>
#include <nlohmann/json.hpp>

#include "apps/mhc/commands.h"
#include "apps/mhc/gpt_shape.h"
#include "nn/gpt.h"

namespace mhc::app {

namespace {

int run_bench_memory(const GptShape& o) {
  ModelConfig base;
  o.apply(base);

  struct Row {
    std::string label;
    std::string k;
    ActivationBytes bytes;
  };
  std::vector<Row> rows;
  ModelConfig residual = base;
  residual.connection = "residual";
  rows.push_back({"residual", "", activation_bytes(residual, o.batch, o.seq, sizeof(float))});
  ModelConfig mhc = base;
  mhc.connection = "mhc";
  rows.push_back({"mhc", "", activation_bytes(mhc, o.batch, o.seq, sizeof(float))});
  std::set<int64_t> ks = {1, 2, o.layers};
  for (int64_t k : ks) {
    if (k > o.layers) continue;
    ModelConfig r = mhc;
    r.recompute = "mhc";
    r.mhc_recompute_layer_num = k;
    rows.push_back({"mhc recompute k=" + std::to_string(k), std::to_string(k),
                    activation_bytes(r, o.batch, o.seq, sizeof(float))});
  }

  std::printf("activation memory, fp32, %lld layers, C=%lld, %lld heads, T=%lld, batch %lld, n=%lld, vocab %lld\n",
              static_cast<long long>(o.layers), static_cast<long long>(o.hidden), static_cast<long long>(o.heads),
              static_cast<long long>(o.seq), static_cast<long long>(o.batch), static_cast<long long>(o.streams),
              static_cast<long long>(o.vocab));
  std::printf("%-22s %16s %16s %16s %10s\n", "variant", "kept (bytes)", "workspace", "total", "x residual");
  const double reference = static_cast<double>(rows.front().bytes.total());
  nlohmann::json recompute = nlohmann::json::object();
  for (const Row& r : rows) {
    std::printf("%-22s %16lld %16lld %16lld %10.3f\n", r.label.c_str(), static_cast<long long>(r.bytes.kept),
                static_cast<long long>(r.bytes.workspace), static_cast<long long>(r.bytes.total()),
                static_cast<double>(r.bytes.total()) / reference);
    if (!r.k.empty()) recompute[r.k] = r.bytes.total();
  }
  std::printf("(kept: held from forward to backward; workspace: one recompute block's restored tensors)\n");
  const nlohmann::json summary = {{"residual_bytes", rows[0].bytes.total()},
                                  {"mhc_bytes", rows[1].bytes.total()},
                                  {"mhc_recompute_bytes", recompute}};
  std::printf("%s\n", summary.dump().c_str());
  return 0;
}

}  // namespace

Command add_bench_memory_command(CLI::App& bench) {
  auto o = std::make_shared<GptShape>();
  CLI::App* cmd = bench.add_subcommand(
      "memory",
      "Activation bytes kept for backward (fp32 CPU model) for residual, mHC without recompute and mHC with "
      "selective recompute at k = 1, 2, L layers per block; a table, then one JSON line.");
  o->add_options(cmd);
  return [cmd, o] { return cmd->parsed() ? run_bench_memory(*o) : -1; };
}

}  // namespace mhc::app
