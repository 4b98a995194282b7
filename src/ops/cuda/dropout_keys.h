// Dropout keys made on the device: keys[l * sites + i] = rng_key(seed, l, step, site[i])
// for layers l, with the step read from device memory (core/rng.h), the same keys the
// host would make. A CUDA graph that captured this launch replays any step: only the step
// in device memory changes between replays.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>
#include <vector>

namespace mhc::cuda {

void dropout_keys(uint64_t seed, int64_t layers, const std::vector<uint64_t>& sites, const uint64_t* step,
                  uint64_t* keys, cudaStream_t stream = nullptr);

}  // namespace mhc::cuda
