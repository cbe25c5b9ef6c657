"""One-process runs of `distill train | eval | export` on the tiny world, as a user runs them."""
import json

import pytest
import torch

from tests.conftest import tiny_config_yaml
from tests.helpers import exported_logits, assert_export_matches_run, export_int8_and_onnx, run_cli, train_losses, run_cli_in_process


@pytest.fixture(scope="module")
def finished_run(tiny, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("train") / "run"
    config = tiny_config_yaml(tiny, run_dir, extra="deepspeed: {zero_stage: 0}")
    result = run_cli(["train", config, "training.max_steps=20"])
    assert result.returncode == 0, result.stderr[-4000:]
    return run_dir, config, result


def test_run_directory_holds_everything_promised(finished_run):
    run_dir, _, result = finished_run
    for name in ("config.yaml", "metrics.jsonl", "report.json", "training_curves.png", "checkpoints/latest",
                 "student/model.safetensors", "student/config.json", "student/tokenizer.json", "student/README.md",
                 "student_init/config.json", "eval/predictions.json"):
        assert (run_dir / name).exists(), name
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    assert (run_dir / "training_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "target (interpolated)" in result.stdout and "student" in result.stdout


def test_report_and_logged_terms(finished_run):
    run_dir, _, _ = finished_run
    report = json.loads((run_dir / "report.json").read_text())
    assert [t["name"] for t in report["teachers"]] == ["a", "b"]
    for teacher in report["teachers"]:
        assert teacher["params"] > 0 and 0 <= teacher["accuracy"] <= 1
    assert 0 <= report["target"]["accuracy"] <= 1
    assert report["student"]["params"] < report["teachers"][0]["params"]
    rows = train_losses(run_dir)
    assert {"loss", "kd", "ce", "lr", "samples_per_s", "a/kl_to_student", "a/weight", "b/batch_accuracy"} <= set(rows[-1])
    assert rows[-1]["a/weight"] == pytest.approx(0.6)
    for row in rows:  # total is exactly the documented mix of the two logged terms
        assert row["loss"] == pytest.approx(0.5 * row["kd"] + 0.5 * row["ce"], rel=1e-5)
    first, last = rows[0]["loss"] + rows[1]["loss"], rows[-1]["loss"] + rows[-2]["loss"]
    assert last < first, [row["loss"] for row in rows]


def test_export_loads_in_plain_transformers_with_identical_predictions(finished_run):
    run_dir, config, _ = finished_run
    assert_export_matches_run(run_dir, config)
    card = (run_dir / "student" / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: transformers") and "| a |" in card and "compression" in card
    report = json.loads((run_dir / "report.json").read_text())
    kd_only = report["training"]["kd_only_rows"]
    assert kd_only > 0 and f"{kd_only:,} of the {report['training']['train_rows']:,} training rows have no label" in card
    assert "D = forward_kl" in card


def test_export_command_refuses_to_overwrite_and_writes_bf16(finished_run, tmp_path):
    run_dir, _, _ = finished_run
    refused = run_cli_in_process(["export", run_dir, run_dir / "student"])
    assert refused.returncode == 2 and "exists and is not empty" in refused.stderr
    out = tmp_path / "bf16"
    done = run_cli(["export", run_dir, out, "--dtype", "bf16"])
    assert done.returncode == 0, done.stderr[-3000:]
    from transformers import AutoModelForSequenceClassification
    import torch

    model = AutoModelForSequenceClassification.from_pretrained(out)
    assert next(model.parameters()).dtype == torch.bfloat16


def test_int8_export_loads_in_plain_transformers_and_reports_its_cost(finished_run, tmp_path):
    """What docs/benchmarks.md states: each linear weight is rounded to int8 with a scale per output
    row, the int8 model computes what fp32 arithmetic on those rounded weights computes, so it keeps
    every prediction whose fp32 margin exceeds twice the largest logit move. (A share of agreeing
    rows is no tolerance for a 20-step toy student whose logits nearly tie: one CPU gave 60%.)"""
    run_dir, config, _ = finished_run
    out = tmp_path / "int8"
    parity, compression = export_int8_and_onnx(run_dir, out)  # onnxruntime vs PyTorch, fp32
    assert parity["rows"] == len(json.loads((run_dir / "eval" / "predictions.json").read_text())["references"])
    # each int8 weight saves 3 of its 4 bytes, less per-row scales and torchao's metadata
    assert compression["bytes_before"] - compression["bytes_after"] >= 1.5 * compression["params_int8"]
    assert 0 < compression["params_int8"] < compression["params"]
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(out)
    assert type(model.classifier.weight).__name__ == "Int8Tensor"  # stored and reloaded quantized
    recorded = json.loads((run_dir / "eval" / "predictions.json").read_text())["student"]
    # every linear weight is its fp32 value rounded to one int8 step (absmax / 127) of its row
    full_model = AutoModelForSequenceClassification.from_pretrained(run_dir / "student")
    full = exported_logits(run_dir / "student", config, model=full_model)  # before its weights are rounded below
    full_weights = dict(full_model.named_parameters())
    rounded = []
    for name, weight in model.named_parameters():
        if type(weight).__name__ != "Int8Tensor":
            continue
        original, restored = full_weights[name].detach(), weight.dequantize().float()
        step = original.abs().amax(dim=1, keepdim=True) / 127
        assert ((restored - original).abs() <= 0.5 * step + 1e-7).all(), name
        full_weights[name].data.copy_(restored)
        rounded.append(original.numel())
    assert len(rounded) == sum(isinstance(m, torch.nn.Linear) for m in full_model.modules())
    assert sum(rounded) == compression["params_int8"]
    quantized = exported_logits(out, config)
    assert full.argmax(-1).tolist() == recorded
    # the int8 model computes what fp32 arithmetic on the rounded weights computes
    reference = exported_logits(run_dir / "student", config, model=full_model)
    assert torch.allclose(quantized, reference, rtol=1e-4, atol=1e-6), (quantized - reference).abs().max()
    # an arg-max may flip only where the fp32 margin is within twice the largest logit move
    moved = (quantized - full).abs().max().item()
    top = full.topk(2, dim=-1).values
    decided = ((top[:, 0] - top[:, 1]) > 2 * moved).nonzero().flatten().tolist()
    predicted = quantized.argmax(-1).tolist()
    assert all(predicted[i] == recorded[i] for i in decided)
    references = json.loads((run_dir / "eval" / "predictions.json").read_text())["references"]
    labelled = [i for i, label in enumerate(references) if label != -100]
    accuracy = sum(predicted[i] == references[i] for i in labelled) / len(labelled)
    assert accuracy == pytest.approx(compression["validation_after"]["accuracy"], abs=1e-9)
    card = (out / "README.md").read_text()
    assert "## Compression: int8" in card and f"{compression['validation_after']['accuracy']:.4f}" in card
    refused = run_cli_in_process(["export", run_dir, tmp_path / "bf16-int8", "--quantize", "int8", "--dtype", "bf16"])
    assert refused.returncode == 2 and "drop --dtype bf16" in refused.stderr


def test_eval_command_reproduces_the_run_metrics(finished_run):
    run_dir, config, _ = finished_run
    result = run_cli(["eval", run_dir, config])
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((run_dir / "report.json").read_text())
    student_line = [line for line in result.stdout.splitlines() if line.startswith("student")][0]
    assert f"{report['student']['accuracy']:.4f}" in student_line


@pytest.mark.slow
def test_a_checkpoint_that_does_not_fit_on_disk_leaves_the_previous_one_whole(tiny, tmp_path):
    """The disk refuses the write (here a file-size limit: Python ignores SIGXFSZ, so the write fails
    with an OSError as on a full disk): the run stops with a message, the partial checkpoint is gone,
    `latest` still names the previous one, and a later resume continues from it."""
    import resource

    def small_files_only():  # model states of the tiny student are ~400 KB, every other file < 130 KB
        resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))

    run_dir = tmp_path / "run"
    config = tiny_config_yaml(tiny, run_dir, extra="deepspeed: {zero_stage: 0}")
    first = run_cli(["train", config, "training.max_steps=4", "training.checkpoint_every=4"])
    assert first.returncode == 0, first.stderr[-4000:]
    (run_dir / "report.json").unlink()  # make it a run that is still going, not a finished one
    again = ["training.max_steps=8", "training.checkpoint_every=4", "training.resume=auto"]
    full = run_cli(["train", config, *again], preexec_fn=small_files_only)
    assert full.returncode == 4, full.stderr[-4000:]
    assert "checkpoint step0000008 could not be written" in full.stderr
    assert "newest complete checkpoint is step0000004" in full.stderr
    checkpoints = run_dir / "checkpoints"
    assert (checkpoints / "latest").read_text().strip() == "step0000004"
    assert sorted(p.name for p in checkpoints.iterdir() if p.is_dir()) == ["step0000004"]
    resumed = run_cli(["train", config, *again])
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert "resumed from step 4" in resumed.stdout
    assert (checkpoints / "latest").read_text().strip() == "step0000008"


def test_a_run_directory_with_a_link_leading_outside_is_refused(tiny, tmp_path):
    run_dir, elsewhere = tmp_path / "handed-over", tmp_path / "elsewhere"
    elsewhere.mkdir()
    run_dir.mkdir()
    (run_dir / "checkpoints").symlink_to(elsewhere, target_is_directory=True)
    config = tiny_config_yaml(tiny, run_dir, extra="deepspeed: {zero_stage: 0}")
    result = run_cli_in_process(["train", config, "training.resume=auto"])
    assert result.returncode == 2, result.stderr[-3000:]
    assert f"{run_dir / 'checkpoints'} is a symbolic link to {elsewhere}" in result.stderr
    assert list(elsewhere.iterdir()) == [] and not (run_dir / "config.yaml").exists()


def test_second_run_into_the_same_directory_is_refused(finished_run):
    run_dir, config, _ = finished_run
    result = run_cli_in_process(["train", config])
    assert result.returncode == 2 and "already holds a run" in result.stderr and "training.resume=auto" in result.stderr


def test_bad_config_fails_before_writing_anything(tiny, tmp_path):
    run_dir = tmp_path / "never"
    config = tiny_config_yaml(tiny, run_dir)
    result = run_cli_in_process(["train", config, "loss.temperature=0"])
    assert result.returncode == 2 and "loss.temperature=0 is outside [0.05, 100]" in result.stderr
    assert not run_dir.exists()


def test_zero1_bf16_one_process_run_exports_in_bf16(tiny, tmp_path):
    run_dir = tmp_path / "bf16"
    config = tiny_config_yaml(tiny, run_dir)
    result = run_cli(["train", config, "deepspeed.zero_stage=1", "training.precision=bf16", "export.dtype=bf16",
                      "training.max_steps=6"])
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads((run_dir / "report.json").read_text())
    assert report["training"]["zero_stage"] == 1
    assert_export_matches_run(run_dir, config)


def test_schedules_are_applied_and_logged(tiny, tmp_path):
    run_dir = tmp_path / "scheduled"
    config = tiny_config_yaml(tiny, run_dir)
    result = run_cli(["train", config, "training.max_steps=8",
                      "schedules.kd_alpha={kind: linear, start: 0.2, end: 1.0}",
                      "schedules.teacher_weights={kind: cosine, start: [1.0, 0.0], end: [0.5, 0.5]}"])
    assert result.returncode == 0, result.stderr[-4000:]
    rows = {row["step"]: row for row in train_losses(run_dir)}
    assert rows[8]["kd_alpha"] == 1.0 and rows[4]["kd_alpha"] == pytest.approx(0.6)
    every_step = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    every_step = [row for row in every_step if row["kind"] == "schedule"]
    assert [row["step"] for row in every_step] == list(range(1, 9))
    assert [row["kd_alpha"] for row in every_step] == pytest.approx([0.2 + 0.8 * s / 8 for s in range(1, 9)])
    assert rows[8]["a/weight"] == 0.5 and rows[8]["b/weight"] == 0.5
    assert rows[2]["a/weight"] > rows[4]["a/weight"] > rows[6]["a/weight"]


def test_fit_weights_writes_table_chart_and_a_fragment_train_accepts(tiny, tmp_path):
    run_dir = tmp_path / "fitted"
    config = tiny_config_yaml(tiny, run_dir)
    fit_dir = tmp_path / "fit"
    result = run_cli(["fit-weights", config, "--out", fit_dir, "--temperatures"])
    assert result.returncode == 0, result.stderr[-4000:]
    for name in ("fit_weights.json", "fit_weights.png", "weights.yaml"):
        assert (fit_dir / name).is_file(), name
    table = json.loads((fit_dir / "fit_weights.json").read_text())
    rows = {row["name"]: row for row in table["rows"]}
    assert rows["fitted linear"]["nll"] <= rows["uniform linear"]["nll"] + 1e-9
    assert rows["fitted geometric"]["nll"] <= rows["uniform geometric"]["nll"] + 1e-9
    assert "fitted linear +T" in rows and "uniform linear" in result.stdout
    trained = run_cli(["train", config, "--weights", fit_dir / "weights.yaml", "training.max_steps=2"])
    assert trained.returncode == 0, trained.stderr[-4000:]
    report = json.loads((run_dir / "report.json").read_text())
    fitted = rows["fitted linear joint"]
    assert fitted["nll"] <= rows["fitted linear +T"]["nll"] + 1e-9
    assert [t["weight"] for t in report["teachers"]] == pytest.approx(fitted["weights"], abs=1e-5)
    assert [t["temperature"] for t in report["teachers"]] == pytest.approx(fitted["temperatures"], abs=1e-5)


def test_fit_weights_fits_the_mix_at_the_temperatures_training_uses(tiny, tmp_path):
    """The target mixes the teachers at teachers[].temperature (2.0 and 1.5 here): weights.yaml
    takes the weights fitted for those softened distributions, and says so; the T = 1 fit stays in
    the table for comparison."""
    import yaml

    config = tiny_config_yaml(tiny, tmp_path / "run")
    fit_dir = tmp_path / "fit"
    result = run_cli(["fit-weights", config, "--out", fit_dir])
    assert result.returncode == 0, result.stderr[-4000:]
    table = json.loads((fit_dir / "fit_weights.json").read_text())
    rows = {row["name"]: row for row in table["rows"]}
    at_training = rows["fitted linear @train T"]
    assert at_training["temperatures"] == [2.0, 1.5] and rows["fitted linear"]["temperatures"] == [1.0, 1.0]
    assert table["weights_yaml_takes"] == "fitted linear @train T"
    assert "weights.yaml takes 'fitted linear @train T' (teachers at T = 2, 1.5" in result.stdout
    assert at_training["nll"] <= rows["uniform linear @train T"]["nll"] + 1e-9
    fragment = yaml.safe_load((fit_dir / "weights.yaml").read_text())
    assert [m["weight"] for m in fragment["teachers"]["models"]] == pytest.approx(at_training["weights"], abs=1e-6)
    assert [m["temperature"] for m in fragment["teachers"]["models"]] == [2.0, 1.5]


@pytest.mark.slow
def test_a_run_without_teachers_is_called_a_fine_tune_and_keep_checkpoints_0_leaves_the_export(tiny, tmp_path):
    """No teachers: the table, report, card and plot say fine-tune (no 'from 0 teacher(s)', no flat
    KD line); the effective global batch is printed and training.global_batch_size sets the
    accumulation; keep_checkpoints=0 removes the checkpoints once the student is exported."""
    run_dir = tmp_path / "finetune"
    config = tiny_config_yaml(tiny, run_dir)
    done = run_cli(["train", config, "teachers.models=[]", "student.from_teacher=null", f"student.path={tiny['teacher_a']}",
                    "student.layers=null", "loss.kd_alpha=0", "training.keep_checkpoints=0",
                    "training.micro_batch_size=4", "training.global_batch_size=8", "training.max_steps=4",
                    "training.checkpoint_every=2"], env_extra={"TORCH_EXTENSIONS_DIR": str(tmp_path / "extensions")})
    assert done.returncode == 0, done.stderr[-4000:]
    assert "effective global batch: 4 rows per micro-batch x 2 accumulation step(s) x 1 rank(s) = 8 rows" in done.stdout
    assert "student (fine-tuned, no KD)" in done.stdout
    # DeepSpeed's CPU shared-memory op (tensor-parallel inference only) is neither compiled nor loaded
    assert not (tmp_path / "extensions").exists() and "shm_comm_op built" not in done.stdout
    # a quiet start: none of the libraries' notices a user cannot act on
    for notice in ("Failed to load", "Setting accelerator to CPU", "LOAD REPORT", "is an Enum subclass",
                   "Loading weights"):
        assert notice not in done.stdout + done.stderr, notice
    report = json.loads((run_dir / "report.json").read_text())
    assert report["kind"] == "fine-tune" and report["training"]["global_batch"] == 8
    assert not (run_dir / "checkpoints").exists() and (run_dir / "student" / "model.safetensors").is_file()
    card = (run_dir / "student" / "README.md").read_text()
    assert card.count("# Fine-tuned student") == 1 and "teacher(s)" not in card
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(run_dir / "student").model_max_length == 32  # data.max_length
    assert "the tokenizer's `model_max_length` is 32" in card
    assert "Fine-tuned by `distill` on the labels alone (no knowledge distillation: no teachers)" in card
    assert (run_dir / "training_curves.png").is_file()
    refused = run_cli_in_process(["train", config, "training.global_batch_size=12", "training.micro_batch_size=8",
                       f"output_dir={tmp_path / 'other'}"])
    assert refused.returncode == 2 and "training.global_batch_size=12 must be a positive multiple of training.micro_batch_size" in refused.stderr


def test_fit_on_validation_is_saved_and_reused_on_resume(tiny, tmp_path):
    run_dir = tmp_path / "gate"
    config = tiny_config_yaml(tiny, run_dir)
    settings = ["interpolation.method=learned_gate", "interpolation.fit_on=validation",
                "interpolation.learned_gate.epochs=30", "training.checkpoint_every=3",
                "schedules.kd_alpha={kind: linear, start: 0.0, end: 1.0, end_step: 6}"]
    first = run_cli(["train", config, "training.max_steps=3", *settings])
    assert first.returncode == 0, first.stderr[-4000:]
    assert (run_dir / "interpolation" / "gate.safetensors").is_file()
    digest = [line for line in first.stdout.splitlines() if line.startswith("interpolation state rank 0")][0].split()[4]
    (run_dir / "report.json").unlink()
    resumed = run_cli(["train", config, "training.max_steps=6", "training.resume=auto", *settings])
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert "resumed from step 3" in resumed.stdout
    assert f"interpolation state rank 0: {digest}" in resumed.stdout
    scheduled = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    scheduled = {row["step"]: row["kd_alpha"] for row in scheduled if row["kind"] == "schedule"}
    assert scheduled == pytest.approx({step: step / 6 for step in range(1, 7)})  # the schedule resumed with the step


@pytest.fixture(scope="module")
def nan_teacher(tiny, tmp_path_factory):
    from transformers import AutoModelForSequenceClassification
    import torch

    folder = tmp_path_factory.mktemp("nan") / "teacher"
    model = AutoModelForSequenceClassification.from_pretrained(tiny["teacher_b"])
    with torch.no_grad():
        model.classifier.bias.fill_(float("nan"))
    model.save_pretrained(folder)
    tiny["tokenizer"].save_pretrained(folder)
    return folder


def test_nan_teacher_stops_the_run_naming_the_teacher(tiny, tmp_path, nan_teacher):
    config = tiny_config_yaml(tiny, tmp_path / "stop")
    result = run_cli(["train", config, f"teachers.models.1.path={nan_teacher}", "training.max_steps=2"])
    assert result.returncode == 3
    assert "teacher b" in result.stderr and "NaN/inf logits" in result.stderr and "on_nonfinite=skip" in result.stderr


def test_nan_teacher_rows_are_skipped_and_counted(tiny, tmp_path, nan_teacher):
    run_dir = tmp_path / "skip"
    config = tiny_config_yaml(tiny, run_dir)
    result = run_cli(["train", config, f"teachers.models.1.path={nan_teacher}", "teachers.on_nonfinite=skip",
                      "training.max_steps=4"])
    assert result.returncode == 0, result.stderr[-3000:]
    rows = train_losses(run_dir)
    assert rows[-1]["skipped_nonfinite_rows_total"] == 4 * 8  # every row of every micro-batch
    assert all(row["kd"] == 0.0 and row["loss"] == row["loss"] for row in rows)  # finite, KD left out


def test_the_weights_fragment_sets_weights_and_temperatures_on_the_configured_teachers(tiny, tmp_path):
    """issue 30: weights.yaml replaced the teacher list with name, path, weight and temperature only, so
    pooled teachers lost pooling / normalize / head and `train --weights` failed on their labels."""
    from omegaconf import OmegaConf

    from distill.config.schema import DistillConfig
    from distill.run.fit_weights import weights_fragment

    head = str(tmp_path / "head.safetensors")
    cfg = OmegaConf.merge(OmegaConf.structured(DistillConfig), {"output_dir": str(tmp_path / "run"), "teachers": {
        "models": [{"name": "a", "path": str(tiny["teacher_a"]), "weight": 0.6, "temperature": 2.0, "pooling": "mean",
                    "normalize": True, "head": head},
                   {"name": "b", "path": str(tiny["teacher_b"]), "weight": 0.4, "temperature": 1.5}]}})
    fragment = tmp_path / "weights.yaml"
    fragment.write_text(weights_fragment(cfg, ["a", "b"], {"weights": [0.25, 0.75], "temperatures": [3.0, 1.0]},
                                         "geometric", with_temperatures=True))
    merged = OmegaConf.merge(cfg, OmegaConf.load(fragment))
    first, second = merged.teachers.models
    assert (first.pooling, first.normalize, first.head, first.path) == ("mean", True, head, str(tiny["teacher_a"]))
    assert (first.weight, first.temperature, second.weight, second.temperature) == (0.25, 3.0, 0.75, 1.0)
    assert second.pooling is None and merged.interpolation.method == "geometric"


def test_the_cards_loss_line_names_the_divergence_the_intermediate_terms_and_the_kd_only_rows():
    from distill.evaluation.report import loss_line

    report = {"loss": {"kd_alpha": 0.9, "temperature": 2.0, "label_smoothing": 0.1, "divergence": "jsd",
                       "intermediate": [{"teacher": "a", "hidden_weight": 1.0, "hidden_loss": "mse", "relation_weight": 0.5},
                                        {"teacher": "b", "hidden_weight": 0.0, "relation_weight": 0.0}]},
              "training": {"kd_only_rows": 1200, "train_rows": 3000}}
    line = loss_line(report)
    assert "+ intermediate-layer terms`" in line and "D = jsd" in line and "kd_alpha 0.9" in line
    assert "teacher a: hidden states (mse) x 1, attention relations x 0.5" in line and "teacher b" not in line
    assert "1,200 of the 3,000 training rows have no label and add the KD term only" in line
    plain = loss_line({"loss": {**report["loss"], "intermediate": []}, "training": {"train_rows": 10}})
    assert "intermediate" not in plain and "no label" not in plain
