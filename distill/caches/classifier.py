"""Cached classification teachers: every teacher's logits per example, computed once.

A classification teacher's output is C numbers per example, so the cache keeps them whole (exact,
no top-k): `distill cache` runs the live teachers over the training and validation rows and writes

    plan.json           what the shards depend on (written first; the cache is resumable and
                        multi-rank: caches/shards.py)
    meta.json           format, teachers (name, path, content hash, parameters), label names, text
                        fields, max_length, the teachers' dtype, rows, shards (written last)
    shard_NNNNN.safetensors  keys [n] (row -> text key) as a JSON list in the metadata, logits
                        [n, K, C] float32 in the data's label order (training rows, then validation)

Rows are keyed by the digest of their text fields (data.TEXT_KEY), so the same text is found in any
split and the data's order does not matter. Training with `teachers.cache=DIR` then reads each
teacher as stored outputs (signals/stored.cached_outputs, the black-box teachers' machinery): no
teacher weight loads, evaluation, `interpolation.fit_on` and `distill fit-weights` read the cached
validation logits. A cache is checked against the config and the data before anything is written:
other teachers (name, path or content), labels, text fields or max_length, or a row it lacks, is
refused by name.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Dict, List

import torch

from distill.caches import register_cache_format
from distill.caches.shards import read_meta
from distill.errors import ConfigError

FORMAT = "classification_logits"


def settings_of(cfg) -> Dict:
    """What a cache's logits depend on besides the teachers: the text the teachers read."""
    return {"text_fields": list(cfg.data.text_fields), "max_length": cfg.data.max_length,
            "tokenization": cfg.teachers.tokenization}


@register_cache_format("classifier")
def write_classifier_cache(setup, out_dir: Path, top_k=None, store: str = "topk", hidden_dtype=None, samples=None,
                           rows_per_shard=None) -> Dict:
    """Run the task's live teachers once over its training and validation rows, shard by shard
    (resumable, multi-rank: caches/shards.ShardedWriter). `setup`: a tasks.setup.Setup. Returns the meta.
    Every logit is kept: the token stores' flags are refused."""
    if top_k is not None or store != "topk" or hidden_dtype is not None or samples is not None:
        raise ConfigError("--top-k, --store, --hidden-dtype and --samples are for causal-LM caches: a "
                          "classification cache keeps every logit; remove them")
    rows_per_shard = 4096 if rows_per_shard is None else rows_per_shard
    from torch.utils.data import DataLoader

    from distill.caches.lm_stores import plan_cache_run, teacher_signature
    from distill.caches.shards import ShardedWriter
    from distill.data.text import TEXT_KEY, column

    cfg = setup.cfg
    splits, plans, hashes = plan_cache_run(setup)
    device, dtype = setup.start(process_group=False), setup.dtype
    parts = setup.encode("train", "validation")
    rows = json.dumps([column(part, TEXT_KEY) for part in parts])  # which texts, in which order
    signature = {"format": FORMAT, "label_names": list(splits.label_names), **settings_of(cfg),
                 "rows": hashlib.sha256(rows.encode()).hexdigest(), **teacher_signature(plans, hashes, dtype)}
    with ShardedWriter.open(Path(out_dir), signature, [len(part) for part in parts], rows_per_shard) as writer:
        ensemble, source = setup.load_teachers()
        for number in writer.mine():
            part, start, end = writer.slices[number]
            loader = DataLoader(parts[part].select(range(start, end)), batch_size=cfg.training.eval_batch_size,
                                collate_fn=setup.collator())
            keys: List[str] = []
            logits = []
            for batch in loader:
                logits.append(source.logits(batch, device).transpose(0, 1).float().cpu())  # [B, K, C]
                keys.extend(batch[TEXT_KEY])
            writer.write(number, {"logits": torch.cat(logits).contiguous()}, metadata={"keys": json.dumps(keys)})
        meta = {"format": FORMAT, "label_names": list(splits.label_names), **settings_of(cfg),
                "dtype": str(dtype).replace("torch.", ""), "rows": sum(len(part) for part in parts),
                "teachers": [{"name": plan.name, "path": plan.path, "hash": digest, "params": params}
                             for plan, digest, params in zip(plans, hashes, ensemble.parameter_counts)]}
        return writer.finish(meta)


class ClassifierCache:
    """A cache folder, checked against the run's config and teachers when opened."""

    def __init__(self, folder: Path, cfg, plans, label_names: List[str]):
        from distill.caches.shards import read_shard, shard_name
        from distill.runtime.checkpointing import content_hash

        self.folder = Path(folder)
        self.meta = read_meta(self.folder)
        if self.meta.get("format") != FORMAT:
            raise ConfigError(f"teachers.cache: {self.folder} holds a {self.meta.get('format', 'causal-LM top-k')} "
                              "cache, not classification logits: rerun distill cache with this config")
        cached = [(t["name"], t["path"]) for t in self.meta["teachers"]]
        wanted = [(plan.name, plan.path) for plan in plans]
        if cached != wanted:
            raise ConfigError(f"teachers.cache: {self.folder} holds teachers {cached}, the config names {wanted}: "
                              "rerun distill cache")
        for teacher in self.meta["teachers"]:
            if content_hash(teacher["path"]) != teacher["hash"]:
                raise ConfigError(f"teachers.cache: teacher {teacher['name']} ({teacher['path']}) changed on disk since "
                                  "the cache was written: rerun distill cache")
        if self.meta["label_names"] != list(label_names):
            raise ConfigError(f"teachers.cache: {self.folder} has labels {self.meta['label_names']}, the data "
                              f"{list(label_names)}: rerun distill cache")
        now = settings_of(cfg)
        changed = [f"{name} ({self.meta[name]} -> {value})" for name, value in now.items() if self.meta[name] != value]
        if changed:
            raise ConfigError(f"teachers.cache: {self.folder} was written with other {changed}: the teachers read "
                              "other text; rerun distill cache")
        self.keys, logits = [], []
        for number in range(self.meta["shards"]):
            tensors, metadata = read_shard(self.folder / shard_name(number), ["logits"])
            self.keys.extend(json.loads(metadata["keys"]))
            logits.append(tensors["logits"])
        self.logits = torch.cat(logits)
        self.row_of = {key: row for row, key in enumerate(self.keys)}

    def check_covers(self, name: str, keys) -> None:
        missing = [key for key in keys if key not in self.row_of]
        if missing:
            raise ConfigError(f"teachers.cache: {len(missing)} {name} row(s) are not in {self.folder} (the data changed "
                              "since it was written): rerun distill cache")
