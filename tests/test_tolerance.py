"""tests/tolerance.py: the bound holds for real reorderings of real sums, is the textbook value, and is far below
the errors a mistake makes."""

from __future__ import annotations

import pytest
import torch
from tolerance import assert_reordered_close, reordered_sum_rtol


def test_the_bound_is_twice_gamma_n() -> None:
    u = 2.0 ** -24  # fp32's unit roundoff
    assert reordered_sum_rtol(torch.float32, 1000) == pytest.approx(2 * 1000 * u / (1 - 1000 * u))
    assert reordered_sum_rtol(torch.bfloat16, 10) == pytest.approx(2 * 10 * 2.0 ** -8 / (1 - 10 * 2.0 ** -8))
    with pytest.raises(ValueError):
        reordered_sum_rtol(torch.bfloat16, 200)  # n u >= 1/2: no bound worth the name


def test_sums_in_other_orders_pass_and_a_real_mistake_does_not() -> None:
    torch.manual_seed(0)
    terms = torch.randn(64, 4096) * torch.logspace(0, 3, 4096)  # wide magnitudes: order matters
    forward = terms.sum(dim=1)
    backward = terms.flip(1).sum(dim=1)
    chunked = terms.view(64, 64, 64).sum(dim=2).sum(dim=1)
    one_by_one = torch.zeros(64)
    for column in terms.T:
        one_by_one += column
    exact = terms.double().sum(dim=1)
    assert (forward.double() - exact).abs().max() > 0  # the orders really differ from the exact sum
    for other in (backward, chunked, one_by_one):
        assert_reordered_close(other, forward, terms=4096)
    wrong = forward.clone()
    wrong[3] -= terms[3, -1000:].abs().median()  # one of 4,096 terms left out (a masked position, a lost chunk)
    with pytest.raises(AssertionError, match="flat index 3"):
        assert_reordered_close(wrong, forward, terms=4096)
