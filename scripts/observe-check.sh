#!/usr/bin/env bash
# Runs a small Encore cluster on loopback (redis-server, encore-coordinator,
# encore-reward-server, encore-actor, encore-learner, with the configuration
# the manifests ship), runs a tiny two-stage job on it, and observes it:
# `promtool check metrics` on every process's /metrics, every metric of the
# Grafana dashboard exported, a real Prometheus on the shipped scrape
# configuration scraping the four processes, every dashboard query
# answered, the reward curve there and equal to the job's, and every
# process draining on SIGTERM. scripts/observe_check.py says how.
#
# Usage: scripts/observe-check.sh [--release]
#
# Needs redis-server, prometheus and promtool (Debian's redis-server and
# prometheus packages), kubectl (or kustomize) to render the cpu-demo
# overlay, and python3 with venv. It builds the binaries it runs with the
# dev profile (nearly nothing to do after `cargo test --workspace`);
# everything it writes goes under target/observe-check/.
set -euo pipefail

profile=dev
while [[ $# -gt 0 ]]; do
    case "$1" in
        --release) profile=release; shift ;;
        -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) echo "error: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
target="${CARGO_TARGET_DIR:-$repo/target}"
work="$target/observe-check"
started=$SECONDS

for tool in redis-server prometheus promtool; do
    command -v "$tool" >/dev/null 2>&1 \
        || { echo "error: $tool is not installed (apt-get install redis-server prometheus)" >&2; exit 1; }
done
read -r -a kustomize <<< "$(scripts/find-kustomize.sh)"

echo "==> building the binaries ($profile profile)"
# The whole workspace, as `cargo test --workspace` resolves features for it:
# a subset of packages may resolve others and recompile candle and its
# dependents (see scripts/python-client.sh).
cargo_flags=(--workspace --bins)
[[ "$profile" == release ]] && cargo_flags+=(--release)
cargo build "${cargo_flags[@]}"
bin="$target/$([[ "$profile" == release ]] && echo release || echo debug)"

py="$(scripts/deploy-venv.sh)"
mkdir -p "$target"
manifests="$target/observe-check-cpu-demo.yaml"
"${kustomize[@]}" deploy/kubernetes/overlays/cpu-demo > "$manifests"

echo "==> the cluster, a job, Prometheus and the dashboard's queries (logs in $work)"
"$py" scripts/observe_check.py --bin "$bin" --work "$work" --manifests "$manifests" \
    --gen "$(dirname "$(dirname "$py")")/gen"
echo "observe-check: done in $((SECONDS - started)) s"
