"""Tasks as plug-ins: one registered class per task, behind one small interface.

The trainer (run/trainer.py) owns the loop, the engine, schedules, logs, checkpoints and resume; a task
owns what differs between tasks:

- data: `read_splits` (raw rows, no model needed), `encode`, `collator`, and `batches` (a task
  may annotate the micro-batches of an optimizer step, e.g. with the step's token count);
- models: `student_source`, `plan_teachers` (configs and tokenizers only: mismatches fail before
  any weight loads), `build_student`, `load_teachers` (a teacher-signal source, signals/sources.py);
- the loss: `loss` turns the student's outputs and the teachers' signal into loss terms;
- evaluation: `evaluate` (accuracy/F1, or perplexity and bits per byte, per evaluation domain
  too) and `validation_chunks` (what interpolation fits read);
- description: `report`, `format_table`, `model_card`.

`check_config` refuses settings the task would ignore; it runs right after the config loads,
before anything is read or written (`load_task_config`). A new task is one new file here with a
class registered by `@register_task("name")`; nothing outside this registry branches on its name.
"""
from __future__ import annotations

import importlib
import pkgutil
from typing import List, Optional, Sequence

from distill.config.schema import load_config

from distill.errors import ConfigError
from distill.tasks.base import TASKS, Task


def _discover() -> None:
    """Import every module of this package once: each registers its task."""
    for module in pkgutil.iter_modules(__path__):
        if module.name != "base":
            importlib.import_module(f"{__name__}.{module.name}")


def task_class(name: str) -> type:
    _discover()
    if name not in TASKS:
        raise ConfigError(f"task: {name!r} is not one of {sorted(TASKS)}")
    return TASKS[name]


def refuse_other_tasks_sections(cfg) -> None:
    """A config section named after a task (e.g. `token_classification:`) belongs to that task: set
    while another task is chosen, it would be ignored, so it is refused (no per-task key lists)."""
    from omegaconf import OmegaConf

    for name in sorted(TASKS):
        if name == cfg.task or name not in cfg:
            continue
        section = cfg[name]
        default = OmegaConf.structured(OmegaConf.get_type(section))
        if OmegaConf.to_container(section) != OmegaConf.to_container(default):
            raise ConfigError(f"{name}: this section belongs to task {name}, the config's task is {cfg.task}: "
                              f"remove it, or set task: {name}")


def build_task(cfg) -> Task:
    cls = task_class(cfg.task)
    refuse_other_tasks_sections(cfg)
    cls.check_config(cfg)
    cls.check_layer_terms(cfg)
    return cls(cfg)


def load_task_config(path, overrides: Optional[List[str]] = None, fragments: Sequence = ()):
    """load_config, then the chosen task's own checks: every entry point reads configs through this."""
    cfg = load_config(path, overrides, fragments)
    refuse_other_tasks_sections(cfg)
    task_class(cfg.task).check_config(cfg)
    task_class(cfg.task).check_layer_terms(cfg)
    return cfg
