"""Distillation losses: pure functions of tensors, formulas in the docstrings.

    loss = kd_alpha * T^2 * KL(target_T || student_T) + (1 - kd_alpha) * CE_eps(student, labels)

`target_T` is the interpolated teacher distribution (each teacher softened by its own temperature),
`student_T = softmax(z_s / T)` with the student temperature T, and the T^2 factor keeps the soft
term's gradient scale independent of T (Hinton et al., 2015). Rows whose label is `ignore_index`
(unlabelled transfer data) enter only the KD term.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

import torch
from torch import Tensor

from distill.util.registry import registrar

IGNORE_INDEX = -100


def row_dot(a: Tensor, b: Tensor) -> Tensor:
    """[c] sum_v a[c, v] * b[c, v], as one batched matmul (no [c, V] product is written)."""
    return torch.matmul(a.unsqueeze(1), b.unsqueeze(2)).reshape(a.shape[0])


class Divergence:
    """D(p || q) per row, p the (interpolated) teacher target, q the student, both log-probabilities
    over the last dim, and what the fused token loss knows of it: `closed_form` names the closed form
    of its gradient there (formulas/token_loss.py, registered by that name), None: autograd over the
    chunk. Every divergence declares it; nothing probes for it."""

    __slots__ = ("function", "closed_form")

    def __init__(self, function: Callable[[Tensor, Tensor], Tensor], closed_form: Optional[str] = None):
        self.function, self.closed_form = function, closed_form

    def __call__(self, target_log_probs: Tensor, student_log_probs: Tensor) -> Tensor:
        return self.function(target_log_probs, student_log_probs)


def _kl_rows(target_log_probs: Tensor, student_log_probs: Tensor) -> Tensor:
    """Per-row KL(target || student) = sum_c p_t[c] (log p_t[c] - log p_s[c]), over the last dim.

    Classes where the target has zero mass contribute exactly zero (0 * log 0 = 0).
    """
    target_probs = target_log_probs.exp()
    terms = target_probs * (target_log_probs - student_log_probs)
    return torch.where(target_probs > 0, terms, torch.zeros_like(terms)).sum(dim=-1)


# KL(target || student) per row; the fused token loss has its gradient in closed form
kl_divergence = Divergence(_kl_rows, "forward_kl")


# ---------------------------------------------------------------------------- divergences
# One registered constructor per name; `loss.divergence` picks it, the trainer never branches.
_DIVERGENCES: Dict[str, Callable[..., Divergence]] = {}


register_divergence = registrar(_DIVERGENCES, "divergence")


def available_divergences() -> List[str]:
    return sorted(_DIVERGENCES)


def build_divergence(name: str, jsd_beta: float = 0.5, skew: float = 0.1) -> Divergence:
    if name not in _DIVERGENCES:
        raise KeyError(f"unknown divergence {name!r}; available: {available_divergences()}")
    return _DIVERGENCES[name](jsd_beta=jsd_beta, skew=skew)


def _mixture_log_probs(first: Tensor, second: Tensor, share: float) -> Tensor:
    """log(share * exp(first) + (1 - share) * exp(second)), computed in log space."""
    if share <= 0:
        return second
    if share >= 1:
        return first
    return torch.logaddexp(first + math.log(share), second + math.log1p(-share))


@register_divergence("forward_kl")
def _forward_kl(**_) -> Divergence:
    """KL(p || q): mean-seeking, the classic distillation loss (Hinton et al.)."""
    return kl_divergence


@register_divergence("reverse_kl")
def _reverse_kl(**_) -> Divergence:
    """KL(q || p) = sum q (log q - log p): mode-seeking (MiniLLM); needs p > 0 where q > 0."""
    return Divergence(lambda target, student: _kl_rows(student, target), "reverse_kl")


@register_divergence("jsd")
def _jsd(jsd_beta: float, **_) -> Divergence:
    """Generalized JSD_beta(p, q) = beta KL(p || m) + (1 - beta) KL(q || m), m = beta p + (1 - beta) q
    (GKD, Agarwal et al. 2024). beta = 0.5 is the symmetric JSD. It vanishes at both ends:
    JSD_beta / beta -> KL(p || q) as beta -> 0 and JSD_beta / (1 - beta) -> KL(q || p) as beta -> 1."""
    if not 0 < jsd_beta < 1:
        raise ValueError(f"jsd_beta must lie in (0, 1), got {jsd_beta}")

    def divergence(target: Tensor, student: Tensor) -> Tensor:
        mixture = _mixture_log_probs(target, student, jsd_beta)
        return jsd_beta * _kl_rows(target, mixture) + (1 - jsd_beta) * _kl_rows(student, mixture)

    return Divergence(divergence)


@register_divergence("skew_kl")
def _skew_kl(skew: float, **_) -> Divergence:
    """Skew KL_a(p || q) = KL(p || a p + (1 - a) q) (DistiLLM, Ko et al. 2024): bounded where the
    student misses the target's mass; a = 0 is the forward KL."""
    if not 0 <= skew < 1:
        raise ValueError(f"skew must lie in [0, 1), got {skew}")
    return Divergence(lambda target, student: _kl_rows(target, _mixture_log_probs(target, student, skew)))


@register_divergence("skew_reverse_kl")
def _skew_reverse_kl(skew: float, **_) -> Divergence:
    """Skew reverse KL_a(q || p) = KL(q || a q + (1 - a) p); a = 0 is the reverse KL."""
    if not 0 <= skew < 1:
        raise ValueError(f"skew must lie in [0, 1), got {skew}")
    return Divergence(lambda target, student: _kl_rows(student, _mixture_log_probs(student, target, skew)))


def label_smoothed_cross_entropy(logits: Tensor, labels: Tensor, label_smoothing: float = 0.0,
                                 ignore_index: int = IGNORE_INDEX) -> Tensor:
    """Mean over rows with a label of  -(1 - eps) log p[y] - eps * mean_c log p[c].

    Returns 0 (keeping the graph) when no row has a label.
    """
    valid = labels != ignore_index
    log_probs = torch.log_softmax(logits, dim=-1)
    safe_labels = torch.where(valid, labels, torch.zeros_like(labels))
    nll = -log_probs.gather(-1, safe_labels.unsqueeze(-1)).squeeze(-1)
    smooth = -log_probs.mean(dim=-1)
    per_row = (1.0 - label_smoothing) * nll + label_smoothing * smooth
    per_row = torch.where(valid, per_row, torch.zeros_like(per_row))
    return per_row.sum() / valid.sum().clamp(min=1)


@dataclass
class LossTerms:
    total: Tensor  # what backward() sees
    kd: Tensor  # T^2 * mean KL(target_T || student_T), before kd_alpha
    ce: Tensor  # label-smoothed cross-entropy on labelled rows, before (1 - kd_alpha)


def distillation_loss(student_logits: Tensor, target_log_probs: Tensor | None, labels: Tensor,
                      kd_alpha: float, temperature: float, label_smoothing: float = 0.0,
                      kd_mask: Tensor | None = None, divergence: Divergence = kl_divergence) -> LossTerms:
    """kd_alpha * T^2 * mean_rows D(target || softmax(z_s / T)) + (1 - kd_alpha) * CE_eps(z_s, y),
    D the forward KL unless another registered divergence is given.

    `target_log_probs` may be None only when kd_alpha == 0 (plain fine-tuning). `kd_mask` [B]
    (bool) keeps only some rows in the KD mean (rows whose target is unusable); the mean is over
    the kept rows, and 0 when none is kept.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    ce = label_smoothed_cross_entropy(student_logits, labels, label_smoothing)
    if target_log_probs is None:
        if kd_alpha != 0:
            raise ValueError("kd_alpha > 0 needs a teacher target")
        kd = torch.zeros((), dtype=student_logits.dtype, device=student_logits.device)
        return LossTerms(total=ce, kd=kd, ce=ce)
    student_log_probs = torch.log_softmax(student_logits / temperature, dim=-1)
    target = target_log_probs.to(student_log_probs.dtype)
    if kd_mask is None:
        kd = temperature ** 2 * divergence(target, student_log_probs).mean()
    else:
        safe_target = torch.where(kd_mask.unsqueeze(-1), target, student_log_probs.detach())
        per_row = torch.where(kd_mask, divergence(safe_target, student_log_probs), torch.zeros_like(kd_mask, dtype=target.dtype))
        kd = temperature ** 2 * per_row.sum() / kd_mask.sum().clamp(min=1)
    total = kd_alpha * kd + (1.0 - kd_alpha) * ce
    return LossTerms(total=total, kd=kd, ce=ce)


def per_teacher_kl(teacher_log_probs: Tensor, student_logits: Tensor, temperature: float) -> Tensor:
    """[K] mean KL(teacher_k || student_T) for each teacher: a monitoring figure, not a loss."""
    student_log_probs = torch.log_softmax(student_logits.detach() / temperature, dim=-1)
    return kl_divergence(teacher_log_probs.to(student_log_probs.dtype), student_log_probs.unsqueeze(0)).mean(dim=-1)


def mean_kl(reference_logits: Tensor, logits: Tensor, chunk: int = 256) -> float:
    """mean over rows of KL(softmax(reference) || softmax(logits)) in float64, a chunk of rows at a
    time: how far a teacher run in lower precision is from its fp32 self (a figure, not a loss).
    A token of probability 0 under the reference adds 0 (-inf logits in both are no NaN); a NaN in
    `logits` where the reference has mass makes the figure NaN."""
    total, rows = 0.0, reference_logits.shape[0]
    for start in range(0, rows, chunk):
        reference = torch.log_softmax(reference_logits[start:start + chunk].double(), dim=-1)
        other = torch.log_softmax(logits[start:start + chunk].double(), dim=-1)
        mass = reference.exp()
        total += float(torch.where(mass > 0, mass * (reference - other), 0.0).sum())
    return total / max(rows, 1)
