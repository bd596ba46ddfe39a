"""dpo/metrics.py's accumulator: the fixed metrics and the components of a loss mix (`loss/<name>`), weighted by
pair weight over micro-batches and reduced once, against hand-worked means."""

from __future__ import annotations

import types

import pytest
import torch

from dpo.metrics import MetricAccumulator


def values(loss: list[float], component: list[float] | None) -> dict[str, torch.Tensor | None]:
    t = torch.tensor(loss)
    out: dict[str, torch.Tensor | None] = {"loss": t, "rewards/chosen": t, "rewards/rejected": t,
                                           "rewards/margins": t, "rewards/accuracies": t, "logps/chosen": t,
                                           "logps/rejected": t, "logratio/chosen": None}
    if component is not None:
        out["loss/bco_pair"] = torch.tensor(component)
    return out


def test_components_are_weighted_means_over_micro_batches_and_survive_reset():
    acc = MetricAccumulator("cpu")
    one_process = types.SimpleNamespace(num_processes=1)
    acc.add(values([1.0, 3.0], [10.0, 20.0]), torch.tensor([1.0, 1.0]), num_tokens=5)
    acc.add(values([5.0, 7.0], [30.0, 99.0]), torch.tensor([1.0, 0.0]), num_tokens=3)  # second pair is padding
    out = acc.reduce(one_process)
    assert out["loss"] == pytest.approx((1 + 3 + 5) / 3)
    assert out["loss/bco_pair"] == pytest.approx((10 + 20 + 30) / 3)
    assert "logratio/chosen" not in out and out["num_pairs"] == 3 and out["num_tokens"] == 8
    acc.add(values([2.0], [4.0]), torch.tensor([1.0]), num_tokens=1)  # the next step starts from zero
    assert acc.reduce(one_process)["loss/bco_pair"] == pytest.approx(4.0)
