"""Live causal-LM teachers with other tokenizers (`teachers.tokenization: per_model`): the signal
source that runs each such teacher on its own tokens of a block's text and puts its next-token
distributions on the student's positions and vocabulary.

Each block carries, per teacher tokenizer group, the teacher's window over the block's text and,
per student position, the window position that has read the same text (lm_data._encode_aligned,
token_alignment.pack_aligned_blocks). A teacher's last hidden states are gathered at those
positions, so a chunk of student rows needs that teacher's output layer over the chunk only; its
log-probabilities [chunk, V_teacher] are mapped onto the student's vocabulary (classes of the
student's tokens; inside a class the shared-vocabulary teachers split the mass:
token_alignment.map_log_probs) and dropped before the next teacher's: never a [K, tokens,
V_teacher] tensor. Teachers that share the student's vocabulary read the student's ids, exactly as
without per_model. The signal declares `coverage(start, end)`, which teachers have read the text
of each row, and `Targets` mixes the covering teachers of a row with their weights renormalised
(token_alignment.covered_target).

Mapping happens at T = 1; a teacher temperature then softens the mapped distribution, as it
softens a cached top-k distribution. Evaluation scores each such teacher in its own tokenization
too (bits per byte of its window tokens).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import torch
from torch import Tensor, nn

from distill.signals.base import Capability, Signal, Source
from distill.errors import ConfigError
from distill.data.text import LABELS, model_inputs
from distill.formulas.divergences import IGNORE_INDEX
from distill.signals.sources import body_and_head, teacher_hidden_states, whole_layer, write_head
from distill.formulas.mixtures import linear_mixture, normalize_weights
from distill.tokens.alignment import map_log_probs, token_classes, vocabulary_bytes


@dataclass
class TokenMap:
    """How one teacher vocabulary lands on the student's (token_alignment.token_classes): the class
    each teacher token is routed to [V_T] and each student token belongs to [V_S] (-1: none), and
    the bytes each teacher token spells (its own-tokenization bits per byte)."""

    routes: Tensor  # [V_T] int64
    classes: Tensor  # [V_S] int64
    byte_lengths: Tensor  # [V_T] int64, 0 for special tokens
    exact: int  # teacher tokens whose text is a student token
    prefix: int  # teacher tokens mapped to a student token that begins them
    unmapped: int

    def describe(self) -> str:
        total = self.exact + self.prefix + self.unmapped
        return (f"{self.exact / total:.1%} of its tokens are student tokens too, {self.prefix / total:.1%} go to a "
                f"class of student tokens, {self.unmapped / total:.1%} unmapped")


def spelled(tokenizer, key: str) -> List[Optional[bytes]]:
    """vocabulary_bytes with the refusals a config can act on: offsets need a fast tokenizer."""
    if not getattr(tokenizer, "is_fast", False):
        raise ConfigError(f"{key}: its tokenizer is a slow (Python) tokenizer, which gives no character offsets, "
                          "so its positions cannot be matched to the student's by text: give it a tokenizer.json "
                          "(a fast tokenizer), or drop teachers.tokenization=per_model")
    try:
        return vocabulary_bytes(tokenizer)
    except ValueError as error:
        raise ConfigError(f"{key}: {error}; teachers.tokenization=per_model cannot map its vocabulary") from error


def build_token_map(teacher_tokenizer, student_tokenizer, student_bytes: Sequence[Optional[bytes]], key: str,
                    output_size: int) -> TokenMap:
    """The classes a teacher's tokens go to among the student's (token_classes); refused when nothing maps. Special
    tokens spell no text: the teacher's EOS goes to the student's (both end each text of a packed
    stream at the same place), another special token to the student's token of the same name, if any."""
    teacher_bytes = spelled(teacher_tokenizer, key)
    if teacher_tokenizer.eos_token_id is None:
        raise ConfigError(f"{key}: its tokenizer has no EOS token, which ends every text of a packed stream: "
                          "set eos_token in its tokenizer_config.json")
    teacher_bytes = (list(teacher_bytes) + [None] * output_size)[:output_size]  # rows of its output layer
    routes, classes, exact = token_classes(teacher_bytes, student_bytes)
    if not bool((routes >= 0).any()):
        raise ConfigError(f"{key}: no token of its vocabulary begins a student token or starts with one (no "
                          "overlap), so its distributions cannot be mapped onto the student's vocabulary: use a "
                          "teacher whose text pieces the student can spell")
    student_vocab = student_tokenizer.get_vocab()
    namesakes = {index: student_vocab[token] for token, index in teacher_tokenizer.get_vocab().items()
                 if index < output_size and teacher_bytes[index] is None
                 and student_vocab.get(token, len(student_bytes)) < len(student_bytes)}
    namesakes[teacher_tokenizer.eos_token_id] = student_tokenizer.eos_token_id
    for teacher_id, student_id in namesakes.items():  # a special token is a class of its own
        routes[teacher_id], classes[student_id], exact[teacher_id] = teacher_id, teacher_id, True
    mapped = routes >= 0
    lengths = torch.tensor([len(text) if text is not None else 0 for text in teacher_bytes], dtype=torch.long)
    return TokenMap(routes=routes, classes=classes, byte_lengths=lengths, exact=int((mapped & exact).sum()),
                    prefix=int((mapped & ~exact).sum()), unmapped=int((~mapped).sum()))


class AlignedSignal(Signal):
    """Teachers' last hidden states at the student's rows [rows, H_k] (zeros where teacher k has not
    read the row's text), their output layers, and per teacher a TokenMap (None: the student's own
    vocabulary). `logits(start, end)` -> [K, c, V_student]: raw logits for shared teachers, mapped
    log-probabilities for the others. Keeps, per teacher, the covered labelled rows and their mapped
    mass seen so far (logged)."""

    capabilities = frozenset({Capability.COVERAGE, Capability.ALIGNED})

    def __init__(self, hidden_states: List[Tensor], heads: List[nn.Module], maps: List[Optional[TokenMap]],
                 coverage: Tensor, labelled: Tensor, vocab_size: int, windows: Optional[Dict[int, Dict]] = None,
                 reference_weights: Optional[Sequence[float]] = None):
        super().__init__(hidden_states[0].shape[0])
        self.hidden_states, self.heads, self.maps = hidden_states, heads, maps
        # the shared-vocabulary teachers' mixture splits a class's mass among its student tokens
        shared = [k for k, token_map in enumerate(maps) if token_map is None]
        weights = torch.tensor([float(reference_weights[k]) if reference_weights is not None else 1.0 for k in shared])
        if shared and float(weights.sum()) <= 0:
            weights = torch.ones(len(shared))
        self.reference = (shared, normalize_weights(weights)) if shared else None
        self.covered = coverage  # [K, rows] bool
        self.labelled = labelled  # [rows] bool
        self.vocab_size = vocab_size
        self.windows = windows or {}  # k -> {"hidden": [B, W, H], "input_ids", "attention_mask"} (evaluation)
        self.mass = torch.zeros(len(heads), dtype=torch.float64)  # summed over covered labelled rows
        self.mapped_rows = torch.zeros(len(heads), dtype=torch.long)

    def coverage(self, start: int, end: int) -> Tensor:
        return self.covered[:, start:end]

    def _reference(self, out: Tensor) -> Optional[Tensor]:
        """log of the shared-vocabulary teachers' linear mixture (T = 1) of the chunk, or None."""
        if self.reference is None:
            return None
        shared, weights = self.reference
        return linear_mixture(torch.log_softmax(out[shared], dim=-1), weights.to(out.device))

    def logits(self, start: int, end: int) -> Tensor:
        with torch.no_grad():
            out = self.hidden_states[0].new_empty((len(self.heads), end - start, self.vocab_size), dtype=torch.float32)
            for k, (head, token_map) in enumerate(zip(self.heads, self.maps)):
                if token_map is None:
                    write_head(head, self.hidden_states[k][start:end], out[k])
            reference = self._reference(out)
            for k, (head, token_map) in enumerate(zip(self.heads, self.maps)):
                if token_map is None:
                    continue
                log_probs = self.own_log_probs(k, start, end)  # one [c, V_T] at a time
                out[k], mass = map_log_probs(log_probs, token_map.routes, token_map.classes, reference)
                del log_probs
                counted = (self.covered[k, start:end] & self.labelled[start:end]).to(mass.device)
                self.mass[k] += float(mass[counted].double().sum())
                self.mapped_rows[k] += int(counted.sum())
            return out

    def own_log_probs(self, k: int, start: int, end: int) -> Tensor:
        """Teacher k's next-token log-probabilities over its own vocabulary at rows start..end-1."""
        head = self.heads[k]
        with torch.no_grad():
            return torch.log_softmax(head(self.hidden_states[k][start:end].to(head.weight.dtype)).float(), dim=-1)

    def shares(self, names: Sequence[str]) -> Dict[str, float]:
        """coverage/<teacher> (share of labelled rows it has read) and mapped_mass/<teacher> (mean
        probability its map kept, over the rows mapped so far) for each teacher with another tokenizer."""
        labelled = max(int(self.labelled.sum()), 1)
        figures = {}
        for k, name in enumerate(names):
            if self.maps[k] is None:
                continue
            figures[f"coverage/{name}"] = int((self.covered[k] & self.labelled.to(self.covered.device)).sum()) / labelled
            # every rank logs the same names (their means are all-reduced): no row mapped, nothing lost
            rows = int(self.mapped_rows[k])
            figures[f"mapped_mass/{name}"] = float(self.mass[k]) / rows if rows else 1.0
        return figures

    def own_tokenization(self, k: int, row: int) -> tuple[float, int, int]:
        """(summed NLL, tokens, bytes) of teacher k predicting its own window tokens of batch row
        `row` (every window token after the first; EOS counts as a token of no bytes)."""
        window = self.windows[k]
        mask = window["attention_mask"][row].bool()
        ids = window["input_ids"][row][mask]
        if ids.numel() < 2:
            return 0.0, 0, 0
        head, token_map = self.heads[k], self.maps[k]
        with torch.no_grad():
            hidden = window["hidden"][row][mask][:-1]
            log_probs = torch.log_softmax(head(hidden.to(head.weight.dtype)).float(), dim=-1)
            nll = float(-log_probs.gather(-1, ids[1:].unsqueeze(-1).to(log_probs.device)).sum())
        return nll, int(ids.numel() - 1), int(token_map.byte_lengths[ids[1:].cpu()].sum())


class AlignedLanguageModels(Source):
    """The source for causal-LM teachers when some have other tokenizers: shared-vocabulary teachers
    read the student's ids (through a trimmed vocabulary's map, if any), the others their own
    windows, gathered at the aligned positions."""

    capabilities = frozenset({Capability.COVERAGE, Capability.ALIGNED})

    def __init__(self, ensemble, maps: List[Optional[TokenMap]], vocab_size: int, vocabulary=None):
        self.ensemble, self.maps, self.vocab_size, self.vocabulary = ensemble, maps, vocab_size, vocabulary
        self.heads = [whole_layer(body_and_head(model)[1]) for model in ensemble.models]
        if vocabulary is not None:
            self.heads = [vocabulary.head(head) if token_map is None else head
                          for head, token_map in zip(self.heads, maps)]
        self.keep_windows = False  # evaluation asks for the windows' states (own-tokenization figures)

    def signal(self, batch: Dict, device: torch.device) -> AlignedSignal:
        student_ids = batch["input_ids"].to(device)
        if self.vocabulary is not None:
            student_ids = self.vocabulary.teacher_ids(student_ids)
        shared = {"input_ids": student_ids, "attention_mask": batch["attention_mask"].to(device)}
        inputs = [shared if token_map is None else
                  {name: value.to(device) for name, value in model_inputs(batch, plan.input_prefix).items()}
                  for plan, token_map in zip(self.ensemble.plans, self.maps)]
        states = teacher_hidden_states(self.ensemble, inputs)
        rows, length = student_ids.shape
        labelled = (batch[LABELS].reshape(-1) != IGNORE_INDEX).to(device)
        hidden, coverage, windows = [], torch.ones(len(self.maps), rows * length, dtype=torch.bool, device=device), {}
        for k, (plan, token_map, state) in enumerate(zip(self.ensemble.plans, self.maps, states)):
            if token_map is None:
                hidden.append(state)
                continue
            window = inputs[k]["input_ids"].shape[1]
            state = state.reshape(rows, window, -1)
            positions = batch[plan.input_prefix + "positions"].to(device)  # [B, S]
            found = positions >= 0
            index = positions.clamp(min=0).unsqueeze(-1).expand(-1, -1, state.shape[-1])
            gathered = torch.where(found.unsqueeze(-1), state.gather(1, index), torch.zeros((), dtype=state.dtype,
                                                                                             device=device))
            hidden.append(gathered.reshape(rows * length, -1))
            coverage[k] = found.reshape(-1)
            if self.keep_windows:
                windows[k] = {"hidden": state, **inputs[k]}
        return AlignedSignal(hidden, self.heads, self.maps, coverage, labelled, self.vocab_size, windows,
                             [plan.weight for plan in self.ensemble.plans])
