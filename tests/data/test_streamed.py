"""Streamed causal-LM training text (data.streaming): the blocks are the packed stream of this rank's
texts in a seeded order that changes each epoch, the ranks share the texts out, skipping replays
exactly, a run trains on them and resumes bitwise after SIGKILL on two ranks, and what needs the
whole split first is refused."""
import json

import pytest

from distill.data.lm import pack_blocks
from tests.conftest import tiny_lm_config_yaml
from tests.helpers import (assert_refused_before_writing, assert_resumes_like, kill_two_rank_run_after, run_cli_in_process,
                           run_deepspeed, train_losses)


def _split_files(tiny_lm, folder):
    """The tiny LM text as a train file and a validation file (a stream carves out none), plus one
    validation text repeated in train (it must not be trained on)."""
    rows = [json.loads(line) for line in tiny_lm["text"].read_text().splitlines()]
    folder.mkdir(parents=True, exist_ok=True)
    train, validation = folder / "train.jsonl", folder / "validation.jsonl"
    train.write_text("".join(json.dumps(row) + "\n" for row in rows[40:] + rows[:1]), encoding="utf-8")
    validation.write_text("".join(json.dumps(row) + "\n" for row in rows[:40]), encoding="utf-8")
    return train, validation, [row["text"] for row in rows]


def _config(tiny_lm, tmp_path, name):
    """(config, run directory, the overrides that stream the split files)."""
    train, validation, _ = _split_files(tiny_lm, tmp_path / "data")
    return (tiny_lm_config_yaml(tiny_lm, tmp_path / name), tmp_path / name,
            [f"data.train.path={train}", f"data.validation.path={validation}", "data.streaming=true",
             "data.shuffle_buffer=64"])


def test_streamed_blocks_are_the_packed_stream_of_each_ranks_texts_in_a_seeded_order(tiny_lm, tmp_path):
    from distill.config.schema import load_config
    from distill.data.streamed import StreamedBlocks
    from distill.data.text import text_key

    train, validation, texts = _split_files(tiny_lm, tmp_path / "data")
    cfg = load_config(tiny_lm_config_yaml(tiny_lm, tmp_path / "run"), [
        f"data.train.path={train}", f"data.validation.path={validation}", "data.streaming=true",
        "data.shuffle_buffer=64", "data.block_size=16"])
    tokenizer, eos = tiny_lm["tokenizer"], tiny_lm["tokenizer"].eos_token_id
    exclude = {text_key(text) for text in texts[:40]}

    def stream(rank=0, world=1, epoch=0, skip=0):
        blocks = StreamedBlocks(cfg.data.train, cfg.data, tokenizer, eos, seed=3, rank=rank, world_size=world,
                                exclude=exclude)
        blocks.set_epoch(epoch, skip)
        return blocks

    order = list(stream().texts())
    assert sorted(order) == sorted(texts[40:])  # every training text once; the validation text left out
    assert order != texts[40:] and list(stream().texts()) == order  # shuffled, the same way every time
    assert list(stream(epoch=1).texts()) != order  # another order the next epoch
    # the blocks: exactly the in-memory packing of that order's tokens
    expected = pack_blocks(tokenizer(order)["input_ids"], eos, 16)
    blocks = list(stream())
    assert [b["input_ids"] for b in blocks] == expected["input_ids"]
    assert [b["labels"] for b in blocks] == expected["labels"]
    assert [b["index"] for b in blocks] == list(range(len(blocks)))
    assert list(stream(skip=5)) == blocks[5:]  # a resume skips the blocks already trained on, nothing else
    # two ranks: each its own texts, together all of them
    shares = [list(stream(rank, 2).texts()) for rank in (0, 1)]
    assert not set(shares[0]) & set(shares[1]) and sorted(shares[0] + shares[1]) == sorted(texts[40:])
    assert abs(len(shares[0]) - len(shares[1])) <= 2  # rows dealt out alternately; the left-out text on one side


def test_a_streamed_run_trains_and_what_needs_the_whole_split_is_refused(tiny_lm, tmp_path):
    config, run_dir, streamed = _config(tiny_lm, tmp_path, "streamed")
    result = run_cli_in_process(["train", config, *streamed, "training.max_steps=4", "training.log_every=1"])
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((run_dir / "report.json").read_text())
    assert report["training"]["train_rows"] is None and report["training"]["steps"] == 4
    assert len(train_losses(run_dir)) == 4 and report["student"]["perplexity"] > 1
    refused, refused_dir, _ = _config(tiny_lm, tmp_path, "refused")
    other = tmp_path / "other.jsonl"  # rows without the text field
    other.write_text('{"body": "a text"}\n' * 50, encoding="utf-8")
    for overrides, message in [
        (["training.max_steps=null", "training.epochs=1"], "data.streaming: a stream has no length"),
        (["data.validation.path=null"], "data.streaming: no validation split is carved out of a stream"),
        (["data.prepare=true"], "data.streaming: ['data.prepare'] need(s) the whole training split"),
        (["student.trim_vocab=true"], "['student.trim_vocab']"),
        (["data.shuffle_buffer=0"], "data.shuffle_buffer must be >= 1"),
        ([f"data.train.path={tmp_path / 'missing.jsonl'}"], "data.train.path"),
        ([f"data.train.path={other}"], "has no column 'text'"),
    ]:
        assert_refused_before_writing(refused, refused_dir, [*streamed, *overrides], message)
    cache = run_cli_in_process(["cache", refused, "--out", tmp_path / "cache", *streamed])
    assert cache.returncode == 2 and "a cache holds the teachers' outputs for every training block" in cache.stderr
    assert not (tmp_path / "cache").exists()
    classification = tmp_path / "classification.yaml"
    classification.write_text(refused.read_text().replace("task: causal_lm", "task: sequence_classification"))
    assert_refused_before_writing(classification, refused_dir, ["data.streaming=true"], "data.streaming")


@pytest.mark.multirank
def test_a_killed_two_rank_streamed_run_resumes_bitwise(tiny_lm, tmp_path):
    reference_config, reference_dir, streamed = _config(tiny_lm, tmp_path, "uninterrupted")
    common = [*streamed, "training.max_steps=12", "training.checkpoint_every=2", "training.log_every=1",
              "training.keep_checkpoints=20", "deepspeed.zero_stage=2"]
    reference = run_deepspeed(2, [reference_config, *common])  # several epochs of the stream
    assert reference.returncode == 0, (reference.stdout + reference.stderr)[-5000:]

    config, run_dir, _ = _config(tiny_lm, tmp_path, "killed")
    killed_at = kill_two_rank_run_after(config, common, run_dir, "step0000004", tmp_path / "killed.log")
    assert 2 <= killed_at < 12
    position = json.loads((run_dir / "checkpoints" / f"step{killed_at:07d}" / "distill_manifest.json").read_text())
    assert position["position"]["batches_in_epoch"] > 0  # resumed inside an epoch: blocks of the stream skipped
    assert_resumes_like(reference_dir, run_dir, config, common, killed_at)
