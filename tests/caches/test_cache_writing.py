"""Writing a cache (distill/caches/shards.py): shards by fixed slices, a killed `distill cache`
continues to the very same shards, a folder of another plan is refused before anything is written,
and two ranks through the DeepSpeed launcher write one cache equal to one rank's."""
import json
import os
import socket
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open

from distill.caches.shards import META, PLAN, shard_slices
from tests.conftest import tiny_config_yaml, tiny_lm_config_yaml
from tests.helpers import ROOT, run_cli, run_deepspeed, shared_memory_left, run_cli_in_process

# `distill cache` that kills itself (SIGKILL: no cleanup, its lock and a half-written file stay)
# when it is about to write its third shard
KILLED_AFTER_TWO_SHARDS = """
import os, signal, sys
from distill.caches import shards as cache_writing
original, written = cache_writing.ShardedWriter.write, []
def write(self, number, tensors, metadata=None):
    if len(written) == 2:
        partial = self.folder / (cache_writing.shard_name(number) + cache_writing.PARTIAL + str(os.getpid()))
        partial.write_bytes(b"half a shard")
        os.kill(os.getpid(), signal.SIGKILL)
    original(self, number, tensors, metadata)
    written.append(number)
cache_writing.ShardedWriter.write = write
from distill.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_shard_slices_cut_each_split_by_hand():
    assert shard_slices([5, 3], 2) == [(0, 0, 2), (0, 2, 4), (0, 4, 5), (1, 0, 2), (1, 2, 3)]
    assert shard_slices([4], 4) == [(0, 0, 4)]
    assert shard_slices([0, 1], 8) == [(1, 0, 1)]


def shards_of(folder):
    """Every tensor and its metadata, per shard file name."""
    out = {}
    for path in sorted(folder.glob("shard_*.safetensors")):
        with safe_open(str(path), framework="pt") as handle:
            out[path.name] = ({name: handle.get_tensor(name) for name in handle.keys()}, handle.metadata())
    return out


def listing(folder):
    return sorted((path.name, path.stat().st_mtime_ns) for path in folder.iterdir())


@pytest.mark.parametrize("task", ["causal_lm", "sequence_classification"])
@pytest.mark.slow
def test_a_killed_cache_continues_to_the_same_shards_and_a_changed_plan_is_refused(task, tiny, tiny_lm, tmp_path):
    if task == "causal_lm":  # the sampled store: its draws must not depend on where a run stopped
        config = tiny_lm_config_yaml(tiny_lm, tmp_path / "unused")
        options, other = ["--store", "sampled", "--samples", "4", "--rows-per-shard", "8"], ["--samples", "5"]
    else:
        config = tiny_config_yaml(tiny, tmp_path / "unused")
        options, other = ["--rows-per-shard", "32", "teachers.dtype=float32"], ["teachers.dtype=bfloat16"]
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    first = run_cli(["cache", config, "--out", whole, *options])
    assert first.returncode == 0, first.stderr[-3000:]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    killed = subprocess.run([sys.executable, "-c", KILLED_AFTER_TWO_SHARDS, "cache", str(config), "--out", str(resumed),
                             *options], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert killed.returncode == -9, killed.stderr[-3000:]
    assert (resumed / PLAN).is_file() and not (resumed / META).exists()
    assert len(list(resumed.glob("shard_*.safetensors"))) == 2 and list(resumed.glob("*.partial-*"))
    refused = run_cli_in_process(["train", config, f"teachers.cache={resumed}", f"output_dir={tmp_path / 'run'}"])
    assert refused.returncode == 2 and "one still being written" in refused.stderr
    before = listing(resumed)
    changed = run_cli_in_process(["cache", config, "--out", resumed, *options, *other])
    assert changed.returncode == 2 and "holds part of a cache written with other" in changed.stderr
    assert ("samples" if task == "causal_lm" else "teacher_dtype") in changed.stderr
    assert listing(resumed) == before  # nothing written, nothing removed
    again = run_cli(["cache", config, "--out", resumed, *options])
    assert again.returncode == 0, again.stderr[-3000:]
    assert "2 shard(s) already written" in again.stdout
    shards = len(list(whole.glob("shard_*.safetensors")))
    assert f"cache rank 0 of 1: writing {shards - 2} of {shards} shard(s)" in again.stdout
    assert not list(resumed.glob("*.partial-*")) and not (resumed / ".distill.lock").exists()
    expected, got = shards_of(whole), shards_of(resumed)
    assert len(expected) > 2 and expected.keys() == got.keys()
    for name, (tensors, metadata) in expected.items():
        assert metadata == got[name][1]
        assert tensors.keys() == got[name][0].keys()
        for key, value in tensors.items():
            assert torch.equal(value, got[name][0][key]), (name, key)
    assert json.loads((whole / META).read_text()) == json.loads((resumed / META).read_text())
    finished = run_cli_in_process(["cache", config, "--out", resumed, *options])
    assert finished.returncode == 2 and "holds a finished cache" in finished.stderr


@pytest.mark.multirank
def test_two_ranks_write_one_cache_equal_to_one_ranks(tiny_lm, tmp_path):
    config = tiny_lm_config_yaml(tiny_lm, tmp_path / "unused")
    options = ["--top-k", "8", "--rows-per-shard", "8"]
    single = run_cli(["cache", config, "--out", tmp_path / "one", *options])
    assert single.returncode == 0, single.stderr[-3000:]
    double = run_deepspeed(2, [config, "--out", tmp_path / "two", *options], script="cache.sh")
    assert double.returncode == 0, (double.stdout + double.stderr)[-6000:]
    assert shared_memory_left(double.master_port) == []
    shards = len(list((tmp_path / "one").glob("shard_*.safetensors")))
    for rank, share in ((0, (shards + 1) // 2), (1, shards // 2)):  # each rank wrote its own half
        assert f"cache rank {rank} of 2: writing {share} of {shards} shard(s)" in double.stdout
    one, two = shards_of(tmp_path / "one"), shards_of(tmp_path / "two")
    assert len(one) >= 4 and one.keys() == two.keys()
    for name, (tensors, _) in one.items():
        assert torch.equal(tensors["index"], two[name][0]["index"]) and torch.equal(tensors["ids"], two[name][0]["ids"])
        torch.testing.assert_close(tensors["log_probs"], two[name][0]["log_probs"], rtol=1e-5, atol=1e-5)
    one_meta, two_meta = (json.loads((tmp_path / name / META).read_text()) for name in ("one", "two"))
    assert one_meta["rows"] == two_meta["rows"] and one_meta["shards"] == two_meta["shards"]
    for mine, theirs in zip(one_meta["teachers"], two_meta["teachers"]):  # evaluated on both ranks, gathered
        assert theirs["perplexity"] == pytest.approx(mine["perplexity"], rel=1e-5)


def test_a_folder_that_is_not_this_cache_or_is_in_use_is_refused_and_left_alone(tiny, tmp_path):
    config = tiny_config_yaml(tiny, tmp_path / "unused")
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    refused = run_cli_in_process(["cache", config, "--out", foreign])
    assert refused.returncode == 2 and "is not a cache distill is writing" in refused.stderr
    assert [path.name for path in foreign.iterdir()] == ["notes.txt"]
    whole = tmp_path / "whole"
    assert run_cli(["cache", config, "--out", whole]).returncode == 0
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / PLAN).write_text((whole / PLAN).read_text())  # the same plan, part-written...
    (busy / ".distill.lock").write_text(f"{socket.gethostname()} {os.getpid()}\n")  # ...by a live process
    held = run_cli_in_process(["cache", config, "--out", busy])
    assert held.returncode == 2 and f"cache target {busy} is in use by process {os.getpid()}" in held.stderr
    assert sorted(path.name for path in busy.iterdir()) == [".distill.lock", PLAN]
