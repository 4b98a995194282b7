// The GPT of nn/gpt.h on one CUDA device, for training: bf16 activations, fp32 master
// weights, gradients and AdamW moments, every op a kernel of ops/cuda (products through
// cuBLASLt). The parameters are those of a host Gpt<float> (same names, same
// initialisation): upload() copies them to the device, download() back (checkpoints).
//
// One step: zero_grad(); forward_backward() (or forward() + backward()) per micro-batch;
// step(). Every launch goes on the model's own stream; forward_backward() and step() only
// queue work and copies, so the host waits once a step (step()'s norm). The LM head's
// backward runs inside forward (per chunk of rows, so that the fp32 logits of only one
// chunk exist at a time): forward() is for training; evaluate() computes the loss only.
//
// Selective recompute (recompute = mhc) as on the CPU (nn/recompute_plan.h): the
// aggregates, norm outputs and fused-add outputs of a block live in one workspace and are
// re-run before the block's backward. gains() computes the stability metrics of the last
// forward on the device (ops/cuda/gains.h) and copies them back once.
#pragma once
#include <cstdint>
#include <memory>
#include <vector>

#include "core/config.h"
#include "nn/gpt.h"
#include "train/optimizer.h"
#include "train/train_config.h"

namespace mhc {

class GptCuda {
 public:
  GptCuda(const ModelConfig& config, int64_t batch, int64_t seq);
  ~GptCuda();
  GptCuda(const GptCuda&) = delete;
  GptCuda& operator=(const GptCuda&) = delete;

  // The host parameters (values are the device's after download()).
  std::vector<Parameter<float>*> parameters();
  void init(uint64_t seed);  // the host model's initialisation, uploaded
  void upload();
  void download();

  // Starts a step's gradients: the linear layers' and the embedding's weight gradients
  // (most of them) are then written by the first micro-batch's products instead of added
  // to, so only the rest is zeroed here.
  void zero_grad();
  // Mean cross-entropy of the batch (host tokens and targets, [batch*seq]); `step` keys
  // the dropout masks as on the CPU. Gradients accumulate over micro-batches.
  double forward(const int32_t* tokens, const int32_t* targets, uint64_t step);
  void backward();
  // forward() then backward() of one micro-batch, queued: it returns without waiting for
  // the device, and its mean loss is read later (micro_batch_losses()). From the second
  // call on, as one CUDA graph captured at that call and replayed (the same kernels on the
  // same buffers, the dropout keys made on the device from the step: the same bits as the
  // two calls; set_graphs(false) launches them one by one). A step's first micro-batch has
  // a graph of its own: it writes the products' weight gradients, the others add to them.
  void forward_backward(const int32_t* tokens, const int32_t* targets, uint64_t step);
  // The mean loss of each forward_backward() since zero_grad(), in order (waits for them;
  // after step(), which waits, nothing is left to wait for).
  std::vector<double> micro_batch_losses();
  void set_graphs(bool on);
  // The backward's weight gradients on a second stream, beside the rest of the backward
  // (the same kernels on the same inputs: the same bits); off: everything on one stream.
  void set_overlap(bool on);
  double evaluate(const int32_t* tokens, const int32_t* targets);
  // Gradients scaled by 1 / grad_accumulation, global-norm clipping and AdamW
  // (train/optimizer.h's rules); returns the norm.
  double step(const TrainConfig& config, double lr);
  int64_t steps_taken() const;
  // The H_res gains of the last forward (2 per layer, attention then MLP; empty for
  // residual models), as nn/gpt.h's Gpt::gains().
  std::vector<GainStats> gains();

  // The host model whose parameters these are (values current after download()), and the
  // AdamW moments and step count copied to or from a host optimizer over its parameters.
  Gpt<float>& host();
  void download_optimizer(AdamW& optimizer);
  void upload_optimizer(const AdamW& optimizer);

  const ModelConfig& config() const { return config_; }

 private:
  struct State;
  ModelConfig config_;
  std::unique_ptr<State> s_;
};

}  // namespace mhc
