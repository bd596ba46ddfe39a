"""What a cluster log file receives from a training run: stderr redirected to a file holds at most one progress
redraw per 30 s (plus the first and the last), and no warning from DeepSpeed when the run does not use it."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

from builders import make_data_dir, make_model_dir, make_tokenizer

ROOT = Path(__file__).resolve().parents[1]
STEPS = 30


def test_redirected_run_writes_few_progress_lines_and_no_deepspeed_warning(tmp_path):
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
    # tqdm redraws with a carriage return; every redraw of the training bar starts with its description.
    redraws = [seg for seg in re.split(r"[\r\n]", stderr) if seg.startswith("dpo:")]
    assert redraws[-1].startswith("dpo: 100%") and f"{STEPS}/{STEPS}" in redraws[-1]
    # the first draw, the last, and at most one per 30 s between them (the bug: one per step, 32 here)
    assert 2 <= len(redraws) <= 2 + int(elapsed // 30), redraws
    for text in (stdout, stderr):
        assert "Setting accelerator to CPU" not in text and "[WARNING]" not in text


def test_progress_bar_waits_its_interval_when_not_a_terminal(tmp_path):
    """The bar's own clocks, at a 1 s scale: with per-step set_postfix(refresh=False) as the loop does, a
    redirected bar redraws once at the start, at most once per interval, and once at the end. tqdm's monitor thread
    (which forced a redraw 10 s after each one in the demo's log) acts only on bars with adaptive miniters: this one
    has none."""
    from dpo.progress import LOG_INTERVAL_S, progress_bar

    with open(tmp_path / "default.log", "w") as log:
        bar = progress_bar(total=10, initial=0, enabled=True, file=log)
        assert bar.mininterval == LOG_INTERVAL_S == 30.0 and bar.miniters == 1 and not bar.dynamic_miniters
        bar.close()
    with open(tmp_path / "bar.log", "w") as log:
        bar = progress_bar(total=10_000, initial=0, enabled=True, file=log, log_interval_s=1.0)
        start = time.monotonic()
        steps = 0
        while time.monotonic() - start < 3.2:
            bar.update(1)
            bar.set_postfix(loss=f"{steps:.4f}", refresh=False)
            steps += 1
            time.sleep(0.01)
        elapsed = time.monotonic() - start
        bar.close()
    redraws = [seg for seg in re.split(r"[\r\n]", (tmp_path / "bar.log").read_text()) if seg.startswith("dpo:")]
    assert steps > 50 and 3 <= len(redraws) <= 2 + int(elapsed), (steps, elapsed, redraws)
