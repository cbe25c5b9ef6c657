#!/usr/bin/env bash
# The test suite, offline, on CPU: set up .venv (idempotent), then pytest on two workers (pytest-xdist;
# a test file stays on one worker, so its module fixtures are built once). Extra arguments go to
# pytest (e.g. `launch/test.sh -m "not slow and not multirank"` for the quick tests only, or
# `DISTILL_TEST_WORKERS=0 launch/test.sh` for one process).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/activate.sh"
workers="${DISTILL_TEST_WORKERS:-2}"
# The workers share the cores: each one's intra-op threads (and those of the runs it starts) get its
# share. Two workers of two threads each on 2 cores made the suite 15% slower (755 s against 641 s):
# oversubscribed OpenMP threads wait on each other, most of all beside a launcher run's ranks.
[[ "$workers" =~ ^[0-9]+$ ]] || { echo "launch/test.sh: DISTILL_TEST_WORKERS takes a whole number >= 0, got '$workers'" >&2; exit 2; }
threads=$(( workers > 0 ? $(nproc) / workers : $(nproc) ))
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(( threads > 0 ? threads : 1 ))}"
exec python -m pytest -q -p no:cacheprovider -n "$workers" --dist loadfile "$@"
