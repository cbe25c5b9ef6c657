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


def measure_time(script: str, variant: str, teachers: int, forwarded) -> dict:
    command = [sys.executable, script, "--one", variant, str(teachers), *forwarded, "--measure", "time"]
    timed = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return json.loads(timed.strip().splitlines()[-1])


def measure_memory(script: str, variant: str, teachers: int, forwarded) -> int:
    command = [sys.executable, script, "--one", variant, str(teachers), *forwarded, "--measure", "memory"]
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")
    measured = subprocess.run(command, check=True, capture_output=True, text=True, env=env).stdout
    return json.loads(measured.strip().splitlines()[-1])["peak_bytes"]


def measure_in_rounds(script: str, variants, forwarded, rounds: int) -> list:
    """Timing rows for every (variant, K), taken `rounds` times round-robin (so a burst of load on a
    shared machine hits one round of one variant, not one variant's only run); each variant keeps
    its round with the lowest p50, with every round's p50 in `p50_rounds_s`. Peak memory once."""
    best = {}
    for round_number in range(rounds):
        for variant, teachers in variants:
            row = measure_time(script, variant, teachers, forwarded)
            key = (variant, teachers)
            seen = best.get(key, {}).get("p50_rounds_s", [])
            if key not in best or row["p50_s"] < best[key]["p50_s"]:
                best[key] = row
            best[key]["p50_rounds_s"] = seen + [row["p50_s"]]
            print(f"  timed {variant} K={teachers} (round {round_number + 1}/{rounds})", file=sys.stderr, flush=True)
    rows = []
    for variant, teachers in variants:
        row = best[(variant, teachers)]
        row["peak_bytes"] = measure_memory(script, variant, teachers, forwarded)
        rows.append(row)
    return rows


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
