"""benchmarks/bench_eval.py on a tiny workload, as a subprocess with stderr redirected to a file: every row is
measured on the pairs it claims, the ratios are the per-pair times divided by the train forward's, and the
evaluations show their progress bar and timed line in the redirected log."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--hidden-size", "32", "--num-layers", "2", "--vocab-size", "400", "--max-length", "64", "--batch-size", "4",
        "--steps", "2", "--warmup", "1", "--eval-pairs", "10", "--max-tokens-per-row", "128", "--threads", "1"]


def test_rows_ratios_and_redirected_progress(tmp_path):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    with open(tmp_path / "out.log", "w") as out, open(tmp_path / "err.log", "w") as err:
        done = subprocess.run([sys.executable, "-m", "benchmarks.bench_eval", *TINY, "--workdir", str(tmp_path / "w"),
                               "--output", str(tmp_path / "bench_eval.json")], cwd=ROOT, env=env, stdout=out,
                              stderr=err, timeout=600)
    stdout, stderr = (tmp_path / "out.log").read_text(), (tmp_path / "err.log").read_text()
    assert done.returncode == 0, stderr[-3000:]
    report = json.loads((tmp_path / "bench_eval.json").read_text())
    rows = {r["name"]: r for r in report["rows"]}
    forward = rows["train forward"]
    assert forward["pairs"] == 2 * 4 and forward["batch_size"] == 4
    assert rows["eval, default batch"]["batch_size"] == 8 and rows["eval, training batch"]["batch_size"] == 4
    for row in report["rows"]:
        assert row["wall_s_per_pair"] > 0 and row["cpu_s_per_pair"] > 0
        assert row["wall_vs_train_forward"] == pytest.approx(row["wall_s_per_pair"] / forward["wall_s_per_pair"])
        assert row["cpu_vs_train_forward"] == pytest.approx(row["cpu_s_per_pair"] / forward["cpu_s_per_pair"])
        if row["name"].startswith("eval"):
            assert row["pairs"] == 10
    step = rows["train step (forward + backward + optimizer)"]
    assert step["cpu_s_per_pair"] > forward["cpu_s_per_pair"]  # the step contains the forward
    assert len(re.findall(r"\[dpo\] eval: 10 pairs in [0-9.]+ s", stdout)) == 2
    # Redirected, progress is plain lines (dpo/progress.py's LineProgress): each evaluation ends with its 10/10 line.
    finished = [line for line in stderr.splitlines() if line.startswith("eval: step 10/10 (100%)")]
    assert "\r" not in "".join(line for line in stderr.splitlines() if line.startswith("eval:"))
    assert len(finished) == 2, stderr[-2000:]
