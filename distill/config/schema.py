"""Typed configuration: dataclasses merged by omegaconf, validated once, before any work starts.

A YAML file is merged onto `OmegaConf.structured(DistillConfig)`, so an unknown or mistyped key
fails with its dotted path. `validate()` then checks values (weights, temperatures, ranges, files)
and raises `ConfigError` naming the offending key. Nothing here loads a model or writes a file.
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import yaml
from omegaconf import MISSING, DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from distill.errors import ConfigError
from distill.util.paths import is_local_reference, resolve_path



@dataclass
class TeacherConfig:
    path: Optional[str] = None  # local directory, `pkg://package/sub/dir`, or a hub id
    # classification, or instead of path: a black-box teacher's outputs, a csv/jsonl/parquet file
    # with the column data.id_field and one column per label name (logits, or probabilities with
    # outputs: probabilities), e.g. from an API or another framework
    logits: Optional[str] = None
    outputs: str = "logits"  # logits | probabilities (of a `logits` file)
    name: Optional[str] = None  # shown in logs and reports; defaults to the path's last part
    weight: float = 1.0  # prior mixture weight; all weights are normalised to sum to one
    temperature: Optional[float] = None  # softening of this teacher; defaults to loss.temperature
    # classification: a linear head on pooled encoder states (sentence-embedding classifiers):
    # pooling cls | mean over the unpadded tokens, optionally L2-normalised; with `head`, a
    # safetensors file (weight [labels, hidden], optional bias; metadata "labels": a JSON list of
    # the label names in row order) on top of the encoder at `path`; without it, the classifier
    # layer of the model at `path` is applied to the pooled states
    pooling: Optional[str] = None
    normalize: bool = False
    head: Optional[str] = None
    # with teachers.route_by: the values of that column whose rows this teacher distils
    routes: Optional[List[str]] = None
    # causal_lm: the teacher runs on an inference server at this URL (http://host:port, no /v1),
    # which returns its prompt tokens' top-k log-probabilities (teachers.served); `path` then names
    # only its tokenizer and config (no weights load). server_model: the name the server knows it by.
    server: Optional[str] = None
    server_model: Optional[str] = None


@dataclass
class ServedConfig:
    """How served teachers (teachers.models[i].server) are asked (distill/signals/served.py)."""

    # the server's protocol: llama_cpp (llama-cpp-python's server: echo + text-keyed logprobs) or vllm
    # (vLLM / SGLang: prompt_logprobs keyed by token id, the block's ids sent as the prompt)
    api: str = "llama_cpp"
    top_k: int = 20  # log-probabilities per token; the rest of the mass is the tail, as the top-k cache's
    concurrency: int = 4  # requests in flight per rank (a block per request)
    prefetch: int = 2  # micro-batches requested ahead of the one the student is on
    timeout_s: float = 120.0  # each request's bound
    retries: int = 3  # more tries after a failed one, waiting 0.5 s, 1 s, 2 s, ...


@dataclass
class TeachersConfig:
    models: List[TeacherConfig] = field(default_factory=list)
    # replicated: every rank holds each teacher whole. zero3: each teacher is partitioned across
    # ranks by its own optimizer-less DeepSpeed ZeRO-3 engine (for teachers too big for one device).
    placement: str = "replicated"
    # auto: bf16 on GPUs and on CPUs with AMX / avx512_bf16, fp32 elsewhere (bf16 is emulated
    # and far slower there). Or float32, bfloat16, float16, or int8 (CPU: the linear layers
    # quantized dynamically, int8 weights and per-batch int8 activations; the run prints the
    # measured KL to the fp32 teachers; causal LMs keep their output layer in fp32).
    dtype: str = "auto"
    # torch.compile each teacher's body (dynamic shapes; replicated live teachers). The first
    # batches pay the compilation (seconds to a minute). On a 2-core avx512_bf16 CPU an int8 MiniLM
    # forward alone ran 1.25x faster compiled, but whole distillation steps did not gain
    # (docs/benchmarks.md). The run prints the KL to the eager fp32 teachers, as for dtype.
    compile: bool = False
    # shared: teachers must use the student's vocabulary and read the student's input ids.
    # per_model: each distinct tokenizer encodes the text itself (classification only), e.g. for a
    # student whose vocabulary was trimmed.
    tokenization: str = "shared"
    # task causal_lm: a folder written by `distill cache` (the teachers' top-k log-probabilities
    # over the training data); training then reads it and runs no teacher forward.
    cache: Optional[str] = None
    # stop: a NaN/inf in any teacher's logits ends the run, naming the teacher. skip: rows with
    # non-finite teacher logits leave the KD term (their labels still count) and are counted.
    on_nonfinite: str = "stop"
    # Routing (distill/signals/routing.py): a data column naming each row's domain; a row is distilled
    # from the teachers whose `routes` list its value, mixed by the configured interpolation with
    # weights of their own per route (route_weights, or fitted per route on that route's validation rows).
    route_by: Optional[str] = None
    # rows whose value no teacher lists: refuse (an error at start, naming the values) or
    # labels_only (they learn from their labels alone: no KD term)
    unrouted: str = "refuse"
    # per route value, a weight per teacher name serving it (default: teachers.models[*].weight)
    route_weights: Dict[str, Dict[str, float]] = field(default_factory=dict)
    served: ServedConfig = field(default_factory=ServedConfig)


@dataclass
class PruneConfig:
    """Importance-guided structured pruning of the student before distillation (distill/models/pruning.py).
    Off until target_params is set."""
    # the student's size as a fraction of the model it is cut from (the teacher with
    # student.from_teacher, else student.path), counted after trim_vocab: 0.5 = half the parameters
    target_params: Optional[float] = None
    depth: bool = False  # drop whole layers, the least important first
    width: bool = True  # shrink every layer: MLP channels (and attention heads, hidden size below)
    heads: bool = True  # with width: query heads (grouped-query attention keeps every key/value head)
    hidden: bool = False  # with width: the hidden size too (Llama-family decoders)
    depth_share: float = 0.5  # with depth and width: the share of the parameters to remove taken by depth
    depth_metric: str = "loss"  # loss: loss rise when a layer is skipped | block_influence: 1 - cos(in, out)
    calibration_samples: int = 256  # training rows (blocks, for a causal LM) importance is measured on


@dataclass
class StudentConfig:
    path: Optional[str] = None  # an existing checkpoint to train
    from_teacher: Optional[str] = None  # or: build the student from this teacher (name or index)
    # teacher layers to keep; default every other layer (every layer when student.prune is set)
    layers: Optional[List[int]] = None
    # keep only the vocabulary the training text uses (inside the model's window), the special
    # tokens and what any text still needs to encode (distill/tokens/vocabulary.py)
    trim_vocab: bool = False
    trim_vocab_floor: int = 0  # with trim_vocab: keep at least this many tokens (the original's lowest ids)
    prune: PruneConfig = field(default_factory=PruneConfig)
    # classification: the student classifies pooled encoder states (cls | mean, optionally
    # L2-normalised) with a linear head; exported with its code (loads with trust_remote_code)
    pooling: Optional[str] = None
    normalize: bool = False
    config_overrides: Dict[str, Any] = field(default_factory=dict)


@dataclass
class DataSourceConfig:
    path: Optional[str] = None  # local csv/json/jsonl/parquet file or folder, or a hub name
    split: str = "train"
    max_samples: Optional[int] = None
    encoding: str = "utf-8"  # csv only


@dataclass
class MixtureSourceConfig:
    name: str = MISSING  # 'train' / 'unlabeled' alone name those splits; other sources need path or from_split
    path: Optional[str] = None  # a file or hub name of its own
    from_split: Optional[str] = None  # or: rows of the 'train' or 'unlabeled' split
    match: Optional[str] = None  # keep rows whose first text field matches this regex (case-insensitive)
    invert_match: bool = False  # keep the rows that do not match instead
    split: str = "train"
    max_samples: Optional[int] = None
    encoding: str = "utf-8"


@dataclass
class DomainConfig:
    name: str = MISSING
    match: Optional[str] = None  # a validation row belongs to the domain when its first text field matches
    invert_match: bool = False
    # task causal_lm: or a text file of its own (same columns as data.train), e.g. held-out text
    # of a general domain next to the training domain's validation split
    path: Optional[str] = None


@dataclass
class AugmentConfig:
    """Classification: new KD-only transfer rows from the labelled training text (distill/tasks/augment.py):
    per text, `copies` new versions (causal-LM continuation, masked-LM replacement, word dropout,
    swaps), seeded, written once to the run directory and read back on resume. Off while copies is 0."""
    copies: int = 0
    word_dropout: float = 0.1  # each word dropped with this probability
    swap: float = 0.1  # round(swap x words) random pairs of words trade places
    # a share of the words replaced by a masked LM's top-5 sample: needs mlm_model, a model with a
    # trained masked-LM head (AutoModelForMaskedLM); no MiniLM package here ships one
    mask_replace: float = 0.0
    mlm_model: Optional[str] = None
    # with lm_model (a causal LM, e.g. a teacher's): each copy keeps the first lm_prefix share of
    # the text's words and the LM writes the rest (sampled, top-p lm_top_p, about as many tokens as
    # it replaces): new text near the training distribution, which the teachers then label
    lm_model: Optional[str] = None
    lm_prefix: float = 0.5
    lm_top_p: float = 0.95
    seed: int = 0


@dataclass
class PerturbConfig:
    """Classification, consistent distillation (distill/formulas/perturbations.py): each training
    micro-batch's tokens are masked in spans, drawn afresh per (epoch, position), and the teachers read
    the same masked input the student reads. Off while rate is 0."""
    rate: float = 0.0  # about this share of each row's maskable tokens is masked
    mean_span: float = 1.0  # mean length of a masked span (1: token dropout)


@dataclass
class DataConfig:
    train: DataSourceConfig = field(default_factory=DataSourceConfig)
    validation: DataSourceConfig = field(default_factory=lambda: DataSourceConfig(split="validation"))
    unlabeled: DataSourceConfig = field(default_factory=DataSourceConfig)  # adds only the KD term
    validation_fraction: float = 0.1  # carved out of train (stratified, seeded) when no validation path
    text_fields: List[str] = field(default_factory=lambda: ["text"])  # one field, or a pair
    label_field: str = "label"
    # a column naming each example (kept through tokenization): black-box teachers' files are keyed by it
    id_field: Optional[str] = None
    label_names: Optional[List[str]] = None  # order of the label ids; inferred (sorted) if unset
    max_length: int = 128
    # task causal_lm: text is packed into blocks of block_size tokens (every token predicted once);
    # with prompt_field and response_field set, each row is one sequence and only the response's
    # tokens are learned (the prompt's labels are -100), truncated to max_length.
    block_size: int = 128
    prompt_field: Optional[str] = None
    response_field: Optional[str] = None
    drop_duplicate_texts: bool = True  # before the split, so validation never leaks into training
    # task causal_lm: blocks tokenized once (a batched map on num_proc processes; null: the cores, at
    # most 8) into a memory-mapped Arrow file under prepared_dir (null: beside the `datasets` cache),
    # reused by later runs and every rank: corpora larger than memory (distill/data/prepared.py)
    prepare: bool = False
    prepared_dir: Optional[str] = None
    num_proc: Optional[int] = None
    # task causal_lm: data.train read as a stream (datasets streaming), shuffled in a buffer of
    # shuffle_buffer texts: nothing prepared or held; needs training.max_steps (distill/data/streamed.py)
    streaming: bool = False
    shuffle_buffer: int = 10000
    seed: int = 42  # for the validation carve-out and subsampling: keep it fixed across a project
    # Scheduled mixture: when sources are named, each batch draws its rows from them with the
    # proportions of schedules.data_mixture (distill/data/mixture.py); needs training.max_steps.
    mixture_sources: List[MixtureSourceConfig] = field(default_factory=list)
    # Validation metrics are also logged per domain (a regex over the first text field).
    eval_domains: List[DomainConfig] = field(default_factory=list)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    perturb: PerturbConfig = field(default_factory=PerturbConfig)


@dataclass
class ConfidenceConfig:
    sharpness: float = 0.1  # temperature of the softmax that turns confidence scores into weights
    combine: str = "linear"  # linear or geometric mixture with the per-sample weights
    use_labels: bool = True  # score by the probability of the gold label where one exists


@dataclass
class GateConfig:
    hidden: int = 32
    use_entropy: bool = True  # give the gate each teacher's entropy besides its distribution
    epochs: int = 200
    learning_rate: float = 0.01
    # what the gate sees of each teacher's distribution: distribution (all probabilities), summary
    # (entropy, top probability, top-2 log ratio: for vocabularies), auto (distribution up to 64 classes)
    features: str = "auto"


@dataclass
class InterpolationConfig:
    method: str = "linear"  # a registered name in distill/interpolation/strategies.py
    # validation: fit before training, on the validation split (rows, or tokens for a causal LM),
    # the mixture weights (linear by EM, geometric on the simplex) or the learned gate; rank 0 fits,
    # every rank receives its state. Temperatures fit inside [0.05, 20] (fitting.TEMPERATURE_BOUNDS).
    fit_on: Optional[str] = None
    fit_temperatures: bool = False  # also fit per-teacher temperatures (temperature scaling)
    # Options of a strategy live under its registered name and are passed to its constructor.
    confidence: ConfidenceConfig = field(default_factory=ConfidenceConfig)
    learned_gate: GateConfig = field(default_factory=GateConfig)


@dataclass
class ScalarSchedule:
    kind: str = "linear"  # constant, linear, cosine or exponential (distill/formulas/schedules.py)
    start: float = MISSING
    end: Optional[float] = None  # defaults to start
    start_step: int = 0
    end_step: Optional[int] = None  # defaults to the last optimizer step
    rate: float = 5.0  # exponential only: how late the ramp rises


@dataclass
class VectorSchedule:
    kind: str = "linear"
    start: List[float] = MISSING  # one weight per teacher
    end: Optional[List[float]] = None
    start_step: int = 0
    end_step: Optional[int] = None
    rate: float = 5.0


@dataclass
class SchedulesConfig:
    kd_alpha: Optional[ScalarSchedule] = None  # replaces loss.kd_alpha when set
    # replaces loss.temperature when set, for the student AND the teachers: teacher k is softened by
    # its own temperature times T(step) / loss.temperature, so the ratios between them stay fixed
    temperature: Optional[ScalarSchedule] = None
    teacher_weights: Optional[VectorSchedule] = None  # replaces teachers.models[*].weight when set
    data_mixture: Optional[VectorSchedule] = None  # proportions of data.mixture_sources, in their order


@dataclass
class IntermediateConfig:
    """Intermediate-layer terms against one teacher (distill/formulas/layer_terms.py), added to the loss
    as weight * that teacher's current interpolation weight * term: the teacher that weighs more in
    the target also weighs more inside. Both models must read the same tokens (shared tokenizer;
    with per_model tokenization, rows whose tokens differ are left out of these terms and counted)."""
    teacher: str = MISSING  # a teacher's name or index in teachers.models (a live model, not a file)
    # hidden states: 1 - cos (DistilBERT) or the MSE (TinyBERT) between student layer s, projected by
    # a learned linear map to the teacher's width where the widths differ (trained with the student,
    # saved in checkpoints, dropped at export), and teacher layer t. 0 turns the term off.
    hidden_weight: float = 0.0
    hidden_loss: str = "cosine"  # cosine | mse
    # uniform (TinyBERT: the embeddings 0 -> 0, student layer m -> teacher layer round(m N / M)), or
    # pairs [[s, t], ...]; layers count from 1 (the output of block i), 0 is the embeddings
    layer_map: Any = "uniform"
    # self-attention relations (MiniLMv2): KL between the teacher's and the student's
    # softmax(A A^T / sqrt(d)) for A the query, key and value vectors, split into relation_heads
    # (default: the largest count <= the student's heads that divides every width). No projection.
    relation_weight: float = 0.0
    relations: List[str] = field(default_factory=lambda: ["query", "key", "value"])
    relation_heads: Optional[int] = None
    relation_layers: Any = "last"  # last (the last student layer -> the teacher's last) or pairs [[s, t], ...]


@dataclass
class LossConfig:
    kd_alpha: float = 0.5  # weight of the distillation term; 0 is plain fine-tuning
    temperature: float = 2.0  # student temperature T, and the T^2 gradient-scale factor
    label_smoothing: float = 0.0
    # D(target || student) in the KD term: a registered name in distill/formulas/divergences.py (forward_kl,
    # reverse_kl, jsd, skew_kl, skew_reverse_kl); jsd_beta and skew are those divergences' options.
    divergence: str = "forward_kl"
    jsd_beta: float = 0.5
    skew: float = 0.1
    # task causal_lm: the loss runs over chunk_tokens tokens at a time (forward KL + linear builds
    # the target a teacher at a time; other settings hold [K, chunk, V] and divide the chunk by the
    # number of teachers); fused computes each chunk's gradient in the forward pass from the
    # student's last hidden states (distill/formulas/token_loss.py).
    chunk_tokens: int = 1024
    fused: bool = True
    # intermediate-layer distillation, one entry per teacher it reads (IntermediateConfig above)
    intermediate: List[IntermediateConfig] = field(default_factory=list)


@dataclass
class OnPolicyConfig:
    """task causal_lm with prompt/response data (distill/tasks/on_policy.py): a share of the micro-batches
    replace each response by the student's own sampled continuation of the prompt (seeded by the
    micro-step, so a resumed run samples the same tokens; stops at EOS), and the teachers' target
    is computed on those tokens. Off while fraction is 0."""
    fraction: float = 0.0  # 0: every micro-batch reads the data's responses; 1: fully on-policy
    max_new_tokens: int = 64  # also capped by data.max_length
    temperature: float = 1.0  # of the student's sampling (not the distillation temperature)
    top_p: float = 1.0  # nucleus sampling; 1 samples from the whole distribution


@dataclass
class SelectBestConfig:
    """Which checkpoint the run exports: with `metric` set (a validation figure of the student, e.g.
    accuracy, entity_f1, perplexity), the one whose evaluation (every training.eval_every steps and at
    the end) was best, instead of the last step's (the HF Trainer's metric_for_best_model)."""
    metric: Optional[str] = None
    mode: str = "auto"  # auto (the figure's own direction: accuracy up, perplexity down), max or min


@dataclass
class TrainingConfig:
    epochs: float = 1.0
    max_steps: Optional[int] = None  # optimizer steps; overrides epochs when set
    micro_batch_size: int = 16  # per rank
    gradient_accumulation_steps: int = 1
    # rows (sequences, for a causal LM) per optimizer step over all ranks; when set, the
    # accumulation steps follow from it (global / (micro_batch_size x ranks), exact), so the data
    # seen per step stays the same when the rank count changes
    global_batch_size: Optional[int] = None
    eval_batch_size: int = 64
    learning_rate: float = 5e-5
    weight_decay: float = 0.01
    lr_schedule: str = "linear"  # linear, cosine or constant, after warmup
    warmup_ratio: float = 0.06
    max_grad_norm: float = 1.0
    precision: str = "fp32"  # fp32, bf16 or fp16 for the student
    log_every: int = 10
    eval_every: int = 0  # optimizer steps; 0 evaluates at the end only
    checkpoint_every: int = 200  # optimizer steps; a checkpoint is always written at the end
    # the newest N checkpoints are kept; 0: only the newest while training (what a resume needs),
    # none once the run has exported its student (a checkpoint holds the optimizer's states: about
    # 12 bytes per student parameter with Adam in fp32, beside the 4 of the weights)
    keep_checkpoints: int = 2
    resume: str = "never"  # never, or auto: continue from the newest checkpoint in output_dir
    progress_bar: bool = True
    on_policy: OnPolicyConfig = field(default_factory=OnPolicyConfig)
    select_best: SelectBestConfig = field(default_factory=SelectBestConfig)
    # `distill plan`'s estimate is checked at start, before any weight loads: a run it says cannot fit
    # the device is refused; true goes ahead anyway (for a plan that is wrong)
    ignore_memory_plan: bool = False


@dataclass
class DeepSpeedConfig:
    zero_stage: int = 0
    # Extra keys merged into the generated DeepSpeed config. A key that contradicts the settings
    # above (batch sizes, clipping, precision, stage) is an error, never silently preferred.
    config: Dict[str, Any] = field(default_factory=dict)


@dataclass
class ExportConfig:
    dtype: str = "fp32"  # fp32, bf16 or fp16


@dataclass
class TokenClassificationConfig:
    """task token_classification (distill/tasks/token_classification.py): which sub-tokens of a word
    carry its tag in the loss. Words are scored at their first sub-token either way."""
    label_all_subtokens: bool = False  # false: the first sub-token of each word; true: every sub-token


@dataclass
class SweepConfig:
    """`distill sweep CONFIG OUT` (run/sweep.py): Optuna's TPE search over the settings that decide
    the student's quality, each trial a normal run directory scored on the validation split.
    `space`: dotted key -> [low, high] (uniform; integers if both are), {low, high, log: true}, or
    {choices: [...]}; empty: loss.kd_alpha, loss.temperature and training.learning_rate around the
    config's values. `toggles`: configured features each trial keeps or turns off (their schema
    default), e.g. [loss.intermediate, data.augment.copies]. The hard-label twin (loss.kd_alpha=0,
    everything else as configured) always runs first."""
    trials: int = 8
    seeds: int = 1  # runs per trial (seed, seed+1, ...): its score is their mean, the table shows the std
    metric: Optional[str] = None  # a validation figure of the task (default: the one its curves follow)
    space: Dict[str, Any] = field(default_factory=dict)
    toggles: List[str] = field(default_factory=list)


@dataclass
class DistillConfig:
    task: str = "sequence_classification"
    output_dir: str = MISSING
    seed: int = 42
    trust_remote_code: bool = False  # run a model's own Python code from its folder / the hub
    allow_pickled_weights: bool = False  # load pytorch_model.bin (pickle: can run code) when no safetensors exist
    teachers: TeachersConfig = field(default_factory=TeachersConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    data: DataConfig = field(default_factory=DataConfig)
    interpolation: InterpolationConfig = field(default_factory=InterpolationConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    schedules: SchedulesConfig = field(default_factory=SchedulesConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    # a section named after a task belongs to it: set under another task, it is refused (tasks/__init__.py)
    token_classification: TokenClassificationConfig = field(default_factory=TokenClassificationConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)


PLACEMENTS = ("replicated", "zero3")
# softening temperatures that keep a distribution neither one-hot nor uniform in float32
MIN_TEMPERATURE, MAX_TEMPERATURE = 0.05, 100.0
TEACHER_DTYPES = ("auto", "float32", "bfloat16", "float16", "int8")
TOKENIZATIONS = ("shared", "per_model")
SERVED_APIS = ("llama_cpp", "vllm")  # signals/served.PROTOCOLS
LR_SCHEDULES = ("linear", "cosine", "constant")
PRECISIONS = ("fp32", "bf16", "fp16")


@functools.lru_cache(maxsize=None)
def schema_defaults(kind: type = None) -> DictConfig:
    """The schema's defaults of the dataclass `kind` (the whole config by default), read-only and made once:
    building a structured config costs tens of milliseconds, and the checks compare against it per key."""
    defaults = OmegaConf.structured(DistillConfig if kind is None else kind)
    OmegaConf.set_readonly(defaults, True)
    return defaults


def load_config(path: Optional[str | os.PathLike], overrides: Optional[List[str]] = None,
                fragments: Sequence[str | os.PathLike] = ()) -> DistillConfig:
    """Merge a YAML file, then YAML fragments (e.g. `distill fit-weights` output), then dotted
    `key=value` overrides onto the schema, and validate.

    Returns a typed, read-only `DistillConfig` (an omegaconf structured config).
    """
    schema = OmegaConf.structured(DistillConfig)
    layers = [schema]
    for file_path in ([path] if path is not None else []) + list(fragments):
        for layer, source in _read_with_includes(Path(file_path), [], with_sources=True):
            _check_kinds(schema, layer, "", source)
            layers.append(layer)
    try:
        merged = OmegaConf.merge(*layers)
    except (OmegaConfBaseException, TypeError, ValueError) as error:
        raise ConfigError(_describe_omegaconf_error(error, path)) from error
    for override in overrides or []:
        key, separator, text = override.partition("=")
        if not separator or not key:
            raise ConfigError(f"override {override!r} must look like dotted.key=value")
        try:
            value = yaml.safe_load(text) if text else None
        except yaml.YAMLError as error:
            problem = str(getattr(error, "problem", None) or error).splitlines()[0]
            raise ConfigError(f"override {override!r}: its value is not valid YAML ({problem}); fix the brackets or "
                              f"quote it ({key}='...')") from error
        _check_list_index(merged, key, override)
        try:  # update() understands list indices (teachers.models.0.path=...), from_dotlist does not
            OmegaConf.update(merged, key, value, merge=True)
        except (OmegaConfBaseException, TypeError, ValueError, IndexError) as error:
            raise ConfigError(f"override {override!r}: " + _describe_omegaconf_error(error, None)) from error
    try:
        OmegaConf.to_container(merged, throw_on_missing=True)
    except OmegaConfBaseException as error:
        raise ConfigError(_describe_omegaconf_error(error, path)) from error
    validate(merged)
    OmegaConf.set_readonly(merged, True)
    return merged  # type: ignore[return-value]


def read_run_config(path: str | os.PathLike) -> DistillConfig:
    """The typed config a run wrote (RUN/config.yaml), without re-checking files or values: its
    teachers and data may have moved since, and export only needs the task and the data section."""
    try:
        merged = OmegaConf.merge(OmegaConf.structured(DistillConfig), OmegaConf.load(Path(path)))
    except Exception as error:
        raise ConfigError(f"{path} is not a config written by distill: {error}") from error
    OmegaConf.set_readonly(merged, True)
    return merged  # type: ignore[return-value]


def _check_kinds(schema, layer, prefix: str, source: Path) -> None:
    """A mapping where the schema has a list (or the reverse) is named with its key and file, instead
    of omegaconf's 'Cannot merge incompatible container types'."""
    if not isinstance(layer, DictConfig) or not isinstance(schema, DictConfig) or schema._is_none():
        return  # an Optional section that is None in the schema: the merge checks what is given
    for key in layer.keys():
        if key not in schema:
            continue  # an unknown key: the merge names it
        expected, given = schema._get_node(key), layer._get_node(key)
        dotted = f"{prefix}{key}"
        expects_list = OmegaConf.is_list(expected) or (hasattr(expected, "_metadata") and
                                                        "List" in str(getattr(expected._metadata, "ref_type", "")))
        expects_mapping = isinstance(expected, DictConfig)
        if expects_list and isinstance(given, DictConfig):
            raise ConfigError(f"config file {source}: {dotted} must be a list (items starting with '- '), "
                              f"got a mapping {list(given.keys())[:4]}")
        if expects_mapping and OmegaConf.is_list(given):
            raise ConfigError(f"config file {source}: {dotted} must be a mapping (key: value lines), got a list")
        if expects_mapping and isinstance(given, DictConfig):
            _check_kinds(expected, given, f"{dotted}.", source)


def _read_with_includes(config_path: Path, chain: List[Path], with_sources: bool = False) -> list:
    """A YAML file as omegaconf layers: its `include:` files first (paths relative to it), then
    itself (with `with_sources`, as (layer, file) pairs)."""
    if not config_path.is_file():
        raise ConfigError(f"config file {config_path} does not exist" +
                          (f" (included from {chain[-1]})" if chain else ""))
    if config_path.resolve() in chain:
        raise ConfigError(f"config file {config_path} includes itself through {[str(p) for p in chain]}")
    try:
        layer = OmegaConf.load(config_path)
    except Exception as error:  # yaml.YAMLError and omegaconf's own parse errors
        raise ConfigError(f"config file {config_path} is not valid YAML: {error}") from error
    if not isinstance(layer, DictConfig):
        raise ConfigError(f"config file {config_path}: the top level must be a mapping of keys (output_dir: ..., "
                          f"teachers: ...), got a {type(layer).__name__.replace('Config', '').lower()}")
    includes = layer.pop("include", None)
    own = (layer, config_path) if with_sources else layer
    if includes is None:
        return [own]
    layers = []
    for include in [includes] if isinstance(includes, str) else list(includes):
        layers.extend(_read_with_includes(config_path.parent / str(include), chain + [config_path.resolve()],
                                          with_sources))
    return layers + [own]


def _check_list_index(merged, key: str, override: str) -> None:
    """An override that indexes past the end of a list (teachers.models.5.weight with two teachers)
    is named with the list's length and the fix; omegaconf's own message spoke of dict types."""
    parts = key.split(".")
    node = merged
    for depth, part in enumerate(parts[:-1]):
        if OmegaConf.is_list(node) and part.isdigit():
            if int(part) >= len(node):
                listed = ".".join(parts[:depth])
                raise ConfigError(f"override {override!r}: {listed} has {len(node)} entr{'y' if len(node) == 1 else 'ies'}"
                                  f", so index {part} does not exist: use an index below {len(node)}, or add the "
                                  f"entry to {listed} in the config file")
            node = node[int(part)]
        elif isinstance(node, DictConfig) and part in node:
            node = node._get_node(part)
            if node is None or getattr(node, "_is_none", lambda: False)():
                return
        else:
            return


def _describe_omegaconf_error(error: Exception, path) -> str:
    key = getattr(error, "full_key", None) or "?"
    where = f" in {path}" if path else ""
    message = str(error).splitlines()[0]
    if "Missing mandatory value" in message:
        return f"config key '{key}'{where} is required but not set"
    if "not in struct" in message or "Key '" in message and "not" in message:
        return f"unknown config key '{key}'{where}: check its spelling against distill/config/schema.py"
    if "is not a ListConfig" in message:  # a single value where the schema has a list
        return f"config key '{key}'{where} takes a list: write {key}=[VALUE] (in YAML: {key.rsplit('.', 1)[-1]}: [VALUE])"
    return f"config key '{key}'{where}: {message}"


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def _non_finite_numbers(node, path: str = ""):
    """Dotted keys of every float in a plain config tree that is inf or NaN (`.inf` parses as a float)."""
    import math

    if isinstance(node, dict):
        for key, value in node.items():
            yield from _non_finite_numbers(value, f"{path}.{key}" if path else str(key))
    elif isinstance(node, list):
        for index, item in enumerate(node):
            yield from _non_finite_numbers(item, f"{path}[{index}]")
    elif isinstance(node, float) and not math.isfinite(node):
        yield path, node


def validate(cfg: DistillConfig | DictConfig) -> None:
    """Check values the type system cannot: ranges, choices, combinations across sections, and that
    local files exist: each rule of RULES in turn, the first failure raised. The task's own checks
    (settings it would ignore) follow in tasks.load_task_config."""
    for rule in RULES:
        rule(cfg)


def _validate_numbers(cfg) -> None:
    for key, value in _non_finite_numbers(OmegaConf.to_container(cfg, resolve=True)):
        raise ConfigError(f"{key}: {value} is not a finite number; give a finite value (e.g. {key}=2.0)")


def _validate_teacher_options(cfg) -> None:
    _require(cfg.teachers.placement in PLACEMENTS,
             f"teachers.placement: {cfg.teachers.placement!r} is not one of {list(PLACEMENTS)}")
    _require(cfg.teachers.dtype in TEACHER_DTYPES,
             f"teachers.dtype: {cfg.teachers.dtype!r} is not one of {list(TEACHER_DTYPES)}")
    _require(cfg.teachers.cache is None or cfg.teachers.placement == "replicated",
             "teachers.placement is for live teachers; with teachers.cache no teacher is loaded")
    _require(cfg.teachers.dtype != "int8" or cfg.teachers.placement == "replicated",
             "teachers.dtype=int8 with teachers.placement=zero3: quantized teachers are not partitioned; use one of them")
    _require(not cfg.teachers.compile or cfg.teachers.placement == "replicated",
             "teachers.compile with teachers.placement=zero3: a partitioned teacher gathers its layers in hooks that "
             "a compiled forward does not keep; use one of them")
    _require(not cfg.teachers.compile or cfg.teachers.cache is None,
             "teachers.compile with teachers.cache: no teacher runs; remove teachers.compile")
    _require(not cfg.teachers.compile or not cfg.loss.intermediate,
             "teachers.compile with loss.intermediate: the intermediate terms hook into the teachers' layers at every "
             "step, which recompiles a compiled forward; remove one of them")
    _require(cfg.teachers.on_nonfinite in ("stop", "skip"),
             f"teachers.on_nonfinite: {cfg.teachers.on_nonfinite!r} is not one of ['stop', 'skip']")
    _require(cfg.teachers.tokenization in TOKENIZATIONS,
             f"teachers.tokenization: {cfg.teachers.tokenization!r} is not one of {list(TOKENIZATIONS)}")


def _validate_loss(cfg) -> None:
    loss = cfg.loss
    _require(0.0 <= loss.kd_alpha <= 1.0, f"loss.kd_alpha must lie in [0, 1], got {loss.kd_alpha}")
    _require(MIN_TEMPERATURE <= loss.temperature <= MAX_TEMPERATURE,
             f"loss.temperature={loss.temperature:g} is outside [{MIN_TEMPERATURE:g}, {MAX_TEMPERATURE:g}]: below it every "
             "distribution is one-hot and the KD term is 0, above it every one is uniform; KD uses 1-10 (e.g. 2)")
    _require(0.0 <= loss.label_smoothing < 1.0,
             f"loss.label_smoothing must lie in [0, 1), got {loss.label_smoothing}")


def _validate_teachers(cfg) -> None:
    loss = cfg.loss
    teachers = cfg.teachers.models
    _require(len(teachers) > 0 or loss.kd_alpha == 0.0,
             "teachers.models is empty but loss.kd_alpha > 0: name at least one teacher, "
             "or set loss.kd_alpha=0 for plain fine-tuning")
    for index, teacher in enumerate(teachers):
        key = f"teachers.models[{index}]"
        _require(teacher.weight >= 0, f"{key}.weight must be >= 0, got {teacher.weight}")
        if teacher.temperature is not None:
            _require(MIN_TEMPERATURE <= teacher.temperature <= MAX_TEMPERATURE,
                     f"{key}.temperature={teacher.temperature:g} is outside [{MIN_TEMPERATURE:g}, {MAX_TEMPERATURE:g}]: "
                     "use 1-10 (e.g. 2), or leave it out to take loss.temperature")
        _require((teacher.path is None) != (teacher.logits is None),
                 f"{key}: set exactly one of {key}.path (a model) or {key}.logits (a file of its outputs)")
        _require(teacher.outputs in ("logits", "probabilities"),
                 f"{key}.outputs={teacher.outputs!r}: use logits or probabilities")
        if teacher.logits is not None:
            _require(resolve_path(teacher.logits).is_file(), f"{key}.logits: {teacher.logits} is not a file")
            _require(cfg.data.id_field is not None, f"{key}.logits is keyed by example: set data.id_field to the "
                     "column that names each example in the data and in the file")
            _require(teacher.pooling is None and student_source_is_not(cfg, index),
                     f"{key}: a black-box teacher has no weights: it cannot be pooled or be student.from_teacher")
        else:
            _require(teacher.outputs == "logits", f"{key}.outputs is read only with {key}.logits: remove it")
            _check_model_reference(teacher.path, f"{key}.path", cfg.allow_pickled_weights,
                                   weights=teacher.server is None)  # a served teacher's path: tokenizer and config
        _require(teacher.server_model is None or teacher.server is not None,
                 f"{key}.server_model is read only with {key}.server: remove it or set the server's URL")
        if teacher.server is not None:
            _require(teacher.path is not None, f"{key}.server: set {key}.path to the teacher's tokenizer and config "
                     "(the server's tokens are checked against it; no weights load)")
            _require(str(teacher.server).startswith(("http://", "https://")) and "/v1" not in str(teacher.server),
                     f"{key}.server={teacher.server!r}: give the server's root URL, e.g. http://127.0.0.1:8080")
    _validate_served(cfg)
    if teachers:
        _require(sum(t.weight for t in teachers) > 0,
                 "teachers.models[*].weight are all zero: at least one teacher needs a positive weight")
        names = [teacher_display_name(t, i) for i, t in enumerate(teachers)]
        for index, name in enumerate(names):
            _check_name(name, f"teachers.models[{index}].name")
        _require(len(set(names)) == len(names), f"teachers.models: names must be unique, got {names}")
        reserved = sorted(set(names) & {"student", "target"})
        _require(not reserved, f"teachers.models: the names {reserved} are reserved; set teachers.models[i].name")


def _validate_served(cfg) -> None:
    served, key = cfg.teachers.served, "teachers.served"
    _require(served.api in SERVED_APIS, f"{key}.api: {served.api!r} is not one of {list(SERVED_APIS)}")
    for name, low in (("top_k", 1), ("concurrency", 1), ("prefetch", 0), ("retries", 0)):
        _require(getattr(served, name) >= low, f"{key}.{name} must be >= {low}, got {getattr(served, name)}")
    _require(served.timeout_s > 0, f"{key}.timeout_s must be > 0, got {served.timeout_s}")


def _validate_student(cfg) -> None:
    student = cfg.student
    _require((student.path is None) != (student.from_teacher is None),
             "student: set exactly one of student.path (an existing model) or "
             "student.from_teacher (build a smaller copy of a teacher)")
    _require(student.layers is None or student.from_teacher is not None, "student.layers picks the layers copied "
             "from a teacher and is read only with student.from_teacher: remove it with student.path (prune that "
             "model with student.prune, or build the student from a teacher)")
    if student.path is not None:
        _check_model_reference(student.path, "student.path", cfg.allow_pickled_weights)
    if student.from_teacher is not None:
        resolve_teacher_index(cfg, student.from_teacher)
        fixed = sorted(set(student.config_overrides) & ARCHITECTURE_KEYS)
        _require(not fixed, f"student.config_overrides: {fixed} cannot be applied to weights copied from a teacher "
                 "(they change the weights' shapes or what they compute): choose the depth with student.layers, "
                 "or start from student.path")
    _validate_prune(student)
    _validate_pooling("student", student)
    for index, teacher in enumerate(cfg.teachers.models):
        _validate_pooling(f"teachers.models[{index}]", teacher)
        if teacher.head is not None:
            _require(resolve_path(teacher.head).is_file() and str(teacher.head).endswith(".safetensors"),
                     f"teachers.models[{index}].head: {teacher.head} is not a .safetensors file")
            check_safetensors_file(resolve_path(teacher.head), f"teachers.models[{index}].head",
                                   "save the head's weight (and bias) with safetensors.torch.save_file")
    if student.layers is not None:
        _require(len(student.layers) > 0, "student.layers is empty: keep at least one layer")
        _require(all(layer >= 0 for layer in student.layers), "student.layers must be >= 0")


def _validate_data(cfg) -> None:
    data = cfg.data
    _require(data.train.path is not None, "data.train.path is required")
    for key in ("train", "validation", "unlabeled"):
        source = data[key]
        if source.path is not None:
            _check_data_reference(source.path, f"data.{key}.path")
        if source.max_samples is not None:
            _require(source.max_samples > 0, f"data.{key}.max_samples must be > 0")
    _require(1 <= len(data.text_fields) <= 2,
             f"data.text_fields takes one field or a pair, got {list(data.text_fields)}")
    _require(0.0 < data.validation_fraction < 1.0,
             f"data.validation_fraction must lie in (0, 1), got {data.validation_fraction}")
    _require(data.max_length > 0, "data.max_length must be > 0")
    if data.label_names is not None:
        _require(len(set(data.label_names)) == len(data.label_names) >= 2,
                 f"data.label_names must hold at least two distinct names, got {list(data.label_names)}")


def _validate_training(cfg) -> None:
    training = cfg.training
    for key in ("micro_batch_size", "gradient_accumulation_steps", "eval_batch_size", "log_every",
                "checkpoint_every"):
        _require(training[key] > 0, f"training.{key} must be > 0, got {training[key]}")
    _require(training.keep_checkpoints >= 0, "training.keep_checkpoints must be >= 0 (0: none after the export)")
    if training.global_batch_size is not None:
        per_rank = training.micro_batch_size * training.gradient_accumulation_steps
        _require(training.global_batch_size > 0 and training.global_batch_size % per_rank == 0,
                 f"training.global_batch_size={training.global_batch_size} must be a positive multiple of "
                 f"training.micro_batch_size x gradient_accumulation_steps = {per_rank} (leave the accumulation "
                 "steps unset: they follow from the global batch and the rank count)")
    _require(training.epochs > 0 or training.max_steps, "training.epochs must be > 0")
    if training.max_steps is not None:
        _require(training.max_steps > 0, f"training.max_steps must be > 0, got {training.max_steps}")
    _require(training.eval_every >= 0, "training.eval_every must be >= 0")
    _require(training.learning_rate > 0, f"training.learning_rate must be > 0, got {training.learning_rate}")
    _require(0.0 <= training.warmup_ratio < 1.0, "training.warmup_ratio must lie in [0, 1)")
    _require(training.max_grad_norm >= 0, "training.max_grad_norm must be >= 0 (0 disables clipping)")
    _require(training.lr_schedule in LR_SCHEDULES,
             f"training.lr_schedule: {training.lr_schedule!r} is not one of {list(LR_SCHEDULES)}")
    _require(training.precision in PRECISIONS,
             f"training.precision: {training.precision!r} is not one of {list(PRECISIONS)}")
    _require(training.resume in ("never", "auto"),
             f"training.resume: {training.resume!r} is not one of ['never', 'auto']")
    select = training.select_best
    _require(select.mode in ("auto", "max", "min"),
             f"training.select_best.mode: {select.mode!r} is not one of ['auto', 'max', 'min']")
    if select.metric is not None:
        _require(training.eval_every > 0, f"training.select_best.metric={select.metric} chooses among the evaluations "
                 "made while training: set training.eval_every (optimizer steps between them)")


def _validate_sweep(cfg) -> None:
    from omegaconf import OmegaConf

    sweep = cfg.sweep
    _require(sweep.trials >= 1, f"sweep.trials must be >= 1, got {sweep.trials}")
    _require(sweep.seeds >= 1, f"sweep.seeds must be >= 1, got {sweep.seeds}")
    default = schema_defaults()
    for key in list(sweep.space) + list(sweep.toggles):
        _require(key != "sweep" and not key.startswith(("sweep.", "output_dir", "seed")) and
                 OmegaConf.select(default, key, default="<missing>") != "<missing>",
                 f"sweep: {key!r} is not a setting a trial can change (a dotted key of the config, e.g. loss.kd_alpha)")
    for key, spec in sweep.space.items():
        spec = OmegaConf.to_container(spec) if OmegaConf.is_config(spec) else spec
        ranged = isinstance(spec, list) and len(spec) == 2 and all(isinstance(v, (int, float)) for v in spec)
        mapped = isinstance(spec, dict) and (("choices" in spec and isinstance(spec["choices"], list) and spec["choices"])
                                             or ({"low", "high"} <= set(spec) and set(spec) <= {"low", "high", "log"}))
        _require(ranged or mapped, f"sweep.space.{key}: give [low, high], {{low, high, log: true}} or {{choices: [...]}}")
        if ranged or "low" in spec:
            low, high = (spec if ranged else [spec["low"], spec["high"]])
            _require(low < high and (not isinstance(spec, dict) or not spec.get("log") or low > 0),
                     f"sweep.space.{key}: needs low < high (and low > 0 with log: true), got [{low}, {high}]")


def _validate_deepspeed_and_export(cfg) -> None:
    _require(cfg.deepspeed.zero_stage in (0, 1, 2, 3),
             f"deepspeed.zero_stage must be 0, 1, 2 or 3, got {cfg.deepspeed.zero_stage}")
    for key in cfg.deepspeed.config:
        _require(key not in DISTILL_BUILDS,
                 f"deepspeed.config.{key}: distill builds the {key} itself ({DISTILL_BUILDS.get(key)}): set those "
                 "keys instead and remove this one")
        _require(key in DEEPSPEED_KEYS, f"deepspeed.config.{key} is not a DeepSpeed setting distill passes on "
                 f"(known: {sorted(DEEPSPEED_KEYS)}): check its spelling against DeepSpeed's config reference")
    _require(cfg.export.dtype in PRECISIONS,
             f"export.dtype: {cfg.export.dtype!r} is not one of {list(PRECISIONS)}")


# Config keys that decide the shapes of a model's weights or what the weights compute: copied
# teacher weights cannot take another value (student.layers chooses the depth).
ARCHITECTURE_KEYS = frozenset({
    "hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim", "intermediate_size",
    "num_hidden_layers", "vocab_size", "embedding_size", "max_position_embeddings", "type_vocab_size",
    "tie_word_embeddings", "model_type", "architectures", "hidden_act", "position_embedding_type",
    "rope_theta", "rope_scaling", "layer_types", "n_embd", "n_head", "n_layer", "n_inner", "n_positions"})


# deepspeed.config: the top-level sections of DeepSpeed's JSON config that distill passes on (the
# engine silently ignores an unknown key, so a typo would do nothing); the optimizer and scheduler
# are distill's own.
DISTILL_BUILDS = {"optimizer": "AdamW from training.learning_rate and training.weight_decay",
                  "scheduler": "training.lr_schedule and training.warmup_ratio"}
DEEPSPEED_KEYS = frozenset({
    "train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "gradient_clipping",
    "zero_optimization", "bf16", "fp16", "amp", "zero_allow_untested_optimizer", "zero_force_ds_cpu_optimizer",
    "steps_per_print", "wall_clock_breakdown", "prescale_gradients", "gradient_predivide_factor",
    "communication_data_type", "seq_parallel_communication_data_type", "sparse_gradients",
    "activation_checkpointing", "flops_profiler", "comms_logger", "tensorboard", "wandb", "csv_monitor",
    "aio", "checkpoint", "data_types", "dump_state", "memory_breakdown", "dataloader_drop_last",
    "disable_allgather", "use_node_local_storage", "torch_autocast", "timers", "compile", "nebula",
    "elasticity", "autotuning", "data_efficiency", "compression_training", "graph_harvesting"})


def _validate_pooling(key: str, section) -> None:
    _require(section.pooling in (None, "cls", "mean"), f"{key}.pooling={section.pooling!r}: use cls or mean")
    unused = [name for name in ("normalize", "head") if getattr(section, name, None) not in (None, False)]
    _require(section.pooling is not None or not unused,
             f"{key}: {unused} apply to pooled states: set {key}.pooling (cls or mean) or remove them")


def _validate_prune(student) -> None:
    prune = student.prune
    defaults = PruneConfig()
    if prune.target_params is None:
        changed = [f"student.prune.{key}" for key in vars(defaults) if key != "target_params"
                   and getattr(prune, key) != getattr(defaults, key)]
        _require(not changed, f"{changed} set without student.prune.target_params: set the budget "
                 "(e.g. student.prune.target_params=0.5) or remove them")
    else:
        _require(0 < prune.target_params <= 1, "student.prune.target_params must be in (0, 1] (a fraction of the "
                 "parameters of the model the student is cut from)")
        _require(prune.depth or prune.width, "student.prune: set depth, width or both to true")
        _require(prune.depth_metric in ("loss", "block_influence"),
                 f"student.prune.depth_metric={prune.depth_metric!r}: use loss or block_influence")
        _require(0 <= prune.depth_share <= 1, "student.prune.depth_share must be in [0, 1]")
        _require(prune.calibration_samples >= 1, "student.prune.calibration_samples must be >= 1")
        _require(not (prune.depth and student.layers is not None),
                 "student.layers and student.prune.depth both choose the layers: keep one")
        _require(prune.width or not (prune.hidden or not prune.heads),
                 "student.prune.heads / hidden shape the width: set student.prune.width=true or leave them unset")
    _require(student.trim_vocab_floor >= 0, "student.trim_vocab_floor must be >= 0")
    _require(student.trim_vocab or student.trim_vocab_floor == 0,
             "student.trim_vocab_floor is read only with student.trim_vocab=true: set it or remove the floor")


def _validate_task(cfg) -> None:
    data = cfg.data
    _require(data.block_size > 0, f"data.block_size must be > 0, got {data.block_size}")
    _require(cfg.loss.chunk_tokens > 0, f"loss.chunk_tokens must be > 0, got {cfg.loss.chunk_tokens}")
    _require((data.prompt_field is None) == (data.response_field is None),
             "data.prompt_field and data.response_field go together: set both (prompt/response pairs) or neither")
    _require(data.num_proc is None or data.num_proc >= 1, f"data.num_proc must be >= 1 (or null: the cores), got {data.num_proc}")
    _require(data.shuffle_buffer >= 1, f"data.shuffle_buffer must be >= 1 (texts held for shuffling), got {data.shuffle_buffer}")
    _require(0 <= data.perturb.rate < 1, f"data.perturb.rate must be in [0, 1), got {data.perturb.rate}")
    _require(data.perturb.mean_span >= 1, f"data.perturb.mean_span must be >= 1, got {data.perturb.mean_span}")
    for name in ("prepared_dir", "num_proc"):
        _require(getattr(data, name) is None or data.prepare,
                 f"data.{name} is read only with data.prepare=true: set it or remove data.{name}")


def _validate_routes(cfg) -> None:
    teachers, route_by = cfg.teachers, cfg.teachers.route_by
    names = [teacher_display_name(t, i) for i, t in enumerate(teachers.models)]
    if route_by is None:
        listed = [f"teachers.models[{i}].routes" for i, t in enumerate(teachers.models) if t.routes is not None]
        unused = listed + (["teachers.unrouted"] if teachers.unrouted != "refuse" else []) + \
            (["teachers.route_weights"] if teachers.route_weights else [])
        _require(not unused, f"{unused} set without teachers.route_by: name the data column that routes rows, or "
                 "remove them")
        return
    _require(bool(teachers.models), "teachers.route_by without teachers.models: name the teachers of each route")
    _require(teachers.unrouted in ("refuse", "labels_only"),
             f"teachers.unrouted: {teachers.unrouted!r} is not refuse or labels_only")
    for index, teacher in enumerate(teachers.models):
        key = f"teachers.models[{index}].routes"
        _require(teacher.routes is not None and len(teacher.routes) > 0,
                 f"{key}: with teachers.route_by={route_by} every teacher lists the values of column {route_by!r} "
                 "it serves, e.g. routes: [news]")
        for value in teacher.routes:
            _check_name(str(value), key)
        _require(len(set(teacher.routes)) == len(teacher.routes), f"{key}: {list(teacher.routes)} lists a value twice")
    served = {str(v) for t in teachers.models for v in t.routes}
    for value, weights in teachers.route_weights.items():
        key = f"teachers.route_weights.{value}"
        _require(value in served, f"{key}: no teacher lists route {value!r} (routes: {sorted(served)})")
        serving = [n for n, t in zip(names, teachers.models) if value in t.routes]
        _require(set(weights) == set(serving), f"{key}: give a weight for each teacher of the route, {serving}; "
                 f"got {sorted(weights)}")
        _require(all(w >= 0 for w in weights.values()) and sum(weights.values()) > 0,
                 f"{key}: weights must be >= 0 with a positive sum, got {dict(weights)}")
    _require(not teachers.route_weights or cfg.interpolation.fit_on is None,
             "teachers.route_weights and interpolation.fit_on both set the routes' weights: choose one")
    _require(not cfg.interpolation.fit_temperatures,
             "interpolation.fit_temperatures with teachers.route_by: a teacher keeps one temperature across the routes "
             "it serves; fit the weights per route only (remove fit_temperatures)")
    _require(teachers.cache is None, "teachers.route_by with teachers.cache: routed targets are built from live "
             "teachers; remove teachers.cache")
    _require(not cfg.loss.intermediate, "teachers.route_by with loss.intermediate: the intermediate terms follow one "
             "weight per teacher, not per route; remove one of them")
    _require(cfg.data.augment.copies == 0, "teachers.route_by with data.augment: augmented rows carry no route; "
             "remove one of them")


def _validate_on_policy(cfg) -> None:
    on_policy = cfg.training.on_policy
    _require(0.0 <= on_policy.fraction <= 1.0, f"training.on_policy.fraction must lie in [0, 1], got {on_policy.fraction}")
    if on_policy.fraction == 0:
        changed = [f"training.on_policy.{key}" for key, value in vars(OnPolicyConfig()).items()
                   if key != "fraction" and on_policy[key] != value]
        _require(not changed, f"{changed} set with training.on_policy.fraction=0 (off): set the fraction or remove them")
        return
    _require(on_policy.max_new_tokens > 0, f"training.on_policy.max_new_tokens must be > 0, got {on_policy.max_new_tokens}")
    _require(on_policy.temperature > 0, f"training.on_policy.temperature must be > 0, got {on_policy.temperature}")
    _require(0.0 < on_policy.top_p <= 1.0, f"training.on_policy.top_p must lie in (0, 1], got {on_policy.top_p}")


def _validate_divergence(cfg) -> None:
    loss = cfg.loss
    from distill.formulas.divergences import available_divergences

    _require(loss.divergence in available_divergences(),
             f"loss.divergence: {loss.divergence!r} is not one of {available_divergences()}")
    _require(0.0 < loss.jsd_beta < 1.0, f"loss.jsd_beta must lie in (0, 1), got {loss.jsd_beta}")
    _require(0.0 <= loss.skew < 1.0, f"loss.skew must lie in [0, 1), got {loss.skew}")


def _layer_pairs(value, key: str, names: tuple) -> None:
    """A layer map: one of `names`, or a non-empty list of [student_layer, teacher_layer] pairs >= 0."""
    if isinstance(value, str):
        _require(value in names, f"{key}={value!r}: use {' or '.join(names)}, or pairs [[student, teacher], ...]")
        return
    pairs = list(value) if isinstance(value, (list, tuple, ListConfig)) else None
    _require(bool(pairs) and all(isinstance(p, (list, tuple, ListConfig)) and len(p) == 2
                                 and all(isinstance(i, int) and i >= 0 for i in p) for p in pairs),
             f"{key}={value!r}: give {' or '.join(names)}, or pairs [[student_layer, teacher_layer], ...] of layers "
             ">= 0 (0 the embeddings, i the output of block i)")


def _validate_augment(cfg) -> None:
    augment = cfg.data.augment
    _require(augment.copies >= 0, f"data.augment.copies must be >= 0, got {augment.copies}")
    if augment.copies == 0:
        changed = [f"data.augment.{key}" for key, value in vars(AugmentConfig()).items()
                   if key != "copies" and augment[key] != value]
        _require(not changed, f"{changed} set with data.augment.copies=0 (augmentation off): set copies or remove them")
        return
    for key in ("word_dropout", "swap", "mask_replace"):
        _require(0 <= augment[key] < 1, f"data.augment.{key} must lie in [0, 1), got {augment[key]}")
    _require((augment.mask_replace > 0) == (augment.mlm_model is not None),
             "data.augment.mask_replace and data.augment.mlm_model go together: a share of words to replace needs "
             "a masked-LM model, and the model needs a share")
    if augment.mlm_model is not None:
        _check_model_reference(augment.mlm_model, "data.augment.mlm_model", cfg.allow_pickled_weights)
    if augment.lm_model is None:
        defaults = AugmentConfig()
        changed = [f"data.augment.{key}" for key in ("lm_prefix", "lm_top_p") if augment[key] != getattr(defaults, key)]
        _require(not changed, f"{changed} set without data.augment.lm_model: they shape its continuations; "
                 "set lm_model (a causal LM) or remove them")
    else:
        _check_model_reference(augment.lm_model, "data.augment.lm_model", cfg.allow_pickled_weights)
        _require(0 < augment.lm_prefix < 1, "data.augment.lm_prefix (the share of each text's words kept as the "
                 f"prompt) must lie in (0, 1), got {augment.lm_prefix}")
        _require(0 < augment.lm_top_p <= 1, f"data.augment.lm_top_p must lie in (0, 1], got {augment.lm_top_p}")
    _require(not cfg.data.mixture_sources, "data.augment with data.mixture_sources: augmented rows belong to no "
             "source; add them as a source file instead, or remove one of them")
    _require(cfg.teachers.cache is None, "data.augment with teachers.cache: the cache holds no augmented rows (they "
             "are made per run); remove one of them")
    black_box = [i for i, teacher in enumerate(cfg.teachers.models) if teacher.logits is not None]
    _require(not black_box, f"data.augment: teachers.models{black_box} are black-box files with no rows for new "
             "text; remove data.augment or those teachers")


def _validate_intermediate(cfg) -> None:
    from distill.formulas.layer_terms import HIDDEN_LOSSES, RELATIONS

    seen = set()
    for index, entry in enumerate(cfg.loss.intermediate):
        key = f"loss.intermediate[{index}]"
        teacher = resolve_teacher_index(cfg, entry.teacher, f"{key}.teacher")
        _require(teacher not in seen, f"{key}.teacher: teacher {entry.teacher!r} has two entries: merge them")
        seen.add(teacher)
        _require(cfg.teachers.models[teacher].logits is None,
                 f"{key}.teacher: {entry.teacher!r} is a black-box teacher (a file of outputs): it has no layers to "
                 "distil from; remove this entry")
        _require(entry.hidden_weight >= 0 and entry.relation_weight >= 0,
                 f"{key}: hidden_weight and relation_weight must be >= 0")
        _require(entry.hidden_weight > 0 or entry.relation_weight > 0,
                 f"{key}: hidden_weight and relation_weight are both 0: set one, or remove the entry")
        _require(entry.hidden_loss in HIDDEN_LOSSES, f"{key}.hidden_loss={entry.hidden_loss!r}: use one of "
                 f"{list(HIDDEN_LOSSES)}")
        _layer_pairs(entry.layer_map, f"{key}.layer_map", ("uniform",))
        _layer_pairs(entry.relation_layers, f"{key}.relation_layers", ("last",))
        if not isinstance(entry.relation_layers, str):
            _require(all(pair[0] >= 1 and pair[1] >= 1 for pair in entry.relation_layers),
                     f"{key}.relation_layers: relations are read inside blocks: layers count from 1")
        _require(len(entry.relations) > 0 and set(entry.relations) <= set(RELATIONS)
                 and len(set(entry.relations)) == len(entry.relations),
                 f"{key}.relations={list(entry.relations)}: a non-empty subset of {list(RELATIONS)}")
        _require(entry.relation_heads is None or entry.relation_heads > 0, f"{key}.relation_heads must be > 0")
        defaults = IntermediateConfig(teacher="")
        if entry.hidden_weight == 0:
            unused = [n for n in ("hidden_loss", "layer_map") if entry[n] != getattr(defaults, n)]
            _require(not unused, f"{key}: {unused} are read only with {key}.hidden_weight > 0: set it or remove them")
        if entry.relation_weight == 0:
            unused = [n for n in ("relations", "relation_heads", "relation_layers")
                      if entry[n] != getattr(defaults, n)]
            _require(not unused, f"{key}: {unused} are read only with {key}.relation_weight > 0: set it or remove "
                     "them")


def _validate_interpolation(cfg) -> None:
    interpolation = cfg.interpolation
    _require(interpolation.method in _interpolation_names(),
             f"interpolation.method: {interpolation.method!r} is not one of {_interpolation_names()}")
    _require(interpolation.fit_on in (None, "validation"),
             f"interpolation.fit_on: {interpolation.fit_on!r} must be null or 'validation'")
    if interpolation.fit_on is not None:
        from distill.interpolation.strategies import fittable_interpolations

        _require(interpolation.method in fittable_interpolations(),
                 f"interpolation.fit_on=validation fits {fittable_interpolations()}, not {interpolation.method!r}")
    from distill.interpolation.strategies import interpolation_class

    _require(not interpolation_class(interpolation.method).needs_fit or interpolation.fit_on == "validation",
             f"interpolation.method={interpolation.method} needs interpolation.fit_on=validation (it is trained there)")
    _require(not interpolation.fit_temperatures or interpolation.fit_on is not None,
             "interpolation.fit_temperatures needs interpolation.fit_on=validation")
    _require(interpolation.confidence.sharpness > 0,
             f"interpolation.confidence.sharpness must be > 0, got {interpolation.confidence.sharpness}")
    _require(interpolation.confidence.combine in ("linear", "geometric"),
             f"interpolation.confidence.combine: {interpolation.confidence.combine!r} is not linear or geometric")
    from distill.formulas.mixtures import GATE_FEATURES

    gate = interpolation.learned_gate
    _require(gate.hidden > 0 and gate.epochs > 0 and gate.learning_rate > 0,
             "interpolation.learned_gate.hidden, epochs and learning_rate must be > 0")
    _require(gate.features in GATE_FEATURES,
             f"interpolation.learned_gate.features: {gate.features!r} is not one of {', '.join(GATE_FEATURES)}")


def _validate_schedules(cfg) -> None:
    from distill.formulas.schedules import SCHEDULE_KINDS

    _validate_mixture(cfg)
    for name in ("kd_alpha", "temperature", "teacher_weights", "data_mixture"):
        schedule = cfg.schedules[name]
        if schedule is None:
            continue
        key = f"schedules.{name}"
        _require(schedule.kind in SCHEDULE_KINDS, f"{key}.kind: {schedule.kind!r} is not one of {list(SCHEDULE_KINDS)}")
        _require(schedule.start_step >= 0, f"{key}.start_step must be >= 0")
        if schedule.end_step is not None:
            _require(schedule.end_step >= schedule.start_step, f"{key}.end_step must be >= start_step")
        ends = [schedule.start] + ([schedule.end] if schedule.end is not None else [])
        if name == "kd_alpha":
            _require(all(0.0 <= v <= 1.0 for v in ends), f"{key}: start and end must lie in [0, 1], got {ends}")
        elif name == "temperature":
            _require(all(v > 0 for v in ends), f"{key}: start and end must be > 0, got {ends}")
        else:
            count = len(cfg.teachers.models) if name == "teacher_weights" else len(cfg.data.mixture_sources)
            what = "teacher" if name == "teacher_weights" else "data.mixture_sources entry"
            for label, vector in zip(("start", "end"), ends):
                _require(len(vector) == count, f"{key}.{label} needs one weight per {what} ({count}), got {list(vector)}")
                _require(all(v >= 0 for v in vector) and sum(vector) > 0,
                         f"{key}.{label}: weights must be >= 0 with a positive sum, got {list(vector)}")
            if name == "teacher_weights":
                _require(cfg.interpolation.fit_on is None,
                         "schedules.teacher_weights and interpolation.fit_on both set the teacher weights: choose one")


def _validate_mixture(cfg) -> None:
    for index, domain in enumerate(cfg.data.eval_domains):  # evaluation slices, with or without a mixture
        key = f"data.eval_domains[{index}]"
        _check_name(domain.name, f"{key}.name")
        _require((domain.match is None) != (domain.path is None),
                 f"{key} ({domain.name}): give match (a regex over the validation split) or path (a file), one of them")
        _check_pattern(domain.match, f"{key}.match")
        if domain.path is not None:
            _check_data_reference(domain.path, f"{key}.path")
    sources = cfg.data.mixture_sources
    if not sources:
        _require(cfg.schedules.data_mixture is None, "schedules.data_mixture is set but data.mixture_sources is empty")
        return
    names = [source.name for source in sources]
    for index, name in enumerate(names):
        _check_name(name, f"data.mixture_sources[{index}].name")
    _require(len(set(names)) == len(names), f"data.mixture_sources: names must be unique, got {names}")
    _require(cfg.schedules.data_mixture is not None, "data.mixture_sources needs schedules.data_mixture (the proportions)")
    _require(cfg.training.max_steps is not None, "data.mixture_sources needs training.max_steps (a mixture has no epochs)")
    for index, source in enumerate(sources):
        key = f"data.mixture_sources[{index}]"
        split = mixture_source_split(source)
        _require((source.path is None) != (split is None),
                 f"{key} ({source.name}): give a path or from_split (train or unlabeled), not both or neither; "
                 "a source named 'train' or 'unlabeled' alone means that split")
        if split is not None:
            _require(split in ("train", "unlabeled"), f"{key}.from_split: {split!r} is not train or unlabeled")
            _require(split != "unlabeled" or cfg.data.unlabeled.path is not None,
                     f"{key} reads the 'unlabeled' split but data.unlabeled.path is not set")
        else:
            _check_data_reference(source.path, f"{key}.path")
        _check_pattern(source.match, f"{key}.match")


def mixture_source_split(source) -> Optional[str]:
    if source.from_split is not None:
        return source.from_split
    if source.path is None and source.name in ("train", "unlabeled"):
        return source.name
    return None


SAFE_NAME = r"[A-Za-z0-9][A-Za-z0-9_.-]*"


def _check_name(name: str, key: str) -> None:
    """Names become metric keys, TensorBoard tags and file names inside the run directory."""
    import re

    _require(re.fullmatch(SAFE_NAME, name) is not None and ".." not in name,
             f"{key}: {name!r} is not a safe name (letters, digits, '_', '.', '-'; no '..', no '/'): "
             "it is used in file names inside output_dir")


def _check_pattern(pattern: Optional[str], key: str) -> None:
    import re

    if pattern is not None:
        try:
            re.compile(pattern)
        except re.error as error:
            raise ConfigError(f"{key}: {pattern!r} is not a valid regular expression: {error}") from error


def served_teachers(cfg) -> List[int]:
    """The indices of the teachers that run on inference servers (teachers.models[i].server)."""
    return [index for index, teacher in enumerate(cfg.teachers.models) if teacher.server is not None]


def teacher_display_name(teacher: TeacherConfig, index: int) -> str:
    if teacher.name:
        return teacher.name
    reference = teacher.path if teacher.path is not None else Path(str(teacher.logits)).stem
    return Path(str(reference).rstrip("/")).name or f"teacher{index}"


def student_source_is_not(cfg, index: int) -> bool:
    """student.from_teacher does not name teacher `index`."""
    reference = cfg.student.from_teacher
    if reference is None:
        return True
    teacher = cfg.teachers.models[index]
    return str(reference) not in (str(index), teacher.name or teacher_display_name(teacher, index))


# Every rule, in the order they are checked (a section's own ranges before the rules across sections).
RULES = (_validate_numbers, _validate_teacher_options, _validate_loss, _validate_teachers, _validate_routes,
         _validate_on_policy, _validate_student, _validate_data,
         _validate_augment, _validate_interpolation, _validate_schedules, _validate_divergence,
         _validate_intermediate, _validate_task, _validate_training, _validate_sweep, _validate_deepspeed_and_export)


def student_source(cfg: DistillConfig) -> Tuple[str, str]:
    """(reference, config key) of the model the student's tokenizer comes from: student.path, or the
    teacher student.from_teacher names."""
    if cfg.student.path is not None:
        return cfg.student.path, "student.path"
    return cfg.teachers.models[resolve_teacher_index(cfg, cfg.student.from_teacher)].path, "student.from_teacher"


def resolve_teacher_index(cfg: DistillConfig, reference: str, key: str = "student.from_teacher") -> int:
    """`key` (student.from_teacher, ...) names a teacher by its name or its index in teachers.models."""
    names = [teacher_display_name(t, i) for i, t in enumerate(cfg.teachers.models)]
    if reference in names:
        return names.index(reference)
    if str(reference).isdigit() and int(reference) < len(names):
        return int(reference)
    raise ConfigError(f"{key}: {reference!r} is neither a teacher name {names} "
                      f"nor an index below {len(names)}")


def _check_pickled_weights(path: Path, names: List[str], key: str) -> None:
    """allow_pickled_weights reads weights only (weights_only=True): a pickle that holds anything else
    is refused here, before any write, instead of failing when the teacher loads. mmap: the tensors'
    bytes are not read."""
    import pickle

    import torch

    for name in names:
        try:
            torch.load(path / name, map_location="cpu", weights_only=True, mmap=True)
        except pickle.UnpicklingError as error:
            raise ConfigError(f"{key}: {path / name} holds objects beyond tensors (refused, not loaded: "
                              f"{str(error).splitlines()[0][:120]}): save the model with safetensors") from error
        except Exception:  # another file layout: transformers reads it, or names the problem when it loads
            continue


def check_safetensors_file(file: Path, key: str, fix: str) -> None:
    """A file named .safetensors whose header safetensors cannot read (a pickle under that name, a cut
    file) is refused naming it; only the header is read."""
    from safetensors import safe_open

    try:
        with safe_open(str(file), "pt"):
            pass
    except Exception as error:
        reason = str(error).splitlines()[0][:100] if str(error) else type(error).__name__
        raise ConfigError(f"{key}: {file} is not a readable safetensors file ({reason}): {fix}") from error


def _check_model_reference(reference: str, key: str, allow_pickled_weights: bool = False,
                           weights: bool = True) -> None:
    """A local model folder: a config, and (`weights`) safe weights; hub ids are checked when loaded."""
    if is_local_reference(reference):
        path = resolve_path(reference)
        _require(path.is_dir(), f"{key}: model directory {path} does not exist")
        _require((path / "config.json").is_file(), f"{key}: {path} holds no config.json")
        if not weights:
            return
        pickled = sorted(p.name for p in path.glob("*.bin")) + sorted(p.name for p in path.glob("*.pt*"))
        safetensors = sorted(path.glob("*.safetensors"))
        if pickled and not safetensors and not allow_pickled_weights:
            raise ConfigError(f"{key}: {path} holds only pickled weights {pickled}, which can run code when loaded; "
                              "convert them to safetensors, or set allow_pickled_weights=true if you trust the source")
        if not pickled and not safetensors:
            found = sorted(p.name for p in path.iterdir())[:8]
            raise ConfigError(f"{key}: {path} holds no weights transformers reads (model.safetensors, or "
                              f"pytorch_model.bin with allow_pickled_weights); it has {found}: save the model there "
                              "with save_pretrained")
        for file in safetensors:  # the header only: a pickle or a cut file under this name fails here, before any write
            check_safetensors_file(file, key, "save the model again with save_pretrained")
        if pickled and not safetensors and allow_pickled_weights:
            _check_pickled_weights(path, pickled, key)


def _check_data_reference(reference: str, key: str) -> None:
    if is_local_reference(reference):
        path = resolve_path(reference)
        _require(path.exists(), f"{key}: data file {path} does not exist")
        if path.is_file():
            _require(path.stat().st_size > 0, f"{key}: data file {path} is empty")


def _interpolation_names() -> List[str]:
    from distill.interpolation.strategies import available_interpolations

    return available_interpolations()


def to_yaml(cfg: DistillConfig) -> str:
    return OmegaConf.to_yaml(cfg, resolve=True)
