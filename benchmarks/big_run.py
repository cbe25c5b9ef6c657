"""Bigger than a toy, on this machine: teachers of 1.59B parameters together, a prepared corpus of
10^8 tokens, 20 optimizer steps on 2 ranks, exported; its peak memory next to `distill plan`'s
prediction and its step time next to the same run with two 135M teachers (SmolLM2).

Teachers (random weights in bf16, built from configs: no registry package ships weights this large):
  big   1.07B  Llama-3.2-1B's shape with SmolLM2's 49,152-token vocabulary (plan_vs_peak.make_big_teacher)
  mid   0.52B  hidden 1152, 24 layers, GQA 16/4, SwiGLU 4608, same vocabulary
Student: SmolLM2-135M (real weights, all 30 layers: the same student for both teacher sets), ZeRO-2,
blocks of 256 tokens, 2 blocks per rank per step. Corpus: benchmarks/corpus_scale.py's 10^8-token corpus (real tweets repeated, numbered),
prepared once by that benchmark (`--keep`) and reused here from the same folders.

    python benchmarks/corpus_scale.py --sizes 1e8 --keep        # once: the corpus and its prepared blocks
    python benchmarks/big_run.py [--steps 20] [--ranks 2]

Prints a table and writes benchmarks/results_big_run.json.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from plan_vs_peak import BIG, SMOL, make_big_teacher, make_random_llama  # noqa: E402

MID = "runs/plan/llama-0.5b"
CORPUS = ROOT / "runs" / "corpus_scale" / "tokens_1e+08"


def make_mid_teacher(folder: Path) -> None:
    """0.52B parameters: hidden 1152, 24 layers, GQA 16/4, SwiGLU 4608."""
    make_random_llama(folder, 1, hidden_size=1152, intermediate_size=4608, num_hidden_layers=24,
                      num_attention_heads=16, num_key_value_heads=4)


def config_text(out: Path, teachers, steps: int) -> str:
    models = "\n".join(f"    - {{name: {name}, path: {ROOT / path}}}" for name, path in teachers)
    return f"""task: causal_lm
output_dir: {out}
seed: 0
teachers:
  dtype: bfloat16
  models:
{models}
student:
  path: {ROOT / SMOL}
loss: {{kd_alpha: 0.5, temperature: 2.0}}
data:
  train: {{path: {CORPUS / 'train.jsonl'}}}
  validation: {{path: {CORPUS / 'validation_small.jsonl'}}}
  text_fields: [text]
  block_size: 256
  drop_duplicate_texts: false
  prepare: true
  prepared_dir: {CORPUS / 'prepared'}
training:
  max_steps: {steps}
  micro_batch_size: 2
  eval_batch_size: 2
  eval_every: 0
  log_every: 1
  checkpoint_every: {steps}
  keep_checkpoints: 0
  progress_bar: false
deepspeed: {{zero_stage: 2}}
"""


def run(config: Path, ranks: int, env: dict) -> dict:
    """Wall seconds and peak RSS (largest process) of a `ranks`-rank `distill train`."""
    from tests.helpers import free_port

    command = ["deepspeed", "--num_gpus", str(ranks), "--master_port", str(free_port()), "--module", "distill.cli",
               "train", str(config)]
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    start = time.perf_counter()
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    if result.returncode != 0:
        raise SystemExit(f"{config}: exit {result.returncode}\n{(result.stdout + result.stderr)[-4000:]}")
    return {"seconds": seconds, "peak_bytes": peak * 1024, "peak_is_fresh": peak > before,
            "stdout": result.stdout[-6000:]}


def step_seconds(run_dir: Path, global_rows: int) -> dict:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    speeds = [row["samples_per_s"] for row in rows if row["kind"] == "train" and "samples_per_s" in row]
    steady = [global_rows / speed for speed in speeds[1:]] or [global_rows / speeds[0]]  # the first window warms up
    return {"median_s": statistics.median(steady), "windows": len(speeds)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--only", choices=["big", "small"], default=None)
    args = parser.parse_args()
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               HF_DATASETS_CACHE=str(CORPUS / "datasets_cache"),
               PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    os.environ.update({key: env[key] for key in ("HF_HUB_OFFLINE", "HF_DATASETS_CACHE")})
    if not (CORPUS / "train.jsonl").is_file():
        raise SystemExit(f"{CORPUS / 'train.jsonl'} is missing: python benchmarks/corpus_scale.py --sizes 1e8 --keep")
    with (CORPUS / "train.jsonl").open(encoding="utf-8") as stream, \
            (CORPUS / "validation_small.jsonl").open("w", encoding="utf-8") as out:
        for _, line in zip(range(2), stream):  # two documents: a short final evaluation at 1.6B parameters
            out.write(line)
    make_big_teacher(ROOT / BIG)
    make_mid_teacher(ROOT / MID)
    from distill.api import load_config, plan

    runs = {"big": [("big", BIG), ("mid", MID)], "small": [("smol_a", SMOL), ("smol_b", SMOL)]}
    out_file = ROOT / "benchmarks" / "results_big_run.json"
    # --only: one run in a fresh process (its own peak), the other's figures kept
    results = json.loads(out_file.read_text()) if args.only and out_file.is_file() else {}
    for name, teachers in runs.items():
        if args.only and args.only != name:
            continue
        out = ROOT / "runs" / "big_run" / name
        shutil.rmtree(out, ignore_errors=True)
        config = ROOT / "runs" / "big_run" / f"{name}.yaml"
        config.parent.mkdir(parents=True, exist_ok=True)
        config.write_text(config_text(out, teachers, args.steps))
        planned = plan(load_config(str(config)), args.ranks)
        measured = run(config, args.ranks, env)
        report = json.loads((out / "report.json").read_text())
        results[name] = {
            "teachers": [{"name": t["name"], "params": t["params"]} for t in report["teachers"]],
            "teacher_params": sum(t["params"] for t in report["teachers"]), "student_params": report["student"]["params"],
            "train_blocks": report["training"]["train_rows"],
            "planned_bytes": planned["total"], "peak_bytes": measured["peak_bytes"],
            "planned_over_peak": planned["total"] / measured["peak_bytes"], "wall_s": measured["seconds"],
            "step": step_seconds(out, 2 * args.ranks), "exported": (out / "student" / "model.safetensors").is_file(),
            "corpus_line": next((line for line in measured["stdout"].splitlines() if "data.train:" in line), None),
            "student_perplexity": report["student"].get("perplexity"),
            "plan_table": planned["table"]}
        row = results[name]
        if not measured["peak_is_fresh"]:
            print("  (peak not above an earlier run's: run it alone with --only)", flush=True)
        print(f"{name}: teachers {row['teacher_params'] / 1e9:.2f}B, plan {row['planned_bytes'] / 2**30:.2f} GiB, "
              f"measured {row['peak_bytes'] / 2**30:.2f} GiB ({row['planned_over_peak']:.2f}x), step "
              f"{row['step']['median_s']:.1f} s, wall {row['wall_s']:.0f} s, exported {row['exported']}", flush=True)
    if "big" in results and "small" in results:
        print(f"step time, 1.59B teachers / 135M teachers: "
              f"{results['big']['step']['median_s'] / results['small']['step']['median_s']:.1f}x")
    out_file.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
