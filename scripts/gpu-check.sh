#!/usr/bin/env bash
# Builds nothing: runs the GPU tests, a short `mhc train --device cuda` (with resume and
# eval), `mhc bench kernels` and `mhc bench train` on a machine with an NVIDIA GPU, and
# prints the benchmark tables last. Usage:
#   scripts/gpu-check.sh DIR   where DIR holds mhc_cuda_tests and mhc (and, when the
#   machine lacks them, the shared libraries they were linked against: DIR is put on
#   LD_LIBRARY_PATH). A DIR/mhc_base (an earlier build) is benchmarked first, as the
#   baseline of the same run: `bench kernels` once each, `bench train` alternated twice,
#   then a table of both builds' step times. This build's last `bench train` also prints
#   the timeline of a step of each variant (`--trace`).
set -euo pipefail
dir=${1:?usage: gpu-check.sh DIR}
export LD_LIBRARY_PATH="$dir${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
"$dir/mhc_cuda_tests" --gtest_brief=1
[ -x "$dir/mhc" ] || exit 0
run=$(mktemp -d)
trap 'rm -rf "$run"' EXIT
echo "== mhc train --device cuda (30 steps, resumed to 40), eval"
"$dir/mhc" train --device cuda --out "$run/r" --steps 30 --set eval_every=15 | tail -3
"$dir/mhc" train --resume "$run/r" --steps 40 | tail -2
"$dir/mhc" eval "$run/r" | tail -1
if [ ! -x "$dir/mhc_base" ]; then
  "$dir/mhc" bench kernels | grep -v '^{'
  "$dir/mhc" bench train --trace "$run/trace.json" | grep -v '^{'
  exit 0
fi
echo "== baseline: $dir/mhc_base"
"$dir/mhc_base" bench kernels | grep -v '^{'
echo "== this build"
"$dir/mhc" bench kernels | grep -v '^{'
# bench train: baseline, this build, twice; each run's JSON rows kept for the table. This
# build's last run also records a step of each variant after its timed ones (--trace: where
# the step's time goes, at the card's own clocks).
for round in 1 2; do
  for build in base this; do
    binary="$dir/mhc"; [ "$build" = base ] && binary="$dir/mhc_base"
    trace=(); [ "$build$round" = this2 ] && trace=(--trace "$run/trace.json")
    echo "== bench train, $build build, round $round"
    "$binary" bench train "${trace[@]}" | tee "$run/train-$build-$round" | grep -v '^{'
  done
done
echo "== step ms: baseline, baseline | this build, this build (same card, alternated)"
for build in base this; do
  for round in 1 2; do
    grep '"step_ms"' "$run/train-$build-$round" | sed -E 's/.*"step_ms":([0-9.]+).*"variant":"([^"]+)".*/\2\t\1/' |
      sed "s/^/$build\t/"
  done
done | awk -F'\t' '
  !($2 in seen) { seen[$2] = 1; order[++count] = $2 }
  { ms[$1, $2] = ms[$1, $2] sprintf(" %8.2f", $3) }
  END { for (i = 1; i <= count; ++i) printf "%-26s%s |%s\n", order[i], ms["base", order[i]], ms["this", order[i]] }'
