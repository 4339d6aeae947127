#!/usr/bin/env bash
# Runs the learner's NCCL backend against a real GPU and libnccl: the
# ignored tests `collective::nccl::tests::one_rank_runs_every_operation_on_a_gpu`
# (every operation of one rank, bit-exact) and
# `one_nccl_rank_takes_the_step_of_one_plain_rank` (a learner step through
# NCCL equals the step without it).
#
# Usage:
#   scripts/nccl-check.sh        # builds the test binaries (--features nccl), runs them
#   scripts/nccl-check.sh DIR    # runs prebuilt binaries DIR/learner-lib and DIR/data_parallel
#                                # (for a GPU machine without a Rust toolchain)
#
# cudarc opens `libnccl.so` and `libcuda.so` by those names; many systems
# ship only the versioned sonames (NCCL's pip wheel has only libnccl.so.2),
# so this script links them into a temporary directory on LD_LIBRARY_PATH.
set -euo pipefail
cd "$(dirname "$0")/.."

bins="${1:-}"
if [ -z "$bins" ]; then
  bins=target/nccl-check
  mkdir -p "$bins"
  cargo test -p encore-learner --features nccl --no-run --message-format=json \
    | python3 -c '
import json, shutil, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["profile"]["test"]:
        name = {"lib": "learner-lib"}.get(m["target"]["kind"][0], m["target"]["name"])
        shutil.copy(m["executable"], sys.argv[1] + "/" + name)
' "$bins"
fi

links=$(mktemp -d)
find_lib() {
  local pattern="$1" dirs
  dirs="/usr/local/nvidia/lib64 /usr/local/cuda/lib64 /usr/lib/x86_64-linux-gnu /usr/lib64 /lib/x86_64-linux-gnu"
  if command -v python3 >/dev/null; then
    dirs="$dirs $(python3 -c 'import site; print(" ".join(site.getsitepackages()))' 2>/dev/null || true)"
  fi
  # shellcheck disable=SC2086
  find $dirs -name "$pattern" 2>/dev/null | head -n 1 || true
}
for lib in libnccl libcuda; do
  found=$(find_lib "$lib.so*")
  if [ -z "$found" ]; then
    echo "nccl-check: no $lib.so found; install NCCL / the NVIDIA driver" >&2
    exit 1
  fi
  echo "nccl-check: $lib.so -> $found"
  ln -sf "$found" "$links/$lib.so"
done
export LD_LIBRARY_PATH="$links${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export NCCL_DEBUG="${NCCL_DEBUG:-WARN}"

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
"$bins/learner-lib" --ignored --nocapture one_rank_runs_every_operation_on_a_gpu
"$bins/data_parallel" --ignored --nocapture one_nccl_rank_takes_the_step_of_one_plain_rank
echo "nccl-check: passed"
