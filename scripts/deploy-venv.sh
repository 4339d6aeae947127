#!/usr/bin/env bash
# Makes sure the virtualenv of the deployment tools exists with the packages
# of scripts/deploy-requirements.txt (reinstalled only when that file
# changes) and the Python stubs generated from proto/encore/v1/*.proto in
# its gen/ (regenerated when a .proto changes), and prints its python. Used
# by deploy-check.sh and observe-check.sh; everything goes
# under target/deploy-venv.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${CARGO_TARGET_DIR:-$repo/target}/deploy-venv"
requirements="$repo/scripts/deploy-requirements.txt"
python="${PYTHON:-python3}"

if [[ ! -x "$venv/bin/python" ]]; then
    echo "==> creating $venv" >&2
    "$python" -m venv "$venv" >&2
fi
if ! cmp -s "$requirements" "$venv/requirements.txt"; then
    echo "==> installing $requirements into $venv" >&2
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check -r "$requirements" >&2
    cp "$requirements" "$venv/requirements.txt"
fi

gen="$venv/gen"
stamp="$(cat "$repo"/proto/encore/v1/*.proto | sha256sum | cut -d' ' -f1)"
if [[ "$(cat "$gen/.stamp" 2>/dev/null || true)" != "$stamp" ]]; then
    rm -rf "$gen"
    mkdir -p "$gen"
    "$venv/bin/python" -m grpc_tools.protoc -I "$repo/proto" --python_out="$gen" \
        --grpc_python_out="$gen" "$repo"/proto/encore/v1/*.proto >&2
    echo "$stamp" > "$gen/.stamp"
fi
echo "$venv/bin/python"
