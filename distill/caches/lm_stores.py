"""Cached causal-LM teachers: the teachers run once, training reads their top-k or hidden states.

The format (this file, registered as `tokens`) knows nothing of tasks: `write_cache` drives a task's
own data and teachers, and `LogitCache` serves rows by example id (signals.CachedTopK turns them into
a teacher signal).

Per token and per teacher the `topk` store keeps the k largest log-probabilities (at temperature 1)
and their token ids. The probability mass outside the top k (the tail bucket) is spread evenly over
the other V - k tokens when the distribution is rebuilt; with k = V nothing is approximated. The
`sampled` store keeps N draws per token from each teacher's distribution at its training
temperature, with their counts: an unbiased sparse target (only the linear mixture and the forward
KL keep it unbiased, so they are required). The `hidden` store keeps each teacher's last hidden state per token and its output layer once: training
rebuilds the exact distribution a chunk of tokens at a time (signals.HiddenStateSignal, as for live
teachers), with no teacher body run.
"""
from __future__ import annotations

import math
from typing import Dict, List

import torch
from torch import Tensor

from distill.caches import register_cache_format
from distill.data.text import column
from distill.errors import ConfigError
from distill.util.registry import registrar
from distill.formulas.mixtures import tail_log_mass


# --------------------------------------------------------------------------- writing, reading
# Layout of a cache folder (written shard by shard, resumable: caches/shards.py):
#   plan.json                 what the shards depend on (written first)
#   meta.json                 store (topk | sampled | hidden), teachers (name, path, hash, params),
#                             vocab_size, top_k, samples and temperatures, or hidden_dtype, fingerprint
#                             of the training blocks, the teachers' validation perplexities
#   shard_00000.safetensors   index [n] (example ids), offsets [n + 1] into the token axis, and
#                             topk: ids [T, K, k] int32, log_probs [T, K, k] float32, tail [T, K] float32
#                             sampled: the same layout, k = N draws (log(count / N); -inf: not drawn)
#                             hidden: hidden<k> [T, H_k] per teacher (after the final norm)
#   heads.safetensors         hidden: weight<k> [V, H_k] (and bias<k>) of each teacher's output layer
# Rows are found by example id (the block's `index`), never by step or position in an epoch.
def fingerprint(dataset) -> str:
    """sha256 of the encoded training blocks: a cache is only valid for the exact same tokens."""
    import hashlib
    import json

    digest = hashlib.sha256()
    for index, ids in zip(column(dataset, "index"), column(dataset, "input_ids")):
        digest.update(json.dumps([index, ids]).encode())
    return digest.hexdigest()


def top_k_of(logits: Tensor, k: int):
    """(ids int32, log-probs, tail log-mass) of the k most likely tokens of log_softmax(logits)."""
    log_probs = torch.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)
    values, ids = log_probs.topk(k, dim=-1)
    if k >= logits.shape[-1]:  # everything is kept: no tail, whatever the float rounding of the sum
        return ids.to(torch.int32), values, torch.full(values.shape[:-1], -1e30, device=values.device)
    return ids.to(torch.int32), values, tail_log_mass(values)


def sampled_of(logits: Tensor, temperature: float, draws: int, generator: torch.Generator):
    """(ids int32 [rows, N], log-probs [rows, N], tail [rows]) of N draws with replacement from
    softmax(logits / T) per row (Sparse Logit Sampling, Anshumann et al. 2025): each distinct id
    once at log(count / N), the other slots ids not drawn at -inf, no tail. The empirical distribution is an
    unbiased estimate of the tempered teacher, so the forward-KL gradient (linear in the target) is
    an unbiased estimate of the dense one."""
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    drawn = torch.multinomial(probs.cpu(), draws, replacement=True, generator=generator)  # [rows, N]
    counts = torch.zeros(probs.shape, dtype=torch.float32).scatter_add_(-1, drawn, torch.ones(drawn.shape))
    values, ids = counts.topk(draws, dim=-1)
    # topk returns N distinct ids: the drawn ones, then ids that were not drawn, at zero mass
    log_probs = torch.where(values > 0, (values / draws).log(), torch.full_like(values, -math.inf))
    return ids.to(torch.int32), log_probs, torch.full(values.shape[:-1], -1e30)


def plan_cache_run(setup):
    """(splits, teacher plans, their content hashes) for `distill cache` of any task (a
    tasks.setup.Setup, planned here), after the checks every cache shares: teachers to run, live
    ones (not a cache), and on several ranks teachers each rank holds whole (each rank runs its own
    shards)."""
    from distill.runtime.checkpointing import content_hash
    from distill.runtime.distributed import world_size

    cfg = setup.cfg
    if not cfg.teachers.models:
        raise ConfigError("teachers.models is empty: there is nothing to cache")
    if cfg.teachers.cache is not None:
        raise ConfigError("teachers.cache is set: distill cache runs the live teachers; remove teachers.cache")
    if cfg.teachers.placement != "replicated" and world_size() > 1:
        raise ConfigError("teachers.placement: zero3 with distill cache on several ranks: each rank caches its own "
                          "shards with whole teachers; set teachers.placement=replicated (or run one rank)")
    setup.plan()
    # a served teacher is its server's model: its path holds only its tokenizer and config
    servers = [f" {teacher.server} {teacher.server_model}" if teacher.server is not None else ""
               for teacher in cfg.teachers.models]
    return setup.splits, setup.plans, [content_hash(plan.path) + server for plan, server in zip(setup.plans, servers)]


def teacher_signature(plans, hashes, dtype) -> dict:
    """What a cache's teachers are: names, paths, content hashes and the dtype they ran in."""
    return {"teachers": [[plan.name, plan.path, digest] for plan, digest in zip(plans, hashes)],
            "teacher_dtype": str(dtype).replace("torch.", "")}


HIDDEN_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
HEADS = "heads.safetensors"
STORES: Dict[str, type] = {}
register_store = registrar(STORES, "cache store")


class Store:
    """One way of keeping the teachers' per-token outputs (`distill cache --store NAME`), registered
    by name: what it checks and records of the options, the tensors it writes per token, and how a
    reader opens it. `reads`: what a signal source takes from it ("top_k" rows, or "hidden" states);
    `softened`: stored at the teachers' training temperatures already (not softened again)."""

    name = "base"
    reads = "top_k"
    softened = False
    flag = ""  # the command-line option this store reads (the others are refused), and its default
    default = None

    def settings(self, cfg, plans, vocab: int, option) -> Dict:
        """What this store records of its option (the value of `flag`, or its default; checked:
        ConfigError naming the flag)."""
        raise NotImplementedError

    def parts(self, teachers: int) -> List[str]:
        return ["ids", "log_probs", "tail"]

    def write_once(self, writer, source) -> None:
        """Files written once per cache, beside the shards (none by default)."""

    def add_row(self, signal, start: int, length: int, plans, settings: Dict, shard: Dict, generator) -> None:
        """Append one row's `length` tokens (from position `start` of the signal) to the shard."""
        logits = signal.logits(start, start + length)  # [K, L, V]
        found = [self.keep(logits[k], plan, settings, generator) for k, plan in enumerate(plans)]
        shard["ids"].append(torch.stack([p[0] for p in found], dim=1).cpu())  # [L, K, k]
        shard["log_probs"].append(torch.stack([p[1] for p in found], dim=1).float().cpu())  # float32 on disk
        shard["tail"].append(torch.stack([p[2] for p in found], dim=1).float().cpu())  # [L, K]

    def keep(self, logits: Tensor, plan, settings: Dict, generator):
        """(ids, log_probs, tail) of one teacher's [L, V] logits."""
        raise NotImplementedError

    def recorded(self, settings: Dict, source) -> Dict:
        """What meta.json says of the options, once written."""
        return settings

    def open(self, cache) -> None:
        """Read-time extras of a cache folder (none by default)."""

    def check_use(self, cfg, plans, meta: Dict, key: str) -> None:
        """Refuse a training config this store cannot serve (ConfigError naming `key`); none by default."""


@register_store("topk")
class TopKStore(Store):
    flag, default = "--top-k", 64
    def settings(self, cfg, plans, vocab, top_k):
        if not 1 <= top_k <= vocab:
            raise ConfigError(f"--top-k must lie in [1, {vocab}] (the vocabulary), got {top_k}")
        return {"top_k": top_k}

    def keep(self, logits, plan, settings, generator):
        return top_k_of(logits, settings["top_k"])


@register_store("sampled")
class SampledStore(Store):
    softened = True
    flag, default = "--samples", 16

    def settings(self, cfg, plans, vocab, samples):
        if samples < 1:
            raise ConfigError(f"--samples must be >= 1, got {samples}")
        return {"samples": samples, "temperatures": [plan.temperature for plan in plans], "seed": cfg.seed}

    def keep(self, logits, plan, settings, generator):  # drawn at each teacher's training temperature
        return sampled_of(logits, plan.temperature, settings["samples"], generator)

    def check_use(self, cfg, plans, meta, key):
        """Samples are an unbiased target only for a linear mixture under the forward KL, at the
        temperatures they were drawn at: anything else is refused by name."""
        if cfg.interpolation.method != "linear":
            raise ConfigError(f"{key}: interpolation.method={cfg.interpolation.method} needs whole distributions; "
                              "from samples only the linear mixture stays unbiased: use linear, or a topk/hidden cache")
        if cfg.loss.divergence != "forward_kl":
            raise ConfigError(f"{key}: loss.divergence={cfg.loss.divergence} is not linear in the target, so samples "
                              "would bias it: use forward_kl, or a hidden cache")
        if cfg.schedules.temperature is not None:
            raise ConfigError(f"{key}: the samples were drawn at fixed temperatures; remove schedules.temperature")
        now = [plan.temperature for plan in plans]
        if [float(t) for t in meta["temperatures"]] != [float(t) for t in now]:
            raise ConfigError(f"{key}: drawn at teacher temperatures {meta['temperatures']}, the config has {now}: "
                              "rerun distill cache")


@register_store("hidden")
class HiddenStore(Store):
    reads = "hidden"
    flag = "--hidden-dtype"

    def settings(self, cfg, plans, vocab, hidden_dtype):
        from distill.config.schema import served_teachers

        if served_teachers(cfg):
            raise ConfigError("--store hidden keeps the teachers' last hidden states, which a served teacher "
                              "(teachers.models[i].server) does not give: use --store topk or sampled")
        if hidden_dtype is not None and hidden_dtype not in HIDDEN_DTYPES:
            raise ConfigError(f"--hidden-dtype must be one of {list(HIDDEN_DTYPES)}, got {hidden_dtype!r}")
        # half of fp32's bytes, whatever the teachers compute in
        return {"hidden_dtype": "bfloat16" if hidden_dtype is None else hidden_dtype}

    def parts(self, teachers):
        return [f"hidden{k}" for k in range(teachers)]

    def write_once(self, writer, source) -> None:
        heads = {}  # each teacher's output layer, once (restricted rows are not cached: no trim_vocab)
        for k, head in enumerate(source.unwrap().heads):
            heads[f"weight{k}"] = head.weight.detach().cpu().contiguous()
            if head.bias is not None:
                heads[f"bias{k}"] = head.bias.detach().cpu().contiguous()
        writer.write_once(HEADS, heads)

    def add_row(self, signal, start, length, plans, settings, shard, generator):
        for k, hidden in enumerate(signal.hidden_states):
            shard[f"hidden{k}"].append(hidden[start:start + length].to(HIDDEN_DTYPES[settings["hidden_dtype"]]).cpu())

    def open(self, cache) -> None:
        from distill.caches.shards import read_shard

        stored, _ = read_shard(cache.folder / HEADS)
        for k in range(len(cache.meta["teachers"])):
            weight, bias = stored[f"weight{k}"], stored.get(f"bias{k}")
            head = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, dtype=weight.dtype)
            with torch.no_grad():
                head.weight.copy_(weight)
                if bias is not None:
                    head.bias.copy_(bias)
            cache.heads.append(head.requires_grad_(False))


def build_store(name: str) -> Store:
    if name not in STORES:
        raise ConfigError(f"--store must be one of {sorted(STORES)}, got {name!r}")
    return STORES[name]()


def store_option(store: str, flags: Dict[str, object]):
    """(the registered store named `store`, the value of its own flag or its default); a flag given
    that another store reads is refused by name. `flags`: {"--top-k": value or None, ...}."""
    kind = build_store(store)
    for flag, value in flags.items():
        if value is not None and flag != kind.flag:
            owner = next(name for name, other in STORES.items() if other.flag == flag)
            raise ConfigError(f"{flag} is for --store {owner}, not {store}: remove it")
    value = flags.get(kind.flag)
    return kind, kind.default if value is None else value


@register_cache_format("tokens")
def write_cache(setup, out_dir, top_k=None, store: str = "topk", hidden_dtype=None, samples=None,
                rows_per_shard=None) -> dict:
    """Run the task's teachers once over its training blocks and keep, per token, what the
    registered `store` keeps (topk, sampled or hidden; its own flag's value, a flag another store
    reads refused). Resumable and multi-rank (caches/shards.ShardedWriter)."""
    from pathlib import Path

    from torch.utils.data import DataLoader

    from distill.caches.shards import ShardedWriter

    cfg, task = setup.cfg, setup.task
    if cfg.teachers.tokenization == "per_model":
        raise ConfigError("teachers.tokenization=per_model: a cache holds distributions over the student's tokens "
                          "at every position, which teachers with other tokenizers do not give; train with live "
                          "teachers")
    if cfg.data.streaming:
        raise ConfigError("data.streaming: a cache holds the teachers' outputs for every training block, which a "
                          "stream does not hold; set data.streaming=false (data.prepare=true keeps memory flat)")
    _, option = store_option(store, {"--top-k": top_k, "--samples": samples, "--hidden-dtype": hidden_dtype})
    rows_per_shard = 512 if rows_per_shard is None else rows_per_shard
    splits, plans, hashes = plan_cache_run(setup)
    kind = build_store(store)
    stored = kind.settings(cfg, plans, plans[0].vocab_size, option)
    train, validation = setup.encode("train", "validation")
    device, dtype = setup.start(process_group=False), setup.dtype
    dataset_fingerprint = fingerprint(train)
    with ShardedWriter.open(Path(out_dir), {"store": store, **stored, "fingerprint": dataset_fingerprint,
                                            **teacher_signature(plans, hashes, dtype)},
                            [len(train)], rows_per_shard) as writer:
        ensemble, source = setup.load_teachers()
        parts = kind.parts(len(plans))
        kind.write_once(writer, source)
        for number in writer.mine():
            _, start, end = writer.slices[number]
            # sampled: the draws of shard n come from a generator of its own, whichever rank or run writes it
            generator = torch.Generator().manual_seed(cfg.seed * 1_000_003 + number)
            shard = {"index": [], "lengths": [], **{part: [] for part in parts}}
            loader = DataLoader(train.select(range(start, end)), batch_size=cfg.training.eval_batch_size,
                                collate_fn=setup.collator(), shuffle=False)
            for batch in loader:
                signal = source.signal(batch, device)
                sequence = batch["input_ids"].shape[1]
                for row, index in enumerate(batch["index"].tolist()):  # each row's real tokens only
                    length = int(batch["attention_mask"][row].sum())
                    shard["index"].append(index)
                    shard["lengths"].append(length)
                    kind.add_row(signal, row * sequence, length, plans, stored, shard, generator)
            offsets = torch.tensor([0] + shard["lengths"]).cumsum(0)
            writer.write(number, {"index": torch.tensor(shard["index"], dtype=torch.int64), "offsets": offsets,
                                  **{part: torch.cat(shard[part]) for part in parts}})
        # teachers and target (every rank)
        figures = task.evaluate(None, ensemble, source, device, validation, setup.context).figures
        meta = {"store": store, **kind.recorded(stored, source), "vocab_size": plans[0].vocab_size,
                "fingerprint": dataset_fingerprint, "rows": len(train), "interpolation": cfg.interpolation.method,
                "teachers": [{"name": plan.name, "path": plan.path, "hash": digest, "params": params,
                              **figures[plan.name]}
                             for plan, digest, params in zip(plans, hashes, ensemble.parameter_counts)],
                "target": figures["target"]}
        return writer.finish(meta)


class LogitCache:
    """Reads a cache folder: rows by example id, padded to a batch's length."""

    def __init__(self, folder, teacher_names, dataset_fingerprint: str):
        from pathlib import Path

        from distill.caches.shards import read_meta, read_shard, shard_name
        from distill.errors import ConfigError

        self.folder = Path(folder)
        self.meta = read_meta(self.folder)
        cached = [t["name"] for t in self.meta["teachers"]]
        if cached != list(teacher_names):
            raise ConfigError(f"teachers.cache: {self.folder} holds teachers {cached}, the config names "
                              f"{list(teacher_names)}: rerun distill cache")
        if self.meta["fingerprint"] != dataset_fingerprint:
            raise ConfigError(f"teachers.cache: {self.folder} was written for other training blocks (data, "
                              "tokenizer or data.block_size changed): rerun distill cache")
        self.vocab_size = self.meta["vocab_size"]
        self.store = build_store(self.meta.get("store", "topk"))
        self.heads = []
        self.store.open(self)
        self.shards = []
        self.where = {}
        for number in range(self.meta["shards"]):
            tensors, _ = read_shard(self.folder / shard_name(number))
            self.shards.append(tensors)
            for row, index in enumerate(tensors["index"].tolist()):
                self.where[index] = (number, row)

    def hidden_rows(self, indices, length: int):
        """Per teacher, the stored last hidden states [B, length, H_k] (zeros at padding, never read)."""
        first = self.shards[0]
        out = [torch.zeros(len(indices), length, first[f"hidden{k}"].shape[1], dtype=first[f"hidden{k}"].dtype)
               for k in range(len(self.heads))]
        for position, index in enumerate(indices):
            number, row = self._where(index)
            shard = self.shards[number]
            start, end = int(shard["offsets"][row]), int(shard["offsets"][row + 1])
            n = min(end - start, length)
            for k, states in enumerate(out):
                states[position, :n] = shard[f"hidden{k}"][start:start + n]
        return out

    def _where(self, index):
        if index not in self.where:
            raise KeyError(f"example {index} is not in the cache {self.folder}")
        return self.where[index]

    def rows(self, indices, length: int):
        """ids [B, length, K, k] (int64), log_probs [B, length, K, k], tail [B, length, K]."""
        first = self.shards[0]
        teachers, k = first["ids"].shape[1], first["ids"].shape[2]
        ids = torch.zeros(len(indices), length, teachers, k, dtype=torch.long)
        log_probs = torch.full((len(indices), length, teachers, k), -math.inf)
        log_probs[..., 0] = 0.0  # padding: all mass on token 0, never read (its labels are -100)
        tail = torch.full((len(indices), length, teachers), -1e30)
        for position, index in enumerate(indices):
            number, row = self._where(index)
            shard = self.shards[number]
            start, end = int(shard["offsets"][row]), int(shard["offsets"][row + 1])
            n = min(end - start, length)
            ids[position, :n] = shard["ids"][start:start + n].long()
            log_probs[position, :n] = shard["log_probs"][start:start + n]
            tail[position, :n] = shard["tail"][start:start + n]
        return ids, log_probs, tail
