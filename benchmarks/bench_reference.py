"""Step time and peak memory of each reference strategy on the same workload (a benchmark, not a test).

    python benchmarks/bench_reference.py [--hidden_size 256] [--num_layers 4] [--steps 6] [--batch_size 4] \
        [--output runs/bench_reference.json]

Builds a local Llama-style model and random-token preference pairs, precomputes the reference log-probs once, then
runs each strategy in its own subprocess (so peak RSS, `ru_maxrss`, is that strategy's alone): the same pairs, the
same optimizer steps (forward_and_loss -> backward -> AdamW step, as dpo.train does). Step time is the median over
the steps after the first. Prints a table and writes the numbers as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

STRATEGIES = {  # name: (lora, reference)
    "full / model (frozen copy)": (False, "model"),
    "full / precomputed": (False, "precomputed"),
    "lora / adapters_disabled": (True, "adapters_disabled"),
    "lora / model (frozen copy)": (True, "model"),
    "lora / precomputed": (True, "precomputed"),
}


def build_workload(root: Path, args: argparse.Namespace) -> tuple[Path, Path]:
    import random

    import datasets

    from dpo.contract import stamp_report
    from dpo.tiny import build_model, build_tokenizer

    vocab = 2048
    model_dir, data_dir = root / "model", root / "data"
    build_model(vocab_size=vocab, hidden_size=args.hidden_size, num_layers=args.num_layers,
                num_heads=max(1, args.hidden_size // 64), seed=0).save_pretrained(model_dir)
    rng = random.Random(0)
    pairs = [{"prompt_ids": [rng.randrange(3, vocab) for _ in range(rng.randint(48, 96))],
              "chosen_ids": [rng.randrange(3, vocab) for _ in range(rng.randint(16, 48))] + [2],
              "rejected_ids": [rng.randrange(3, vocab) for _ in range(rng.randint(16, 48))] + [2]}
             for _ in range(args.batch_size * args.steps)]
    datasets.Dataset.from_list(pairs).save_to_disk(str(data_dir / "train"))
    # Only its pad id and hash matter here: the pairs are ids already. The report records the hashes training
    # verifies, as data_prep would (dpo.contract).
    build_tokenizer(["a tokenizer for a benchmark of random token ids"] * 4, vocab_size=300).save_pretrained(
        data_dir / "tokenizer")
    report = stamp_report({"pad_token_id": 0, "eos_token_id": 2}, data_dir)
    (data_dir / "prep_report.json").write_text(json.dumps(report))
    return model_dir, data_dir


def worker(args: argparse.Namespace) -> None:
    """One strategy in this process; prints one JSON line."""
    import torch

    from dpo.config import TrainConfig
    from dpo.data import load_split, train_micro_batches
    from dpo.distributed import build_accelerator
    from dpo.layouts import make_collate
    from dpo.models import load_policy
    from dpo.reference import build_reference
    from dpo.train import build_optimizer, forward_and_loss

    torch.manual_seed(0)
    lora, reference_kind = STRATEGIES[args.worker]
    cfg = TrainConfig(model_path=args.model, data_path=args.data, lora=lora, reference=reference_kind,
                      batch_size=args.batch_size, learning_rate=1e-4, lora_dropout=0.0)
    accelerator = build_accelerator(mixed_precision="no", gradient_accumulation_steps=1, max_grad_norm=1.0)
    dataset = load_split(args.data, "train")
    collate = make_collate("padded", pad_token_id=0, max_tokens_per_row=cfg.max_tokens_per_row)
    device = accelerator.device
    policy = load_policy(cfg).to(device)
    policy.train()
    optimizer = build_optimizer(policy, cfg)
    reference = build_reference(reference_kind, cfg, accelerator, policy=policy)
    times = []
    for indices in train_micro_batches(len(dataset), batch_size=args.batch_size, num_processes=1, process_index=0,
                                       accumulation=1, seed=0, epoch=0):
        batch = collate([dataset[i] for i in indices], None).to(device)
        start = time.perf_counter()
        out = forward_and_loss(policy, reference, batch, cfg)
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    ref_params = sum(p.numel() for p in reference.model.parameters()) if reference.model is not None else 0
    print(json.dumps({
        "strategy": args.worker,
        "step_s_median": statistics.median(times[1:] or times),
        "step_s_all": times,
        "device": str(device),
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,  # Linux reports KiB
        "peak_device_mib": torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else None,
        "trainable_params": sum(p.numel() for p in policy.parameters() if p.requires_grad),
        "reference_model_params": ref_params,
    }))


def run_subprocess(argv: list[str]) -> tuple[str, float]:
    start = time.perf_counter()
    done = subprocess.run([sys.executable, *argv], capture_output=True, text=True,
                          env={"TOKENIZERS_PARALLELISM": "false", **os.environ})
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed:\n{done.stderr[-3000:]}")
    return done.stdout, time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden_size", type=int, default=256, help="model width")
    parser.add_argument("--num_layers", type=int, default=4, help="decoder layers")
    parser.add_argument("--steps", type=int, default=6, help="optimizer steps per strategy (the first is not timed)")
    parser.add_argument("--batch_size", type=int, default=4, help="pairs per step")
    parser.add_argument("--output", default="runs/bench_reference.json", help="where the JSON goes")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return 0
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        model_dir, data_dir = build_workload(Path(tmp), args)
        _, precompute_s = run_subprocess(["-m", "dpo.precompute_ref", "--model_path", str(model_dir),
                                          "--data_path", str(data_dir), "--batch_size", str(args.batch_size)])
        for name in STRATEGIES:
            out, _ = run_subprocess([__file__, "--worker", name, "--model", str(model_dir), "--data", str(data_dir),
                                     "--batch_size", str(args.batch_size), "--steps", str(args.steps)])
            results.append(json.loads(out.strip().splitlines()[-1]))
    base = results[0]["step_s_median"]
    print(f"model hidden {args.hidden_size} x {args.num_layers} layers, batch {args.batch_size} pairs, "
          f"{args.steps} steps; precompute (one-off, whole data, incl. start-up): {precompute_s:.1f} s\n")
    print(f"{'strategy':<28} {'step s':>8} {'vs copy':>8} {'peak RSS MiB':>13} {'peak GPU MiB':>13} "
          f"{'ref params':>11} {'trainable':>10}  (device: {results[0]['device']})")
    for r in results:
        gpu = f"{r['peak_device_mib']:>13.0f}" if r["peak_device_mib"] is not None else f"{'-':>13}"
        print(f"{r['strategy']:<28} {r['step_s_median']:>8.3f} {base / r['step_s_median']:>7.2f}x "
              f"{r['peak_rss_mib']:>13.0f} {gpu} {r['reference_model_params']:>11,} {r['trainable_params']:>10,}")
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps({"config": vars(args), "precompute_s": precompute_s, "results": results},
                                 indent=2) + "\n")
    print(f"\nwritten to {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
