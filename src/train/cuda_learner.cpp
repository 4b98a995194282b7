#include "train/cuda_learner.h"

#include "nn/gpt_cuda.h"

namespace mhc {
namespace {

class CudaLearner final : public ModelLearner<GptCuda> {
 public:
  explicit CudaLearner(const TrainConfig& c) : ModelLearner(c), optimizer_(model_.parameters()) {
    model_.init(static_cast<uint64_t>(c.seed));
    model_.set_graphs(c.cuda_graphs);
  }
  void forward_backward(const int32_t* tokens, const int32_t* targets, uint64_t key) override {
    model_.forward_backward(tokens, targets, key);
  }
  StepResult step(const TrainConfig& c, double lr) override {
    const double norm = model_.step(c, lr);  // the step's one wait for the device
    return {mean_in_order(model_.micro_batch_losses()), norm};
  }
  double evaluate(const int32_t* tokens, const int32_t* targets) override { return model_.evaluate(tokens, targets); }
  std::vector<GainStats> gains() override { return model_.gains(); }
  Gpt<float>& host_model() override { return model_.host(); }
  AdamW& host_optimizer() override { return optimizer_; }
  void to_host() override {
    model_.download();
    model_.download_optimizer(optimizer_);
  }
  void from_host() override {
    model_.upload();
    model_.upload_optimizer(optimizer_);
  }
  bool host_state_is_a_copy() const override { return true; }

 private:
  AdamW optimizer_;  // host copies of the moments, for checkpoints
};

}  // namespace

std::unique_ptr<Learner> make_cuda_learner(const TrainConfig& config) {
  return std::make_unique<CudaLearner>(config);
}

}  // namespace mhc
