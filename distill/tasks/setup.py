"""The set-up sequence every command shares, written once.

In failing order, so that bad input is refused before a weight loads or a file is written:

    the task, from the checked config -> data read and split -> the student's tokenizer -> teachers
    planned (configs and tokenizers only) -> the task's checks on data and teachers (`check`) ->
    splits encoded (`encode`) -> process group and device (`start`) -> teachers loaded in the
    configured dtype (`load_teachers`).

`distill train` (run/trainer.py) writes its run directory between `check` and `encode`, and there
extends the training split with rows made in it (`extend_training_data`: data.augment, composed
around the task by tasks/augment.Augmentation, its models opened by `check(augment=True)`); `eval`
(run/evaluate.py) plans against the saved model's tokenizer; `fit-weights` (run/fit_weights.py) and
`cache` (caches/) go straight through; `export` (exporting/exporter.py) takes only the task of the
run's saved config (`Setup.of_run`: no data read, no teacher loaded, the config was checked when the
run started).
"""
from __future__ import annotations

from dataclasses import replace
from typing import Optional, Tuple

from distill.tasks import build_task, task_class


class Setup:
    """One command's task, data, teacher plans, device and teachers, made in the order above. Each
    stage is a method that returns what it made and keeps it for the next one; what the task's calls
    read of it travels in `context` (tasks.base.Context), handed to them explicitly."""

    def __init__(self, cfg, task=None):
        self.cfg = cfg
        self.task = build_task(cfg) if task is None else task
        self.splits = None  # data.text.Splits: raw rows, no model needed
        self.plans = None  # teachers.TeacherPlan per teacher: labels and tokenizers matched, nothing loaded
        self.context = None  # tasks.base.Context: what the stages found, handed to every later task call
        self.device = None
        self.dtype = None  # what the teachers run in (teachers.dtype on this device)
        self.tokenizer = None  # the student's tokenizer the teachers were planned against
        self.augmentation = None  # tasks/augment.Augmentation: data.augment's models, opened by check(augment=True)

    @classmethod
    def of_run(cls, run_config) -> "Setup":
        """The task of a run's saved config (checked when the run started: its data or cache may be gone)."""
        return cls(run_config, task_class(run_config.task)(run_config))

    def plan(self, tokenizer_from: Optional[Tuple[str, str]] = None) -> "Setup":
        """Data read and split, the teachers planned against the student's tokenizer: `tokenizer_from`
        (reference, config key), by default the student's source (student.path or its teacher)."""
        from distill.config.schema import student_source
        from distill.models.loading import load_tokenizer

        self.splits = self.task.read_splits()
        reference, key = tokenizer_from or student_source(self.cfg)
        self.tokenizer = load_tokenizer(reference, key, self.cfg.trust_remote_code)
        self.plans, self.context = self.task.plan_teachers(self.splits, self.tokenizer)
        return self

    def check(self, augment: bool = False) -> None:
        """The task's own checks once the teachers are planned (e.g. a teacher cache opened and matched);
        `augment` (train): data.augment's models loaded too, which refuses one that is not of its kind."""
        from distill.tasks.augment import Augmentation

        self.context = self.task.check_before_writing(self.plans, self.context)
        if augment:
            self.augmentation = Augmentation.open(self.cfg)

    def extend_training_data(self, run_dir):
        """The splits with the training rows made in the run directory (data.augment), kept for `encode`;
        returns them (the same splits without data.augment)."""
        if self.augmentation is not None:
            self.splits = self.augmentation.extend(self.splits, self.tokenizer, run_dir)
            self.context = replace(self.context, splits=self.splits)
            self.augmentation = None  # made once: its models are freed
        return self.splits

    def build_student(self, saved=None):
        """(student in fp32, its tokenizer), built by the task for the planned teachers (`saved`: the
        run's initial student, on resume); the context follows the student's tokenizer from here."""
        student, self.context = self.task.build_student(self.plans, self.context, saved=saved)
        return student, self.context.tokenizer

    def collator(self):
        """The task's collator for the context's tokenizers."""
        return self.task.collator(self.context)

    def encode(self, *names: str):
        """The named splits ("train", "validation") encoded by the task: one dataset, or a list."""
        encoded = [self.task.encode(getattr(self.splits, name), name, self.context) for name in names]
        return encoded[0] if len(encoded) == 1 else encoded

    def start(self, process_group: bool = True):
        """The process group (one rank outside the launcher; `process_group=False`: none, for a
        command that needs one only under the launcher) and this rank's device."""
        from distill.runtime.distributed import init_distributed
        from distill.runtime.hardware import local_device, teacher_dtype

        if process_group:
            init_distributed()
        self.device = local_device()
        self.dtype = teacher_dtype(self.cfg.teachers.dtype, self.device)
        return self.device

    def load_teachers(self, eager: bool = False):
        """(TeacherEnsemble, signal source) of the planned teachers, or (None, None) without teachers;
        with teachers.route_by, routed around the task's teachers (signals/routing.route_teachers)."""
        from distill.signals.routing import route_teachers

        if self.device is None:
            self.start()
        if not self.plans:
            return None, None
        return route_teachers(self.cfg, *self.task.load_teachers(self.plans, self.device, self.dtype, self.context,
                                                                 eager))
