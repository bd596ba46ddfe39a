"""dpo/guard.py: non-finite weights stop a run before any checkpoint or final/ is written, weights that blow up
while finite and loss spikes warn loudly, and non-finite hyper-parameters are config errors."""

from __future__ import annotations

import math

import pytest
import torch

from builders import accelerator
from demo.tiny import build_model
from dpo.config import ConfigError, load_config
from dpo.errors import TrainingDiverged
from dpo.guard import DivergenceGuard


def guarded_model():
    model = build_model(vocab_size=64, hidden_size=16, num_layers=1, num_heads=2, seed=0)
    messages: list[str] = []
    params = [p for p in model.parameters() if p.requires_grad]
    return model, params, DivergenceGuard(params, accelerator(), log=messages.append), messages


def test_weight_norm_is_the_l2_norm_of_every_trainable_weight():
    _, params, guard, _ = guarded_model()
    expected = math.sqrt(sum(float(p.detach().double().pow(2).sum()) for p in params))
    norm, finite = guard.weight_norm()
    assert finite and norm == pytest.approx(expected, rel=1e-6)


def test_non_finite_weights_stop_and_finite_blow_ups_warn():
    _, params, guard, messages = guarded_model()
    start = guard.start_norm
    with torch.no_grad():
        params[0].mul_(30.0 * start / params[0].norm())  # the norm grows to ~30x the start
    norm = guard.check_weights(step=3)
    assert norm > 10 * start and len(messages) == 1 and "30x" in messages[0] and "step 3" in messages[0]
    guard.check_weights(step=4)
    assert len(messages) == 1  # once per power of ten, not every step
    with torch.no_grad():
        params[1].fill_(1e25)  # finite, but its float32 squares overflow: still warned, not stopped
    guard.check_weights(step=5)
    assert len(messages) == 2
    with torch.no_grad():
        params[2].view(-1)[0] = float("nan")
    with pytest.raises(TrainingDiverged, match="non-finite weights after step 6"):
        guard.check_weights(step=6)


def test_non_finite_loss_or_gradient_norm_stops_and_a_spike_warns():
    _, _, guard, messages = guarded_model()
    for step, loss in enumerate([0.69, 0.65, 0.62, 0.6, 0.58, 0.57], start=1):
        guard.check_step(step, loss, 1.0, not_applied="not applied")
    assert messages == []
    guard.check_step(7, 4.0, 1.0, not_applied="not applied")  # > 3x the median and > 1 nat above it
    assert len(messages) == 1 and "loss spike at step 7" in messages[0]
    for loss, grad_norm in ((math.nan, 1.0), (0.5, math.inf)):
        with pytest.raises(TrainingDiverged, match="non-finite loss"):
            guard.check_step(8, loss, grad_norm, not_applied="not applied")


@pytest.mark.parametrize("key", ["learning_rate", "beta", "max_grad_norm", "weight_decay", "warmup_ratio"])
@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_non_finite_hyper_parameters_are_config_errors(key, value):
    with pytest.raises(ConfigError, match=f"{key}: must be a finite number"):
        load_config([f"--{key}", value])
