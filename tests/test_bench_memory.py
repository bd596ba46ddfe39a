"""benchmarks/bench_memory.py end to end on a tiny workload, so the README's memory command cannot rot: every row
runs in its own process, and the JSON holds each row's fields, a breakdown that adds up to the peak, a peak above
the process's baseline, and the ratio to TRL's row of the same length."""

from __future__ import annotations

import importlib.util
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
    names = ["trl/full@1k", "full@1k", "lora/bf16@1k", *(["qlora/nf4@1k"] if HAS_BITSANDBYTES else []), "full@4k"]
    report = run_bench(tmp_path, ",".join(names))
    check_rows(report, names)
    by_name = {r["name"]: r for r in report["rows"]}
    assert by_name["lora/bf16@1k"]["optimizer_mb"] < by_name["full@1k"]["optimizer_mb"]  # only adapters train
    assert by_name["lora/bf16@1k"]["weights_mb"] < by_name["full@1k"]["weights_mb"] / 2  # one 16-bit copy


# The NF4 row needs bitsandbytes, which is the `qlora` extra, not the test or bench ones: a fresh
# `pip install -e '.[test,bench]'` has none, and the rows of the other loading modes must still be checked there.
HAS_BITSANDBYTES = importlib.util.find_spec("bitsandbytes") is not None
VOCAB_WEIGHTS = 2 * 400 * 32  # embedding and head
LINEAR_WEIGHTS = 2 * 32 * 32 + 2 * 32 * 16 + 3 * 32 * 128  # q/o, k/v, MLP
SMALL_WEIGHTS = (32 + 16 + 16) + 3 * 32  # biases and norms


def check_loaded_only(row: dict) -> None:
    assert row["step_s"] == [] and row["useful_tokens_per_s"] is None and row["activations_and_rest_mb"] is None


def test_weights_only_rows_count_what_each_loading_mode_holds(tmp_path: Path) -> None:
    """--steps 0: our rows load and stop. LoRA's frozen base is the one copy of the weights (the reference is the
    base with adapters disabled): fp32 4 bytes per parameter, bf16 2."""
    names = ["lora@1k", "lora/bf16@1k"]
    report = run_bench(tmp_path, ",".join(names), "--steps", "0")
    by_name = {r["name"]: r for r in report["rows"]}
    assert list(by_name) == names
    for name, bytes_per_param in (("lora@1k", 4), ("lora/bf16@1k", 2)):
        base = bytes_per_param * (VOCAB_WEIGHTS + LINEAR_WEIGHTS + SMALL_WEIGHTS) / 2**20
        adapters = by_name[name]["gradients_mb"]  # trainable LoRA weights, fp32 in every mode
        assert by_name[name]["weights_mb"] == pytest.approx(base + adapters, rel=1e-6)
        check_loaded_only(by_name[name])


@pytest.mark.skipif(not HAS_BITSANDBYTES, reason="bitsandbytes (pip install -e '.[qlora]') is not installed")
def test_the_nf4_row_packs_the_linear_weights(tmp_path: Path) -> None:
    """NF4 keeps the vocabulary matrices in 16 bits and packs the decoder's linear weights two to a byte, plus a
    small absmax overhead."""
    nf4 = run_bench(tmp_path, "qlora/nf4@1k", "--steps", "0")["rows"][0]
    packed = (2 * VOCAB_WEIGHTS + 2 * SMALL_WEIGHTS) / 2**20 + nf4["gradients_mb"]  # all but the linear weights
    assert packed + 0.5 * LINEAR_WEIGHTS / 2**20 <= nf4["weights_mb"] <= packed + 0.6 * LINEAR_WEIGHTS / 2**20
    check_loaded_only(nf4)


@pytest.mark.slow  # one tiny training row per setting
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_every_malloc_setting_trains_the_default_row(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """BENCH_MALLOC (benchmarks/malloc_variants.py, the README's host-memory figures): each setting's hooks leave the
    training step intact (a hook that returned a value would replace a forward's inputs or outputs) and the row
    records the setting it ran under."""
    from benchmarks.malloc_variants import SETTINGS

    for setting in SETTINGS:
        monkeypatch.setenv("BENCH_MALLOC", setting)
        report = run_bench(tmp_path / setting, "full@1k")
        check_rows(report, ["full@1k"])
        assert report["rows"][0]["malloc_setting"] == setting
