"""Intermediate-layer distillation: pure functions of tensors, formulas in the docstrings.

Two kinds of term compare the inside of a student with the inside of a teacher, position by
position (the caller has checked that both read the same tokens):

- hidden states (DistilBERT's cosine, TinyBERT's MSE): h_s of a student layer, projected to the
  teacher's width by a learned linear map P where the widths differ, against h_t of the mapped
  teacher layer;
- self-attention relations (MiniLMv2): for each of the query, key and value vectors, the
  relation distribution softmax(A A^T / sqrt(d)) over the positions of a sequence, with A split
  into R relation heads. Relations are [S, S] whatever the width, so they need no projection and
  tolerate different head counts (R is chosen to divide both widths).

Every function averages over valid positions only (`mask`: 1 for a real token) and returns a
per-sequence vector [B], so the caller can weight sequences (a teacher's per-row interpolation
weight) before the mean.
"""
from __future__ import annotations

import math
from typing import Callable, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

HIDDEN_LOSSES = ("cosine", "mse")
RELATIONS = ("query", "key", "value")


def uniform_layer_map(student_layers: int, teacher_layers: int) -> List[Tuple[int, int]]:
    """TinyBERT's uniform map: student layer m (1..M, the output of its m-th block) reads teacher
    layer m * N / M rounded half up, and the embeddings (layer 0) read the teacher's embeddings."""
    if student_layers < 1 or teacher_layers < 1:
        raise ValueError("both models need at least one layer")
    return [(0, 0)] + [(m, max(1, (2 * m * teacher_layers + student_layers) // (2 * student_layers)))
                       for m in range(1, student_layers + 1)]


def hidden_state_terms(student: Tensor, teacher: Tensor, kind: str) -> Tensor:
    """Per position [...]: cosine: 1 - cos(h_s, h_t); mse: mean_j (h_s[j] - h_t[j])^2 (the mean
    over features keeps the scale independent of the width). Both at the teacher's width."""
    if kind == "cosine":
        return 1.0 - torch.nn.functional.cosine_similarity(student, teacher.to(student.dtype), dim=-1, eps=1e-8)
    if kind == "mse":
        return (student - teacher.to(student.dtype)).pow(2).mean(dim=-1)
    raise ValueError(f"hidden-state loss must be one of {HIDDEN_LOSSES}, got {kind!r}")


def hidden_state_loss(student: Tensor, teacher: Tensor, mask: Tensor, kind: str,
                      project: Optional[Callable[[Tensor], Tensor]] = None, chunk: Optional[int] = None) -> Tensor:
    """[B] per sequence: the mean over its valid positions of hidden_state_terms(P h_s, h_t).

    student [B, S, H_s], teacher [B, S, H_t], mask [B, S]. With `chunk`, the positions are taken
    `chunk` rows of the flattened [B * S] at a time and each chunk's projection is recomputed in the
    backward pass (activation checkpointing), so no more than a chunk of [rows, H_t] extra
    activations is ever held; the result is the same."""
    batch, length = mask.shape
    flat_student = student.reshape(batch * length, student.shape[-1])
    flat_teacher = teacher.reshape(batch * length, teacher.shape[-1])
    weights = mask.reshape(-1).to(torch.float32 if student.dtype != torch.float64 else student.dtype)

    def chunk_sum(rows_student: Tensor, rows_teacher: Tensor, rows_weight: Tensor) -> Tensor:
        projected = project(rows_student) if project is not None else rows_student
        terms = hidden_state_terms(projected, rows_teacher, kind)
        return terms.to(rows_weight.dtype) * rows_weight

    if chunk is None or chunk >= batch * length:
        per_position = chunk_sum(flat_student, flat_teacher, weights)
    else:
        from torch.utils.checkpoint import checkpoint

        pieces = []
        for start in range(0, batch * length, chunk):
            rows = slice(start, start + chunk)
            if flat_student.requires_grad:
                pieces.append(checkpoint(chunk_sum, flat_student[rows], flat_teacher[rows], weights[rows],
                                         use_reentrant=False))
            else:
                pieces.append(chunk_sum(flat_student[rows], flat_teacher[rows], weights[rows]))
        per_position = torch.cat(pieces)
    per_sequence = per_position.reshape(batch, length).sum(dim=1)
    return per_sequence / mask.sum(dim=1).to(per_sequence.dtype).clamp(min=1)


def relation_log_probs(vectors: Tensor, heads: int, mask: Tensor, causal: bool = False) -> Tensor:
    """[B, R, S, S] log softmax over keys of A_r A_r^T / sqrt(d_r), A_r the r-th of R slices of
    the width of `vectors` [B, S, W] (d_r = W / R). Keys at padded positions (and, with `causal`,
    later positions) get no mass."""
    batch, length, width = vectors.shape
    if width % heads:
        raise ValueError(f"relation heads {heads} do not divide the width {width}")
    size = width // heads
    split = vectors.reshape(batch, length, heads, size).transpose(1, 2)  # [B, R, S, d]
    scores = torch.matmul(split, split.transpose(-1, -2)) / math.sqrt(size)
    allowed = mask.bool()[:, None, None, :].expand(batch, 1, length, length)
    if causal:
        allowed = allowed & torch.ones(length, length, dtype=torch.bool, device=mask.device).tril()
    # a query row with no allowed key (a padded query) keeps one: it is masked out of the mean anyway
    allowed = allowed | ~allowed.any(dim=-1, keepdim=True)
    scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.log_softmax(scores, dim=-1)


def relation_loss(student: Sequence[Tensor], teacher: Sequence[Tensor], mask: Tensor, heads: int,
                  causal: bool = False) -> Tensor:
    """[B] per sequence: the mean over relation kinds (e.g. query, key, value), relation heads and
    valid query positions of KL(R_t || R_s), R = relation_log_probs of each model's vectors of
    that kind ([B, S, W_s] and [B, S, W_t]; the widths may differ, R must divide both)."""
    if len(student) != len(teacher) or not student:
        raise ValueError("give the student's and the teacher's vectors for the same relation kinds")
    queries = mask.to(student[0].dtype if student[0].dtype == torch.float64 else torch.float32)
    total = None
    for student_vectors, teacher_vectors in zip(student, teacher):
        student_log = relation_log_probs(student_vectors, heads, mask, causal)
        teacher_log = relation_log_probs(teacher_vectors.to(student_vectors.dtype), heads, mask, causal)
        teacher_probs = teacher_log.exp()
        terms = torch.where(teacher_probs > 0, teacher_probs * (teacher_log - student_log),
                            torch.zeros_like(teacher_probs)).sum(dim=-1)  # [B, R, S]
        per_sequence = (terms.mean(dim=1).to(queries.dtype) * queries).sum(dim=1)
        total = per_sequence if total is None else total + per_sequence
    return total / (len(student) * queries.sum(dim=1).clamp(min=1))


def common_relation_heads(widths: Sequence[int], preferred: int) -> int:
    """The largest relation-head count <= `preferred` that divides every width (1 at worst)."""
    divisor = 0
    for width in widths:
        divisor = math.gcd(divisor, int(width))
    return max(d for d in range(1, max(min(preferred, divisor), 1) + 1) if divisor % d == 0)


def weighted_mean(per_sequence: Tensor, weights: Tensor, rows: Tensor) -> Tensor:
    """sum_b w_b l_b / |rows|, over the sequences in `rows` (bool [B]); 0 (with the graph) when none.
    The weights are a teacher's interpolation weights per sequence, so a zero weight turns the
    term off exactly."""
    weighted = torch.where(rows, per_sequence * weights.to(per_sequence.dtype), torch.zeros_like(per_sequence))
    return weighted.sum() / rows.sum().clamp(min=1).to(per_sequence.dtype)
