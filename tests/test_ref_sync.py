"""TR-DPO (dpo/ref_sync.py): the soft/hard reference update against a per-parameter oracle, its place in the loop
(after the optimizer step every ref_model_sync_steps), exact resume with the synced reference carried in the
checkpoint as safetensors, and the refusals (LoRA, precomputed, reference-free)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from builders import make_data_dir, make_model_dir, make_tokenizer
from demo.tiny import build_model
from dpo.checkpoint import CheckpointError
from dpo.config import ConfigError, load_config
from dpo.metrics import PAIR_METRICS, read_metrics
from dpo.ref_sync import REFERENCE_FILE, sync_reference
from dpo.train import train


@pytest.fixture(autouse=True, scope="module")
def fresh_accelerate_state():
    from accelerate.state import AcceleratorState

    yield
    AcceleratorState._reset_state(reset_partial_state=True)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("ref_sync_inputs")
    tokenizer = make_tokenizer()
    return {"model": str(make_model_dir(root / "model", tokenizer, seed=0)),
            "data": str(make_data_dir(root / "data", tokenizer, n_train=16, n_eval=0, seed=0)),
            "tokenizer": tokenizer}


def run(inputs, out: Path, *flags: str) -> list[dict]:
    cfg = load_config(["--model_path", inputs["model"], "--data_path", inputs["data"], "--output_dir", str(out),
                       "--learning_rate", "1e-2", "--seed", "3", "--batch_size", "4", "--max_steps", "6",
                       "--lr_scheduler", "constant", *flags])
    train(cfg)
    return [r for r in read_metrics(out) if r["split"] == "train"]


@pytest.mark.parametrize("alpha", [0.6, 1.0])
def test_sync_is_the_mixup_of_every_parameter(inputs, alpha):
    tok = inputs["tokenizer"]
    kwargs = dict(vocab_size=len(tok), hidden_size=32, num_layers=2, pad_token_id=tok.pad_token_id,
                  bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    policy, reference = build_model(seed=0, **kwargs), build_model(seed=1, **kwargs)
    before = {k: v.clone() for k, v in reference.state_dict().items()}
    sync_reference(policy, reference, alpha=alpha)
    after, policy_state = reference.state_dict(), policy.state_dict()
    for name, _ in reference.named_parameters():
        expected = alpha * policy_state[name].double() + (1 - alpha) * before[name].double()
        torch.testing.assert_close(after[name].double(), expected, rtol=1e-6, atol=1e-7)
    assert not torch.equal(after["model.embed_tokens.weight"], before["model.embed_tokens.weight"])
    if alpha == 1.0:  # a hard update: the reference becomes the policy
        for name, _ in reference.named_parameters():
            assert torch.equal(after[name], policy_state[name])


def test_sync_in_the_loop_and_exact_resume(inputs, tmp_path):
    sync = ("--sync_ref_model", "--ref_model_mixup_alpha", "0.6", "--ref_model_sync_steps", "2")
    plain = run(inputs, tmp_path / "plain", "--reference", "model")
    full = run(inputs, tmp_path / "full", "--reference", "model", *sync, "--save_steps", "3")
    # Steps 1-2 see the starting reference either way; from step 3 the synced reference changes the rewards.
    for a, b in zip(plain[:2], full[:2]):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6)
    assert full[2]["rewards/chosen"] != pytest.approx(plain[2]["rewards/chosen"], rel=1e-3)

    checkpoint = tmp_path / "full" / "checkpoint-3"
    saved = load_file(str(checkpoint / REFERENCE_FILE))
    start = load_file(str(Path(inputs["model"]) / "model.safetensors"))
    assert not torch.equal(saved["model.embed_tokens.weight"], start["model.embed_tokens.weight"])  # it moved

    resumed = run(inputs, tmp_path / "full", "--reference", "model", *sync, "--save_steps", "3",
                  "--resume_from_checkpoint", str(checkpoint))
    assert [r["step"] for r in resumed] == [1, 2, 3, 4, 5, 6]
    for a, b in zip(resumed[3:], full[3:]):
        for key in PAIR_METRICS:
            if key in a:
                assert a[key] == pytest.approx(b[key], rel=1e-6, abs=1e-7), (a["step"], key)


def test_resume_without_the_reference_file_is_refused(inputs, tmp_path):
    sync = ("--sync_ref_model", "--ref_model_sync_steps", "2", "--reference", "model", "--save_steps", "3")
    run(inputs, tmp_path / "run", *sync)
    checkpoint = tmp_path / "run" / "checkpoint-3"
    (checkpoint / REFERENCE_FILE).unlink()
    # The checkpoint's manifest lists the synced reference, so resume refuses before anything is loaded.
    with pytest.raises(CheckpointError, match="reference.safetensors: missing from the checkpoint"):
        run(inputs, tmp_path / "run", *sync, "--resume_from_checkpoint", str(checkpoint))


@pytest.mark.parametrize("flags,reason", [
    (["--reference", "precomputed"], "precomputed reference cannot be synced"),
    (["--lora"], "not supported with LoRA"),
    (["--loss_type", "simpo"], "uses no reference to sync"),
    (["--ref_model_mixup_alpha", "1.5"], r"must be in \[0, 1\]"),
    (["--ref_model_sync_steps", "0"], "must be >= 1"),
])
def test_sync_refusals(flags, reason):
    with pytest.raises(ConfigError, match=reason):
        load_config(["--sync_ref_model", *flags])


@pytest.mark.distributed
def test_zero3_sync_and_resume_match_one_process(tmp_path):
    """Under ZeRO-3 (2 processes, partitioned policy and reference) the synced run follows the single-process one,
    writes the same reference.safetensors, and resumes from it exactly."""
    from tests.test_distributed import (
        COMMON,
        assert_same_trajectory,
        free_port,
        launch_cmd,
        run_launch,
    )

    tok = make_tokenizer()
    model = make_model_dir(tmp_path / "model", tok, seed=0)
    data = make_data_dir(tmp_path / "data", tok, n_train=32, n_eval=10, seed=0)
    sync = ["--sync_ref_model", "--ref_model_mixup_alpha", "0.6", "--ref_model_sync_steps", "2",
            "--reference", "model", "--save_steps", "3"]

    def launch(name: str, config: str, processes: int, batch: int, *extra: str) -> Path:
        out = tmp_path / name
        args = ["--model_path", str(model), "--data_path", str(data), "--output_dir", str(out), *COMMON, *sync,
                "--batch_size", str(batch), *extra]
        run_launch(launch_cmd(config, args, num_processes=processes, port=free_port()))
        return out

    # The one-process oracle runs in this process (a launch costs ~20 s more); same flags, batch 4 = 2 x 2.
    from accelerate.state import AcceleratorState

    single = tmp_path / "single"
    AcceleratorState._reset_state(reset_partial_state=True)
    try:
        train(load_config(["--model_path", str(model), "--data_path", str(data), "--output_dir", str(single),
                           *COMMON, *sync, "--batch_size", "4"]))
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
    zero3 = launch("zero3", "zero3", 2, 2)
    assert_same_trajectory(zero3, single)
    got = load_weights_file(zero3 / "checkpoint-3" / REFERENCE_FILE)
    want = load_weights_file(single / "checkpoint-3" / REFERENCE_FILE)
    assert sorted(got) == sorted(want)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-6)
    resumed = launch("zero3", "zero3", 2, 2, "--resume_from_checkpoint", str(zero3 / "checkpoint-3"))  # same dir
    assert_same_trajectory(resumed, single)


def load_weights_file(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))
