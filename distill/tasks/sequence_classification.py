"""`task: sequence_classification`: labelled (and unlabelled) text -> a classifier student.

Rows without a label add only the KD term. Teachers are matched to the student's labels by name
and may read the student's input ids or (teachers.tokenization=per_model) encode the text with
their own tokenizer. Evaluation: accuracy and macro-F1 of the student, each teacher and the target.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Dict

import torch
from transformers import AutoModelForSequenceClassification


from distill.errors import ConfigError
from distill.data.text import (Collator, LABELS, TokenizerGroup, column, model_inputs, read_splits, rows_matching, texts_of,
                               tokenize)
from distill.evaluation.predictions import (collect_teacher_logits, predict, student_logits_fn, teacher_logit_fns,
                                validation_loader)
from distill.formulas.fits import in_memory
from distill.formulas.divergences import IGNORE_INDEX, build_divergence, distillation_loss, per_teacher_kl
from distill.models.layer_hooks import student_forward
from distill.models.loading import check_positions, load_model_config, load_sequence_classifier, to_pooled_student
from distill.evaluation.report import format_table, model_card
from distill.signals.routing import index_split_routes, of_route, plan_routes, rows_of_route
from distill.signals.sources import ClassifierTeachers, Targets
from distill.signals.stored import black_box_outputs, cached_outputs, check_stored_outputs_cover
from distill.models.student import (build_student, calibration_batches, check_student_labels, prune_student,
                             source_parameter_count)
from distill.tasks.base import (Context, Evaluation, FitRows, PerEnsemble, SavedModelScoring, StepFigures, Task,
                                Traits, register_task, saved_student)
from distill.models.teachers import TeacherEnsemble, build_configured_interpolation, load_teachers, plan_teachers

UNMASKED_ROWS = "perturb/unmasked_rows"  # a perturbed batch: the share of rows some teacher reads unmasked


@register_task("sequence_classification")
class SequenceClassification(Task):
    traits = Traits(auto_model=AutoModelForSequenceClassification, cache="classifier", cache_holds_validation=True)

    owns = ("data.unlabeled.path", "data.label_names", "data.label_field", "student.pooling", "data.id_field",
            "data.augment.copies", "data.perturb", "teachers.models[*].logits", "teachers.models[*].pooling",
            "teachers.models[*].head", "data.mixture_sources", "data.eval_domains", "schedules.data_mixture", "teachers.cache",
            "teachers.route_by", "loss.intermediate", "student.trim_vocab", "student.prune.target_params")

    @classmethod
    def check_config(cls, cfg) -> None:
        if cfg.teachers.cache is not None and any(t.logits for t in cfg.teachers.models):
            raise ConfigError("teachers.cache holds live teachers' logits; black-box teachers (teachers.models[*].logits) "
                              "are read from their own files: drop teachers.cache or those teachers")
        if cfg.data.perturb.rate > 0:
            reads_other_input = [key for key, used in (
                ("teachers.cache", cfg.teachers.cache is not None),
                ("teachers.models[*].logits", any(t.logits for t in cfg.teachers.models))) if used]
            if reads_other_input:
                raise ConfigError(f"data.perturb: the teachers must read the student's masked input, and {reads_other_input} "
                                  "hold outputs of the clean text: set data.perturb.rate=0 or use live teachers")
        if cfg.student.trim_vocab and cfg.teachers.models and cfg.teachers.tokenization == "shared":
            raise ConfigError("student.trim_vocab gives the student its own vocabulary: "
                              "set teachers.tokenization=per_model so each teacher encodes the text itself")

    def __init__(self, cfg):
        super().__init__(cfg)
        self.divergence = build_divergence(cfg.loss.divergence, jsd_beta=cfg.loss.jsd_beta, skew=cfg.loss.skew)
        # memos of calls' own results: the teachers' predictions on validation (per ensemble), and student
        # id -> teacher id per pair of tokenizers (aligned rows), kept with the pair so that their ids stay theirs
        self.teacher_predictions = PerEnsemble()
        self.token_maps = {}

    # data ----------------------------------------------------------------------------------
    def read_splits(self):
        splits = read_splits(self.cfg.data, self.cfg.teachers.route_by)
        index_split_routes(self.cfg, splits)
        return splits

    def encode(self, split, key: str, context):
        data = self.cfg.data
        return tokenize(split, context.groups, data.text_fields, data.max_length)

    def collator(self, context):
        return Collator(context.groups)

    def batches(self, stream, engine, context):
        """data.perturb: each micro-batch's student ids masked in spans, drawn from the run's seed and the
        micro-batch's (epoch, position), so a resumed run repeats them. Teachers sharing the student's ids
        read the masked ids; a teacher reading its own encoding (teachers.tokenization=per_model) gets its
        mask token at the same positions on the rows it encodes as the student does token for token; a
        row some teacher encodes otherwise stays clean for everyone (consistency first), and the share
        of such rows is the train figure `perturb/unmasked_rows`."""
        perturb = self.cfg.data.perturb
        if perturb.rate <= 0:
            return stream
        from distill.formulas.perturbations import carry_mask, perturb_ids, perturbation_seed
        from distill.models.layer_hooks import aligned_rows

        replacement, special = self._mask_token(context.tokenizer), context.tokenizer.all_special_ids
        own = [(group.prefix, self._token_map(context, group.prefix), self._mask_token(group.tokenizer))
               for group in context.teacher_groups if group.prefix]

        def perturbed():
            for epoch, position, batch in stream:
                ids, mask = batch["input_ids"], batch["attention_mask"]
                masked = perturb_ids(ids, mask, special, replacement, perturb.rate, perturb.mean_span,
                                     perturbation_seed(self.cfg.seed, epoch, position))
                if own:
                    same = torch.ones(ids.shape[0], dtype=torch.bool)
                    for prefix, mapping, _ in own:
                        same &= aligned_rows(ids, mask, batch[prefix + "input_ids"], batch[prefix + "attention_mask"],
                                             mapping).cpu()
                    masked = torch.where(same[:, None].to(ids.device), masked, ids)
                    batch = dict(batch, **{prefix + "input_ids": carry_mask(ids, masked, batch[prefix + "input_ids"],
                                                                            same, teacher_replacement)
                                           for prefix, _, teacher_replacement in own})
                    batch[UNMASKED_ROWS] = float((~same).float().mean())  # this batch's share, logged by loss
                yield epoch, position, dict(batch, input_ids=masked)

        return perturbed()

    @staticmethod
    def _mask_token(tokenizer) -> int:
        """The id data.perturb masks with: the tokenizer's mask token, else its unknown token."""
        replacement = tokenizer.mask_token_id if tokenizer.mask_token_id is not None else tokenizer.unk_token_id
        if replacement is None:
            raise ConfigError(f"data.perturb: the tokenizer {tokenizer.name_or_path!r} has neither a mask nor an "
                              "unknown token to mask with: set data.perturb.rate=0")
        return replacement

    # models --------------------------------------------------------------------------------
    def plan_teachers(self, splits, student_tokenizer):
        cfg = self.cfg
        if cfg.student.path is not None:
            student_config = load_model_config(cfg.student.path, "student.path", cfg.trust_remote_code)
            check_student_labels(student_config, splits.label_names, "student.path")
            check_positions(student_config, cfg.data.max_length, "data.max_length", f"student.path ({cfg.student.path})")
        plans, teacher_groups = plan_teachers(
            cfg, splits.label_names, None if cfg.student.trim_vocab else student_tokenizer)
        # the student's tokenizer; build_student replaces it when the vocabulary is trimmed
        return plans, Context(splits=splits, tokenizer=student_tokenizer, teacher_groups=teacher_groups)

    def check_before_writing(self, plans, context):
        """Black-box teachers' files cover every training and validation example; data.perturb's mask
        token exists for every tokenizer; a teacher cache holds these teachers and texts (returned in
        the context)."""
        splits = context.splits
        check_stored_outputs_cover(self.cfg, plans, context.label_names, splits)
        if self.cfg.data.perturb.rate > 0:  # refused before the run directory is written, not at the first step
            for group in context.groups:
                self._mask_token(group.tokenizer)
        if self.cfg.teachers.cache is None:
            return context
        from distill.caches.classifier import ClassifierCache
        from distill.data.text import text_key
        from distill.util.paths import resolve_path

        cache = ClassifierCache(resolve_path(self.cfg.teachers.cache), self.cfg, plans, context.label_names)
        fields = self.cfg.data.text_fields
        for name, split in (("train", splits.train), ("validation", splits.validation)):
            cache.check_covers(name, [text_key(*texts) for texts in zip(*(column(split, f) for f in fields))])
        return replace(context, cache=cache)

    def build_student(self, plans, context, saved=None):
        cfg = self.cfg
        splits = context.splits
        if saved is not None:  # the initial student as the run saved it: not built, pruned or pooled again
            student, tokenizer = saved_student(self, saved, splits.label_names)
        else:
            student, tokenizer = build_student(cfg, splits.label_names, texts_of(splits.train, cfg.data.text_fields))
            if cfg.student.prune.target_params is not None:
                group = [TokenizerGroup(prefix="", tokenizer=tokenizer)]
                rows = tokenize(splits.train, group, cfg.data.text_fields, cfg.data.max_length)
                batches = calibration_batches(rows, Collator(group), cfg.student.prune.calibration_samples, cfg.seed)
                student = prune_student(student, cfg, batches, source_parameter_count(cfg, self.traits.auto_model),
                                        classification_loss)
            if cfg.student.pooling is not None:
                student = to_pooled_student(student, cfg.student.pooling, cfg.student.normalize)
        return student, replace(context, tokenizer=tokenizer)

    def load_teachers(self, plans, device, dtype, context, eager=False):
        cfg = self.cfg

        def load(plan, teacher_dtype):
            return load_sequence_classifier(plan.path, plan.key, cfg.trust_remote_code, teacher_dtype,
                                            cfg.allow_pickled_weights, plan.pooling, plan.normalize, plan.head)

        cache = context.cache
        if cache is not None:  # no teacher weights load: each teacher is its cached logits
            ensemble = TeacherEnsemble(plans, [None] * len(plans), build_configured_interpolation(cfg))
            # what the cache records: the teachers' sizes and the dtype they ran in when it was written
            ensemble.parameter_counts = [teacher["params"] for teacher in cache.meta["teachers"]]
            ensemble.dtype = getattr(torch, cache.meta["dtype"])
            ensemble.on_nonfinite = cfg.teachers.on_nonfinite
            return ensemble, ClassifierTeachers(ensemble, cached_outputs(cache, plans))
        ensemble = load_teachers(cfg, plans, device, dtype, load, eager)
        # a black-box teacher (its model None) is its file, read by example id
        stored = black_box_outputs(cfg, plans, context.label_names) if any(p.outputs for p in plans) else {}
        return ensemble, ClassifierTeachers(ensemble, stored)

    # loss and evaluation -------------------------------------------------------------------
    def loss(self, engine, batch, ensemble, source, now: Dict, context, layers=None):
        cfg = self.cfg
        inputs = {k: v.to(engine.device) for k, v in model_inputs(batch).items()}
        labels = batch[LABELS].to(engine.device)
        outputs, record = student_forward(layers, engine.module, engine, **inputs)
        student_logits = outputs.logits.float()
        target = keep = teacher_logits = signal = None
        skipped = 0
        if ensemble is not None and (now["kd_alpha"] > 0 or layers is not None):
            signal = source.signal(batch, engine.device)
            teacher_logits = signal.logits(0, signal.rows)
        if signal is not None and now["kd_alpha"] > 0:
            # every row reads the KD term, unlabelled transfer rows included
            targets = Targets(ensemble, signal, labels, torch.ones_like(labels, dtype=torch.bool),
                              now["teacher_weights"], now["teacher_temperatures"], unit=self.traits.row_unit)
            target, keep = targets.target(teacher_logits.clone(), 0, signal.rows)
            skipped = targets.skipped
        terms = distillation_loss(student_logits, target, labels, now["kd_alpha"], now["temperature"],
                                  cfg.loss.label_smoothing, keep, self.divergence)
        ratios = None
        if target is not None and ensemble.routing is not None:  # the KD term per route (a figure, not the loss)
            from distill.signals.routing import route_sums

            with torch.no_grad():
                student_log_probs = torch.log_softmax(student_logits / now["temperature"], dim=-1)
                kept = torch.ones_like(labels, dtype=torch.bool) if keep is None else keep
                per_row = now["temperature"] ** 2 * self.divergence(
                    torch.where(kept.unsqueeze(-1), target.to(student_log_probs.dtype), student_log_probs),
                    student_log_probs)
            ratios = route_sums(per_row, signal.route_rows, kept, ensemble.routing.routes, "kd")
        extra = None
        if layers is not None and signal is not None:
            weights = torch.as_tensor(now["teacher_weights"], dtype=torch.float32, device=teacher_logits.device)
            row_weights = ensemble.interpolation.row_weights(teacher_logits, weights, labels)
            aligned = self.aligned_rows(layers, batch, ensemble.plans, engine.device, context)
            terms, extra = layers.add_to(terms, engine.module, record, signal, inputs["attention_mask"],
                                         row_weights, aligned)
            extra.update({f"{ensemble.names[k]}/aligned_rows": float(rows.float().mean())
                          for k, rows in aligned.items()})
        if UNMASKED_ROWS in batch:
            extra = dict(extra or {}, **{"perturb/unmasked_rows": batch[UNMASKED_ROWS]})
        teacher_kl = teacher_correct = None
        labelled_rows = labels != IGNORE_INDEX
        if teacher_logits is not None and (keep is None or bool(keep.all())):
            teacher_kl = per_teacher_kl(ensemble.log_probs(teacher_logits), student_logits, now["temperature"])
            teacher_correct = ((teacher_logits.argmax(-1) == labels) & labelled_rows).sum(dim=-1)
        return terms, StepFigures(terms.total.item(), terms.kd.item(), terms.ce.item(), len(labels), skipped,
                                  teacher_kl, teacher_correct, int(labelled_rows.sum()), extra, ratios)

    def aligned_rows(self, layers, batch, plans, device, context) -> Dict[int, torch.Tensor]:
        """{teacher k of loss.intermediate: [B] rows where it read the student's tokens}: every row for a
        teacher reading the student's ids; with its own encoding, rows that match token for token."""
        from distill.models.layer_hooks import aligned_rows

        rows = {}
        student_ids, student_mask = batch["input_ids"], batch["attention_mask"]
        for plan in layers.plans:
            prefix = plans[plan.teacher].input_prefix
            if prefix == "":
                rows[plan.teacher] = torch.ones(student_ids.shape[0], dtype=torch.bool, device=device)
                continue
            rows[plan.teacher] = aligned_rows(student_ids, student_mask, batch[prefix + "input_ids"],
                                              batch[prefix + "attention_mask"],
                                              self._token_map(context, prefix)).to(device)
        return rows

    def _token_map(self, context, prefix: str) -> torch.Tensor:
        """[V_student] the teacher group `prefix`'s id of each student token (a memo per pair of tokenizers)."""
        from distill.models.layer_hooks import token_map

        teacher_tokenizer = next(g.tokenizer for g in context.teacher_groups if g.prefix == prefix)
        key = (id(context.tokenizer), id(teacher_tokenizer))
        if key not in self.token_maps:
            self.token_maps[key] = (context.tokenizer, teacher_tokenizer, token_map(context.tokenizer, teacher_tokenizer))
        return self.token_maps[key][2]

    def evaluate(self, model, ensemble, source, device, validation, context):
        """(metrics per model, metrics per evaluation domain and model): accuracy and macro-F1."""
        loader = validation_loader(validation, self.collator(context), self.cfg.training.eval_batch_size)
        functions = {"student": student_logits_fn(model, device)}
        known = self.teacher_predictions.of(ensemble)  # teachers are frozen: evaluated once
        if ensemble is not None and not known:
            functions.update(teacher_logit_fns(ensemble, source, device))
        predictions = predict(loader, functions)
        if ensemble is not None:
            if not known:
                known.update({k: v for k, v in predictions.by_model.items() if k != "student"})
            predictions.by_model.update(known)
        label_names = context.label_names
        count = len(label_names)
        texts = column(context.splits.validation, self.cfg.data.text_fields[0]) if self.cfg.data.eval_domains else []
        domains = {}
        for domain in self.cfg.data.eval_domains:  # predictions are in validation index order
            rows = set(rows_matching(texts, domain.match, domain.invert_match))
            if rows:
                domains[domain.name] = predictions.metrics(count, rows)
        routes = plan_routes(self.cfg)
        for route, value in enumerate(routes.values if routes is not None else []):
            rows = set(rows_of_route(validation, route))
            if rows:  # each route's validation rows (teachers.route_by)
                domains[f"route.{value}"] = predictions.metrics(count, rows)
        return Evaluation(predictions.metrics(count), domains, {
            "label_names": label_names, "references": predictions.references, **predictions.by_model})

    def validation_chunks(self, ensemble, source, device, validation, context, route=None):
        loader = validation_loader(of_route(validation, route), self.collator(context),
                                   self.cfg.training.eval_batch_size)
        logits, labels = collect_teacher_logits(loader, source, device)
        return FitRows(in_memory(logits, labels))

    # saved models (export) -------------------------------------------------------------------
    def saved_model_scoring(self, tokenizer) -> SavedModelScoring:
        from distill.evaluation.predictions import score_classifier, validation_batches

        loader, _ = validation_batches(self.cfg, tokenizer)
        return SavedModelScoring(loader, lambda model: score_classifier(model, loader, model.config.num_labels))

    # description ---------------------------------------------------------------------------
    def format_table(self, report: Dict) -> str:
        return format_table(report)

    def model_card(self, report: Dict, model_config, dtype: str, compression=None, parity=None) -> str:
        names = [model_config.id2label[i] for i in sorted(model_config.id2label)]
        return model_card(report, names, dtype, compression, parity)


def classification_loss(model, batch) -> torch.Tensor:
    """Cross-entropy of the model's logits on the batch's labels (student.prune's depth_metric=loss)."""
    logits = model(**model_inputs(batch)).logits.float()
    return torch.nn.functional.cross_entropy(logits, batch[LABELS], ignore_index=IGNORE_INDEX)
