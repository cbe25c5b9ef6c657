"""Peak memory and time of the token-level distillation loss, side by side in one run.

    python benchmarks/bench_loss.py [--tokens 1024] [--vocab 32768] [--hidden 576] [--chunk 128]

Variants, each forward + backward of the whole loss for K teachers (their last hidden states and
output layers are the inputs; the teachers' own bodies are not part of the loss):

  materialised  K x [N, V] teacher logits and [N, V] student logits, autograd through all of it
  recompute     chunks under torch.utils.checkpoint: bounded memory, the chunk recomputed in backward
  fused         distill.formulas.token_loss as training runs it for forward KL + linear interpolation:
                chunk gradients in closed form inside the forward (no recomputation), the target
                built one teacher at a time into two [chunk, V] buffers (the chunk does not shrink
                with K; the recompute variant's does, to chunk / K)

Each variant runs in a fresh process (so one's peak does not hide another's): peak memory is the
rise of the process's peak RSS above what the inputs hold (CPU), or torch.cuda.max_memory_allocated
on a GPU (CPU runs use a fixed glibc mmap threshold, so freed tensors leave the RSS); time is the
p20/p50/p80 over --repeats steady runs after one warm-up, in --rounds processes per variant taken
round-robin, the round with the lowest p50 kept. Prints a table and
JSON rows with the ratios the README states: fused / materialised memory and time (targets
<= 0.25x, <= 1.15x), fused K=4 / K=1 memory (target <= 1.2x).
"""
from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from measure import (add_variant_arguments, current_rss_bytes, emit_rows, measure_in_rounds,  # noqa: E402
                     peak_rss_bytes, quantiles, ran_one_variant)


def run_variant(variant: str, teachers: int, args) -> dict:
    import torch
    import torch.nn.functional as F
    from torch.utils.checkpoint import checkpoint

    from distill.formulas.token_loss import (fused_token_distillation, materialized_token_distillation, token_loss_sums,
                                      tokens_per_chunk)
    from distill.signals.sources import HiddenStateSignal, Targets
    from distill.interpolation.strategies import build_interpolation
    from distill.models.teachers import TeacherEnsemble, TeacherPlan

    torch.manual_seed(0)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    n, h, v = args.tokens, args.hidden, args.vocab
    hidden = torch.randn(n, h, device=device, requires_grad=True)
    weight = (torch.randn(v, h, device=device) * 0.02).requires_grad_(True)
    teacher_hidden = [torch.randn(n, h, device=device) for _ in range(teachers)]
    teacher_heads = [torch.randn(v, h, device=device) * 0.02 for _ in range(teachers)]
    labels = torch.randint(0, v, (n,), device=device)
    labels[-n // 8:] = -100  # padding
    interpolation = build_interpolation("linear")
    weights = torch.full((teachers,), 1.0 / teachers, device=device)
    temperatures = torch.full((teachers,), 2.0, device=device)
    options = dict(kd_alpha=0.5, temperature=2.0, label_smoothing=0.1)
    chunk = tokens_per_chunk(args.chunk, teachers)  # the recompute variant holds [K, chunk, V]
    plans = [TeacherPlan(name=f"t{k}", path="-", key="-", weight=1.0, temperature=2.0, label_order=None, input_prefix="")
             for k in range(teachers)]
    ensemble = TeacherEnsemble(plans, [], "linear")
    heads = []
    for head_weight in teacher_heads:
        head = torch.nn.Linear(h, v, bias=False, device=device).requires_grad_(False)
        head.weight.data = head_weight
        heads.append(head)

    def target_slice(start, end):
        with torch.no_grad():
            logits = torch.stack([F.linear(th[start:end], head) for th, head in zip(teacher_hidden, teacher_heads)])
            return interpolation(logits, weights, temperatures), None

    def step():
        if variant == "materialised":
            with torch.no_grad():
                target, _ = target_slice(0, n)
            loss = materialized_token_distillation(F.linear(hidden, weight), target, labels, **options).total
        elif variant == "recompute":
            normalizer = float((labels != -100).sum())

            def chunk_loss(h_chunk, w, start, end):
                target, _ = target_slice(start, end)
                kd, ce = token_loss_sums(F.linear(h_chunk, w), target, labels[start:end], 2.0, 0.1)
                return (0.5 * kd + 0.5 * ce) / normalizer

            loss = sum(checkpoint(chunk_loss, hidden[s:s + chunk], weight, s, min(s + chunk, n),
                                  use_reentrant=False) for s in range(0, n, chunk))
        else:  # what training runs for forward KL + linear: the mixture built one teacher at a time
            targets = Targets(ensemble, HiddenStateSignal(teacher_hidden, heads), labels, labels != -100, streamed=True)
            loss = fused_token_distillation(hidden, weight, labels, targets, chunk_size=args.chunk, **options).total
        loss.backward()
        hidden.grad = weight.grad = None
        return float(loss)

    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        value = step()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        base = current_rss_bytes()
        value = step()
        peak = max(0, peak_rss_bytes() - base)
    times = []
    for _ in range(args.repeats if args.measure == "time" else 0):
        started = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    p20, p50, p80 = quantiles(times) if times else (0.0, 0.0, 0.0)

    if args.measure == "memory":
        return {"peak_bytes": peak, "loss": value}
    return {"variant": variant, "teachers": teachers, "tokens": n, "vocab": v, "hidden": h, "chunk": args.chunk,
            "device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or platform.machine(),
            "loss": value, "peak_bytes": peak, "p20_s": p20, "p50_s": p50, "p80_s": p80}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--vocab", type=int, default=32768)
    parser.add_argument("--hidden", type=int, default=576)
    parser.add_argument("--chunk", type=int, default=128, help="tokens per chunk (the recompute variant: / K)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=2, help="timing rounds, round-robin over the variants (best p50 kept)")
    add_variant_arguments(parser)
    args = parser.parse_args()
    if ran_one_variant(args, run_variant):
        return

    import torch

    forwarded = ["--tokens", str(args.tokens), "--vocab", str(args.vocab), "--hidden", str(args.hidden),
                 "--chunk", str(args.chunk), "--repeats", str(args.repeats)]
    rows = measure_in_rounds(__file__, [("materialised", 1), ("materialised", 4), ("recompute", 1), ("recompute", 4),
                                        ("fused", 1), ("fused", 4)], forwarded, args.rounds)
    by = {(r["variant"], r["teachers"]): r for r in rows}
    print(f"token loss, N={args.tokens} tokens, V={args.vocab}, H={args.hidden}, chunk={args.chunk}; "
          f"{rows[0]['device']}, torch {torch.__version__}, python {platform.python_version()}")
    print(f"{'variant':<14}{'K':>3}{'peak MiB':>11}{'p20 s':>9}{'p50 s':>9}{'p80 s':>9}{'mem vs mat.':>13}{'time vs mat.':>14}")
    for row in rows:
        reference = by[("materialised", row["teachers"])]
        row["memory_vs_materialised"] = row["peak_bytes"] / max(reference["peak_bytes"], 1)
        row["time_vs_materialised"] = row["p50_s"] / reference["p50_s"]
        print(f"{row['variant']:<14}{row['teachers']:>3}{row['peak_bytes'] / 2**20:>11.1f}{row['p20_s']:>9.3f}"
              f"{row['p50_s']:>9.3f}{row['p80_s']:>9.3f}{row['memory_vs_materialised']:>12.2f}x"
              f"{row['time_vs_materialised']:>13.2f}x")
    growth = by[("fused", 4)]["peak_bytes"] / max(by[("fused", 1)]["peak_bytes"], 1)
    print(f"fused K=4 / K=1 peak memory: {growth:.2f}x (target <= 1.2x)")
    for k in (1, 4):
        row = by[("fused", k)]
        print(f"fused K={k}: {row['memory_vs_materialised']:.2f}x the materialised memory (target <= 0.25x), "
              f"{row['time_vs_materialised']:.2f}x its time (target <= 1.15x)")
    emit_rows(rows, args.json)


if __name__ == "__main__":
    main()
