#!/usr/bin/env bash
# Checks deploy/ offline, without a cluster or a Docker engine:
#
#   1. lints deploy/docker/Dockerfile and Dockerfile.cuda with hadolint;
#   2. renders the kustomize base and the cpu-demo and gpu overlays with
#      `kubectl kustomize`, and checks every object against the Kubernetes
#      API schemas (kubernetes-validate, strict) and the ServiceMonitor
#      against the Prometheus operator's CRD schema, then the references
#      and promises between them (scripts/deploy_check.py says which);
#   3. checks the Grafana dashboard's structure and the Prometheus scrape
#      configuration (promtool);
#   4. feeds the same checks broken copies and fails unless each is refused.
#
# Needs python3 (3.9 or later) with venv, node and npm, kubectl (for its
# built-in kustomize; a standalone `kustomize` works too), and promtool
# (Debian's prometheus package). Python packages go into
# target/deploy-venv (scripts/deploy-requirements.txt), the CRD validator
# into target/deploy-check/node.
set -euo pipefail

# The CRD validators generated from the Prometheus operator's CRDs.
CRD_MODELS="@kubernetes-models/prometheus-operator@6.0.0"

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
work="${CARGO_TARGET_DIR:-$repo/target}/deploy-check"
mkdir -p "$work"
started=$SECONDS

for tool in node npm promtool; do
    command -v "$tool" >/dev/null 2>&1 \
        || { echo "error: $tool is not installed" >&2; exit 1; }
done
kustomize="$(scripts/find-kustomize.sh)"

py="$(scripts/deploy-venv.sh)"
hadolint="$(dirname "$py")/hadolint"

node_dir="$work/node"
if [[ "$(cat "$node_dir/installed" 2>/dev/null || true)" != "$CRD_MODELS" ]]; then
    echo "==> installing $CRD_MODELS into $node_dir"
    npm install --prefix "$node_dir" --no-audit --no-fund --no-save --loglevel=error "$CRD_MODELS"
    echo "$CRD_MODELS" > "$node_dir/installed"
fi

echo "==> hadolint $("$hadolint" --version | head -n 1 | sed 's/.* //'): deploy/docker/Dockerfile, Dockerfile.cuda"
"$hadolint" --failure-threshold warning deploy/docker/Dockerfile deploy/docker/Dockerfile.cuda
echo "ok   no findings"

echo "==> manifests ($kustomize), dashboard and scrape configuration"
"$py" scripts/deploy_check.py --kustomize "$kustomize" --crd-modules "$node_dir/node_modules" \
    --out "$work/rendered"
echo "deploy-check: done in $((SECONDS - started)) s (rendered manifests in $work/rendered)"
