#!/usr/bin/env bash
# Idempotent set-up of ./.venv for the demo and the tests. Safe to run again: it only installs
# what is missing. torch is installed first and pinned through constraints.txt so that pip never
# resolves a CUDA build on a CPU-only machine (the package metadata keeps an honest range).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
python="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    "$python" -m venv .venv
fi
stamp=.venv/.distill-setup
want="$(cat pyproject.toml constraints.txt requirements-demo.txt | sha256sum | cut -c1-16)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    exit 0
fi
pip=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)
"${pip[@]}" -c constraints.txt torch
"${pip[@]}" -c constraints.txt -e ".[test,quantize,onnx,sweep]"
"${pip[@]}" --no-deps -r requirements-demo.txt
echo "$want" > "$stamp"
