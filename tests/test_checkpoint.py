"""dpo/checkpoint.py: checkpoints are data (a crafted pickle never runs on resume), every file is checked against
the manifest, `latest` falls back from a corrupt newest checkpoint to the previous one and resumes exactly, and a
resume with changed settings is refused unless asked for."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from builders import make_data_dir, make_model_dir, make_tokenizer
from dpo.checkpoint import MANIFEST_FILE, CheckpointError, list_checkpoints, verify_checkpoint, write_manifest
from dpo.config import load_config
from dpo.metrics import read_metrics
from dpo.train import main, train

COMMON = ("--learning_rate", "1e-3", "--seed", "7", "--batch_size", "4", "--max_steps", "6", "--save_steps", "2",
          "--lora", "--lora_dropout", "0.1")  # LoRA dropout draws random numbers: resume must restore the RNG


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("checkpoint_inputs")
    tokenizer = make_tokenizer()
    model = make_model_dir(root / "model", tokenizer, seed=0)
    data = make_data_dir(root / "data", tokenizer, n_train=32, n_eval=0, seed=0)
    full = root / "full"
    train(load_config(["--model_path", str(model), "--data_path", str(data), "--output_dir", str(full), *COMMON]))
    return {"model": str(model), "data": str(data), "full": full}


def args(inputs, out: Path, *extra: str) -> list[str]:
    return ["--model_path", inputs["model"], "--data_path", inputs["data"], "--output_dir", str(out), *COMMON,
            *extra]


def interrupted_copy(inputs, tmp_path: Path) -> Path:
    """The full run as it was after checkpoint-4: later metrics and final/ lost."""
    out = shutil.copytree(inputs["full"], tmp_path / "run")
    shutil.rmtree(out / "final")
    return out


class WritesMarker:
    """Unpickling this creates `path`: what a hostile checkpoint file would do (run code)."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def adapter_weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "adapter_model.safetensors"))


def assert_same_final(a: Path, b: Path) -> None:
    wa, wb = adapter_weights(a / "final"), adapter_weights(b / "final")
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], rtol=1e-6, atol=1e-6)


def one_error_line(capsys) -> str:
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("dpo.train:")]
    assert len(err) == 1, err
    return err[0]


def test_checkpoints_hold_only_data(inputs):
    """No pickle of Python objects: JSON for scheduler, generators, trainer state and config; tensor files load
    with weights_only=True; the manifest lists every file."""
    for checkpoint in list_checkpoints(inputs["full"]):
        names = {p.name for p in checkpoint.iterdir()}
        assert not any(n.endswith(".pkl") for n in names), names
        assert {"scheduler_state.json", "rng_state_0.json", "trainer_state.json", "run_config.json",
                MANIFEST_FILE} <= names
        for tensor_file in checkpoint.glob("*.bin"):
            torch.load(tensor_file, weights_only=True)
        listed = json.loads((checkpoint / MANIFEST_FILE).read_text())["files"]
        assert sorted(listed) == sorted(names - {MANIFEST_FILE})
        verify_checkpoint(checkpoint)


@pytest.mark.parametrize("hostile", ["added_pickle", "added_pickle_in_manifest", "optimizer_replaced",
                                     "random_states_in_manifest"])
def test_a_crafted_pickle_never_runs_on_resume(inputs, tmp_path, capsys, hostile):
    out = interrupted_copy(inputs, tmp_path)
    checkpoint = out / "checkpoint-4"
    config_before = (out / "config.yaml").read_bytes()
    marker = tmp_path / "marker"
    target = {"added_pickle": "custom_checkpoint_0.pkl", "added_pickle_in_manifest": "custom_checkpoint_0.pkl",
              "optimizer_replaced": "optimizer.bin", "random_states_in_manifest": "random_states_0.pkl"}[hostile]
    torch.save({"state": WritesMarker(marker)} if hostile != "optimizer_replaced" else WritesMarker(marker),
               checkpoint / target)
    if hostile != "added_pickle":  # a forger who also rewrites the checksums
        write_manifest(checkpoint)
    code = main(args(inputs, out, "--resume_from_checkpoint", str(checkpoint)))
    assert not marker.exists(), "a pickle in the checkpoint ran code"
    assert code == 2
    if hostile == "optimizer_replaced":  # listed, so read, but with weights_only=True: refused, named
        assert "optimizer.bin: holds Python objects" in one_error_line(capsys)
    else:  # a pickle is never read, listed or not
        assert f"{target}: a pickle" in one_error_line(capsys)
    assert not (out / "final").exists() and (out / "config.yaml").read_bytes() == config_before


def test_corrupt_newest_checkpoint_falls_back_and_resumes_exactly(inputs, tmp_path, capsys):
    out = interrupted_copy(inputs, tmp_path)
    weights = out / "checkpoint-4" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    # Named by file when asked for explicitly.
    assert main(args(inputs, out, "--resume_from_checkpoint", str(out / "checkpoint-4"))) == 2
    assert f"{weights.name}: corrupted" in one_error_line(capsys)
    (out / ".tmp-checkpoint-6").mkdir()  # a save interrupted by a kill
    (out / ".tmp-checkpoint-6" / "optimizer.bin").write_bytes(b"partial")
    # latest: says so, takes checkpoint-2, and ends where the uninterrupted run ended.
    assert main(args(inputs, out, "--resume_from_checkpoint", "latest")) == 0
    said = capsys.readouterr().out
    assert f"skipping checkpoint-4: {weights}: corrupted" in said and "resuming from checkpoint-2" in said
    assert "removed .tmp-checkpoint-6" in said and not (out / ".tmp-checkpoint-6").exists()
    assert_same_final(out, inputs["full"])
    full_rows, rows = read_metrics(inputs["full"]), read_metrics(out)
    assert [r["step"] for r in rows] == [r["step"] for r in full_rows]
    # Per value: pytest 9's approx takes no nested (step, loss) pairs.
    assert [r["loss"] for r in rows] == pytest.approx([r["loss"] for r in full_rows], rel=1e-6)


def test_latest_with_nothing_to_resume_is_one_line(inputs, tmp_path, capsys):
    assert main(args(inputs, tmp_path / "empty", "--resume_from_checkpoint", "latest")) == 2
    assert "holds no checkpoint to resume from" in one_error_line(capsys)
    out = interrupted_copy(inputs, tmp_path)
    for checkpoint in list_checkpoints(out):
        (checkpoint / "trainer_state.json").write_text("{not json")
    assert main(args(inputs, out, "--resume_from_checkpoint", "latest")) == 2
    assert "no checkpoint in" in one_error_line(capsys)


@pytest.mark.parametrize("change", [("--beta", "0.5"), ("--seed", "8"), ("--batch_size", "2"),
                                    ("--loss_type", "ipo"), ("--learning_rate", "2e-3")])
def test_resume_with_changed_meaning_is_refused_and_config_kept(inputs, tmp_path, capsys, change):
    out = interrupted_copy(inputs, tmp_path)
    before = (out / "config.yaml").read_bytes()
    assert main([*args(inputs, out), *change, "--resume_from_checkpoint", "latest"]) == 2  # the last flag wins
    line = one_error_line(capsys)
    assert f"{change[0][2:]} " in line and "--resume_allow_changes" in line
    assert (out / "config.yaml").read_bytes() == before
    assert not (out / "final").exists()


def test_allowed_changes(inputs, tmp_path, capsys):
    """Harmless keys are logged; a meaning change goes through with --resume_allow_changes, and a new learning rate
    then really applies (config.yaml describes what ran)."""
    out = interrupted_copy(inputs, tmp_path)
    assert main([*args(inputs, out), "--logging_steps", "2", "--resume_from_checkpoint", "latest"]) == 0
    assert "resume: changed logging_steps 1 -> 2" in capsys.readouterr().out
    out = interrupted_copy(inputs, tmp_path / "lr")
    assert main([*args(inputs, out), "--learning_rate", "2e-3", "--resume_from_checkpoint", "latest",
                 "--resume_allow_changes"]) == 0
    assert "learning_rate 0.001 -> 0.002" in capsys.readouterr().out
    resumed = {r["step"]: r["learning_rate"] for r in read_metrics(out) if r["split"] == "train"}
    full = {r["step"]: r["learning_rate"] for r in read_metrics(inputs["full"]) if r["split"] == "train"}
    assert resumed[5] == pytest.approx(2 * full[5], rel=1e-9) and resumed[4] == pytest.approx(full[4])
    assert load_config(["--config", str(out / "config.yaml")]).learning_rate == 2e-3


def test_a_forged_manifest_cannot_point_outside_the_checkpoint(inputs, tmp_path):
    checkpoint = Path(shutil.copytree(list_checkpoints(inputs["full"])[-1], tmp_path / "checkpoint-4"))
    manifest = json.loads((checkpoint / MANIFEST_FILE).read_text())
    manifest["files"]["../outside.bin"] = {"size": 1, "sha256": "0" * 64}
    (checkpoint / MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="outside the checkpoint folder"):
        verify_checkpoint(checkpoint)
