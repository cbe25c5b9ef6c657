"""Weight-space interpolation: exact ends, the formula, the sweep's choice, and clear mismatches."""
import json

import pytest
import torch
from transformers import AutoModelForSequenceClassification

from distill.config.schema import ConfigError
from distill.exporting.wise_ft import check_compatible, interpolate_weights, read_weights, write_interpolated
from tests.conftest import make_bert_classifier, tiny_config_yaml, train_tokenizer
from tests.helpers import run_cli, run_cli_in_process


@pytest.fixture
def pair(tiny, tmp_path):
    first = make_bert_classifier(tmp_path / "A", tiny["tokenizer"], layers=2, seed=11)
    second = make_bert_classifier(tmp_path / "B", tiny["tokenizer"], layers=2, seed=12)
    return first, second


def test_alpha_one_and_zero_reproduce_the_checkpoints_exactly(pair, tmp_path):
    first, second = pair
    for alpha, expected in ((1.0, first), (0.0, second)):
        out = write_interpolated(first, second, tmp_path / f"out{alpha}", alpha)
        mixed, original = read_weights(out), read_weights(expected)
        assert mixed.keys() == original.keys()
        assert all(torch.equal(mixed[name], original[name]) for name in original)
        AutoModelForSequenceClassification.from_pretrained(out)  # plain transformers loads it


def test_interpolation_matches_the_float64_formula(pair):
    first, second = pair
    weights_a, weights_b = read_weights(first), read_weights(second)
    mixed = interpolate_weights(weights_a, weights_b, 0.3)
    name = "bert.encoder.layer.0.attention.self.query.weight"
    expected = (0.3 * weights_a[name].double() + 0.7 * weights_b[name].double()).float()
    assert torch.equal(mixed[name], expected)
    with pytest.raises(ValueError, match=r"alpha must lie in \[0, 1\]"):
        interpolate_weights(weights_a, weights_b, 1.5)


def test_mismatches_are_named(tiny, pair, tmp_path):
    first, _ = pair
    deeper = make_bert_classifier(tmp_path / "deeper", tiny["tokenizer"], layers=3, seed=1)
    with pytest.raises(ConfigError, match="different tensors"):
        write_interpolated(first, deeper, tmp_path / "x", 0.5)
    wider = make_bert_classifier(tmp_path / "wider", tiny["tokenizer"], layers=2, seed=1, hidden=48)
    with pytest.raises(ConfigError, match=r"tensor bert\..* has shape \(32,?\) in one checkpoint and \(48,?\) in the other"):
        write_interpolated(first, wider, tmp_path / "y", 0.5)
    relabelled = make_bert_classifier(tmp_path / "labels", tiny["tokenizer"], layers=2, seed=1,
                                      label_names=["neutral", "negative", "positive"])
    with pytest.raises(ConfigError, match="differ in id2label"):
        check_compatible(first, relabelled)
    other_tokenizer = train_tokenizer(tmp_path / "tok", ["entirely other words"] * 10)
    retokenised = make_bert_classifier(tmp_path / "tok_model", other_tokenizer, layers=2, seed=1)
    with pytest.raises(ConfigError, match="use different tokenizers"):
        write_interpolated(first, retokenised, tmp_path / "z", 0.5)


def test_sweep_keeps_the_best_alpha_on_validation(tiny, pair, tmp_path):
    first, second = pair
    config = tiny_config_yaml(tiny, tmp_path / "run")
    out = tmp_path / "swept"
    result = run_cli(["interpolate-weights", first, second, out, "--alpha-sweep", "0,0.25,0.5,0.75,1", "--config", config])
    assert result.returncode == 0, result.stderr[-3000:]
    table = json.loads((out / "alpha_sweep.json").read_text())
    rows = table["rows"]
    best = max(rows, key=lambda row: (row["accuracy"], -row["nll"], -rows.index(row)))
    assert table["best_alpha"] == best["alpha"] and "<- best" in result.stdout
    assert (out / "alpha_sweep.png").read_bytes()[:4] == b"\x89PNG"
    expected = interpolate_weights(read_weights(first), read_weights(second), best["alpha"])
    written = read_weights(out)
    assert all(torch.equal(written[name], expected[name]) for name in expected)
    refused = run_cli_in_process(["interpolate-weights", first, second, out, "--alpha", "0.5"])
    assert refused.returncode == 2 and "exists and is not empty" in refused.stderr
