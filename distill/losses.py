"""Distillation losses: pure functions of tensors, formulas in the docstrings.

    loss = kd_alpha * T^2 * KL(target_T || student_T) + (1 - kd_alpha) * CE_eps(student, labels)

`target_T` is the interpolated teacher distribution (each teacher softened by its own temperature),
`student_T = softmax(z_s / T)` with the student temperature T, and the T^2 factor keeps the soft
term's gradient scale independent of T (Hinton et al., 2015). Rows whose label is `ignore_index`
(unlabelled transfer data) enter only the KD term.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

IGNORE_INDEX = -100


def kl_divergence(target_log_probs: Tensor, student_log_probs: Tensor) -> Tensor:
    """Per-row KL(target || student) = sum_c p_t[c] (log p_t[c] - log p_s[c]), over the last dim.

    Classes where the target has zero mass contribute exactly zero (0 * log 0 = 0).
    """
    target_probs = target_log_probs.exp()
    terms = target_probs * (target_log_probs - student_log_probs)
    return torch.where(target_probs > 0, terms, torch.zeros_like(terms)).sum(dim=-1)


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
                      kd_mask: Tensor | None = None) -> LossTerms:
    """kd_alpha * T^2 * mean_rows KL(target || softmax(z_s / T)) + (1 - kd_alpha) * CE_eps(z_s, y).

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
        kd = temperature ** 2 * kl_divergence(target, student_log_probs).mean()
    else:
        safe_target = torch.where(kd_mask.unsqueeze(-1), target, student_log_probs.detach())
        per_row = torch.where(kd_mask, kl_divergence(safe_target, student_log_probs), torch.zeros_like(kd_mask, dtype=target.dtype))
        kd = temperature ** 2 * per_row.sum() / kd_mask.sum().clamp(min=1)
    total = kd_alpha * kd + (1.0 - kd_alpha) * ce
    return LossTerms(total=total, kd=kd, ce=ce)


def per_teacher_kl(teacher_log_probs: Tensor, student_logits: Tensor, temperature: float) -> Tensor:
    """[K] mean KL(teacher_k || student_T) for each teacher: a monitoring figure, not a loss."""
    student_log_probs = torch.log_softmax(student_logits.detach() / temperature, dim=-1)
    return kl_divergence(teacher_log_probs.to(student_log_probs.dtype), student_log_probs.unsqueeze(0)).mean(dim=-1)
