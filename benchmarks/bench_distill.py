"""Step time and peak memory of causal-LM distillation against plain fine-tuning, side by side.

    python benchmarks/bench_distill.py [--steps 20] [--vocab 16384] [--batch 4] [--seq 128]

Same student, data and batch in every variant (one process each, fresh):

  plain       label-only fine-tuning: model(input_ids, labels=...) with transformers' own loss
  live K      distillation from K = 1, 2, 4 live teachers (their forwards in inference mode,
              the fused chunked loss); the teachers' own forwards are also timed alone
  cached      distillation from 2 teachers' cached top-k (k = --top-k) log-probabilities
  cached_sampled   from 2 teachers' cached samples (N = --top-k draws at T = 2: the same bytes)
  cached_hidden    from 2 teachers' cached last hidden states and output layers (exact; no teacher body)
  on_policy   2 live teachers on the student's own samples (training.on_policy.fraction = 1): the first
              half of each row is the prompt, the student samples the second half (distill.tasks.on_policy,
              no EOS stop, so every step samples seq/2 tokens); the step's time split into generation,
              the teachers' forwards and the student's step, next to the same split of live K=2

Each variant: 3 warm-up steps, then --steps timed optimizer steps (AdamW), in --rounds fresh
processes taken round-robin over the variants (each keeps its round with the lowest p50: on a
shared machine a burst of load then spoils one round, not the comparison); p20/p50/p80 step time,
samples/s and tokens/s at p50, and the rise of peak RSS over the loaded models (CPU; in a process
with a fixed glibc mmap threshold) or torch.cuda.max_memory_allocated (GPU). Ratios to plain:
targets cached <= 1.10x, live <= 1.10x (plain + the teachers' own inference forwards, body and
output layer, timed alone in the same process), and step time linear in K within 10% (every
measured p50 within 10% of the least-squares line through K = 1, 2, 4; the per-teacher increments
t2 - t1 and (t4 - t1) / 3 are printed too). Prints a table, hardware and versions, and JSON rows.
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from measure import (add_variant_arguments, current_rss_bytes, emit_rows, measure_in_rounds,  # noqa: E402
                     peak_rss_bytes, quantiles, ran_one_variant)
VARIANTS = [("plain", 0), ("live", 1), ("live", 2), ("live", 4), ("cached", 2), ("cached_sampled", 2),
            ("cached_hidden", 2), ("on_policy", 2)]


def _llama(vocab: int, hidden: int, layers: int, seed: int):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 3, num_hidden_layers=layers,
                         num_attention_heads=max(1, hidden // 64), num_key_value_heads=max(1, hidden // 128),
                         max_position_embeddings=1024, tie_word_embeddings=True)
    return LlamaForCausalLM(config)


class _InMemoryCache:
    """What distill.caches.lm_stores.LogitCache.rows returns, for one fixed batch."""

    def __init__(self, ids, log_probs, tail, vocab_size):
        self.ids, self.log_probs, self.tail, self.vocab_size = ids, log_probs, tail, vocab_size

    def rows(self, indices, length):
        return self.ids, self.log_probs, self.tail


def run_variant(variant: str, teachers: int, args) -> dict:
    import torch

    from distill.caches.lm_stores import sampled_of, top_k_of
    from distill.formulas.token_loss import Workspace, fused_token_distillation
    from distill.signals.sources import (CachedTopK, HiddenStateSignal, LiveLanguageModels, Targets, body_and_head,
                                 teacher_hidden_states)
    from distill.models.teachers import TeacherEnsemble, TeacherPlan

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    student = _llama(args.vocab, args.hidden, args.layers, seed=0).to(device).train()
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-4)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), device=device)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "index": torch.arange(args.batch)}
    labels = torch.cat([ids[:, 1:], torch.full((args.batch, 1), -100, device=device)], dim=1)
    flat_labels = labels.reshape(-1)
    count = teachers if variant != "plain" else 0
    plans = [TeacherPlan(name=f"t{k}", path="-", key="-", weight=1.0, temperature=2.0, label_order=None,
                         input_prefix="") for k in range(count)]
    models = [_llama(args.vocab, args.teacher_hidden, args.teacher_layers, seed=k + 1).to(device).eval()
              .requires_grad_(False) for k in range(count)]
    ensemble = TeacherEnsemble(plans, models if variant in ("live", "on_policy") else [], "linear") if count else None
    inputs = {"input_ids": ids, "attention_mask": batch["attention_mask"]}
    cache = stored_hidden = None
    if variant == "cached_hidden":  # the teachers' last hidden states and output layers, as --store hidden keeps them
        hidden = teacher_hidden_states(TeacherEnsemble(plans, models, "linear"), inputs)
        stored_hidden = HiddenStateSignal(hidden, [body_and_head(m)[1] for m in models])
        del models
    if variant in ("cached", "cached_sampled"):  # top-k, or N = --top-k draws at T = 2, computed once
        hidden = teacher_hidden_states(TeacherEnsemble(plans, models, "linear"), inputs)
        generator = torch.Generator().manual_seed(0)
        parts = [top_k_of(body_and_head(m)[1](h), args.top_k) if variant == "cached" else
                 sampled_of(body_and_head(m)[1](h), 2.0, args.top_k, generator) for m, h in zip(models, hidden)]
        if variant == "cached_sampled":
            ensemble.temperatures = torch.ones(count)  # drawn at the temperature already
        shape = (args.batch, args.seq, count)
        cache = _InMemoryCache(torch.stack([p[0] for p in parts], 1).long().reshape(*shape, args.top_k),
                               torch.stack([p[1] for p in parts], 1).reshape(*shape, args.top_k),
                               torch.stack([p[2] for p in parts], 1).reshape(shape), args.vocab)
        del models, hidden
    live = LiveLanguageModels(ensemble) if variant in ("live", "on_policy") else None
    if variant == "on_policy":
        from types import SimpleNamespace

        from distill.tasks.on_policy import OnPolicySampler

        prompt_length = args.seq // 2
        settings = SimpleNamespace(fraction=1.0, max_new_tokens=args.seq - prompt_length, temperature=1.0, top_p=1.0)
        sampler = OnPolicySampler(settings, 0, SimpleNamespace(eos_token_id=None, pad_token_id=0), args.seq, None, 0, 0)
        prompts = ids[:, :prompt_length].tolist()
        labels[:, :prompt_length - 1] = -100  # only the sampled half is learned
        flat_labels = labels.reshape(-1)
    phases = {"generation": [], "teachers": [], "student": []}
    chunk = args.chunk  # forward KL + linear: training keeps the chunk whatever K is (chunk_size_for)
    workspace = Workspace() if device.type == "cpu" else None  # as the causal-LM task keeps it

    def step():
        optimizer.zero_grad(set_to_none=True)
        started = time.perf_counter()
        if variant == "on_policy":  # the sampled half replaces the second half of each row
            sampled = sampler.generate(SimpleNamespace(module=student), prompts, micro_step=0)
            ids[:, prompt_length:] = torch.tensor(sampled, device=device)[:, :args.seq - prompt_length]
            labels[:, prompt_length - 1:-1] = ids[:, prompt_length:]
        generated = time.perf_counter()
        if variant == "plain":
            loss = student(**inputs, labels=ids).loss
        else:
            signal = (live.signal(batch, device) if variant in ("live", "on_policy") else stored_hidden
                      if stored_hidden is not None else CachedTopK(cache).signal(batch, device))
            taught = time.perf_counter()
            targets = Targets(ensemble, signal, flat_labels, flat_labels != -100, streamed=True, workspace=workspace)
            body, head = body_and_head(student)
            hidden = body(**inputs).last_hidden_state
            loss = fused_token_distillation(hidden.reshape(-1, hidden.shape[-1]), head.weight, flat_labels, targets,
                                            kd_alpha=0.5, temperature=2.0, chunk_size=chunk, workspace=workspace).total
        loss.backward()
        optimizer.step()
        if variant != "plain":
            done = time.perf_counter()
            phases["generation"].append(generated - started)
            phases["teachers"].append(taught - generated)
            phases["student"].append(done - taught)

    def teachers_alone():  # each teacher's own inference forward: its body and its output layer
        live.signal(batch, device).logits(0, flat_labels.shape[0])

    def timed(fn, repeats):
        for _ in range(3):
            fn()
        times = []
        for _ in range(repeats):
            if device.type == "cuda":
                torch.cuda.synchronize()
            started = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - started)
        return quantiles(times)

    if args.measure == "memory":
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            step()
            step()
            return {"peak_bytes": torch.cuda.max_memory_allocated() - base}
        base = current_rss_bytes()
        step()
        step()  # the optimizer state exists from the first step on
        return {"peak_bytes": max(0, peak_rss_bytes() - base)}
    p20, p50, p80 = timed(step, args.steps)
    row = {"variant": variant if variant == "plain" else f"{variant} K={count}", "teachers": count,
           "p20_s": p20, "p50_s": p50, "p80_s": p80, "samples_per_s": args.batch / p50,
           "tokens_per_s": args.batch * args.seq / p50}
    if variant in ("live", "on_policy") and count == 2:  # where the step's time goes (timed steps only)
        row.update({f"{name}_p50_s": quantiles(times[3:])[1] for name, times in phases.items()})
    if variant == "live":
        row["teacher_forward_p50_s"] = timed(teachers_alone, args.steps)[1]
    return row


def linear_fit(times_by_k):
    """((a, b), worst |t_K - (a + b K)| / (a + b K)) of the least-squares line through (K, t_K)."""
    ks = sorted(times_by_k)
    mean_k = sum(ks) / len(ks)
    mean_t = sum(times_by_k[k] for k in ks) / len(ks)
    slope = (sum((k - mean_k) * (times_by_k[k] - mean_t) for k in ks) / sum((k - mean_k) ** 2 for k in ks))
    intercept = mean_t - slope * mean_k
    worst = max(abs(times_by_k[k] - (intercept + slope * k)) / (intercept + slope * k) for k in ks)
    return (intercept, slope), worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--vocab", type=int, default=16384)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--teacher-hidden", type=int, default=384)
    parser.add_argument("--teacher-layers", type=int, default=6)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--chunk", type=int, default=512)
    parser.add_argument("--top-k", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2, help="timing rounds, round-robin over the variants")
    add_variant_arguments(parser)
    args = parser.parse_args()
    if ran_one_variant(args, run_variant):
        return

    import deepspeed
    import torch
    import transformers

    forwarded = [f"--{name.replace('_', '-')}={getattr(args, name)}" for name in
                 ("steps", "vocab", "hidden", "layers", "teacher_hidden", "teacher_layers", "batch", "seq", "chunk", "top_k")]
    rows = measure_in_rounds(__file__, VARIANTS, forwarded, args.rounds)
    plain = rows[0]["p50_s"]
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else (platform.processor() or platform.machine())
    print(f"causal-LM step, batch {args.batch} x {args.seq} tokens, V={args.vocab}, student {args.layers}x{args.hidden}, "
          f"teachers {args.teacher_layers}x{args.teacher_hidden}, {args.steps} timed steps, best p50 of {args.rounds} rounds")
    print(f"{device}, {os.cpu_count()} CPUs; torch {torch.__version__}, transformers {transformers.__version__}, "
          f"deepspeed {deepspeed.__version__}, python {platform.python_version()}")
    header = f"{'variant':<12}{'p20 s':>8}{'p50 s':>8}{'p80 s':>8}{'samples/s':>11}{'tokens/s':>10}{'peak MiB':>10}{'vs plain':>10}{'teach. s':>10}{'vs plain+teach.':>17}"
    print(header)
    for row in rows:
        row["vs_plain"] = row["p50_s"] / plain
        if "teacher_forward_p50_s" in row:
            # the issue's yardstick: the student's plain step plus the teachers' own inference forwards
            row["vs_plain_plus_teacher_forwards"] = row["p50_s"] / (plain + row["teacher_forward_p50_s"])
        extra = (f"{row['teacher_forward_p50_s']:>10.3f}{row['vs_plain_plus_teacher_forwards']:>16.2f}x"
                 if "teacher_forward_p50_s" in row else "")
        print(f"{row['variant']:<12}{row['p20_s']:>8.3f}{row['p50_s']:>8.3f}{row['p80_s']:>8.3f}{row['samples_per_s']:>11.2f}"
              f"{row['tokens_per_s']:>10.0f}{row['peak_bytes'] / 2**20:>10.1f}{row['vs_plain']:>9.2f}x{extra}")
    live = {row["teachers"]: row["p50_s"] for row in rows if row["variant"].startswith("live ")}
    per_teacher_12, per_teacher_14 = live[2] - live[1], (live[4] - live[1]) / 3
    for row in rows:
        if "generation_p50_s" in row:
            print(f"cost split of {row['variant']}: generation {row['generation_p50_s']:.3f} s, teachers' bodies "
                  f"{row['teachers_p50_s']:.3f} s, student step (forward, fused loss with the teachers' output layers, "
                  f"backward, AdamW) {row['student_p50_s']:.3f} s")
    cached = next(row for row in rows if row["variant"].startswith("cached"))
    print(f"cached: {cached['vs_plain']:.2f}x plain (target <= 1.10x); live vs plain + the teachers' own forwards: "
          + ", ".join(f"K={r['teachers']} {r['vs_plain_plus_teacher_forwards']:.2f}x" for r in rows
                      if r["variant"].startswith("live "))
          + " (target <= 1.10x)")
    fitted, worst = linear_fit(live)
    print(f"step time vs K: least-squares line {fitted[0]:.3f} s + {fitted[1]:.3f} s x K; the measured p50s lie "
          f"within {worst * 100:.1f}% of it (target <= 10%); time per extra teacher {per_teacher_12:.3f} s (K 1->2) "
          f"vs {per_teacher_14:.3f} s (K 1->4 / 3)")
    rows.append({"summary": "linearity", "intercept_s": fitted[0], "per_teacher_s": fitted[1],
                 "worst_deviation_from_line": worst, "per_teacher_1_2_s": per_teacher_12, "per_teacher_1_4_s": per_teacher_14})
    emit_rows(rows, args.json)


if __name__ == "__main__":
    main()
