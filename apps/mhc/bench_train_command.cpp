// `mhc bench train`: the whole training step on one GPU (nn/gpt_cuda.h) for a plain
// residual GPT, mHC without recompute and mHC with selective recompute: step time,
// tokens/s and peak GPU memory, a table, then one JSON line per row. With --trace, each
// variant also runs a step recorded as a device timeline (core/cuda/cupti_timeline.h): a
// Chrome trace file and a summary of where that step's time went.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <memory>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <vector>

#include "apps/mhc/commands.h"
#include "apps/mhc/gpt_shape.h"
#include "core/error.h"
#include "core/rng.h"
#include "core/timeline.h"
#include "train/train_config.h"
#if MHC_WITH_CUDA
#include <cuda_runtime.h>

#include "core/cuda/cupti_timeline.h"
#include "core/cuda/device.h"
#include "nn/gpt_cuda.h"
#endif

namespace mhc::app {
namespace {

struct BenchTrainOptions : GptShape {
  int64_t recompute_layers = 1;  // mhc_recompute_layer_num of the recompute row
  int steps = 10, warmup = 3;
  int rounds = 1;       // times each row is built and timed, in turn
  double dropout = 0;   // hidden and attention dropout
  bool graphs = true;   // each micro-batch as one CUDA graph (nn/gpt_cuda.h)
  bool overlap = true;  // the backward's weight gradients on a second stream (nn/gpt_cuda.h)
  std::vector<std::string> variants{"residual", "mhc", "mhc-recompute"};
  std::string trace;  // Chrome trace file of each variant's recorded step; empty: none
};

#if MHC_WITH_CUDA
size_t used_device_bytes() {
  size_t free = 0, total = 0;
  MHC_CUDA_CHECK(cudaMemGetInfo(&free, &total));
  return total - free;
}

// A traced step's summary: the span, the idle and two-stream times, each stream's busy
// time, and the kernels that took the most time (and how much of it with nothing beside).
void print_timeline(const std::string& variant, const TimelineSummary& t) {
  std::printf("== timeline of one step, %s: span %.2f ms, device idle %.2f ms, two or more streams at once %.2f ms\n",
              variant.c_str(), t.span_ms, t.idle_ms, t.overlap_ms);
  // A CUDA graph runs its branches on streams of its own: the busiest few, then the rest.
  constexpr size_t kStreamsShown = 3;
  double others_ms = 0;
  int64_t others_records = 0;
  for (size_t i = 0; i < t.streams.size(); ++i) {
    const StreamBusy& b = t.streams[i];
    if (i < kStreamsShown)
      std::printf("   stream %-6u busy %8.2f ms  %6lld records\n", b.stream, b.busy_ms,
                  static_cast<long long>(b.records));
    else
      others_ms += b.busy_ms, others_records += b.records;
  }
  if (t.streams.size() > kStreamsShown)
    std::printf("   %zu more streams  %8.2f ms  %6lld records (busy times summed)\n", t.streams.size() - kStreamsShown,
                others_ms, static_cast<long long>(others_records));
  std::printf("   %-60s %6s %9s %8s %9s\n", "kernel (the most time first)", "calls", "ms", "of span", "alone ms");
  constexpr size_t kShown = 16;
  for (size_t i = 0; i < std::min(kShown, t.names.size()); ++i) {
    const NameTotal& n = t.names[i];
    std::printf("   %-60.60s %6lld %9.3f %7.1f%% %9.3f\n", n.name.c_str(), static_cast<long long>(n.calls), n.total_ms,
                100.0 * n.total_ms / t.span_ms, n.alone_ms);
  }
}

// One variant's model: its configuration from the options and the row.
struct Variant {
  std::string key, name, connection, recompute;
};

// What one round of a variant measured: its timed steps (ms), the peak memory and, with
// --trace, the recorded step's summary and trace events.
struct Measurement {
  std::vector<double> step_ms;
  double peak_gib = 0;
  std::optional<TimelineSummary> timeline;
  nlohmann::json trace_events;
};

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

TrainConfig variant_config(const BenchTrainOptions& o, const Variant& v) {
  TrainConfig config = default_train_config();
  ModelConfig& m = config.model;
  o.apply(m);
  m.connection = v.connection;
  m.recompute = v.recompute;
  if (v.recompute == "mhc") m.mhc_recompute_layer_num = o.recompute_layers;
  m.hidden_dropout = m.attention_dropout = o.dropout;
  config.batch_size = o.batch;
  config.validate();
  return config;
}

// Times the steps of a model just built (`before`: the device memory in use before it)
// and, with `trace`, records one more.
Measurement measure_model(const BenchTrainOptions& o, const TrainConfig& config, GptCuda* model, size_t before,
                          bool trace, int trace_process, const std::string& label) {
  model->init(1);
  model->set_graphs(o.graphs);
  model->set_overlap(o.overlap);
  const int64_t N = o.batch * o.seq;
  std::vector<int32_t> tokens(N), targets(N);
  for (int64_t i = 0; i < N; ++i) {
    tokens[i] = static_cast<int32_t>(rng_uniform(rng_key(7, 1), static_cast<uint64_t>(i)) * o.vocab) % o.vocab;
    targets[i] = static_cast<int32_t>(rng_uniform(rng_key(7, 2), static_cast<uint64_t>(i)) * o.vocab) % o.vocab;
  }
  const auto train_step = [&](int step) {
    model->zero_grad();
    model->forward_backward(tokens.data(), targets.data(), static_cast<uint64_t>(step));
    model->step(config, 1e-4);
    MHC_CUDA_CHECK(cudaDeviceSynchronize());
  };
  Measurement out;
  size_t peak = 0;
  for (int step = 0; step < o.warmup + o.steps; ++step) {
    MHC_CUDA_CHECK(cudaDeviceSynchronize());
    const auto start = std::chrono::steady_clock::now();
    train_step(step);
    const double ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count();
    peak = std::max(peak, used_device_bytes() - before);
    if (step >= o.warmup) out.step_ms.push_back(ms);
  }
  out.peak_gib = static_cast<double>(peak) / (1u << 30);
  if (trace) {
    // Two more steps under CUPTI, the second recorded: the first after enabling it waits
    // about 4 ms for its graph's launch (H200).
    cuda::start_timeline();
    train_step(o.warmup + o.steps);
    const uint64_t begin = cuda::timeline_now_ns();
    train_step(o.warmup + o.steps + 1);
    std::vector<TimelineRecord> step_records;
    for (TimelineRecord& r : cuda::stop_timeline())
      if (r.start_ns >= begin) step_records.push_back(std::move(r));
    out.timeline = summarize_timeline(step_records);
    out.trace_events = timeline_trace_events(step_records, trace_process, label);
  }
  return out;
}

int run_bench_train(const BenchTrainOptions& o) {
  // The trace file's path is checked first (a bad one fails before the benchmark) and the
  // file written at the end (a run that fails leaves nothing behind).
  if (!o.trace.empty()) {
    check(!std::filesystem::exists(o.trace), "bench train: --trace " + o.trace + " exists (not overwritten)");
    const std::filesystem::path folder = std::filesystem::path(o.trace).parent_path();
    check(folder.empty() || std::filesystem::is_directory(folder),
          "bench train: --trace " + o.trace + ": no folder " + folder.string());
  }
  check(cuda::device_available(), "bench train: no CUDA device");
  cudaDeviceProp prop{};
  MHC_CUDA_CHECK(cudaGetDeviceProperties(&prop, 0));
  const std::string steps = std::to_string(o.steps), warmup = std::to_string(o.warmup) + " warm-up steps";
  const std::string timing = o.rounds > 1
                                 ? "median of " + std::to_string(o.steps * o.rounds) + " steps (" + steps +
                                       " a round after " + warmup + ", " + std::to_string(o.rounds) + " rounds)"
                                 : "median of " + steps + " steps after " + warmup;
  std::printf(
      "device: %s; GPT %lld layers, C=%lld, %lld heads, T=%lld, micro-batch %lld, vocab %lld; "
      "dropout %g; %s; %s; %s\n",
      prop.name, static_cast<long long>(o.layers), static_cast<long long>(o.hidden), static_cast<long long>(o.heads),
      static_cast<long long>(o.seq), static_cast<long long>(o.batch), static_cast<long long>(o.vocab), o.dropout,
      timing.c_str(), o.graphs ? "each micro-batch one CUDA graph" : "kernels launched one by one (--no-graphs)",
      o.overlap ? "weight gradients on a second stream" : "one stream (--no-overlap)");
  const Variant all[] = {{"residual", "residual", "residual", "none"},
                         {"mhc", "mhc n=" + std::to_string(o.streams), "mhc", "none"},
                         {"mhc-recompute",
                          "mhc n=" + std::to_string(o.streams) + " recompute k=" + std::to_string(o.recompute_layers),
                          "mhc", "mhc"}};
  std::vector<Variant> variants;
  for (const Variant& v : all)
    if (std::find(o.variants.begin(), o.variants.end(), v.key) != o.variants.end()) variants.push_back(v);
  // Each round builds and times every row in turn, so that a drift of the card's clocks
  // over the run falls on every row alike; the trace is recorded in the last round.
  struct Row {
    std::vector<double> step_ms, round_ms;  // every timed step; each round's median
    double peak_gib = 0;
    std::string error;
    std::optional<TimelineSummary> timeline;
  };
  std::vector<Row> rows(variants.size());
  nlohmann::json trace_events = nlohmann::json::array();
  for (int round = 0; round < o.rounds; ++round) {
    for (size_t k = 0; k < variants.size(); ++k) {
      Row& row = rows[k];
      if (!row.error.empty()) continue;
      const TrainConfig config = variant_config(o, variants[k]);
      // A model that cannot be built (out of memory, say) is that row's error; the others run.
      std::unique_ptr<GptCuda> model;
      MHC_CUDA_CHECK(cudaDeviceSynchronize());
      const size_t before = used_device_bytes();
      try {
        model = std::make_unique<GptCuda>(config.model, o.batch, o.seq);
      } catch (const Error& e) {
        row.error = e.what();
      }
      std::string result = row.error;
      if (model) {
        const bool trace = round + 1 == o.rounds && !o.trace.empty();
        Measurement m = measure_model(o, config, model.get(), before, trace, static_cast<int>(k), variants[k].name);
        row.step_ms.insert(row.step_ms.end(), m.step_ms.begin(), m.step_ms.end());
        row.round_ms.push_back(median(m.step_ms));
        row.peak_gib = std::max(row.peak_gib, m.peak_gib);
        if (m.timeline) {
          row.timeline = m.timeline;
          trace_events.insert(trace_events.end(), m.trace_events.begin(), m.trace_events.end());
        }
        char figure[32];
        std::snprintf(figure, sizeof figure, "%.2f ms", row.round_ms.back());
        result = figure;
      }
      if (o.rounds > 1) {  // progress, and each round's figure
        std::printf("round %d/%d %-26s %s\n", round + 1, o.rounds, variants[k].name.c_str(), result.c_str());
        std::fflush(stdout);
      }
    }
  }
  // The residual row (where it ran) is the base of the ratios; with rounds, each round's
  // ratio too, whose spread says how far the step's ratio can be trusted.
  const Row* residual = nullptr;
  for (size_t k = 0; k < variants.size(); ++k)
    if (variants[k].connection == "residual" && rows[k].error.empty()) residual = &rows[k];
  std::printf("%-26s %10s %12s %10s %10s %10s%s\n", "variant", "step ms", "tokens/s", "peak GiB", "step x res",
              "mem x res", o.rounds > 1 ? "  rounds' x res" : "");
  std::vector<nlohmann::json> json_rows;
  const int64_t N = o.batch * o.seq;
  for (size_t k = 0; k < variants.size(); ++k) {
    const Row& row = rows[k];
    const std::string& label = variants[k].name;
    if (!row.error.empty()) {
      std::printf("%-26s %s\n", label.c_str(), row.error.c_str());
      json_rows.push_back({{"variant", label}, {"error", row.error}, {"device", prop.name}});
      continue;
    }
    const double ms = median(row.step_ms);
    const double tokens_per_s = static_cast<double>(N) / (ms / 1e3);
    const double residual_ms = residual ? median(residual->step_ms) : 0.0;
    const double residual_gib = residual ? residual->peak_gib : 0.0;
    auto ratio = [](double value, double base) { return base > 0 ? std::to_string(value / base).substr(0, 5) : "-"; };
    std::vector<double> round_ratios;
    if (residual)
      for (size_t r = 0; r < std::min(row.round_ms.size(), residual->round_ms.size()); ++r)
        round_ratios.push_back(row.round_ms[r] / residual->round_ms[r]);
    std::string spread;  // the rounds' ratios' range; "-" for the residual row, the base
    if (o.rounds > 1 && &row == residual) {
      spread = "  -";
    } else if (o.rounds > 1 && !round_ratios.empty()) {
      const auto [lo, hi] = std::minmax_element(round_ratios.begin(), round_ratios.end());
      spread = "  " + ratio(*lo, 1.0) + " - " + ratio(*hi, 1.0);
    }
    std::printf("%-26s %10.2f %12.0f %10.2f %10s %10s%s\n", label.c_str(), ms, tokens_per_s, row.peak_gib,
                ratio(ms, residual_ms).c_str(), ratio(row.peak_gib, residual_gib).c_str(), spread.c_str());
    json_rows.push_back({{"variant", label},
                         {"step_ms", ms},
                         {"tokens_per_s", tokens_per_s},
                         {"peak_gib", row.peak_gib},
                         {"step_vs_residual", residual_ms > 0 ? ms / residual_ms : 0.0},
                         {"memory_vs_residual", residual_gib > 0 ? row.peak_gib / residual_gib : 0.0},
                         {"rounds", o.rounds},
                         {"round_step_ms", row.round_ms},
                         {"round_step_vs_residual", round_ratios},
                         {"layers", o.layers},
                         {"hidden", o.hidden},
                         {"heads", o.heads},
                         {"seq", o.seq},
                         {"batch", o.batch},
                         {"streams", o.streams},
                         {"recompute_layers", variants[k].recompute == "mhc" ? o.recompute_layers : 0},
                         {"dropout", o.dropout},
                         {"graphs", o.graphs},
                         {"overlap", o.overlap},
                         {"device", prop.name}});
    if (row.timeline) {
      const TimelineSummary& t = *row.timeline;
      json_rows.back()["timeline"] = {{"span_ms", t.span_ms},
                                      {"idle_ms", t.idle_ms},
                                      {"two_streams_ms", t.overlap_ms},
                                      {"busiest_stream_ms", t.streams.empty() ? 0.0 : t.streams.front().busy_ms}};
    }
  }
  for (size_t k = 0; k < variants.size(); ++k)
    if (rows[k].timeline) print_timeline(variants[k].name, *rows[k].timeline);
  if (!o.trace.empty()) {
    std::ofstream trace_file(o.trace);
    trace_file << nlohmann::json{{"traceEvents", trace_events}, {"displayTimeUnit", "ms"}}.dump() << "\n";
    check(trace_file.good(), "bench train: writing --trace " + o.trace + " failed");
    std::printf("trace: %s (chrome://tracing or ui.perfetto.dev)\n", o.trace.c_str());
  }
  for (const auto& r : json_rows) std::printf("%s\n", r.dump().c_str());
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
  cmd->add_option("--rounds", o->rounds,
                  "build and time the rows this many times in turn (a fresh model each time), so that the card's "
                  "clock drift over the run falls on every row alike; each row reports the median of all its "
                  "rounds' steps, and the table the lowest and highest of the rounds' step ratios to the residual")
      ->check(at_least(1, true))
      ->capture_default_str();
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
  cmd->add_option("--trace", o->trace,
                  "after the timed steps, run a step of each variant recorded with CUPTI, write its device "
                  "timeline to this new file (a Chrome trace: chrome://tracing or ui.perfetto.dev) and print where "
                  "that step's time went: the busiest streams, the time two or more ran at once, the device's idle "
                  "time and the kernels that took the most time, with how much of it nothing else ran");
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
