#!/usr/bin/env bash
# Runs the GPU test binary on a machine with an NVIDIA GPU. Usage:
#   scripts/gpu-check.sh DIR   where DIR holds mhc_cuda_tests (and, when the machine
#   lacks them, the shared libraries it was linked against: it is put on LD_LIBRARY_PATH).
#   A DIR/mhc_base (an earlier build) is benchmarked first, as the baseline of the same run.
set -euo pipefail
dir=${1:?usage: gpu-check.sh DIR}
export LD_LIBRARY_PATH="$dir${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
"$dir/mhc_cuda_tests" --gtest_brief=1
if [ -x "$dir/mhc_base" ]; then
  echo "== baseline: $dir/mhc_base"
  "$dir/mhc_base" bench kernels | grep -v '^{'
  echo "== this build"
fi
if [ -x "$dir/mhc" ]; then
  "$dir/mhc" bench kernels
fi
