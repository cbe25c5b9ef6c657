"""Tasks as plug-ins: one registered class per task, behind one small interface.

The trainer (run/trainer.py) owns the loop, the engine, schedules, logs, checkpoints and resume; a task
owns what differs between tasks:

- data: `read_splits` (raw rows, no model needed), `encode`, `collator`, and `batches` (a task
  may annotate the micro-batches of an optimizer step, e.g. with the step's token count);
- models: `plan_teachers` (configs and tokenizers only: mismatches fail before
  any weight loads; it returns the plans and a `base.Context`, which the caller hands to
  `check_before_writing`, `build_student` and `load_teachers`), `load_teachers` (an ensemble and a
  teacher-signal source, signals/);
- the loss: `loss` turns the student's outputs and the teachers' signal into loss terms;
- evaluation: `evaluate` (accuracy/F1, or perplexity and bits per byte, per evaluation domain
  too: a base.Evaluation, with the predictions the trainer writes) and `validation_chunks` (what
  interpolation fits read: a base.FitRows), both over the encoded validation split they are handed;
- description: `traits` (what the task is, tasks/base.Traits), `format_table`, `model_card`.

Routing (signals/routing.route_teachers, applied by `setup.Setup`), loss.intermediate's layer
terms (models/layer_hooks.LayerTerms, handed to `loss`), data.augment (augment.Augmentation, applied
by `setup.Setup`), report.json (evaluation/report.build_report, from the task's traits), the
teachers' precision drift (run/precision.py), the teacher cache (caches.write_task_cache, the format
`traits.cache` names), the exported tokenizer's length (base.trained_length) and a saved student's
loading (base.load_saved_student) compose around every task.

A task keeps nothing one call leaves for the next: what set-up finds (the rows read, the student's
tokenizer, the teachers' own tokenizers, an opened teacher cache, a causal LM's vocabulary and served
connection) is a `base.Context` that `plan_teachers` makes, `check_before_writing` and `build_student`
return updated, and every later call (`encode`, `collator`, `batches`, `load_teachers`, `loss`,
`evaluate`, `validation_chunks`, `training_rows`) is handed; `setup.Setup` holds it between stages.

A task declares the shared settings it reads and not every task does (`owns`): a set key that
another task owns and the chosen one does not is refused here, structurally; `check_config` holds
the task's own rules across sections. Both run right after the config loads, before anything is
read or written (`load_task_config`). The set-up sequence every command runs is `setup.Setup`. A new task is one new file here with a
class registered by `@register_task("name")`; nothing outside this registry branches on its name.
"""
from __future__ import annotations

import importlib
import pkgutil
from typing import Dict, List, Optional, Sequence

from distill.config.schema import load_config, schema_defaults

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


def set_keys(cfg, pattern: str) -> List[str]:
    """The concrete keys matching `pattern` (dotted; `[*]`: every entry of a list) whose value in
    `cfg` differs from the schema's default."""
    from omegaconf import OmegaConf

    if "[*]." in pattern:
        head, tail = pattern.split("[*].", 1)
        found = []
        for index, item in enumerate(OmegaConf.select(cfg, head) or []):
            default = schema_defaults(OmegaConf.get_type(item))
            if _differs(OmegaConf.select(item, tail), OmegaConf.select(default, tail)):
                found.append(f"{head}[{index}].{tail}")
        return found
    return [pattern] if _differs(OmegaConf.select(cfg, pattern), OmegaConf.select(schema_defaults(), pattern)) else []


def _differs(value, default) -> bool:
    from omegaconf import OmegaConf

    plain = [OmegaConf.to_container(v) if OmegaConf.is_config(v) else v for v in (value, default)]
    return plain[0] != plain[1]


def refuse_settings_of_other_tasks(cfg) -> None:
    """ConfigError naming every setting the chosen task would ignore: a key another task declares in
    its `owns` and the chosen one does not, or a section named after another task, when set."""
    from omegaconf import OmegaConf

    _discover()
    chosen = task_class(cfg.task)
    owners: Dict[str, List[str]] = {}
    for name in sorted(TASKS):
        for key in TASKS[name].owns:
            if key not in chosen.owns:
                owners.setdefault(key, []).append(name)
    unread = [(found, owners[key]) for key in owners for found in set_keys(cfg, key)]
    if unread:
        keys = [key for key, _ in unread]
        tasks = sorted({name for _, names in unread for name in names})
        raise ConfigError(f"task {cfg.task} does not read {keys} (settings of task {', '.join(tasks)}): remove "
                          f"{'it' if len(keys) == 1 else 'them'}")
    for name in sorted(TASKS):
        if name == cfg.task or name not in cfg:
            continue
        section = cfg[name]
        default = schema_defaults(OmegaConf.get_type(section))
        if OmegaConf.to_container(section) != OmegaConf.to_container(default):
            raise ConfigError(f"{name}: this section belongs to task {name}, the config's task is {cfg.task}: "
                              f"remove it, or set task: {name}")


def check_task_config(cfg) -> None:
    """The chosen task's checks on a loaded config: other tasks' settings refused, then its own rules."""
    cls = task_class(cfg.task)
    refuse_settings_of_other_tasks(cfg)
    metric = cfg.training.select_best.metric
    if metric is not None and metric not in cls.traits.metrics:
        raise ConfigError(f"training.select_best.metric: {metric!r} is not a validation figure of task {cfg.task}; "
                          f"choose one of {sorted(cls.traits.metrics)}")
    cls.check_config(cfg)
    from distill.models.layer_hooks import check_layer_terms

    check_layer_terms(cfg)


def build_task(cfg) -> Task:
    check_task_config(cfg)
    return task_class(cfg.task)(cfg)


def load_task_config(path, overrides: Optional[List[str]] = None, fragments: Sequence = ()):
    """load_config, then the chosen task's own checks: every entry point reads configs through this."""
    cfg = load_config(path, overrides, fragments)
    check_task_config(cfg)
    return cfg
