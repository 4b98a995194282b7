#!/usr/bin/env bash
# Sets up a fresh Debian machine, builds with warnings as errors, and runs the whole
# test suite. GPU tests skip themselves where there is no GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
scripts/build.sh
ctest --test-dir "${MHC_BUILD_DIR:-build}" --output-on-failure -j "$(nproc)"
