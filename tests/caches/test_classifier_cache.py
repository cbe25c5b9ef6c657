"""Cached classification teachers: a run from the cache equals the live run step for step, fit-weights
and fit_on read it, and a cache of other teachers, text or rows is refused before anything is written."""
import json

import pytest

from tests.conftest import tiny_config_yaml, write_csv
from tests.helpers import assert_refused_before_writing, run_cli, train_losses, run_cli_in_process


@pytest.fixture(scope="module")
def cached(tiny, tmp_path_factory):
    root = tmp_path_factory.mktemp("classifier_cache")
    config = tiny_config_yaml(tiny, root / "unused")
    result = run_cli(["cache", config, "teachers.dtype=float32", "--out", root / "cache"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "cached the logits of 2 teacher(s) over " in result.stdout
    assert " rows in 2 shard(s)" in result.stdout and "blocks" not in result.stdout  # issue 30: examples, not blocks
    return {"root": root, "cache": root / "cache"}


def test_training_from_the_cache_equals_the_live_run_step_for_step(tiny, cached, tmp_path):
    live_dir, cached_dir = tmp_path / "live", tmp_path / "cached"
    live = run_cli(["train", tiny_config_yaml(tiny, live_dir), "teachers.dtype=float32"])
    assert live.returncode == 0, live.stderr[-3000:]
    from_cache = run_cli(["train", tiny_config_yaml(tiny, cached_dir), f"teachers.cache={cached['cache']}"])
    assert from_cache.returncode == 0, from_cache.stderr[-3000:]
    # the cache ran the teachers on other batches (other padded lengths): equal to float rounding
    keep = ("loss", "kd", "ce", "a/kl_to_student", "b/kl_to_student")
    live_rows, cached_rows = train_losses(live_dir), train_losses(cached_dir)
    assert len(live_rows) == len(cached_rows) == 6
    for live_row, cached_row in zip(live_rows, cached_rows):
        for key in keep:
            assert cached_row[key] == pytest.approx(live_row[key], rel=1e-4, abs=1e-7), key
    live_report = json.loads((live_dir / "report.json").read_text())
    cached_report = json.loads((cached_dir / "report.json").read_text())
    for report in (live_report, cached_report):
        report["teachers"] = {teacher["name"]: teacher for teacher in report["teachers"]}
    assert live_report["teachers"]["a"]["dtype"] == cached_report["teachers"]["a"]["dtype"] == "float32"
    for name in ("a", "b"):  # figures and parameter counts of the teachers come through the cache
        assert cached_report["teachers"][name]["accuracy"] == live_report["teachers"][name]["accuracy"]
        assert cached_report["teachers"][name]["params"] == live_report["teachers"][name]["params"] > 0
    assert cached_report["student"]["accuracy"] == live_report["student"]["accuracy"]


def test_fit_weights_and_fit_on_read_the_cache(tiny, cached, tmp_path):
    config = tiny_config_yaml(tiny, tmp_path / "unused")
    live = run_cli(["fit-weights", config, "teachers.dtype=float32", "--out", tmp_path / "live"])
    assert live.returncode == 0, live.stderr[-3000:]
    from_cache = run_cli(["fit-weights", config, f"teachers.cache={cached['cache']}", "--out", tmp_path / "cached"])
    assert from_cache.returncode == 0, from_cache.stderr[-3000:]
    import yaml

    live_weights = yaml.safe_load((tmp_path / "live" / "weights.yaml").read_text())
    cached_weights = yaml.safe_load((tmp_path / "cached" / "weights.yaml").read_text())
    assert live_weights.keys() == cached_weights.keys()
    for live_teacher, cached_teacher in zip(live_weights["teachers"]["models"], cached_weights["teachers"]["models"]):
        assert cached_teacher["weight"] == pytest.approx(live_teacher["weight"], abs=1e-4)
    run_dir = tmp_path / "fitted"
    fitted = run_cli(["train", tiny_config_yaml(tiny, run_dir), f"teachers.cache={cached['cache']}",
                      "interpolation.fit_on=validation", "training.max_steps=2"])
    assert fitted.returncode == 0, fitted.stderr[-3000:]
    assert json.loads((run_dir / "interpolation" / "state.json").read_text())["method"] == "linear"


def test_a_cache_of_other_teachers_text_or_rows_is_refused_before_anything_is_written(tiny, cached, tmp_path):
    from tests.conftest import make_rows

    cache = f"teachers.cache={cached['cache']}"
    grown = write_csv(tmp_path / "grown.csv", make_rows(240, seed=0) + [{"text": "a new row", "sentiment": "neutral"}])
    cases = [
        ([cache, f"teachers.models.1.path={tiny['teacher_a']}"], "holds teachers"),
        ([cache, "data.max_length=16"], "max_length"),
        ([cache, f"data.train.path={grown}"], "row(s) are not in"),
        ([cache, "data.augment.copies=1"], "the cache holds no augmented rows"),
        ([cache, "teachers.placement=zero3"], "teachers.placement is for live teachers"),
        (["teachers.cache=" + str(tmp_path)], "not a cache, or one still being written"),
    ]
    for overrides, message in cases:
        run_dir = tmp_path / f"refused{len(message)}"
        assert_refused_before_writing(tiny_config_yaml(tiny, run_dir), run_dir, overrides, message)
    result = run_cli_in_process(["cache", tiny_config_yaml(tiny, tmp_path / "x"), "--out", tmp_path / "k", "--top-k", "4"])
    assert result.returncode == 2 and "are for causal-LM caches" in result.stderr
    assert not (tmp_path / "k").exists()


def test_a_cut_meta_or_a_shard_that_is_not_one_is_refused_before_anything_is_written(tiny, cached, tmp_path):
    """issue 30: a cut meta.json gave a JSONDecodeError traceback, pickle bytes in a shard a
    SafetensorError ('header too large')."""
    import pickle
    import shutil

    config = tiny_config_yaml(tiny, tmp_path / "unused")
    cut, pickled = tmp_path / "cut", tmp_path / "pickled"
    for folder in (cut, pickled):
        shutil.copytree(cached["cache"], folder)
    meta = (cut / "meta.json").read_text()
    (cut / "meta.json").write_text(meta[:len(meta) // 2])
    shard = sorted(pickled.glob("shard_*.safetensors"))[0]
    shard.write_bytes(pickle.dumps({"logits": [0.1, 0.2]}))
    for folder, message in ((cut, f"{cut / 'meta.json'} is cut or not JSON"),
                            (pickled, f"{shard} is not a readable cache shard")):
        run_dir = tmp_path / f"run_{folder.name}"
        assert_refused_before_writing(config, run_dir, [f"output_dir={run_dir}", f"teachers.cache={folder}"], message)


def test_lm_cache_stores_are_registered_classes_selected_by_name():
    """issue 28: one class per store (caches/lm_stores.py), nothing dispatched on the name elsewhere."""
    from distill.caches.lm_stores import STORES, build_store
    from distill.errors import ConfigError
    from distill.signals.sources import CACHED_SOURCES

    assert sorted(STORES) == ["hidden", "sampled", "topk"]
    assert {build_store(name).reads for name in STORES} == set(CACHED_SOURCES)
    assert [name for name in STORES if build_store(name).softened] == ["sampled"]
    with pytest.raises(ConfigError, match=r"--store must be one of \['hidden', 'sampled', 'topk'\], got 'dense'"):
        build_store("dense")
