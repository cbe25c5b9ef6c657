"""A task keeps nothing one call leaves for the next (tasks/base.Context): the set-up stages return
what they found, and every later call reads the context it is handed, whichever was made last."""
import copy
from dataclasses import replace

import pytest

from tests.conftest import tiny_config_yaml, tiny_lm_config_yaml, train_lm_tokenizer, train_tokenizer


def attributes(task):
    """The task's attributes, containers copied (a call that fills a dict in place shows too)."""
    return {name: copy.copy(value) if isinstance(value, (dict, list, tuple)) else value
            for name, value in vars(task).items()}


def planned(config):
    """(task, plans, context) after the stages every command runs before writing, through the task alone."""
    from distill.config.schema import load_config, student_source
    from distill.models.loading import load_tokenizer
    from distill.tasks import build_task

    cfg = load_config(config)
    task = build_task(cfg)
    before = attributes(task)
    splits = task.read_splits()
    reference, key = student_source(cfg)
    plans, context = task.plan_teachers(splits, load_tokenizer(reference, key, False))
    context = task.check_before_writing(plans, context)
    task.collator(context)
    task.training_rows(context)
    after = attributes(task)
    changed = {name for name in set(before) | set(after) if name not in before or name not in after
               or not (before[name] is after[name] or before[name] == after[name])}
    # only a memo of a call's own result may change: a causal LM's encoded train split (counted here)
    assert changed <= ({"_encoded"} if cfg.task == "causal_lm" else set()), changed
    return task, plans, context


@pytest.mark.parametrize("kind", ["sequence_classification", "causal_lm"])
def test_the_stages_return_a_context_and_leave_nothing_on_the_task(kind, request, tmp_path):
    from distill.tasks.base import Context

    if kind == "causal_lm":
        config = tiny_lm_config_yaml(request.getfixturevalue("tiny_lm"), tmp_path / "run")
    else:
        config = tiny_config_yaml(request.getfixturevalue("tiny"), tmp_path / "run")
    task, plans, context = planned(config)
    assert isinstance(context, Context) and len(plans) == 2
    assert context.groups[0].prefix == "" and context.groups[0].tokenizer is context.tokenizer
    assert context.label_names == context.splits.label_names
    # what a stage used to leave on the task is gone: nothing of the set-up is an attribute
    for name in ("splits", "label_names", "groups", "teacher_groups", "tokenizer", "cache", "served_source",
                 "domain_sets", "bytes", "train_set", "student_bytes", "student_vocab_size", "vocabulary"):
        assert not hasattr(task, name), name


def test_a_classification_encoding_follows_the_context_it_is_handed(tiny, tmp_path):
    task, _, context = planned(tiny_config_yaml(tiny, tmp_path / "run"))
    texts = ["great quiet ride today", "awful road and rain"]
    other = replace(context, tokenizer=train_tokenizer(tmp_path / "other", texts * 20))
    rows = context.splits.validation.select(range(6))
    first = task.encode(rows, "validation", context)["input_ids"]
    theirs = task.encode(rows, "validation", other)["input_ids"]
    again = task.encode(rows, "validation", context)["input_ids"]
    assert first == again != theirs
    text = rows[0]["text"]
    assert theirs[0] == other.tokenizer(text, truncation=True, max_length=task.cfg.data.max_length)["input_ids"]
    assert first[0] == context.tokenizer(text, truncation=True, max_length=task.cfg.data.max_length)["input_ids"]
    batch = task.collator(other)([{key: value[i] for key, value in task.encode(rows, "validation", other)[:].items()}
                                  for i in range(2)])
    assert batch["input_ids"][0, :len(theirs[0])].tolist() == theirs[0]


def test_a_causal_lm_encoding_and_its_evaluation_sets_follow_the_context(tiny_lm, tmp_path):
    task, _, context = planned(tiny_lm_config_yaml(tiny_lm, tmp_path / "run"))
    texts = [row["text"] for row in context.splits.train]
    other = replace(context, tokenizer=train_lm_tokenizer(tmp_path / "other", texts, vocab_size=280))
    validation = context.splits.validation
    first = task.encode(validation, "validation", context)
    theirs = task.encode(validation, "validation", other)
    again = task.encode(validation, "validation", context)
    assert first["input_ids"] == again["input_ids"] != theirs["input_ids"]
    assert max(max(ids) for ids in theirs["input_ids"]) < len(other.tokenizer)
    # each context's blocks are its tokenizer's ids of the validation text (block 0 starts the first row)
    head = theirs["input_ids"][0]
    assert head[:8] == other.tokenizer(validation[0]["text"])["input_ids"][:8]
    # the bytes bits per byte divides by are the text's, whatever the tokenizer
    assert task._evaluation_sets(other)[1]["validation"] == task._evaluation_sets(context)[1]["validation"] == sum(
        len(text.encode("utf-8")) for text in validation["text"])
