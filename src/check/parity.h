// Parity against reference files written by Megatron-core's own mHC module
// (format: tests/data/REFERENCE.md). From the inputs and parameters in the file we
// recompute every output and every gradient and compare each with the file's tensor:
// ||ours - ref||_2 / ||ref||_2, or ||ours - ref||_2 where the reference is all zeros.
#pragma once
#include <string>
#include <vector>

#include "core/safetensors.h"

namespace mhc {

struct TensorError {
  std::string name;
  double error = 0;
  bool relative = true;
};

struct ParityResult {
  std::string kind;
  std::vector<TensorError> errors;    // one per compared tensor
  std::vector<std::string> ignored;   // tensors of the file that are neither inputs nor outputs
  const TensorError& worst() const;   // NaN counts as the worst
};

// Computes in T (float or double). Throws Error if the file is not a usable reference.
template <typename T> ParityResult check_parity(const Safetensors& file, const std::string& origin);

}  // namespace mhc
