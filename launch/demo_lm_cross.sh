#!/usr/bin/env bash
# The cross-tokenizer demo, offline, on CPU: SmolLM2-135M (the general teacher, the student's
# tokenizer) and a small Llama with its own BPE trained here on tweets (the domain teacher) give one
# interpolated target; lambda is fitted on the validation tweets where both have read the text, and a
# pruned SmolLM2 is distilled on it. Prints coverage, mapped mass and bits per byte of every model.
# Extra arguments are dotted overrides for the distillation step (configs/demo_lm_cross.yaml).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/activate.sh"
python -m distill.demo.assets smollm2 runs/demo_lm/assets/smollm2-135m >/dev/null
python -m distill.demo.assets general-text runs/demo_lm/assets/general >/dev/null
python -m distill.demo.assets tweets runs/demo_lm_cross/assets/tweets >/dev/null
python -m distill.demo.assets own-bpe-lm runs/demo_lm_cross/assets/tweets/train.jsonl \
    runs/demo_lm_cross/assets/tweets-bpe-lm >/dev/null
train_once runs/demo_lm_cross/teacher-tweets configs/demo_lm_cross_teacher.yaml \
    "training the tweets teacher (its own 4,096-token BPE) from scratch"
echo "== fitting lambda where both teachers have read the text (validation tweets)"
distill fit-weights configs/demo_lm_cross.yaml --out runs/demo_lm_cross/fit-$$
echo "== distilling general (SmolLM2) + tweets (own tokenizer) into a pruned SmolLM2"
distill train configs/demo_lm_cross.yaml --weights runs/demo_lm_cross/fit-$$/weights.yaml \
    output_dir=runs/demo_lm_cross/distill-$$ "$@"
echo "fit: runs/demo_lm_cross/fit-$$; run and exported student: runs/demo_lm_cross/distill-$$"
