"""Cached teacher logits: the teachers run once, training reads their top-k from disk.

Per token and per teacher the cache keeps the k largest log-probabilities (at temperature 1) and
their token ids. The probability mass outside the top k (the tail bucket) is spread evenly over the
other V - k tokens when the distribution is rebuilt; with k = V nothing is approximated.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor


def topk_target_log_probs(top_ids: Tensor, top_log_probs: Tensor, vocab_size: int,
                          tail: Tensor | None = None) -> Tensor:
    """Dense log-probabilities [..., V] from the top-k [..., k]: the listed tokens keep their
    log-probability, the remaining V - k tokens share the tail mass 1 - sum(top) equally (`tail`
    [...] is its log, as stored by the cache; computed from the top k when not given)."""
    k = top_ids.shape[-1]
    top_log_probs = top_log_probs.to(torch.promote_types(top_log_probs.dtype, torch.float32))
    if k < vocab_size and tail is None:
        covered = torch.logsumexp(top_log_probs, dim=-1, keepdim=True).clamp(max=0.0)
        # log(1 - exp(covered)), stable near covered = 0; very negative when the top k hold it all
        tail = torch.log(-torch.expm1(covered)).clamp(min=-1e30)
    elif tail is not None:
        tail = tail.to(top_log_probs.dtype).unsqueeze(-1)
    if k >= vocab_size:
        tail = None
    fill = (tail - math.log(vocab_size - k)) if tail is not None else top_log_probs.new_full((*top_ids.shape[:-1], 1), -math.inf)
    dense = fill.expand(*top_ids.shape[:-1], vocab_size).clone()
    return dense.scatter(-1, top_ids.long(), top_log_probs)


def sparse_linear_mixture(top_ids: Tensor, top_log_probs: Tensor, tail: Tensor, vocab_size: int, weights: Tensor,
                          temperatures: Tensor):
    """The linear mixture sum_k w_k softmax(log p_k / T_k) of K cached teachers, each p_k its top-k
    plus the tail mass spread evenly over the other V - k tokens (what `topk_target_log_probs`
    rebuilds densely), as a SparseTarget: base + deltas at the cached ids. Shapes: top_ids and
    top_log_probs [c, K, k], tail [c, K] (log of the tail mass), weights and temperatures [K].

    Softening keeps the shape: the listed tokens get exp(log p / T), each other token
    exp((tail - log(V - k)) / T), all divided by their total Z_k. So teacher k puts t_k on every
    token it did not list and p_k,i on its listed ones, and the mixture is
    base = sum_k w_k t_k everywhere plus w_k (p_k,i - t_k) on teacher k's listed tokens."""
    from distill.chunked_loss import SparseTarget

    dtype = torch.promote_types(top_log_probs.dtype, torch.float32)
    k = top_ids.shape[-1]
    scale = temperatures.to(dtype).reshape(1, -1, 1)
    listed = top_log_probs.to(dtype) / scale  # [c, K, k]
    if k < vocab_size:
        others = math.log(vocab_size - k)
        spread = (tail.to(dtype).unsqueeze(-1) - others) / scale  # [c, K, 1]: log of one other token's share
        log_z = torch.logsumexp(torch.cat([listed, spread + others], dim=-1), dim=-1, keepdim=True)
        other_probs = (spread - log_z).exp()
    else:
        log_z = torch.logsumexp(listed, dim=-1, keepdim=True)
        other_probs = torch.zeros_like(log_z)
    weights = weights.to(dtype).reshape(1, -1, 1)
    deltas = weights * ((listed - log_z).exp() - other_probs)
    base = (weights * other_probs).sum(dim=(1, 2))
    return SparseTarget(ids=top_ids.reshape(top_ids.shape[0], -1).long(),
                        deltas=deltas.reshape(deltas.shape[0], -1), base=base)


# --------------------------------------------------------------------------- writing, reading
# Layout of a cache folder:
#   meta.json                 teachers (name, path, hash, params), vocab_size, top_k, fingerprint of
#                             the training blocks, the teachers' validation perplexities
#   shard_00000.safetensors   index [n] (example ids), offsets [n + 1] into the token axis,
#                             ids [T, K, k] int32, log_probs [T, K, k] float32, tail [T, K] float32
# Rows are found by example id (the block's `index`), never by step or position in an epoch.
META = "meta.json"


def fingerprint(dataset) -> str:
    """sha256 of the encoded training blocks: a cache is only valid for the exact same tokens."""
    import hashlib
    import json

    digest = hashlib.sha256()
    for index, ids in zip(dataset["index"], dataset["input_ids"]):
        digest.update(json.dumps([index, ids]).encode())
    return digest.hexdigest()


def top_k_of(logits: Tensor, k: int):
    """(ids int32, log-probs, tail log-mass) of the k most likely tokens of log_softmax(logits)."""
    log_probs = torch.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)
    values, ids = log_probs.topk(k, dim=-1)
    if k >= logits.shape[-1]:  # everything is kept: no tail, whatever the float rounding of the sum
        return ids.to(torch.int32), values, torch.full(values.shape[:-1], -1e30, device=values.device)
    covered = torch.logsumexp(values, dim=-1).clamp(max=0.0)
    tail = torch.log(-torch.expm1(covered)).clamp(min=-1e30)
    return ids.to(torch.int32), values, tail


def write_cache(cfg, out_dir, top_k: int, rows_per_shard: int = 512) -> dict:
    """Run the teachers once over the training blocks and store their top-k per token."""
    import json
    from pathlib import Path

    from safetensors.torch import save_file
    from torch.utils.data import DataLoader

    from distill.causal_lm import (LMCollator, body_and_head, encode_lm, load_lm_teachers, perplexities,
                                   plan_lm_teachers, read_lm_splits, teacher_hidden_states)
    from distill.checkpointing import content_hash
    from distill.config import ConfigError, resolve_teacher_index
    from distill.evaluation import validation_loader
    from distill.hardware import local_device, teacher_dtype
    from distill.modeling import count_parameters, load_tokenizer

    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise ConfigError(f"cache target {out_dir} exists and is not empty: remove it or choose another --out")
    if not cfg.teachers.models:
        raise ConfigError("teachers.models is empty: there is nothing to cache")
    splits = read_lm_splits(cfg.data)
    source = (cfg.student.path if cfg.student.path is not None
              else cfg.teachers.models[resolve_teacher_index(cfg, cfg.student.from_teacher)].path)
    tokenizer = load_tokenizer(source, "student", cfg.trust_remote_code)
    plans = plan_lm_teachers(cfg, tokenizer)
    vocab = plans[0].vocab_size
    if not 1 <= top_k <= vocab:
        raise ConfigError(f"--top-k must lie in [1, {vocab}] (the vocabulary), got {top_k}")
    train = encode_lm(splits.train, tokenizer, cfg.data, "train")
    validation = encode_lm(splits.validation, tokenizer, cfg.data, "validation")
    device = local_device()
    ensemble = load_lm_teachers(cfg, plans, device, teacher_dtype(cfg.teachers.dtype, device))
    heads = [body_and_head(model)[1] for model in ensemble.models]
    collator = LMCollator(tokenizer)
    loader = DataLoader(train, batch_size=cfg.training.eval_batch_size, collate_fn=collator, shuffle=False)
    out_dir.mkdir(parents=True)
    shard: dict = {"index": [], "lengths": [], "ids": [], "log_probs": [], "tail": []}
    shards = 0

    def flush():
        nonlocal shards
        if not shard["index"]:
            return
        offsets = torch.tensor([0] + shard["lengths"]).cumsum(0)
        save_file({"index": torch.tensor(shard["index"], dtype=torch.int64), "offsets": offsets,
                   "ids": torch.cat(shard["ids"]), "log_probs": torch.cat(shard["log_probs"]),
                   "tail": torch.cat(shard["tail"])}, str(out_dir / f"shard_{shards:05d}.safetensors"))
        shards += 1
        for values in shard.values():
            values.clear()

    for batch in loader:
        hidden = teacher_hidden_states(ensemble, {"input_ids": batch["input_ids"].to(device),
                                                   "attention_mask": batch["attention_mask"].to(device)})
        sequence = batch["input_ids"].shape[1]
        for row, index in enumerate(batch["index"].tolist()):
            length = int(batch["attention_mask"][row].sum())
            start = row * sequence
            with torch.no_grad():
                parts = [top_k_of(head(states[start:start + length]), top_k) for head, states in zip(heads, hidden)]
            shard["index"].append(index)
            shard["lengths"].append(length)
            shard["ids"].append(torch.stack([p[0] for p in parts], dim=1).cpu())  # [L, K, k]
            shard["log_probs"].append(torch.stack([p[1] for p in parts], dim=1).float().cpu())  # float32 on disk
            shard["tail"].append(torch.stack([p[2] for p in parts], dim=1).float().cpu())  # [L, K]
            if len(shard["index"]) >= rows_per_shard:
                flush()
    flush()
    loader = validation_loader(validation, collator, cfg.training.eval_batch_size)
    figures = perplexities(loader, None, ensemble, device)  # teachers and target only
    meta = {"vocab_size": vocab, "top_k": top_k, "fingerprint": fingerprint(train), "rows": len(train),
            "shards": shards, "interpolation": cfg.interpolation.method,
            "teachers": [{"name": plan.name, "path": plan.path, "hash": content_hash(plan.path),
                          "params": count_parameters(model), **figures[plan.name]}
                         for plan, model in zip(plans, ensemble.models)],
            "target": figures["target"]}
    (out_dir / META).write_text(json.dumps(meta, indent=2), encoding="utf-8")
    return meta


class LogitCache:
    """Reads a cache folder: rows by example id, padded to a batch's length."""

    def __init__(self, folder, teacher_names, dataset_fingerprint: str):
        import json
        from pathlib import Path

        from safetensors import safe_open

        from distill.config import ConfigError

        self.folder = Path(folder)
        meta_path = self.folder / META
        if not meta_path.is_file():
            raise ConfigError(f"teachers.cache: {self.folder} has no {META}; write it with `distill cache`")
        self.meta = json.loads(meta_path.read_text())
        cached = [t["name"] for t in self.meta["teachers"]]
        if cached != list(teacher_names):
            raise ConfigError(f"teachers.cache: {self.folder} holds teachers {cached}, the config names "
                              f"{list(teacher_names)}: rerun distill cache")
        if self.meta["fingerprint"] != dataset_fingerprint:
            raise ConfigError(f"teachers.cache: {self.folder} was written for other training blocks (data, "
                              "tokenizer or data.block_size changed): rerun distill cache")
        self.vocab_size = self.meta["vocab_size"]
        self.shards = []
        self.where = {}
        for number in range(self.meta["shards"]):
            with safe_open(str(self.folder / f"shard_{number:05d}.safetensors"), framework="pt") as handle:
                tensors = {name: handle.get_tensor(name) for name in handle.keys()}
            self.shards.append(tensors)
            for row, index in enumerate(tensors["index"].tolist()):
                self.where[index] = (number, row)

    def rows(self, indices, length: int):
        """ids [B, length, K, k] (int64), log_probs [B, length, K, k], tail [B, length, K]."""
        first = self.shards[0]
        teachers, k = first["ids"].shape[1], first["ids"].shape[2]
        ids = torch.zeros(len(indices), length, teachers, k, dtype=torch.long)
        log_probs = torch.full((len(indices), length, teachers, k), -math.inf)
        log_probs[..., 0] = 0.0  # padding: all mass on token 0, never read (its labels are -100)
        tail = torch.full((len(indices), length, teachers), -1e30)
        for position, index in enumerate(indices):
            if index not in self.where:
                raise KeyError(f"example {index} is not in the cache {self.folder}")
            number, row = self.where[index]
            shard = self.shards[number]
            start, end = int(shard["offsets"][row]), int(shard["offsets"][row + 1])
            n = min(end - start, length)
            ids[position, :n] = shard["ids"][start:start + n].long()
            log_probs[position, :n] = shard["log_probs"][start:start + n]
            tail[position, :n] = shard["tail"][start:start + n]
        return ids, log_probs, tail
