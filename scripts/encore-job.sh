#!/usr/bin/env bash
# Runs scripts/encore_job.py, the job client (submit, watch, get, list,
# cancel), in the virtualenv of scripts/deploy-venv.sh, which also
# generates its Python stubs from proto/encore/v1/*.proto.
#
#   scripts/encore-job.sh --target 127.0.0.1:50051 --token TOKEN \
#       submit deploy/examples/job-cpu-demo.json --watch
#
# `scripts/encore-job.sh --help` lists the commands.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
py="$("$repo/scripts/deploy-venv.sh")"
exec "$py" "$repo/scripts/encore_job.py" --gen "$(dirname "$(dirname "$py")")/gen" "$@"
