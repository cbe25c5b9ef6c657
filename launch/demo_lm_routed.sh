#!/usr/bin/env bash
# Routing + on-policy on the real SmolLM2 teachers, offline, on CPU (about 15 minutes): prompt /
# response rows of prose and tweets routed by their `domain` column (configs/demo_lm_routed.yaml),
# distilled twice at the same number of steps: off-policy, then with half the micro-batches on the
# student's own samples. Prints both students' perplexity and bits per byte per route.
# Extra arguments are dotted overrides for both runs.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/activate.sh"
python -m distill.assets smollm2 runs/demo_lm/assets/smollm2-135m >/dev/null
python -m distill.assets general-text runs/demo_lm/assets/general >/dev/null
python -m distill.assets tweets runs/demo_lm_cross/assets/tweets >/dev/null
python -m distill.assets routed-pairs runs/demo_lm/assets/general runs/demo_lm_cross/assets/tweets \
    runs/demo_lm_routed/assets >/dev/null
if [ ! -f runs/demo_lm/teacher-domain/student/model.safetensors ]; then
    echo "== adapting SmolLM2 to the tweets (the domain teacher)"
    rm -rf runs/demo_lm/teacher-domain
    distill train configs/demo_lm_domain.yaml
fi
run=runs/demo_lm_routed/$$
echo "== off-policy: every micro-batch reads the data's responses"
distill train configs/demo_lm_routed.yaml output_dir=$run/off-policy "$@"
echo "== on-policy: half the micro-batches are the student's own samples of the prompts"
distill train configs/demo_lm_routed.yaml output_dir=$run/on-policy \
    "training.on_policy={fraction: 0.5, max_new_tokens: 48, temperature: 1.0, top_p: 0.95}" "$@"
python - "$run" <<'PY'
import json, sys
from pathlib import Path
run = Path(sys.argv[1])
print(f"\n{'student':<12}{'route':<9}{'perplexity':>11}{'bits/byte':>11}")
for name in ("off-policy", "on-policy"):
    rows = [json.loads(l) for l in (run / name / "metrics.jsonl").read_text().splitlines()]
    final = [r for r in rows if r["kind"] == "eval"][-1]
    for route in ("general", "tweets"):
        print(f"{name:<12}{route:<9}{final[f'student/route.{route}/perplexity']:>11.1f}"
              f"{final[f'student/route.{route}/bits_per_byte']:>11.3f}")
print(f"curves: {run}/*/training_curves.png")
PY
