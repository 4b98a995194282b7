// The CUDA GPT against the CPU one: the same configuration, seed and batches for 20
// training steps (dropout on, gradient accumulation, clipping); every step's loss must
// agree within bf16 tolerance and the loss must fall. Skipped without a GPU.
#include <gtest/gtest.h>

#include <cmath>
#include <optional>

#include "core/cuda/device.h"
#include "nn/gpt.h"
#include "nn/gpt_cuda.h"
#include "test_util.h"
#include "train/optimizer.h"

namespace mhc {
namespace {

// hidden_size 64: the CUDA kernels' vector paths (and, without dropout, the fused ones:
// dy written by the mappings' backward, the residual added in the output product).
TrainConfig tiny(const std::string& connection, double dropout = 0.1) {
  TrainConfig c = default_train_config();
  c.model.num_layers = 2;
  c.model.hidden_size = 64;
  c.model.num_attention_heads = 4;
  c.model.vocab_size = 61;
  c.model.seq_length = 32;
  c.model.connection = connection;
  c.model.hidden_dropout = dropout;
  c.model.attention_dropout = dropout;
  c.batch_size = 4;
  c.grad_accumulation = 2;
  c.learning_rate = 3e-3;
  c.warmup_steps = 3;
  c.steps = 20;
  c.lr_decay_steps = 20;
  c.grad_clip = 1.0;
  return c;
}

// Batches of a noisy periodic sequence: learnable, so the loss falls.
std::vector<int32_t> batch_tokens(int64_t count, int64_t vocab, uint64_t seed) {
  std::vector<int32_t> tokens;
  const std::vector<double> noise = test::random_vector(static_cast<size_t>(count), seed, 0, 1);
  for (int64_t i = 0; i < count; ++i)
    tokens.push_back(noise[i] < 0.1 ? static_cast<int32_t>(noise[i] * 10 * vocab) % vocab
                                    : static_cast<int32_t>((i * 7 + i / 5) % vocab));
  return tokens;
}

struct ModelCase {
  std::string connection;
  double dropout;
  int64_t streams = 4;  // with mHC; one stream: expand and contract in place
};

class CudaModel : public ::testing::TestWithParam<ModelCase> {
 protected:
  void SetUp() override {
    if (!cuda::device_available()) GTEST_SKIP() << "no CUDA device";
  }
};

TEST_P(CudaModel, TwentyStepsMatchTheCpuModel) {
  TrainConfig config = tiny(GetParam().connection, GetParam().dropout);
  config.model.num_residual_streams = GetParam().streams;
  const int64_t B = config.batch_size, T = config.model.seq_length, V = config.model.vocab_size;
  Gpt<float> cpu_model(config.model, B, T);
  cpu_model.init(5);
  const auto params = cpu_model.parameters();
  AdamW optimizer(params);
  GptCuda gpu_model(config.model, B, T);
  gpu_model.init(5);
  double first = 0, last = 0;
  for (int64_t step = 0; step < config.steps; ++step) {
    const double lr = learning_rate_at(config, step);
    cpu_model.zero_grad();
    gpu_model.zero_grad();
    double cpu_loss = 0, gpu_loss = 0;
    for (int64_t micro = 0; micro < config.grad_accumulation; ++micro) {
      const uint64_t key = static_cast<uint64_t>(step * config.grad_accumulation + micro);
      const std::vector<int32_t> seq = batch_tokens(B * T + 1, V, 100 + key);
      const std::vector<int32_t> tokens(seq.begin(), seq.end() - 1), targets(seq.begin() + 1, seq.end());
      cpu_loss += cpu_model.forward(tokens.data(), targets.data(), key);
      cpu_model.backward();
      gpu_model.forward_backward(tokens.data(), targets.data(), key);  // queued: its loss is read after the step
    }
    cpu_loss /= static_cast<double>(config.grad_accumulation);
    const double cpu_norm =
        scale_and_clip_gradients(params, 1.0f / static_cast<float>(config.grad_accumulation), config.grad_clip);
    optimizer.step(config, lr);
    const double gpu_norm = gpu_model.step(config, lr);
    const std::vector<double> gpu_losses = gpu_model.micro_batch_losses();
    ASSERT_EQ(gpu_losses.size(), static_cast<size_t>(config.grad_accumulation));
    for (double l : gpu_losses) gpu_loss += l;
    gpu_loss /= static_cast<double>(config.grad_accumulation);
    EXPECT_NEAR(gpu_loss, cpu_loss, 2e-2 * cpu_loss) << "step " << step;
    EXPECT_NEAR(gpu_norm, cpu_norm, 5e-2 * cpu_norm) << "step " << step;
    if (step == 0) first = cpu_loss;
    last = gpu_loss;
  }
  EXPECT_LT(last, first - 0.5) << "the GPU model did not learn";
  // The stability metrics of the last forward (the same batch on both).
  const std::vector<GainStats> cpu_gains = cpu_model.gains(), gpu_gains = gpu_model.gains();
  ASSERT_EQ(gpu_gains.size(), cpu_gains.size());
  for (size_t m = 0; m < cpu_gains.size(); ++m) {
    const GainStats &a = cpu_gains[m], &b = gpu_gains[m];
    const double got[] = {b.forward_max, b.forward_mean, b.backward_max, b.backward_mean,
                          b.composite_forward_max, b.composite_forward_mean, b.composite_backward_max,
                          b.composite_backward_mean};
    const double want[] = {a.forward_max, a.forward_mean, a.backward_max, a.backward_mean,
                           a.composite_forward_max, a.composite_forward_mean, a.composite_backward_max,
                           a.composite_backward_mean};
    for (int k = 0; k < 8; ++k) EXPECT_NEAR(got[k], want[k], 5e-2 * want[k]) << "module " << m << " statistic " << k;
  }
  // The trained weights come back to the host parameters.
  gpu_model.download();
  double diff = 0, norm = 0;
  const auto gpu_params = gpu_model.parameters();
  for (size_t k = 0; k < params.size(); ++k)
    for (size_t i = 0; i < params[k]->value.size(); ++i) {
      diff += std::pow(gpu_params[k]->value[i] - params[k]->value[i], 2);
      norm += std::pow(params[k]->value[i], 2);
    }
  EXPECT_LT(std::sqrt(diff / norm), 5e-2);
  // The AdamW moments come back per parameter (checkpoints), close to the CPU optimizer's,
  // and go up again unchanged.
  AdamW gpu_optimizer(gpu_params);
  gpu_model.download_optimizer(gpu_optimizer);
  EXPECT_EQ(gpu_optimizer.steps_taken, optimizer.steps_taken);
  double m_diff = 0, m_norm = 0;
  for (size_t k = 0; k < params.size(); ++k) {
    ASSERT_EQ(gpu_optimizer.exp_avg[k].size(), optimizer.exp_avg[k].size()) << params[k]->name;
    for (size_t i = 0; i < optimizer.exp_avg[k].size(); ++i) {
      m_diff += std::pow(gpu_optimizer.exp_avg[k][i] - optimizer.exp_avg[k][i], 2);
      m_norm += std::pow(optimizer.exp_avg[k][i], 2);
    }
  }
  EXPECT_LT(std::sqrt(m_diff / m_norm), 5e-2);
  gpu_model.upload_optimizer(gpu_optimizer);
  AdamW again(gpu_params);
  gpu_model.download_optimizer(again);
  EXPECT_EQ(again.exp_avg, gpu_optimizer.exp_avg);
  EXPECT_EQ(again.exp_avg_sq, gpu_optimizer.exp_avg_sq);
}

INSTANTIATE_TEST_SUITE_P(Connections, CudaModel,
                         ::testing::Values(ModelCase{"mhc", 0.1}, ModelCase{"mhc", 0}, ModelCase{"residual", 0.1},
                                           ModelCase{"residual", 0}, ModelCase{"hc", 0.1}, ModelCase{"mhc", 0, 1}),
                         [](const auto& param_info) {
                           const ModelCase& m = param_info.param;
                           return m.connection + (m.dropout > 0 ? "" : "_no_dropout") +
                                  (m.streams != 4 ? "_n" + std::to_string(m.streams) : "");
                         });

// A token id out of the vocabulary is a named error before anything is queued: the step's
// losses are those of the micro-batches that were queued.
TEST(CudaModelQueue, ABadBatchQueuesNothing) {
  if (!cuda::device_available()) GTEST_SKIP() << "no CUDA device";
  const TrainConfig c = tiny("mhc", 0.0);
  const int64_t B = c.batch_size, T = c.model.seq_length, V = c.model.vocab_size;
  GptCuda model(c.model, B, T);
  model.init(3);
  const std::vector<int32_t> seq = batch_tokens(B * T + 1, V, 40);
  const std::vector<int32_t> tokens(seq.begin(), seq.end() - 1), targets(seq.begin() + 1, seq.end());
  std::vector<int32_t> bad = tokens;
  bad[5] = static_cast<int32_t>(V);
  model.zero_grad();
  model.forward_backward(tokens.data(), targets.data(), 0);
  EXPECT_THROW(model.forward_backward(bad.data(), targets.data(), 0), Error);
  EXPECT_THROW(model.forward_backward(tokens.data(), bad.data(), 0), Error);
  model.step(c, 1e-3);
  const std::vector<double> losses = model.micro_batch_losses();
  ASSERT_EQ(losses.size(), 1u);
  EXPECT_TRUE(std::isfinite(losses[0]));
  EXPECT_NEAR(losses[0], std::log(static_cast<double>(V)), 0.5) << "an untrained model's loss";
}

// Selective recompute re-runs deterministic kernels on the same inputs: losses and the
// trained weights are bitwise those without it.
TEST(CudaModelRecompute, BitwiseEqualToNoRecompute) {
  if (!cuda::device_available()) GTEST_SKIP() << "no CUDA device";
  for (const double dropout : {0.1, 0.0})
  for (std::optional<int64_t> block : {std::optional<int64_t>{}, std::optional<int64_t>{1}, std::optional<int64_t>{2}}) {
    TrainConfig plain = tiny("mhc", dropout);
    plain.model.num_layers = 3;
    TrainConfig recomputed = plain;
    recomputed.model.recompute = "mhc";
    recomputed.model.mhc_recompute_layer_num = block;
    const int64_t B = plain.batch_size, T = plain.model.seq_length, V = plain.model.vocab_size;
    GptCuda a(plain.model, B, T), b(recomputed.model, B, T);
    a.init(9);
    b.init(9);
    for (int64_t step = 0; step < 3; ++step) {
      const std::vector<int32_t> seq = batch_tokens(B * T + 1, V, 300 + static_cast<uint64_t>(step));
      const std::vector<int32_t> tokens(seq.begin(), seq.end() - 1), targets(seq.begin() + 1, seq.end());
      a.zero_grad();
      b.zero_grad();
      const double la = a.forward(tokens.data(), targets.data(), static_cast<uint64_t>(step));
      const double lb = b.forward(tokens.data(), targets.data(), static_cast<uint64_t>(step));
      a.backward();
      b.backward();
      EXPECT_EQ(la, lb) << "step " << step;
      EXPECT_EQ(a.step(plain, 1e-3), b.step(recomputed, 1e-3)) << "step " << step;
    }
    a.download();
    b.download();
    const auto pa = a.parameters(), pb = b.parameters();
    for (size_t k = 0; k < pa.size(); ++k) EXPECT_EQ(pa[k]->value, pb[k]->value) << pa[k]->name;
  }
}

// A micro-batch replayed as a CUDA graph, with the weight gradients on a second stream,
// runs the kernels that one stream's one-by-one launches run, on the same buffers: the
// losses, norms, stability metrics and trained weights are bitwise theirs. Every
// micro-batch has new tokens (the replay must read them), and an evaluation between steps
// shares the graph's buffers. With dropout too (the replays' keys made on the device from
// each step; dy then has its own buffer, overwritten a sublayer later). The wider model
// gives the second stream's products time to lag behind.
TEST(CudaModelGraphsAndOverlap, BitwiseEqualToOneStreamLaunchesOneByOne) {
  if (!cuda::device_available()) GTEST_SKIP() << "no CUDA device";
  for (const bool wide : {false, true})
  for (const double dropout : {0.0, 0.1})
    for (const std::string connection : {"mhc", "residual"})
      for (const std::string recompute : {"none", "mhc"}) {
        if (connection == "residual" && recompute == "mhc") continue;
        TrainConfig c = tiny(connection, dropout);
        c.model.num_layers = 3;
        if (wide) {
          c.model.hidden_size = 384;
          c.model.num_attention_heads = 6;
          c.model.seq_length = 256;
          c.batch_size = 16;
        }
        c.model.recompute = recompute;
        if (recompute == "mhc") c.model.mhc_recompute_layer_num = 2;
        const int64_t B = c.batch_size, T = c.model.seq_length, V = c.model.vocab_size;
        GptCuda eager(c.model, B, T), graphed(c.model, B, T);
        eager.set_graphs(false);
        eager.set_overlap(false);
        eager.init(5);
        graphed.init(5);
        const std::string what = connection + " recompute " + recompute + " dropout " + std::to_string(dropout) +
                                 (wide ? " wide" : "");
        for (int64_t step = 0; step < 4; ++step) {
          eager.zero_grad();
          graphed.zero_grad();
          for (int64_t micro = 0; micro < c.grad_accumulation; ++micro) {
            const auto seq = batch_tokens(B * T + 1, V, 500 + static_cast<uint64_t>(step * 10 + micro));
            const std::vector<int32_t> tokens(seq.begin(), seq.end() - 1), targets(seq.begin() + 1, seq.end());
            const auto key = static_cast<uint64_t>(step);
            eager.forward_backward(tokens.data(), targets.data(), key);
            graphed.forward_backward(tokens.data(), targets.data(), key);
          }
          const std::vector<double> le = eager.micro_batch_losses(), lg = graphed.micro_batch_losses();
          ASSERT_EQ(le.size(), static_cast<size_t>(c.grad_accumulation)) << what << " step " << step;
          EXPECT_EQ(le, lg) << what << " step " << step;
          const auto ge = eager.gains(), gg = graphed.gains();
          ASSERT_EQ(ge.size(), gg.size());
          for (size_t m = 0; m < ge.size(); ++m)
            EXPECT_EQ(ge[m].composite_forward_max, gg[m].composite_forward_max) << "module " << m;
          EXPECT_EQ(eager.step(c, 1e-3), graphed.step(c, 1e-3)) << what << " step " << step;
          const auto eval = batch_tokens(B * T + 1, V, 900 + static_cast<uint64_t>(step));
          const std::vector<int32_t> tokens(eval.begin(), eval.end() - 1), targets(eval.begin() + 1, eval.end());
          EXPECT_EQ(eager.evaluate(tokens.data(), targets.data()), graphed.evaluate(tokens.data(), targets.data()));
        }
        eager.download();
        graphed.download();
        const auto pe = eager.parameters(), pg = graphed.parameters();
        for (size_t k = 0; k < pe.size(); ++k) EXPECT_EQ(pe[k]->value, pg[k]->value) << what << " " << pe[k]->name;
      }
}

}  // namespace
}  // namespace mhc
