"""`distill eval`: one process, no DeepSpeed, a saved student scored next to the config's teachers."""
from __future__ import annotations

from pathlib import Path

from distill.models.loading import count_parameters, load_tokenizer
from distill.runtime.distributed import init_distributed
from distill.runtime.hardware import local_device, teacher_dtype
from distill.tasks import build_task


def evaluate_saved_model(cfg, model_path: Path):
    """Scores a saved student (an exported folder, or a run directory's `student/`) next to the config's
    teachers and their interpolated target, with the config's task; returns (task, report)."""
    task = build_task(cfg)
    if (model_path / "student" / "config.json").is_file():
        model_path = model_path / "student"
    key = f"model {model_path}"
    splits = task.read_splits()
    plans = task.plan_teachers(load_tokenizer(str(model_path.resolve()), key, cfg.trust_remote_code))
    student = task.load_saved_student(model_path.resolve(), key)
    task.encode(splits.train, "train")
    validation = task.encode(splits.validation, "validation")
    init_distributed()
    device = local_device()
    ensemble = source = None
    if plans:
        ensemble, source = task.load_teachers(plans, device, teacher_dtype(cfg.teachers.dtype, device))
    metrics, _ = task.evaluate(student.to(device).eval(), ensemble, source, device)
    teacher_params = ensemble.parameter_counts if ensemble is not None else []
    return task, task.report(plans, teacher_params, count_parameters(student), metrics, {"steps": 0, "seconds": 0.0},
                             splits.train, validation)
