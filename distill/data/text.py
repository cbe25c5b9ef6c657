"""Data: `datasets.load_dataset` -> labels as ids -> splits -> tokenization -> dynamic padding.

Reading and splitting (`read_splits`) needs no model, so bad data fails before anything is loaded.
Rows without a label (or the whole `data.unlabeled` source) carry label -100 and add only the KD
term. Every row keeps an `index` (its position in its split) so results gathered from several
ranks can be put back in order.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
from datasets import Dataset, concatenate_datasets, load_dataset

from distill.config.schema import DataConfig, DataSourceConfig, mixture_source_split

from distill.errors import ConfigError
from distill.formulas.divergences import IGNORE_INDEX
from distill.util.paths import is_local_reference, resolve_path

_FORMATS = {".csv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet", ".txt": "text"}
LABELS = "labels"
INDEX = "index"
EXAMPLE_ID = "example_id"  # data.id_field's value, as a string: black-box teachers' files are keyed by it
SOURCE = "source"
ROUTE = "route"  # teachers.route_by's value (read as text), then its route id (interpolation/routing.py; -1: unrouted)
TEXT_KEY = "text_key"  # a digest of a row's text fields: cached classification teachers are keyed by it


def text_key(*texts: str) -> str:
    """16 hex digits of sha256 over the text fields (the same text is the same key in any split)."""
    return hashlib.sha256("\x1f".join(texts).encode("utf-8", "surrogatepass")).hexdigest()[:16]


@dataclass
class Splits:
    """Raw text splits with integer `labels` (-100 where unlabelled) and `index` columns."""

    train: Dataset
    validation: Dataset
    label_names: List[str]
    source_names: List[str]  # train rows carry a `source` id into this list


def load_source(source: DataSourceConfig, key: str, streaming: bool = False) -> Dataset:
    """The source's rows; `streaming`: a `datasets.IterableDataset` read as it is iterated."""
    reference = source.path
    try:
        if is_local_reference(reference):
            path = resolve_path(reference)
            if path.is_dir():
                return load_dataset(str(path), split=source.split, streaming=streaming)
            data_format = _FORMATS.get(path.suffix.lower())
            if data_format is None:
                raise ConfigError(f"data.{key}.path: {path} has an unknown extension; "
                                  f"use one of {sorted(_FORMATS)}")
            extra = {"encoding": source.encoding} if data_format == "csv" else {}
            return load_dataset(data_format, data_files=str(path), split="train", streaming=streaming, **extra)
        return load_dataset(reference, split=source.split, streaming=streaming)
    except ConfigError:
        raise
    except Exception as error:
        if is_local_reference(reference):
            if "corresponds to no data" in str(error):
                raise ConfigError(f"data.{key}.path: {reference} has no rows") from error
            path = resolve_path(reference)
            found = diagnose_file(path, _FORMATS.get(path.suffix.lower()), source.encoding, key) if path.is_file() else None
            if found:
                raise ConfigError(f"data.{key}.path: {reference} {found}") from error
            raise ConfigError(f"data.{key}.path: cannot read {reference}: {error}") from error
        offline = " (not found locally, and the hub is offline)" if os.environ.get("HF_HUB_OFFLINE") else ""
        raise ConfigError(f"data.{key}.path: cannot load {reference!r}{offline}: {error}") from error


def diagnose_file(path: Path, data_format: Optional[str], encoding: str, key: str) -> Optional[str]:
    """What is wrong with a local data file that `datasets` failed to read, with its line and the
    fix (an undecodable byte, a broken JSON line, a CSV row with another number of fields); None
    when none of these is found."""
    import csv
    import io
    import json

    raw = path.read_bytes()
    try:
        text = raw.decode(encoding)
    except UnicodeDecodeError as error:
        line = raw[:error.start].count(b"\n") + 1
        hint = f" (data.{key}.encoding, e.g. latin-1)" if data_format == "csv" else ""
        return (f"line {line} is not valid {encoding} (byte 0x{raw[error.start]:02x}): set the file's encoding{hint} "
                "or convert the file to UTF-8")
    if data_format == "json" and path.suffix.lower() == ".jsonl":
        for number, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                try:
                    json.loads(line)
                except json.JSONDecodeError as error:
                    return f"line {number} is not valid JSON ({error.msg} at column {error.colno}): fix or remove that line"
    if data_format == "csv":
        rows = csv.reader(io.StringIO(text))
        header = next(rows, None)
        for number, row in enumerate(rows, start=2):
            if header is not None and row and len(row) != len(header):
                return (f"line {number} has {len(row)} fields, the header {len(header)}: fix that row (quote a text "
                        "holding commas)")
    return None


def check_fields(dataset: Dataset, fields: Sequence[str], key: str) -> None:
    missing = [field for field in fields if field not in dataset.column_names]
    if missing:
        raise ConfigError(f"data.{key}: column(s) {missing} not found in {dataset.column_names}; "
                          f"set data.text_fields / data.label_field")


def is_missing(value) -> bool:
    return value is None or (isinstance(value, float) and np.isnan(value)) or (isinstance(value, str) and not value.strip())


def infer_label_names(values: Sequence) -> List[str]:
    present = {str(v) for v in values if not is_missing(v)}
    if all(name.lstrip("-").isdigit() for name in present):
        return [str(i) for i in range(max(int(n) for n in present) + 1)] if present else []
    return sorted(present)


def column(dataset: Dataset, name: str) -> list:
    """A whole column as a list, read at once. `dataset[name]` is a lazy `datasets.Column` that reads
    one row per step when iterated or indexed (datasets 5: 15 us a row, 43 us through the indices
    mapping a split leaves, against 0.1-3 us a row for this one read)."""
    return dataset[name][:]


def _to_label_ids(values: Sequence, label_names: List[str], key: str) -> List[int]:
    lookup = {name: index for index, name in enumerate(label_names)}
    ids = []
    for value in values:
        if is_missing(value):
            ids.append(IGNORE_INDEX)
            continue
        name = str(value)
        if name not in lookup:
            raise ConfigError(f"data.{key}: label {name!r} is not in data.label_names {label_names}")
        ids.append(lookup[name])
    return ids


def route_values(dataset: Dataset, route_by: str, key: str) -> List[str]:
    """Each row's value of the routing column as text ('' where it is missing)."""
    if route_by not in dataset.column_names:
        raise ConfigError(f"teachers.route_by: the {key} data has no column {route_by!r} (columns: "
                          f"{dataset.column_names}); add it, or set teachers.route_by to the column naming each row's "
                          "domain")
    return ["" if is_missing(value) else str(value) for value in column(dataset, route_by)]


def _normalise(dataset: Dataset, cfg: DataConfig, label_names: Optional[List[str]], key: str,
               route_by: Optional[str] = None) -> Dataset:
    """Keep the text fields (and the routing column's values), map labels to ids (or -100), drop
    rows whose text is empty."""
    check_fields(dataset, cfg.text_fields, key)
    if cfg.label_field in dataset.column_names and label_names is not None:
        labels = _to_label_ids(column(dataset, cfg.label_field), label_names, key)
    else:
        labels = [IGNORE_INDEX] * len(dataset)
    texts = {field: ["" if v is None else str(v) for v in column(dataset, field)] for field in cfg.text_fields}
    keep = [i for i in range(len(dataset)) if texts[cfg.text_fields[0]][i].strip()]
    columns = {field: [texts[field][i] for i in keep] for field in cfg.text_fields}
    columns[LABELS] = [labels[i] for i in keep]
    if cfg.id_field is not None:
        if cfg.id_field not in dataset.column_names:
            raise ConfigError(f"data.id_field: the {key} data has no column {cfg.id_field!r} "
                              f"(columns: {dataset.column_names})")
        ids = column(dataset, cfg.id_field)
        columns[EXAMPLE_ID] = [str(ids[i]) for i in keep]
    if route_by is not None:
        values = route_values(dataset, route_by, key)
        columns[ROUTE] = [values[i] for i in keep]
    return Dataset.from_dict(columns)


def text_keys(dataset: Dataset, fields: Sequence[str]) -> List[tuple]:
    """Each row's text fields, as a tuple."""
    return list(zip(*(column(dataset, field) for field in fields)))


def _digest(key: tuple) -> bytes:
    text = key[0] if len(key) == 1 else json.dumps(key)  # one field: its text; several: unambiguously joined
    return hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16).digest()


def drop_duplicates(dataset: Dataset, fields: Sequence[str], exclude: set = frozenset()) -> Dataset:
    """The rows whose text fields were not seen before (nor in `exclude`, a set of text_keys), first
    occurrences kept in order. The texts are read a batch at a time and only their 16-byte digests
    kept, so a corpus larger than memory is checked in a few bytes per row."""
    seen = {_digest(key) for key in exclude}
    keep = []
    index = 0
    for rows in dataset.select_columns(list(fields)).iter(batch_size=10_000):
        for key in zip(*(rows[field] for field in fields)):
            digest = _digest(key)
            if digest not in seen:
                seen.add(digest)
                keep.append(index)
            index += 1
    return dataset if len(keep) == len(dataset) else select_rows(dataset, keep)


def _stratified_split(labels: Sequence[int], fraction: float, seed: int) -> tuple[list, list]:
    """Seeded split keeping class proportions; unlabelled rows always stay in train."""
    rng = np.random.default_rng(seed)
    labels = np.asarray(labels)
    validation = []
    for label in sorted(set(labels.tolist()) - {IGNORE_INDEX}):
        members = np.flatnonzero(labels == label)
        count = int(round(fraction * len(members)))
        validation.extend(rng.permutation(members)[:count].tolist())
    validation_set = set(validation)
    train = [i for i in range(len(labels)) if i not in validation_set]
    return train, sorted(validation)


def subsample(dataset: Dataset, max_samples: Optional[int], seed: int) -> Dataset:
    if max_samples is None or max_samples >= len(dataset):
        return dataset
    return select_rows(dataset.shuffle(seed=seed), range(max_samples))


def _with_index(dataset: Dataset) -> Dataset:
    return with_column(dataset, INDEX, list(range(len(dataset))))


def read_splits(cfg: DataConfig, route_by: Optional[str] = None) -> Splits:
    """Load train / validation / unlabeled sources into labelled text splits, or raise ConfigError;
    with `route_by` every row keeps that column's value (ROUTE)."""
    seed = cfg.seed
    raw_train = load_source(cfg.train, "train")
    if len(raw_train) == 0:
        raise ConfigError(f"data.train.path: {cfg.train.path} has no rows")
    raw_validation = load_source(cfg.validation, "validation") if cfg.validation.path else None

    check_fields(raw_train, [cfg.label_field], "train")
    label_names = list(cfg.label_names) if cfg.label_names else infer_label_names(raw_train[cfg.label_field])
    if len(label_names) < 2:
        raise ConfigError(f"data.train: column {cfg.label_field!r} holds fewer than two distinct labels")

    train = _normalise(raw_train, cfg, label_names, "train", route_by)
    if len(train) == 0:
        raise ConfigError(f"data.train: every row of {cfg.train.path} has an empty {cfg.text_fields[0]!r} "
                          f"(data.text_fields[0]): check that data.text_fields names the text column "
                          f"(columns: {raw_train.column_names})")
    if cfg.drop_duplicate_texts:
        train = drop_duplicates(train, cfg.text_fields)
    if raw_validation is not None:
        validation = _normalise(raw_validation, cfg, label_names, "validation", route_by)
        if cfg.drop_duplicate_texts:
            validation = drop_duplicates(validation, cfg.text_fields)
    else:
        train_rows, validation_rows = _stratified_split(column(train, LABELS), cfg.validation_fraction, seed)
        validation, train = select_rows(train, validation_rows), select_rows(train, train_rows)
    if cfg.drop_duplicate_texts:
        train = drop_duplicates(train, cfg.text_fields, exclude=set(text_keys(validation, cfg.text_fields)))
    validation = subsample(validation, cfg.validation.max_samples, seed)
    train = subsample(train, cfg.train.max_samples, seed)

    named = {"train": train}
    if cfg.unlabeled.path:
        named["unlabeled"] = _extra_source(cfg, cfg.unlabeled, "unlabeled", None, [validation, train], seed, route_by)
    if cfg.mixture_sources:
        parts = []
        for index, source in enumerate(cfg.mixture_sources):
            key = f"mixture_sources[{index}]"
            split = mixture_source_split(source)
            part = named[split] if split is not None else _extra_source(cfg, source, key, label_names, [validation], seed,
                                                                               route_by)
            if source.match is not None:
                part = select_rows(part, rows_matching(column(part, cfg.text_fields[0]), source.match, source.invert_match))
                if len(part) == 0:
                    raise ConfigError(f"data.{key}: no rows {'outside' if source.invert_match else 'match'} "
                                      f"match={source.match!r}")
            parts.append(with_column(part, SOURCE, [index] * len(part)))
        source_names = [source.name for source in cfg.mixture_sources]
    else:
        parts = [with_column(part, SOURCE, [index] * len(part)) for index, part in enumerate(named.values())]
        source_names = list(named)
    train = concatenate_datasets(parts)

    if len(train) == 0:
        raise ConfigError(f"data.train: no training rows left from {cfg.train.path}")
    present = sorted({label for label in column(train, LABELS) if label != IGNORE_INDEX})
    if len(present) == 1:
        raise ConfigError(f"data.train: every labelled training row has label {label_names[present[0]]!r} "
                          f"({cfg.label_field}): a classifier learns nothing from one class; check "
                          "data.label_field and the file, or add rows of the other labels")
    validation_labels = np.asarray(column(validation, LABELS)) if len(validation) else np.array([])
    if len(validation) == 0 or np.all(validation_labels == IGNORE_INDEX):
        raise ConfigError("data.validation: the validation split is empty or has no labels; "
                          "set data.validation.path or a larger data.validation_fraction")
    return Splits(train=_with_index(train), validation=_with_index(validation), label_names=label_names,
                  source_names=source_names)


def _extra_source(cfg: DataConfig, source, key: str, label_names, exclude: Sequence[Dataset], seed: int,
                  route_by: Optional[str] = None) -> Dataset:
    """An unlabelled (or, with a label column, labelled) source, without texts already in `exclude`."""
    rows = _normalise(load_source(source, key), cfg, label_names, key, route_by)
    if cfg.drop_duplicate_texts:
        seen = set().union(*(set(text_keys(split, cfg.text_fields)) for split in exclude))
        rows = drop_duplicates(rows, cfg.text_fields, exclude=seen)
    rows = subsample(rows, source.max_samples, seed)
    if len(rows) == 0:
        raise ConfigError(f"data.{key}.path: {source.path} has no rows left after removing texts already in "
                          "train or validation")
    return rows


def rows_matching(texts: Sequence[str], pattern: str, invert: bool = False) -> List[int]:
    """Positions of the texts that match `pattern` (case-insensitive search), or that do not."""
    import re

    compiled = re.compile(pattern, re.IGNORECASE)
    return [i for i, text in enumerate(texts) if bool(compiled.search(text)) != invert]


def texts_of(dataset: Dataset, fields: Sequence[str]) -> List[str]:
    """All text of a split as one list (pairs flattened), e.g. for vocabulary trimming."""
    return [text for field in fields for text in column(dataset, field)]


@dataclass
class TokenizerGroup:
    """One tokenizer and the column prefix its encodings are stored under ('' for the student)."""

    prefix: str
    tokenizer: object
    # causal LM, a teacher with its own tokenizer: the longest window it reads, its tokens' byte lengths
    max_length: Optional[int] = None
    byte_lengths: Optional[List[int]] = None


def tokenizer_digest(tokenizer) -> str:
    """What a tokenizer turns text into, as a digest (its full serialisation where it is a fast one)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        text = backend.to_str()
    else:  # a slow tokenizer: its vocabulary and its special tokens
        text = json.dumps([sorted(tokenizer.get_vocab().items()), tokenizer.all_special_tokens])
    return hashlib.sha256(text.encode()).hexdigest()


def derived_fingerprint(dataset: Dataset, operation: str, *settings) -> str:
    """The fingerprint `datasets` gives the result of `operation` on `dataset`, computed here from the
    input's own fingerprint and the operation's settings: JSON values, and index or value lists
    (lists, ranges, arrays) as the digest of their bytes. Left to itself, `datasets` hashes the
    arguments with dill (seconds for a column or an index list of a million rows) inside a bare
    `except:` that swallows whatever is raised there, a Ctrl-C included: a run interrupted in that
    moment went on training."""
    digest = hashlib.sha256(json.dumps([dataset._fingerprint, operation]).encode())
    for value in settings:
        try:
            array = np.asarray(value) if isinstance(value, (list, range, np.ndarray)) else None
        except ValueError:  # lists of lists of different lengths
            array = None
        if array is not None and array.dtype != object:
            digest.update(f"{array.dtype}{array.shape}".encode() + array.tobytes())
        else:  # other values, and lists of mixed kinds or of uneven lists
            digest.update(json.dumps(value if array is None else array.tolist()).encode())
    return digest.hexdigest()[:32]


def map_fingerprint(dataset: Dataset, transform, *settings) -> str:
    """The fingerprint of `dataset.map(transform)`'s result: the transform's code (its code object)
    and the values it closes over (`settings`, tokenizers as their digests), as `derived_fingerprint`.
    Left to itself, `datasets` dill-serialises the transform and every tokenizer it closes over."""
    import marshal

    return derived_fingerprint(dataset, hashlib.sha256(marshal.dumps(transform.__code__)).hexdigest(), *settings)


def select_rows(dataset: Dataset, positions) -> Dataset:
    """`dataset.select(positions)` with its fingerprint computed here (`derived_fingerprint`)."""
    return dataset.select(positions, new_fingerprint=derived_fingerprint(dataset, "select", positions))


def with_column(dataset: Dataset, name: str, values) -> Dataset:
    """`dataset.add_column(name, values)` with its fingerprint computed here (`derived_fingerprint`)."""
    return dataset.add_column(name, values, new_fingerprint=derived_fingerprint(dataset, f"add_column {name}", values))


def tokenize(dataset: Dataset, groups: Sequence[TokenizerGroup], text_fields: Sequence[str],
             max_length: int) -> Dataset:
    """Encode the text fields once per tokenizer group; keeps `labels` and `index`, adds `text_key`."""

    def encode(batch):
        out = {TEXT_KEY: [text_key(*texts) for texts in zip(*(batch[field] for field in text_fields))]}
        for group in groups:
            encoded = group.tokenizer(*[batch[field] for field in text_fields], truncation=True,
                                      max_length=max_length)
            for name, values in encoded.items():
                out[group.prefix + name] = values
        return out

    settings = [list(text_fields), max_length, [[group.prefix, tokenizer_digest(group.tokenizer)] for group in groups]]
    return dataset.map(encode, batched=True, remove_columns=list(text_fields), desc="tokenize",
                       new_fingerprint=map_fingerprint(dataset, encode, *settings))


class Collator:
    """Pads each tokenizer group to the longest row in the batch (dynamic padding)."""

    def __init__(self, groups: Sequence[TokenizerGroup]):
        self.groups = list(groups)

    def __call__(self, rows: List[Dict]) -> Dict:
        import torch

        batch = {LABELS: torch.tensor([row[LABELS] for row in rows], dtype=torch.long),
                 INDEX: torch.tensor([row[INDEX] for row in rows], dtype=torch.long)}
        for column in (SOURCE, ROUTE):
            if column in rows[0]:
                batch[column] = torch.tensor([row[column] for row in rows], dtype=torch.long)
        for column in (EXAMPLE_ID, TEXT_KEY):  # keys of stored teacher outputs
            if column in rows[0]:
                batch[column] = [row[column] for row in rows]
        for group in self.groups:
            names = group.tokenizer.model_input_names
            features = [{name: row[group.prefix + name] for name in names if group.prefix + name in row}
                        for row in rows]
            padded = group.tokenizer.pad(features, padding=True, return_tensors="pt")
            for name, tensor in padded.items():
                batch[group.prefix + name] = tensor
        return batch


def model_inputs(batch: Dict, prefix: str = "") -> Dict:
    """The tensors of one tokenizer group, with the prefix removed, ready for model(**inputs)."""
    keys = ("input_ids", "attention_mask", "token_type_ids")
    return {key: batch[prefix + key] for key in keys if prefix + key in batch}
