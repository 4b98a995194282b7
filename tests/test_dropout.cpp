#include <gtest/gtest.h>

#include <cmath>

#include "core/rng.h"
#include "ops/cpu/h_post_bda.h"
#include "test_util.h"

namespace mhc {
namespace {

constexpr const double* kNoBias = nullptr;

// Known-answer vectors of Philox4x32-10 from the Random123 distribution (kat_vectors).
TEST(Philox, KnownAnswers) {
  const Philox4x32 zero = philox4x32(0, 0, 0);
  EXPECT_EQ(zero.v[0], 0x6627e8d5u);
  EXPECT_EQ(zero.v[1], 0xe169c58du);
  EXPECT_EQ(zero.v[2], 0xbc57ac4cu);
  EXPECT_EQ(zero.v[3], 0x9b00dbd8u);
  const Philox4x32 ones = philox4x32(~0ull, ~0ull, ~0ull);
  EXPECT_EQ(ones.v[0], 0x408f276du);
  EXPECT_EQ(ones.v[1], 0x41c83b0eu);
  EXPECT_EQ(ones.v[2], 0xa20bc7c6u);
  EXPECT_EQ(ones.v[3], 0x6d5451fdu);
}

TEST(Dropout, ZeroProbabilityIsTheIdentity) {
  for (uint64_t i = 0; i < 10000; ++i) EXPECT_EQ(dropout_scale<double>(77, i, 0.0f), 1.0);
  const int64_t tokens = 4, C = 11;
  const int n = 3;
  const auto x = test::random_vector(tokens * n * C, 1), h_res = test::random_vector(tokens * n * n, 2);
  const auto h_post = test::random_vector(tokens * n, 3), y = test::random_vector(tokens * C, 4);
  std::vector<double> a(x.size()), b(x.size());
  cpu::h_post_bda_forward(x.data(), h_res.data(), h_post.data(), y.data(), kNoBias, tokens, n, C, {0.0f, 1}, a.data());
  cpu::h_post_bda_forward(x.data(), h_res.data(), h_post.data(), y.data(), kNoBias, tokens, n, C, {0.0f, 2}, b.data());
  EXPECT_EQ(a, b);
}

TEST(Dropout, ReplayGivesIdenticalMasks) {
  const int64_t tokens = 8, C = 33;
  const int n = 4;
  const auto x = test::random_vector(tokens * n * C, 1), h_res = test::random_vector(tokens * n * n, 2);
  const auto h_post = test::random_vector(tokens * n, 3), y = test::random_vector(tokens * C, 4);
  std::vector<double> first(x.size()), replay(x.size()), other(x.size());
  const uint64_t key = rng_key(1234, /*layer=*/3, /*step=*/17);
  cpu::h_post_bda_forward(x.data(), h_res.data(), h_post.data(), y.data(), kNoBias, tokens, n, C, {0.4f, key},
                          first.data());
  cpu::h_post_bda_forward(x.data(), h_res.data(), h_post.data(), y.data(), kNoBias, tokens, n, C, {0.4f, key},
                          replay.data());
  cpu::h_post_bda_forward(x.data(), h_res.data(), h_post.data(), y.data(), kNoBias, tokens, n, C,
                          {0.4f, rng_key(1234, 3, 18)}, other.data());
  EXPECT_EQ(first, replay);
  EXPECT_NE(first, other);
}

TEST(Dropout, KeptFractionAndScale) {
  const int count = 1 << 20;
  for (float p : {0.1f, 0.5f, 0.9f}) {
    int kept = 0;
    for (int i = 0; i < count; ++i) {
      const double s = dropout_scale<double>(rng_key(5, 6), i, p);
      if (s != 0) {
        ++kept;
        EXPECT_DOUBLE_EQ(s, 1.0 / (1.0 - static_cast<double>(p)));
      }
    }
    const double fraction = static_cast<double>(kept) / count;
    const double sigma = std::sqrt(p * (1.0 - p) / count);
    EXPECT_NEAR(fraction, 1.0 - p, 6 * sigma) << "p=" << p;
  }
}

// The GPU kernels' four-at-a-time keep decisions are dropout_scale's, element by element.
TEST(Dropout, FourKeepBitsFromOneCallAreDropoutScales) {
  for (const float p : {0.1f, 0.5f, 0.9f})
    for (uint64_t first = 0; first < 4000; first += 4) {
      const uint64_t key = rng_key(3, first);
      const uint32_t bits = dropout_keep_bits4(key, first, p);
      for (uint64_t q = 0; q < 4; ++q)
        ASSERT_EQ((bits >> q & 1u) != 0, dropout_scale<float>(key, first + q, p) != 0.0f)
            << "element " << first + q << " p " << p;
    }
}

// The integer threshold decides as the float comparison, at the values around it.
TEST(Dropout, KeepThresholdDecidesAsTheFloatComparison) {
  const float tiny = 1.0f / 16777216.0f;
  for (const float p : {tiny, 0.1f, 1.0f / 3.0f, 0.5f, std::nextafter(0.5f, 1.0f), 0.9f, 1.0f - tiny, 1.0f}) {
    const uint32_t threshold = dropout_keep_threshold(p);
    for (const int64_t y : {int64_t{threshold} - 1, int64_t{threshold}, int64_t{threshold} + 1}) {
      if (y < 0 || y >= (int64_t{1} << 24)) continue;
      const uint32_t bits = static_cast<uint32_t>(y) << 8 | 0xA5u;
      EXPECT_EQ(uint_to_unit_float(bits) >= p, (bits >> 8) >= threshold) << "p " << p << " y " << y;
    }
  }
}

TEST(Dropout, KeysOfDifferentSitesAreIndependent) {
  // Masks keyed by neighbouring layers must not coincide more often than chance.
  const int count = 100000;
  int same = 0;
  for (int i = 0; i < count; ++i)
    same += (dropout_scale<double>(rng_key(1, 0), i, 0.5f) == dropout_scale<double>(rng_key(1, 1), i, 0.5f));
  EXPECT_NEAR(static_cast<double>(same) / count, 0.5, 0.01);
}

}  // namespace
}  // namespace mhc
