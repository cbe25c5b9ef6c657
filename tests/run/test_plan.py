"""`distill plan` (issue 29): the memory of a run per rank from the models' configs, nothing loaded."""
import pytest

from tests.conftest import tiny_config_yaml
from tests.helpers import run_cli_in_process


def test_the_plan_counts_each_model_as_loaded_and_partitions_what_the_stage_partitions(tiny, tmp_path):
    from transformers import AutoModelForSequenceClassification

    from distill.api import load_config, plan

    config = tiny_config_yaml(tiny, tmp_path / "run")
    cfg = load_config(config, ["teachers.dtype=float32"])
    teacher_a = sum(p.numel() for p in AutoModelForSequenceClassification.from_pretrained(tiny["teacher_a"]).parameters())
    teacher_b = sum(p.numel() for p in AutoModelForSequenceClassification.from_pretrained(tiny["teacher_b"]).parameters())
    result = plan(cfg, 1, "1GB")
    lines = {what: size for what, size, _ in result["lines"]}
    assert lines["teacher a"] == 4 * teacher_a and lines["teacher b"] == 4 * teacher_b  # fp32: 4 bytes each
    student = AutoModelForSequenceClassification.from_pretrained(tiny["teacher_a"])
    kept = 2  # student.layers: [0, 2] of teacher a
    per_layer = sum(p.numel() for p in student.bert.encoder.layer[0].parameters())
    student_params = teacher_a - (student.config.num_hidden_layers - kept) * per_layer
    assert lines["student weights, gradients, AdamW"] == 16 * student_params  # fp32 weights, grads, AdamW m and v
    moments = {what: size for what, size, _ in result["moments"]}
    assert result["total"] == sum(lines.values()) + max(moments.values())  # resident + the largest moment
    assert moments["the export (rank 0)"] == 8 * student_params
    assert "loading a teacher" not in moments  # fp32 teachers: no fp32 copy for the precision drift
    bf16 = plan(load_config(config, ["teachers.dtype=bfloat16"]), 1)  # the tiny teachers are saved in fp32
    assert {what: size for what, size, _ in bf16["moments"]}["loading a teacher"] == 8 * max(teacher_a, teacher_b)
    assert result["budget"] == 10 ** 9 and result["fits"]
    two = {what: size for what, size, _ in plan(load_config(config, ["teachers.dtype=float32",
                                                                       "deepspeed.zero_stage=2"]), 2)["lines"]}
    # weights whole; gradients, AdamW m and v and ZeRO's fp32 copy of the partition halved
    assert two["student weights, gradients, AdamW"] == 4 * student_params + (16 * student_params) // 2
    assert two["teacher a"] == lines["teacher a"]  # replicated: whole on every rank
    assert "runtime" in two
    pruned = plan(load_config(config, ["teachers.dtype=float32", "student.layers=null", "student.prune.target_params=0.5"]), 1)
    states = {what: size for what, size, _ in pruned["lines"]}["student weights, gradients, AdamW"]
    assert states == 16 * int(0.5 * teacher_a)  # the budget is a share of the model the student is cut from


def test_without_the_fused_loss_the_plan_counts_the_students_whole_logits(tiny_lm, tmp_path):
    from distill.api import load_config, plan
    from tests.conftest import tiny_lm_config_yaml

    config = tiny_lm_config_yaml(tiny_lm, tmp_path / "run")

    def step(*overrides):
        moments = plan(load_config(config, ["deepspeed.zero_stage=2", *overrides]), 2)["moments"]
        return {what: size for what, size, _ in moments}["a training step"]

    tokens, vocab = 4 * 32, len(tiny_lm["tokenizer"])  # micro_batch_size x block_size; the student's vocabulary
    assert step("loss.fused=false") - step() == 3 * tokens * vocab * 4  # logits, kept log-probs, their gradient


def test_plan_says_what_does_not_fit_and_refuses_a_bad_size(tiny, tmp_path):
    config = tiny_config_yaml(tiny, tmp_path / "run")
    small = run_cli_in_process(["plan", config, "--device-memory", "100MiB"])
    assert small.returncode == 1 and "does NOT fit: 0.10 GiB per rank (--device-memory)" in small.stdout
    assert not (tmp_path / "run").exists()  # a plan writes nothing
    bad = run_cli_in_process(["plan", config, "--device-memory", "lots"])
    assert bad.returncode == 2 and "--device-memory: 'lots' is not a size like 80GB" in bad.stderr


@pytest.mark.parametrize("text, size", [("80GB", 80 * 10 ** 9), ("24GiB", 24 * 2 ** 30), ("512MiB", 512 * 2 ** 20),
                                        ("1.5TB", int(1.5 * 10 ** 12)), ("1000", 1000)])
def test_sizes_read_as_people_write_them(text, size):
    from distill.run.plan import parse_size

    assert parse_size(text) == size


def test_training_refuses_a_run_the_plan_says_cannot_fit_unless_told_to_go_ahead(tiny, tmp_path, monkeypatch):
    import distill.run.plan as planner

    monkeypatch.setattr(planner, "_budget", lambda device, memory, ranks: (10 ** 6, "a 1 MB device"))
    run_dir = tmp_path / "run"
    refused = run_cli_in_process(["train", tiny_config_yaml(tiny, run_dir)])
    assert refused.returncode == 2 and not run_dir.exists()
    assert "the memory plan needs" in refused.stderr and "a 1 MB device gives 0.00 GiB" in refused.stderr
    assert "training.ignore_memory_plan=true" in refused.stderr
    went = run_cli_in_process(["train", tiny_config_yaml(tiny, run_dir), "training.ignore_memory_plan=true",
                               "training.max_steps=2"])
    assert went.returncode == 0 and (run_dir / "student" / "config.json").is_file()
