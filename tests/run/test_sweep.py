"""`distill sweep` (issue 31): Optuna over the config's space, the hard-label twin first, every trial
a run directory scored on validation, the best trial's whole config written out."""
import json

import pytest

from tests.conftest import tiny_config_yaml
from tests.helpers import in_this_process, run_cli_in_process

SWEEP = """
sweep:
  trials: 2
  metric: accuracy
  space:
    loss.kd_alpha: [0.2, 0.8]
    training.learning_rate: {low: 1.0e-3, high: 1.0e-2, log: true}
  toggles: [loss.label_smoothing]
"""


@pytest.mark.slow
def test_a_sweep_runs_the_twin_and_its_trials_and_writes_the_best_config(tiny, tmp_path):
    from distill.api import load_config, sweep

    config = tiny_config_yaml(tiny, tmp_path / "base", SWEEP)
    out = tmp_path / "sweep"
    with in_this_process():
        result = sweep(config, out, ["training.max_steps=4"])
    rows = [json.loads(line) for line in (out / "trials.jsonl").read_text().splitlines()]
    assert [row["trial"] for row in rows] == ["twin", "trial-000", "trial-001"]
    assert rows[0]["settings"] == ["loss.kd_alpha=0.0"]
    for row in rows:
        report = json.loads((out / row["trial"] / "seed-0" / "report.json").read_text())
        assert row["values"] == [report["student"]["accuracy"]] and row["mean"] == row["values"][0]
        assert (out / row["trial"] / "seed-0" / "student" / "model.safetensors").is_file()
    for row in rows[1:]:  # Optuna's proposals lie in the space; the toggle is on or off
        chosen = dict(setting.split("=", 1) for setting in row["settings"])
        assert 0.2 <= float(chosen["loss.kd_alpha"]) <= 0.8
        assert 1e-3 <= float(chosen["training.learning_rate"]) <= 1e-2
        assert float(chosen.get("loss.label_smoothing", "0.1")) in (0.1, 0.0)
    best = max(rows[1:], key=lambda row: row["mean"])
    assert result["best"]["trial"] == best["trial"]
    chosen = load_config(out / "best.yaml")
    expected = dict(setting.split("=", 1) for setting in best["settings"])
    assert chosen.loss.kd_alpha == pytest.approx(float(expected["loss.kd_alpha"]))
    assert chosen.training.learning_rate == pytest.approx(float(expected["training.learning_rate"]))
    assert (out / "sweep.png").stat().st_size > 0
    assert "hard-label twin" in result["table"] and "<- best" in result["table"]


@pytest.mark.parametrize("extra, message", [
    ("sweep: {space: {loss.kd_alfa: [0.1, 0.9]}}", "sweep: 'loss.kd_alfa' is not a setting a trial can change"),
    ("sweep: {space: {loss.kd_alpha: [0.9, 0.1]}}", r"sweep.space.loss.kd_alpha: needs low < high"),
    ("sweep: {metric: perplexity}", "sweep.metric: 'perplexity' is not a validation figure"),
    ("sweep: {toggles: [loss.intermediate]}", "sweep.toggles: loss.intermediate is not set in the config"),
])
def test_sweep_settings_are_refused_before_anything_is_written(tiny, tmp_path, extra, message):
    out = tmp_path / "sweep"
    result = run_cli_in_process(["sweep", tiny_config_yaml(tiny, tmp_path / "base", extra), out])
    assert result.returncode == 2 and message in result.stderr, result.stderr
    assert not out.exists()
