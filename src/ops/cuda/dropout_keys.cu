#include "ops/cuda/dropout_keys.h"

#include "core/cuda/device.h"
#include "core/rng.h"
#include "ops/cuda/kernel_utils.cuh"

namespace mhc::cuda {
namespace {

constexpr int kMaxSites = 4;
struct Sites {
  uint64_t site[kMaxSites];
  int count;
};

__global__ void dropout_keys_kernel(uint64_t seed, int64_t layers, Sites sites, const uint64_t* step, uint64_t* keys) {
  const int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (e >= layers * sites.count) return;
  keys[e] = rng_key(seed, static_cast<uint64_t>(e / sites.count), *step, sites.site[e % sites.count]);
}

}  // namespace

void dropout_keys(uint64_t seed, int64_t layers, const std::vector<uint64_t>& sites, const uint64_t* step,
                  uint64_t* keys, cudaStream_t stream) {
  check(!sites.empty() && sites.size() <= kMaxSites, "dropout_keys: 1 to 4 sites a layer");
  check(layers >= 1, "dropout_keys: no layers");
  Sites s{};
  for (size_t i = 0; i < sites.size(); ++i) s.site[i] = sites[i];
  s.count = static_cast<int>(sites.size());
  constexpr int kThreads = 128;
  dropout_keys_kernel<<<detail::blocks_for(layers * s.count, kThreads), kThreads, 0, stream>>>(seed, layers, s, step,
                                                                                               keys);
  MHC_CUDA_CHECK(cudaGetLastError());
}

}  // namespace mhc::cuda
