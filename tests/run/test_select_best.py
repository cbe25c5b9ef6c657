"""training.select_best (issue 31): the run exports its best evaluation's checkpoint, says so in
the report, the table and the card, and keeps that checkpoint through the rotation."""
import json

import pytest
import torch

from tests.conftest import tiny_config_yaml
from tests.helpers import in_this_process, run_cli_in_process


def _evaluations(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(row["step"], row["student/accuracy"]) for row in rows if row["kind"] == "eval"]


def test_the_best_evaluation_is_exported_and_said(tiny, tmp_path):
    from safetensors.torch import load_file

    from distill.api import load_config, train
    from distill.exporting.exporter import consolidated_state_dict, drop_training_modules

    run_dir = tmp_path / "run"
    # mode min on accuracy: the *worst* evaluation, so that the choice differs from the last step's
    config = tiny_config_yaml(tiny, run_dir, "  eval_every: 2\n  select_best: {metric: accuracy, mode: min}\n"
                                             "  keep_checkpoints: 1")
    with in_this_process():
        report = train(load_config(config))
    evaluations = _evaluations(run_dir)
    assert [step for step, _ in evaluations] == [2, 4, 6, 8, 10, 12]
    worst = min(value for _, value in evaluations)
    first_worst = next(step for step, value in evaluations if value == worst)
    chosen = report["selected"]
    assert (chosen["step"], chosen["value"], chosen["metric"]) == (first_worst, worst, "accuracy")
    assert chosen["last_step"] == 12 and chosen["last_step_value"] == evaluations[-1][1]
    assert report["student"]["accuracy"] == worst  # the table's student row is the exported checkpoint's
    checkpoints = run_dir / "checkpoints"
    assert json.loads((checkpoints / "best.json").read_text())["tag"] == chosen["tag"] == f"step{first_worst:07d}"
    assert (checkpoints / chosen["tag"]).is_dir()  # kept through the rotation (keep_checkpoints: 1)
    exported = load_file(run_dir / "student" / "model.safetensors")
    expected = drop_training_modules(consolidated_state_dict(checkpoints, chosen["tag"]))
    name = "classifier.weight"
    assert torch.equal(exported[name], expected[name].to(exported[name].dtype))
    if first_worst != 12:  # the last step's weights are not what was exported
        last = drop_training_modules(consolidated_state_dict(checkpoints, "step0000012"))
        assert not torch.equal(exported[name], last[name].to(exported[name].dtype))
    card = (run_dir / "student" / "README.md").read_text()
    assert f"Exported checkpoint: step {first_worst} of 12, chosen by its validation accuracy" in card


@pytest.mark.parametrize("overrides, message", [
    (["training.select_best.metric=perplexity", "training.eval_every=2"],
     r"training.select_best.metric: 'perplexity' is not a validation figure of task sequence_classification; "
     r"choose one of \['accuracy', 'macro_f1'\]"),
    (["training.select_best.metric=accuracy"], r"chooses among the evaluations made while training: set "
     r"training.eval_every"),
    (["training.select_best.metric=accuracy", "training.eval_every=2", "training.select_best.mode=up"],
     r"training.select_best.mode: 'up' is not one of"),
])
def test_select_best_settings_are_refused_before_anything_is_written(tiny, tmp_path, overrides, message):
    run_dir = tmp_path / "run"
    result = run_cli_in_process(["train", tiny_config_yaml(tiny, run_dir), *overrides])
    assert result.returncode == 2 and not run_dir.exists()
    assert __import__("re").search(message, result.stderr), result.stderr
