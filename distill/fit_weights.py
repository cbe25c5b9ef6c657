"""`distill fit-weights CONFIG`: run the teachers once over validation and fit how to mix them.

Also used by `distill train` when `interpolation.fit_on=validation`. Fitting happens on rank 0 from
the gathered validation logits and is broadcast, so every rank mixes with identical weights.

The table compares, on the validation labels: each teacher alone, the uniform mixes, and the
fitted mixes (EM for linear, simplex-convex for geometric, optionally with temperature scaling),
by NLL, accuracy and expected calibration error. It is written with a PNG chart and a YAML
fragment that `distill train CONFIG --weights FRAGMENT` merges.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Dict, List, Optional

import torch
from torch import Tensor

from distill.fitting import (expected_calibration_error, fit_gate, fit_geometric_weights, fit_jointly,
                             fit_linear_weights_em, fit_temperature, mean_nll, mixture_log_probs)
from distill.interpolate import teacher_log_probs


def fit_interpolation_state(method: str, logits: Tensor, labels: Tensor, weights: Tensor, temperatures: Tensor,
                            fit_temperatures: bool, gate_options: Optional[Dict] = None, seed: int = 0) -> Dict:
    """Fitted {'weights', 'temperatures', 'gate'} for a strategy, from validation logits [K, N, C]."""
    temperatures = temperatures.clone()
    if fit_temperatures:
        temperatures = torch.tensor([fit_temperature(logits[k], labels) for k in range(logits.shape[0])])
    log_probs = teacher_log_probs(logits.double(), temperatures)
    gate_state = {}
    if method == "linear":
        weights = fit_linear_weights_em(log_probs, labels).weights
    elif method == "geometric":
        weights = fit_geometric_weights(log_probs, labels)
    elif method == "learned_gate":
        options = dict(gate_options or {})
        gate = fit_gate(torch.log_softmax(logits.double(), -1), labels, hidden=options.get("hidden", 32),
                        use_entropy=options.get("use_entropy", True), epochs=options.get("epochs", 200),
                        learning_rate=options.get("learning_rate", 1e-2), seed=seed)
        gate_state = {k: v.detach().clone() for k, v in gate.state_dict().items()}
    else:
        raise ValueError(f"cannot fit interpolation {method!r}")
    return {"method": method, "weights": [float(w) for w in weights], "temperatures": [float(t) for t in temperatures],
            "gate": gate_state}


def state_digest(state: Dict) -> str:
    """A short hash of a fitted state, printed by every rank so agreement can be checked."""
    digest = hashlib.sha256(json.dumps({k: state[k] for k in ("weights", "temperatures")}).encode())
    for name in sorted(state.get("gate", {})):
        digest.update(state["gate"][name].float().numpy().tobytes())
    return digest.hexdigest()[:16]


def save_state(state: Dict, folder: Path) -> None:
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "state.json").write_text(json.dumps({k: v for k, v in state.items() if k != "gate"}, indent=2))
    if state.get("gate"):
        save_file({k: v.contiguous() for k, v in state["gate"].items()}, str(folder / "gate.safetensors"))


def load_state(folder: Path) -> Optional[Dict]:
    from safetensors.torch import load_file

    if not (folder / "state.json").is_file():
        return None
    state = json.loads((folder / "state.json").read_text())
    gate_path = folder / "gate.safetensors"
    state["gate"] = load_file(str(gate_path)) if gate_path.is_file() else {}
    return state


def _row(name: str, log_probs: Tensor, labels: Tensor, weights: Optional[List[float]] = None,
         temperatures: Optional[List[float]] = None) -> Dict:
    accuracy = float((log_probs.argmax(-1) == labels).double().mean())
    return {"name": name, "nll": mean_nll(log_probs, labels), "accuracy": accuracy,
            "ece": expected_calibration_error(log_probs, labels), "weights": weights, "temperatures": temperatures}


def comparison_table(names: List[str], logits: Tensor, labels: Tensor, fit_temperatures: bool) -> Dict:
    """Rows for each teacher alone, the uniform mixes and the fitted mixes, at temperature 1 (and,
    with fit_temperatures, at each teacher's fitted temperature)."""
    logits = logits.double()
    count = logits.shape[0]
    ones = torch.ones(count, dtype=torch.float64)
    uniform = (ones / count).tolist()
    rows = [_row(f"teacher {name}", torch.log_softmax(logits[k], -1), labels, temperatures=[1.0])
            for k, name in enumerate(names)]
    variants = [("", ones)]
    if fit_temperatures:
        fitted = torch.tensor([fit_temperature(logits[k], labels) for k in range(count)], dtype=torch.float64)
        rows += [_row(f"teacher {name} (T={fitted[k]:.2f})", torch.log_softmax(logits[k] / fitted[k], -1), labels,
                      temperatures=[float(fitted[k])]) for k, name in enumerate(names)]
        variants.append((" +T", fitted))
    fits = {}
    for suffix, temperatures in variants:
        log_probs = teacher_log_probs(logits, temperatures)
        for method in ("linear", "geometric"):
            rows.append(_row(f"uniform {method}{suffix}", mixture_log_probs(method, log_probs, torch.tensor(uniform)),
                             labels, uniform, temperatures.tolist()))
            if method == "linear":
                em = fit_linear_weights_em(log_probs, labels)
                weights, trace = em.weights, em.log_likelihoods
            else:
                weights, trace = fit_geometric_weights(log_probs, labels), None
            row = _row(f"fitted {method}{suffix}", mixture_log_probs(method, log_probs, weights), labels,
                       weights.tolist(), temperatures.tolist())
            if trace is not None:
                row["em_log_likelihood_trace"] = trace
            rows.append(row)
            fits[f"{method}{suffix}"] = row
            if suffix:  # temperatures and weights fitted jointly, from the sequential fit
                joint_weights, joint_temperatures = fit_jointly(logits, labels, method, weights, temperatures)
                joint = _row(f"fitted {method} joint", mixture_log_probs(
                    method, teacher_log_probs(logits, joint_temperatures), joint_weights), labels,
                    joint_weights.tolist(), joint_temperatures.tolist())
                rows.append(joint)
                fits[f"{method} joint"] = joint
    return {"rows": rows, "fits": fits}


def format_fit_table(rows: List[Dict]) -> str:
    from distill.report import text_table

    cells = []
    for row in rows:
        weights = ", ".join(f"{w:.3f}" for w in row["weights"]) if row["weights"] else "-"
        temperatures = ", ".join(f"{t:.2f}" for t in row["temperatures"]) if row["temperatures"] else "-"
        cells.append((row["name"], f"{row['nll']:.4f}", f"{row['accuracy']:.4f}", f"{row['ece']:.4f}", weights, temperatures))
    return text_table(("mix", "NLL", "accuracy", "ECE", "weights", "temperatures"), cells)


def plot_fit_table(rows: List[Dict], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    names = [row["name"] for row in rows]
    figure, axes = plt.subplots(1, 3, figsize=(14, 0.35 * len(rows) + 1.8), sharey=True)
    for axis, key, label in zip(axes, ("nll", "accuracy", "ece"), ("validation NLL (lower is better)",
                                                                    "accuracy (higher is better)",
                                                                    "expected calibration error (lower)")):
        colours = ["tab:grey" if n.startswith("teacher") else "tab:blue" if n.startswith("uniform") else "tab:green"
                   for n in names]
        axis.barh(range(len(rows)), [row[key] for row in rows], color=colours)
        axis.set_title(label, fontsize=10)
        axis.set_xlim(min(row[key] for row in rows) * 0.95, max(row[key] for row in rows) * 1.02)
        axis.xaxis.set_major_locator(MaxNLocator(4))
    axes[0].set_yticks(range(len(rows)))
    axes[0].set_yticklabels(names, fontsize=8)
    axes[0].invert_yaxis()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def weights_fragment(cfg, names: List[str], fit: Dict, method: str, with_temperatures: bool) -> str:
    """A YAML fragment for `distill train --weights`: the full teacher list with fitted values."""
    import yaml

    models = []
    for index, teacher in enumerate(cfg.teachers.models):
        entry = {"name": names[index], "path": teacher.path, "weight": round(fit["weights"][index], 6)}
        temperature = fit["temperatures"][index] if with_temperatures else teacher.temperature
        if temperature is not None:
            entry["temperature"] = round(float(temperature), 6)
        models.append(entry)
    return yaml.safe_dump({"teachers": {"models": models}, "interpolation": {"method": method}}, sort_keys=False)


def run_fit_weights(cfg, out_dir: Path, fit_temperatures: bool = False, method: Optional[str] = None) -> Dict:
    """The `distill fit-weights` command: one process, no student."""
    from distill.config import ConfigError, teacher_display_name
    from distill.data import Collator, read_splits, tokenize
    from distill.distributed import init_distributed
    from distill.evaluation import collect_teacher_logits, validation_loader
    from distill.hardware import local_device, teacher_dtype
    from distill.teachers import load_teachers, plan_teachers

    if not cfg.teachers.models:
        raise ConfigError("teachers.models is empty: fit-weights needs at least one teacher")
    method = method or (cfg.interpolation.method if cfg.interpolation.method in ("linear", "geometric") else "linear")
    splits = read_splits(cfg.data)
    plans, groups = plan_teachers(cfg, splits.label_names, None)
    init_distributed()
    device = local_device()
    ensemble = load_teachers(cfg, plans, device, teacher_dtype(cfg.teachers.dtype, device))
    validation = tokenize(splits.validation, groups, cfg.data.text_fields, cfg.data.max_length)
    loader = validation_loader(validation, Collator(groups), cfg.training.eval_batch_size)
    logits, labels = collect_teacher_logits(loader, ensemble, device)
    names = [teacher_display_name(t, i) for i, t in enumerate(cfg.teachers.models)]
    table = comparison_table(names, logits, labels, fit_temperatures)
    out_dir.mkdir(parents=True, exist_ok=True)
    fit = table["fits"][method + (" joint" if fit_temperatures else "")]
    (out_dir / "fit_weights.json").write_text(json.dumps({"rows": table["rows"], "method": method,
                                                          "validation_rows": int(labels.numel())}, indent=2))
    plot_fit_table(table["rows"], out_dir / "fit_weights.png")
    (out_dir / "weights.yaml").write_text(weights_fragment(cfg, names, fit, method, fit_temperatures))
    return {"table": format_fit_table(table["rows"]), "out_dir": str(out_dir), "fit": fit}
