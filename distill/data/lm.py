"""Causal-LM data: raw text (or prompt/response pairs) -> next-token blocks.

Plain text is tokenized, joined with EOS and packed into blocks of `data.block_size` tokens
(consecutive blocks overlap by one token, so every token after the first is predicted exactly once);
prompt/response rows become one sequence each, and only the response's tokens carry labels. Labels
are next-token ids aligned with the inputs (`labels[t] = input_ids[t + 1]`), -100 where nothing is
learned (prompt, padding).

Mixture sources (`data.mixture_sources`) are packed each on its own, so a block never mixes two
sources and carries the `source` id the mixture sampler draws by. Evaluation domains
(`data.eval_domains`) select validation texts by regex and are packed on their own too: a packed
block of the whole validation split belongs to no single domain.
"""
from __future__ import annotations

from typing import Dict, List, Sequence

import torch
from datasets import Dataset, Value, concatenate_datasets

from distill.config.schema import DataSourceConfig, mixture_source_split

from distill.errors import ConfigError
from distill.data.text import (INDEX, LABELS, ROUTE, SOURCE, Splits, check_fields, column, drop_duplicates, is_missing,
                          load_source, map_fingerprint, route_values, rows_matching, select_rows, subsample, text_keys,
                          with_column)
from distill.formulas.divergences import IGNORE_INDEX


def lm_fields(data) -> List[str]:
    return [data.prompt_field, data.response_field] if data.prompt_field else [data.text_fields[0]]


def _read(source, key: str, data, route_by=None) -> Dataset:
    dataset = load_source(source, key)
    fields = lm_fields(data)
    check_fields(dataset, fields, key)
    if route_by is not None:  # the routing column's values, as text (before rows are dropped)
        values = route_values(dataset, route_by, key)
        dataset = dataset.remove_columns([ROUTE]) if ROUTE in dataset.column_names else dataset
        dataset = with_column(dataset, ROUTE, values)

    def has_text(row):
        return not any(is_missing(row[f]) for f in fields)

    dataset = dataset.filter(has_text, desc="drop empty rows", new_fingerprint=map_fingerprint(dataset, has_text, fields))
    dataset = dataset.select_columns(fields + ([ROUTE] if route_by is not None else []))
    for field in fields:  # csv reads large_string, json string: one type, so sources concatenate
        if dataset.features[field] != Value("string"):
            dataset = dataset.cast_column(field, Value("string"))
    if len(dataset) == 0:
        raise ConfigError(f"data.{key}.path: {source.path} has no rows with text in {fields}")
    if data.drop_duplicate_texts:
        dataset = drop_duplicates(dataset, fields)
    return subsample(dataset, source.max_samples, data.seed)


def read_lm_splits(data, route_by=None) -> Splits:
    """Raw train/validation rows (text, or prompt/response); validation is carved out of train
    (seeded) when data.validation.path is not set. With data.mixture_sources, train is the
    concatenation of the sources, each row tagged with its source id; with `route_by`, each row
    keeps that column's value (ROUTE)."""
    fields = lm_fields(data)
    if data.streaming:  # the train text is read as it trains (data/streamed.py): nothing to read now
        return Splits(train=None, validation=_read(data.validation, "validation", data, route_by), label_names=[],
                      source_names=["train"])
    train = _read(data.train, "train", data, route_by)
    if data.validation.path is not None:
        validation = _read(data.validation, "validation", data, route_by)
    else:
        if len(train) < 2:
            raise ConfigError(f"data.train.path: {data.train.path} has {len(train)} row(s); a validation split "
                              "needs at least 2 (or set data.validation.path)")
        parts = train.train_test_split(test_size=data.validation_fraction, seed=data.seed)
        train, validation = parts["train"], parts["test"]
    if data.drop_duplicate_texts:  # validation text never leaks into training
        seen = set(text_keys(validation, fields))
        train = drop_duplicates(train, fields, exclude=seen)
    if not data.mixture_sources:
        return Splits(train=with_column(train, SOURCE, [0] * len(train)), validation=validation, label_names=[],
                      source_names=["train"])
    parts = []
    for index, source in enumerate(data.mixture_sources):
        key = f"mixture_sources[{index}]"
        split = mixture_source_split(source)
        if split not in (None, "train"):
            raise ConfigError(f"data.{key}: task causal_lm reads mixture sources from a path or from_split=train, "
                              f"not {split!r}")
        part = train if split == "train" else _read(source, key, data, route_by)
        if split is None and data.drop_duplicate_texts:
            part = drop_duplicates(part, fields, exclude=set(text_keys(validation, fields)))
        if source.match is not None:
            part = select_rows(part, rows_matching(column(part, fields[0]), source.match, source.invert_match))
        if len(part) == 0:
            raise ConfigError(f"data.{key} ({source.name}): no rows left (match={source.match!r}, "
                              f"invert_match={source.invert_match})")
        parts.append(with_column(part, SOURCE, [index] * len(part)))
    return Splits(train=concatenate_datasets(parts), validation=validation, label_names=[],
                  source_names=[source.name for source in data.mixture_sources])


def eos_token_id(tokenizer) -> int:
    if tokenizer.eos_token_id is None:
        raise ConfigError("the student's tokenizer has no EOS token: causal-LM data needs one to separate texts")
    return tokenizer.eos_token_id


def pack_blocks(token_lists: Sequence[Sequence[int]], eos_id: int, block_size: int) -> Dict[str, List[List[int]]]:
    """Join the texts (each followed by EOS) and cut blocks of block_size inputs; block i predicts
    tokens i*block_size+1 .. (i+1)*block_size, so every token after the first is a label once."""
    stream = [token for tokens in token_lists for token in (*tokens, eos_id)]
    inputs, labels = [], []
    for start in range(0, max(len(stream) - 1, 0), block_size):
        piece = stream[start:start + block_size + 1]
        if len(piece) < 2:
            break
        inputs.append(piece[:-1])
        labels.append(piece[1:])
    return {"input_ids": inputs, LABELS: labels}


def prompt_response_rows(prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]], eos_id: int,
                         max_length: int) -> Dict[str, List[List[int]]]:
    """One sequence per pair, prompt + response + EOS cut to max_length + 1 tokens; a position's
    label is the next token when that token belongs to the response (or is the EOS), else -100."""
    inputs, labels = [], []
    for prompt, response in zip(prompts, responses):
        sequence = (list(prompt) + list(response) + [eos_id])[:max_length + 1]
        if len(sequence) < 2:
            continue
        inputs.append(sequence[:-1])
        labels.append([sequence[t + 1] if t + 1 >= len(prompt) else IGNORE_INDEX for t in range(len(sequence) - 1)])
    return {"input_ids": inputs, LABELS: labels}


def _encode_rows(dataset: Dataset, tokenizer, data) -> Dict[str, List[List[int]]]:
    eos = eos_token_id(tokenizer)
    if data.prompt_field:
        prompts = tokenizer(column(dataset, data.prompt_field))["input_ids"]
        responses = tokenizer(column(dataset, data.response_field), add_special_tokens=False)["input_ids"]
        return prompt_response_rows(prompts, responses, eos, data.max_length)
    return pack_blocks(tokenizer(column(dataset, data.text_fields[0]))["input_ids"], eos, data.block_size)


def _encode_aligned(dataset: Dataset, tokenizer, data, teacher_groups, student_byte_lengths: Sequence[int]
                    ) -> Dict[str, List[List[int]]]:
    """Packed blocks as `pack_blocks` cuts them plus, per teacher tokenizer group, the teacher's own
    tokens of each block's text (`<prefix>input_ids`, at most `group.max_length` of them) and per
    student position the window position that has read the same text (`<prefix>positions`, -1
    where none has): token_alignment.pack_aligned_blocks."""
    from distill.tokens.alignment import byte_spans, pack_aligned_blocks

    texts = column(dataset, data.text_fields[0])
    lengths = [len(text.encode("utf-8")) for text in texts]

    def spans(encoded, byte_lengths):  # offsets in bytes, pieces of one character told apart
        return [byte_spans(offsets, [byte_lengths[i] for i in ids], text)
                for ids, offsets, text in zip(encoded["input_ids"], encoded["offset_mapping"], texts)]

    student = tokenizer(texts, return_offsets_mapping=True)
    student_spans = spans(student, student_byte_lengths)
    out: Dict[str, List[List[int]]] = {}
    for group in teacher_groups:
        teacher = group.tokenizer(texts, return_offsets_mapping=True)
        blocks = pack_aligned_blocks(student["input_ids"], student_spans, teacher["input_ids"],
                                     spans(teacher, group.byte_lengths), lengths, eos_token_id(tokenizer),
                                     group.tokenizer.eos_token_id, data.block_size)
        limit = group.max_length
        out[group.prefix + "input_ids"] = [window[:limit] for window in blocks["teacher_input_ids"]]
        out[group.prefix + "positions"] = [[j if j < limit else -1 for j in positions]
                                           for positions in blocks["teacher_positions"]]
        out["input_ids"], out[LABELS] = blocks["input_ids"], blocks[LABELS]
    return out


def packing_groups(dataset: Dataset) -> List[tuple]:
    """({column: value}, row positions) per (source, route) value present, in packing order: a block
    never mixes two sources or two routes. Positions None: every row (neither column is there)."""
    keys = [name for name in (SOURCE, ROUTE) if name in dataset.column_names]
    if not keys:
        return [({}, None)]
    tags = list(zip(*(dataset[name] for name in keys)))
    return [(dict(zip(keys, tag)), [i for i, t in enumerate(tags) if t == tag]) for tag in sorted(set(tags))]


def encode_lm(dataset: Dataset, tokenizer, data, key: str, teacher_groups: Sequence = (),
              student_byte_lengths: Sequence[int] = ()) -> Dataset:
    """Blocks (input_ids, labels, index, source) of a split; a `source` column is packed source by
    source. With `teacher_groups` (teachers with other tokenizers) each block also carries every
    group's aligned window (_encode_aligned; `student_byte_lengths` and each group's `byte_lengths`:
    the bytes each token id spells)."""
    columns: Dict[str, list] = {"input_ids": [], LABELS: [], SOURCE: [],
                                **({ROUTE: []} if ROUTE in dataset.column_names else {})}
    for group in teacher_groups:
        columns[group.prefix + "input_ids"], columns[group.prefix + "positions"] = [], []
    for tag, positions in packing_groups(dataset):
        rows = dataset if positions is None else select_rows(dataset, positions)
        encoded = (_encode_aligned(rows, tokenizer, data, teacher_groups, student_byte_lengths) if teacher_groups
                   else _encode_rows(rows, tokenizer, data))
        for name, values in encoded.items():
            columns[name] += values
        for name in (SOURCE, ROUTE):
            if name in columns:
                columns[name] += [tag.get(name, 0)] * len(encoded["input_ids"])
    if not columns["input_ids"] or not any(label != IGNORE_INDEX for row in columns[LABELS] for label in row):
        raise ConfigError(f"data.{key}: no token to learn after tokenization (empty texts or all-prompt rows)")
    columns[INDEX] = list(range(len(columns["input_ids"])))
    return Dataset.from_dict(columns)


def domain_rows(dataset: Dataset, data, domain, index: int, route_by=None) -> Dataset:
    """The rows of one evaluation domain: its own file (with the routing column, when rows are
    routed), or the validation rows whose first text field matches its regex."""
    if domain.path is not None:
        return _read(DataSourceConfig(path=domain.path), f"eval_domains[{index}]", data, route_by)
    return select_rows(dataset, rows_matching(column(dataset, lm_fields(data)[0]), domain.match, domain.invert_match))


class LMCollator:
    """Right-pads a batch: input ids with the pad (or EOS) id, attention mask 0, labels -100; each
    teacher group's window (`<prefix>input_ids`) likewise with its own attention mask, and its
    aligned positions with -1."""

    def __init__(self, tokenizer, teacher_groups: Sequence = ()):
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_token_id(tokenizer)
        self.prefixes = [group.prefix for group in teacher_groups]

    @staticmethod
    def _padded(rows: List[Dict], name: str, fill: int):
        length = max(1, max(len(row[name]) for row in rows))
        values = torch.full((len(rows), length), fill, dtype=torch.long)
        mask = torch.zeros((len(rows), length), dtype=torch.long)
        for i, row in enumerate(rows):
            if row[name]:
                values[i, :len(row[name])] = torch.tensor(row[name])
                mask[i, :len(row[name])] = 1
        return values, mask

    def __call__(self, rows: List[Dict]) -> Dict:
        length = max(len(row["input_ids"]) for row in rows)
        ids = torch.full((len(rows), length), self.pad_id, dtype=torch.long)
        labels = torch.full((len(rows), length), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(rows), length), dtype=torch.long)
        for i, row in enumerate(rows):
            n = len(row["input_ids"])
            ids[i, :n] = torch.tensor(row["input_ids"])
            labels[i, :n] = torch.tensor(row[LABELS])
            mask[i, :n] = 1
        batch = {"input_ids": ids, "attention_mask": mask, LABELS: labels,
                 INDEX: torch.tensor([row[INDEX] for row in rows], dtype=torch.long)}
        for name in (SOURCE, ROUTE):
            if name in rows[0]:
                batch[name] = torch.tensor([row[name] for row in rows], dtype=torch.long)
        for prefix in self.prefixes:  # the teacher's pad id never reaches it: masked, and not a gathered position
            batch[prefix + "input_ids"], batch[prefix + "attention_mask"] = self._padded(rows, prefix + "input_ids", 0)
            batch[prefix + "positions"], _ = self._padded(rows, prefix + "positions", -1)
        return batch
