"""What a teacher with another tokenizer costs against a shared-tokenizer one, side by side.

    python benchmarks/cross_tokenizer.py [--steps 20] [--rounds 2] [--work runs/bench_cross_tokenizer]

Needs SmolLM2 (`python -m distill.demo.assets smollm2 runs/demo_lm/assets/smollm2-135m`) and, for the
third arm, the cross-tokenizer demo's tweets teacher (`./launch/demo_lm_cross.sh`, or its first steps).

One SmolLM2-135M teacher, one student (SmolLM2 pruned by depth to half its parameters), the same
tweets, seed and steps; the arms differ only in how the teacher reaches the student's vocabulary:

  shared     the teacher shares the student's tokenizer (today's exact path)
  permuted   the same teacher with every token id permuted (tokenizer and embeddings alike), under
             teachers.tokenization=per_model: it goes through the whole cross-tokenizer path (its own
             windows, gathering at aligned positions, log-softmax and the map onto the student's
             vocabulary a chunk at a time, no streamed fast path) and gives the same target, so the
             difference is the path's cost alone
  +tweets    shared SmolLM2 plus the 5M own-BPE tweets teacher (another real tokenizer, per_model)

Per arm: training samples per second (the mean of the logged steps after the first logging
interval), the process's peak resident memory, the final KD term. Arms run round-robin `--rounds`
times (the best round counts). Writes benchmarks/results_cross_tokenizer.json and prints ratios to
the shared arm.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SMOLLM2 = ROOT / "runs/demo_lm/assets/smollm2-135m"
TWEETS_TEACHER = ROOT / "runs/demo_lm_cross/teacher-tweets/student"
# runs the CLI in this process and prints its peak RSS last (ru_maxrss of this process)
RUNNER = ("import resource, runpy, sys\nsys.argv = ['distill'] + sys.argv[1:]\ntry:\n"
          "    runpy.run_module('distill.cli', run_name='__main__')\nexcept SystemExit as stop:\n"
          "    code = stop.code\nelse:\n    code = 0\n"
          "print('PEAK_RSS', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, flush=True)\nsys.exit(code)\n")


def arms(work: Path):
    common = ["student.from_teacher=null", f"student.path={SMOLLM2}", "teachers.dtype=float32"]
    shared = [*common, "teachers.tokenization=shared", f"teachers.models=[{{name: general, path: {SMOLLM2}}}]"]
    permuted = [*common, "teachers.tokenization=per_model",
                f"teachers.models=[{{name: general, path: {work / 'smollm2-permuted'}}}]"]
    both = [*common, "teachers.tokenization=per_model",
            f"teachers.models=[{{name: general, path: {SMOLLM2}, weight: 0.5}}, "
            f"{{name: tweets, path: {TWEETS_TEACHER}, weight: 0.5}}]"]
    return {"shared": shared, "permuted": permuted, "+tweets": both}


def run_arm(name: str, overrides, work: Path, steps: int) -> dict:
    run_dir = work / f"{name.strip('+')}-{len(list(work.glob(name.strip('+') + '-*')))}"
    command = [sys.executable, "-c", RUNNER, "train", str(ROOT / "configs/demo_lm_cross.yaml"),
               f"output_dir={run_dir}", f"training.max_steps={steps}", "training.eval_every=0",
               "training.checkpoint_every=1000", "training.keep_checkpoints=0", "interpolation.fit_on=null",
               "training.log_every=2", *overrides]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{name} failed:\n{result.stderr[-3000:]}")
    peak = int(next(line.split()[1] for line in result.stdout.splitlines() if line.startswith("PEAK_RSS")))
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    train = [row for row in rows if row.get("kind") == "train"]
    speeds = [row["samples_per_s"] for row in train[1:] if "samples_per_s" in row]
    return {"arm": name, "samples_per_s": sum(speeds) / max(len(speeds), 1), "peak_rss_bytes": peak,
            "kd_last": train[-1]["kd"], "coverage": {k: v for k, v in train[-1].items() if k.startswith("coverage/")},
            "run_dir": str(run_dir.relative_to(ROOT))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--work", default="runs/bench_cross_tokenizer")
    parser.add_argument("--arms", default="shared,permuted,+tweets")
    args = parser.parse_args()
    if not SMOLLM2.is_dir():
        raise SystemExit(f"{SMOLLM2} is missing: python -m distill.demo.assets smollm2 {SMOLLM2.relative_to(ROOT)}")
    work = ROOT / args.work
    work.mkdir(parents=True, exist_ok=True)
    if not (work / "smollm2-permuted" / "model.safetensors").is_file():
        sys.path.insert(0, str(ROOT))
        from transformers import AutoTokenizer

        from tests.helpers import permuted_copy

        permuted_copy(work / "smollm2-permuted", AutoTokenizer.from_pretrained(SMOLLM2), SMOLLM2, seed=0)
    chosen = [arm for arm in args.arms.split(",") if arm != "+tweets" or TWEETS_TEACHER.is_dir()]
    best = {}
    for round_number in range(args.rounds):
        for name in chosen:
            row = run_arm(name, arms(work)[name], work, args.steps)
            if name not in best or row["samples_per_s"] > best[name]["samples_per_s"]:
                best[name] = row
            print(f"round {round_number + 1}: {json.dumps(row)}", flush=True)
    base = best["shared"]
    print(f"\n{'arm':<9} {'samples/s':>9} {'x shared':>8} {'peak RSS':>9} {'x shared':>8} {'KD (last)':>9}  coverage")
    for name in chosen:
        row = best[name]
        row["speed_vs_shared"] = row["samples_per_s"] / base["samples_per_s"]
        row["memory_vs_shared"] = row["peak_rss_bytes"] / base["peak_rss_bytes"]
        print(f"{name:<9} {row['samples_per_s']:>9.2f} {row['speed_vs_shared']:>8.2f} "
              f"{row['peak_rss_bytes'] / 2**30:>8.2f}G {row['memory_vs_shared']:>8.2f} {row['kd_last']:>9.4f}  "
              f"{row['coverage']}")
    (ROOT / "benchmarks" / "results_cross_tokenizer.json").write_text(json.dumps(list(best.values()), indent=1) + "\n")


if __name__ == "__main__":
    main()
