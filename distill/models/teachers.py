"""Frozen teachers: checked against the student, loaded once, run in inference mode.

`plan_teachers` reads only configs and tokenizers, so label or vocabulary mismatches fail before
any weights load. `TeacherEnsemble` returns logits `[K, B, C]` in the student's label order (float32)
and turns them into one target distribution with the configured interpolation strategy.

Placement `replicated` keeps every teacher whole on every rank. Placement `zero3` partitions each
teacher across ranks with its own optimizer-less DeepSpeed ZeRO-3 engine. Teachers are loaded
normally and partitioned afterwards, never under a nested `zero.Init` (the cause of the
student+teacher leak in DeepSpeed issue #3286), and run under `torch.no_grad` there because ZeRO-3
gathers parameters in place, which inference tensors forbid.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

import torch
from torch import Tensor, nn

from distill.config.schema import DistillConfig, teacher_display_name

from distill.errors import ConfigError
from distill.data.text import TokenizerGroup
from distill.interpolation.strategies import build_interpolation
from distill.formulas.mixtures import normalize_weights, teacher_log_probs
from distill.models.loading import (check_positions, count_parameters, head_labels, label_names_of, labels_only_config,
                              load_model_config, load_tokenizer, same_vocabulary)
from distill.util.paths import resolve_path
from distill.errors import NonFiniteLogitsError


def label_permutation(model_config, label_names: List[str], key: str) -> Optional[List[int]]:
    """order[j] = the model's output index for data label j; None when the orders already agree.

    Label sets are matched by `id2label` names; transformers' generic LABEL_i names are accepted
    by position when the count matches.
    """
    names = label_names_of(model_config)
    if names is None:
        if model_config.num_labels != len(label_names):
            raise ConfigError(f"{key} has {model_config.num_labels} unnamed labels, the data has "
                              f"{len(label_names)} {list(label_names)}")
        return None
    if sorted(names) != sorted(label_names):
        raise ConfigError(f"{key} has labels {names}, the student expects {list(label_names)}: "
                          "set data.label_names or drop the teacher")
    order = [names.index(name) for name in label_names]
    return None if order == list(range(len(order))) else order


@dataclass
class TeacherPlan:
    """What is known about one teacher before its weights load."""

    name: str
    path: str
    key: str  # config key, for error messages
    weight: float
    temperature: float
    label_order: Optional[List[int]]
    input_prefix: str  # '' reads the student's input ids; 't<k>__' its own encoding
    outputs: Optional[str] = None  # a black-box teacher (path is its file): logits | probabilities
    pooling: Optional[str] = None  # a linear head on pooled encoder states (classification)
    normalize: bool = False
    head: Optional[str] = None
    vocab_size: Optional[int] = None  # causal LM: the teacher's vocabulary size
    token_map: Optional[object] = None  # causal LM, another tokenizer: signals.aligned.TokenMap to the student's


def plan_teachers(cfg: DistillConfig, label_names: List[str], student_tokenizer) -> tuple[List[TeacherPlan], List[TokenizerGroup]]:
    """Check every teacher's labels and tokenizer against the student; returns plans and the extra
    tokenizer groups the data must be encoded with (for `teachers.tokenization: per_model`).

    `student_tokenizer=None` means no teacher reads the student's input ids (the student's
    vocabulary is trimmed, or there is no student): each teacher encodes the text itself."""
    plans, groups = [], []
    for index, teacher in enumerate(cfg.teachers.models):
        temperature = teacher.temperature if teacher.temperature is not None else cfg.loss.temperature
        if teacher.logits is not None:  # a black-box teacher: its file is checked when it is read
            key = f"teachers.models[{index}] ({teacher.logits})"
            plans.append(TeacherPlan(name=teacher_display_name(teacher, index), path=teacher.logits, key=key,
                                     weight=teacher.weight, temperature=temperature, label_order=None,
                                     input_prefix="", outputs=teacher.outputs))
            continue
        key = f"teachers.models[{index}] ({teacher.path})"
        model_config = load_model_config(teacher.path, key, cfg.trust_remote_code)
        check_positions(model_config, cfg.data.max_length, "data.max_length", key)
        labelled = labels_only_config(head_labels(teacher.head, key)) if teacher.head else model_config
        order = label_permutation(labelled, label_names, key)
        tokenizer = load_tokenizer(teacher.path, key, cfg.trust_remote_code)
        prefix = ""
        if student_tokenizer is None or not same_vocabulary(tokenizer, student_tokenizer):
            if student_tokenizer is not None and cfg.teachers.tokenization == "shared":
                raise ConfigError(
                    f"{key} uses a different vocabulary ({len(tokenizer)} tokens) from the student "
                    f"({len(student_tokenizer) if student_tokenizer else '?'} tokens): use a teacher with the student's tokenizer, or set "
                    "teachers.tokenization=per_model to let each teacher encode the text itself")
            match = next((g for g in groups if same_vocabulary(g.tokenizer, tokenizer)), None)
            if match is None:
                match = TokenizerGroup(prefix=f"t{len(groups)}__", tokenizer=tokenizer)
                groups.append(match)
            prefix = match.prefix
        temperature = teacher.temperature if teacher.temperature is not None else cfg.loss.temperature
        plans.append(TeacherPlan(name=teacher_display_name(teacher, index), path=teacher.path, key=key,
                                 weight=teacher.weight, temperature=temperature, label_order=order,
                                 input_prefix=prefix, pooling=teacher.pooling, normalize=teacher.normalize,
                                 head=None if teacher.head is None else str(resolve_path(teacher.head))))
    return plans, groups


def finite_rows(logits: Tensor, kd_rows: Optional[Tensor], policy: str, names: List[str],
                describe: Callable[[Tensor], str]) -> Optional[Tensor]:
    """The one non-finite policy (teachers.on_nonfinite) for teacher logits [K, rows, ...]: None when
    every value is finite; else the [rows] mask of rows finite for every teacher (the KD term leaves
    the others out: `skip`), or, with `stop`, NonFiniteLogitsError naming the first teacher with a
    NaN/inf on a KD row (`kd_rows`, None: every row) and `describe(its bad rows)`."""
    flat = logits.reshape(logits.shape[0], logits.shape[1], -1)
    finite = torch.isfinite(flat.sum(dim=-1))  # one read pass: a NaN or inf anywhere makes the sum non-finite
    if bool(finite.all()):
        return None
    finite = torch.isfinite(flat).all(dim=-1)  # the rare case: the exact test ([K, rows])
    if bool(finite.all()):  # the sum overflowed on finite values
        return None
    bad = ~finite if kd_rows is None else ~finite & kd_rows.to(finite.device).unsqueeze(0)
    if policy == "stop" and bool(bad.any()):
        k = int(bad.any(dim=1).nonzero()[0])
        finding = f"teacher {names[k]} produced NaN/inf logits {describe(bad[k])}"
        raise NonFiniteLogitsError(f"{finding}: set teachers.on_nonfinite=skip to leave such rows out of the KD term",
                                   finding)
    return finite.all(dim=0)


class TeacherEnsemble:
    """Loaded, frozen teachers and the interpolation that turns their outputs into one target. Running
    them is the signal source's (signals/): `models[k]` is None for a classification teacher whose
    outputs the source reads instead (a black-box file, the cache), and `models` is empty where no
    teacher loads here at all (a causal-LM cache, servers)."""

    def __init__(self, plans: List[TeacherPlan], models: List[Optional[nn.Module]], interpolation,
                 use_inference_mode: bool = True):
        self.plans = plans
        self.models = models
        self.interpolation = build_interpolation(interpolation) if isinstance(interpolation, str) else interpolation
        self.weights = normalize_weights(torch.tensor([p.weight for p in plans], dtype=torch.float32))
        self.temperatures = torch.tensor([p.temperature for p in plans], dtype=torch.float32)
        self.use_inference_mode = use_inference_mode
        self.on_nonfinite = "stop"
        self.inner_requests: Dict = {}  # teacher index -> what its forward records (intermediate-layer terms)
        self.routing = None  # routing.Routing with teachers.route_by: a strategy and weights per route
        self.dtype: Optional[torch.dtype] = None  # what the teachers run in (a cache: what they ran in)
        self.compiled = False  # teachers.compile applied
        self.served = False  # the teachers run on inference servers (signals/served.py): no dtype here
        # per teacher; a cached ensemble (no models loaded) takes them from the cache's record
        self.parameter_counts = [0 if model is None else
                                 getattr(model, "parameters_before_quantization", None) or count_parameters(model)
                                 for model in models]

    def model(self, k: int) -> Optional[nn.Module]:
        """Teacher k's model where it loads here; None where its source reads outputs instead (a
        black-box file, a cache, a server)."""
        return self.models[k] if k < len(self.models) else None

    @property
    def names(self) -> List[str]:
        return [plan.name for plan in self.plans]

    def __len__(self) -> int:
        return len(self.plans)

    def log_probs(self, logits: Tensor) -> Tensor:
        """[K, B, C] log softmax(z_k / T_k)."""
        return teacher_log_probs(logits, self.temperatures.to(logits.device))

    def target(self, logits: Tensor, labels: Optional[Tensor] = None, weights: Optional[Tensor] = None,
               routes: Optional[Tensor] = None) -> Tensor:
        """[B, C] log-probabilities of the interpolated target distribution.

        `weights` replaces the prior weights (a schedule's current value); `labels` feeds strategies
        that score teachers by the gold label; `routes` [B]: each row's route (teachers.route_by)."""
        if self.routing is not None and routes is not None:
            return self.routing.target(logits, routes, self.routing.weights, self.temperatures.to(logits.device),
                                       labels)[0]
        weights = self.weights if weights is None else normalize_weights(torch.as_tensor(weights, dtype=torch.float32))
        return self.interpolation(logits, weights.to(logits.device), self.temperatures.to(logits.device), labels)

    def interpolation_state(self) -> Dict:
        """What fitting changed, to save in the run directory and reload on resume."""
        state = {"weights": self.weights.tolist(), "temperatures": self.temperatures.tolist(),
                 "gate": self.interpolation.state_dict()}
        if self.routing is not None:  # the routes' own weights and fitted strategies
            routed = self.routing.state()
            state["routes"], state["gate"] = routed["routes"], {**state["gate"], **routed["gate"]}
        return state

    def load_interpolation_state(self, state: Dict) -> None:
        self.weights = torch.tensor(state["weights"], dtype=torch.float32)
        self.temperatures = torch.tensor(state["temperatures"], dtype=torch.float32)
        if self.routing is not None:
            self.routing.load_state(state)
            return
        if state.get("gate"):
            self.interpolation.load_state_dict(state["gate"])


def load_teachers(cfg: DistillConfig, plans: List[TeacherPlan], device: torch.device, dtype: torch.dtype,
                  load_model: Callable[[TeacherPlan, torch.dtype], nn.Module], eager: bool = False) -> TeacherEnsemble:
    """Each planned teacher loaded by the task's `load_model`, frozen, and placed: whole on this
    rank's device (replicated), or partitioned across ranks by ZeRO-3 (teachers.placement); its body
    compiled with teachers.compile unless `eager` (the fp32 reference of the precision drift). A
    black-box plan (`outputs` set) loads nothing: its model is None (signals/stored.py reads its file)."""
    models: List[Optional[nn.Module]] = []
    for plan in plans:
        if plan.outputs is not None:
            models.append(None)
            continue
        if dtype == torch.qint8:  # int8: loaded in fp32, then its linear layers quantized
            model = quantize_linear_layers(load_model(plan, torch.float32).eval())
        else:
            model = load_model(plan, dtype)
        model.eval().requires_grad_(False)
        models.append(model)
    interpolation = build_configured_interpolation(cfg)
    if cfg.teachers.placement == "zero3":
        ensemble = TeacherEnsemble(plans, [None if model is None else _partition_zero3(model, cfg, dtype)
                                           for model in models], interpolation, use_inference_mode=False)
    else:
        models = [None if m is None else m.to(device) for m in models]
        if cfg.teachers.compile and not eager:
            models = [None if model is None else compile_body(model) for model in models]
        ensemble = TeacherEnsemble(plans, models, interpolation)
    ensemble.on_nonfinite = cfg.teachers.on_nonfinite
    ensemble.dtype = dtype
    ensemble.compiled = cfg.teachers.compile and not eager
    return ensemble


def compile_body(model: nn.Module) -> nn.Module:
    """The model with its body's forward (`base_model`: the transformer without its head, which the
    causal-LM loss reads a chunk at a time) replaced by torch.compile's, in place: the module, its
    parameters and its output layer stay what they were. Shapes are dynamic (every batch has its own
    length)."""
    body = getattr(model, "base_model", model)
    body.forward = torch.compile(body.forward, dynamic=True)
    return model


def quantize_linear_layers(model: nn.Module) -> nn.Module:
    """Dynamic int8 quantization of the model's linear layers (int8 weights, activations quantized
    per batch; CPU), except an output layer over a vocabulary: the causal-LM loss reads that one's
    weight chunk by chunk, in full precision."""
    import warnings

    from torch.ao.quantization import quantize_dynamic

    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    names = {name for name, module in model.named_modules() if isinstance(module, nn.Linear) and module is not head
             and not getattr(module, "weight", None) is getattr(head, "weight", object())}
    parameters = count_parameters(model)  # packed int8 weights are no longer parameters: count them before
    with warnings.catch_warnings():  # torch.ao's deprecation notice: the API works, and nothing here can act on it
        warnings.simplefilter("ignore")
        quantized = quantize_dynamic(model, names, dtype=torch.qint8)
    quantized.parameters_before_quantization = parameters
    return quantized


def build_configured_interpolation(cfg: DistillConfig):
    """The strategy named by interpolation.method, built with the options under its own name
    (e.g. interpolation.confidence.sharpness); no branching on names here."""
    from omegaconf import OmegaConf

    method = cfg.interpolation.method
    section = cfg.interpolation.get(method)
    options = OmegaConf.to_container(section, resolve=True) if OmegaConf.is_config(section) else {}
    return build_interpolation(method, **options)


def _partition_zero3(model: nn.Module, cfg: DistillConfig, dtype: torch.dtype) -> nn.Module:
    import deepspeed

    ds_config = {
        "train_micro_batch_size_per_gpu": cfg.training.micro_batch_size,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
        "bf16": {"enabled": dtype == torch.bfloat16},
        "fp16": {"enabled": dtype == torch.float16},
        "steps_per_print": 10 ** 9,
    }
    engine, *_ = deepspeed.initialize(model=model, config=ds_config)
    engine.module.eval()
    return engine.module
