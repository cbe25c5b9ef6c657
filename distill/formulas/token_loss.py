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
registered divergence (formulas/divergences.py). The normalizer is the caller's: the number of valid tokens in
the whole optimizer step over gradient accumulation and data-parallel ranks (not per micro-batch),
so that every token weighs the same however the tokens fall into micro-batches.

The gradient with respect to a chunk's logits is written in closed form for CE + forward KL and
reverse KL (`closed_form_token_loss`); other divergences are differentiated by autograd over the
chunk. A target is dense log-probabilities, or, for the forward KL, a `ProbabilityTarget` (the live
linear mixture, built a teacher at a time) or a `SparseTarget` (the cached top-k mixture).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from distill.formulas.divergences import IGNORE_INDEX, Divergence, kl_divergence, row_dot

# (start, end) -> (target log-probabilities [end - start, V] (read, never written), or a
#                  ProbabilityTarget (handed over) or SparseTarget, or None; KD mask or None)
TargetFn = Callable[[int, int], Tuple[Optional[Tensor], Optional[Tensor]]]


class Workspace:
    """Reusable [rows, V] buffers, by name, for the fused loss's hot loop and the targets it reads.

    A fresh [512, 16384] float32 tensor cost 14 ms of page faults here, twice the exp over it: glibc
    maps every block of 32 MiB or more anew and unmaps it when freed, so on a CPU each chunk's
    temporaries paid that several times a step. One workspace kept over the steps of a run pays it
    once. (CUDA's caching allocator already recycles blocks; there a workspace only saves bookkeeping.)
    A buffer handed out is valid until the next `get` of the same name."""

    def __init__(self):
        self._buffers = {}

    def get(self, name: str, rows: int, cols: int, dtype: torch.dtype, device: torch.device) -> Tensor:
        buffer = self._buffers.get(name)
        if (buffer is None or buffer.shape[0] < rows or buffer.shape[1] != cols or buffer.dtype != dtype
                or buffer.device != torch.device(device)):
            buffer = torch.empty((rows, cols), dtype=dtype, device=device)
            self._buffers[name] = buffer
        return buffer[:rows]

    def like(self, name: str, tensor: Tensor) -> Tensor:
        """A buffer of `tensor`'s [rows, V] shape, dtype and device."""
        return self.get(name, tensor.shape[0], tensor.shape[1], tensor.dtype, tensor.device)


@dataclass
class ProbabilityTarget:
    """A dense target handed over as probabilities [c, V] (finite, rows summing to one), for the
    forward KL only. The loss owns it once returned and may write into it. `neg_entropy` [c] is
    sum_v p log p per row when its builder knew it without a log pass (one teacher: from the shifted
    logits); otherwise the loss takes it from log p."""
    probs: Tensor
    neg_entropy: Optional[Tensor] = None

    def dense_log_probs(self, vocab_size: int) -> Tensor:
        return self.probs.log()

    def entropy_terms(self, workspace: "Workspace", keep: Optional[Tensor] = None) -> Tensor:
        if self.neg_entropy is not None:
            return self.neg_entropy
        return entropy_terms(self.probs, torch.log(self.probs, out=workspace.like("log_target", self.probs)), keep)


def entropy_terms(probs: Tensor, log_probs: Tensor, keep: Optional[Tensor] = None) -> Tensor:
    """[c] sum_v p log p (0 log 0 = 0) from probabilities and their logs (-inf where p = 0). Only
    the rows that came out non-finite (a p = 0 entry: 0 * -inf) are summed again entrywise; rows
    outside `keep` are left as they are (the caller masks them)."""
    terms = row_dot(probs, log_probs)
    broken = ~torch.isfinite(terms)
    if keep is not None:
        broken &= keep
    if broken.any():
        rows_p, rows_lp = probs[broken], log_probs[broken]
        terms[broken] = torch.where(rows_p > 0, rows_p * rows_lp, torch.zeros_like(rows_p)).sum(-1)
    return terms


@dataclass
class SparseTarget:
    """A target distribution stored sparsely, row by row (one row per token):

        p[v] = base + sum_j deltas[j]  over the j with ids[j] == v      (ids may repeat)

    which is what a linear mixture of top-k-plus-uniform-tail distributions is (caches/lm_stores.py). The
    fused loss takes the forward KL against it without ever building [tokens, V]."""
    ids: Tensor  # [c, M] long
    deltas: Tensor  # [c, M]
    base: Tensor  # [c]

    def dense_log_probs(self, vocab_size: int) -> Tensor:
        """[c, V] log p, for the paths that need the dense target (other divergences, references)."""
        probs = self.base.unsqueeze(-1).expand(self.base.shape[0], vocab_size).clone()
        probs.scatter_add_(-1, self.ids, self.deltas.to(probs.dtype))
        return probs.log()

    def entropy_terms(self, vocab_size: int) -> Tensor:
        """[c] sum_v p[v] log p[v] (0 log 0 = 0), from the sparse form: duplicate ids are summed
        first (sort, then add up each run of equal ids), the V - |unique ids| other tokens hold base."""
        ids, order = self.ids.sort(dim=-1)
        deltas = self.deltas.gather(-1, order)
        first = torch.ones_like(ids, dtype=torch.bool)
        first[:, 1:] = ids[:, 1:] != ids[:, :-1]
        run = first.long().cumsum(dim=-1) - 1  # position of each id's run among the unique ids
        summed = torch.zeros_like(deltas).scatter_add_(-1, run, deltas)
        unique = first.sum(dim=-1)
        in_use = torch.arange(ids.shape[1], device=ids.device).unsqueeze(0) < unique.unsqueeze(-1)
        probs = torch.where(in_use, self.base.unsqueeze(-1) + summed, torch.zeros_like(summed))
        return torch.special.xlogy(probs, probs).sum(dim=-1) + (vocab_size - unique) * torch.special.xlogy(self.base, self.base)


@dataclass
class TokenLossTerms:
    total: Tensor  # what backward() sees
    kd: Tensor  # T^2 * summed divergence / normalizer, before kd_alpha (detached in the fused path)
    ce: Tensor  # summed label-smoothed CE / normalizer, before (1 - kd_alpha)


def token_loss_sums(student_logits: Tensor, target_log_probs: Optional[Tensor], labels: Tensor,
                    temperature: float, label_smoothing: float = 0.0, divergence: Divergence = kl_divergence,
                    kd_mask: Optional[Tensor] = None, row_kd: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """(sum_t T^2 D(target_t || softmax(z_t / T)), sum_t CE_eps(z_t, y_t)) over tokens with a label;
    `row_kd` [N], when given, receives each token's T^2 D (0 where the KD term does not read it).

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
    per_token_kd = temperature ** 2 * torch.where(keep, per_token_kd, torch.zeros_like(per_token_kd))
    if row_kd is not None:
        row_kd.copy_(per_token_kd.detach())
    return per_token_kd.sum(), ce


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
                                normalizer: float, row_kd: Optional[Tensor] = None,
                                workspace: Optional[Workspace] = None) -> TokenLossTerms:
    """The loss over materialised student logits [N, V] (when the output layer cannot be used
    directly, as under ZeRO-3) with the teachers' target built one chunk at a time. Each chunk's
    gradient is written during the forward, as the fused loss does (closed form where the divergence
    has one, else autograd over that chunk alone), so what is kept for backward is one [N, V]
    gradient, not every chunk's softmaxes and targets (measured: 9.8 [N, V] float32 at peak before,
    docs/plan.md). `row_kd` as in token_loss_sums."""
    if target_fn is None and kd_alpha != 0:
        raise ValueError("kd_alpha > 0 needs a teacher target (target_fn)")
    total, kd, ce = _ChunkedLogitsDistillation.apply(student_logits, labels, target_fn, kd_alpha, temperature,
                                                     label_smoothing, divergence, chunk_size, float(normalizer),
                                                     Workspace() if workspace is None else workspace, row_kd)
    return TokenLossTerms(total=total, kd=kd, ce=ce)


def tokens_per_chunk(chunk_tokens: int, teachers: int) -> int:
    """Tokens per chunk for K teachers: the [K, chunk, V] teacher slice keeps the size one teacher's
    [chunk_tokens, V] has, so the loss's peak memory does not grow with the number of teachers."""
    return max(1, chunk_tokens // max(1, teachers))


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def _default_normalizer(labels: Tensor) -> float:
    return float(max(int((labels != IGNORE_INDEX).sum()), 1))


class ClosedFormKD:
    """One (divergence x target kind) case of the KD term in `closed_form_token_loss`, registered in
    CLOSED_FORMS. The loss calls it in three phases, so that each case reads the [c, V] buffers
    while they still hold what it needs: `read_logits` (raw z, before anything is overwritten),
    `read_shifted` (z - max z, before it becomes exp in place) and `finish` (the softmax at T known:
    each row's divergence, the multiple of e_T the gradient gets, and what else it adds)."""

    def __init__(self, target, keep: Tensor, dropped: Tensor, kd_scale: Tensor, temperature: float,
                 workspace: "Workspace"):
        self.target, self.keep, self.dropped, self.kd_scale = target, keep, dropped, kd_scale
        self.temperature, self.workspace = temperature, workspace

    def read_logits(self, logits: Tensor) -> None:
        """What reads the raw student logits z [c, V]."""

    def read_shifted(self, shifted: Tensor) -> None:
        """What reads z - max z [c, V] (nothing by default)."""

    def finish(self, exps_t: Tensor, sum_t: Tensor, lse_t: Tensor, vocab: int):
        """(rows [c]: each row's divergence at T, q_scale [c, 1], kd_part(grad) or None): d/dz gets
        q_scale * e_T (e_T = exp(u - max u), the unnormalised q), then kd_part adds the rest."""
        raise NotImplementedError


CLOSED_FORMS: Dict[Tuple[str, str], type] = {}


def register_closed_form(divergence: str, kind: str):
    def decorate(cls):
        if (divergence, kind) in CLOSED_FORMS:
            raise ValueError(f"closed form ({divergence}, {kind}) is registered twice")
        CLOSED_FORMS[(divergence, kind)] = cls
        return cls

    return decorate


def target_kind(target) -> str:
    """'sparse', 'probabilities' or 'log_probs' (a dense [c, V] tensor of log-probabilities)."""
    if isinstance(target, SparseTarget):
        return "sparse"
    return "probabilities" if isinstance(target, ProbabilityTarget) else "log_probs"


@register_closed_form("forward_kl", "sparse")
class SparseForwardKL(ClosedFormKD):
    """A few ids per row plus a flat tail (caches, served teachers): the forward KL only."""

    def read_logits(self, logits):
        keep, target, temperature = self.keep, self.target, self.temperature
        self.base = torch.where(keep, target.base.to(logits.dtype), torch.zeros_like(logits[:, 0]))
        self.deltas = torch.where(keep.unsqueeze(-1), target.deltas.to(logits.dtype),
                                  torch.zeros_like(target.deltas, dtype=logits.dtype))
        self.u_at_ids = logits.gather(-1, target.ids) / temperature  # [c, M]
        self.u_sum = logits.sum(dim=-1) / temperature

    def finish(self, exps_t, sum_t, lse_t, vocab):
        base, deltas, ids, kd_scale = self.base, self.deltas, self.target.ids, self.kd_scale
        log_q_at = self.u_at_ids - lse_t  # [c, M]
        log_q_all = self.u_sum - vocab * lse_t.squeeze(-1)
        cross = base * log_q_all + (deltas * log_q_at).sum(dim=-1)
        rows = SparseTarget(ids, deltas, base).entropy_terms(vocab) - cross

        def kd_part(grad):
            grad.sub_(kd_scale * base.unsqueeze(-1))
            grad.scatter_add_(-1, ids, -kd_scale * deltas)

        return rows, kd_scale / sum_t, kd_part


class DenseForwardKL(ClosedFormKD):
    """d/dz = s_kd * (q - p) with the target's probabilities p [c, V] (rows not kept zeroed)."""

    def read_logits(self, logits):
        self.probs, self.entropy = self.target_probabilities(logits)
        self.u_dot_p = row_dot(self.probs, logits) / self.temperature

    def target_probabilities(self, logits: Tensor) -> Tuple[Tensor, Tensor]:
        raise NotImplementedError

    def finish(self, exps_t, sum_t, lse_t, vocab):
        probs, kd_scale = self.probs, self.kd_scale
        rows = self.entropy - (self.u_dot_p - lse_t.squeeze(-1) * probs.sum(dim=-1))

        def kd_part(grad):
            grad.addcmul_(probs, kd_scale, value=-1.0)

        return rows, kd_scale / sum_t, kd_part


@register_closed_form("forward_kl", "probabilities")
class ProbabilityForwardKL(DenseForwardKL):
    def target_probabilities(self, logits):
        probs = self.target.probs.to(logits.dtype)
        if self.dropped.numel():
            probs.index_fill_(0, self.dropped, 0.0)  # the loss owns these
        return probs, self.target.entropy_terms(self.workspace, self.keep)


@register_closed_form("forward_kl", "log_probs")
class LogProbForwardKL(DenseForwardKL):
    def target_probabilities(self, logits):
        log_probs = self.target.to(logits.dtype)
        probs = torch.exp(log_probs, out=self.workspace.like("target", logits))
        if self.dropped.numel():
            probs.index_fill_(0, self.dropped, 0.0)
        return probs, entropy_terms(probs, log_probs, self.keep)


@register_closed_form("reverse_kl", "log_probs")
class ReverseKL(ClosedFormKD):
    """d/dz = s_kd * q * (log q - log p - KL(q || p)), from logits shifted by their max."""

    def read_shifted(self, shifted):
        # r = log p - u' with u' = (z - max z) / T <= 0: shifted first, so float32 keeps the digits
        # that matter where q is large (unshifted, log p - z / T loses |z| * eps of them)
        self.gap = torch.sub(self.target.to(shifted.dtype), shifted, alpha=1.0 / self.temperature,
                             out=self.workspace.like("target", shifted))
        if self.dropped.numel():
            self.gap.index_fill_(0, self.dropped, 0.0)

    def finish(self, exps_t, sum_t, lse_t, vocab):
        gap, keep = self.gap, self.keep
        # with u' = u - max u and S = sum exp(u'): log q = u' - log S, and
        # KL(q || p) = sum q (u' - log S - log p) = -q . r - log S
        log_sum_t = sum_t.log()
        rows = -row_dot(exps_t, gap) / sum_t.squeeze(-1) - log_sum_t.squeeze(-1)
        # d/dz = s_kd * q * (log q - log p - KL) = -s_kd * q * (r + log S + KL)
        gap.add_(log_sum_t + torch.where(keep, rows, torch.zeros_like(rows)).unsqueeze(-1))
        gap.mul_(exps_t).mul_(-self.kd_scale / sum_t)

        def kd_part(grad):
            grad.add_(gap)

        return rows, torch.zeros_like(self.kd_scale), kd_part


def closed_form_token_loss(logits: Tensor, target, labels: Tensor, kd_mask: Optional[Tensor], *, kd_alpha: float,
                           temperature: float, label_smoothing: float, divergence: str, normalizer: float,
                           workspace: Optional[Workspace] = None, row_kd: Optional[Tensor] = None
                           ) -> Tuple[Tensor, Tensor, Tensor]:
    """(T^2 * summed divergence, summed CE_eps, d loss / d logits) for one chunk of student logits
    [c, V], the gradient written in closed form rather than by autograd, with u = z / T,
    q = softmax(u), p the target, and s_kd = kd_alpha * T / normalizer, s_ce = (1 - kd_alpha) / normalizer:

        CE_eps:      d/dz = s_ce * (softmax(z) - eps / V - (1 - eps) onehot(y))
        KD:          the registered (divergence x target kind) case (CLOSED_FORMS above)

    on the rows with a label (and with kd_mask, for the KD term); all other rows get exactly zero.
    `target` is dense log-probabilities [c, V], a ProbabilityTarget or SparseTarget (forward KL
    only), or None. This is the fused loss's hot loop: `logits` is CONSUMED (what reads z comes
    first, then z becomes exp(z - max z) in place), the other [c, V] temporaries live in `workspace`
    buffers, and the returned gradient is one of them. `row_kd` [c], when given, receives each
    row's T^2 D. Tested against the autograd reference in float64 (tests/formulas/test_chunked_loss.py)."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    workspace = Workspace() if workspace is None else workspace
    vocab = logits.shape[-1]
    valid = labels != IGNORE_INDEX
    safe_labels = torch.where(valid, labels, torch.zeros_like(labels)).unsqueeze(-1)
    top = logits.amax(dim=-1, keepdim=True)
    label_logits = logits.gather(-1, safe_labels)
    mean_logits = logits.mean(dim=-1, keepdim=True) if label_smoothing else None
    ce_scale = valid.to(logits.dtype).unsqueeze(-1) * ((1.0 - kd_alpha) / normalizer)
    distill = target is not None and kd_alpha != 0
    case = None
    if distill:  # first what reads the raw logits z
        kind = target_kind(target)
        if (divergence, kind) not in CLOSED_FORMS:
            if kind == "sparse":
                raise ValueError("a sparse target supports the forward KL only")
            raise ValueError(f"no closed form for divergence {divergence!r} with a {kind} target")
        keep = valid if kd_mask is None else valid & kd_mask
        case = CLOSED_FORMS[(divergence, kind)](target, keep, (~keep).nonzero().squeeze(-1),
                                                keep.to(logits.dtype).unsqueeze(-1) * (kd_alpha * temperature / normalizer),
                                                temperature, workspace)
        case.read_logits(logits)
    # then the softmaxes: e = exp(z - max z) in place of z, e_T = exp((z - max z) / T) beside it
    shared = not distill or temperature == 1.0
    exps = logits.sub_(top)
    if case is not None:
        case.read_shifted(exps)
    exps_t = None if shared else torch.mul(exps, 1.0 / temperature, out=workspace.like("tempered", logits)).exp_()
    exps.exp_()
    total = exps.sum(dim=-1, keepdim=True)
    lse = top + total.log()
    if shared:
        exps_t, sum_t, lse_t = exps, total, lse
    else:
        sum_t = exps_t.sum(dim=-1, keepdim=True)
        lse_t = top / temperature + sum_t.log()
    ce_rows = (1.0 - label_smoothing) * (lse - label_logits)
    if label_smoothing:
        ce_rows = ce_rows + label_smoothing * (lse - mean_logits)
    ce = torch.where(valid, ce_rows.squeeze(-1), torch.zeros_like(lse.squeeze(-1))).sum()
    kd = torch.zeros_like(ce)
    kd_part = None  # what the KD term adds to the gradient besides a multiple of q
    q_scale = torch.zeros_like(ce_scale)  # d/dz gets q_scale * e_T (e_T = exp(u - max u), unnormalised q)
    if case is not None:
        rows, q_scale, kd_part = case.finish(exps_t, sum_t, lse_t, vocab)
        per_row = temperature ** 2 * torch.where(case.keep, rows, torch.zeros_like(rows))
        if row_kd is not None:
            row_kd.copy_(per_row)
        kd = per_row.sum()
    if shared:
        grad = exps.mul_(q_scale + ce_scale / total)
    else:
        grad = exps_t.mul_(q_scale).addcmul_(exps, ce_scale / total)
    if label_smoothing:
        grad.sub_(ce_scale * (label_smoothing / vocab))
    grad.scatter_add_(-1, safe_labels, -(1.0 - label_smoothing) * ce_scale)
    if kd_part is not None:
        kd_part(grad)
    return kd, ce, grad


def _chunk_terms(logits: Tensor, target, labels: Tensor, kd_mask: Optional[Tensor], kd_alpha: float,
                 temperature: float, label_smoothing: float, divergence, normalizer: float, workspace: Workspace,
                 row_kd: Optional[Tensor]) -> Tuple[Tensor, Tensor, Tensor]:
    """(summed KD, summed CE, d loss / d logits) of one chunk of student logits [c, V] in the
    accumulation dtype, which it CONSUMES: the closed form where the divergence has one (or no KD
    term is taken), else autograd over this chunk alone (nothing kept afterwards)."""
    closed_form = divergence.closed_form
    if isinstance(target, (SparseTarget, ProbabilityTarget)) and closed_form != "forward_kl":
        target = target.dense_log_probs(logits.shape[-1])
    if target is None or kd_alpha == 0 or closed_form is not None:
        with torch.no_grad():
            return closed_form_token_loss(logits, target, labels, kd_mask, kd_alpha=kd_alpha, temperature=temperature,
                                          label_smoothing=label_smoothing, divergence=closed_form or "forward_kl",
                                          normalizer=normalizer, workspace=workspace, row_kd=row_kd)
    with torch.enable_grad():
        logits = logits.detach().requires_grad_(True)
        kd, ce = token_loss_sums(logits, target, labels, temperature, label_smoothing, divergence, kd_mask, row_kd)
        (grad,) = torch.autograd.grad((kd_alpha * kd + (1.0 - kd_alpha) * ce) / normalizer, [logits])
    return kd.detach(), ce.detach(), grad


def _labelled_chunks(labels: Tensor, chunk_size: int, target_fn):
    """(start, end, the chunk's labels, its target, its KD mask) of each chunk with a label to learn
    (a chunk without one adds zero loss and zero gradient: skipped, its target never built)."""
    for start in range(0, labels.shape[0], chunk_size):
        end = min(start + chunk_size, labels.shape[0])
        chunk_labels = labels[start:end]
        if not bool((chunk_labels != IGNORE_INDEX).any()):
            continue
        target, kd_mask = target_fn(start, end) if target_fn is not None else (None, None)
        yield start, end, chunk_labels, target, kd_mask


def _totals(ctx, kd_total: Tensor, ce_total: Tensor, kd_alpha: float, normalizer: float):
    """(loss, KD mean, CE mean) from the summed terms; the means are figures, not differentiated."""
    total = (kd_alpha * kd_total + (1.0 - kd_alpha) * ce_total) / normalizer
    kd_mean, ce_mean = kd_total / normalizer, ce_total / normalizer
    ctx.mark_non_differentiable(kd_mean, ce_mean)
    return total, kd_mean, ce_mean


class _ChunkedLogitsDistillation(torch.autograd.Function):
    """The unfused loss over whole student logits [N, V]: each chunk's gradient written in forward."""

    @staticmethod
    def forward(ctx, logits, labels, target_fn, kd_alpha, temperature, label_smoothing, divergence, chunk_size,
                normalizer, workspace, row_kd):
        accumulate = _accumulation_dtype(logits.dtype)
        grad = torch.zeros_like(logits)
        kd_total = torch.zeros((), dtype=accumulate, device=logits.device)
        ce_total = torch.zeros_like(kd_total)
        for start, end, chunk_labels, target, kd_mask in _labelled_chunks(labels, chunk_size, target_fn):
            with torch.no_grad():  # a copy the closed form may consume
                chunk = workspace.get("logits", end - start, logits.shape[-1], accumulate, logits.device)
                chunk.copy_(logits[start:end])
            kd, ce, chunk_grad = _chunk_terms(chunk, target, chunk_labels, kd_mask, kd_alpha, temperature,
                                              label_smoothing, divergence, normalizer, workspace,
                                              None if row_kd is None else row_kd[start:end])
            grad[start:end] = chunk_grad.to(logits.dtype)
            del chunk_grad, target
            kd_total += kd
            ce_total += ce
        ctx.save_for_backward(grad)
        return _totals(ctx, kd_total, ce_total, kd_alpha, normalizer)

    @staticmethod
    def backward(ctx, grad_total, _grad_kd, _grad_ce):
        (grad,) = ctx.saved_tensors
        return (grad.mul_(grad_total.to(grad.dtype)), None, None, None, None, None, None, None, None, None, None)


class _FusedTokenDistillation(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, target_fn, kd_alpha, temperature, label_smoothing, divergence,
                chunk_size, normalizer, workspace, row_kd):
        accumulate = _accumulation_dtype(weight.dtype)
        grad_hidden = torch.zeros_like(hidden)
        grad_weight = torch.zeros_like(weight, dtype=accumulate)
        grad_bias = torch.zeros_like(bias, dtype=accumulate) if bias is not None else None
        kd_total = torch.zeros((), dtype=accumulate, device=hidden.device)
        ce_total = torch.zeros_like(kd_total)
        for start, end, chunk_labels, target, kd_mask in _labelled_chunks(labels, chunk_size, target_fn):
            h = hidden[start:end]
            with torch.no_grad():
                if weight.dtype == accumulate and bias is None:
                    logits = torch.matmul(h.to(accumulate), weight.t(),
                                          out=workspace.get("logits", end - start, weight.shape[0], accumulate,
                                                            weight.device))
                else:
                    logits = F.linear(h, weight, bias).to(accumulate)
            kd, ce, grad_logits = _chunk_terms(logits, target, chunk_labels, kd_mask, kd_alpha, temperature,
                                               label_smoothing, divergence, normalizer, workspace,
                                               None if row_kd is None else row_kd[start:end])
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
        return _totals(ctx, kd_total, ce_total, kd_alpha, normalizer)

    @staticmethod
    def backward(ctx, grad_total, _grad_kd, _grad_ce):
        grad_hidden, grad_weight, grad_bias = ctx.saved_tensors
        return (grad_hidden * grad_total, grad_weight * grad_total,
                grad_bias * grad_total if ctx.has_bias else None,
                None, None, None, None, None, None, None, None, None, None)


def fused_token_distillation(hidden: Tensor, weight: Tensor, labels: Tensor, target_fn: Optional[TargetFn] = None, *,
                             kd_alpha: float, temperature: float, label_smoothing: float = 0.0,
                             divergence: Divergence = kl_divergence, bias: Optional[Tensor] = None,
                             chunk_size: int = 1024, normalizer: Optional[float] = None,
                             workspace: Optional[Workspace] = None, row_kd: Optional[Tensor] = None) -> TokenLossTerms:
    """The loss above from the student's last hidden states `hidden` [N, H] and output layer
    `weight` [V, H] (`bias` [V]), `labels` [N] (next-token ids, -100 where nothing is learned).

    `target_fn(start, end)` returns the teachers' interpolated target for tokens start..end-1 (at
    the distillation temperature, no gradient) and an optional KD mask; None means kd_alpha = 0.
    `workspace` holds the chunks' [chunk, V] temporaries (a fresh one per call if None; a trainer
    keeps one for the whole run). `row_kd` [N], when given, receives each token's T^2 D (0 where the
    KD term does not read it): per-route figures."""
    if target_fn is None and kd_alpha != 0:
        raise ValueError("kd_alpha > 0 needs a teacher target (target_fn)")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    normalizer = _default_normalizer(labels) if normalizer is None else float(normalizer)
    total, kd, ce = _FusedTokenDistillation.apply(hidden, weight, bias, labels, target_fn, kd_alpha, temperature,
                                                  label_smoothing, divergence, chunk_size, normalizer,
                                                  Workspace() if workspace is None else workspace, row_kd)
    return TokenLossTerms(total=total, kd=kd, ce=ce)
