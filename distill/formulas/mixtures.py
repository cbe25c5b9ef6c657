"""Mixing formulas: several teachers' distributions -> one, as pure functions of tensors, in log space.

Shapes: teacher logits `[K, ..., C]` for K teachers and C classes (any batch dims in between);
weights `[K]`, or `[K, ...]` for per-sample weights; temperatures `[K]`. Every mixture returns
normalised log-probabilities `[..., C]` (or probabilities, for the `_` in-place fast paths).
The strategies that use them (one class each, registered by name) live in interpolation/strategies.py; the fits
that choose their weights in formulas/fits.py.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from distill.formulas.divergences import row_dot


def teacher_log_probs(teacher_logits: Tensor, temperatures: Tensor | Sequence[float]) -> Tensor:
    """log softmax(z_k / T_k) for each teacher k; `teacher_logits` is `[K, ..., C]`."""
    temperatures = torch.as_tensor(temperatures, dtype=teacher_logits.dtype, device=teacher_logits.device)
    scale = temperatures.reshape(-1, *([1] * (teacher_logits.dim() - 1)))
    return torch.log_softmax(teacher_logits / scale, dim=-1)


def normalize_weights(weights: Tensor | Sequence[float]) -> Tensor:
    """w_k / sum_k w_k over the teacher axis (dim 0); weights must be >= 0 with a positive sum."""
    weights = torch.as_tensor(weights)
    if not torch.is_floating_point(weights):
        weights = weights.to(torch.get_default_dtype())
    if torch.any(weights < 0):
        raise ValueError(f"teacher weights must be >= 0, got {weights.tolist()}")
    total = weights.sum(dim=0, keepdim=True)
    if torch.any(total <= 0):
        raise ValueError("teacher weights sum to zero: at least one teacher needs a positive weight")
    return weights / total


def _broadcast_weights(weights: Tensor, log_probs: Tensor) -> Tensor:
    """[K] or [K, ...batch] weights -> shape that broadcasts against [K, ...batch, C]."""
    weights = weights.to(dtype=log_probs.dtype, device=log_probs.device)
    return weights.reshape(*weights.shape, *([1] * (log_probs.dim() - weights.dim())))


def linear_mixture(log_probs: Tensor, weights: Tensor) -> Tensor:
    """log p = log sum_k w_k p_k = logsumexp_k(log w_k + log p_k), weights normalised.

    A teacher with weight 0 contributes nothing (log 0 = -inf is excluded, never multiplied). With
    one teacher holding all the weight the result is its log p. Otherwise the sum is taken in
    probability space, a few in-place passes over [..., C] (torch.logsumexp over the teacher axis is
    several times slower on large vocabularies); any entry whose mixture falls below the smallest
    normal float there is taken again in log space, so the result equals the logsumexp everywhere."""
    weights = _broadcast_weights(normalize_weights(weights), log_probs)
    if not weights.requires_grad and all(size == 1 for size in weights.shape[1:]):
        flat = weights.reshape(-1)
        if int((flat > 0).sum()) == 1:
            return log_probs[int(flat.argmax())]
    mixture = torch.zeros_like(log_probs[0])
    for teacher in range(log_probs.shape[0]):
        if bool((weights[teacher] > 0).any()):
            mixture.addcmul_(log_probs[teacher].exp(), weights[teacher])
    tiny = torch.finfo(mixture.dtype).tiny
    underflow = mixture < tiny
    if not bool(underflow.any()):
        return mixture.log_()
    mixture = mixture.clamp(min=tiny).log_()  # no 1/0 in the backward of the entries replaced below
    log_weights = torch.where(weights > 0, weights.log(), torch.full_like(weights, float("-inf")))
    return torch.where(underflow, torch.logsumexp(log_weights + log_probs, dim=0), mixture)


def add_softened_(mixture: Tensor, logits: Tensor, weight: float, temperature: float, first: bool) -> Tensor:
    """mixture += weight * softmax(logits / temperature) over the last dim, in place; `logits` is
    consumed (softened in place) and `first` overwrites `mixture` instead (it may be `logits`)."""
    logits.sub_(logits.amax(dim=-1, keepdim=True))
    if temperature != 1.0:
        logits.mul_(1.0 / temperature)
    logits.exp_()
    share = weight / logits.sum(dim=-1, keepdim=True)
    if first:
        return torch.mul(logits, share, out=mixture)
    return mixture.addcmul_(logits, share)


def softmax_with_entropy_(logits: Tensor, out: Tensor) -> Tuple[Tensor, Tensor]:
    """(p = softmax(logits) written into `out`, sum p log p per row) over the last dim of [c, C],
    with no log pass over [c, C]: with s = logits - max, p = exp(s) / S and
    sum p log p = (exp(s) . s) / S - log S. `logits` is consumed (it holds s afterwards). A NaN or
    inf logit makes its row's entropy NaN (0 * -inf, inf - inf), which the caller can test for."""
    shifted = logits.sub_(logits.amax(dim=-1, keepdim=True))
    exps = torch.exp(shifted, out=out)
    total = exps.sum(dim=-1, keepdim=True)
    neg_entropy = row_dot(exps, shifted) / total.squeeze(-1) - total.squeeze(-1).log()
    return exps.mul_(1.0 / total), neg_entropy


def linear_mixture_probs_(teacher_logits: Tensor, weights: Tensor, temperatures: Tensor) -> Tensor:
    """p = sum_k w_k softmax(z_k / T_k) as probabilities [..., C], computed IN PLACE over
    `teacher_logits` [K, ..., C] (which it consumes; the result is a view of its first slice).

    The forward-KL fast path of the fused token loss: four in-place passes per teacher instead of a
    log-softmax, a log-space mixture and an exp. Probabilities below float's smallest normal number
    may come out as 0 (their share of a KL is below 1e-36); the reference is `linear_mixture`."""
    weights = normalize_weights(weights)
    temperatures = torch.as_tensor(temperatures)
    mixture = teacher_logits[0]
    first = True
    for k in range(teacher_logits.shape[0]):
        if float(weights[k]) > 0:
            add_softened_(mixture, teacher_logits[k], float(weights[k]), float(temperatures[k]), first)
            first = False
    return mixture


def geometric_mixture(log_probs: Tensor, weights: Tensor) -> Tensor:
    """log p = sum_k w_k log p_k - log Z, with Z = sum_c exp(sum_k w_k log p_k[c]).

    The normalised log-linear (product-of-experts) mixture; weights normalised to sum to one.
    """
    weights = _broadcast_weights(normalize_weights(weights), log_probs)
    weighted = torch.where(weights > 0, weights * log_probs, torch.zeros_like(log_probs)).sum(dim=0)
    return weighted - torch.logsumexp(weighted, dim=-1, keepdim=True)


def logit_mean(teacher_logits: Tensor, weights: Tensor, temperatures: Tensor) -> Tensor:
    """log p = log_softmax(sum_k w_k z_k / T_bar), with T_bar = sum_k w_k T_k (weights normalised).

    Averages raw logits before any softmax; with equal temperatures T_bar is that temperature.
    """
    weights = _broadcast_weights(normalize_weights(weights).to(teacher_logits), teacher_logits)
    temperatures = torch.as_tensor(temperatures).to(teacher_logits)
    temperatures = temperatures.reshape(-1, *([1] * (teacher_logits.dim() - 1)))
    mean_logits = (weights * teacher_logits).sum(dim=0)
    mean_temperature = (weights * temperatures).sum(dim=0)
    return torch.log_softmax(mean_logits / mean_temperature, dim=-1)


def entropy(log_probs: Tensor) -> Tensor:
    """H(p) = -sum_c p[c] log p[c] over the last dim (0 log 0 = 0)."""
    probs = log_probs.exp()
    return -torch.where(probs > 0, probs * log_probs, torch.zeros_like(probs)).sum(dim=-1)


def confidence_weights(native_log_probs: Tensor, prior_weights: Tensor, sharpness: float,
                       labels: Optional[Tensor] = None, ignore_index: int = -100) -> Tensor:
    """Per-sample weights [K, ...] from each teacher's own confidence on each sample.

        score_k = p_k[y]        where a gold label y exists (confidently wrong -> low score)
                = -H(p_k)        elsewhere (no label: trust the teacher that is sure)
        w_k ∝ prior_k * exp(score_k / sharpness)   (a softmax over teachers with its own temperature)

    `native_log_probs` are the teachers' log-probabilities at temperature 1.
    """
    if sharpness <= 0:
        raise ValueError(f"confidence sharpness must be > 0, got {sharpness}")
    scores = -entropy(native_log_probs)
    if labels is not None:
        has_label = labels != ignore_index
        safe = torch.where(has_label, labels, torch.zeros_like(labels))
        index = safe.reshape(1, *safe.shape, 1).expand(native_log_probs.shape[0], *safe.shape, 1)
        gold = native_log_probs.gather(-1, index).squeeze(-1).exp()
        scores = torch.where(has_label.unsqueeze(0), gold, scores)
    prior = _broadcast_weights(normalize_weights(prior_weights).to(scores), scores)
    log_prior = torch.where(prior > 0, prior.log(), torch.full_like(prior, float("-inf")))
    return torch.softmax(log_prior + scores / sharpness, dim=0)


def sparse_linear_mixture(top_ids: Tensor, top_log_probs: Tensor, tail: Tensor, vocab_size: int, weights: Tensor,
                          temperatures: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """The linear mixture sum_k w_k softmax(log p_k / T_k) of K top-k teachers, each p_k its top-k
    plus the tail mass spread evenly over the other V - k tokens, in sparse form (ids [c, K*k],
    deltas [c, K*k], base [c]): p[v] = base + the deltas listed at v. Shapes: top_ids and
    top_log_probs [c, K, k], tail [c, K] (log of the tail mass), weights and temperatures [K].

    Softening keeps the shape: the listed tokens get exp(log p / T), each other token
    exp((tail - log(V - k)) / T), all divided by their total Z_k. So teacher k puts t_k on every
    token it did not list and p_k,i on its listed ones, and the mixture is
    base = sum_k w_k t_k everywhere plus w_k (p_k,i - t_k) on teacher k's listed tokens."""
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
    weights = normalize_weights(weights).to(dtype).reshape(1, -1, 1)
    deltas = weights * ((listed - log_z).exp() - other_probs)
    base = (weights * other_probs).sum(dim=(1, 2))
    return top_ids.reshape(top_ids.shape[0], -1).long(), deltas.reshape(deltas.shape[0], -1), base


GATE_FEATURES = ("auto", "distribution", "summary")
SUMMARY_UP_TO = 64  # `auto`: whole distributions up to this many classes, summaries above (vocabularies)


def resolve_gate_features(kind: str, num_classes: int) -> str:
    if kind == "auto":
        return "distribution" if num_classes <= SUMMARY_UP_TO else "summary"
    return kind


def gate_features(log_probs: Tensor, kind: str, use_entropy: bool = True) -> Tensor:
    """What the gate sees of K teachers' log-probabilities [K, ..., C], as [..., F]:
    distribution: every teacher's probabilities (K * C) and, with use_entropy, its entropy (K);
    summary: per teacher its entropy, largest probability and log-ratio of its two largest
    probabilities (3 K), for vocabularies too large to feed whole."""
    moved = log_probs.movedim(0, -2)  # [..., K, C]
    if kind == "distribution":
        features = [moved.exp().flatten(-2)]
        if use_entropy:
            features.append(entropy(moved))
        return torch.cat(features, dim=-1)
    top2 = moved.topk(2, dim=-1).values
    return torch.cat([entropy(moved), top2[..., 0].exp(), top2[..., 0] - top2[..., 1]], dim=-1)


def gate_feature_count(kind: str, num_teachers: int, num_classes: int, use_entropy: bool) -> int:
    if kind == "distribution":
        return num_teachers * num_classes + (num_teachers if use_entropy else 0)
    return 3 * num_teachers


class GateNetwork(nn.Module):
    """A small MLP: features of the teachers' distributions (`gate_features`) -> per-row simplex weights."""

    def __init__(self, num_teachers: int, num_classes: int, hidden: int = 32, use_entropy: bool = True,
                 features: str = "distribution"):
        super().__init__()
        self.use_entropy, self.features = use_entropy, resolve_gate_features(features, num_classes)
        inputs = gate_feature_count(self.features, num_teachers, num_classes, use_entropy)
        self.layers = nn.Sequential(nn.Linear(inputs, hidden), nn.Tanh(), nn.Linear(hidden, num_teachers))

    def weights_from_features(self, features: Tensor) -> Tensor:
        """[..., F] features -> [K, ...] weights that sum to one over K."""
        gate_logits = self.layers(features.to(self.layers[0].weight.dtype))
        return torch.softmax(gate_logits, dim=-1).movedim(-1, 0)

    def forward(self, log_probs: Tensor) -> Tensor:
        """[K, ..., C] log-probabilities -> [K, ...] weights that sum to one over K."""
        return self.weights_from_features(gate_features(log_probs, self.features, self.use_entropy))


def tail_log_mass(top_log_probs: Tensor) -> Tensor:
    """log(1 - sum exp(top_log_probs)) over the last dimension: the log of the mass outside the listed
    tokens, stable near a full sum (log1p-style: log(-expm1(.))), very negative (not -inf) when the
    listed tokens hold it all; -inf entries (unlisted slots) count as probability 0."""
    covered = torch.logsumexp(top_log_probs, dim=-1).clamp(max=0.0)
    return torch.log(-torch.expm1(covered)).clamp(min=-1e30)


def topk_target_log_probs(top_ids: Tensor, top_log_probs: Tensor, vocab_size: int,
                          tail: Tensor | None = None) -> Tensor:
    """Dense log-probabilities [..., V] from the top-k [..., k]: the listed tokens keep their
    log-probability, the remaining V - k tokens share the tail mass 1 - sum(top) equally (`tail`
    [...] is its log, as stored by the cache; computed from the top k when not given).

    A listed log-probability of -inf (a sampled store's slot that was not drawn: probability 0) is
    read as -1e30, whose exp is 0 as well: the dense rows stay finite, so the non-finite-teacher
    check (which stops or skips rows with NaN/inf) does not mistake "never drawn" for a broken
    teacher. NaN and +inf pass through unchanged and are caught there."""
    k = top_ids.shape[-1]
    top_log_probs = top_log_probs.to(torch.promote_types(top_log_probs.dtype, torch.float32)).clamp(min=-1e30)
    if k < vocab_size and tail is None:
        tail = tail_log_mass(top_log_probs).unsqueeze(-1)
    elif tail is not None:
        tail = tail.to(top_log_probs.dtype).unsqueeze(-1)
    if k >= vocab_size:
        tail = None
    fill = (tail - math.log(vocab_size - k)) if tail is not None else top_log_probs.new_full((*top_ids.shape[:-1], 1), -math.inf)
    dense = fill.expand(*top_ids.shape[:-1], vocab_size).clone()
    return dense.scatter(-1, top_ids.long(), top_log_probs)
