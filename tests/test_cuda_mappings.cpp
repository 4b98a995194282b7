// CUDA mHC mappings (forward and backward) against the CPU double reference, on fresh
// random inputs with every output poisoned first. Skipped without a GPU.
#include <gtest/gtest.h>

#include "cuda_test_util.h"
#include "ops/cpu/mhc_mappings.h"
#include "ops/cuda/mhc_mappings.h"
#include "ops/cuda/norm.h"

namespace mhc {
namespace {

using namespace mhc::test;  // the CUDA test helpers

struct Case {
  int64_t tokens;
  int n;
  int64_t C;
  int iterations;             // 0: HC (unconstrained H_res)
  bool sumsq_given = false;   // ||x||^2 passed in (as its producer would), else computed
};

class CudaMappings : public ::testing::TestWithParam<Case> {
 protected:
  void SetUp() override {
    if (!cuda::device_available()) GTEST_SKIP() << "no CUDA device";
  }
};

TEST_P(CudaMappings, ForwardAndBackwardMatchTheCpuReference) {
  const Case c = GetParam();
  const int64_t K = c.n * c.C, m = cpu::mhc_mapping_width(c.n), T = c.tokens;
  const Bf16Data x = random_bf16(T * K, 1), gx0 = random_bf16(T * K, 2);
  const std::vector<float> weight = random_float(m * K, 3, -0.05, 0.05), alpha = random_float(3, 4, 0.3, 1.2),
                           bias = random_float(m, 5), g_pre = random_float(T * c.n, 6),
                           g_post = random_float(T * c.n, 7), g_res = random_float(T * c.n * c.n, 8),
                           gw0 = random_float(m * K, 9), galpha0 = random_float(3, 10), gbias0 = random_float(m, 11);
  const cuda::MappingsArgs args{T, c.n, c.C, c.iterations};
  DeviceBuffer<bf16> d_x(x.bits), d_gx(gx0.bits);
  DeviceBuffer<float> d_w(weight), d_alpha(alpha), d_bias(bias), d_gpre(g_pre), d_gpost(g_post), d_gres(g_res),
      d_gw(gw0), d_galpha(galpha0), d_gbias(gbias0);
  auto d_proj = poisoned<float>(T * m);
  auto d_r = poisoned<float>(T);
  auto d_pre = poisoned<float>(T * c.n);
  auto d_post = poisoned<float>(T * c.n);
  auto d_res = poisoned<float>(T * c.n * c.n);
  auto d_work = poisoned<float>(cuda::mappings_backward_workspace_floats(args));
  auto d_forward_work = poisoned<float>(cuda::mappings_forward_workspace_floats(args));
  // The given ||x||^2 is computed here in double from the bf16 values.
  std::vector<float> sumsq(T);
  for (int64_t t = 0; t < T; ++t) {
    double s = 0;
    for (int64_t k = 0; k < K; ++k) s += x.values[t * K + k] * x.values[t * K + k];
    sumsq[t] = static_cast<float>(s);
  }
  DeviceBuffer<float> d_sumsq(sumsq);
  cuda::mhc_mappings_forward(args, d_x.data(), c.sumsq_given ? d_sumsq.data() : nullptr, d_w.data(), d_alpha.data(), d_bias.data(), d_proj.data(), d_r.data(),
                             d_pre.data(), d_post.data(), d_res.data(), d_forward_work.data());
  cuda::mhc_mappings_backward(args, d_x.data(), d_w.data(), d_alpha.data(), d_bias.data(), d_proj.data(), d_r.data(),
                              d_pre.data(), d_post.data(), d_gpre.data(), d_gpost.data(), d_gres.data(), d_gx.data(),
                              d_gw.data(), d_galpha.data(), d_gbias.data(), d_work.data());
  MHC_CUDA_CHECK(cudaDeviceSynchronize());

  const cpu::MappingShape shape{T, c.n, c.C,
                                c.iterations > 0 ? cpu::ResMapping::Sinkhorn : cpu::ResMapping::Unconstrained,
                                c.iterations};
  const auto w = widen(weight), a = widen(alpha), b = widen(bias);
  std::vector<double> proj(T * m), r(T), pre(T * c.n), post(T * c.n), res(T * c.n * c.n);
  cpu::mhc_mappings_forward(shape, x.values.data(), w.data(), a.data(), b.data(), proj.data(), r.data(), pre.data(),
                            post.data(), res.data());
  std::vector<double> gx = gx0.values, gw = widen(gw0), galpha = widen(galpha0), gbias = widen(gbias0),
                      scratch(cpu::mhc_mappings_scratch_size(T, c.n));
  const auto gp = widen(g_pre), gq = widen(g_post), gr = widen(g_res);
  cpu::mhc_mappings_backward(shape, x.values.data(), w.data(), a.data(), b.data(), proj.data(), r.data(), pre.data(),
                             post.data(), gp.data(), gq.data(), gr.data(), gx.data(), gw.data(), galpha.data(),
                             gbias.data(), scratch.data());
  EXPECT_LT(relative_error(widen(d_proj.download()), proj), kFp32Tolerance);
  EXPECT_LT(relative_error(widen(d_r.download()), r), kFp32Tolerance);
  EXPECT_LT(relative_error(widen(d_pre.download()), pre), kFp32Tolerance);
  EXPECT_LT(relative_error(widen(d_post.download()), post), kFp32Tolerance);
  EXPECT_LT(relative_error(widen(d_res.download()), res), kFp32Tolerance);
  EXPECT_LT(relative_error(widen(d_gx.download()), gx), kBf16Tolerance);
  EXPECT_LT(relative_error(widen(d_gw.download()), gw), kFp32Tolerance);
  EXPECT_LT(relative_error(widen(d_galpha.download()), galpha), kFp32Tolerance);
  EXPECT_LT(relative_error(widen(d_gbias.download()), gbias), kFp32Tolerance);

  // With the aggregate made in the finish's pass: the same bits as aggregate_forward from
  // the stored H_pre, and the mappings' outputs the same bits as without it.
  {
    const auto proj_alone = d_proj.download(), r_alone = d_r.download(), pre_alone = d_pre.download(),
               post_alone = d_post.download(), res_alone = d_res.download();
    auto d_agg = poisoned<bf16>(T * c.C), d_agg_alone = poisoned<bf16>(T * c.C);
    for (auto* d : {&d_proj, &d_r, &d_pre, &d_post, &d_res}) d->fill_bytes(0xFF);
    cuda::mhc_mappings_forward(args, d_x.data(), c.sumsq_given ? d_sumsq.data() : nullptr, d_w.data(), d_alpha.data(),
                               d_bias.data(), d_proj.data(), d_r.data(), d_pre.data(), d_post.data(), d_res.data(),
                               d_forward_work.data(), nullptr, nullptr, d_agg.data());
    cuda::aggregate_forward(d_x.data(), d_pre.data(), T, c.n, c.C, d_agg_alone.data());
    EXPECT_EQ(d_agg.download(), d_agg_alone.download());
    EXPECT_EQ(d_proj.download(), proj_alone);
    EXPECT_EQ(d_r.download(), r_alone);
    EXPECT_EQ(d_pre.download(), pre_alone);
    EXPECT_EQ(d_post.download(), post_alone);
    EXPECT_EQ(d_res.download(), res_alone);
    std::vector<double> agg(T * c.C, 0.0);
    for (int64_t t = 0; t < T; ++t)
      for (int j = 0; j < c.n; ++j)
        for (int64_t ch = 0; ch < c.C; ++ch) agg[t * c.C + ch] += pre[t * c.n + j] * x.values[t * K + j * c.C + ch];
    EXPECT_LT(relative_error(widen(d_agg.download()), agg), kBf16Tolerance);

    // With the sublayer's pre-norm in the same pass (LayerNorm and RMSNorm): the bits of
    // norm_forward on the aggregate as stored.
    if (cuda::aggregate_norm_supported(c.C)) {
      const std::vector<float> norm_w = random_float(c.C, 16, 0.5, 1.5), norm_b = random_float(c.C, 17);
      DeviceBuffer<float> d_norm_w(norm_w), d_norm_b(norm_b);
      for (const bool rms : {false, true}) {
        auto d_out = poisoned<bf16>(T * c.C), d_out_alone = poisoned<bf16>(T * c.C);
        auto d_mean = poisoned<float>(T), d_rstd = poisoned<float>(T), d_mean_alone = poisoned<float>(T),
             d_rstd_alone = poisoned<float>(T);
        d_agg.fill_bytes(0xFF);
        const cuda::AggregateNorm norm{d_norm_w.data(), d_norm_b.data(), 1e-5f, rms,
                                       d_out.data(), d_mean.data(), d_rstd.data()};
        cuda::mhc_mappings_forward(args, d_x.data(), c.sumsq_given ? d_sumsq.data() : nullptr, d_w.data(),
                                   d_alpha.data(), d_bias.data(), d_proj.data(), d_r.data(), d_pre.data(),
                                   d_post.data(), d_res.data(), d_forward_work.data(), nullptr, nullptr, d_agg.data(),
                                   &norm);
        cuda::norm_forward(d_agg_alone.data(), d_norm_w.data(), d_norm_b.data(), T, c.C, 1e-5f, rms,
                           d_out_alone.data(), d_mean_alone.data(), d_rstd_alone.data());
        EXPECT_EQ(d_agg.download(), d_agg_alone.download()) << "rms " << rms;
        EXPECT_EQ(d_out.download(), d_out_alone.download()) << "rms " << rms;
        EXPECT_EQ(d_rstd.download(), d_rstd_alone.download()) << "rms " << rms;
        if (!rms) {
          EXPECT_EQ(d_mean.download(), d_mean_alone.download());
        }
        // The same pass without storing the aggregate, and the aggregate of the kept H_pre
        // with its norm in one pass (recompute's restore): the same bits.
        for (const bool restore : {false, true}) {
          auto d_out2 = poisoned<bf16>(T * c.C);
          auto d_mean2 = poisoned<float>(T), d_rstd2 = poisoned<float>(T);
          const cuda::AggregateNorm norm2{d_norm_w.data(), d_norm_b.data(), 1e-5f,         rms,
                                          d_out2.data(),   d_mean2.data(),  d_rstd2.data()};
          if (restore)
            cuda::aggregate_norm_forward(d_x.data(), d_pre.data(), T, c.n, c.C, norm2);
          else
            cuda::mhc_mappings_forward(args, d_x.data(), c.sumsq_given ? d_sumsq.data() : nullptr, d_w.data(),
                                       d_alpha.data(), d_bias.data(), d_proj.data(), d_r.data(), d_pre.data(),
                                       d_post.data(), d_res.data(), d_forward_work.data(), nullptr, nullptr, nullptr,
                                       &norm2);
          EXPECT_EQ(d_out2.download(), d_out_alone.download()) << "rms " << rms << " restore " << restore;
          EXPECT_EQ(d_rstd2.download(), d_rstd_alone.download()) << "rms " << rms << " restore " << restore;
          if (!rms) {
            EXPECT_EQ(d_mean2.download(), d_mean_alone.download()) << "restore " << restore;
          }
        }
      }
    } else {
      const cuda::AggregateNorm unsupported{};
      EXPECT_THROW(cuda::aggregate_norm_forward(d_x.data(), d_pre.data(), T, c.n, c.C, unsupported), Error);
      const cuda::AggregateNorm norm{};
      EXPECT_THROW(cuda::mhc_mappings_forward(args, d_x.data(), nullptr, d_w.data(), d_alpha.data(), d_bias.data(),
                                              d_proj.data(), d_r.data(), d_pre.data(), d_post.data(), d_res.data(),
                                              d_forward_work.data(), nullptr, nullptr, d_agg.data(), &norm),
                   Error);
    }
  }

  // Deterministic: a second forward and backward from the same state give the same bits, also
  // when they take W's split from split_mappings_weights (here W between two other weights
  // split in the same launch) instead of splitting W themselves.
  const auto gw_first = d_gw.download();
  const auto gx_first = d_gx.download();
  const auto proj_first = d_proj.download();
  DeviceBuffer<float> d_w_before(random_float(m * K, 14)), d_w_after(random_float(m * K, 15));
  const size_t split_elements = cuda::mappings_weight_split_elements(args);
  auto d_split_before = poisoned<bf16>(split_elements);
  auto d_split = poisoned<bf16>(split_elements);
  auto d_split_after = poisoned<bf16>(split_elements);
  const float* weights[] = {d_w_before.data(), d_w.data(), d_w_after.data()};
  bf16* splits[] = {d_split_before.data(), d_split.data(), d_split_after.data()};
  cuda::split_mappings_weights(args, weights, splits, 3);
  cuda::mhc_mappings_forward(args, d_x.data(), c.sumsq_given ? d_sumsq.data() : nullptr, d_w.data(), d_alpha.data(),
                             d_bias.data(), d_proj.data(), d_r.data(), d_pre.data(), d_post.data(), d_res.data(),
                             d_forward_work.data(), nullptr, d_split.data());
  const auto proj_second = d_proj.download();
  EXPECT_EQ(std::memcmp(proj_first.data(), proj_second.data(), proj_first.size() * sizeof(float)), 0);
  d_gw.upload(gw0);
  d_gx.upload(gx0.bits);
  cuda::mhc_mappings_backward(args, d_x.data(), d_w.data(), d_alpha.data(), d_bias.data(), d_proj.data(), d_r.data(),
                              d_pre.data(), d_post.data(), d_gpre.data(), d_gpost.data(), d_gres.data(), d_gx.data(),
                              d_gw.data(), d_galpha.data(), d_gbias.data(), d_work.data(), nullptr, nullptr, nullptr,
                              d_split.data());
  const auto gw_second = d_gw.download();
  const auto gx_second = d_gx.download();
  EXPECT_EQ(std::memcmp(gw_first.data(), gw_second.data(), gw_first.size() * sizeof(float)), 0);
  EXPECT_EQ(std::memcmp(gx_first.data(), gx_second.data(), gx_first.size() * sizeof(bf16)), 0);

  // With the stream mixing's and the aggregate's terms (the model's path): dx is overwritten
  // by H_res^T dout + H_pre dagg + the mappings' terms.
  const Bf16Data gout = random_bf16(T * K, 12), gagg = random_bf16(T * c.C, 13);
  DeviceBuffer<bf16> d_gout(gout.bits), d_gagg(gagg.bits);
  auto d_gx_mix = poisoned<bf16>(T * K);
  const cuda::StreamMixGrad mix{d_gout.data(), d_res.data(), d_gagg.data()};
  cuda::mhc_mappings_backward(args, d_x.data(), d_w.data(), d_alpha.data(), d_bias.data(), d_proj.data(), d_r.data(),
                              d_pre.data(), d_post.data(), d_gpre.data(), d_gpost.data(), d_gres.data(),
                              d_gx_mix.data(), d_gw.data(), d_galpha.data(), d_gbias.data(), d_work.data(), &mix);
  std::vector<double> gx_mix(T * K);
  for (int64_t t = 0; t < T; ++t)
    for (int j = 0; j < c.n; ++j)
      for (int64_t ch = 0; ch < c.C; ++ch) {
        const int64_t k = t * K + j * c.C + ch;
        double v = pre[t * c.n + j] * gagg.values[t * c.C + ch] + (gx[k] - gx0.values[k]);
        for (int i = 0; i < c.n; ++i) v += res[(t * c.n + i) * c.n + j] * gout.values[t * K + i * c.C + ch];
        gx_mix[k] = v;
      }
  EXPECT_LT(relative_error(widen(d_gx_mix.download()), gx_mix), kBf16Tolerance);

  // And the dy of the hyper connection below (whose dout this dx is): sum_s H_post[s] dx_s.
  if (!cuda::next_grad_y_supported(args)) return;
  const std::vector<float> post_below = random_float(T * c.n, 14, 0.0, 2.0);
  DeviceBuffer<float> d_post_below(post_below);
  auto d_gy_below = poisoned<bf16>(T * c.C);
  const std::vector<float> gyb0 = random_float(c.C, 15);
  DeviceBuffer<float> d_gyb_below(gyb0);
  const cuda::NextGradY next{d_post_below.data(), d_gy_below.data(), d_gyb_below.data()};
  cuda::mhc_mappings_backward(args, d_x.data(), d_w.data(), d_alpha.data(), d_bias.data(), d_proj.data(), d_r.data(),
                              d_pre.data(), d_post.data(), d_gpre.data(), d_gpost.data(), d_gres.data(),
                              d_gx_mix.data(), d_gw.data(), d_galpha.data(), d_gbias.data(), d_work.data(), &mix,
                              &next);
  std::vector<double> gy_below(T * c.C, 0.0);
  for (int64_t t = 0; t < T; ++t)
    for (int s = 0; s < c.n; ++s)
      for (int64_t ch = 0; ch < c.C; ++ch) gy_below[t * c.C + ch] += post_below[t * c.n + s] * gx_mix[t * K + s * c.C + ch];
  EXPECT_LT(relative_error(widen(d_gx_mix.download()), gx_mix), kBf16Tolerance);
  EXPECT_LT(relative_error(widen(d_gy_below.download()), gy_below), kBf16Tolerance);
  // Its bias gradient: the column sums of dy as stored, added to what was there.
  const std::vector<double> gy_stored = widen(d_gy_below.download());
  std::vector<double> gyb = widen(gyb0);
  for (int64_t t = 0; t < T; ++t)
    for (int64_t ch = 0; ch < c.C; ++ch) gyb[ch] += gy_stored[t * c.C + ch];
  EXPECT_LT(relative_error(widen(d_gyb_below.download()), gyb), kFp32Tolerance);
}

INSTANTIATE_TEST_SUITE_P(Shapes, CudaMappings,
                         ::testing::Values(Case{7, 1, 5, 1}, Case{33, 2, 13, 3}, Case{64, 4, 768, 20},
                                           Case{5, 6, 100, 20}, Case{3, 8, 257, 5}, Case{300, 4, 1023, 20},
                                           Case{40, 4, 64, 0}, Case{256, 4, 7168, 20},
                                           // dx/dW blocks in several waves (on an H100): runs of
                                           // consecutive groups, the last one short
                                           Case{1000, 4, 7168, 20},
                                           // K % 8 == 0 (16-byte aligned rows: cp.async copies), every n
                                           Case{37, 1, 32, 2}, Case{70, 2, 48, 20}, Case{30, 6, 40, 7},
                                           Case{50, 8, 64, 20}, Case{130, 8, 96, 0},
                                           // ||x||^2 given: the projection by cuBLASLt
                                           Case{64, 4, 768, 20, true}, Case{33, 2, 13, 3, true}, Case{7, 1, 5, 1, true},
                                           Case{50, 8, 64, 20, true}, Case{256, 4, 7168, 20, true},
                                           // the most Sinkhorn iterations: grad_h's divisors take over 48 KB
                                           // of shared memory a block at n = 1 past 24, n = 2 and 4 past 48
                                           Case{300, 1, 8, 64}, Case{20, 8, 24, 64}, Case{300, 4, 64, 64},
                                           Case{70, 2, 48, 49}),
                         [](const auto& param_info) {
                           const Case& c = param_info.param;
                           return "tokens" + std::to_string(c.tokens) + "_n" + std::to_string(c.n) + "_C" +
                                  std::to_string(c.C) + "_T" + std::to_string(c.iterations) +
                                  (c.sumsq_given ? "_sumsq" : "");
                         });

}  // namespace
}  // namespace mhc
