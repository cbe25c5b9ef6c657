"""`task: token_classification`: tagged sentences (named entities, parts of speech) -> a token
classifier student, distilled from several teachers' per-word tag distributions.

Data as users have it (distill/data/tagged.py): one row per sentence, its words in a list and their
tags in a list of the same length (`data.text_fields: [tokens]`, `data.label_field: tags`,
`data.label_names: [O, B-PER, ...]`); rows without tags are KD-only. Teachers are token
classifiers whose `id2label` name the tags (matched by name, in any order).

Words become sub-tokens. A *row* of the loss is a sub-token that carries its word's tag: the first
sub-token of each word (`token_classification.label_all_subtokens: false`, the default) or every
sub-token (`true`). A teacher that reads the student's tokens gives its distribution at the same
sub-token; a teacher with another tokenizer (`teachers.tokenization: per_model`) encodes the words
itself and gives, for each student row, its distribution at the first sub-token of the same word
(word-level alignment). A word a teacher's truncation dropped is not covered by it: the row mixes
the teachers that read it, weights renormalised, or leaves the KD term if none did. Every
interpolation strategy mixes these rows as it mixes classification rows.

Evaluation, per word (its first sub-token): tag accuracy and macro-F1, and entity-level precision,
recall and F1 (conlleval rules, the packaged `seqeval` metric module) of the student, each teacher
and the interpolated target. Words beyond `data.max_length` sub-tokens are not scored.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Dict, List

import torch
from transformers import AutoModelForTokenClassification

from distill.data.tagged import FIRST, ROWS, WORD_IDS, WORDS, read_tagged_splits
from distill.data.text import (EXAMPLE_ID, INDEX, LABELS, SOURCE, TokenizerGroup, map_fingerprint, model_inputs,
                               tokenizer_digest)
from distill.errors import ConfigError
from distill.evaluation.metrics import classification_metrics, load_metric
from distill.evaluation.predictions import validation_loader
from distill.evaluation.report import (compression_section, loss_line, onnx_line, precision_line, student_label,
                                       teacher_note, text_table, trained_by)
from distill.formulas.divergences import IGNORE_INDEX, build_divergence, distillation_loss, per_teacher_kl
from distill.formulas.fits import in_memory
from distill.models.loading import check_positions, load_model_config, load_pretrained
from distill.models.student import build_student, check_student_labels
from distill.models.teachers import load_teachers, plan_teachers
from distill.runtime.distributed import gather_objects
from distill.signals.sources import Targets
from distill.signals.words import WordAlignedTeachers
from distill.tasks.base import (Context, Evaluation, FitRows, PerEnsemble, SavedModelScoring, StepFigures, Task,
                                Traits, register_task, saved_student)



def encode_words(dataset, groups: List[TokenizerGroup], max_length: int, all_subtokens: bool):
    """Each group's sub-tokens of the words (`<prefix>input_ids`, masks, `<prefix>word_ids`), and for
    the student (prefix '') the per-sub-token `labels` (-100 off the rows), `rows` and `first`."""

    def encode(batch):
        out = {}
        for group in groups:
            encoded = group.tokenizer(batch[WORDS], is_split_into_words=True, truncation=True, max_length=max_length)
            for name, values in encoded.items():
                out[group.prefix + name] = values
            out[group.prefix + WORD_IDS] = [[-1 if word is None else word for word in encoded.word_ids(i)]
                                            for i in range(len(batch[WORDS]))]
        labels, rows, first = [], [], []
        for tags, word_ids in zip(batch[LABELS], out[WORD_IDS]):
            row_labels, row_rows, row_first, previous = [], [], [], -1
            for word in word_ids:
                starts = word != -1 and word != previous
                is_row = word != -1 and (starts or all_subtokens)
                row_labels.append(tags[word] if is_row else IGNORE_INDEX)
                row_rows.append(int(is_row))
                row_first.append(int(starts))
                previous = word
            labels.append(row_labels)
            rows.append(row_rows)
            first.append(row_first)
        out.update({LABELS: labels, ROWS: rows, FIRST: first})
        return out

    settings = [max_length, all_subtokens, [[group.prefix, tokenizer_digest(group.tokenizer)] for group in groups]]
    return dataset.map(encode, batched=True, remove_columns=[WORDS], desc="tokenize words",
                       new_fingerprint=map_fingerprint(dataset, encode, *settings))


def tag_scores(predicted: Dict[int, List[int]], references: Dict[int, List[int]],
               label_names: List[str]) -> Dict[str, float]:
    """Tag accuracy and macro-F1 over tagged words; entity precision, recall and F1 (conlleval), with
    tag ids named by `label_names`."""
    order = sorted(references)
    flat_predictions, flat_references, entity_predictions, entity_references = [], [], [], []
    for index in order:
        gold, guess = references[index], predicted[index]
        tagged = [i for i, tag in enumerate(gold) if tag != IGNORE_INDEX]
        if not tagged:
            continue
        flat_predictions += [guess[i] for i in tagged]
        flat_references += [gold[i] for i in tagged]
        entity_predictions.append([label_names[guess[i]] for i in tagged])
        entity_references.append([label_names[gold[i]] for i in tagged])
    figures = classification_metrics(flat_predictions, flat_references, len(label_names))
    entities = load_metric("seqeval").compute(predictions=entity_predictions, references=entity_references)
    figures.update(entity_precision=entities["precision"], entity_recall=entities["recall"],
                   entity_f1=entities["f1"], words=len(flat_references))
    return figures


def score_tagger(model, batches) -> Dict[str, float]:
    """A saved token classifier's tag and entity figures and mean NLL over tagged words of `batches`
    (its tags named by its id2label)."""
    predicted, references, nll, count = {}, {}, 0.0, 0
    with torch.no_grad():
        for batch in batches:
            logits = model(**model_inputs(batch)).logits.float()
            predicted.update(word_tags(batch, logits.argmax(-1)))
            references.update(word_tags(batch, batch[LABELS]))
            scored = batch[FIRST].bool() & (batch[LABELS] != IGNORE_INDEX)
            log_probs = torch.log_softmax(logits[scored], dim=-1)
            nll += float(-log_probs.gather(-1, batch[LABELS][scored].unsqueeze(-1)).sum())
            count += int(scored.sum())
    figures = tag_scores(predicted, references, [model.config.id2label[i] for i in sorted(model.config.id2label)])
    figures.pop("words")
    figures["nll"] = nll / max(1, count)
    return figures


class WordCollator:
    """Pads every group's sequences to the batch's longest (ids with the pad id, masks with 0,
    word ids with -1, labels with -100)."""

    def __init__(self, groups: List[TokenizerGroup]):
        self.groups = list(groups)

    def __call__(self, rows: List[Dict]) -> Dict:
        batch = {INDEX: torch.tensor([row[INDEX] for row in rows], dtype=torch.long)}
        if SOURCE in rows[0]:
            batch[SOURCE] = torch.tensor([row[SOURCE] for row in rows], dtype=torch.long)
        if EXAMPLE_ID in rows[0]:
            batch[EXAMPLE_ID] = [row[EXAMPLE_ID] for row in rows]
        for group in self.groups:
            pad_id = group.tokenizer.pad_token_id or 0
            width = max(len(row[group.prefix + "input_ids"]) for row in rows)
            pads = {"input_ids": pad_id, "attention_mask": 0, "token_type_ids": 0, WORD_IDS: -1}
            if group.prefix == "":
                pads.update({LABELS: IGNORE_INDEX, ROWS: 0, FIRST: 0})
            for name, pad in pads.items():
                column = group.prefix + name if name not in (LABELS, ROWS, FIRST) else name
                if column in rows[0]:
                    batch[column] = torch.tensor([row[column] + [pad] * (width - len(row[column])) for row in rows],
                                                 dtype=torch.long)
        return batch


def word_tags(batch: Dict, values: torch.Tensor) -> Dict[int, List[int]]:
    """{row index: the values at its words' first sub-tokens, in word order} from [B, L] values."""
    first = batch[FIRST].bool()
    return {index: values[b][first[b]].tolist() for b, index in enumerate(batch[INDEX].tolist())}


@register_task("token_classification")
class TokenClassification(Task):
    # a row of the teachers' signal is a sub-token that carries a tag; micro_batch_size counts sentences
    traits = Traits(auto_model=AutoModelForTokenClassification, row_unit="token", batch_unit="row",
                    curve_metric="entity_f1", metrics={"accuracy": True, "macro_f1": True, "entity_precision": True,
                                                       "entity_recall": True, "entity_f1": True})
    owns = ("data.unlabeled.path", "data.label_names", "data.label_field", "data.id_field")

    @classmethod
    def check_config(cls, cfg) -> None:
        data = cfg.data
        if len(data.text_fields) != 1:
            raise ConfigError(f"data.text_fields={list(data.text_fields)}: token classification reads one column "
                              "holding each sentence's list of words, e.g. data.text_fields=[tokens]")

    def __init__(self, cfg):
        super().__init__(cfg)
        self.divergence = build_divergence(cfg.loss.divergence, jsd_beta=cfg.loss.jsd_beta, skew=cfg.loss.skew)
        self.all_subtokens = cfg.token_classification.label_all_subtokens
        self.teacher_predictions = PerEnsemble()  # a memo: the teachers' predictions on validation

    # data ----------------------------------------------------------------------------------
    def read_splits(self):
        return read_tagged_splits(self.cfg.data)

    def encode(self, split, key: str, context):
        return encode_words(split, context.groups, self.cfg.data.max_length, self.all_subtokens)

    def collator(self, context):
        return WordCollator(context.groups)

    # models --------------------------------------------------------------------------------
    def plan_teachers(self, splits, student_tokenizer):
        cfg = self.cfg
        if not getattr(student_tokenizer, "is_fast", False):
            raise ConfigError("token classification needs a fast tokenizer (word ids): the student's is not one")
        if cfg.student.path is not None:
            student_config = load_model_config(cfg.student.path, "student.path", cfg.trust_remote_code)
            check_student_labels(student_config, splits.label_names, "student.path")
            check_positions(student_config, cfg.data.max_length, "data.max_length", f"student.path ({cfg.student.path})")
        plans, teacher_groups = plan_teachers(cfg, splits.label_names, student_tokenizer)
        for group in teacher_groups:
            if not getattr(group.tokenizer, "is_fast", False):
                raise ConfigError(f"a teacher's tokenizer ({type(group.tokenizer).__name__}) is not a fast tokenizer: "
                                  "token classification maps teachers to words through word ids")
        return plans, Context(splits=splits, tokenizer=student_tokenizer, teacher_groups=teacher_groups)

    def build_student(self, plans, context, saved=None):
        if saved is not None:
            student, tokenizer = saved_student(self, saved, context.label_names)
        else:
            student, tokenizer = build_student(self.cfg, context.label_names, auto_class=AutoModelForTokenClassification)
        return student, replace(context, tokenizer=tokenizer)

    def load_teachers(self, plans, device, dtype, context, eager=False):
        cfg = self.cfg

        def load(plan, teacher_dtype):
            return load_pretrained(AutoModelForTokenClassification, plan.path, plan.key, cfg.trust_remote_code,
                                   teacher_dtype, cfg.allow_pickled_weights)

        ensemble = load_teachers(cfg, plans, device, dtype, load, eager)
        return ensemble, WordAlignedTeachers(ensemble)

    def kd_rows(self, batch) -> torch.Tensor:
        return torch.ones(int(batch[ROWS].sum()), dtype=torch.bool)

    # loss and evaluation -------------------------------------------------------------------
    def loss(self, engine, batch, ensemble, source, now: Dict, context, layers=None):
        cfg = self.cfg
        inputs = {k: v.to(engine.device) for k, v in model_inputs(batch).items()}
        rows = batch[ROWS].bool().to(engine.device)
        labels = batch[LABELS].to(engine.device)[rows]
        outputs = engine(**inputs)  # loss.intermediate is refused for this task (its layers are not planned)
        student_logits = outputs.logits.float()[rows]  # [R, C]
        target = keep = teacher_logits = None
        skipped = 0
        if ensemble is not None and now["kd_alpha"] > 0:
            signal = source.signal(batch, engine.device)
            teacher_logits = signal.logits(0, signal.rows)
            targets = Targets(ensemble, signal, labels, torch.ones_like(labels, dtype=torch.bool),
                              now["teacher_weights"], now["teacher_temperatures"], unit="word")
            target, keep = targets.target(teacher_logits.clone(), 0, signal.rows)
            skipped = targets.skipped
        terms = distillation_loss(student_logits, target, labels, now["kd_alpha"], now["temperature"],
                                  cfg.loss.label_smoothing, keep, self.divergence)
        teacher_kl = teacher_correct = None
        labelled = labels != IGNORE_INDEX
        if teacher_logits is not None and keep is None:
            teacher_kl = per_teacher_kl(ensemble.log_probs(teacher_logits), student_logits, now["temperature"])
            teacher_correct = ((teacher_logits.argmax(-1) == labels) & labelled).sum(dim=-1)
        return terms, StepFigures(terms.total.item(), terms.kd.item(), terms.ce.item(), int(rows.sum()), skipped,
                                  teacher_kl, teacher_correct, int(labelled.sum()))

    def _predictions(self, model, ensemble, source, device, validation, context) -> Dict[str, Dict[int, List[int]]]:
        """{model name: {row index: predicted tag id per scored word}}, plus 'references', gathered."""
        loader = validation_loader(validation, self.collator(context), self.cfg.training.eval_batch_size)
        local: Dict[str, Dict[int, List[int]]] = {"references": {}, "student": {}}
        known = self.teacher_predictions.of(ensemble)  # teachers are frozen: predicted once
        teachers_needed = ensemble is not None and not known
        for batch in loader:
            local["references"].update(word_tags(batch, batch[LABELS]))
            if model is not None:
                with torch.no_grad():
                    inputs = {k: v.to(device) for k, v in model_inputs(batch).items()}
                    local["student"].update(word_tags(batch, model(**inputs).logits.float().argmax(-1).cpu()))
            if teachers_needed:
                signal = source.signal(batch, device, rows_column=FIRST)
                logits = signal.logits(0, signal.rows).cpu()
                first = batch[FIRST].bool()
                columns = {name: logits[k].argmax(-1) for k, name in enumerate(ensemble.names)}
                columns["target"] = ensemble.target(logits).argmax(-1)
                for name, flat in columns.items():
                    values = torch.full(first.shape, -1, dtype=torch.long)
                    values[first] = flat
                    local.setdefault(name, {}).update(word_tags(batch, values))
        merged: Dict[str, Dict[int, List[int]]] = {}
        for part in gather_objects(local):
            for name, rows in part.items():
                merged.setdefault(name, {}).update(rows)
        if teachers_needed:
            known.update({name: rows for name, rows in merged.items() if name not in ("references", "student")})
        if ensemble is not None:
            merged.update(known)
        if model is None:
            merged.pop("student", None)
        return merged

    def evaluate(self, model, ensemble, source, device, validation, context):
        predictions = self._predictions(model, ensemble, source, device, validation, context)
        references = predictions.pop("references")
        label_names = context.label_names
        return Evaluation({name: tag_scores(rows, references, label_names) for name, rows in predictions.items()},
                          {}, {"label_names": label_names,
                               **{name: [rows[i] for i in sorted(rows)] for name, rows in predictions.items()}})

    def validation_chunks(self, ensemble, source, device, validation, context, route=None):
        """Every teacher's logits [K, N, C] and the gold tags [N] over the tagged validation words."""
        loader = validation_loader(validation, self.collator(context), self.cfg.training.eval_batch_size)
        local = {}
        for batch in loader:
            signal = source.signal(batch, device, rows_column=FIRST)
            logits = signal.logits(0, signal.rows).cpu()
            first = batch[FIRST].bool()
            sentence = first.nonzero(as_tuple=True)[0]
            tags = batch[LABELS][first]
            for b, index in enumerate(batch[INDEX].tolist()):
                mine = (sentence == b) & (tags != IGNORE_INDEX)
                local[index] = (logits[:, mine], tags[mine])
        merged = {}
        for part in gather_objects(local):
            merged.update(part)
        order = sorted(merged)
        return FitRows(in_memory(torch.cat([merged[i][0] for i in order], dim=1),
                                 torch.cat([merged[i][1] for i in order])))

    # saved models (export) -------------------------------------------------------------------
    def saved_model_scoring(self, tokenizer) -> SavedModelScoring:
        splits = read_tagged_splits(self.cfg.data)
        groups = [TokenizerGroup("", tokenizer)]
        encoded = encode_words(splits.validation, groups, self.cfg.data.max_length, self.all_subtokens)
        loader = validation_loader(encoded, WordCollator(groups), self.cfg.training.eval_batch_size)
        return SavedModelScoring(loader, lambda model: score_tagger(model, loader))

    # description ---------------------------------------------------------------------------
    def format_table(self, report: Dict) -> str:
        def cells(figures):
            return [f"{figures.get(name, float('nan')):.4f}" for name in ("accuracy", "macro_f1", "entity_f1")]

        rows = [(f"teacher {t['name']}", f"{t['params'] / 1e6:.2f}M", *cells(t), teacher_note(t))
                for t in report["teachers"]]
        if report.get("target"):
            rows.append(("target (interpolated)", "-", *cells(report["target"]), report["target"]["interpolation"]))
        student = report["student"]
        ratio = student.get("compression_vs_largest_teacher")
        rows.append((student_label(report), f"{student['params'] / 1e6:.2f}M", *cells(student),
                     f"{ratio:.2f}x largest teacher" if ratio else ""))
        return text_table(("model", "params", "tag accuracy", "tag macro-F1", "entity F1", "note"), rows)

    def model_card(self, report: Dict, model_config, dtype: str, compression=None, parity=None) -> str:
        student, target = report["student"], report.get("target")
        teacher_lines = "\n".join(
            f"| {t['name']} | `{t['path']}` | {t['params']:,} | {t['weight']:g} | {t['temperature']:g} | "
            f"{t.get('accuracy', float('nan')):.4f} | {t.get('entity_f1', float('nan')):.4f} |"
            for t in report["teachers"]) or "| (none: plain fine-tuning) | | | | | | |"
        target_line = (f"Interpolated target ({target['interpolation']}): tag accuracy {target['accuracy']:.4f}, "
                       f"entity F1 {target['entity_f1']:.4f}." if target else "")
        ratio = student.get("compression_vs_largest_teacher")
        tags = ", ".join(model_config.id2label[i] for i in sorted(model_config.id2label))
        subtokens = "every sub-token" if self.all_subtokens else "the first sub-token of each word"
        return f"""---
library_name: transformers
pipeline_tag: token-classification
tags:
- distill
- knowledge-distillation
---

# {"Fine-tuned" if report.get("kind") == "fine-tune" else "Distilled"} token classifier

{trained_by(report, "")}, exported in {dtype}{" + " + compression["method"] if compression else ""}.

| metric (validation, {report['training']['validation_rows']} sentences, scored per word) | value |
|---|---|
| tag accuracy | {student['accuracy']:.4f} |
| tag macro-F1 | {student['macro_f1']:.4f} |
| entity precision / recall / F1 | {student['entity_precision']:.4f} / {student['entity_recall']:.4f} / {student['entity_f1']:.4f} |
| parameters | {student['params']:,} |
| compression vs largest teacher | {f"{ratio:.3f}x" if ratio else "n/a"} |

## Teachers

| name | source | parameters | weight | temperature | tag accuracy | entity F1 |
|---|---|---|---|---|---|---|
{teacher_lines}

{target_line}
{precision_line(report)}
{loss_line(report, f" per tagged sub-token ({subtokens})")} Training: {report['training']['steps']} optimizer steps, DeepSpeed ZeRO
stage {report['training']['zero_stage']}. Entity figures follow the conlleval rules (IOB/IOB2/IOBES).

Tags: {tags}

{compression_section(compression) if compression else ""}{onnx_line(parity) if parity else ""}
## How to load

```python
from transformers import AutoModelForTokenClassification, AutoTokenizer
model = AutoModelForTokenClassification.from_pretrained("PATH")
tokenizer = AutoTokenizer.from_pretrained("PATH")
```
"""
