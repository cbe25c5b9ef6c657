#!/usr/bin/env bash
# Routing + on-policy on the real SmolLM2 teachers, offline, on CPU (about 15 minutes): prompt /
# response rows of prose and tweets routed by their `domain` column (configs/demo_lm_routed.yaml),
# distilled twice at the same number of steps: off-policy, then with half the micro-batches on the
# student's own samples. Prints both students' perplexity and bits per byte per route, and how the
# route's target scores each student's own samples (benchmarks/on_policy_samples.py).
# Extra arguments are dotted overrides for both runs.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/activate.sh"
python -m distill.demo.assets smollm2 runs/demo_lm/assets/smollm2-135m >/dev/null
python -m distill.demo.assets general-text runs/demo_lm/assets/general >/dev/null
python -m distill.demo.assets tweets runs/demo_lm_cross/assets/tweets >/dev/null
python -m distill.demo.assets routed-pairs runs/demo_lm/assets/general runs/demo_lm_cross/assets/tweets \
    runs/demo_lm_routed/assets >/dev/null
train_once runs/demo_lm/teacher-domain configs/demo_lm_domain.yaml "adapting SmolLM2 to the tweets (the domain teacher)"
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
import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
figure, axes = plt.subplots(1, 2, figsize=(12, 4))
for name, style in (("off-policy", "--"), ("on-policy", "-")):
    rows = [json.loads(l) for l in (run / name / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["kind"] == "train"]
    evals = [r for r in rows if r["kind"] == "eval"]
    for route in ("general", "tweets"):
        axes[0].plot([r["step"] for r in train], [r[f"route/{route}/kd"] for r in train], style,
                     label=f"{name}, {route}")
        axes[1].plot([r["step"] for r in evals], [r[f"student/route.{route}/perplexity"] for r in evals],
                     style, marker="o", label=f"{name}, {route}")
final = [json.loads(l) for l in (run / "off-policy" / "metrics.jsonl").read_text().splitlines()][-1]
for route in ("general", "tweets"):
    axes[1].axhline(final[f"target/route.{route}/perplexity"], color="grey", linestyle=":", linewidth=1)
axes[0].set(title="KD term per route (training)", xlabel="optimizer step")
axes[1].set(title="student perplexity per route (validation; dotted: targets)",
            xlabel="optimizer step", yscale="log")
for axis in axes:
    axis.legend(fontsize=8)
figure.tight_layout()
figure.savefig(run / "routes_on_vs_off.png", dpi=100)
print(f"curves: {run}/routes_on_vs_off.png, {run}/*/training_curves.png")
PY
echo "== the students' own samples of 50 validation prompts per route, scored by the route's target"
python benchmarks/on_policy_samples.py "$run/off-policy" "$run/on-policy" --json "$run/samples.jsonl"
