#!/usr/bin/env bash
# Sets up a fresh Debian machine, builds, and runs the main job: today, exact parity of
# the CPU implementation with Megatron-core's own mHC module on the reference files.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
scripts/build.sh
build/apps/mhc parity tests/data/*.safetensors
build/apps/mhc parity --dtype float tests/data/*.safetensors
