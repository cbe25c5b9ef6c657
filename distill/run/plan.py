"""`distill plan CONFIG [--ranks N] [--device-memory SIZE]`: the memory of a run, per rank, before any
weight is loaded.

Parameter counts come from the models' configs alone: each model is built on PyTorch's `meta`
device (shapes, no storage), so a 70B teacher is counted in a second. What stays resident, per rank:

- each teacher: its parameters x the bytes of the dtype it runs in (teachers.dtype on the device;
  int8: 1 byte for the linear layers' weights, 4 for the rest), whole when replicated, 1/N under
  `teachers.placement: zero3` plus the largest layer gathered for its forward;
- the student's weights, gradients and AdamW states at the ZeRO stage: for bf16/fp16 DeepSpeed's own
  estimators (`estimate_zero2/3_model_states_mem_needs`, no offload); for fp32, which they do not
  cover, 4 + 4 + 8 bytes per parameter with the parts the stage partitions divided by N, plus at
  ZeRO-1/2 the fp32 copy of its partition DeepSpeed keeps for the optimizer (4 / N);
- the runtime: the process with torch, transformers and DeepSpeed imported (CPU) or the CUDA context;

and the largest of the moments that come and go, one at a time:

- a training step: the student's activations for one micro-batch (Korthikanti et al. 2022, 34·s·b·h
  per layer in 2-byte units, doubled for fp32; no [s, s] scores, as PyTorch's SDPA keeps none) and,
  for a causal LM, the fused loss's [chunk_tokens, V] float32 buffers and the teachers' last hidden states;
  at ZeRO-2 and 3, the contiguous gradient bucket backward fills (min(reduce_bucket_size, parameters));
- loading a teacher: an fp32 copy for the precision drift, or a whole one before ZeRO-3 partitions
  it, plus the pages of its memory-mapped file;
- an evaluation (causal LM): every model's logits of an eval batch;
- the export at the end (rank 0): the consolidated fp32 weights and the model built from them.

The sum is compared with the device's memory: `--device-memory` (e.g. 80GB), else what this machine
has (a GPU's total memory, or the RAM shared by the ranks of this host). Not counted: a trimmed
vocabulary (the plan takes the full one: an upper bound), the data, fragmentation. docs/plan.md
compares the plan with measured peaks.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

from distill.errors import ConfigError

GIB = 2 ** 30
CPU_RUNTIME = int(0.75 * GIB)  # a process with torch, transformers and DeepSpeed imported (measured: docs/plan.md)
CUDA_CONTEXT = int(0.5 * GIB)
LOSS_TEMPORARIES = 4  # [chunk, V] float32 buffers the fused loss keeps (logits, target, tempered, mixture)
# without the fused loss (ZeRO-3, or loss.fused=false), [tokens, V] float32 over the whole micro-batch: the
# student's logits, their gradient (written chunk by chunk in the forward and kept for backward), and the
# copy of it backward makes through the output layer (formulas/token_loss.chunked_target_distillation)
UNFUSED_LOGITS = 3
_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def _dtype_bytes(dtype) -> int:
    """Bytes per element of a dtype given as torch.X or its name; 4 for anything else (or nothing said)."""
    return _BYTES.get(str(dtype).replace("torch.", ""), 4)


@dataclass
class ModelShape:
    params: int
    largest_layer: int  # parameters of the largest leaf module (what ZeRO-3 gathers at once)
    linear_weights: int  # parameters in nn.Linear weights (what int8 quantizes)
    stored_bytes: int  # bytes per parameter of its saved weights (config.json's dtype; 4 when unsaid)
    hidden: int
    layers: int
    heads: int
    vocab: int


def parse_size(text: str) -> int:
    """'80GB', '80GiB', '512MiB', '1.5TB' -> bytes (decimal units for B, binary for iB)."""
    match = re.fullmatch(r"\s*([0-9.]+)\s*([KMGT]?)(i?)B?\s*", text, flags=re.IGNORECASE)
    if not match:
        raise ConfigError(f"--device-memory: {text!r} is not a size like 80GB or 24GiB")
    number, unit, binary = match.groups()
    power = "KMGT".find(unit.upper()) + 1 if unit else 0
    return int(float(number) * (1024 if binary or not unit else 1000) ** power)


def shape_of(config, auto_class) -> ModelShape:
    """A model's parameter counts from its config, built on the meta device (no storage)."""
    from torch import nn

    from distill.models.loading import meta_model

    model = meta_model(config, auto_class)
    params = sum(p.numel() for p in model.parameters())
    largest = max((sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules()), default=0)
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    stored = _dtype_bytes(getattr(config, "dtype", None) or getattr(config, "torch_dtype", None))
    return ModelShape(params, largest, linear, stored, getattr(text, "hidden_size", 0), getattr(text, "num_hidden_layers", 0),
                      getattr(text, "num_attention_heads", 1), getattr(text, "vocab_size", 0))


def _config(reference: str, key: str, cfg, labels: Optional[int] = None):
    from distill.models.loading import load_model_config

    config = load_model_config(reference, key, cfg.trust_remote_code)
    if labels is not None:
        config.num_labels = labels
    return config


def student_config(cfg, labels: Optional[int]):
    """The student's config: its own folder, or its teacher's with the kept layers."""
    from distill.config.schema import resolve_teacher_index

    if cfg.student.path is not None:
        return _config(cfg.student.path, "student.path", cfg, labels)
    teacher = cfg.teachers.models[resolve_teacher_index(cfg, cfg.student.from_teacher)]
    config = _config(teacher.path, "student.from_teacher", cfg, labels)
    if cfg.student.layers is not None:
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        text.num_hidden_layers = len(cfg.student.layers)
    return config


def student_states(params: int, largest: int, precision: str, stage: int, ranks: int) -> int:
    """Bytes per rank of the student's weights, gradients and AdamW states."""
    if precision != "fp32":  # DeepSpeed's own estimators (no offload)
        from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
        from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

        if stage == 3:
            return estimate_zero3_model_states_mem_needs(params, largest, ranks, 1, cpu_offload=False)[1]
        if stage in (1, 2):
            return estimate_zero2_model_states_mem_needs(params, ranks, 1, cpu_offload=False)[1]
        return 18 * params + 2 * params
    weights, grads, optimizer = 4 * params, 4 * params, 8 * params
    if stage == 0:
        return weights + grads + optimizer
    # ZeRO-1/2 keep their own fp32 copy of this rank's partition for the optimizer (stage_1_and_2.py
    # clones it, even when the model is fp32 already): 4 bytes per parameter / N more
    master = 4 * params
    if stage == 1:
        return weights + grads + (optimizer + master) // ranks
    if stage == 2:
        return weights + (grads + optimizer + master) // ranks
    return (weights + grads + optimizer) // ranks + 4 * largest


def gradient_bucket_bytes(cfg, params: int, precision: str) -> int:
    """ZeRO-2 and 3 reduce gradients through a contiguous bucket of reduce_bucket_size elements
    (DeepSpeed's default 5e8; touched, so resident, up to the student's gradients) during backward;
    0 otherwise."""
    if cfg.deepspeed.zero_stage not in (2, 3):
        return 0
    from omegaconf import OmegaConf

    extra = OmegaConf.to_container(cfg.deepspeed.config, resolve=True) if cfg.deepspeed.config else {}
    bucket = int((extra.get("zero_optimization") or {}).get("reduce_bucket_size", 5e8))
    return (4 if precision == "fp32" else 2) * min(bucket, params)


def activation_bytes(shape: ModelShape, rows: int, sequence: int, precision: str) -> int:
    """One micro-batch's activations kept for backward: Korthikanti et al. (2022) per layer,
    34·s·b·h in 2-byte units (fp32: twice that); their 5·a·s²·b attention-score term is left out,
    as transformers' default attention (PyTorch's scaled_dot_product_attention) keeps no [s, s] scores."""
    per_layer = 34 * sequence * rows * shape.hidden
    return per_layer * shape.layers * (2 if precision == "fp32" else 1)


def plan(cfg, ranks: int, device_memory: Optional[int] = None, device: Optional[str] = None) -> Dict:
    """The per-rank memory plan of `cfg` on `ranks` ranks: lines (what, bytes, note), the moments that
    come and go, total, budget, fits. `device`: cuda or cpu (default: this machine's)."""
    import torch

    from distill.runtime.hardware import teacher_dtype
    from distill.tasks import task_class

    task = task_class(cfg.task)
    auto = task.traits.auto_model
    # a causal LM predicts its vocabulary at every token; the other tasks a head of their labels
    labels = None if task.traits.causal else len(cfg.data.label_names or []) or None
    if device is not None and device not in ("cpu", "cuda"):
        raise ConfigError(f"--device must be cpu or cuda, got {device!r}")
    here = device is None or (device == "cuda") == torch.cuda.is_available()
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if not here and device_memory is None:
        raise ConfigError(f"--device {device.type}: this machine has none; give its memory with --device-memory")
    if device.type == "cuda" and cfg.teachers.dtype == "auto" and not here:
        dtype = torch.bfloat16  # what `auto` picks on a GPU with bf16 (every GPU of this decade)
    else:
        dtype = teacher_dtype(cfg.teachers.dtype, device)
    lines: List[Tuple[str, int, str]] = []
    teacher_shapes = []
    for index, teacher in enumerate(cfg.teachers.models):
        if teacher.logits is not None or cfg.teachers.cache is not None:
            continue  # a black-box file or a cache: outputs read row by row, no teacher weights load
        if teacher.server is not None:  # its memory is the server's
            lines.append((f"teacher {teacher.name or index}", 0, f"served at {teacher.server}: no weights here"))
            continue
        shape = shape_of(_config(teacher.path, f"teachers.models[{index}].path", cfg, labels), auto)
        teacher_shapes.append(shape)
        if dtype == torch.qint8:
            size, named = shape.linear_weights + 4 * (shape.params - shape.linear_weights), "int8 linear layers"
        else:
            name = str(dtype).replace("torch.", "")
            size, named = _BYTES[name] * shape.params, name
        if cfg.teachers.placement == "zero3" and ranks > 1:
            size = size // ranks + _dtype_bytes(dtype) * shape.largest_layer
            named += f", ZeRO-3 partitioned over {ranks}"
        lines.append((f"teacher {teacher.name or index}", size, f"{shape.params / 1e6:,.1f}M params, {named}"))
    student = shape_of(student_config(cfg, labels), auto)
    if cfg.student.prune.target_params is not None:  # a share of the model it is cut from
        from distill.models.student import source_parameter_count

        student.params = min(student.params, int(cfg.student.prune.target_params * source_parameter_count(cfg, auto)))
    precision, stage = cfg.training.precision, cfg.deepspeed.zero_stage
    lines.append(("student weights, gradients, AdamW", student_states(student.params, student.largest_layer,
                                                                       precision, stage, ranks),
                  f"{student.params / 1e6:,.1f}M params, {precision}, ZeRO-{stage}"
                  + (" (vocabulary untrimmed: an upper bound)" if cfg.student.trim_vocab else "")))
    rows = cfg.training.micro_batch_size
    sequence = cfg.data.block_size if task.traits.causal else cfg.data.max_length
    runtime = CUDA_CONTEXT if device.type == "cuda" else CPU_RUNTIME
    lines.append(("runtime", runtime, "CUDA context" if device.type == "cuda" else
                  "a process with torch, transformers and DeepSpeed"))
    # moments that come and go, one at a time: the total takes the largest of them
    moments: List[Tuple[str, int, str]] = []
    step = activation_bytes(student, rows, sequence, precision)
    note = f"activations of a micro-batch of {rows} x {sequence} tokens, {student.layers} layers"
    if task.traits.causal:
        chunk = min(cfg.loss.chunk_tokens, rows * sequence)
        step += LOSS_TEMPORARIES * chunk * student.vocab * 4 + sum(rows * sequence * t.hidden * 4 for t in teacher_shapes)
        note += f"; {LOSS_TEMPORARIES} x [{chunk}, {student.vocab}] float32 loss buffers, teachers' last hidden states"
        if not (cfg.loss.fused and stage < 3):  # the student's whole logits exist (ZeRO-3 shards the output layer)
            step += UNFUSED_LOGITS * rows * sequence * student.vocab * 4
            note += f"; unfused: {UNFUSED_LOGITS} x [{rows * sequence}, {student.vocab}] float32 student logits"
    bucket = gradient_bucket_bytes(cfg, student.params, precision)
    if bucket:
        step += bucket
        note += f"; ZeRO-{cfg.deepspeed.zero_stage}'s gradient bucket"
    moments.append(("a training step", step, note))
    if teacher_shapes:
        largest = max(shape.params for shape in teacher_shapes)
        # the saved file's pages (memory-mapped safetensors) count while the model is built from them: in
        # host memory, so in a CPU rank's budget and not in a GPU's
        biggest = max(teacher_shapes, key=lambda shape: shape.params)
        source = biggest.stored_bytes * biggest.params if device.type == "cpu" else 0
        if cfg.teachers.placement == "zero3":  # loaded whole in its dtype, then partitioned
            moments.append(("loading a teacher", _dtype_bytes(dtype) * largest + source,
                            "whole, before ZeRO-3 partitions it" + (", and its file's pages" if source else "")))
        elif dtype != torch.float32:  # the precision drift reads each teacher once more in fp32
            moments.append(("loading a teacher", 4 * largest + source,
                            "an fp32 copy (the precision drift at start)" + (" and its file's pages" if source else "")))
    if task.traits.causal:  # validation: every model's logits of an eval batch, and the target's
        evaluated = len(teacher_shapes) + 2
        moments.append(("an evaluation", evaluated * cfg.training.eval_batch_size * sequence * student.vocab * 4,
                        f"{evaluated} x [{cfg.training.eval_batch_size}, {sequence}, {student.vocab}] float32 logits"))
    # rank 0 exports at the end while the engine is alive: the consolidated fp32 weights and the model built from them
    moments.append(("the export (rank 0)", 8 * student.params, "fp32 state dict + the exported model"))
    peak = max(moments, key=lambda moment: moment[1])
    total = sum(size for _, size, _ in lines) + peak[1]
    budget, where = _budget(device, device_memory, ranks)
    return {"lines": lines, "moments": moments, "peak": peak[0], "total": total, "budget": budget, "where": where,
            "ranks": ranks, "fits": budget is None or total <= budget}


def check_fits(cfg, ranks: int) -> None:
    """At the start of training, before any weight loads: ConfigError when the plan says the run cannot
    fit this device (training.ignore_memory_plan=true goes ahead anyway). A plan that cannot be made
    (a model the meta device cannot build) is said and skipped, never a reason to stop."""
    if cfg.training.ignore_memory_plan:
        return
    try:
        result = plan(cfg, ranks)
    except ConfigError:
        raise
    except Exception as error:  # noqa: BLE001 - an estimate must not stop a run it cannot estimate
        print(f"memory plan skipped: {type(error).__name__}: {str(error).splitlines()[0][:200]}", flush=True)
        return
    if not result["fits"]:
        raise ConfigError(f"the memory plan needs {result['total'] / GIB:.2f} GiB per rank, {result['where']} gives "
                          f"{result['budget'] / GIB:.2f} GiB (`distill plan CONFIG --ranks {ranks}` shows each part): "
                          "lower training.micro_batch_size, use ZeRO-3 or teachers.placement=zero3, more ranks or "
                          "teachers.dtype=bfloat16; or set training.ignore_memory_plan=true if the plan is wrong")


def _budget(device, device_memory: Optional[int], ranks: int) -> Tuple[Optional[int], str]:
    """Bytes one rank may use, and where that figure comes from."""
    if device_memory is not None:
        return device_memory, "--device-memory"
    if device.type == "cuda":
        import torch

        return torch.cuda.get_device_properties(0).total_memory, torch.cuda.get_device_name(0)
    try:
        with open("/proc/meminfo", encoding="ascii") as stream:
            total = next(int(line.split()[1]) * 1024 for line in stream if line.startswith("MemTotal:"))
    except (OSError, StopIteration):
        return None, "unknown"
    return total // ranks, f"this host's RAM shared by {ranks} rank(s)"


def format_plan(result: Dict) -> str:
    lines = [f"memory per rank ({result['ranks']} rank(s)):"]
    width = max(len(what) for what, _, _ in result["lines"] + result["moments"]) + 2
    for what, size, note in result["lines"]:
        lines.append(f"  {what:<{width}}  {size / GIB:>8.2f} GiB  {note}")
    lines.append("  and the largest of these moments (one at a time):")
    for what, size, note in result["moments"]:
        mark = "  <- largest" if what == result["peak"] else ""
        lines.append(f"    {what:<{width - 2}}  {size / GIB:>8.2f} GiB  {note}{mark}")
    lines.append(f"  {'total':<{width}}  {result['total'] / GIB:>8.2f} GiB")
    if result["budget"] is None:
        lines.append("device memory unknown: give --device-memory")
    else:
        verdict = "fits" if result["fits"] else "does NOT fit"
        lines.append(f"{verdict}: {result['budget'] / GIB:.2f} GiB per rank ({result['where']})")
    return "\n".join(lines)
