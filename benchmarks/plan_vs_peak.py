"""`distill plan` next to the measured peak memory of the same runs (issue 29).

    python benchmarks/plan_vs_peak.py [--steps 3] [--only NAME]

Each configuration trains `--steps` optimizer steps and exports (as a run does), as
`distill train` in its own process (one rank) or under the DeepSpeed launcher (two ranks), and its
peak resident memory is read from the kernel (the largest process's ru_maxrss: one rank's peak).
The plan is made in this process from the same config, before anything is loaded. CPU only here:
a GPU's peak (torch.cuda.max_memory_allocated) is the check to make where one is lent.
Prints a table and JSON rows (benchmarks/results_plan_vs_peak.json).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SMOL = "runs/demo_lm/assets/smollm2-135m"  # python -m distill.demo.assets smollm2 runs/demo_lm/assets/smollm2-135m
BIG = "runs/plan/llama-1b"  # made by make_big_teacher
CONFIGS = {
    # name: (config file, overrides, ranks)
    "tagger, 1 rank, ZeRO-0": ("configs/demo_ner.yaml", [], 1),
    "SmolLM2 x2 -> 8 layers, 1 rank, ZeRO-0": ("configs/demo_lm.yaml", [
        "student.trim_vocab=false", "student.prune.target_params=null", "student.prune.depth=false",
        "student.prune.width=true", "student.prune.depth_metric=loss", "student.prune.calibration_samples=256", "student.layers=[0,4,8,12,16,20,24,29]",
        "student.from_teacher=general", "teachers.models.1.path=" + SMOL, "data.block_size=128",
        "training.micro_batch_size=4", "data.mixture_sources=[]", "data.eval_domains=[]",
        "schedules.data_mixture=null"], 1),
    "SmolLM2 x2 -> 8 layers, 2 ranks, ZeRO-3, teachers ZeRO-3": ("configs/demo_lm.yaml", [
        "student.trim_vocab=false", "student.prune.target_params=null", "student.prune.depth=false",
        "student.prune.width=true", "student.prune.depth_metric=loss", "student.prune.calibration_samples=256", "student.layers=[0,4,8,12,16,20,24,29]",
        "student.from_teacher=general", "teachers.models.1.path=" + SMOL, "data.block_size=128",
        "training.micro_batch_size=4", "data.mixture_sources=[]", "data.eval_domains=[]",
        "schedules.data_mixture=null", "deepspeed.zero_stage=3", "teachers.placement=zero3"], 2),
    "a 1.07B teacher (random, from a config) + SmolLM2 -> 8 layers of SmolLM2, 1 rank, ZeRO-0": ("configs/demo_lm.yaml", [
        "student.trim_vocab=false", "student.prune.target_params=null", "student.prune.depth=false",
        "student.prune.width=true", "student.prune.depth_metric=loss", "student.prune.calibration_samples=256",
        "student.layers=[0,4,8,12,16,20,24,29]", "student.from_teacher=domain", "teachers.models.0.path=" + BIG,
        "teachers.models.1.path=" + SMOL, "data.block_size=128", "training.micro_batch_size=4",
        "data.mixture_sources=[]", "data.eval_domains=[]", "schedules.data_mixture=null"], 1),
}


def make_random_llama(folder: Path, seed: int, **shape) -> None:
    """A Llama of `shape` with SmolLM2's 49,152-token vocabulary and tokenizer, random weights in bf16
    (seeded), saved as safetensors: a teacher of that size for memory and speed, not for quality (no
    registry package ships weights that large). Kept when it exists."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    if (folder / "model.safetensors").is_file():
        return
    config = LlamaConfig(vocab_size=49152, max_position_embeddings=2048, tie_word_embeddings=True, rms_norm_eps=1e-5,
                         bos_token_id=1, eos_token_id=2, pad_token_id=2, **shape)
    torch.manual_seed(seed)
    torch.set_default_dtype(torch.bfloat16)
    try:
        model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(torch.float32)
    partial = folder.with_name(folder.name + ".partial")
    model.save_pretrained(partial, safe_serialization=True)
    AutoTokenizer.from_pretrained(ROOT / SMOL).save_pretrained(partial)
    partial.replace(folder)


def make_big_teacher(folder: Path) -> None:
    """1.07B parameters: Llama-3.2-1B's shape (hidden 2048, 16 layers, GQA 32/8, SwiGLU 8192)."""
    make_random_llama(folder, 0, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                      num_attention_heads=32, num_key_value_heads=8, rope_theta=500000.0)


def measure(config: str, overrides, ranks: int, steps: int) -> int:
    """Peak RSS in bytes of the largest process of a `distill train` of `steps` steps."""
    out = Path(tempfile.mkdtemp(prefix="plan-vs-peak-"))
    common = [config, *overrides, f"output_dir={out / 'run'}", f"training.max_steps={steps}", "training.eval_every=0",
              "training.progress_bar=false", f"training.checkpoint_every={steps}"]
    if ranks == 1:
        command = [sys.executable, "-m", "distill.cli", "train", *common]
    else:
        command = ["deepspeed", "--num_gpus", str(ranks), "--module", "distill.cli", "train", *common]
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    shutil.rmtree(out, ignore_errors=True)
    if result.returncode != 0:
        raise SystemExit(f"{config} {overrides}: exit {result.returncode}\n{result.stderr[-2000:]}")
    if peak <= before:
        print("  (peak not above an earlier configuration's: run it alone with --only)", flush=True)
    return peak * 1024


LLAMA_8B = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
            "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
            "vocab_size": 128256, "max_position_embeddings": 131072, "rope_theta": 500000.0,
            "tie_word_embeddings": False, "rms_norm_eps": 1e-5,
            "torch_dtype": "bfloat16"}  # Llama-3.1-8B's published config.json (its weights are stored in bf16)
LLAMA_1B = {**LLAMA_8B, "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
            "tie_word_embeddings": True}  # Llama-3.2-1B's


def realistic() -> None:
    """The plan of two 8B teachers and a 1B student on 8 x 80 GB (configs only: no weights exist here)."""
    from omegaconf import OmegaConf

    from distill.api import plan
    from distill.config.schema import DistillConfig

    folder = Path(tempfile.mkdtemp(prefix="plan-realistic-"))
    for name, config in (("teacher-a", LLAMA_8B), ("teacher-b", LLAMA_8B), ("student", LLAMA_1B)):
        (folder / name).mkdir()
        (folder / name / "config.json").write_text(json.dumps(config))
    base = [f"output_dir={folder / 'run'}", "task=causal_lm", "data.train.path=" + str(folder / "corpus.jsonl"),
            "data.text_fields=[text]", "data.label_field=label", "data.label_names=null", "data.unlabeled.path=null",
            f"teachers.models=[{{name: a, path: {folder / 'teacher-a'}}}, {{name: b, path: {folder / 'teacher-b'}}}]",
            f"student.path={folder / 'student'}", "student.from_teacher=null", "student.layers=null",
            "training.precision=bf16", "teachers.dtype=bfloat16", "data.block_size=4096", "training.micro_batch_size=1",
            "loss.chunk_tokens=1024", "training.eval_batch_size=1"]
    (folder / "corpus.jsonl").write_text('{"text": "a"}\n')
    for extra in (["deepspeed.zero_stage=0"], ["deepspeed.zero_stage=3"],
                  ["deepspeed.zero_stage=3", "teachers.placement=zero3"]):
        # folders with a config.json only: the loader's checks (weights present) are not what is planned here
        cfg = OmegaConf.merge(OmegaConf.structured(DistillConfig), OmegaConf.from_dotlist(base + extra))
        print(f"== 8 x 80 GB, {' '.join(extra)}")
        print(plan(cfg, 8, "80GB", device="cuda")["table"], flush=True)
    shutil.rmtree(folder, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--only", default=None, help="one configuration's name (a fresh ru_maxrss)")
    parser.add_argument("--realistic", action="store_true", help="only print the plan of two 8B teachers and a 1B "
                        "student on 8 x 80 GB")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.realistic:
        realistic()
        return
    from distill.api import load_config, plan

    make_big_teacher(ROOT / BIG)
    rows = []
    for name, (config, overrides, ranks) in CONFIGS.items():
        if args.only and args.only != name:
            continue
        planned = plan(load_config(config, overrides), ranks)
        peak = measure(config, overrides, ranks, args.steps)
        rows.append({"config": name, "ranks": ranks, "planned_bytes": planned["total"], "peak_bytes": peak,
                     "planned_over_peak": planned["total"] / peak,
                     "lines": {what: size for what, size, _ in planned["lines"]}})
        print(f"{name:<60} plan {planned['total'] / 2**30:6.2f} GiB   measured {peak / 2**30:6.2f} GiB   "
              f"plan / measured {planned['total'] / peak:5.2f}", flush=True)
    out = ROOT / "benchmarks" / "results_plan_vs_peak.json"
    if args.only and out.is_file():  # one configuration measured again: the others' rows stay
        measured = {row["config"]: row for row in rows}
        rows = [measured.pop(row["config"], row) for row in json.loads(out.read_text())] + list(measured.values())
    out.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
