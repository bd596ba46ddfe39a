"""benchmarks/bench_memory.py end to end on a tiny workload, so the README's memory command cannot rot: every row
runs in its own process, and the JSON holds each row's fields, a breakdown that adds up to the peak, a peak above
the process's baseline, and the ratio to TRL's row of the same length."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TINY = ["--vocab-size", "400", "--hidden-size", "32", "--layers", "1", "--pair-tokens", "12,4", "--steps", "2",
        "--chunk-size", "8"]
FIELDS = {"name", "peak_mb", "baseline_mb", "after_load_mb", "weights_mb", "weights_outside_embeddings_mb",
          "gradients_mb", "optimizer_mb", "logits_mb", "activations_and_rest_mb", "step_s", "useful_tokens_per_s"}
PARTS = ("baseline_mb", "weights_mb", "gradients_mb", "optimizer_mb", "logits_mb", "activations_and_rest_mb")


def run_bench(tmp_path: Path, rows: str, *extra: str) -> dict:
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    output = tmp_path / "bench_memory.json"
    cmd = [sys.executable, "-m", "benchmarks.bench_memory", "--rows", rows, *TINY, *extra,
           "--workdir", str(tmp_path / "work"), "--output", str(output)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "peak MB" in proc.stdout  # the table
    return json.loads(output.read_text())


def check_rows(report: dict, names: list[str]) -> None:
    assert [r["name"] for r in report["rows"]] == names
    assert report["shape"]["vocab_size"] == 400 and report["tokens_per_pair"]["4k"] == [48, 16]
    for row in report["rows"]:
        assert FIELDS <= row.keys(), row
        assert row["peak_mb"] > row["baseline_mb"] > 0
        assert sum(row[k] for k in PARTS) == pytest.approx(row["peak_mb"]), row["name"]
        assert len(row["step_s"]) >= 1 and row["useful_tokens_per_s"] > 0
    by_name = {r["name"]: r for r in report["rows"]}
    full = by_name["full@1k"]
    # Qwen2, vocab 400, hidden 32, 4 heads of 8 (2 for keys and values), MLP 128, 1 layer: embedding and head,
    # q/o and k/v projections, the MLP, the q/k/v biases and three norms; the policy and a frozen copy, in fp32.
    params = 2 * 400 * 32 + 2 * 32 * 32 + 2 * 32 * 16 + 3 * 32 * 128 + (32 + 16 + 16) + 3 * 32
    assert full["weights_mb"] == pytest.approx(2 * 4 * params / 2**20, rel=1e-6)
    assert full["gradients_mb"] == pytest.approx(4 * params / 2**20, rel=1e-6)
    assert full["weights_outside_embeddings_mb"] == pytest.approx(2 * 4 * (params - 2 * 400 * 32) / 2**20, rel=1e-6)
    assert full["optimizer_mb"] == pytest.approx(8 * params / 2**20, rel=1e-6)
    assert full["logits_mb"] == pytest.approx(8 * 400 * 4 / 2**20)  # one chunk of 8 rows
    if "trl/full@1k" in by_name:
        assert full["vs_trl"] == pytest.approx(full["peak_mb"] / by_name["trl/full@1k"]["peak_mb"])


def test_the_default_row_on_a_tiny_workload(tmp_path: Path) -> None:
    check_rows(run_bench(tmp_path, "full@1k"), ["full@1k"])


@pytest.mark.slow
def test_trl_lora_and_4k_rows_on_a_tiny_workload(tmp_path: Path) -> None:
    names = ["trl/full@1k", "full@1k", "lora/bf16@1k", "qlora/nf4@1k", "full@4k"]
    report = run_bench(tmp_path, ",".join(names))
    check_rows(report, names)
    by_name = {r["name"]: r for r in report["rows"]}
    assert by_name["lora/bf16@1k"]["optimizer_mb"] < by_name["full@1k"]["optimizer_mb"]  # only adapters train
    assert by_name["lora/bf16@1k"]["weights_mb"] < by_name["full@1k"]["weights_mb"] / 2  # one 16-bit copy


def test_weights_only_rows_count_what_each_loading_mode_holds(tmp_path: Path) -> None:
    """--steps 0: our rows load and stop. LoRA's frozen base is the one copy of the weights (the reference is the
    base with adapters disabled): fp32 4 bytes per parameter, bf16 2; NF4 keeps the vocabulary matrices in 16 bits
    and packs the decoder's linear weights two to a byte, plus a small absmax overhead."""
    names = ["lora@1k", "lora/bf16@1k", "qlora/nf4@1k"]
    report = run_bench(tmp_path, ",".join(names), "--steps", "0")
    by_name = {r["name"]: r for r in report["rows"]}
    assert list(by_name) == names
    vocab = 2 * 400 * 32  # embedding and head
    linear = 2 * 32 * 32 + 2 * 32 * 16 + 3 * 32 * 128  # q/o, k/v, MLP
    small = (32 + 16 + 16) + 3 * 32  # biases and norms
    adapters = {r: by_name[r]["gradients_mb"] for r in names}  # trainable LoRA weights, fp32 in every mode
    for name, bytes_per_param in (("lora@1k", 4), ("lora/bf16@1k", 2)):
        base = bytes_per_param * (vocab + linear + small) / 2**20
        assert by_name[name]["weights_mb"] == pytest.approx(base + adapters[name], rel=1e-6)
    nf4 = by_name["qlora/nf4@1k"]
    packed = (2 * vocab + 2 * small) / 2**20 + adapters["qlora/nf4@1k"]  # everything but the linear weights
    assert packed + 0.5 * linear / 2**20 <= nf4["weights_mb"] <= packed + 0.6 * linear / 2**20
    for row in by_name.values():
        assert row["step_s"] == [] and row["useful_tokens_per_s"] is None and row["activations_and_rest_mb"] is None
