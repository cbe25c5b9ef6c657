"""Export: DeepSpeed checkpoint (any ZeRO stage) -> a plain `save_pretrained` folder.

ZeRO-1/2/3 shards are consolidated into full fp32 weights with DeepSpeed's own
`get_fp32_state_dict_from_zero_checkpoint`; a stage-0 checkpoint already holds the whole module.
The result is saved as safetensors with the tokenizer and a model card, loadable by
`AutoModelForSequenceClassification.from_pretrained`.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Dict, Optional

import torch
from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

from distill.report import model_card

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class ExportError(RuntimeError):
    pass


def latest_tag(checkpoint_dir: Path) -> str:
    latest = checkpoint_dir / "latest"
    if not latest.is_file():
        raise ExportError(f"{checkpoint_dir} holds no complete checkpoint (no 'latest' file)")
    return latest.read_text(encoding="utf-8").strip()


def consolidated_state_dict(checkpoint_dir: Path, tag: Optional[str] = None) -> Dict[str, torch.Tensor]:
    """Full fp32 weights of the student from a DeepSpeed checkpoint of any ZeRO stage."""
    tag = tag or latest_tag(checkpoint_dir)
    folder = checkpoint_dir / tag
    if not folder.is_dir():
        raise ExportError(f"checkpoint {folder} does not exist")
    if any(folder.glob("*optim_states.pt")) and any(folder.glob("zero_pp_rank_*")):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        return get_fp32_state_dict_from_zero_checkpoint(str(checkpoint_dir), tag=tag)
    model_states = sorted(folder.glob("mp_rank_*_model_states.pt"))
    if not model_states:
        raise ExportError(f"{folder} holds no model states")
    # Our own checkpoint, written by this run; DeepSpeed stores it with torch.save.
    state = torch.load(model_states[0], map_location="cpu", weights_only=False)
    return {name: tensor.float() for name, tensor in state["module"].items()}


def export_run(run_dir: Path, out_dir: Path, dtype: str = "fp32", overwrite: bool = False,
               tag: Optional[str] = None) -> Path:
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    if dtype not in _DTYPES:
        raise ExportError(f"--dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
    init_dir = run_dir / "student_init"
    if not (init_dir / "config.json").is_file():
        raise ExportError(f"{run_dir} is not a distill run directory (no student_init/config.json)")
    if out_dir.exists() and any(out_dir.iterdir()):
        if not overwrite:
            raise ExportError(f"export target {out_dir} exists and is not empty: pass --overwrite or choose another")
        shutil.rmtree(out_dir)

    state_dict = consolidated_state_dict(run_dir / "checkpoints", tag)
    config = AutoConfig.from_pretrained(init_dir)
    model = AutoModelForSequenceClassification.from_config(config)
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    tied = set(getattr(model, "_tied_weights_keys", None) or [])
    missing = [key for key in missing if key not in tied]
    if missing or unexpected:
        raise ExportError(f"checkpoint does not match the student: missing {missing[:5]}, unexpected {unexpected[:5]}")
    model = model.to(_DTYPES[dtype]).eval()
    model.config.dtype = _DTYPES[dtype]
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    AutoTokenizer.from_pretrained(init_dir).save_pretrained(out_dir)
    report_path = run_dir / "report.json"
    if report_path.is_file():
        report = json.loads(report_path.read_text(encoding="utf-8"))
        names = [config.id2label[i] for i in sorted(config.id2label)]
        (out_dir / "README.md").write_text(model_card(report, names, dtype), encoding="utf-8")
    return out_dir
