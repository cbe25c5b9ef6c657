"""What on-policy distillation optimises, measured on the students' own samples.

    python benchmarks/on_policy_samples.py RUN_DIR [RUN_DIR ...] [--prompts 50] [--new-tokens 48]

For each run (a routed causal-LM run of `distill train` with prompt/response data, e.g. the two of
launch/demo_lm_routed.sh) and each route: the exported student samples a continuation of each
validation prompt of that route (T = 1, top-p 0.95, seeded, stopped at EOS, the same seeds for every
run), and the sampled tokens are scored by the route's target (the run's teachers mixed linearly
with the route's weights from report.json, at T = 1) and by the student itself. Printed per run and
route: the target's NLL per sampled token (how plausible the teachers find the student's own text),
the student's (its entropy, estimated), their difference = a per-token estimate of the reverse KL
KL(student || target) on the student's own distribution of text (GKD's on-policy objective), the
mean sample length and the share that stopped at EOS. Perplexity on reference text (the run's own
evaluation) measures the other direction: how well the student predicts the data's text.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def _load(path):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32).eval()


def _token_log_probs(model, sequence, start):
    """log p(sequence[t] | sequence[:t]) for t >= start, one row."""
    import torch

    with torch.no_grad():
        logits = model(input_ids=torch.tensor([sequence])).logits[0].float()
    log_probs = torch.log_softmax(logits[start - 1:-1], dim=-1)
    return log_probs.gather(-1, torch.tensor(sequence[start:]).unsqueeze(-1)).squeeze(-1)


def measure(run_dir: Path, prompts_per_route: int, new_tokens: int, teachers_cache: dict) -> dict:
    import torch
    from transformers import AutoTokenizer, GenerationConfig

    from distill.config.schema import read_run_config
    from distill.tasks.on_policy import left_padded

    cfg = read_run_config(run_dir / "config.yaml")
    report = json.loads((run_dir / "report.json").read_text())
    student = _load(run_dir / "student")
    tokenizer = AutoTokenizer.from_pretrained(run_dir / "student")
    paths = {t.name: t.path for t in cfg.teachers.models}
    rows = [json.loads(line) for line in Path(cfg.data.validation.path).read_text().splitlines()]
    results = {}
    for route, figures in report["routes"].items():
        if route in ("column", "unrouted"):
            continue
        weights = figures["teachers"]
        for name in weights:
            if paths[name] not in teachers_cache:
                teachers_cache[paths[name]] = _load(paths[name])
        prompts = [row[cfg.data.prompt_field] for row in rows if str(row[cfg.teachers.route_by]) == route]
        sums = {"target": 0.0, "student": 0.0, "tokens": 0, "stopped": 0, "samples": 0}
        chosen = prompts[:prompts_per_route]
        config = GenerationConfig(do_sample=True, temperature=1.0, top_p=0.95, top_k=0, max_new_tokens=new_tokens,
                                  eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.eos_token_id)
        for start in range(0, len(chosen), 25):  # left-padded batches, the same seed per batch for every run
            encoded = [tokenizer(prompt)["input_ids"] for prompt in chosen[start:start + 25]]
            ids, mask = left_padded(encoded, tokenizer.eos_token_id, torch.device("cpu"))
            torch.manual_seed(1_000 + start)
            with torch.no_grad():
                generated = student.generate(input_ids=ids, attention_mask=mask, generation_config=config)
            for prompt, row in zip(encoded, generated[:, ids.shape[1]:].tolist()):
                sample = row
                if tokenizer.eos_token_id in sample:
                    sample = sample[:sample.index(tokenizer.eos_token_id) + 1]
                    sums["stopped"] += 1
                sequence = prompt + sample
                mixture = None
                for name, weight in weights.items():
                    if weight <= 0:
                        continue
                    part = _token_log_probs(teachers_cache[paths[name]], sequence, len(prompt)) + math.log(weight)
                    mixture = part if mixture is None else torch.logaddexp(mixture, part)
                sums["target"] -= float(mixture.sum())
                sums["student"] -= float(_token_log_probs(student, sequence, len(prompt)).sum())
                sums["tokens"] += len(sample)
                sums["samples"] += 1
        tokens = max(sums["tokens"], 1)
        results[route] = {"target_nll": sums["target"] / tokens, "student_nll": sums["student"] / tokens,
                          "reverse_kl_estimate": (sums["target"] - sums["student"]) / tokens,
                          "mean_length": sums["tokens"] / max(sums["samples"], 1),
                          "stopped": sums["stopped"] / max(sums["samples"], 1), "samples": sums["samples"]}
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--prompts", type=int, default=50, help="validation prompts per route")
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    from distill.util.quiet import quiet_start

    quiet_start()
    cache, table = {}, []
    print(f"{'run':<14}{'route':<9}{'target NLL':>11}{'student NLL':>12}{'rev. KL est.':>13}{'length':>8}{'EOS':>6}")
    for run in args.runs:
        for route, row in measure(run, args.prompts, args.new_tokens, cache).items():
            print(f"{run.name:<14}{route:<9}{row['target_nll']:>11.3f}{row['student_nll']:>12.3f}"
                  f"{row['reverse_kl_estimate']:>13.3f}{row['mean_length']:>8.1f}{row['stopped']:>6.0%}")
            table.append({"run": str(run), "route": route, **row})
    if args.json:
        args.json.write_text("\n".join(json.dumps(row) for row in table) + "\n")


if __name__ == "__main__":
    main()
