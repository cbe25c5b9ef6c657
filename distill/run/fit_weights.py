"""`distill fit-weights CONFIG`: run the teachers once over validation and fit how to mix them.

The fits themselves belong to the strategies (interpolation/strategies.py, `fit`), over the task's validation
chunks (tasks/): a classification set is one chunk of logits [K, N, C]; a causal LM's validation
tokens are streamed a chunk at a time from the teachers' hidden states, so no [K, tokens, V] tensor
is held (the linear EM needs only each teacher's probability of the gold token).

The table compares, on the validation labels (or next tokens): each teacher alone, the uniform
mixes and the fitted mixes (EM for linear, Newton on the simplex for geometric, optionally with
temperature scaling and a joint fit), by NLL and the task's own figures (accuracy and expected
calibration error; perplexity and bits per byte). It is written with a PNG chart and a YAML
fragment that `distill train CONFIG --weights FRAGMENT` merges. `distill train` with
`interpolation.fit_on=validation` runs the strategy's fit itself (rank 0, broadcast).
"""
from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch
from torch import Tensor

from distill.formulas.fits import (TEMPERATURE_BOUNDS, Chunks, at_bound, expected_calibration_error, fit_jointly_streamed,
                             mixture_scores)
from distill.interpolation.strategies import build_interpolation, fitted_temperatures


def state_digest(state: Dict) -> str:
    """A short hash of a fitted state, printed by every rank so agreement can be checked."""
    digest = hashlib.sha256(json.dumps({k: state[k] for k in ("weights", "temperatures", "routes")
                                        if k in state}).encode())
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


def _row(name: str, chunks: Chunks, method: str, weights: Tensor, temperatures: Tensor,
         text_bytes: Optional[int] = None) -> Dict:
    gold, correct, confidence = mixture_scores(chunks, method, weights, temperatures)
    nll = float(-gold.mean())
    row = {"name": name, "rows": int(gold.shape[0]), "nll": nll, "perplexity": math.exp(min(nll, 700.0)),
           "accuracy": float(correct.double().mean()),
           "ece": expected_calibration_error(None, confidence=confidence, correct=correct),
           "weights": [float(w) for w in weights], "temperatures": [float(t) for t in temperatures]}
    if text_bytes:
        row["bits_per_byte"] = float(-gold.sum()) / math.log(2) / text_bytes
    return row


TRAINING_T = " @train T"  # the suffix of the rows fitted at the temperatures training mixes at


def comparison_table(names: List[str], chunks: Chunks, fit_temperatures: bool, text_bytes: Optional[int] = None,
                     training_temperatures: Optional[Tensor] = None) -> Dict:
    """Rows for each teacher alone, the uniform mixes and the fitted mixes, at temperature 1, at the
    temperatures training mixes the teachers at (`training_temperatures`, when not all 1: the
    target the student learns is that mixture), and with fit_temperatures at each teacher's fitted
    temperature, then jointly."""
    count = len(names)
    ones = torch.ones(count, dtype=torch.float64)
    uniform = ones / count
    rows = [_row(f"teacher {name}", chunks, "linear", torch.eye(count, dtype=torch.float64)[k], ones, text_bytes)
            for k, name in enumerate(names)]
    variants = [("", ones)]
    if training_temperatures is not None and not torch.allclose(training_temperatures.double(), ones):
        variants.append((TRAINING_T, training_temperatures.double()))
    if fit_temperatures:
        fitted = fitted_temperatures(chunks, ones, True)
        rows += [_row(f"teacher {name} (T={fitted[k]:.2f})", chunks, "linear", torch.eye(count, dtype=torch.float64)[k],
                      fitted, text_bytes) for k, name in enumerate(names)]
        variants.append((" +T", fitted))
    fits = {}
    for suffix, temperatures in variants:
        for method in ("linear", "geometric"):
            rows.append(_row(f"uniform {method}{suffix}", chunks, method, uniform, temperatures, text_bytes))
            state = build_interpolation(method).fit(chunks, uniform, temperatures)
            row = _row(f"fitted {method}{suffix}", chunks, method, torch.tensor(state["weights"], dtype=torch.float64),
                       temperatures, text_bytes)
            if "em_log_likelihood_trace" in state:
                row["em_log_likelihood_trace"] = state["em_log_likelihood_trace"]
            rows.append(row)
            fits[f"{method}{suffix}"] = row
            if suffix == " +T":  # temperatures and weights fitted jointly, from the sequential fit
                joint_weights, joint_temperatures = fit_jointly_streamed(
                    chunks, method, torch.tensor(state["weights"], dtype=torch.float64), temperatures)
                joint = _row(f"fitted {method} joint", chunks, method, joint_weights, joint_temperatures, text_bytes)
                rows.append(joint)
                fits[f"{method} joint"] = joint
    for row in rows:  # a fitted temperature on a bound: the data wanted a more extreme one
        row["temperature_at_bound"] = [at_bound(t) for t in row["temperatures"]]
    return {"rows": rows, "fits": fits}


COLUMN_TITLES = {"nll": "NLL", "accuracy": "accuracy", "ece": "ECE", "perplexity": "perplexity",
                 "bits_per_byte": "bits/byte"}


def format_fit_table(rows: List[Dict], columns: Sequence[str] = ("nll", "accuracy", "ece")) -> str:
    from distill.evaluation.report import text_table

    cells = []
    for row in rows:
        weights = ", ".join(f"{w:.3f}" for w in row["weights"]) if row["weights"] else "-"
        temperatures = ", ".join(f"{t:.2f}" + ("*" if bound else "")
                                 for t, bound in zip(row["temperatures"], row["temperature_at_bound"]))
        cells.append((row["name"], *[f"{row[c]:.4f}" if c in row else "-" for c in columns], weights, temperatures))
    table = text_table(("mix", *[COLUMN_TITLES[c] for c in columns], "weights", "temperatures"), cells)
    if any(any(row["temperature_at_bound"]) for row in rows):
        table += (f"\n* a fitted temperature sits on its bound {list(TEMPERATURE_BOUNDS)}: the data wanted a more "
                  "extreme one (a teacher that is nearly always right, or nearly random)")
    return table


def plot_fit_table(rows: List[Dict], path: Path, columns: Sequence[str] = ("nll", "accuracy", "ece")) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    better = {"nll": "lower", "accuracy": "higher", "ece": "lower", "perplexity": "lower", "bits_per_byte": "lower"}
    names = [row["name"] for row in rows]
    figure, axes = plt.subplots(1, len(columns), figsize=(14, 0.35 * len(rows) + 1.8), sharey=True)
    for axis, key in zip(axes, columns):
        colours = ["tab:grey" if n.startswith("teacher") else "tab:blue" if n.startswith("uniform") else "tab:green"
                   for n in names]
        axis.barh(range(len(rows)), [row[key] for row in rows], color=colours)
        axis.set_title(f"validation {COLUMN_TITLES[key]} ({better[key]} is better)", fontsize=10)
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
    """A YAML fragment for `distill train --weights`: the configured teachers, every key of each kept
    (path, pooling, normalize, head, routes, ...), with the fitted weights (and temperatures) set.
    A fragment replaces the teacher list as a whole, so an entry that left keys out lost them."""
    import yaml
    from omegaconf import OmegaConf

    models = []
    for index, teacher in enumerate(cfg.teachers.models):
        entry = {key: value for key, value in OmegaConf.to_container(teacher, resolve=True).items()
                 if value is not None}
        entry.update(name=names[index], weight=round(fit["weights"][index], 6))
        temperature = fit["temperatures"][index] if with_temperatures else teacher.temperature
        if temperature is not None:
            entry["temperature"] = round(float(temperature), 6)
        models.append(entry)
    return yaml.safe_dump({"teachers": {"models": models}, "interpolation": {"method": method}}, sort_keys=False)


def run_fit_weights(cfg, out_dir: Path, fit_temperatures: bool = False, method: Optional[str] = None) -> Dict:
    """The `distill fit-weights` command: one process, no student."""
    from distill.config.schema import teacher_display_name
    from distill.errors import ConfigError
    from distill.tasks.setup import Setup

    if not cfg.teachers.models:
        raise ConfigError("teachers.models is empty: fit-weights needs at least one teacher")
    method = method or (cfg.interpolation.method if cfg.interpolation.method in ("linear", "geometric") else "linear")
    setup = Setup(cfg)
    task = setup.task
    if cfg.teachers.cache is not None and not task.traits.cache_holds_validation:
        raise ConfigError("fit-weights runs the teachers on the validation split, which teachers.cache does not "
                          "hold: remove teachers.cache for this command")
    plans = setup.plan().plans
    setup.check()  # a cache is opened and checked here
    validation = setup.encode("validation")
    ensemble, source = setup.load_teachers()
    device = setup.device
    names = [teacher_display_name(t, i) for i, t in enumerate(cfg.teachers.models)]
    if ensemble.routing is not None:
        return _fit_routes(cfg, task, ensemble, source, device, validation, setup.context, names, out_dir, method)
    rows = task.validation_chunks(ensemble, source, device, validation, setup.context)
    training = torch.tensor([plan.temperature for plan in plans], dtype=torch.float64)
    table = comparison_table(names, rows.chunks, fit_temperatures, rows.text_bytes, training)
    out_dir.mkdir(parents=True, exist_ok=True)
    # weights.yaml takes the weights for the distributions the target mixes: at the teachers'
    # training temperatures, or with --temperatures the joint fit (which then sets the temperatures)
    chosen = method + (" joint" if fit_temperatures else TRAINING_T if method + TRAINING_T in table["fits"] else "")
    fit = table["fits"][chosen]
    # every row was scored on the same labelled rows (tokens): no extra pass over the teachers to count them
    plot_fit_table(table["rows"], out_dir / "fit_weights.png", task.traits.fit_columns)
    (out_dir / "weights.yaml").write_text(weights_fragment(cfg, names, fit, method, fit_temperatures))
    temperatures = ", ".join(f"{t:g}" for t in fit["temperatures"])
    note = f"weights.yaml takes '{fit['name']}' (teachers at T = {temperatures}, as training mixes them)"
    (out_dir / "fit_weights.json").write_text(json.dumps({"rows": table["rows"], "method": method, "task": cfg.task,
                                                          "validation_rows": table["rows"][0]["rows"],
                                                          "weights_yaml_takes": fit["name"]}, indent=2))
    return {"table": format_fit_table(table["rows"], task.traits.fit_columns) + "\n" + note, "out_dir": str(out_dir),
            "fit": fit}


def _fit_routes(cfg, task, ensemble, source, device, validation, context, names: List[str], out_dir: Path,
                method: str) -> Dict:
    """fit-weights with teachers.route_by: one table per route with several teachers, over that
    route's validation rows and its own teachers; weights.yaml sets teachers.route_weights."""
    import yaml

    from distill.errors import ConfigError

    routing = ensemble.routing
    if not routing.fitted_routes():
        raise ConfigError(f"teachers.route_by={routing.routes.column}: every route has one teacher; there are no "
                          "weights to fit")
    out_dir.mkdir(parents=True, exist_ok=True)
    tables, fragments, report = [], {}, {}
    for route in routing.fitted_routes():
        value, chosen = routing.routes.values[route], routing.routes.teachers_of(route)
        rows = task.validation_chunks(ensemble, source, device, validation, context, route=route)
        table = comparison_table([names[k] for k in chosen], routing.route_chunks(route, rows.chunks), False,
                                 rows.text_bytes, ensemble.temperatures[chosen].double())
        fit = table["fits"][method + TRAINING_T if method + TRAINING_T in table["fits"] else method]
        plot_fit_table(table["rows"], out_dir / f"fit_weights_{value}.png", task.traits.fit_columns)
        fragments[value] = {names[k]: round(float(w), 6) for k, w in zip(chosen, fit["weights"])}
        report[value] = {"rows": table["rows"], "weights_yaml_takes": fit["name"]}
        tables.append(f"route {value} ({table['rows'][0]['rows']} validation rows):\n"
                      + format_fit_table(table["rows"], task.traits.fit_columns))
    (out_dir / "weights.yaml").write_text(yaml.safe_dump({"teachers": {"route_weights": fragments},
                                                          "interpolation": {"method": method}}, sort_keys=False))
    (out_dir / "fit_weights.json").write_text(json.dumps({"routes": report, "method": method, "task": cfg.task},
                                                         indent=2))
    return {"table": "\n\n".join(tables) + f"\nweights.yaml sets teachers.route_weights from the fitted {method} "
            "mix of each route", "out_dir": str(out_dir), "fit": None}
