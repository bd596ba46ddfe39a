"""What a cluster log file receives from a training run: with stderr redirected to a file, progress is plain
newline-terminated lines (no carriage-return redraws), at most one per 30 s plus the final one; no progress bars
of transformers or datasets; no warning from DeepSpeed when the run does not use it; and bitsandbytes' notice about
an optional Hub kernel is filtered."""

from __future__ import annotations

import io
import logging
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from builders import make_data_dir, make_model_dir, make_tokenizer

ROOT = Path(__file__).resolve().parents[1]
STEPS = 30
LIBRARY_BARS = ("Loading weights", "Writing model shards", "Loading checkpoint", "it/s]", "\u2588")


def test_redirected_run_writes_plain_progress_lines_and_no_library_bars(tmp_path):
    tokenizer = make_tokenizer()
    model = make_model_dir(tmp_path / "model", tokenizer, seed=0)
    data = make_data_dir(tmp_path / "data", tokenizer, n_train=16, n_eval=4, seed=0)
    # A fresh environment as a user's shell would have it: no DS_ACCELERATOR left by an earlier in-process run.
    env = {k: v for k, v in os.environ.items() if k != "DS_ACCELERATOR"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    with open(tmp_path / "stdout.log", "w") as out, open(tmp_path / "stderr.log", "w") as err:
        start = time.monotonic()
        done = subprocess.run([sys.executable, "-m", "dpo.train", "--model_path", str(model), "--data_path",
                               str(data), "--output_dir", str(tmp_path / "run"), "--batch_size", "4",
                               "--max_steps", str(STEPS), "--learning_rate", "1e-3"],
                              cwd=ROOT, stdout=out, stderr=err, env=env, timeout=600)
        elapsed = time.monotonic() - start
    stderr = (tmp_path / "stderr.log").read_text()
    stdout = (tmp_path / "stdout.log").read_text()
    assert done.returncode == 0, stderr[-2000:]
    assert f"done at step {STEPS}" in stdout
    for text in (stdout, stderr):
        assert "\r" not in text
        assert not [bar for bar in LIBRARY_BARS if bar in text], text[-2000:]
        assert "Setting accelerator to CPU" not in text and "[WARNING]" not in text
    lines = [line for line in stderr.splitlines() if line.startswith("dpo: step")]
    assert lines[-1].startswith(f"dpo: step {STEPS}/{STEPS} (100%)"), lines
    assert "loss=" in lines[-1] and "acc=" in lines[-1] and "s/step" in lines[-1]
    # after the first step, then at most one per 30 s, and the final one (the bug: one redraw per step)
    assert 1 <= len(lines) <= 2 + int(elapsed // 30), lines


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_line_progress_writes_after_the_first_step_then_once_per_interval_and_at_close() -> None:
    """A fake clock: 25 steps of 3 s with a 10 s interval give lines at steps 1 (t=3 s), 5 (15 s), 9 (27 s), 13,
    17, 21, 25 (each the first step 10 s or more after the previous line), and no second final line."""
    from dpo.progress import LineProgress

    clock, stream = Clock(), io.StringIO()
    progress = LineProgress(total=25, initial=0, enabled=True, file=stream, log_interval_s=10.0, clock=clock)
    for step in range(1, 26):
        clock.now += 3.0
        progress.update(1)
        progress.set_postfix(loss=f"{1 / step:.4f}", refresh=False)
    progress.close()
    text = stream.getvalue()
    assert "\r" not in text and text.endswith("\n")
    steps = [int(m) for m in re.findall(r"^dpo: step (\d+)/25", text, flags=re.M)]
    assert steps == [1, 5, 9, 13, 17, 21, 25]
    first, last = text.splitlines()[0], text.splitlines()[-1]
    assert first == "dpo: step 1/25 (4%) elapsed 0:03 eta 1:12 3 s/step"  # the postfix comes after the update
    assert last == "dpo: step 25/25 (100%) elapsed 1:15 3 s/step loss=0.0417"


def test_line_progress_closes_with_the_final_state_and_counts_from_a_resumed_step() -> None:
    from dpo.progress import LineProgress

    clock, stream = Clock(), io.StringIO()
    progress = LineProgress(total=100, initial=40, enabled=True, file=stream, log_interval_s=30.0, clock=clock)
    for _ in range(3):
        clock.now += 2.0
        progress.update(1)
    progress.close()
    progress.close()  # closing twice writes nothing more
    assert stream.getvalue().splitlines() == [
        "dpo: step 41/100 (41%) elapsed 0:02 eta 1:58 2 s/step",  # the rate of this process's steps only
        "dpo: step 43/100 (43%) elapsed 0:06 eta 1:54 2 s/step",
    ]
    quiet = io.StringIO()
    other = LineProgress(total=5, initial=0, enabled=False, file=quiet, clock=clock)  # not the main process
    other.update(5)
    other.close()
    assert quiet.getvalue() == ""


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture
def library_bars_restored():
    """The bars on before the test (an in-process training run of an earlier test turned them off) and after it."""
    import datasets
    import huggingface_hub.utils
    import transformers

    def enable() -> None:
        transformers.utils.logging.enable_progress_bar()
        datasets.enable_progress_bars()
        huggingface_hub.utils.enable_progress_bars()

    enable()
    yield
    enable()


def test_a_terminal_gets_the_live_bar_and_keeps_the_library_bars(library_bars_restored) -> None:
    import datasets
    import transformers
    from tqdm.auto import tqdm

    from dpo.progress import LineProgress, progress_bar, quiet_library_progress

    bar = progress_bar(total=3, initial=0, enabled=True, file=Terminal())
    assert isinstance(bar, tqdm)
    bar.close()
    assert isinstance(progress_bar(total=3, initial=0, enabled=True, file=io.StringIO()), LineProgress)
    quiet_library_progress(Terminal())
    assert transformers.utils.logging.is_progress_bar_enabled() and datasets.is_progress_bar_enabled()


def test_library_bars_are_off_when_stderr_is_a_file(library_bars_restored) -> None:
    import datasets
    import huggingface_hub.utils
    import transformers

    from dpo.progress import quiet_library_progress

    quiet_library_progress(io.StringIO())
    assert not transformers.utils.logging.is_progress_bar_enabled()
    assert not datasets.is_progress_bar_enabled()
    assert huggingface_hub.utils.are_progress_bars_disabled()


def test_the_bitsandbytes_hub_kernel_notice_is_filtered_and_nothing_else(caplog) -> None:
    import dpo  # noqa: F401 - installs the filter

    logger = logging.getLogger("bitsandbytes.backends.cpu.ops")
    with caplog.at_level(logging.WARNING):
        logger.warning("Failed to load CPU gemm_4bit_forward from kernels-community: %s. Please make sure you "
                       "already `pip install kernels` and the kernels >= 0.11.1", "no network")
        logger.warning("some other bitsandbytes warning")
    assert [r.getMessage() for r in caplog.records] == ["some other bitsandbytes warning"]


def test_data_prep_redirected_writes_no_bars(tokenizer_dir: Path, tmp_path: Path) -> None:
    """datasets draws "Saving the dataset" bars, carriage returns and all, even into a file: off there."""
    raw = tmp_path / "raw.jsonl"
    raw.write_text("".join(f'{{"prompt": "Question {n}?", "chosen": " yes {n}", "rejected": " no {n}"}}\n'
                           for n in range(40)))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    with open(tmp_path / "stderr.log", "w") as err:
        command = [sys.executable, "-m", "data_prep", "--input", str(raw), "--tokenizer", str(tokenizer_dir)]
        done = subprocess.run([*command, "--output", str(tmp_path / "out")], cwd=ROOT, stdout=subprocess.DEVNULL,
                              stderr=err, env=env, timeout=300)
    stderr = (tmp_path / "stderr.log").read_text()
    assert done.returncode == 0, stderr[-2000:]
    assert (tmp_path / "out" / "train").is_dir()
    assert "\r" not in stderr and "Saving the dataset" not in stderr, stderr[-2000:]
