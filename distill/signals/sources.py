"""Where teacher distributions come from: one interface, several sources.

A *source* turns a batch into a `BatchSignal`: the teachers' outputs over the batch's rows (one
row per example for classification, per token for a causal LM, flattened in label order). Every
signal answers `logits(start, end)` -> [K, end - start, V] float32 (log-probabilities are valid
logits: softmax(log p / T) is p softened, exactly as for raw logits). Some also declare fast
paths as capabilities, never by name:

- `write_logits(k, start, end, out, scale)`: teacher k's logits written straight into a buffer
  (live LM teachers: hidden states times the output layer, a chunk at a time), so a linear mixture
  can be streamed one teacher at a time;
- `top_k(start, end)`: the cached top-k with its tail mass, so a linear mixture can stay sparse.

`Targets` builds the interpolated target of rows start..end-1 from a signal (with the strategy's
own fast paths where both sides declare them) and checks for NaN/inf. The trainer and the tasks
never know which source they have.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch
from torch import Tensor, nn
from distill.models.teachers import finite_rows
from distill.signals.base import Capability, Signal, Source
from distill.signals.stored import StoredOutputs

from distill.formulas.token_loss import ProbabilityTarget, SparseTarget, Workspace, entropy_terms
from distill.errors import ConfigError
from distill.formulas.mixtures import add_softened_, normalize_weights, softmax_with_entropy_



# ------------------------------------------------------------------------------------ signals
class DenseSignal(Signal):
    """Logits already in memory: [K, rows, V] (classification teachers' outputs)."""

    def __init__(self, logits: Tensor, records: Optional[Dict[int, Dict]] = None):
        super().__init__(logits.shape[1], records)  # records: hidden states / attention vectors per teacher
        self.all_logits = logits

    def logits(self, start: int, end: int) -> Tensor:
        return self.all_logits[:, start:end]


def body_and_head(model: nn.Module) -> Tuple[nn.Module, nn.Module]:
    """The transformer body (returns the last, final-normed hidden states) and the output layer."""
    body = getattr(model, model.base_model_prefix, None)
    head = model.get_output_embeddings()
    if body is None or not isinstance(head, nn.Linear):
        raise ConfigError(f"{type(model).__name__}: cannot split it into a body and a linear output layer")
    return body, head


def write_head(head: nn.Module, rows: Tensor, out: Tensor, scale: float = 1.0) -> None:
    """out (float32) = scale * head(rows), written straight into `out` when no cast or bias is
    needed (the scale then goes on the [c, H] rows, not on the [c, V] logits)."""
    if head.weight.dtype == torch.float32 and head.bias is None and rows.dtype == torch.float32:
        torch.matmul(rows if scale == 1.0 else rows * scale, head.weight.t(), out=out)
    else:
        out.copy_(head(rows.to(head.weight.dtype)))
        if scale != 1.0:
            out.mul_(scale)


class HiddenStateSignal(Signal):
    """Live LM teachers: each teacher's last hidden states [rows, H_k] and its output layer; logits
    exist only a chunk at a time."""

    capabilities = frozenset({Capability.WRITE_LOGITS})

    def __init__(self, hidden_states: List[Tensor], heads: List[nn.Module], records: Optional[Dict[int, Dict]] = None):
        super().__init__(hidden_states[0].shape[0], records)  # records: inner layers' records per teacher
        self.hidden_states, self.heads = hidden_states, heads
        self.vocab_size = heads[0].weight.shape[0]

    def write_logits(self, k: int, start: int, end: int, out: Tensor, scale: float = 1.0) -> None:
        write_head(self.heads[k], self.hidden_states[k][start:end], out, scale)

    def logits(self, start: int, end: int) -> Tensor:
        with torch.no_grad():
            out = self.hidden_states[0].new_empty((len(self.heads), end - start, self.vocab_size), dtype=torch.float32)
            for k in range(len(self.heads)):
                self.write_logits(k, start, end, out[k])
            return out


class TopKSignal(Signal):
    """Cached teachers: per row and teacher the top-k log-probabilities (at T = 1), their ids and the
    log of the mass outside them (caches/lm_stores.py). Dense rebuild: the tail mass spread evenly over the
    other V - k tokens (exact when k = V)."""

    capabilities = frozenset({Capability.TOP_K})

    def __init__(self, ids: Tensor, log_probs: Tensor, tail: Tensor, vocab_size: int):
        super().__init__(ids.shape[0])
        self.ids, self.log_probs, self.tail = ids, log_probs, tail  # [rows, K, k], [rows, K, k], [rows, K]
        self.vocab_size = vocab_size

    def top_k(self, start: int, end: int) -> Tuple[Tensor, Tensor, Tensor]:
        return self.ids[start:end], self.log_probs[start:end], self.tail[start:end]

    def logits(self, start: int, end: int) -> Tensor:
        from distill.formulas.mixtures import topk_target_log_probs

        ids, log_probs, tail = self.top_k(start, end)
        return topk_target_log_probs(ids.transpose(0, 1), log_probs.transpose(0, 1), self.vocab_size,
                                     tail.transpose(0, 1))


# ------------------------------------------------------------------------------------ sources
class ClassifierTeachers(Source):
    """Classification teachers: logits [K, B, C] in the student's label order. A live teacher runs
    here (recording its layers for loss.intermediate when the ensemble's `inner_requests` ask); a
    teacher whose outputs are stored (`stored[k]`: a black-box file or the cache, signals/stored.py)
    is read by the batch's key. The one non-finite policy (models/teachers.finite_rows) checks them all."""

    def __init__(self, ensemble, stored: Optional[Dict[int, StoredOutputs]] = None):
        self.ensemble, self.stored = ensemble, stored or {}

    def signal(self, batch: Dict, device: torch.device) -> DenseSignal:
        return DenseSignal(*self._run(batch, device, record=True))

    def logits(self, batch: Dict, device: torch.device) -> Tensor:
        return self._run(batch, device, record=False)[0]

    def _run(self, batch: Dict, device: torch.device, record: bool) -> Tuple[Tensor, Dict[int, Dict]]:
        from distill.data.text import model_inputs
        from distill.models.layer_hooks import Capture, detached_copy

        ensemble = self.ensemble
        context = torch.inference_mode if ensemble.use_inference_mode else torch.no_grad
        outputs, records = [], {}
        with context():
            for k, (plan, model) in enumerate(zip(ensemble.plans, ensemble.models)):
                if k in self.stored:
                    outputs.append(self.stored[k].logits_of(batch).to(device))  # in the data's label order
                    continue
                inputs = {name: v.to(device) for name, v in model_inputs(batch, plan.input_prefix).items()}
                if record and k in ensemble.inner_requests:
                    request = ensemble.inner_requests[k]
                    with Capture(model, request, plan.key) as capture:
                        result = model(**inputs, output_hidden_states=bool(request.hidden))
                        records[k] = capture.collect(result)
                else:
                    result = model(**inputs)
                logits = result.logits.float()
                outputs.append(logits if plan.label_order is None else logits[:, plan.label_order])
        stacked = torch.stack(outputs)
        # rows are data rows here: name them by their index in the data (kept rows are the caller's to mask)
        finite_rows(stacked, None, ensemble.on_nonfinite, [f"{p.name} ({p.key})" for p in ensemble.plans],
                    lambda bad: f"on data rows {batch['index'][bad.cpu()].tolist()[:8]}")
        # clone: leave inference mode with normal tensors
        return stacked.clone(), {k: detached_copy(record) for k, record in records.items()}


class LiveLanguageModels(Source):
    """Live causal-LM teachers: their bodies run once per batch (inference mode, or no_grad where
    ZeRO-3 gathers parameters in place); their output layers are applied per chunk by `Targets`.
    With a trimmed student vocabulary (vocabulary.TeacherVocabulary) the teachers read the student's
    ids mapped back to theirs and their output layers keep the kept tokens' rows only: their
    distributions are renormalised over the kept tokens."""

    capabilities = frozenset({Capability.WRITE_LOGITS})

    def __init__(self, ensemble, vocabulary=None):
        self.ensemble = ensemble
        self.vocabulary = vocabulary
        self.heads = [whole_layer(body_and_head(model)[1]) for model in ensemble.models]
        if vocabulary is not None:
            self.heads = [vocabulary.head(head) for head in self.heads]

    def signal(self, batch: Dict, device: torch.device) -> HiddenStateSignal:
        input_ids = batch["input_ids"].to(device)
        if self.vocabulary is not None:
            input_ids = self.vocabulary.teacher_ids(input_ids)
        inputs = {"input_ids": input_ids, "attention_mask": batch["attention_mask"].to(device)}
        records = {}
        return HiddenStateSignal(teacher_hidden_states(self.ensemble, inputs, records), self.heads, records)


def whole_layer(layer: nn.Linear) -> nn.Linear:
    """The layer itself, or, when ZeRO-3 partitions it (a teacher placed with teachers.placement=zero3),
    a frozen local copy gathered once: its logits are taken chunk by chunk inside the loss, where
    ranks would not gather in step. Every rank calls this at the same point (a collective)."""
    if not hasattr(layer.weight, "ds_id"):
        return layer
    import deepspeed

    parameters = [layer.weight] + ([layer.bias] if layer.bias is not None else [])
    with deepspeed.zero.GatheredParameters(parameters):
        copy = nn.Linear(layer.weight.shape[1], layer.weight.shape[0], bias=layer.bias is not None,
                         device=layer.weight.device, dtype=layer.weight.dtype)
        with torch.no_grad():
            copy.weight.copy_(layer.weight)
            if layer.bias is not None:
                copy.bias.copy_(layer.bias)
    return copy.requires_grad_(False)


def teacher_hidden_states(ensemble, inputs, records: Optional[Dict[int, Dict]] = None) -> List[Tensor]:
    """Each teacher's last hidden states, flattened to [B * S, H_k] (the token order of the labels);
    `inputs` is one dict for all teachers or a list with one per teacher (teachers with their own
    tokenizers). Teachers named in ensemble.inner_requests also fill `records` (layer_distillation.Capture)."""
    from distill.models.layer_hooks import Capture, detached_copy

    context = torch.inference_mode if ensemble.use_inference_mode else torch.no_grad
    states, requests = [], ensemble.inner_requests
    per_teacher = inputs if isinstance(inputs, list) else [inputs] * len(ensemble.models)
    with context():
        for k, (model, inputs) in enumerate(zip(ensemble.models, per_teacher)):
            body, _ = body_and_head(model)
            if k in requests and records is not None:
                with Capture(body, requests[k], ensemble.plans[k].key) as capture:
                    outputs = body(**inputs, output_hidden_states=bool(requests[k].hidden))
                    records[k] = capture.collect(outputs)
            else:
                outputs = body(**inputs)
            hidden = outputs.last_hidden_state
            states.append(hidden.reshape(-1, hidden.shape[-1]))
    if records:
        records.update({k: detached_copy(record) for k, record in records.items()})
    if ensemble.use_inference_mode:
        return [state.clone() for state in states]  # normal tensors, usable outside inference mode
    return states


class CachedHidden(Source):
    """Teachers' last hidden states read from a `distill cache --store hidden` folder, with their
    stored output layers: the same signal live teachers give, without running a teacher body."""

    capabilities = frozenset({Capability.WRITE_LOGITS})

    def __init__(self, cache):
        self.cache = cache

    def signal(self, batch: Dict, device: torch.device) -> HiddenStateSignal:
        states = self.cache.hidden_rows(batch["index"].tolist(), batch["input_ids"].shape[1])
        heads = [head.to(device) for head in self.cache.heads]
        return HiddenStateSignal([s.reshape(-1, s.shape[-1]).to(device) for s in states], heads)


class CachedTopK(Source):
    """Teachers read from a `distill cache` folder by example id: no teacher runs."""

    capabilities = frozenset({Capability.TOP_K})

    def __init__(self, cache):
        self.cache = cache

    def signal(self, batch: Dict, device: torch.device) -> TopKSignal:
        ids, log_probs, tail = self.cache.rows(batch["index"].tolist(), batch["input_ids"].shape[1])
        rows = ids.shape[0] * ids.shape[1]
        return TopKSignal(ids.reshape(rows, *ids.shape[2:]).to(device),
                          log_probs.reshape(rows, *log_probs.shape[2:]).to(device),
                          tail.reshape(rows, tail.shape[-1]).to(device), self.cache.vocab_size)


# what a cache store holds (caches/lm_stores.Store.reads) -> the source that serves it
CACHED_SOURCES = {"hidden": CachedHidden, "top_k": CachedTopK}


def cached_source(cache) -> Source:
    """The signal source over an opened LM cache (caches/lm_stores.LogitCache), by what its store holds."""
    return CACHED_SOURCES[cache.store.reads](cache)


# ------------------------------------------------------------------------------------ targets
class Targets:
    """`target_fn(start, end)` for the losses: the interpolated target of rows start..end-1 and
    the KD mask (rows left out for non-finite teacher logits, with teachers.on_nonfinite=skip).

    `kd_rows` [rows] marks the rows the KD term reads (a causal LM: labelled tokens; classification:
    every row, unlabelled transfer rows included). `weights` / `temperatures` replace the ensemble's
    (a schedule's current values). `streamed`: the caller takes a probability or sparse target
    (forward KL in the fused loss); then the strategy's and the signal's fast paths are used where
    both declare them."""

    def __init__(self, ensemble, signal, labels: Tensor, kd_rows: Tensor, weights=None, temperatures=None,
                 streamed: bool = False, workspace: Optional[Workspace] = None, unit: str = "token"):
        self.ensemble, self.signal, self.labels, self.kd_rows = ensemble, signal, labels, kd_rows
        self.weights = normalize_weights(torch.as_tensor(ensemble.weights if weights is None else weights,
                                                         dtype=torch.float32))
        self.temperatures = (ensemble.temperatures if temperatures is None
                             else torch.as_tensor(temperatures, dtype=torch.float32))
        strategy = ensemble.interpolation
        # teachers.route_by: each row mixes its route's teachers (signals/routing.py), through the general path
        self.routing = ensemble.routing if signal.route_rows is not None else None
        if self.routing is not None:
            self.route_weights = self.routing.weights_now(None if weights is None else self.weights)
            streamed = False
        self.stream_probabilities = (streamed and "probabilities" in strategy.fast_paths
                                     and signal.can(Capability.WRITE_LOGITS))
        self.sparse = streamed and "sparse" in strategy.fast_paths and signal.can(Capability.TOP_K)
        self.workspace = Workspace() if workspace is None else workspace
        self.unit = unit
        self.skipped = 0  # KD rows left out for non-finite teacher logits

    def __call__(self, start: int, end: int) -> Tuple[object, Optional[Tensor]]:
        if self.sparse and self._all_covered(start, end):
            ids, log_probs, tail = self.signal.top_k(start, end)
            found = self.ensemble.interpolation.sparse_(ids, log_probs, tail, self.signal.vocab_size,
                                                        self.weights.to(log_probs.device),
                                                        self.temperatures.to(log_probs.device))
            return SparseTarget(*found), None
        if self.stream_probabilities:
            mixture = self._streamed_mixture(start, end)
            if mixture is not None:
                return mixture, None
        return self.target(self.signal.logits(start, end), start, end)

    def _all_covered(self, start: int, end: int) -> bool:
        """Every teacher has read every KD row here (always, for a signal without coverage)."""
        if not self.signal.can(Capability.COVERAGE):
            return True
        covered = self.signal.coverage(start, end)
        return bool((covered | ~self.kd_rows[start:end].to(covered.device)).all())

    def _streamed_mixture(self, start: int, end: int) -> Optional[ProbabilityTarget]:
        """The linear mixture's probabilities [c, V], one teacher at a time: its logits (at 1 / T)
        into a scratch [c, V], softened and added in place, so memory holds two [c, V] whatever K
        is. Its entropy terms come from the scratch: log p written there for several teachers, the
        shifted logits for one. None if a teacher's logits are not finite there: the caller then
        takes the general path, which names it or skips the rows."""
        active = [(k, weight, temperature) for k, (weight, temperature)
                  in enumerate(zip(self.weights.tolist(), self.temperatures.tolist())) if weight > 0]
        rows, vocab = end - start, self.signal.vocab_size
        device = self.signal.hidden_states[0].device
        with torch.no_grad():
            mixture = self.workspace.get("mixture", rows, vocab, torch.float32, device)
            scratch = self.workspace.get("teacher", rows, vocab, torch.float32, device)
            for index, (k, weight, temperature) in enumerate(active):
                self.signal.write_logits(k, start, end, scratch, 1.0 / temperature)
                if not bool(torch.isfinite(scratch.sum(dim=-1)).all()):
                    return None
                if len(active) == 1:
                    return ProbabilityTarget(*softmax_with_entropy_(scratch, mixture))
                add_softened_(mixture, scratch, weight, 1.0, index == 0)
            return ProbabilityTarget(mixture, entropy_terms(mixture, torch.log(mixture, out=scratch)))

    def target(self, logits: Tensor, start: int, end: int) -> Tuple[Tensor, Optional[Tensor]]:
        """The interpolated target (and KD mask) of rows start..end-1 from their teacher logits
        [K, c, V] (which it may soften in place: pass logits nothing else reads)."""
        kd_rows = self.kd_rows[start:end]
        keep = finite_rows(logits, kd_rows, self.ensemble.on_nonfinite, self.ensemble.names,
                           lambda bad: f"on {int(bad.sum())} {self.unit}(s)")
        if keep is not None:
            self.skipped += int((~keep & kd_rows.to(keep.device)).sum())
            logits = torch.where(keep[None, :, None], logits, torch.zeros_like(logits))
        # teachers with other tokenizers (signals/aligned.py) or words (token classification)
        coverage = self.signal.coverage if self.signal.can(Capability.COVERAGE) else None
        if self.routing is not None:
            with torch.no_grad():
                target, routed = self.routing.target(logits, self.signal.route_rows[start:end], self.route_weights,
                                                     self.temperatures, self.labels[start:end],
                                                     None if coverage is None else coverage(start, end))
            return target, routed if keep is None else keep & routed
        if coverage is not None and not bool(coverage(start, end).all()):
            from distill.tokens.alignment import covered_target

            with torch.no_grad():  # a row mixes the teachers that have read its text, weights renormalised
                target, covered = covered_target(self.ensemble.interpolation, logits, coverage(start, end).to(logits.device),
                                                 self.weights.to(logits.device), self.temperatures.to(logits.device),
                                                 self.labels[start:end])
            return target, covered if keep is None else keep & covered
        with torch.no_grad():
            if self.stream_probabilities:  # the caller takes probabilities: no log pass
                return ProbabilityTarget(self.ensemble.interpolation.probabilities_(
                    logits, self.weights, self.temperatures)), keep
            target = self.ensemble.interpolation(logits, self.weights.to(logits.device),
                                                 self.temperatures.to(logits.device), self.labels[start:end])
        return target, keep

