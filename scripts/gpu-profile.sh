#!/usr/bin/env bash
# Per-kernel GPU time of one `mhc` command, through Nsight Compute: total microseconds,
# launches and name of each kernel, largest first. Usage:
#   scripts/gpu-profile.sh DIR [mhc arguments]   (DIR as for gpu-check.sh)
# Default: bench kernels --shape 8192,4,4,7168 --repeats 1. For a training step:
#   scripts/gpu-profile.sh DIR bench train --variants mhc --steps 1 --warmup 0
set -euo pipefail
dir=${1:?usage: gpu-profile.sh DIR [mhc arguments]}
shift
[ $# -gt 0 ] || set -- bench kernels --shape 8192,4,4,7168 --repeats 1
export LD_LIBRARY_PATH="$dir${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
ncu --metrics gpu__time_duration.sum --csv --print-units base "$dir/mhc" "$@" 2>/dev/null |
  awk -F'","' 'NR > 1 { name = $5; sub(/\(anonymous namespace\)::/, "", name); sub(/\(.*/, "", name);
                        sub(/^void /, "", name); sub(/.*::/, "", name); v = $NF; gsub(/[",]/, "", v);
                        t[name] += v; c[name]++ }
    END { for (k in t) printf "%10.1f us %6d  %s\n", t[k] / 1000, c[k], k }' | sort -n -r | head -45
