// mhc eval and mhc generate: load a checkpoint (a file or a run directory) and measure the
// validation loss, or sample text with a key/value cache.
#include <algorithm>
#include <cmath>
#include <filesystem>
#include <numeric>

#include "apps/mhc/commands.h"
#include "core/error.h"
#include "core/rng.h"
#include "train/checkpoint.h"
#include "train/trainer.h"
#if MHC_WITH_CUDA
#include "core/cuda/device.h"
#include "train/cuda_learner.h"
#endif

namespace mhc::app {

namespace {

std::string checkpoint_file(const std::string& path) {
  if (std::filesystem::is_directory(path)) return (std::filesystem::path(path) / "checkpoint.safetensors").string();
  return path;
}

struct EvalOptions {
  std::string checkpoint, data, device;
  int64_t batches = 0;
};

int run_eval(const EvalOptions& o) {
  const std::string path = checkpoint_file(o.checkpoint);
  TrainConfig config = checkpoint_config(path);
  if (!o.data.empty()) config.data = o.data;
#if MHC_WITH_CUDA
  const LearnerFactory cuda_learner = make_cuda_learner;
  const bool cuda_here = cuda::device_available();
#else
  const LearnerFactory cuda_learner;
  const bool cuda_here = false;
#endif
  if (!o.device.empty()) {
    config.device = o.device;
  } else if (config.device == "cuda" && !cuda_here) {  // the run's device, where there is one
    std::fprintf(stderr, "mhc eval: the run trained on a GPU; none here, so on the CPU (--device cpu)\n");
    config.device = "cpu";
  }
  config.validate();
  const Dataset data = load_dataset(config.data, static_cast<uint64_t>(config.seed));
  check(data.max_token < config.model.vocab_size, "data: token id " + std::to_string(data.max_token) +
                                                      " is outside the model's vocabulary of " +
                                                      std::to_string(config.model.vocab_size));
  const std::unique_ptr<Learner> learner = make_learner(config, cuda_learner);
  const TrainingState state = load_checkpoint(path, learner->host_model(), nullptr);
  learner->from_host();
  const int64_t batches = o.batches > 0 ? o.batches : config.eval_batches;
  const double loss = evaluate_loss([&](const int32_t* x, const int32_t* y) { return learner->evaluate(x, y); },
                                    data.val, config.batch_size, config.model.seq_length, batches);
  std::printf("checkpoint %s (step %lld), %s, on the %s\n", path.c_str(), static_cast<long long>(state.step),
              data.description.c_str(), config.device == "cuda" ? "GPU" : "CPU");
  std::printf("val_loss %.4f  perplexity %.3f  (%lld batches of %lld x %lld tokens)\n", loss, std::exp(loss),
              static_cast<long long>(batches), static_cast<long long>(config.batch_size),
              static_cast<long long>(config.model.seq_length));
  return 0;
}

struct GenerateOptions {
  std::string checkpoint, prompt = "\n";
  int64_t tokens = 200, top_k = 0, seed = 1;
  double temperature = 0.8;
};

// Samples from softmax(logits / temperature) over the top_k largest (all when 0); greedy
// when temperature is 0.
int32_t sample(const std::vector<float>& logits, double temperature, int64_t top_k, uint64_t key, uint64_t index) {
  std::vector<int32_t> order(logits.size());
  std::iota(order.begin(), order.end(), 0);
  std::sort(order.begin(), order.end(), [&](int32_t a, int32_t b) { return logits[a] > logits[b]; });
  if (temperature <= 0) return order[0];
  const size_t keep = top_k > 0 ? std::min<size_t>(static_cast<size_t>(top_k), order.size()) : order.size();
  std::vector<double> weights(keep);
  double total = 0;
  for (size_t i = 0; i < keep; ++i)
    total += weights[i] = std::exp((logits[order[i]] - logits[order[0]]) / temperature);
  double u = static_cast<double>(rng_uniform(key, index)) * total;
  for (size_t i = 0; i < keep; ++i)
    if ((u -= weights[i]) < 0) return order[i];
  return order[keep - 1];
}

int run_generate(const GenerateOptions& o) {
  const std::string path = checkpoint_file(o.checkpoint);
  const TrainConfig config = checkpoint_config(path);
  check(!o.prompt.empty(), "--prompt: must not be empty");
  Gpt<float> model(config.model, 1, 1);
  load_checkpoint(path, model, nullptr);
  model.set_training(false);
  auto cache = model.make_decode_cache();
  std::vector<float> logits;
  const uint64_t key = rng_key(static_cast<uint64_t>(o.seed), 0x6E6);
  int64_t position = 0;
  std::fputs(o.prompt.c_str(), stdout);
  int32_t next = 0;
  for (unsigned char c : o.prompt) {
    check(position < config.model.seq_length, "--prompt: longer than the model's context of " +
                                                  std::to_string(config.model.seq_length) + " tokens");
    model.decode(*cache, c, position++, logits);
  }
  for (int64_t i = 0; i < o.tokens; ++i) {
    next = sample(logits, o.temperature, o.top_k, key, static_cast<uint64_t>(i));
    if (next < 256) std::fputc(next, stdout);
    else std::printf("<%d>", next);
    if (position >= config.model.seq_length) {
      std::printf("\n[stopped: the model's context of %lld tokens is full]\n",
                  static_cast<long long>(config.model.seq_length));
      return 0;
    }
    model.decode(*cache, next, position++, logits);
  }
  std::printf("\n");
  return 0;
}

}  // namespace

Command add_eval_command(CLI::App& app) {
  auto o = std::make_shared<EvalOptions>();
  CLI::App* cmd = app.add_subcommand("eval", "Validation loss and perplexity of a checkpoint.");
  cmd->add_option("checkpoint", o->checkpoint, "checkpoint file, or a run directory")->required();
  cmd->add_option("--data", o->data, "data to evaluate on (default: the run's own); its validation split is used");
  cmd->add_option("--batches", o->batches, "batches to average (default: the run's eval_batches)");
  cmd->add_option("--device", o->device,
                  "cpu or cuda (default: the device the run trained on; the CPU where that is a GPU and there "
                  "is none)");
  return [cmd, o] { return cmd->parsed() ? run_eval(*o) : -1; };
}

Command add_generate_command(CLI::App& app) {
  auto o = std::make_shared<GenerateOptions>();
  CLI::App* cmd = app.add_subcommand("generate", "Sample text from a checkpoint (byte tokens, key/value cache).");
  cmd->add_option("checkpoint", o->checkpoint, "checkpoint file, or a run directory")->required();
  cmd->add_option("--prompt", o->prompt, "text to continue")->capture_default_str();
  cmd->add_option("--tokens", o->tokens, "tokens to generate")->check(at_least(0, true))->capture_default_str();
  cmd->add_option("--temperature", o->temperature, "sampling temperature (0: greedy)")
      ->check(at_least(0, false))
      ->capture_default_str();
  cmd->add_option("--top-k", o->top_k, "sample among the k most likely tokens (0: all)")
      ->check(at_least(0, true))
      ->capture_default_str();
  cmd->add_option("--seed", o->seed, "sampling seed")->capture_default_str();
  return [cmd, o] { return cmd->parsed() ? run_generate(*o) : -1; };
}

}  // namespace mhc::app
