"""Consistent input perturbation: the same masked tokens shown to the teachers and the student.

"A good teacher is patient and consistent" (Beyer et al. 2022): distil on a fresh perturbation of
each input every time it is seen, with the teachers reading exactly the perturbed input the student
reads, over many epochs. Here a perturbation masks spans of a row's tokens:

    span starts   each maskable position starts a span with probability rate / mean_span
    span lengths  1 + Geometric(1 / mean_span) - 1, i.e. geometric with mean `mean_span`
    masked        every position a span covers, cut at the row's last maskable token

so about `rate` of the maskable tokens are masked (a little less where spans overlap or reach a
row's end); `mean_span: 1` is plain token dropout. Maskable: attended, not a special token. A masked
position's id becomes `replacement` (the tokenizer's mask token, or its unknown token).

Pure functions of the ids and a seed: the draw for micro-batch (epoch, position) of a run does not
depend on what was drawn before, so a resumed run perturbs its batches exactly as the uninterrupted
one did.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor


def perturbation_seed(seed: int, epoch: int, position: int) -> int:
    """A generator seed for one micro-batch, from the run's seed and the micro-batch's place."""
    return (seed * 1_000_003 + epoch * 998_244_353 + position * 7_919 + 12_345) % (2 ** 63 - 1)


def span_mask(maskable: Tensor, rate: float, mean_span: float, generator: torch.Generator) -> Tensor:
    """[B, L] bool: the positions to mask, spans of geometric length (mean `mean_span`) starting at
    maskable positions with probability rate / mean_span, never outside `maskable`."""
    if rate <= 0:
        return torch.zeros_like(maskable)
    starts = (torch.rand(maskable.shape, generator=generator) < rate / mean_span) & maskable.cpu()
    if mean_span <= 1:
        return starts.to(maskable.device)
    # geometric lengths >= 1 with mean mean_span: 1 + floor(log(U) / log(1 - 1/mean_span))
    uniform = torch.rand(maskable.shape, generator=generator).clamp_min(1e-12)
    lengths = 1 + torch.floor(torch.log(uniform) / torch.log(torch.tensor(1.0 - 1.0 / mean_span))).long()
    lengths = torch.where(starts, lengths, torch.zeros_like(lengths))
    # position j is covered when some start i <= j has i + length_i > j: a running max of i + length_i
    positions = torch.arange(maskable.shape[1]).expand_as(lengths)
    reach = torch.where(starts, positions + lengths, torch.zeros_like(lengths))
    covered = torch.cummax(reach, dim=1).values > positions
    return (covered & maskable.cpu()).to(maskable.device)


def perturb_ids(input_ids: Tensor, attention_mask: Tensor, special_ids: Sequence[int], replacement: int,
                rate: float, mean_span: float, seed: int) -> Tensor:
    """input_ids with spans of maskable tokens replaced by `replacement` (a new tensor)."""
    generator = torch.Generator().manual_seed(seed)
    maskable = attention_mask.bool() & ~torch.isin(input_ids, torch.as_tensor(list(special_ids), dtype=input_ids.dtype,
                                                                             device=input_ids.device))
    return torch.where(span_mask(maskable, rate, mean_span, generator), torch.full_like(input_ids, replacement),
                       input_ids)


def carry_mask(student_ids: Tensor, masked_ids: Tensor, teacher_ids: Tensor, rows: Tensor, replacement: int) -> Tensor:
    """A teacher's own ids masked at the positions where the student's were, on `rows` ([B] bool: the
    rows the teacher encodes as the student does, token for token, position for position); its other
    rows unchanged (a new tensor)."""
    width = min(student_ids.shape[1], teacher_ids.shape[1])
    changed = torch.zeros(teacher_ids.shape, dtype=torch.bool, device=teacher_ids.device)
    changed[:, :width] = (masked_ids[:, :width] != student_ids[:, :width]).to(teacher_ids.device) & rows[:, None].to(
        teacher_ids.device)
    return torch.where(changed, torch.full_like(teacher_ids, replacement), teacher_ids)
