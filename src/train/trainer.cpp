#include "train/trainer.h"

#include <chrono>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <functional>
#include <future>
#include <nlohmann/json.hpp>

#include "core/error.h"
#include "train/checkpoint.h"
#include "train/optimizer.h"

namespace mhc {

namespace fs = std::filesystem;

namespace {

const char* kConfigFile = "config.json";
const char* kMetricsFile = "metrics.jsonl";
const char* kCheckpointFile = "checkpoint.safetensors";

void write_text_atomically(const fs::path& path, const std::string& text) {
  const fs::path temporary = path.string() + ".tmp";
  {
    std::ofstream out(temporary, std::ios::binary | std::ios::trunc);
    check(out.good(), temporary.string() + ": cannot create");
    out << text;
    out.flush();
    check(out.good(), temporary.string() + ": write failed");
  }
  fs::rename(temporary, path);
}

// Keeps the metrics records up to `step` (a resumed run rewrites what came after its checkpoint).
void truncate_metrics(const fs::path& path, int64_t step) {
  std::ifstream in(path);
  if (!in.good()) return;
  std::string kept, line;
  while (std::getline(in, line)) {
    const auto record = nlohmann::json::parse(line, nullptr, false);
    if (!record.is_discarded() && record.contains("step") && record["step"].get<int64_t>() <= step) kept += line + "\n";
  }
  write_text_atomically(path, kept);
}

std::string format_eta(double seconds) {
  const auto s = static_cast<int64_t>(seconds + 0.5);
  char buffer[32];
  std::snprintf(buffer, sizeof(buffer), "%lld:%02lld", static_cast<long long>(s / 60), static_cast<long long>(s % 60));
  return buffer;
}

void check_data(const Dataset& data, const TrainConfig& c) {
  check(data.max_token < c.model.vocab_size, "vocab_size: the data holds token id " + std::to_string(data.max_token) +
                                                 " but vocab_size is " + std::to_string(c.model.vocab_size));
  check(static_cast<int64_t>(data.val.size()) > c.model.seq_length,
        "data: the validation split has " + std::to_string(data.val.size()) + " tokens, fewer than seq_length + 1 = " +
            std::to_string(c.model.seq_length + 1));
}

nlohmann::json gain_record(const std::vector<GainStats>& gains) {
  nlohmann::json r = nlohmann::json::object();
  if (gains.empty()) return r;
  double fwd = 0, bwd = 0, cfwd = 0, cbwd = 0, fwd_mean = 0;
  for (const GainStats& g : gains) {
    fwd = std::max(fwd, g.forward_max);
    bwd = std::max(bwd, g.backward_max);
    cfwd = std::max(cfwd, g.composite_forward_max);
    cbwd = std::max(cbwd, g.composite_backward_max);
    fwd_mean += g.forward_mean / static_cast<double>(gains.size());
  }
  r["gain_fwd_max"] = fwd;
  r["gain_bwd_max"] = bwd;
  r["gain_fwd_mean"] = fwd_mean;
  r["composite_gain_fwd_max"] = cfwd;
  r["composite_gain_bwd_max"] = cbwd;
  return r;
}

// Checkpoint writes on a thread of their own, one at a time, beside training (for learners
// whose host state is a copy: Learner::host_state_is_a_copy). start() waits for the write
// before, rethrowing its error, then starts the next; finish() waits for the last. A failed
// write is reported at the next checkpoint or at the run's end; where the run ends by
// another error, the future's destructor still waits for the write in flight (each write
// goes to a temporary file renamed when whole: the checkpoint before stays until then).
class CheckpointWriter {
 public:
  void finish() {
    if (pending_.valid()) pending_.get();
  }
  void start(std::function<void()> write) {
    finish();
    pending_ = std::async(std::launch::async, std::move(write));
  }

 private:
  std::future<void> pending_;
};

}  // namespace

TrainSummary run_training(TrainConfig config, const TrainRunOptions& options) {
  const fs::path dir = options.out_dir;
  const fs::path checkpoint_path = dir / kCheckpointFile;
  TrainingState state;
  if (options.resume) {
    check(fs::exists(dir / kConfigFile), dir.string() + ": no " + kConfigFile + " here: not an mhc run directory");
    check(fs::exists(checkpoint_path), checkpoint_path.string() + ": no checkpoint to resume from");
    // The run's own configuration; the checkpoint's tensors are checked against it.
    std::ifstream in(dir / kConfigFile);
    const auto json = nlohmann::json::parse(in, nullptr, false);
    check(!json.is_discarded(), (dir / kConfigFile).string() + ": not valid JSON");
    try {
      config = train_config_from_json(json);
    } catch (const Error& e) {
      fail((dir / kConfigFile).string() + ": " + e.what());
    }
    if (options.resume_steps >= 0) config.steps = options.resume_steps;
    config.validate();
  } else {
    if (config.lr_decay_steps == 0) config.lr_decay_steps = config.steps;
    config.validate();
    std::error_code ignored;
    check(!fs::exists(dir, ignored) || fs::is_directory(dir, ignored),
          dir.string() + ": exists and is not a directory; choose another --out");
    check(!fs::exists(dir / kConfigFile) && !fs::exists(checkpoint_path),
          dir.string() + ": already holds a run; continue it with --resume " + dir.string() +
              ", or choose another --out");
  }
  const Dataset data = load_dataset(config.data, static_cast<uint64_t>(config.seed));
  check_data(data, config);

  const int64_t B = config.batch_size, T = config.model.seq_length;
  const std::unique_ptr<Learner> learner = make_learner(config, options.cuda_learner);
  CheckpointWriter checkpoint_writer;  // after the learner: destroyed first, waiting for its write
  const size_t parameter_tensors = learner->host_model().parameters().size();
  if (options.resume) {
    state = load_checkpoint(checkpoint_path.string(), learner->host_model(), &learner->host_optimizer());
    learner->from_host();
    truncate_metrics(dir / kMetricsFile, state.step);
  } else {
    std::error_code error;
    fs::create_directories(dir, error);
    check(!error, dir.string() + ": cannot create the run directory: " + error.message());
    write_text_atomically(dir / kConfigFile, train_config_to_json(config).dump(2) + "\n");
  }
  std::ofstream metrics(dir / kMetricsFile, std::ios::app);
  check(metrics.good(), (dir / kMetricsFile).string() + ": cannot open for writing");

  const Batcher batcher(data.train, B, T);
  std::vector<int32_t> tokens(B * T), targets(B * T);
  TrainSummary summary;
  summary.first_step = state.step;
  std::fprintf(options.log,
               "mhc train: %s, %lld layers, C=%lld, connection %s (n=%lld), %zu parameters' tensors, on the %s\n",
               data.description.c_str(), static_cast<long long>(config.model.num_layers),
               static_cast<long long>(config.model.hidden_size), config.model.connection.c_str(),
               static_cast<long long>(config.model.streams()), parameter_tensors,
               config.device == "cuda" ? "GPU" : "CPU");
  std::fprintf(options.log, "mhc train: steps %lld -> %lld, writing %s\n", static_cast<long long>(state.step),
               static_cast<long long>(config.steps), dir.string().c_str());
  const auto started = std::chrono::steady_clock::now();
  for (int64_t step = state.step; step < config.steps; ++step) {
    const auto step_start = std::chrono::steady_clock::now();
    const double lr = learning_rate_at(config, step);
    learner->zero_grad();
    for (int64_t micro = 0; micro < config.grad_accumulation; ++micro) {
      batcher.next(state.data_position, tokens.data(), targets.data());
      learner->forward_backward(tokens.data(), targets.data(),
                                static_cast<uint64_t>(step * config.grad_accumulation + micro));
    }
    const auto [loss, grad_norm] = learner->step(config, lr);
    state.step = step + 1;
    const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - step_start).count();
    const double tokens_per_s = static_cast<double>(B * T * config.grad_accumulation) / seconds;
    summary.losses.push_back(loss);

    nlohmann::json record = {{"step", state.step}, {"loss", loss},       {"lr", lr},
                             {"grad_norm", grad_norm}, {"tokens_per_s", tokens_per_s}};
    record.update(gain_record(learner->gains()));
    metrics << record.dump() << "\n";

    const bool last = state.step == config.steps;
    if (state.step % config.eval_every == 0 || last) {
      summary.val_loss = evaluate_loss(
          [&](const int32_t* x, const int32_t* y) { return learner->evaluate(x, y); }, data.val, B, T,
          config.eval_batches);
      metrics << nlohmann::json{{"step", state.step}, {"val_loss", summary.val_loss}}.dump() << "\n";
    }
    metrics.flush();
    if (state.step % config.checkpoint_every == 0 || last) {
      checkpoint_writer.finish();  // to_host() overwrites what the write before reads
      learner->to_host();
      auto write = [path = checkpoint_path.string(), config, state, &host = *learner] {
        save_checkpoint(path, config, host.host_model(), &host.host_optimizer(), state);
      };
      if (learner->host_state_is_a_copy())
        checkpoint_writer.start(write);
      else
        write();
    }

    const double elapsed = std::chrono::duration<double>(std::chrono::steady_clock::now() - started).count();
    const double eta = elapsed / static_cast<double>(state.step - summary.first_step) *
                       static_cast<double>(config.steps - state.step);
    if (options.progress_bar) {
      const int width = 24;
      const auto filled = static_cast<int>(width * state.step / std::max<int64_t>(config.steps, 1));
      std::fprintf(options.log, "\r[%-*s] step %lld/%lld  loss %.4f  %.0f tok/s  ETA %s   ", width,
                   std::string(static_cast<size_t>(filled), '#').c_str(), static_cast<long long>(state.step),
                   static_cast<long long>(config.steps), loss, tokens_per_s, format_eta(eta).c_str());
      if (last) std::fprintf(options.log, "\n");
      std::fflush(options.log);
    } else if (state.step % config.log_every == 0 || last || state.step == summary.first_step + 1) {
      std::fprintf(options.log, "step %6lld/%lld  loss %.4f  lr %.2e  grad_norm %.3f  %.0f tok/s  ETA %s\n",
                   static_cast<long long>(state.step), static_cast<long long>(config.steps), loss, lr, grad_norm,
                   tokens_per_s, format_eta(eta).c_str());
      std::fflush(options.log);  // log lines reach a file or pipe as they happen
    }
    if (state.step % config.eval_every == 0 || last)
      std::fprintf(options.log, "%sstep %6lld  val_loss %.4f  perplexity %.2f\n", options.progress_bar ? "\n" : "",
                   static_cast<long long>(state.step), summary.val_loss, std::exp(summary.val_loss));
  }
  checkpoint_writer.finish();  // the run is done when its last checkpoint is
  summary.last_step = state.step;
  return summary;
}

}  // namespace mhc
