"""Fitting on validation data: EM, simplex-convex geometric weights, temperatures, the gate, ECE."""

import pytest
import torch

from distill.formulas.fits import (expected_calibration_error, fit_gate, fit_geometric_weights, fit_linear_weights_em,
                             fit_temperature, gold_log_probs)
from distill.interpolation.strategies import build_interpolation
from distill.formulas.mixtures import geometric_mixture, linear_mixture


def _mixture_data(true_weights, samples=20000, classes=5, seed=0):
    """Labels drawn from sum_k w*_k p_k(.|n), with per-sample teacher distributions p_k."""
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(len(true_weights), samples, classes, generator=generator, dtype=torch.float64) * 2.5
    log_probs = torch.log_softmax(logits, -1)
    mixture = linear_mixture(log_probs, torch.tensor(true_weights, dtype=torch.float64)).exp()
    labels = torch.multinomial(mixture, 1, generator=generator).squeeze(1)
    return logits, log_probs, labels


@pytest.mark.parametrize("true_weights", [[0.7, 0.3], [0.5, 0.3, 0.2]])
def test_em_recovers_true_mixture_weights_and_never_lowers_likelihood(true_weights):
    _, log_probs, labels = _mixture_data(true_weights)
    result = fit_linear_weights_em(log_probs, labels)
    assert torch.allclose(result.weights, torch.tensor(true_weights, dtype=torch.float64), atol=0.03), result.weights
    trace = result.log_likelihoods
    assert all(later >= earlier - 1e-12 for earlier, later in zip(trace, trace[1:]))
    assert result.iterations >= 2 and trace[-1] > trace[0]


def test_geometric_fit_matches_a_grid_search():
    generator = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 3000, 4, generator=generator, dtype=torch.float64)
    labels = torch.argmax(logits[0] + 0.5 * torch.randn(3000, 4, generator=generator, dtype=torch.float64), -1)
    log_probs = torch.log_softmax(logits, -1)
    fitted = fit_geometric_weights(log_probs, labels)

    def nll(w):
        mixed = geometric_mixture(log_probs, torch.tensor([w, 1 - w], dtype=torch.float64))
        return float(-mixed.gather(-1, labels[:, None]).mean())

    grid = [i / 1000 for i in range(1001)]
    best = min(grid, key=nll)
    assert abs(float(fitted[0]) - best) < 0.005
    assert nll(float(fitted[0])) <= nll(0.5) + 1e-12
    assert torch.isclose(fitted.sum(), torch.tensor(1.0, dtype=torch.float64)) and torch.all(fitted >= 0)


def test_temperature_scaling_finds_the_nll_minimum():
    generator = torch.Generator().manual_seed(2)
    true = torch.randn(4000, 3, generator=generator, dtype=torch.float64)
    labels = torch.multinomial(torch.softmax(true, -1), 1, generator=generator).squeeze(1)
    overconfident = true * 3.0  # the right temperature is about 3
    temperature = fit_temperature(overconfident, labels)
    grid = torch.linspace(1.0, 6.0, 501, dtype=torch.float64)
    nlls = [float(torch.nn.functional.cross_entropy(overconfident / t, labels)) for t in grid]
    assert abs(temperature - float(grid[int(torch.tensor(nlls).argmin())])) < 0.02
    assert 2.5 < temperature < 3.5


def test_learned_gate_beats_the_uniform_mix_when_the_right_teacher_depends_on_the_input():
    """Half the samples: teacher A is sharp and right, B is sharp and wrong; the other half the
    reverse. Only a per-sample gate can pick the right one; a fixed mix cannot."""
    generator = torch.Generator().manual_seed(3)

    def make(samples):
        labels = torch.randint(0, 4, (samples,), generator=generator)
        wrong = (labels + torch.randint(1, 4, (samples,), generator=generator)) % 4
        a_right = torch.rand(samples, generator=generator) < 0.5
        sharp_right = torch.nn.functional.one_hot(labels, 4).double() * 4.0
        sharp_wrong = torch.nn.functional.one_hot(wrong, 4).double() * 2.0 + 0.3 * torch.randn(samples, 4, generator=generator, dtype=torch.float64)
        a = torch.where(a_right[:, None], sharp_right, sharp_wrong)
        b = torch.where(a_right[:, None], sharp_wrong, sharp_right)
        return torch.stack([a, b]), labels

    train_logits, train_labels = make(4000)
    test_logits, test_labels = make(4000)
    gate = fit_gate(torch.log_softmax(train_logits, -1), train_labels, epochs=300, seed=0)
    strategy = build_interpolation("learned_gate")
    strategy.load_state_dict(gate.state_dict())
    ones = torch.ones(2)
    gated = strategy(test_logits.float(), ones, ones)
    uniform = build_interpolation("linear")(test_logits.float(), ones, ones)

    def nll(log_probs):
        return float(-log_probs.gather(-1, test_labels[:, None]).mean())

    assert nll(gated) < 0.5 * nll(uniform), (nll(gated), nll(uniform))


def test_expected_calibration_error_hand_case():
    # two samples at confidence 0.8 (one right, one wrong) and two at 0.6 (both right)
    probs = torch.tensor([[0.8, 0.2], [0.8, 0.2], [0.6, 0.4], [0.6, 0.4]], dtype=torch.float64)
    labels = torch.tensor([0, 1, 0, 0])
    # bins: |0.5 - 0.8| * 2/4 + |1.0 - 0.6| * 2/4 = 0.15 + 0.2
    assert expected_calibration_error(probs.log(), labels) == pytest.approx(0.35)


def test_gold_log_probs_picks_the_label_column():
    log_probs = torch.log_softmax(torch.randn(2, 3, 4), -1)
    labels = torch.tensor([3, 0, 2])
    gold = gold_log_probs(log_probs, labels)
    assert gold.shape == (2, 3) and gold[1, 2] == log_probs[1, 2, 2]


@pytest.mark.parametrize("method", ["linear", "geometric"])
def test_joint_fit_is_never_worse_than_the_sequential_fit(method):
    from distill.formulas.fits import fit_jointly
    from distill.formulas.mixtures import teacher_log_probs

    generator = torch.Generator().manual_seed(4)
    true = torch.randn(2, 3000, 4, generator=generator, dtype=torch.float64)
    labels = torch.multinomial(torch.softmax(true[0] + true[1], -1), 1, generator=generator).squeeze(1)
    logits = true * torch.tensor([3.0, 0.5], dtype=torch.float64).reshape(2, 1, 1)  # mis-calibrated teachers
    temperatures = torch.tensor([fit_temperature(logits[k], labels) for k in range(2)], dtype=torch.float64)
    sequential = fit_linear_weights_em(teacher_log_probs(logits, temperatures), labels).weights
    weights, joint_temperatures = fit_jointly(logits, labels, method, sequential, temperatures)

    def nll(w, t):
        mix = linear_mixture if method == "linear" else geometric_mixture
        return float(-mix(teacher_log_probs(logits, t), w).gather(-1, labels[:, None]).mean())

    assert nll(weights, joint_temperatures) <= nll(sequential, temperatures) + 1e-12
    assert torch.isclose(weights.sum(), torch.tensor(1.0, dtype=torch.float64)) and torch.all(joint_temperatures > 0)


def test_one_temperature_bound_for_the_single_and_the_joint_fit():
    """On labels that ignore the logits the best temperature is infinite: the single fit stops at
    the documented bound, the joint fit (unbounded before: it reached T = 2313) stays inside it,
    and both say that the bound binds."""
    from distill.formulas.fits import TEMPERATURE_BOUNDS, at_bound, fit_jointly

    generator = torch.Generator().manual_seed(7)
    logits = torch.randn(2, 2000, 5, generator=generator, dtype=torch.float64) * 3
    labels = torch.randint(0, 5, (2000,), generator=generator)
    single = fit_temperature(logits[0], labels)
    assert single == TEMPERATURE_BOUNDS[1] and at_bound(single)
    weights, temperatures = fit_jointly(logits, labels, "linear", torch.tensor([0.5, 0.5]), torch.tensor([2.0, 2.0]))
    assert torch.all(temperatures <= TEMPERATURE_BOUNDS[1] * (1 + 1e-9))
    assert torch.all(temperatures >= TEMPERATURE_BOUNDS[0])
    assert any(at_bound(float(t)) for t in temperatures)
    sharp = torch.nn.functional.one_hot(labels, 5).double() * 50  # always right: wants T -> 0
    assert fit_temperature(sharp, labels) == TEMPERATURE_BOUNDS[0]


@pytest.mark.parametrize("chunk", [7, 64, 5000])
def test_streamed_fits_equal_the_fits_over_one_chunk(chunk):
    """Every fit reads its data as chunks (a causal LM's validation tokens); the result must not
    depend on how the rows are cut: EM, the geometric Newton fit, temperatures and the joint fit."""
    from distill.formulas.fits import (fit_geometric_weights_streamed, fit_jointly_streamed, fit_temperature_streamed,
                                 gold_log_probs_over, in_memory)

    generator = torch.Generator().manual_seed(8)
    logits = torch.randn(3, 600, 11, generator=generator, dtype=torch.float64) * torch.tensor([2.0, 1.0, 0.5]).reshape(3, 1, 1)
    labels = torch.multinomial(torch.softmax(logits.sum(0), -1), 1, generator=generator).squeeze(1)

    def chunks():
        for start in range(0, 600, chunk):
            yield logits[:, start:start + chunk], labels[start:start + chunk]

    whole = in_memory(logits, labels)
    temperatures = torch.tensor([1.0, 1.5, 0.7], dtype=torch.float64)
    torch.testing.assert_close(gold_log_probs_over(chunks, temperatures), gold_log_probs_over(whole, temperatures))
    torch.testing.assert_close(fit_geometric_weights_streamed(chunks, temperatures),
                               fit_geometric_weights_streamed(whole, temperatures), rtol=1e-8, atol=1e-10)
    assert fit_temperature_streamed(chunks, 1) == pytest.approx(fit_temperature_streamed(whole, 1), rel=1e-9)
    start = torch.tensor([0.4, 0.3, 0.3], dtype=torch.float64)
    for a, b in zip(fit_jointly_streamed(chunks, "geometric", start, temperatures, iterations=20),
                    fit_jointly_streamed(whole, "geometric", start, temperatures, iterations=20)):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-8)


def test_geometric_newton_fit_finds_the_simplex_minimum_a_grid_finds():
    """The geometric fit against an independent reference: the float64 NLL on a fine grid of the
    2-simplex (three teachers), refined around its best point."""
    from distill.formulas.fits import fit_geometric_weights_streamed, in_memory

    generator = torch.Generator().manual_seed(9)
    logits = torch.randn(3, 400, 6, generator=generator, dtype=torch.float64) * torch.tensor([2.0, 1.0, 0.3]).reshape(3, 1, 1)
    labels = torch.multinomial(torch.softmax(logits[0] + 0.5 * logits[1], -1), 1, generator=generator).squeeze(1)
    log_probs = torch.log_softmax(logits, -1)

    def nll(w):
        return float(-geometric_mixture(log_probs, w).gather(-1, labels[:, None]).mean())

    fitted = fit_geometric_weights_streamed(in_memory(logits, labels), torch.ones(3, dtype=torch.float64))
    best, best_nll, step = None, float("inf"), 0.02
    for i in range(51):
        for j in range(51 - i):
            w = torch.tensor([i, j, 50 - i - j], dtype=torch.float64) / 50
            value = nll(w)
            if value < best_nll:
                best, best_nll = w, value
    assert nll(fitted) <= best_nll + 1e-12  # at least as good as the best grid point
    assert (fitted - best).abs().max() <= step + 1e-9  # and next to it
