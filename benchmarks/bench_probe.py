"""One-time cost of the layout probe (dpo/layouts.py) on the throughput benchmark's model.

    python -m benchmarks.bench_probe [--quick] [--repeats 3] [--threads N] [--json bench_results/bench_probe.json]

Builds the model of benchmarks/bench_throughput.py (a 28M-parameter Llama: hidden 512, 8 layers, MLP 1280, 8k
vocabulary, tied embeddings) and a Mistral of the same shape with a 4096-token sliding window, and times
`choose_layout` as a run calls it on the policy (train mode, dropout off): the probe's longest sequence is the data's
longest prompt + answer, here 1,000 and 600 tokens, and 5,000 (beyond the window); one row adds the frozen
reference a full fine-tune loads (a copy of the starting weights, in eval mode). Each row is run `--repeats` times
and reports the fastest (the machine is shared: the slower runs measure the other jobs), with its CPU seconds, the
tokens and the forwards that went through the model - what the cost is made of on any machine.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path
from typing import Any

import torch
from transformers import MistralConfig, MistralForCausalLM, PreTrainedModel

from benchmarks.bench_throughput import MODEL_SHAPE
from demo.tiny import build_model
from dpo.atomic import write_text_atomic
from dpo.layouts import choose_layout

MAX_POSITIONS = 8192


def build(kind: str) -> PreTrainedModel:
    """The throughput benchmark's model ("llama") or the same shape with a 4096-token window, as a policy."""
    shape = MODEL_SHAPE
    if kind == "llama":
        model = build_model(vocab_size=shape["vocab_size"], hidden_size=shape["hidden_size"],
                            num_layers=shape["num_layers"], num_heads=shape["num_heads"],
                            intermediate_size=shape["intermediate_size"], max_position_embeddings=MAX_POSITIONS,
                            tie_word_embeddings=True)
    else:
        config = MistralConfig(vocab_size=shape["vocab_size"], hidden_size=shape["hidden_size"],
                               intermediate_size=shape["intermediate_size"], num_hidden_layers=shape["num_layers"],
                               num_attention_heads=shape["num_heads"], num_key_value_heads=shape["num_heads"],
                               max_position_embeddings=MAX_POSITIONS, tie_word_embeddings=True, sliding_window=4096,
                               attn_implementation="sdpa")
        torch.manual_seed(0)
        model = MistralForCausalLM(config)
    return model.float().train()  # the policy, as a run probes it


def measure(kind: str, longest: int, *, repeats: int, frozen_reference: bool = False) -> dict[str, Any]:
    model = build(kind)
    models = [model, copy.deepcopy(model).eval()] if frozen_reference else [model]
    seen = {"tokens": 0, "forwards": 0}

    def count(_: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        seen["tokens"] += ids.numel()
        seen["forwards"] += 1

    for each in models:
        each.register_forward_pre_hook(count, with_kwargs=True)
    runs = []
    for _ in range(repeats):
        seen.update(tokens=0, forwards=0)
        start, cpu = time.perf_counter(), time.process_time()
        choice = choose_layout(models, layout="auto", prefix_sharing=None, pad_token_id=0, max_tokens_per_row=2048,
                               precise=True, longest=longest)
        runs.append((time.perf_counter() - start, time.process_time() - cpu))
    wall, cpu = min(runs)
    name = f"{kind} + frozen reference" if frozen_reference else kind
    return {"model": name, "longest_sequence": longest, "seconds": round(wall, 2), "cpu_seconds": round(cpu, 2),
            "all_seconds": [round(w, 2) for w, _ in runs], **seen, "layout": choice.layout.name}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", default="bench_results/bench_probe.json", help="where the results go")
    parser.add_argument("--quick", action="store_true", help="only the 1,000-token rows (skip the 5,000-token one)")
    parser.add_argument("--repeats", type=int, default=3, help="runs per row; the fastest is reported")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cases = [("llama", 1000, False), ("llama", 1000, True), ("llama", 600, False), ("mistral_window_4096", 1000, False)]
    if not args.quick:
        cases.append(("mistral_window_4096", 5000, False))
    rows = [measure(kind, longest, repeats=args.repeats, frozen_reference=frozen)
            for kind, longest, frozen in cases]
    print(f"{'model':<26} {'longest':>8} {'probe (s)':>10} {'CPU (s)':>8} {'tokens':>7} {'forwards':>9}  layout")
    for row in rows:
        print(f"{row['model']:<26} {row['longest_sequence']:>8} {row['seconds']:>10.2f} {row['cpu_seconds']:>8.2f} "
              f"{row['tokens']:>7} {row['forwards']:>9}  {row['layout']}")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(Path(args.json), json.dumps({"threads": torch.get_num_threads(), "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
