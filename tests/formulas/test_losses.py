"""Losses against float64 references, torch's own cross-entropy, and gradcheck; the T^2 factor."""
import math

import pytest
import torch
import torch.nn.functional as F

from distill.formulas.divergences import (IGNORE_INDEX, distillation_loss, kl_divergence, label_smoothed_cross_entropy,
                            per_teacher_kl)


def test_kl_matches_hand_computed_value():
    target = torch.tensor([[0.25, 0.75]], dtype=torch.float64)
    student = torch.tensor([[0.5, 0.5]], dtype=torch.float64)
    expected = 0.25 * math.log(0.25 / 0.5) + 0.75 * math.log(0.75 / 0.5)
    torch.testing.assert_close(kl_divergence(target.log(), student.log()), torch.tensor([expected], dtype=torch.float64))


def test_kl_with_zero_target_mass_is_finite():
    target = torch.tensor([[0.0, 1.0]], dtype=torch.float64).log()
    student = torch.tensor([[0.3, 0.7]], dtype=torch.float64).log()
    torch.testing.assert_close(kl_divergence(target, student), torch.tensor([-math.log(0.7)], dtype=torch.float64))


def test_precision_drift_figure_is_kl_and_reads_no_nan_from_tokens_without_mass():
    """mean_kl: KL(softmax(reference) || softmax(other)) by hand; a token both give -inf adds 0; a
    NaN where the reference has mass is NaN (a broken teacher is not hidden)."""
    from distill.formulas.divergences import mean_kl

    reference, other = torch.tensor([[0.0, math.log(3.0)]], dtype=torch.float64), torch.zeros(1, 2, dtype=torch.float64)
    p = torch.tensor([0.25, 0.75], dtype=torch.float64)
    assert mean_kl(reference, other) == pytest.approx(float((p * (p / 0.5).log()).sum()), rel=1e-12)
    masked = torch.tensor([[0.0, math.log(3.0), -math.inf]], dtype=torch.float64)
    assert mean_kl(masked, torch.tensor([[0.0, 0.0, -math.inf]], dtype=torch.float64)) == pytest.approx(mean_kl(reference, other), rel=1e-12)
    assert math.isnan(mean_kl(reference, torch.tensor([[0.0, math.nan]])))


def test_label_smoothed_ce_matches_torch():
    torch.manual_seed(0)
    logits = torch.randn(6, 5, dtype=torch.float64)
    labels = torch.tensor([0, 4, IGNORE_INDEX, 2, 1, IGNORE_INDEX])
    for eps in (0.0, 0.1, 0.5):
        ours = label_smoothed_cross_entropy(logits, labels, eps)
        reference = F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, label_smoothing=eps)
        torch.testing.assert_close(ours, reference)


def test_ce_without_labels_is_zero():
    logits = torch.randn(3, 4, requires_grad=True)
    loss = label_smoothed_cross_entropy(logits, torch.full((3,), IGNORE_INDEX))
    assert loss.item() == 0.0
    loss.backward()  # keeps the graph: an all-unlabelled micro-batch must not break backward
    assert torch.all(logits.grad == 0)


def test_distillation_loss_formula_and_temperature_squared():
    torch.manual_seed(1)
    student = torch.randn(4, 3, dtype=torch.float64)
    target = torch.log_softmax(torch.randn(4, 3, dtype=torch.float64), -1)
    labels = torch.tensor([0, 1, IGNORE_INDEX, 2])
    alpha, T, eps = 0.3, 3.0, 0.1
    terms = distillation_loss(student, target, labels, alpha, T, eps)
    # reference: F.kl_div(log q, p) with batchmean, times T^2
    kd_reference = F.kl_div(torch.log_softmax(student / T, -1), target, log_target=True, reduction="batchmean") * T * T
    ce_reference = F.cross_entropy(student, labels, ignore_index=IGNORE_INDEX, label_smoothing=eps)
    torch.testing.assert_close(terms.kd, kd_reference)
    torch.testing.assert_close(terms.ce, ce_reference)
    torch.testing.assert_close(terms.total, alpha * kd_reference + (1 - alpha) * ce_reference)


def test_kd_alpha_extremes():
    student = torch.randn(2, 3, dtype=torch.float64)
    target = torch.log_softmax(torch.randn(2, 3, dtype=torch.float64), -1)
    labels = torch.tensor([1, 2])
    only_kd = distillation_loss(student, target, labels, 1.0, 2.0)
    only_ce = distillation_loss(student, target, labels, 0.0, 2.0)
    torch.testing.assert_close(only_kd.total, only_kd.kd)
    torch.testing.assert_close(only_ce.total, only_ce.ce)
    plain = distillation_loss(student, None, labels, 0.0, 2.0)
    torch.testing.assert_close(plain.total, F.cross_entropy(student, labels))
    with pytest.raises(ValueError, match="needs a teacher target"):
        distillation_loss(student, None, labels, 0.5, 2.0)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        distillation_loss(student, target, labels, 0.5, 0.0)


def test_gradient_scale_is_independent_of_temperature_at_high_T():
    """Hinton et al.: with the T^2 factor, the KD gradient approaches (z_s - z_t) / N for large T
    (zero-mean logits), so it neither vanishes nor explodes as T grows."""
    student = torch.tensor([[0.3, -0.1, -0.2]], dtype=torch.float64, requires_grad=True)
    teacher = torch.tensor([[0.5, 0.2, -0.7]], dtype=torch.float64)
    grads = []
    for T in (50.0, 500.0):
        student.grad = None
        target = torch.log_softmax(teacher / T, -1)
        distillation_loss(student, target, torch.tensor([IGNORE_INDEX]), 1.0, T).total.backward()
        grads.append(student.grad.clone())
    expected = (student.detach() - teacher) / 3
    torch.testing.assert_close(grads[1], expected, atol=1e-3, rtol=1e-2)
    torch.testing.assert_close(grads[0], grads[1], atol=1e-2, rtol=5e-2)


def test_gradcheck_total_loss():
    torch.manual_seed(2)
    student = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    target = torch.log_softmax(torch.randn(3, 4, dtype=torch.float64), -1).requires_grad_(True)
    labels = torch.tensor([0, IGNORE_INDEX, 3])
    assert torch.autograd.gradcheck(lambda s, t: distillation_loss(s, t, labels, 0.4, 2.5, 0.2).total, (student, target))


def test_per_teacher_kl_matches_direct_kl():
    torch.manual_seed(3)
    teacher_log_probs = torch.log_softmax(torch.randn(2, 5, 3, dtype=torch.float64), -1)
    student = torch.randn(5, 3, dtype=torch.float64)
    figures = per_teacher_kl(teacher_log_probs, student, 2.0)
    for k in range(2):
        expected = F.kl_div(torch.log_softmax(student / 2.0, -1), teacher_log_probs[k], log_target=True,
                            reduction="batchmean")
        torch.testing.assert_close(figures[k], expected)


def test_kd_mask_averages_over_kept_rows_only():
    torch.manual_seed(4)
    student = torch.randn(5, 3, dtype=torch.float64)
    target = torch.log_softmax(torch.randn(5, 3, dtype=torch.float64), -1)
    target[1] = float("nan")  # an unusable row must not poison the loss
    labels = torch.full((5,), IGNORE_INDEX)
    mask = torch.tensor([True, False, True, True, False])
    terms = distillation_loss(student, target, labels, 1.0, 2.0, kd_mask=mask)
    reference = distillation_loss(student[mask], target[mask], labels[mask], 1.0, 2.0)
    torch.testing.assert_close(terms.kd, reference.kd)
    none_kept = distillation_loss(student, target, labels, 1.0, 2.0, kd_mask=torch.zeros(5, dtype=torch.bool))
    assert none_kept.kd.item() == 0.0


@pytest.mark.parametrize("name", ["reverse_kl", "jsd", "skew_kl"])
def test_distillation_loss_uses_the_configured_divergence(name):
    from distill.formulas.divergences import build_divergence

    generator = torch.Generator().manual_seed(11)
    student = torch.randn(6, 4, generator=generator, dtype=torch.float64)
    target = torch.log_softmax(torch.randn(6, 4, generator=generator, dtype=torch.float64), dim=-1)
    labels = torch.tensor([0, 1, 2, 3, -100, 1])
    divergence = build_divergence(name, jsd_beta=0.3, skew=0.2)
    terms = distillation_loss(student, target, labels, kd_alpha=1.0, temperature=2.0, divergence=divergence)
    expected = 4.0 * divergence(target, torch.log_softmax(student / 2.0, dim=-1)).mean()
    assert terms.kd.item() == pytest.approx(expected.item(), rel=1e-12)
    assert terms.kd.item() != pytest.approx(distillation_loss(student, target, labels, 1.0, 2.0).kd.item(), rel=1e-3)
