// CUDA norms, activations, linear layers and attention against the CPU double reference,
// on fresh random inputs with every output poisoned first (accumulated outputs start from
// random values); products on concurrent streams against the same products alone.
// Skipped without a GPU.
#include <gtest/gtest.h>

#include <cstring>

#include "core/rng.h"
#include "cuda_test_util.h"
#include "ops/cpu/activation.h"
#include "ops/cpu/layernorm.h"
#include "ops/cpu/attention.h"
#include "ops/cpu/linear.h"
#include "ops/cuda/activation.h"
#include "ops/cuda/attention.h"
#include "ops/cuda/gemm.h"
#include "ops/cuda/linear.h"
#include "ops/cuda/norm.h"

namespace mhc {
namespace {

using namespace mhc::test;

struct RowsShape {
  int64_t rows, C;
};

class CudaLayers : public ::testing::TestWithParam<RowsShape> {
 protected:
  void SetUp() override {
    if (!cuda::device_available()) GTEST_SKIP() << "no CUDA device";
  }
};

TEST_P(CudaLayers, NormForwardAndBackward) {
  const auto [rows, C] = GetParam();
  for (bool rms : {false, true}) {
    const Bf16Data x = random_bf16(rows * C, 1), g = random_bf16(rows * C, 2), dx0 = random_bf16(rows * C, 3);
    const std::vector<float> w = random_float(C, 4, 0.5, 1.5), b = random_float(C, 5), dw0 = random_float(C, 6),
                             db0 = random_float(C, 7);
    DeviceBuffer<bf16> d_x(x.bits), d_g(g.bits), d_dx(dx0.bits);
    DeviceBuffer<float> d_w(w), d_b(b), d_dw(dw0), d_db(db0);
    auto d_out = poisoned<bf16>(rows * C);
    auto d_mean = poisoned<float>(rows);
    auto d_rstd = poisoned<float>(rows);
    auto d_work = poisoned<float>(cuda::norm_backward_workspace_floats(rows, C));
    cuda::norm_forward(d_x.data(), d_w.data(), d_b.data(), rows, C, 1e-5f, rms, d_out.data(), d_mean.data(),
                       d_rstd.data());
    cuda::norm_backward(d_g.data(), d_x.data(), d_w.data(), d_mean.data(), d_rstd.data(), rows, C, rms, d_dx.data(),
                        d_dw.data(), d_db.data(), d_work.data());
    MHC_CUDA_CHECK(cudaDeviceSynchronize());

    const auto wd = widen(w), bd = widen(b);
    std::vector<double> out(rows * C), mean(rows), rstd(rows), dx = dx0.values, dw = widen(dw0), db = widen(db0);
    cpu::norm_forward(x.values.data(), wd.data(), rms ? nullptr : bd.data(), rows, C, 1e-5, rms, out.data(),
                      mean.data(), rstd.data());
    cpu::norm_backward(g.values.data(), x.values.data(), wd.data(), mean.data(), rstd.data(), rows, C, rms, dx.data(),
                       dw.data(), rms ? nullptr : db.data());
    const std::string label = rms ? "rms" : "layernorm";
    EXPECT_LT(relative_error(widen(d_out.download()), out), kBf16Tolerance) << label;
    EXPECT_LT(relative_error(widen(d_rstd.download()), rstd), kFp32Tolerance) << label;
    {  // overwriting dx gives the bits of accumulating onto zeros; the poisoned dx is not read
      auto d_dx_only = poisoned<bf16>(rows * C);
      DeviceBuffer<bf16> d_dx_zero(std::vector<bf16>(rows * C, __float2bfloat16(0.0f)));
      DeviceBuffer<float> d_dw1(dw0), d_db1(db0);
      cuda::norm_backward(d_g.data(), d_x.data(), d_w.data(), d_mean.data(), d_rstd.data(), rows, C, rms,
                          d_dx_only.data(), d_dw1.data(), d_db1.data(), d_work.data(), /*accumulate=*/false);
      cuda::norm_backward(d_g.data(), d_x.data(), d_w.data(), d_mean.data(), d_rstd.data(), rows, C, rms,
                          d_dx_zero.data(), d_dw1.data(), d_db1.data(), d_work.data());
      const auto only = d_dx_only.download(), zero = d_dx_zero.download();
      EXPECT_EQ(std::memcmp(only.data(), zero.data(), only.size() * sizeof(bf16)), 0) << label << " overwrite";
    }
    {  // dx's column sums as read (a plain residual's output bias gradient): the same dx bits
      const std::vector<float> sums0 = random_float(C, 8);
      DeviceBuffer<bf16> d_dx_summed(dx0.bits);
      DeviceBuffer<float> d_dw1(dw0), d_db1(db0), d_sums(sums0);
      cuda::norm_backward(d_g.data(), d_x.data(), d_w.data(), d_mean.data(), d_rstd.data(), rows, C, rms,
                          d_dx_summed.data(), d_dw1.data(), d_db1.data(), d_work.data(), true, nullptr, d_sums.data());
      std::vector<double> sums = widen(sums0);
      for (int64_t r = 0; r < rows; ++r)
        for (int64_t c = 0; c < C; ++c) sums[c] += dx0.values[r * C + c];
      EXPECT_LT(relative_error(widen(d_sums.download()), sums), kFp32Tolerance) << label << " dx sums";
      EXPECT_EQ(d_dx_summed.download(), d_dx.download()) << label << " dx with its sums";
      EXPECT_LT(relative_error(widen(d_dw1.download()), dw), kFp32Tolerance) << label << " dw with dx's sums";
    }
    if (!rms) {
      EXPECT_LT(relative_error(widen(d_mean.download()), mean), kFp32Tolerance) << label;
    }
    EXPECT_LT(relative_error(widen(d_dx.download()), dx), kBf16Tolerance) << label;
    EXPECT_LT(relative_error(widen(d_dw.download()), dw), kFp32Tolerance) << label;
    EXPECT_LT(relative_error(widen(d_db.download()), db), kFp32Tolerance) << label;  // untouched for rms
  }
}

TEST_P(CudaLayers, ActivationsForwardAndBackward) {
  const auto [rows, F] = GetParam();
  for (cpu::Activation a : {cpu::Activation::Gelu, cpu::Activation::SwiGlu}) {
    const int64_t width = cpu::activation_input_width(a, F);
    const Bf16Data x = random_bf16(rows * width, 11), g = random_bf16(rows * F, 12);
    DeviceBuffer<bf16> d_x(x.bits), d_g(g.bits);
    auto d_out = poisoned<bf16>(rows * F);
    auto d_dx = poisoned<bf16>(rows * width);
    cuda::activation_forward(a, d_x.data(), rows, F, d_out.data());
    cuda::activation_backward(a, d_g.data(), d_x.data(), rows, F, d_dx.data());
    MHC_CUDA_CHECK(cudaDeviceSynchronize());
    std::vector<double> out(rows * F), dx(rows * width);
    cpu::activation_forward(a, x.values.data(), rows, F, out.data());
    cpu::activation_backward(a, g.values.data(), x.values.data(), rows, F, dx.data());
    const std::string label = a == cpu::Activation::Gelu ? "gelu" : "swiglu";
    EXPECT_LT(relative_error(widen(d_out.download()), out), kBf16Tolerance) << label;
    EXPECT_LT(relative_error(widen(d_dx.download()), dx), kBf16Tolerance) << label;
    // With the preceding linear's bias gradient fused in: the same dx bits, and the bias
    // gradient accumulates dx's column sums (the CPU reference's dx summed in double).
    const std::vector<float> b0 = random_float(width, 13);
    DeviceBuffer<float> d_db(b0);
    auto d_dx_fused = poisoned<bf16>(rows * width);
    auto d_work = poisoned<float>(cuda::activation_backward_workspace_floats(a, rows, F));
    cuda::activation_backward(a, d_g.data(), d_x.data(), rows, F, d_dx_fused.data(), d_db.data(), d_work.data());
    const auto plain = d_dx.download(), fused = d_dx_fused.download();
    EXPECT_EQ(std::memcmp(plain.data(), fused.data(), plain.size() * sizeof(bf16)), 0) << label << " fused dx";
    std::vector<double> db = widen(b0);
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t c = 0; c < width; ++c) db[c] += dx[r * width + c];
    EXPECT_LT(relative_error(widen(d_db.download()), db), kBf16Tolerance) << label << " bias gradient";
  }
}

// y = x W^T + b, and with a residual added in the product's epilogue (rows x C in, C + 3
// out: an unaligned width too).
TEST_P(CudaLayers, LinearForwardWithAndWithoutAResidual) {
  const auto [rows, in] = GetParam();
  const int64_t out = in + 3;
  const Bf16Data x = random_bf16(rows * in, 21), w = random_bf16(out * in, 22), b = random_bf16(out, 23),
                 residual = random_bf16(rows * out, 24);
  DeviceBuffer<bf16> d_x(x.bits), d_w(w.bits), d_b(b.bits), d_residual(residual.bits);
  auto d_y = poisoned<bf16>(rows * out);
  auto d_sum = poisoned<bf16>(rows * out);
  cuda::linear_forward(d_x.data(), d_w.data(), d_b.data(), rows, in, out, d_y.data());
  cuda::linear_forward(d_x.data(), d_w.data(), d_b.data(), rows, in, out, d_sum.data(), nullptr, d_residual.data());
  MHC_CUDA_CHECK(cudaDeviceSynchronize());
  std::vector<double> y(rows * out);
  cpu::linear_forward(x.values.data(), w.values.data(), b.values.data(), rows, in, out, y.data());
  EXPECT_LT(relative_error(widen(d_y.download()), y), kBf16Tolerance);
  for (size_t i = 0; i < y.size(); ++i) y[i] += residual.values[i];
  EXPECT_LT(relative_error(widen(d_sum.download()), y), kBf16Tolerance) << "with the residual";
}

// dx = dy W, and dW, db either added to (random start values) or, with accumulate false,
// written over a poisoned start (rows x in -> in + 3 outputs: an unaligned width too).
TEST_P(CudaLayers, LinearBackwardAccumulatesOrOverwrites) {
  const auto [rows, in] = GetParam();
  const int64_t out = in + 3;
  const Bf16Data x = random_bf16(rows * in, 31), w = random_bf16(out * in, 32), g = random_bf16(rows * out, 33);
  const std::vector<float> dw0 = random_float(out * in, 34), db0 = random_float(out, 35);
  DeviceBuffer<bf16> d_x(x.bits), d_w(w.bits), d_g(g.bits);
  auto d_work = poisoned<float>(cuda::linear_backward_workspace_floats(rows, out));
  std::vector<double> dx(rows * in, 0.0), dw(out * in, 0.0), db(out, 0.0);
  cpu::linear_backward(g.values.data(), x.values.data(), w.values.data(), rows, in, out, dx.data(), dw.data(),
                       db.data());
  for (bool accumulate : {true, false}) {
    auto d_dx = poisoned<bf16>(rows * in);
    DeviceBuffer<float> d_dw = accumulate ? DeviceBuffer<float>(dw0) : poisoned<float>(out * in);
    DeviceBuffer<float> d_db = accumulate ? DeviceBuffer<float>(db0) : poisoned<float>(out);
    cuda::linear_backward(d_g.data(), d_x.data(), d_w.data(), rows, in, out, d_dx.data(), d_dw.data(), d_db.data(),
                          d_work.data(), nullptr, accumulate);
    MHC_CUDA_CHECK(cudaDeviceSynchronize());
    std::vector<double> want_dw = dw, want_db = db;
    if (accumulate) {
      for (size_t i = 0; i < want_dw.size(); ++i) want_dw[i] += dw0[i];
      for (size_t i = 0; i < want_db.size(); ++i) want_db[i] += db0[i];
    }
    const std::string label = accumulate ? "accumulate" : "overwrite";
    EXPECT_LT(relative_error(widen(d_dx.download()), dx), kBf16Tolerance) << label;
    EXPECT_LT(relative_error(widen(d_dw.download()), want_dw), kFp32Tolerance) << label;
    EXPECT_LT(relative_error(widen(d_db.download()), want_db), kFp32Tolerance) << label;
  }
}

// Products on two streams at once, each stream with a cuBLASLt workspace of its own (as a
// model's main and side streams, or two models, have): each result has the bits of the
// same product run alone. The shape, a weight gradient's (few outputs, many rows summed),
// is one cuBLASLt splits over k, keeping partial sums in the workspace; sharing one
// workspace, such products running at once overwrite each other's.
TEST(CudaGemm, StreamsWithWorkspacesOfTheirOwnRunProductsAtOnce) {
  if (!cuda::device_available()) GTEST_SKIP() << "no CUDA device";
  constexpr int64_t m = 256, n = 256, k = 32768;
  constexpr int kStreams = 2, kProducts = 6;
  auto product = [&](const DeviceBuffer<bf16>& a, const DeviceBuffer<bf16>& b, DeviceBuffer<float>& d) {
    cuda::Gemm g;  // D [m, n] = A [m, k] B^T, column-major (a dW^T of rows k)
    g.trans_b = true;
    g.m = m, g.n = n, g.k = k;
    g.a = a.data(), g.lda = m;
    g.b = b.data(), g.ldb = n;
    g.d = d.data(), g.ldd = m;
    return g;
  };
  std::vector<DeviceBuffer<bf16>> a, b;
  std::vector<DeviceBuffer<float>> alone, at_once;
  for (int i = 0; i < kStreams * kProducts; ++i) {
    a.emplace_back(random_bf16(m * k, 700 + i).bits);
    b.emplace_back(random_bf16(n * k, 800 + i).bits);
    alone.push_back(poisoned<float>(m * n));
    at_once.push_back(poisoned<float>(m * n));
    cuda::gemm(product(a[i], b[i], alone[i]));
    MHC_CUDA_CHECK(cudaDeviceSynchronize());
  }
  {
    cuda::Stream s0, s1;
    cuda::StreamGemmWorkspace w0(s0.get()), w1(s1.get());
    for (int p = 0; p < kProducts; ++p)
      for (int s = 0; s < kStreams; ++s) {
        const int i = s * kProducts + p;
        cuda::gemm(product(a[i], b[i], at_once[i]), (s == 0 ? s0 : s1).get());
      }
    MHC_CUDA_CHECK(cudaDeviceSynchronize());
  }
  for (int i = 0; i < kStreams * kProducts; ++i)
    EXPECT_EQ(at_once[i].download(), alone[i].download()) << "stream " << i / kProducts << " product " << i % kProducts;
}

TEST(CudaAttention, ForwardAndBackwardMatchTheCpuReference) {
  if (!cuda::device_available()) GTEST_SKIP() << "no CUDA device";
  // head dims 16, 32, 64; T below, at and above the 64-row tiles; on Hopper both the
  // warpgroup kernels (head dim 64: T 40, 150, 300) and the mma.sync ones
  for (const bool wgmma : {true, false})
    for (const cpu::AttentionShape& shape :
         {cpu::AttentionShape{2, 5, 2, 32}, cpu::AttentionShape{1, 64, 3, 48}, cpu::AttentionShape{2, 150, 4, 256},
          cpu::AttentionShape{1, 97, 2, 64}, cpu::AttentionShape{1, 300, 2, 128}, cpu::AttentionShape{2, 40, 2, 128}}) {
      for (float p : {0.0f, 0.2f}) {
        cuda::set_attention_wgmma(wgmma);
        const cpu::DropoutSpec dropout{p, rng_key(7, static_cast<uint64_t>(shape.seq))};
        const int64_t rows = shape.batch * shape.seq, C = shape.C,
                      P = shape.batch * shape.heads * shape.seq * shape.seq;
        const Bf16Data qkv = random_bf16(rows * 3 * C, 41), gout = random_bf16(rows * C, 42);
        DeviceBuffer<bf16> d_qkv(qkv.bits), d_gout(gout.bits);
        auto d_lse = poisoned<float>(shape.batch * shape.heads * shape.seq);
        auto d_out = poisoned<bf16>(rows * C);
        auto d_dqkv = poisoned<bf16>(rows * 3 * C);
        auto d_work = poisoned<unsigned char>(cuda::attention_workspace_bytes(shape));
        // with dropout, a second run with the mask made as bits first (the first run makes it
        // inside the kernels)
        auto d_mask = poisoned<uint32_t>(cuda::attention_keep_mask_words(shape));
        cuda::attention_forward(shape, d_qkv.data(), dropout, d_lse.data(), d_out.data());
        cuda::attention_backward(shape, d_gout.data(), d_qkv.data(), d_out.data(), d_lse.data(), dropout, d_dqkv.data(),
                                 d_work.data());
        MHC_CUDA_CHECK(cudaDeviceSynchronize());
        std::vector<double> probs(P), out(rows * C), dqkv(rows * 3 * C);
        cpu::attention_forward(shape, qkv.values.data(), dropout, probs.data(), out.data());
        cpu::attention_backward(shape, gout.values.data(), qkv.values.data(), probs.data(), dropout, dqkv.data());
        const std::string label = "T=" + std::to_string(shape.seq) + " C=" + std::to_string(C) +
                                  " p=" + std::to_string(p) + (wgmma ? "" : " mma.sync");
        EXPECT_LT(relative_error(widen(d_out.download()), out), kBf16Tolerance) << label;
        EXPECT_LT(relative_error(widen(d_dqkv.download()), dqkv), kBf16Tolerance) << label;
        // Deterministic: the backward again gives the same bits.
        const auto first = d_dqkv.download();
        cuda::attention_backward(shape, d_gout.data(), d_qkv.data(), d_out.data(), d_lse.data(), dropout, d_dqkv.data(),
                                 d_work.data());
        const auto second = d_dqkv.download();
        EXPECT_EQ(std::memcmp(first.data(), second.data(), first.size() * sizeof(bf16)), 0) << label;
        if (p == 0.0f) continue;
        // The mask made as bits first: the forward and the backward reading them give the same
        // bits as those that make the mask themselves.
        const auto out_first = d_out.download();
        auto d_out_kept = poisoned<bf16>(rows * C);
        auto d_dqkv_kept = poisoned<bf16>(rows * 3 * C);
        cuda::attention_forward(shape, d_qkv.data(), dropout, d_lse.data(), d_out_kept.data(), nullptr, d_mask.data());
        cuda::attention_backward(shape, d_gout.data(), d_qkv.data(), d_out_kept.data(), d_lse.data(), dropout,
                                 d_dqkv_kept.data(), d_work.data(), nullptr, d_mask.data());
        const auto out_kept = d_out_kept.download(), dqkv_kept = d_dqkv_kept.download();
        EXPECT_EQ(std::memcmp(out_first.data(), out_kept.data(), out_kept.size() * sizeof(bf16)), 0) << label;
        EXPECT_EQ(std::memcmp(first.data(), dqkv_kept.data(), first.size() * sizeof(bf16)), 0) << label << " kept mask";
      }
    }
  cuda::set_attention_wgmma(true);
}

// Column sums (bias gradients) of many rows: thousands of chunks, so that the second pass
// takes several batches of loads a thread; added to what was there, the same bits twice.
TEST(CudaColumnSums, ManyRowsMatchTheirDoubleSums) {
  if (!cuda::device_available()) GTEST_SKIP() << "no CUDA device";
  for (const RowsShape s : {RowsShape{40000, 5}, RowsShape{2000, 24}, RowsShape{16384, 768}}) {
    const Bf16Data g = random_bf16(s.rows * s.C, 31);
    const std::vector<float> bias0 = random_float(s.C, 32);
    DeviceBuffer<bf16> d_g(g.bits);
    DeviceBuffer<float> d_bias(bias0);
    auto d_work = poisoned<float>(cuda::column_sums_workspace_floats(s.rows, s.C));
    cuda::accumulate_column_sums(d_g.data(), s.rows, s.C, d_bias.data(), d_work.data());
    std::vector<double> sums = widen(bias0);
    for (int64_t r = 0; r < s.rows; ++r)
      for (int64_t c = 0; c < s.C; ++c) sums[c] += g.values[r * s.C + c];
    const auto first = d_bias.download();
    const std::string label = "rows=" + std::to_string(s.rows) + " C=" + std::to_string(s.C);
    EXPECT_LT(relative_error(widen(first), sums), kFp32Tolerance) << label;
    d_bias.upload(bias0);
    cuda::accumulate_column_sums(d_g.data(), s.rows, s.C, d_bias.data(), d_work.data());
    const auto second = d_bias.download();
    EXPECT_EQ(std::memcmp(first.data(), second.data(), first.size() * sizeof(float)), 0) << label;
  }
}

INSTANTIATE_TEST_SUITE_P(Shapes, CudaLayers,
                         ::testing::Values(RowsShape{1, 1}, RowsShape{7, 13}, RowsShape{33, 768}, RowsShape{300, 100},
                                           RowsShape{5, 1032}, RowsShape{1000, 257}, RowsShape{5000, 256}),
                         [](const auto& param_info) {
                           const RowsShape& p = param_info.param;
                           return "rows" + std::to_string(p.rows) + "_C" + std::to_string(p.C);
                         });

}  // namespace
}  // namespace mhc
