"""`distill sweep CONFIG OUT`: choose the settings that decide the student's quality on validation.

Optuna's TPE sampler (seeded with the config's seed) proposes each trial's settings from the
config's `sweep.space` and `sweep.toggles` (config/schema.py `SweepConfig`); every trial is a normal
`distill train` run directory under OUT (`trial-NNN/seed-S`), scored by its student's validation
figure `sweep.metric` (the exported checkpoint's, so `training.select_best` composes); with
`sweep.seeds` > 1 its score is the mean over seeds. The hard-label twin (loss.kd_alpha=0, the rest
as configured) runs first, as trial `twin`, so that the table says whether distillation helped.

OUT gets trials.jsonl (a line per finished trial), sweep.png (every trial's score, the twin's
line), best.yaml (the whole config of the best trial, ready for `distill train`) and the table. A
trial that fails (a diverging loss, a refused setting) is recorded with its error and the search
goes on. The search runs in one process: each trial's run is one process too.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from distill.errors import ConfigError, DistillError

TWIN = "twin"
MARKER = ".distill-sweep"


def default_space(cfg) -> Dict:
    """The space searched when the config names none: the KD weight, the temperature and the
    learning rate around the config's own (a factor of 4 either way, on a log scale)."""
    rate = float(cfg.training.learning_rate)
    return {"loss.kd_alpha": [0.1, 0.9], "loss.temperature": [1.0, 4.0],
            "training.learning_rate": {"low": rate / 4, "high": rate * 4, "log": True}}


def suggest(trial, space: Dict, toggles: List[str]) -> Dict[str, object]:
    """One trial's settings {dotted key: value} from the space (optuna's trial.suggest_*)."""
    from omegaconf import OmegaConf

    chosen: Dict[str, object] = {}
    for key, spec in space.items():
        spec = OmegaConf.to_container(spec) if OmegaConf.is_config(spec) else spec
        if isinstance(spec, dict) and "choices" in spec:
            chosen[key] = trial.suggest_categorical(key, list(spec["choices"]))
            continue
        low, high = (spec if isinstance(spec, list) else [spec["low"], spec["high"]])
        log = isinstance(spec, dict) and bool(spec.get("log"))
        if isinstance(low, int) and isinstance(high, int):
            chosen[key] = trial.suggest_int(key, low, high, log=log)
        else:
            chosen[key] = trial.suggest_float(key, float(low), float(high), log=log)
    for key in toggles:
        chosen[key] = trial.suggest_categorical(key, ["on", "off"])
    return chosen


def as_overrides(cfg, chosen: Dict[str, object]) -> List[str]:
    """Dotted overrides of the trial's settings; a toggle turned off is its schema default."""
    from omegaconf import OmegaConf

    from distill.config.schema import schema_defaults

    default = schema_defaults()
    overrides = []
    for key, value in chosen.items():
        if value == "on":
            continue  # as configured
        if value == "off":
            value = OmegaConf.select(default, key)
            value = OmegaConf.to_container(value) if OmegaConf.is_config(value) else value
        if isinstance(value, float):
            value = f"{value:.4g}"  # what the trial runs with, as the table and best.yaml show it
        overrides.append(f"{key}={json.dumps(value) if isinstance(value, (list, dict)) else value}")
    return overrides


def _score(report: Dict, metric: str) -> float:
    figure = report["student"].get(metric)
    if figure is None:
        raise ConfigError(f"sweep.metric: the run reported no student {metric!r} (it has "
                          f"{sorted(k for k in report['student'] if k != 'params')})")
    return float(figure)


class Sweep:
    """One sweep: the base config and overrides, where it writes, how it scores."""

    def __init__(self, config_path, overrides: List[str], out: Path, trials: Optional[int] = None,
                 seeds: Optional[int] = None):
        from distill.tasks import load_task_config as load_config, task_class

        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise ConfigError("distill sweep runs in one process (each trial one rank): start it without the launcher")
        self.config_path, self.overrides, self.out = config_path, list(overrides), Path(out)
        self.cfg = load_config(config_path, self.overrides)
        sweep = self.cfg.sweep
        self.trials = sweep.trials if trials is None else trials
        self.seeds = sweep.seeds if seeds is None else seeds
        if self.trials < 1 or self.seeds < 1:
            raise ConfigError(f"--trials and --seeds must be >= 1, got {self.trials} and {self.seeds}")
        task = task_class(self.cfg.task)
        self.metric = sweep.metric or task.traits.curve_metric
        if self.metric not in task.traits.metrics:
            raise ConfigError(f"sweep.metric: {self.metric!r} is not a validation figure of task {self.cfg.task}; "
                              f"choose one of {sorted(task.traits.metrics)}")
        self.higher = task.traits.metrics[self.metric]
        self.space = dict(sweep.space) or default_space(self.cfg)
        self.toggles = list(sweep.toggles)
        from omegaconf import OmegaConf

        from distill.config.schema import schema_defaults

        default = schema_defaults()
        for key in self.toggles:
            if OmegaConf.select(self.cfg, key) == OmegaConf.select(default, key):
                raise ConfigError(f"sweep.toggles: {key} is not set in the config, so there is nothing to turn off")
        if self.out.exists() and (not self.out.is_dir() or any(self.out.iterdir())):
            raise ConfigError(f"{self.out} exists and is not empty: distill sweep writes a new folder; choose another")
        for settings in [[]] + [as_overrides(self.cfg, {key: "off"}) for key in self.toggles]:
            load_config(config_path, self.overrides + settings)  # every corner of the space loads

    def run_trial(self, name: str, settings: List[str]) -> Dict:
        """Train the trial's runs (one per seed); {name, settings, values, mean, std, error}."""
        from distill.run.trainer import train
        from distill.tasks import load_task_config as load_config

        values, error = [], None
        for offset in range(self.seeds):
            run_dir = self.out / name / f"seed-{self.cfg.seed + offset}"
            cfg = load_config(self.config_path, self.overrides + settings + [
                f"output_dir={run_dir}", f"seed={self.cfg.seed + offset}", "training.progress_bar=false"])
            try:
                values.append(_score(train(cfg), self.metric))
            except DistillError as failure:  # a trial that diverges or is refused: recorded, the search goes on
                error = f"{type(failure).__name__}: {str(failure).splitlines()[0][:300]}"
                break
        mean = sum(values) / len(values) if values and error is None else None
        std = (math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
               if mean is not None and len(values) > 1 else 0.0 if mean is not None else None)
        row = {"trial": name, "settings": settings, "values": values, "mean": mean, "std": std, "error": error}
        with open(self.out / "trials.jsonl", "a", encoding="utf-8") as stream:
            stream.write(json.dumps(row) + "\n")
        shown = "failed: " + error if error else f"{self.metric} {mean:.4f}" + (f" ± {std:.4f}" if self.seeds > 1 else "")
        print(f"sweep {name}: {' '.join(settings) or '(as configured)'} -> {shown}", flush=True)
        return row

    def run(self) -> Dict:
        import optuna

        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / MARKER).write_text("a folder of distill sweep\n", encoding="utf-8")
        rows = [self.run_trial(TWIN, ["loss.kd_alpha=0.0"])]
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        study = optuna.create_study(direction="maximize" if self.higher else "minimize",
                                    sampler=optuna.samplers.TPESampler(seed=self.cfg.seed))
        for number in range(self.trials):
            trial = study.ask()
            settings = as_overrides(self.cfg, suggest(trial, self.space, self.toggles))
            row = self.run_trial(f"trial-{number:03d}", settings)
            rows.append(row)
            if row["mean"] is None:
                study.tell(trial, state=optuna.trial.TrialState.FAIL)
            else:
                study.tell(trial, row["mean"])
        finished = [row for row in rows[1:] if row["mean"] is not None]
        if not finished:
            raise ConfigError(f"every trial of the sweep failed (see {self.out / 'trials.jsonl'})")
        best = (max if self.higher else min)(finished, key=lambda row: row["mean"])
        self._write_best(best)
        plot_trials(rows, self.metric, self.out / "sweep.png")
        table = format_trials(rows, self.metric, self.higher, best)
        (self.out / "sweep_table.txt").write_text(table + "\n", encoding="utf-8")
        return {"rows": rows, "best": best, "table": table}

    def _write_best(self, best: Dict) -> None:
        from distill.config.schema import to_yaml
        from distill.tasks import load_task_config as load_config

        cfg = load_config(self.config_path, self.overrides + best["settings"] + [f"output_dir={self.out / 'best'}"])
        temporary = self.out / ".best.yaml.partial"
        temporary.write_text(f"# distill sweep: {best['trial']} of {self.out} ({self.metric} {best['mean']:.4f} on "
                             "validation)\n" + to_yaml(cfg), encoding="utf-8")
        temporary.replace(self.out / "best.yaml")


def format_trials(rows: List[Dict], metric: str, higher: bool, best: Dict) -> str:
    """The trials, best first, with each one's settings, score and its difference to the twin."""
    twin = rows[0]["mean"]
    finished = sorted((row for row in rows if row["mean"] is not None), key=lambda row: row["mean"], reverse=higher)
    lines = [f"{'trial':<10}  {metric + ' (validation)':<22}  {'vs twin':>8}  settings"]
    for row in finished + [row for row in rows if row["mean"] is None]:
        if row["mean"] is None:
            lines.append(f"{row['trial']:<10}  {'failed':<22}  {'':>8}  {' '.join(row['settings'])}  ({row['error']})")
            continue
        score = f"{row['mean']:.4f}" + (f" ± {row['std']:.4f}" if len(row["values"]) > 1 else "")
        delta = "" if twin is None or row is rows[0] else f"{row['mean'] - twin:+.4f}"
        mark = "  <- best" if row is best else ""
        lines.append(f"{row['trial']:<10}  {score:<22}  {delta:>8}  {' '.join(row['settings'])}{mark}")
    if twin is not None:
        gain = best["mean"] - twin if higher else twin - best["mean"]
        spread = max(best["std"] or 0.0, rows[0]["std"] or 0.0)
        verdict = ("helped" if gain > spread else "did not separate from the twin") if gain > 0 else "did not help"
        lines.append(f"distillation {verdict}: best {best['mean']:.4f} vs hard-label twin {twin:.4f}"
                     + (f" (largest std {spread:.4f})" if len(best["values"]) > 1 else ""))
    return "\n".join(lines)


def plot_trials(rows: List[Dict], metric: str, path: Path) -> None:
    """Each trial's score (mean, with its seeds' std), in the order run; the twin as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4))
    points: List[Tuple[int, float, float]] = [(k, row["mean"], row["std"] or 0.0) for k, row in enumerate(rows[1:], 1)
                                              if row["mean"] is not None]
    if points:
        axis.errorbar([p[0] for p in points], [p[1] for p in points], yerr=[p[2] for p in points], fmt="o",
                      label="trials (mean, std over seeds)")
    if rows[0]["mean"] is not None:
        axis.axhline(rows[0]["mean"], color="gray", linestyle="--", label="hard-label twin (kd_alpha 0)")
    axis.set_xlabel("trial")
    axis.set_ylabel(f"validation {metric}")
    axis.legend()
    figure.tight_layout()
    temporary = path.with_name("." + path.name + ".partial.png")
    figure.savefig(temporary, dpi=100)
    plt.close(figure)
    temporary.replace(path)
