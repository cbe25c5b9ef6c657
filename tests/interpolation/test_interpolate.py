"""Interpolation strategies (interpolation/strategies.py) and their formulas (formulas/mixtures.py) against independent
float64 formulas and hand-computed cases."""
import math

import pytest
import torch

from distill.interpolation.strategies import available_interpolations, build_interpolation
from distill.formulas.mixtures import geometric_mixture, linear_mixture, normalize_weights, teacher_log_probs


def _reference_linear(logits, weights, temperatures):
    """p[b, c] = sum_k w_k softmax(z_k[b] / T_k)[c], written out with explicit loops."""
    K, B, C = logits.shape
    weights = [w / sum(weights) for w in weights]
    out = torch.zeros(B, C, dtype=torch.float64)
    for k in range(K):
        for b in range(B):
            exps = [math.exp(logits[k, b, c].item() / temperatures[k]) for c in range(C)]
            total = sum(exps)
            for c in range(C):
                out[b, c] += weights[k] * exps[c] / total
    return out


def _reference_geometric(logits, weights, temperatures):
    K, B, C = logits.shape
    weights = [w / sum(weights) for w in weights]
    out = torch.zeros(B, C, dtype=torch.float64)
    for b in range(B):
        scores = []
        for c in range(C):
            score = 0.0
            for k in range(K):
                log_z = math.log(sum(math.exp(logits[k, b, j].item() / temperatures[k]) for j in range(C)))
                score += weights[k] * (logits[k, b, c].item() / temperatures[k] - log_z)
            scores.append(math.exp(score))
        for c in range(C):
            out[b, c] = scores[c] / sum(scores)
    return out


@pytest.fixture
def logits():
    torch.manual_seed(0)
    return torch.randn(3, 5, 4, dtype=torch.float64) * 3


def test_linear_matches_float64_reference(logits):
    weights, temperatures = [0.5, 0.3, 0.2], [1.0, 2.0, 4.0]
    mixed = linear_mixture(teacher_log_probs(logits, temperatures), torch.tensor(weights))
    torch.testing.assert_close(mixed.exp(), _reference_linear(logits, weights, temperatures))


def test_geometric_matches_float64_reference(logits):
    weights, temperatures = [2.0, 1.0, 1.0], [1.5, 1.0, 3.0]  # unnormalised on purpose
    mixed = geometric_mixture(teacher_log_probs(logits, temperatures), torch.tensor(weights))
    torch.testing.assert_close(mixed.exp(), _reference_geometric(logits, weights, temperatures))


def test_hand_computed_two_class_case():
    # Teacher 1 says [0.5, 0.5] (equal logits), teacher 2 says [1/(1+e^2), e^2/(1+e^2)].
    logits = torch.tensor([[[0.0, 0.0]], [[0.0, 2.0]]], dtype=torch.float64)
    log_probs = teacher_log_probs(logits, [1.0, 1.0])
    p2 = math.exp(2) / (1 + math.exp(2))
    linear = linear_mixture(log_probs, torch.tensor([0.5, 0.5])).exp()
    torch.testing.assert_close(linear, torch.tensor([[0.5 * 0.5 + 0.5 * (1 - p2), 0.5 * 0.5 + 0.5 * p2]], dtype=torch.float64))
    # geometric: sqrt(0.5 * q_c) normalised, which equals softmax of the averaged logits [0, 1]
    geometric = geometric_mixture(log_probs, torch.tensor([0.5, 0.5])).exp()
    expected = torch.tensor([[1 / (1 + math.e), math.e / (1 + math.e)]], dtype=torch.float64)
    torch.testing.assert_close(geometric, expected)


def _strategy(method):
    strategy = build_interpolation(method)
    if method == "learned_gate":  # an untrained (random) gate is still a valid strategy
        torch.manual_seed(0)
        strategy.build(num_teachers=3, num_classes=4).double()
    return strategy


ALL = ["linear", "geometric", "logit_mean", "confidence", "learned_gate"]


def test_every_registered_strategy_is_tested_here():
    assert sorted(ALL) == available_interpolations()


@pytest.mark.parametrize("method", ALL)
def test_outputs_are_normalised_distributions(method, logits):
    labels = torch.tensor([0, 3, -100, 1, 2])
    mixed = _strategy(method)(logits, torch.tensor([0.2, 0.5, 0.3]), torch.tensor([1.0, 2.0, 0.5]), labels)
    assert mixed.shape == (5, 4)
    torch.testing.assert_close(mixed.exp().sum(-1), torch.ones(5, dtype=torch.float64))
    assert torch.all(mixed <= 1e-12)


@pytest.mark.parametrize("method", ALL)
def test_single_teacher_reduces_to_that_teacher(method, logits):
    strategy = build_interpolation(method)
    if method == "learned_gate":
        strategy.build(num_teachers=1, num_classes=4).double()
    expected = torch.log_softmax(logits[:1] / 2.0, -1)[0]
    torch.testing.assert_close(strategy(logits[:1], torch.tensor([3.0]), torch.tensor([2.0])), expected)


@pytest.mark.parametrize("method", ["linear", "geometric", "logit_mean"])
def test_one_hot_weights_reduce_to_that_teacher(method, logits):
    temperatures = torch.tensor([2.0, 2.0, 2.0])
    mixed = build_interpolation(method)(logits, torch.tensor([0.0, 1.0, 0.0]), temperatures)
    torch.testing.assert_close(mixed, torch.log_softmax(logits[1] / 2.0, -1))


@pytest.mark.parametrize("method", ALL)
def test_gradcheck(method):
    torch.manual_seed(1)
    strategy = _strategy(method)
    if method == "learned_gate":
        strategy.build(num_teachers=2, num_classes=4).double()
    logits = torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True)
    weights = torch.tensor([0.7, 0.3], dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([1, -100, 3])
    assert torch.autograd.gradcheck(lambda z, w: strategy(z, w, torch.tensor([1.0, 2.0]), labels), (logits, weights))


def test_logit_mean_matches_formula(logits):
    weights = torch.tensor([0.5, 0.25, 0.25], dtype=torch.float64)
    temperatures = torch.tensor([2.0, 2.0, 4.0], dtype=torch.float64)
    mixed = build_interpolation("logit_mean")(logits, weights, temperatures)
    expected = torch.log_softmax((0.5 * logits[0] + 0.25 * logits[1] + 0.25 * logits[2]) / 2.5, -1)
    torch.testing.assert_close(mixed, expected)


def test_confidence_gives_less_weight_to_a_confidently_wrong_teacher():
    # sample 0: gold 0; teacher A is right (0.9 on class 0), teacher B confidently wrong (0.95 on 1)
    probs = torch.tensor([[[0.9, 0.05, 0.05]], [[0.025, 0.95, 0.025]]], dtype=torch.float64)
    strategy = build_interpolation("confidence", sharpness=0.1)
    weights = strategy.sample_weights(probs.log(), torch.tensor([0.5, 0.5]), torch.tensor([0]))
    assert weights[0, 0] > 0.99 and weights[1, 0] < 0.01
    # hand formula: softmax over teachers of p_k[y] / sharpness
    expected = torch.softmax(torch.tensor([0.9, 0.025], dtype=torch.float64) / 0.1, 0)
    torch.testing.assert_close(weights[:, 0], expected)
    # without a label the score is negative entropy: B (more certain) gets more weight
    unlabelled = strategy.sample_weights(probs.log(), torch.tensor([0.5, 0.5]), torch.tensor([-100]))
    assert unlabelled[1, 0] > unlabelled[0, 0]


def test_confidence_prior_weights_multiply():
    logits = torch.zeros(2, 1, 3, dtype=torch.float64)  # equal confidence: weights follow the prior
    weights = build_interpolation("confidence").sample_weights(logits, torch.tensor([3.0, 1.0]))
    torch.testing.assert_close(weights[:, 0], torch.tensor([0.75, 0.25], dtype=torch.float64))


def test_learned_gate_state_round_trip(logits):
    strategy = _strategy("learned_gate")
    again = build_interpolation("learned_gate")
    again.load_state_dict(strategy.state_dict())
    args = (logits.float(), torch.ones(3), torch.ones(3))
    strategy.gate.float()
    torch.testing.assert_close(again(*args), strategy(*args))
    with pytest.raises(RuntimeError, match="has not been fitted"):
        build_interpolation("learned_gate")(*args)


def test_per_sample_weights_match_row_by_row(logits):
    log_probs = teacher_log_probs(logits, [1.0, 1.0, 1.0])
    per_sample = torch.rand(3, 5, dtype=torch.float64) + 0.1
    mixed = linear_mixture(log_probs, per_sample)
    for b in range(5):
        torch.testing.assert_close(mixed[b], linear_mixture(log_probs[:, b], per_sample[:, b]))


def test_temperature_softens_each_teacher_separately():
    logits = torch.tensor([[[0.0, 4.0]], [[0.0, 4.0]]], dtype=torch.float64)
    log_probs = teacher_log_probs(logits, [1.0, 4.0])
    torch.testing.assert_close(log_probs[0].exp(), torch.softmax(torch.tensor([[0.0, 4.0]], dtype=torch.float64), -1))
    torch.testing.assert_close(log_probs[1].exp(), torch.softmax(torch.tensor([[0.0, 1.0]], dtype=torch.float64), -1))


def test_bad_weights_are_refused():
    with pytest.raises(ValueError, match=">= 0"):
        normalize_weights([0.5, -0.1])
    with pytest.raises(ValueError, match="sum to zero"):
        normalize_weights([0.0, 0.0])


def test_registry_lists_and_rejects_names():
    assert {"linear", "geometric"} <= set(available_interpolations())
    with pytest.raises(KeyError, match="unknown interpolation 'nope'"):
        build_interpolation("nope")


def test_linear_mixture_equals_logsumexp_also_where_the_probability_underflows():
    """The fast path sums probabilities; entries below float32's smallest normal number go back to
    log space, so -200 nats stays -200 nats (not -inf), and gradients still flow to the weights."""
    generator = torch.Generator().manual_seed(11)
    log_probs = torch.log_softmax(torch.randn(3, 4, 50, generator=generator) * 4, dim=-1).float()
    log_probs[:, 0, 7] = torch.tensor([-200.0, -210.0, -190.0])  # underflows exp() in float32
    log_probs[1, 2, :] = float("-inf")  # a teacher with no mass on a whole row is fine in a mixture
    log_probs[1, 2, 0] = 0.0
    weights = torch.tensor([0.5, 0.3, 0.2], requires_grad=True)
    mixed = linear_mixture(log_probs, weights)
    expected = torch.logsumexp(weights.detach().double().log()[:, None, None] + log_probs.double(), dim=0)
    torch.testing.assert_close(mixed.double(), expected, rtol=1e-6, atol=1e-5)
    assert mixed[0, 7].item() == pytest.approx(expected[0, 7].item(), abs=1e-3)
    mixed[:, :5].sum().backward()
    assert torch.isfinite(weights.grad).all() and weights.grad.abs().sum() > 0
    only_one = linear_mixture(log_probs, torch.tensor([0.0, 1.0, 0.0]))
    assert torch.equal(only_one, log_probs[1])  # one teacher holding all the weight is that teacher


@pytest.mark.parametrize("weights", [(0.5, 0.3, 0.2), (0.0, 0.4, 0.6), (0.0, 0.0, 1.0)])
def test_in_place_linear_mixture_probabilities_equal_the_log_space_mixture(weights):
    from distill.formulas.mixtures import linear_mixture_probs_

    generator = torch.Generator().manual_seed(12)
    logits = torch.randn(3, 4, 30, generator=generator, dtype=torch.float64) * 3
    temperatures = torch.tensor([2.0, 1.0, 0.5], dtype=torch.float64)
    expected = linear_mixture(teacher_log_probs(logits, temperatures), torch.tensor(weights)).exp()
    got = linear_mixture_probs_(logits.clone(), torch.tensor(weights), temperatures)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-15)


def test_softmax_with_entropy_equals_the_float64_formula_and_flags_non_finite_rows():
    """One teacher's target and its sum p log p without a log pass over [c, V] (the live causal-LM
    path with a single teacher); a NaN or inf logit must turn its row's entropy into NaN, since
    that is the only check the caller gets there."""
    from distill.formulas.mixtures import softmax_with_entropy_

    logits = torch.randn(6, 40, generator=torch.Generator().manual_seed(3)) * 4
    logits[2, :30] -= 200.0  # entries that underflow to p = 0
    expected_p = torch.softmax(logits.double(), dim=-1)
    expected = (expected_p * torch.log_softmax(logits.double(), dim=-1)).sum(dim=-1)
    probs, neg_entropy = softmax_with_entropy_(logits.clone(), torch.empty_like(logits))
    torch.testing.assert_close(probs.double(), expected_p, rtol=1e-5, atol=1e-30)
    torch.testing.assert_close(neg_entropy.double(), expected, rtol=1e-6, atol=1e-6)
    broken = logits.clone()
    broken[1, 5], broken[3, 0], broken[4, 9] = float("nan"), float("inf"), float("-inf")
    _, flagged = softmax_with_entropy_(broken, torch.empty_like(broken))
    assert torch.isnan(flagged[[1, 3, 4]]).all() and torch.isfinite(flagged[[0, 2, 5]]).all()
