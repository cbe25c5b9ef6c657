"""Intermediate-layer distillation wired to models (the math is in formulas/layer_terms.py).

`plan_layer_terms` turns `loss.intermediate` into layer pairs checked against the models' depths;
`attach_projections` gives the student its training-only projections (a submodule named
PROJECTIONS: DeepSpeed trains, partitions and checkpoints it with the student; export drops it);
`Capture` records, during one forward, the hidden states and the query/key/value vectors of the
layers a plan reads; `LayerTerms` turns the student's and the teachers' records into one weighted
loss: sum over teachers k of w_k * (hidden_weight * hidden term + relation_weight * relation term),
w_k teacher k's current interpolation weight (per row where the strategy has per-row weights).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from distill.config.schema import resolve_teacher_index, teacher_display_name

from distill.errors import ConfigError
from distill.formulas.layer_terms import (common_relation_heads, hidden_state_loss, relation_loss, uniform_layer_map,
                                  weighted_mean)

PROJECTIONS = "distill_projections"  # the student's training-only submodule (not exported)


@dataclass
class LayerTermsPlan:
    """One loss.intermediate entry, resolved against the models."""
    teacher: int  # index in teachers.models (and in the ensemble)
    key: str
    hidden_weight: float
    hidden_loss: str
    hidden_pairs: List[Tuple[int, int]]
    relation_weight: float
    relation_kinds: List[str]
    relation_pairs: List[Tuple[int, int]]
    relation_heads: int = 0


@dataclass
class Request:
    """What one model's forward must record: hidden states by layer, vectors by (layer, kind)."""
    hidden: set = field(default_factory=set)
    vectors: set = field(default_factory=set)

    def merge(self, other: "Request") -> None:
        self.hidden |= other.hidden
        self.vectors |= other.vectors


def depth(model: nn.Module) -> int:
    return int(model.config.num_hidden_layers)


def attention_parts(model: nn.Module, key: str):
    """(the model's list of blocks, {kind: name of its query/key/value linear inside a block})."""
    from distill.models.pruning import FAMILIES

    total = depth(model)
    blocks = next((m for _, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m) == total), None)
    if blocks is not None:
        names = {name for name, _ in blocks[0].named_modules()}
        for family in FAMILIES:
            if all(part in names for part in (family.query, family.key, family.value)):
                return blocks, {"query": family.query, "key": family.key, "value": family.value}
    raise ConfigError(f"{key}: {type(model).__name__} is neither a Llama-family decoder nor a BERT-family encoder, "
                      "whose attention vectors the relation terms know how to read: set relation_weight=0")


def layer_pairs(value, default: List[Tuple[int, int]], student_depth: int, teacher_depth: int, key: str):
    pairs = default if isinstance(value, str) else [(int(s), int(t)) for s, t in value]
    for student_layer, teacher_layer in pairs:
        if student_layer > student_depth or teacher_layer > teacher_depth:
            raise ConfigError(f"{key}: the pair [{student_layer}, {teacher_layer}] is outside the models: the student "
                              f"has {student_depth} layers, the teacher {teacher_depth} (0 is the embeddings)")
    return pairs


def _vector_width(model: nn.Module, layer: int, kind: str, key: str) -> int:
    blocks, names = attention_parts(model, key)
    return int(blocks[layer - 1].get_submodule(names[kind]).out_features)


def plan_layer_terms(cfg, student: nn.Module, teachers: Sequence[Optional[nn.Module]]) -> List[LayerTermsPlan]:
    """loss.intermediate resolved against the student and the loaded teachers (ConfigError naming
    the entry for a layer outside a model, or relation heads that do not divide a width)."""
    plans = []
    for index, entry in enumerate(cfg.loss.intermediate):
        key = f"loss.intermediate[{index}]"
        k = resolve_teacher_index(cfg, entry.teacher, f"{key}.teacher")
        teacher = teachers[k]
        student_depth, teacher_depth = depth(student), depth(teacher)
        plan = LayerTermsPlan(
            teacher=k, key=f"{key} ({teacher_display_name(cfg.teachers.models[k], k)})",
            hidden_weight=entry.hidden_weight, hidden_loss=entry.hidden_loss,
            hidden_pairs=layer_pairs(entry.layer_map, uniform_layer_map(student_depth, teacher_depth), student_depth,
                                teacher_depth, f"{key}.layer_map") if entry.hidden_weight > 0 else [],
            relation_weight=entry.relation_weight, relation_kinds=list(entry.relations),
            relation_pairs=layer_pairs(entry.relation_layers, [(student_depth, teacher_depth)], student_depth,
                                  teacher_depth, f"{key}.relation_layers") if entry.relation_weight > 0 else [])
        if plan.relation_pairs:
            widths = [_vector_width(model, pair[side], kind, key) for pair in plan.relation_pairs
                      for side, model in ((0, student), (1, teacher)) for kind in plan.relation_kinds]
            preferred = entry.relation_heads or int(student.config.num_attention_heads)
            heads = common_relation_heads(widths, preferred)
            if entry.relation_heads is not None and heads != entry.relation_heads:
                raise ConfigError(f"{key}.relation_heads={entry.relation_heads} does not divide every width the "
                                  f"relations read {sorted(set(widths))}: use {heads} or leave it unset")
            plan.relation_heads = heads
        plans.append(plan)
    return plans


def requests(plans: Sequence[LayerTermsPlan]) -> Tuple[Request, Dict[int, Request]]:
    """(what the student must record, what each teacher must record)."""
    student, teachers = Request(), {}
    for plan in plans:
        mine, theirs = Request(), Request()
        mine.hidden = {s for s, _ in plan.hidden_pairs}
        theirs.hidden = {t for _, t in plan.hidden_pairs}
        mine.vectors = {(s, kind) for s, _ in plan.relation_pairs for kind in plan.relation_kinds}
        theirs.vectors = {(t, kind) for _, t in plan.relation_pairs for kind in plan.relation_kinds}
        student.merge(mine)
        teachers.setdefault(plan.teacher, Request()).merge(theirs)
    return student, teachers


def hidden_width(model: nn.Module) -> int:
    return int(model.config.hidden_size)


def attach_projections(student: nn.Module, plans: Sequence[LayerTermsPlan], teachers: Sequence[nn.Module],
                       seed: int) -> int:
    """One learned linear map per teacher whose width differs from the student's (shared by its
    layer pairs, as TinyBERT's W_h), seeded; returns the parameters added (0 when none is needed)."""
    widths = {plan.teacher: hidden_width(teachers[plan.teacher]) for plan in plans if plan.hidden_pairs}
    needed = {k: width for k, width in widths.items() if width != hidden_width(student)}
    if not needed:
        return 0
    generator = torch.Generator().manual_seed(seed)
    projections = nn.ModuleDict()
    for k, width in sorted(needed.items()):
        # skip_init: the default init would draw from the global RNG, which dropout then reads
        layer = torch.nn.utils.skip_init(nn.Linear, hidden_width(student), width)
        bound = 1.0 / hidden_width(student) ** 0.5
        with torch.no_grad():
            layer.weight.uniform_(-bound, bound, generator=generator)
            layer.bias.zero_()
        projections[f"teacher{k}"] = layer
    student.add_module(PROJECTIONS, projections.to(next(student.parameters()).dtype))
    return sum(p.numel() for p in projections.parameters())


def drop_training_modules(state_dict: Dict[str, Tensor]) -> Dict[str, Tensor]:
    """The student's weights without the training-only projections (what export saves)."""
    return {name: value for name, value in state_dict.items() if not name.startswith(PROJECTIONS + ".")}


class Capture:
    """Records, while active, the query/key/value vectors a Request names (forward hooks on the
    blocks' linears); `collect(outputs)` adds the hidden states from outputs.hidden_states."""

    def __init__(self, model: nn.Module, request: Request, key: str):
        self.request, self.vectors, self.handles = request, {}, []
        if request.vectors:
            blocks, names = attention_parts(model, key)
            for layer, kind in sorted(request.vectors):
                module = blocks[layer - 1].get_submodule(names[kind])
                self.handles.append(module.register_forward_hook(self._recorder((layer, kind))))

    def _recorder(self, name):
        def record(_module, _inputs, output):
            self.vectors[name] = output
        return record

    def __enter__(self) -> "Capture":
        return self

    def __exit__(self, *_) -> None:
        for handle in self.handles:
            handle.remove()

    def collect(self, outputs) -> Dict:
        hidden = {}
        if self.request.hidden:
            states = outputs.hidden_states
            hidden = {layer: states[layer] for layer in self.request.hidden}
        return {"hidden": hidden, "vectors": dict(self.vectors)}


def detached_copy(record: Dict) -> Dict:
    """A teacher's record as normal tensors (a forward under inference mode made inference tensors,
    which autograd cannot save)."""
    return {part: {name: tensor.clone() for name, tensor in values.items()} for part, values in record.items()}


class LayerTerms:
    """The intermediate-layer loss of a batch: plans, the student's projections, the task's
    causality (relations of a causal LM see no later position) and chunk size (hidden terms of a
    causal LM are taken `chunk` tokens at a time)."""

    def __init__(self, plans: List[LayerTermsPlan], causal: bool = False, chunk: Optional[int] = None):
        self.plans, self.causal, self.chunk = plans, causal, chunk
        self.student_request, self.teacher_requests = requests(plans)

    def add_to(self, terms, module: nn.Module, record: Dict, signal, mask: Tensor, row_weights: Tensor,
               aligned: Dict[int, Tensor]):
        """(loss terms with the intermediate-layer loss added to the total, figures to log)."""
        from distill.formulas.divergences import LossTerms

        extra, figures = self(module, record, signal.records, mask, row_weights, aligned)
        figures["intermediate"] = float(extra.detach())  # what the total gained, config weights included
        return LossTerms(total=terms.total + extra, kd=terms.kd, ce=terms.ce), figures

    def __call__(self, module: nn.Module, student: Dict, teachers: Dict[int, Dict], mask: Tensor,
                 row_weights: Tensor, aligned: Dict[int, Tensor]) -> Tuple[Tensor, Dict[str, float]]:
        """(sum of the weighted terms, {'hidden': ..., 'relation': ...} before their config weights).

        `module` is the student (its projections), `student`/`teachers[k]` the records, `mask` [B, S]
        the student's attention mask, `row_weights` [K, B] the teachers' weights per row, `aligned[k]`
        [B] bool the rows where teacher k read the same tokens as the student."""
        total = mask.new_zeros((), dtype=torch.float32)
        figures = {"hidden": 0.0, "relation": 0.0}
        projections = getattr(module, PROJECTIONS, None)
        for plan in self.plans:
            weights, rows = row_weights[plan.teacher], aligned[plan.teacher]
            if not bool(((weights > 0) & rows).any()):  # a zero weight turns the teacher's terms off exactly
                continue
            theirs = teachers[plan.teacher]
            name = f"teacher{plan.teacher}"
            project = projections[name] if projections is not None and name in projections else None
            if plan.hidden_pairs:
                per_sequence = 0
                for s, t in plan.hidden_pairs:
                    mine, other, valid = _same_length(student["hidden"][s], theirs["hidden"][t], mask)
                    per_sequence = per_sequence + hidden_state_loss(mine, other, valid, plan.hidden_loss, project,
                                                                    self.chunk)
                term = weighted_mean(per_sequence / len(plan.hidden_pairs), weights, rows)
                total = total + plan.hidden_weight * term
                figures["hidden"] += float(term.detach())
            if plan.relation_pairs:
                per_sequence = 0
                for s, t in plan.relation_pairs:
                    mine, other, valid = [], [], mask
                    for kind in plan.relation_kinds:
                        a, b, valid = _same_length(student["vectors"][(s, kind)], theirs["vectors"][(t, kind)], mask)
                        mine.append(a.float())
                        other.append(b.float())
                    per_sequence = per_sequence + relation_loss(mine, other, valid, plan.relation_heads, self.causal)
                term = weighted_mean(per_sequence / len(plan.relation_pairs), weights, rows)
                total = total + plan.relation_weight * term
                figures["relation"] += float(term.detach())
        return total, figures


def _same_length(student: Tensor, teacher: Tensor, mask: Tensor):
    """Both records and the mask cut to the shorter padded length (aligned rows have the same
    number of real tokens, so nothing real is cut)."""
    length = min(student.shape[1], teacher.shape[1], mask.shape[1])
    return student[:, :length], teacher[:, :length], mask[:, :length]


def token_map(student_tokenizer, teacher_tokenizer) -> Tensor:
    """[V_student] the teacher's id of each student token string (-1 where the teacher lacks it)."""
    teacher_vocab = teacher_tokenizer.get_vocab()
    table = torch.full((len(student_tokenizer),), -1, dtype=torch.long)
    for token, index in student_tokenizer.get_vocab().items():
        if index < len(table):
            table[index] = teacher_vocab.get(token, -1)
    return table


def aligned_rows(student_ids: Tensor, student_mask: Tensor, teacher_ids: Tensor, teacher_mask: Tensor,
                 mapping: Tensor) -> Tensor:
    """[B] bool: rows where the teacher's own encoding is the student's token for token (same
    count of real tokens, each the same string)."""
    same_count = student_mask.sum(dim=1) == teacher_mask.sum(dim=1)
    length = min(student_ids.shape[1], teacher_ids.shape[1])
    mapped = mapping.to(student_ids.device)[student_ids[:, :length]]
    same = (mapped == teacher_ids[:, :length].to(mapped.device)) | ~student_mask[:, :length].bool()
    return same_count & same.all(dim=1)


def check_layer_terms(cfg) -> None:
    """Refuse loss.intermediate where the teachers' or student's insides are not there to read."""
    from distill.config.schema import resolve_teacher_index
    from distill.errors import ConfigError

    for index, entry in enumerate(cfg.loss.intermediate):
        teacher = cfg.teachers.models[resolve_teacher_index(cfg, entry.teacher)]
        if teacher.pooling is not None:
            raise ConfigError(f"loss.intermediate[{index}]: teacher {entry.teacher!r} is a pooled encoder with a "
                              "head: its layers are not read; remove the entry or the teacher's pooling")
    if cfg.loss.intermediate and cfg.student.pooling is not None:
        raise ConfigError("loss.intermediate with student.pooling: a pooled student's layers are not read; "
                          "remove one of them")
    if cfg.loss.intermediate and cfg.teachers.cache is not None:
        raise ConfigError("loss.intermediate reads the teachers' layers, which teachers.cache does not hold: "
                          "remove one of them")


def attach_layer_terms(cfg, student: nn.Module, ensemble, causal: bool) -> Tuple[Optional["LayerTerms"], int]:
    """loss.intermediate planned against the loaded models: the student gets its projections (a
    training-only submodule), the teachers are asked to record their layers. Returns (the terms, or
    None without loss.intermediate, the projections' parameter count). A causal LM's hidden terms
    run loss.chunk_tokens positions at a time and its relations see no later position."""
    if not cfg.loss.intermediate or ensemble is None:
        return None, 0
    plans = plan_layer_terms(cfg, student, ensemble.models)
    added = attach_projections(student, plans, ensemble.models, cfg.seed)
    terms = LayerTerms(plans, causal=causal, chunk=cfg.loss.chunk_tokens if causal else None)
    ensemble.inner_requests = terms.teacher_requests
    return terms, added


def student_forward(layers: Optional["LayerTerms"], module: nn.Module, call, **inputs):
    """(outputs of call(**inputs), the student's record for the intermediate terms or None)."""
    if layers is None:
        return call(**inputs), None
    request = layers.student_request
    with Capture(module, request, "student") as capture:
        outputs = call(**inputs, output_hidden_states=bool(request.hidden))
        return outputs, capture.collect(outputs)

