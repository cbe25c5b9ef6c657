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
want="$(cat pyproject.toml constraints.txt requirements-demo.txt requirements-server.txt | sha256sum | cut -c1-16)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    exit 0
fi
pip=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)
"${pip[@]}" -c constraints.txt torch
"${pip[@]}" -c constraints.txt -e ".[test,quantize,onnx,sweep]"
"${pip[@]}" --no-deps -r requirements-demo.txt
# llama.cpp's server for the served-teacher tests, built from source once (about 1.5 minutes on 2 cores):
# only the libraries its Python bindings load (no common library, examples, tools, tests or multimodal)
CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}" \
CMAKE_ARGS="${CMAKE_ARGS:--DLLAVA_BUILD=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF -DCMAKE_PROJECT_INCLUDE=$root/launch/llama_cpp_no_common.cmake}" \
    "${pip[@]}" -c constraints.txt -r requirements-server.txt
echo "$want" > "$stamp"
