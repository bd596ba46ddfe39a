"""Step time and peak memory of each reference strategy, full and LoRA, on a model of any size (a benchmark).

    python -m benchmarks.bench_reference [--hidden_size 256] [--num_layers 4] [--steps 6] [--batch_size 4] \
        [--output runs/bench_reference.json]                       (from the repo root)

Builds a local Llama-style model (vocabulary 2,048) and random-token preference pairs in data_prep's output format,
precomputes the reference log-probs once with `python -m dpo.precompute_ref` (timed, start-up included), then
measures each strategy as a row of benchmarks/bench_throughput.py: the same measured optimizer step (collate,
reference log-probs, policy forward and backward, clipping, AdamW), in its own process so its peak memory (peak
allocated on CUDA, peak RSS on a CPU) is its own. The padded layout throughout; the first step is not timed, the
step time is the median of the others. Prints a table and writes the numbers as JSON.

Where bench_throughput compares layouts against TRL on a fixed CPU-sized model, this crosses the strategies with
full and LoRA training at whatever width and depth the flags give (the README's figures: an H200).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import datasets

from benchmarks.bench_throughput import Row
from benchmarks.bench_throughput import parse_args as throughput_args
from benchmarks.bench_throughput import run_row_in_subprocess
from demo.tiny import build_model, build_tokenizer
from dpo.contract import stamp_report
from dpo.data import load_split

VOCAB_SIZE = 2048
STRATEGIES = {  # printed name: the row
    "full / model (frozen copy)": Row(name="full/model", reference="model"),
    "full / precomputed": Row(name="full/precomputed", reference="precomputed"),
    "lora / adapters_disabled": Row(name="lora/adapters_disabled", reference="adapters_disabled", lora=True),
    "lora / model (frozen copy)": Row(name="lora/model", reference="model", lora=True),
    "lora / precomputed": Row(name="lora/precomputed", reference="precomputed", lora=True),
}


def build_workload(root: Path, args: argparse.Namespace) -> float:
    """Model, prepared data and reference columns under `root`, in bench_throughput's workload format (model/,
    pairs.json, workload.json); returns the seconds `python -m dpo.precompute_ref` took."""
    model_dir, data_dir = root / "model", root / "data"
    model = build_model(vocab_size=VOCAB_SIZE, hidden_size=args.hidden_size, num_layers=args.num_layers,
                        num_heads=max(1, args.hidden_size // 64), seed=0)
    model.save_pretrained(model_dir)
    rng = random.Random(0)
    pairs = [{"prompt_ids": [rng.randrange(3, VOCAB_SIZE) for _ in range(rng.randint(48, 96))],
              "chosen_ids": [rng.randrange(3, VOCAB_SIZE) for _ in range(rng.randint(16, 48))] + [2],
              "rejected_ids": [rng.randrange(3, VOCAB_SIZE) for _ in range(rng.randint(16, 48))] + [2]}
             for _ in range(args.batch_size * args.steps)]
    datasets.Dataset.from_list(pairs).save_to_disk(str(data_dir / "train"))
    # Only its pad id and hash matter here: the pairs are ids already. The report records the hashes training
    # verifies, as data_prep would (dpo.contract).
    build_tokenizer(["a tokenizer for a benchmark of random token ids"] * 4, vocab_size=300).save_pretrained(
        data_dir / "tokenizer")
    report = stamp_report({"pad_token_id": 0, "eos_token_id": 2}, data_dir)  # what data_prep would write
    (data_dir / "prep_report.json").write_text(json.dumps(report))
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "dpo.precompute_ref", "--model_path", str(model_dir),
                           "--data_path", str(data_dir), "--batch_size", str(args.batch_size)],
                          capture_output=True, text=True, env={"TOKENIZERS_PARALLELISM": "false", **os.environ})
    precompute_s = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"dpo.precompute_ref failed:\n{done.stderr[-3000:]}")
    with_reference = load_split(data_dir, "train").with_format(None).to_list()
    (root / "pairs.json").write_text(json.dumps(with_reference))
    (root / "workload.json").write_text(json.dumps({
        "model_dir": str(model_dir), "pad_token_id": 0, "pairs": len(with_reference),
        "parameters": sum(p.numel() for p in model.parameters())}))
    return precompute_s


def row_args(root: Path, args: argparse.Namespace) -> argparse.Namespace:
    """bench_throughput's settings for these rows: the first step a warm-up, every pair once, the matmul ceilings
    (MFU, not reported here) on a token 64 x 64 product."""
    return throughput_args(["--workdir", str(root), "--warmup", "1", "--steps", str(args.steps - 1),
                            "--batch-size", str(args.batch_size), "--matmul-size", "64", "--seed", "0"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_reference", description=__doc__.splitlines()[0])
    parser.add_argument("--hidden_size", type=int, default=256, help="model width")
    parser.add_argument("--num_layers", type=int, default=4, help="decoder layers")
    parser.add_argument("--steps", type=int, default=6, help="optimizer steps per strategy (the first is not timed)")
    parser.add_argument("--batch_size", type=int, default=4, help="pairs per step")
    parser.add_argument("--output", default="runs/bench_reference.json", help="where the JSON goes")
    args = parser.parse_args(argv)
    if args.steps < 2:
        parser.error("--steps must be at least 2: the first step is not timed")
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        precompute_s = build_workload(root, args)
        settings = row_args(root, args)
        for name, row in STRATEGIES.items():
            result = run_row_in_subprocess(row, settings)
            if "error" in result:
                raise RuntimeError(f"{name}: {result['error']}")
            result.pop("matmul_gflops")
            results.append({"strategy": name, **result})
    base = results[0]["median_step_s"]
    print(f"model hidden {args.hidden_size} x {args.num_layers} layers, batch {args.batch_size} pairs, "
          f"{args.steps} steps; precompute (one-off, whole data, incl. start-up): {precompute_s:.1f} s\n")
    print(f"{'strategy':<28} {'step s':>8} {'vs copy':>8} {'peak MiB':>9} {'ref params':>11} {'trainable':>10}  "
          f"(device: {results[0]['device']}; peak: allocated on CUDA, RSS on a CPU)")
    for r in results:
        print(f"{r['strategy']:<28} {r['median_step_s']:>8.3f} {base / r['median_step_s']:>7.2f}x "
              f"{r['peak_memory_mb']:>9.0f} {r['reference_params']:>11,} {r['trainable_params']:>10,}")
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps({"config": vars(args), "precompute_s": precompute_s, "results": results},
                                 indent=2) + "\n")
    print(f"\nwritten to {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
