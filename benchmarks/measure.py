"""What the benchmark scripts share: each variant runs in fresh processes, one timed, one measuring
peak memory with a fixed glibc mmap threshold (every large tensor is its own mapping, returned to
the system when freed, so the peak RSS is the peak of live tensors; the adaptive threshold would let
freed chunks pile up on the heap). Time is measured without it, since it changes allocation cost."""
from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
from pathlib import Path


def current_rss_bytes() -> int:
    with open("/proc/self/statm") as stream:
        return int(stream.read().split()[1]) * resource.getpagesize()


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def quantiles(times):
    """p20, p50, p80 of a list of durations."""
    times = sorted(times)
    return [times[min(len(times) - 1, int(q * len(times)))] for q in (0.2, 0.5, 0.8)]


def measure(script: str, variant: str, teachers: int, forwarded) -> dict:
    """The variant's timing row, with `peak_bytes` from a second process."""
    command = [sys.executable, script, "--one", variant, str(teachers), *forwarded]
    timed = subprocess.run(command + ["--measure", "time"], check=True, capture_output=True, text=True).stdout
    row = json.loads(timed.strip().splitlines()[-1])
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")
    measured = subprocess.run(command + ["--measure", "memory"], check=True, capture_output=True, text=True,
                              env=env).stdout
    row["peak_bytes"] = json.loads(measured.strip().splitlines()[-1])["peak_bytes"]
    print(f"  measured {variant} K={teachers}", file=sys.stderr, flush=True)
    return row


def emit_rows(rows, json_path: Path = None) -> None:
    for row in rows:
        print(json.dumps(row))
    if json_path:
        Path(json_path).write_text("\n".join(json.dumps(row) for row in rows) + "\n")


def add_variant_arguments(parser) -> None:
    """The hidden options a benchmark passes to the processes that run one variant each."""
    import argparse

    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    parser.add_argument("--one", nargs=2, metavar=("VARIANT", "K"), help=argparse.SUPPRESS)
    parser.add_argument("--measure", choices=["memory", "time"], default="time", help=argparse.SUPPRESS)


def ran_one_variant(args, run_variant) -> bool:
    """In a variant's process: run it, print its row, return True."""
    if not args.one:
        return False
    print(json.dumps(run_variant(args.one[0], int(args.one[1]), args)))
    return True
