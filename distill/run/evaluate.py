"""`distill eval`: one process, no DeepSpeed, a saved student scored next to the config's teachers."""
from __future__ import annotations

from pathlib import Path

from distill.evaluation.report import build_report
from distill.models.loading import count_parameters
from distill.tasks.base import load_saved_student
from distill.tasks.setup import Setup


def evaluate_saved_model(cfg, model_path: Path):
    """Scores a saved student (an exported folder, or a run directory's `student/`) next to the config's
    teachers and their interpolated target, with the config's task; returns (task, report)."""
    if (model_path / "student" / "config.json").is_file():
        model_path = model_path / "student"
    key = f"model {model_path}"
    setup = Setup(cfg).plan(tokenizer_from=(str(model_path.resolve()), key))
    setup.check()  # a teacher cache opened and matched, served teachers connected: once, for loading and scoring
    task = setup.task
    student = load_saved_student(task, model_path.resolve(), key, setup.splits.label_names)
    train, validation = setup.encode("train", "validation")
    ensemble, source = setup.load_teachers()
    metrics = task.evaluate(student.to(setup.device).eval(), ensemble, source, setup.device, validation,
                            setup.context).figures
    teacher_params = ensemble.parameter_counts if ensemble is not None else []
    return task, build_report(cfg, task.traits, setup.plans, teacher_params, count_parameters(student), metrics,
                              {"steps": 0, "seconds": 0.0}, setup.splits.train, validation)
