"""Evaluation cost per pair against a training step's forward, on real-length pairs.

    python -m benchmarks.bench_eval [--eval-pairs 299] [--steps 3] [--output bench_results/bench_eval.json]
                                                                                      (from the repo root)

The workload is bench_throughput's, built by the same code: a Llama-style model (hidden 512, 8 layers, vocabulary
8k, about 28M parameters) and preference pairs with multi-turn prompts of a few hundred tokens and shorter answers,
every prompt + answer within `--max-length`. One process runs the trainer's own pieces as dpo.train wires them: the
policy, a frozen reference (the starting model), the layout the probe proves exact for both. Measured, in order:

- train forward: the collate and `dpo.train.forward_and_loss` in training mode (reference log-probs, the policy
  forward keeping its graph, the loss) on `--steps` batches of `--batch-size` pairs after `--warmup` unmeasured
  ones; each batch's backward and optimizer step follow, timed apart (the train step row is forward + backward +
  step);
- eval: `dpo.train.evaluate` over `--eval-pairs` pairs, its progress bar on stderr, at its default batch (twice the
  training batch) and at the training batch.

Reported per row: wall and process-CPU seconds per pair (CPU seconds count all threads: on a shared machine they
stretch far less than wall time), and the ratio of each to the train forward's, the figure the README quotes
(evaluation must cost at most a training forward per pair).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.bench_throughput import MODEL_SHAPE, batches_of, build_workload, model_shape
from benchmarks.measure import hardware, sync_device

DEFAULT_OUTPUT = "bench_results/bench_eval.json"


def timed(device: str, fn: Any) -> tuple[float, float, Any]:
    """(wall s, process CPU s, result) of `fn()`, the device's queued work included."""
    sync_device(device)
    wall, cpu = time.perf_counter(), time.process_time()
    result = fn()
    sync_device(device)
    return time.perf_counter() - wall, time.process_time() - cpu, result


def measure(meta: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """The rows (module docstring) on the workload `meta` describes."""
    import datasets
    from accelerate import Accelerator

    from benchmarks.pieces import prepared_models, update
    from dpo.config import TrainConfig
    from dpo.evaluation import eval_batch_size
    from dpo.layouts import choose_run_layout, data_shape, make_collate
    from dpo.train import evaluate, forward_and_loss

    cfg = TrainConfig(model_path=meta["model_dir"], data_path=str(args.workdir), reference="model",
                      batch_size=args.batch_size, max_tokens_per_row=args.max_tokens_per_row, seed=args.seed)
    torch.manual_seed(args.seed)
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    device = str(accelerator.device)
    pairs = [{k: v for k, v in p.items() if not k.startswith("ref_")}
             for p in json.loads((Path(args.workdir) / "pairs.json").read_text())]
    eval_ds = datasets.Dataset.from_list(pairs[:args.eval_pairs])
    policy, optimizer, reference = prepared_models(cfg, accelerator)
    choice = choose_run_layout([policy, reference.model], cfg, accelerator, pad_token_id=meta["pad_token_id"],
                               data=data_shape(datasets.Dataset.from_list(pairs), eval_ds))
    print(choice.message, flush=True)
    collate = make_collate(choice.layout, pad_token_id=meta["pad_token_id"], max_tokens_per_row=cfg.max_tokens_per_row,
                           attention=choice.attention)
    forward_wall, forward_cpu, step_wall, step_cpu = [], [], [], []
    for k, batch_pairs in enumerate(batches_of(pairs, batch_size=args.batch_size, count=args.warmup + args.steps)):
        def forward() -> Any:  # the collate too, as evaluate's rows time it
            return forward_and_loss(policy, reference, collate(batch_pairs, None).to(device), cfg)

        wall, cpu, out = timed(device, forward)

        rest_wall, rest_cpu, _ = timed(device, lambda: update(policy, optimizer, accelerator, out.loss, cfg))
        if k >= args.warmup:
            forward_wall.append(wall / args.batch_size)
            forward_cpu.append(cpu / args.batch_size)
            step_wall.append((wall + rest_wall) / args.batch_size)
            step_cpu.append((cpu + rest_cpu) / args.batch_size)
    rows = [{"name": "train forward", "pairs": args.steps * args.batch_size, "batch_size": args.batch_size,
             "wall_s_per_pair": statistics.median(forward_wall), "cpu_s_per_pair": statistics.median(forward_cpu)},
            {"name": "train step (forward + backward + optimizer)", "pairs": args.steps * args.batch_size,
             "batch_size": args.batch_size, "wall_s_per_pair": statistics.median(step_wall),
             "cpu_s_per_pair": statistics.median(step_cpu)}]
    for label, size in (("eval, default batch", None), ("eval, training batch", args.batch_size)):
        cfg.eval_batch_size = size
        wall, cpu, metrics = timed(device, lambda: evaluate(policy, reference, eval_ds, collate, cfg, accelerator,
                                                            log=lambda line: print(line, flush=True)))
        rows.append({"name": label, "pairs": int(metrics["num_pairs"]), "batch_size": eval_batch_size(cfg),
                     "wall_s_per_pair": wall / metrics["num_pairs"], "cpu_s_per_pair": cpu / metrics["num_pairs"]})
    for row in rows:
        row["wall_vs_train_forward"] = row["wall_s_per_pair"] / rows[0]["wall_s_per_pair"]
        row["cpu_vs_train_forward"] = row["cpu_s_per_pair"] / rows[0]["cpu_s_per_pair"]
    return {"layout": choice.layout.name, "device": device, "rows": rows}


def format_table(rows: list[dict[str, Any]]) -> str:
    head = (f"{'row':<44} {'pairs':>5} {'batch':>5} {'wall s/pair':>11} {'CPU s/pair':>10} "
            f"{'wall vs fwd':>11} {'CPU vs fwd':>10}")
    lines = [head, "-" * len(head)]
    lines += [f"{r['name']:<44} {r['pairs']:>5} {r['batch_size']:>5} {r['wall_s_per_pair']:>11.3f} "
              f"{r['cpu_s_per_pair']:>10.3f} {r['wall_vs_train_forward']:>10.2f}x {r['cpu_vs_train_forward']:>9.2f}x"
              for r in rows]
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_eval", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--eval-pairs", type=int, default=64, help="pairs evaluated (the issue's run had 299)")
    parser.add_argument("--steps", type=int, default=3, help="measured training batches")
    parser.add_argument("--warmup", type=int, default=1, help="unmeasured training batches before them")
    parser.add_argument("--batch-size", type=int, default=8, help="training pairs per batch")
    parser.add_argument("--max-length", type=int, default=512, help="bound on prompt + answer tokens of a pair")
    parser.add_argument("--max-tokens-per-row", type=int, default=2048, help="packed layouts: bound on a row")
    parser.add_argument("--hidden-size", type=int, default=MODEL_SHAPE["hidden_size"], help="model width")
    parser.add_argument("--num-layers", type=int, default=MODEL_SHAPE["num_layers"], help="decoder layers")
    parser.add_argument("--vocab-size", type=int, default=MODEL_SHAPE["vocab_size"], help="BPE vocabulary")
    parser.add_argument("--seed", type=int, default=0, help="fixes the text, tokenizer, model and pairs")
    parser.add_argument("--device", choices=("auto", "cpu"), default="auto", help="cpu: hide any GPU")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--workdir", default="bench_results/workload_eval", help="where the workload is built")
    parser.add_argument("--output", default=DEFAULT_OUTPUT, help="JSON results file")
    args = parser.parse_args(argv)
    args.shape = model_shape(hidden_size=args.hidden_size, num_layers=args.num_layers, vocab_size=args.vocab_size)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.device == "cpu":  # before CUDA initialises
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.time()
    num_pairs = max(args.eval_pairs, args.batch_size * (args.warmup + args.steps))
    meta = build_workload(Path(args.workdir), seed=args.seed, num_pairs=num_pairs, max_length=args.max_length,
                          shape=args.shape)
    print(f"[bench_eval] {meta['parameters'] / 1e6:.1f}M parameters, {meta['pairs']} pairs (mean prompt "
          f"{meta['mean_prompt_tokens']:.0f} tokens, mean answer {meta['mean_answer_tokens']:.0f})", flush=True)
    result = measure(meta, args)
    report = {"command": "python -m benchmarks.bench_eval " + " ".join(sys.argv[1:] if argv is None else argv),
              "hardware": hardware(), "workload": {k: v for k, v in meta.items() if k not in ("model_dir", "key")}
              | {"batch_size": args.batch_size, "max_length": args.max_length, **args.shape},
              **result, "wall_s": time.time() - started}
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(report, indent=1))
    print(format_table(result["rows"]))
    print(f"[bench_eval] layout {result['layout']} on {result['device']}; results in {output} "
          f"({report['wall_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
