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
# llama.cpp's server for the served-teacher tests is built from source (about 1.5 minutes on 2 cores),
# only the libraries its Python bindings load (no common library, examples, tools, tests or multimodal).
# The build starts first, into a folder of its own, and compiles while the rest downloads and installs.
wheels="$(mktemp -d)"
trap 'kill "${build:-}" 2>/dev/null || true; rm -rf "$wheels"' EXIT
CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}" \
CMAKE_ARGS="${CMAKE_ARGS:--DLLAVA_BUILD=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF -DCMAKE_PROJECT_INCLUDE=$root/launch/llama_cpp_no_common.cmake}" \
    .venv/bin/python -m pip wheel --quiet --disable-pip-version-check --no-deps -c constraints.txt \
    -r requirements-server.txt -w "$wheels" > "$wheels/build.log" 2>&1 &
build=$!
"${pip[@]}" -c constraints.txt torch
"${pip[@]}" -c constraints.txt -e ".[test,quantize,onnx,sweep]"
if ! wait "$build"; then
    cat "$wheels/build.log" >&2
    echo "launch/setup.sh: building llama-cpp-python failed (its log is above)" >&2
    exit 1
fi
"${pip[@]}" -c constraints.txt --find-links "$wheels" -r requirements-server.txt
# last: installed without their declared dependencies, which pip's check on a later install would name
"${pip[@]}" --no-deps -r requirements-demo.txt
echo "$want" > "$stamp"
