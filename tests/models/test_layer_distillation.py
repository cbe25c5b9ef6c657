"""Intermediate-layer distillation end to end: both tasks, a teacher of another width (a learned
projection), ZeRO-3, exact resume with the projections, exports without them, per_model rows
aligned token for token, and the settings refused before anything is written."""
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import make_bert_classifier, make_llama, tiny_config_yaml, tiny_lm_config_yaml
from tests.helpers import assert_refused_before_writing, run_cli, train_losses

CLASSIFICATION = """
loss:
  kd_alpha: 0.5
  temperature: 2.0
  intermediate:
    - {{teacher: a, hidden_weight: 1.0, relation_weight: 1.0}}
    - {{teacher: wide, hidden_weight: 1.0, hidden_loss: mse, layer_map: [[1, 1], [2, 2]], relation_weight: 0.5,
        relations: [query, value]}}
"""


@pytest.fixture(scope="session")
def wide_teachers(tiny, tiny_lm):
    """A classifier and a causal LM of width 48 (the students cut from the tiny teachers are 32 wide)."""
    root = tiny["root"]
    return {"classifier": make_bert_classifier(root / "wide_teacher", tiny["tokenizer"], layers=2, seed=7, hidden=48),
            "lm": make_llama(tiny_lm["root"] / "wide_lm_teacher", tiny_lm["tokenizer"], layers=3, seed=8, hidden=48)}


def _classification_config(tiny, wide, run_dir, extra=""):
    config = tiny_config_yaml(tiny, run_dir, CLASSIFICATION.format() + extra)
    text = config.read_text().replace(f"- {{name: b, path: {tiny['teacher_b']}, weight: 0.4, temperature: 1.5}}",
                                      f"- {{name: wide, path: {wide['classifier']}, weight: 0.4, temperature: 1.5}}")
    text = text.replace("loss: {kd_alpha: 0.5, temperature: 2.0, label_smoothing: 0.1}\n", "")
    config.write_text(text)
    return config


def _projection_keys(run_dir, tag):
    states = torch.load(run_dir / "checkpoints" / tag / "mp_rank_00_model_states.pt", map_location="cpu",
                        weights_only=True)["module"]
    return sorted(k for k in states if k.startswith("distill_projections."))


def test_classification_with_hidden_and_relation_terms_resumes_exactly_and_exports_without_projections(
        tiny, wide_teachers, tmp_path):
    whole_dir = tmp_path / "whole"
    config = _classification_config(tiny, wide_teachers, whole_dir)
    whole = run_cli(["train", config, "training.keep_checkpoints=5"])
    assert whole.returncode == 0, whole.stderr[-3000:]
    assert "projection parameters train with the student" in whole.stdout
    rows = train_losses(whole_dir)
    assert all(row["hidden"] > 0 and row["relation"] > 0 for row in rows)
    assert all(row["a/aligned_rows"] == 1.0 and row["wide/aligned_rows"] == 1.0 for row in rows)
    assert rows[-1]["hidden"] < rows[0]["hidden"]  # the student moves toward the teachers' insides
    # the projection (32 -> 48, for the wide teacher only) is trained and checkpointed, not exported
    assert _projection_keys(whole_dir, "step0000012") == ["distill_projections.teacher1.bias",
                                                          "distill_projections.teacher1.weight"]
    exported = load_file(str(whole_dir / "student" / "model.safetensors"))
    assert not [k for k in exported if "distill" in k]
    from transformers import AutoModelForSequenceClassification

    AutoModelForSequenceClassification.from_pretrained(whole_dir / "student")  # a stock model, no extra weights

    # resume from step 6 in the same directory (as after a kill there): the same steps 7..12, bit for bit
    last = train_losses(whole_dir)[-1]
    shutil.rmtree(whole_dir / "checkpoints" / "step0000012")
    shutil.rmtree(whole_dir / "student")
    (whole_dir / "checkpoints" / "latest").write_text("step0000006")
    (whole_dir / "report.json").unlink()
    resumed = run_cli(["train", config, "training.keep_checkpoints=5", "training.resume=auto"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from step 6" in resumed.stdout
    resumed_last = train_losses(whole_dir)[-1]
    assert {k: v for k, v in resumed_last.items() if k not in ("time", "samples_per_s")} == {
        k: v for k, v in last.items() if k not in ("time", "samples_per_s")}
    resumed_weights = load_file(str(whole_dir / "student" / "model.safetensors"))
    assert all(torch.equal(exported[k], resumed_weights[k]) for k in exported)


@pytest.mark.slow
def test_classification_intermediate_terms_under_zero_1_to_3_follow_the_stage_0_run(tiny, wide_teachers, tmp_path):
    """The same run under ZeRO-1 and -2 (sharded optimizer state, and gradients) and ZeRO-3 (the student
    and its projection partitioned, gathered for the forward): the same losses, hidden and relation
    terms as stage 0, step for step, and a stock exported model."""
    runs = {}
    for stage in (0, 1, 2, 3):
        run_dir = tmp_path / f"zero{stage}"
        result = run_cli(["train", _classification_config(tiny, wide_teachers, run_dir), f"deepspeed.zero_stage={stage}"])
        assert result.returncode == 0, result.stderr[-3000:]
        runs[stage] = train_losses(run_dir)
        exported = load_file(str(run_dir / "student" / "model.safetensors"))
        assert exported and not [k for k in exported if "distill" in k]
    keep = ("loss", "kd", "ce", "hidden", "relation")
    assert all(row["hidden"] > 0 and row["relation"] > 0 for row in runs[0]) and len(runs[0]) > 1
    for stage in (1, 2, 3):
        assert [{k: row[k] for k in keep} for row in runs[stage]] == [
            pytest.approx({k: row[k] for k in keep}, rel=1e-4, abs=1e-6) for row in runs[0]], f"ZeRO-{stage}"


def test_a_zero_teacher_weight_turns_its_intermediate_terms_off_exactly(tiny, wide_teachers, tmp_path):
    """Teacher wide at weight 0 (scheduled): its terms vanish; the run equals one without its entry."""
    schedule = "schedules: {teacher_weights: {kind: constant, start: [1.0, 0.0]}}\n"
    with_entry = run_cli(["train", _classification_config(tiny, wide_teachers, tmp_path / "with", schedule)])
    assert with_entry.returncode == 0, with_entry.stderr[-3000:]
    config = _classification_config(tiny, wide_teachers, tmp_path / "without", schedule)
    text = config.read_text()
    start = text.index("    - {teacher: wide")
    config.write_text(text[:start] + text[text.index("relations: [query, value]}") + len("relations: [query, value]}") + 1:])
    without = run_cli(["train", config])
    assert without.returncode == 0, without.stderr[-3000:]
    keep = ("loss", "kd", "ce", "hidden", "relation", "intermediate")
    assert [{k: r[k] for k in keep} for r in train_losses(tmp_path / "with")] == [
        {k: r[k] for k in keep} for r in train_losses(tmp_path / "without")]


def test_per_model_teachers_count_only_rows_that_match_the_trimmed_student_token_for_token(tiny, tmp_path):
    run_dir = tmp_path / "trimmed"
    config = tiny_config_yaml(tiny, run_dir, """
loss:
  kd_alpha: 0.5
  intermediate:
    - {teacher: a, hidden_weight: 1.0}
""")
    text = config.read_text().replace("loss: {kd_alpha: 0.5, temperature: 2.0, label_smoothing: 0.1}\n", "")
    config.write_text(text)
    result = run_cli(["train", config, "student.trim_vocab=true", "teachers.tokenization=per_model"])
    assert result.returncode == 0, result.stderr[-3000:]
    rows = train_losses(run_dir)
    # training and transfer rows use only kept tokens: every row matches
    assert all(row["a/aligned_rows"] == 1.0 for row in rows) and all(row["hidden"] > 0 for row in rows)


def test_aligned_rows_compare_token_strings_and_counts():
    from distill.models.layer_hooks import aligned_rows

    mapping = torch.tensor([0, 5, 6, 7])  # student id -> teacher id
    student = torch.tensor([[1, 2, 3], [1, 2, 0], [1, 3, 0]])
    student_mask = torch.tensor([[1, 1, 1], [1, 1, 0], [1, 1, 0]])
    teacher = torch.tensor([[5, 6, 7, 0], [5, 6, 7, 0], [5, 6, 0, 0]])  # row 1: one more token; row 2: another token
    teacher_mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 0], [1, 1, 0, 0]])
    assert aligned_rows(student, student_mask, teacher, teacher_mask, mapping).tolist() == [True, False, False]


@pytest.mark.parametrize("zero_stage", [0, 3])
@pytest.mark.slow
def test_causal_lm_intermediate_terms_train_under_zero_0_and_3_and_export_a_stock_model(tiny_lm, wide_teachers,
                                                                                       tmp_path, zero_stage):
    """Stage 0 takes the fused path (the student's body, hidden terms a chunk of tokens at a time),
    stage 3 the logits path with the projection partitioned by DeepSpeed."""
    run_dir = tmp_path / f"lm{zero_stage}"
    config = tiny_lm_config_yaml(tiny_lm, run_dir, f"deepspeed: {{zero_stage: {zero_stage}}}")
    text = config.read_text().replace(f"- {{name: b, path: {tiny_lm['teacher_b']}, weight: 0.4, temperature: 1.5}}",
                                      f"- {{name: wide, path: {wide_teachers['lm']}, weight: 0.4, temperature: 1.5}}")
    text = text.replace("loss: {kd_alpha: 0.5, temperature: 2.0, label_smoothing: 0.1, chunk_tokens: 64}\n", """
loss:
  kd_alpha: 0.5
  temperature: 2.0
  chunk_tokens: 24
  intermediate:
    - {teacher: a, hidden_weight: 1.0, relation_weight: 1.0}
    - {teacher: wide, hidden_weight: 1.0, hidden_loss: mse, relation_weight: 1.0, relation_layers: [[1, 2], [2, 3]]}
""")
    config.write_text(text)
    result = run_cli(["train", config])
    assert result.returncode == 0, result.stderr[-3000:]
    rows = train_losses(run_dir)
    assert all(row["hidden"] > 0 and row["relation"] > 0 for row in rows)
    report = json.loads((run_dir / "report.json").read_text())
    assert report["student"]["perplexity"] > 1
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(run_dir / "student")
    assert not [name for name, _ in model.named_parameters() if "distill" in name]


def test_intermediate_settings_are_refused_before_anything_is_written(tiny, tiny_lm, wide_teachers, tmp_path):
    cases = [
        (["loss.intermediate=[{teacher: nobody, hidden_weight: 1.0}]"], "loss.intermediate[0].teacher"),
        (["loss.intermediate=[{teacher: a}]"], "hidden_weight and relation_weight are both 0"),
        (["loss.intermediate=[{teacher: a, hidden_weight: 1.0, relations: [query]}]"], "read only with"),
        (["loss.intermediate=[{teacher: a, hidden_weight: 1.0, layer_map: [[1, 9]]}]"], "outside the models"),
        (["loss.intermediate=[{teacher: a, hidden_weight: 1.0, layer_map: [[5, 1]]}]"], "outside the models"),
        (["loss.intermediate=[{teacher: a, relation_weight: 1.0, relation_layers: [[0, 1]]}]"], "count from 1"),
        (["loss.intermediate=[{teacher: a, hidden_weight: 1.0, hidden_loss: l1}]"], "hidden_loss"),
        (["loss.intermediate=[{teacher: a, hidden_weight: 1.0}]", "student.pooling=mean"], "student.pooling"),
    ]
    for overrides, message in cases:
        run_dir = tmp_path / f"refused{len(message)}"
        assert_refused_before_writing(tiny_config_yaml(tiny, run_dir), run_dir, overrides, message)
    run_dir = tmp_path / "lm_confidence"
    assert_refused_before_writing(tiny_lm_config_yaml(tiny_lm, run_dir), run_dir, [
        "interpolation.method=confidence", "loss.intermediate=[{teacher: a, hidden_weight: 1.0}]"], "per-token")
