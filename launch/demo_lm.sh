#!/usr/bin/env bash
# The causal-LM demo, offline, on CPU: convert the packaged SmolLM2-135M (GGUF) into a normal
# checkpoint, adapt a copy to tweets (the domain teacher), distil general + domain into a student
# with a third of the layers, export it and print perplexities of all of them.
# Extra arguments are dotted overrides for the distillation step (configs/demo_lm.yaml).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/activate.sh"
python -m distill.assets smollm2 runs/demo_lm/assets/smollm2-135m >/dev/null
if [ ! -f runs/demo_lm/teacher-domain/student/model.safetensors ]; then
    echo "== adapting SmolLM2 to the tweets (the domain teacher)"
    rm -rf runs/demo_lm/teacher-domain
    distill train configs/demo_lm_domain.yaml
fi
rm -rf runs/demo_lm/distill
echo "== distilling general + domain SmolLM2 into the student"
distill train configs/demo_lm.yaml "$@"
echo "exported student: runs/demo_lm/distill/student (AutoModelForCausalLM.from_pretrained)"
