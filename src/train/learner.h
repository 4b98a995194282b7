// What the training loop drives: a model and its optimizer on one device. The CPU learner
// is Gpt<float> with AdamW; the CUDA one (train/cuda_learner.h, built with the kernels)
// is GptCuda. Checkpoints go through host copies: to_host() before saving,
// from_host() after loading (the CPU learner's are its own model and moments).
#pragma once
#include <cstdint>
#include <functional>
#include <memory>
#include <vector>

#include "nn/gpt.h"
#include "train/optimizer.h"
#include "train/train_config.h"

namespace mhc {

// What a step reports: the mean loss of its micro-batches and the gradients' global norm
// before clipping.
struct StepResult {
  double loss = 0, grad_norm = 0;
};

class Learner {
 public:
  virtual ~Learner() = default;
  virtual void zero_grad() = 0;
  // One micro-batch; gradients accumulate. `key` keys dropout. A device learner only
  // queues it: its loss comes with step().
  virtual void forward_backward(const int32_t* tokens, const int32_t* targets, uint64_t key) = 0;
  // Gradients scaled by 1 / grad_accumulation, clipped, AdamW; the micro-batches' losses
  // (since zero_grad) averaged, and the norm.
  virtual StepResult step(const TrainConfig& config, double lr) = 0;
  // Mean loss of one batch with dropout off; no gradients.
  virtual double evaluate(const int32_t* tokens, const int32_t* targets) = 0;
  // Stability metrics of the last forward (empty where a learner has none).
  virtual std::vector<GainStats> gains() = 0;
  virtual Gpt<float>& host_model() = 0;
  virtual AdamW& host_optimizer() = 0;
  virtual void to_host() = 0;
  virtual void from_host() = 0;
  // True where host_model() and host_optimizer() are copies that only to_host() and
  // loading write (the GPU's): a checkpoint is then written from them while training goes on.
  virtual bool host_state_is_a_copy() const { return false; }
};

// What every learner does the same way with its model (Gpt<float> or GptCuda).
template <typename Model> class ModelLearner : public Learner {
 public:
  explicit ModelLearner(const TrainConfig& c) : model_(c.model, c.batch_size, c.model.seq_length) {}
  void zero_grad() override { model_.zero_grad(); }

 protected:
  Model model_;
};

using LearnerFactory = std::function<std::unique_ptr<Learner>(const TrainConfig&)>;

std::unique_ptr<Learner> make_cpu_learner(const TrainConfig& config);
// The learner of config.device: the CPU's, or cuda_learner's (empty in a build without
// CUDA, which then is a named error).
std::unique_ptr<Learner> make_learner(const TrainConfig& config, const LearnerFactory& cuda_learner);

// The mean of `values` summed in order (0 for none): a step's loss from its micro-batches'.
double mean_in_order(const std::vector<double>& values);

// Mean loss over `batches` batches of the stream from its start.
double evaluate_loss(const std::function<double(const int32_t*, const int32_t*)>& batch_loss,
                     const std::vector<int32_t>& stream, int64_t batch, int64_t seq, int64_t batches);

}  // namespace mhc
