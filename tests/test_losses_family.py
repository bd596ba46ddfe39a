"""The rest of the DPO family in dpo/losses.py (the first four are in tests/test_losses.py): each loss against a
naive per-pair formula written with `math` from its paper, f-divergence scores by hand, the weighted mix and its
components, WPO weighting, the rewards rule, and the registry's one-message validation."""

from __future__ import annotations

import math
import random

import pytest
import torch

from dpo.losses import (
    REGISTRY,
    check_objective,
    f_divergence_score,
    preference_loss,
    reference_free,
    wants_mean_logps,
)

BETA = 0.3


def sig(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def logsig(x: float) -> float:
    return math.log(sig(x))


def naive(name: str, pc: float, pr: float, rc: float, rr: float, lc: float, lr: float, *, eps: float = 0.1,
          tau: float = 0.05) -> float:
    """One pair's loss from the papers' formulas (lengths lc/lr for the per-token ones)."""
    uw, ul = pc - rc, pr - rr  # log-ratios
    h = uw - ul
    z = BETA * h
    if name == "exo_pair":
        return sig(z) * (logsig(z) - math.log(1 - eps)) + sig(-z) * (logsig(-z) - math.log(eps))
    if name == "nca_pair":
        return -logsig(BETA * uw) - 0.5 * logsig(-BETA * uw) - 0.5 * logsig(-BETA * ul)
    if name == "robust":
        return ((1 - eps) * -logsig(z) - eps * -logsig(-z)) / (1 - 2 * eps)
    if name == "bco_pair":
        return -logsig(BETA * uw) - logsig(-BETA * ul)
    if name == "sppo_hard":
        return (uw - 1 / (2 * BETA)) ** 2 + (ul + 1 / (2 * BETA)) ** 2
    if name == "apo_zero":
        return 1 - sig(BETA * uw) + sig(BETA * ul)
    if name == "apo_down":
        return sig(BETA * uw) + 1 - sig(BETA * (uw - ul))
    if name == "discopop":
        m = sig(z / tau)
        return (1 - m) * -logsig(z) + m * math.exp(-z)
    if name == "sigmoid_norm":
        return -logsig(BETA * (uw / lc - ul / lr))
    if name == "ipo":
        return (uw / lc - ul / lr - 1 / (2 * BETA)) ** 2
    raise AssertionError(name)


PER_PAIR = ["exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "apo_zero", "apo_down", "discopop",
            "sigmoid_norm", "ipo"]


def batch(seed: int, n: int = 8):
    rng = random.Random(seed)
    rows = [(rng.uniform(-12, -1), rng.uniform(-12, -1), rng.uniform(-12, -1), rng.uniform(-12, -1),
             float(rng.randint(1, 9)), float(rng.randint(1, 9))) for _ in range(n)]
    cols = [torch.tensor(c, dtype=torch.float64) for c in zip(*rows)]
    return rows, cols


@pytest.mark.parametrize("name", PER_PAIR)
def test_each_loss_equals_its_formula(name):
    rows, (pc, pr, rc, rr, lc, lr) = batch(PER_PAIR.index(name))
    out = preference_loss(name, pc, pr, rc, rr, beta=BETA, label_smoothing=0.1, discopop_tau=0.05,
                          chosen_lengths=lc, rejected_lengths=lr)
    assert out.losses.tolist() == pytest.approx([naive(name, *row) for row in rows], rel=1e-10, abs=1e-12)
    # rewards: beta * log-ratio, detached
    assert out.chosen_rewards.tolist() == pytest.approx([BETA * (r[0] - r[2]) for r in rows], rel=1e-12)
    assert out.chosen_rewards.grad_fn is None


def test_aot_sorts_the_batch():
    """Pairs with policy log-ratio margins [3, -1] and reference margins [0, 2]: sorted, (-1 - 0), (3 - 2)."""
    pc, pr, rc, rr = (torch.tensor(v, dtype=torch.float64) for v in ([0.0, -1.0], [-3.0, 0.0], [0.0, 0.0],
                                                                     [0.0, -2.0]))
    losses = preference_loss("aot", pc, pr, rc, rr, beta=1.0).losses
    assert losses.tolist() == pytest.approx([-logsig(-1.0), -logsig(1.0)], rel=1e-12)
    # unpaired: chosen log-ratios [0, -1] and rejected [-3, 2], each sorted: (-1 - -3), (0 - 2)
    losses = preference_loss("aot_unpaired", pc, pr, rc, rr, beta=1.0).losses
    assert losses.tolist() == pytest.approx([-logsig(2.0), -logsig(-2.0)], rel=1e-12)


def test_aot_leaves_padding_pairs_out_of_the_order_statistics():
    """A weight-0 copy of pair 0 (how the last eval batch is filled) changes nothing in the weighted mean."""
    pc, pr, rc, rr = (torch.tensor(v, dtype=torch.float64) for v in ([0.0, -1.0, 5.0], [-3.0, 0.0, -9.0],
                                                                     [0.0, 0.0, 3.0], [0.0, -2.0, 1.0]))
    weight = torch.tensor([1.0, 1.0, 0.0], dtype=torch.float64)
    for name in ("aot", "aot_unpaired"):
        two = preference_loss(name, pc[:2], pr[:2], rc[:2], rr[:2], beta=1.0).losses.mean()
        padded = preference_loss(name, pc, pr, rc, rr, beta=1.0, pair_weight=weight).losses
        assert float((padded * weight).sum() / weight.sum()) == pytest.approx(float(two), rel=1e-12), name


def test_sft_is_the_batch_token_mean_of_the_chosen_nll():
    """NLL sums [6, 1] over [3, 2] tokens: token mean 7/5 for the batch; padding pairs (weight 0) do not count."""
    pc = pr = torch.zeros(3, dtype=torch.float64)
    nll_sum, lengths = torch.tensor([6.0, 1.0, 50.0], dtype=torch.float64), torch.tensor([3.0, 2.0, 9.0])
    weight = torch.tensor([1.0, 1.0, 0.0])
    out = preference_loss("sft", pc, pr, None, None, beta=BETA, chosen_nll_sum=nll_sum,
                          chosen_lengths=lengths.double(), pair_weight=weight)
    assert float((out.losses * weight).sum() / weight.sum()) == pytest.approx(7 / 5, rel=1e-12)
    with pytest.raises(ValueError, match="'sft' needs chosen_nll_sum"):
        preference_loss("sft", pc, pr, None, None, beta=BETA)


def test_f_divergence_scores_by_hand():
    u = torch.tensor([math.log(2.0), 0.0], dtype=torch.float64)  # pi / ref = 2 and 1
    assert f_divergence_score(u, "reverse_kl", 0.5).tolist() == pytest.approx([math.log(2), 0.0])
    assert f_divergence_score(u, "forward_kl", 0.5).tolist() == pytest.approx([1 - 1 / 2, 0.0])
    assert f_divergence_score(u, "js_divergence", 0.5).tolist() == pytest.approx([math.log(4 / 3), 0.0])
    # alpha 0.5: (2^-0.5 - 1) / -0.5 = 2 - sqrt(2)
    assert f_divergence_score(u, "alpha_divergence", 0.5).tolist() == pytest.approx([2 - math.sqrt(2), 0.0])
    assert f_divergence_score(u, "alpha_divergence", 1.0).tolist() == pytest.approx([math.log(2), 0.0])


def test_sigmoid_under_forward_kl_uses_the_scores():
    pc, pr, rc, rr = (torch.tensor([v], dtype=torch.float64) for v in (math.log(2.0), 0.0, 0.0, math.log(4.0)))
    # scores: 1 - 1/2 = 0.5 and 1 - 4 = -3; h = 3.5
    out = preference_loss("sigmoid", pc, pr, rc, rr, beta=BETA, f_divergence_type="forward_kl")
    assert out.losses.item() == pytest.approx(-logsig(BETA * 3.5), rel=1e-12)


def test_weighted_mix_and_components():
    rows, (pc, pr, rc, rr, lc, lr) = batch(11)
    out = preference_loss(["sigmoid", "bco_pair", "nca_pair"], pc, pr, rc, rr, beta=BETA, loss_weights=[0.8, 0.2, 1.5])
    expected = [0.8 * -logsig(BETA * ((r[0] - r[2]) - (r[1] - r[3]))) + 0.2 * naive("bco_pair", *r)
                + 1.5 * naive("nca_pair", *r) for r in rows]
    assert out.losses.tolist() == pytest.approx(expected, rel=1e-10)
    assert set(out.components) == {"sigmoid", "bco_pair", "nca_pair"}
    assert out.components["bco_pair"].tolist() == pytest.approx([naive("bco_pair", *r) for r in rows], rel=1e-10)


def test_wpo_weights_multiply_every_component():
    rows, (pc, pr, rc, rr, lc, lr) = batch(12)
    w = torch.linspace(0.1, 0.9, len(rows), dtype=torch.float64)
    plain = preference_loss(["sigmoid", "bco_pair"], pc, pr, rc, rr, beta=BETA, loss_weights=[0.8, 0.2])
    weighted = preference_loss(["sigmoid", "bco_pair"], pc, pr, rc, rr, beta=BETA, loss_weights=[0.8, 0.2],
                               wpo_weights=w)
    torch.testing.assert_close(weighted.losses, plain.losses * w)
    torch.testing.assert_close(weighted.chosen_rewards, plain.chosen_rewards)


def test_natures_are_declared():
    assert reference_free("sft") and reference_free("simpo") and not reference_free(["sft", "sigmoid"])
    assert wants_mean_logps("simpo") and not wants_mean_logps(["sigmoid", "sft"])
    assert {n for n, s in REGISTRY.items() if s.batch_coupled} == {"aot", "aot_unpaired", "sft"}
    assert all(spec.paper for spec in REGISTRY.values())


@pytest.mark.parametrize("kwargs,message", [
    (dict(loss_type="robust", label_smoothing=0.5), r"label_smoothing: must be in \[0, 0.5\), got 0.5"),
    (dict(loss_type="exo_pair"), r"'exo_pair' needs 0 < label_smoothing < 0.5, got 0.0"),
    (dict(loss_type="discopop", discopop_tau=0.0), "needs discopop_tau > 0"),
    (dict(loss_type=["sigmoid", "bco_pair"], loss_weights=[1.0]), "loss_weights has 1 values for 2 losses"),
    (dict(loss_type=["sigmoid", "sigmoid"]), "lists a loss twice"),
    (dict(loss_type=["simpo", "sigmoid"]), "cannot be mixed"),
    (dict(loss_type="bco_pair", f_divergence_type="forward_kl"), "not bco_pair"),
    (dict(loss_type="sigmoid", f_divergence_type="kl"), "'kl' is not one of"),
    (dict(loss_type="aot", use_weighting=True), r"use_weighting \(WPO\) is not defined for aot"),
    (dict(loss_type="sigmoid", ld_alpha=1.5), r"ld_alpha must be in \[0, 1\]"),
    (dict(loss_type="dpo"), "unknown loss_type 'dpo'"),
])
def test_validation_messages(kwargs, message):
    loss_type = kwargs.pop("loss_type")
    with pytest.raises(ValueError, match=message):
        check_objective(loss_type, kwargs.pop("loss_weights", None), **kwargs)


def test_all_problems_in_one_message():
    with pytest.raises(ValueError) as excinfo:
        check_objective(["aot", "exo_pair"], [1.0, 1.0], use_weighting=True, f_divergence_type="js_divergence")
    message = str(excinfo.value)
    assert "exo_pair" in message and "use_weighting" in message and "js_divergence" in message
    assert "\n" not in message
