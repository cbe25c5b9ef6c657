"""The DeepSpeed config, optimizer groups and LR schedule made from the YAML."""
import math

import pytest
import torch

from distill.config.schema import ConfigError, load_config
from distill.run.deepspeed_config import build_deepspeed_config, build_optimizer, build_scheduler, lr_factor
from tests.conftest import tiny_config_yaml


def test_generated_config_follows_the_yaml(tiny, tmp_path):
    cfg = load_config(tiny_config_yaml(tiny, tmp_path / "r"), [
        "training.micro_batch_size=4", "training.gradient_accumulation_steps=3", "training.max_grad_norm=0.5",
        "deepspeed.zero_stage=2", "training.precision=bf16",
        "deepspeed.config={zero_optimization: {overlap_comm: false}, communication_data_type: fp32}"])
    ds = build_deepspeed_config(cfg, world_size=2)
    assert ds["train_batch_size"] == 4 * 3 * 2 and ds["gradient_clipping"] == 0.5
    assert ds["zero_optimization"] == {"stage": 2, "overlap_comm": False}
    assert ds["bf16"] == {"enabled": True} and ds["fp16"] == {"enabled": False}
    assert ds["communication_data_type"] == "fp32"


@pytest.mark.parametrize("extra, key", [
    ("{zero_optimization: {stage: 3}}", r"deepspeed.config.zero_optimization.stage=3 contradicts"),
    ("{train_micro_batch_size_per_gpu: 99}", r"deepspeed.config.train_micro_batch_size_per_gpu=99 contradicts"),
    ("{gradient_clipping: 5.0}", r"deepspeed.config.gradient_clipping=5.0 contradicts"),
])
def test_contradicting_deepspeed_keys_are_refused(tiny, tmp_path, extra, key):
    cfg = load_config(tiny_config_yaml(tiny, tmp_path / "r"), [f"deepspeed.config={extra}"])
    with pytest.raises(ConfigError, match=key):
        build_deepspeed_config(cfg, world_size=1)


def test_lr_factor_warmup_then_decay():
    assert [lr_factor(s, 10, 4, "linear") for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_factor(4, 10, 4, "linear") == 1.0 and lr_factor(10, 10, 4, "linear") == 0.0
    assert lr_factor(7, 10, 4, "linear") == pytest.approx(0.5)
    assert lr_factor(7, 10, 4, "cosine") == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_factor(9, 10, 4, "constant") == 1.0


def test_scheduler_and_optimizer_groups(tiny, tmp_path):
    cfg = load_config(tiny_config_yaml(tiny, tmp_path / "r"), ["training.warmup_ratio=0.5", "training.learning_rate=0.1"])
    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.LayerNorm(3))
    optimizer = build_optimizer(model, cfg.training)
    assert [len(g["params"]) for g in optimizer.param_groups] == [1, 3]  # only the matrix decays
    assert optimizer.param_groups[1]["weight_decay"] == 0.0
    scheduler = build_scheduler(optimizer, cfg.training, total_steps=4)
    seen = []
    for _ in range(4):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert seen == pytest.approx([0.05, 0.1, 0.1, 0.05])
