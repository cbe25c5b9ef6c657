"""What a run tells a person: report.json, the printed table, and the exported model card."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from omegaconf import OmegaConf

from distill.config.schema import DistillConfig, teacher_display_name


def write_json(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(path.suffix + ".tmp")
    temporary.write_text(json.dumps(data, indent=2), encoding="utf-8")
    temporary.replace(path)  # never a half-written report


def kd_only_rows(train_set, traits) -> Optional[int]:
    """How many training rows carry no label, so that the KD term alone reads them (transfer rows:
    unlabelled, augmented): an example whose label, or a sentence whose every tag, is the ignore index.
    None for a causal task (every token of a block is predicted) or rows without labels."""
    from distill.data.text import LABELS
    from distill.formulas.divergences import IGNORE_INDEX

    if traits.causal or LABELS not in train_set.column_names:
        return None
    return sum(1 for label in train_set[LABELS]
               if (all(tag == IGNORE_INDEX for tag in label) if isinstance(label, list) else label == IGNORE_INDEX))


def build_report(cfg: DistillConfig, traits, plans, teacher_params: List[int], student_params: int,
                 metrics: Dict[str, Dict[str, float]], summary: Dict, train_set, validation_set) -> Dict:
    """report.json: each teacher, the interpolated target and the student with the task's figures
    (`traits`: the task's tasks/base.Traits), and the training rows without a label where there are any."""
    precision = summary.get("teacher_precision") or {}
    teachers = []
    servers = {teacher_display_name(teacher, index): teacher.server for index, teacher in enumerate(cfg.teachers.models)
               if teacher.server is not None}  # served teachers run in the server's precision
    for plan, params in zip(plans, teacher_params):
        served = {"dtype": "served", "server": servers[plan.name]} if plan.name in servers else {}
        teachers.append({"name": plan.name, "path": plan.path, "params": params, "weight": plan.weight,
                         "temperature": plan.temperature, "dtype": precision.get("dtype"),
                         "kl_to_fp32": (precision.get("kl_to_fp32") or {}).get(plan.name),
                         **served, **metrics.get(plan.name, {})})
    largest = max(teacher_params) if teacher_params else None
    fine_tune = not plans or (cfg.loss.kd_alpha == 0 and cfg.schedules.kd_alpha is None)
    report = {
        "task": cfg.task,
        "kind": "fine-tune" if fine_tune else "distillation",
        "teachers": teachers,
        "target": {"interpolation": cfg.interpolation.method, **metrics["target"]} if "target" in metrics else None,
        "student": {"params": student_params, **metrics.get("student", {}),
                    "compression_vs_largest_teacher": (student_params / largest) if largest else None},
        "loss": {"kd_alpha": cfg.loss.kd_alpha, "temperature": cfg.loss.temperature,
                 "label_smoothing": cfg.loss.label_smoothing, "divergence": cfg.loss.divergence},
        "training": {"steps": summary["steps"], "seconds": round(summary["seconds"], 1),
                     "zero_stage": cfg.deepspeed.zero_stage, "global_batch": summary.get("global_batch"),
                     "train_rows": _rows(train_set),
                     "validation_rows": len(validation_set)},
    }
    unlabelled = kd_only_rows(train_set, traits)
    if unlabelled is not None:  # transfer rows (unlabelled, augmented)
        report["training"]["kd_only_rows"] = unlabelled
    if cfg.loss.intermediate:
        report["loss"]["intermediate"] = OmegaConf.to_container(cfg.loss.intermediate, resolve=True)
    if summary.get("routes"):  # teachers.route_by: each route's teachers, weights and validation figures
        report["routes"] = {"column": cfg.teachers.route_by, "unrouted": cfg.teachers.unrouted, **summary["routes"]}
    if cfg.training.on_policy.fraction > 0:
        report["training"]["on_policy"] = OmegaConf.to_container(cfg.training.on_policy, resolve=True)
    return report


_SHORT_DTYPES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16", "qint8": "int8"}


def teacher_note(teacher: Dict) -> str:
    """w, T and the precision the teacher's figures were computed in (with its KL to fp32)."""
    note = f"w={teacher['weight']:g} T={teacher['temperature']:g}"
    if teacher.get("dtype"):
        note += f" {_SHORT_DTYPES.get(teacher['dtype'], teacher['dtype'])}"
        if teacher.get("kl_to_fp32") is not None:
            note += f" (KL to fp32 {teacher['kl_to_fp32']:.1e})"
    return note


def student_label(report: Dict) -> str:
    return "student (fine-tuned, no KD)" if report.get("kind") == "fine-tune" else "student"


def trained_by(report: Dict, how: str) -> str:
    """The card's first sentence: distilled from N teachers, or fine-tuned without any."""
    if report.get("kind") == "fine-tune":
        return ("Fine-tuned by `distill` on the labels alone (no knowledge distillation: "
                + ("no teachers" if not report["teachers"] else "loss.kd_alpha 0, the teachers only scored") + ")")
    return f"Distilled by `distill` from {len(report['teachers'])} teacher(s){how}"


def precision_line(report: Dict) -> str:
    teachers = [t for t in report["teachers"] if t.get("dtype")]
    if not teachers:
        return ""
    drift = ", ".join(f"{t['name']} {t['kl_to_fp32']:.2e}" for t in teachers if t.get("kl_to_fp32") is not None)
    return (f"Teacher figures were computed in {teachers[0]['dtype']}"
            + (f"; KL(fp32 || {teachers[0]['dtype']}) on a validation batch: {drift} nats per row." if drift else ".")
            + "\n")


def text_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Left-aligned fixed-width columns with a dashed rule under the header."""
    lines = [list(header)] + [list(row) for row in rows]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    text = ["  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip() for line in lines]
    text.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(text)


def format_table(report: Dict) -> str:
    """A fixed-width table: teachers, the interpolated target, the student."""
    rows = []
    for teacher in report["teachers"]:
        rows.append((f"teacher {teacher['name']}", f"{teacher['params'] / 1e6:.2f}M",
                     f"{teacher.get('accuracy', float('nan')):.4f}", f"{teacher.get('macro_f1', float('nan')):.4f}",
                     teacher_note(teacher)))
    if report.get("target"):
        target = report["target"]
        rows.append(("target (interpolated)", "-", f"{target['accuracy']:.4f}", f"{target['macro_f1']:.4f}",
                     target["interpolation"]))
    student = report["student"]
    ratio = student.get("compression_vs_largest_teacher")
    rows.append((student_label(report), f"{student['params'] / 1e6:.2f}M", f"{student['accuracy']:.4f}",
                 f"{student['macro_f1']:.4f}", f"{ratio:.2f}x largest teacher" if ratio else ""))
    return text_table(("model", "params", "accuracy", "macro-F1", "note"), rows) + routes_lines(report, "accuracy")


def compression_section(compression: Dict) -> str:
    """The card's int8 section: sizes, and every validation figure the task scored before and after."""
    before, after = compression["validation_before"], compression["validation_after"]
    rows = "\n".join(f"| {name} | {before[name]:.4f} | {after[name]:.4f} | {after[name] - before[name]:+.4f} |"
                     for name in before if name != "seconds")
    return f"""## Compression: {compression['method']}

{compression['scheme']} (torchao, through transformers' `TorchAoConfig`):
{compression['params_int8']:,} of {compression['params']:,} parameters are stored in int8.
Weights on disk: {compression['bytes_before']:,} bytes in fp32 -> {compression['bytes_after']:,} bytes
({compression['bytes_after'] / compression['bytes_before']:.2f}x).

| validation | fp32 | int8 | change |
|---|---|---|---|
{rows}

Validation pass: {before['seconds']:.1f} s in fp32, {after['seconds']:.1f} s in int8 on the exporting machine
(weight-only int8 saves memory and disk; its speed depends on the hardware's kernels).
Loading needs `torchao` installed; `from_pretrained` reads the quantization config from config.json.
"""


def onnx_line(parity: Dict) -> str:
    return (f"ONNX: `{parity['file']}` (fp32) matches the PyTorch module on {parity['rows']} validation rows "
            f"within {parity['max_abs_logit_difference']:.1e} in the logits (onnxruntime, CPU).\n")


def loss_line(report: Dict, per: str = "") -> str:
    """The card's loss sentence: the divergence, the intermediate-layer terms (each entry's teacher,
    kind and weight) and the training rows that add the KD term only (no label)."""
    loss, training = report["loss"], report["training"]
    terms = loss.get("intermediate") or []
    text = (f"Loss{per}: `kd_alpha * T^2 * D(target_T || student_T) + (1 - kd_alpha) * CE"
            + (" + intermediate-layer terms" if terms else "") + f"`, D = {loss['divergence']}, kd_alpha "
            f"{loss['kd_alpha']}, T {loss['temperature']}, label smoothing {loss['label_smoothing']}.")
    parts = []
    for entry in terms:
        kinds = []
        if entry.get("hidden_weight"):
            kinds.append(f"hidden states ({entry.get('hidden_loss', 'cosine')}) x {entry['hidden_weight']:g}")
        if entry.get("relation_weight"):
            kinds.append(f"attention relations x {entry['relation_weight']:g}")
        if kinds:
            parts.append(f"teacher {entry['teacher']}: " + ", ".join(kinds))
    if parts:
        text += (" Intermediate terms, each scaled by its teacher's interpolation weight: " + "; ".join(parts)
                 + " (projections trained with the student, not exported).")
    if training.get("kd_only_rows"):
        text += (f" {training['kd_only_rows']:,} of the {training['train_rows']:,} training rows have no label and "
                 "add the KD term only.")
    return text


def _rows(split) -> Optional[int]:
    """A split's rows; None for a streamed one (data.streaming: not counted before it is read)."""
    from torch.utils.data import IterableDataset

    return None if split is None or isinstance(split, IterableDataset) else len(split)


def model_card(report: Dict, label_names: List[str], dtype: str, compression: Optional[Dict] = None,
               onnx_parity: Optional[Dict] = None) -> str:
    """README.md for the exported student, with a Hugging Face metadata header."""
    student = report["student"]
    teacher_lines = "\n".join(
        f"| {t['name']} | `{t['path']}` | {t['params']:,} | {t['weight']:g} | {t['temperature']:g} | "
        f"{t.get('accuracy', float('nan')):.4f} | {t.get('macro_f1', float('nan')):.4f} |"
        for t in report["teachers"]) or "| (none: plain fine-tuning) | | | | | | |"
    target = report.get("target")
    target_line = (f"Interpolated target ({target['interpolation']}): accuracy {target['accuracy']:.4f}, "
                   f"macro-F1 {target['macro_f1']:.4f}." if target else "")
    ratio = student.get("compression_vs_largest_teacher")
    return f"""---
library_name: transformers
pipeline_tag: text-classification
tags:
- distill
- knowledge-distillation
---

# {"Fine-tuned" if report.get("kind") == "fine-tune" else "Distilled"} student

{trained_by(report, "")}, exported in {dtype}{" + " + compression["method"] if compression else ""}.

| metric (validation, {report['training']['validation_rows']} rows) | value |
|---|---|
| accuracy | {student['accuracy']:.4f} |
| macro-F1 | {student['macro_f1']:.4f} |
| parameters | {student['params']:,} |
| compression vs largest teacher | {f"{ratio:.3f}x" if ratio else "n/a"} |

## Teachers

| name | source | parameters | weight | temperature | accuracy | macro-F1 |
|---|---|---|---|---|---|---|
{teacher_lines}

{target_line}
{precision_line(report)}
{loss_line(report)}
Training: {report['training']['steps']} optimizer steps, DeepSpeed ZeRO stage {report['training']['zero_stage']}.

Labels: {', '.join(label_names)}

{compression_section(compression) if compression else ""}{onnx_line(onnx_parity) if onnx_parity else ""}
## How to load

```python
from transformers import AutoModelForSequenceClassification, AutoTokenizer
model = AutoModelForSequenceClassification.from_pretrained("PATH")
tokenizer = AutoTokenizer.from_pretrained("PATH")
```
"""


def _bits(figures: Dict) -> str:
    return f"{figures['bits_per_byte']:.4f}" if "bits_per_byte" in figures else "-"


def format_lm_table(report: Dict) -> str:
    rows = [(f"teacher {t['name']}", f"{t['params'] / 1e6:.2f}M", f"{t['perplexity']:.3f}", f"{t['nll']:.4f}", _bits(t),
             teacher_note(t) + _coverage_note(t)) for t in report["teachers"]]
    if report.get("target"):
        target = report["target"]
        rows.append(("target (interpolated)", "-", f"{target['perplexity']:.3f}", f"{target['nll']:.4f}", _bits(target),
                     f"{target['interpolation']}, T=1" + _coverage_note(target)))
    student = report["student"]
    ratio = student.get("compression_vs_largest_teacher")
    rows.append((student_label(report), f"{student['params'] / 1e6:.2f}M", f"{student['perplexity']:.3f}", f"{student['nll']:.4f}",
                 _bits(student), f"{ratio:.2f}x largest teacher" if ratio else ""))
    return text_table(("model", "params", "perplexity", "nll/token", "bits/byte", "note"), rows) + \
        routes_lines(report, "perplexity")


def routes_lines(report: Dict, metric: str) -> str:
    """teachers.route_by: a line per route, its teachers' weights and the target's and student's
    validation `metric` on its rows ('' without routes)."""
    routes = report.get("routes")
    if not routes:
        return ""
    lines = [f"routes by {routes['column']}:"]
    for value, route in routes.items():
        if value in ("column", "unrouted"):
            continue
        teachers = ", ".join(f"{name} {weight:.3f}" for name, weight in route["teachers"].items())
        figures = "  ".join(f"{model} {route[model][metric]:.4g}" for model in ("target", "student")
                            if metric in route.get(model, {}))
        lines.append(f"  {value:<12} {teachers:<34} {metric}: {figures}")
    return "\n" + "\n".join(lines)


def _coverage_note(figures: Dict) -> str:
    """A teacher with another tokenizer (or a target it feeds): the share of student tokens it has read
    the text of (its perplexity is over those), the mapped probability mass, its own perplexity."""
    parts = []
    if figures.get("coverage") is not None:
        parts.append(f"covers {figures['coverage']:.0%} of tokens")
    if figures.get("mapped_mass") is not None:
        parts.append(f"mass mapped {figures['mapped_mass']:.3f}")
    if figures.get("own_perplexity") is not None:
        parts.append(f"own-tokenizer ppl {figures['own_perplexity']:.2f}")
    return ("; " + ", ".join(parts)) if parts else ""


def causal_lm_card(report: Dict, dtype: str, compression: Optional[Dict] = None,
                   onnx_parity: Optional[Dict] = None) -> str:
    """README.md for an exported causal-LM student: perplexities of student, teachers and target."""
    student = report["student"]
    teacher_lines = "\n".join(
        f"| {t['name']} | `{t['path']}` | {t['params']:,} | {t['weight']:g} | {t['temperature']:g} | "
        f"{t['perplexity']:.3f} | {_bits(t)} |" for t in report["teachers"]) or "| (none: plain fine-tuning) | | | | | | |"
    target = report.get("target")
    target_line = (f"Interpolated target ({target['interpolation']}, teachers at T=1): perplexity "
                   f"{target['perplexity']:.3f}, bits per byte {_bits(target)}." if target else "")
    ratio = student.get("compression_vs_largest_teacher")
    exported = dtype + (f" + {compression['method']}" if compression else "")
    return f"""---
library_name: transformers
pipeline_tag: text-generation
tags:
- distill
- knowledge-distillation
---

# {"Fine-tuned" if report.get("kind") == "fine-tune" else "Distilled"} causal-LM student

{trained_by(report, ", token by token")}, exported in {exported}.

| metric (validation, {student['tokens']:,} tokens) | value |
|---|---|
| perplexity | {student['perplexity']:.3f} |
| NLL per token | {student['nll']:.4f} |
| bits per byte | {_bits(student)} |
| parameters | {student['params']:,} |
| compression vs largest teacher | {f"{ratio:.3f}x" if ratio else "n/a"} |

## Teachers

| name | source | parameters | weight | temperature | perplexity | bits per byte |
|---|---|---|---|---|---|---|
{teacher_lines}

{target_line}
{precision_line(report)}
{loss_line(report, " (averaged over the labelled tokens of each optimizer step)")} Training: {report['training']['steps']} optimizer steps, DeepSpeed
ZeRO stage {report['training']['zero_stage']}.

{compression_section(compression) if compression else ""}{onnx_line(onnx_parity) if onnx_parity else ""}
## How to load

```python
from transformers import AutoModelForCausalLM, AutoTokenizer
model = AutoModelForCausalLM.from_pretrained("PATH")
tokenizer = AutoTokenizer.from_pretrained("PATH")
```
"""


def how_it_was_built(model_config, trained_length: int) -> str:
    """The model card's account of the student's construction: the teacher it was cut from, the
    layers kept, pruning and vocabulary trimming (from the config's distill_* records)."""
    lines = []
    built = getattr(model_config, "distill_student_of", None) or {}
    if built:
        lines.append(f"- Cut from `{built.get('teacher')}`, keeping its layers {built.get('layers')}.")
    pruned = built.get("pruned")
    if pruned:
        width = pruned.get("width") or {}
        shape = ", ".join(f"{key} {value}" for key, value in width.items() if value is not None)
        lines.append(f"- Pruned by importance on calibration text (distill/models/pruning.py): {pruned['parameters_before']:,} -> "
                     f"{pruned['parameters_after']:,} parameters" + (f"; width: {shape}" if shape else "") + ".")
    vocabulary = getattr(model_config, "distill_vocabulary", None)
    if vocabulary:
        lines.append(f"- Vocabulary trimmed to the {len(vocabulary['kept_ids']):,} tokens its training text uses (plus "
                     "special tokens and the byte alphabet: any text still encodes); `distill_vocabulary.kept_ids` in "
                     "config.json maps its ids to the original tokenizer's.")
    lines.append(f"- Trained on sequences of {trained_length} tokens: the tokenizer's `model_max_length` is "
                 f"{trained_length}.")
    return "## How the student was built\n\n" + "\n".join(lines) + "\n\n"


def selection_line(report: Dict) -> str:
    """With training.select_best: a line saying which checkpoint was exported and why (empty without)."""
    chosen = report.get("selected")
    if not chosen:
        return ""
    return (f"\nexported: the checkpoint of step {chosen['step']} of {chosen['last_step']}, best validation "
            f"{chosen['metric']} {chosen['value']:.4f} (mode {chosen['mode']}; the last step had "
            f"{chosen['last_step_value']:.4f}); the student row above is that checkpoint's")

