"""Metric modules shipped inside the package and loaded by path with `evaluate.load`.

`evaluate.load("accuracy")` fetches a script from the hub, which fails offline; these modules are
ordinary `evaluate.Metric` scripts in the package, so evaluation never needs the network.
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, Sequence

METRICS_DIR = Path(__file__).resolve().parent


def load_metric(name: str):
    """An `evaluate` metric from this package's `metrics/<name>/<name>.py`, in memory only."""
    import evaluate

    script = METRICS_DIR / name / f"{name}.py"
    if not script.is_file():
        raise KeyError(f"no packaged metric {name!r}; available: {sorted(p.name for p in METRICS_DIR.iterdir() if p.is_dir() and not p.name.startswith('_'))}")
    return evaluate.load(str(script), keep_in_memory=True)


def classification_metrics(predictions: Sequence[int], references: Sequence[int], num_labels: int) -> Dict[str, float]:
    """accuracy and macro-F1 through the packaged `evaluate` modules. Macro-F1 averages over the
    labels present in the gold or the predicted labels (scikit-learn's `f1_score(average="macro")`):
    a configured label that never occurs and is never predicted does not count as an F1 of 0."""
    accuracy = load_metric("accuracy").compute(predictions=predictions, references=references)["accuracy"]
    present = sorted(set(int(p) for p in predictions) | set(int(r) for r in references))
    f1 = load_metric("f1").compute(predictions=predictions, references=references, average="macro",
                                   labels=present)["f1"]
    return {"accuracy": float(accuracy), "macro_f1": float(f1)}
