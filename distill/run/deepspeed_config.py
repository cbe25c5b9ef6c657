"""The DeepSpeed config, optimizer and LR schedule made from the YAML's training section.

The YAML is the single source of truth: `deepspeed.config` may add keys DeepSpeed understands
(communication, offload, ...), but a key that contradicts the YAML is an error, never silently
preferred to it.
"""
from __future__ import annotations

import math
from typing import Any, Dict

import torch

from distill.config.schema import DistillConfig, TrainingConfig

from distill.errors import ConfigError


def global_batch(training, world_size: int) -> int:
    """Rows (sequences) per optimizer step over all ranks."""
    return training.micro_batch_size * training.gradient_accumulation_steps * world_size


def build_deepspeed_config(cfg: DistillConfig, world_size: int) -> Dict[str, Any]:
    training = cfg.training
    generated: Dict[str, Any] = {
        "train_micro_batch_size_per_gpu": training.micro_batch_size,
        "gradient_accumulation_steps": training.gradient_accumulation_steps,
        "train_batch_size": global_batch(training, world_size),
        "gradient_clipping": training.max_grad_norm,
        "zero_optimization": {"stage": cfg.deepspeed.zero_stage},
        "bf16": {"enabled": training.precision == "bf16"},
        "fp16": {"enabled": training.precision == "fp16"},
        "zero_allow_untested_optimizer": True,  # a plain torch AdamW: no CUDA/CPU-Adam build needed
        "steps_per_print": 10 ** 9,
        "wall_clock_breakdown": False,
    }
    return _merge_checked(generated, dict(_plain(cfg.deepspeed.config)), "deepspeed.config")


def _plain(value):
    from omegaconf import OmegaConf

    return OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value


def _merge_checked(generated: Dict, extra: Dict, key: str) -> Dict:
    merged = dict(generated)
    for name, value in extra.items():
        if name in generated and isinstance(generated[name], dict) and isinstance(value, dict):
            merged[name] = _merge_checked(generated[name], value, f"{key}.{name}")
        elif name in generated and generated[name] != value:
            raise ConfigError(f"{key}.{name}={value!r} contradicts the YAML settings, which give "
                              f"{generated[name]!r}: set it through the training / deepspeed keys instead")
        else:
            merged[name] = value
    return merged


def build_optimizer(model: torch.nn.Module, training: TrainingConfig) -> torch.optim.Optimizer:
    """AdamW; biases and normalisation weights get no weight decay."""
    decay, no_decay = [], []
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        (no_decay if parameter.ndim < 2 else decay).append(parameter)
    groups = [{"params": decay, "weight_decay": training.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=training.learning_rate)


def lr_factor(step: int, total_steps: int, warmup_steps: int, schedule: str) -> float:
    """Multiplier of the peak LR: linear warmup, then linear / cosine decay to 0, or constant."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return 1.0 - progress


def build_scheduler(optimizer: torch.optim.Optimizer, training: TrainingConfig, total_steps: int):
    warmup = int(round(training.warmup_ratio * total_steps))
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, total_steps, warmup, training.lr_schedule))
