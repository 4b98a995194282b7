// CUDA embedding, cross-entropy, optimizer and dropout keys against their CPU counterparts, on fresh
// random inputs with every output poisoned first. Skipped without a GPU.
#include <gtest/gtest.h>

#include <algorithm>
#include <type_traits>

#include "core/rng.h"
#include "cuda_test_util.h"
#include "nn/parameter.h"
#include "ops/cpu/embedding.h"
#include "ops/cuda/adamw.h"
#include "ops/cuda/dropout_keys.h"
#include "ops/cuda/embedding.h"
#include "train/optimizer.h"

namespace mhc {
namespace {

using namespace mhc::test;

class CudaTrainOps : public ::testing::Test {
 protected:
  void SetUp() override {
    if (!cuda::device_available()) GTEST_SKIP() << "no CUDA device";
  }
};

std::vector<int32_t> random_tokens(size_t count, int64_t vocab, uint64_t seed) {
  std::vector<int32_t> tokens;
  // Few distinct values, so that runs of equal tokens are long (the backward's hard case).
  for (double u : random_vector(count, seed, 0, 1)) tokens.push_back(static_cast<int32_t>(u * u * vocab) % vocab);
  return tokens;
}

// The keys a CUDA graph makes for each step: the host's rng_key of the step in device memory.
TEST_F(CudaTrainOps, DropoutKeysAreTheHostsForTheStepInDeviceMemory) {
  const std::vector<uint64_t> sites{0, 1, 2};
  const int64_t layers = 37;
  auto d_keys = poisoned<uint64_t>(static_cast<size_t>(layers) * sites.size());
  for (const uint64_t step : {uint64_t{0}, uint64_t{7}, uint64_t{123456789012}}) {
    DeviceBuffer<uint64_t> d_step(std::vector<uint64_t>{step});
    cuda::dropout_keys(99, layers, sites, d_step.data(), d_keys.data());
    const std::vector<uint64_t> keys = d_keys.download();
    for (int64_t l = 0; l < layers; ++l)
      for (size_t i = 0; i < sites.size(); ++i)
        ASSERT_EQ(keys[l * sites.size() + i], rng_key(99, static_cast<uint64_t>(l), step, sites[i]))
            << "layer " << l << " site " << i << " step " << step;
  }
}

// counts[v] copies of token v in a random order.
std::vector<int32_t> tokens_with_counts(const std::vector<int64_t>& counts, uint64_t seed) {
  std::vector<std::pair<double, int32_t>> keyed;
  for (size_t v = 0; v < counts.size(); ++v)
    for (int64_t k = 0; k < counts[v]; ++k) keyed.push_back({0.0, static_cast<int32_t>(v)});
  const std::vector<double> keys = random_vector(keyed.size(), seed, 0, 1);
  for (size_t i = 0; i < keyed.size(); ++i) keyed[i].first = keys[i];
  std::sort(keyed.begin(), keyed.end());
  std::vector<int32_t> tokens;
  for (const auto& k : keyed) tokens.push_back(k.second);
  return tokens;
}

TEST_F(CudaTrainOps, EmbeddingForwardAndBackward) {
  struct Case {
    int64_t batch, seq, C, vocab;
    std::vector<int64_t> counts;  // of each token; empty: random_tokens
  };
  // The backward sums each token's run in chunks of 32 sorted positions: runs shorter than,
  // equal to and longer than a chunk, across its ends, a run filling whole chunks, a run of
  // hundreds (a byte-level corpus's ' '), channels a multiple of 8 and not, and more channels
  // than a block's threads take (a second row of blocks).
  const std::vector<int64_t> runs{1, 31, 32, 33, 64, 65, 97, 1};
  const std::vector<Case> cases{{1, 1, 1, 2, {}},
                                {3, 17, 13, 50, {}},
                                {8, 64, 96, 1000, {}},
                                {8, 64, 96, 3, {}},
                                {4, 81, 16, 8, runs},
                                {4, 81, 13, 8, runs},
                                {4, 40, 24, 5, {0, 0, 0, 0, 160}},
                                {2, 40, 1032, 7, {}},
                                {2, 40, 131, 7, {}}};
  for (const Case& k : cases) {
    const int64_t batch = k.batch, seq = k.seq, C = k.C, vocab = k.vocab;
    const std::vector<int32_t> tokens =
        k.counts.empty() ? random_tokens(batch * seq, vocab, 1) : tokens_with_counts(k.counts, 7);
    ASSERT_EQ(static_cast<int64_t>(tokens.size()), batch * seq);
    const std::vector<float> wte = random_float(vocab * C, 2), wpe = random_float(seq * C, 3),
                             dwte0 = random_float(vocab * C, 4), dwpe0 = random_float(seq * C, 5);
    const Bf16Data de = random_bf16(batch * seq * C, 6);
    DeviceBuffer<int32_t> d_tokens(tokens);
    DeviceBuffer<float> d_wte(wte), d_wpe(wpe), d_dwte(dwte0), d_dwpe(dwpe0);
    DeviceBuffer<bf16> d_de(de.bits);
    auto d_e = poisoned<bf16>(batch * seq * C);
    auto d_work = poisoned<unsigned char>(cuda::embedding_backward_workspace_bytes(batch, seq, C));
    cuda::embedding_forward(d_tokens.data(), d_wte.data(), d_wpe.data(), batch, seq, C, d_e.data());
    cuda::embedding_backward(d_de.data(), d_tokens.data(), batch, seq, C, vocab, d_dwte.data(), d_dwpe.data(),
                             d_work.data());
    MHC_CUDA_CHECK(cudaDeviceSynchronize());
    const auto wte_d = widen(wte), wpe_d = widen(wpe);
    std::vector<double> e(batch * seq * C), dwte = widen(dwte0), dwpe = widen(dwpe0);
    cpu::embedding_forward(tokens.data(), wte_d.data(), wpe_d.data(), batch, seq, C, e.data());
    cpu::embedding_backward(de.values.data(), tokens.data(), batch, seq, C, dwte.data(), dwpe.data());
    const std::string label =
        "seq " + std::to_string(seq) + " C " + std::to_string(C) + " vocab " + std::to_string(vocab);
    EXPECT_LT(relative_error(widen(d_e.download()), e), kBf16Tolerance) << label;
    EXPECT_LT(relative_error(widen(d_dwte.download()), dwte), kFp32Tolerance) << label;
    EXPECT_LT(relative_error(widen(d_dwpe.download()), dwpe), kFp32Tolerance) << label;
    // Deterministic: the same backward again gives the same bits.
    const auto first = d_dwte.download();
    d_dwte.upload(dwte0);
    cuda::embedding_backward(d_de.data(), d_tokens.data(), batch, seq, C, vocab, d_dwte.data(), d_dwpe.data(),
                             d_work.data());
    EXPECT_EQ(d_dwte.download(), first) << label;
  }
}

TEST_F(CudaTrainOps, CrossEntropyMatchesTheLmHead) {
  // The GPU loss takes bf16 logits; the CPU head computes logits = h wte^T. With h the
  // identity (C = rows) and wte holding bf16 values, the CPU head's logits are exactly the
  // GPU's input. V = 130001 does not fit in shared memory (the unstaged path).
  for (auto [rows, V] : {std::array<int64_t, 2>{1, 2}, std::array<int64_t, 2>{37, 1001},
                         std::array<int64_t, 2>{5, 4096}, std::array<int64_t, 2>{3, 130001}}) {
    const int64_t C = rows;
    std::vector<double> h(rows * C, 0.0), wte = random_vector(V * C, 12, -6, 6);
    for (int64_t r = 0; r < rows; ++r) h[r * C + r] = 1.0;
    for (double& w : wte) w = static_cast<double>(__bfloat162float(__float2bfloat16(static_cast<float>(w))));
    const std::vector<int32_t> targets = random_tokens(rows, V, 13);
    std::vector<bf16> logits(rows * V);
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t v = 0; v < V; ++v) logits[r * V + v] = __float2bfloat16(static_cast<float>(wte[v * C + r]));
    DeviceBuffer<bf16> d_logits(logits);
    DeviceBuffer<int32_t> d_targets(targets);
    auto d_losses = poisoned<float>(rows);
    cuda::cross_entropy(d_logits.data(), d_targets.data(), rows, V, 1.0f / static_cast<float>(rows), d_losses.data());
    MHC_CUDA_CHECK(cudaDeviceSynchronize());
    std::vector<double> probs(rows * V);
    const double loss = cpu::lm_head_forward(h.data(), wte.data(), targets.data(), rows, C, V, probs.data());
    // dlogits = (probs - onehot) / rows, as the CPU backward forms it
    for (int64_t r = 0; r < rows; ++r) probs[r * V + targets[r]] -= 1.0;
    for (double& p : probs) p /= static_cast<double>(rows);
    const auto losses = d_losses.download();
    double mean = 0;
    for (float l : losses) mean += l;
    mean /= static_cast<double>(rows);
    const std::string label = "rows " + std::to_string(rows) + ", V " + std::to_string(V);
    EXPECT_NEAR(mean, loss, 1e-5 * std::max(1.0, std::abs(loss))) << label;
    EXPECT_LT(relative_error(widen(d_logits.download()), probs), kBf16Tolerance) << label;
  }
}

TEST_F(CudaTrainOps, AdamWWithClippingMatchesTheCpuOptimizer) {
  TrainConfig config;
  config.grad_clip = 0.5;
  // Sizes not a multiple of the kernels' vectors of 4; the third tensor's arrays start one
  // float past an allocation (not 16-byte aligned: the scalar kernels).
  Parameter<float> weight("decoder.layers.0.mlp.linear_fc1.weight", {37, 29}),
      bias("decoder.final_layernorm.bias", {7}), qkv_bias("decoder.layers.0.self_attention.linear_qkv.bias", {13});
  std::vector<Parameter<float>*> params = {&weight, &bias, &qkv_bias};
  const std::vector<size_t> lead = {0, 0, 1};
  for (Parameter<float>* p : params) p->value = random_float(p->value.size(), 21 + p->value.size());
  AdamW cpu_opt(params);
  // Device arrays of lead[k] unused floats, then the tensor's.
  auto with_lead = [](const std::vector<float>& v, size_t lead_k) {
    std::vector<float> out(lead_k, 0.0f);
    out.insert(out.end(), v.begin(), v.end());
    return out;
  };
  auto without_lead = [](const auto& v, size_t lead_k) {
    return std::decay_t<decltype(v)>(v.begin() + static_cast<std::ptrdiff_t>(lead_k), v.end());
  };
  std::vector<DeviceBuffer<float>> value, grad, m, v;
  std::vector<DeviceBuffer<bf16>> copy;
  for (size_t k = 0; k < params.size(); ++k) {
    const size_t n = params[k]->value.size();
    value.emplace_back(with_lead(params[k]->value, lead[k]));
    grad.emplace_back(n + lead[k]);
    m.emplace_back(std::vector<float>(n + lead[k], 0.0f));
    v.emplace_back(std::vector<float>(n + lead[k], 0.0f));
    copy.push_back(poisoned<bf16>(n + lead[k]));
  }
  DeviceBuffer<double> work(cuda::grad_norm_workspace_doubles(params.size()));
  auto result = poisoned<float>(2);
  const float scale = 0.5f;  // e.g. two accumulated micro-batches
  for (int step = 1; step <= 3; ++step) {
    const double lr = 1e-2 * step;
    for (size_t k = 0; k < params.size(); ++k) {
      params[k]->grad = random_float(params[k]->value.size(), 100 * step + k, -3, 3);
      grad[k].upload(with_lead(params[k]->grad, lead[k]));
    }
    std::vector<cuda::GradTensor> tensors;
    for (size_t k = 0; k < params.size(); ++k) tensors.push_back({grad[k].data() + lead[k], params[k]->size()});
    cuda::grad_norm(tensors, scale, static_cast<float>(config.grad_clip), work.data(), result.data());
    const AdamWScalars s = adamw_scalars(config, lr, step);
    for (size_t k = 0; k < params.size(); ++k) {
      const cuda::AdamWStep gs{s.beta1, s.beta2, s.eps, s.step_size, s.sqrt_correction2,
                               decays(params[k]->name) ? s.decay : 1.0f, scale};
      cuda::adamw_update(gs, grad[k].data() + lead[k], result.data() + 1, params[k]->size(), value[k].data() + lead[k],
                         m[k].data() + lead[k], v[k].data() + lead[k], copy[k].data() + lead[k]);
    }
    const double cpu_norm = scale_and_clip_gradients(params, scale, config.grad_clip);
    cpu_opt.step(config, lr);
    EXPECT_NEAR(result.download()[0], cpu_norm, 1e-6 * cpu_norm) << "step " << step;
    for (size_t k = 0; k < params.size(); ++k) {
      const size_t l = lead[k];
      EXPECT_LT(relative_error(widen(without_lead(value[k].download(), l)), widen(params[k]->value)), 1e-6)
          << params[k]->name;
      EXPECT_LT(relative_error(widen(without_lead(m[k].download(), l)), widen(cpu_opt.exp_avg[k])), 1e-6)
          << params[k]->name;
      EXPECT_LT(relative_error(widen(without_lead(v[k].download(), l)), widen(cpu_opt.exp_avg_sq[k])), 1e-6)
          << params[k]->name;
      EXPECT_LT(relative_error(widen(without_lead(copy[k].download(), l)), widen(params[k]->value)), kBf16Tolerance);
    }
  }
}

}  // namespace
}  // namespace mhc
