#!/usr/bin/env bash
# Configures and builds mhc into build/ (or $MHC_BUILD_DIR) with warnings as errors.
# Extra arguments go to cmake, e.g. -DMHC_SANITIZE=ON.
set -euo pipefail
cd "$(dirname "$0")/.."
build_dir=${MHC_BUILD_DIR:-build}
cmake -S . -B "$build_dir" -G Ninja -DMHC_WERROR=ON "$@"
cmake --build "$build_dir" -j "$(nproc)"
