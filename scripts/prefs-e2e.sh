#!/usr/bin/env bash
# End to end in headless Chromium: starts encore-prefs (a tiny policy, the
# embedded store), drives the listening page with playwright-core (take a
# suggestion, generate, play both clips, rate, choose B), then exports the
# store with `encore prefs export` and checks the comparison is there with
# the choice. Writes target/prefs-e2e/page.png.
#
# Needs Debian's chromium (installs it when missing, as root or with sudo)
# and node/npm (playwright-core is installed under target/prefs-e2e).
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
PLAYWRIGHT=1.65.1
work="${CARGO_TARGET_DIR:-$repo/target}/prefs-e2e"
mkdir -p "$work"
rm -rf "$work/store" "$work/export.jsonl"

sudo=""; [ "$(id -u)" != 0 ] && sudo="sudo"
if ! command -v chromium >/dev/null 2>&1; then
    $sudo apt-get update && $sudo apt-get install -y --no-install-recommends chromium
fi
if [[ ! -d "$work/node_modules/playwright-core" ]]; then
    npm install --prefix "$work" --no-audit --no-fund --no-save --loglevel=error "playwright-core@$PLAYWRIGHT"
fi
# The whole workspace, so that the features match `cargo test --workspace`'s
# and nothing is recompiled after it (see scripts/python-client.sh).
cargo build --workspace --bins
bin="${CARGO_TARGET_DIR:-$repo/target}/debug"

"$bin/encore" pretrain --preset tiny --steps 2 --batch-size 2 --eval-every 2 --out "$work/policy" >/dev/null
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
http=$(free_port); grpc=$(free_port); admin=$(free_port)
"$bin/encore-prefs" --policy "tiny=$work/policy" --store "embedded://$work/store" \
    --http "127.0.0.1:$http" --listen "127.0.0.1:$grpc" --admin "127.0.0.1:$admin" \
    > "$work/prefs.log" 2>&1 &
server=$!
trap 'kill $server 2>/dev/null || true' EXIT
for _ in $(seq 100); do
    curl -sf "http://127.0.0.1:$admin/readyz" >/dev/null && break
    sleep 0.1
done
if ! curl -sf "http://127.0.0.1:$admin/readyz" >/dev/null; then
    echo "prefs-e2e: encore-prefs did not become ready; its log:" >&2
    cat "$work/prefs.log" >&2
    exit 1
fi

cp scripts/prefs_e2e.mjs "$work/"
node "$work/prefs_e2e.mjs" "http://127.0.0.1:$http/" "$(command -v chromium)" "$work/page.png"

# SIGTERM drains: the server must exit with status 0 (a crash during the
# test, or a failed drain, fails it).
kill -TERM $server
status=0
wait $server || status=$?
trap - EXIT
if [[ $status != 0 ]]; then
    echo "prefs-e2e: encore-prefs exited with status $status on SIGTERM; its log:" >&2
    tail -n 50 "$work/prefs.log" >&2
    exit 1
fi
"$bin/encore" prefs export --store "embedded://$work/store" --out "$work/export.jsonl"
python3 - "$work/export.jsonl" <<'PY'
import json, sys
records = [json.loads(line) for line in open(sys.argv[1])]
assert len(records) == 1, records
r = records[0]
assert r["choice"] == "b", r["choice"]
assert r["rater"].startswith("r1."), r["rater"]  # a session the service issued
assert len(r["a"]["tokens"]) > 0 and len(r["b"]["tokens"]) > 0
print(f"export: 1 comparison, choice b, rater {r['rater']}, prompt {r['caption']!r}")
PY
echo "prefs-e2e: passed"
