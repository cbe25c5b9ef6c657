"""The task interface and its registry (the package's __init__ finds the tasks)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple

import torch
from torch import Tensor

from distill.util.registry import registrar

TASKS: Dict[str, type] = {}
register_task = registrar(TASKS, "task")


@dataclass
class StepFigures:
    """What one micro-batch adds to the log window: the loss terms as floats (per row or token of
    this micro-batch), its row count, rows left out of KD for non-finite teacher logits, and for
    classification each teacher's KL to the student and batch accuracy."""
    loss: float
    kd: float
    ce: float
    samples: int
    skipped: int = 0
    teacher_kl: Optional[Tensor] = None
    teacher_correct: Optional[Tensor] = None
    labelled: int = 0
    extra: Optional[Dict[str, float]] = None  # more terms to log (intermediate-layer terms, aligned shares)
    # means to log over the window as sum / count (per-route KD, on-policy lengths): the same keys on every rank
    ratios: Optional[Dict[str, Tuple[float, float]]] = None


@dataclass
class Evaluation:
    """What `Task.evaluate` returns: figures per model ('student', each teacher, 'target'), figures
    per evaluation domain (data.eval_domains, teachers.route_by's routes) and model, and the per-row
    predictions the trainer writes to eval/predictions.json after the last evaluation (None: none)."""

    figures: Dict[str, Dict[str, float]]
    domains: Dict[str, Dict[str, Dict[str, float]]] = field(default_factory=dict)
    predictions: Optional[Dict] = None


@dataclass
class FitRows:
    """What `Task.validation_chunks` returns for an interpolation fit: `chunks` (formulas/fits.Chunks:
    the teachers' logits [K, n, C] and labels [n], a chunk at a time) and the UTF-8 bytes of the text
    whose tokens they predict (bits per byte of a fit; None where the task predicts no text)."""

    chunks: Callable
    text_bytes: Optional[int] = None


@dataclass
class SavedModelScoring:
    """What `Task.saved_model_scoring` returns for export's checks: the validation split encoded with
    a saved model's tokenizer (`batches`, read once for every model scored on it: ONNX parity, the
    model before and after int8) and `score(model)`, the task's validation figures of a model over them."""

    batches: Iterable
    score: Callable[[object], Dict[str, float]]


@dataclass
class Context:
    """What a command's set-up found that the task's later calls read, handed to each of them: a task
    keeps none of it. `plan_teachers` makes it; `check_before_writing` and `build_student` return it
    with what they opened or built (dataclasses.replace); tasks/setup.Setup holds it between stages.
    A task with more to hand on subclasses it (tasks/causal_lm.LMContext)."""

    splits: Any  # data.text.Splits: the rows read (and their label names)
    tokenizer: Any  # the student's tokenizer: the one planned against, then the built student's own
    teacher_groups: List = field(default_factory=list)  # data.text.TokenizerGroup per teacher tokenizer of its own
    cache: Any = None  # teachers.cache, opened and matched by check_before_writing (None: live teachers)

    @property
    def label_names(self) -> List[str]:
        return self.splits.label_names

    @property
    def groups(self) -> List:
        """Every tokenizer the rows are encoded with: the student's (prefix '') first, then the teachers' own."""
        from distill.data.text import TokenizerGroup

        return [TokenizerGroup(prefix="", tokenizer=self.tokenizer)] + list(self.teacher_groups)


class PerEnsemble:
    """A memo of frozen teachers' results (their predictions, their figures per evaluated set), kept for
    one ensemble at a time: `of(ensemble)` is its dict, filled by the caller; another ensemble starts an
    empty one."""

    def __init__(self):
        self.ensemble, self.results = None, {}

    def of(self, ensemble) -> Dict:
        if ensemble is not self.ensemble:
            self.ensemble, self.results = ensemble, {}
        return self.results


@dataclass(frozen=True)
class Traits:
    """What a task declares about itself, read by the commands around it (the trainer, fits, the
    memory plan, the sweep, export): nothing here is computed, each task states its own."""
    auto_model: Optional[type] = None  # the transformers Auto class its student loads and exports with
    row_unit: str = "row"  # a row of the teachers' signal, in messages: 'row' (an example) or 'token'
    batch_unit: str = "row"  # what training.micro_batch_size counts
    # relation terms of loss.intermediate see no later position, and the memory plan counts a causal
    # LM's shapes (the terms themselves compose around the task: models/layer_hooks.LayerTerms)
    causal: bool = False
    fit_columns: Tuple[str, ...] = ("nll", "accuracy", "ece")  # what `distill fit-weights` shows per mix
    # the student's validation figures training.select_best and the sweep choose by: name -> higher is better
    metrics: Dict[str, bool] = field(default_factory=lambda: {"accuracy": True, "macro_f1": True})
    curve_metric: str = "accuracy"  # the figure training_curves.png follows (its direction: `metrics`)
    cache: Optional[str] = None  # its `distill cache` format (caches.CACHE_FORMATS); None: no cache
    cache_holds_validation: bool = False  # its teacher cache holds the validation split's outputs too

    @property
    def curve_higher_is_better(self) -> bool:
        return self.metrics[self.curve_metric]


class Task:
    """The interface the trainer and the commands use (see the package docstring). A task holds its
    config and nothing a call leaves for the next one: what set-up finds travels in a `Context`, and
    what a task keeps between calls is a memo of a call's own result (its frozen teachers' figures, a
    loss workspace), never an input of another call."""

    traits = Traits()  # what the task is (Traits), read by the commands around it
    # Settings of the shared sections that this task reads and not every task does (dotted keys;
    # `[*]` for each entry of a list). A key set in the config that another task owns and the chosen
    # one does not is refused by tasks.refuse_settings_of_other_tasks: no task lists another's keys.
    # A section named after a task (e.g. `token_classification:`) is that task's alone.
    owns: tuple = ()

    def __init__(self, cfg):
        self.cfg = cfg

    @classmethod
    def check_config(cls, cfg) -> None:
        """Refuse settings this task would silently ignore (ConfigError naming them)."""

    # data ----------------------------------------------------------------------------------
    def read_splits(self):
        """data.text.Splits: the rows read and split (no model needed), with their label names."""
        raise NotImplementedError

    def encode(self, split, key: str, context: Context):
        """The rows of `split` (named `key`: 'train', 'validation') encoded with `context`'s tokenizers."""
        raise NotImplementedError

    def collator(self, context: Context):
        """What pads a list of encoded rows into a batch of tensors."""
        raise NotImplementedError

    def training_rows(self, context: Context) -> Optional[int]:
        """How many training rows (examples, or blocks) the encoded train split will hold (None: not known
        before it is read, e.g. streamed)."""
        return len(context.splits.train)

    def check_before_writing(self, plans, context: Context) -> Context:
        """The task's own checks on config, data and the teachers' `plans`, before the run directory is
        written; returns `context` with what they opened (a teacher cache, a server's connection)."""
        return context

    def batches(self, stream, engine, context: Context):
        """The training micro-batches, as (epoch, position, batch) from `stream`; by default as they
        come (a task may annotate them, or replace them by the student's own samples: it is handed
        the engine, whose restored `global_steps` and `micro_steps` say how many micro-batches are done)."""
        return stream

    # models --------------------------------------------------------------------------------
    def plan_teachers(self, splits, student_tokenizer) -> Tuple[List, Context]:
        """(teachers.TeacherPlan per teacher, Context): the teachers matched against the student's tokenizer
        and the data's labels from configs and tokenizers only (no weights load)."""
        raise NotImplementedError

    def build_student(self, plans, context: Context, saved=None) -> Tuple[torch.nn.Module, Context]:
        """(student in fp32, `context` with its tokenizer), built for the teachers' `plans`; `saved`: on
        resume, the run's initial student directory, loaded instead (`saved_student`: trimming and pruning
        are not redone; the checkpoint then restores the trained weights)."""
        raise NotImplementedError

    def load_teachers(self, plans, device, dtype, context: Context, eager=False):
        """(TeacherEnsemble, signal source) for the planned teachers (`eager`: never compiled)."""
        raise NotImplementedError

    # loss and evaluation -------------------------------------------------------------------
    def loss(self, engine, batch, ensemble, source, now: Dict, context: Context, layers=None):
        """(loss terms with .total/.kd/.ce, StepFigures) of one micro-batch; the trainer runs backward and step.
        `layers`: loss.intermediate's terms (models/layer_hooks.LayerTerms) or None."""
        raise NotImplementedError

    def evaluate(self, model, ensemble, source, device, validation, context: Context) -> Evaluation:
        """The figures of `model` (None: teachers only), the teachers and the target on `validation`
        (what `encode` returned for it), per evaluation domain too, and the per-row predictions."""
        raise NotImplementedError

    def validation_chunks(self, ensemble, source, device, validation, context: Context,
                          route: Optional[int] = None) -> FitRows:
        """FitRows over the rows of `validation` (the encoded split) with a label (the teachers'
        logits, a chunk at a time); with `route`, over that route's rows only (signals/routing.of_route;
        every teacher's logits: the route picks)."""
        raise NotImplementedError

    def kd_rows(self, batch) -> Tensor:
        """[rows] bool: the rows of a collated batch the KD term reads (every example here)."""
        return torch.ones(batch["input_ids"].shape[0], dtype=torch.bool)

    # saved models (export) -------------------------------------------------------------------
    def saved_model_scoring(self, tokenizer) -> SavedModelScoring:
        """The validation split encoded with a saved model's `tokenizer`, and how a model is scored on it."""
        raise NotImplementedError

    # description ---------------------------------------------------------------------------
    def format_table(self, report: Dict) -> str:
        """report.json's figures as the table a run prints at its end."""
        raise NotImplementedError

    def model_card(self, report: Dict, model_config, dtype: str, compression=None, parity=None) -> str:
        """The exported student's README.md."""
        raise NotImplementedError


def trained_length(task: Task) -> int:
    """The longest sequence the student was trained on (the exported tokenizer's model_max_length): a causal
    LM's blocks of data.block_size, or its prompt-and-completion rows cut at data.max_length; any other
    task's rows cut at data.max_length."""
    data = task.cfg.data
    return data.block_size if task.traits.causal and not data.prompt_field else data.max_length


def load_saved_student(task: Task, path, key: str, label_names) -> torch.nn.Module:
    """A student saved whole (an exported folder, a run's `student/` or initial student) as the task's Auto
    class in fp32; a classifier's labels must be the data's `label_names` (matched by name; a causal LM's
    data has none), or a ConfigError naming `key` says so."""
    from distill.models.loading import load_pretrained
    from distill.models.student import check_student_labels

    model = load_pretrained(task.traits.auto_model, str(path), key, task.cfg.trust_remote_code)
    if label_names:
        check_student_labels(model.config, label_names, key)
    return model


def saved_student(task: Task, path, label_names):
    """(model in fp32, tokenizer) of a student a run saved whole (its initial student, for resume)."""
    from distill.models.loading import load_tokenizer

    model = load_saved_student(task, path, f"{path} (the run's initial student)", label_names)
    return model, load_tokenizer(str(path), str(path), task.cfg.trust_remote_code)
