// group_sum (ops/cuda/kernel_utils.cuh) against its stated order of additions, computed
// here in float: within a warp the xor butterfly's pairwise sums at offsets 16, 8, ..., 1,
// then a block's warp totals in warp order. Bitwise, and each total given exactly once.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <random>
#include <vector>

#include "core/cuda/device.h"
#include "ops/cuda/kernel_utils.cuh"

namespace {

using mhc::cuda::DeviceBuffer;
constexpr int kThreads = mhc::cuda::detail::kBlockThreads;

// One group a warp (lanes 32) or a block (lanes kThreads); totals[group][k], calls[group][k].
template <int V>
__global__ void group_sum_kernel(const float* in, int lanes, float* totals, int* calls) {
  float values[V];
  for (int k = 0; k < V; ++k) values[k] = in[(blockIdx.x * blockDim.x + threadIdx.x) * V + k];
  const int group = lanes == 32 ? static_cast<int>(blockIdx.x * blockDim.x + threadIdx.x) / 32 : blockIdx.x;
  mhc::cuda::detail::group_sum<V>(values, lanes, [&](int k, float total) {
    totals[group * V + k] = total;
    atomicAdd(calls + group * V + k, 1);
  });
}

// The stated order, in float.
std::vector<float> expected_totals(const std::vector<float>& in, int V, int lanes, int blocks) {
  const int groups = blocks * kThreads / lanes;
  std::vector<float> out(static_cast<size_t>(groups) * V);
  for (int g = 0; g < groups; ++g)
    for (int k = 0; k < V; ++k) {
      float block_total = 0;
      for (int w = 0; w < lanes / 32; ++w) {
        float lane_values[32];
        for (int l = 0; l < 32; ++l) lane_values[l] = in[((g * lanes) + w * 32 + l) * V + k];
        for (int offset = 16; offset >= 1; offset /= 2) {
          float next[32];
          for (int l = 0; l < 32; ++l) next[l] = lane_values[l] + lane_values[l ^ offset];
          std::memcpy(lane_values, next, sizeof(next));
        }
        block_total = lanes == 32 ? lane_values[0] : block_total + lane_values[0];
      }
      out[static_cast<size_t>(g) * V + k] = block_total;
    }
  return out;
}

template <int V>
void check_group_sum(int lanes) {
  constexpr int kBlocks = 3;
  // magnitudes over many binades, so that another order of additions gives other bits
  std::mt19937 rng(1234 + V * 7 + lanes);
  std::uniform_real_distribution<float> mantissa(-1.0f, 1.0f);
  std::uniform_int_distribution<int> exponent(-20, 20);
  std::vector<float> in(static_cast<size_t>(kBlocks) * kThreads * V);
  for (float& v : in) v = std::ldexp(mantissa(rng), exponent(rng));
  const int groups = kBlocks * kThreads / lanes;
  DeviceBuffer<float> d_in(in), totals(std::vector<float>(static_cast<size_t>(groups) * V, std::nanf("")));
  DeviceBuffer<int> calls(std::vector<int>(static_cast<size_t>(groups) * V, 0));
  group_sum_kernel<V><<<kBlocks, kThreads>>>(d_in.data(), lanes, totals.data(), calls.data());
  MHC_CUDA_CHECK(cudaGetLastError());
  MHC_CUDA_CHECK(cudaDeviceSynchronize());
  const std::vector<float> got = totals.download(), want = expected_totals(in, V, lanes, kBlocks);
  const std::vector<int> counted = calls.download();
  for (size_t i = 0; i < got.size(); ++i) {
    EXPECT_EQ(counted[i], 1) << "V " << V << " lanes " << lanes << " total " << i;
    uint32_t got_bits, want_bits;
    std::memcpy(&got_bits, &got[i], 4);
    std::memcpy(&want_bits, &want[i], 4);
    EXPECT_EQ(got_bits, want_bits) << "V " << V << " lanes " << lanes << " total " << i << ": " << got[i] << " against "
                                   << want[i];
  }
}

class CudaGroupSum : public ::testing::TestWithParam<int> {
 protected:
  void SetUp() override {
    if (!mhc::cuda::device_available()) GTEST_SKIP() << "no CUDA device";
  }
};

TEST_P(CudaGroupSum, MatchesTheButterflyOrderBitwise) {
  const int lanes = GetParam();
  check_group_sum<1>(lanes);
  check_group_sum<3>(lanes);
  check_group_sum<4>(lanes);
  check_group_sum<28>(lanes);
  check_group_sum<48>(lanes);
}

INSTANTIATE_TEST_SUITE_P(WarpAndBlock, CudaGroupSum, ::testing::Values(32, kThreads));

}  // namespace
