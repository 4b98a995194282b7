#include "core/cuda/device.h"

namespace mhc::cuda {

void throw_cuda_error(cudaError_t status, const char* call, const char* file, int line) {
  fail(std::string("CUDA error ") + cudaGetErrorName(status) + " (" + cudaGetErrorString(status) + ") in " + call +
       " at " + file + ":" + std::to_string(line));
}

bool device_available() {
  int count = 0;
  return cudaGetDeviceCount(&count) == cudaSuccess && count > 0;
}

}  // namespace mhc::cuda
