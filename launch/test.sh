#!/usr/bin/env bash
# The test suite, offline, on CPU: set up .venv (idempotent), then pytest. Extra arguments go to
# pytest (e.g. `launch/test.sh -m "not multirank"` for the quick unit tests only).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
bash launch/setup.sh
source .venv/bin/activate
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec python -m pytest -q -p no:cacheprovider "$@"
