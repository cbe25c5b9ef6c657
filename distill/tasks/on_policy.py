"""On-policy distillation (training.on_policy, task causal_lm with prompt/response rows).

A share of the micro-batches replace each row's response by the student's own sampled
continuation of its prompt (GKD, Agarwal et al. 2024: the student learns where its own generations
go, not only on fixed text); the teachers' interpolated target is then computed on those tokens by
the usual loss. Which micro-batches, and the tokens sampled, follow from the run's seed and the
micro-step's number alone: a resumed run (same weights, same micro-step) samples the same tokens.
Sampling stops at the student's EOS or after max_new_tokens (capped by data.max_length).

Under ZeRO-3 the student's parameters are gathered once for the whole generation with DeepSpeed's
own `unwrap_model_for_generation` (its hooks are removed meanwhile and put back after), so ranks
generate independently; ZeRO 0-2 generate with the module as it is.
"""
from __future__ import annotations

import time
from typing import Dict, List, Sequence

import torch
from torch import Tensor

from distill.data.text import LABELS
from distill.formulas.divergences import IGNORE_INDEX

ON_POLICY = "on_policy"  # a batch key: this micro-batch holds the student's own samples


def chooses_on_policy(seed: int, micro_step: int, fraction: float) -> bool:
    """Whether micro-step `micro_step` is on-policy: a draw of its own (the same on every rank and on
    resume), below `fraction`. 0 never, 1 always."""
    if fraction <= 0:
        return False
    if fraction >= 1:
        return True
    generator = torch.Generator().manual_seed(seed * 1_000_003 + micro_step)
    return bool(torch.rand((), generator=generator) < fraction)


def prompts_of(batch: Dict) -> List[List[int]]:
    """Each row's prompt: its inputs up to and including the last position without a label (the
    position that predicts the response's first token). A row with no label keeps all its inputs."""
    prompts = []
    for ids, mask, labels in zip(batch["input_ids"], batch["attention_mask"], batch[LABELS]):
        labelled = torch.nonzero(labels != IGNORE_INDEX).squeeze(-1)
        end = int(labelled[0]) + 1 if len(labelled) else int(mask.sum())
        prompts.append(ids[:end].tolist())
    return prompts


def sampled_rows(prompts: Sequence[Sequence[int]], continuations: Sequence[Sequence[int]], eos_id: int,
                 max_length: int) -> Dict[str, List[List[int]]]:
    """Rows as lm_data.prompt_response_rows builds them, with the sampled continuation as the
    response: prompt + continuation cut after its first EOS (kept: the student chose to stop) and to
    max_length + 1 tokens (a prompt is at most max_length tokens: at least one sampled token stays); no
    EOS is added to a continuation that did not stop (it was not sampled)."""
    inputs, labels = [], []
    for prompt, continuation in zip(prompts, continuations):
        continuation = list(continuation)
        if eos_id in continuation:
            continuation = continuation[:continuation.index(eos_id) + 1]
        sequence = (list(prompt) + continuation)[:max_length + 1]
        inputs.append(sequence[:-1])
        labels.append([sequence[t + 1] if t + 1 >= len(prompt) else IGNORE_INDEX for t in range(len(sequence) - 1)])
    return {"input_ids": inputs, LABELS: labels}


def left_padded(prompts: Sequence[Sequence[int]], pad_id: int, device) -> tuple[Tensor, Tensor]:
    """Prompts right-aligned (generation continues every row from its last column)."""
    length = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), length), dtype=torch.long)
    for i, prompt in enumerate(prompts):
        ids[i, length - len(prompt):] = torch.tensor(prompt, dtype=torch.long)
        mask[i, length - len(prompt):] = 1
    return ids.to(device), mask.to(device)


class OnPolicySampler:
    """Turns a training micro-batch into one of the student's own samples (see the module docstring)."""

    def __init__(self, settings, seed: int, tokenizer, max_length: int, collator, zero_stage: int, rank: int):
        self.settings, self.seed, self.max_length = settings, seed, max_length
        self.eos_id = tokenizer.eos_token_id
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_id
        self.collator, self.zero_stage, self.rank = collator, zero_stage, rank

    def __call__(self, engine, batch: Dict, micro_step: int) -> Dict:
        if not chooses_on_policy(self.seed, micro_step, self.settings.fraction):
            return batch
        started = time.perf_counter()
        prompts = prompts_of(batch)
        continuations = self.generate(engine, prompts, micro_step)
        rows = sampled_rows(prompts, continuations, self.eos_id, self.max_length)
        keep = {name: batch[name] for name in batch if name not in ("input_ids", "attention_mask", LABELS)}
        fresh = self.collator([{"input_ids": ids, LABELS: labels, "index": 0} for ids, labels
                               in zip(rows["input_ids"], rows[LABELS])])
        out = {**keep, "input_ids": fresh["input_ids"], "attention_mask": fresh["attention_mask"], LABELS: fresh[LABELS]}
        new_tokens = [sum(1 for label in labels if label != IGNORE_INDEX) for labels in rows[LABELS]]
        stopped = [self.eos_id in continuation for continuation in continuations]
        out[ON_POLICY] = {"new_tokens": float(sum(new_tokens)), "rows": float(len(prompts)),
                          "stopped": float(sum(stopped)), "seconds": time.perf_counter() - started}
        return out

    def generate(self, engine, prompts: Sequence[Sequence[int]], micro_step: int) -> List[List[int]]:
        """The student's sampled continuations, seeded by (seed, micro-step, rank); the training
        RNG streams (dropout) are left untouched."""
        from transformers import GenerationConfig

        settings = self.settings
        longest = max(len(p) for p in prompts)
        new_tokens = max(1, min(settings.max_new_tokens, self.max_length + 1 - min(len(p) for p in prompts)))
        config = GenerationConfig(do_sample=True, temperature=settings.temperature, top_p=settings.top_p, top_k=0,
                                  max_new_tokens=new_tokens, eos_token_id=self.eos_id, pad_token_id=self.pad_id)
        module = engine.module
        device = next(module.parameters()).device
        ids, mask = left_padded(prompts, self.pad_id, device)
        devices = [device] if device.type == "cuda" else []
        was_training = module.training
        module.eval()
        try:
            with torch.random.fork_rng(devices=devices), torch.no_grad(), self._gathered(engine):
                torch.manual_seed((self.seed * 1_000_003 + micro_step) * 1_009 + self.rank)
                sequences = module.generate(input_ids=ids, attention_mask=mask, generation_config=config)
        finally:
            module.train(was_training)
        return [row[longest:].tolist() for row in sequences.cpu()]

    def _gathered(self, engine):
        import contextlib

        if self.zero_stage < 3:
            return contextlib.nullcontext()
        from deepspeed.runtime.zero import unwrap_model_for_generation

        return unwrap_model_for_generation(engine)


def on_policy_figures(batch: Dict) -> Dict[str, tuple]:
    """Window means for the log: the share of on-policy micro-batches, sampled tokens per row, the
    share of samples that stopped at EOS, and generation seconds per micro-batch."""
    stats = batch.get(ON_POLICY)
    if stats is None:
        return {"on_policy/share": (0.0, 1.0), "on_policy/new_tokens": (0.0, 0.0), "on_policy/stopped": (0.0, 0.0),
                "time/generation_s": (0.0, 1.0)}
    return {"on_policy/share": (1.0, 1.0), "on_policy/new_tokens": (stats["new_tokens"], stats["rows"]),
            "on_policy/stopped": (stats["stopped"], stats["rows"]), "time/generation_s": (stats["seconds"], 1.0)}
