#include "train/learner.h"

#include "core/error.h"
#include "train/data.h"

namespace mhc {
namespace {

class CpuLearner final : public ModelLearner<Gpt<float>> {
 public:
  explicit CpuLearner(const TrainConfig& c) : ModelLearner(c), optimizer_(model_.parameters()) {
    model_.init(static_cast<uint64_t>(c.seed));
  }
  void zero_grad() override {
    ModelLearner::zero_grad();
    losses_.clear();
  }
  void forward_backward(const int32_t* tokens, const int32_t* targets, uint64_t key) override {
    losses_.push_back(model_.forward(tokens, targets, key));
    model_.backward();
  }
  StepResult step(const TrainConfig& c, double lr) override {
    const double norm =
        scale_and_clip_gradients(model_.parameters(), 1.0f / static_cast<float>(c.grad_accumulation), c.grad_clip);
    optimizer_.step(c, lr);
    return {mean_in_order(losses_), norm};
  }
  double evaluate(const int32_t* tokens, const int32_t* targets) override {
    model_.set_training(false);
    const double loss = model_.forward(tokens, targets, 0);
    model_.set_training(true);
    return loss;
  }
  std::vector<GainStats> gains() override { return model_.gains(); }
  Gpt<float>& host_model() override { return model_; }
  AdamW& host_optimizer() override { return optimizer_; }
  void to_host() override {}
  void from_host() override {}

 private:
  AdamW optimizer_;
  std::vector<double> losses_;  // of the micro-batches since zero_grad
};

}  // namespace

double mean_in_order(const std::vector<double>& values) {
  double total = 0;
  for (double v : values) total += v;
  return values.empty() ? 0.0 : total / static_cast<double>(values.size());
}

std::unique_ptr<Learner> make_cpu_learner(const TrainConfig& config) { return std::make_unique<CpuLearner>(config); }

std::unique_ptr<Learner> make_learner(const TrainConfig& config, const LearnerFactory& cuda_learner) {
  if (config.device != "cuda") return make_cpu_learner(config);
  check(static_cast<bool>(cuda_learner),
        "device: cuda, but this mhc was built without CUDA (no nvcc at configure time, or -DMHC_CUDA=OFF)");
  return cuda_learner(config);
}

double evaluate_loss(const std::function<double(const int32_t*, const int32_t*)>& batch_loss,
                     const std::vector<int32_t>& stream, int64_t batch, int64_t seq, int64_t batches) {
  const Batcher batcher(stream, batch, seq);
  std::vector<int32_t> tokens(batch * seq), targets(batch * seq);
  uint64_t position = 0;
  double total = 0;
  for (int64_t b = 0; b < batches; ++b) {
    batcher.next(position, tokens.data(), targets.data());
    total += batch_loss(tokens.data(), targets.data());
  }
  return total / static_cast<double>(batches);
}

}  // namespace mhc
