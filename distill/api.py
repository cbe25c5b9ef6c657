"""The Python API: the same objects and functions the CLI uses.

    from distill import load_config, train, evaluate, export

    cfg = load_config("configs/demo.yaml", ["training.max_steps=20"])
    report = train(cfg)                           # the run directory cfg.output_dir, its report
    export(cfg.output_dir, "student-out")         # a folder plain transformers loads
    task, report = evaluate(cfg, "student-out")   # scored next to the config's teachers
    result = sweep("configs/demo.yaml", "sweep-out")  # Optuna over the config's sweep space

Each function imports its heavy libraries when called, so `import distill` stays cheap.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Dict, List, Optional, Sequence


def load_config(path, overrides: Optional[List[str]] = None, fragments: Sequence = ()):
    """A YAML config (plus dotted overrides and merged fragments) as a typed, validated `DistillConfig`:
    the generic rules, then the chosen task's own. Raises `distill.errors.ConfigError`."""
    from distill.tasks import load_task_config

    return load_task_config(path, overrides, fragments)


def train(cfg) -> Dict:
    """Distil as `cfg` says (one process, or one rank under the DeepSpeed launcher); returns the report."""
    from distill.run.trainer import train as run_training

    return run_training(cfg)


def evaluate(cfg, model_path):
    """Score a saved student (an exported folder, or a run directory) next to the config's teachers and
    their interpolated target on the config's validation split; returns (task, report)."""
    from distill.run.evaluate import evaluate_saved_model

    return evaluate_saved_model(cfg, Path(model_path))


def export(run_dir, out_dir, dtype: str = "fp32", overwrite: bool = False, quantize: Optional[str] = None,
           onnx: bool = False) -> Path:
    """Consolidate a run's newest checkpoint into a `save_pretrained` folder; returns its path."""
    from distill.exporting.exporter import export_run

    return export_run(Path(run_dir), Path(out_dir), dtype=dtype, overwrite=overwrite, quantize=quantize, onnx=onnx)


def fit_weights(cfg, out_dir, fit_temperatures: bool = False, method: Optional[str] = None) -> Dict:
    """Fit the teachers' mixture weights (and temperatures) on validation; writes weights.yaml and a table."""
    from distill.run.fit_weights import run_fit_weights

    return run_fit_weights(cfg, Path(out_dir), fit_temperatures=fit_temperatures, method=method)


def cache(cfg, out_dir, top_k: Optional[int] = None, store: str = "topk", hidden_dtype: Optional[str] = None,
          samples: Optional[int] = None, rows_per_shard: Optional[int] = None) -> Dict:
    """Run the teachers once and store what training reads (teachers.cache=OUT); returns the cache's meta."""
    from distill.tasks.setup import Setup

    setup = Setup(cfg)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # under the deepspeed launcher: each rank its shards
        setup.start()
    from distill.caches import write_task_cache

    return write_task_cache(setup, Path(out_dir), top_k, store, hidden_dtype, samples, rows_per_shard)


def sweep(config_path, out_dir, overrides: Optional[List[str]] = None, trials: Optional[int] = None,
          seeds: Optional[int] = None) -> Dict:
    """Search the config's `sweep` space with Optuna on validation (the hard-label twin first); every
    trial a run directory under out_dir; writes trials.jsonl, sweep.png, best.yaml; returns rows, best, table."""
    from distill.run.sweep import Sweep

    return Sweep(config_path, overrides or [], Path(out_dir), trials=trials, seeds=seeds).run()


def plan(cfg, ranks: int = 1, device_memory: Optional[str] = None, device: Optional[str] = None) -> Dict:
    """The run's memory per rank from the models' configs (nothing loaded): lines, total, budget,
    fits, and the printed table (`table`)."""
    from distill.errors import ConfigError
    from distill.run.plan import format_plan, parse_size, plan as make_plan

    if ranks < 1:
        raise ConfigError(f"--ranks must be >= 1, got {ranks}")
    result = make_plan(cfg, ranks, None if device_memory is None else parse_size(device_memory), device)
    return {**result, "table": format_plan(result)}

