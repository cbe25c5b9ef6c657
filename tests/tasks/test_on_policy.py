"""On-policy distillation (distill/tasks/on_policy.py): which micro-batches, the rows built from samples,
samples equal to an independent greedy decode at a vanishing temperature, runs that log the share
and resume to the same tokens, and generation under ZeRO-3 on two ranks."""
import json
from types import SimpleNamespace

import pytest
import torch

from distill.data.lm import LMCollator, prompt_response_rows
from distill.formulas.divergences import IGNORE_INDEX
from distill.tasks.on_policy import OnPolicySampler, chooses_on_policy, prompts_of, sampled_rows
from tests.conftest import tiny_lm_config_yaml
from tests.helpers import run_cli, run_deepspeed, train_losses

PAIRS = ["data.prompt_field=prompt", "data.response_field=response", "data.max_length=24"]


def test_the_on_policy_share_follows_the_fraction_and_the_micro_step_alone():
    assert not any(chooses_on_policy(0, step, 0.0) for step in range(100))
    assert all(chooses_on_policy(0, step, 1.0) for step in range(100))
    drawn = [chooses_on_policy(7, step, 0.3) for step in range(4000)]
    assert sum(drawn) / len(drawn) == pytest.approx(0.3, abs=0.03)
    assert drawn == [chooses_on_policy(7, step, 0.3) for step in range(4000)]  # no hidden state
    assert drawn != [chooses_on_policy(8, step, 0.3) for step in range(4000)]


def test_sampled_rows_label_the_sampled_tokens_and_stop_at_the_first_eos():
    eos = 0
    rows = sampled_rows([[5, 6, 7], [8]], [[1, 2, eos, 9], [3, 4, 4, 4, 4, 4]], eos, max_length=5)
    assert rows["input_ids"] == [[5, 6, 7, 1, 2], [8, 3, 4, 4, 4]]
    assert rows["labels"] == [[IGNORE_INDEX, IGNORE_INDEX, 1, 2, eos], [3, 4, 4, 4, 4]]  # no EOS added to a cut sample


def test_prompts_are_read_back_from_collated_prompt_response_rows(tiny_lm):
    encoded = prompt_response_rows([[5, 6, 7], [8, 9]], [[1, 2], [3]], eos_id=0, max_length=16)
    collate = LMCollator(tiny_lm["tokenizer"])
    batch = collate([{"input_ids": i, "labels": l, "index": n} for n, (i, l)
                     in enumerate(zip(encoded["input_ids"], encoded["labels"]))])
    assert prompts_of(batch) == [[5, 6, 7], [8, 9]]


def test_samples_at_a_vanishing_temperature_are_the_greedy_continuation(tiny_lm):
    """The sampler's tokens against a decode written here: argmax of the full forward, token by token."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_lm["teacher_b"]).train()
    tokenizer = tiny_lm["tokenizer"]
    prompts = [tokenizer("say positive:")["input_ids"], tokenizer("say neutral: the")["input_ids"]]
    settings = SimpleNamespace(fraction=1.0, max_new_tokens=6, temperature=1e-4, top_p=1.0)
    sampler = OnPolicySampler(settings, 0, tokenizer, 24, LMCollator(tokenizer), zero_stage=0, rank=0)
    got = sampler.generate(SimpleNamespace(module=model), prompts, micro_step=3)
    assert model.training  # put back in training mode
    for prompt, continuation in zip(prompts, got):
        sequence = list(prompt)
        for _ in range(6):
            with torch.no_grad():
                following = int(model.eval()(input_ids=torch.tensor([sequence])).logits[0, -1].argmax())
            sequence.append(following)
            if following == tokenizer.eos_token_id:
                break
        expected = sequence[len(prompt):]
        assert continuation[:len(expected)] == expected


def _pairs_config(tiny_lm, run_dir, extra="deepspeed: {zero_stage: 0}"):
    config = tiny_lm_config_yaml(tiny_lm, run_dir, extra)
    config.write_text(config.read_text().replace(f"path: {tiny_lm['text']}", f"path: {tiny_lm['pairs']}"))
    return config


@pytest.mark.slow
def test_an_on_policy_run_logs_its_share_and_a_resumed_run_samples_the_same_tokens(tiny_lm, tmp_path):
    on_policy = ["training.on_policy={fraction: 0.5, max_new_tokens: 8, temperature: 1.0, top_p: 0.9}",
                 "training.log_every=1", "training.lr_schedule=constant"]  # the cut run's schedule is the whole's
    whole_dir, cut_dir = tmp_path / "whole", tmp_path / "cut"
    whole = run_cli(["train", _pairs_config(tiny_lm, whole_dir), *PAIRS, *on_policy])
    assert whole.returncode == 0, whole.stderr[-4000:]
    rows = train_losses(whole_dir)
    shares = [row["on_policy/share"] for row in rows]
    assert 0 < sum(shares) < len(shares)  # both kinds of micro-batches happened
    assert all(0 < row["on_policy/new_tokens"] <= 8 for row in rows if "on_policy/new_tokens" in row)
    assert all(row["kd"] > 0 for row in rows)
    config = _pairs_config(tiny_lm, cut_dir)
    assert run_cli(["train", config, *PAIRS, *on_policy, "training.max_steps=4"]).returncode == 0
    (cut_dir / "report.json").unlink()
    resumed = run_cli(["train", config, *PAIRS, *on_policy, "training.resume=auto"])
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    after = {row["step"]: row for row in train_losses(cut_dir)}
    for row in rows[4:]:  # the same samples after the resume point: the same losses and lengths
        again = after[row["step"]]
        for key in ("loss", "kd", "on_policy/share", "on_policy/new_tokens"):
            assert again.get(key) == row.get(key), (row["step"], key)


@pytest.mark.parametrize("overrides, message", [
    (["training.on_policy.fraction=0.5"], "training.on_policy samples continuations of prompts: set data.prompt_field"),
    (["training.on_policy.top_p=0.5"], "set with training.on_policy.fraction=0 (off)"),
    ([*PAIRS, "training.on_policy.fraction=1.5"], "training.on_policy.fraction must lie in [0, 1]"),
    ([*PAIRS, "training.on_policy.fraction=0.5", "loss.kd_alpha=0"], "on-policy micro-batches learn from the teachers"),
])
def test_on_policy_settings_are_checked_before_anything_is_written(tiny_lm, tmp_path, overrides, message):
    from tests.helpers import assert_refused_before_writing

    config = tiny_lm_config_yaml(tiny_lm, tmp_path / "run")
    if any(o.startswith("data.prompt_field") for o in overrides):
        config.write_text(config.read_text().replace(f"path: {tiny_lm['text']}", f"path: {tiny_lm['pairs']}"))
    assert_refused_before_writing(config, tmp_path / "run", overrides, message)


@pytest.mark.multirank
def test_generation_under_zero3_on_two_ranks(tiny_lm, tmp_path):
    run_dir = tmp_path / "zero3"
    config = _pairs_config(tiny_lm, run_dir, "deepspeed: {zero_stage: 3}")
    result = run_deepspeed(2, [config, *PAIRS, "training.on_policy={fraction: 1.0, max_new_tokens: 6}",
                               "training.max_steps=3", "training.log_every=1"])
    assert result.returncode == 0, (result.stdout + result.stderr)[-5000:]
    rows = train_losses(run_dir)
    assert [row["on_policy/share"] for row in rows] == [1.0, 1.0, 1.0]
    assert all(0 < row["on_policy/new_tokens"] <= 6 and row["kd"] > 0 for row in rows)
    report = json.loads((run_dir / "report.json").read_text())
    assert report["student"]["perplexity"] > 1


def _reference_divergence(name, p_log, q_log, beta):
    """float64 textbook forms over the last dim: reverse KL(q || p) and JSD_beta(p, q)."""
    p, q = p_log.exp(), q_log.exp()

    def kl(a, a_log, b_log):
        return (a * (a_log - b_log)).sum(-1)

    if name == "reverse_kl":
        return kl(q, q_log, p_log)
    m_log = torch.log(beta * p + (1 - beta) * q)
    return beta * kl(p, p_log, m_log) + (1 - beta) * kl(q, q_log, m_log)


@pytest.mark.parametrize("divergence", ["reverse_kl", "jsd"])
@pytest.mark.parametrize("method", ["linear", "geometric", "logit_mean", "confidence", "learned_gate"])
@pytest.mark.parametrize("routed", [False, True])
def test_reverse_kl_and_jsd_with_every_strategy_match_a_float64_reference(method, divergence, routed):
    """The causal-LM loss as training computes it (targets from live teachers' hidden states, the
    fused chunked loss) against float64 autograd on the same strategy's target and the textbook
    divergence, routed rows included: loss terms and the gradient on the student's hidden states."""
    from distill.formulas.token_loss import fused_token_distillation
    from distill.interpolation.strategies import available_interpolations, build_interpolation
    from distill.formulas.divergences import build_divergence
    from distill.signals.routing import Routing, Routes
    from distill.signals.sources import HiddenStateSignal, Targets

    assert sorted(["linear", "geometric", "logit_mean", "confidence", "learned_gate"]) == available_interpolations()
    torch.manual_seed(0)
    tokens, hidden, vocab, teachers, temperature, beta = 10, 6, 9, 3, 2.0, 0.3
    heads = [torch.nn.Linear(hidden, vocab, bias=False) for _ in range(teachers)]
    states = [torch.randn(tokens, hidden) for _ in range(teachers)]
    labels = torch.randint(0, vocab, (tokens,))
    labels[3] = IGNORE_INDEX
    weights, temperatures = torch.tensor([0.5, 0.3, 0.2]), torch.tensor([2.0, 1.5, 1.0])
    options = {"epochs": 5} if method == "learned_gate" else {}
    strategy = build_interpolation(method, **options)
    with torch.no_grad():
        logits = torch.stack([head(state) for head, state in zip(heads, states)])
    if method == "learned_gate":
        strategy.fit(lambda: iter([(logits, labels.clamp(min=0))]), weights.double(), temperatures.double(), seed=0)
    ensemble = SimpleNamespace(interpolation=strategy, weights=weights, temperatures=temperatures, routing=None,
                               on_nonfinite="stop", names=["a", "b", "c"])
    signal = HiddenStateSignal(states, heads)
    route_rows = torch.tensor([0, 1, 0, 0, 1, 1, 0, 1, 0, 1])
    cover = torch.tensor([[True, True, True], [False, True, True]])
    if routed:  # route 0: all three teachers; route 1: b and c, with a strategy of its own
        ensemble.routing = Routing(Routes("domain", ["x", "y"], cover, "refuse"),
                                   lambda: build_interpolation(method, **options), weights.tolist(), ensemble.names)
        if method == "learned_gate":  # each route's gate fitted over its own teachers
            for route in (0, 1):
                ensemble.routing.fit_route(route, lambda: iter([(logits, labels.clamp(min=0))]), temperatures, seed=0)
        signal.route_rows = route_rows
    student_hidden = torch.randn(tokens, hidden, requires_grad=True)
    student_head = torch.randn(vocab, hidden) * 0.5
    targets = Targets(ensemble, signal, labels, labels != IGNORE_INDEX, weights, temperatures, streamed=False)
    terms = fused_token_distillation(student_hidden, student_head, labels, targets, kd_alpha=0.7,
                                     temperature=temperature, label_smoothing=0.1,
                                     divergence=build_divergence(divergence, jsd_beta=beta), chunk_size=4)
    terms.total.backward()

    hidden64 = student_hidden.detach().double().requires_grad_(True)
    student_logits = hidden64 @ student_head.double().t()
    if routed:
        target = torch.empty(tokens, vocab, dtype=torch.float64)
        for route in (0, 1):
            rows, chosen = route_rows == route, cover[route].nonzero().squeeze(-1)
            w = ensemble.routing.weights[route][chosen].double()
            target[rows] = ensemble.routing.strategies[route](logits.double()[chosen][:, rows], w / w.sum(),
                                                              temperatures.double()[chosen], labels[rows])
    else:
        target = strategy(logits.double(), weights.double(), temperatures.double(), labels)
    valid = labels != IGNORE_INDEX
    student_t = torch.log_softmax(student_logits / temperature, dim=-1)
    kd = temperature ** 2 * _reference_divergence(divergence, target, student_t, beta)[valid].sum()
    log_probs = torch.log_softmax(student_logits, dim=-1)
    ce = (-(0.9 * log_probs.gather(-1, labels.clamp(min=0)[:, None]).squeeze(-1) + 0.1 * log_probs.mean(-1)))[valid].sum()
    normalizer = int(valid.sum())
    total = (0.7 * kd + 0.3 * ce) / normalizer
    total.backward()
    assert float(terms.kd) == pytest.approx(float(kd.detach()) / normalizer, rel=1e-4)
    assert float(terms.total.detach()) == pytest.approx(float(total.detach()), rel=1e-4)
    assert torch.allclose(student_hidden.grad.double(), hidden64.grad, atol=1e-5)


def test_on_policy_samples_are_scored_by_their_routes_teachers(tiny_lm, tmp_path):
    """Routing and on-policy together: every micro-batch is the student's own samples, and the KD
    term is logged per route (each row's target from its route's teachers)."""
    rows = [json.loads(line) for line in tiny_lm["pairs"].read_text().splitlines()]
    data = tmp_path / "routed_pairs.jsonl"
    data.write_text("".join(json.dumps({**row, "domain": "praise" if "positive" in row["prompt"] else "other"}) + "\n"
                            for row in rows), encoding="utf-8")
    run_dir = tmp_path / "run"
    config = _pairs_config(tiny_lm, run_dir)
    text = config.read_text().replace(str(tiny_lm["pairs"]), str(data))
    text = text.replace("temperature: 2.0}", "temperature: 2.0, routes: [praise, other]}")
    text = text.replace("temperature: 1.5}", "temperature: 1.5, routes: [praise]}")
    config.write_text(text.replace("teachers:\n", "teachers:\n  route_by: domain\n", 1))
    result = run_cli(["train", config, *PAIRS, "training.on_policy={fraction: 1.0, max_new_tokens: 6}",
                      "training.max_steps=2", "training.log_every=1", "loss.divergence=reverse_kl"])
    assert result.returncode == 0, result.stderr[-4000:]
    for row in train_losses(run_dir):
        assert row["on_policy/share"] == 1.0 and row["route/praise/kd"] > 0 and row["route/other/kd"] > 0
