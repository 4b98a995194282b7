// mhc train: train an mHC language model (defaults: a small GPT, n = 4, on the built-in
// corpus), or continue a run with --resume.
#include <unistd.h>

#include <chrono>
#include <ctime>
#include <fstream>
#include <nlohmann/json.hpp>

#include "apps/mhc/commands.h"
#include "core/error.h"
#include "train/trainer.h"
#if MHC_WITH_CUDA
#include "train/cuda_learner.h"
#endif

namespace mhc::app {

namespace {

struct TrainOptions {
  std::string config_file, out, data, resume, device;
  std::vector<std::string> sets;
  int64_t steps = -1, seed = -1;
  bool print_config = false;
};

std::string default_out_dir() {
  const std::time_t now = std::time(nullptr);
  char buffer[64];
  std::strftime(buffer, sizeof(buffer), "runs/%Y%m%d-%H%M%S", std::localtime(&now));
  return buffer;
}

int run_train(const TrainOptions& o) {
  TrainRunOptions run;
  run.progress_bar = ::isatty(STDOUT_FILENO) != 0;
#if MHC_WITH_CUDA
  run.cuda_learner = make_cuda_learner;
#endif
  TrainConfig config = default_train_config();
  if (!o.resume.empty()) {
    check(o.config_file.empty() && o.sets.empty() && o.data.empty() && o.seed < 0 && o.out.empty() &&
              o.device.empty(),
          "--resume: the run's configuration comes from its directory; give only --steps with it");
    run.out_dir = o.resume;
    run.resume = true;
    run.resume_steps = o.steps;
  } else {
    if (!o.config_file.empty()) {
      std::ifstream in(o.config_file);
      check(in.good(), o.config_file + ": cannot open");
      const auto json = nlohmann::json::parse(in, nullptr, false);
      check(!json.is_discarded(), o.config_file + ": not valid JSON");
      try {
        config = train_config_from_json(json);
      } catch (const Error& e) {
        fail(o.config_file + ": " + e.what());
      }
    }
    for (const std::string& s : o.sets) apply_train_override(config, s);
    if (o.steps >= 0) config.steps = o.steps;
    if (o.seed >= 0) config.seed = o.seed;
    if (!o.data.empty()) config.data = o.data;
    if (!o.device.empty()) config.device = o.device;
    run.out_dir = o.out.empty() ? default_out_dir() : o.out;
    if (o.print_config) {
      if (config.lr_decay_steps == 0) config.lr_decay_steps = config.steps;
      config.validate();
      std::printf("%s\n", train_config_to_json(config).dump(2).c_str());
      return 0;
    }
  }
  const TrainSummary summary = run_training(config, run);
  if (!summary.losses.empty())
    std::printf("done: steps %lld -> %lld, loss %.4f -> %.4f, val_loss %.4f; run in %s\n",
                static_cast<long long>(summary.first_step), static_cast<long long>(summary.last_step),
                summary.losses.front(), summary.losses.back(), summary.val_loss, run.out_dir.c_str());
  else
    std::printf("nothing to do: the run in %s is already at step %lld\n", run.out_dir.c_str(),
                static_cast<long long>(summary.last_step));
  return 0;
}

}  // namespace

Command add_train_command(CLI::App& app) {
  auto o = std::make_shared<TrainOptions>();
  CLI::App* cmd = app.add_subcommand(
      "train",
      "Train an mHC GPT. Defaults: 4 layers, C=128, 4 heads, n=4 streams, T=128, batch 8, 300 steps on a built-in "
      "corpus (arithmetic, key-value recall, a small grammar) that needs no download. Writes DIR/config.json, "
      "DIR/metrics.jsonl and DIR/checkpoint.safetensors. Every configuration key (list them with --print-config) can "
      "be set with --set key=value.");
  cmd->add_option("--config", o->config_file, "JSON file of configuration keys (applied before --set)");
  cmd->add_option("--set", o->sets, "key=value, repeatable, e.g. --set connection=residual --set num_layers=6");
  cmd->add_option("--out", o->out, "run directory (default: runs/YYYYMMDD-HHMMSS); must not hold another run");
  cmd->add_option("--steps", o->steps, "train until this step (default 300; with --resume: the new target)");
  cmd->add_option("--seed", o->seed, "seed of the initialisation, the built-in corpus and dropout (default 1337)");
  cmd->add_option("--data", o->data,
                  "UTF-8 text file (byte tokens), or a directory or glob of llm.c .bin token shards "
                  "(default: the built-in corpus)");
  cmd->add_option("--device", o->device,
                  "cpu (default) or cuda: the whole training step on one GPU (bf16 activations, fp32 master weights; "
                  "same as --set device=cuda)");
  cmd->add_option("--resume", o->resume, "continue the run in this directory from its checkpoint, bit for bit");
  cmd->add_flag("--print-config", o->print_config,
                "print every configuration key with its value (defaults, --config and --set applied) and exit");
  return [cmd, o] { return cmd->parsed() ? run_train(*o) : -1; };
}

}  // namespace mhc::app
