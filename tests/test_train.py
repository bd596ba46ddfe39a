"""The training loop on one process: gradient-accumulation invariance, exact resume (also after SIGKILL), early
stopping, the log-ratio warning, divergence handling, every output written, and learning actually happening."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from builders import make_data_dir, make_model_dir, make_tokenizer
from dpo.checkpoint import list_checkpoints
from dpo.config import load_config
from dpo.metrics import PAIR_METRICS, read_metrics
from dpo.train import TrainingDiverged, train

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("train_inputs")
    tokenizer = make_tokenizer()
    model_dir = make_model_dir(root / "model", tokenizer, seed=0)
    data_dir = make_data_dir(root / "data", tokenizer, n_train=32, n_eval=12, seed=0)
    return {"model": str(model_dir), "data": str(data_dir)}


def run(inputs, out: Path, *flags: str) -> dict:
    cfg = load_config(["--model_path", inputs["model"], "--data_path", inputs["data"], "--output_dir", str(out),
                       "--learning_rate", "1e-3", "--seed", "7", *flags])
    return train(cfg)


def train_records(out: Path, split: str = "train") -> list[dict]:
    return [r for r in read_metrics(out) if r["split"] == split]


def final_weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "final" / "model.safetensors"))


def assert_same_trajectory(a: list[dict], b: list[dict], *, tol: float, keys=PAIR_METRICS + ("grad_norm",)):
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for ra, rb in zip(a, b):
        for key in (k for k in keys if k in ra or k in rb):  # eval rows have no grad_norm / learning_rate
            assert ra[key] == pytest.approx(rb[key], abs=tol, rel=tol), (ra["step"], key)


def test_gradient_accumulation_invariance(inputs, tmp_path):
    """Micro-batch 1 x 4 accumulation steps and micro-batch 4 x 1 take the same optimizer steps."""
    run(inputs, tmp_path / "a", "--batch_size", "4", "--gradient_accumulation_steps", "1", "--max_steps", "4")
    run(inputs, tmp_path / "b", "--batch_size", "1", "--gradient_accumulation_steps", "4", "--max_steps", "4")
    assert_same_trajectory(train_records(tmp_path / "a"), train_records(tmp_path / "b"), tol=1e-5)
    wa, wb = final_weights(tmp_path / "a"), final_weights(tmp_path / "b")
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], rtol=1e-5, atol=1e-5)


def test_resume_equals_uninterrupted(inputs, tmp_path):
    flags = ("--batch_size", "4", "--max_steps", "8", "--save_steps", "3", "--eval_steps", "4")
    run(inputs, tmp_path / "full", *flags)
    # the interrupted run: everything after checkpoint-3 is lost
    interrupted = tmp_path / "interrupted"
    shutil.copytree(tmp_path / "full", interrupted)
    shutil.rmtree(interrupted / "final")
    shutil.rmtree(interrupted / "checkpoint-6")
    run(inputs, interrupted, *flags, "--resume_from_checkpoint", "latest")
    full, resumed = read_metrics(tmp_path / "full"), read_metrics(interrupted)
    assert [(r["step"], r["split"]) for r in full] == [(r["step"], r["split"]) for r in resumed]
    assert_same_trajectory(full, resumed, tol=1e-6, keys=PAIR_METRICS + ("grad_norm", "learning_rate"))
    for name, value in final_weights(tmp_path / "full").items():
        torch.testing.assert_close(final_weights(interrupted)[name], value, rtol=1e-6, atol=1e-6)


@pytest.mark.slow  # three training processes
def test_sigkill_then_resume_latest(inputs, tmp_path):
    """A real process killed with SIGKILL after a checkpoint, resumed with --resume_from_checkpoint latest."""
    common = ["--model_path", inputs["model"], "--data_path", inputs["data"], "--learning_rate", "1e-3",
              "--seed", "7", "--batch_size", "2", "--num_epochs", "4", "--save_steps", "5"]
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'tests'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    reference = tmp_path / "reference"
    subprocess.run([sys.executable, "-m", "dpo.train", *common, "--output_dir", str(reference)], check=True,
                   env=env, capture_output=True, timeout=300)
    victim = tmp_path / "victim"
    proc = subprocess.Popen([sys.executable, "-m", "dpo.train", *common, "--output_dir", str(victim)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while not list_checkpoints(victim) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert list_checkpoints(victim), "no checkpoint was written before the kill"
    resumed = subprocess.run([sys.executable, "-m", "dpo.train", *common, "--output_dir", str(victim),
                              "--resume_from_checkpoint", "latest"], env=env, capture_output=True, text=True,
                             timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_trajectory(train_records(reference), train_records(victim), tol=1e-6)


def test_every_output_of_a_50_step_run(inputs, tmp_path):
    out = tmp_path / "run"
    run(inputs, out, "--batch_size", "2", "--max_steps", "50", "--eval_steps", "25", "--save_steps", "20",
        "--save_total_limit", "1", "--logging_steps", "5")
    records = read_metrics(out)
    train_rows = [r for r in records if r["split"] == "train"]
    eval_rows = [r for r in records if r["split"] == "eval"]
    assert [r["step"] for r in train_rows] == list(range(5, 51, 5))
    assert [r["step"] for r in eval_rows] == [25, 50]
    expected = set(PAIR_METRICS) | {"learning_rate", "grad_norm", "tokens_per_second", "step", "split"}
    assert expected <= set(train_rows[0])
    assert set(PAIR_METRICS) <= set(eval_rows[0])
    assert eval_rows[0]["num_pairs"] == 12  # every eval pair exactly once
    # only the newest checkpoint is kept
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-40"]
    assert not any(p.name.startswith(".tmp") for p in out.iterdir())
    # the resolved config
    assert load_config(["--config", str(out / "config.yaml")]).max_steps == 50
    # final/ loads with from_pretrained, tokenizer beside it
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(out / "final")
    tokenizer = AutoTokenizer.from_pretrained(out / "final")
    assert (out / "final" / "model.safetensors").is_file()
    assert model.config.vocab_size == len(tokenizer)
    # TensorBoard holds the same numbers as metrics.jsonl
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    tb_loss = {e.step: e.value for e in events.Scalars("train/loss")}
    for row in train_rows:
        assert tb_loss[row["step"]] == pytest.approx(row["loss"], rel=1e-6)
    assert {e.step for e in events.Scalars("eval/rewards/accuracies")} == {25, 50}


def test_first_step_metrics_hand_checked(inputs, tmp_path):
    """At step 1 the policy equals the reference: every reward is 0, the loss is log 2, the log-ratio is 0."""
    run(inputs, tmp_path / "o", "--batch_size", "4", "--max_steps", "1")
    first = train_records(tmp_path / "o")[0]
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-6)
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "logratio/chosen"):
        assert first[key] == pytest.approx(0.0, abs=1e-6)
    assert first["rewards/accuracies"] == 0.0  # ties do not count as correct
    assert first["learning_rate"] == pytest.approx(1e-3)  # no warm-up by default
    assert first["logps/chosen"] < 0 and first["logps/rejected"] < 0


def test_loss_falls_and_accuracy_rises(inputs, tmp_path):
    out = tmp_path / "learn"
    run(inputs, out, "--batch_size", "4", "--num_epochs", "6", "--lr_scheduler", "constant", "--beta", "0.5")
    rows = train_records(out)
    assert len(rows) == 48
    early, late = rows[:8], rows[-8:]
    mean = lambda rs, k: sum(r[k] for r in rs) / len(rs)  # noqa: E731
    assert mean(late, "loss") < mean(early, "loss") - 0.1
    assert mean(late, "rewards/accuracies") > mean(early, "rewards/accuracies") + 0.2
    assert mean(late, "rewards/margins") > 0


def test_early_stopping_and_logratio_warning(inputs, tmp_path, capsys):
    out = tmp_path / "es"
    # learning_rate 0: eval loss never improves, so patience 2 stops at the third evaluation (step 3)
    result = run(inputs, out, "--batch_size", "4", "--max_steps", "20", "--eval_steps", "1", "--learning_rate", "0",
                 "--early_stopping_patience", "2")
    assert result["stopped_early"] is True and result["step"] == 3
    assert [r["step"] for r in read_metrics(out) if r["split"] == "eval"] == [1, 2, 3]
    assert "early stopping at step 3" in capsys.readouterr().out
    run(inputs, tmp_path / "lr", "--batch_size", "4", "--max_steps", "3", "--eval_steps", "3", "--max_logratio",
        "1e-9", "--learning_rate", "1e-2")
    assert "beyond ±max_logratio 1e-09" in capsys.readouterr().out
    run(inputs, tmp_path / "lr_quiet", "--batch_size", "4", "--max_steps", "3", "--eval_steps", "3",
        "--max_logratio", "1e6", "--learning_rate", "1e-2")
    assert "max_logratio" not in capsys.readouterr().out


def test_divergence_stops_before_the_step_and_keeps_the_checkpoint(inputs, tmp_path, capsys):
    out = tmp_path / "nan"
    with pytest.raises(TrainingDiverged, match="non-finite"):
        run(inputs, out, "--batch_size", "4", "--max_steps", "10", "--save_steps", "1", "--learning_rate", "1e30",
            "--max_grad_norm", "0")
    # Step 1 took the weights to ~1e30 (finite): warned at once, long before the NaN of step 2.
    assert "WARNING: the trainable weights' norm" in capsys.readouterr().out
    checkpoints = list_checkpoints(out)
    assert checkpoints, "the checkpoint written before the divergence must stay"
    state = json.loads((checkpoints[-1] / "trainer_state.json").read_text())
    assert state["step"] == int(checkpoints[-1].name.split("-")[1])
    weights = load_file(str(checkpoints[-1] / "model.safetensors"))
    assert all(torch.isfinite(w).all() for w in weights.values())
    assert not (out / "final").exists()


def test_cli_reports_config_errors(inputs, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "dpo.train", "--model_path", inputs["model"], "--bogus", "1"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "unknown key 'bogus'" in proc.stderr
