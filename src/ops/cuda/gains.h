// Stability metrics of the hyper connections on the GPU (nn/gpt.h's GainStats): for each
// module m (in forward order) and token t, the forward gain (max absolute row sum) and
// backward gain (max absolute column sum) of H_res, and of the composite product
// P_m = H_res(m) P_{m-1} from the identity; then their max and mean over tokens.
//
// One thread a token walks the modules (n x n products in registers); one block per
// (module, statistic) reduces over tokens in a fixed order. The result, 8 floats a module
// [forward max, forward mean, backward max, backward mean, then the composite's], is
// left on the device for one copy per step.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

namespace mhc::cuda {

size_t gains_workspace_floats(int64_t modules, int64_t tokens);

// h_res[m]: module m's H_res [tokens, n, n] (a device array of `modules` device pointers).
void hc_gains(const float* const* h_res, int64_t modules, int64_t tokens, int n, float* workspace, float* stats,
              cudaStream_t stream = nullptr);

}  // namespace mhc::cuda
