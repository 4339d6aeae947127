#!/usr/bin/env bash
# Regenerates the MusicGen parity fixtures (musicgen/tests/fixtures/tiny) with
# Hugging Face transformers + torch (CPU), installed into target/musicgen-venv.
# CI does not run this: the fixtures are committed, so the parity tests need
# no torch. Extra arguments go to scripts/musicgen-fixtures.py.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=target/musicgen-venv
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet torch "transformers>=5,<6" safetensors tokenizers
fi
"$venv/bin/python" scripts/musicgen-fixtures.py "$@"
