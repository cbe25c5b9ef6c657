"""Intermediate-layer losses against float64 references written with loops, gradcheck, chunked ==
whole, the uniform layer map and relation heads by hand, zero weights turning terms off exactly, and
each teacher's layer terms weighed by its weight in the row's target."""
import math

import pytest
import torch

from distill.formulas.layer_terms import (common_relation_heads, hidden_state_loss, relation_log_probs, relation_loss,
                                  uniform_layer_map, weighted_mean)
from distill.models.layer_hooks import LayerTerms, LayerTermsPlan


def _mask(lengths, length):
    return torch.tensor([[1] * n + [0] * (length - n) for n in lengths])


def _reference_hidden(student, teacher, mask, kind, weight=None):
    """Per sequence, by loops in float64: mean over real positions of 1 - cos or the mean squared error."""
    out = []
    for b in range(student.shape[0]):
        total, count = 0.0, 0
        for s in range(student.shape[1]):
            if not mask[b, s]:
                continue
            h = student[b, s].double()
            if weight is not None:
                h = weight.double() @ h
            t = teacher[b, s].double()
            if kind == "cosine":
                total += 1 - float(h @ t) / (float(h.norm()) * float(t.norm()))
            else:
                total += float(((h - t) ** 2).sum()) / len(t)
            count += 1
        out.append(total / count)
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("kind", ["cosine", "mse"])
def test_hidden_state_loss_matches_a_float64_reference_with_a_projection_and_padding(kind):
    torch.manual_seed(0)
    student = torch.randn(3, 5, 4, dtype=torch.float64)
    teacher = torch.randn(3, 5, 6, dtype=torch.float64)
    weight = torch.randn(6, 4, dtype=torch.float64)
    mask = _mask([5, 3, 1], 5)
    ours = hidden_state_loss(student, teacher, mask, kind, project=lambda rows: rows @ weight.t())
    torch.testing.assert_close(ours, _reference_hidden(student, teacher, mask, kind, weight))
    # padded positions change nothing
    noisy = student.clone()
    noisy[1, 3:] = 1e3
    torch.testing.assert_close(hidden_state_loss(noisy, teacher, mask, kind, project=lambda r: r @ weight.t()), ours)


@pytest.mark.parametrize("kind", ["cosine", "mse"])
def test_hidden_state_loss_passes_gradcheck_and_chunks_give_the_same_value_and_gradient(kind):
    torch.manual_seed(1)
    student = torch.randn(2, 4, 3, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(2, 4, 5, dtype=torch.float64)
    weight = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    mask = _mask([4, 2], 4)
    torch.autograd.gradcheck(lambda s, w: hidden_state_loss(s, teacher, mask, kind, lambda r: r @ w.t()),
                             (student, weight))
    whole = hidden_state_loss(student, teacher, mask, kind, lambda r: r @ weight.t())
    grads_whole = torch.autograd.grad(whole.sum(), (student, weight))
    chunked = hidden_state_loss(student, teacher, mask, kind, lambda r: r @ weight.t(), chunk=3)
    grads_chunked = torch.autograd.grad(chunked.sum(), (student, weight))
    torch.testing.assert_close(chunked, whole)
    for a, b in zip(grads_chunked, grads_whole):
        torch.testing.assert_close(a, b)


def _reference_relation(vectors, heads, mask, causal):
    """[B][R][S][S] relation probabilities by loops in float64."""
    batch, length, width = vectors.shape
    size = width // heads
    out = torch.zeros(batch, heads, length, length, dtype=torch.float64)
    for b in range(batch):
        for r in range(heads):
            a = vectors[b, :, r * size:(r + 1) * size].double()
            for i in range(length):
                keys = [j for j in range(length) if mask[b, j] and (not causal or j <= i)]
                if not keys:
                    continue
                scores = torch.tensor([float(a[i] @ a[j]) / math.sqrt(size) for j in keys], dtype=torch.float64)
                probs = torch.softmax(scores, dim=0)
                for j, p in zip(keys, probs):
                    out[b, r, i, j] = p
    return out


@pytest.mark.parametrize("causal", [False, True])
def test_relation_loss_matches_a_float64_reference_across_widths_and_head_counts(causal):
    torch.manual_seed(2)
    mask = _mask([5, 3], 5)
    heads = 2
    student = [torch.randn(2, 5, 4, dtype=torch.float64) for _ in range(3)]  # width 4: 2 heads of 2
    teacher = [torch.randn(2, 5, 6, dtype=torch.float64) for _ in range(3)]  # width 6: 2 heads of 3
    ours = relation_loss(student, teacher, mask, heads, causal)
    expected = torch.zeros(2, dtype=torch.float64)
    for s_vec, t_vec in zip(student, teacher):
        p_s = _reference_relation(s_vec, heads, mask, causal)
        p_t = _reference_relation(t_vec, heads, mask, causal)
        for b in range(2):
            total = 0.0
            rows = [i for i in range(5) if mask[b, i]]
            for r in range(heads):
                for i in rows:
                    for j in range(5):
                        if p_t[b, r, i, j] > 0:
                            total += float(p_t[b, r, i, j] * (p_t[b, r, i, j].log() - p_s[b, r, i, j].log()))
            expected[b] += total / (heads * len(rows))
    torch.testing.assert_close(ours, expected / 3)
    # relation rows are distributions over the allowed keys only
    probs = relation_log_probs(student[0], heads, mask, causal).exp()
    torch.testing.assert_close(probs[1, :, :3].sum(-1), torch.ones(2, 3, dtype=torch.float64))
    assert float(probs[1, :, :3, 3:].abs().max()) == 0.0
    if causal:
        assert float(probs[0].triu(1).abs().max()) == 0.0


def test_relation_loss_passes_gradcheck_and_is_zero_for_the_same_vectors():
    torch.manual_seed(3)
    mask = _mask([4, 2], 4)
    student = [torch.randn(2, 4, 4, dtype=torch.float64, requires_grad=True)]
    teacher = [torch.randn(2, 4, 6, dtype=torch.float64)]
    torch.autograd.gradcheck(lambda s: relation_loss([s], teacher, mask, 2, causal=True), tuple(student))
    same = relation_loss(teacher, teacher, mask, 2)
    assert float(same.abs().max()) < 1e-12


def test_uniform_layer_map_and_relation_heads_by_hand():
    assert uniform_layer_map(3, 6) == [(0, 0), (1, 2), (2, 4), (3, 6)]
    assert uniform_layer_map(2, 3) == [(0, 0), (1, 2), (2, 3)]
    assert uniform_layer_map(4, 4) == [(0, 0), (1, 1), (2, 2), (3, 3), (4, 4)]
    assert uniform_layer_map(4, 2) == [(0, 0), (1, 1), (2, 1), (3, 2), (4, 2)]
    # SmolLM2: query width 576 (9 heads of 64), key/value 192 (3 heads of 64): 9 does not divide 192
    assert common_relation_heads([576, 192], 9) == 8
    assert common_relation_heads([384, 384], 12) == 12
    assert common_relation_heads([32, 48], 12) == 8


def test_weighted_mean_counts_only_selected_rows_and_zero_weights_contribute_exactly_nothing():
    per_sequence = torch.tensor([1.0, float("nan"), 3.0, 5.0])
    rows = torch.tensor([True, False, True, True])
    weights = torch.tensor([0.5, 1.0, 0.0, 2.0])
    assert weighted_mean(per_sequence, weights, rows).item() == pytest.approx((0.5 + 0.0 + 10.0) / 3)


def _plan(hidden_weight=0.0, relation_weight=0.0, teacher=0):
    return LayerTermsPlan(teacher=teacher, key="t", hidden_weight=hidden_weight, hidden_loss="mse",
                          hidden_pairs=[(1, 2)] if hidden_weight else [], relation_weight=relation_weight,
                          relation_kinds=["query"], relation_pairs=[(1, 2)] if relation_weight else [],
                          relation_heads=2)


def test_layer_terms_weigh_each_teacher_by_its_interpolation_weight_and_a_zero_weight_turns_it_off():
    torch.manual_seed(4)
    mask = _mask([3, 2], 3)
    student = {"hidden": {1: torch.randn(2, 3, 4, requires_grad=True)},
               "vectors": {(1, "query"): torch.randn(2, 3, 4, requires_grad=True)}}
    teachers = {k: {"hidden": {2: torch.randn(2, 3, 4)}, "vectors": {(2, "query"): torch.randn(2, 3, 4)}}
                for k in (0, 1)}
    aligned = {0: torch.tensor([True, True]), 1: torch.tensor([True, False])}
    module = torch.nn.Module()
    hidden_only = LayerTerms([_plan(hidden_weight=2.0)])
    row_weights = torch.tensor([[0.25, 0.75], [0.75, 0.25]])
    total, figures = hidden_only(module, student, teachers, mask, row_weights, aligned)
    per_sequence = hidden_state_loss(student["hidden"][1], teachers[0]["hidden"][2], mask, "mse")
    expected = 2.0 * (0.25 * per_sequence[0] + 0.75 * per_sequence[1]) / 2
    torch.testing.assert_close(total, expected)
    assert figures["relation"] == 0.0
    # teacher 1 reads only row 0 (row 1 is not aligned); relation term only
    relations = LayerTerms([_plan(relation_weight=1.0, teacher=1)])
    total, _ = relations(module, student, teachers, mask, row_weights, aligned)
    per_sequence = relation_loss([student["vectors"][(1, "query")]], [teachers[1]["vectors"][(2, "query")]], mask, 2)
    torch.testing.assert_close(total, 0.75 * per_sequence[0])
    # a teacher whose weight is zero on every row: its terms are off, exactly zero with no graph to the student
    both = LayerTerms([_plan(hidden_weight=1.0, relation_weight=1.0)])
    total, figures = both(module, student, teachers, mask, torch.tensor([[0.0, 0.0], [1.0, 1.0]]), aligned)
    assert total.item() == 0.0 and not total.requires_grad and figures == {"hidden": 0.0, "relation": 0.0}


@pytest.mark.parametrize("method,options", [("linear", {}), ("confidence", {"combine": "linear"}),
                                            ("confidence", {"combine": "geometric"}), ("learned_gate", {})])
def test_each_teachers_layer_weight_is_its_weight_in_that_rows_target(method, options):
    """What scales teacher k's intermediate terms in row b (Interpolation.row_weights) is the weight
    teacher k has in row b's target: rebuilding the target in float64 from those weights, by the
    mixture's formula written out, gives the strategy's own target."""
    from distill.interpolation.strategies import build_interpolation

    torch.manual_seed(5)
    logits = torch.randn(3, 6, 4, dtype=torch.float64) * 2
    weights = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    temperatures = torch.tensor([2.0, 1.5, 3.0], dtype=torch.float64)
    labels = torch.tensor([0, 1, 2, 3, 0, 1])
    strategy = build_interpolation(method, **options)
    if method == "learned_gate":
        strategy.build(num_teachers=3, num_classes=4).double()  # random gate weights: rows weigh differently
    target = strategy(logits, weights, temperatures, labels).detach()
    row_weights = strategy.row_weights(logits, weights, labels).detach()
    assert row_weights.shape == (3, 6) and torch.allclose(row_weights.sum(0), torch.ones(6, dtype=torch.float64))
    if method == "linear":
        assert torch.allclose(row_weights, (weights / weights.sum())[:, None].expand(3, 6))
    else:
        assert (row_weights.max(1).values - row_weights.min(1).values).max() > 1e-3  # they differ row by row
    probs = [[[math.exp(logits[k, b, c] / temperatures[k]) for c in range(4)] for b in range(6)] for k in range(3)]
    probs = [[[p / sum(row) for p in row] for row in teacher] for teacher in probs]
    for b in range(6):
        w = [float(row_weights[k, b]) for k in range(3)]
        if options.get("combine") == "geometric":
            mass = [math.exp(sum(w[k] * math.log(probs[k][b][c]) for k in range(3))) for c in range(4)]
            expected = [m / sum(mass) for m in mass]
        else:
            expected = [sum(w[k] * probs[k][b][c] for k in range(3)) for c in range(4)]
        assert target[b].exp().tolist() == pytest.approx(expected, rel=1e-9, abs=1e-12)
