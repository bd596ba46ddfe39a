"""Tests for dpo/losses.py: hand-worked numbers, a naive per-example oracle, gradients, limits and validation.

Expected values are computed with ``math`` (or written out by hand), never with a torch copy of the formula
under test. Handy identities used below, with softplus(x) = log(1 + e^x):

    -log sigma(z) = softplus(-z)                      and   softplus(z) - softplus(-z) = z
    => -(1 - eps) log sigma(z) - eps log sigma(-z) = softplus(-z) + eps * z
"""

from __future__ import annotations

import math
import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dpo.losses import (
    LOSSES,
    REFERENCE_FREE,
    LossOutput,
    get_loss_fn,
    hinge_loss,
    ipo_loss,
    preference_loss,
    sigmoid_loss,
    simpo_loss,
)

LOG2 = math.log(2.0)


def t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


def pair_with_logit(h: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Four [1] log-prob tensors whose DPO logit is h: (pc - pr) - (rc - rr) = (h - 1) - (-1) = h."""
    return t(-5.0 + h - 1.0), t(-5.0), t(-7.0), t(-6.0)


# --- naive per-example oracle -------------------------------------------------------------------------------


def naive_softplus(x: float) -> float:
    """log(1 + e^x), written for moderate |x| the way one would on paper (no torch)."""
    return math.log(1.0 + math.exp(x))


def naive_loss(
    loss_type: str,
    pc: float,
    pr: float,
    rc: float,
    rr: float,
    *,
    beta: float,
    eps: float = 0.0,
    gamma: float = 0.5,
) -> float:
    """One pair's loss, straight from the papers' formulas with math.log / math.exp."""
    h = (pc - pr) - (rc - rr)
    if loss_type == "sigmoid":
        z = beta * h
        return -(1 - eps) * math.log(1 / (1 + math.exp(-z))) - eps * math.log(1 / (1 + math.exp(z)))
    if loss_type == "ipo":
        return (h - 1 / (2 * beta)) ** 2
    if loss_type == "hinge":
        return max(0.0, 1 - beta * h)
    if loss_type == "simpo":
        z = beta * (pc - pr) - gamma
        return -(1 - eps) * math.log(1 / (1 + math.exp(-z))) - eps * math.log(1 / (1 + math.exp(z)))
    raise AssertionError(loss_type)


def random_batch(seed: int, size: int = 16) -> list[tuple[float, float, float, float]]:
    rng = random.Random(seed)
    return [tuple(rng.uniform(-30.0, -1.0) for _ in range(4)) for _ in range(size)]  # type: ignore[misc]


# --- hand-worked values -------------------------------------------------------------------------------------


def test_sigmoid_hand_worked() -> None:
    """beta = 0.1, h = 2.0: beta*h = 0.2,
    loss = -log sigma(0.2) = log(1 + e^-0.2) = log(1.8187307531) = 0.5981389."""
    loss = sigmoid_loss(*pair_with_logit(2.0), beta=0.1)
    assert loss.shape == (1,)
    assert loss.item() == pytest.approx(0.598138869, abs=1e-9)
    assert loss.item() == pytest.approx(math.log(1 + math.exp(-0.2)), rel=1e-12)


def test_sigmoid_label_smoothing_hand_worked() -> None:
    """beta = 0.1, h = 2.0, eps = 0.1:
    0.9 * 0.5981389 + 0.1 * log(1 + e^0.2) = 0.9 * 0.5981389 + 0.1 * 0.7981389 = 0.5383250 + 0.0798139
    = 0.6181389 (= softplus(-0.2) + eps * 0.2)"""
    loss = sigmoid_loss(*pair_with_logit(2.0), beta=0.1, label_smoothing=0.1)
    assert loss.item() == pytest.approx(0.618138869, abs=1e-9)


def test_ipo_hand_worked() -> None:
    """beta = 0.1, h = 2.0: target 1/(2*0.1) = 5, loss = (2 - 5)^2 = 9; h = 7: (7 - 5)^2 = 4."""
    assert ipo_loss(*pair_with_logit(2.0), beta=0.1).item() == pytest.approx(9.0, abs=1e-12)
    assert ipo_loss(*pair_with_logit(7.0), beta=0.1).item() == pytest.approx(4.0, abs=1e-12)


def test_hinge_hand_worked() -> None:
    """beta = 0.1, h = 2.0: max(0, 1 - 0.2) = 0.8; h = -3.0: max(0, 1 + 0.3) = 1.3."""
    assert hinge_loss(*pair_with_logit(2.0), beta=0.1).item() == pytest.approx(0.8, abs=1e-12)
    assert hinge_loss(*pair_with_logit(-3.0), beta=0.1).item() == pytest.approx(1.3, abs=1e-12)


def test_simpo_hand_worked() -> None:
    """beta = 2, gamma = 0.5, pc = -1.0, pr = -1.5 (already per-token means):
    z = 2 * (-1.0 + 1.5) - 0.5 = 0.5, loss = log(1 + e^-0.5) = log(1.6065307) = 0.4740770.
    With eps = 0.2: 0.4740770 + 0.2 * 0.5 = 0.5740770."""
    pc, pr = t(-1.0), t(-1.5)
    plain = simpo_loss(pc, pr, None, None, beta=2.0, simpo_gamma=0.5)
    assert plain.item() == pytest.approx(0.474076984, abs=1e-9)
    smoothed = simpo_loss(pc, pr, None, None, beta=2.0, simpo_gamma=0.5, label_smoothing=0.2)
    assert smoothed.item() == pytest.approx(0.574076984, abs=1e-9)


def test_batch_of_hand_worked_values() -> None:
    """A [3] batch, beta = 0.5, logits h = 0, 2, -2: beta*h = 0, 1, -1.
    sigmoid: log 2 = 0.6931472, log(1 + e^-1) = 0.3132617, log(1 + e^1) = 1.3132617.
    ipo (target 1): 1, 1, 9.  hinge: 1, 0, 2."""
    pc, pr, rc, rr = t(-3.0, -2.0, -6.0), t(-3.0, -4.0, -4.0), t(-1.0, -1.0, -1.0), t(-1.0, -1.0, -1.0)
    sig = sigmoid_loss(pc, pr, rc, rr, beta=0.5)
    assert sig.tolist() == pytest.approx([0.693147181, 0.313261688, 1.313261688], abs=1e-9)
    assert ipo_loss(pc, pr, rc, rr, beta=0.5).tolist() == pytest.approx([1.0, 1.0, 9.0], abs=1e-12)
    assert hinge_loss(pc, pr, rc, rr, beta=0.5).tolist() == pytest.approx([1.0, 0.0, 2.0], abs=1e-12)


# --- naive oracle -------------------------------------------------------------------------------------------


# The first four losses; the rest of the family has its own oracle in tests/test_losses_family.py.
BASIC = ["hinge", "ipo", "sigmoid", "simpo"]


@pytest.mark.parametrize("loss_type", BASIC)
@pytest.mark.parametrize("eps", [0.0, 0.25])
@pytest.mark.parametrize("beta", [0.05, 0.1, 0.5])
def test_matches_naive_per_example_loop(loss_type: str, eps: float, beta: float) -> None:
    # A fixed seed per case (str hashes are randomised per process, so no hash() here).
    rows = random_batch(seed=BASIC.index(loss_type) * 100 + int(eps * 100) + int(beta * 1000))
    pc, pr, rc, rr = (t(*column) for column in zip(*rows))
    out = preference_loss(loss_type, pc, pr, rc, rr, beta=beta, label_smoothing=eps, simpo_gamma=0.3)
    expected = [naive_loss(loss_type, *row, beta=beta, eps=eps, gamma=0.3) for row in rows]
    assert out.losses.shape == (len(rows),)
    assert out.losses.tolist() == pytest.approx(expected, rel=1e-10, abs=1e-12)


def test_float32_matches_naive() -> None:
    rows = random_batch(seed=7)
    pc, pr, rc, rr = (torch.tensor(column, dtype=torch.float32) for column in zip(*rows))
    out = preference_loss("sigmoid", pc, pr, rc, rr, beta=0.1)
    assert out.losses.dtype == torch.float32
    expected = [naive_loss("sigmoid", *row, beta=0.1) for row in rows]
    assert out.losses.tolist() == pytest.approx(expected, rel=1e-5, abs=1e-6)


# --- gradients ----------------------------------------------------------------------------------------------


def _grad_inputs(seed: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    draws = [-10.0 * torch.rand(6, generator=generator, dtype=torch.float64) for _ in range(4)]
    return [x.requires_grad_() for x in draws]


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "hinge"])
@pytest.mark.parametrize("eps", [0.0, 0.2])
def test_gradcheck_reference_losses(loss_type: str, eps: float) -> None:
    inputs = _grad_inputs(seed=1)
    fn = get_loss_fn(loss_type)
    if loss_type == "hinge":
        # gradcheck needs a differentiable point: keep every pair away from the kink at beta*h = 1.
        h = _logits_of(inputs)
        assert torch.all((0.3 * h - 1.0).abs() > 1e-3)

    def loss(pc: torch.Tensor, pr: torch.Tensor, rc: torch.Tensor, rr: torch.Tensor) -> torch.Tensor:
        return fn(pc, pr, rc, rr, beta=0.3, label_smoothing=eps)

    assert torch.autograd.gradcheck(loss, tuple(inputs))


def _logits_of(inputs: list[torch.Tensor]) -> torch.Tensor:
    pc, pr, rc, rr = (x.detach() for x in inputs)
    return (pc - pr) - (rc - rr)


@pytest.mark.parametrize("eps", [0.0, 0.2])
def test_gradcheck_simpo(eps: float) -> None:
    pc, pr, _, _ = _grad_inputs(seed=2)

    def loss(chosen: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
        return simpo_loss(chosen, rejected, None, None, beta=2.0, simpo_gamma=0.5, label_smoothing=eps)

    assert torch.autograd.gradcheck(loss, (pc, pr))


def test_sigmoid_gradient_hand_worked() -> None:
    """d/dpc of -log sigma(beta*h) = -beta * (1 - sigma(beta*h));
    beta = 0.1, h = 2: -0.1 * (1 - 0.549834) = -0.0450166.
    h is linear in all four inputs with coefficients +1, -1, -1, +1, so the gradients are +g, -g, -g, +g."""
    pc, pr, rc, rr = (x.requires_grad_() for x in pair_with_logit(2.0))
    sigmoid_loss(pc, pr, rc, rr, beta=0.1).sum().backward()
    expected = -0.1 * (1 - 1 / (1 + math.exp(-0.2)))
    assert pc.grad.item() == pytest.approx(expected, rel=1e-10)
    assert pr.grad.item() == pytest.approx(-expected, rel=1e-10)
    assert rc.grad.item() == pytest.approx(-expected, rel=1e-10)
    assert rr.grad.item() == pytest.approx(expected, rel=1e-10)


# --- limits and identities ----------------------------------------------------------------------------------


@pytest.mark.parametrize("beta", [0.01, 0.1, 0.5, 3.0])
def test_sigmoid_at_zero_logit_is_log2(beta: float) -> None:
    assert sigmoid_loss(*pair_with_logit(0.0), beta=beta).item() == pytest.approx(LOG2, abs=1e-12)
    # Label smoothing is symmetric in z, so at z = 0 it changes nothing.
    smoothed = sigmoid_loss(*pair_with_logit(0.0), beta=beta, label_smoothing=0.3)
    assert smoothed.item() == pytest.approx(LOG2, abs=1e-12)


@pytest.mark.parametrize("beta,h", [(0.1, 10.0), (0.1, 25.0), (0.5, 2.0), (2.0, 0.5), (2.0, 40.0)])
def test_hinge_zero_when_margin_met(beta: float, h: float) -> None:
    """beta*h >= 1 means the margin is met: zero loss and zero gradient."""
    pc, pr, rc, rr = (x.requires_grad_() for x in pair_with_logit(h))
    loss = hinge_loss(pc, pr, rc, rr, beta=beta)
    assert loss.item() == 0.0
    loss.sum().backward()
    assert pc.grad.item() == 0.0


@pytest.mark.parametrize("beta", [0.05, 0.1, 0.5, 2.0])
def test_ipo_zero_at_target(beta: float) -> None:
    """IPO's minimum is at h = 1/(2*beta): 10, 5, 1, 0.25."""
    loss = ipo_loss(*pair_with_logit(1 / (2 * beta)), beta=beta)
    assert loss.item() == pytest.approx(0.0, abs=1e-20)


def test_label_smoothing_zero_is_plain_loss() -> None:
    pc, pr, rc, rr = (t(*column) for column in zip(*random_batch(seed=3)))
    plain = sigmoid_loss(pc, pr, rc, rr, beta=0.2)
    assert torch.equal(sigmoid_loss(pc, pr, rc, rr, beta=0.2, label_smoothing=0.0), plain)
    rows = zip(*(x.tolist() for x in (pc, pr, rc, rr)))
    expected = [naive_softplus(-0.2 * ((a - b) - (c - d))) for a, b, c, d in rows]
    assert plain.tolist() == pytest.approx(expected, rel=1e-12)
    s_plain = simpo_loss(pc, pr, None, None, beta=2.0, simpo_gamma=0.5)
    s_zero = simpo_loss(pc, pr, None, None, beta=2.0, simpo_gamma=0.5, label_smoothing=0.0)
    assert torch.equal(s_zero, s_plain)


def test_large_logits_stay_finite() -> None:
    """beta*h = -1000: softplus(1000) = 1000 exactly in float64; a naive log(sigmoid) would give inf."""
    loss = sigmoid_loss(*pair_with_logit(-10000.0), beta=0.1)
    assert loss.item() == pytest.approx(1000.0, rel=1e-12)
    assert sigmoid_loss(*pair_with_logit(10000.0), beta=0.1).item() == pytest.approx(0.0, abs=1e-300)


# --- rewards ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "hinge"])
def test_rewards_reference_based(loss_type: str) -> None:
    """beta = 0.1, pc = -10, rc = -12 -> 0.1 * 2 = 0.2; pr = -14, rr = -13 -> 0.1 * -1 = -0.1;
    margin 0.3 = beta * h with h = (-10 + 14) - (-12 + 13) = 3."""
    pc, pr, rc, rr = (x.requires_grad_() for x in (t(-10.0), t(-14.0), t(-12.0), t(-13.0)))
    out = preference_loss(loss_type, pc, pr, rc, rr, beta=0.1)
    assert isinstance(out, LossOutput)
    assert out.chosen_rewards.item() == pytest.approx(0.2, abs=1e-12)
    assert out.rejected_rewards.item() == pytest.approx(-0.1, abs=1e-12)
    assert out.losses.requires_grad
    assert not out.chosen_rewards.requires_grad and out.chosen_rewards.grad_fn is None
    assert not out.rejected_rewards.requires_grad and out.rejected_rewards.grad_fn is None


def test_rewards_simpo_are_beta_times_policy() -> None:
    """beta = 2: chosen -1.0 -> -2.0, rejected -1.5 -> -3.0; references are not read."""
    pc, pr = t(-1.0).requires_grad_(), t(-1.5).requires_grad_()
    out = preference_loss("simpo", pc, pr, None, None, beta=2.0, simpo_gamma=0.5)
    assert out.chosen_rewards.item() == pytest.approx(-2.0, abs=1e-12)
    assert out.rejected_rewards.item() == pytest.approx(-3.0, abs=1e-12)
    assert out.losses.item() == pytest.approx(0.474076984, abs=1e-9)
    assert out.losses.requires_grad
    assert out.chosen_rewards.grad_fn is None and out.rejected_rewards.grad_fn is None


# --- rpo ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("loss_type", sorted(LOSSES))
def test_rpo_adds_alpha_times_nll(loss_type: str) -> None:
    pc, pr, rc, rr = t(-3.0, -2.0), t(-3.0, -4.0), t(-1.0, -1.0), t(-1.0, -1.0)
    chosen_nll = t(2.0, 0.5)
    extra = dict(label_smoothing=0.1, chosen_lengths=t(3.0, 2.0), chosen_nll_sum=t(6.0, 1.0))
    base = preference_loss(loss_type, pc, pr, rc, rr, beta=0.5, **extra)
    with_rpo = preference_loss(loss_type, pc, pr, rc, rr, beta=0.5, rpo_alpha=0.5, chosen_nll=chosen_nll, **extra)
    # 0.5 * [2.0, 0.5] = [1.0, 0.25] on top of the preference loss.
    assert (with_rpo.losses - base.losses).tolist() == pytest.approx([1.0, 0.25], abs=1e-12)
    assert torch.equal(with_rpo.chosen_rewards, base.chosen_rewards)


def test_rpo_sigmoid_hand_worked() -> None:
    """h = 0: log 2 + 0.5 * 2.0 = 1.6931472."""
    out = preference_loss("sigmoid", *pair_with_logit(0.0), beta=0.1, rpo_alpha=0.5, chosen_nll=t(2.0))
    assert out.losses.item() == pytest.approx(LOG2 + 1.0, abs=1e-12)


def test_rpo_gradient_reaches_nll() -> None:
    nll = t(2.0, 0.5).requires_grad_()
    out = preference_loss("sigmoid", t(-1.0, -2.0), t(-2.0, -1.0), t(-1.0, -1.0), t(-1.0, -1.0), beta=0.1,
                          rpo_alpha=0.25, chosen_nll=nll)
    out.losses.sum().backward()
    assert nll.grad.tolist() == pytest.approx([0.25, 0.25], abs=1e-12)


def test_rpo_without_nll_is_an_error() -> None:
    with pytest.raises(ValueError, match="chosen_nll"):
        preference_loss("sigmoid", *pair_with_logit(1.0), beta=0.1, rpo_alpha=0.5)


def test_nll_ignored_without_rpo() -> None:
    base = preference_loss("sigmoid", *pair_with_logit(1.0), beta=0.1)
    ignored = preference_loss("sigmoid", *pair_with_logit(1.0), beta=0.1, chosen_nll=t(5.0))
    assert torch.equal(base.losses, ignored.losses)


# --- registry and validation --------------------------------------------------------------------------------


def test_registry_contents() -> None:
    trl_names = {"sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
                 "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm"}
    assert set(LOSSES) == trl_names | {"simpo"}
    assert (LOSSES["sigmoid"], LOSSES["ipo"], LOSSES["hinge"], LOSSES["simpo"]) == (
        sigmoid_loss, ipo_loss, hinge_loss, simpo_loss)
    assert REFERENCE_FREE == frozenset({"simpo", "sft"})
    assert REFERENCE_FREE <= set(LOSSES)
    for name, fn in LOSSES.items():
        assert get_loss_fn(name) is fn


def test_unknown_loss_lists_valid_names_sorted() -> None:
    with pytest.raises(ValueError) as excinfo:
        get_loss_fn("kto")
    message = str(excinfo.value)
    assert "'kto'" in message
    assert message.endswith(", ".join(sorted(LOSSES)))
    with pytest.raises(ValueError, match="apo_down, apo_zero"):
        preference_loss("dpo", *pair_with_logit(1.0), beta=0.1)


@pytest.mark.parametrize("beta", [0.0, -0.1, float("nan")])
def test_beta_must_be_positive(beta: float) -> None:
    with pytest.raises(ValueError, match="beta: must be > 0"):
        preference_loss("sigmoid", *pair_with_logit(1.0), beta=beta)


@pytest.mark.parametrize("eps", [-0.1, 0.6])
def test_label_smoothing_range(eps: float) -> None:
    with pytest.raises(ValueError, match="label_smoothing"):
        preference_loss("sigmoid", *pair_with_logit(1.0), beta=0.1, label_smoothing=eps)


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "hinge"])
def test_reference_based_losses_reject_none_refs(loss_type: str) -> None:
    with pytest.raises(ValueError, match=f"'{loss_type}'.*ref_chosen_logps, ref_rejected_logps"):
        preference_loss(loss_type, t(-1.0), t(-2.0), None, None, beta=0.1)
    with pytest.raises(ValueError, match=f"'{loss_type}'.*ref_rejected_logps is None"):
        preference_loss(loss_type, t(-1.0), t(-2.0), t(-1.0), None, beta=0.1)


def test_simpo_ignores_refs() -> None:
    pc, pr = t(-1.0, -0.7), t(-1.5, -0.2)
    without = preference_loss("simpo", pc, pr, None, None, beta=2.0, simpo_gamma=0.5)
    with_refs = preference_loss("simpo", pc, pr, t(-100.0, 3.0), t(7.0, -9.0), beta=2.0, simpo_gamma=0.5)
    assert torch.equal(without.losses, with_refs.losses)
    assert torch.equal(without.chosen_rewards, with_refs.chosen_rewards)
    # Second pair by hand: z = 2 * (-0.7 + 0.2) - 0.5 = -1.5,
    # loss = log(1 + e^1.5) = log(5.4816891) = 1.7014133.
    assert without.losses.tolist() == pytest.approx([0.474076984, 1.701413278], abs=1e-9)


def test_shape_mismatch_is_an_error() -> None:
    with pytest.raises(ValueError, match="same shape"):
        preference_loss("sigmoid", t(-1.0, -2.0), t(-2.0), t(-1.0), t(-1.0), beta=0.1)
    with pytest.raises(ValueError, match="same shape"):
        preference_loss("sigmoid", *pair_with_logit(1.0), beta=0.1, rpo_alpha=1.0, chosen_nll=t(1.0, 2.0))


# --- properties ---------------------------------------------------------------------------------------------

logits = st.floats(min_value=-200.0, max_value=200.0, allow_nan=False)
betas = st.floats(min_value=0.01, max_value=5.0)


@settings(max_examples=200, deadline=None)
@given(h1=logits, h2=logits, beta=betas)
def test_sigmoid_is_decreasing_softplus(h1: float, h2: float, beta: float) -> None:
    low, high = min(h1, h2), max(h1, h2)
    loss_low = sigmoid_loss(*pair_with_logit(low), beta=beta).item()
    loss_high = sigmoid_loss(*pair_with_logit(high), beta=beta).item()
    assert loss_low >= loss_high >= 0.0
    # softplus(-beta*h) in a form that is stable for any sign: max(x, 0) + log1p(e^-|x|).
    for h, loss in ((low, loss_low), (high, loss_high)):
        x = -beta * ((-5.0 + h - 1.0) - (-5.0) - (-7.0 + 6.0))
        assert loss == pytest.approx(max(x, 0.0) + math.log1p(math.exp(-abs(x))), rel=1e-9, abs=1e-12)


@settings(max_examples=200, deadline=None)
@given(h=logits, beta=betas, eps=st.floats(min_value=0.0, max_value=0.5, exclude_max=True))
def test_label_smoothing_adds_eps_times_logit(h: float, beta: float, eps: float) -> None:
    """-(1-eps) log sigma(z) - eps log sigma(-z) = softplus(-z) + eps*z, for every z."""
    pair = pair_with_logit(h)
    z = beta * ((pair[0] - pair[1]) - (pair[2] - pair[3])).item()
    smoothed = sigmoid_loss(*pair, beta=beta, label_smoothing=eps).item()
    plain = sigmoid_loss(*pair, beta=beta).item()
    assert smoothed == pytest.approx(plain + eps * z, rel=1e-9, abs=1e-9)
