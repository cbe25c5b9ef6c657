"""Interpolation strategies against independent float64 formulas and hand-computed cases."""
import math

import pytest
import torch

from distill.interpolate import (available_interpolations, build_interpolation, geometric_mixture,
                                 linear_mixture, normalize_weights, teacher_log_probs)


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


@pytest.mark.parametrize("method", ["linear", "geometric"])
def test_outputs_are_normalised_distributions(method, logits):
    strategy = build_interpolation(method)
    mixed = strategy(teacher_log_probs(logits, [1.0, 2.0, 0.5]), torch.tensor([0.2, 0.5, 0.3]))
    assert mixed.shape == (5, 4)
    torch.testing.assert_close(mixed.exp().sum(-1), torch.ones(5, dtype=torch.float64))
    assert torch.all(mixed <= 1e-12)


@pytest.mark.parametrize("method", ["linear", "geometric"])
def test_single_teacher_and_one_hot_weights_reduce_to_that_teacher(method, logits):
    strategy = build_interpolation(method)
    log_probs = teacher_log_probs(logits, [2.0, 2.0, 2.0])
    torch.testing.assert_close(strategy(log_probs[:1], torch.tensor([3.0])), log_probs[0])
    torch.testing.assert_close(strategy(log_probs, torch.tensor([0.0, 1.0, 0.0])), log_probs[1])


@pytest.mark.parametrize("method", ["linear", "geometric"])
def test_gradcheck(method):
    torch.manual_seed(1)
    strategy = build_interpolation(method)
    logits = torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True)
    weights = torch.tensor([0.7, 0.3], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda z, w: strategy(teacher_log_probs(z, [1.0, 2.0]), w), (logits, weights))


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
