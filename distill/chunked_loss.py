"""Token-level distillation over a large vocabulary, a chunk of tokens at a time.

For N tokens, a vocabulary V and K teachers, the materialised loss holds the student's logits
[N, V], their log-softmax and its gradient, and the teachers' logits [K, N, V]: gigabytes at
V = 49k. Here the student's output layer is applied to `chunk_size` tokens at a time, and each
chunk's loss *and its gradient* with respect to the chunk's hidden states and the output weight
are computed inside the forward pass (the fused-linear scheme of Liger-Kernel's losses). Backward
only scales the stored gradients: nothing is recomputed, and no tensor larger than [K, chunk, V]
ever exists, since the teachers' target is also built chunk by chunk by `target_fn`.

    loss = [ kd_alpha * T^2 * sum_t D(target_t || softmax(z_t / T))
             + (1 - kd_alpha) * sum_t CE_eps(z_t, y_t) ] / normalizer,     z_t = W h_t (+ b)

over the tokens t whose label is not -100 (padding, prompt tokens, the last position). D is a
registered divergence (losses.py). The normalizer is the caller's: the number of valid tokens in
the whole optimizer step over gradient accumulation and data-parallel ranks (not per micro-batch),
so that every token weighs the same however the tokens fall into micro-batches.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from distill.losses import IGNORE_INDEX, Divergence, kl_divergence

# (start, end) -> (target log-probabilities [end - start, V] or None, KD mask [end - start] or None)
TargetFn = Callable[[int, int], Tuple[Optional[Tensor], Optional[Tensor]]]


@dataclass
class TokenLossTerms:
    total: Tensor  # what backward() sees
    kd: Tensor  # T^2 * summed divergence / normalizer, before kd_alpha (detached in the fused path)
    ce: Tensor  # summed label-smoothed CE / normalizer, before (1 - kd_alpha)


def token_loss_sums(student_logits: Tensor, target_log_probs: Optional[Tensor], labels: Tensor,
                    temperature: float, label_smoothing: float = 0.0, divergence: Divergence = kl_divergence,
                    kd_mask: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """(sum_t T^2 D(target_t || softmax(z_t / T)), sum_t CE_eps(z_t, y_t)) over tokens with a label.

    Tokens outside the label mask (or outside `kd_mask`, for the KD term) contribute exactly zero,
    and no gradient: their target is replaced by the detached student before D is taken, so a -inf
    or NaN target on a padded position cannot leak in."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    logits = student_logits.to(_accumulation_dtype(student_logits.dtype))  # bf16/fp16 -> fp32, fp64 stays
    valid = labels != IGNORE_INDEX
    log_probs = torch.log_softmax(logits, dim=-1)
    safe_labels = torch.where(valid, labels, torch.zeros_like(labels))
    nll = -log_probs.gather(-1, safe_labels.unsqueeze(-1)).squeeze(-1)
    per_token_ce = (1.0 - label_smoothing) * nll - label_smoothing * log_probs.mean(dim=-1)
    ce = torch.where(valid, per_token_ce, torch.zeros_like(per_token_ce)).sum()
    if target_log_probs is None:
        return torch.zeros_like(ce), ce
    student = torch.log_softmax(logits / temperature, dim=-1)
    keep = valid if kd_mask is None else valid & kd_mask
    target = torch.where(keep.unsqueeze(-1), target_log_probs.to(student.dtype), student.detach())
    per_token_kd = divergence(target, student)
    kd = temperature ** 2 * torch.where(keep, per_token_kd, torch.zeros_like(per_token_kd)).sum()
    return kd, ce


def materialized_token_distillation(student_logits: Tensor, target_log_probs: Optional[Tensor], labels: Tensor, *,
                                    kd_alpha: float, temperature: float, label_smoothing: float = 0.0,
                                    divergence: Divergence = kl_divergence, kd_mask: Optional[Tensor] = None,
                                    normalizer: Optional[float] = None) -> TokenLossTerms:
    """The reference: the same loss over whole [N, V] logits, differentiated by autograd."""
    kd, ce = token_loss_sums(student_logits, target_log_probs, labels, temperature, label_smoothing,
                             divergence, kd_mask)
    normalizer = _default_normalizer(labels) if normalizer is None else normalizer
    return TokenLossTerms(total=(kd_alpha * kd + (1.0 - kd_alpha) * ce) / normalizer,
                          kd=kd / normalizer, ce=ce / normalizer)


def chunked_target_distillation(student_logits: Tensor, labels: Tensor, target_fn, *, kd_alpha: float,
                                temperature: float, label_smoothing: float, divergence, chunk_size: int,
                                normalizer: float) -> TokenLossTerms:
    """The loss over materialised student logits [N, V] (when the output layer cannot be used
    directly, as under ZeRO-3) with the teachers' target still built one chunk at a time."""
    kd_total = ce_total = student_logits.new_zeros((), dtype=torch.float32)
    for start in range(0, labels.shape[0], chunk_size):
        end = min(start + chunk_size, labels.shape[0])
        if not bool((labels[start:end] != IGNORE_INDEX).any()):
            continue
        target, keep = target_fn(start, end) if target_fn is not None else (None, None)
        kd, ce = token_loss_sums(student_logits[start:end], target, labels[start:end], temperature, label_smoothing,
                                 divergence, keep)
        kd_total, ce_total = kd_total + kd, ce_total + ce
    total = (kd_alpha * kd_total + (1.0 - kd_alpha) * ce_total) / normalizer
    return TokenLossTerms(total=total, kd=kd_total.detach() / normalizer, ce=ce_total.detach() / normalizer)


def tokens_per_chunk(chunk_tokens: int, teachers: int) -> int:
    """Tokens per chunk for K teachers: the [K, chunk, V] teacher slice keeps the size one teacher's
    [chunk_tokens, V] has, so the loss's peak memory does not grow with the number of teachers."""
    return max(1, chunk_tokens // max(1, teachers))


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def _default_normalizer(labels: Tensor) -> float:
    return float(max(int((labels != IGNORE_INDEX).sum()), 1))


class _FusedTokenDistillation(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, target_fn, kd_alpha, temperature, label_smoothing, divergence,
                chunk_size, normalizer):
        accumulate = _accumulation_dtype(weight.dtype)
        grad_hidden = torch.zeros_like(hidden)
        grad_weight = torch.zeros_like(weight, dtype=accumulate)
        grad_bias = torch.zeros_like(bias, dtype=accumulate) if bias is not None else None
        kd_total = torch.zeros((), dtype=accumulate, device=hidden.device)
        ce_total = torch.zeros_like(kd_total)
        for start in range(0, hidden.shape[0], chunk_size):
            end = min(start + chunk_size, hidden.shape[0])
            chunk_labels = labels[start:end]
            if not bool((chunk_labels != IGNORE_INDEX).any()):
                continue  # nothing to learn here: zero loss, zero gradient
            target, kd_mask = target_fn(start, end) if target_fn is not None else (None, None)
            h = hidden[start:end]
            with torch.no_grad():
                logits = F.linear(h, weight, bias)
            with torch.enable_grad():  # autograd only through softmax and divergence, over [chunk, V]
                logits.requires_grad_(True)
                kd, ce = token_loss_sums(logits, target, chunk_labels, temperature, label_smoothing, divergence, kd_mask)
                (grad_logits,) = torch.autograd.grad((kd_alpha * kd + (1.0 - kd_alpha) * ce) / normalizer, [logits])
            # the output layer's gradients by hand: no [V, H] temporary per chunk, nothing kept for backward
            grad_weight.addmm_(grad_logits.t().to(accumulate), h.to(accumulate))
            if bias is not None:
                grad_bias += grad_logits.sum(dim=0).to(accumulate)
            grad_hidden[start:end] = (grad_logits.to(weight.dtype) @ weight).to(hidden.dtype)
            del logits, grad_logits, target
            kd_total += kd.detach()
            ce_total += ce.detach()
        ctx.save_for_backward(grad_hidden, grad_weight.to(weight.dtype),
                              grad_bias.to(bias.dtype) if bias is not None else None)
        ctx.has_bias = bias is not None
        total = (kd_alpha * kd_total + (1.0 - kd_alpha) * ce_total) / normalizer
        kd_mean, ce_mean = kd_total / normalizer, ce_total / normalizer
        ctx.mark_non_differentiable(kd_mean, ce_mean)
        return total, kd_mean, ce_mean

    @staticmethod
    def backward(ctx, grad_total, _grad_kd, _grad_ce):
        grad_hidden, grad_weight, grad_bias = ctx.saved_tensors
        return (grad_hidden * grad_total, grad_weight * grad_total,
                grad_bias * grad_total if ctx.has_bias else None,
                None, None, None, None, None, None, None, None)


def fused_token_distillation(hidden: Tensor, weight: Tensor, labels: Tensor, target_fn: Optional[TargetFn] = None, *,
                             kd_alpha: float, temperature: float, label_smoothing: float = 0.0,
                             divergence: Divergence = kl_divergence, bias: Optional[Tensor] = None,
                             chunk_size: int = 1024, normalizer: Optional[float] = None) -> TokenLossTerms:
    """The loss above from the student's last hidden states `hidden` [N, H] and output layer
    `weight` [V, H] (`bias` [V]), `labels` [N] (next-token ids, -100 where nothing is learned).

    `target_fn(start, end)` returns the teachers' interpolated target for tokens start..end-1 (at
    the distillation temperature, no gradient) and an optional KD mask; None means kd_alpha = 0."""
    if target_fn is None and kd_alpha != 0:
        raise ValueError("kd_alpha > 0 needs a teacher target (target_fn)")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    normalizer = _default_normalizer(labels) if normalizer is None else float(normalizer)
    total, kd, ce = _FusedTokenDistillation.apply(hidden, weight, bias, labels, target_fn, kd_alpha, temperature,
                                                  label_smoothing, divergence, chunk_size, normalizer)
    return TokenLossTerms(total=total, kd=kd, ce=ce)
