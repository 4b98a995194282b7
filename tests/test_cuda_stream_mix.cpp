// CUDA stream-mixing kernels against the CPU double reference, on fresh random inputs
// with every output poisoned (0xFF bytes: NaN) before the run. Skipped without a GPU.
#include <gtest/gtest.h>

#include <cmath>

#include "core/cuda/device.h"
#include "core/rng.h"
#include "core/tensor.h"
#include "cuda_test_util.h"
#include "ops/cpu/aggregate.h"
#include "ops/cpu/h_post_bda.h"
#include "ops/cpu/layernorm.h"
#include "ops/cpu/stream_expand.h"
#include "ops/cuda/linear.h"
#include "ops/cuda/norm.h"
#include "ops/cuda/stream_mix.h"

namespace mhc {
namespace {

using namespace mhc::test;  // the CUDA test helpers

struct Shape {
  int64_t tokens;
  int n;
  int64_t C;
};

class CudaStreamMix : public ::testing::TestWithParam<Shape> {
 protected:
  void SetUp() override {
    if (!cuda::device_available()) GTEST_SKIP() << "no CUDA device";
  }
};

TEST_P(CudaStreamMix, AggregateForwardAndBackward) {
  const auto [tokens, n, C] = GetParam();
  const Bf16Data x = random_bf16(tokens * n * C, 1), g = random_bf16(tokens * C, 2), gx0 = random_bf16(x.bits.size(), 3);
  const std::vector<float> h_pre = random_float(tokens * n, 4, 0, 1);
  DeviceBuffer<bf16> d_x(x.bits), d_g(g.bits), d_gx(gx0.bits);
  DeviceBuffer<float> d_pre(h_pre);
  auto d_agg = poisoned<bf16>(tokens * C);
  auto d_dpre = poisoned<float>(tokens * n);
  cuda::aggregate_forward(d_x.data(), d_pre.data(), tokens, n, C, d_agg.data());
  cuda::aggregate_backward(d_g.data(), d_x.data(), d_pre.data(), tokens, n, C, d_gx.data(), d_dpre.data());
  MHC_CUDA_CHECK(cudaDeviceSynchronize());

  std::vector<double> agg(tokens * C), gx = gx0.values, dpre(tokens * n);
  const auto pre = widen(h_pre);
  cpu::aggregate_forward(x.values.data(), pre.data(), tokens, n, C, agg.data());
  cpu::aggregate_backward(g.values.data(), x.values.data(), pre.data(), tokens, n, C, gx.data(), dpre.data());
  EXPECT_LT(test::relative_error(widen(d_agg.download()), agg), kBf16Tolerance);
  EXPECT_LT(test::relative_error(widen(d_gx.download()), gx), kBf16Tolerance);
  EXPECT_LT(test::relative_error(widen(d_dpre.download()), dpre), kFp32Tolerance);
}

TEST_P(CudaStreamMix, HPostBiasDropoutAddForwardAndBackward) {
  const auto [tokens, n, C] = GetParam();
  for (float p : {0.0f, 0.25f}) {
    const cpu::DropoutSpec dropout{p, rng_key(99, static_cast<uint64_t>(n), static_cast<uint64_t>(C))};
    const Bf16Data x = random_bf16(tokens * n * C, 11), y = random_bf16(tokens * C, 12), yb = random_bf16(C, 13);
    const Bf16Data gout = random_bf16(tokens * n * C, 14);
    const std::vector<float> h_res = random_float(tokens * n * n, 15, 0, 1), h_post = random_float(tokens * n, 16, 0, 2);
    const std::vector<float> dyb0 = random_float(C, 17);
    DeviceBuffer<bf16> d_x(x.bits), d_y(y.bits), d_yb(yb.bits), d_gout(gout.bits);
    DeviceBuffer<float> d_res(h_res), d_post(h_post), d_dyb(dyb0);
    auto d_out = poisoned<bf16>(tokens * n * C);
    auto d_dx = poisoned<bf16>(tokens * n * C);
    auto d_dy = poisoned<bf16>(tokens * C);
    auto d_dres = poisoned<float>(tokens * n * n);
    auto d_dpost = poisoned<float>(tokens * n);
    auto d_sumsq = poisoned<float>(tokens);
    cuda::h_post_bda_forward(d_x.data(), d_res.data(), d_post.data(), d_y.data(), d_yb.data(), tokens, n, C, dropout,
                             d_out.data(), d_sumsq.data());
    cuda::h_post_bda_backward(d_gout.data(), d_x.data(), d_res.data(), d_post.data(), d_y.data(), d_yb.data(), tokens,
                              n, C, dropout, d_dx.data(), d_dres.data(), d_dpost.data(), d_dy.data());
    auto d_columns = poisoned<float>(cuda::column_sums_workspace_floats(tokens, C));
    cuda::accumulate_column_sums(d_dy.data(), tokens, C, d_dyb.data(), d_columns.data());
    auto d_dy_alone = poisoned<bf16>(tokens * C);  // dy alone (and dy_bias), as a model computes it first
    DeviceBuffer<float> d_dyb_alone(dyb0);
    auto d_dy_work = poisoned<float>(cuda::h_post_bda_grad_y_workspace_floats(tokens, C));
    cuda::h_post_bda_grad_y(d_gout.data(), d_post.data(), tokens, n, C, dropout, d_dy_alone.data(),
                            d_dyb_alone.data(), d_dy_work.data());
    MHC_CUDA_CHECK(cudaDeviceSynchronize());

    const auto res = widen(h_res), post = widen(h_post);
    std::vector<double> out(tokens * n * C), dx(tokens * n * C, 0.0), dres(tokens * n * n), dpost(tokens * n),
        dy(tokens * C), dyb = widen(dyb0);
    cpu::h_post_bda_forward(x.values.data(), res.data(), post.data(), y.values.data(), yb.values.data(), tokens, n, C,
                            dropout, out.data());
    cpu::h_post_bda_backward(gout.values.data(), x.values.data(), res.data(), post.data(), y.values.data(),
                             yb.values.data(), tokens, n, C, dropout, dx.data(), dres.data(), dpost.data(), dy.data(),
                             dyb.data());
    const std::string label = "p=" + std::to_string(p);
    const std::vector<double> out_gpu = widen(d_out.download());
    EXPECT_LT(test::relative_error(out_gpu, out), kBf16Tolerance) << label;
    // ||out_t||^2 of the stored bf16 values, summed here in double.
    std::vector<double> sumsq(tokens, 0.0);
    for (int64_t t = 0; t < tokens; ++t)
      for (int64_t e = 0; e < n * C; ++e) {
        sumsq[t] += out_gpu[t * n * C + e] * out_gpu[t * n * C + e];
      }
    EXPECT_LT(test::relative_error(widen(d_sumsq.download()), sumsq), kFp32Tolerance) << label;
    EXPECT_LT(test::relative_error(widen(d_dx.download()), dx), kBf16Tolerance) << label;
    EXPECT_LT(test::relative_error(widen(d_dy.download()), dy), kBf16Tolerance) << label;
    EXPECT_EQ(d_dy_alone.download(), d_dy.download()) << label;  // the same sums in the same order
    EXPECT_EQ(d_dyb_alone.download(), d_dyb.download()) << label;  // the same column sums of the same dy
    EXPECT_LT(test::relative_error(widen(d_dres.download()), dres), kFp32Tolerance) << label;
    EXPECT_LT(test::relative_error(widen(d_dpost.download()), dpost), kFp32Tolerance) << label;
    // dy_bias sums the bf16-rounded dy over tokens: bf16-level agreement.
    EXPECT_LT(test::relative_error(widen(d_dyb.download()), dyb), kBf16Tolerance) << label;
    if (p == 0.0f || C % 8 != 0) continue;
    // The mask kept as bits by the forward (DropoutSpec::kept): the forward, and the
    // backward kernels reading the bits, give the bits of those that make the mask.
    auto d_kept = poisoned<uint8_t>(tokens * n * C / 8);
    cpu::DropoutSpec kept = dropout;
    kept.kept = d_kept.data();
    auto d_out_k = poisoned<bf16>(tokens * n * C), d_dx_k = poisoned<bf16>(tokens * n * C);
    auto d_dy_k = poisoned<bf16>(tokens * C), d_dy_alone_k = poisoned<bf16>(tokens * C);
    auto d_dres_k = poisoned<float>(tokens * n * n), d_dpost_k = poisoned<float>(tokens * n);
    DeviceBuffer<float> d_dyb_k(dyb0);
    cuda::h_post_bda_forward(d_x.data(), d_res.data(), d_post.data(), d_y.data(), d_yb.data(), tokens, n, C, kept,
                             d_out_k.data(), nullptr);
    cuda::h_post_bda_backward(d_gout.data(), d_x.data(), d_res.data(), d_post.data(), d_y.data(), d_yb.data(), tokens,
                              n, C, kept, d_dx_k.data(), d_dres_k.data(), d_dpost_k.data(), d_dy_k.data());
    cuda::h_post_bda_grad_y(d_gout.data(), d_post.data(), tokens, n, C, kept, d_dy_alone_k.data(), d_dyb_k.data(),
                            d_dy_work.data());
    EXPECT_EQ(d_out_k.download(), d_out.download()) << label;
    EXPECT_EQ(d_dx_k.download(), d_dx.download()) << label;
    EXPECT_EQ(d_dy_k.download(), d_dy.download()) << label;
    EXPECT_EQ(d_dres_k.download(), d_dres.download()) << label;
    EXPECT_EQ(d_dpost_k.download(), d_dpost.download()) << label;
    EXPECT_EQ(d_dy_alone_k.download(), d_dy_alone.download()) << label;
    EXPECT_EQ(d_dyb_k.download(), d_dyb_alone.download()) << label;
    // the reductions alone with the aggregate's gradient (the model's path), against those
    // with the Philox stream
    const Bf16Data gagg = random_bf16(tokens * C, 18);
    const std::vector<float> h_pre = random_float(tokens * n, 19, 0, 1);
    DeviceBuffer<bf16> d_gagg(gagg.bits);
    DeviceBuffer<float> d_pre(h_pre);
    std::vector<std::vector<float>> reductions;
    for (const cpu::DropoutSpec& d : {dropout, kept}) {
      auto d_dpre = poisoned<float>(tokens * n);
      for (auto* b : {&d_dres_k, &d_dpost_k}) *b = poisoned<float>(b->size());
      const cuda::AggregateGrad aggregate{d_gagg.data(), d_pre.data(), d_dpre.data()};
      cuda::h_post_bda_backward(d_gout.data(), d_x.data(), d_res.data(), d_post.data(), d_y.data(), d_yb.data(), tokens,
                                n, C, d, nullptr, d_dres_k.data(), d_dpost_k.data(), nullptr, &aggregate);
      for (const auto* b : {&d_dres_k, &d_dpost_k, &d_dpre}) reductions.push_back(b->download());
    }
    // (eight channels a thread step with the bits, four with the Philox stream: other sums)
    for (int k = 0; k < 3; ++k)
      EXPECT_LT(test::relative_error(widen(reductions[3 + k]), widen(reductions[k])), kFp32Tolerance)
          << label << " reductions " << k;
  }
}

TEST_P(CudaStreamMix, BackwardFusedWithTheAggregate) {
  const auto [tokens, n, C] = GetParam();
  const Bf16Data x = random_bf16(tokens * n * C, 31), y = random_bf16(tokens * C, 32), gout = random_bf16(tokens * n * C, 33);
  const Bf16Data gagg = random_bf16(tokens * C, 34);
  const std::vector<float> h_res = random_float(tokens * n * n, 35, 0, 1), h_post = random_float(tokens * n, 36, 0, 2),
                           h_pre = random_float(tokens * n, 37, 0, 1);
  DeviceBuffer<bf16> d_x(x.bits), d_y(y.bits), d_gout(gout.bits), d_gagg(gagg.bits);
  DeviceBuffer<float> d_res(h_res), d_post(h_post), d_pre(h_pre);
  auto d_dx = poisoned<bf16>(tokens * n * C);
  auto d_dy = poisoned<bf16>(tokens * C);
  auto d_dres = poisoned<float>(tokens * n * n);
  auto d_dpost = poisoned<float>(tokens * n);
  auto d_dpre = poisoned<float>(tokens * n);
  const cuda::AggregateGrad aggregate{d_gagg.data(), d_pre.data(), d_dpre.data()};
  cuda::h_post_bda_backward(d_gout.data(), d_x.data(), d_res.data(), d_post.data(), d_y.data(), nullptr, tokens, n, C,
                            {}, d_dx.data(), d_dres.data(), d_dpost.data(), d_dy.data(), &aggregate);
  MHC_CUDA_CHECK(cudaDeviceSynchronize());
  const auto res = widen(h_res), post = widen(h_post), pre = widen(h_pre);
  std::vector<double> dx(tokens * n * C, 0.0), dres(tokens * n * n), dpost(tokens * n), dpre(tokens * n),
      dy(tokens * C);
  const double* no_bias = nullptr;
  cpu::h_post_bda_backward(gout.values.data(), x.values.data(), res.data(), post.data(), y.values.data(), no_bias,
                           tokens, n, C, {}, dx.data(), dres.data(), dpost.data(), dy.data(), static_cast<double*>(nullptr));
  cpu::aggregate_backward(gagg.values.data(), x.values.data(), pre.data(), tokens, n, C, dx.data(), dpre.data());
  EXPECT_LT(relative_error(widen(d_dx.download()), dx), kBf16Tolerance);
  EXPECT_LT(relative_error(widen(d_dy.download()), dy), kBf16Tolerance);
  EXPECT_LT(relative_error(widen(d_dres.download()), dres), kFp32Tolerance);
  EXPECT_LT(relative_error(widen(d_dpost.download()), dpost), kFp32Tolerance);
  EXPECT_LT(relative_error(widen(d_dpre.download()), dpre), kFp32Tolerance);

  // The reductions alone (no dx: the model's path, where the mappings' backward writes dx).
  for (auto* b : {&d_dres, &d_dpost, &d_dpre}) *b = poisoned<float>(b->size());
  const cuda::AggregateGrad reductions{d_gagg.data(), d_pre.data(), d_dpre.data()};
  cuda::h_post_bda_backward(d_gout.data(), d_x.data(), d_res.data(), d_post.data(), d_y.data(), nullptr, tokens, n, C,
                            {}, nullptr, d_dres.data(), d_dpost.data(), nullptr, &reductions);
  EXPECT_LT(relative_error(widen(d_dres.download()), dres), kFp32Tolerance);
  EXPECT_LT(relative_error(widen(d_dpost.download()), dpost), kFp32Tolerance);
  EXPECT_LT(relative_error(widen(d_dpre.download()), dpre), kFp32Tolerance);

  // With dagg made in the same pass as the pre-norm's input gradient (the model's path where
  // C allows; LayerNorm and RMSNorm), the norm's input made again from x: dagg the bits of
  // norm_backward's given aggregate_forward's agg, the reductions the bits of the pass given
  // that dagg, and the norm's weight and bias gradients from the pass's sums against the CPU
  // reference (accumulated onto random values).
  const Bf16Data gln = random_bf16(tokens * C, 38);
  const std::vector<float> norm_w = random_float(C, 40, 0.5, 1.5), norm_mean = random_float(tokens, 41, -0.1, 0.1),
                           norm_rstd = random_float(tokens, 42, 0.5, 2.0);
  DeviceBuffer<bf16> d_gln(gln.bits), d_agg(tokens * C);
  cuda::aggregate_forward(d_x.data(), d_pre.data(), tokens, n, C, d_agg.data());
  const std::vector<double> agg = widen(d_agg.download());
  const std::vector<float> norm_gw0 = random_float(C, 43), norm_gb0 = random_float(C, 44);
  DeviceBuffer<float> d_norm_w(norm_w), d_norm_mean(norm_mean), d_norm_rstd(norm_rstd),
      d_norm_gw(std::vector<float>(C, 0.0f));
  auto d_norm_ws = poisoned<float>(cuda::norm_backward_workspace_floats(tokens, C));
  if (!cuda::norm_input_grad_supported(C, {})) {
    const cuda::NormInputGrad norm{d_gln.data(),  d_norm_w.data(), d_norm_mean.data(), d_norm_rstd.data(), false,
                                   d_gagg.data(), nullptr};
    const cuda::AggregateGrad fused{nullptr, d_pre.data(), d_dpre.data(), &norm};
    EXPECT_THROW(cuda::h_post_bda_backward(d_gout.data(), d_x.data(), d_res.data(), d_post.data(), d_y.data(), nullptr,
                                           tokens, n, C, {}, nullptr, d_dres.data(), d_dpost.data(), nullptr, &fused),
                 Error);
    return;
  }
  for (const bool rms : {false, true}) {
    const float* mean = rms ? nullptr : d_norm_mean.data();
    auto d_dagg_alone = poisoned<bf16>(tokens * C), d_dagg = poisoned<bf16>(tokens * C);
    cuda::norm_backward(d_gln.data(), d_agg.data(), d_norm_w.data(), mean, d_norm_rstd.data(), tokens, C, rms,
                        d_dagg_alone.data(), d_norm_gw.data(), nullptr, d_norm_ws.data(), false);
    auto d_partials = poisoned<float>(cuda::norm_param_partials_floats(tokens, C));
    const cuda::NormInputGrad norm{d_gln.data(),  d_norm_w.data(),  mean, d_norm_rstd.data(), rms,
                                   d_dagg.data(), d_partials.data()};
    for (auto* b : {&d_dres, &d_dpost, &d_dpre}) *b = poisoned<float>(b->size());
    const cuda::AggregateGrad fused{nullptr, d_pre.data(), d_dpre.data(), &norm};
    cuda::h_post_bda_backward(d_gout.data(), d_x.data(), d_res.data(), d_post.data(), d_y.data(), nullptr, tokens, n,
                              C, {}, nullptr, d_dres.data(), d_dpost.data(), nullptr, &fused);
    const auto fused_res = d_dres.download(), fused_post = d_dpost.download(), fused_pre = d_dpre.download();
    EXPECT_EQ(d_dagg.download(), d_dagg_alone.download()) << "rms " << rms;
    DeviceBuffer<float> d_gw(norm_gw0), d_gb(norm_gb0);
    cuda::add_norm_param_partials(d_partials.data(), cuda::norm_input_grad_runs(tokens), C, d_gw.data(),
                                  rms ? nullptr : d_gb.data());
    const auto wd = widen(norm_w), mean_d = widen(norm_mean), rstd_d = widen(norm_rstd);
    std::vector<double> scratch_dx(tokens * C, 0.0), gw = widen(norm_gw0), gb = widen(norm_gb0);
    cpu::norm_backward(gln.values.data(), agg.data(), wd.data(), rms ? nullptr : mean_d.data(), rstd_d.data(), tokens,
                       C, rms, scratch_dx.data(), gw.data(), rms ? nullptr : gb.data());
    EXPECT_LT(relative_error(widen(d_gw.download()), gw), kFp32Tolerance) << "rms " << rms;
    EXPECT_LT(relative_error(widen(d_gb.download()), gb), kFp32Tolerance) << "rms " << rms;  // untouched for rms
    for (auto* b : {&d_dres, &d_dpost, &d_dpre}) *b = poisoned<float>(b->size());
    const cuda::AggregateGrad given{d_dagg_alone.data(), d_pre.data(), d_dpre.data()};
    cuda::h_post_bda_backward(d_gout.data(), d_x.data(), d_res.data(), d_post.data(), d_y.data(), nullptr, tokens, n,
                              C, {}, nullptr, d_dres.data(), d_dpost.data(), nullptr, &given);
    EXPECT_EQ(d_dres.download(), fused_res) << "rms " << rms;
    EXPECT_EQ(d_dpost.download(), fused_post) << "rms " << rms;
    EXPECT_EQ(d_dpre.download(), fused_pre) << "rms " << rms;
  }
}

TEST_P(CudaStreamMix, ExpandAndContract) {
  const auto [tokens, n, C] = GetParam();
  const Bf16Data e = random_bf16(tokens * C, 41), x = random_bf16(tokens * n * C, 42);
  const Bf16Data gx = random_bf16(tokens * n * C, 43), gout = random_bf16(tokens * C, 44);
  DeviceBuffer<bf16> d_e(e.bits), d_x(x.bits), d_gx(gx.bits), d_gout(gout.bits);
  auto d_expanded = poisoned<bf16>(tokens * n * C);
  auto d_ge = poisoned<bf16>(tokens * C);
  auto d_contracted = poisoned<bf16>(tokens * C);
  auto d_gxs = poisoned<bf16>(tokens * n * C);
  cuda::stream_expand_forward(d_e.data(), tokens, n, C, d_expanded.data());
  cuda::stream_expand_backward(d_gx.data(), tokens, n, C, d_ge.data());
  cuda::stream_contract_forward(d_x.data(), tokens, n, C, d_contracted.data());
  cuda::stream_contract_backward(d_gout.data(), tokens, n, C, d_gxs.data());
  MHC_CUDA_CHECK(cudaDeviceSynchronize());
  std::vector<double> expanded(tokens * n * C), ge(tokens * C), contracted(tokens * C), gxs(tokens * n * C);
  cpu::stream_expand_forward(e.values.data(), tokens, n, C, expanded.data());
  cpu::stream_expand_backward(gx.values.data(), tokens, n, C, ge.data());
  cpu::stream_contract_forward(x.values.data(), tokens, n, C, contracted.data());
  cpu::stream_contract_backward(gout.values.data(), tokens, n, C, gxs.data());
  EXPECT_EQ(relative_error(widen(d_expanded.download()), expanded), 0.0);  // a copy is exact
  EXPECT_LT(relative_error(widen(d_ge.download()), ge), kBf16Tolerance);
  EXPECT_LT(relative_error(widen(d_contracted.download()), contracted), kBf16Tolerance);
  EXPECT_LT(relative_error(widen(d_gxs.download()), gxs), kBf16Tolerance);
}

TEST_P(CudaStreamMix, DeterministicBits) {
  const auto [tokens, n, C] = GetParam();
  const Bf16Data x = random_bf16(tokens * n * C, 21), gout = random_bf16(tokens * n * C, 22), y = random_bf16(tokens * C, 23);
  const std::vector<float> h_res = random_float(tokens * n * n, 24), h_post = random_float(tokens * n, 25);
  DeviceBuffer<bf16> d_x(x.bits), d_gout(gout.bits), d_y(y.bits);
  DeviceBuffer<float> d_res(h_res), d_post(h_post);
  std::vector<float> first_res, first_bias;
  for (int run = 0; run < 2; ++run) {
    auto d_dx = poisoned<bf16>(tokens * n * C);
    auto d_dy = poisoned<bf16>(tokens * C);
    auto d_dres = poisoned<float>(tokens * n * n);
    auto d_dpost = poisoned<float>(tokens * n);
    DeviceBuffer<float> d_dyb(std::vector<float>(C, 0.0f));
    auto d_columns = poisoned<float>(cuda::column_sums_workspace_floats(tokens, C));
    cuda::h_post_bda_backward(d_gout.data(), d_x.data(), d_res.data(), d_post.data(), d_y.data(), nullptr, tokens, n,
                              C, {}, d_dx.data(), d_dres.data(), d_dpost.data(), d_dy.data());
    cuda::accumulate_column_sums(d_dy.data(), tokens, C, d_dyb.data(), d_columns.data());
    const auto dres = d_dres.download(), dyb = d_dyb.download();
    if (run == 0) {
      first_res = dres;
      first_bias = dyb;
    } else {
      EXPECT_EQ(std::memcmp(first_res.data(), dres.data(), dres.size() * sizeof(float)), 0);
      EXPECT_EQ(std::memcmp(first_bias.data(), dyb.data(), dyb.size() * sizeof(float)), 0);
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Shapes, CudaStreamMix,
                         ::testing::Values(Shape{7, 1, 5}, Shape{33, 2, 13}, Shape{64, 4, 768}, Shape{5, 6, 100},
                                           Shape{3, 8, 257}, Shape{300, 4, 1023}, Shape{256, 4, 7168}, Shape{37, 6, 96},
                                           Shape{50, 1, 1024}, Shape{4000, 4, 64}),
                         [](const auto& param_info) {
                           return "tokens" + std::to_string(param_info.param.tokens) + "_n" +
                                  std::to_string(param_info.param.n) + "_C" + std::to_string(param_info.param.C);
                         });

TEST(CudaStreamMix, UnsupportedStreamCountIsAnError) {
  EXPECT_FALSE(cuda::stream_count_supported(3));
  EXPECT_THROW(cuda::aggregate_forward(nullptr, nullptr, 1, 3, 8, nullptr), Error);
}

}  // namespace
}  // namespace mhc
