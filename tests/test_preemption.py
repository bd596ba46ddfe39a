"""Preemption and resizing (dpo/preemption.py, dpo/resize.py): a signal stops every process after the same step with
a verified checkpoint and exit 75; a signal during a checkpoint write corrupts nothing; a checkpoint of N processes
resumes on M at the same global batch.

    python -m pytest tests/test_preemption.py -m "not distributed and not slow"   # decisions, seconds
    python -m pytest tests/test_preemption.py -m slow          # one process: signals and checkpoints, ~1.5 min
    python -m pytest tests/test_preemption.py -m distributed   # the launcher, and the resize chains

The oracle of every resume: an uninterrupted single-process run with the same seed and global batch. The existing
distributed tests show 1 process = 2 processes for every strategy; so a run stopped and resumed across process
counts must log the same loss, log-probs and rewards at every step (within 1e-4 relative; measured ~1e-7) and end
with the same weights. At least two steps follow every resize: the metrics of step k are computed before step k's
update, so step k+1's are the first to show whether the optimizer's moments moved across intact.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from accelerate.utils import DistributedType
from test_distributed import REPO, assert_close_weights, free_port, launch_env, load_weights, read_records

from builders import make_data_dir, make_model_dir, make_tokenizer
from dpo.checkpoint import list_checkpoints, verify_checkpoint
from dpo.errors import EXIT_PREEMPTED, UserError
from dpo.preemption import PreemptionSignals, parse_signals
from dpo.resize import plan_run, reseed, share_global_batch

DRIVER = str(REPO / "tests" / "signal_driver.py")
TIMEOUT_S = 300
KEYS = ("loss", "logps/chosen", "logps/rejected", "rewards/chosen", "rewards/rejected", "rewards/margins",
        "rewards/accuracies", "grad_norm", "learning_rate")
# Eight steps, global batch 4; LoRA dropout off, since dropout masks differ between process counts by design.
COMMON = ["--max_steps", "8", "--learning_rate", "1e-3", "--seed", "7", "--lr_scheduler", "cosine"]


# ------------------------------------------------------------------------------------------- unit level


def test_signal_names_parse_and_bad_ones_are_refused() -> None:
    assert parse_signals("SIGTERM,SIGUSR1") == [signal.SIGTERM, signal.SIGUSR1]
    assert parse_signals(["usr1", "term", "USR1"]) == [signal.SIGUSR1, signal.SIGTERM]
    assert parse_signals("none") == parse_signals([]) == parse_signals(None) == []
    with pytest.raises(ValueError, match="'KILL' is not one of"):
        parse_signals("KILL")  # cannot be caught: a config naming it would promise what cannot happen


def test_handler_records_and_restores() -> None:
    before = signal.getsignal(signal.SIGUSR2)
    stop = PreemptionSignals("SIGUSR2")
    single = SimpleNamespace(device=torch.device("cpu"), num_processes=1)
    assert not stop.agreed(single)
    os.kill(os.getpid(), signal.SIGUSR2)  # would end this process without the handler
    assert stop.agreed(single) and stop.describe() == "SIGUSR2"
    stop.restore()
    assert signal.getsignal(signal.SIGUSR2) == before
    assert not PreemptionSignals("none").agreed(single)


@pytest.mark.parametrize("global_batch, processes, preferred, expected", [
    (4, 1, 2, (2, 2)),  # 2 processes x 2 -> 1 process: the per-device batch is kept, accumulation doubles
    (4, 2, 4, (2, 1)),  # 1 process x 4 -> 2: each takes half
    (12, 2, 4, (3, 2)),  # share 6: 4 does not divide it, 3 is the largest batch below 4 that does
    (8, 8, 4, (1, 1)),
])
def test_global_batch_is_shared(global_batch: int, processes: int, preferred: int, expected: tuple[int, int]
                                ) -> None:
    batch, accumulation = share_global_batch(global_batch, processes, preferred_batch=preferred)
    assert (batch, accumulation) == expected and batch * accumulation * processes == global_batch


def test_reseed_after_a_resize_is_deterministic_and_distinct_per_process() -> None:
    """Python, NumPy and torch generators: the same draws for the same (seed, step, process), others otherwise."""
    import random

    import numpy as np

    def draws(seed: int, step: int, process: int) -> tuple:
        reseed(seed, step, process)
        return random.random(), float(np.random.rand()), torch.rand(3).tolist()

    first = draws(7, 3, 1)
    assert draws(7, 3, 1) == first
    assert all(a != b for a, b in zip(draws(7, 3, 0), first)) and all(a != b for a, b in zip(draws(7, 4, 1), first))


def fake_accelerator(processes: int, stage: int | None) -> SimpleNamespace:
    """Just what plan_run reads: the process count and the engine (DeepSpeed's config, or torch)."""
    config = {"zero_optimization": {"stage": stage}, "train_micro_batch_size_per_gpu": 2}
    return SimpleNamespace(
        num_processes=processes, gradient_accumulation_steps=1,
        distributed_type=DistributedType.DEEPSPEED if stage is not None else DistributedType.MULTI_CPU,
        state=SimpleNamespace(deepspeed_plugin=SimpleNamespace(deepspeed_config=config)))


def write_topology(folder: Path, processes: int, stage: int | None, batch: int = 2, accumulation: int = 1) -> Path:
    import json

    folder.mkdir(parents=True)
    (folder / "topology.json").write_text(json.dumps({
        "num_processes": processes, "engine": "deepspeed" if stage is not None else "torch", "zero_stage": stage or 0,
        "batch_size": batch, "gradient_accumulation_steps": accumulation}))
    return folder


@pytest.mark.parametrize("written, resumed, mixed_precision, refusal", [
    ((2, 2), (2, None), "no", "written by DeepSpeed ZeRO-2 on 2 processes and this run uses torch"),
    ((2, None), (1, 3), "no", "written by torch (one process or DDP) on 2 processes and this run uses DeepSpeed"),
    ((2, 3), (3, 3), "no", "global batch of 4 pairs cannot be shared evenly by 3 processes"),
    ((2, 3), (1, 3), "fp16", "dynamic loss scale"),
    ((2, 3), (2, 2), "no", "across ZeRO-3 and ZeRO-1/2"),
    ((1, 2), (2, 3), "no", "across ZeRO-3 and ZeRO-1/2"),
])
def test_resizes_that_cannot_be_exact_are_refused(tmp_path: Path, written: tuple, resumed: tuple,
                                                  mixed_precision: str, refusal: str) -> None:
    checkpoint = write_topology(tmp_path / "checkpoint-3", *written)
    cfg = SimpleNamespace(batch_size=2, gradient_accumulation_steps=1, mixed_precision=mixed_precision)
    with pytest.raises(UserError, match=re.escape(refusal)):
        plan_run(cfg, fake_accelerator(*resumed), checkpoint, log=lambda line: None)


def test_resize_plan_keeps_the_global_batch_and_asks_for_the_universal_checkpoint(tmp_path: Path) -> None:
    checkpoint = write_topology(tmp_path / "checkpoint-3", 2, 3)
    cfg = SimpleNamespace(batch_size=2, gradient_accumulation_steps=1, mixed_precision="no")
    accelerator = fake_accelerator(1, 3)
    plan = plan_run(cfg, accelerator, checkpoint, log=lambda line: None)
    assert (plan.batch_size, plan.gradient_accumulation_steps, plan.resized) == (2, 2, True)
    config = accelerator.state.deepspeed_plugin.deepspeed_config
    assert accelerator.gradient_accumulation_steps == 2 and config["checkpoint"] == {"load_universal": True}
    same = plan_run(cfg, fake_accelerator(2, 3), checkpoint, log=lambda line: None)
    assert (same.batch_size, same.gradient_accumulation_steps, same.resized) == (2, 1, False)


# ------------------------------------------------------------------------------------------- runs


class Inputs:
    def __init__(self, root: Path) -> None:
        tokenizer = make_tokenizer()
        self.root = root
        self.model = make_model_dir(root / "model", tokenizer, seed=0)
        self.data = make_data_dir(root / "data", tokenizer, n_train=32, n_eval=0, seed=0)
        self.baselines: dict[str, Path] = {}

    def args(self, out: Path, *extra: str) -> list[str]:
        return ["--model_path", str(self.model), "--data_path", str(self.data), "--output_dir", str(out), *COMMON,
                *extra]

    def baseline(self, *extra: str) -> Path:
        """The uninterrupted single-process run (global batch 4)."""
        key = " ".join(extra)
        if key not in self.baselines:
            out = self.root / f"baseline{len(self.baselines)}"
            run([sys.executable, "-m", "dpo.train", *self.args(out, "--batch_size", "4", *extra)], expect=0)
            self.baselines[key] = out
        return self.baselines[key]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> Inputs:
    return Inputs(tmp_path_factory.mktemp("preemption"))


def run(cmd: list[str], *, expect: int, env: dict[str, str] | None = None) -> str:
    try:
        proc = subprocess.run(cmd, cwd=REPO, env={**launch_env(), **(env or {})}, capture_output=True, text=True,
                              timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired as exc:
        raise AssertionError(f"timed out: {' '.join(cmd)}\n{exc.stdout}\n{exc.stderr}") from None
    assert proc.returncode == expect, \
        f"exit {proc.returncode}, expected {expect}: {' '.join(cmd)}\n{proc.stdout[-5000:]}\n{proc.stderr[-5000:]}"
    return proc.stdout + proc.stderr


def assert_same_run(got: Path, want: Path, *, steps: int = 8, rel: float = 1e-4) -> None:
    got_records, want_records = read_records(got), read_records(want)
    assert sorted(got_records) == [("train", s) for s in range(1, steps + 1)], sorted(got_records)
    for key, want_record in want_records.items():
        for name in KEYS:
            g, w = got_records[key][name], want_record[name]
            assert abs(g - w) <= max(rel * abs(w), 1e-6), f"{key} {name}: {g} vs uninterrupted {w}"


@pytest.mark.slow
def test_sigusr1_saves_and_exits_75_and_a_second_signal_in_the_write_changes_nothing(
        inputs: Inputs, tmp_path: Path) -> None:
    """One process, no launcher: SIGUSR1 in step 3, then SIGTERM while checkpoint-3 is being written (the shards are
    on disk, the manifest is not). The second signal is only recorded: checkpoint-3 completes and verifies, the
    run exits 75 naming the resume flag, and resuming it ends where the uninterrupted run ends."""
    out = tmp_path / "run"
    log = run([sys.executable, DRIVER, *inputs.args(out, "--batch_size", "4")], expect=EXIT_PREEMPTED,
              env={"DPO_TEST_SIGNAL_STEP": "3:SIGUSR1:0", "DPO_TEST_SIGNAL_SAVE": "3:SIGTERM"})
    # Both signals were seen (the second one during the write) and only one checkpoint was made.
    assert "stopped by SIGUSR1+SIGTERM at step 3 of 8" in log and "--resume_from_checkpoint latest" in log
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-3"]
    verify_checkpoint(out / "checkpoint-3")
    assert not list(out.glob(".tmp-*")) and not (out / "final").exists()
    run([sys.executable, "-m", "dpo.train", *inputs.args(out, "--batch_size", "4", "--resume_from_checkpoint",
                                                         "latest")], expect=0)
    assert_same_run(out, inputs.baseline())


@pytest.mark.slow
def test_sigterm_that_kills_a_checkpoint_write_leaves_the_previous_one_resumable(
        inputs: Inputs, tmp_path: Path) -> None:
    """--save_on_signal none: SIGTERM's default action kills the run in the middle of writing checkpoint-4. The
    staging folder is left incomplete and never read; `latest` resumes from checkpoint-2 and the run ends exactly
    as the uninterrupted one."""
    out = tmp_path / "run"
    args = inputs.args(out, "--batch_size", "4", "--save_steps", "2", "--save_on_signal", "none")
    run([sys.executable, DRIVER, *args], expect=-signal.SIGTERM, env={"DPO_TEST_SIGNAL_SAVE": "4:SIGTERM"})
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-2"]
    assert (out / ".tmp-checkpoint-4").is_dir() and not (out / ".tmp-checkpoint-4" / "manifest.json").exists()
    log = run([sys.executable, "-m", "dpo.train", *args, "--resume_from_checkpoint", "latest"], expect=0)
    assert "resumed from" in log and "checkpoint-2 at step 2" in log
    assert not (out / ".tmp-checkpoint-4").exists()
    assert_same_run(out, inputs.baseline())


@pytest.mark.distributed
def test_launcher_forwards_the_signal_and_keeps_the_exit_status(tmp_path: Path) -> None:
    """dpo.launch with two processes (torch's elastic agent): SIGUSR1 to the launcher alone reaches both workers
    (each writes a marker, waits for the other's and exits 75 as dpo.train would) and the launcher exits 75;
    SIGUSR1's default action would have killed the launcher and orphaned them."""
    script = tmp_path / "worker.py"
    script.write_text(
        "import os, signal, sys, time\n"
        "got = []\n"
        "signal.signal(signal.SIGUSR1, lambda s, f: got.append(s))\n"
        f"open(r'{tmp_path}/ready-' + os.environ['RANK'], 'w').close()\n"
        "deadline = time.time() + 120\n"
        "while not got and time.time() < deadline:\n"
        "    time.sleep(0.05)\n"
        f"open(r'{tmp_path}/got-' + os.environ['RANK'], 'w').write(str(got))\n"
        # dpo.train's ranks leave together (a barrier after the checkpoint); a rank that left alone would have the
        # agent stop the other with SIGTERM, on a loaded machine before it recorded the signal.
        f"while not all(os.path.exists(r'{tmp_path}/got-' + r) for r in '01') and time.time() < deadline:\n"
        "    time.sleep(0.05)\n"
        "sys.exit(75 if got else 1)\n")
    cmd = [sys.executable, "-m", "dpo.launch", "--config_file", "accelerate_configs/ddp.yaml", "--num_processes", "2",
           "--main_process_port", str(free_port()), str(script)]
    proc = subprocess.Popen(cmd, cwd=REPO, env=launch_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    try:
        for _ in range(1200):
            if all((tmp_path / f"ready-{r}").exists() for r in (0, 1)) or proc.poll() is not None:
                break
            subprocess.run(["sleep", "0.1"])
        assert proc.poll() is None, proc.communicate()[0]
        proc.send_signal(signal.SIGUSR1)
        output, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == EXIT_PREEMPTED, output
    assert all((tmp_path / f"got-{r}").read_text() == f"[{int(signal.SIGUSR1)}]" for r in (0, 1))


# ------------------------------------------------------------------------------------------- resizing


def launch(inputs: Inputs, config: str, processes: int, out: Path, *extra: str, expect: int = 0,
           env: dict[str, str] | None = None) -> str:
    cmd = [sys.executable, "-m", "dpo.launch", "--config_file", f"accelerate_configs/{config}.yaml",
           "--num_processes", str(processes), "--main_process_port", str(free_port()), DRIVER,
           *inputs.args(out, "--batch_size", "2", *extra)]
    return run(cmd, expect=expect, env=env)


@pytest.mark.distributed
@pytest.mark.parametrize("config, extra", [
    ("zero2", ()),
    ("zero3", ("--lora", "--lora_dropout", "0")),
])
def test_stop_and_resume_across_process_counts(inputs: Inputs, tmp_path: Path, config: str,
                                               extra: tuple[str, ...]) -> None:
    """1 process (batch 2 x accumulation 2) -> SIGUSR1 in step 3 -> resumed on 2 processes (batch 2), where only
    rank 1 gets SIGTERM in step 6 -> resumed on 1 process to step 8. Every step equals the uninterrupted run, and
    so do the final weights."""
    out = tmp_path / "run"
    launch(inputs, config, 1, out, "--gradient_accumulation_steps", "2", *extra, expect=EXIT_PREEMPTED,
           env={"DPO_TEST_SIGNAL_STEP": "3:SIGUSR1:0"})
    verify_checkpoint(out / "checkpoint-3")
    log = launch(inputs, config, 2, out, "--gradient_accumulation_steps", "2", "--resume_from_checkpoint", "latest",
                 *extra, expect=EXIT_PREEMPTED, env={"DPO_TEST_SIGNAL_STEP": "6:SIGTERM:1"})
    assert "written by DeepSpeed" in log and "continuing on 2 processes" in log
    assert "2 per device x 1 accumulation x 2 processes" in log  # the recipe's 2 x 2 would double the batch
    assert "stopped by another process's signal at step 6 of 8" in log  # rank 0's line: it got no signal itself
    verify_checkpoint(out / "checkpoint-6")
    launch(inputs, config, 1, out, "--gradient_accumulation_steps", "2", "--resume_from_checkpoint", "latest",
           *extra)
    want = inputs.baseline(*extra)
    assert_same_run(out, want)
    assert_close_weights(load_weights(out / "final"), load_weights(want / "final"), atol=1e-5)


@pytest.mark.distributed
def test_sbatch_script_forwards_usr1_and_requeues(inputs: Inputs, tmp_path: Path) -> None:
    """examples/slurm_multi_node.sbatch as SLURM runs it (`--signal=B:USR1@...` signals the script alone), with
    `srun` and `scontrol` as small scripts on PATH (one node, this machine; scontrol records a requeue): USR1 to the
    script while it trains reaches the training process through srun, launch.sh and dpo.launch; the run stops with
    a verified checkpoint and the script requeues the job and exits 75."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    shims = {"srun": '#!/usr/bin/env bash\nwhile [[ "$1" == --* ]]; do shift; done\nexec "$@"\n',
             "scontrol": f'#!/usr/bin/env bash\necho "$@" >> {tmp_path}/scontrol.log\necho 127.0.0.1\n'}
    for name, text in shims.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    env = {**launch_env(), "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "SLURM_JOB_NODELIST": "localhost",
           "SLURM_NNODES": "1", "SLURM_NODEID": "0", "SLURM_SUBMIT_DIR": str(REPO), "SLURM_JOB_ID": "4242",
           "GPUS_PER_NODE": "1", "MAIN_PROCESS_PORT": str(free_port())}
    out = tmp_path / "run"
    args = inputs.args(out, "--batch_size", "4", "--max_steps", "100000")  # stopped long before the end
    proc = subprocess.Popen(["bash", "examples/slurm_multi_node.sbatch", *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        for _ in range(3000):  # until it trains: a step is logged
            if (out / "metrics.jsonl").is_file() and (out / "metrics.jsonl").read_text().strip():
                break
            assert proc.poll() is None, proc.communicate()[0][-5000:]
            subprocess.run(["sleep", "0.1"])
        proc.send_signal(signal.SIGUSR1)
        output, _ = proc.communicate(timeout=TIMEOUT_S)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == EXIT_PREEMPTED, output[-5000:]
    assert "stopped by SIGUSR1 at step" in output and "requeueing job 4242" in output
    (checkpoint,) = list_checkpoints(out)
    verify_checkpoint(checkpoint)
    assert (tmp_path / "scontrol.log").read_text().splitlines()[-1] == "requeue 4242"
