#!/usr/bin/env bash
# The test suite, offline, on CPU: set up .venv (idempotent), then pytest. Extra arguments go to
# pytest (e.g. `launch/test.sh -m "not multirank"` for the quick unit tests only).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/activate.sh"
exec python -m pytest -q -p no:cacheprovider "$@"
