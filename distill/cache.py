"""Cached teacher logits: the teachers run once, training reads their top-k from disk.

Per token and per teacher the cache keeps the k largest log-probabilities (at temperature 1) and
their token ids. The probability mass outside the top k (the tail bucket) is spread evenly over the
other V - k tokens when the distribution is rebuilt; with k = V nothing is approximated.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor


def topk_target_log_probs(top_ids: Tensor, top_log_probs: Tensor, vocab_size: int) -> Tensor:
    """Dense log-probabilities [..., V] from the top-k [..., k]: the listed tokens keep their
    log-probability, the remaining V - k tokens share the tail mass 1 - sum(top) equally."""
    k = top_ids.shape[-1]
    top_log_probs = top_log_probs.to(torch.promote_types(top_log_probs.dtype, torch.float32))
    covered = torch.logsumexp(top_log_probs, dim=-1, keepdim=True).clamp(max=0.0)
    # log(1 - exp(covered)), stable near covered = 0; -inf when the top k hold all the mass
    tail = torch.log(-torch.expm1(covered)).clamp(min=-1e30) if k < vocab_size else None
    fill = (tail - math.log(vocab_size - k)) if tail is not None else torch.full_like(covered, -math.inf)
    dense = fill.expand(*top_ids.shape[:-1], vocab_size).clone()
    return dense.scatter(-1, top_ids.long(), top_log_probs)
