"""Prepared causal-LM corpora (data.prepare): blocks cut a batch at a time equal the whole stream's,
written once to a memory-mapped file that later runs reuse, and a run on them trains, and resumes
after SIGKILL on two ranks, exactly as a run on blocks built in memory."""
import random
import subprocess
import sys

import pytest

from distill.data.lm import pack_blocks
from distill.data.prepared import pack_stream
from tests.conftest import tiny_lm_config_yaml
from tests.helpers import ROOT, assert_resumes_like, kill_two_rank_run_after, run_cli, run_cli_in_process, run_deepspeed, train_losses


def _cut_a_batch_at_a_time(texts, sizes, eos, block_size):
    batches, start = [], 0
    for size in sizes:
        batches.append(texts[start:start + size])
        start += size
    batches.append(texts[start:])
    inputs, labels = [], []
    for block_inputs, block_labels in pack_stream(iter(batches), eos, block_size):
        inputs += block_inputs.tolist()
        labels += block_labels.tolist()
    return {"input_ids": inputs, "labels": labels}


def test_packing_a_batch_at_a_time_cuts_exactly_the_blocks_of_the_whole_stream():
    rng = random.Random(0)
    for trial in range(300):
        texts = [[rng.randrange(1, 50) for _ in range(rng.choice([0, 1, 2, 3, 7, 20]))]
                 for _ in range(rng.randrange(0, 12))]
        sizes = [rng.randrange(0, 4) for _ in range(rng.randrange(0, 5))]
        block_size = rng.randrange(1, 9)
        assert _cut_a_batch_at_a_time(texts, sizes, 0, block_size) == pack_blocks(texts, 0, block_size), \
            (trial, texts, sizes, block_size)


def _config(tiny_lm, tmp_path, name, extra=""):
    return tiny_lm_config_yaml(tiny_lm, tmp_path / name, extra=extra)


def test_prepared_blocks_equal_the_in_memory_ones_and_a_later_run_reuses_them(tiny_lm, tmp_path, capsys, monkeypatch):
    from datasets import concatenate_datasets

    from tests.helpers import refuse_transform_hashing

    from distill.config.schema import load_config
    from distill.data.lm import encode_lm, read_lm_splits
    from distill.data.prepared import blocks_key, prepared_blocks
    from distill.data.text import SOURCE, with_column

    refuse_transform_hashing(monkeypatch)  # its tokenizing map has its own fingerprint
    prepared = tmp_path / "prepared"
    for data in ([f"data.train.path={tiny_lm['text']}"], [f"data.train.path={tiny_lm['pairs']}",
                                                           "data.prompt_field=prompt", "data.response_field=response"]):
        cfg = load_config(_config(tiny_lm, tmp_path, "run"), [*data, "data.prepare=true",
                                                              f"data.prepared_dir={prepared}", "data.num_proc=1"])
        train = read_lm_splits(cfg.data).train
        # two sources, interleaved: packed source by source
        train = concatenate_datasets([train] * 26)
        train = with_column(train.remove_columns([SOURCE]), SOURCE, [i % 2 for i in range(len(train))])
        expected = encode_lm(train, tiny_lm["tokenizer"], cfg.data, "train")
        folder = prepared / blocks_key(train, tiny_lm["tokenizer"], cfg.data, tiny_lm["tokenizer"].eos_token_id)
        folder.mkdir(parents=True)
        (folder / "blocks.arrow.999999.partial").write_bytes(b"a preparation killed half way")
        for verb in ("prepared", "reused"):
            blocks = prepared_blocks(train, tiny_lm["tokenizer"], cfg.data, "train", tiny_lm["tokenizer"].eos_token_id)
            assert f"data.train: {verb} {len(expected):,} blocks" in capsys.readouterr().out
            assert blocks.column_names == expected.column_names
            for column in expected.column_names:
                assert blocks[column] == expected[column], column
            assert blocks.cache_files and blocks.cache_files[0]["filename"].startswith(str(prepared))
        assert sorted(path.name for path in folder.iterdir()) == [".lock", "blocks.arrow", "prepared.json"]
    assert len(list(prepared.iterdir())) == 2  # one folder per (rows, tokenizer, settings)
    # blocks packed in memory (aligned windows of teachers with other tokenizers) go to the same kind of file
    extra = with_column(expected, "t1__positions", [[-1, 0]] * len(expected))
    kept = prepared_blocks(train, tiny_lm["tokenizer"], cfg.data, "train", 0, encode_in_memory=lambda: extra)
    assert "data.train: prepared" in capsys.readouterr().out
    assert kept.column_names == extra.column_names
    assert all(kept[column] == extra[column] for column in extra.column_names)


def test_two_tokenizing_processes_prepare_the_same_blocks(tiny_lm, tmp_path):
    """data.num_proc=2 over enough texts for two processes, in a fresh interpreter: datasets forks its
    pool, and a fork of this test worker (which has run training in-process: threads, a closed process
    group) is not what a user's `distill train` forks from."""
    script = f"""
import sys
from datasets import concatenate_datasets
from transformers import AutoTokenizer
from distill.config.schema import load_config
from distill.data.lm import encode_lm, read_lm_splits
from distill.data.prepared import prepared_blocks

cfg = load_config({str(_config(tiny_lm, tmp_path, "run"))!r}, ["data.prepare=true", "data.prepared_dir={tmp_path / 'prepared'}",
                  "data.num_proc=2"])
tokenizer = AutoTokenizer.from_pretrained({str(tiny_lm['teacher_a'])!r})
train = concatenate_datasets([read_lm_splits(cfg.data).train] * 26)
assert len(train) >= 4000, len(train)  # prepared.py starts processes from 4 batches of 1,000 texts
expected = encode_lm(train, tokenizer, cfg.data, "train")
blocks = prepared_blocks(train, tokenizer, cfg.data, "train", tokenizer.eos_token_id)
assert all(blocks[column] == expected[column] for column in expected.column_names)
print("SAME", len(blocks))
"""
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "data.train: prepared" in result.stdout and "SAME" in result.stdout


def test_a_run_on_prepared_blocks_trains_exactly_like_one_on_blocks_in_memory(tiny_lm, tmp_path):
    in_memory, prepared = tmp_path / "in_memory", tmp_path / "prepared_run"
    assert run_cli(["train", _config(tiny_lm, tmp_path, "in_memory")]).returncode == 0
    result = run_cli(["train", _config(tiny_lm, tmp_path, "prepared_run"), "data.prepare=true",
                      f"data.prepared_dir={tmp_path / 'blocks'}"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "data.train: prepared" in result.stdout and "data.validation: prepared" in result.stdout
    assert [row["loss"] for row in train_losses(prepared)] == [row["loss"] for row in train_losses(in_memory)]
    # a setting the data path does not read without prepare is refused
    refused = run_cli_in_process(["train", _config(tiny_lm, tmp_path, "refused"), "data.num_proc=2"])
    assert refused.returncode == 2 and "data.num_proc is read only with data.prepare=true" in refused.stderr


@pytest.mark.multirank
def test_a_killed_two_rank_run_on_a_prepared_corpus_resumes_bitwise(tiny_lm, tmp_path):
    blocks = tmp_path / "blocks"
    common = ["data.prepare=true", f"data.prepared_dir={blocks}", "training.max_steps=12",  # 4 steps an epoch
              "training.checkpoint_every=3", "training.log_every=1", "training.keep_checkpoints=20",
              "deepspeed.zero_stage=2"]
    reference_dir = tmp_path / "uninterrupted"
    reference = run_deepspeed(2, [_config(tiny_lm, tmp_path, "uninterrupted"), *common])  # both ranks ask for the blocks
    assert reference.returncode == 0, (reference.stdout + reference.stderr)[-5000:]
    assert reference.stdout.count("data.train: prepared") == 1 and len(list(blocks.iterdir())) == 2

    run_dir = tmp_path / "killed"
    config = _config(tiny_lm, tmp_path, "killed")
    log = tmp_path / "killed.log"
    killed_at = kill_two_rank_run_after(config, common, run_dir, "step0000006", log)
    assert "data.train: reused" in log.read_text(errors="replace")  # the uninterrupted run prepared them
    assert 3 <= killed_at < 12
    assert_resumes_like(reference_dir, run_dir, config, common, killed_at)
