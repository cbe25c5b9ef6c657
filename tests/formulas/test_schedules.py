"""Schedules hit their ends exactly, are monotone, and follow their formulas."""
import math

import pytest
from omegaconf import OmegaConf

from distill.config.schema import ConfigError, ScalarSchedule, load_config
from distill.formulas.schedules import SCHEDULE_KINDS, schedule_value, value_at
from tests.conftest import tiny_config_yaml


@pytest.mark.parametrize("kind", ["linear", "cosine", "exponential"])
@pytest.mark.parametrize("start, end", [(0.0, 1.0), (0.9, 0.1), (0.1, 0.7), (2.0, 1.0)])
def test_ends_are_exact_and_ramp_is_monotone(kind, start, end):
    values = [schedule_value(kind, start, end, step, 10, 110) for step in range(0, 131)]
    assert values[0] == start and values[10] == start  # before and at start_step
    assert values[110] == end and values[130] == end  # at and after end_step
    pairs = list(zip(values, values[1:]))
    assert all(b >= a for a, b in pairs) if end >= start else all(b <= a for a, b in pairs)


def test_formulas_at_the_midpoint():
    assert schedule_value("linear", 0.0, 1.0, 50, 0, 100) == pytest.approx(0.5)
    assert schedule_value("cosine", 0.0, 1.0, 25, 0, 100) == pytest.approx((1 - math.cos(math.pi / 4)) / 2)
    assert schedule_value("exponential", 0.0, 1.0, 50, 0, 100, rate=5.0) == pytest.approx(math.expm1(2.5) / math.expm1(5.0))
    assert schedule_value("constant", 0.3, 0.9, 50, 0, 100) == 0.3


def test_vector_schedule_moves_teacher_weights():
    start, end = [1.0, 0.0], [0.5, 0.5]
    assert schedule_value("linear", start, end, 0, 0, 10) == start
    assert schedule_value("linear", start, end, 10, 0, 10) == end
    assert schedule_value("linear", start, end, 5, 0, 10) == pytest.approx([0.75, 0.25])


def test_value_at_defaults_end_step_to_the_last_step():
    schedule = OmegaConf.structured(ScalarSchedule(kind="linear", start=0.0, end=1.0))
    assert value_at(schedule, 0.5, 40, 80) == pytest.approx(0.5)
    assert value_at(None, 0.5, 40, 80) == 0.5
    assert set(SCHEDULE_KINDS) == {"constant", "linear", "cosine", "exponential"}


@pytest.mark.parametrize("overrides, message", [
    (["schedules.kd_alpha={start: 0.0, end: 1.5}"], r"schedules.kd_alpha: start and end must lie in \[0, 1\]"),
    (["schedules.temperature={start: 2.0, end: 0.0}"], r"schedules.temperature: start and end must be > 0"),
    (["schedules.kd_alpha={kind: sawtooth, start: 0.1}"], r"schedules.kd_alpha.kind: 'sawtooth'"),
    (["schedules.teacher_weights={start: [1.0], end: [0.5, 0.5]}"], r"schedules.teacher_weights.start needs one weight per teacher"),
    (["schedules.teacher_weights={start: [1.0, -1.0]}"], r"weights must be >= 0"),
    (["schedules.teacher_weights={start: [1.0, 0.0]}", "interpolation.fit_on=validation"], r"choose one"),
    (["schedules.kd_alpha={start: 0.1, start_step: 10, end_step: 5}"], r"end_step must be >= start_step"),
])
def test_bad_schedules_are_named(tiny, tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(tiny_config_yaml(tiny, tmp_path / "r"), overrides)
