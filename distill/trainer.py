"""The training run: orchestration only. Formulas live in interpolate.py and losses.py.

Order of work, so that bad input fails before anything is loaded or written:
config (validated) -> data read and split -> teachers' labels and tokenizers checked -> run
directory -> student and teachers loaded -> DeepSpeed engine -> train / evaluate / checkpoint ->
report -> export.
"""
from __future__ import annotations

import random
import shutil
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import torch
from torch.utils.data import DataLoader
from torch.utils.data.distributed import DistributedSampler

from omegaconf import OmegaConf

from distill import distributed
from distill.checkpointing import (MANIFEST, CheckpointWriteError, ResumableSampler, content_hash,
                                   latest_complete_tag, load_rng_state, read_manifest, restore_latest,
                                   save_rng_state, unsafe_changes, write_manifest)
from distill.config import ConfigError, DistillConfig, to_yaml
from distill.paths import links_leaving
from distill.data import (Collator, LABELS, SOURCE, TokenizerGroup, model_inputs, read_splits, rows_matching, texts_of,
                          tokenize)
from distill.deepspeed_config import build_deepspeed_config, build_optimizer, build_scheduler
from distill.evaluation import (Predictions, collect_teacher_logits, predict, student_logits_fn, teacher_logit_fns,
                                validation_loader)
from distill.fit_weights import fit_interpolation_state, load_state, save_state, state_digest
from distill.interpolate import normalize_weights
from distill.schedules import value_at
from distill.hardware import local_device, teacher_dtype
from distill.losses import IGNORE_INDEX, build_divergence, distillation_loss, per_teacher_kl
from distill.mixture import MixtureBatchSampler
from distill.modeling import count_parameters, load_model_config, load_tokenizer
from distill.report import build_report, format_table, write_json
from distill.student import build_student, check_student_labels
from distill.teachers import TeacherEnsemble, load_teachers, plan_teachers
from distill.tracking import MetricsLogger, plot_curves

CHECKPOINTS = "checkpoints"
STUDENT_INIT = "student_init"
INTERPOLATION = "interpolation"


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class LogWindow:
    """Sums of per-micro-batch figures between two log lines."""

    def __init__(self, teacher_names: List[str]):
        self.teacher_names = teacher_names
        self.reset()

    def reset(self) -> None:
        self.micro_batches = 0
        self.samples = 0
        self.started = time.perf_counter()
        self.sums = torch.zeros(3 + 3 * len(self.teacher_names), dtype=torch.float64)

    def add(self, loss: float, kd: float, ce: float, samples: int, teacher_kl: Optional[torch.Tensor] = None,
            teacher_correct: Optional[torch.Tensor] = None, labelled: int = 0) -> None:
        self.micro_batches += 1
        self.samples += samples
        count = len(self.teacher_names)
        self.sums[:3] += torch.tensor([loss, kd, ce], dtype=torch.float64)
        if teacher_kl is not None and count:
            self.sums[3:3 + count] += teacher_kl.double().cpu()
            self.sums[3 + count:3 + 2 * count] += teacher_correct.double().cpu()
            self.sums[3 + 2 * count:] += labelled

    def summary(self) -> Dict[str, float]:
        """Means over micro-batches and ranks; batch accuracies pooled over labelled rows."""
        sums = distributed.mean_across_ranks(self.sums)
        micro = max(self.micro_batches, 1)
        elapsed = max(time.perf_counter() - self.started, 1e-9)
        values = {"loss": sums[0].item() / micro, "kd": sums[1].item() / micro, "ce": sums[2].item() / micro,
                  "samples_per_s": self.samples * distributed.world_size() / elapsed}
        count = len(self.teacher_names)
        for k, name in enumerate(self.teacher_names):
            values[f"{name}/kl_to_student"] = sums[3 + k].item() / micro
            labelled = sums[3 + 2 * count + k].item()
            if labelled > 0:
                values[f"{name}/batch_accuracy"] = sums[3 + count + k].item() / labelled
        return values


class Trainer:
    def __init__(self, cfg: DistillConfig):
        self.cfg = cfg
        self.run_dir = Path(cfg.output_dir)
        self.device = local_device()
        self.engine = None
        self.ensemble: Optional[TeacherEnsemble] = None
        self.teacher_predictions: Optional[Predictions] = None
        self.skipped_rows = 0  # rows left out of the KD term for non-finite teacher logits (this rank)
        self.teacher_hashes: Optional[List[str]] = None
        self.divergence = build_divergence(cfg.loss.divergence, jsd_beta=cfg.loss.jsd_beta, skew=cfg.loss.skew)

    # ----------------------------------------------------------------- set-up, in failing order
    def prepare(self) -> None:
        cfg = self.cfg
        distributed.init_distributed()
        seed_everything(cfg.seed)
        self.splits = read_splits(cfg.data)
        self.label_names = self.splits.label_names
        student_source, key = ((cfg.student.path, "student.path") if cfg.student.path is not None
                               else (self._student_teacher_path(), "student.from_teacher"))
        if cfg.student.path is not None:
            check_student_labels(load_model_config(cfg.student.path, key, cfg.trust_remote_code),
                                 self.label_names, key)
        if cfg.student.trim_vocab and cfg.teachers.models and cfg.teachers.tokenization == "shared":
            raise ConfigError("student.trim_vocab gives the student its own vocabulary: "
                              "set teachers.tokenization=per_model so each teacher encodes the text itself")
        base_tokenizer = load_tokenizer(student_source, key, cfg.trust_remote_code)
        self.teacher_plans, self.teacher_groups = plan_teachers(
            cfg, self.label_names, None if cfg.student.trim_vocab else base_tokenizer)
        self.resume_from = self._find_resume_point()
        self._make_run_dir()

        student, tokenizer = build_student(cfg, self.label_names, texts_of(self.splits.train, cfg.data.text_fields))
        self.tokenizer = tokenizer
        self.groups = [TokenizerGroup(prefix="", tokenizer=tokenizer)] + self.teacher_groups
        if distributed.is_main():  # the initial student, whole: export rebuilds from it, WiSE-FT mixes with it
            student.save_pretrained(self.run_dir / STUDENT_INIT)
            tokenizer.save_pretrained(self.run_dir / STUDENT_INIT)
        self.train_set = tokenize(self.splits.train, self.groups, cfg.data.text_fields, cfg.data.max_length)
        self.validation_set = tokenize(self.splits.validation, self.groups, cfg.data.text_fields, cfg.data.max_length)
        self.collator = Collator(self.groups)

        if self.teacher_plans:
            dtype = teacher_dtype(cfg.teachers.dtype, self.device)
            self.ensemble = load_teachers(cfg, self.teacher_plans, self.device, dtype)
            self.teacher_params = [count_parameters(m) for m in self.ensemble.models]
            self._prepare_interpolation()
        else:
            self.teacher_params = []
        self.student_params = count_parameters(student)
        self._build_engine(student)

    def _prepare_interpolation(self) -> None:
        """Fit the interpolation on validation (rank 0, broadcast), or reload the fit on resume."""
        cfg = self.cfg
        folder = self.run_dir / INTERPOLATION
        state = load_state(folder) if self.resume_from is not None else None
        if state is None and cfg.interpolation.fit_on == "validation":
            loader = validation_loader(self.validation_set, self.collator, cfg.training.eval_batch_size)
            logits, labels = collect_teacher_logits(loader, self.ensemble, self.device)
            if distributed.is_main():
                state = fit_interpolation_state(
                    cfg.interpolation.method, logits, labels, self.ensemble.weights, self.ensemble.temperatures,
                    cfg.interpolation.fit_temperatures, dict(cfg.interpolation.learned_gate), seed=cfg.seed)
            state = distributed.broadcast_object(state)
            if distributed.is_main():
                save_state(state, folder)
        if state is None:
            return
        self.ensemble.load_interpolation_state(state)
        for plan, weight, temperature in zip(self.teacher_plans, state["weights"], state["temperatures"]):
            plan.weight, plan.temperature = weight, temperature
        # one write: under the launcher, ranks share stdout, and print() writes text and newline apart
        sys.stdout.write(f"interpolation state rank {distributed.rank()}: {state_digest(state)} "
                         f"weights={[round(w, 4) for w in state['weights']]}\n")
        sys.stdout.flush()

    def mixture_proportions(self, step: int) -> List[float]:
        """Scheduled proportions of data.mixture_sources at an optimizer step, normalised."""
        weights = value_at(self.cfg.schedules.data_mixture, None, step, self.total_steps)
        return normalize_weights(torch.tensor(weights, dtype=torch.float64)).tolist()

    def _scheduled(self, step: int) -> Dict:
        """kd_alpha, temperature and teacher weights at this optimizer step (schedules.py)."""
        cfg, schedules = self.cfg, self.cfg.schedules
        weights = None
        if self.ensemble is not None:
            weights = value_at(schedules.teacher_weights, self.ensemble.weights.tolist(), step, self.total_steps)
        return {"kd_alpha": value_at(schedules.kd_alpha, cfg.loss.kd_alpha, step, self.total_steps),
                "temperature": value_at(schedules.temperature, cfg.loss.temperature, step, self.total_steps),
                "teacher_weights": weights}

    def _student_teacher_path(self) -> str:
        from distill.config import resolve_teacher_index

        return self.cfg.teachers.models[resolve_teacher_index(self.cfg, self.cfg.student.from_teacher)].path

    def _find_resume_point(self) -> Optional[Path]:
        escapes = links_leaving(self.run_dir)
        if escapes:
            link, target = escapes[0]
            raise ConfigError(f"output_dir: {link} is a symbolic link to {target}, outside the run directory; "
                              "distill writes only inside output_dir: remove the link or choose another output_dir")
        checkpoints = self.run_dir / CHECKPOINTS
        has_checkpoint = (checkpoints / "latest").is_file()
        if self.cfg.training.resume == "auto":
            if has_checkpoint:
                self._check_resume_is_safe(checkpoints / (checkpoints / "latest").read_text().strip())
            return checkpoints if has_checkpoint else None
        if has_checkpoint or (self.run_dir / "report.json").exists():
            raise ConfigError(f"output_dir {self.run_dir} already holds a run: choose another output_dir, "
                              "or set training.resume=auto to continue it")
        return None

    def _check_resume_is_safe(self, tag_dir: Path) -> None:
        """Refuse to resume when the model, teachers, data or loss changed since the checkpoint."""
        if not (tag_dir / MANIFEST).is_file():
            raise ConfigError(f"training.resume=auto: checkpoint {tag_dir} has no {MANIFEST}; it was not written "
                              "by this version of distill and cannot be resumed exactly")
        manifest = read_manifest(tag_dir)
        changed = unsafe_changes(manifest["config"], OmegaConf.to_container(self.cfg, resolve=True))
        for index, saved in enumerate(manifest["teachers"]):
            if index < len(self.cfg.teachers.models) and content_hash(self.cfg.teachers.models[index].path) != saved["hash"]:
                changed.append(f"teachers.models[{index}] content ({saved['path']} changed on disk)")
        if changed:
            raise ConfigError("training.resume=auto: these settings differ from the checkpoint and would make the "
                              f"resumed run unsafe: {changed}; restore them or start a new output_dir")

    def _make_run_dir(self) -> None:
        if distributed.is_main():
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.yaml").write_text(to_yaml(self.cfg), encoding="utf-8")
        distributed.barrier()
        self.logger = MetricsLogger(self.run_dir, enabled=distributed.is_main())

    def _build_engine(self, student) -> None:
        import deepspeed

        cfg = self.cfg
        sampler = ResumableSampler(DistributedSampler(self.train_set, num_replicas=distributed.world_size(),
                                                      rank=distributed.rank(), shuffle=True, seed=cfg.seed,
                                                      drop_last=True))
        self.train_sampler = sampler
        # A generator of its own: creating an iterator must not draw from the global RNG, which
        # dropout uses and which a resume restores.
        self.train_loader = DataLoader(self.train_set, batch_size=cfg.training.micro_batch_size, sampler=sampler,
                                       collate_fn=self.collator, drop_last=True,
                                       generator=torch.Generator().manual_seed(cfg.seed))
        if len(self.train_loader) == 0:
            raise ConfigError(f"training.micro_batch_size={cfg.training.micro_batch_size} x "
                              f"{distributed.world_size()} ranks exceeds the {len(self.train_set)} training rows")
        self.mixture = None
        if cfg.data.mixture_sources:  # batches drawn from the sources with scheduled proportions
            sources = self.train_set[SOURCE]
            rows = [[i for i, s in enumerate(sources) if s == k] for k in range(len(self.splits.source_names))]
            self.mixture = MixtureBatchSampler(
                rows, self.mixture_proportions, cfg.training.micro_batch_size, cfg.training.gradient_accumulation_steps,
                distributed.world_size(), distributed.rank(), cfg.seed)
            self.train_loader = DataLoader(self.train_set, batch_sampler=self.mixture, collate_fn=self.collator,
                                           generator=torch.Generator().manual_seed(cfg.seed))
        accumulation = cfg.training.gradient_accumulation_steps
        if cfg.training.max_steps is not None:
            self.total_steps = cfg.training.max_steps
        else:
            self.total_steps = max(1, int(cfg.training.epochs * len(self.train_loader)) // accumulation)
        optimizer = build_optimizer(student, cfg.training)
        scheduler = build_scheduler(optimizer, cfg.training, self.total_steps)
        ds_config = build_deepspeed_config(cfg, distributed.world_size())
        self.engine, *_ = deepspeed.initialize(model=student, optimizer=optimizer, lr_scheduler=scheduler,
                                               config=ds_config)
        self.start_epoch, self.skip_batches = 0, 0
        if self.resume_from is not None:
            path, client_state = self.engine.load_checkpoint(str(self.resume_from))
            self.start_epoch = client_state["epoch"]
            self.skip_batches = client_state["batches_in_epoch"]
            load_rng_state(Path(path).parent if Path(path).is_file() else Path(path), distributed.rank())
            if self.mixture is not None:
                self.mixture.start_micro_step = self.engine.global_steps * accumulation
            if distributed.is_main():
                print(f"resumed from step {self.engine.global_steps} (epoch {self.start_epoch}, "
                      f"batch {self.skip_batches})", flush=True)

    # ----------------------------------------------------------------------------- training
    def _micro_step(self, batch: Dict, window: LogWindow) -> None:
        cfg, engine = self.cfg, self.engine
        inputs = {k: v.to(engine.device) for k, v in model_inputs(batch).items()}
        labels = batch[LABELS].to(engine.device)
        student_logits = engine(**inputs).logits.float()
        now = self._scheduled(engine.global_steps)
        teacher_logits = target = None
        kd_mask = None
        if self.ensemble is not None and now["kd_alpha"] > 0:
            teacher_logits = self.ensemble.logits(batch, engine.device)
            finite_rows = torch.isfinite(teacher_logits).all(dim=-1).all(dim=0)
            if not finite_rows.all():  # only reachable with teachers.on_nonfinite=skip
                kd_mask = finite_rows
                self.skipped_rows += int((~finite_rows).sum())
                teacher_logits = torch.where(finite_rows[None, :, None], teacher_logits, torch.zeros_like(teacher_logits))
            target = self.ensemble.target(teacher_logits, labels, now["teacher_weights"])
        terms = distillation_loss(student_logits, target, labels, now["kd_alpha"], now["temperature"],
                                  cfg.loss.label_smoothing, kd_mask, self.divergence)
        engine.backward(terms.total)
        engine.step()
        teacher_kl = teacher_correct = None
        labelled_rows = labels != IGNORE_INDEX
        if teacher_logits is not None and kd_mask is None:
            teacher_kl = per_teacher_kl(self.ensemble.log_probs(teacher_logits), student_logits, now["temperature"])
            teacher_correct = ((teacher_logits.argmax(-1) == labels) & labelled_rows).sum(dim=-1)
        window.add(terms.total.item(), terms.kd.item(), terms.ce.item(), len(labels), teacher_kl,
                   teacher_correct, int(labelled_rows.sum()))

    def train(self) -> Dict:
        cfg = self.cfg
        names = self.ensemble.names if self.ensemble is not None else []
        self.has_schedules = any(cfg.schedules[name] is not None for name in ("kd_alpha", "temperature", "teacher_weights"))
        window = LogWindow(names)
        progress = None
        if cfg.training.progress_bar and distributed.is_main():
            from tqdm.auto import tqdm

            progress = tqdm(total=self.total_steps, initial=self.engine.global_steps, desc="distill", unit="step")
        started = time.perf_counter()
        epoch = self.start_epoch
        drawn_sources = torch.zeros(len(self.splits.source_names), dtype=torch.float64)
        scheduled_sources = torch.zeros_like(drawn_sources)
        self.engine.train()
        while self.engine.global_steps < self.total_steps:
            if self.mixture is None:
                self.train_sampler.set_epoch(epoch, skip_samples=self.skip_batches * cfg.training.micro_batch_size)
            for position, batch in enumerate(self.train_batches(), start=self.skip_batches):
                before = self.engine.global_steps
                if self.mixture is not None:  # what this micro-batch was drawn with, and what it got
                    scheduled_sources += torch.tensor(self.mixture_proportions(self.engine.global_steps), dtype=torch.float64)
                    drawn_sources += torch.bincount(batch[SOURCE], minlength=len(drawn_sources)).double()
                self._micro_step(batch, window)
                step = self.engine.global_steps
                if step == before:
                    continue
                if progress is not None:
                    progress.update(step - before)
                if self.has_schedules:  # scheduled values at every optimizer step
                    now = self._scheduled(step)
                    scheduled = {"kd_alpha": now["kd_alpha"], "temperature": now["temperature"]}
                    if now["teacher_weights"] is not None:
                        scheduled.update({f"{n}/weight": w for n, w in zip(
                            names, normalize_weights(torch.tensor(now["teacher_weights"])).tolist())})
                    self.logger.log(step, scheduled, kind="schedule")
                if step % cfg.training.log_every == 0 or step == self.total_steps:
                    values = window.summary()
                    values["lr"] = self.engine.get_lr()[0]
                    if self.mixture is not None:  # drawn in this window, next to the window's mean scheduled mix
                        drawn = distributed.mean_across_ranks(drawn_sources)
                        drawn = drawn / drawn.sum().clamp(min=1)
                        scheduled = scheduled_sources / scheduled_sources.sum().clamp(min=1e-12)
                        for name, share, fraction in zip(self.splits.source_names, scheduled.tolist(), drawn.tolist()):
                            values[f"mixture/{name}/scheduled"] = share
                            values[f"mixture/{name}/drawn"] = fraction
                        drawn_sources.zero_()
                        scheduled_sources.zero_()
                    skipped = distributed.mean_across_ranks(torch.tensor([float(self.skipped_rows)]))
                    values["skipped_nonfinite_rows"] = round(float(skipped) * distributed.world_size())
                    now = self._scheduled(step)
                    values.update(kd_alpha=now["kd_alpha"], temperature=now["temperature"])
                    if names:
                        weights = normalize_weights(torch.tensor(now["teacher_weights"])).tolist()
                        values.update({f"{n}/weight": w for n, w in zip(names, weights)})
                    self.logger.log(step, values)
                    if progress is not None:
                        progress.set_postfix(loss=f"{values['loss']:.4f}", samples_s=f"{values['samples_per_s']:.1f}")
                    window.reset()
                if cfg.training.eval_every and step % cfg.training.eval_every == 0 and step < self.total_steps:
                    self.evaluate(step)
                    self.engine.train()
                if step % cfg.training.checkpoint_every == 0 or step == self.total_steps:
                    self.save_checkpoint(epoch, position + 1)
                if step >= self.total_steps:
                    break
            self.skip_batches = 0
            epoch += 1
        if progress is not None:
            progress.close()
        return {"steps": self.engine.global_steps, "seconds": time.perf_counter() - started}

    def save_checkpoint(self, epoch: int, batches_in_epoch: int) -> None:
        root = self.run_dir / CHECKPOINTS
        tag = f"step{self.engine.global_steps:07d}"
        position = {"epoch": epoch, "batches_in_epoch": batches_in_epoch, "global_step": self.engine.global_steps}
        previous = latest_complete_tag(root)
        try:
            self._write_checkpoint(root, tag, position)
        except (OSError, RuntimeError) as error:
            # A full disk or a quota: torch.save reports a failed write as a RuntimeError from its zip
            # writer ("unexpected pos", "file write failed"), plain file writes as an OSError.
            # Either way, leave no half-written tag behind.
            if distributed.is_main():
                shutil.rmtree(root / tag, ignore_errors=True)
                restore_latest(root, previous)  # DeepSpeed may have written `latest` before a later file failed
            raise CheckpointWriteError(
                f"checkpoint {tag} could not be written to {root}: {error}. Its partial folder was removed; the "
                f"newest complete checkpoint is {previous or 'none'}. Free space and rerun with "
                "training.resume=auto.") from error
        if distributed.is_main():
            tags = sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step"))
            for old in tags[:-self.cfg.training.keep_checkpoints]:
                shutil.rmtree(old, ignore_errors=True)
        distributed.barrier()

    def _write_checkpoint(self, root: Path, tag: str, position: Dict) -> None:
        # Our files go in first: DeepSpeed writes `latest` last, so a tag that `latest` names is whole.
        save_rng_state(root / tag, distributed.rank())
        if distributed.is_main():
            if self.teacher_hashes is None:  # hashing teacher files is costly for big teachers: once per run
                self.teacher_hashes = [content_hash(plan.path) for plan in self.teacher_plans]
            teachers = [{"name": plan.name, "path": plan.path, "hash": digest, "weight": plan.weight,
                         "temperature": plan.temperature} for plan, digest in zip(self.teacher_plans, self.teacher_hashes)]
            interpolation = self.ensemble.interpolation_state() if self.ensemble is not None else {}
            interpolation.pop("gate", None)  # tensors: saved in RUN_DIR/interpolation/gate.safetensors
            write_manifest(root / tag, OmegaConf.to_container(self.cfg, resolve=True), teachers, interpolation, position)
        distributed.barrier()
        self.engine.save_checkpoint(str(root), tag=tag, client_state=position)
        distributed.barrier()

    # --------------------------------------------------------------------------- evaluation
    def evaluate(self, step: int) -> Dict[str, Dict[str, float]]:
        loader = validation_loader(self.validation_set, self.collator, self.cfg.training.eval_batch_size)
        self.engine.eval()
        functions = {"student": student_logits_fn(self.engine, self.engine.device)}
        if self.ensemble is not None and self.teacher_predictions is None:
            functions.update(teacher_logit_fns(self.ensemble, self.engine.device))
        predictions = predict(loader, functions)
        if self.ensemble is not None:
            if self.teacher_predictions is None:  # teachers are frozen: evaluate them once
                self.teacher_predictions = Predictions(predictions.references, {
                    k: v for k, v in predictions.by_model.items() if k != "student"})
            predictions.by_model.update(self.teacher_predictions.by_model)
        self.last_predictions = predictions
        metrics = predictions.metrics(len(self.label_names))
        logged = {f"{model}/{name}": value for model, figures in metrics.items() for name, value in figures.items()}
        texts = self.splits.validation[self.cfg.data.text_fields[0]]
        for domain in self.cfg.data.eval_domains:  # predictions are in validation index order
            rows = set(rows_matching(texts, domain.match, domain.invert_match))
            if rows:
                for model, figures in predictions.metrics(len(self.label_names), rows).items():
                    logged.update({f"{model}/{domain.name}/{name}": value for name, value in figures.items()})
        self.logger.log(step, logged, kind="eval")
        return metrics

    # ----------------------------------------------------------------------------- the run
    def run(self) -> Dict:
        self.prepare()
        summary = self.train()
        metrics = self.evaluate(self.engine.global_steps)
        report = None
        if distributed.is_main():
            report = self.build_report(metrics, summary)
            write_json(self.run_dir / "report.json", report)
            plot_curves(self.run_dir / "metrics.jsonl", self.run_dir / "training_curves.png",
                        title=f"{Path(self.cfg.output_dir).name}")
        self.logger.close()
        distributed.barrier()
        if distributed.is_main():
            from distill.export import export_run

            export_dir = export_run(self.run_dir, self.run_dir / "student", dtype=self.cfg.export.dtype, overwrite=True)
            report["export_dir"] = str(export_dir)
            write_json(self.run_dir / "report.json", report)
            print(self.format_table(report), flush=True)
        # no barrier after the export: the other ranks have nothing left to do, and a long export
        # (a big model) must not run into their collective timeout
        return report

    def build_report(self, metrics: Dict, summary: Dict) -> Dict:
        """report.json's content (main rank), after writing the validation predictions."""
        write_json(self.run_dir / "eval" / "predictions.json", {
            "label_names": self.label_names, "references": self.last_predictions.references,
            **self.last_predictions.by_model})
        return build_report(self.cfg, self.teacher_plans, self.teacher_params, self.student_params,
                            metrics, summary, self.train_set, self.validation_set)

    def format_table(self, report: Dict) -> str:
        return format_table(report)

    def train_batches(self):
        """The micro-batches of an epoch; a task may annotate them (the causal LM adds each step's
        global token count)."""
        return self.train_loader


def trainer_for(cfg: DistillConfig) -> Trainer:
    """The trainer of `cfg.task`: the shared loop, with the task's data, loss and metrics."""
    if cfg.task == "causal_lm":
        from distill.causal_lm import CausalLMTrainer

        return CausalLMTrainer(cfg)
    return Trainer(cfg)


def train(cfg: DistillConfig) -> Optional[Dict]:
    return trainer_for(cfg).run()
