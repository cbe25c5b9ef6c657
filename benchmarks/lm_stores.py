"""The causal-LM demo's distillation trained live and from each teacher cache, side by side.

    python benchmarks/lm_stores.py [--steps 60] [--work runs/bench_lm_stores]

Needs the demo's teachers (`./launch/demo_lm.sh`, or its first steps: `python -m distill.demo.assets
smollm2 ...`, `python -m distill.demo.assets general-text ...` and `distill train configs/demo_lm_domain.yaml`).

Every variant is `configs/demo_lm.yaml` with `student.trim_vocab=false` (a cache holds the teachers'
full vocabulary; trimming is refused with teachers.cache) and the config's 0.5 / 0.5 teacher weights
(so both teachers matter), the same seed, steps, data schedule and pruned student:

  live      the two SmolLM2 teachers run at every step (bf16 or fp32 as `dtype: auto` picks)
  topk      `distill cache --store topk --top-k 64`, then teachers.cache
  sampled   `distill cache --store sampled --samples 64` (64 draws: the same bytes as top-64)
  hidden    `distill cache --store hidden` (the teachers' dtype; exact full distributions)

For each: the student's validation perplexity and bits per byte on the tweets and on the held-out
prose, the cache's bytes per token (all teachers), the cache-writing and training seconds. Writes
benchmarks/results_lm_stores.json and prints a table.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STORES = {"topk": ["--store", "topk", "--top-k", "64"], "sampled": ["--store", "sampled", "--samples", "64"],
          "hidden": ["--store", "hidden"]}


def _run(args):
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "distill.cli", *map(str, args)], cwd=ROOT, capture_output=True,
                            text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{args} failed:\n{result.stderr[-3000:]}")
    return time.perf_counter() - started


def _row(name: str, run_dir: Path, seconds: float, cache: Path | None, cache_seconds: float | None) -> dict:
    report = json.loads((run_dir / "report.json").read_text())
    student = report["student"]
    logged = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    general = [row for row in logged if "student/general/perplexity" in row][-1]  # the last evaluation
    row = {"variant": name, "perplexity": student["perplexity"], "bits_per_byte": student.get("bits_per_byte"),
           "general_perplexity": general["student/general/perplexity"],
           "general_bits_per_byte": general.get("student/general/bits_per_byte"),
           "train_seconds": round(seconds, 1)}
    if cache is not None:
        meta = json.loads((cache / "meta.json").read_text())
        shards = sum(path.stat().st_size for path in cache.glob("shard_*.safetensors"))
        heads = sum(path.stat().st_size for path in cache.glob("heads.safetensors"))
        tokens = 0
        from safetensors import safe_open

        for path in cache.glob("shard_*.safetensors"):
            with safe_open(str(path), framework="pt") as handle:
                tokens += int(handle.get_tensor("offsets")[-1])
        row.update({"bytes_per_token": round(shards / tokens, 1), "heads_bytes": heads, "tokens": tokens,
                    "cache_seconds": round(cache_seconds, 1), "store": meta["store"]})
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--work", default="runs/bench_lm_stores")
    parser.add_argument("--variants", default="live,topk,sampled,hidden")
    args = parser.parse_args()
    teacher = ROOT / "runs/demo_lm/teacher-domain/student/model.safetensors"
    if not teacher.is_file():
        raise SystemExit(f"{teacher} is missing: run ./launch/demo_lm.sh (or its domain-teacher step) first")
    work = ROOT / args.work
    work.mkdir(parents=True, exist_ok=True)
    config = ROOT / "configs" / "demo_lm.yaml"
    common = ["student.trim_vocab=false", f"training.max_steps={args.steps}", "training.checkpoint_every=1000",
              "training.keep_checkpoints=0"]
    rows = []
    for name in args.variants.split(","):
        run_dir = work / name
        if name == "live":
            seconds = _run(["train", config, f"output_dir={run_dir}", *common])
            rows.append(_row(name, run_dir, seconds, None, None))
        else:
            cache = work / f"cache_{name}"
            cache_seconds = _run(["cache", config, *common, "--out", cache, *STORES[name]])
            seconds = _run(["train", config, f"output_dir={run_dir}", f"teachers.cache={cache}", *common])
            rows.append(_row(name, run_dir, seconds, cache, cache_seconds))
        print(json.dumps(rows[-1]), flush=True)
    print(f"\n{'variant':<8} {'tweets ppl':>10} {'bits/byte':>9} {'prose ppl':>9} {'B/token':>8} {'cache s':>7} "
          f"{'train s':>7}")
    for row in rows:
        print(f"{row['variant']:<8} {row['perplexity']:>10.2f} {row['bits_per_byte']:>9.3f} "
              f"{row['general_perplexity'] or float('nan'):>9.2f} {row.get('bytes_per_token', 0):>8.0f} "
              f"{row.get('cache_seconds', 0):>7.0f} {row['train_seconds']:>7.0f}")
    (ROOT / "benchmarks" / "results_lm_stores.json").write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
