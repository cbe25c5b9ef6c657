"""The training run: one loop for every task, orchestration only. Formulas live in interpolation/strategies.py,
formulas/divergences.py and formulas/token_loss.py; data, the loss's inputs, metrics and reports in the task (tasks/).

Order of work, so that bad input fails before anything is loaded or written:
config (validated, then by the task) -> data read and split -> teachers' labels and tokenizers
checked -> run directory -> student and teachers loaded -> interpolation fitted (rank 0, broadcast)
-> DeepSpeed engine -> train / evaluate / checkpoint -> report -> export.
"""
from __future__ import annotations

import math
import random
import shutil
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset
from distill.errors import CheckpointWriteError, DivergedError, NonFiniteLogitsError
from torch.utils.data.distributed import DistributedSampler

from omegaconf import OmegaConf

import distill.runtime.distributed as distributed
from distill.runtime.checkpointing import (MANIFEST, ResumableSampler, content_hash,
                                   input_hashes, latest_complete_tag, load_rng_state, newest_intact_tag, only_tensors,
                                   read_best, read_manifest, restore_latest, seal_manifest, write_best,
                                   write_failure_advice, save_rng_state, unsafe_changes, write_manifest)
from distill.config.schema import DistillConfig, to_yaml
from distill.errors import ConfigError
from distill.data.text import SOURCE, column
from distill.run.deepspeed_config import build_deepspeed_config, build_optimizer, build_scheduler, global_batch
from distill.run.fit_weights import load_state, save_state, state_digest
from distill.run.plan import check_fits
from distill.run.precision import teacher_precision_drift
from distill.runtime.hardware import local_device
from distill.formulas.mixtures import normalize_weights
from distill.data.mixture import MixtureBatchSampler
from distill.models.loading import count_parameters
from distill.util.outputs import RUN_MARKER, RunLock, check_run_directory
from distill.util.paths import links_leaving
from distill.evaluation.report import build_report, selection_line, write_json
from distill.models.layer_hooks import attach_layer_terms
from distill.models.student import check_layer_maps, check_prune_budget, check_student_layers
from distill.formulas.schedules import value_at
from distill.tasks.setup import Setup
from distill.tasks.base import StepFigures
from distill.run.tracking import MetricsLogger, plot_curves

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
        self.extras: Dict[str, float] = {}  # the same names on every rank (the same terms run there)
        self.ratios: Dict[str, List[float]] = {}  # name -> [sum, count]

    def add(self, figures: StepFigures) -> None:
        self.micro_batches += 1
        self.samples += figures.samples
        count = len(self.teacher_names)
        self.sums[:3] += torch.tensor([figures.loss, figures.kd, figures.ce], dtype=torch.float64)
        for name, value in (figures.extra or {}).items():
            self.extras[name] = self.extras.get(name, 0.0) + value
        for name, (total, counted) in (figures.ratios or {}).items():
            held = self.ratios.setdefault(name, [0.0, 0.0])
            held[0] += total
            held[1] += counted
        if figures.teacher_kl is not None and count:
            self.sums[3:3 + count] += figures.teacher_kl.double().cpu()
            self.sums[3 + count:3 + 2 * count] += figures.teacher_correct.double().cpu()
            self.sums[3 + 2 * count:] += figures.labelled

    def summary(self) -> Dict[str, float]:
        """Means over micro-batches and ranks; batch accuracies pooled over labelled rows."""
        sums = distributed.mean_across_ranks(self.sums)
        micro = max(self.micro_batches, 1)
        elapsed = max(time.perf_counter() - self.started, 1e-9)
        values = {"loss": sums[0].item() / micro, "kd": sums[1].item() / micro, "ce": sums[2].item() / micro,
                  "samples_per_s": self.samples * distributed.world_size() / elapsed}
        if self.extras:
            names = sorted(self.extras)
            means = distributed.mean_across_ranks(torch.tensor([self.extras[n] for n in names], dtype=torch.float64))
            values.update({name: value / micro for name, value in zip(names, means.tolist())})
        if self.ratios:  # sums and counts over every rank, then their ratio (none where nothing was counted)
            names = sorted(self.ratios)
            held = distributed.mean_across_ranks(torch.tensor([self.ratios[n] for n in names], dtype=torch.float64))
            values.update({name: total / count for name, (total, count) in zip(names, held.tolist()) if count > 0})
        count = len(self.teacher_names)
        for k, name in enumerate(self.teacher_names):
            labelled = sums[3 + 2 * count + k].item()
            if labelled > 0:  # tasks that report per-teacher monitors (classification)
                values[f"{name}/kl_to_student"] = sums[3 + k].item() / micro
                values[f"{name}/batch_accuracy"] = sums[3 + count + k].item() / labelled
        return values


def apply_global_batch(training, world_size: int) -> None:
    """training.global_batch_size -> the accumulation steps for this rank count (exact, or refused)."""
    if training.global_batch_size is None:
        return
    per_step = training.micro_batch_size * world_size
    if training.global_batch_size % per_step:
        raise ConfigError(f"training.global_batch_size={training.global_batch_size} is not a multiple of "
                          f"micro_batch_size {training.micro_batch_size} x {world_size} rank(s) = {per_step}: change "
                          "one of them")
    steps = training.global_batch_size // per_step
    if training.gradient_accumulation_steps not in (1, steps):  # a run's saved config, resumed on other ranks
        raise ConfigError(f"training.gradient_accumulation_steps={training.gradient_accumulation_steps} and "
                          f"global_batch_size={training.global_batch_size} disagree on {world_size} rank(s) "
                          f"({steps} steps needed): remove training.gradient_accumulation_steps")
    from omegaconf import read_write

    with read_write(training):  # the one value derived after load: it needs the rank count
        training.gradient_accumulation_steps = steps


def describe_global_batch(training, world_size: int, unit: str) -> str:
    total = global_batch(training, world_size)
    return (f"effective global batch: {training.micro_batch_size} {unit}s per micro-batch x "
            f"{training.gradient_accumulation_steps} accumulation step(s) x {world_size} rank(s) = {total} {unit}s "
            "per optimizer step")


class Trainer:
    def __init__(self, cfg: DistillConfig):
        self.cfg = cfg
        self.setup = Setup(cfg)  # the set-up sequence every command shares (tasks/setup.py)
        self.task = self.setup.task
        self.run_dir = Path(cfg.output_dir)
        self.device = local_device()
        self.engine = None
        self.ensemble = None  # teachers.TeacherEnsemble: plans, interpolation, weights, temperatures
        self.source = None  # where the teachers' signal comes from (signals/sources.py): live models or a cache
        self.skipped_rows = 0  # rows left out of the KD term for non-finite teacher logits (this rank)
        self.teacher_hashes: Optional[List[str]] = None
        self.lock = RunLock(self.run_dir)
        self.best: Optional[Dict] = None  # training.select_best: the best evaluation so far (checkpoints/best.json)
        self.last_predictions: Optional[Dict] = None  # the last evaluation's per-row predictions (Evaluation)

    # ----------------------------------------------------------------- set-up, in failing order
    def prepare(self) -> None:
        cfg, task = self.cfg, self.task
        self.device = self.setup.start()  # the process group first: the global batch needs the rank count
        seed_everything(cfg.seed)
        apply_global_batch(cfg.training, distributed.world_size())
        setup = self.setup.plan()
        self.splits, self.teacher_plans = setup.splits, setup.plans
        self._check_before_writing()
        check_fits(cfg, distributed.world_size())  # the memory plan, before any weight loads (run/plan.py)
        self._refuse_links_leaving()
        check_run_directory(self.run_dir)
        self.resume_tag: Optional[str] = None  # the checkpoint a resume loads (_find_resume_point)
        self.resume_from = self._find_resume_point()
        if self.resume_from is not None and cfg.training.select_best.metric is not None:
            self.best = read_best(self.resume_from)
        if distributed.is_main():  # the first write: nothing above writes, everything above can refuse
            self.lock.acquire()
        self._make_run_dir()
        self.splits = setup.extend_training_data(self.run_dir)  # e.g. augmented transfer rows, made once, kept in the run

        initial = self.run_dir / STUDENT_INIT
        # on resume, the initial student the run saved: trimming and pruning are not redone
        saved = initial if self.resume_from is not None and (initial / "config.json").is_file() else None
        student, tokenizer = setup.build_student(saved=saved)
        # the initial student, whole: export rebuilds from it, WiSE-FT mixes with it
        if saved is None and distributed.is_main():
            student.save_pretrained(initial)
            tokenizer.save_pretrained(initial)
        self.train_set, self.validation_set = setup.encode("train", "validation")
        self.collator = setup.collator()

        self.teacher_params = []
        self.teacher_precision = None  # the teachers' dtype and what it changes against fp32
        if self.teacher_plans:
            self.ensemble, self.source = setup.load_teachers()
            dtype = setup.dtype
            self.teacher_params = self.ensemble.parameter_counts
            self.teacher_precision = self._measure_teacher_precision(dtype)
            self._prepare_interpolation()
        self.student_params = count_parameters(student)  # what is exported: without training-only modules
        # loss.intermediate composes around the task: planned on the loaded models, handed to its loss
        self.layer_terms, projection_params = attach_layer_terms(cfg, student, self.ensemble, task.traits.causal)
        if projection_params and distributed.is_main():
            print(f"intermediate-layer terms: {projection_params:,} projection parameters train with the student "
                  "(checkpointed, not exported)", flush=True)
        self._build_engine(student)
        if distributed.is_main():
            print(describe_global_batch(cfg.training, distributed.world_size(), task.traits.batch_unit), flush=True)

    def _measure_teacher_precision(self, dtype) -> Dict:
        """{dtype, kl_to_fp32 per teacher}: with teachers below fp32, KL(fp32 teacher || teacher as
        run) on one validation batch, measured once at start (run/precision.py loads each teacher again
        in fp32 for it) and logged; None per teacher where it cannot be measured (no model here: a
        black-box file, a cache; ZeRO-3)."""
        if self.ensemble.served:  # a served teacher's precision is its server's (the report says so per teacher)
            here = "served" if self.ensemble.dtype is None else str(self.ensemble.dtype).replace("torch.", "")
            return {"dtype": here, "kl_to_fp32": {plan.name: None for plan in self.teacher_plans}}
        dtype = self.ensemble.dtype or dtype  # a cache's teachers ran in the dtype it records
        compiled = self.ensemble.compiled
        name = str(dtype).replace("torch.", "") + (" compiled" if compiled else "")
        drift = {plan.name: None for plan in self.teacher_plans}
        if (dtype != torch.float32 or compiled) and self.cfg.teachers.placement == "replicated":
            # loading the fp32 copies initialises modules: the training's random streams must not notice
            devices = [self.device] if self.device.type == "cuda" else []
            # a compiled teacher giving NaN/inf where its eager fp32 self does not is the compiler's doing
            # (seen: inductor's AVX2 code on a tiny BERT): said as such, before step 1
            advice = ("(torch.compile's code for this CPU; seen with inductor's AVX2 code): set teachers.compile=false; "
                      "if the error stays, the teacher itself gives them")
            with torch.random.fork_rng(devices=devices):
                try:
                    drift = teacher_precision_drift(self.task, self.ensemble, self.source, self.teacher_plans,
                                                    self.device, self.validation_set, self.setup.context)
                except NonFiniteLogitsError as error:
                    if not compiled:
                        raise
                    raise NonFiniteLogitsError(f"teachers.compile: compiled, {error.finding} on a validation batch "
                                               f"before step 1 {advice}") from None
            broken = [teacher for teacher, value in drift.items() if value is not None and not math.isfinite(value)]
            if compiled and broken:  # teachers.on_nonfinite=skip: the drift reads what the check let through
                raise NonFiniteLogitsError(f"teachers.compile: teacher(s) {broken} compiled give NaN/inf logits on a "
                                           f"validation batch where their eager fp32 selves do not {advice}")
            if drift and distributed.is_main():
                self.logger.log(0, {f"{teacher}/kl_to_fp32": value for teacher, value in drift.items()
                                    if value is not None}, kind="precision")
                figures = ", ".join(f"{teacher} {value:.2e}" for teacher, value in drift.items() if value is not None)
                print(f"teachers run in {name}: KL(fp32 || {name}) per {self.task.traits.row_unit} on a validation batch: "
                      f"{figures} nats", flush=True)
        return {"dtype": name, "kl_to_fp32": drift}

    def _check_before_writing(self) -> None:
        """What the config and the data can refuse without weights: the DeepSpeed config's
        contradictions, the student's layers, a batch larger than the data, the task's own
        (a teacher cache written for other data)."""
        cfg = self.cfg
        build_deepspeed_config(cfg, distributed.world_size())
        check_student_layers(cfg)
        check_prune_budget(cfg, self.task.traits.auto_model)
        if cfg.loss.intermediate:
            check_layer_maps(cfg)
        if not cfg.data.mixture_sources:  # a mixture draws with replacement: any batch size goes
            rows, batch = self.task.training_rows(self.setup.context), cfg.training.micro_batch_size
            if rows is not None and rows < batch * distributed.world_size():  # None: streamed, not known yet
                raise ConfigError(f"training.micro_batch_size={batch} x {distributed.world_size()} ranks exceeds the "
                                  f"{rows} training rows: lower training.micro_batch_size or add data")
        self.setup.check(augment=True)  # and data.augment's models, for extend_training_data

    def _prepare_interpolation(self) -> None:
        """Fit the interpolation on validation (rank 0 fits, every rank receives the state), or
        reload the fit on resume. The strategy owns its fit (interpolation/strategies.py)."""
        cfg = self.cfg
        folder = self.run_dir / INTERPOLATION
        state = load_state(folder) if self.resume_from is not None else None
        routing = self.ensemble.routing
        if state is None and cfg.interpolation.fit_on == "validation":
            if routing is not None:  # each route on its own validation rows
                from distill.signals.routing import fit_routes

                state = fit_routes(routing, lambda route: self.task.validation_chunks(
                    self.ensemble, self.source, self.device, self.validation_set, self.setup.context,
                    route=route).chunks,
                    self.ensemble.temperatures, cfg.seed,
                    distributed.is_main())
                if state is not None:
                    state.update(weights=self.ensemble.weights.tolist(),
                                 temperatures=self.ensemble.temperatures.tolist())
            else:
                chunks = self.task.validation_chunks(self.ensemble, self.source, self.device, self.validation_set,
                                                     self.setup.context).chunks
                if distributed.is_main():
                    state = self.ensemble.interpolation.fit(chunks, self.ensemble.weights.double(),
                                                            self.ensemble.temperatures.double(),
                                                            cfg.interpolation.fit_temperatures, seed=cfg.seed)
            state = distributed.broadcast_object(state)
            if distributed.is_main():
                save_state(state, folder)
        if state is None:
            if routing is not None and distributed.is_main():
                print(f"routes ({routing.routes.column}): {routing.describe()}", flush=True)
            return
        self.ensemble.load_interpolation_state(state)
        if routing is not None and distributed.is_main():
            print(f"routes ({routing.routes.column}), fitted per route: {routing.describe()}", flush=True)
        for plan, weight, temperature in zip(self.teacher_plans, state["weights"], state["temperatures"]):
            plan.weight, plan.temperature = weight, temperature
        silent = [plan.name for plan, weight in zip(self.teacher_plans, state["weights"]) if weight <= 1e-6]
        if silent and routing is None and distributed.is_main():  # issue 31: "both teachers" may be one
            terms = " and intermediate-layer terms" if cfg.loss.intermediate else ""
            print(f"interpolation: the fitted mix gives teacher(s) {silent} weight 0: their KD{terms} do not reach the "
                  "student (the target is the other teachers' alone)", flush=True)
        # one write: under the launcher, ranks share stdout, and print() writes text and newline apart
        sys.stdout.write(f"interpolation state rank {distributed.rank()}: {state_digest(state)} "
                         f"weights={[round(w, 4) for w in state['weights']]}\n")
        sys.stdout.flush()

    def mixture_proportions(self, step: int) -> List[float]:
        """Scheduled proportions of data.mixture_sources at an optimizer step, normalised."""
        weights = value_at(self.cfg.schedules.data_mixture, None, step, self.total_steps)
        return normalize_weights(torch.tensor(weights, dtype=torch.float64)).tolist()

    def _scheduled(self, step: int) -> Dict:
        """kd_alpha, temperature, teacher weights and teacher temperatures at this optimizer step
        (formulas/schedules.py). A temperature schedule moves the student's T and every teacher's
        temperature together: teacher k is softened by T_k * T(step) / loss.temperature."""
        cfg, schedules = self.cfg, self.cfg.schedules
        temperature = value_at(schedules.temperature, cfg.loss.temperature, step, self.total_steps)
        weights = teacher_temperatures = None
        if self.ensemble is not None:
            weights = value_at(schedules.teacher_weights, self.ensemble.weights.tolist(), step, self.total_steps)
            teacher_temperatures = self.ensemble.temperatures * (temperature / cfg.loss.temperature)
        return {"kd_alpha": value_at(schedules.kd_alpha, cfg.loss.kd_alpha, step, self.total_steps),
                "temperature": temperature, "teacher_weights": weights, "teacher_temperatures": teacher_temperatures}

    def _refuse_links_leaving(self) -> None:
        escapes = links_leaving(self.run_dir)
        if escapes:
            link, target = escapes[0]
            raise ConfigError(f"output_dir: {link} is a symbolic link to {target}, outside the run directory; "
                              "distill writes only inside output_dir: remove the link or choose another output_dir")

    def _find_resume_point(self) -> Optional[Path]:
        """With training.resume=auto: the newest intact checkpoint of this run (every file's digest as
        recorded when it was written), saying which newer ones were passed over and why."""
        checkpoints = self.run_dir / CHECKPOINTS
        has_checkpoint = (checkpoints / "latest").is_file()
        if self.cfg.training.resume == "auto":
            written = has_checkpoint or (checkpoints.is_dir() and any(checkpoints.glob("step*")))
            if not written:
                return None
            tag, passed = newest_intact_tag(checkpoints)
            if tag is None:
                raise ConfigError(f"training.resume=auto: no intact checkpoint in {checkpoints} ("
                                  + "; ".join(passed or ["none was written"]) + "): start a new output_dir")
            if passed and distributed.is_main():
                print("training.resume=auto: " + "; ".join(passed) + f": resuming from {tag}, the newest intact one",
                      flush=True)
            self._check_resume_is_safe(checkpoints / tag)
            self.resume_tag = tag
            return checkpoints
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
        now = input_hashes(self.cfg)
        for key, digest in manifest.get("inputs", {}).items():
            if now.get(key) != digest:
                changed.append(f"{key} content (changed on disk since the checkpoint)")
        if changed:
            raise ConfigError("training.resume=auto: these settings differ from the checkpoint and would make the "
                              f"resumed run unsafe: {changed}; restore them or start a new output_dir")

    def _make_run_dir(self) -> None:
        if distributed.is_main():
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / RUN_MARKER).write_text("a run directory of distill train\n", encoding="utf-8")
            (self.run_dir / "config.yaml").write_text(to_yaml(self.cfg), encoding="utf-8")
        distributed.barrier()
        self.logger = MetricsLogger(self.run_dir, enabled=distributed.is_main())

    def _build_engine(self, student) -> None:
        import deepspeed

        cfg = self.cfg
        if isinstance(self.train_set, IterableDataset):  # streamed (data/streamed.py): it orders and splits itself
            self.train_sampler = self.train_set  # set_epoch(epoch, skip_samples), as ResumableSampler's
            self.train_loader = DataLoader(self.train_set, batch_size=cfg.training.micro_batch_size,
                                           collate_fn=self.collator, drop_last=True)
        else:
            sampler = ResumableSampler(DistributedSampler(self.train_set, num_replicas=distributed.world_size(),
                                                          rank=distributed.rank(), shuffle=True, seed=cfg.seed,
                                                          drop_last=True))
            self.train_sampler = sampler
            # A generator of its own: creating an iterator must not draw from the global RNG, which
            # dropout uses and which a resume restores.
            self.train_loader = DataLoader(self.train_set, batch_size=cfg.training.micro_batch_size, sampler=sampler,
                                           collate_fn=self.collator, drop_last=True,
                                           generator=torch.Generator().manual_seed(cfg.seed))
        self.mixture = None
        if cfg.data.mixture_sources:  # batches drawn from the sources with scheduled proportions
            sources = column(self.train_set, SOURCE)
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
            import pickle

            try:
                with only_tensors():  # a handed-over run directory's pickles hold data, never code to run
                    path, client_state = self.engine.load_checkpoint(str(self.resume_from), tag=self.resume_tag)
            except pickle.UnpicklingError as error:
                raise ConfigError(f"training.resume=auto: checkpoint {self.resume_tag} holds more than tensors and "
                                  f"plain values (refused, not run: {str(error).splitlines()[0][:160]}); resume only "
                                  "checkpoints you trust to be distill's, or start a new output_dir") from error
            self.start_epoch = client_state["epoch"]
            self.skip_batches = client_state["batches_in_epoch"]
            load_rng_state(Path(path).parent if Path(path).is_file() else Path(path), distributed.rank())
            if self.mixture is not None:
                self.mixture.start_micro_step = self.engine.global_steps * accumulation
            if distributed.is_main():
                print(f"resumed from step {self.engine.global_steps} (epoch {self.start_epoch}, "
                      f"batch {self.skip_batches})", flush=True)

    # ----------------------------------------------------------------------------- training
    def _stream(self):
        """(epoch, position in the epoch, micro-batch) without end, epoch after epoch, from the
        resume point on; a mixture sampler has no epochs (its one epoch never ends)."""
        micro_batch_size = self.cfg.training.micro_batch_size
        epoch, skip = self.start_epoch, self.skip_batches
        while True:
            if self.mixture is None:
                self.train_sampler.set_epoch(epoch, skip_samples=skip * micro_batch_size)
            taken = False
            for position, batch in enumerate(self.train_loader, start=skip):
                taken = True
                yield epoch, position, batch
            if not taken and skip == 0:  # a whole epoch without a micro-batch: it would loop for ever
                raise ConfigError(f"data.train: an epoch gave no micro-batch of {micro_batch_size} rows on rank "
                                  f"{distributed.rank()}: add data or lower training.micro_batch_size")
            epoch, skip = epoch + 1, 0

    def _micro_step(self, batch: Dict, window: LogWindow) -> None:
        now = self._scheduled(self.engine.global_steps)
        terms, figures = self.task.loss(self.engine, batch, self.ensemble, self.source, now, self.setup.context,
                                        layers=self.layer_terms)
        if not math.isfinite(figures.loss):  # the figures are host floats already: no extra sync
            newest = latest_complete_tag(self.run_dir / CHECKPOINTS)
            raise DivergedError(
                f"the loss is {figures.loss} at optimizer step {self.engine.global_steps + 1} (KD term {figures.kd}, "
                f"CE term {figures.ce}); nothing was exported. The newest checkpoint, taken before it, is "
                f"{newest or 'none'}: lower training.learning_rate (or check loss.temperature and the data), then "
                "rerun into a new output_dir or, with the same settings, training.resume=auto")
        self.engine.backward(terms.total)
        self.engine.step()
        self.skipped_rows += figures.skipped
        window.add(figures)

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
        drawn_sources = torch.zeros(len(self.splits.source_names), dtype=torch.float64)
        scheduled_sources = torch.zeros_like(drawn_sources)
        self.engine.train()
        stream = self.source.lookahead(self._stream()) if self.source is not None else self._stream()
        batches = self.task.batches(stream, self.engine, self.setup.context)
        for epoch, position, batch in batches:
            if self.engine.global_steps >= self.total_steps:
                break
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
                # teachers.on_nonfinite=skip: rows left out of the KD term since the run (re)started, all
                # ranks together; a running total, not per window (the key says so)
                skipped = distributed.mean_across_ranks(torch.tensor([float(self.skipped_rows)]))
                values["skipped_nonfinite_rows_total"] = round(float(skipped) * distributed.world_size())
                now = self._scheduled(step)
                values.update(kd_alpha=now["kd_alpha"], temperature=now["temperature"])
                if names:
                    weights = normalize_weights(torch.tensor(now["teacher_weights"])).tolist()
                    values.update({f"{n}/weight": w for n, w in zip(names, weights)})
                self.logger.log(step, values)
                if progress is not None:
                    progress.set_postfix(loss=f"{values['loss']:.4f}", samples_s=f"{values['samples_per_s']:.1f}")
                window.reset()
            saved = False
            if cfg.training.eval_every and step % cfg.training.eval_every == 0 and step < self.total_steps:
                metrics = self.evaluate(step)
                self.engine.train()
                if self._improves(metrics):  # its checkpoint now, kept whatever the rotation does
                    self.save_checkpoint(epoch, position + 1)
                    self._record_best(step, metrics)
                    saved = True
            if (step % cfg.training.checkpoint_every == 0 or step == self.total_steps) and not saved:
                self.save_checkpoint(epoch, position + 1)
            if step >= self.total_steps:
                break
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
                f"newest complete checkpoint is {previous or 'none'}. {write_failure_advice(error).capitalize()} "
                "and rerun with training.resume=auto.") from error
        if distributed.is_main():
            tags = sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step"))
            best = self.best["tag"] if self.best is not None else None
            for old in tags[:-max(self.cfg.training.keep_checkpoints, 1)]:
                if old.name != best:  # training.select_best's checkpoint stays until a better one
                    shutil.rmtree(old, ignore_errors=True)
        distributed.barrier()

    def _write_checkpoint(self, root: Path, tag: str, position: Dict) -> None:
        # Our files go in first: DeepSpeed writes `latest` last, so a tag that `latest` names is whole.
        save_rng_state(root / tag, distributed.rank())
        if distributed.is_main():
            if self.teacher_hashes is None:  # hashing teacher and data files is costly when big: once per run
                self.teacher_hashes = [content_hash(plan.path) for plan in self.teacher_plans]
                self.input_hashes = input_hashes(self.cfg)
            teachers = [{"name": plan.name, "path": plan.path, "hash": digest, "weight": plan.weight,
                         "temperature": plan.temperature} for plan, digest in zip(self.teacher_plans, self.teacher_hashes)]
            interpolation = self.ensemble.interpolation_state() if self.ensemble is not None else {}
            interpolation.pop("gate", None)  # tensors: saved in RUN_DIR/interpolation/gate.safetensors
            write_manifest(root / tag, OmegaConf.to_container(self.cfg, resolve=True), teachers, interpolation, position,
                           self.input_hashes)
        distributed.barrier()
        self.engine.save_checkpoint(str(root), tag=tag, client_state=position)
        distributed.barrier()
        if distributed.is_main():  # every rank's files are there: their digests make the tag whole
            seal_manifest(root / tag)
        distributed.barrier()

    # --------------------------------------------------------------------------- evaluation
    def _improves(self, metrics: Dict[str, Dict[str, float]]) -> bool:
        """training.select_best: whether this evaluation of the student beats the best so far (a tie
        keeps the earlier one)."""
        select = self.cfg.training.select_best
        if select.metric is None:
            return False
        value = metrics["student"][select.metric]
        if self.best is None:
            return True
        higher = self.task.traits.metrics[select.metric] if select.mode == "auto" else select.mode == "max"
        return value > self.best["value"] if higher else value < self.best["value"]

    def _record_best(self, step: int, metrics: Dict[str, Dict[str, float]]) -> None:
        select = self.cfg.training.select_best
        self.best = {"tag": f"step{step:07d}", "step": step, "metric": select.metric, "mode": select.mode,
                     "value": metrics["student"][select.metric], "student": dict(metrics["student"])}
        if distributed.is_main():
            write_best(self.run_dir / CHECKPOINTS, self.best)
        distributed.barrier()

    def evaluate(self, step: int) -> Dict[str, Dict[str, float]]:
        """The task's validation metrics for the student, each teacher and the target (and per
        evaluation domain), logged as `model/metric` and `model/domain/metric`."""
        self.engine.eval()
        evaluation = self.task.evaluate(self.engine, self.ensemble, self.source, self.engine.device,
                                        self.validation_set, self.setup.context)
        metrics, domains = evaluation.figures, evaluation.domains
        self.last_predictions = evaluation.predictions  # eval/predictions.json, written after the last evaluation
        logged = {f"{model}/{name}": value for model, figures in metrics.items()
                  for name, value in figures.items() if name != "tokens"}
        for domain, by_model in domains.items():
            logged.update({f"{model}/{domain}/{name}": value for model, figures in by_model.items()
                           for name, value in figures.items() if name != "tokens"})
        self.logger.log(step, logged, kind="eval")
        self.last_domains = domains
        return metrics

    # ----------------------------------------------------------------------------- the run
    def run(self) -> Dict:
        try:
            return self._run()
        finally:
            self.lock.release()
            distributed.restore_torch_linear()  # a ZeRO-3 engine replaced it for the whole process

    def _run(self) -> Dict:
        self.prepare()
        summary = self.train()
        metrics = self.evaluate(self.engine.global_steps)
        if self._improves(metrics):  # the last step's checkpoint was written at the end of train()
            self._record_best(self.engine.global_steps, metrics)
        report = None
        if distributed.is_main():
            if self.last_predictions is not None:
                write_json(self.run_dir / "eval" / "predictions.json", self.last_predictions)
            summary["global_batch"] = global_batch(self.cfg.training, distributed.world_size())
            summary["teacher_precision"] = self.teacher_precision
            if self.ensemble is not None and self.ensemble.routing is not None:  # per route: its teachers and figures
                summary["routes"] = self.ensemble.routing.summary(self.last_domains)
            last = dict(metrics["student"])
            if self.best is not None:  # the exported student is the best evaluation's: its figures, not the last step's
                metrics = {**metrics, "student": dict(self.best["student"])}
            report = build_report(self.cfg, self.task.traits, self.teacher_plans, self.teacher_params,
                                  self.student_params, metrics, summary, self.train_set, self.validation_set)
            if self.best is not None:
                report["selected"] = {key: self.best[key] for key in ("tag", "step", "metric", "mode", "value")}
                report["selected"].update(last_step=self.engine.global_steps, last_step_value=last[self.best["metric"]],
                                          last_step_student=last)
            write_json(self.run_dir / "report.json", report)
            plot_curves(self.run_dir / "metrics.jsonl", self.run_dir / "training_curves.png",
                        title=f"{Path(self.cfg.output_dir).name}", metric=self.task.traits.curve_metric,
                        higher_is_better=self.task.traits.curve_higher_is_better)
        self.logger.close()
        distributed.barrier()
        if distributed.is_main():
            from distill.exporting.exporter import export_run

            # the newest tag is the one this run just wrote and sealed: export need not hash its files again
            tag = self.best["tag"] if self.best is not None else latest_complete_tag(self.run_dir / CHECKPOINTS)
            export_dir = export_run(self.run_dir, self.run_dir / "student", dtype=self.cfg.export.dtype, overwrite=True,
                                    tag=tag)
            report["export_dir"] = str(export_dir)
            if self.cfg.training.keep_checkpoints == 0:  # the exported student is the result
                self._drop_checkpoints()
                report["checkpoints"] = "removed after the export (training.keep_checkpoints=0)"
            write_json(self.run_dir / "report.json", report)
            print(self.task.format_table(report) + selection_line(report), flush=True)
        # no barrier after the export: the other ranks have nothing left to do, and a long export
        # (a big model) must not run into their collective timeout
        return report


    def _drop_checkpoints(self) -> None:
        """The run's checkpoint tags (step*) and DeepSpeed's `latest`, written by this run; the
        folder goes only if nothing else is left in it."""
        root = self.run_dir / CHECKPOINTS
        for tag in root.glob("step*"):
            if tag.is_dir():
                shutil.rmtree(tag)
        for name in ("latest", "zero_to_fp32.py"):
            (root / name).unlink(missing_ok=True)
        if root.is_dir() and not any(root.iterdir()):
            root.rmdir()


def train(cfg: DistillConfig) -> Optional[Dict]:
    return Trainer(cfg).run()
