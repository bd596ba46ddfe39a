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
