// GPT with a residual, hc or mhc residual connection (DESIGN.md §1), on the CPU.
//
//   e = wte[tokens] + wpe;  x = expand_n(e);  x = layer_l(x) for l < L;
//   h = final_norm(contract_n(x));  loss = cross_entropy(h wte^T, targets)   (tied head)
//
// mhc layer:  x' = HC_attn(x, Attention∘norm1),  x'' = HC_mlp(x', MLP∘norm2)
// residual:   x' = x + dropout(Attention(norm1(x)) + b),  x'' likewise with the MLP.
//
// Every activation and gradient buffer is sized once at construction for (batch, seq):
// a training step allocates nothing. With recompute = mhc the discardable tensors of
// each layer live in a workspace of one recompute block (RecomputePlan) and are restored
// before the block's backward; loss and gradients are bitwise those without recompute.
#pragma once
#include <cstdint>
#include <memory>
#include <vector>

#include "core/config.h"
#include "nn/hyper_connection.h"
#include "nn/parameter.h"
#include "nn/recompute_plan.h"

namespace mhc {

// Dropout sites of a layer, each its own Philox stream per (seed, layer, step):
// rng_key(seed, layer, step, site). Shared by the CPU and CUDA models.
enum DropoutSite : uint64_t { kAttentionResidual = 0, kMlpResidual = 1, kAttentionProbs = 2 };
constexpr int kDropoutSites = 3;

// Bytes of activations held from forward to backward, and of the recompute workspace.
struct ActivationBytes {
  int64_t kept = 0;
  int64_t workspace = 0;
  int64_t total() const { return kept + workspace; }
};

// Computed without allocating: the same sizes the model allocates.
ActivationBytes activation_bytes(const ModelConfig& config, int64_t batch, int64_t seq, size_t element_size);

// Throws Error naming the first of ids[0, count) outside [0, vocab) and its position;
// `what` says whose ids ("token", "target"). The message is built only then: built for
// every id, it cost about 1 ms a GPT-2 batch, with the GPU idle.
void check_token_ids(const int32_t* ids, int64_t count, int64_t vocab, const char* what);

// Gain magnitudes of one hyper connection's H_res (paper Fig. 3 and 7), over tokens:
// forward gain = max absolute row sum, backward gain = max absolute column sum, of H_res
// itself and of the composite product of all H_res from the first module up to this one.
struct GainStats {
  double forward_max = 0, forward_mean = 0, backward_max = 0, backward_mean = 0;
  double composite_forward_max = 0, composite_forward_mean = 0, composite_backward_max = 0,
         composite_backward_mean = 0;
};

template <typename T> class Gpt {
 public:
  Gpt(const ModelConfig& config, int64_t batch, int64_t seq);
  ~Gpt();
  Gpt(const Gpt&) = delete;
  Gpt& operator=(const Gpt&) = delete;

  void init(uint64_t seed);
  std::vector<Parameter<T>*> parameters();
  void zero_grad();

  // Returns the mean cross-entropy. `step` keys the dropout masks; `embeddings`, when
  // given ([batch*seq, C]), replaces wte[tokens] + wpe (for gradient checks).
  double forward(const int32_t* tokens, const int32_t* targets, uint64_t step, const T* embeddings = nullptr);
  // Accumulates every parameter's gradient; grad_embeddings() holds d loss / d e.
  void backward();

  // Dropout on (training, the default) or off (evaluation, generation).
  void set_training(bool training);

  // Generation with a key/value cache, one sequence: feed `token` at `position`
  // (0-based, below seq_length; positions in order from 0) and get the next-token logits.
  struct DecodeCache {
    std::vector<std::vector<T>> keys, values;  // per layer [seq_length, C]
    std::vector<HcActivations<T>> act_attn, act_mlp;
    std::vector<T> e, x, x_mid, agg, ln, mean, rstd, qkv, ctx, y, fc, act, mlp_y, h, hf;  // one token's scratch
  };
  std::unique_ptr<DecodeCache> make_decode_cache() const;
  void decode(DecodeCache& cache, int32_t token, int64_t position, std::vector<T>& logits);

  const std::vector<T>& embeddings() const;
  // Softmax of the last forward's logits [tokens, vocab]; backward turns it into dlogits.
  const std::vector<T>& probabilities() const;
  const std::vector<T>& grad_embeddings() const;
  const std::vector<GainStats>& gains() const;  // 2 per layer (attention, MLP); empty for residual
  const ModelConfig& config() const { return config_; }
  ActivationBytes bytes() const;

 private:
  struct State;
  ModelConfig config_;
  std::unique_ptr<State> s_;
};

}  // namespace mhc
