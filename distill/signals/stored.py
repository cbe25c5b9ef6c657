"""Teachers whose outputs are stored, not run: a black-box teacher's file
(`teachers.models[i].logits`: csv, jsonl or parquet, one row per example id) and the classification
cache (`teachers.cache`, caches/classifier.py: every teacher's logits per text key).

Each such teacher is a `StoredOutputs` table: no weights load, nothing runs, it counts 0 parameters.
The classification teachers' source (signals/sources.ClassifierTeachers) reads a stored teacher's rows
by the batch's key column where a live teacher would run, so interpolation, fitting, evaluation and the
non-finite policy see one [K, B, C] tensor whatever each teacher is.
"""
from __future__ import annotations

from typing import Dict, List

import torch
from torch import Tensor

from distill.config.schema import DistillConfig
from distill.data.text import EXAMPLE_ID, TEXT_KEY, column
from distill.errors import ConfigError
from distill.models.teachers import TeacherPlan
from distill.util.paths import resolve_path


class StoredOutputs:
    """One teacher's outputs per row key: [rows, labels] logits (or log-probabilities) in the data's
    label order, found by the batch's `key_column` (data.id_field's example ids, or text keys)."""

    def __init__(self, table: Tensor, row_of: Dict[str, int], key: str, key_column: str = EXAMPLE_ID):
        self.table, self.row_of, self.key, self.key_column = table, row_of, key, key_column

    def logits_of(self, batch: Dict) -> Tensor:
        """[B, labels] float32 of the batch's rows; ConfigError naming the teacher for a key it lacks."""
        keys = batch[self.key_column]
        missing = [i for i in keys if i not in self.row_of]
        if missing:
            raise ConfigError(f"{self.key}: no row for example ids {missing[:5]}")
        return self.table[[self.row_of[i] for i in keys]].float()


def black_box_outputs(cfg: DistillConfig, plans: List[TeacherPlan], label_names: List[str]) -> Dict[int, StoredOutputs]:
    """{k: teacher k's file read} for each black-box plan (`outputs` set), keyed by data.id_field."""
    return {k: StoredOutputs(*read_stored_outputs(plan.path, cfg.data.id_field, label_names, plan.outputs, plan.key),
                             plan.key)
            for k, plan in enumerate(plans) if plan.outputs is not None}


def cached_outputs(cache, plans: List[TeacherPlan]) -> Dict[int, StoredOutputs]:
    """{k: teacher k's logits in an opened classification cache (caches/classifier.ClassifierCache)},
    keyed by text key; the cache holds them in the data's label order already."""
    return {k: StoredOutputs(cache.logits[:, k].contiguous(), cache.row_of, plan.key, TEXT_KEY)
            for k, plan in enumerate(plans)}


def read_stored_outputs(path: str, id_field: str, label_names: List[str], outputs: str, key: str):
    """(table [rows, labels] float32 in label_names' order, id -> row) from a csv/jsonl/parquet file,
    or ConfigError naming the file and what is wrong (no id column, labels missing or unknown,
    repeated ids, probabilities outside [0, 1])."""
    import pandas

    file = resolve_path(path)
    suffix = file.suffix.lower()
    readers = {".csv": pandas.read_csv, ".parquet": pandas.read_parquet,
               ".jsonl": lambda f: pandas.read_json(f, lines=True), ".json": lambda f: pandas.read_json(f, lines=True)}
    if suffix not in readers:
        raise ConfigError(f"{key}: {file.name} is not a csv, jsonl or parquet file")
    try:
        frame = readers[suffix](file)
    except Exception as error:  # pickle or other bytes under a .csv / .parquet name: pandas' own errors vary
        raise ConfigError(f"{key}: {file.name} cannot be read as {suffix[1:]} ({type(error).__name__}: "
                          f"{str(error).splitlines()[0][:120] if str(error) else 'unreadable'}): give the teacher's "
                          "outputs as a csv, jsonl or parquet table with one column per label") from error
    if id_field not in frame.columns:
        raise ConfigError(f"{key}: {file.name} has no column {id_field!r} (data.id_field); columns: {list(frame.columns)}")
    columns = [c for c in frame.columns if c != id_field]
    missing = [name for name in label_names if name not in columns]
    unknown = [name for name in columns if name not in label_names]
    if missing or unknown:
        raise ConfigError(f"{key}: {file.name} must have one column per label {list(label_names)}: missing {missing}, "
                          f"not labels {unknown}")
    ids = [str(value) for value in frame[id_field].tolist()]
    if len(set(ids)) != len(ids):
        raise ConfigError(f"{key}: {file.name} repeats example ids in {id_field!r}")
    try:
        table = torch.tensor(frame[list(label_names)].to_numpy(dtype="float64"), dtype=torch.float64)
    except (TypeError, ValueError) as error:
        raise ConfigError(f"{key}: {file.name} has values that are not numbers in its label columns: fix them") from error
    # the whole file is checked now, not when a bad row is first drawn (after checkpoints were written)
    bad = ~torch.isfinite(table).all(dim=1)
    if bool(bad.any()):
        first = int(bad.nonzero()[0])
        raise ConfigError(f"{key}: {file.name} has NaN or infinite values in {int(bad.sum())} row(s), the first with "
                          f"{id_field} {ids[first]!r}: fix or drop them")
    if outputs == "probabilities":
        if bool(((table < 0) | (table > 1)).any()):
            raise ConfigError(f"{key}: {file.name} holds values outside [0, 1] but outputs: probabilities")
        sums = table.sum(dim=1)
        off = (sums - 1).abs() > 1e-3
        if bool(off.any()):
            first = int(off.nonzero()[0])
            raise ConfigError(f"{key}: {file.name} has rows whose probabilities do not sum to 1 ({int(off.sum())} row(s); "
                              f"{id_field} {ids[first]!r} sums to {float(sums[first]):.4g}): give each row's "
                              "distribution over the labels, or set outputs: logits")
        table = table.clamp(min=1e-12).log()  # log-probabilities are valid logits
    return table.float(), {example_id: row for row, example_id in enumerate(ids)}


def check_stored_outputs_cover(cfg: DistillConfig, plans: List[TeacherPlan], label_names: List[str], splits) -> None:
    """Every example id of the training and validation rows has a row in each black-box teacher's file."""
    for plan in plans:
        if plan.outputs is None:
            continue
        _, row_of = read_stored_outputs(plan.path, cfg.data.id_field, label_names, plan.outputs, plan.key)
        for name, split in (("train", splits.train), ("validation", splits.validation)):
            absent = [i for i in column(split, EXAMPLE_ID) if i not in row_of]
            if absent:
                raise ConfigError(f"{plan.key}: {len(absent)} example id(s) of the {name} split have no row in the "
                                  f"file, e.g. {absent[:3]}: add them or remove those rows from the data")