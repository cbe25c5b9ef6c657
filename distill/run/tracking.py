"""Metrics out of the run: a JSON-lines file, TensorBoard events, and a PNG of the curves.

Only rank 0 writes; other ranks get a logger that drops everything.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Dict, List, Optional


class MetricsLogger:
    def __init__(self, run_dir: Path, enabled: bool = True):
        self.enabled = enabled
        self.path = run_dir / "metrics.jsonl"
        self._writer = None
        if enabled:
            drop_torn_line(self.path)
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"))

    def log(self, step: int, values: Dict[str, float], kind: str = "train") -> None:
        if not self.enabled:
            return
        row = {"kind": kind, "step": step, "time": time.time(), **values}
        with self.path.open("a", encoding="utf-8") as stream:
            stream.write(json.dumps(row) + "\n")
        for name, value in values.items():
            if isinstance(value, (int, float)) and math.isfinite(value):
                self._writer.add_scalar(f"{kind}/{name}", value, step)
        self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()


def drop_torn_line(path: Path) -> None:
    """A run killed in the middle of a write leaves a last line without its newline: cut it, so that
    a resumed run's lines start on a line of their own (the killed run's rows after its last
    checkpoint are logged again by the resumed run anyway)."""
    if not path.is_file():
        return
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        with path.open("r+b") as stream:
            stream.truncate(data.rfind(b"\n") + 1)


def read_metrics(path: Path) -> List[Dict]:
    """The rows of metrics.jsonl; a torn last line (a kill mid-write) is left out."""
    if not path.is_file():
        return []
    rows = []
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    for number, line in enumerate(lines):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if number != len(lines) - 1:
                raise
    return rows


def plot_curves(metrics_path: Path, out_path: Path, title: Optional[str] = None, metric: str = "accuracy",
                higher_is_better: bool = True) -> Optional[Path]:
    """Training losses (total, KD, CE, and KD per route) and the validation `metric` (the task's:
    accuracy, or perplexity on a log scale) of the student, per evaluation domain and route too, against optimizer step,
    with each teacher's and the target's value as dashed references; a PNG."""
    rows = read_metrics(metrics_path)
    train = [r for r in rows if r["kind"] == "train"]
    evals = [r for r in rows if r["kind"] == "eval" and f"student/{metric}" in r]
    if not train:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (loss_axis, metric_axis) = plt.subplots(1, 2, figsize=(13, 4.2))
    steps = [r["step"] for r in train]
    marker = "o" if len(steps) < 4 else None  # a line of one point draws nothing
    distilled = any(r.get("kd", 0) != 0 for r in train)
    # without KD the total is the CE: one curve, named so, instead of two on top of each other
    curves = ((("loss", "total", "-"), ("kd", "KD (T^2 D)", "-"), ("ce", "CE", "--")) if distilled
              else (("ce", "CE (fine-tuning: the whole loss)", "-"),))
    for key, label, style in curves:
        if key in train[0]:
            loss_axis.plot(steps, [r[key] for r in train], linestyle=style, marker=marker, label=label)
    routes = sorted({key for r in train for key in r if key.startswith("route/") and key.endswith("/kd")})
    for key in routes:  # the KD term per route (teachers.route_by): each route's own teachers' target
        loss_axis.plot([r["step"] for r in train if key in r], [r[key] for r in train if key in r], linestyle=":",
                       marker=marker, label=f"KD on route {key.split('/')[1]}")
    loss_axis.set_xlabel("optimizer step")
    loss_axis.set_ylabel("loss")
    loss_axis.legend()
    loss_axis.set_title("training loss")
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    if evals:
        eval_steps = [r["step"] for r in evals]
        metric_axis.plot(eval_steps, [r[f"student/{metric}"] for r in evals], "o-", label="student (validation)")
        domains = [key.split("/")[1] for key in sorted(evals[-1])
                   if key.startswith("student/") and key.endswith(f"/{metric}") and key.count("/") == 2]
        for number, domain in enumerate(domains):  # per-domain curves of the student (data.eval_domains)
            colour = colours[(number + 4) % len(colours)]
            metric_axis.plot(eval_steps, [r.get(f"student/{domain}/{metric}") for r in evals], ".-", linewidth=1,
                             color=colour, label=f"student on {domain}")
        references = [key for key in sorted(evals[-1]) if key.endswith(f"/{metric}") and key.count("/") == 1
                      and key != f"student/{metric}"]
        for number, key in enumerate(references):  # the target dotted and wider: it may sit on a teacher's line
            target = key.startswith("target/")
            # the value in the label: lines that coincide (a target equal to its best teacher) stay told apart
            metric_axis.axhline(evals[-1][key], linestyle=":" if target else "--", linewidth=2.6 if target else 1.2,
                                color=colours[(number + 1) % len(colours)],
                                label=f"{key.split('/')[0]} ({evals[-1][key]:.4g})")
        metric_axis.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # beside, never over, the curves
    if not higher_is_better:
        metric_axis.set_yscale("log")
    from matplotlib.ticker import MaxNLocator

    last = max(steps + [r["step"] for r in evals])
    for axis in (loss_axis, metric_axis):  # one step axis for both panels, whole steps only
        axis.set_xlim(0, last * 1.04 + 0.5)
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
    metric_axis.set_xlabel("optimizer step")
    metric_axis.set_ylabel(f"validation {metric} ({'higher' if higher_is_better else 'lower'} is better)")
    metric_axis.set_title("validation")
    if title:
        figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(out_path, dpi=100)
    plt.close(figure)
    return out_path
