"""What each teacher cache store costs in accuracy, against the exact target: top-k (each teacher's
top k plus the tail mass spread evenly over the other tokens), sampled (N draws per token at the
temperature, with counts: unbiased) at the same bytes as top-k with k = N, and hidden (the last
hidden states in bf16 times the fp32 output layer), as `distill cache --store topk|sampled|hidden`
stores them.

    python benchmarks/topk_effect.py CONFIG [--blocks 32] [--k 8 32 64 256 1024] [--temperature 1 2]

On the config's validation blocks, for the config's teachers (linear interpolation with their
weights) and its student's initial weights (`student_init/` of a finished run, or the student's
source), per k and temperature T:
  target TV     mean per token total variation 1/2 sum |p - p_topk| between the exact and the top-k
                target (bounded in [0, 1]; a KL from the exact target would be infinite wherever the
                top k hold all the mass to float precision and the tail gets none)
  KD loss       T^2 KL(target || student_T) with the top-k target, relative to the exact one
  grad cosine   cosine between the KD gradients with respect to the student's logits
  grad error    ||g - g_exact|| / ||g_exact|| of that gradient (top-k: a bias; sampled: noise of one
                draw set, whose mean over draws is g_exact)
  mass          mean probability mass the teachers' top k hold (T = 1)
  bytes/token   per teacher: top-k and sampled 8 k (int32 id + float32 value), hidden 2 H (bf16),
                dense logits 4 V
Prints a table and JSON rows; runs offline on CPU in a minute or two for SmolLM2-135M.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config")
    parser.add_argument("--blocks", type=int, default=32)
    parser.add_argument("--k", type=int, nargs="+", default=[8, 32, 64, 256, 1024])
    parser.add_argument("--temperature", type=float, nargs="+", default=[1.0, 2.0])
    parser.add_argument("--student", default=None, help="student weights (default: <output_dir>/student_init)")
    parser.add_argument("--teachers", nargs="+", default=None, help="only these teachers (by name)")
    args = parser.parse_args()

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from distill.caches.lm_stores import sampled_of, top_k_of
    from distill.formulas.mixtures import topk_target_log_probs
    from distill.data.lm import encode_lm, read_lm_splits
    from distill.config.schema import load_config
    from distill.interpolation.strategies import build_interpolation
    from distill.formulas.divergences import IGNORE_INDEX, kl_divergence
    from distill.util.paths import resolve_path

    cfg = load_config(args.config)
    student_path = Path(args.student) if args.student else Path(resolve_path(cfg.output_dir)) / "student_init"
    tokenizer = AutoTokenizer.from_pretrained(student_path)
    blocks = encode_lm(read_lm_splits(cfg.data).validation, tokenizer, cfg.data, "validation")
    blocks = blocks.select(range(min(args.blocks, len(blocks))))
    ids = torch.tensor(blocks["input_ids"])
    labels = torch.tensor(blocks["labels"]).reshape(-1)
    valid = labels != IGNORE_INDEX
    chosen = [t for t in cfg.teachers.models if args.teachers is None or t.name in args.teachers]
    teachers = [AutoModelForCausalLM.from_pretrained(resolve_path(t.path), dtype=torch.float32).eval() for t in chosen]
    student = AutoModelForCausalLM.from_pretrained(student_path, dtype=torch.float32).eval()
    weights = torch.tensor([t.weight for t in chosen])
    interpolation = build_interpolation("linear")
    with torch.no_grad():
        teacher_logits = torch.stack([m(input_ids=ids).logits.reshape(-1, m.config.vocab_size)[valid] for m in teachers])
        student_logits = student(input_ids=ids).logits.reshape(-1, student.config.vocab_size)[valid]
        # the hidden store: final hidden states rounded to bf16, times each teacher's fp32 output layer
        hidden_logits = []
        for model in teachers:
            states = model.get_decoder()(input_ids=ids).last_hidden_state.reshape(-1, model.config.hidden_size)[valid]
            hidden_logits.append(model.get_output_embeddings()(states.bfloat16().float()))
        hidden_logits = torch.stack(hidden_logits)
    vocab = teacher_logits.shape[-1]
    width = max(m.config.hidden_size for m in teachers)
    log_p = torch.log_softmax(teacher_logits, dim=-1)  # what the cache stores is at T = 1
    generator = torch.Generator().manual_seed(0)
    rows = []

    def compare(store, k, temperature, approx, exact_loss, exact_grad, mass, stored_bytes):
        logits = student_logits.clone().requires_grad_(True)
        loss = temperature ** 2 * kl_divergence(approx, torch.log_softmax(logits / temperature, dim=-1)).mean()
        (grad,) = torch.autograd.grad(loss, [logits])
        cosine = torch.nn.functional.cosine_similarity(grad.double().reshape(1, -1),
                                                       exact_grad.double().reshape(1, -1)).item()
        error = ((grad.double() - exact_grad.double()).norm() / exact_grad.double().norm()).item()
        rows.append({"store": store, "k": k, "temperature": temperature, "tokens": int(valid.sum()), "vocab": vocab,
                     "bytes_per_token": stored_bytes, "target_tv": 0.5 * (exact.exp() - approx.exp()).abs().sum(-1).mean().item(),
                     "kd_loss_exact": exact_loss.item(), "kd_loss_store": loss.item(),
                     "kd_loss_ratio": loss.item() / exact_loss.item(), "grad_cosine": cosine, "grad_rel_error": error,
                     "top_k_mass": mass})

    for temperature in args.temperature:
        temps = torch.full((len(teachers),), temperature)
        exact = interpolation(teacher_logits, weights, temps)
        logits = student_logits.clone().requires_grad_(True)
        student_t = torch.log_softmax(logits / temperature, dim=-1)
        exact_loss = temperature ** 2 * kl_divergence(exact, student_t).mean()
        (exact_grad,) = torch.autograd.grad(exact_loss, [logits])
        for k in args.k:
            top_ids, top_values, tail = zip(*(top_k_of(lp, k) for lp in log_p))
            rebuilt = topk_target_log_probs(torch.stack(top_ids).long(), torch.stack(top_values), vocab, torch.stack(tail))
            mass = torch.stack(top_values).exp().sum(-1).mean().item()
            compare("topk", k, temperature, interpolation(rebuilt, weights, temps), exact_loss, exact_grad, mass, 8 * k)
            # sampled: drawn at the temperature, so mixed untempered (as training reads such a store)
            drawn = [sampled_of(z, temperature, k, generator) for z in teacher_logits]
            rebuilt = topk_target_log_probs(torch.stack([d[0] for d in drawn]).long(), torch.stack([d[1] for d in drawn]),
                                            vocab, torch.stack([d[2] for d in drawn]))
            compare("sampled", k, temperature, interpolation(rebuilt, weights, torch.ones_like(temps)), exact_loss,
                    exact_grad, float("nan"), 8 * k)
        compare("hidden bf16", 0, temperature, interpolation(hidden_logits, weights, temps), exact_loss, exact_grad,
                1.0, 2 * width)
    print(f"{len(teachers)} teacher(s), {int(valid.sum())} validation tokens, V = {vocab}, student {student_path}; "
          f"dense logits: {4 * vocab} bytes per token and teacher")
    print(f"{'store':>12}{'T':>4}{'k/N':>6}{'bytes':>7}{'target TV':>11}{'KD loss':>9}{'vs exact':>10}{'grad cos':>10}"
          f"{'grad err':>10}")
    for row in rows:
        print(f"{row['store']:>12}{row['temperature']:>4.1f}{row['k']:>6}{row['bytes_per_token']:>7}{row['target_tv']:>11.4f}"
              f"{row['kd_loss_store']:>9.4f}{row['kd_loss_ratio']:>9.4f}x{row['grad_cosine']:>10.5f}"
              f"{row['grad_rel_error']:>10.4f}")
    for row in rows:
        print(json.dumps(row))


if __name__ == "__main__":
    main()
