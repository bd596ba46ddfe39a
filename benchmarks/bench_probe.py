"""One-time cost of the layout probe (dpo/layouts.py) on the training benchmark's model shape.

    python -m benchmarks.bench_probe [--json bench_results/bench_probe.json]

Builds 28M-parameter models (hidden 512, 8 layers, 8k vocabulary) of a plain Llama and of a Mistral with a 4096-token
sliding window, and times `choose_layout` as a run calls it on the policy (train mode, dropout off): the probe's
longest sequence is the data's longest prompt + answer, here 1,000 and 600 tokens, and 5,000 (beyond the window).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, MistralConfig, PreTrainedModel

from dpo.layouts import choose_layout

SHAPE = dict(vocab_size=8192, hidden_size=512, intermediate_size=2048, num_hidden_layers=8, num_attention_heads=8,
             num_key_value_heads=8, max_position_embeddings=8192)


def build(kind: str) -> PreTrainedModel:
    from transformers import AutoModelForCausalLM

    config = LlamaConfig(**SHAPE) if kind == "llama" else MistralConfig(sliding_window=4096, **SHAPE)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).float().train()  # the policy, as a run probes it


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", default="bench_results/bench_probe.json", help="where the results go")
    parser.add_argument("--quick", action="store_true", help="only the 1,000-token rows (skip the 5,000-token one)")
    args = parser.parse_args(argv)
    cases = [("llama", 1000), ("llama", 600), ("mistral_window_4096", 1000)]
    if not args.quick:
        cases.append(("mistral_window_4096", 5000))
    rows = []
    for kind, longest in cases:
        model = build(kind)
        tokens = [0]  # tokens through the model, whatever the layout: what the cost is made of on any machine
        model.register_forward_pre_hook(lambda _, args, kwargs: tokens.__setitem__(
            0, tokens[0] + kwargs.get("input_ids", args[0] if args else None).numel()), with_kwargs=True)
        start, cpu = time.perf_counter(), time.process_time()
        choice = choose_layout([model], layout="auto", prefix_sharing=None, pad_token_id=0, max_tokens_per_row=2048,
                               precise=True, longest=longest)
        rows.append({"model": kind, "longest_sequence": longest, "seconds": round(time.perf_counter() - start, 2),
                     "cpu_seconds": round(time.process_time() - cpu, 2), "tokens": tokens[0],
                     "layout": choice.layout.name})
    print(f"{'model':<22} {'longest':>8} {'probe (s)':>10} {'CPU (s)':>8} {'tokens':>7}  layout")
    for row in rows:
        print(f"{row['model']:<22} {row['longest_sequence']:>8} {row['seconds']:>10.2f} {row['cpu_seconds']:>8.2f} "
              f"{row['tokens']:>7}  {row['layout']}")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"threads": torch.get_num_threads(), "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
