"""Scheduled data mixtures: proportions follow the schedule, ranks split one global batch, and a
resumed sampler continues with exactly the same batches."""
import itertools
import json
import math

import pytest

from distill.config.schema import ConfigError, load_config
from distill.data.mixture import MixtureBatchSampler
from distill.formulas.schedules import schedule_value
from tests.conftest import tiny_config_yaml
from tests.helpers import run_cli

SIZES = (500, 700)


def _sampler(rank=0, world=2, start=0, steps=200):
    rows = [list(range(SIZES[0])), list(range(SIZES[0], SIZES[0] + SIZES[1]))]

    def proportions(step):
        share = schedule_value("linear", 0.1, 0.9, step, 0, steps)
        return [1 - share, share]

    sampler = MixtureBatchSampler(rows, proportions, micro_batch_size=16, gradient_accumulation_steps=1,
                                  world_size=world, rank=rank, seed=5)
    sampler.start_micro_step = start
    return sampler, proportions


def test_drawn_proportions_follow_the_schedule_within_sampling_error():
    (first, proportions), (second, _) = _sampler(0), _sampler(1)
    batches = [a + b for a, b in itertools.islice(zip(first, second), 200)]
    for window in range(0, 200, 20):
        rows = [index for batch in batches[window:window + 20] for index in batch]
        drawn = sum(index >= SIZES[0] for index in rows) / len(rows)
        scheduled = sum(proportions(step)[1] for step in range(window, window + 20)) / 20
        sigma = math.sqrt(scheduled * (1 - scheduled) / len(rows))
        assert abs(drawn - scheduled) < 4 * sigma, (window, drawn, scheduled)


def test_ranks_take_disjoint_slices_and_sources_are_read_without_repeats():
    (first, _), (second, _) = _sampler(0), _sampler(1)
    seen = [index for a, b in itertools.islice(zip(first, second), 40) for index in a + b]
    general = [index for index in seen if index < SIZES[0]]
    assert len(general) > SIZES[0]
    assert sorted(general[:SIZES[0]]) == list(range(SIZES[0]))  # one full pass before any repeat
    assert general[SIZES[0]:SIZES[0] + 20] != general[:20]  # the next pass is reshuffled
    assert len(next(iter(first))) == 16


def test_a_resumed_sampler_continues_with_the_same_batches():
    uninterrupted = list(itertools.islice(iter(_sampler(1)[0]), 120))
    resumed = list(itertools.islice(iter(_sampler(1, start=70)[0]), 50))
    assert resumed == uninterrupted[70:]


@pytest.mark.parametrize("overrides, message", [
    (["data.mixture_sources=[{name: train}, {name: unlabeled}]"], "needs schedules.data_mixture"),
    (["data.mixture_sources=[{name: train}, {name: unlabeled}]", "schedules.data_mixture={start: [1, 0]}",
      "training.max_steps=null"], "needs training.max_steps"),
    (["data.mixture_sources=[{name: train}, {name: unlabeled}]", "schedules.data_mixture={start: [1, 0, 0]}"],
     r"schedules.data_mixture.start needs one weight per data.mixture_sources entry \(2\)"),
    (["data.mixture_sources=[{name: general}]", "schedules.data_mixture={start: [1]}"],
     r"data.mixture_sources\[0\] \(general\): give a path or from_split"),
    (["data.mixture_sources=[{name: a, from_split: train, match: '(unclosed'}]", "schedules.data_mixture={start: [1]}"],
     r"data.mixture_sources\[0\].match: '\(unclosed' is not a valid regular expression"),
])
def test_bad_mixture_configs_are_named(tiny, tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(tiny_config_yaml(tiny, tmp_path / "r"), overrides)


def test_a_mixture_run_logs_scheduled_and_drawn_proportions(tiny, tmp_path):
    run_dir = tmp_path / "mixture"
    config = tiny_config_yaml(tiny, run_dir)
    result = run_cli(["train", config, "training.max_steps=10", "training.log_every=5",
                      "data.mixture_sources=[{name: train}, {name: unlabeled}]",
                      "schedules.data_mixture={kind: linear, start: [0.9, 0.1], end: [0.1, 0.9]}"])
    assert result.returncode == 0, result.stderr[-4000:]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rows = [row for row in rows if row["kind"] == "train"]
    # the window's mean scheduled share: batches of steps 0-4, then 5-9, of a 0.1 -> 0.9 ramp over 10 steps
    assert rows[0]["mixture/unlabeled/scheduled"] == pytest.approx(0.1 + 0.08 * 2)
    assert rows[-1]["mixture/unlabeled/scheduled"] == pytest.approx(0.1 + 0.08 * 7)
    for row in rows:
        assert row["mixture/train/drawn"] + row["mixture/unlabeled/drawn"] == pytest.approx(1.0)
    assert rows[-1]["mixture/unlabeled/drawn"] > rows[0]["mixture/unlabeled/drawn"]


def test_regex_sources_and_per_domain_validation_metrics(tiny, tmp_path):
    run_dir = tmp_path / "domains"
    config = tiny_config_yaml(tiny, run_dir)
    positive = "great|lovely|love|superb"
    result = run_cli(["train", config, "training.max_steps=6", "training.log_every=3", "training.eval_every=3",
                      f"data.mixture_sources=[{{name: general, from_split: train, match: '{positive}', invert_match: true}}, "
                      f"{{name: upbeat, from_split: train, match: '{positive}'}}]",
                      "schedules.data_mixture={kind: linear, start: [1.0, 0.0], end: [0.0, 1.0]}",
                      f"data.eval_domains=[{{name: upbeat, match: '{positive}'}}, "
                      f"{{name: general, match: '{positive}', invert_match: true}}]"])
    assert result.returncode == 0, result.stderr[-4000:]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train_rows = [row for row in rows if row["kind"] == "train"]
    assert train_rows[0]["mixture/upbeat/drawn"] < train_rows[-1]["mixture/upbeat/drawn"]
    evals = [row for row in rows if row["kind"] == "eval"]
    assert len(evals) == 2  # step 3 and the final evaluation: both domains each time
    for row in evals:
        assert {"student/upbeat/accuracy", "student/general/accuracy", "target/upbeat/accuracy"} <= set(row)
    # every upbeat validation row is labelled positive in the tiny data, so a domain's accuracy is
    # the share of those rows predicted positive: consistent with the recorded predictions
    predictions = json.loads((run_dir / "eval" / "predictions.json").read_text())
    upbeat = [i for i, label in enumerate(predictions["references"]) if label == 2]
    share = sum(predictions["student"][i] == 2 for i in upbeat) / len(upbeat)
    assert evals[-1]["student/upbeat/accuracy"] == pytest.approx(share)


def test_a_resumed_mixture_run_ends_bitwise_equal_to_an_uninterrupted_one(tiny, tmp_path):
    from safetensors.torch import load_file

    common = ["training.lr_schedule=constant", "training.warmup_ratio=0.0", "training.checkpoint_every=3",
              "data.mixture_sources=[{name: train}, {name: unlabeled}]",
              "schedules.data_mixture={kind: linear, start: [0.8, 0.2], end: [0.2, 0.8], end_step: 6}"]
    whole_dir, split_dir = tmp_path / "whole", tmp_path / "split"
    whole = run_cli(["train", tiny_config_yaml(tiny, whole_dir), "training.max_steps=6", *common])
    assert whole.returncode == 0, whole.stderr[-3000:]
    split_config = tiny_config_yaml(tiny, split_dir)
    first = run_cli(["train", split_config, "training.max_steps=3", *common])
    assert first.returncode == 0, first.stderr[-3000:]
    (split_dir / "report.json").unlink()
    second = run_cli(["train", split_config, "training.max_steps=6", "training.resume=auto", *common])
    assert second.returncode == 0, second.stderr[-3000:]
    expected = load_file(str(whole_dir / "student" / "model.safetensors"))
    actual = load_file(str(split_dir / "student" / "model.safetensors"))
    assert all((expected[name] == actual[name]).all() for name in expected)
