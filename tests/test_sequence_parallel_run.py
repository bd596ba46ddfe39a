"""`--sequence_parallel_size 2` on 2 CPU processes (real DeepSpeed engines, gloo, `accelerate launch`) against the
1-process run of the same global batch and seed: 5 steps, every logged train and eval value per step.

    OMP_NUM_THREADS=1 python -m pytest tests/test_sequence_parallel_run.py -m "distributed and slow"

The oracle is the 1-process run: with 2 processes in one sequence-parallel group the data-parallel degree is 1, so
both runs see the same 4 pairs per step; each row is split in two and attention swaps tokens for heads. Equal loss,
log-probs and rewards show the forward is the same function; an equal gradient norm and equal later steps show the
gradients are neither doubled nor halved by the group sum and DeepSpeed's average over both processes. Tolerance:
1e-4 relative (1e-6 absolute near zero), as tests/test_distributed.py.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from dpo.config import load_config
from dpo.train import train
from tests import model_zoo
from tests.builders import make_data_dir, make_model_dir, make_tokenizer
from tests.test_distributed import (
    COMMON,
    REPO,
    assert_close_weights,
    assert_same_trajectory,
    free_port,
    launch_cmd,
    launch_env,
    load_weights,
    read_records,
    run_launch,
)

pytestmark = [pytest.mark.distributed, pytest.mark.slow]
WINDOW = 4  # the windowed model's sliding window: shorter than every prompt of the data
LORA = ("--lora", "--lora_dropout", "0", "--lora_r", "4", "--lora_alpha", "8")


def make_windowed_model_dir(path: Path, tokenizer) -> Path:
    """Gemma 3 (text): sliding-window and full-attention layers ({layer type: mask}), 4 heads, 2 key/value heads."""
    config = model_zoo.build_config("gemma3_text", vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                                    bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    config.sliding_window = WINDOW
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


class SpRuns:
    """Launched runs shared by this module's tests (each costs ~20-40 s on 2 cores)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.tokenizer = make_tokenizer()
        self.model = make_model_dir(root / "model", self.tokenizer, seed=0)
        self.data = make_data_dir(root / "data", self.tokenizer, n_train=32, n_eval=10, seed=0)
        self.cache: dict[str, Path] = {}

    def args(self, out: Path, *extra: str, model: Path | None = None, data: Path | None = None) -> list[str]:
        return ["--model_path", str(model or self.model), "--data_path", str(data or self.data), "--output_dir",
                str(out), "--batch_size", "4", *COMMON, *extra]

    def run(self, name: str, config: str, *extra: str, num_processes: int = 2, **paths: Path) -> Path:
        if name not in self.cache:
            out = self.root / name
            sp = ("--sequence_parallel_size", "2") if num_processes > 1 else ()
            log = run_launch(launch_cmd(config, self.args(out, *sp, *extra, **paths), num_processes=num_processes,
                                        port=free_port()))
            (self.root / f"{name}.log").write_text(log)
            self.cache[name] = out
        return self.cache[name]

    def single(self, name: str = "single", *extra: str, **paths: Path) -> Path:
        return self.run(name, "single", *extra, num_processes=1, **paths)

    def log(self, name: str) -> str:
        return (self.root / f"{name}.log").read_text()


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> SpRuns:
    return SpRuns(tmp_path_factory.mktemp("sequence_parallel"))


@pytest.mark.parametrize("config, extra", [
    ("zero2", ()),  # the default layout (the probe's choice: packed with prefix sharing)
    # One right-padded sequence per row (the 2D mask becomes a dense one), 2 pairs x 2 accumulated micro-batches.
    ("zero1", ("--layout", "padded", "--batch_size", "2", "--gradient_accumulation_steps", "2")),
    ("zero3", ("--save_steps", "3")),  # parameters partitioned too; reused by the SIGKILL test
    # DDP (DeepSpeed's communication is set up for its all-to-all only); attention recomputed in backward.
    ("ddp", ("--gradient_checkpointing",)),
])
def test_split_rows_reproduce_the_single_process_run(runs: SpRuns, config: str, extra: tuple[str, ...]) -> None:
    name = f"sp_{config}"
    out = runs.run(name, config, *extra)
    assert ("[dpo] sequence parallel: each row split across 2 processes (sdpa, 1 data-parallel groups; checked on the "
            "model against whole rows") in runs.log(name)
    if "padded" in extra:
        assert "[dpo] layout: padded on sdpa" in runs.log(name)
    assert_same_trajectory(out, runs.single())
    records = read_records(out)
    assert records[("eval", 5)]["num_pairs"] == 10 and records[("train", 1)]["num_pairs"] == 4  # counted once


def test_zero3_split_final_weights_equal_the_single_process_weights(runs: SpRuns) -> None:
    got = load_weights(runs.run("sp_zero3", "zero3", "--save_steps", "3") / "final")
    want = load_weights(runs.single() / "final")
    assert_close_weights(got, want, atol=1e-5)
    assert max((got[n] - w).abs().max().item() for n, w in load_weights(runs.model).items()) > 1e-4  # it trained


def test_sigkill_after_a_checkpoint_then_resume_equals_the_uninterrupted_run(runs: SpRuns) -> None:
    """Rank 1 dies by SIGKILL during step 4 (after checkpoint-3); the launcher takes rank 0 down with it. Resuming
    from the latest checkpoint on the same 2 processes gives the uninterrupted split run's steps and weights."""
    out = runs.root / "sp_killed"
    args = runs.args(out, "--sequence_parallel_size", "2", "--save_steps", "3", "--save_on_signal", "none")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", "accelerate_configs/zero3.yaml",
           "--num_processes", "2", "--main_process_port", str(free_port()), "tests/signal_driver.py", *args]
    env = launch_env()
    env["DPO_TEST_SIGNAL_STEP"] = "4:SIGKILL:1"
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0, proc.stdout[-2000:]
    assert (out / "checkpoint-3").is_dir() and not (out / "final").exists()
    assert "SIGKILL" in proc.stderr or f"exitcode  : -{int(signal.SIGKILL)}" in proc.stderr, proc.stderr[-3000:]
    resumed = run_launch(launch_cmd("zero3", args + ["--resume_from_checkpoint", "latest"], num_processes=2,
                                    port=free_port()))
    assert "resumed from" in resumed and "at step 3" in resumed
    uninterrupted = runs.run("sp_zero3", "zero3", "--save_steps", "3")
    assert_same_trajectory(out, uninterrupted, tol=1e-6)
    assert_close_weights(load_weights(out / "final"), load_weights(uninterrupted / "final"), atol=1e-7)


def test_lora_with_adapters_disabled_reference(runs: SpRuns) -> None:
    single = runs.root / "lora_single"
    if not single.exists():
        train(load_config(runs.args(single, *LORA)))  # in this process: one launch fewer
    out = runs.run("sp_lora", "zero2", *LORA)
    assert "[dpo] reference: adapters_disabled" in runs.log("sp_lora")
    assert_same_trajectory(out, single)


def test_precomputed_reference_computed_split(runs: SpRuns) -> None:
    """precompute_ref itself runs split (2 processes, one group), then training reads the stored values; the
    1-process run computes its reference on the fly, so this also proves the stored values are the reference's."""
    data = runs.root / "data_precomputed"
    if not data.exists():
        shutil.copytree(runs.data, data)
        log = run_launch(launch_cmd("zero3", ["--model_path", str(runs.model), "--data_path", str(data),
                                              "--batch_size", "2", "--sequence_parallel_size", "2"],
                                    num_processes=2, port=free_port(), module="dpo.precompute_ref"))
        (runs.root / "precompute.log").write_text(log)
    out = runs.run("sp_precomputed", "zero2", "--reference", "precomputed", data=data)
    assert "[dpo] reference: precomputed" in runs.log("sp_precomputed")
    assert_same_trajectory(out, runs.single())


def test_sliding_window_shorter_than_the_prompts(runs: SpRuns) -> None:
    model = runs.root / "windowed_model"
    if not model.exists():
        make_windowed_model_dir(model, runs.tokenizer)
    from datasets import load_from_disk

    prompts = load_from_disk(str(runs.data / "train"))["prompt_ids"]
    assert min(len(p) for p in prompts) > WINDOW  # the window bites inside every prompt
    single = runs.single("windowed_single", model=model)
    out = runs.run("sp_windowed", "zero2", model=model)
    assert "sliding_attention: sliding window 4" in runs.log("sp_windowed")  # masks {layer type: mask}
    assert_same_trajectory(out, single)


def test_four_processes_two_groups_of_two(runs: SpRuns) -> None:
    """Data parallel over sequence-parallel groups: 4 processes, 2 groups of 2, 2 pairs per group, against the
    1-process batch of 4. DeepSpeed averages over all 4 processes; each group's gradient arrives doubled by the
    group sum, so the average is the mean of the 2 groups' gradients, the 1-process gradient."""
    out = runs.run("sp_four", "zero2", "--batch_size", "2", num_processes=4)
    assert "2 per device x 1 accumulation x 2 sequence-parallel groups" in runs.log("sp_four")
    assert_same_trajectory(out, runs.single())
