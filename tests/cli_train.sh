#!/usr/bin/env bash
# The command line of training: help, exit code 2 with a named problem and nothing
# written on bad input, and a tiny run through train, eval, generate and report.
set -u
mhc=$1
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
fail() { echo "cli_train: $*" >&2; exit 1; }
tiny=(--set num_layers=1 --set hidden_size=32 --set num_attention_heads=2 --set seq_length=16
      --set batch_size=2 --set eval_batches=1 --set eval_every=2)

"$mhc" --help > "$tmp/help" || fail "--help: exit $?"
for sub in train eval generate report parity check-grad bench; do
  grep -q "$sub" "$tmp/help" || fail "--help does not list $sub"
done
"$mhc" train --help > "$tmp/help" || fail "train --help: exit $?"
"$mhc" train --print-config --set num_layers=7 | grep -q '"num_layers": 7' || fail "--print-config does not show a --set value"
grep -q -- "--resume" "$tmp/help" || fail "train --help does not explain --resume"

expect_2() {  # expect_2 WHAT PATTERN command...: exit 2, PATTERN on stderr
  local what=$1 pattern=$2; shift 2
  "$@" > /dev/null 2> "$tmp/err"
  local code=$?
  [ $code -eq 2 ] || fail "$what: exit $code (want 2)"
  grep -q -- "$pattern" "$tmp/err" || fail "$what: stderr does not name '$pattern': $(cat "$tmp/err")"
}
expect_2 "unknown key" "bogus_key" "$mhc" train --out "$tmp/x" --set bogus_key=1
expect_2 "unknown device" "device" "$mhc" train --out "$tmp/dev" --device tpu --steps 1 "${tiny[@]}"
[ -e "$tmp/dev" ] && fail "a bad --device wrote $tmp/dev"
if ! command -v nvidia-smi > /dev/null 2>&1; then  # no GPU: a named error (no CUDA device, or no CUDA build)
  expect_2 "--device cuda without a GPU" "cuda\|CUDA" "$mhc" train --out "$tmp/dev" --device cuda --steps 1 "${tiny[@]}"
fi
expect_2 "invalid value" "mhc_sinkhorn_iterations" "$mhc" train --out "$tmp/x" --set mhc_sinkhorn_iterations=0
expect_2 "unknown bench row" "bogus" "$mhc" bench train --variants residual,bogus
expect_2 "zero bench steps" "steps: must be a whole number of at least 1, got 0" "$mhc" bench train --steps 0
expect_2 "negative kernel repeats" "at least 1, got -3" "$mhc" bench kernels --repeats -3
expect_2 "negative warmup" "warmup: must be a whole number of at least 0, got -1" "$mhc" bench train --warmup -1
expect_2 "zero bench rounds" "rounds: must be a whole number of at least 1, got 0" "$mhc" bench train --rounds 0
# A comma-separated row list parses (then runs a tiny bench, or names the missing GPU).
"$mhc" bench train --variants residual,mhc --layers 1 --hidden 64 --heads 4 --seq 32 --batch 2 --vocab 61 \
  --steps 1 --warmup 0 --rounds 2 > /dev/null 2> "$tmp/err"
grep -q "not in" "$tmp/err" && fail "--variants residual,mhc: $(cat "$tmp/err")"
expect_2 "missing data" "nope.txt" "$mhc" train --out "$tmp/x" --data "$tmp/nope.txt"
: > "$tmp/empty.txt"
expect_2 "empty data" "empty" "$mhc" train --out "$tmp/x" --data "$tmp/empty.txt"
[ ! -e "$tmp/x" ] || fail "a failed start created its output directory"
echo "keep" > "$tmp/afile"
expect_2 "--out an existing file" "afile: exists and is not a directory" "$mhc" train --out "$tmp/afile" --steps 1 "${tiny[@]}"
[ "$(cat "$tmp/afile")" = "keep" ] || fail "a bad --out changed the file there"

"$mhc" train --out "$tmp/run" --steps 3 "${tiny[@]}" > "$tmp/log" || fail "tiny run: exit $?"
for f in config.json metrics.jsonl checkpoint.safetensors; do [ -s "$tmp/run/$f" ] || fail "tiny run wrote no $f"; done
expect_2 "run directory in use" "already holds a run" "$mhc" train --out "$tmp/run" --steps 3 "${tiny[@]}"
"$mhc" train --resume "$tmp/run" --steps 4 > /dev/null || fail "resume: exit $?"
[ "$(grep -c '"loss"' "$tmp/run/metrics.jsonl")" -eq 4 ] || fail "resume did not add exactly one step"
"$mhc" eval "$tmp/run" > "$tmp/eval" || fail "eval: exit $?"
grep -q perplexity "$tmp/eval" || fail "eval prints no perplexity"
expect_2 "eval on an unknown device" "device" "$mhc" eval "$tmp/run" --device tpu
"$mhc" eval "$tmp/run" --device cuda > "$tmp/eval_gpu" 2> "$tmp/err"
code=$?
if [ $code -eq 0 ]; then  # on the GPU: the CPU's loss within bf16 rounding
  cpu=$(awk '/^val_loss/ {print $2}' "$tmp/eval") gpu=$(awk '/^val_loss/ {print $2}' "$tmp/eval_gpu")
  awk -v a="$cpu" -v b="$gpu" 'BEGIN { exit !(a > 0 && b - a < 0.02 * a && a - b < 0.02 * a) }' ||
    fail "eval: val_loss $cpu on the CPU, $gpu on the GPU"
else  # a named error: no CUDA build, or (only where there is no GPU) no CUDA device
  missing="built without CUDA"
  command -v nvidia-smi > /dev/null 2>&1 || missing="built without CUDA\|no CUDA device"
  [ $code -eq 2 ] && grep -q "$missing" "$tmp/err" || fail "eval --device cuda: exit $code: $(cat "$tmp/err")"
fi
"$mhc" generate "$tmp/run" --prompt "1+1=" --tokens 5 > /dev/null || fail "generate: exit $?"
"$mhc" report "$tmp/run" --out "$tmp/report/r.png" > /dev/null || fail "report: exit $?"
[ -s "$tmp/report/r-run.csv" ] && [ -s "$tmp/report/r.md" ] || fail "report wrote no CSV or summary"

cp "$tmp/run/checkpoint.safetensors" "$tmp/cut.safetensors"
truncate -s 2000 "$tmp/cut.safetensors"
expect_2 "truncated checkpoint" "cut.safetensors" "$mhc" eval "$tmp/cut.safetensors"
echo "cli_train: ok"
