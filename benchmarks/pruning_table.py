"""Structured pruning side by side, before any training: validation perplexity of the causal-LM
demo's domain teacher cut to the same parameter count in different ways.

    python benchmarks/pruning_table.py            # after ./launch/demo_lm.sh (it needs its teachers)

Part 1, the full vocabulary, every variant at the parameter count of the old demo student (every
third layer, 0.474x): that cut, importance depth pruning (loss rise when skipped; block influence),
width pruning (MLP channels + query heads; + hidden size) and depth + width.
Part 2, the demo's setting: vocabulary trimmed to the training text, then pruned to 0.5x of the
teacher. Calibration: 64 training blocks; evaluation: the tweets' validation blocks. Results are
printed and written to benchmarks/results_pruning_table.json (docs/causal_lm.md quotes them).
"""
from __future__ import annotations

import json
import math
import sys
import time
import types
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from distill.config.schema import load_config  # noqa: E402
from distill.models.loading import load_causal_lm, load_tokenizer  # noqa: E402
from distill.models.pruning import prune  # noqa: E402
from distill.models.student import calibration_batches, keep_layers, trim_vocabulary  # noqa: E402
from distill.tasks import build_task  # noqa: E402
from distill.tasks.causal_lm import LMContext, next_token_loss  # noqa: E402

SOURCE = "runs/demo_lm/teacher-domain/student"


def perplexity(model, batches) -> float:
    total, tokens = 0.0, 0
    with torch.no_grad():
        for batch in batches:
            count = int((batch["labels"] != -100).sum())
            total += float(next_token_loss(model, batch)) * count
            tokens += count
    return math.exp(total / tokens)


def variants(task, context, model, budget, reference, label):
    splits = context.splits
    train = task.encode(splits.train, "train", context)
    validation = task.encode(splits.validation, "validation", context)
    collate = task.collator(context)
    evaluation = [collate([validation[i] for i in range(s, min(len(validation), s + 16))])
                  for s in range(0, len(validation), 16)]
    calibration = calibration_batches(train, collate, 64, seed=5)
    rows = [{"setting": label, "variant": "source (unpruned)", "params": sum(p.numel() for p in model.parameters()),
             "perplexity": perplexity(model, evaluation)}]
    if budget is None:  # part 1: the old every-third-layer student sets the budget
        third = keep_layers(model, list(range(0, model.config.num_hidden_layers, 3)))
        budget = sum(p.numel() for p in third.parameters())
        rows.append({"setting": label, "variant": "every third layer (old demo)", "params": budget,
                     "perplexity": perplexity(third, evaluation)})
    plans = [("depth, loss rise when skipped", True, False, False, "loss"),
             ("depth, block influence", True, False, False, "block_influence"),
             ("width: MLP + heads", False, True, False, "loss"),
             ("width: MLP + heads + hidden", False, True, True, "loss"),
             ("depth + width (half each, block influence)", True, True, False, "block_influence"),
             ("depth + width + hidden (block influence)", True, True, True, "block_influence")]
    for name, depth, width, hidden, metric in plans:
        spec = types.SimpleNamespace(depth=depth, width=width, heads=True, hidden=hidden, depth_share=0.5,
                                     depth_metric=metric)
        started = time.perf_counter()
        pruned, report = prune(model, spec, calibration, budget, next_token_loss, keep_layers)
        rows.append({"setting": label, "variant": name, "params": report.parameters_after,
                     "perplexity": perplexity(pruned, evaluation), "layers": len(report.layers),
                     "width": report.width.as_dict() if report.width else None,
                     "seconds": round(time.perf_counter() - started, 1)})
        print(rows[-1], flush=True)
    for row in rows:
        row["params_vs_teacher"] = row["params"] / reference
    return rows


def main() -> None:
    torch.manual_seed(0)
    cfg = load_config(str(ROOT / "configs/demo_lm.yaml"))
    task = build_task(cfg)
    splits = task.read_splits()
    tokenizer = load_tokenizer(SOURCE, "source", False)
    context = LMContext(splits=splits, tokenizer=tokenizer)
    model = load_causal_lm(SOURCE, "source", False, torch.float32).eval()
    reference = sum(p.numel() for p in model.parameters())
    rows = variants(task, context, model, None, reference, "full vocabulary, 0.474x")
    train = task.encode(splits.train, "train", context)
    used = {token for ids in train["input_ids"] for token in ids}
    trimmed_model, trimmed, kept = trim_vocabulary(load_causal_lm(SOURCE, "source", False, torch.float32).eval(),
                                                   tokenizer, (), used_ids=used)
    rows += variants(task, LMContext(splits=splits, tokenizer=trimmed), trimmed_model, int(0.5 * reference), reference,
                     f"vocabulary trimmed to {len(kept):,} tokens, 0.5x")
    print(f"\n{'setting':<42} {'variant':<44} {'params':>8} {'x teacher':>9} {'perplexity':>12}")
    for row in rows:
        print(f"{row['setting']:<42} {row['variant']:<44} {row['params'] / 1e6:>7.2f}M {row['params_vs_teacher']:>9.3f} "
              f"{row['perplexity']:>12,.1f}")
    (ROOT / "benchmarks/results_pruning_table.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
