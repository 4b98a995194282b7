#include <gtest/gtest.h>

#include <cmath>

#include "ops/cpu/sinkhorn.h"
#include "test_util.h"

namespace mhc {
namespace {

using test::random_vector;

TEST(Sinkhorn, RowsAndColumnsSumToOneOnceConverged) {
  for (int n : {1, 2, 4, 6}) {
    auto logits = random_vector(n * n, 10 + n, -3, 3);
    std::vector<double> M(n * n);
    cpu::sinkhorn_forward(logits.data(), n, 500, M.data());
    for (int i = 0; i < n; ++i) {
      double row = 0, col = 0;
      for (int j = 0; j < n; ++j) {
        row += M[i * n + j];
        col += M[j * n + i];
      }
      EXPECT_NEAR(row, 1.0, 1e-9) << "n=" << n << " row " << i;
      EXPECT_NEAR(col, 1.0, 1e-12) << "n=" << n << " column " << i;
    }
  }
}

TEST(Sinkhorn, AddingAConstantToARowChangesNothing) {
  const int n = 4;
  auto logits = random_vector(n * n, 3, -2, 2);
  std::vector<double> before(n * n), after(n * n);
  cpu::sinkhorn_forward(logits.data(), n, 7, before.data());
  for (int j = 0; j < n; ++j) logits[2 * n + j] += 37.5;
  cpu::sinkhorn_forward(logits.data(), n, 7, after.data());
  for (int k = 0; k < n * n; ++k) EXPECT_NEAR(after[k], before[k], 1e-14);
}

TEST(Sinkhorn, LargeLogitsStayFinite) {
  const int n = 4;
  for (double magnitude : {80.0, -80.0, 1000.0}) {
    auto logits = random_vector(n * n, 5, -1, 1);
    for (int k = 0; k < n * n; ++k) logits[k] = logits[k] > 0 ? magnitude : -magnitude;
    auto g = random_vector(n * n, 6);
    for (bool use_float : {false, true}) {
      std::vector<float> lf(logits.begin(), logits.end()), gf(g.begin(), g.end()), Mf(n * n), dLf(n * n);
      std::vector<double> M(n * n), dL(n * n);
      if (use_float) {
        cpu::sinkhorn_forward(lf.data(), n, 20, Mf.data());
        cpu::sinkhorn_backward(lf.data(), gf.data(), n, 20, dLf.data());
        M.assign(Mf.begin(), Mf.end());
        dL.assign(dLf.begin(), dLf.end());
      } else {
        cpu::sinkhorn_forward(logits.data(), n, 20, M.data());
        cpu::sinkhorn_backward(logits.data(), g.data(), n, 20, dL.data());
      }
      for (int k = 0; k < n * n; ++k) {
        EXPECT_TRUE(std::isfinite(M[k])) << magnitude << (use_float ? " float" : " double");
        EXPECT_TRUE(std::isfinite(dL[k])) << magnitude << (use_float ? " float" : " double");
      }
    }
  }
}

TEST(Sinkhorn, GradientMatchesFiniteDifferences) {
  for (int n : {1, 2, 4, 6})
    for (int iterations : {1, 3, 20}) {
      auto logits = random_vector(n * n, 100 * n + iterations, -2, 2);
      const auto g = random_vector(n * n, 7 * n + iterations);
      std::vector<double> M(n * n), analytic(n * n);
      cpu::sinkhorn_backward(logits.data(), g.data(), n, iterations, analytic.data());
      auto loss = [&] {
        cpu::sinkhorn_forward(logits.data(), n, iterations, M.data());
        return test::dot(M, g);
      };
      const auto numeric = test::numeric_gradient(logits, loss);
      EXPECT_LT(test::relative_error(analytic, numeric), 1e-7) << "n=" << n << " T=" << iterations;
    }
}

TEST(Sinkhorn, BatchEqualsOneByOne) {
  const int n = 3, count = 9;
  auto logits = random_vector(count * n * n, 8, -4, 4);
  std::vector<double> batch(logits.size()), single(n * n);
  cpu::sinkhorn_forward_batch(logits.data(), count, n, 5, batch.data());
  for (int m = 0; m < count; ++m) {
    cpu::sinkhorn_forward(logits.data() + m * n * n, n, 5, single.data());
    for (int k = 0; k < n * n; ++k) EXPECT_EQ(batch[m * n * n + k], single[k]);
  }
}

}  // namespace
}  // namespace mhc
