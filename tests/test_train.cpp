// Training: resume bit-exactness, checkpoints (round trip, interrupted save, bad files,
// written beside training), data sources, bad input, the schedule, generation with a KV cache, and a short default
// run whose loss falls.
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cmath>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "core/error.h"
#include "core/safetensors.h"
#include "train/checkpoint.h"
#include "train/data.h"
#include "train/learner.h"
#include "train/optimizer.h"
#include "train/trainer.h"

namespace mhc {
namespace {

namespace fs = std::filesystem;

// A fresh temporary directory per test, removed afterwards.
class TempDir {
 public:
  TempDir() {
    path_ = fs::temp_directory_path() / ("mhc_test_" + std::to_string(::getpid()) + "_" + std::to_string(counter_++));
    fs::remove_all(path_);
    fs::create_directories(path_);
  }
  ~TempDir() { fs::remove_all(path_); }
  fs::path operator/(const std::string& name) const { return path_ / name; }

 private:
  static inline int counter_ = 0;
  fs::path path_;
};

TrainConfig tiny_config() {
  TrainConfig c = default_train_config();
  c.model.num_layers = 2;
  c.model.hidden_size = 32;
  c.model.num_attention_heads = 2;
  c.model.seq_length = 16;
  c.model.hidden_dropout = 0.1;  // dropout on: resume must replay the masks
  c.batch_size = 2;
  c.steps = 8;
  c.warmup_steps = 2;
  c.eval_every = 3;
  c.eval_batches = 2;
  c.checkpoint_every = 3;
  return c;
}

struct Quiet {
  std::FILE* sink = std::fopen("/dev/null", "w");
  ~Quiet() { std::fclose(sink); }
};

// `cuda_learner`: what device = cuda makes (the tests below give a CPU learner there).
TrainSummary train(const TrainConfig& c, const fs::path& dir, bool resume = false, int64_t resume_steps = -1,
                   const LearnerFactory& cuda_learner = {}) {
  static Quiet quiet;
  TrainRunOptions o;
  o.out_dir = dir.string();
  o.resume = resume;
  o.resume_steps = resume_steps;
  o.log = quiet.sink;
  o.cuda_learner = cuda_learner;
  return run_training(c, o);
}

std::vector<double> recorded_losses(const fs::path& dir) {
  std::vector<double> losses;
  std::ifstream in(dir / "metrics.jsonl");
  std::string line;
  while (std::getline(in, line)) {
    const auto r = nlohmann::json::parse(line);
    if (r.contains("loss")) losses.push_back(r["loss"].get<double>());
  }
  return losses;
}

TEST(Train, ResumeContinuesBitForBit) {
  TempDir tmp;
  TrainConfig straight = tiny_config();
  straight.steps = 8;
  train(straight, tmp / "straight");
  TrainConfig half = tiny_config();
  half.steps = 4;
  half.lr_decay_steps = 8;  // the schedule of the straight run
  train(half, tmp / "resumed");
  train(TrainConfig{}, tmp / "resumed", /*resume=*/true, /*resume_steps=*/8);
  const auto a = recorded_losses(tmp / "straight"), b = recorded_losses(tmp / "resumed");
  ASSERT_EQ(a.size(), 8u);
  ASSERT_EQ(b.size(), 8u);
  for (size_t i = 0; i < a.size(); ++i) EXPECT_EQ(a[i], b[i]) << "step " << i + 1;  // bitwise
}

// The CPU learner with its checkpoints going through copies, as the GPU's do
// (host_state_is_a_copy): the trainer writes each checkpoint on a thread of its own while
// the next steps run. `before_copy` runs at each to_host().
class CopyingLearner final : public Learner {
 public:
  explicit CopyingLearner(const TrainConfig& c, std::function<void()> before_copy = {})
      : trained_(make_cpu_learner(c)),
        copy_(c.model, c.batch_size, c.model.seq_length),
        copy_optimizer_(copy_.parameters()),
        before_copy_(std::move(before_copy)) {}
  void zero_grad() override { trained_->zero_grad(); }
  void forward_backward(const int32_t* tokens, const int32_t* targets, uint64_t key) override {
    trained_->forward_backward(tokens, targets, key);
  }
  StepResult step(const TrainConfig& c, double lr) override { return trained_->step(c, lr); }
  double evaluate(const int32_t* tokens, const int32_t* targets) override {
    return trained_->evaluate(tokens, targets);
  }
  std::vector<GainStats> gains() override { return trained_->gains(); }
  Gpt<float>& host_model() override { return copy_; }
  AdamW& host_optimizer() override { return copy_optimizer_; }
  void to_host() override {
    if (before_copy_) before_copy_();
    copy(trained_->host_model(), trained_->host_optimizer(), copy_, copy_optimizer_);
  }
  void from_host() override { copy(copy_, copy_optimizer_, trained_->host_model(), trained_->host_optimizer()); }
  bool host_state_is_a_copy() const override { return true; }

 private:
  static void copy(Gpt<float>& from, const AdamW& from_optimizer, Gpt<float>& to, AdamW& to_optimizer) {
    const auto a = from.parameters(), b = to.parameters();
    for (size_t k = 0; k < a.size(); ++k) b[k]->value = a[k]->value;
    to_optimizer.exp_avg = from_optimizer.exp_avg;
    to_optimizer.exp_avg_sq = from_optimizer.exp_avg_sq;
    to_optimizer.steps_taken = from_optimizer.steps_taken;
  }
  std::unique_ptr<Learner> trained_;
  Gpt<float> copy_;
  AdamW copy_optimizer_;
  std::function<void()> before_copy_;
};

TEST(Train, CheckpointsWrittenBesideTrainingResumeBitForBit) {
  TempDir tmp;
  const LearnerFactory copying = [](const TrainConfig& c) { return std::make_unique<CopyingLearner>(c); };
  TrainConfig straight = tiny_config();
  straight.steps = 8;
  train(straight, tmp / "plain");  // the CPU learner, checkpoints written in line
  straight.device = "cuda";        // the copying learner
  straight.checkpoint_every = 1;   // a write in flight beside every step
  train(straight, tmp / "straight", false, -1, copying);
  TrainConfig half = straight;
  half.steps = 4;
  half.lr_decay_steps = 8;
  train(half, tmp / "resumed", false, -1, copying);  // ends by waiting for step 4's write
  train(TrainConfig{}, tmp / "resumed", true, 8, copying);
  const auto plain = recorded_losses(tmp / "plain"), a = recorded_losses(tmp / "straight"),
             b = recorded_losses(tmp / "resumed");
  ASSERT_EQ(plain.size(), 8u);
  EXPECT_EQ(a, plain);  // bitwise
  EXPECT_EQ(b, plain);
  // the last checkpoint is the final model: both runs' files hold the same tensors
  const auto x = read_safetensors((tmp / "straight" / "checkpoint.safetensors").string()),
             y = read_safetensors((tmp / "resumed" / "checkpoint.safetensors").string());
  ASSERT_EQ(x.tensors.size(), y.tensors.size());
  for (const auto& [name, tensor] : x.tensors) EXPECT_EQ(tensor.bytes, y.tensors.at(name).bytes) << name;
}

TEST(Train, ACheckpointWriteFailingBesideTrainingIsANamedError) {
  TempDir tmp;
  const fs::path dir = tmp / "run";
  TrainConfig c = tiny_config();
  c.device = "cuda";
  c.checkpoint_every = 1;
  int copies = 0;
  // the run directory removed before the last checkpoint, whose write then cannot create
  // its file: the error comes from the wait at the run's end, not from a later write
  const LearnerFactory failing = [&](const TrainConfig& config) {
    return std::make_unique<CopyingLearner>(config, [&] {
      if (++copies == c.steps) fs::remove_all(dir);
    });
  };
  try {
    train(c, dir, false, -1, failing);
    FAIL() << "the failed write was not reported";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("checkpoint.safetensors"), std::string::npos) << e.what();
  }
}

TEST(Train, ResumeAfterACheckpointDropsLaterRecords) {
  TempDir tmp;
  TrainConfig c = tiny_config();
  c.steps = 5;  // checkpoints at 3 and 5; pretend the run died after 5 by rewinding to 3
  train(c, tmp / "run");
  const auto before = recorded_losses(tmp / "run");
  // A checkpoint of step 3 stands for a run that stopped there; its records after 3 go.
  TrainConfig three = tiny_config();
  three.steps = 3;
  three.lr_decay_steps = 5;
  train(three, tmp / "other");
  fs::copy_file(tmp / "other" / "checkpoint.safetensors", tmp / "run" / "checkpoint.safetensors",
                fs::copy_options::overwrite_existing);
  train(TrainConfig{}, tmp / "run", true, 5);
  ASSERT_EQ(before.size(), 5u);
  EXPECT_EQ(recorded_losses(tmp / "run"), before);  // steps 4 and 5 recorded once, with the same losses
}

TEST(Checkpoint, RoundTrip) {
  TempDir tmp;
  TrainConfig c = tiny_config();
  c.cuda_graphs = false;  // a key away from its default
  Gpt<float> model(c.model, c.batch_size, c.model.seq_length);
  model.init(5);
  AdamW optimizer(model.parameters());
  for (auto& m : optimizer.exp_avg)
    for (size_t i = 0; i < m.size(); ++i) m[i] = 0.001f * static_cast<float>(i % 7);
  optimizer.steps_taken = 9;
  const auto path = (tmp / "ck.safetensors").string();
  save_checkpoint(path, c, model, &optimizer, {42, 12345});

  Gpt<float> other(c.model, c.batch_size, c.model.seq_length);
  AdamW other_optimizer(other.parameters());
  const TrainingState state = load_checkpoint(path, other, &other_optimizer);
  EXPECT_EQ(state.step, 42);
  EXPECT_EQ(state.data_position, 12345u);
  EXPECT_EQ(other_optimizer.steps_taken, 9);
  EXPECT_EQ(other_optimizer.exp_avg, optimizer.exp_avg);
  const auto a = model.parameters(), b = other.parameters();
  for (size_t k = 0; k < a.size(); ++k) EXPECT_EQ(a[k]->value, b[k]->value) << a[k]->name;
  EXPECT_EQ(train_config_to_json(checkpoint_config(path)), train_config_to_json(c));
  // A tensor stored in another dtype (F64: exact for these values) loads converted.
  Safetensors converted = read_safetensors(path);
  converted.tensors[a[0]->name] = HostTensor::from_values<float>(DType::F64, a[0]->shape, a[0]->value);
  const auto converted_path = (tmp / "f64.safetensors").string();
  write_safetensors(converted_path, converted);
  Gpt<float> third(c.model, c.batch_size, c.model.seq_length);
  load_checkpoint(converted_path, third, nullptr);
  EXPECT_EQ(third.parameters()[0]->value, a[0]->value);
}

TEST(Checkpoint, KilledSaveLeavesThePreviousOneLoadable) {
  TempDir tmp;
  TrainConfig c = tiny_config();
  c.model.hidden_size = 256;  // a few MB, so the kill lands mid-write
  c.model.num_attention_heads = 4;
  Gpt<float> model(c.model, 1, c.model.seq_length);
  model.init(1);
  const auto path = (tmp / "ck.safetensors").string();
  save_checkpoint(path, c, model, nullptr, {1, 0});
  const pid_t child = ::fork();
  ASSERT_GE(child, 0);
  if (child == 0) {
    for (int64_t step = 2;; ++step) save_checkpoint(path, c, model, nullptr, {step, 0});
  }
  ::usleep(150 * 1000);
  ::kill(child, SIGKILL);
  int status = 0;
  ::waitpid(child, &status, 0);
  Gpt<float> loaded(c.model, 1, c.model.seq_length);
  EXPECT_NO_THROW(load_checkpoint(path, loaded, nullptr));  // the last complete checkpoint
}

TEST(Checkpoint, BadFilesAreNamedErrors) {
  TempDir tmp;
  const TrainConfig c = tiny_config();
  Gpt<float> model(c.model, 1, c.model.seq_length);
  model.init(1);
  const auto path = (tmp / "ck.safetensors").string();
  save_checkpoint(path, c, model, nullptr, {1, 0});
  // Truncated.
  const auto size = fs::file_size(path);
  fs::copy_file(path, tmp / "cut.safetensors");
  fs::resize_file(tmp / "cut.safetensors", size / 2);
  try {
    load_checkpoint((tmp / "cut.safetensors").string(), model, nullptr);
    ADD_FAILURE() << "truncated checkpoint accepted";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("cut.safetensors"), std::string::npos) << e.what();
  }
  // Shapes of another configuration.
  TrainConfig wider = c;
  wider.model.hidden_size = 48;
  Gpt<float> other(wider.model, 1, wider.model.seq_length);
  try {
    load_checkpoint(path, other, nullptr);
    ADD_FAILURE() << "mismatched checkpoint accepted";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("has shape"), std::string::npos) << e.what();
  }
  // Not a checkpoint at all.
  Safetensors plain;
  plain.tensors["x"] = HostTensor::from_values<float>(DType::F32, {1}, {1});
  write_safetensors((tmp / "plain.safetensors").string(), plain);
  EXPECT_THROW(load_checkpoint((tmp / "plain.safetensors").string(), model, nullptr), Error);
}

std::string error_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}

TEST(Train, BadInputIsANamedErrorAndWritesNothing) {
  TempDir tmp;
  TrainConfig c = tiny_config();
  c.data = (tmp / "missing.txt").string();
  EXPECT_NE(error_of([&] { train(c, tmp / "a"); }).find("missing.txt"), std::string::npos);
  EXPECT_FALSE(fs::exists(tmp / "a"));
  std::ofstream(tmp / "empty.txt").close();
  c.data = (tmp / "empty.txt").string();
  EXPECT_NE(error_of([&] { train(c, tmp / "a"); }).find("empty"), std::string::npos);
  EXPECT_FALSE(fs::exists(tmp / "a"));
  TrainConfig bad = tiny_config();
  bad.model.mhc_sinkhorn_iterations = 0;
  EXPECT_NE(error_of([&] { train(bad, tmp / "a"); }).find("mhc_sinkhorn_iterations"), std::string::npos);
  EXPECT_NE(error_of([&] { apply_train_override(bad, "learning_rat=1"); }).find("learning_rat"), std::string::npos);
  EXPECT_NE(error_of([&] { apply_train_override(bad, "batch_size=zero"); }).find("batch_size"), std::string::npos);
  EXPECT_NE(error_of([&] { apply_train_override(bad, "cuda_graphs=2"); }).find("cuda_graphs"), std::string::npos);
  // A directory that holds a run is not overwritten.
  TrainConfig ok = tiny_config();
  ok.steps = 1;
  train(ok, tmp / "run");
  const auto before = fs::last_write_time(tmp / "run" / "config.json");
  EXPECT_NE(error_of([&] { train(ok, tmp / "run"); }).find("already holds a run"), std::string::npos);
  EXPECT_EQ(fs::last_write_time(tmp / "run" / "config.json"), before);
  // A checkpoint that does not fit the run's configuration.
  TrainConfig wide = tiny_config();
  wide.model.hidden_size = 48;
  wide.steps = 1;
  train(wide, tmp / "wide");
  fs::copy_file(tmp / "wide" / "checkpoint.safetensors", tmp / "run" / "checkpoint.safetensors",
                fs::copy_options::overwrite_existing);
  EXPECT_NE(error_of([&] { train(TrainConfig{}, tmp / "run", true, 2); }).find("has shape"), std::string::npos);
  // Vocabulary too small for the data.
  TrainConfig small_vocab = tiny_config();
  small_vocab.model.vocab_size = 64;
  EXPECT_NE(error_of([&] { train(small_vocab, tmp / "b"); }).find("vocab_size"), std::string::npos);
}

TEST(Data, BinShardsRoundTripAndSplit) {
  TempDir tmp;
  std::vector<uint16_t> train_tokens(500), val_tokens(100);
  for (size_t i = 0; i < train_tokens.size(); ++i) train_tokens[i] = static_cast<uint16_t>((i * 37) % 50000);
  for (size_t i = 0; i < val_tokens.size(); ++i) val_tokens[i] = static_cast<uint16_t>(i + 7);
  fs::create_directories(tmp / "shards");
  write_bin_shard((tmp / "shards" / "data_train_000.bin").string(), train_tokens);
  write_bin_shard((tmp / "shards" / "data_val_000.bin").string(), val_tokens);
  const auto read = read_bin_shard((tmp / "shards" / "data_train_000.bin").string());
  EXPECT_EQ(std::vector<int32_t>(train_tokens.begin(), train_tokens.end()), read);
  const Dataset d = load_dataset((tmp / "shards").string(), 0);
  EXPECT_EQ(d.train.size(), 500u);
  EXPECT_EQ(d.val.size(), 100u);
  EXPECT_EQ(d.max_token, *std::max_element(read.begin(), read.end()));
  const Dataset globbed = load_dataset((tmp / "shards" / "*train*.bin").string(), 0);
  EXPECT_EQ(globbed.train.size() + globbed.val.size(), 500u);  // no val shard: the last 10% held out
  // Truncated and foreign files.
  fs::resize_file(tmp / "shards" / "data_train_000.bin", 1024 + 100);
  EXPECT_NE(error_of([&] { read_bin_shard((tmp / "shards" / "data_train_000.bin").string()); }).find("truncated"),
            std::string::npos);
  std::ofstream(tmp / "junk.bin") << std::string(2000, 'x');
  EXPECT_NE(error_of([&] { read_bin_shard((tmp / "junk.bin").string()); }).find("magic"), std::string::npos);
  EXPECT_NE(error_of([&] { load_dataset((tmp / "nothing*.bin").string(), 0); }).find("no .bin shard"),
            std::string::npos);
}

TEST(Data, BatcherWalksDeterministically) {
  std::vector<int32_t> stream(100);
  for (int i = 0; i < 100; ++i) stream[i] = i;
  const Batcher batcher(stream, 2, 10);
  std::vector<int32_t> tokens(20), targets(20);
  uint64_t position = 85;
  batcher.next(position, tokens.data(), targets.data());
  EXPECT_EQ(tokens[0], 85);
  EXPECT_EQ(targets[0], 86);
  EXPECT_EQ(tokens[10], 5);  // 95 wraps over the 90 windows
  EXPECT_EQ(position, 105u);
}

TEST(Optimizer, ScheduleAndDecayExclusions) {
  TrainConfig c = tiny_config();
  c.learning_rate = 1.0;
  c.min_learning_rate = 0.1;
  c.warmup_steps = 10;
  c.lr_decay_steps = 110;
  EXPECT_DOUBLE_EQ(learning_rate_at(c, 0), 0.1);
  EXPECT_DOUBLE_EQ(learning_rate_at(c, 9), 1.0);
  EXPECT_DOUBLE_EQ(learning_rate_at(c, 10), 1.0);
  EXPECT_NEAR(learning_rate_at(c, 60), 0.55, 1e-12);
  EXPECT_DOUBLE_EQ(learning_rate_at(c, 500), 0.1);
  EXPECT_TRUE(decays("decoder.layers.0.mlp.linear_fc1.weight"));
  EXPECT_TRUE(decays("decoder.layers.0.mlp_hyper_connection.mapping_proj.weight"));
  EXPECT_TRUE(decays("embedding.word_embeddings.weight"));
  EXPECT_FALSE(decays("embedding.position_embeddings.weight"));
  EXPECT_FALSE(decays("decoder.layers.0.input_layernorm.weight"));
  EXPECT_FALSE(decays("decoder.layers.0.self_attention.linear_qkv.bias"));
  EXPECT_FALSE(decays("decoder.layers.0.mlp_hyper_connection.alpha_res"));
  EXPECT_FALSE(decays("decoder.layers.0.mlp_hyper_connection.bias"));
  EXPECT_FALSE(decays("decoder.final_layernorm.weight"));
}

TEST(Generate, KeyValueCacheMatchesTheFullForward) {
  for (const char* connection : {"mhc", "residual"}) {
    TrainConfig c = tiny_config();
    c.model.connection = connection;
    c.model.hidden_dropout = 0;
    const int64_t T = c.model.seq_length;
    Gpt<float> full(c.model, 1, T);
    full.init(3);
    Gpt<float> step(c.model, 1, 1);
    const auto a = full.parameters(), b = step.parameters();
    for (size_t k = 0; k < a.size(); ++k) b[k]->value = a[k]->value;
    std::vector<int32_t> tokens(T);
    for (int64_t i = 0; i < T; ++i) tokens[i] = static_cast<int32_t>((i * 31 + 7) % 256);
    full.forward(tokens.data(), tokens.data(), 0);
    const std::vector<float>& probs = full.probabilities();
    auto cache = step.make_decode_cache();
    std::vector<float> logits;
    double worst = 0;
    for (int64_t i = 0; i < T; ++i) {
      step.decode(*cache, tokens[i], i, logits);
      const float mx = *std::max_element(logits.begin(), logits.end());
      double sum = 0;
      for (float l : logits) sum += std::exp(static_cast<double>(l - mx));
      for (size_t v = 0; v < logits.size(); ++v)
        worst = std::max(worst, std::abs(std::exp(static_cast<double>(logits[v] - mx)) / sum - probs[i * 256 + v]));
    }
    EXPECT_LT(worst, 1e-5) << connection;
  }
}

TEST(Train, ShortDefaultRunLossFalls) {
  TempDir tmp;
  TrainConfig c = default_train_config();
  c.steps = 25;
  c.warmup_steps = 5;
  const TrainSummary s = train(c, tmp / "run");
  ASSERT_EQ(s.losses.size(), 25u);
  EXPECT_GT(s.losses.front(), 5.0);  // about ln 256 at the start
  EXPECT_LT(s.losses.back(), s.losses.front() - 2.0);
  EXPECT_TRUE(fs::exists(tmp / "run" / "config.json"));
  EXPECT_TRUE(fs::exists(tmp / "run" / "checkpoint.safetensors"));
}

}  // namespace
}  // namespace mhc
