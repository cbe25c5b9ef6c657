"""The teacher signal of tagged words (task token_classification): each live teacher over its own
encoding of a sentence's words, its per-position tag logits taken at each student row's word.

A teacher that reads the student's tokens gives its logits at the same sub-token; one with another
tokenizer gives, for each student row, its logits at the first sub-token of the same word (word-level
alignment), and the signal's coverage says which teacher read which row (a word its truncation
dropped is not covered).
"""
from __future__ import annotations

from typing import Dict

import torch

from distill.data.tagged import ROWS, WORD_IDS
from distill.data.text import model_inputs
from distill.signals.base import Capability, Signal, Source


def word_positions(word_ids: torch.Tensor, words: int) -> torch.Tensor:
    """[B, words]: the position of each word's first sub-token in a [B, L] word-id matrix, -1 where
    the word is absent (truncated)."""
    batch, length = word_ids.shape
    previous = torch.cat([torch.full((batch, 1), -1, dtype=word_ids.dtype), word_ids[:, :-1]], dim=1)
    starts = (word_ids >= 0) & (word_ids != previous)
    table = torch.full((batch, words + 1), -1, dtype=torch.long)
    b, position = starts.nonzero(as_tuple=True)
    table[b, word_ids[b, position]] = position
    return table[:, :words]


class WordSignal(Signal):
    """Teachers' logits at the student's rows [K, rows, C], and which teacher read each row."""

    capabilities = frozenset({Capability.COVERAGE})

    def __init__(self, logits: torch.Tensor, covered: torch.Tensor):
        super().__init__(logits.shape[1])
        self.all_logits, self.covered = logits, covered

    def logits(self, start: int, end: int) -> torch.Tensor:
        return self.all_logits[:, start:end]

    def coverage(self, start: int, end: int) -> torch.Tensor:
        return self.covered[:, start:end]


class WordAlignedTeachers(Source):
    """The teacher-signal source of this task: each live teacher over its own encoding of the words,
    its per-position logits (in the student's tag order) taken at each student row's word."""

    capabilities = frozenset({Capability.COVERAGE})

    def __init__(self, ensemble):
        self.ensemble = ensemble

    def signal(self, batch: Dict, device: torch.device, rows_column: str = ROWS) -> WordSignal:
        rows = batch[rows_column].bool()
        student_words = batch[WORD_IDS][rows]  # [R] the word of each row
        sentence = rows.nonzero(as_tuple=True)[0]  # [R] the sentence of each row
        words = int(batch[WORD_IDS].max()) + 1
        picked, covered = [], []
        context = torch.inference_mode if self.ensemble.use_inference_mode else torch.no_grad
        with context():
            for plan, model in zip(self.ensemble.plans, self.ensemble.models):
                inputs = {k: v.to(device) for k, v in model_inputs(batch, plan.input_prefix).items()}
                logits = model(**inputs).logits.float().cpu()  # [B, L_t, C]
                if plan.label_order is not None:
                    logits = logits[..., plan.label_order]
                if plan.input_prefix == "":
                    picked.append(logits[rows])
                    covered.append(torch.ones(len(sentence), dtype=torch.bool))
                    continue
                where = word_positions(batch[plan.input_prefix + WORD_IDS], words)[sentence, student_words]  # [R]
                found = where >= 0
                picked.append(torch.where(found[:, None], logits[sentence, where.clamp(min=0)], 0.0))
                covered.append(found)
        return WordSignal(torch.stack(picked).clone().to(device), torch.stack(covered).to(device))
