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


def test_at_the_suites_model_sizes_a_thousandth_off_still_fails() -> None:
    """The derived bound on a real model's log-prob sums and gradients (the layout tests' tiny Llama and pairs,
    padded: ~1,200 terms, rtol 1.4e-4 of |entry| + the largest |entry|) passes a real reordering - the packed
    layout - and fails a 1e-3 relative error of the largest log-prob or weight gradient: the bound is not so wide
    that a small real mistake slips through. (An entry a tenth of the largest may err by ~3e-3 of itself.)"""
    from test_layouts import VOCAB, collate, make_pairs
    from tolerance import batch_terms

    from demo.tiny import build_model
    from dpo.logprobs import sequence_logps

    model = build_model(vocab_size=VOCAB, hidden_size=32, num_layers=2, seed=3).train()
    pairs = make_pairs()

    def run(layout: str) -> tuple[torch.Tensor, torch.Tensor]:
        model.zero_grad(set_to_none=True)
        out = sequence_logps(model, collate(pairs, layout))
        logps = torch.cat([out.chosen_logps, out.rejected_logps])
        logps.sum().backward()
        return logps.detach(), model.model.layers[0].mlp.down_proj.weight.grad.clone()

    terms = batch_terms(model, collate(pairs, "padded"))
    (logps, grad), (packed_logps, packed_grad) = run("padded"), run("packed")
    assert not torch.equal(packed_grad, grad)  # another order really
    assert_reordered_close(packed_logps, logps, terms=terms)
    assert_reordered_close(packed_grad, grad, terms=terms)
    assert 1000 < terms < 1500 and reordered_sum_rtol(torch.float32, terms) < 2e-4  # what the docstring says
    wrong_logps = logps.clone()
    wrong_logps[int(logps.abs().argmax())] *= 1 + 1e-3
    with pytest.raises(AssertionError, match="beyond reordering"):
        assert_reordered_close(wrong_logps, logps, terms=terms)
    wrong_grad = grad.clone()
    flat = wrong_grad.view(-1)
    flat[int(flat.abs().argmax())] *= 1 + 1e-3
    with pytest.raises(AssertionError, match="beyond reordering"):
        assert_reordered_close(wrong_grad, grad, terms=terms)
