"""Span masking for consistent distillation: the rate and mean span it promises, never a special or
padded token, and a draw that depends only on (seed, epoch, position)."""
import math

import pytest
import torch

from distill.formulas.perturbations import carry_mask, perturb_ids, perturbation_seed, span_mask


def _spans(row):
    """Lengths of the runs of True in a 1-D bool tensor."""
    lengths, run = [], 0
    for value in row.tolist() + [False]:
        if value:
            run += 1
        elif run:
            lengths.append(run)
            run = 0
    return lengths


def test_token_dropout_masks_each_maskable_token_with_the_rate():
    maskable = torch.ones(400, 100, dtype=torch.bool)
    mask = span_mask(maskable, 0.15, 1.0, torch.Generator().manual_seed(0))
    assert float(mask.float().mean()) == pytest.approx(0.15, abs=0.005)


@pytest.mark.parametrize("mean_span", [2.0, 3.0])
def test_spans_have_the_geometric_mean_length_and_cover_about_the_rate(mean_span):
    maskable = torch.ones(2000, 200, dtype=torch.bool)
    generator = torch.Generator().manual_seed(1)
    # alone (a low rate: spans rarely touch), span lengths average mean_span
    sparse = span_mask(maskable, 0.02, mean_span, generator)
    lengths = [n for row in sparse[:, :150] for n in _spans(row)]
    assert sum(lengths) / len(lengths) == pytest.approx(mean_span, rel=0.06)
    # covered share at rate r: 1 - P(no span reaches j); starts with prob q = r / s, each reaching back
    # d >= 0 positions with prob (1 - 1/s)^d, independent: prod_d (1 - q (1 - 1/s)^d), far from the row's start
    rate = 0.15
    dense = span_mask(maskable, rate, mean_span, generator)
    q, p = rate / mean_span, 1 - 1 / mean_span
    expected = 1 - math.prod(1 - q * p ** d for d in range(200))
    assert float(dense[:, 100:].float().mean()) == pytest.approx(expected, abs=0.005)


def test_special_and_padded_tokens_are_never_masked_and_the_draw_is_a_function_of_its_place():
    ids = torch.tensor([[101, 5, 6, 7, 8, 9, 102, 0, 0], [101, 11, 12, 102, 0, 0, 0, 0, 0]])
    mask = (ids != 0).long()
    for seed in range(200):
        out = perturb_ids(ids, mask, [0, 101, 102, 103], 103, 0.5, 2.0, seed)
        assert (out[ids == 101] == 101).all() and (out[ids == 102] == 102).all() and (out[mask == 0] == 0).all()
        changed = out != ids
        assert (out[changed] == 103).all()
    seeds = {perturbation_seed(0, epoch, position) for epoch in range(5) for position in range(1000)}
    assert len(seeds) == 5000  # every micro-batch of a run draws its own
    first = perturb_ids(ids, mask, [0, 101, 102], 103, 0.5, 2.0, perturbation_seed(3, 1, 7))
    torch.manual_seed(123)  # the global stream (which training moves) plays no part
    again = perturb_ids(ids, mask, [0, 101, 102], 103, 0.5, 2.0, perturbation_seed(3, 1, 7))
    assert torch.equal(first, again)
    assert not torch.equal(perturb_ids(ids, mask, [0, 101, 102], 103, 0.5, 2.0, perturbation_seed(3, 1, 8)), first) or \
        not torch.equal(perturb_ids(ids, mask, [0, 101, 102], 103, 0.5, 2.0, perturbation_seed(3, 2, 7)), first)


def test_a_teachers_own_ids_are_masked_where_the_students_were_on_matching_rows_only():
    student = torch.tensor([[5, 6, 7, 0], [5, 8, 9, 9]])
    masked = torch.tensor([[5, 1, 7, 0], [1, 8, 1, 9]])  # the student's mask id is 1
    teacher = torch.tensor([[15, 16, 17], [15, 18, 19]])  # its own numbering, one column narrower
    rows = torch.tensor([True, False])  # the second row is encoded otherwise: left unchanged
    out = carry_mask(student, masked, teacher, rows, replacement=103)
    assert out.tolist() == [[15, 103, 17], [15, 18, 19]]
    assert teacher.tolist() == [[15, 16, 17], [15, 18, 19]]  # a new tensor
