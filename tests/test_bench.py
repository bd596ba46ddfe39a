"""The throughput benchmark's pieces on a tiny workload, in-process: the workload respects its bounds and carries
correct reference columns, every row does the same useful work whatever its layout, and the accounting is
hand-checked; the reference benchmark, which measures its strategies as rows of the throughput benchmark, end to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks.bench_reference import STRATEGIES
from benchmarks.bench_throughput import (
    Row,
    build_workload,
    nominal_flops_per_token,
    parse_args,
    plan_rows,
    run_dpo_row,
    summarize,
    tokenize_pair,
)
from dpo.data import collate_padded
from dpo.logprobs import sequence_logps
from dpo.models import load_causal_lm

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--hidden-size", "32", "--num-layers", "2", "--vocab-size", "400", "--max-length", "64", "--batch-size", "4",
        "--steps", "2", "--warmup", "1", "--max-tokens-per-row", "128", "--matmul-size", "64"]


@pytest.fixture(autouse=True, scope="module")
def fresh_accelerate_state():
    """Accelerate's state is process-global: leave none behind for the next module's Accelerator."""
    from accelerate.state import AcceleratorState

    yield
    AcceleratorState._reset_state(reset_partial_state=True)


@pytest.fixture(scope="module")
def workload(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("bench")
    args = parse_args([*TINY, "--workdir", str(workdir)])
    meta = build_workload(workdir, seed=0, num_pairs=12, max_length=64, shape=args.shape)
    return args, meta, json.loads((workdir / "pairs.json").read_text())


def test_workload_pairs_fit_and_reference_columns_are_the_starting_model(workload):
    args, meta, pairs = workload
    assert len(pairs) == meta["pairs"] == 12
    assert all(len(p["prompt_ids"]) + max(len(p["chosen_ids"]), len(p["rejected_ids"])) <= 64 for p in pairs)
    assert meta["mean_prompt_tokens"] > meta["mean_answer_tokens"]  # prompts dominate, as in multi-turn data
    model = load_causal_lm(meta["model_dir"])
    with torch.no_grad():
        out = sequence_logps(model, collate_padded(pairs[:4], pad_token_id=meta["pad_token_id"]))
    assert out.chosen_logps.tolist() == pytest.approx([p["ref_chosen_logps"] for p in pairs[:4]], abs=1e-4)
    assert out.rejected_logps.tolist() == pytest.approx([p["ref_rejected_logps"] for p in pairs[:4]], abs=1e-4)


def test_tokenize_pair_splits_where_prompt_and_answer_tokens_diverge(workload):
    from transformers import AutoTokenizer

    _, meta, _ = workload
    tokenizer = AutoTokenizer.from_pretrained(meta["model_dir"])
    ids = tokenize_pair(tokenizer, "<|user|>\nHi</s>\n<|assistant|>\n", "Ba ka.</s>", "Ko.</s>")
    assert ids["prompt_ids"] + ids["chosen_ids"] == tokenizer("<|user|>\nHi</s>\n<|assistant|>\nBa ka.</s>").input_ids
    assert ids["chosen_ids"][-1] == ids["rejected_ids"][-1] == tokenizer.eos_token_id


@pytest.mark.slow  # four benchmark rows: 41 of the 44 minutes of a --quick run on a loaded machine
@pytest.mark.parametrize("name", ["padded/model", "prefix_shared/model", "prefix_shared/adapters_disabled",
                                  "prefix_shared/precomputed"])
def test_rows_do_the_same_useful_work(workload, name):
    args, meta, pairs = workload
    row = next(r for r in plan_rows(full_grid=False, vs_trl=False, bf16=False, row_bounds=[]) if r.name == name)
    result = run_dpo_row(row, meta, args)
    # steps 1 and 2 (after one warm-up step) take pairs 4..11
    expected = [sum(2 * len(p["prompt_ids"]) + len(p["chosen_ids"]) + len(p["rejected_ids"]) for p in pairs[s:s + 4])
                for s in (4, 8)]
    assert result["useful_tokens_per_step"] == pytest.approx(sum(expected) / 2)
    assert len(result["step_times_s"]) == 2 and min(result["step_times_s"]) > 0
    assert result["peak_memory_mb"] > 0
    if row.prefix_sharing:  # the shared layout computes fewer tokens than it is credited with
        assert result["computed_tokens_per_step"] < result["useful_tokens_per_step"]


def test_accounting_hand_worked():
    # two steps of 100 and 300 useful tokens in 1 s and 2 s: rates 100 and 150, median 125; median time 1.5 s
    out = summarize([1.0, 2.0], [100, 300], batch_size=8)
    assert out["median_step_s"] == 1.5 and out["useful_tokens_per_s"] == 125.0
    assert out["pairs_per_s"] == pytest.approx(8 / 1.5)
    assert nominal_flops_per_token(Row(name="a"), 10) == 80  # 6N policy + 2N reference forward
    assert nominal_flops_per_token(Row(name="b", reference="precomputed"), 10) == 60
    assert nominal_flops_per_token(Row(name="c", reference="adapters_disabled"), 10) == 60  # LoRA: 4N + 2N


def test_plan_covers_layouts_and_strategies():
    names = [r.name for r in plan_rows(full_grid=True, vs_trl=True, bf16=True, row_bounds=[2048])]
    for layout in ("padded", "packed", "prefix_shared"):
        for reference in ("model", "adapters_disabled", "precomputed"):
            assert f"{layout}/{reference}" in names
    assert names[0] == "trl/model" and "prefix_shared/model/bf16" in names and "prefix_shared@2048/model" in names


def test_reference_strategies_cross_full_and_lora():
    plan = {(row.trains_lora, row.reference) for row in STRATEGIES.values()}
    assert plan == {(False, "model"), (False, "precomputed"), (True, "adapters_disabled"), (True, "model"),
                    (True, "precomputed")}
    assert all(row.layout == "padded" and not row.prefix_sharing for row in STRATEGIES.values())


@pytest.mark.slow  # a precompute and five row processes
def test_bench_reference_end_to_end(tmp_path):
    output = tmp_path / "bench_reference.json"
    done = subprocess.run([sys.executable, "-m", "benchmarks.bench_reference", "--hidden_size", "32", "--num_layers",
                           "1", "--steps", "2", "--batch_size", "2", "--output", str(output)],
                          cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"},
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads(output.read_text())
    rows = {r["strategy"]: r for r in report["results"]}
    assert list(rows) == list(STRATEGIES)
    # Llama, vocabulary 2048, hidden 32, MLP 128, one layer, untied head: embeddings and head 2 x 2048 x 32,
    # attention 4 x 32 x 32, MLP 3 x 32 x 128, two layer norms and the final one 3 x 32.
    parameters = 2 * 2048 * 32 + 4 * 32 * 32 + 3 * 32 * 128 + 3 * 32
    for name, row in STRATEGIES.items():
        result = rows[name]
        assert len(result["step_times_s"]) == 1 and result["median_step_s"] > 0 and result["peak_memory_mb"] > 0
        assert result["reference_params"] == (parameters if row.reference == "model" else 0)
        # LoRA of rank 16 (the default) on every linear layer but the head: r x (in + out) each, q k v o 32 -> 32,
        # gate and up 32 -> 128, down 128 -> 32.
        lora = 16 * (4 * (32 + 32) + 3 * (32 + 128))
        assert result["trainable_params"] == (lora if row.trains_lora else parameters)
    assert report["precompute_s"] > 0 and "precompute (one-off" in done.stdout
