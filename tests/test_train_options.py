"""Loop options end to end: each loss type's first step against its hand-worked value, the RPO term, bf16 autocast,
and wandb (mocked: it is the one external boundary, it needs an account)."""

from __future__ import annotations

import math
import sys
import types
from pathlib import Path

import pytest
from accelerate.state import AcceleratorState

from builders import make_data_dir, make_model_dir, make_tokenizer
from dpo.config import load_config
from dpo.metrics import read_metrics
from dpo.train import train


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("options_inputs")
    tokenizer = make_tokenizer()
    return {"model": str(make_model_dir(root / "model", tokenizer, seed=3)),
            "data": str(make_data_dir(root / "data", tokenizer, n_train=8, n_eval=4, seed=5))}


def first_step(inputs, out: Path, *flags: str) -> dict:
    cfg = load_config(["--model_path", inputs["model"], "--data_path", inputs["data"], "--output_dir", str(out),
                       "--batch_size", "1", "--max_steps", "1", "--learning_rate", "1e-4", *flags])
    # Accelerate's state is process-global; each run here asks for its own precision.
    AcceleratorState._reset_state(reset_partial_state=True)
    try:
        train(cfg)
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
    return [r for r in read_metrics(out) if r["split"] == "train"][0]


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


# At step 1 the policy equals the reference, so h = 0 for every pair:
#   sigmoid: -log σ(0) = log 2;  ipo: (0 - 1/(2β))² = (1/0.2)² = 25 for β = 0.1;  hinge: relu(1 - 0) = 1.
@pytest.mark.parametrize("loss_type, expected", [("sigmoid", math.log(2)), ("ipo", 25.0), ("hinge", 1.0)])
def test_first_step_loss_of_each_reference_loss(inputs, tmp_path, loss_type, expected):
    row = first_step(inputs, tmp_path, "--loss_type", loss_type, "--beta", "0.1")
    assert row["loss"] == pytest.approx(expected, rel=1e-6)
    assert row["rewards/margins"] == pytest.approx(0.0, abs=1e-6)


def test_documented_mix_from_the_command_line(inputs, tmp_path):
    """`python -m dpo.train --loss_type '[sigmoid, bco_pair, sft]' --loss_weights '[0.8, 0.2, 1.0]'`: at step 1
    (policy = reference) sigmoid is log 2 and bco_pair -2 log σ(0) = 2 log 2; the total is the weighted sum of the
    logged components. (The values against TRL: tests/test_trl_crosscheck_losses.py.)"""
    from dpo.train import main

    out = tmp_path / "mix"
    AcceleratorState._reset_state(reset_partial_state=True)
    try:
        assert main(["--model_path", inputs["model"], "--data_path", inputs["data"], "--output_dir", str(out),
                     "--batch_size", "2", "--max_steps", "2", "--loss_type", "[sigmoid, bco_pair, sft]",
                     "--loss_weights", "[0.8, 0.2, 1.0]"]) == 0
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
    rows = read_metrics(out)
    first = rows[0]
    assert first["loss/sigmoid"] == pytest.approx(math.log(2), rel=1e-6)
    assert first["loss/bco_pair"] == pytest.approx(2 * math.log(2), rel=1e-6)
    assert first["loss/sft"] > 0
    for row in rows:  # train and eval rows alike
        total = 0.8 * row["loss/sigmoid"] + 0.2 * row["loss/bco_pair"] + 1.0 * row["loss/sft"]
        assert row["loss"] == pytest.approx(total, rel=1e-6), row["split"]


def test_wpo_and_ld_dpo_run_end_to_end(inputs, tmp_path):
    """WPO and LD-DPO through the train loop (values against TRL: tests/test_trl_crosscheck_losses.py). At step 1
    h = 0 for every pair, so with one pair per step the sigmoid loss is log 2 times that pair's WPO weight, which is
    not 1 for a model that is not uniform."""
    row = first_step(inputs, tmp_path, "--use_weighting", "--ld_alpha", "0.5")
    assert row["loss"] > 0 and row["loss"] != pytest.approx(math.log(2), rel=1e-3)
    assert row["rewards/margins"] == pytest.approx(0.0, abs=1e-6)


def test_label_smoothing_keeps_log2_at_zero_margin(inputs, tmp_path):
    # -(1-ε) log σ(0) - ε log σ(0) = log 2 whatever ε
    row = first_step(inputs, tmp_path, "--label_smoothing", "0.2")
    assert row["loss"] == pytest.approx(math.log(2), rel=1e-6)


def test_simpo_first_step_from_logged_logps(inputs, tmp_path):
    """SimPO is reference-free and length-normalised: with one pair per step the logged (averaged) log-probs give
    the loss by hand: -log σ(β(lc - lr) - γ); its rewards are β·lc and β·lr; there is no log-ratio."""
    beta, gamma = 2.0, 0.5
    row = first_step(inputs, tmp_path, "--loss_type", "simpo", "--beta", str(beta), "--simpo_gamma", str(gamma))
    lc, lr = row["logps/chosen"], row["logps/rejected"]
    assert -math.log(sigmoid(beta * (lc - lr) - gamma)) == pytest.approx(row["loss"], rel=1e-5)
    assert row["rewards/chosen"] == pytest.approx(beta * lc, rel=1e-6)
    assert row["rewards/rejected"] == pytest.approx(beta * lr, rel=1e-6)
    assert "logratio/chosen" not in row  # no reference: not measurable, so not logged (rather than logged as 0)


def test_rpo_adds_the_chosen_nll(inputs, tmp_path):
    """With averaged log-probs the logged logps/chosen is the mean token log-prob, i.e. -NLL per token:
    loss = log 2 + α · (-logps/chosen)."""
    alpha = 0.7
    row = first_step(inputs, tmp_path, "--rpo_alpha", str(alpha), "--average_log_prob", "true")
    assert row["loss"] == pytest.approx(math.log(2) + alpha * -row["logps/chosen"], rel=1e-5)


def test_average_log_prob_divides_by_answer_length(inputs, tmp_path):
    summed = first_step(inputs, tmp_path / "sum")
    averaged = first_step(inputs, tmp_path / "avg", "--average_log_prob", "true")
    # the same first pair (same seed and order): the ratio is its chosen answer's token count, an integer >= 2
    ratio = summed["logps/chosen"] / averaged["logps/chosen"]
    assert ratio == pytest.approx(round(ratio), abs=1e-4) and round(ratio) >= 2


def test_bf16_autocast_on_cpu(inputs, tmp_path):
    fp32 = first_step(inputs, tmp_path / "fp32")
    bf16 = first_step(inputs, tmp_path / "bf16", "--mixed_precision", "bf16")
    # policy and reference share the autocast, so they still agree exactly at step 1
    assert bf16["loss"] == pytest.approx(math.log(2), abs=1e-6)
    # bf16 keeps ~3 significant digits per matmul; summed answer log-probs stay within 1%
    assert bf16["logps/chosen"] == pytest.approx(fp32["logps/chosen"], rel=1e-2)


def test_wandb_receives_the_logged_metrics(inputs, tmp_path, monkeypatch):
    calls: dict[str, list] = {"init": [], "log": [], "finish": []}
    fake = types.ModuleType("wandb")
    fake.init = lambda **kw: calls["init"].append(kw)
    fake.log = lambda data, step: calls["log"].append((step, data))
    fake.finish = lambda: calls["finish"].append(True)
    monkeypatch.setitem(sys.modules, "wandb", fake)
    row = first_step(inputs, tmp_path, "--use_wandb", "--run_name", "unit")
    assert calls["init"][0]["name"] == "unit" and calls["init"][0]["config"]["beta"] == 0.1
    step, data = calls["log"][0]
    assert step == 1 and data["train/loss"] == row["loss"]
    assert calls["finish"] == [True]


def test_wandb_missing_is_a_clear_error(inputs, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb raises ImportError
    with pytest.raises(RuntimeError, match=r"pip install -e '\.\[wandb\]'"):
        first_step(inputs, tmp_path, "--use_wandb")
