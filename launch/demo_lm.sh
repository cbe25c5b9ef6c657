#!/usr/bin/env bash
# The causal-LM demo, offline, on CPU: convert the packaged SmolLM2-135M (GGUF) into a normal
# checkpoint, adapt a copy to tweets (the domain teacher), fit the interpolation weight lambda on
# the tweets' validation tokens, then distil general + domain into a compressed student (the domain
# teacher, vocabulary trimmed and pruned to half the parameters) on a general -> tweets data
# schedule; export it and print perplexities of all of them.
# Extra arguments are dotted overrides for the distillation step (configs/demo_lm.yaml).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/activate.sh"
python -m distill.demo.assets smollm2 runs/demo_lm/assets/smollm2-135m >/dev/null
python -m distill.demo.assets general-text runs/demo_lm/assets/general >/dev/null
train_once runs/demo_lm/teacher-domain configs/demo_lm_domain.yaml "adapting SmolLM2 to the tweets (the domain teacher)"
echo "== fitting lambda on the tweets' validation tokens"
rm -rf runs/demo_lm/fit
distill fit-weights configs/demo_lm.yaml --out runs/demo_lm/fit
rm -rf runs/demo_lm/distill
echo "== distilling general + domain SmolLM2 into the pruned, trimmed student (general -> tweets schedule)"
distill train configs/demo_lm.yaml --weights runs/demo_lm/fit/weights.yaml "$@"
echo "fit: runs/demo_lm/fit (fit_weights.png); curves: runs/demo_lm/distill/training_curves.png"
echo "exported student: runs/demo_lm/distill/student (AutoModelForCausalLM.from_pretrained)"
