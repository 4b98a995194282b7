#!/usr/bin/env bash
# Sets up a fresh Debian machine, builds, and runs the main job: trains the default mHC
# GPT (n = 4) on the built-in corpus, then draws its curves. Extra arguments go to
# `mhc train` (e.g. --steps 600 --set connection=residual).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
scripts/build.sh
out=runs/$(date +%Y%m%d-%H%M%S)
build/apps/mhc train --out "$out" "$@"
build/apps/mhc report "$out" --out "$out/report.png"
