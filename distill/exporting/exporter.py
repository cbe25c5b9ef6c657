"""Export: DeepSpeed checkpoint (any ZeRO stage) -> a plain `save_pretrained` folder.

ZeRO-1/2/3 shards are consolidated into full fp32 weights with DeepSpeed's own
`get_fp32_state_dict_from_zero_checkpoint`; a stage-0 checkpoint already holds the whole module.
The result is saved as safetensors with the tokenizer and a model card, loadable by the run's
task's Auto class (`AutoModelForSequenceClassification`, `AutoModelForCausalLM`).

`quantize="int8"` stores the linear layers as int8 weights with per-row scales (weight-only: the
activations stay fp32), through transformers' torchao integration: the folder's config.json
carries the `quantization_config`, so plain `from_pretrained` (with torchao installed) loads it
quantized from safetensors. The task's validation figures before and after (accuracy and
macro-F1, or perplexity) go into the model card. `onnx=True` writes model.onnx and checks its
logits against PyTorch with onnxruntime on the run's validation batches.
"""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Dict, Optional

import torch
from transformers import AutoConfig, AutoTokenizer

from distill.errors import ExportError
from distill.runtime.checkpointing import only_tensors
from distill.config.schema import read_run_config
from distill.models.layer_hooks import drop_training_modules
from distill.util.outputs import check_output, written_folder
from distill.evaluation.report import how_it_was_built

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}



def latest_tag(checkpoint_dir: Path) -> str:
    """The newest intact checkpoint of the run (every file's digest as recorded), saying which newer
    ones were passed over and why; ExportError when there is none."""
    from distill.errors import ConfigError
    from distill.runtime.checkpointing import newest_intact_tag

    if not (checkpoint_dir / "latest").is_file():
        raise ExportError(f"{checkpoint_dir} holds no complete checkpoint (no 'latest' file)")
    try:
        tag, passed = newest_intact_tag(checkpoint_dir, require_manifest=False)  # weights need no manifest
    except ConfigError as error:
        raise ExportError(str(error)) from error
    if tag is None:
        raise ExportError(f"{checkpoint_dir} holds no intact checkpoint: " + "; ".join(passed))
    if passed:
        print("export: " + "; ".join(passed) + f": exporting {tag}, the newest intact one", flush=True)
    return tag


def best_tag(checkpoint_dir: Path) -> Optional[str]:
    """training.select_best: the run's best evaluation's checkpoint, when it is there and intact (else None)."""
    from distill.runtime.checkpointing import damage, read_best

    best = read_best(checkpoint_dir)
    if best is None:
        return None
    reason = damage(checkpoint_dir / best["tag"], require_manifest=False)
    if reason is not None:
        print(f"export: the best checkpoint {best['tag']} (training.select_best) is not intact ({reason}): exporting the "
              "newest intact one instead", flush=True)
        return None
    return best["tag"]


def consolidated_state_dict(checkpoint_dir: Path, tag: Optional[str] = None) -> Dict[str, torch.Tensor]:
    """Full fp32 weights of the student from a DeepSpeed checkpoint of any ZeRO stage, read with
    weights_only=True (a crafted pickle in it is refused, not run)."""
    import pickle

    tag = tag or latest_tag(checkpoint_dir)
    folder = checkpoint_dir / tag
    if not folder.is_dir():
        raise ExportError(f"checkpoint {folder} does not exist")
    try:
        with only_tensors():
            if any(folder.glob("*optim_states.pt")) and any(folder.glob("zero_pp_rank_*")):
                from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

                return get_fp32_state_dict_from_zero_checkpoint(str(checkpoint_dir), tag=tag)
            model_states = sorted(folder.glob("mp_rank_*_model_states.pt"))
            if not model_states:
                raise ExportError(f"{folder} holds no model states")
            state = torch.load(model_states[0], map_location="cpu")
    except pickle.UnpicklingError as error:
        raise ExportError(f"checkpoint {folder} holds more than tensors and plain values (refused, not run: "
                          f"{str(error).splitlines()[0]}); export only checkpoints you trust to be distill's") from error
    return {name: tensor.float() for name, tensor in state["module"].items()}


QUANTIZATIONS = ("int8",)


def _require_torchao():
    try:
        import torchao  # noqa: F401
    except ImportError as error:
        raise ExportError("--quantize int8 needs torchao (pip install 'distill[quantize]'); "
                          "transformers loads the quantized folder through it") from error


def export_run(run_dir: Path, out_dir: Path, dtype: str = "fp32", overwrite: bool = False,
               tag: Optional[str] = None, quantize: Optional[str] = None, onnx: bool = False) -> Path:
    """Everything is checked before anything is written (outputs.check_output: never into an
    input, --overwrite only over a folder distill wrote); the folder is filled beside and renamed."""
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    if dtype not in _DTYPES:
        raise ExportError(f"--dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
    if quantize is not None:
        if quantize not in QUANTIZATIONS:
            raise ExportError(f"--quantize must be one of {list(QUANTIZATIONS)}, got {quantize!r}")
        if dtype != "fp32":
            raise ExportError(f"--quantize {quantize} quantizes an fp32 export; drop --dtype {dtype}")
        _require_torchao()
    if onnx:
        _require_onnx()
    init_dir = run_dir / "student_init"
    if not (init_dir / "config.json").is_file() or not (run_dir / "config.yaml").is_file():
        raise ExportError(f"{run_dir} is not a distill run directory (no student_init/config.json or config.yaml)")
    checkpoints = run_dir / "checkpoints"
    from distill.util.outputs import RunLock

    holder = RunLock(run_dir).other_holder()
    if holder is not None:  # its checkpoints rotate while we read them: the run exports itself when done
        raise ExportError(f"{run_dir} is still in use by process {holder[1]} on {holder[0]} (a training run): "
                          f"export it when that process has finished (a finished run exports itself to "
                          f"{run_dir / 'student'})")
    check_output(out_dir, [checkpoints, init_dir, run_dir / "config.yaml", run_dir / "report.json"], overwrite,
                 "export")
    tag = tag or best_tag(checkpoints) or latest_tag(checkpoints)

    from distill.tasks.base import trained_length
    from distill.tasks.setup import Setup

    run_config = read_run_config(run_dir / "config.yaml")
    task = Setup.of_run(run_config).task
    trust = run_config.trust_remote_code  # a model with its own code: the run allowed it, export follows
    config = AutoConfig.from_pretrained(init_dir, trust_remote_code=trust)
    state_dict = drop_training_modules(consolidated_state_dict(checkpoints, tag))  # no projections exported
    model = task.traits.auto_model.from_config(config, trust_remote_code=trust)
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    tied = set(getattr(model, "_tied_weights_keys", None) or [])
    missing = [key for key in missing if key not in tied]
    if missing or unexpected:
        raise ExportError(f"checkpoint does not match the student: missing {missing[:5]}, unexpected {unexpected[:5]}")
    model = model.to(_DTYPES[dtype]).eval()
    model.config.dtype = _DTYPES[dtype]
    with written_folder(out_dir) as folder:
        model.save_pretrained(folder, safe_serialization=True)
        for code in init_dir.glob("*.py"):  # a model with its own code: the folder carries it (auto_map)
            if not (folder / code.name).exists():
                shutil.copy2(code, folder / code.name)
        tokenizer = AutoTokenizer.from_pretrained(init_dir, trust_remote_code=trust)
        # a user scoring with the defaults then feeds the model the length it was trained on
        tokenizer.model_max_length = trained_length(task)
        tokenizer.save_pretrained(folder)
        parity = None
        # the validation split with the exported tokenizer, read and encoded once for both checks
        scoring = task.saved_model_scoring(tokenizer) if onnx or quantize else None
        if onnx:  # from the unquantized module, before quantize_folder replaces the weights
            parity = export_onnx(task, model, folder, scoring.batches)
            (folder / "onnx_parity.json").write_text(json.dumps(parity, indent=2), encoding="utf-8")
        compression = quantize_folder(task, folder, quantize, scoring, trust) if quantize else None
        report_path = run_dir / "report.json"
        if report_path.is_file():
            report = json.loads(report_path.read_text(encoding="utf-8"))
            card = task.model_card(report, config, dtype, compression, parity)
            chosen = report.get("selected")
            if chosen and chosen.get("tag") == tag:
                card = card.replace("## How to load", f"Exported checkpoint: step {chosen['step']} of {chosen['last_step']}, "
                                    f"chosen by its validation {chosen['metric']} ({chosen['value']:.4f}; the last step "
                                    f"had {chosen['last_step_value']:.4f}; training.select_best).\n\n## How to load", 1)
            card = card.replace("## How to load", how_it_was_built(config, trained_length(task)) + "## How to load", 1)
            if getattr(config, "auto_map", None):  # the folder carries its model code: loading runs it
                card = card.replace('from_pretrained("PATH")', 'from_pretrained("PATH", trust_remote_code=True)')
            (folder / "README.md").write_text(card, encoding="utf-8")
        if compression is not None:
            (folder / "compression.json").write_text(json.dumps(compression, indent=2), encoding="utf-8")
    return out_dir


def _require_onnx():
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError as error:
        raise ExportError("--onnx needs onnx and onnxruntime (pip install 'distill[onnx]')") from error


class _CausalLogits(torch.nn.Module):
    """A causal LM's logits alone, from input ids and attention mask, with no key/value cache: the
    graph ONNX gets (the model itself would make its other forward arguments graph inputs)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):
        return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits


def export_onnx(task, model, out_dir: Path, loader) -> Dict:
    """`model.onnx` (dynamic batch and sequence axes) next to the safetensors, checked against the
    PyTorch module with onnxruntime on the run's validation batches: the largest logit difference."""
    import onnxruntime

    example = next(iter(loader))
    names = [name for name in ("input_ids", "attention_mask", "token_type_ids") if name in example]
    model = model.float().eval()
    per_token = task.traits.row_unit == "token"  # logits per token [B, S, V or C], else per row [B, C]
    causal = task.traits.causal
    # a classifier is exported itself, its inputs by position (a generic *args wrapper passing them
    # by name traced a graph 1e-2 off); a causal LM through _CausalLogits, in eval mode: the export
    # hands each module back in the mode it found it in, and a wrapper left in training mode put the
    # model under it back in training mode too (dropout on: a BERT token classifier read 0.37 off)
    graph = _CausalLogits(model).eval() if causal else model
    if causal:
        names = ["input_ids", "attention_mask"]
    path = out_dir / "model.onnx"
    axes = {name: {0: "batch", 1: "sequence"} for name in names}
    logit_axes = {0: "batch", 1: "sequence"} if per_token else {0: "batch"}
    torch.onnx.export(graph, tuple(example[name] for name in names), str(path), input_names=names,
                      output_names=["logits"], dynamic_axes={**axes, "logits": logit_axes}, dynamo=False)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    largest, rows, agree = 0.0, 0, 0
    with torch.no_grad():
        for batch in loader:
            expected = graph(*[batch[name] for name in names])
            expected = expected if causal else expected.logits
            got = torch.from_numpy(session.run(["logits"], {name: batch[name].numpy() for name in names})[0])
            mask = batch["attention_mask"].bool() if per_token else torch.ones(len(got), dtype=torch.bool)
            largest = max(largest, float((expected - got).abs()[mask].max()))
            rows += int(mask.sum())
            agree += int((expected.argmax(-1) == got.argmax(-1))[mask].sum())
    return {"file": path.name, "max_abs_logit_difference": largest, "rows": rows, "argmax_agreement": agree / rows}


def weight_bytes(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.glob("*.safetensors"))


def quantize_folder(task, folder: Path, method: str, scoring, trust_remote_code: bool = False) -> Dict:
    """Replace the fp32 weights in `folder` by their int8 form; measure both with the task's
    validation figures (`scoring`: its tasks/base.SavedModelScoring for the exported tokenizer).
    Returns what the model card reports: sizes, parameter counts, figures."""
    from transformers import TorchAoConfig
    # Weight-only: on a CPU without int8 matmul kernels torchao's dynamic activation quantization
    # measured 25x slower than fp32 for the demo student, weight-only 1.4x (docs/benchmarks.md).
    from torchao.quantization import Int8WeightOnlyConfig

    from distill.models.loading import count_parameters

    auto = task.traits.auto_model
    full = auto.from_pretrained(folder, trust_remote_code=trust_remote_code).eval()
    quantized = auto.from_pretrained(folder, quantization_config=TorchAoConfig(Int8WeightOnlyConfig()),
                                     trust_remote_code=trust_remote_code).eval()
    linear_params = sum(module.weight.numel() for module in full.modules() if isinstance(module, torch.nn.Linear))
    before_bytes = weight_bytes(folder)
    scores = []
    for model in (full, quantized):
        started = time.perf_counter()
        scores.append(scoring.score(model))
        scores[-1]["seconds"] = round(time.perf_counter() - started, 2)
    before, after = scores
    for path in folder.glob("*.safetensors"):
        path.unlink()
    quantized.save_pretrained(folder, safe_serialization=True)
    return {"method": method, "scheme": "int8 weights with per-row scales in the linear layers, fp32 activations",
            "params": count_parameters(full), "params_int8": linear_params,
            "bytes_before": before_bytes, "bytes_after": weight_bytes(folder),
            "validation_before": before, "validation_after": after}
