#!/usr/bin/env bash
# Per-kernel GPU times of `mhc bench kernels` at one shape, through Nsight Compute.
# Usage: scripts/gpu-profile.sh DIR [SHAPE]   (DIR as for gpu-check.sh)
set -euo pipefail
dir=${1:?usage: gpu-profile.sh DIR [SHAPE]}
shape=${2:-8192,4,4,7168}
export LD_LIBRARY_PATH="$dir${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
ncu --metrics gpu__time_duration.sum --csv --print-units base --launch-count 200 \
  "$dir/mhc" bench kernels --shape "$shape" --repeats 1 2>/dev/null |
  awk -F'","' 'NR > 1 { name = $5; sub(/\(.*/, "", name); sub(/.*::/, "", name); v = $NF; gsub(/[",]/, "", v); t[name] += v; c[name]++ }
    END { for (k in t) printf "%-40s %6d launches %10.1f us avg\n", k, c[k], t[k] / c[k] / 1000 }' | sort
