"""Teacher interpolation: several teachers' soft targets -> ONE target distribution.

Pure functions of tensors, in log space. Shapes: teacher logits `[K, ..., C]` for K teachers and C
classes (any batch dims in between); weights `[K]`, or `[K, ...]` for per-sample weights. Every
strategy returns normalised log-probabilities `[..., C]`.

Each strategy is one class registered by name (`@register_interpolation("linear")`); the config's
`interpolation.method` selects it and the trainer never branches on the name.
"""
from __future__ import annotations

from typing import Callable, Dict, List, Sequence

import torch
from torch import Tensor

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


def build_interpolation(name: str) -> "Interpolation":
    if name not in _INTERPOLATIONS:
        raise KeyError(f"unknown interpolation {name!r}; available: {available_interpolations()}")
    return _INTERPOLATIONS[name]()


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

    A teacher with weight 0 contributes nothing (log 0 = -inf is excluded, never multiplied).
    """
    weights = _broadcast_weights(normalize_weights(weights), log_probs)
    log_weights = torch.where(weights > 0, weights.log(), torch.full_like(weights, float("-inf")))
    return torch.logsumexp(log_weights + log_probs, dim=0)


def geometric_mixture(log_probs: Tensor, weights: Tensor) -> Tensor:
    """log p = sum_k w_k log p_k - log Z, with Z = sum_c exp(sum_k w_k log p_k[c]).

    The normalised log-linear (product-of-experts) mixture; weights normalised to sum to one.
    """
    weights = _broadcast_weights(normalize_weights(weights), log_probs)
    weighted = torch.where(weights > 0, weights * log_probs, torch.zeros_like(log_probs)).sum(dim=0)
    return weighted - torch.logsumexp(weighted, dim=-1, keepdim=True)


class Interpolation:
    """Maps per-teacher log-probabilities `[K, ..., C]` and weights to one target log-distribution."""

    name = "base"

    def __call__(self, log_probs: Tensor, weights: Tensor) -> Tensor:
        raise NotImplementedError(f"{type(self).__name__} must implement __call__")


@register_interpolation("linear")
class LinearInterpolation(Interpolation):
    """Mixture of probabilities: p = sum_k w_k softmax(z_k / T_k)."""

    def __call__(self, log_probs: Tensor, weights: Tensor) -> Tensor:
        return linear_mixture(log_probs, weights)


@register_interpolation("geometric")
class GeometricInterpolation(Interpolation):
    """Normalised log-linear mixture: log p = sum_k w_k log softmax(z_k / T_k) - log Z."""

    def __call__(self, log_probs: Tensor, weights: Tensor) -> Tensor:
        return geometric_mixture(log_probs, weights)
