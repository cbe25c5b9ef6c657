#!/usr/bin/env bash
# The test suite, offline, on CPU: set up .venv (idempotent), then pytest on two workers (pytest-xdist;
# a test file stays on one worker, so its module fixtures are built once). Extra arguments go to
# pytest (e.g. `launch/test.sh -m "not slow and not multirank"` for the quick tests only, or
# `launch/test.sh -n 0` for one process).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/activate.sh"
exec python -m pytest -q -p no:cacheprovider -n "${DISTILL_TEST_WORKERS:-2}" --dist loadfile "$@"
