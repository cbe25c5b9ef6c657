#!/usr/bin/env bash
# The embedded default, offline, on CPU: set up .venv, prepare two different teachers by plain
# fine-tuning (loss.kd_alpha=0), distil them into a smaller student, export it, print the table.
# Extra arguments are dotted overrides for the distillation step (configs/demo.yaml).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/activate.sh"
python -m distill.demo.assets runs/demo/assets/minilm-l3 >/dev/null
for teacher in l6 l3; do
    train_once "runs/demo/teacher-$teacher" "configs/demo_teacher_$teacher.yaml" \
        "preparing teacher $teacher (plain fine-tuning)"
done
rm -rf runs/demo/distill
echo "== distilling both teachers into the student"
distill train configs/demo.yaml "$@"
echo "run directory: runs/demo/distill (report.json, metrics.jsonl, training_curves.png, tensorboard/)"
echo "exported student: runs/demo/distill/student"
