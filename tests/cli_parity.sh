#!/usr/bin/env bash
# Exit-code contract of `mhc parity`: 0 all within tolerance, 1 a tensor off, 2 unreadable file.
set -u
mhc=$1 data=$2
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
fail() { echo "cli_parity: $*" >&2; exit 1; }

"$mhc" parity "$data"/*.safetensors > "$tmp/out" || fail "reference files: exit $? (want 0)"
grep -q "all within tolerance" "$tmp/out" || fail "no summary line"
"$mhc" parity --dtype float "$data"/*.safetensors > /dev/null || fail "float: exit $? (want 0)"
"$mhc" parity "$data" > "$tmp/out" || fail "the reference directory: exit $? (want 0)"
grep -q "^4 file(s)" "$tmp/out" || fail "the reference directory: not its 4 files: $(cat "$tmp/out")"
mkdir "$tmp/none"
"$mhc" parity "$tmp/none" > /dev/null 2> "$tmp/err"
code=$?
[ $code -eq 2 ] || fail "directory without files: exit $code (want 2)"
grep -q "none: a directory without .safetensors files" "$tmp/err" || fail "error does not name the directory"

head -c 1000 "$data/default_init.safetensors" > "$tmp/truncated.safetensors"
"$mhc" parity "$data/sinkhorn_n4.safetensors" "$tmp/truncated.safetensors" > /dev/null 2> "$tmp/err"
code=$?
[ $code -eq 2 ] || fail "truncated file: exit $code (want 2)"
grep -q "truncated.safetensors" "$tmp/err" || fail "error does not name the file"

# Change one byte of the last tensor's data (the last bytes of the file): a value off.
cp "$data/sinkhorn_n4.safetensors" "$tmp/off.safetensors"
size=$(stat -c %s "$tmp/off.safetensors")
printf '\x41' | dd of="$tmp/off.safetensors" bs=1 seek=$((size - 2)) conv=notrunc status=none
"$mhc" parity "$tmp/off.safetensors" > /dev/null 2>&1
code=$?
[ $code -eq 1 ] || fail "perturbed file: exit $code (want 1)"

"$mhc" parity > /dev/null 2>&1
[ $? -eq 2 ] || fail "no files: want exit 2"
echo "cli_parity: ok"
