#!/usr/bin/env bash
# MusicGen sampling throughput, Encore against transformers' `generate`, on
# the same random-weight checkpoints, side by side in one run:
#   scripts/musicgen-bench.sh [--sizes tiny,small] [--batches 1,8,32] [--frames 50] [--repeats 1]
# `small` has facebook/musicgen-small's shapes (a 24-layer, 1024-wide decoder,
# T5-base, 32 kHz EnCodec; about 2.4 GB of f32 weights). Checkpoints are
# written once into target/musicgen-bench/SIZE with transformers (installed
# into target/musicgen-venv). Prints a markdown table and the CPU it ran on.
set -euo pipefail
cd "$(dirname "$0")/.."
sizes=tiny,small batches=1,8,32 frames=50 repeats=1
while [ $# -gt 0 ]; do
  case "$1" in
    --sizes) sizes=$2; shift 2 ;;
    --batches) batches=$2; shift 2 ;;
    --frames) frames=$2; shift 2 ;;
    --repeats) repeats=$2; shift 2 ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
done
venv=target/musicgen-venv
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet torch "transformers>=5,<6" safetensors tokenizers
fi
cargo bench --workspace --bench sampling --no-run 2>&1 | tail -1 >&2
echo "| size | batch | Encore codes/s | transformers codes/s | ratio | Encore decode s | transformers decode s |"
echo "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"
for size in ${sizes//,/ }; do
  dir="$PWD/target/musicgen-bench/$size"
  if [ ! -f "$dir/model.safetensors" ]; then
    "$venv/bin/python" scripts/musicgen-fixtures.py --checkpoint-only --size "$size" "$dir" >/dev/null 2>&1
  fi
  ours=$(cargo bench --workspace --bench sampling -- "$dir" --batches "$batches" --frames "$frames" --repeats "$repeats" 2>/dev/null | tail -n +2)
  theirs=$("$venv/bin/python" scripts/musicgen-bench.py "$dir" --batches "$batches" --frames "$frames" --repeats "$repeats" 2>/dev/null | tail -n +2)
  paste <(echo "$ours") <(echo "$theirs") | while IFS=$'\t' read -r b _ _ ocps odec _ _ _ tcps tdec; do
    ratio=$(awk -v a="$ocps" -v b="$tcps" 'BEGIN { printf "%.2f", a / b }')
    echo "| $size | $b | $ocps | $tcps | ${ratio}x | $odec | $tdec |"
  done
done
# Ratios depend on the host (MKL takes other code paths on AMD than on
# Intel CPUs): say which one this was.
cpu=$(lscpu 2>/dev/null | sed -n 's/^Model name: *//p' | head -1)
versions=$("$venv/bin/python" -c 'import torch, transformers; print(f"torch {torch.__version__}, transformers {transformers.__version__}")' 2>/dev/null)
echo
echo "CPU: ${cpu:-unknown}, $(nproc) cores; $versions"
