"""Tagged sentences (token classification): one row per sentence, its words in a list and their
tags in a list of the same length (the CoNLL / `datasets` convention).

    {"tokens": ["EU", "rejects", "German", "call"], "tags": ["B-ORG", "O", "B-MISC", "O"]}

`data.text_fields: [tokens]` names the words, `data.label_field` the tags (names, or ids into
`data.label_names`). A row without tags (or `data.unlabeled`) is KD-only: every word -100. Rows
without words are dropped; a row whose tag count differs from its word count is refused, naming
the split, the row and the fix. Validation comes from `data.validation.path` or a seeded random
`data.validation_fraction` of the training sentences.
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import numpy as np
from datasets import Dataset

from distill.data.text import (EXAMPLE_ID, INDEX, LABELS, SOURCE, Splits, check_fields, column, is_missing,
                               load_source, select_rows, subsample, with_column)
from distill.errors import ConfigError
from distill.formulas.divergences import IGNORE_INDEX

WORDS = "words"
WORD_IDS = "word_ids"  # per sub-token: the index of its word in the sentence, -1 for special tokens
ROWS = "rows"  # 1 where a sub-token is a row of the loss (carries its word's tag)
FIRST = "first"  # 1 at the first sub-token of each word: where words are scored


def _tag_names(rows: Sequence, key: str) -> List[str]:
    present = sorted({str(tag) for tags in rows if tags is not None for tag in tags if not is_missing(tag)})
    if any(name.lstrip("-").isdigit() for name in present):
        raise ConfigError(f"data.{key}: the tags are ids; set data.label_names to the tag names in id order "
                          "(e.g. [O, B-PER, I-PER, ...])")
    return present


def _tag_ids(tags, names: List[str], key: str, row: int) -> List[int]:
    lookup = {name: index for index, name in enumerate(names)}
    ids = []
    for tag in tags:
        if is_missing(tag):
            ids.append(IGNORE_INDEX)
        elif isinstance(tag, (int, np.integer)) and not isinstance(tag, bool):
            if not 0 <= int(tag) < len(names):
                raise ConfigError(f"data.{key}: row {row} has tag id {tag}, data.label_names has {len(names)} names")
            ids.append(int(tag))
        elif str(tag) in lookup:
            ids.append(lookup[str(tag)])
        else:
            raise ConfigError(f"data.{key}: row {row} has tag {tag!r}, which is not in data.label_names {names}")
    return ids


def normalise_tagged(dataset: Dataset, data, names: Optional[List[str]], key: str) -> Dataset:
    """Columns `words` (list of str) and `labels` (list of tag ids, -100 where untagged), plus the
    example id; sentences without words dropped."""
    field = data.text_fields[0]
    check_fields(dataset, [field], key)
    tagged = data.label_field in dataset.column_names and names is not None
    words_column = column(dataset, field)
    tags_column = column(dataset, data.label_field) if tagged else [None] * len(dataset)
    columns = {WORDS: [], LABELS: []}
    ids = column(dataset, data.id_field) if data.id_field is not None and data.id_field in dataset.column_names else None
    if data.id_field is not None and ids is None:
        raise ConfigError(f"data.id_field: the {key} data has no column {data.id_field!r} "
                          f"(columns: {dataset.column_names})")
    if ids is not None:
        columns[EXAMPLE_ID] = []
    for row, (words, tags) in enumerate(zip(words_column, tags_column)):
        if isinstance(words, str):
            raise ConfigError(f"data.{key}: row {row} of column {field!r} is a string, not a list of words: "
                              "token classification reads one list of words per row (split the text into words)")
        words = [str(word) for word in (words or []) if word is not None and str(word).strip()]
        if not words:
            continue
        if tags is None:
            labels = [IGNORE_INDEX] * len(words)
        else:
            if len(tags) != len(words):
                raise ConfigError(f"data.{key}: row {row} has {len(words)} words and {len(tags)} tags: give one tag "
                                  "per word")
            labels = _tag_ids(tags, names, key, row)
        columns[WORDS].append(words)
        columns[LABELS].append(labels)
        if ids is not None:
            columns[EXAMPLE_ID].append(str(ids[row]))
    return Dataset.from_dict(columns)


def _drop_duplicates(dataset: Dataset, seen: set) -> Dataset:
    keep = []
    for index, words in enumerate(column(dataset, WORDS)):
        key = "\x1f".join(words)
        if key not in seen:
            seen.add(key)
            keep.append(index)
    return select_rows(dataset, keep)


def read_tagged_splits(data) -> Splits:
    """train / validation (/ unlabeled) sentences with tag ids, or ConfigError before any model loads."""
    raw_train = load_source(data.train, "train")
    if len(raw_train) == 0:
        raise ConfigError(f"data.train.path: {data.train.path} has no rows")
    check_fields(raw_train, [data.text_fields[0], data.label_field], "train")
    names = list(data.label_names) if data.label_names else _tag_names(column(raw_train, data.label_field), "train")
    if len(names) < 2:
        raise ConfigError(f"data.train: column {data.label_field!r} holds fewer than two distinct tags")
    train = normalise_tagged(raw_train, data, names, "train")
    seen: set = set()
    if data.validation.path:
        validation = normalise_tagged(load_source(data.validation, "validation"), data, names, "validation")
    else:
        order = np.random.default_rng(data.seed).permutation(len(train))
        count = int(round(data.validation_fraction * len(train)))
        validation = select_rows(train, sorted(order[:count].tolist()))
        train = select_rows(train, sorted(order[count:].tolist()))
    if data.drop_duplicate_texts:
        validation = _drop_duplicates(validation, seen)
        train = _drop_duplicates(train, seen)
    validation = subsample(validation, data.validation.max_samples, data.seed)
    train = subsample(train, data.train.max_samples, data.seed)
    parts, source_names = [train], ["train"]
    if data.unlabeled.path:
        unlabeled = normalise_tagged(load_source(data.unlabeled, "unlabeled"), data, None, "unlabeled")
        if data.drop_duplicate_texts:
            unlabeled = _drop_duplicates(unlabeled, seen)
        unlabeled = subsample(unlabeled, data.unlabeled.max_samples, data.seed)
        if len(unlabeled) == 0:
            raise ConfigError(f"data.unlabeled.path: {data.unlabeled.path} has no sentences left after removing "
                              "those already in train or validation")
        parts.append(unlabeled)
        source_names.append("unlabeled")
    if len(train) == 0:
        raise ConfigError(f"data.train: no training sentences left from {data.train.path}")
    if len(validation) == 0 or all(label == IGNORE_INDEX for labels in column(validation, LABELS) for label in labels):
        raise ConfigError("data.validation: the validation split is empty or has no tags; "
                          "set data.validation.path or a larger data.validation_fraction")
    from datasets import concatenate_datasets

    train = concatenate_datasets([with_column(part, SOURCE, [i] * len(part)) for i, part in enumerate(parts)])
    return Splits(train=with_column(train, INDEX, list(range(len(train)))),
                  validation=with_column(validation, INDEX, list(range(len(validation)))),
                  label_names=names, source_names=source_names)
