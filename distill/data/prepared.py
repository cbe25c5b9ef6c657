"""Prepared causal-LM corpora: tokenized once, in parallel, into memory-mapped Arrow blocks on disk.

With `data.prepare: true` a split's blocks are not built in memory: its text is tokenized by a
batched `datasets` map (`data.num_proc` processes; `datasets` caches the result beside its own copy
of the data files), then packed batch by batch, exactly as `lm.pack_blocks` would pack the whole
stream, and written to one Arrow file that every later reader memory-maps:

    <data.prepared_dir>/<key>/blocks.arrow   input_ids, labels (int32 lists), source, [route], index
    <data.prepared_dir>/<key>/prepared.json  what the key stands for, rows, tokens, seconds taken

The key is a digest of what the blocks depend on: the split's rows as `datasets` fingerprints them
(its data files, every filter, split and subsample applied to them), the tokenizer, the block
size, the fields and the EOS id. A later run (or another rank) with the same key opens the file
instead of preparing it again; the first rank to take the folder's lock prepares it while the
others wait, and the file is renamed into place only when whole. Memory stays flat in corpus size:
one batch of texts and its blocks at a time, and a training run reads the rows its sampler asks for.

Blocks whose teachers have another tokenizer (aligned windows, tokens/alignment.py) are packed by
the in-memory path once and written to the same kind of file, so later runs still reuse them.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Dict, Iterator, Optional, Sequence

import numpy as np

from distill.data.text import INDEX, LABELS, ROUTE, SOURCE, column, map_fingerprint, select_rows, tokenizer_digest
from distill.errors import ConfigError

FORMAT = "distill_prepared_blocks/1"
BATCH = 1000  # texts per tokenizer call and per packing step


def default_dir() -> Path:
    """Beside the `datasets` cache, where `datasets` already keeps its Arrow copies of the data files."""
    import datasets

    return Path(datasets.config.HF_DATASETS_CACHE) / "distill_prepared"


def blocks_key(dataset, tokenizer, data, eos_id: int, aligned: Sequence = ()) -> str:
    """The digest of everything a split's blocks depend on."""
    import hashlib

    parts = {"format": FORMAT, "rows": dataset._fingerprint, "tokenizer": tokenizer_digest(tokenizer),
             "eos": eos_id, "block_size": data.block_size, "max_length": data.max_length,
             "fields": [data.text_fields[0], data.prompt_field, data.response_field],
             "aligned": [[group.prefix, group.max_length, tokenizer_digest(group.tokenizer)] for group in aligned]}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:32]


def pack_stream(batches: Iterator[Sequence[Sequence[int]]], eos_id: int, block_size: int) -> Iterator[tuple]:
    """(inputs [n, block_size], labels [n, block_size]) int32 arrays, then the last short block as
    ([m], [m]) arrays: the blocks `lm.pack_blocks` cuts from the whole stream, cut a batch of texts
    at a time (each text followed by EOS; consecutive blocks overlap by one token)."""
    left = np.zeros(0, dtype=np.int64)
    for token_lists in batches:
        if not len(token_lists):
            continue
        lengths = np.fromiter((len(tokens) + 1 for tokens in token_lists), dtype=np.int64, count=len(token_lists))
        stream = np.empty(int(lengths.sum()), dtype=np.int64)
        ends = np.cumsum(lengths) - 1
        stream[ends] = eos_id
        mask = np.ones(len(stream), dtype=bool)
        mask[ends] = False
        stream[mask] = np.fromiter((t for tokens in token_lists for t in tokens), dtype=np.int64,
                                   count=int(len(stream) - len(ends)))
        buffer = np.concatenate([left, stream])
        full = (len(buffer) - 1) // block_size
        if full:
            yield (buffer[:full * block_size].reshape(full, block_size).astype(np.int32),
                   buffer[1:full * block_size + 1].reshape(full, block_size).astype(np.int32))
        left = buffer[full * block_size:]
    if len(left) >= 2:
        yield left[:-1].astype(np.int32)[None], left[1:].astype(np.int32)[None]


class _Writer:
    """Blocks appended to an Arrow file, with their running index."""

    def __init__(self, path: Path, routed: bool):
        import pyarrow as pa

        self.pa = pa
        fields = [("input_ids", pa.list_(pa.int32())), (LABELS, pa.list_(pa.int32())), (SOURCE, pa.int64())]
        fields += [(ROUTE, pa.int64())] if routed else []
        self.schema = pa.schema(fields + [(INDEX, pa.int64())])
        self.sink = pa.OSFile(str(path), "wb")
        self.writer = pa.ipc.new_stream(self.sink, self.schema)
        self.rows = self.tokens = self.labelled = 0

    @staticmethod
    def _lists(pa, rows):
        if isinstance(rows, np.ndarray):  # [n, length]: one flat buffer
            offsets = np.arange(0, rows.size + 1, rows.shape[1], dtype=np.int32)
            return pa.ListArray.from_arrays(pa.array(offsets), pa.array(rows.ravel()))
        return pa.array([np.asarray(row, dtype=np.int32) for row in rows], type=pa.list_(pa.int32()))

    def write(self, inputs, labels, tag: Dict) -> None:
        pa, n = self.pa, len(inputs)
        if n == 0:
            return
        columns = [self._lists(pa, inputs), self._lists(pa, labels), pa.array([tag.get(SOURCE, 0)] * n, pa.int64())]
        if ROUTE in self.schema.names:
            columns.append(pa.array([tag.get(ROUTE, -1)] * n, pa.int64()))
        columns.append(pa.array(np.arange(self.rows, self.rows + n, dtype=np.int64)))
        self.writer.write_batch(pa.record_batch(columns, schema=self.schema))
        self.rows += n
        self.tokens += sum(len(row) for row in inputs)
        self.labelled += int(sum(int((np.asarray(row) != -100).sum()) for row in labels))

    def close(self) -> None:
        self.writer.close()
        self.sink.close()


def _write_blocks(dataset, tokenizer, data, eos_id: int, path: Path, num_proc: Optional[int]) -> Dict:
    """Tokenize (batched map) and pack each (source, route) group of `dataset` into `path`."""
    from distill.data.lm import packing_groups, prompt_response_rows

    text, prompt, response = data.text_fields[0], data.prompt_field, data.response_field

    def tokenize(rows):
        if prompt:
            return {"prompt_ids": tokenizer(rows[prompt])["input_ids"],
                    "response_ids": tokenizer(rows[response], add_special_tokens=False)["input_ids"]}
        return {"ids": tokenizer(rows[text])["input_ids"]}

    keep = [name for name in (SOURCE, ROUTE) if name in dataset.column_names]
    tokenized = dataset.map(tokenize, batched=True, batch_size=BATCH, num_proc=num_proc,
                            remove_columns=[c for c in dataset.column_names if c not in keep], desc="tokenize",
                            new_fingerprint=map_fingerprint(dataset, tokenize, tokenizer_digest(tokenizer), text, prompt,
                                                            response, keep))
    writer = _Writer(path, ROUTE in keep)
    try:
        for tag, positions in packing_groups(tokenized):
            part = tokenized if positions is None else select_rows(tokenized, positions)
            batches = (rows for rows in part.iter(batch_size=BATCH))
            if prompt:
                for rows in batches:
                    pairs = prompt_response_rows(rows["prompt_ids"], rows["response_ids"], eos_id, data.max_length)
                    writer.write(pairs["input_ids"], pairs[LABELS], tag)
            else:
                for inputs, labels in pack_stream((rows["ids"] for rows in batches), eos_id, data.block_size):
                    writer.write(inputs, labels, tag)
    finally:
        writer.close()
    return {"rows": writer.rows, "tokens": writer.tokens, "labelled": writer.labelled}


def _write_encoded(encoded, path: Path) -> Dict:
    """Blocks the in-memory path built (aligned windows), written as they are."""
    import pyarrow as pa

    table = encoded.with_format("arrow")[:]
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return {"rows": len(encoded), "tokens": sum(len(row) for row in column(encoded, "input_ids")),
            "labelled": sum(sum(1 for label in row if label != -100) for row in column(encoded, LABELS))}


def prepared_blocks(dataset, tokenizer, data, key: str, eos_id: int, encode_in_memory=None, aligned: Sequence = ()):
    """The split's blocks as a memory-mapped Dataset, prepared now or found from an earlier run.
    `encode_in_memory`: a function returning the blocks as lm.encode_lm builds them (used where the
    teachers' aligned windows are packed too). Prints one line saying which."""
    from datasets import Dataset
    from filelock import FileLock

    import distill.runtime.distributed as distributed
    from distill.util.paths import resolve_path

    root = resolve_path(data.prepared_dir) if data.prepared_dir else default_dir()
    folder = root / blocks_key(dataset, tokenizer, data, eos_id, aligned)
    path, about = folder / "blocks.arrow", folder / "prepared.json"
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ConfigError(f"data.prepared_dir: cannot write {root} ({error.strerror}): name a writable folder") from error
    with FileLock(str(folder / ".lock")):
        if about.exists() and path.exists():
            info = json.loads(about.read_text())
            verb = "reused"
        else:
            start = time.perf_counter()
            for stale in folder.glob("blocks.arrow.*.partial"):  # a preparation killed before its rename
                stale.unlink()
            partial = folder / f"blocks.arrow.{os.getpid()}.partial"
            procs = data.num_proc or min(os.cpu_count() or 1, 8)
            num_proc = procs if procs > 1 and len(dataset) >= 4 * BATCH else None  # few rows: processes cost more
            if encode_in_memory is not None:
                info = _write_encoded(encode_in_memory(), partial)
            else:
                info = _write_blocks(dataset, tokenizer, data, eos_id, partial, num_proc)
            os.replace(partial, path)
            info = {"format": FORMAT, "split": key, "texts": len(dataset), **info,
                    "seconds": round(time.perf_counter() - start, 3)}
            temporary = about.with_suffix(".json.partial")
            temporary.write_text(json.dumps(info, indent=1))
            os.replace(temporary, about)
            verb = "prepared"
    if not info["rows"] or not info["labelled"]:
        raise ConfigError(f"data.{key}: no token to learn after tokenization (empty texts or all-prompt rows)")
    if verb == "prepared" or distributed.is_main():  # the rank that prepared it, whichever it is
        print(f"data.{key}: {verb} {info['rows']:,} blocks ({info['tokens']:,} tokens) in {folder}", flush=True)
    return Dataset.from_file(str(path), in_memory=False)  # memory-mapped: datasets' reader of its own cache files
