"""Schedules: a value that moves from `start` to `end` over a range of optimizer steps.

One mechanism serves `loss.kd_alpha`, `loss.temperature` and the teacher weights (vectors). A
schedule is a pure function of the optimizer step, so its state is the step itself: it survives
checkpoint/resume exactly because the engine's step does.

    progress  s = clamp((step - start_step) / (end_step - start_step), 0, 1)
    constant: start (end is ignored)
    value = start * (1 - f) + end * f, with the ramp fraction f:
    linear:   f = s
    cosine:   f = (1 - cos(pi * s)) / 2
    exponential: f = (exp(rate * s) - 1) / (exp(rate) - 1)
              (slow, then fast for rate > 0; defined for start or end = 0, unlike a geometric ramp)
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import torch

SCHEDULE_KINDS = ("constant", "linear", "cosine", "exponential")

Number = Union[float, Sequence[float]]


def schedule_progress(step: int, start_step: int, end_step: int) -> float:
    if end_step <= start_step:
        return 1.0 if step >= start_step else 0.0
    return min(1.0, max(0.0, (step - start_step) / (end_step - start_step)))


def ramp_fraction(kind: str, progress: float, rate: float = 5.0) -> float:
    """The fraction of the way from start to end at `progress` in [0, 1]."""
    if kind == "constant":
        return 0.0
    if kind == "linear":
        return progress
    if kind == "cosine":
        return 0.5 * (1.0 - math.cos(math.pi * progress))
    if kind == "exponential":
        if rate == 0:
            return progress
        return math.expm1(rate * progress) / math.expm1(rate)
    raise ValueError(f"unknown schedule kind {kind!r}; one of {SCHEDULE_KINDS}")


def schedule_value(kind: str, start: Number, end: Optional[Number], step: int, start_step: int,
                   end_step: int, rate: float = 5.0):
    """The scheduled value at `step`: a float, or a list for vector schedules (teacher weights)."""
    fraction = ramp_fraction(kind, schedule_progress(step, start_step, end_step), rate)
    end = start if end is None else end
    if isinstance(start, (int, float)):
        return float(start) * (1.0 - fraction) + float(end) * fraction  # exact at both ends
    start_tensor = torch.tensor(list(start), dtype=torch.float64)
    end_tensor = torch.tensor(list(end), dtype=torch.float64)
    return (start_tensor * (1.0 - fraction) + end_tensor * fraction).tolist()


def value_at(schedule, default, step: int, total_steps: int):
    """The value of a configured schedule (any object with kind/start/end/start_step/end_step/rate)
    at `step`, or `default` when no schedule is configured. end_step defaults to the last step."""
    if schedule is None:
        return default
    end_step = schedule.end_step if schedule.end_step is not None else total_steps
    start = schedule.start if isinstance(schedule.start, (int, float)) else list(schedule.start)
    end = schedule.end if schedule.end is None or isinstance(schedule.end, (int, float)) else list(schedule.end)
    return schedule_value(schedule.kind, start, end, step, schedule.start_step, end_step, schedule.rate)
