"""Validation: the student, each teacher alone, and the interpolated target they make together.

Every rank evaluates its shard (all ranks take part in every forward, as ZeRO-3 requires) and the
predictions are gathered and put back in order by each row's `index`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

import torch
from torch.utils.data import DataLoader
from torch.utils.data.distributed import DistributedSampler

from distill.data.text import INDEX, LABELS, ROUTE, model_inputs
from distill.runtime.distributed import gather_objects, rank, world_size
from distill.formulas.divergences import IGNORE_INDEX
from distill.evaluation.metrics import classification_metrics


@dataclass
class Predictions:
    """Arg-max predictions per model name ('student', teacher names, 'target'), in index order."""

    references: List[int]
    by_model: Dict[str, List[int]] = field(default_factory=dict)

    def metrics(self, num_labels: int, rows: Optional[set] = None) -> Dict[str, Dict[str, float]]:
        """Per model: accuracy and macro-F1 over labelled rows (only positions in `rows`, if given)."""
        labelled = [i for i, label in enumerate(self.references)
                    if label != IGNORE_INDEX and (rows is None or i in rows)]
        references = [self.references[i] for i in labelled]
        return {name: classification_metrics([predictions[i] for i in labelled], references, num_labels)
                for name, predictions in self.by_model.items()}


def validation_loader(dataset, collator, batch_size: int) -> DataLoader:
    sampler = DistributedSampler(dataset, num_replicas=world_size(), rank=rank(), shuffle=False, drop_last=False)
    # a generator of its own: evaluating must not draw from the global RNG that training resumes
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, collate_fn=collator,
                      generator=torch.Generator().manual_seed(0))


def predict(loader: DataLoader, models: Dict[str, Callable[[Dict], torch.Tensor]]) -> Predictions:
    """Run each `name -> batch -> logits [B, C]` function over the loader; gather across ranks."""
    local: Dict[int, Dict] = {}
    for batch in loader:
        rows = {name: fn(batch).argmax(dim=-1).tolist() for name, fn in models.items()}
        for position, index in enumerate(batch[INDEX].tolist()):
            local[index] = {"label": int(batch[LABELS][position]),
                            **{name: rows[name][position] for name in models}}
    merged: Dict[int, Dict] = {}
    for part in gather_objects(local):
        merged.update(part)  # DistributedSampler repeats a few rows to even out shards
    order = sorted(merged)
    return Predictions(references=[merged[i]["label"] for i in order],
                       by_model={name: [merged[i][name] for i in order] for name in models})


def student_logits_fn(student, device: torch.device) -> Callable[[Dict], torch.Tensor]:
    def run(batch: Dict) -> torch.Tensor:
        with torch.no_grad():
            inputs = {k: v.to(device) for k, v in model_inputs(batch).items()}
            return student(**inputs).logits.float().cpu()

    return run


def teacher_logit_fns(ensemble, source, device: torch.device) -> Dict[str, Callable[[Dict], torch.Tensor]]:
    """One function per teacher plus 'target', sharing a single pass of the signal source per batch."""
    cache: Dict[str, Optional[object]] = {"batch": None, "logits": None}

    def teacher_logits(batch: Dict) -> torch.Tensor:
        if cache["batch"] is not batch:
            cache["batch"], cache["logits"] = batch, source.logits(batch, device).cpu()
        return cache["logits"]

    fns = {name: (lambda batch, k=k: teacher_logits(batch)[k]) for k, name in enumerate(ensemble.names)}
    fns["target"] = lambda batch: ensemble.target(teacher_logits(batch), routes=batch.get(ROUTE))
    return fns


def collect_teacher_logits(loader: DataLoader, source, device: torch.device):
    """All teachers' logits [K, N, C] and labels [N] over a (sharded) loader, gathered from every
    rank and ordered by row index: the same tensors on every rank."""
    local: Dict[int, tuple] = {}
    for batch in loader:
        logits = source.logits(batch, device).cpu()
        for position, index in enumerate(batch[INDEX].tolist()):
            local[index] = (logits[:, position], int(batch[LABELS][position]))
    merged: Dict[int, tuple] = {}
    for part in gather_objects(local):
        merged.update(part)
    order = [i for i in sorted(merged) if merged[i][1] != IGNORE_INDEX]
    logits = torch.stack([merged[i][0] for i in order], dim=1)
    labels = torch.tensor([merged[i][1] for i in order], dtype=torch.long)
    return logits, labels


def validation_batches(cfg, tokenizer) -> tuple[DataLoader, int]:
    """One process: the validation split encoded with `tokenizer`, and the number of labels."""
    from distill.data.text import Collator, TokenizerGroup, read_splits, tokenize

    splits = read_splits(cfg.data)
    groups = [TokenizerGroup("", tokenizer)]
    validation = tokenize(splits.validation, groups, cfg.data.text_fields, cfg.data.max_length)
    return validation_loader(validation, Collator(groups), cfg.training.eval_batch_size), len(splits.label_names)


def score_classifier(model, loader: DataLoader, num_labels: int) -> Dict[str, float]:
    """accuracy, macro-F1 and mean NLL of a classifier over labelled validation rows."""
    predictions, references, nll_sum = [], [], 0.0
    with torch.no_grad():
        for batch in loader:
            logits = model(**model_inputs(batch)).logits.float()
            labels = batch[LABELS]
            keep = labels != IGNORE_INDEX
            log_probs = torch.log_softmax(logits[keep], dim=-1)
            nll_sum += float(-log_probs.gather(-1, labels[keep].unsqueeze(-1)).sum())
            predictions += logits[keep].argmax(-1).tolist()
            references += labels[keep].tolist()
    figures = classification_metrics(predictions, references, num_labels)
    figures["nll"] = nll_sum / max(1, len(references))
    return figures
