"""Teacher interpolation: several teachers' soft targets -> ONE target distribution.

Pure functions of tensors, in log space. Shapes: teacher logits `[K, ..., C]` for K teachers and C
classes (any batch dims in between); weights `[K]`, or `[K, ...]` for per-sample weights;
temperatures `[K]`. Every strategy returns normalised log-probabilities `[..., C]`.

Each strategy is one class registered by name (`@register_interpolation("linear")`); the config's
`interpolation.method` selects it and the trainer never branches on the name. A strategy with
learned state (the gate) exposes it through `state_dict()` / `load_state_dict()`.
"""
from __future__ import annotations

import math
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from distill.losses import row_dot

_INTERPOLATIONS: Dict[str, type] = {}


def register_interpolation(name: str) -> Callable[[type], type]:
    def decorate(cls: type) -> type:
        if name in _INTERPOLATIONS:
            raise ValueError(f"interpolation {name!r} is registered twice")
        cls.name = name
        _INTERPOLATIONS[name] = cls
        return cls

    return decorate


def available_interpolations() -> List[str]:
    return sorted(_INTERPOLATIONS)


def build_interpolation(name: str, **options) -> "Interpolation":
    if name not in _INTERPOLATIONS:
        raise KeyError(f"unknown interpolation {name!r}; available: {available_interpolations()}")
    return _INTERPOLATIONS[name](**options)


# ---------------------------------------------------------------------------------- formulas
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


# -------------------------------------------------------------------------------- strategies
class Interpolation:
    """Maps teacher logits `[K, ..., C]`, weights and temperatures to one target log-distribution.

    `labels` (gold ids, -100 where unknown) is passed to strategies that may use it.
    """

    name = "base"

    def __call__(self, teacher_logits: Tensor, weights: Tensor, temperatures: Tensor,
                 labels: Optional[Tensor] = None) -> Tensor:
        raise NotImplementedError(f"{type(self).__name__} must implement __call__")

    def state_dict(self) -> Dict[str, Tensor]:
        return {}

    def load_state_dict(self, state: Dict[str, Tensor]) -> None:
        if state:
            raise ValueError(f"interpolation {self.name!r} has no state, got keys {sorted(state)}")


@register_interpolation("linear")
class LinearInterpolation(Interpolation):
    """Mixture of probabilities: p = sum_k w_k softmax(z_k / T_k)."""

    def __call__(self, teacher_logits, weights, temperatures, labels=None):
        return linear_mixture(teacher_log_probs(teacher_logits, temperatures), weights)

    def probabilities_(self, teacher_logits, weights, temperatures):
        """The same mixture as probabilities, computed in place over `teacher_logits` (consumed)."""
        return linear_mixture_probs_(teacher_logits, weights, temperatures)


@register_interpolation("geometric")
class GeometricInterpolation(Interpolation):
    """Normalised log-linear mixture: log p = sum_k w_k log softmax(z_k / T_k) - log Z."""

    def __call__(self, teacher_logits, weights, temperatures, labels=None):
        return geometric_mixture(teacher_log_probs(teacher_logits, temperatures), weights)


@register_interpolation("logit_mean")
class LogitMeanInterpolation(Interpolation):
    """Weighted mean of the raw logits, then one temperature: softmax(sum_k w_k z_k / T_bar)."""

    def __call__(self, teacher_logits, weights, temperatures, labels=None):
        return logit_mean(teacher_logits, weights, temperatures)


@register_interpolation("confidence")
class ConfidenceInterpolation(Interpolation):
    """Per-sample weights from each teacher's confidence (see `confidence_weights`), times the
    prior weights, then the linear or geometric mixture of the softened teachers."""

    def __init__(self, sharpness: float = 0.1, combine: str = "linear", use_labels: bool = True):
        if combine not in ("linear", "geometric"):
            raise ValueError(f"confidence combine must be linear or geometric, got {combine!r}")
        self.sharpness, self.combine, self.use_labels = sharpness, combine, use_labels

    def sample_weights(self, teacher_logits, weights, labels=None) -> Tensor:
        native = torch.log_softmax(teacher_logits, dim=-1)
        return confidence_weights(native, weights, self.sharpness, labels if self.use_labels else None)

    def __call__(self, teacher_logits, weights, temperatures, labels=None):
        per_sample = self.sample_weights(teacher_logits, weights, labels)
        mix = linear_mixture if self.combine == "linear" else geometric_mixture
        return mix(teacher_log_probs(teacher_logits, temperatures), per_sample)


class GateNetwork(nn.Module):
    """A small MLP: the teachers' distributions (and entropies) -> per-sample simplex weights."""

    def __init__(self, num_teachers: int, num_classes: int, hidden: int = 32, use_entropy: bool = True):
        super().__init__()
        self.use_entropy = use_entropy
        features = num_teachers * num_classes + (num_teachers if use_entropy else 0)
        self.layers = nn.Sequential(nn.Linear(features, hidden), nn.Tanh(), nn.Linear(hidden, num_teachers))

    def forward(self, log_probs: Tensor) -> Tensor:
        """[K, ..., C] log-probabilities -> [K, ...] weights that sum to one over K."""
        moved = log_probs.movedim(0, -2)  # [..., K, C]
        features = [moved.exp().flatten(-2)]
        if self.use_entropy:
            features.append(entropy(moved))
        gate_logits = self.layers(torch.cat(features, dim=-1).to(self.layers[0].weight.dtype))
        return torch.softmax(gate_logits, dim=-1).movedim(-1, 0)


@register_interpolation("learned_gate")
class LearnedGateInterpolation(Interpolation):
    """p = sum_k g_k(x) softmax(z_k / T_k), with gate weights g(x) from `GateNetwork` applied to the
    teachers' own distributions at temperature 1. The gate is fitted on held-out labelled data (distill/fitting.py)
    to maximise the mixture's likelihood of the gold labels, then frozen."""

    def __init__(self, hidden: int = 32, use_entropy: bool = True, epochs: int = 200, learning_rate: float = 1e-2):
        self.hidden, self.use_entropy = hidden, use_entropy
        self.epochs, self.learning_rate = epochs, learning_rate  # how distill/fitting.py trains it
        self.gate: Optional[GateNetwork] = None

    def build(self, num_teachers: int, num_classes: int) -> GateNetwork:
        self.gate = GateNetwork(num_teachers, num_classes, self.hidden, self.use_entropy)
        return self.gate

    def sample_weights(self, teacher_logits: Tensor) -> Tensor:
        """[K, ...] gate weights from the teachers' native (temperature 1) distributions."""
        if self.gate is None:
            raise RuntimeError("learned_gate has not been fitted: run it with interpolation.fit_on=validation")
        native = torch.log_softmax(teacher_logits, dim=-1)
        return self.gate(native).to(teacher_logits.dtype)

    def __call__(self, teacher_logits, weights, temperatures, labels=None):
        log_probs = teacher_log_probs(teacher_logits, temperatures)
        if log_probs.shape[0] == 1:
            return log_probs[0]
        return linear_mixture(log_probs, self.sample_weights(teacher_logits))

    def state_dict(self) -> Dict[str, Tensor]:
        return {} if self.gate is None else {k: v.detach().clone() for k, v in self.gate.state_dict().items()}

    def load_state_dict(self, state: Dict[str, Tensor]) -> None:
        first = state["layers.0.weight"]
        num_teachers = state["layers.2.weight"].shape[0]
        num_classes = (first.shape[1] - (num_teachers if self.use_entropy else 0)) // num_teachers
        self.build(num_teachers, num_classes).load_state_dict(state)
        self.gate.requires_grad_(False)
